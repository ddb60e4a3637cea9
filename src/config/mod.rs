//! Configuration: one TOML file, loaded in two stages.
//!
//! 1. [`raw`] deserialises the file into structs that keep every value's span.
//! 2. [`load`] validates them into the typed [`Config`] below, where bad states
//!    cannot be represented: durations are `Duration`, URLs are `Url`, a route's
//!    targets point at providers that exist, secrets are [`Secret`].
//!
//! Every problem becomes a [`Diagnostic`] naming file, line, column and key;
//! loading collects all of them instead of stopping at the first.

mod access;
mod chunks;
mod env;
mod load;
pub mod raw;
mod tls;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use access::{glob_matches, ModelPattern, TrustedProxies};
pub use load::{load_file, load_str};
pub use tls::{CaFile, ClientIdentity, ProviderTls, ProxySetting, ProxyUrl};
use url::Url;

/// A validated configuration. Immutable once built; a reload builds a new one.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    /// How a reload to this config is rolled out; `None` swaps at once.
    pub rollout: Option<RolloutPolicy>,
    pub tenants: Vec<TenantLimits>,
    pub providers: Vec<Arc<Provider>>,
    pub routes: Vec<Arc<Route>>,
    pub keys: Vec<ApiKey>,
    /// `[cache]`: where cached answers are kept (routes opt in).
    pub cache: CacheStore,
    /// `[state]`: where the state shared by replicas lives. Read at start:
    /// a reload that changes it is reported and applies at the next start.
    pub state: StateStore,
    /// `[drill]`: what `detour drill` holds this config to. `serve` ignores it.
    pub drill: DrillThresholds,
    /// `[telemetry]`: where traces go, if anywhere. Read at start, like
    /// `[state]`: a reload that changes it is reported.
    pub telemetry: Telemetry,
    /// What `detour check` warns about without refusing the config (for
    /// example a `models` entry that names no route yet).
    pub warnings: Vec<Diagnostic>,
    /// Every request looks its alias up here. foldhash, not SipHash: the
    /// keys are the config's own, so a client cannot choose colliding ones,
    /// and the lookup costs a third.
    route_index: HashMap<String, usize, foldhash::fast::RandomState>,
}

impl Config {
    /// The route a client's `model` alias names.
    pub fn route(&self, alias: &str) -> Option<&Arc<Route>> {
        self.route_index.get(alias).map(|&i| &self.routes[i])
    }

    /// The position of the route `alias` names in [`Config::routes`].
    pub fn route_position(&self, alias: &str) -> Option<usize> {
        self.route_index.get(alias).copied()
    }

    /// Route aliases in config order.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.alias.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// Serve without `[[keys]]`. Only ever true when keys are empty and either
    /// the config says so or the listener is on loopback.
    pub open_access: bool,
    pub max_body_bytes: usize,
    /// Requests in flight on the main listener before new ones queue by tier.
    pub max_concurrent_requests: usize,
    /// Longest wait for a slot under overload (critical; standard waits half,
    /// sheddable not at all).
    pub queue_timeout: Duration,
    pub auth_failures_per_minute: u32,
    /// Slow clients: the longest a client may take to send its headers, and its body.
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// Largest single event of a provider's stream held while it arrives; a
    /// longer one ends the attempt (`UpstreamError::EventTooLarge`).
    pub max_event_bytes: usize,
    /// Client connections open at once on the main listener; more are closed
    /// as soon as they are accepted.
    pub max_connections: usize,
    /// The same for the admin listener.
    pub admin_max_connections: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 connections are pinged this often when quiet, and closed if a
    /// ping is not answered within the same time.
    pub http2_keep_alive: Duration,
    /// At shutdown, requests in flight get this long to finish; then the
    /// connections left are closed.
    pub shutdown_timeout: Duration,
    /// Data-plane threads (`detour serve`): each runs its own single-threaded
    /// runtime and the client connections placed on it ([`crate::workers`]).
    /// Read at start. Default: one per CPU.
    pub worker_threads: Option<usize>,
    /// Peers whose `x-forwarded-for` is believed for the client address of
    /// per-IP limits; empty: the TCP peer is the client.
    pub trusted_proxies: TrustedProxies,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_HTTP2_KEEP_ALIVE: Duration = Duration::from_secs(20);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_AUTH_FAILURES_PER_MINUTE: u32 = 10;

/// Limits shared by all keys of a tenant, and the models its keys may call.
#[derive(Debug, Clone)]
pub struct TenantLimits {
    pub name: String,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u32>,
    /// The aliases the tenant's keys may call, unless a key has its own
    /// list; `None`: every route.
    pub models: Option<Vec<ModelPattern>>,
}

pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 4096;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Far above any real event (a streamed image part is a few MiB at most).
pub const DEFAULT_MAX_EVENT_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    OpenAiCompatible,
    Anthropic,
    Gemini,
}

