//! The rate limits of every replica together, on Redis: the same GCRA and
//! the same concurrency counts as the local limits, decided by atomic Lua
//! scripts so that replicas never read-then-write.
//!
//! - Requests and tokens per minute: one key per key/tenant and kind holding
//!   the GCRA's theoretical arrival time in microseconds of Redis's clock
//!   (`TIME`), so replicas' clocks never disagree. Expires when it no longer
//!   matters.
//! - Concurrent requests and open streams: a sorted set per key/tenant of
//!   leases, scored by their expiry. A replica renews the leases it holds
//!   ([`LEASE_TTL`] / 3); one that dies stops renewing and its leases expire,
//!   so a dead replica never holds slots for more than [`LEASE_TTL`].
//! - Admission is one script for every limit of the key and its tenant:
//!   all are checked before any is taken, so a refusal takes nothing.
//! - Tokens are reserved (the estimate) before the call, all-or-none, and
//!   settled from the real usage when it ends: a refund or an extra charge.
//! - Allowances ([`Pool`]): when a limit is large next to what one request
//!   takes, a call takes a little more than it needs (a 200th of the limit
//!   per live replica, at most [`MAX_EXTRA_REQUESTS`] requests or
//!   [`MAX_EXTRA_TOKENS`] tokens) into this replica's pool, and the next
//!   requests are admitted from it without a call. The units in pools were
//!   taken from the shared limit, so the replicas together never admit more
//!   than the limit; the cost is the other way: units held in one replica's
//!   pool (at most a 200th of the limit per replica) wait there, and go back
//!   to Redis after [`POOL_IDLE`] unused. Limits under 200 per replica have
//!   no pool: every request calls. Concurrency has no pool.
//!
//! Keys: `<prefix>rl:k:<key digest>:<kind>` and `<prefix>rl:t:<tenant>:<kind>`
//! (the kind is last, so a tenant name cannot make two keys meet), and
//! `<prefix>af:<ip>` for failed authentications.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
#[allow(clippy::disallowed_types)] // See `LeaseBook::held`.
use std::sync::Mutex;
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use redis::Script;

use crate::shared::{Shared, Unavailable};

/// How long a concurrency lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// An allowance unused this long goes back to Redis.
pub const POOL_IDLE: Duration = Duration::from_secs(1);
/// The most units one call takes ahead of need.
pub const MAX_EXTRA_REQUESTS: u64 = 256;
pub const MAX_EXTRA_TOKENS: u64 = 200_000;

/// Units of one limit taken from Redis ahead of need, for this replica.
#[derive(Debug, Default)]
pub struct Pool {
    units: AtomicU64,
    /// The most it holds: what one call takes ahead of need.
    cap: AtomicU64,
    /// The limit the units were taken under (to give them back).
    limit: AtomicU64,
    /// When it was last drawn from (ms since the book started).
    used_ms: AtomicU64,
}

impl Pool {
    fn take(&self, n: u64) -> bool {
        self.units
            .fetch_update(Relaxed, Relaxed, |u| u.checked_sub(n))
            .is_ok()
    }

    fn add(&self, n: u64) {
        self.units.fetch_add(n, Relaxed);
    }

    /// Keeps what fits under the cap of `n` units given back; returns the
    /// rest, for Redis.
    fn keep(&self, n: u64) -> u64 {
        let cap = self.cap.load(Relaxed);
        let mut rest = n;
        let _ = self.units.fetch_update(Relaxed, Relaxed, |u| {
            let room = cap.saturating_sub(u).min(n);
            rest = n - room;
            Some(u + room)
        });
        rest
    }
}

/// Units to take ahead of need for a limit of `limit` shared by `replicas`,
/// at most `cap`.
fn extra(limit: u64, replicas: usize, cap: u64) -> u64 {
    (limit / (200 * replicas.max(1) as u64)).min(cap)
}

/// A limit of one key or tenant, as a script sees it.
#[derive(Debug, Clone)]
pub struct Scoped {
    /// The Redis key.
    pub key: String,
    /// The limit; 0 when there is none.
    pub limit: u64,
}

/// The Redis keys of one key's or tenant's limits.
#[derive(Debug, Clone)]
pub struct ScopeKeys {
    pub rpm: Scoped,
    pub tpm: Scoped,
    pub concurrent: Scoped,
}

impl ScopeKeys {
    /// `scope` is `k:<hex digest>` or `t:<tenant>`.
    pub fn new(shared: &Shared, scope: &str, rpm: u64, tpm: u64, concurrent: u64) -> Self {
        let at = |kind: &str, limit: u64| Scoped {
            key: shared.key(&format!("rl:{scope}:{kind}")),
            limit,
        };
        Self {
            rpm: at("rpm", rpm),
            tpm: at("tpm", tpm),
            concurrent: at("conc", concurrent),
        }
    }

