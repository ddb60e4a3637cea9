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
//!
//! An attempt on a target whose health is unknown or recovering (a
//! half-open breaker's probe, slow start, a latency probe, exploration:
//! `routing::Candidate::tentative`) never holds a client up for long: it runs
//! as a task of its own, and the next target races it after the target's
//! learned p95 for the request's kind of traffic, or `probe_hedge_after`
//! when none is known (a breaker probe's hedge needs no budget token). The
//! client gets whichever answers first. When the other target wins, or the
//! client leaves, the tentative attempt goes on in the background up to its
//! own timeouts and tells its target's health how it ended (a probe that
//! answers late closes the breaker, one that times out re-opens it; an
//! answer is read to its end for that); at most one such attempt per target
//! besides the breaker's single probe, the others are cancelled. While only
//! tentative attempts are left, a failure launches the next target at once,
//! and once nothing else can start after a failure or a refusal the client
//! is answered with it instead of waiting on them.
//!
//! An answer counts for the breaker when it ends ([`Settle`]): an event
//! stream is a success only once it ended whole, and a failure if it broke
//! off after its first event (cut, stall, error event, no end marker), like a
//! failure before it; its latency counts when it is answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::HeaderValue;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::{BreakerPolicy, HedgeAfter, Route, Target};
use crate::health::{TargetHealth, Traffic, Transition};
use crate::incidents::IncidentLog;
use crate::relay::BodyEnd;
use crate::routing::Candidate;
use crate::state::RouteState;
use crate::upstream::UpstreamError;

use super::in_flight::InFlight;

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

/// What a successful attempt gives: an answer whose end health hears of.
pub trait Answer: Send + Sized + 'static {
    /// Time to the answer (to the first event of a stream).
    fn took(&self) -> Duration;
    /// `settle` is told how the answer ends: at once for an answer that is
    /// whole when it is answered, when its body ends for a stream.
    fn settle_with(&mut self, settle: Settle);
    /// Reads the answer to its end, for an attempt no client waits for.
    fn drain(self) -> BoxFuture<'static, ()>;
}

/// What the end of one attempt's answer tells its target's health; owned,
/// so that it can outlive the request (a stream's end, a background probe).
#[derive(Clone)]
pub struct Settle {
    health: Arc<TargetHealth>,
    policy: BreakerPolicy,
    incidents: Arc<IncidentLog>,
    probe: bool,
    traffic: Traffic,
}

impl Settle {
    /// The answer ended: whole (a success; the probe's closes the breaker),
    /// broken off (a failure, as before its first event: it may open the
    /// breaker, and re-opens it for the probe), or dropped by the client
    /// (nothing, and the probe's slot is freed).
    ///
    /// Success is counted at the end rather than when the answer is
    /// committed, so a stream that breaks off counts once, as a failure:
    /// counting a success first would reset the consecutive failures each
    /// time and leave the window at half its failures, so a provider that
    /// breaks every stream would never trip its breaker.
    pub fn ended(self, end: BodyEnd<'_>) {
        let transition = match end {
            BodyEnd::Whole => self.health.on_whole(&self.policy, self.probe),
            BodyEnd::Broke(error) => failure(&self.health, &self.policy, self.probe, error),
            BodyEnd::Dropped => {
                if self.probe {
                    self.health.on_abandoned();
                }
                None
            }
        };
        if let Some(t) = transition {
            report(&self.incidents, &self.health, t);
        }
    }

    /// An attempt no client waits for ended with `result`: health hears of
    /// it as it would have from the client's request; an answer is read to
    /// its end first.
    async fn in_background<T: Answer>(self, result: Result<T, UpstreamError>) {
        let (provider, model, probe) = (&self.health.provider, &self.health.model, self.probe);
        match result {
            Ok(mut answer) => {
                tracing::info!(%provider, %model, probe, "an attempt no client waits for answered: reading it to its end for the target's health");
                self.health.on_answered(self.traffic, answer.took());
                answer.settle_with(self.clone());
                answer.drain().await;
            }
            Err(error) => {
                tracing::info!(%provider, %model, probe, reason = error.kind().reason(), error = %error, "an attempt no client waits for failed");
                let t = match error.retryable() {
                    true => failure(&self.health, &self.policy, probe, &error),
                    false => {
                        if probe {
                            self.health.on_abandoned();
                        }
                        None
                    }
                };
                if let Some(t) = t {
                    report(&self.incidents, &self.health, t);
                }
            }
        }
    }
}

