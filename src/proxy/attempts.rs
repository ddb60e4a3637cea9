//! The attempt scheduler of one request: which target goes next, when a
//! hedge starts, and what the end of each attempt means for the others.
//!
//! [`Attempts`] launches attempts from the route's plan: one at a time, or a
//! second one racing the first once the hedge delay passes (`hedge_after`).
//! A retry needs a token from the route's retry budget and, with nothing else
//! in flight, waits a full-jitter backoff first. It tells each target's health
//! how its attempt ended (success, failure, a lost race, an abandoned probe)
//! and keeps the list `x-detour-tried` shows. What the client is answered is
//! `proxy::forward`'s.

use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::HeaderValue;
use tokio::time::Instant;

use crate::config::{HedgeAfter, Route, Target};
use crate::health::{TargetHealth, Traffic};
use crate::incidents::IncidentLog;
use crate::routing::Candidate;
use crate::state::RouteState;
use crate::upstream::UpstreamError;

/// What each failed attempt was, for the `x-detour-tried` header and logs.
#[derive(Debug, Default)]
pub struct Tried(Vec<String>);

impl Tried {
    fn push(&mut self, target: &Target, reason: &str) {
        self.0.push(format!(
            "{}/{}={reason}",
            target.provider.name, target.model
        ));
    }

    /// `provider/model=reason, ...`
    pub fn list(&self) -> String {
        self.0.join(", ")
    }

    pub fn header(&self) -> Option<HeaderValue> {
        if self.0.is_empty() {
            return None;
        }
        HeaderValue::from_str(&self.list()).ok()
    }
}

/// An attempt that ended: the target's index, whether it held the breaker's
/// probe slot, and its result.
pub struct Ended<T> {
    pub index: usize,
    pub probe: bool,
    pub result: Result<T, UpstreamError>,
}

/// How the attempts ended when none succeeded.
pub enum Exhausted {
    /// Target `.0` refused the request (the caller's own 4xx), and nothing
    /// else in flight succeeded: that refusal is the answer.
    Refused(usize, UpstreamError),
    /// The last failure, by target; `None` when no target could be tried.
    Failed(Option<(usize, UpstreamError)>),
}

/// The attempts of one request on one route. `start` makes the attempt on a
/// target (in `proxy`: adapter, upstream, relay primed to its first event).
pub struct Attempts<'a, T, F> {
    route: &'a Route,
    state: &'a RouteState,
    /// Where a breaker that closes ends its provider's traffic incident.
    incidents: &'a IncidentLog,
    traffic: Traffic,
    request_id: &'a str,
    plan: std::vec::IntoIter<Candidate>,
    start: F,
    rng: fastrand::Rng,
    in_flight: FuturesUnordered<BoxFuture<'a, Ended<T>>>,
    /// Attempts in flight: target index and start, so that an attempt which
    /// loses a hedge race still tells health how slow it was.
    pending: Vec<(usize, Instant)>,
    launched: u32,
    /// The route's hedge delay, until a hedge was started.
    hedging: Option<HedgeAfter>,
    /// The target index of the hedge, if one started (for the metric).
    hedge: Option<usize>,
    /// A non-retryable error (the caller's own 4xx) while another attempt was
    /// still in flight: the answer, unless that attempt succeeds. Nothing new
    /// is launched after it: other targets would refuse the request too.
    refused: Option<(usize, UpstreamError)>,
    last: Option<(usize, UpstreamError)>,
    tried: Tried,
}