    /// No limit in this scope.
    pub fn none(shared: &Shared) -> Self {
        Self::new(shared, "none", 0, 0, 0)
    }
}

/// What a script refused: the index of the limit (in the order the keys
/// were given) and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    pub wait: Duration,
}

/// A lease held in Redis, given back when dropped.
#[derive(Debug)]
pub struct Lease {
    id: u64,
    book: Weak<LeaseBook>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(book) = self.book.upgrade() {
            book.release(self.id);
        }
    }
}

/// The leases this replica holds, renewed together.
#[derive(Debug)]
pub struct LeaseBook {
    shared: Arc<Shared>,
    next: AtomicU64,
    /// Allowances by Redis key.
    /// Read-locked on the request path (one lookup per limit), written only
    /// when a limit gets its first pool and by the refund task's clean-up.
    pools: std::sync::RwLock<HashMap<String, Arc<Pool>>>,
    /// The keys of a scope without limits (every limit 0).
    no_limits: Arc<ScopeKeys>,
    started: tokio::time::Instant,
    // Held for one insert or removal per limited request (next to a Redis
    // round trip a thousand times longer) and one copy per renewal; never
    // across an await.
    #[allow(clippy::disallowed_types)]
    held: Mutex<HashMap<u64, Vec<String>>>,
}

impl LeaseBook {
    /// The book, and its renewal task (which ends with the book).
    pub fn start(shared: Arc<Shared>) -> Arc<Self> {
        let book = Arc::new(Self {
            no_limits: Arc::new(ScopeKeys::none(&shared)),
            shared,
            next: AtomicU64::new(1),
            pools: std::sync::RwLock::default(),
            started: tokio::time::Instant::now(),
            #[allow(clippy::disallowed_types)]
            held: Mutex::default(),
        });
        tokio::spawn(keep_renewing(Arc::downgrade(&book)));
        book
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The keys of a key or tenant without limits.
    pub fn no_limits(&self) -> &Arc<ScopeKeys> {
        &self.no_limits
    }

    fn member(&self, id: u64) -> String {
        format!("{}:{id}", self.shared.replica())
    }

    fn release(&self, id: u64) {
        let keys = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let Some(keys) = keys.filter(|k| !k.is_empty()) else {
            return;
        };
        let member = self.member(id);
        let shared = Arc::clone(&self.shared);
        // Fire and forget: a release that fails expires with its lease.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut invocation = RELEASE.prepare_invoke();
                for k in &keys {
                    invocation.key(k);
                }
                invocation.arg(member);
                let _ = shared.script::<i64>("limits_release", invocation).await;
            });
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The allowance of the limit at `scoped`, if the limit is large enough
    /// to have one.
    pub fn pool(&self, scoped: &Scoped, cap: u64) -> Option<Arc<Pool>> {
        let size = extra(scoped.limit, self.shared.live_replicas(), cap);
        if size == 0 {
            return None;
        }
        let found = self
            .pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(scoped.key.as_str())
            .cloned();
        let pool = match found {
            Some(p) => p,
            None => Arc::clone(
                self.pools
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(scoped.key.clone())
                    .or_default(),
            ),
        };
        pool.limit.store(scoped.limit, Relaxed);
        pool.cap.store(size, Relaxed);
        Some(pool)
    }

    /// Takes `n` units from the pool of every limit that `limits` sets
    /// (0: none), or from none: false when a limit has no pool or too few.
    pub fn take_local(&self, limits: [u64; 2], pools: &[Option<Arc<Pool>>; 2], n: u64) -> bool {
        let mut needed: [Option<&Arc<Pool>>; 2] = [None, None];
        for i in 0..2 {
            if limits[i] == 0 {
                continue;
            }
            match &pools[i] {
                Some(p) => needed[i] = Some(p),
                None => return false,
            }
        }
        let now = self.now_ms();
        for (i, p) in needed.iter().enumerate() {
            if let Some(p) = p {
                if !p.take(n) {
                    for q in needed[..i].iter().flatten() {
                        q.add(n);
                    }
                    return false;
                }
            }
        }
        for p in needed.iter().flatten() {
            p.used_ms.store(now, Relaxed);
        }
        true
    }

