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

pub mod admission;
pub mod gcra;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::auth::Caller;
use crate::clock::Clock;
use crate::config::Config;
use gcra::Gcra;

/// Answer tokens assumed when a request does not say.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// Rate and concurrency limits of one key or tenant, as one config sets
/// them; the state behind them is the [`LimitStore`]'s.
#[derive(Debug, Default, Clone)]
struct Buckets {
    rpm: Option<Arc<Gcra>>,
    tpm: Option<Arc<Gcra>>,
    concurrent: Option<Arc<Slots>>,
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
#[derive(Debug, Clone, Copy)]
struct Values {
    rpm: Option<u32>,
    tpm: Option<u64>,
    concurrent: Option<u32>,
    streams: Option<u32>,
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
    // Only touched when a config is built, never on the request path.
    keys: RwLock<HashMap<[u8; 32], Cells>>,
    tenants: RwLock<HashMap<String, Cells>>,
}

impl LimitStore {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            keys: RwLock::default(),
            tenants: RwLock::default(),
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
        let mut limits = Limits::default();
        for k in &config.keys {
            let values = Values {
                rpm: k.rpm,
                tpm: k.tpm,
                concurrent: k.max_concurrent,
                streams: k.max_streams,
            };
            let cells = keys.entry(k.sha256).or_default();
            let (buckets, streams) = cells.set(values, apply, clock);
            limits.keys.insert(k.sha256, buckets);
            if let Some(s) = streams {
                limits.streams.insert(k.sha256, s);
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
            let cells = tenants.entry(t.name.clone()).or_default();
            let (buckets, _) = cells.set(values, apply, clock);
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
        };
        (buckets, slots(&mut self.streams, v.streams))
    }
}

/// Why a request is refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub what: String,
    pub retry_after: Duration,
}

/// What a request holds while it runs (released when it ends).
#[derive(Debug, Default)]
pub struct Held {
    _concurrency: Vec<Slot>,
}

/// Tokens charged before a call, to correct when its usage is known.
#[derive(Debug, Clone)]
pub struct TokenCharge {
    buckets: Vec<Arc<Gcra>>,
    estimate: u64,
}

impl TokenCharge {
    /// Replaces the estimate by the real count.
    pub fn settle(&self, actual: u64) {
        let delta = i64::try_from(actual).unwrap_or(i64::MAX)
            - i64::try_from(self.estimate).unwrap_or(i64::MAX);
        for b in &self.buckets {
            b.adjust(delta);
        }
    }
}

/// The caller's tokens-per-minute buckets (key, then tenant), to be charged
/// once the request's body is read.
#[derive(Debug, Clone, Default)]
pub struct TokenGate {
    buckets: Vec<(&'static str, Arc<Gcra>)>,
}

impl TokenGate {
    /// Takes `estimate` tokens from every bucket, or none of them.
    pub fn charge(&self, estimate: u64) -> Result<Option<TokenCharge>, Limited> {
        let cost = i64::try_from(estimate).unwrap_or(i64::MAX);
        for (i, (scope, bucket)) in self.buckets.iter().enumerate() {
            if let Err(wait) = bucket.try_take(estimate) {
                for (_, taken) in &self.buckets[..i] {
                    taken.adjust(-cost);
                }
                return Err(Limited {
                    what: format!("tokens per minute for this {scope}"),
                    retry_after: wait,
                });
            }
        }
        Ok((!self.buckets.is_empty()).then(|| TokenCharge {
            buckets: self.buckets.iter().map(|(_, b)| Arc::clone(b)).collect(),
            estimate,
        }))
    }
}

/// The limits of one config, on the [`LimitStore`]'s state.
#[derive(Debug, Default)]
pub struct Limits {
    keys: HashMap<[u8; 32], Buckets>,
    /// Open streams per key.
    streams: HashMap<[u8; 32], Arc<Slots>>,
    tenants: HashMap<String, Buckets>,
}

impl Limits {
    /// A permit for one more open stream of the caller's key, if it has a cap.
    pub fn stream_permit(&self, caller: &Caller) -> Result<Option<Slot>, Limited> {
        let Some(slots) = caller.key_digest.and_then(|d| self.streams.get(&d)) else {
            return Ok(None);
        };
        slots.try_take().map(Some).ok_or_else(|| Limited {
            what: "open streams for this key".into(),
            retry_after: Duration::from_secs(1),
        })
    }