impl ProviderKind {
    pub const NAMES: &'static [&'static str] =
        &["openai", "openai-compatible", "anthropic", "gemini"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::OpenAiCompatible => "openai-compatible",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
        }
    }
}

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// Base URL including the API version path, e.g. `https://api.openai.com/v1`.
    /// Its query (`?api-version=...`) is kept on every request; it has no
    /// fragment. It may hold secrets: show it with [`masked_url`].
    pub base_url: Url,
    pub api_key: Option<Secret>,
    /// The status page (or feed) polled every `status_poll`. It may hold a
    /// token in its query: show it with [`masked_url`].
    pub status_page: Option<Url>,
    /// The components (Statuspage, incident.io) or products (Google Cloud)
    /// that matter, by name or id; empty: the whole page.
    pub status_components: Vec<String>,
    pub status_poll: Duration,
    /// How `status_page` is read.
    pub status_page_format: StatusFormat,
    /// Authenticates pushes to `POST /admin/status-webhook/<provider>`;
    /// without it that URL answers 404.
    pub status_webhook_secret: Option<Secret>,
    pub connect_timeout: Duration,
    /// `max_tokens` for Anthropic when the client sends none (it is required there).
    pub default_max_tokens: u64,
    /// `ca_file`, `client_cert` / `client_key`, `tls_verify`.
    pub tls: ProviderTls,
    /// `proxy`, or the environment's.
    pub proxy: ProxySetting,
}

pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The format of a provider's status page (`status_page_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum StatusFormat {
    /// Detected from the body: its JSON shape or its XML root element.
    #[default]
    Auto,
    /// Atlassian Statuspage v2 `summary.json`.
    Statuspage,
    /// An incident.io-hosted page: `/proxy/<host>` or the widget API.
    IncidentIo,
    /// Google Cloud's `incidents.json`.
    GoogleCloud,
    /// An RSS 2.0 feed of incidents.
    Rss,
    /// An Atom feed of incidents.
    Atom,
}

impl StatusFormat {
    pub const NAMES: &'static [&'static str] = &[
        "auto",
        "statuspage",
        "incident_io",
        "google_cloud",
        "rss",
        "atom",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Statuspage => "statuspage",
            Self::IncidentIo => "incident_io",
            Self::GoogleCloud => "google_cloud",
            Self::Rss => "rss",
            Self::Atom => "atom",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "auto" => Self::Auto,
            "statuspage" => Self::Statuspage,
            "incident_io" => Self::IncidentIo,
            "google_cloud" => Self::GoogleCloud,
            "rss" => Self::Rss,
            "atom" => Self::Atom,
            _ => return None,
        })
    }
}

pub const DEFAULT_STATUS_POLL: Duration = Duration::from_secs(30);

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `routes[].probe_hedge_after` when not set: short enough that a client
/// whose request probes a hanging target hardly notices, long enough that a
/// healthy target's first event usually beats it.
pub const DEFAULT_PROBE_HEDGE_AFTER: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Route {
    /// The `model` name clients send.
    pub alias: String,
    /// Ordered: the first is preferred.
    pub targets: Vec<Target>,
    pub timeouts: Timeouts,
    pub retries: RetryPolicy,
    pub breaker: BreakerPolicy,
    pub hedge_after: Option<HedgeAfter>,
    /// How long an attempt on a target whose health is unknown or recovering
    /// (a half-open breaker's probe, slow start, exploration) waits before
    /// the next target races it, when the target has no latency estimate
    /// for the request's kind of traffic (else that p95 is the delay).
    pub probe_hedge_after: Duration,
    /// The response cache, when the route opts in.
    pub cache: Option<RouteCache>,
    /// A text stream that breaks after content reached the client is
    /// continued by the route's next target, the text sent so far given to
    /// it as the answer's beginning (opt-in; see `relay`'s module doc).
    pub continue_streams: bool,
}

/// A route's response cache: `cache = { ttl = "5m", max_entry_bytes = 1048576 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteCache {
    pub ttl: Duration,
    /// Larger answers are relayed but not stored.
    pub max_entry_bytes: usize,
}

pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_CACHE_MAX_ENTRY_BYTES: u64 = 1024 * 1024;

/// `[cache]`: the store behind every route's cache. It outlives reloads
/// while these settings stay the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStore {
    pub backend: CacheBackend,
    /// Total size of the entries held (bodies and bookkeeping), by the
    /// memory backend. The Redis backend ignores it: Redis's own
    /// `maxmemory` bounds the shared cache.
    pub max_bytes: u64,
}

