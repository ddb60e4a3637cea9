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
//!
//! With `[state] backend = "redis"`, the replicas that reload the same file
//! bake one rollout together ([`shared`]): their cohorts add up in Redis,
//! the bake time runs from the first replica's start, and the first verdict
//! reached (by a judge or by hand on any replica) is the verdict of all.

pub mod shared;

pub use crate::state::Rollout;
// The rollout's data lives with the state the request path records into.
pub use crate::state::{CohortTag, CohortView, RolloutView};

/// What the analysis says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Wait,
    Promote,
    Rollback(String),
}

/// Judges a rollout: roll back, promote, or wait.
pub fn verdict(rollout: &Rollout) -> Verdict {
    let (stable, canary) = rollout.cohorts();
    judge(&stable, &canary, &rollout.policy, rollout.elapsed())
}

/// Judges two cohorts after `elapsed` of baking under `p`.
pub fn judge(
    stable: &CohortView,
    canary: &CohortView,
    p: &crate::config::RolloutPolicy,
    elapsed: std::time::Duration,
) -> Verdict {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::RolloutPolicy;
    use crate::state::Gateway;

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            canary_percent: 50.0,
            bake: Duration::from_secs(10),
            max_error_rate_increase: 0.05,
            max_latency_ratio: 1.5,
            min_requests: 10,
        }
    }

    fn rollout() -> Arc<Rollout> {
        let cfg = || crate::config::load_str("", "t.toml").unwrap();
        let gw = Gateway::new(cfg()).unwrap();
        gw.start_rollout(cfg(), policy(), None).unwrap()
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
        assert!(matches!(verdict(&r), Verdict::Rollback(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_canary_is_promoted_after_the_bake() {
        let r = rollout();
        for _ in 0..20 {
            r.record(false, 200, Duration::from_millis(10));
            r.record(true, 200, Duration::from_millis(11));
        }
        assert_eq!(verdict(&r), Verdict::Wait);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(verdict(&r), Verdict::Promote);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_canary_is_rolled_back_and_client_errors_do_not_count() {
        let r = rollout();
        for _ in 0..20 {
            r.record(false, 200, Duration::from_millis(10));
            r.record(true, 400, Duration::from_millis(30));
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let Verdict::Rollback(why) = verdict(&r) else {
            panic!("{:?}", verdict(&r))
        };
        assert!(why.contains("latency"), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn too_few_requests_keep_baking_then_promote() {
        let r = rollout();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(verdict(&r), Verdict::Wait);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(verdict(&r), Verdict::Promote);
    }
}
