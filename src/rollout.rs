//! Phased rollout of a new config: a canary share of requests runs on the
//! candidate while the rest stays on the stable config; after the bake time
//! their error rates and latencies are compared and the candidate is promoted
//! or rolled back by itself. An operator can promote or roll back by hand.
//!
//! The comparison (the "canary analysis" of Spinnaker/Kayenta, reduced to
//! two numbers): the candidate fails if its error rate exceeds the stable
//! one's by more than `max_error_rate_increase`, or its mean latency exceeds
//! `max_latency_ratio` times the stable mean. A candidate that is clearly
//! failing is rolled back before the bake time is over; one that has seen
//! fewer than `min_requests` keeps baking, up to four bake times, and is then
//! promoted (no evidence of harm).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::RolloutPolicy;
use crate::state::Live;

/// Outcomes of one group of requests.
#[derive(Debug, Default)]
pub struct Cohort {
    requests: AtomicU64,
    errors: AtomicU64,
    latency_us: AtomicU64,
}

impl Cohort {
    fn record(&self, server_error: bool, latency: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if server_error {
            self.errors.fetch_add(1, Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.fetch_add(us, Relaxed);
    }

    fn snapshot(&self) -> CohortView {
        let requests = self.requests.load(Relaxed);
        let errors = self.errors.load(Relaxed);
        let latency = self.latency_us.load(Relaxed);
        CohortView {
            requests,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            mean_latency_ms: if requests == 0 {
                0.0
            } else {
                latency as f64 / requests as f64 / 1e3
            },
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CohortView {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub mean_latency_ms: f64,
}

/// A candidate config being baked.
#[derive(Debug)]
pub struct Rollout {
    pub candidate: Arc<Live>,
    pub policy: RolloutPolicy,
    /// The candidate's config text, kept as last-known-good once it serves.
    pub source: Option<String>,
    started: Instant,
    stable: Cohort,
    canary: Cohort,
}

/// What the analysis says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Wait,
    Promote,
    Rollback(String),
}

impl Rollout {
    pub fn new(candidate: Arc<Live>, policy: RolloutPolicy, source: Option<String>) -> Self {
        Self {
            candidate,
            policy,
            source,
            started: Instant::now(),
            stable: Cohort::default(),
            canary: Cohort::default(),
        }
    }

    /// Should this request go to the candidate?
    pub fn takes(&self, rng: &mut fastrand::Rng) -> bool {
        rng.f64() * 100.0 < self.policy.canary_percent
    }

    /// Records a finished request of either cohort. Only server-side failures
    /// (5xx) count as errors: a client's 4xx says nothing about the config.
    pub fn record(&self, canary: bool, status: u16, latency: Duration) {
        let cohort = if canary { &self.canary } else { &self.stable };
        cohort.record(status >= 500, latency);
    }

    pub fn verdict(&self) -> Verdict {
        let (stable, canary) = (self.stable.snapshot(), self.canary.snapshot());
        let p = &self.policy;
        let enough = canary.requests >= u64::from(p.min_requests);
        let error_bad = canary.error_rate > stable.error_rate + p.max_error_rate_increase;
        let latency_bad = stable.requests > 0
            && stable.mean_latency_ms > 0.0
            && canary.mean_latency_ms > p.max_latency_ratio * stable.mean_latency_ms;
        if enough && error_bad {
            return Verdict::Rollback(format!(
                "canary error rate {:.1}% vs stable {:.1}% (allowed +{:.1} points)",
                canary.error_rate * 100.0,
                stable.error_rate * 100.0,
                p.max_error_rate_increase * 100.0
            ));
        }
        let elapsed = self.started.elapsed();
        if elapsed < p.bake {
            return Verdict::Wait;
        }
        if enough && latency_bad {
            return Verdict::Rollback(format!(
                "canary mean latency {:.1} ms vs stable {:.1} ms (allowed {:.1}x)",
                canary.mean_latency_ms, stable.mean_latency_ms, p.max_latency_ratio
            ));
        }
        if enough || elapsed >= 4 * p.bake {
            return Verdict::Promote;
        }
        Verdict::Wait
    }

    pub fn view(&self) -> RolloutView {
        RolloutView {
            canary_percent: self.policy.canary_percent,
            bake_ms: u64::try_from(self.policy.bake.as_millis()).unwrap_or(u64::MAX),
            elapsed_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            stable: self.stable.snapshot(),
            canary: self.canary.snapshot(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    pub canary_percent: f64,
    pub bake_ms: u64,
    pub elapsed_ms: u64,
    pub stable: CohortView,
    pub canary: CohortView,
}

/// Which cohort a request belongs to, carried to where it finishes.
#[derive(Debug, Clone)]
pub struct CohortTag {
    pub rollout: Arc<Rollout>,
    pub canary: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            canary_percent: 50.0,
            bake: Duration::from_secs(10),
            max_error_rate_increase: 0.05,
            max_latency_ratio: 1.5,
            min_requests: 10,
        }
    }

    fn rollout() -> Rollout {
        let cfg = crate::config::load_str("", "t.toml").unwrap();
        let live = Live::build(cfg, &crate::health::Registry::default()).unwrap();
        Rollout::new(Arc::new(live), policy(), None)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_canary_is_rolled_back_before_the_bake_ends() {
        let r = rollout();
        for i in 0..20 {
            r.record(false, 200, Duration::from_millis(10));
            r.record(
                true,
                if i % 2 == 0 { 500 } else { 200 },
                Duration::from_millis(10),
            );
        }
        assert!(matches!(r.verdict(), Verdict::Rollback(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_canary_is_promoted_after_the_bake() {
        let r = rollout();
        for _ in 0..20 {
            r.record(false, 200, Duration::from_millis(10));
            r.record(true, 200, Duration::from_millis(11));
        }
        assert_eq!(r.verdict(), Verdict::Wait);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(r.verdict(), Verdict::Promote);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_canary_is_rolled_back_and_client_errors_do_not_count() {
        let r = rollout();
        for _ in 0..20 {
            r.record(false, 200, Duration::from_millis(10));
            r.record(true, 400, Duration::from_millis(30));
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let Verdict::Rollback(why) = r.verdict() else {
            panic!("{:?}", r.verdict())
        };
        assert!(why.contains("latency"), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn too_few_requests_keep_baking_then_promote() {
        let r = rollout();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(r.verdict(), Verdict::Wait);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(r.verdict(), Verdict::Promote);
    }
}