pub const DEFAULT_CACHE_MAX_BYTES: u64 = 256 * 1024 * 1024;

impl Default for CacheStore {
    fn default() -> Self {
        Self {
            backend: CacheBackend::Memory,
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheBackend {
    /// In this process.
    Memory,
    /// In `[state]`'s Redis, shared by every replica.
    Redis,
}

impl CacheBackend {
    pub const NAMES: &'static [&'static str] = &["memory", "redis"];
}

/// `[telemetry]`: traces exported over OTLP/HTTP (protobuf); none unless
/// `otlp_endpoint` is set.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Telemetry {
    pub otlp: Option<Otlp>,
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct Otlp {
    /// The collector's base URL as written (`http://collector:4318`); spans
    /// are posted to its `/v1/traces`.
    pub endpoint: Url,
    /// Sent with every export (a collector's credentials): secrets.
    pub headers: Vec<(String, Secret)>,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// The share of new traces sampled (an incoming `traceparent`'s own
    /// decision is kept).
    pub sample_ratio: f64,
    /// The longest a finished span waits in the queue before it is sent.
    pub batch_delay: Duration,
}

impl Otlp {
    /// The URL spans are posted to: `endpoint` joined with `v1/traces`.
    pub fn traces_url(&self) -> String {
        let base = self.endpoint.as_str().trim_end_matches('/');
        format!("{base}/v1/traces")
    }
}

pub const DEFAULT_SERVICE_NAME: &str = "detour";
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_secs(1);

/// `[state]`: the state replicas share (rate limits, health, rollouts, and
/// the cache when `[cache] backend = "redis"`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StateStore {
    /// Each process keeps its own (one replica, no dependency).
    #[default]
    Memory,
    Redis(RedisSettings),
}

impl StateStore {
    pub fn redis(&self) -> Option<&RedisSettings> {
        match self {
            Self::Memory => None,
            Self::Redis(r) => Some(r),
        }
    }
}

/// Where the replicas' Redis is and how detour treats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS); may carry a password: a secret.
    pub url: Secret,
    /// Prefixed to every key and channel, so deployments can share a Redis.
    pub key_prefix: String,
    /// The most a Redis call may add to a request; past it the call counts
    /// as failed and the request goes on as [`OnRedisFailure`] says.
    pub timeout: Duration,
    pub on_failure: OnRedisFailure,
}

impl RedisSettings {
    /// The URL fit for a log or an operator: password masked.
    pub fn masked_url(&self) -> String {
        match Url::parse(self.url.expose()) {
            Ok(u) => masked_url(&u),
            Err(_) => "***".to_owned(),
        }
    }
}

pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(20);
pub const DEFAULT_KEY_PREFIX: &str = "detour:";

/// What the rate limits do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisFailure {
    /// Each replica enforces its share: the limit divided by the replicas it
    /// last saw alive.
    #[default]
    Local,
    /// Limits are not enforced.
    Open,
    /// Limited requests are refused with 503.
    Closed,
}

impl OnRedisFailure {
    pub const NAMES: &'static [&'static str] = &["local", "open", "closed"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }
}

/// `[drill]`: the marks a scenario of `detour drill` must meet to pass
/// (its command-line flags override them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrillThresholds {
    /// Share of client requests (0–1) that may fail during a scenario.
    pub max_error_rate: f64,
    /// Longest time from the fault's start to the first answer served by
    /// another target.
    pub max_failover: Duration,
    /// Most upstream requests per client request while the fault lasts.
    pub max_amplification: f64,
    /// Most the critical tier's p99 may grow during a sheddable flood, as a
    /// multiple of its p99 without the flood.
    pub max_flood_p99_ratio: f64,
}

impl Default for DrillThresholds {
    fn default() -> Self {
        Self {
            max_error_rate: 0.01,
            max_failover: Duration::from_secs(2),
            max_amplification: 3.0,
            max_flood_p99_ratio: 2.0,
        }
    }
}

/// How a new config reaches traffic: a canary share first, for a bake time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RolloutPolicy {
    /// Share of requests (0–100) the candidate gets while baking.
    pub canary_percent: f64,
    pub bake: Duration,
    /// Error-rate points the candidate may exceed the stable config by.
    pub max_error_rate_increase: f64,
    /// Mean latency the candidate may have, as a multiple of the stable one.
    pub max_latency_ratio: f64,
    /// Requests the candidate must have served to be judged.
    pub min_requests: u32,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        Self {
            canary_percent: 10.0,
            bake: Duration::from_secs(60),
            max_error_rate_increase: 0.05,
            max_latency_ratio: 1.5,
            min_requests: 20,
        }
    }
}