impl<'a, T, F, Fut> Attempts<'a, T, F>
where
    T: Send + 'a,
    F: FnMut(&'a Target) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>> + Send + 'a,
{
    /// `plan` is the order of targets to try (`routing::plan`).
    // The request's parts it schedules over; grouping them would only
    // move the list into a struct built here once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        route: &'a Route,
        state: &'a RouteState,
        incidents: &'a IncidentLog,
        plan: Vec<Candidate>,
        traffic: Traffic,
        request_id: &'a str,
        rng: fastrand::Rng,
        start: F,
    ) -> Self {
        Self {
            route,
            state,
            incidents,
            traffic,
            request_id,
            plan: plan.into_iter(),
            start,
            rng,
            in_flight: FuturesUnordered::new(),
            pending: Vec::new(),
            launched: 0,
            hedging: route.hedge_after,
            hedge: None,
            refused: None,
            last: None,
            tried: Tried::default(),
        }
    }

    /// No hedge for this request: it changes state kept upstream (a stored
    /// response, a conversation), which two racing attempts would change
    /// twice.
    pub fn without_hedging(&mut self) {
        self.hedging = None;
    }

    /// Launches the next candidate that can take a request; false when none
    /// can (the plan or `max_attempts` is used up, or the budget is empty).
    pub fn launch(&mut self) -> bool {
        let (route, state) = (self.route, self.state);
        while self.launched < route.retries.max_attempts {
            let Some(candidate) = self.plan.next() else {
                return false;
            };
            let target = &route.targets[candidate.index];
            let health: &'a TargetHealth = &state.health[candidate.index];
            if self.launched > 0 && !state.budget.try_withdraw() {
                tracing::warn!(request_id = %self.request_id, route = %route.alias, "retry budget exhausted: not trying another target");
                crate::metrics::retry_budget_exhausted(&route.alias);
                self.tried.push(target, "skipped_budget_exhausted");
                return false;
            }
            if candidate.probe {
                match health.claim_probe() {
                    Some(transition) => super::report(self.incidents, target, transition),
                    None => continue,
                }
            }
            let delay = if self.launched > 0 && self.in_flight.is_empty() {
                backoff(route, self.launched, &mut self.rng)
            } else {
                Duration::ZERO
            };
            self.launched += 1;
            let hedge = !self.in_flight.is_empty();
            crate::metrics::attempt_launched(&route.alias, self.launched, hedge);
            self.pending.push((candidate.index, Instant::now()));
            let (index, probe) = (candidate.index, candidate.probe);
            let attempt = guarded(probe, health, delay, (self.start)(target));
            self.in_flight.push(Box::pin(async move {
                Ended {
                    index,
                    probe,
                    result: attempt.await,
                }
            }));
            return true;
        }
        false
    }

    /// Waits for the next attempt to end; meanwhile, when the one in flight
    /// is slower than the hedge delay, races a second target against it.
    /// `None` when nothing is in flight.
    pub async fn next(&mut self) -> Option<Ended<T>> {
        while !self.in_flight.is_empty() {
            let hedge_after = self.hedge_delay();
            let hedge_timer = async move {
                match hedge_after {
                    Some(after) => tokio::time::sleep(after).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(ended) = self.in_flight.next() => {
                    self.pending.retain(|(i, _)| *i != ended.index);
                    return Some(ended);
                }
                () = hedge_timer => {
                    if self.launch() {
                        tracing::info!(request_id = %self.request_id, route = %self.route.alias, "hedging: started a second attempt");
                        self.hedge = self.pending.last().map(|(i, _)| *i);
                    }
                    self.hedging = None;
                }
            }
        }
        None
    }

    /// How long to wait before hedging the one attempt in flight, if at all.
    fn hedge_delay(&self) -> Option<Duration> {
        match self.hedging {
            _ if self.in_flight.len() != 1 => None,
            Some(HedgeAfter::Fixed(d)) => Some(d),
            // No samples of this kind of traffic yet: no estimate, no hedge
            // (a guess would double the cost of every slow first answer).
            Some(HedgeAfter::P95) => self
                .pending
                .first()
                .and_then(|(i, _)| self.state.health[*i].ttfb_p95(self.traffic))
                .map(|p95| p95.max(Duration::from_millis(1))),
            None => None,
        }
    }

    /// Target `index` answered in `took`: the others are cancelled (their
    /// connections close; each lost a race, so it was at least this slow).
    /// Returns the tried list and the number of attempts launched.
    pub fn won(mut self, index: usize, probe: bool, took: Duration) -> (Tried, u32) {
        drop(std::mem::take(&mut self.in_flight));
        let route = self.route;
        for (i, started) in &self.pending {
            self.state.health[*i].on_race_lost(self.traffic, started.elapsed());
            tracing::info!(request_id = %self.request_id, provider = %route.targets[*i].provider.name, "hedge lost the race: cancelled");
        }
        if let Some((i, error)) = &self.refused {
            self.tried.push(&route.targets[*i], error.kind().reason());
        }
        let health = &self.state.health[index];
        if let Some(t) = health.on_success(&route.breaker, probe, self.traffic, took) {
            super::report(self.incidents, &route.targets[index], t);
        }
        crate::metrics::hedge_decided(&route.alias, self.hedge, Some(index));
        (self.tried, self.launched)
    }

    /// Target `index` refused the request (a non-retryable error: the
    /// caller's own 4xx), which says nothing about its health. With nothing
    /// else in flight it is the answer; else the other attempt may still
    /// succeed, and nothing new is launched.
    pub fn refused(&mut self, index: usize, probe: bool, error: UpstreamError) {
        if probe {
            self.state.health[index].on_abandoned();
        }
        if self.in_flight.is_empty() {
            self.refused = Some((index, error));
            return;
        }
        tracing::info!(request_id = %self.request_id, provider = %self.route.targets[index].provider.name, "hedge refused the request; waiting for the other attempt");
        if self.refused.is_none() {
            self.refused = Some((index, error));
        }
    }

    /// Target `index` failed with a retryable error: health hears of it
    /// (unless the request could not be translated for it, which says
    /// nothing of the target), the failure is logged, counted and listed, and
    /// the next target is launched if nothing else is in flight.
    pub fn failed(&mut self, index: usize, probe: bool, error: UpstreamError) {
        let route = self.route;
        let target = &route.targets[index];
        let health = &self.state.health[index];
        if !matches!(error, UpstreamError::Untranslatable { .. }) {
            if let Some(t) = health.on_failure(super::failure_of(&error), &route.breaker, probe) {
                super::report(self.incidents, target, t);
            }
        } else if probe {
            health.on_abandoned();
        }
        let reason = error.kind().reason();
        tracing::warn!(
            request_id = %self.request_id,
            route = %route.alias,
            provider = %target.provider.name,
            model = %target.model,
            reason,
            error = %error,
            "attempt failed; failing over if another target is available"
        );
        crate::metrics::failover(&route.alias, reason);
        self.tried.push(target, reason);
        self.last = Some((index, error));
        if self.in_flight.is_empty() && self.refused.is_none() {
            self.launch();
        }
    }

    /// Nothing is in flight and nothing more can start: how the attempts
    /// ended, the tried list and the number launched.
    pub fn finish(self) -> (Exhausted, Tried, u32) {
        let end = match self.refused {
            Some((index, error)) => {
                crate::metrics::hedge_decided(&self.route.alias, self.hedge, Some(index));
                Exhausted::Refused(index, error)
            }
            None => {
                crate::metrics::hedge_decided(&self.route.alias, self.hedge, None);
                Exhausted::Failed(self.last)
            }
        };
        (end, self.tried, self.launched)
    }
}

/// Runs an attempt after `delay`. If it claimed a breaker's probe slot and is
/// dropped before it ends (the client left, or a hedge won), the slot is
/// released so the target can be probed again.
async fn guarded<T>(
    probe: bool,
    health: &TargetHealth,
    delay: Duration,
    attempt: impl Future<Output = T>,
) -> T {
    struct ProbeGuard<'a>(Option<&'a TargetHealth>);
    impl Drop for ProbeGuard<'_> {
        fn drop(&mut self) {
            if let Some(h) = self.0 {
                h.on_abandoned();
            }
        }
    }
    let mut guard = ProbeGuard(probe.then_some(health));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let _in_flight = health.start_attempt();
    let out = attempt.await;
    guard.0 = None;
    out
}