    /// Gives `n` units back to each pool, up to its cap (a refund settled
    /// locally); returns, per limit, what did not fit (for Redis).
    pub fn give_back(&self, pools: &[Option<Arc<Pool>>; 2], n: u64) -> [u64; 2] {
        let rest = |p: &Option<Arc<Pool>>| p.as_ref().map_or(n, |p| p.keep(n));
        [rest(&pools[0]), rest(&pools[1])]
    }

    /// Adds `granted[i]` units to `pools[i]`.
    fn fill(&self, pools: &[Option<Arc<Pool>>; 2], granted: [u64; 2]) {
        let now = self.now_ms();
        for (p, g) in pools.iter().zip(granted) {
            if let (Some(p), true) = (p, g > 0) {
                p.add(g);
                p.used_ms.store(now, Relaxed);
            }
        }
    }

    /// Gives the units of pools unused for [`POOL_IDLE`] back to Redis.
    async fn refund_idle(&self) {
        let now = self.now_ms();
        let idle = POOL_IDLE.as_millis() as u64;
        let stale: Vec<(String, Arc<Pool>)> = {
            let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
            // Pools of limits unused for ten minutes, and empty, are forgotten.
            pools.retain(|_, p| {
                now.saturating_sub(p.used_ms.load(Relaxed)) < 600_000 || p.units.load(Relaxed) > 0
            });
            pools
                .iter()
                .filter(|(_, p)| {
                    now.saturating_sub(p.used_ms.load(Relaxed)) >= idle && p.units.load(Relaxed) > 0
                })
                .map(|(k, p)| (k.clone(), Arc::clone(p)))
                .collect()
        };
        for (key, pool) in stale {
            let units = pool.units.swap(0, Relaxed);
            if units == 0 {
                continue;
            }
            let scoped = [
                Scoped {
                    key,
                    limit: pool.limit.load(Relaxed),
                },
                Scoped {
                    key: self.shared.key("rl:none"),
                    limit: 0,
                },
            ];
            let delta = -i64::try_from(units).unwrap_or(i64::MAX);
            if adjust(&self.shared, &scoped, delta).await.is_err() {
                // Kept for the next try.
                pool.add(units);
            }
        }
    }

    /// Checks and takes the limits of every scope: requests per minute
    /// (one, and for each pool in `rpm_pools` some more ahead of need),
    /// tokens per minute (one must be left) and a concurrency lease. All or
    /// nothing; the units taken ahead go to the pools.
    pub async fn admit(
        self: &Arc<Self>,
        scopes: &[&ScopeKeys; 2],
        rpm_pools: &[Option<Arc<Pool>>; 2],
    ) -> Result<Result<Lease, Refused>, Unavailable> {
        let id = self.next.fetch_add(1, Relaxed);
        let mut invocation = ADMIT.prepare_invoke();
        let mut args = Vec::with_capacity(6);
        let mut conc = Vec::new();
        for s in scopes {
            for (i, scoped) in [&s.rpm, &s.tpm, &s.concurrent].into_iter().enumerate() {
                invocation.key(&scoped.key);
                args.push(scoped.limit);
                if i == 2 && scoped.limit > 0 {
                    conc.push(scoped.key.clone());
                }
            }
        }
        for a in args {
            invocation.arg(a);
        }
        let replicas = self.shared.live_replicas();
        let wanted = |i: usize| match &rpm_pools[i] {
            Some(_) => extra(scopes[i].rpm.limit, replicas, MAX_EXTRA_REQUESTS),
            None => 0,
        };
        invocation
            .arg(self.member(id))
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(wanted(0))
            .arg(wanted(1));
        // Booked before the call: a call cancelled after Redis took the
        // lease still releases it (or lets it expire).
        self.book(id, conc);
        let lease = Lease {
            id,
            book: Arc::downgrade(self),
        };
        let (code, wait, g0, g1): (i64, i64, u64, u64) =
            self.shared.script("limits_admit", invocation).await?;
        if let Some(r) = refused((code, wait)) {
            return Ok(Err(r));
        }
        self.fill(rpm_pools, [g0, g1]);
        Ok(Ok(lease))
    }

    /// Takes `cost` tokens from each scope's tokens-per-minute limit, all
    /// or none, and for each pool some more ahead of need.
    pub async fn charge(
        &self,
        tpm: &[&Scoped; 2],
        pools: &[Option<Arc<Pool>>; 2],
        cost: u64,
    ) -> Result<Result<(), Refused>, Unavailable> {
        let replicas = self.shared.live_replicas();
        let wanted = |i: usize| match &pools[i] {
            Some(_) => extra(tpm[i].limit, replicas, MAX_EXTRA_TOKENS),
            None => 0,
        };
        let mut invocation = CHARGE.prepare_invoke();
        invocation
            .key(&tpm[0].key)
            .key(&tpm[1].key)
            .arg(tpm[0].limit)
            .arg(tpm[1].limit)
            .arg(cost)
            .arg(wanted(0))
            .arg(wanted(1));
        let (code, wait, g0, g1): (i64, i64, u64, u64) =
            self.shared.script("limits_charge", invocation).await?;
        if let Some(r) = refused((code, wait)) {
            return Ok(Err(r));
        }
        self.fill(pools, [g0, g1]);
        Ok(Ok(()))
    }

