//! Who may send how much: per-key and per-tenant rate limits (requests and
//! tokens per minute, concurrent requests), a per-IP limit on failed
//! authentication, and tiered admission under overload ([`admission`]).
//!
//! Requests and concurrency are taken as soon as the caller is known
//! ([`Limits::admit`]), before the body is read, so a caller over its limits
//! is refused at once. Tokens per minute are charged once the body has been
//! read ([`TokenGate::charge`]), from an estimate (a quarter of the body's
//! bytes as read, whatever its framing, plus the answer's `max_tokens` or
//! 256), then corrected from the real usage when the request ends
//! ([`TokenCharge`]). A caller whose token allowance is already spent is
//! refused early too.
//!
//! With `[state] backend = "redis"` the same limits hold across every
//! replica together ([`shared`]): one script call admits, one charges the
//! tokens, settling and releasing are sent without waiting. The local state
//! keeps counting what this replica admitted, so that when Redis cannot be
//! reached (`on_redis_failure`): `local` enforces this replica's share (each
//! limit divided by the replicas it last saw alive) on its own recent
//! usage; `open` admits; `closed` refuses with 503.

pub mod admission;
pub mod gcra;
pub mod shared;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::auth::Caller;
use crate::clock::Clock;
use crate::config::{ApiKey, Config, OnRedisFailure};
use crate::shared::Shared;
use gcra::Gcra;
use shared::{LeaseBook, Pool, Refused, ScopeKeys, Scoped, MAX_EXTRA_REQUESTS, MAX_EXTRA_TOKENS};

/// The hasher of the maps keyed by a key's SHA-256 digest: foldhash, as
/// their keys are uniform digests of the operator's keys (see
/// [`crate::auth::KeyTable`]).
type DigestState = foldhash::fast::RandomState;

/// Answer tokens assumed when a request does not say.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// Rate and concurrency limits of one key or tenant, as one config sets
/// them; the state behind them is the [`LimitStore`]'s.
#[derive(Debug, Clone)]
struct Buckets {
    rpm: Option<Arc<Gcra>>,
    tpm: Option<Arc<Gcra>>,
    concurrent: Option<Arc<Slots>>,
    /// The values in force, for this replica's share of them.
    values: Values,
    /// Their Redis keys, named once per config (`[state]` on Redis only).
    redis: Option<Arc<ScopeKeys>>,
}

/// The Redis keys of a key's or tenant's `values`, when limits are shared.
fn redis_keys(book: Option<&Arc<LeaseBook>>, scope: &str, v: Values) -> Option<Arc<ScopeKeys>> {
    let shared = book?.shared();
    Some(Arc::new(ScopeKeys::new(
        shared,
        scope,
        v.rpm.map_or(0, u64::from),
        v.tpm.unwrap_or(0),
        v.concurrent.map_or(0, u64::from),
    )))
}

/// A count of things in flight (requests, open streams) under a limit that a
/// new config may change; what is in flight keeps counting.
#[derive(Debug)]
pub struct Slots {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
}

impl Slots {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    pub(crate) fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.limit.load(Relaxed);
        self.in_flight
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }

    /// Counts one more in flight whatever the limit (admitted elsewhere: by
    /// the replicas' shared limits).
    fn take_unchecked(self: &Arc<Self>) -> Slot {
        self.in_flight.fetch_add(1, Relaxed);
        Slot(Arc::clone(self))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }
}

/// One taken slot of [`Slots`], given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The state of one key's or tenant's limits, whatever config set them.
#[derive(Debug, Default)]
struct Cells {
    rpm: Option<Arc<Gcra>>,
    tpm: Option<Arc<Gcra>>,
    concurrent: Option<Arc<Slots>>,
    streams: Option<Arc<Slots>>,
}

/// The values one config gives a key or tenant.
#[derive(Debug, Clone, Copy, Default)]
struct Values {
    rpm: Option<u32>,
    tpm: Option<u64>,
    concurrent: Option<u32>,
    streams: Option<u32>,
}

