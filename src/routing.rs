//! Which targets of a route to try for one request, and in what order.
//!
//! 1. Targets are grouped by `priority` (lower first); a group is tried before
//!    the next one.
//! 2. Inside a group, the order is a weighted random draw without replacement
//!    (weight × slow-start share), so traffic is balanced by weight.
//! 3. A target that its health says to skip (open breaker, cool-down,
//!    misconfigured, overridden down) is left out; an open breaker whose wait is
//!    over stays in its place as a probe candidate.
//! 4. Demotion: a target in slow start is moved behind every other target with
//!    probability `1 - share`; a target whose time-to-first-byte EWMA is more than
//!    [`DEMOTE_FACTOR`] times the fastest available peer's (and above
//!    [`DEMOTE_FLOOR`]) goes behind every healthy peer too. Latencies are
//!    compared for the request's kind of traffic (first event of a stream, or
//!    a whole answer; see `health::Traffic`), never one kind against the other. Demoted targets still
//!    serve when everything ahead of them fails. A target that keeps losing
//!    hedge races (more than [`LOSING_SHARE`] recently) is demoted the same way.
//!    One request per `open_for` still goes to a demoted target first, so that
//!    a recovered target is noticed.
//!    When the preferred target is slower than [`DEMOTE_FLOOR`], one request per
//!    [`EXPLORE_EVERY`] goes first to a peer that has no latency sample yet, so
//!    that a brownout can be compared with something.
//!    A target at its adaptive concurrency cap (see `health`) goes behind its peers.
//! 5. A provider whose status page says `down` is skipped; `degraded` demotes it.
//! 6. An override `up` keeps a target in place whatever its health.
//! 7. A candidate whose health is unknown or recovering (a probe, slow start, a
//!    latency probe, exploration) is marked `tentative`: its attempt is hedged
//!    to the next target soon (`proxy::attempts`).

use std::sync::Arc;
use std::time::Duration;

use crate::config::Route;
use crate::health::{Override, PageState, ProviderHealth, Status, TargetHealth, Traffic};

pub const DEMOTE_FACTOR: f64 = 3.0;
pub const DEMOTE_FLOOR: Duration = Duration::from_millis(50);
/// A target that lost more than this share of its recent hedge races is demoted.
pub const LOSING_SHARE: f64 = 0.5;
/// While the preferred target is slow, an unmeasured peer gets one request this often.
pub const EXPLORE_EVERY: Duration = Duration::from_millis(250);

/// One target to try.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Index into `route.targets`.
    pub index: usize,
    /// The attempt must first claim the breaker's probe slot.
    pub probe: bool,
    /// The target's health is unknown or recovering: a probe, slow start,
    /// a latency probe of a demoted target, or exploration. Such an attempt
    /// is hedged to the next target soon (`proxy::attempts`).
    pub tentative: bool,
}

