//! detour's own DNS resolver for upstream names: a per-name cache that honours
//! record TTLs and, when the DNS fails, keeps serving the last good addresses
//! for a bounded stale window.
//!
//! Why: provider hosts are resolved only when a new connection is opened, so a
//! DNS outage hides behind caches and then fails every new connection at once
//! (OpenAI, December 2024). Serving stale answers turns that cliff into a
//! warning. The algorithm is "serve-stale", RFC 8767
//! (<https://www.rfc-editor.org/rfc/rfc8767>), with its three timers:
//!
//! - **client response timer** ([`Options::refresh_wait`], 1.8 s): when an
//!   answer has expired, the caller waits this long for the re-resolution and
//!   is then given the stale addresses; the lookup goes on in the background
//!   and updates the cache when it ends (until then, later callers get the
//!   stale addresses without waiting);
//! - **failure recheck timer** ([`Options::failure_recheck`], 30 s): after a
//!   failed re-resolution the stale addresses are served at once, without
//!   asking the DNS again, until this timer runs out (one query per name per
//!   period, however many connections are opened);
//! - **maximum stale timer** ([`Options::stale_window`], 1 h): how long after
//!   its TTL ran out an answer may still be served. Beyond it the lookup fails
//!   with [`DnsError::StaleExpired`], which names the failure and the window.
//!
//! What counts as a failure: a timeout, an unreachable server, SERVFAIL,
//! REFUSED and every other error code, and also **NXDOMAIN or an empty
//! answer** for a name that resolved before. RFC 8767 treats NXDOMAIN as an
//! answer; we do not, because the names here are fixed provider hosts from
//! the config, and a provider deleting its API host is much rarer than a
//! broken zone push or a misconfigured resolver. If the name really is gone,
//! connecting to the old addresses fails and failover takes over; after the
//! stale window the NXDOMAIN is final. A name that never resolved gets its
//! error at once ([`DnsError::NotFound`] or [`DnsError::Failed`]), remembered
//! for the failure recheck period.
//!
//! Each stale answer increments [`CachingResolver::stale_uses`]; the first one
//! of a failure period logs a warning per name, and the recovery logs once.
//! TTLs are clamped to [`Options::min_ttl`]..=[`Options::max_ttl`] (1 s to
//! 5 min). IP literals and `localhost` never reach the DNS.
//!
//! Which servers: [`shared`] is the one resolver every provider client uses
//! (installed by `upstream::Upstream::new`). It reads `/etc/resolv.conf`
//! unless the environment variable `DETOUR_DNS_SERVERS` ([`SERVERS_ENV`])
//! names servers, as a comma-separated list of `ip` or `ip:port` (port 53 by
//! default), for example `DETOUR_DNS_SERVERS=10.0.0.2,127.0.0.1:5353`. If the
//! system config cannot be read, it falls back to the system's `getaddrinfo`
//! (reqwest's default behaviour), still behind the same cache, with a fixed
//! TTL of 30 s. A program (or a future `[server] dns_servers` config key) can
//! install its own with [`install_shared`] before the first client is built.
//!
//! Cost: a cached lookup is two `ArcSwap` loads and no lock. A re-resolution
//! holds a per-name async lock (one query in flight per name); callers that
//! have stale addresses to fall back on wait for it at most `refresh_wait`.
//! Lookups happen only when a connection is opened, not per request.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The environment variable read by [`shared`]: DNS servers to use instead of
/// `/etc/resolv.conf`, as `ip` or `ip:port` (default port 53), comma-separated.
pub const SERVERS_ENV: &str = "DETOUR_DNS_SERVERS";

/// TTL given to answers of the `getaddrinfo` fallback, which reports none.
const SYSTEM_TTL: Duration = Duration::from_secs(30);

/// Hard limit on one re-resolution, so the per-name lock is always released
/// (hickory's own limit is the query timeout times the attempts).
const LOOKUP_LIMIT: Duration = Duration::from_secs(30);

/// Most names cached; beyond it, new names are resolved without the cache.
/// Names come from the config's provider URLs, so this is never reached in
/// practice; it only bounds memory.
const MAX_NAMES: usize = 1024;