impl ApiKey {
    /// The limits this key sets.
    fn values(&self) -> Values {
        Values {
            rpm: self.rpm,
            tpm: self.tpm,
            concurrent: self.max_concurrent,
            streams: self.max_streams,
        }
    }
}

impl Values {
    fn is_none(&self) -> bool {
        self.rpm.is_none()
            && self.tpm.is_none()
            && self.concurrent.is_none()
            && self.streams.is_none()
    }
}

/// Rate-limit buckets and in-flight counts per key (by digest) and tenant,
/// kept for the life of the process: a config does not own them, it only
/// sets their limits. A reload therefore neither gives a caller at its limit
/// a fresh minute nor forgets the requests and streams it has in flight,
/// and its new values apply at once ([`Gcra::retune`]).
///
/// Only the stable config sets values ([`LimitStore::reconcile`]); a canary
/// shares the same state under the stable values ([`LimitStore::share`]),
/// so a tenant's limit holds across both cohorts. Its own values apply
/// when it is promoted.
///
/// The next step (limits shared by several gateways) replaces this store;
/// the request path only sees the [`Limits`] built from it.
#[derive(Debug)]
pub struct LimitStore {
    clock: Clock,
    /// The replicas' limits, when `[state]` names a Redis.
    book: Option<Arc<LeaseBook>>,
    // Only touched when a config is built, never on the request path.
    keys: RwLock<HashMap<[u8; 32], Cells, DigestState>>,
    tenants: RwLock<HashMap<String, Cells>>,
}

impl LimitStore {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            book: None,
            keys: RwLock::default(),
            tenants: RwLock::default(),
        }
    }

    /// Limits shared with the other replicas on `shared` (needs a tokio
    /// runtime: leases are renewed in the background).
    pub fn with_shared(clock: Clock, shared: Arc<Shared>) -> Self {
        Self {
            book: Some(LeaseBook::start(shared)),
            ..Self::new(clock)
        }
    }

    /// The limits of the stable `config`: its values apply to the state kept
    /// here.
    pub fn reconcile(&self, config: &Config) -> Limits {
        self.limits(config, true)
    }

    /// The limits of a canary `config`: the stable state and values; a limit
    /// only the canary sets starts with the canary's value.
    pub fn share(&self, config: &Config) -> Limits {
        self.limits(config, false)
    }

    fn limits(&self, config: &Config, apply: bool) -> Limits {
        let clock = self.clock;
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        // Sized once: a large config's maps grown by doubling leave the
        // smaller tables behind as garbage the heap may keep.
        let limited = config.keys.iter().filter(|k| !k.values().is_none()).count();
        let have = keys.len();
        keys.reserve(limited.saturating_sub(have));
        let mut limits = Limits {
            book: self.book.clone(),
            keys: HashMap::with_capacity_and_hasher(limited, DigestState::default()),
            ..Limits::default()
        };
        for k in &config.keys {
            let values = k.values();
            if values.is_none() {
                // Nothing to count: no state, and admission skips the key.
                continue;
            }
            let cells = keys.entry(k.sha256).or_default();
            let (mut buckets, streams) = cells.set(values, apply, clock);
            let scope = format!("k:{}", hex::encode(k.sha256));
            buckets.redis = redis_keys(self.book.as_ref(), &scope, values);
            limits.keys.insert(k.sha256, buckets);
            if let (Some(s), Some(cap)) = (streams, k.max_streams) {
                limits.streams.insert(k.sha256, (s, cap));
            }
        }
        drop(keys);
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        for t in &config.tenants {
            let values = Values {
                rpm: t.rpm,
                tpm: t.tpm,
                concurrent: t.max_concurrent,
                streams: None,
            };
            if values.is_none() {
                continue;
            }
            let cells = tenants.entry(t.name.clone()).or_default();
            let (mut buckets, _) = cells.set(values, apply, clock);
            buckets.redis = redis_keys(self.book.as_ref(), &format!("t:{}", t.name), values);
            limits.tenants.insert(t.name.clone(), buckets);
        }
        limits
    }
}