/// The order of targets to try for a request of kind `traffic`. `health` is
/// parallel to `route.targets`; `overrides` is indexed by provider.
pub fn plan(
    route: &Route,
    health: &[Arc<TargetHealth>],
    overrides: &[Arc<ProviderHealth>],
    traffic: Traffic,
    rng: &mut fastrand::Rng,
) -> Vec<Candidate> {
    struct Entry {
        index: usize,
        priority: u32,
        weight: f64,
        probe: bool,
        demoted: bool,
        tentative: bool,
        ttfb: Option<Duration>,
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(route.targets.len());
    for (index, target) in route.targets.iter().enumerate() {
        let over = overrides
            .get(target.provider_index)
            .map_or(Override::Auto, |o| o.get());
        let Some(h) = health.get(index) else { continue };
        let page = overrides
            .get(target.provider_index)
            .map_or(PageState::Unknown, |o| o.page_state());
        let (share, probe) = match over {
            Override::Down => continue,
            Override::Up => (1.0, false),
            Override::Auto if page == PageState::Down => continue,
            Override::Auto => match h.status(&route.breaker) {
                Status::Skip => continue,
                Status::Probe => (1.0, true),
                Status::Available(share) => (share, false),
            },
        };
        let demoted = (share < 1.0 && rng.f64() >= share)
            || (over == Override::Auto && page == PageState::Degraded);
        entries.push(Entry {
            index,
            priority: target.priority,
            weight: f64::from(target.weight.max(1)),
            probe,
            demoted,
            tentative: probe || share < 1.0,
            ttfb: if over == Override::Up {
                None
            } else {
                h.ttfb_ewma(traffic)
            },
        });
    }
    let fastest = entries
        .iter()
        .filter(|e| !e.probe)
        .filter_map(|e| e.ttfb)
        .min();
    for e in &mut entries {
        let Some(h) = health.get(e.index) else {
            continue;
        };
        let slow = match (e.ttfb, fastest) {
            (Some(t), Some(fastest)) => {
                t > DEMOTE_FLOOR && t.as_secs_f64() > DEMOTE_FACTOR * fastest.as_secs_f64()
            }
            _ => false,
        };
        let losing = h.lost_race_share() > LOSING_SHARE;
        if h.saturated() {
            e.demoted = true;
            continue;
        }
        // One request per `open_for` still goes to a demoted target first,
        // so that its recovery is noticed.
        if slow || losing {
            if h.claim_latency_probe(&route.breaker) {
                e.tentative = true;
            } else {
                e.demoted = true;
            }
        }
    }
    // Exploration: when the preferred target is slow, send a small share of
    // requests to a peer with no latency sample yet, so that demotion has
    // something to compare with.
    let preferred_slow = entries
        .iter()
        .filter(|e| !e.demoted)
        .min_by_key(|e| e.priority)
        .and_then(|e| e.ttfb)
        .is_some_and(|t| t > DEMOTE_FLOOR);
    if preferred_slow {
        let unmeasured = entries.iter_mut().find(|e| {
            e.ttfb.is_none()
                && !e.probe
                && health
                    .get(e.index)
                    .is_some_and(|h| h.claim_exploration(EXPLORE_EVERY))
        });
        if let Some(e) = unmeasured {
            e.priority = 0;
            e.demoted = false;
            e.tentative = true;
            e.weight = f64::MAX;
        }
    }
    // Weighted shuffle inside each priority group: sort by a key drawn as
    // u^(1/w) (Efraimidis–Spirakis), highest first. A lone target needs no
    // draw (nor its `powf`).
    let shuffle = entries.len() > 1;
    let mut keyed: Vec<(bool, u32, f64, Entry)> = entries
        .into_iter()
        .map(|e| {
            let key = if shuffle {
                rng.f64().powf(1.0 / e.weight)
            } else {
                0.0
            };
            (e.demoted, e.priority, key, e)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.total_cmp(&a.2)));
    keyed
        .into_iter()
        .map(|(_, _, _, e)| Candidate {
            index: e.index,
            probe: e.probe,
            tentative: e.tentative,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::config::{BreakerPolicy, Provider, ProviderKind, RetryPolicy, Target, Timeouts};
    use crate::health::Failure;

    fn route(targets: &[(usize, u32, u32)]) -> Route {
        let provider = Arc::new(Provider {
            name: "p".into(),
            kind: ProviderKind::OpenAi,
            base_url: "http://127.0.0.1:1/v1".parse().unwrap(),
            api_key: None,
            status_page: None,
            status_components: Vec::new(),
            status_poll: Duration::from_secs(30),
            status_page_format: crate::config::StatusFormat::Auto,
            status_webhook_secret: None,
            default_max_tokens: 4096,
            tls: Default::default(),
            proxy: Default::default(),
            connect_timeout: Duration::from_secs(1),
        });
        Route {
            alias: "r".into(),
            targets: targets
                .iter()
                .map(|&(provider_index, priority, weight)| Target {
                    provider: Arc::clone(&provider),
                    provider_index,
                    model: format!("m{provider_index}"),
                    weight,
                    priority,
                    headers: None,
                })
                .collect(),
            timeouts: Timeouts::default(),
            retries: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
            hedge_after: None,
            probe_hedge_after: crate::config::DEFAULT_PROBE_HEDGE_AFTER,
            cache: None,
            continue_streams: false,
        }
    }

    fn health(n: usize) -> Vec<Arc<TargetHealth>> {
        let clock = Clock::new();
        (0..n)
            .map(|i| Arc::new(TargetHealth::new(&format!("p{i}"), "m", clock)))
            .collect()
    }

    fn overrides(n: usize) -> Vec<Arc<ProviderHealth>> {
        (0..n)
            .map(|_| Arc::new(ProviderHealth::default()))
            .collect()
    }

    fn order(plan: &[Candidate]) -> Vec<usize> {
        plan.iter().map(|c| c.index).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn priority_order_and_skipping() {
        let r = route(&[(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        let h = health(3);
        let o = overrides(3);
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(
            order(&plan(&r, &h, &o, Traffic::Whole, &mut rng)),
            vec![0, 1, 2]
        );
        for _ in 0..5 {
            let _ = h[0].on_failure(Failure::Fault, &BreakerPolicy::default(), false);
        }
        assert_eq!(
            order(&plan(&r, &h, &o, Traffic::Whole, &mut rng)),
            vec![1, 2],
            "open breaker is skipped"
        );
        o[1].set(Override::Down);
        assert_eq!(order(&plan(&r, &h, &o, Traffic::Whole, &mut rng)), vec![2]);
        o[0].set(Override::Up);
        assert_eq!(
            order(&plan(&r, &h, &o, Traffic::Whole, &mut rng)),
            vec![0, 2],
            "up overrides the breaker"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn weights_split_a_group() {
        let r = route(&[(0, 0, 3), (1, 0, 1)]);
        let (h, o) = (health(2), overrides(2));
        let mut rng = fastrand::Rng::with_seed(7);
        let firsts = (0..4000)
            .filter(|_| plan(&r, &h, &o, Traffic::Whole, &mut rng)[0].index == 0)
            .count();
        assert!((2800..3200).contains(&firsts), "{firsts}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_much_slower_target_is_demoted() {
        let r = route(&[(0, 0, 1), (1, 1, 1)]);
        let (h, o) = (health(2), overrides(2));
        let policy = BreakerPolicy::default();
        let _ = h[0].on_success(&policy, false, Traffic::Whole, Duration::from_millis(900));
        let _ = h[1].on_success(&policy, false, Traffic::Whole, Duration::from_millis(100));
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(
            order(&plan(&r, &h, &o, Traffic::Whole, &mut rng)),
            vec![1, 0]
        );
        // Streamed traffic has no samples here: nothing to demote on.
        assert_eq!(
            order(&plan(&r, &h, &o, Traffic::Streamed, &mut rng)),
            vec![0, 1]
        );
    }
}