    /// Checks and takes the caller's request and concurrency limits, and
    /// refuses a caller whose token allowance is spent. The returned gate
    /// charges the request's tokens once its body is read.
    pub fn admit(&self, caller: &Caller) -> Result<(Held, TokenGate), Limited> {
        let scopes = [
            ("key", caller.key_digest.and_then(|d| self.keys.get(&d))),
            ("tenant", self.tenants.get(&caller.tenant)),
        ];
        let mut held = Held::default();
        let mut gate = TokenGate::default();
        for (scope, buckets) in scopes {
            let Some(b) = buckets else { continue };
            if let Some(rpm) = &b.rpm {
                if let Err(wait) = rpm.try_take(1) {
                    return Err(Limited {
                        what: format!("requests per minute for this {scope}"),
                        retry_after: wait,
                    });
                }
            }
            if let Some(tpm) = &b.tpm {
                if let Err(wait) = tpm.check(1) {
                    return Err(Limited {
                        what: format!("tokens per minute for this {scope}"),
                        retry_after: wait,
                    });
                }
                gate.buckets.push((scope, Arc::clone(tpm)));
            }
            if let Some(slots) = &b.concurrent {
                match slots.try_take() {
                    Some(slot) => held._concurrency.push(slot),
                    None => {
                        return Err(Limited {
                            what: format!("concurrent requests for this {scope}"),
                            retry_after: Duration::from_secs(1),
                        });
                    }
                }
            }
        }
        Ok((held, gate))
    }
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
}

impl AuthFailures {
    pub fn new(per_minute: u64, clock: Clock) -> Self {
        Self {
            per_minute: AtomicU64::new(per_minute),
            clock,
            ips: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
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
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        self.ips.get(&ip)?.check(1).err()
    }

    /// Records a failed attempt; returns the wait if the IP is now blocked.
    pub fn failed(&self, ip: IpAddr) -> Option<Duration> {
        let (per_minute, clock) = (self.per_minute.load(Relaxed), self.clock);
        let bucket = self.ips.get_with(ip, || {
            Arc::new(Gcra::per_minute(per_minute, per_minute, clock))
        });
        bucket.try_take(1).err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(key: u64, tenant: u64, clock: Clock) -> TokenGate {
        let bucket = |n| Arc::new(Gcra::per_minute(n, n, clock));
        TokenGate {
            buckets: vec![("key", bucket(key)), ("tenant", bucket(tenant))],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_charge_takes_from_every_bucket_or_none() {
        let g = gate(1000, 500, Clock::new());
        // The tenant cannot take 600: the key's 600 are given back.
        let refused = g.charge(600).unwrap_err();
        assert_eq!(refused.what, "tokens per minute for this tenant");
        let charge = g.charge(400).unwrap().unwrap();
        assert!(
            g.buckets[0].1.check(600).is_ok(),
            "the key was charged twice"
        );
        assert!(g.buckets[1].1.check(101).is_err());
        // Settled from usage: 100 used, 300 given back.
        charge.settle(100);
        assert!(g.buckets[1].1.check(400).is_ok());
        assert!(TokenGate::default().charge(10).unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_failed_auth_allowance_applies_to_addresses_already_counted() {
        let f = AuthFailures::new(2, Clock::new());
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert!(f.failed(ip).is_none());
        assert!(f.failed(ip).is_none());
        assert!(f.blocked(ip).is_some(), "2 of 2 used");
        f.retune(10);
        assert!(f.blocked(ip).is_none(), "the raised allowance applies");
        f.retune(1);
        assert!(f.blocked(ip).is_some());
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
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_canary_shares_the_buckets_under_the_stable_values_until_promoted() {
        let store = LimitStore::new(Clock::new());
        let stable = store.reconcile(&config(1, ""));
        let canary_config = config(10, "max_concurrent = 1\n");
        let canary = store.share(&canary_config);
        let who = caller(&canary_config);
        assert!(stable.admit(&who).is_ok());
        assert!(canary.admit(&who).is_err(), "one bucket, the stable rpm");
        // Promoted, its values apply to the same buckets.
        let promoted = store.reconcile(&canary_config);
        let held = promoted.admit(&who).unwrap();
        assert!(promoted.admit(&who).is_err(), "max_concurrent = 1");
        drop(held);
        assert!(promoted.admit(&who).is_ok(), "the slot is free again");
    }
}