impl Cells {
    /// The buckets for `values`, made or (`apply`) retuned here.
    fn set(&mut self, v: Values, apply: bool, clock: Clock) -> (Buckets, Option<Arc<Slots>>) {
        // A minute's allowance may come as one burst.
        let per_minute = |cell: &mut Option<Arc<Gcra>>, n: Option<u64>| {
            let n = n?;
            match cell {
                Some(g) => {
                    if apply {
                        g.retune(n, n);
                    }
                }
                None => *cell = Some(Arc::new(Gcra::per_minute(n, n, clock))),
            }
            cell.clone()
        };
        let slots = |cell: &mut Option<Arc<Slots>>, n: Option<u32>| {
            let n = n? as usize;
            match cell {
                Some(s) => {
                    if apply {
                        s.limit.store(n, Relaxed);
                    }
                }
                None => *cell = Some(Arc::new(Slots::new(n))),
            }
            cell.clone()
        };
        let buckets = Buckets {
            rpm: per_minute(&mut self.rpm, v.rpm.map(u64::from)),
            tpm: per_minute(&mut self.tpm, v.tpm),
            concurrent: slots(&mut self.concurrent, v.concurrent),
            values: v,
            redis: None,
        };
        (buckets, slots(&mut self.streams, v.streams))
    }
}

/// Why a request is refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub what: String,
    pub retry_after: Duration,
    /// Not over a limit: the limits could not be checked (Redis unreachable
    /// and `on_redis_failure = "closed"`).
    pub unavailable: bool,
}

impl Limited {
    fn over(what: String, retry_after: Duration) -> Self {
        Self {
            what,
            retry_after,
            unavailable: false,
        }
    }

    fn unavailable() -> Self {
        Self {
            what: "the replicas' shared limits cannot be reached".into(),
            retry_after: Duration::from_secs(1),
            unavailable: true,
        }
    }
}

/// What a request holds while it runs (released when it ends).
#[derive(Debug, Default)]
pub struct Held {
    _concurrency: Vec<Slot>,
    _lease: Option<shared::Lease>,
}

/// An open stream's permit: this replica's count and, with shared limits,
/// the replicas' lease.
#[derive(Debug)]
pub struct StreamPermit {
    _local: Slot,
    _lease: Option<shared::Lease>,
}

impl From<Slot> for StreamPermit {
    /// A permit of this replica's count only.
    fn from(local: Slot) -> Self {
        Self {
            _local: local,
            _lease: None,
        }
    }
}

/// The replicas' tokens-per-minute limits of one caller (key, tenant).
#[derive(Debug, Clone)]
struct SharedTokens {
    book: Arc<LeaseBook>,
    tpm: [Scoped; 2],
    /// This replica's allowances of them, where the limits are large enough.
    pools: [Option<Arc<Pool>>; 2],
}

impl SharedTokens {
    fn limits(&self) -> [u64; 2] {
        [self.tpm[0].limit, self.tpm[1].limit]
    }
}

/// Tokens charged before a call, to correct when its usage is known.
#[derive(Debug, Clone)]
pub struct TokenCharge {
    buckets: Vec<Arc<Gcra>>,
    estimate: u64,
    /// Charged in Redis too: corrected there as well.
    shared: Option<SharedTokens>,
}