/// Full-jitter exponential backoff before retry number `attempts`.
fn backoff(route: &Route, attempts: u32, rng: &mut fastrand::Rng) -> Duration {
    let base = route.retries.backoff.as_micros() as u64;
    let cap = base.saturating_mul(1 << attempts.saturating_sub(1).min(10));
    Duration::from_micros(rng.u64(0..=cap))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::Live;

    fn live(route_extra: &str) -> Arc<Live> {
        let text = format!(
            r#"
[[providers]]
name = "a"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-a"

[[providers]]
name = "b"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-b"

[[routes]]
model = "m"
targets = [{{ provider = "a", model = "x", priority = 1 }}, {{ provider = "b", model = "y", priority = 2 }}]
{route_extra}
"#
        );
        let cfg = crate::config::load_str(&text, "t.toml").unwrap();
        crate::state::Gateway::new(cfg).unwrap().live()
    }

    fn plan() -> Vec<Candidate> {
        (0..2)
            .map(|index| Candidate {
                index,
                probe: false,
            })
            .collect()
    }

    fn broke(target: &Target) -> UpstreamError {
        UpstreamError::Transport {
            provider: target.provider.name.clone(),
            detail: "reset".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_launches_the_next_target() {
        let live = live("");
        let (route, state) = (&live.config.routes[0], &live.routes[0]);
        state.budget.deposit();
        let rng = fastrand::Rng::with_seed(1);
        let mut attempts = Attempts::new(
            route,
            state,
            &live.incidents,
            plan(),
            Traffic::Whole,
            "id",
            rng,
            |t| {
                let out = if t.model == "x" {
                    Err(broke(t))
                } else {
                    Ok(t.model.clone())
                };
                async move { out }
            },
        );
        assert!(attempts.launch());
        let first = attempts.next().await.unwrap();
        assert_eq!((first.index, first.result.is_err()), (0, true));
        attempts.failed(first.index, first.probe, first.result.unwrap_err());
        let second = attempts.next().await.unwrap();
        assert_eq!(second.result.unwrap(), "y");
        let (tried, launched) = attempts.won(second.index, second.probe, Duration::ZERO);
        assert_eq!(
            (tried.list().as_str(), launched),
            ("a/x=transport_error", 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_budget_token_no_retry_starts() {
        let live = live("retries = { budget = 0.0, min_per_sec = 0 }");
        let (route, state) = (&live.config.routes[0], &live.routes[0]);
        // A budget starts full; this route's neither refills nor has a floor.
        while state.budget.try_withdraw() {}
        let rng = fastrand::Rng::with_seed(1);
        let mut attempts = Attempts::new(
            route,
            state,
            &live.incidents,
            plan(),
            Traffic::Whole,
            "id",
            rng,
            |t| {
                let out: Result<(), _> = Err(broke(t));
                async move { out }
            },
        );
        attempts.launch();
        let first = attempts.next().await.unwrap();
        attempts.failed(first.index, first.probe, first.result.unwrap_err());
        assert!(attempts.next().await.is_none(), "no second attempt");
        let (end, tried, launched) = attempts.finish();
        assert!(matches!(end, Exhausted::Failed(Some((0, _)))));
        assert_eq!(launched, 1);
        assert_eq!(
            tried.list(),
            "a/x=transport_error, b/y=skipped_budget_exhausted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_attempt_is_raced_by_a_hedge_and_loses() {
        let live = live(r#"hedge_after = "50ms""#);
        let (route, state) = (&live.config.routes[0], &live.routes[0]);
        let rng = fastrand::Rng::with_seed(1);
        let started = Instant::now();
        let mut attempts = Attempts::new(
            route,
            state,
            &live.incidents,
            plan(),
            Traffic::Whole,
            "id",
            rng,
            |t| {
                let slow = t.model == "x";
                let model = t.model.clone();
                async move {
                    if slow {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    Ok(model)
                }
            },
        );
        attempts.launch();
        let ended = attempts.next().await.unwrap();
        assert_eq!(ended.result.unwrap(), "y", "the hedge answered first");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        let (tried, launched) = attempts.won(ended.index, ended.probe, Duration::ZERO);
        assert_eq!((tried.list().as_str(), launched), ("", 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_waits_for_the_hedge_and_answers_if_it_fails() {
        let live = live(r#"hedge_after = "50ms""#);
        let (route, state) = (&live.config.routes[0], &live.routes[0]);
        let rng = fastrand::Rng::with_seed(1);
        let mut attempts = Attempts::new(
            route,
            state,
            &live.incidents,
            plan(),
            Traffic::Whole,
            "id",
            rng,
            |t| {
                let first = t.model == "x";
                let refusal = UpstreamError::Untranslatable {
                    provider: t.provider.name.clone(),
                    message: "no".into(),
                };
                let failure = broke(t);
                async move {
                    if first {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Err::<(), _>(failure)
                    } else {
                        Err(refusal)
                    }
                }
            },
        );
        attempts.launch();
        // The hedge (b) ends first; treated as the caller's own refusal.
        let hedge = attempts.next().await.unwrap();
        assert_eq!(hedge.index, 1);
        attempts.refused(hedge.index, hedge.probe, hedge.result.unwrap_err());
        let first = attempts.next().await.unwrap();
        attempts.failed(first.index, first.probe, first.result.unwrap_err());
        assert!(
            attempts.next().await.is_none(),
            "nothing new after a refusal"
        );
        let (end, _, launched) = attempts.finish();
        assert!(matches!(end, Exhausted::Refused(1, _)));
        assert_eq!(launched, 2);
    }
}