/// How a [`CachingResolver`] caches and serves stale answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// How long after its TTL an answer may still be served while the DNS
    /// fails (RFC 8767 maximum stale timer). Default 1 h.
    pub stale_window: Duration,
    /// Shortest time an answer is cached, whatever its TTL. Default 1 s.
    pub min_ttl: Duration,
    /// Longest time an answer is cached before it is asked again. Default 5 min.
    pub max_ttl: Duration,
    /// How long a caller with stale addresses to fall back on waits for a
    /// re-resolution (RFC 8767 client response timer). Default 1.8 s.
    pub refresh_wait: Duration,
    /// After a failed re-resolution, how long the stale addresses (or the
    /// error, for a name that never resolved) are served without asking the
    /// DNS again (RFC 8767 failure recheck timer). Default 30 s.
    pub failure_recheck: Duration,
    /// Timeout of one query to one server; `None` keeps the resolv.conf value
    /// (or hickory's 5 s). The DNS backends only.
    pub query_timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stale_window: Duration::from_secs(3600),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            refresh_wait: Duration::from_millis(1800),
            failure_recheck: Duration::from_secs(30),
            query_timeout: None,
        }
    }
}

/// Why a name has no addresses to connect to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The DNS says the name does not exist (NXDOMAIN) or has no address.
    #[error("DNS: `{name}` has no addresses: {detail}")]
    NotFound { name: String, detail: String },
    /// The DNS gave no usable answer: timeout, unreachable server, SERVFAIL, ….
    #[error("DNS resolution of `{name}` failed: {detail}")]
    Failed { name: String, detail: String },
    /// The DNS fails and the last good addresses are past the stale window.
    #[error(
        "DNS resolution of `{name}` is failing ({detail}) and its last good addresses \
         expired {expired_ago:?} ago, beyond the stale window of {window:?}"
    )]
    StaleExpired {
        name: String,
        detail: String,
        expired_ago: Duration,
        window: Duration,
    },
    /// The resolver could not be set up (no servers, unreadable config, …).
    #[error("DNS resolver configuration: {detail}")]
    Config { detail: String },
}

/// A caching, stale-serving resolver; see the module doc. Cheap to clone
/// (clones share the cache and the counter).
#[derive(Clone)]
pub struct CachingResolver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CachingResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingResolver")
            .field("backend", &self.inner.backend.name())
            .field("options", &self.inner.opts)
            .field("stale_uses", &self.stale_uses())
            .finish_non_exhaustive()
    }
}

struct Inner {
    backend: Backend,
    opts: Options,
    slots: ArcSwap<HashMap<Box<str>, Arc<Slot>>>,
    stale_uses: AtomicU64,
}

enum Backend {
    Hickory(Box<TokioResolver>),
    /// `getaddrinfo` on tokio's blocking pool: reqwest's default resolver.
    System,
}

/// One name's cache entry. `state` is written only by the holder of `refresh`.
#[derive(Default)]
struct Slot {
    state: ArcSwapOption<State>,
    refresh: Arc<Mutex<()>>,
    /// The failure period's warning was logged.
    warned: AtomicBool,
    /// The running re-resolution already outlasted `refresh_wait`: later
    /// callers with stale addresses do not wait for it again.
    slow: AtomicBool,
}

struct State {
    /// The last good answer, however old.
    good: Option<Good>,
    /// Set when the last re-resolution failed.
    failure: Option<Failure>,
}

#[derive(Clone)]
struct Good {
    addrs: Arc<[IpAddr]>,
    fresh_until: Instant,
    stale_until: Instant,
}

struct Failure {
    error: DnsError,
    /// No new query before this (RFC 8767 failure recheck timer).
    retry_at: Instant,
}

/// One answer from a backend.
struct Answer {
    addrs: Arc<[IpAddr]>,
    /// The smallest record TTL, if the backend knows it.
    ttl: Option<Duration>,
}