impl TokenCharge {
    /// Replaces the estimate by the real count (in Redis without waiting: a
    /// correction lost while Redis is away is the only inexactness).
    pub fn settle(&self, actual: u64) {
        let delta = i64::try_from(actual).unwrap_or(i64::MAX)
            - i64::try_from(self.estimate).unwrap_or(i64::MAX);
        for b in &self.buckets {
            b.adjust(delta);
        }
        let Some(s) = &self.shared else { return };
        // Settled from the allowances when there are some: a refund goes
        // back to them, an extra charge comes out of them.
        let units = delta.unsigned_abs();
        let remote: [i64; 2] = if delta < 0 {
            // What the pools cannot hold goes back to Redis.
            let rest = s.book.give_back(&s.pools, units);
            rest.map(|r| -i64::try_from(r).unwrap_or(i64::MAX))
        } else if delta > 0 && s.book.take_local(s.limits(), &s.pools, units) {
            [0, 0]
        } else {
            [delta, delta]
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // One call for both limits when they move alike, else one each.
        let calls: Vec<([Scoped; 2], i64)> = if remote[0] == remote[1] {
            vec![(s.tpm.clone(), remote[0])]
        } else {
            (0..2)
                .map(|i| {
                    let mut only = s.tpm.clone();
                    only[1 - i].limit = 0;
                    (only, remote[i])
                })
                .collect()
        };
        for (tpm, d) in calls {
            if d == 0 || tpm.iter().all(|t| t.limit == 0) {
                continue;
            }
            let book = Arc::clone(&s.book);
            rt.spawn(async move {
                let _ = shared::adjust(book.shared(), &tpm, d).await;
            });
        }
    }
}

/// The caller's tokens-per-minute buckets (key, then tenant), to be charged
/// once the request's body is read.
#[derive(Debug, Clone, Default)]
pub struct TokenGate {
    buckets: Vec<(&'static str, Arc<Gcra>)>,
    shared: Option<SharedTokens>,
}

impl TokenGate {
    /// Takes `estimate` tokens from every bucket, or none of them.
    pub async fn charge(&self, estimate: u64) -> Result<Option<TokenCharge>, Limited> {
        let cost = i64::try_from(estimate).unwrap_or(i64::MAX);
        if let Some(s) = &self.shared {
            let charged = if s.book.take_local(s.limits(), &s.pools, estimate) {
                Ok(Ok(()))
            } else {
                s.book
                    .charge(&[&s.tpm[0], &s.tpm[1]], &s.pools, estimate)
                    .await
            };
            match charged {
                Ok(Ok(())) => {
                    // Counted here too, for this replica's share if Redis goes.
                    for (_, b) in &self.buckets {
                        b.force(estimate);
                    }
                    return Ok(Some(TokenCharge {
                        buckets: self.buckets.iter().map(|(_, b)| Arc::clone(b)).collect(),
                        estimate,
                        shared: Some(s.clone()),
                    }));
                }
                Ok(Err(refused)) => {
                    let scope = if refused.index == 0 { "key" } else { "tenant" };
                    return Err(Limited::over(
                        format!("tokens per minute for this {scope}"),
                        refused.wait,
                    ));
                }
                Err(_) => match s.book.shared().on_failure() {
                    OnRedisFailure::Open => return Ok(None),
                    OnRedisFailure::Closed => return Err(Limited::unavailable()),
                    OnRedisFailure::Local => {}
                },
            }
        }
        for (i, (scope, bucket)) in self.buckets.iter().enumerate() {
            if let Err(wait) = bucket.try_take(estimate) {
                for (_, taken) in &self.buckets[..i] {
                    taken.adjust(-cost);
                }
                return Err(Limited::over(
                    format!("tokens per minute for this {scope}"),
                    wait,
                ));
            }
        }
        Ok((!self.buckets.is_empty()).then(|| TokenCharge {
            buckets: self.buckets.iter().map(|(_, b)| Arc::clone(b)).collect(),
            estimate,
            shared: None,
        }))
    }
}

/// The limits of one config, on the [`LimitStore`]'s state.
#[derive(Debug, Default)]
pub struct Limits {
    keys: HashMap<[u8; 32], Buckets, DigestState>,
    /// Open streams per key, and the cap.
    streams: HashMap<[u8; 32], (Arc<Slots>, u32), DigestState>,
    tenants: HashMap<String, Buckets>,
    /// The replicas' limits (`[state] backend = "redis"`).
    book: Option<Arc<LeaseBook>>,
    /// The replica count this replica's local share was last tuned for.
    share_of: AtomicUsize,
}

/// What to do when the replicas' limits could not be asked.
enum Fallback {
    /// Decide here, on this replica's share.
    Local,
    Admit,
    Refuse,
}

impl Limits {
    /// What the shared limits' failure means (and, for `local`, tunes this
    /// replica's share to the replicas last seen alive).
    fn fallback(&self, book: &LeaseBook) -> Fallback {
        match book.shared().on_failure() {
            OnRedisFailure::Open => Fallback::Admit,
            OnRedisFailure::Closed => Fallback::Refuse,
            OnRedisFailure::Local => {
                self.tune_share(book.shared().live_replicas());
                Fallback::Local
            }
        }
    }

