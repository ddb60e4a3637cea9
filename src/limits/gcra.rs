//! A rate limiter by the Generic Cell Rate Algorithm (GCRA, ITU-T I.371; the
//! algorithm behind `governor` and redis-cell), lock-free on one atomic.
//!
//! It keeps a single "theoretical arrival time" (TAT): a request of cost `n`
//! is allowed if `max(TAT, now) + n·T − now ≤ τ + T`, where `T` is the time
//! per unit (60 s / limit) and `τ` the burst tolerance; then TAT moves to
//! `max(TAT, now) + n·T`. Costs can be corrected afterwards (tokens estimated
//! before a call, then counted from the real usage): moving TAT by the
//! difference charges or refunds it.
//!
//! A bucket outlives the config that set its rate: [`Gcra::retune`] applies a
//! new rate to the units already taken (a reload neither forgives a caller's
//! debt nor keeps an old limit).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::clock::Clock;

#[derive(Debug)]
pub struct Gcra {
    /// Microseconds per unit.
    interval_us: AtomicU64,
    /// Burst tolerance plus one interval, in microseconds.
    window_us: AtomicU64,
    /// Theoretical arrival time, microseconds on `clock`.
    tat: AtomicU64,
    clock: Clock,
}

impl Gcra {
    /// `per_minute` units a minute, with bursts of up to `burst` units.
    pub fn per_minute(per_minute: u64, burst: u64, clock: Clock) -> Self {
        let (interval_us, window_us) = rate(per_minute, burst);
        Self {
            interval_us: AtomicU64::new(interval_us),
            window_us: AtomicU64::new(window_us),
            tat: AtomicU64::new(0),
            clock,
        }
    }

    /// Applies a new rate, keeping the units already taken: a caller that
    /// used 2 of 2 may take 3 more once the limit is 5, and none yet if it
    /// stays 2. Cold path (config changes); a request racing the change is
    /// judged by either rate.
    pub fn retune(&self, per_minute: u64, burst: u64) {
        let (interval_us, window_us) = rate(per_minute, burst);
        let old = self.interval_us.swap(interval_us, Relaxed);
        self.window_us.store(window_us, Relaxed);
        if old == interval_us {
            return;
        }
        let now = self.now_us();
        let _ = self.tat.fetch_update(Relaxed, Relaxed, |tat| {
            // Units still outstanding, a started one counted whole.
            let units = u128::from(tat.saturating_sub(now)).div_ceil(u128::from(old.max(1)));
            let debt =
                u64::try_from(units.saturating_mul(u128::from(interval_us))).unwrap_or(u64::MAX);
            Some(now.saturating_add(debt))
        });
    }

    fn now_us(&self) -> u64 {
        self.clock.now_ms().saturating_mul(1000)
    }

    /// Takes `cost` units, or says how long until it could.
    pub fn try_take(&self, cost: u64) -> Result<(), Duration> {
        let now = self.now_us();
        let increment = self.interval_us.load(Relaxed).saturating_mul(cost);
        let window_us = self.window_us.load(Relaxed);
        let mut tat = self.tat.load(Relaxed);
        loop {
            let new_tat = tat.max(now).saturating_add(increment);
            let allowed_at = new_tat.saturating_sub(window_us);
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
            .saturating_add(self.interval_us.load(Relaxed).saturating_mul(cost));
        let allowed_at = new_tat.saturating_sub(self.window_us.load(Relaxed));
        if allowed_at > now {
            Err(Duration::from_micros(allowed_at - now))
        } else {
            Ok(())
        }
    }

    /// Takes `cost` units whatever is left: units admitted elsewhere (by the
    /// replicas' shared limits), counted here so that this replica's own
    /// usage is known if it must decide alone.
    pub fn force(&self, cost: u64) {
        let now = self.now_us();
        let increment = self.interval_us.load(Relaxed).saturating_mul(cost);
        let _ = self.tat.fetch_update(Relaxed, Relaxed, |tat| {
            Some(tat.max(now).saturating_add(increment))
        });
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) units already decided.
    pub fn adjust(&self, delta: i64) {
        let us = self
            .interval_us
            .load(Relaxed)
            .saturating_mul(delta.unsigned_abs());
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

/// Microseconds per unit and the window, for `per_minute` with `burst`.
fn rate(per_minute: u64, burst: u64) -> (u64, u64) {
    let interval_us = (60_000_000 / per_minute.max(1)).max(1);
    (interval_us, interval_us.saturating_mul(burst.max(1)))
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

    #[tokio::test(start_paused = true)]
    async fn units_taken_elsewhere_count_from_now() {
        let g = Gcra::per_minute(60, 2, Clock::new());
        tokio::time::advance(Duration::from_secs(600)).await;
        g.force(2);
        assert!(g.check(1).is_err(), "an idle bucket forced twice is spent");
        g.force(5);
        assert!(g.try_take(1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_keeps_the_units_taken() {
        let g = Gcra::per_minute(2, 2, Clock::new());
        assert!(g.try_take(2).is_ok());
        g.retune(2, 2);
        assert!(g.try_take(1).is_err(), "the same rate forgives nothing");
        g.retune(5, 5);
        assert!(g.try_take(3).is_ok(), "2 of 5 were used");
        assert!(g.try_take(1).is_err());
        g.retune(1, 1);
        assert!(g.try_take(1).is_err(), "5 of 1 used: a lower limit waits");
    }
}
