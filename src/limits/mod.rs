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
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Caller;
use crate::clock::Clock;
use crate::config::Config;
use gcra::Gcra;

/// Answer tokens assumed when a request does not say.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// Rate and concurrency limits of one key or tenant.
#[derive(Debug, Default)]
struct Buckets {
    rpm: Option<Gcra>,
    tpm: Option<Arc<Gcra>>,
    concurrent: Option<Arc<Semaphore>>,
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
    _concurrency: Vec<OwnedSemaphorePermit>,
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

/// The limits of one config.
#[derive(Debug, Default)]
pub struct Limits {
    keys: HashMap<[u8; 32], Buckets>,
    /// Open streams per key.
    streams: HashMap<[u8; 32], Arc<Semaphore>>,
    tenants: HashMap<String, Buckets>,
}

impl Limits {
    pub fn new(config: &Config, clock: Clock) -> Self {
        let keys = config
            .keys
            .iter()
            .map(|k| (k.sha256, buckets_for(k.rpm, k.tpm, k.max_concurrent, clock)))
            .collect();
        let tenants = config
            .tenants
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    buckets_for(t.rpm, t.tpm, t.max_concurrent, clock),
                )
            })
            .collect();
        let streams = config
            .keys
            .iter()
            .filter_map(|k| Some((k.sha256, Arc::new(Semaphore::new(k.max_streams? as usize)))))
            .collect();
        Self {
            keys,
            tenants,
            streams,
        }
    }

    /// A permit for one more open stream of the caller's key, if it has a cap.
    pub fn stream_permit(&self, caller: &Caller) -> Result<Option<OwnedSemaphorePermit>, Limited> {
        let Some(sem) = caller.key_digest.and_then(|d| self.streams.get(&d)) else {
            return Ok(None);
        };
        Arc::clone(sem)
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| Limited {
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
            if let Some(sem) = &b.concurrent {
                match Arc::clone(sem).try_acquire_owned() {
                    Ok(p) => held._concurrency.push(p),
                    Err(_) => {
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

fn buckets_for(
    rpm: Option<u32>,
    tpm: Option<u64>,
    concurrent: Option<u32>,
    clock: Clock,
) -> Buckets {
    Buckets {
        // A minute's allowance may come as one burst.
        rpm: rpm.map(|r| Gcra::per_minute(u64::from(r), u64::from(r), clock)),
        tpm: tpm.map(|t| Arc::new(Gcra::per_minute(t, t, clock))),
        concurrent: concurrent.map(|c| Arc::new(Semaphore::new(c as usize))),
    }
}

/// Estimated tokens of a request of `body_bytes` asking for at most
/// `max_tokens` of answer.
pub fn estimate_tokens(body_bytes: u64, max_tokens: Option<u64>) -> u64 {
    (body_bytes / 4).max(1) + max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE)
}

/// Failed authentication per client IP: after `per_minute` failures, the IP
/// gets 429 until its allowance refills, so guessing keys is slow.
#[derive(Debug)]
pub struct AuthFailures {
    per_minute: u64,
    clock: Clock,
    ips: moka::sync::Cache<IpAddr, Arc<Gcra>>,
}

impl AuthFailures {
    pub fn new(per_minute: u64, clock: Clock) -> Self {
        Self {
            per_minute,
            clock,
            ips: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// How long the IP must wait before it may try again, if it must.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        self.ips.get(&ip)?.check(1).err()
    }

    /// Records a failed attempt; returns the wait if the IP is now blocked.
    pub fn failed(&self, ip: IpAddr) -> Option<Duration> {
        let (per_minute, clock) = (self.per_minute, self.clock);
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
}
