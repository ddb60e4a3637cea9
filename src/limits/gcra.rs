//! A rate limiter by the Generic Cell Rate Algorithm (GCRA, ITU-T I.371; the
//! algorithm behind `governor` and redis-cell), lock-free on one atomic.
//!
//! It keeps a single "theoretical arrival time" (TAT): a request of cost `n`
//! is allowed if `max(TAT, now) + n·T − now ≤ τ + T`, where `T` is the time
//! per unit (60 s / limit) and `τ` the burst tolerance; then TAT moves to
//! `max(TAT, now) + n·T`. Costs can be corrected afterwards (tokens estimated
//! before a call, then counted from the real usage): moving TAT by the
//! difference charges or refunds it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::clock::Clock;

#[derive(Debug)]
pub struct Gcra {
    /// Microseconds per unit.
    interval_us: u64,
    /// Burst tolerance plus one interval, in microseconds.
    window_us: u64,
    /// Theoretical arrival time, microseconds on `clock`.
    tat: AtomicU64,
    clock: Clock,
}

impl Gcra {
    /// `per_minute` units a minute, with bursts of up to `burst` units.
    pub fn per_minute(per_minute: u64, burst: u64, clock: Clock) -> Self {
        let interval_us = (60_000_000 / per_minute.max(1)).max(1);
        Self {
            interval_us,
            window_us: interval_us.saturating_mul(burst.max(1)),
            tat: AtomicU64::new(0),
            clock,
        }
    }

    fn now_us(&self) -> u64 {
        self.clock.now_ms().saturating_mul(1000)
    }

    /// Takes `cost` units, or says how long until it could.
    pub fn try_take(&self, cost: u64) -> Result<(), Duration> {
        let now = self.now_us();
        let increment = self.interval_us.saturating_mul(cost);
        let mut tat = self.tat.load(Relaxed);
        loop {
            let new_tat = tat.max(now).saturating_add(increment);
            let allowed_at = new_tat.saturating_sub(self.window_us);
            if allowed_at > now {
                return Err(Duration::from_micros(allowed_at - now));
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Relaxed, Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Whether `cost` units could be taken now, without taking them.
    pub fn check(&self, cost: u64) -> Result<(), Duration> {
        let now = self.now_us();
        let new_tat = self
            .tat
            .load(Relaxed)
            .max(now)
            .saturating_add(self.interval_us.saturating_mul(cost));
        let allowed_at = new_tat.saturating_sub(self.window_us);
        if allowed_at > now {
            Err(Duration::from_micros(allowed_at - now))
        } else {
            Ok(())
        }
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) units already decided.
    pub fn adjust(&self, delta: i64) {
        let us = self.interval_us.saturating_mul(delta.unsigned_abs());
        if delta > 0 {
            self.tat.fetch_add(us, Relaxed);
        } else {
            // Never below zero; a refund past "now" is harmless (max(TAT, now)).
            let _ = self
                .tat
                .fetch_update(Relaxed, Relaxed, |t| Some(t.saturating_sub(us)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_the_rate_with_its_burst() {
        let g = Gcra::per_minute(60, 5, Clock::new());
        for _ in 0..5 {
            assert!(g.try_take(1).is_ok());
        }
        let wait = g.try_take(1).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(g.try_take(1).is_ok());
        assert!(g.try_take(1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn corrections_charge_and_refund() {
        let g = Gcra::per_minute(600, 100, Clock::new());
        assert!(g.try_take(100).is_ok(), "a full burst");
        assert!(g.try_take(1).is_err());
        g.adjust(-50); // the call used 50 fewer than estimated
        assert!(g.try_take(50).is_ok());
        assert!(g.try_take(1).is_err());
        g.adjust(600); // and another used far more: a minute's worth
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(g.try_take(1).is_err());
    }
}
