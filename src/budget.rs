//! Retry budget: retries (failover attempts and hedges) may be at most a
//! fraction of requests, plus a small floor, so that when everything is down
//! detour does not multiply the load on providers that are already failing.
//!
//! After Finagle's `RetryBudget` and Linkerd's retry budgets: every request
//! deposits `ratio` of a token, every retry withdraws one whole token; a floor
//! of `min_per_sec` retries per second refills independently so that a quiet
//! route can still fail over. Upstream requests are then bounded by about
//! `(1 + ratio) × requests + min_per_sec × seconds`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::clock::Clock;
use crate::config::RetryPolicy;

/// Token amounts are kept in thousandths.
const SCALE: i64 = 1000;

#[derive(Debug)]
pub struct RetryBudget {
    ratio_milli: i64,
    /// Most tokens that can pile up from deposits (so a long quiet period does
    /// not buy a retry storm later).
    cap: i64,
    balance: AtomicI64,
    min_per_sec: u64,
    floor_second: AtomicU64,
    floor_used: AtomicU64,
    clock: Clock,
}

impl RetryBudget {
    pub fn new(policy: &RetryPolicy, clock: Clock) -> Self {
        let ratio_milli = (policy.budget * SCALE as f64).round() as i64;
        let cap = (10 * SCALE).max(ratio_milli * 100);
        Self {
            ratio_milli,
            cap,
            // Start as a route in steady state would be: a fresh gateway
            // meeting an outage can fail over its first burst of requests.
            balance: AtomicI64::new(cap),
            min_per_sec: u64::from(policy.min_per_sec),
            floor_second: AtomicU64::new(0),
            floor_used: AtomicU64::new(0),
            clock,
        }
    }

    /// A client request arrived.
    pub fn deposit(&self) {
        let new = self.balance.fetch_add(self.ratio_milli, Relaxed) + self.ratio_milli;
        if new > self.cap {
            self.balance.fetch_sub(new - self.cap, Relaxed);
        }
    }

    /// Asks for one retry; true if the budget allows it.
    pub fn try_withdraw(&self) -> bool {
        if self.balance.fetch_sub(SCALE, Relaxed) >= SCALE {
            return true;
        }
        self.balance.fetch_add(SCALE, Relaxed);
        self.try_floor()
    }

    fn try_floor(&self) -> bool {
        if self.min_per_sec == 0 {
            return false;
        }
        let second = self.clock.now_ms() / 1000;
        let seen = self.floor_second.load(Relaxed);
        if seen != second
            && self
                .floor_second
                .compare_exchange(seen, second, Relaxed, Relaxed)
                .is_ok()
        {
            self.floor_used.store(0, Relaxed);
        }
        self.floor_used.fetch_add(1, Relaxed) < self.min_per_sec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, floor: u32) -> RetryBudget {
        let policy = RetryPolicy {
            budget: ratio,
            min_per_sec: floor,
            max_attempts: 3,
            backoff: std::time::Duration::from_millis(5),
        };
        RetryBudget::new(&policy, Clock::new())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_fraction_of_requests() {
        let b = budget(0.2, 0);
        // Spend the initial reserve first.
        while b.balance.load(Relaxed) >= SCALE {
            assert!(b.try_withdraw());
        }
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.try_withdraw() {
                retries += 1;
            }
        }
        assert!((195..=200).contains(&retries), "{retries}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_a_few_per_second() {
        let b = budget(0.0, 3);
        b.balance.store(0, Relaxed);
        let granted = (0..10).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 3);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(b.try_withdraw());
    }
}