/// When a second attempt races a slow first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeAfter {
    Fixed(Duration),
    /// The first target's estimated p95 latency for the request's kind of
    /// traffic (first event of a stream, or a whole answer; at least 1 ms).
    /// No hedge until that estimate has a sample.
    P95,
}

/// How a route retries on other targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries allowed as a fraction of requests (0.2 = 20%).
    pub budget: f64,
    /// Retries allowed per second regardless of the ratio.
    pub min_per_sec: u32,
    /// Most attempts for one request, the first included.
    pub max_attempts: u32,
    /// Base of the jittered exponential backoff between attempts.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            budget: 0.2,
            min_per_sec: 5,
            max_attempts: 3,
            backoff: Duration::from_millis(5),
        }
    }
}

/// When a target's circuit breaker opens and how it recovers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    pub consecutive_failures: u32,
    /// Failure share over `window` that opens the breaker...
    pub failure_rate: f64,
    /// ...once the window holds at least this many requests.
    pub min_requests: u32,
    pub window: Duration,
    /// How long an open breaker waits before one probe request.
    pub open_for: Duration,
    /// A recovered target's share of traffic ramps up over this long.
    pub slow_start: Duration,
    /// The longest cool-down a provider's `retry-after` (or Gemini's
    /// `RetryInfo`) can impose, and the most detour relays to clients: a
    /// provider's wait is a hint, not a sentence.
    pub max_cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            slow_start: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
pub struct Target {
    pub provider: Arc<Provider>,
    /// Position of `provider` in [`Config::providers`].
    pub provider_index: usize,
    /// The model name sent upstream.
    pub model: String,
    /// Relative share inside its priority group.
    pub weight: u32,
    /// Lower is preferred; targets with equal priority form a group that
    /// shares traffic by weight. Defaults to the target's position.
    pub priority: u32,
    /// `x-detour-provider` and `x-detour-model`, built once (`None` if the
    /// name cannot be a header value).
    pub headers: Option<(http::HeaderValue, http::HeaderValue)>,
}

/// Per-attempt time limits. There is no single "request timeout": a total
/// limit alone would either kill long streams or let a dead upstream hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From sending the request to the response headers, and for streams to
    /// the first body chunk.
    pub first_byte: Duration,
    /// Longest gap between two body chunks.
    pub idle: Duration,
    /// Whole attempt, body included.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            first_byte: Duration::from_secs(60),
            idle: Duration::from_secs(30),
            total: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
    pub tenant: String,
    pub tier: Tier,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute (estimated before a call, corrected after).
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u32>,
    /// Open streams at once.
    pub max_streams: Option<u32>,
    /// The aliases this key may call; `None`: its tenant's list, or every
    /// route if the tenant has none.
    pub models: Option<Vec<ModelPattern>>,
}

/// Priority under overload, highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Critical,
    Standard,
    Sheddable,
}

impl Tier {
    pub const NAMES: &'static [&'static str] = &["critical", "standard", "sheddable"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Standard => "standard",
            Self::Sheddable => "sheddable",
        }
    }
}

/// A secret from the config. It never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `url` fit to show an operator or a log: a password in it and every query
/// value become `***` (query names stay, so `?api-version=***&key=***`).
pub fn masked_url(url: &Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() {
        // Only URLs that cannot have a password refuse one.
        let _ = url.set_password(Some("***"));
    }
    if let Some(query) = url.query() {
        let masked: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) => format!("{name}=***"),
                None if pair.is_empty() => String::new(),
                // A bare `?token` is a value too.
                None => "***".to_owned(),
            })
            .collect();
        url.set_query(Some(&masked.join("&")));
    }
    if url.fragment().is_some() {
        url.set_fragment(Some("***"));
    }
    url.into()
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `routes[0].targets[1].provider`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.key, self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read config: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for (i, d) in diags.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&d.to_string());
    }
    out
}

/// Parses durations written as `250ms`, `5s`, `2m` or `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }

    #[test]
    fn masked_urls_keep_names_and_hide_values() {
        let cases = [
            ("https://api.openai.com/v1", "https://api.openai.com/v1"),
            (
                "https://u:p@h.example/v1?api-version=1&key=sk-1&flag&=x#f",
                "https://u:***@h.example/v1?api-version=***&key=***&***&=***#***",
            ),
            ("http://u@h.example/?", "http://u@h.example/?"),
            ("http://h.example/?a=b=c", "http://h.example/?a=***"),
        ];
        for (url, masked) in cases {
            assert_eq!(masked_url(&Url::parse(url).unwrap()), masked, "{url}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk-live-123".into());
        assert!(!format!("{s:?}").contains("sk-live"));
    }
}