impl CachingResolver {
    /// A resolver using the servers, search list and options of
    /// `/etc/resolv.conf`, and `/etc/hosts`.
    pub fn from_system(opts: Options) -> Result<Self, DnsError> {
        let builder = TokioResolver::builder_tokio().map_err(|e| DnsError::Config {
            detail: format!("cannot read the system DNS config: {e}"),
        })?;
        Ok(Self::hickory(builder, opts))
    }

    /// A resolver asking `servers` (UDP, and TCP for truncated answers) with
    /// no search list; `/etc/hosts` is still consulted.
    pub fn with_servers(servers: &[SocketAddr], opts: Options) -> Result<Self, DnsError> {
        if servers.is_empty() {
            return Err(DnsError::Config {
                detail: "no DNS servers given".to_owned(),
            });
        }
        let mut config = ResolverConfig::new();
        for addr in servers {
            config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
        }
        let builder =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
        Ok(Self::hickory(builder, opts))
    }

    /// A resolver over the system's `getaddrinfo` (what reqwest does by
    /// default), behind the same cache; answers get a TTL of 30 s.
    pub fn getaddrinfo(opts: Options) -> Self {
        Self::build(Backend::System, opts)
    }

    fn hickory(
        mut builder: hickory_resolver::ResolverBuilder<TokioConnectionProvider>,
        opts: Options,
    ) -> Self {
        let o: &mut ResolverOpts = builder.options_mut();
        if let Some(t) = opts.query_timeout {
            o.timeout = t;
        }
        // Our cache is the one that counts: hickory's must not outlive it,
        // nor remember a failure beyond our recheck period.
        o.positive_max_ttl = Some(opts.max_ttl.max(opts.min_ttl));
        o.negative_max_ttl = Some(opts.failure_recheck);
        Self::build(Backend::Hickory(Box::new(builder.build())), opts)
    }

    fn build(backend: Backend, mut opts: Options) -> Self {
        opts.max_ttl = opts.max_ttl.max(opts.min_ttl);
        Self {
            inner: Arc::new(Inner {
                backend,
                opts,
                slots: ArcSwap::default(),
                stale_uses: AtomicU64::new(0),
            }),
        }
    }

    /// How many times a lookup was answered with expired addresses.
    pub fn stale_uses(&self) -> u64 {
        self.inner.stale_uses.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> &Options {
        &self.inner.opts
    }

    /// The addresses of `host`: cached, fresh, or stale; see the module doc.
    pub async fn lookup(&self, host: &str) -> Result<Arc<[IpAddr]>, DnsError> {
        if let Some(addrs) = bypass(host) {
            return Ok(addrs);
        }
        let key = normalize(host);
        let inner = &self.inner;
        let Some(slot) = inner.slot(&key) else {
            return inner.backend.query(&key).await.map(|a| a.addrs);
        };
        // At most a few rounds: a round only repeats if a refresh ended
        // without writing its result (its task was cancelled).
        for _ in 0..3 {
            let now = Instant::now();
            let state = slot.state.load_full();
            let servable = state.as_deref().and_then(|s| s.servable(now));
            if let Some(state) = state.as_deref() {
                if let Some(good) = state.fresh(now) {
                    return Ok(Arc::clone(&good.addrs));
                }
                if let Some(f) = state.failure.as_ref().filter(|f| now < f.retry_at) {
                    return match servable {
                        Some(good) => Ok(inner.stale(&key, &slot, good, &f.error, now)),
                        None => Err(inner.unservable(&key, state, now)),
                    };
                }
            }
            inner.start_refresh(&slot, &key);
            let done = slot.refresh.lock();
            match servable {
                Some(good) => {
                    let waited = if slot.slow.load(Ordering::Relaxed) {
                        Err(())
                    } else {
                        tokio::time::timeout(inner.opts.refresh_wait, done)
                            .await
                            .map_err(drop)
                    };
                    match waited {
                        Ok(guard) => drop(guard),
                        Err(()) => {
                            slot.slow.store(true, Ordering::Relaxed);
                            let slow = DnsError::Failed {
                                name: key.to_string(),
                                detail: format!("no answer within {:?}", inner.opts.refresh_wait),
                            };
                            return Ok(inner.stale(&key, &slot, good, &slow, now));
                        }
                    }
                }
                None => drop(done.await),
            }
            let now = Instant::now();
            if let Some(state) = slot.state.load_full() {
                if let Some(good) = state.fresh(now) {
                    return Ok(Arc::clone(&good.addrs));
                }
                if let Some(f) = &state.failure {
                    return match state.servable(now) {
                        Some(good) => Ok(inner.stale(&key, &slot, good, &f.error, now)),
                        None => Err(inner.unservable(&key, &state, now)),
                    };
                }
            }
        }
        Err(DnsError::Failed {
            name: key.to_string(),
            detail: "the lookup was cancelled".to_owned(),
        })
    }
}

impl reqwest::dns::Resolve for CachingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addrs = this.lookup(name.as_str()).await?;
            // Port 0: reqwest puts in the URL's port.
            let addrs: Vec<SocketAddr> = addrs.iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// [`CachingResolver`] as hyper-util's connector asks for it (a
/// `tower::Service` from a host name to socket addresses): the provider
/// clients on the data path connect through it.
#[derive(Debug, Clone)]
pub struct ForConnector(pub Arc<CachingResolver>);

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for ForConnector {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DnsError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, DnsError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), DnsError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let this = Arc::clone(&self.0);
        Box::pin(async move {
            let addrs = this.lookup(name.as_str()).await?;
            // Port 0: the connector puts in the URI's port.
            let addrs: Vec<SocketAddr> = addrs.iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
            Ok(addrs.into_iter())
        })
    }
}