    /// A lease on one sorted set (open streams) under `limit`.
    pub async fn lease(
        self: &Arc<Self>,
        key: &str,
        limit: u64,
    ) -> Result<Result<Lease, Refused>, Unavailable> {
        let id = self.next.fetch_add(1, Relaxed);
        let mut invocation = LEASE.prepare_invoke();
        invocation
            .key(key)
            .arg(limit)
            .arg(self.member(id))
            .arg(LEASE_TTL.as_millis() as u64);
        self.book(id, vec![key.to_owned()]);
        let lease = Lease {
            id,
            book: Arc::downgrade(self),
        };
        let reply: (i64, i64) = self.shared.script("limits_lease", invocation).await?;
        Ok(refused(reply).map_or(Ok(lease), Err))
    }

    fn book(&self, id: u64, keys: Vec<String>) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, keys);
    }

    /// Renews every lease held (one script call).
    async fn renew(&self) -> Result<(), Unavailable> {
        let pairs: Vec<(String, String)> = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.iter()
                .flat_map(|(id, keys)| keys.iter().map(|k| (k.clone(), self.member(*id))))
                .collect()
        };
        if pairs.is_empty() {
            return Ok(());
        }
        let mut invocation = RENEW.prepare_invoke();
        invocation.arg(LEASE_TTL.as_millis() as u64);
        for (key, member) in pairs {
            invocation.key(key).arg(member);
        }
        self.shared
            .script::<i64>("limits_renew", invocation)
            .await
            .map(drop)
    }
}

/// Renews the leases every [`LEASE_TTL`] / 3 and gives idle allowances
/// back every [`POOL_IDLE`] / 2, until the book is gone.
async fn keep_renewing(book: Weak<LeaseBook>) {
    let tick = POOL_IDLE / 2;
    let renew_every = (LEASE_TTL / 3).as_millis() / tick.as_millis().max(1);
    let mut n: u128 = 0;
    loop {
        tokio::time::sleep(tick).await;
        let Some(b) = book.upgrade() else { return };
        n += 1;
        if n.is_multiple_of(renew_every.max(1)) {
            let _ = b.renew().await;
        }
        b.refund_idle().await;
    }
}

/// Charges (`delta > 0`) or refunds tokens already decided.
pub async fn adjust(shared: &Shared, tpm: &[Scoped; 2], delta: i64) -> Result<(), Unavailable> {
    let mut invocation = ADJUST.prepare_invoke();
    invocation
        .key(&tpm[0].key)
        .key(&tpm[1].key)
        .arg(tpm[0].limit)
        .arg(tpm[1].limit)
        .arg(delta);
    shared
        .script::<i64>("limits_adjust", invocation)
        .await
        .map(drop)
}

/// One GCRA at `key` (`per_minute`, bursting a minute's worth): takes one
/// unit, or only checks that one could be taken (`take` false).
pub async fn gcra_one(
    shared: &Shared,
    key: &str,
    per_minute: u64,
    take: bool,
) -> Result<Result<(), Duration>, Unavailable> {
    let mut invocation = GCRA_ONE.prepare_invoke();
    invocation.key(key).arg(per_minute).arg(u8::from(take));
    let reply: (i64, i64) = shared.script("limits_auth", invocation).await?;
    Ok(refused(reply).map_or(Ok(()), |r| Err(r.wait)))
}

fn refused((code, wait_us): (i64, i64)) -> Option<Refused> {
    (code > 0).then(|| Refused {
        index: usize::try_from(code - 1).unwrap_or(0),
        wait: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0))
            .max(Duration::from_millis(1)),
    })
}

/// Shared by every script: Redis's clock, and the GCRA of the local
/// limits (`gcra.rs`): `per_minute` units a minute, a minute's worth as one
/// burst; returns the new arrival time, or nil and the wait.
const PRELUDE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function gcra(key, limit, cost, now)
  local interval = math.max(math.floor(60000000 / limit), 1)
  local window = interval * limit
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  local new_tat = math.max(tat, now) + interval * cost
  local allowed_at = new_tat - window
  if allowed_at > now then return nil, allowed_at - now end
  return new_tat, 0