/// A retryable failure, as health hears it: a failure unless the request
/// could not be translated for the target (which says nothing of it).
fn failure(
    health: &TargetHealth,
    policy: &BreakerPolicy,
    probe: bool,
    error: &UpstreamError,
) -> Option<Transition> {
    if matches!(error, UpstreamError::Untranslatable { .. }) {
        if probe {
            health.on_abandoned();
        }
        return None;
    }
    health.on_failure(super::failure_of(error), policy, probe)
}

fn report(incidents: &IncidentLog, health: &TargetHealth, transition: Transition) {
    super::report(incidents, &health.provider, &health.model, transition);
}

/// An attempt in flight.
struct Pending {
    index: usize,
    started: Instant,
    probe: bool,
    /// Of a tentative attempt (a task of its own): what became of it once
    /// no client waited for it (`FATE_*`).
    fate: Option<Arc<AtomicU8>>,
}

impl Pending {
    fn tentative(&self) -> bool {
        self.fate.is_some()
    }
}

/// A tentative attempt's fate: still awaited by the request...
const FATE_AWAITED: u8 = 0;
/// ...going on in the background...
const FATE_BACKGROUND: u8 = 1;
/// ...cancelled (a lost race)...
const FATE_CANCELLED: u8 = 2;
/// ...or ended before anyone looked, and told to health from there.
const FATE_SETTLED: u8 = 3;

/// The attempts of one request on one route. `start` makes the attempt on a
/// target by its index (in `proxy`: adapter, upstream, relay primed to its
/// first event); it owns what it needs, so that a tentative attempt can
/// outlive the request.
pub struct Attempts<'a, T, F> {
    route: &'a Route,
    state: &'a RouteState,
    /// Where a breaker that closes ends its provider's traffic incident.
    incidents: &'a Arc<IncidentLog>,
    traffic: Traffic,
    request_id: &'a str,
    plan: std::vec::IntoIter<Candidate>,
    start: F,
    rng: fastrand::Rng,
    in_flight: InFlight<'a, Ended<T>>,
    /// Attempts in flight, so that an attempt which loses a hedge race
    /// still tells health how slow it was.
    pending: Vec<Pending>,
    launched: u32,
    /// The route's hedge delay, until a hedge was started.
    hedging: Option<HedgeAfter>,
    /// A tentative attempt was hedged already.
    probe_hedged: bool,
    /// The target index of the hedge, if one started (for the metric).
    hedge: Option<usize>,
    /// A non-retryable error (the caller's own 4xx) while another attempt was
    /// still in flight: the answer, unless that attempt succeeds. Nothing new
    /// is launched after it: other targets would refuse the request too.
    refused: Option<(usize, UpstreamError)>,
    last: Option<(usize, UpstreamError)>,
    /// Nothing else can start and the client has its answer (a failure or a
    /// refusal): tentative attempts still in flight are not waited for.
    answer_now: bool,
    tried: Tried,
}