impl State {
    fn fresh(&self, now: Instant) -> Option<&Good> {
        self.good.as_ref().filter(|g| now < g.fresh_until)
    }

    fn servable(&self, now: Instant) -> Option<Good> {
        self.good.clone().filter(|g| now < g.stale_until)
    }
}

impl Inner {
    /// The slot of `key`, made on first sight; `None` when the cache is full.
    fn slot(&self, key: &str) -> Option<Arc<Slot>> {
        if let Some(slot) = self.slots.load().get(key) {
            return Some(Arc::clone(slot));
        }
        let mut found = None;
        self.slots.rcu(|map| {
            found = map.get(key).cloned();
            if found.is_some() || map.len() >= MAX_NAMES {
                return Arc::clone(map);
            }
            let slot = Arc::new(Slot::default());
            found = Some(Arc::clone(&slot));
            let mut map = HashMap::clone(map);
            map.insert(key.into(), slot);
            Arc::new(map)
        });
        found
    }

    /// Starts a re-resolution of `key` unless one is running.
    fn start_refresh(self: &Arc<Self>, slot: &Arc<Slot>, key: &str) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(guard) = Arc::clone(&slot.refresh).try_lock_owned() else {
            return;
        };
        let inner = Arc::clone(self);
        let slot = Arc::clone(slot);
        let key = key.to_owned();
        rt.spawn(async move {
            inner.refresh(&slot, &key).await;
            drop(guard);
        });
    }

    /// Asks the backend and writes the outcome into the slot.
    async fn refresh(&self, slot: &Slot, key: &str) {
        let result = match tokio::time::timeout(LOOKUP_LIMIT, self.backend.query(key)).await {
            Ok(result) => result,
            Err(_) => Err(DnsError::Failed {
                name: key.to_owned(),
                detail: format!("no answer within {LOOKUP_LIMIT:?}"),
            }),
        };
        let now = Instant::now();
        let previous = slot.state.load_full();
        let next = match result {
            Ok(answer) => {
                if previous.as_ref().is_some_and(|s| s.failure.is_some())
                    && slot.warned.swap(false, Ordering::Relaxed)
                {
                    tracing::warn!(name = %key, "DNS resolution recovered");
                }
                let ttl = answer
                    .ttl
                    .unwrap_or(SYSTEM_TTL)
                    .max(self.opts.min_ttl)
                    .min(self.opts.max_ttl);
                let fresh_until = later(now, ttl);
                State {
                    good: Some(Good {
                        addrs: answer.addrs,
                        fresh_until,
                        stale_until: later(fresh_until, self.opts.stale_window),
                    }),
                    failure: None,
                }
            }
            Err(error) => {
                tracing::debug!(name = %key, error = %error, "DNS re-resolution failed");
                State {
                    good: previous.as_ref().and_then(|s| s.good.clone()),
                    failure: Some(Failure {
                        error,
                        retry_at: later(now, self.opts.failure_recheck),
                    }),
                }
            }
        };
        slot.state.store(Some(Arc::new(next)));
        slot.slow.store(false, Ordering::Relaxed);
    }

    /// Serves `good` past its TTL: counts it, and warns once per failure period.
    fn stale(
        &self,
        key: &str,
        slot: &Slot,
        good: Good,
        why: &DnsError,
        now: Instant,
    ) -> Arc<[IpAddr]> {
        self.stale_uses.fetch_add(1, Ordering::Relaxed);
        if !slot.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                name = %key,
                error = %why,
                expired_ago = ?now.saturating_duration_since(good.fresh_until),
                stale_window = ?self.opts.stale_window,
                "DNS resolution failing; serving the last good addresses"
            );
        }
        good.addrs
    }

    /// The error for a failing name with nothing left to serve.
    fn unservable(&self, key: &str, state: &State, now: Instant) -> DnsError {
        let Some(failure) = &state.failure else {
            return DnsError::Failed {
                name: key.to_owned(),
                detail: "no answer".to_owned(),
            };
        };
        match &state.good {
            Some(good) => DnsError::StaleExpired {
                name: key.to_owned(),
                detail: detail(&failure.error),
                expired_ago: now.saturating_duration_since(good.fresh_until),
                window: self.opts.stale_window,
            },
            None => failure.error.clone(),
        }
    }
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Self::Hickory(_) => "hickory",
            Self::System => "getaddrinfo",
        }
    }

    async fn query(&self, name: &str) -> Result<Answer, DnsError> {
        let not_found = |detail: String| DnsError::NotFound {
            name: name.to_owned(),
            detail,
        };
        let answer = match self {
            Self::Hickory(resolver) => match resolver.lookup_ip(name).await {
                Ok(lookup) => Answer {
                    addrs: lookup.iter().collect(),
                    ttl: lookup
                        .as_lookup()
                        .records()
                        .iter()
                        .map(|r| Duration::from_secs(u64::from(r.ttl())))
                        .min(),
                },
                Err(e) if is_not_found(&e) => return Err(not_found(e.to_string())),
                Err(e) => {
                    return Err(DnsError::Failed {
                        name: name.to_owned(),
                        detail: e.to_string(),
                    })
                }
            },
            Self::System => match tokio::net::lookup_host((name, 0)).await {
                Ok(addrs) => {
                    let mut ips: Vec<IpAddr> = Vec::new();
                    for a in addrs {
                        if !ips.contains(&a.ip()) {
                            ips.push(a.ip());
                        }
                    }
                    Answer {
                        addrs: ips.into(),
                        ttl: None,
                    }
                }
                Err(e) => {
                    return Err(DnsError::Failed {
                        name: name.to_owned(),
                        detail: e.to_string(),
                    })
                }
            },
        };
        if answer.addrs.is_empty() {
            return Err(not_found("no address records".to_owned()));
        }
        Ok(answer)
    }
}