end
local function store(key, tat, now)
  local ms = math.ceil((tat - now) / 1000) + 1000
  if ms < 1000 then ms = 1000 end
  redis.call('SET', key, string.format('%.0f', tat), 'PX', ms)
end
";

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// KEYS: key rpm, tpm, conc, tenant rpm, tpm, conc. ARGV 1–6: their limits
/// (0: none); 7: the lease; 8: its TTL in ms; 9, 10: requests wanted ahead
/// of need for the key's and the tenant's rpm. Returns {0, 0, granted ahead
/// for the key, for the tenant}, or {index of the refusing limit (1-based),
/// wait in µs, 0, 0}.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local ttl = tonumber(ARGV[8])
local take = {}
local granted = {0, 0}
for i = 1, 6 do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local kind = (i - 1) % 3
    if kind == 2 then
      redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now / 1000)
      if redis.call('ZCARD', KEYS[i]) >= limit then return {i, 1000000, 0, 0} end
      take[i] = true
    elseif kind == 0 then
      local scope = (i == 1) and 1 or 2
      local more = tonumber(ARGV[8 + scope])
      local tat = nil
      if more > 0 then tat = gcra(KEYS[i], limit, 1 + more, now) end
      if tat then
        granted[scope] = more
      else
        local wait
        tat, wait = gcra(KEYS[i], limit, 1, now)
        if not tat then return {i, math.ceil(wait), 0, 0} end
      end
      take[i] = tat
    else
      local tat, wait = gcra(KEYS[i], limit, 1, now)
      if not tat then return {i, math.ceil(wait), 0, 0} end
    end
  end
end
for i = 1, 6 do
  if take[i] == true then
    redis.call('ZADD', KEYS[i], string.format('%.0f', now / 1000 + ttl), ARGV[7])
    redis.call('PEXPIRE', KEYS[i], ttl * 2)
  elseif take[i] then
    store(KEYS[i], take[i], now)
  end
end
return {0, 0, granted[1], granted[2]}
",
    )
});

/// KEYS[1]: a sorted set of leases. ARGV: limit, lease, TTL in ms.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now / 1000)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return {1, 1000000} end
redis.call('ZADD', KEYS[1], string.format('%.0f', now / 1000 + ttl), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {0, 0}
",
    )
});

/// KEYS: the lease's sorted sets. ARGV[1]: the lease.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 0
",
    )
});

/// KEYS: sorted sets; ARGV[1]: TTL in ms; ARGV[i + 1]: the lease in KEYS[i].
/// Only leases still there are renewed (`XX`): an expired one stays gone.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', string.format('%.0f', now / 1000 + ttl), ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return 0
",
    )
});

/// KEYS: key tpm, tenant tpm. ARGV: their limits, the cost, tokens wanted
/// ahead of need for each. All or none. Returns {0, 0, granted ahead for
/// each}, or {index of the refusing limit, wait in µs, 0, 0}.
static CHARGE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local cost = tonumber(ARGV[3])
local take = {}
local granted = {0, 0}
for i = 1, 2 do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local more = tonumber(ARGV[3 + i])
    local tat = nil
    if more > 0 then tat = gcra(KEYS[i], limit, cost + more, now) end
    if tat then
      granted[i] = more
    else
      local wait
      tat, wait = gcra(KEYS[i], limit, cost, now)
      if not tat then return {i, math.ceil(wait), 0, 0} end
    end
    take[i] = tat
  end
end
for i = 1, 2 do
  if take[i] then store(KEYS[i], take[i], now) end
end
return {0, 0, granted[1], granted[2]}
",
    )
});

/// KEYS: key tpm, tenant tpm. ARGV: their limits, the correction in tokens.
static ADJUST: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local delta = tonumber(ARGV[3])
for i = 1, 2 do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local interval = math.max(math.floor(60000000 / limit), 1)
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
    if delta > 0 then tat = math.max(tat, now) end
    tat = tat + delta * interval
    if tat > now then store(KEYS[i], tat, now) else redis.call('DEL', KEYS[i]) end
  end
end
return 0
",
    )
});

/// KEYS[1]: a GCRA. ARGV: per minute, 1 to take one unit or 0 to check.
static GCRA_ONE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local tat, wait = gcra(KEYS[1], tonumber(ARGV[1]), 1, now)
if not tat then return {1, math.ceil(wait)} end
if ARGV[2] == '1' then store(KEYS[1], tat, now) end
return {0, 0}
",
    )
});