    /// Tunes the local buckets to `1/replicas` of each limit (cold: only
    /// when the replica count seen changes while Redis is away).
    fn tune_share(&self, replicas: usize) {
        let replicas = replicas.max(1);
        if self.share_of.swap(replicas, Relaxed) == replicas {
            return;
        }
        let n = replicas as u64;
        let part = |v: u64| (v / n).max(1);
        for b in self.keys.values().chain(self.tenants.values()) {
            if let (Some(g), Some(v)) = (&b.rpm, b.values.rpm) {
                let v = part(u64::from(v));
                g.retune(v, v);
            }
            if let (Some(g), Some(v)) = (&b.tpm, b.values.tpm) {
                let v = part(v);
                g.retune(v, v);
            }
            if let (Some(s), Some(v)) = (&b.concurrent, b.values.concurrent) {
                s.limit.store(part(u64::from(v)) as usize, Relaxed);
            }
        }
        for (s, v) in self.streams.values() {
            s.limit.store(part(u64::from(*v)) as usize, Relaxed);
        }
    }

    /// A permit for one more open stream of the caller's key, if it has a cap.
    pub async fn stream_permit(&self, caller: &Caller) -> Result<Option<StreamPermit>, Limited> {
        let Some((digest, (slots, cap))) = caller
            .key_digest
            .and_then(|d| self.streams.get(&d).map(|s| (d, s)))
        else {
            return Ok(None);
        };
        let refused = || Limited::over("open streams for this key".into(), Duration::from_secs(1));
        if let Some(book) = &self.book {
            let key = book
                .shared()
                .key(&format!("rl:k:{}:streams", hex::encode(digest)));
            match book.lease(&key, u64::from(*cap)).await {
                Ok(Ok(lease)) => {
                    return Ok(Some(StreamPermit {
                        _local: slots.take_unchecked(),
                        _lease: Some(lease),
                    }))
                }
                Ok(Err(_)) => return Err(refused()),
                Err(_) => match self.fallback(book) {
                    Fallback::Local => {}
                    Fallback::Admit => {
                        return Ok(Some(StreamPermit {
                            _local: slots.take_unchecked(),
                            _lease: None,
                        }))
                    }
                    Fallback::Refuse => return Err(Limited::unavailable()),
                },
            }
        }
        let local = slots.try_take().ok_or_else(refused)?;
        Ok(Some(StreamPermit {
            _local: local,
            _lease: None,
        }))
    }