/// NXDOMAIN, or NOERROR with no address: an answer, not a failure of the DNS.
fn is_not_found(e: &ResolveError) -> bool {
    match e.proto().map(|p| p.kind()) {
        Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
            matches!(
                *response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            )
        }
        _ => false,
    }
}

/// The failure's own words, without its `name` (the outer error has it).
fn detail(e: &DnsError) -> String {
    match e {
        DnsError::NotFound { detail, .. }
        | DnsError::Failed { detail, .. }
        | DnsError::StaleExpired { detail, .. }
        | DnsError::Config { detail } => detail.clone(),
    }
}

/// Names that never reach the DNS: IP literals and `localhost`.
fn bypass(host: &str) -> Option<Arc<[IpAddr]>> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(Arc::from([ip]));
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Some(Arc::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]));
    }
    None
}

/// The cache key: lower case, without the root's trailing dot.
fn normalize(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// `at + d`, saturating at about a century.
fn later(at: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
    at.checked_add(d.min(CENTURY))
        .or_else(|| at.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(at)
}

/// Parses a list of DNS servers: `ip` or `ip:port` (port 53 by default),
/// separated by commas or whitespace; IPv6 with a port as `[ip]:port`.
pub fn parse_servers(text: &str) -> Result<Vec<SocketAddr>, DnsError> {
    let mut servers = Vec::new();
    for item in text.split(|c: char| c == ',' || c.is_whitespace()) {
        if item.is_empty() {
            continue;
        }
        let addr = match item.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => match item.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, 53),
                Err(_) => {
                    return Err(DnsError::Config {
                        detail: format!("`{item}` is not an IP address or `ip:port`"),
                    })
                }
            },
        };
        servers.push(addr);
    }
    if servers.is_empty() {
        return Err(DnsError::Config {
            detail: "no DNS servers given".to_owned(),
        });
    }
    Ok(servers)
}