impl<'a, T, F, Fut> Attempts<'a, T, F>
where
    T: Answer,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>> + Send + 'static,
{
    /// `plan` is the order of targets to try (`routing::plan`).
    // The request's parts it schedules over; grouping them would only
    // move the list into a struct built here once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        route: &'a Route,
        state: &'a RouteState,
        incidents: &'a Arc<IncidentLog>,
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
            in_flight: InFlight::Idle,
            pending: Vec::new(),
            launched: 0,
            hedging: route.hedge_after,
            probe_hedged: false,
            hedge: None,
            refused: None,
            last: None,
            answer_now: false,
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
        self.launch_next(false)
    }

    /// `free`: a hedge for a half-open breaker's probe, which needs no
    /// budget token (there is one probe per target per `open_for`).
    fn launch_next(&mut self, free: bool) -> bool {
        let (route, state) = (self.route, self.state);
        while self.launched < route.retries.max_attempts {
            let Some(candidate) = self.plan.next() else {
                return false;
            };
            let target = &route.targets[candidate.index];
            let health = &state.health[candidate.index];
            if self.launched > 0 && !free && !state.budget.try_withdraw() {
                tracing::warn!(request_id = %self.request_id, route = %route.alias, "retry budget exhausted: not trying another target");
                crate::metrics::retry_budget_exhausted(&route.alias);
                self.tried.push(target, "skipped_budget_exhausted");
                return false;
            }
            if candidate.probe {
                match health.claim_probe() {
                    Some(transition) => report(self.incidents, health, transition),
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
            let (index, probe) = (candidate.index, candidate.probe);
            // Boxed once, here: a future moved into an `async` block is kept
            // twice in it (as the argument and as the awaited value), so
            // `guarded` and the block below would each double the attempt's
            // size (about 3 KiB), and every move of them copy it all. Written
            // into its box, not copied in (see `crate::boxed`).
            let start = &mut self.start;
            let attempt = guarded(
                probe,
                Arc::clone(health),
                delay,
                crate::boxed::in_place(|| start(index)),
            );
            let fate = if candidate.tentative {
                let settle = Settle {
                    health: Arc::clone(health),
                    policy: route.breaker,
                    incidents: Arc::clone(self.incidents),
                    probe,
                    traffic: self.traffic,
                };
                let (handoff, fate) = Handoff::spawn(index, attempt, settle);
                self.in_flight.push(Box::pin(handoff));
                Some(fate)
            } else {
                self.in_flight.push(crate::boxed::in_place(|| async move {
                    Ended {
                        index,
                        probe,
                        result: attempt.await,
                    }
                }));
                None
            };
            self.pending.push(Pending {
                index,
                started: Instant::now(),
                probe,
                fate,
            });
            return true;
        }
        false
    }

    /// Only tentative attempts are in flight (or none).
    fn only_tentative(&self) -> bool {
        self.pending.iter().all(Pending::tentative)
    }

    /// Waits for the next attempt to end; meanwhile, when the one in flight
    /// is slower than the hedge delay, races a second target against it.
    /// `None` when nothing is in flight, or only tentative attempts are
    /// while the client has its answer.
    pub async fn next(&mut self) -> Option<Ended<T>> {
        while !self.in_flight.is_empty() {
            if self.answer_now && self.only_tentative() {
                return None;
            }
            let hedge_after = self.hedge_delay();
            let hedge_timer = async move {
                match hedge_after {
                    Some(after) => tokio::time::sleep(after).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // The attempts first: an answer and the hedge delay ready at
                // once is the answer (and no random start per poll).
                biased;
                Some(ended) = self.in_flight.next() => {
                    self.pending.retain(|p| p.index != ended.index);
                    return Some(ended);
                }
                () = hedge_timer => {
                    let (tentative, probe) = self
                        .pending
                        .first()
                        .map_or((false, false), |p| (p.tentative(), p.probe));
                    if self.launch_next(probe) {
                        let why = if tentative { "its target's health is unknown or recovering" } else { "it is slow" };
                        tracing::info!(request_id = %self.request_id, route = %self.route.alias, "hedging: started a second attempt, as the first is slow and {why}");
                        self.hedge = self.pending.last().map(|p| p.index);
                    }
                    self.hedging = None;
                    self.probe_hedged = true;
                }
            }
        }
        None
    }

    /// How long to wait before hedging the one attempt in flight, if at all.
    fn hedge_delay(&self) -> Option<Duration> {
        if self.in_flight.len() != 1 {
            return None;
        }
        let first = self.pending.first()?;
        let health = &self.state.health[first.index];
        let route_delay = match self.hedging {
            Some(HedgeAfter::Fixed(d)) => Some(d),
            // No samples of this kind of traffic yet: no estimate, no hedge
            // (a guess would double the cost of every slow first answer).
            Some(HedgeAfter::P95) => health
                .ttfb_p95(self.traffic)
                .map(|p95| p95.max(Duration::from_millis(1))),
            None => None,
        };
        if !first.tentative() || self.probe_hedged {
            return route_delay;
        }
        // A target of unknown or recovering health: what it took when it
        // was last measured, else the route's short default.
        let learned = health
            .ttfb_p95(self.traffic)
            .unwrap_or(self.route.probe_hedge_after)
            .max(Duration::from_millis(1));
        Some(route_delay.map_or(learned, |d| d.min(learned)))
    }

    /// Target `index` gave `answer`: the others are cancelled (their
    /// connections close; each lost a race, so it was at least this slow),
    /// but a tentative one may go on in the background. Health learns the
    /// answer's latency now and how it ends when it ends (see [`Settle`]).
    /// Returns the tried list and the number of attempts launched.
    pub fn won(mut self, index: usize, probe: bool, answer: &mut T) -> (Tried, u32) {
        self.in_flight = InFlight::Idle;
        let route = self.route;
        for p in &self.pending {
            let provider = &route.targets[p.index].provider.name;
            match p.fate.as_ref().map(|f| f.load(SeqCst)) {
                Some(FATE_BACKGROUND) => {
                    tracing::info!(request_id = %self.request_id, %provider, probe = p.probe, "hedge lost the race: goes on in the background to learn whether its target recovered");
                }
                Some(FATE_SETTLED) => {}
                _ => {
                    self.state.health[p.index].on_race_lost(self.traffic, p.started.elapsed());
                    tracing::info!(request_id = %self.request_id, %provider, "hedge lost the race: cancelled");
                }
            }
        }
        if let Some((i, error)) = &self.refused {
            self.tried.push(&route.targets[*i], error.kind().reason());
        }
        let health = &self.state.health[index];
        health.on_answered(self.traffic, answer.took());
        answer.settle_with(Settle {
            health: Arc::clone(health),
            policy: route.breaker,
            incidents: Arc::clone(self.incidents),
            probe,
            traffic: self.traffic,
        });
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
        self.answer_now = true;
    }

    /// Target `index` failed with a retryable error: health hears of it
    /// (unless the request could not be translated for it, which says
    /// nothing of the target), the failure is logged, counted and listed, and
    /// the next target is launched if nothing else is in flight but
    /// tentative attempts.
    pub fn failed(&mut self, index: usize, probe: bool, error: UpstreamError) {
        let route = self.route;
        let target = &route.targets[index];
        let health = &self.state.health[index];
        if let Some(t) = failure(health, &route.breaker, probe, &error) {
            report(self.incidents, health, t);
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
        if self.only_tentative() && self.refused.is_none() && !self.launch() {
            self.answer_now = true;
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

/// A tentative attempt, run as a task of its own, as the request awaits it.
/// Dropped before it ended (another target answered, or the client left),
/// it lets the attempt go on in the background if the target allows one
/// more (`TargetHealth::try_background`), else cancels it; either way its
/// end reaches the target's health exactly once, from the task or from here.
struct Handoff<T: Answer> {
    index: usize,
    probe: bool,
    /// `None` once the request took the result.
    rx: Option<oneshot::Receiver<Result<T, UpstreamError>>>,
    task: AbortHandle,
    settle: Settle,
    fate: Arc<AtomicU8>,
}

impl<T: Answer> Handoff<T> {
    fn spawn(
        index: usize,
        attempt: impl Future<Output = Result<T, UpstreamError>> + Send + 'static,
        settle: Settle,
    ) -> (Self, Arc<AtomicU8>) {
        let (tx, rx) = oneshot::channel();
        let fate = Arc::new(AtomicU8::new(FATE_AWAITED));
        let task = tokio::spawn({
            let (settle, fate) = (settle.clone(), Arc::clone(&fate));
            async move {
                let result = attempt.await;
                // Sent: the request has it, or its drop tells health.
                let Err(result) = tx.send(result) else {
                    return;
                };
                // Nobody waits for it: it tells health itself. The fate was
                // set before the receiver closed.
                let health = Arc::clone(&settle.health);
                settle.in_background(result).await;
                if fate.load(SeqCst) == FATE_BACKGROUND {
                    health.end_background();
                }
            }
        });
        let handoff = Self {
            index,
            probe: settle.probe,
            rx: Some(rx),
            task: task.abort_handle(),
            settle,
            fate: Arc::clone(&fate),
        };
        (handoff, fate)
    }
}

impl<T: Answer> Future for Handoff<T> {
    type Output = Ended<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended<T>> {
        let this = self.get_mut();
        let Some(rx) = this.rx.as_mut() else {
            return Poll::Pending;
        };
        let result = match ready!(Pin::new(rx).poll(cx)) {
            Ok(result) => result,
            // The task ended without a result: the runtime is shutting down.
            Err(_) => Err(UpstreamError::Transport {
                provider: this.settle.health.provider.to_string(),
                detail: "the attempt's task ended without an answer".to_owned(),
            }),
        };
        this.rx = None;
        Poll::Ready(Ended {
            index: this.index,
            probe: this.probe,
            result,
        })
    }
}

impl<T: Answer> Drop for Handoff<T> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let health = Arc::clone(&self.settle.health);
        let kept = health.try_background(self.settle.probe);
        let fate = if kept {
            FATE_BACKGROUND
        } else {
            FATE_CANCELLED
        };
        // Before the receiver closes: the task reads it once its send fails.
        self.fate.store(fate, SeqCst);
        rx.close();
        match rx.try_recv() {
            // It ended, but the request never looked: its end is told here.
            Ok(result) => {
                self.fate.store(FATE_SETTLED, SeqCst);
                let settle = self.settle.clone();
                let tell = async move {
                    settle.in_background(result).await;
                    if kept {
                        health.end_background();
                    }
                };
                // No runtime (shutting down): nothing to tell it to.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    drop(runtime.spawn(tell));
                }
            }
            // It goes on; the task tells health how it ends.
            Err(_) if kept => {}
            Err(_) => self.task.abort(),
        }
    }
}

/// Runs an attempt after `delay`. If it claimed a breaker's probe slot and is
/// dropped before it ends (the client left, or a hedge won), the slot is
/// released so the target can be probed again.
async fn guarded<T>(
    probe: bool,
    health: Arc<TargetHealth>,
    delay: Duration,
    attempt: impl Future<Output = T>,
) -> T {
    struct ProbeGuard(Option<Arc<TargetHealth>>);
    impl Drop for ProbeGuard {
        fn drop(&mut self) {
            if let Some(h) = &self.0 {
                h.on_abandoned();
            }
        }
    }
    let mut guard = ProbeGuard(probe.then(|| Arc::clone(&health)));
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
                tentative: false,
            })
            .collect()
    }

    /// A test's answer is whole once answered.
    impl Answer for String {
        fn took(&self) -> Duration {
            Duration::ZERO
        }
        fn settle_with(&mut self, settle: Settle) {
            settle.ended(BodyEnd::Whole);
        }
        fn drain(self) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    impl Answer for () {
        fn took(&self) -> Duration {
            Duration::ZERO
        }
        fn settle_with(&mut self, settle: Settle) {
            settle.ended(BodyEnd::Whole);
        }
        fn drain(self) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    /// The scheduler over the test route's first route, as a request with
    /// id `id` and whole-answer traffic would make it.
    fn attempts_on<T, F, Fut>(live: &Live, plan: Vec<Candidate>, start: F) -> Attempts<'_, T, F>
    where
        T: Answer,
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>> + Send + 'static,
    {
        let (route, state) = (&live.config.routes[0], &live.routes[0]);
        Attempts::new(
            route,
            state,
            &live.incidents,
            plan,
            Traffic::Whole,
            "id",
            fastrand::Rng::with_seed(1),
            start,
        )
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
        let mut attempts = attempts_on(&live, plan(), |i| {
            let t = &route.targets[i];
            let out = if t.model == "x" {
                Err(broke(t))
            } else {
                Ok(t.model.clone())
            };
            async move { out }
        });
        assert!(attempts.launch());
        let first = attempts.next().await.unwrap();
        assert_eq!((first.index, first.result.is_err()), (0, true));
        attempts.failed(first.index, first.probe, first.result.unwrap_err());
        let second = attempts.next().await.unwrap();
        let mut answer = second.result.unwrap();
        assert_eq!(answer, "y");
        let (tried, launched) = attempts.won(second.index, second.probe, &mut answer);
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
        let mut attempts = attempts_on(&live, plan(), |i| {
            let out: Result<(), _> = Err(broke(&route.targets[i]));
            async move { out }
        });
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
        let route = &live.config.routes[0];
        let started = Instant::now();
        let mut attempts = attempts_on(&live, plan(), |i| {
            let t = &route.targets[i];
            let slow = t.model == "x";
            let model = t.model.clone();
            async move {
                if slow {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                Ok(model)
            }
        });
        attempts.launch();
        let ended = attempts.next().await.unwrap();
        let mut answer = ended.result.unwrap();
        assert_eq!(answer, "y", "the hedge answered first");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        let (tried, launched) = attempts.won(ended.index, ended.probe, &mut answer);
        assert_eq!((tried.list().as_str(), launched), ("", 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_waits_for_the_hedge_and_answers_if_it_fails() {
        let live = live(r#"hedge_after = "50ms""#);
        let route = &live.config.routes[0];
        let mut attempts = attempts_on(&live, plan(), |i| {
            let t = &route.targets[i];
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
        });
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

    /// Opens target 0's breaker and lets it cool down: the plan probes it
    /// (tentatively), then has target 1.
    async fn probe_then_next(
        a: &crate::health::TargetHealth,
        route: &crate::config::Route,
    ) -> Vec<Candidate> {
        let _ = a.on_failure(crate::health::Failure::Fault, &route.breaker, false);
        tokio::time::advance(Duration::from_secs(1)).await;
        vec![
            Candidate {
                index: 0,
                probe: true,
                tentative: true,
            },
            Candidate {
                index: 1,
                probe: false,
                tentative: false,
            },
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_is_hedged_soon_and_closes_the_breaker_from_the_background() {
        let live = live(
            r#"probe_hedge_after = "40ms"
breaker = { consecutive_failures = 1, open_for = "1s" }"#,
        );
        let (route, state) = (&live.config.routes[0], &live.routes[0]);
        let a = &state.health[0];
        let plan = probe_then_next(a, route).await;
        let started = Instant::now();
        let mut attempts = attempts_on(&live, plan, |i| {
            let model = route.targets[i].model.clone();
            async move {
                if model == "x" {
                    // The probed target answers, but late.
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                Ok(model)
            }
        });
        assert!(attempts.launch());
        let ended = attempts.next().await.unwrap();
        let mut answer = ended.result.unwrap();
        assert_eq!(answer, "y", "the next target answered first");
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        let (tried, launched) = attempts.won(ended.index, ended.probe, &mut answer);
        assert_eq!((tried.list().as_str(), launched), ("", 2));
        assert_eq!(a.state(), crate::health::BreakerState::HalfOpen);
        assert_eq!(a.snapshot(&route.breaker).background, 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            a.state(),
            crate::health::BreakerState::Closed,
            "the probe answered in the background"
        );
        assert_eq!(a.snapshot(&route.breaker).background, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_beside_a_hanging_probe_is_answered_without_waiting_for_it() {
        let live = live(
            r#"probe_hedge_after = "40ms"
breaker = { consecutive_failures = 1, open_for = "1s" }"#,
        );
        let (route, state) = (&live.config.routes[0], &live.routes[0]);
        let a = &state.health[0];
        let plan = probe_then_next(a, route).await;
        let started = Instant::now();
        let mut attempts = attempts_on(&live, plan, |i| {
            let t = &route.targets[i];
            let (model, failure) = (t.model.clone(), broke(t));
            async move {
                if model == "x" {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Err(failure)
                } else {
                    Err::<String, _>(failure)
                }
            }
        });
        assert!(attempts.launch());
        let hedge = attempts.next().await.unwrap();
        assert_eq!(hedge.index, 1);
        attempts.failed(hedge.index, hedge.probe, hedge.result.unwrap_err());
        assert!(
            attempts.next().await.is_none(),
            "the probe is not waited for"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        let (end, _, launched) = attempts.finish();
        assert!(matches!(end, Exhausted::Failed(Some((1, _)))));
        assert_eq!(launched, 2);
        assert_eq!(a.state(), crate::health::BreakerState::HalfOpen);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let snap = a.snapshot(&route.breaker);
        assert_eq!(a.state(), crate::health::BreakerState::Open, "{snap:?}");
        assert_eq!((snap.consecutive_failures, snap.background), (2, 0));
    }
}