    /// Checks and takes the caller's request and concurrency limits, and
    /// refuses a caller whose token allowance is spent. The returned gate
    /// charges the request's tokens once its body is read.
    pub async fn admit(&self, caller: &Caller) -> Result<(Held, TokenGate), Limited> {
        let key = caller
            .key_digest
            .and_then(|d| self.keys.get(&d).map(|b| (d, b)));
        let tenant = self.tenants.get(&*caller.tenant);
        if key.is_none() && tenant.is_none() {
            return Ok((Held::default(), TokenGate::default()));
        }
        if let Some(book) = &self.book {
            let scope = |b: Option<&Buckets>| {
                Arc::clone(b.and_then(|b| b.redis.as_ref()).unwrap_or(book.no_limits()))
            };
            let scopes = [scope(key.map(|(_, b)| b)), scope(tenant)];
            let rpm_pools = [
                book.pool(&scopes[0].rpm, MAX_EXTRA_REQUESTS),
                book.pool(&scopes[1].rpm, MAX_EXTRA_REQUESTS),
            ];
            let rpm_limits = [scopes[0].rpm.limit, scopes[1].rpm.limit];
            let concurrency = scopes.iter().any(|s| s.concurrent.limit > 0);
            // From this replica's allowances when it has enough: no call.
            let admitted = if !concurrency && book.take_local(rpm_limits, &rpm_pools, 1) {
                Ok(Ok(None))
            } else {
                book.admit(&[&scopes[0], &scopes[1]], &rpm_pools)
                    .await
                    .map(|r| r.map(Some))
            };
            match admitted {
                Ok(Ok(lease)) => {
                    let mut held = Held {
                        _lease: lease,
                        ..Held::default()
                    };
                    let mut gate = TokenGate::default();
                    // Counted here too, for this replica's share if Redis goes.
                    for (scope, b) in [("key", key.map(|(_, b)| b)), ("tenant", tenant)] {
                        let Some(b) = b else { continue };
                        if let Some(rpm) = &b.rpm {
                            rpm.force(1);
                        }
                        if let Some(tpm) = &b.tpm {
                            gate.buckets.push((scope, Arc::clone(tpm)));
                        }
                        if let Some(slots) = &b.concurrent {
                            held._concurrency.push(slots.take_unchecked());
                        }
                    }
                    let [k, t] = &scopes;
                    if k.tpm.limit > 0 || t.tpm.limit > 0 {
                        let pools = [
                            book.pool(&k.tpm, MAX_EXTRA_TOKENS),
                            book.pool(&t.tpm, MAX_EXTRA_TOKENS),
                        ];
                        gate.shared = Some(SharedTokens {
                            book: Arc::clone(book),
                            tpm: [k.tpm.clone(), t.tpm.clone()],
                            pools,
                        });
                    }
                    return Ok((held, gate));
                }
                Ok(Err(refused)) => return Err(shared_refusal(refused)),
                Err(_) => match self.fallback(book) {
                    Fallback::Local => {}
                    Fallback::Admit => return Ok((Held::default(), TokenGate::default())),
                    Fallback::Refuse => return Err(Limited::unavailable()),
                },
            }
        }
        let scopes = [("key", key.map(|(_, b)| b)), ("tenant", tenant)];
        let mut held = Held::default();
        let mut gate = TokenGate::default();
        for (scope, buckets) in scopes {
            let Some(b) = buckets else { continue };
            if let Some(rpm) = &b.rpm {
                if let Err(wait) = rpm.try_take(1) {
                    return Err(Limited::over(
                        format!("requests per minute for this {scope}"),
                        wait,
                    ));
                }
            }
            if let Some(tpm) = &b.tpm {
                if let Err(wait) = tpm.check(1) {
                    return Err(Limited::over(
                        format!("tokens per minute for this {scope}"),
                        wait,
                    ));
                }
                gate.buckets.push((scope, Arc::clone(tpm)));
            }
            if let Some(slots) = &b.concurrent {
                match slots.try_take() {
                    Some(slot) => held._concurrency.push(slot),
                    None => {
                        return Err(Limited::over(
                            format!("concurrent requests for this {scope}"),
                            Duration::from_secs(1),
                        ));
                    }
                }
            }
        }
        Ok((held, gate))
    }
}

/// The admission script's refusal, in the words of the local limits.
fn shared_refusal(r: Refused) -> Limited {
    let scope = if r.index < 3 { "key" } else { "tenant" };
    let what = match r.index % 3 {
        0 => "requests per minute",
        1 => "tokens per minute",
        _ => "concurrent requests",
    };
    let wait = if r.index % 3 == 2 {
        Duration::from_secs(1)
    } else {
        r.wait
    };
    Limited::over(format!("{what} for this {scope}"), wait)
}

/// Estimated tokens of a request of `body_bytes` asking for at most
/// `max_tokens` of answer.
pub fn estimate_tokens(body_bytes: u64, max_tokens: Option<u64>) -> u64 {
    (body_bytes / 4).max(1) + max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE)
}

/// Failed authentication per client IP: after `per_minute` failures, the IP
/// gets 429 until its allowance refills, so guessing keys is slow. Kept for
/// the life of the process; a new config's allowance applies to the
/// addresses already counted ([`AuthFailures::retune`]).
#[derive(Debug)]
pub struct AuthFailures {
    per_minute: AtomicU64,
    clock: Clock,
    ips: moka::sync::Cache<IpAddr, Arc<Gcra>>,
    /// Counted across replicas (`[state] backend = "redis"`); while Redis is
    /// away, each replica counts its share locally (none with `open`).
    shared: Option<Arc<Shared>>,
    /// Addresses the replicas' count blocked, until when (ms on `clock`).
    /// Checking stays local, so a request with a good key never waits for
    /// Redis: an address blocked by failures on other replicas only is
    /// learned at its first failure here.
    blocked_until: moka::sync::Cache<IpAddr, u64>,
    /// Entries in `ips` and `blocked_until` together: counted up before an
    /// address is inserted, down by the caches when one leaves (expired,
    /// evicted, replaced). At zero no address is counted, and
    /// [`AuthFailures::blocked`] answers without looking (two cache reads
    /// on every request otherwise, and what detour serves most is callers
    /// that have not failed).
    entries: Arc<AtomicU64>,
}

/// A cache's eviction listener that counts its entry out of `entries`.
fn counted_out<V>(
    entries: &Arc<AtomicU64>,
) -> impl Fn(Arc<IpAddr>, V, moka::notification::RemovalCause) + Send + Sync + 'static {
    let entries = Arc::clone(entries);
    move |_, _, _| {
        entries.fetch_sub(1, Relaxed);
    }
}