static SHARED: OnceLock<Arc<CachingResolver>> = OnceLock::new();

/// The process-wide resolver every provider client uses, made on first use:
/// from `DETOUR_DNS_SERVERS` if set, else `/etc/resolv.conf`, else
/// `getaddrinfo`. Never fails; a bad setting is logged and skipped.
pub fn shared() -> Arc<CachingResolver> {
    Arc::clone(SHARED.get_or_init(|| Arc::new(from_environment())))
}

/// Makes `resolver` the one [`shared`] returns. Only possible before
/// [`shared`] was first called (before any provider client is built);
/// otherwise the resolver already in place is returned as the error.
pub fn install_shared(resolver: CachingResolver) -> Result<(), Arc<CachingResolver>> {
    SHARED.set(Arc::new(resolver)).map_err(|_| shared())
}

fn from_environment() -> CachingResolver {
    let opts = Options::default();
    if let Ok(text) = std::env::var(SERVERS_ENV) {
        match parse_servers(&text).and_then(|s| CachingResolver::with_servers(&s, opts.clone())) {
            Ok(resolver) => return resolver,
            Err(e) => tracing::warn!(error = %e, "ignoring {SERVERS_ENV}"),
        }
    }
    match CachingResolver::from_system(opts.clone()) {
        Ok(resolver) => resolver,
        Err(e) => {
            tracing::warn!(error = %e, "using getaddrinfo for upstream names");
            CachingResolver::getaddrinfo(opts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_with_default_port() {
        assert_eq!(
            parse_servers("10.0.0.2, 127.0.0.1:5353 [::1]:53").unwrap(),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
            ]
        );
        assert!(matches!(parse_servers(" , "), Err(DnsError::Config { .. })));
        let err = parse_servers("10.0.0.2,dns.example").unwrap_err();
        assert!(err.to_string().contains("`dns.example`"), "{err}");
    }

    #[test]
    fn ip_literals_and_localhost_bypass_the_dns() {
        assert_eq!(
            &*bypass("10.1.2.3").unwrap(),
            &["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            &*bypass("[::1]").unwrap(),
            &[IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        assert_eq!(bypass("LocalHost.").unwrap().len(), 2);
        assert!(bypass("api.openai.com").is_none());
        assert!(bypass("localhost.example").is_none());
    }

    #[test]
    fn keys_ignore_case_and_the_root_dot() {
        assert_eq!(normalize("API.OpenAI.com."), "api.openai.com");
        assert!(matches!(normalize("llm.test"), Cow::Borrowed("llm.test")));
    }

    #[test]
    fn later_saturates() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[tokio::test]
    async fn getaddrinfo_backend_serves_localhost_without_asking() {
        let r = CachingResolver::getaddrinfo(Options::default());
        let addrs = r.lookup("localhost").await.unwrap();
        assert_eq!(addrs[0], IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(r.stale_uses(), 0);
    }
}