impl AuthFailures {
    pub fn new(per_minute: u64, clock: Clock) -> Self {
        let entries = Arc::new(AtomicU64::new(0));
        Self {
            per_minute: AtomicU64::new(per_minute),
            clock,
            ips: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .eviction_listener(counted_out(&entries))
                .build(),
            shared: None,
            blocked_until: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .eviction_listener(counted_out(&entries))
                .build(),
            entries,
        }
    }

    /// Failed authentications counted by every replica together.
    pub fn with_shared(per_minute: u64, clock: Clock, shared: Option<Arc<Shared>>) -> Self {
        Self {
            shared,
            ..Self::new(per_minute, clock)
        }
    }

    /// Applies a new allowance (cold path: config changes).
    pub fn retune(&self, per_minute: u64) {
        if self.per_minute.swap(per_minute, Relaxed) != per_minute {
            for (_, bucket) in &self.ips {
                bucket.retune(per_minute, per_minute);
            }
        }
    }

    /// How long the IP must wait before it may try again, if it must.
    /// Local only (see `blocked_until`).
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        if self.entries.load(Relaxed) == 0 {
            return None;
        }
        if let Some(until) = self.blocked_until.get(&ip) {
            let now = self.clock.now_ms();
            if until > now {
                return Some(Duration::from_millis(until - now));
            }
        }
        self.ips.get(&ip)?.check(1).err()
    }

    /// Records a failed attempt; returns the wait if the IP is now blocked.
    pub async fn failed(&self, ip: IpAddr) -> Option<Duration> {
        let shared = self.ask_shared(ip, true).await;
        // Counted here as well, for this replica's share if Redis goes.
        let (per_minute, clock) = (self.local_allowance(), self.clock);
        let bucket = self.ips.get_with(ip, || {
            self.entries.fetch_add(1, Relaxed);
            Arc::new(Gcra::per_minute(per_minute, per_minute, clock))
        });
        match shared {
            Some(answer) => {
                bucket.force(1);
                if let Some(wait) = answer {
                    let until = self.clock.now_ms().saturating_add(wait.as_millis() as u64);
                    // One more entry; one less if it replaces one.
                    self.entries.fetch_add(1, Relaxed);
                    self.blocked_until.insert(ip, until);
                }
                answer
            }
            None => bucket.try_take(1).err(),
        }
    }

    /// The replicas' answer, or `None` to decide locally.
    async fn ask_shared(&self, ip: IpAddr, take: bool) -> Option<Option<Duration>> {
        if !take {
            return None;
        }
        let shared = self.shared.as_ref()?;
        let key = shared.key(&format!("af:{ip}"));
        let per_minute = self.per_minute.load(Relaxed);
        match shared::gcra_one(shared, &key, per_minute, take).await {
            Ok(answer) => Some(answer.err()),
            Err(_) if shared.on_failure() == OnRedisFailure::Open => Some(None),
            Err(_) => None,
        }
    }

    /// This replica's share of the allowance.
    fn local_allowance(&self) -> u64 {
        let n = self.shared.as_ref().map_or(1, |s| s.live_replicas()) as u64;
        (self.per_minute.load(Relaxed) / n).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(key: u64, tenant: u64, clock: Clock) -> TokenGate {
        let bucket = |n| Arc::new(Gcra::per_minute(n, n, clock));
        TokenGate {
            buckets: vec![("key", bucket(key)), ("tenant", bucket(tenant))],
            shared: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_charge_takes_from_every_bucket_or_none() {
        let g = gate(1000, 500, Clock::new());
        // The tenant cannot take 600: the key's 600 are given back.
        let refused = g.charge(600).await.unwrap_err();
        assert_eq!(refused.what, "tokens per minute for this tenant");
        let charge = g.charge(400).await.unwrap().unwrap();
        assert!(
            g.buckets[0].1.check(600).is_ok(),
            "the key was charged twice"
        );
        assert!(g.buckets[1].1.check(101).is_err());
        // Settled from usage: 100 used, 300 given back.
        charge.settle(100);
        assert!(g.buckets[1].1.check(400).is_ok());
        assert!(TokenGate::default().charge(10).await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_failed_auth_allowance_applies_to_addresses_already_counted() {
        let f = AuthFailures::new(2, Clock::new());
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert!(f.failed(ip).await.is_none());
        assert!(f.failed(ip).await.is_none());
        assert!(f.blocked(ip).is_some(), "2 of 2 used");
        f.retune(10);
        assert!(f.blocked(ip).is_none(), "the raised allowance applies");
        f.retune(1);
        assert!(f.blocked(ip).is_some());
    }

    /// The check that skips the caches while nothing is counted keeps
    /// counting right: up with each address, down as the caches let go.
    #[tokio::test(start_paused = true)]
    async fn failed_auth_entries_are_counted_in_and_out() {
        let f = AuthFailures::new(1, Clock::new());
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        assert_eq!(f.entries.load(Relaxed), 0);
        assert!(f.blocked(a).is_none());
        assert!(f.failed(a).await.is_none());
        assert_eq!(f.entries.load(Relaxed), 1);
        assert!(f.blocked(a).is_some(), "1 of 1 used");
        assert!(f.blocked(b).is_none());
        assert!(f.failed(a).await.is_some());
        assert!(f.failed(b).await.is_none());
        assert_eq!(f.entries.load(Relaxed), 2, "one entry per address");
        f.ips.invalidate(&a);
        f.ips.run_pending_tasks();
        assert_eq!(f.entries.load(Relaxed), 1);
        assert!(f.blocked(a).is_none(), "forgotten");
        assert!(f.blocked(b).is_some());
        f.ips.invalidate_all();
        f.ips.run_pending_tasks();
        assert_eq!(f.entries.load(Relaxed), 0);
    }

    fn config(rpm: u32, extra: &str) -> Config {
        let text = format!("[[keys]]\nkey = \"k1\"\ntenant = \"a\"\nrpm = {rpm}\n{extra}");
        crate::config::load_str(&text, "t.toml").unwrap()
    }

    fn caller(config: &Config) -> Caller {
        let key = &config.keys[0];
        Caller {
            key_digest: Some(key.sha256),
            tenant: "a".into(),
            tier: crate::config::Tier::Standard,
            access: crate::access::Access::all(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_canary_shares_the_buckets_under_the_stable_values_until_promoted() {
        let store = LimitStore::new(Clock::new());
        let stable = store.reconcile(&config(1, ""));
        let canary_config = config(10, "max_concurrent = 1\n");
        let canary = store.share(&canary_config);
        let who = caller(&canary_config);
        assert!(stable.admit(&who).await.is_ok());
        assert!(
            canary.admit(&who).await.is_err(),
            "one bucket, the stable rpm"
        );
        // Promoted, its values apply to the same buckets.
        let promoted = store.reconcile(&canary_config);
        let held = promoted.admit(&who).await.unwrap();
        assert!(promoted.admit(&who).await.is_err(), "max_concurrent = 1");
        drop(held);
        assert!(promoted.admit(&who).await.is_ok(), "the slot is free again");
    }
}
