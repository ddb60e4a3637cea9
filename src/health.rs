//! Health of each target, fed by real traffic.
//!
//! Per target (provider + upstream model):
//! - a **circuit breaker** (closed → open → half-open → closed), opened by
//!   consecutive failures or by the failure rate over a sliding window, as in
//!   Hystrix and resilience4j; after `open_for` one probe request is let through
//!   (half-open), and only its outcome closes or re-opens the breaker: a
//!   request sent before the breaker opened that ends late says nothing about now;
//! - a **cool-down** from the provider's `retry-after` on 429/503/529;
//! - **latency**, kept apart for the two kinds of traffic ([`Traffic`]): the time
//!   to the first event of streamed answers, and the time to the answer of
//!   non-streamed ones (the whole generation). Each is an EWMA with a mean
//!   deviation, for a p95 estimate (hedging) and to demote a target that has
//!   become much slower than its peers;
//! - **slow start** after recovery: the share of traffic offered to a target that
//!   just closed its breaker ramps linearly over a window, as Envoy's slow start
//!   does, instead of jumping back to full load;
//! - **when an answer counts**: its latency when it is answered
//!   ([`TargetHealth::on_answered`]), its success for the breaker when it ended
//!   whole ([`TargetHealth::on_whole`]; at once for a whole answer, at the end
//!   for a stream), so that a stream which breaks off after its first event
//!   counts once, as a failure;
//! - **background attempts**: a probe (or other attempt on a target of unknown
//!   health) whose client was answered by another target may go on to tell the
//!   breaker how it ends; [`TargetHealth::try_background`] bounds them per target;
//! - a **misconfigured** mark when the provider rejects detour's own credentials;
//! - an **adaptive concurrency limit** (AIMD, as TCP congestion control and
//!   Netflix's concurrency-limits do): attempts waiting for a first byte are
//!   capped. The cap starts out of the way; an overload signal (429/503/529,
//!   a timeout, or a first byte more than twice the usual) sets it to 70% of
//!   what was in flight, and each success raises it by 1/cap. A target at its
//!   cap goes behind its peers (see `routing`), so a provider that slows down
//!   under load spills traffic to them instead of queueing it; alone, it still
//!   serves.
//!
//! Per provider, a manual **override** (`down` / `up` / `auto`) from the admin API.
//!
//! The breaker's policy is not kept here: the caller passes the policy of the
//! route in its config snapshot, so a reload that changes `breaker` takes
//! effect on the next request, and a canary config is judged by its own
//! policy. The state is kept per route and target (see [`Registry::target`]),
//! so two routes that share a target do not trip each other's breaker.
//!
//! Everything is atomics: the request path never takes a lock. Races between
//! concurrent updates can lose an increment; the breaker only needs to be
//! approximately right, and never blocks a request to be exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::config::BreakerPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// A breaker's change of state. Health only returns it: the caller reports
/// it (the metric, the incident log, the log line), so that policy state
/// stays free of reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed (or half-open, on a failed probe) → open.
    Opened,
    /// Open → half-open: this request holds the probe slot.
    HalfOpened,
    /// Half-open → closed: the probe succeeded, the target recovered.
    Closed,
}

impl Transition {
    /// The state moved to, as the metric's `to` label says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opened => "open",
            Self::HalfOpened => "half_open",
            Self::Closed => "closed",
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Buckets in the sliding failure-rate window.
const BUCKETS: usize = 10;

/// What routing may do with a target now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Status {
    /// Send traffic; the share is below 1.0 during slow start.
    Available(f64),
    /// The breaker is open but its wait is over: one request may probe.
    Probe,
    /// Open breaker, cool-down, misconfigured or overridden down.
    Skip,
}

/// The two kinds of traffic whose latencies are kept apart: the first event
/// of a stream comes long before a whole non-streamed answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// Time to the first event of a streamed answer.
    Streamed,
    /// Time to the answer of a non-streamed request: the whole generation.
    Whole,
}

impl Traffic {
    pub fn of(stream: bool) -> Self {
        if stream {
            Self::Streamed
        } else {
            Self::Whole
        }
    }
}

/// An EWMA of a latency with an EWMA of the mean deviation from it, as TCP
/// estimates its round-trip time (RFC 6298), in microseconds; 0 = no sample.
#[derive(Debug, Default)]
struct Estimate {
    mean_us: AtomicU64,
    dev_us: AtomicU64,
}

impl Estimate {
    fn observe(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.mean_us.load(Relaxed);
        let (new, dev) = if old == 0 {
            (sample, sample / 2)
        } else {
            let dev = self.dev_us.load(Relaxed) as f64;
            let diff = (sample as f64 - old as f64).abs();
            (
                (EWMA_ALPHA * sample as f64 + (1.0 - EWMA_ALPHA) * old as f64) as u64,
                (EWMA_ALPHA * diff + (1.0 - EWMA_ALPHA) * dev) as u64,
            )
        };
        self.mean_us.store(new.max(1), Relaxed);
        self.dev_us.store(dev, Relaxed);
    }

    fn mean(&self) -> Option<Duration> {
        match self.mean_us.load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Mean plus two mean deviations: roughly the 95th percentile, without
    /// keeping a histogram.
    fn p95(&self) -> Option<Duration> {
        let mean = self.mean()?;
        Some(mean + Duration::from_micros(2 * self.dev_us.load(Relaxed)))
    }

    fn snapshot(&self) -> EstimateSnapshot {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        EstimateSnapshot {
            ewma_ms: self.mean().map(ms),
            p95_ms: self.p95().map(ms),
        }
    }
}

/// Why an attempt failed, as health sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Errors, timeouts, resets, 5xx: counts towards the breaker.
    Fault,
    /// 429 / overloaded with a cool-down.
    Throttled { cool_down: Duration },
    /// The provider refused detour's credentials.
    Credentials,
    /// The provider does not have the target's model.
    ModelNotFound,
}

#[derive(Debug)]
pub struct TargetHealth {
    /// The target's names, shared with the request records of the requests
    /// it answers (an `Arc`, not a copy per request).
    pub provider: Arc<str>,
    pub model: Arc<str>,
    clock: Clock,
    state: AtomicU8,
    consecutive: AtomicU32,
    opened_at: AtomicU64,
    closed_at: AtomicU64,
    probe_in_flight: AtomicU8,
    cool_down_until: AtomicU64,
    misconfigured_until: AtomicU64,
    /// Latency of streamed answers (first event) and of whole ones.
    streamed: Estimate,
    whole: Estimate,
    last_sample_ms: AtomicU64,
    /// Attempts waiting for their first byte, and the adaptive cap on them
    /// (as f64 bits).
    in_flight: AtomicU32,
    /// Attempts going on in the background after their client was answered
    /// by another target (see [`TargetHealth::try_background`]).
    background: AtomicU32,
    concurrency_limit: AtomicU64,
    /// When a request was last sent here to explore (see `routing`).
    explored_ms: AtomicU64,
    /// EWMA (as f64 bits) of how often this target lost a hedge race.
    lost_races: AtomicU64,
    buckets: [Bucket; BUCKETS],
    transitions: AtomicU64,
    /// The `open_for` of the policy the breaker last opened under, so that
    /// other replicas can be told how long it stays open.
    open_for_ms: AtomicU64,
    /// What this replica's own traffic changed and other replicas have not
    /// been told yet ([`TargetHealth::take_to_share`]): `SHARE_*` bits.
    to_share: AtomicU8,
}

/// Bits of [`TargetHealth::to_share`].
const SHARE_BREAKER: u8 = 1;
const SHARE_COOL_DOWN: u8 = 2;
const SHARE_MISCONFIGURED: u8 = 4;

#[derive(Debug, Default)]
struct Bucket {
    /// When (clock ms) the slot the counts belong to began. A time, not a
    /// slot number, so that counts stay comparable when a reload changes
    /// the window (and with it the bucket width).
    start_ms: AtomicU64,
    ok: AtomicU32,
    failed: AtomicU32,
}

/// A cooled-down or misconfigured target is skipped this long at most when
/// the provider gave no `retry-after`.
const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(1);
const MISCONFIGURED_FOR: Duration = Duration::from_secs(30);
/// The adaptive concurrency cap starts here and stays within these bounds.
const INITIAL_CONCURRENCY: f64 = MAX_CONCURRENCY;
const MIN_CONCURRENCY: f64 = 2.0;
const MAX_CONCURRENCY: f64 = 4096.0;
/// EWMA weight of a new sample.
const EWMA_ALPHA: f64 = 0.2;

impl TargetHealth {
    pub fn new(provider: &str, model: &str, clock: Clock) -> Self {
        Self {
            provider: provider.into(),
            model: model.into(),
            clock,
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            // No slow start for a target that was never unhealthy.
            closed_at: AtomicU64::new(0),
            probe_in_flight: AtomicU8::new(0),
            cool_down_until: AtomicU64::new(0),
            misconfigured_until: AtomicU64::new(0),
            streamed: Estimate::default(),
            whole: Estimate::default(),
            last_sample_ms: AtomicU64::new(0),
            lost_races: AtomicU64::new(0f64.to_bits()),
            explored_ms: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            background: AtomicU32::new(0),
            concurrency_limit: AtomicU64::new(INITIAL_CONCURRENCY.to_bits()),
            buckets: Default::default(),
            transitions: AtomicU64::new(0),
            open_for_ms: AtomicU64::new(0),
            to_share: AtomicU8::new(0),
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.state.load(Relaxed) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Whether a request may be sent now; reads only. A [`Status::Probe`]
    /// must be claimed with [`Self::claim_probe`] right before the attempt.
    pub fn status(&self, policy: &BreakerPolicy) -> Status {
        let now = self.clock.now_ms();
        if now < self.cool_down_until.load(Relaxed) || now < self.misconfigured_until.load(Relaxed)
        {
            return Status::Skip;
        }
        match self.state.load(Relaxed) {
            CLOSED => Status::Available(self.slow_start_share(policy, now)),
            OPEN if now.saturating_sub(self.opened_at.load(Relaxed)) >= ms(policy.open_for) => {
                Status::Probe
            }
            _ => Status::Skip,
        }
    }

    /// Takes the single half-open probe slot: [`Transition::HalfOpened`]
    /// for the request that gets it, `None` if another request has it.
    #[must_use = "the caller reports the transition"]
    pub fn claim_probe(&self) -> Option<Transition> {
        let won = self
            .state
            .compare_exchange(OPEN, HALF_OPEN, Relaxed, Relaxed)
            .is_ok();
        if !won {
            return None;
        }
        self.probe_in_flight.store(1, Relaxed);
        self.transitions.fetch_add(1, Relaxed);
        Some(Transition::HalfOpened)
    }

    fn slow_start_share(&self, policy: &BreakerPolicy, now: u64) -> f64 {
        let window = ms(policy.slow_start);
        let closed_at = self.closed_at.load(Relaxed);
        if window == 0 || closed_at == 0 {
            return 1.0;
        }
        let since = now.saturating_sub(closed_at);
        if since >= window {
            return 1.0;
        }
        // Start at 10% so the recovered target gets some traffic at once.
        (0.1 + 0.9 * since as f64 / window as f64).min(1.0)
    }

    /// An attempt succeeded after `took` (to its first event for
    /// [`Traffic::Streamed`], to its answer for [`Traffic::Whole`]). `probe`:
    /// it held the half-open breaker's probe slot. Returns
    /// [`Transition::Closed`] when the probe's success closed the breaker.
    ///
    /// The same as [`Self::on_answered`] followed by [`Self::on_whole`]: for
    /// an answer that is whole once it is answered.
    #[must_use = "the caller reports the transition"]
    pub fn on_success(
        &self,
        policy: &BreakerPolicy,
        probe: bool,
        traffic: Traffic,
        took: Duration,
    ) -> Option<Transition> {
        self.on_answered(traffic, took);
        self.on_whole(policy, probe)
    }

    /// An attempt got its answer after `took` (its first event, for
    /// [`Traffic::Streamed`]): the latency estimate and the adaptive cap
    /// learn from it. The breaker does not: an event stream counts as a
    /// success only once it ended whole ([`Self::on_whole`]), or as a
    /// failure if it broke off ([`Self::on_failure`]).
    pub fn on_answered(&self, traffic: Traffic, took: Duration) {
        // Much slower than usual is the first sign of an overloaded provider.
        match self.ttfb_ewma(traffic) {
            Some(usual) if took > 2 * usual && took > Duration::from_millis(20) => {
                self.decrease_limit()
            }
            _ => self.increase_limit(),
        }
        self.update_lost_races(0.0);
        self.observe_ttfb(traffic, took);
    }

    /// An answer ended whole: a success for the breaker. `probe`: it held
    /// the half-open breaker's probe slot. Returns [`Transition::Closed`]
    /// when the probe's success closed the breaker.
    #[must_use = "the caller reports the transition"]
    pub fn on_whole(&self, policy: &BreakerPolicy, probe: bool) -> Option<Transition> {
        let now = self.clock.now_ms();
        self.consecutive.store(0, Relaxed);
        self.bucket(policy, now).ok.fetch_add(1, Relaxed);
        // Only the probe closes the breaker: a success from a request sent
        // before the breaker opened says nothing about now.
        if probe && self.state.load(Relaxed) == HALF_OPEN {
            return self.close(now);
        }
        None
    }

    /// An attempt that no client waits for any more (it lost a hedge race to
    /// a healthy target) asks to go on in the background, to tell this
    /// target's health how it ends. A half-open breaker's probe always may
    /// (there is one per target at a time); any other attempt only while no
    /// other one goes on here in the background, so that a target which
    /// hangs holds at most two. True: call [`Self::end_background`] when it
    /// ends.
    pub fn try_background(&self, probe: bool) -> bool {
        if probe {
            self.background.fetch_add(1, Relaxed);
            return true;
        }
        self.background
            .fetch_update(Relaxed, Relaxed, |n| (n == 0).then_some(1))
            .is_ok()
    }

    /// An attempt let go on by [`Self::try_background`] ended.
    pub fn end_background(&self) {
        let _ = self
            .background
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }

    /// An attempt failed. `probe`: it held the half-open breaker's probe
    /// slot; only then does the failure re-open a half-open breaker.
    /// Returns [`Transition::Opened`] when this failure opened the breaker.
    #[must_use = "the caller reports the transition"]
    pub fn on_failure(
        &self,
        failure: Failure,
        policy: &BreakerPolicy,
        probe: bool,
    ) -> Option<Transition> {
        let now = self.clock.now_ms();
        self.decrease_limit();
        match failure {
            Failure::Throttled { cool_down } => {
                let d = if cool_down.is_zero() {
                    DEFAULT_COOL_DOWN
                } else {
                    cool_down.min(policy.max_cool_down)
                };
                self.cool_down_until.store(now + ms(d), Relaxed);
                self.to_share.fetch_or(SHARE_COOL_DOWN, Relaxed);
                tracing::info!(provider = %self.provider, model = %self.model, cool_down_ms = ms(d), "target cooling down");
                if probe && self.state.load(Relaxed) == HALF_OPEN {
                    return self.open(now, policy);
                }
                return None;
            }
            Failure::Credentials => {
                self.misconfigured_until
                    .store(now + ms(MISCONFIGURED_FOR), Relaxed);
                self.to_share.fetch_or(SHARE_MISCONFIGURED, Relaxed);
                tracing::error!(
                    provider = %self.provider,
                    "provider rejected detour's credentials: check this provider's api_key"
                );
            }
            Failure::ModelNotFound => {
                self.misconfigured_until
                    .store(now + ms(MISCONFIGURED_FOR), Relaxed);
                self.to_share.fetch_or(SHARE_MISCONFIGURED, Relaxed);
                tracing::error!(
                    provider = %self.provider,
                    model = %self.model,
                    "provider does not serve this model: check the route's target"
                );
            }
            Failure::Fault => {}
        }
        let consecutive = self.consecutive.fetch_add(1, Relaxed) + 1;
        self.bucket(policy, now).failed.fetch_add(1, Relaxed);
        match self.state.load(Relaxed) {
            HALF_OPEN if probe => self.open(now, policy),
            CLOSED => {
                let (ok, failed) = self.window(policy, now);
                let total = ok + failed;
                let rate_trips = total >= policy.min_requests
                    && f64::from(failed) >= policy.failure_rate * f64::from(total);
                if consecutive >= policy.consecutive_failures || rate_trips {
                    self.open(now, policy)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// The probe ended without telling anything about the target (the client
    /// left, another hedge won, or the caller's own request was refused):
    /// releases the probe slot. Call it for the probe's attempt only.
    pub fn on_abandoned(&self) {
        if self.state.load(Relaxed) == HALF_OPEN && self.probe_in_flight.swap(0, Relaxed) == 1 {
            let _ = self
                .state
                .compare_exchange(HALF_OPEN, OPEN, Relaxed, Relaxed);
        }
    }

    pub fn is_misconfigured(&self) -> bool {
        self.clock.now_ms() < self.misconfigured_until.load(Relaxed)
    }

    fn estimate(&self, traffic: Traffic) -> &Estimate {
        match traffic {
            Traffic::Streamed => &self.streamed,
            Traffic::Whole => &self.whole,
        }
    }

    /// The usual latency of `traffic` here; `None` before its first sample.
    pub fn ttfb_ewma(&self, traffic: Traffic) -> Option<Duration> {
        self.estimate(traffic).mean()
    }

    pub fn transitions(&self) -> u64 {
        self.transitions.load(Relaxed)
    }

    /// Records a latency of `traffic`. Also fed by attempts that lost a
    /// hedge race, with the time they had taken so far: a lower bound, but
    /// enough to show that the target has become slow.
    pub fn observe_ttfb(&self, traffic: Traffic, took: Duration) {
        self.estimate(traffic).observe(took);
        self.last_sample_ms
            .store(self.clock.now_ms().max(1), Relaxed);
    }

    /// The attempt was cancelled because another target answered first; it
    /// had waited `elapsed` without an answer.
    pub fn on_race_lost(&self, traffic: Traffic, elapsed: Duration) {
        self.observe_ttfb(traffic, elapsed);
        self.update_lost_races(1.0);
    }

    /// How often, recently, this target lost hedge races (0.0–1.0).
    pub fn lost_race_share(&self) -> f64 {
        f64::from_bits(self.lost_races.load(Relaxed))
    }

    fn update_lost_races(&self, sample: f64) {
        let old = f64::from_bits(self.lost_races.load(Relaxed));
        let new = EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * old;
        self.lost_races.store(new.to_bits(), Relaxed);
    }

    /// For a demoted target: lets one request through per `open_for`, so
    /// that its recovery is noticed. True for the request that gets it.
    pub fn claim_latency_probe(&self, policy: &BreakerPolicy) -> bool {
        let now = self.clock.now_ms();
        let last = self.last_sample_ms.load(Relaxed);
        now.saturating_sub(last) >= ms(policy.open_for)
            && self
                .last_sample_ms
                .compare_exchange(last, now.max(1), Relaxed, Relaxed)
                .is_ok()
    }

    /// The adaptive cap on attempts waiting for a first byte.
    pub fn concurrency_limit(&self) -> f64 {
        f64::from_bits(self.concurrency_limit.load(Relaxed))
    }

    fn increase_limit(&self) {
        let _ = self
            .concurrency_limit
            .fetch_update(Relaxed, Relaxed, |bits| {
                let l = f64::from_bits(bits);
                Some((l + 1.0 / l).min(MAX_CONCURRENCY).to_bits())
            });
    }

    fn decrease_limit(&self) {
        // Relative to what was really in flight, so a cap that was never
        // reached still comes down to where the provider choked.
        let in_flight = f64::from(self.in_flight.load(Relaxed).max(1));
        let _ = self
            .concurrency_limit
            .fetch_update(Relaxed, Relaxed, |bits| {
                let cap = f64::from_bits(bits).min(in_flight);
                Some((cap * 0.7).max(MIN_CONCURRENCY).to_bits())
            });
    }

    /// Whether the attempts waiting here have reached the adaptive cap.
    pub fn saturated(&self) -> bool {
        f64::from(self.in_flight.load(Relaxed)) >= self.concurrency_limit()
    }

    /// An attempt starts waiting for its first byte; the guard ends it.
    pub fn start_attempt(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self)
    }

    /// For a target with no latency sample while its preferred peer is slow:
    /// true for one request per `every`.
    pub fn claim_exploration(&self, every: Duration) -> bool {
        let now = self.clock.now_ms().max(1);
        let last = self.explored_ms.load(Relaxed);
        (last == 0 || now.saturating_sub(last) >= ms(every))
            && self
                .explored_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }

    /// An estimate of the 95th percentile of the latency of `traffic`: mean
    /// plus two mean deviations, the way TCP estimates its retransmission
    /// timeout (RFC 6298) without keeping a histogram. `None` before the
    /// first sample: no estimate, rather than a guess.
    pub fn ttfb_p95(&self, traffic: Traffic) -> Option<Duration> {
        self.estimate(traffic).p95()
    }

    fn open(&self, now: u64, policy: &BreakerPolicy) -> Option<Transition> {
        self.opened_at.store(now, Relaxed);
        self.open_for_ms.store(ms(policy.open_for), Relaxed);
        self.probe_in_flight.store(0, Relaxed);
        self.to_share.fetch_or(SHARE_BREAKER, Relaxed);
        if self.state.swap(OPEN, Relaxed) == OPEN {
            return None;
        }
        self.transitions.fetch_add(1, Relaxed);
        Some(Transition::Opened)
    }

    fn close(&self, now: u64) -> Option<Transition> {
        self.probe_in_flight.store(0, Relaxed);
        if self.state.swap(CLOSED, Relaxed) == CLOSED {
            return None;
        }
        self.to_share.fetch_or(SHARE_BREAKER, Relaxed);
        self.closed_at.store(now.max(1), Relaxed);
        self.transitions.fetch_add(1, Relaxed);
        self.clear_window();
        Some(Transition::Closed)
    }

    fn bucket(&self, policy: &BreakerPolicy, now: u64) -> &Bucket {
        let width = bucket_width(policy);
        let slot = now / width;
        let start = slot * width;
        let b = &self.buckets[(slot % BUCKETS as u64) as usize];
        let seen = b.start_ms.load(Relaxed);
        if seen != start
            && b.start_ms
                .compare_exchange(seen, start, Relaxed, Relaxed)
                .is_ok()
        {
            b.ok.store(0, Relaxed);
            b.failed.store(0, Relaxed);
        }
        b
    }

    /// Successes and failures in the sliding window.
    fn window(&self, policy: &BreakerPolicy, now: u64) -> (u32, u32) {
        let width = bucket_width(policy);
        let current = now / width * width;
        let span = width.saturating_mul(BUCKETS as u64);
        self.buckets
            .iter()
            .filter(|b| current.saturating_sub(b.start_ms.load(Relaxed)) < span)
            .fold((0, 0), |(ok, failed), b| {
                (ok + b.ok.load(Relaxed), failed + b.failed.load(Relaxed))
            })
    }

    fn clear_window(&self) {
        for b in &self.buckets {
            b.ok.store(0, Relaxed);
            b.failed.store(0, Relaxed);
        }
    }

    /// What this replica's own traffic changed since the last call, for
    /// the other replicas (`health_sync`): the breaker's state if it opened
    /// or closed, the cool-down and the misconfigured mark if they were set,
    /// each as it is now. Changes applied from other replicas
    /// ([`Self::apply`]) are never returned, so nothing echoes back.
    pub fn take_to_share(&self) -> Vec<Change> {
        let bits = self.to_share.swap(0, Relaxed);
        if bits == 0 {
            return Vec::new();
        }
        let now = self.clock.now_ms();
        let mut changes = Vec::with_capacity(3);
        if bits & SHARE_BREAKER != 0 {
            changes.push(match self.state.load(Relaxed) {
                CLOSED => Change::Closed,
                _ => Change::Opened {
                    age: Duration::from_millis(now.saturating_sub(self.opened_at.load(Relaxed))),
                    open_for: Duration::from_millis(self.open_for_ms.load(Relaxed)),
                },
            });
        }
        let remaining =
            |until: &AtomicU64| Duration::from_millis(until.load(Relaxed).saturating_sub(now));
        if bits & SHARE_COOL_DOWN != 0 {
            let remaining = remaining(&self.cool_down_until);
            if !remaining.is_zero() {
                changes.push(Change::CoolDown { remaining });
            }
        }
        if bits & SHARE_MISCONFIGURED != 0 {
            let remaining = remaining(&self.misconfigured_until);
            if !remaining.is_zero() {
                changes.push(Change::Misconfigured { remaining });
            }
        }
        changes
    }

    /// Puts `changes` (from [`Self::take_to_share`]) back, when telling the
    /// other replicas failed: they go with the next try.
    pub fn share_again(&self, changes: &[Change]) {
        for c in changes {
            let bit = match c {
                Change::Opened { .. } | Change::Closed => SHARE_BREAKER,
                Change::CoolDown { .. } => SHARE_COOL_DOWN,
                Change::Misconfigured { .. } => SHARE_MISCONFIGURED,
            };
            self.to_share.fetch_or(bit, Relaxed);
        }
    }

    /// Applies what another replica's traffic found, without counting it as
    /// this replica's own failure or success and without sharing it again:
    /// - `Opened`: a closed breaker opens as if it had opened `age` ago (it
    ///   probes once this replica's `open_for` has passed since); an open
    ///   one restarts its wait if the other opened later; a half-open one
    ///   leaves the decision to its probe;
    /// - `Closed`: another replica's probe succeeded: an open or half-open
    ///   breaker closes (slow start follows);
    /// - `CoolDown`, `Misconfigured`: held at least `remaining` from now.
    ///
    /// Returns the breaker's transition, for the caller to report.
    #[must_use = "the caller reports the transition"]
    pub fn apply(&self, change: Change) -> Option<Transition> {
        let now = self.clock.now_ms();
        match change {
            Change::Opened { age, open_for } => {
                let opened_at = now.saturating_sub(ms(age));
                match self.state.load(Relaxed) {
                    HALF_OPEN => None,
                    OPEN => {
                        self.opened_at.fetch_max(opened_at, Relaxed);
                        None
                    }
                    _ => {
                        self.opened_at.store(opened_at, Relaxed);
                        self.open_for_ms.store(ms(open_for), Relaxed);
                        self.probe_in_flight.store(0, Relaxed);
                        let won = self
                            .state
                            .compare_exchange(CLOSED, OPEN, Relaxed, Relaxed)
                            .is_ok();
                        won.then(|| {
                            self.transitions.fetch_add(1, Relaxed);
                            Transition::Opened
                        })
                    }
                }
            }
            Change::Closed => {
                if self.state.load(Relaxed) == CLOSED {
                    return None;
                }
                self.probe_in_flight.store(0, Relaxed);
                if self.state.swap(CLOSED, Relaxed) == CLOSED {
                    return None;
                }
                self.closed_at.store(now.max(1), Relaxed);
                self.consecutive.store(0, Relaxed);
                self.clear_window();
                self.transitions.fetch_add(1, Relaxed);
                Some(Transition::Closed)
            }
            Change::CoolDown { remaining } => {
                self.cool_down_until.fetch_max(now + ms(remaining), Relaxed);
                None
            }
            Change::Misconfigured { remaining } => {
                self.misconfigured_until
                    .fetch_max(now + ms(remaining), Relaxed);
                None
            }
        }
    }

    pub fn snapshot(&self, policy: &BreakerPolicy) -> TargetSnapshot {
        let now = self.clock.now_ms();
        let (ok, failed) = self.window(policy, now);
        TargetSnapshot {
            provider: self.provider.to_string(),
            model: self.model.to_string(),
            breaker: self.state(),
            consecutive_failures: self.consecutive.load(Relaxed),
            window_ok: ok,
            window_failed: failed,
            cooling_down_ms: self.cool_down_until.load(Relaxed).saturating_sub(now),
            misconfigured: self.is_misconfigured(),
            latency: LatencySnapshot {
                streamed: self.streamed.snapshot(),
                whole: self.whole.snapshot(),
            },
            slow_start_share: self.slow_start_share(policy, now),
            lost_race_share: self.lost_race_share(),
            in_flight: self.in_flight.load(Relaxed),
            background: self.background.load(Relaxed),
            concurrency_limit: self.concurrency_limit(),
            breaker_transitions: self.transitions(),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn bucket_width(policy: &BreakerPolicy) -> u64 {
    (ms(policy.window) / BUCKETS as u64).max(1)
}

/// A change of a target's health that other replicas apply: what
/// [`TargetHealth::take_to_share`] returns and [`TargetHealth::apply`]
/// takes. Times are durations from now, never clock readings: replicas'
/// clocks do not agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The breaker opened `age` ago, under a policy that keeps it open for
    /// `open_for` before a probe.
    Opened { age: Duration, open_for: Duration },
    /// A probe closed the breaker.
    Closed,
    /// Cooling down (`retry-after`) for `remaining`.
    CoolDown { remaining: Duration },
    /// Marked misconfigured for `remaining`.
    Misconfigured { remaining: Duration },
}

/// An attempt waiting for its first byte (see [`TargetHealth::start_attempt`]).
#[derive(Debug)]
pub struct InFlight<'a>(&'a TargetHealth);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetSnapshot {
    pub provider: String,
    pub model: String,
    pub breaker: BreakerState,
    pub consecutive_failures: u32,
    pub window_ok: u32,
    pub window_failed: u32,
    pub cooling_down_ms: u64,
    pub misconfigured: bool,
    pub latency: LatencySnapshot,
    pub slow_start_share: f64,
    pub lost_race_share: f64,
    pub breaker_transitions: u64,
    pub in_flight: u32,
    /// Attempts going on in the background (probes no client waits for).
    pub background: u32,
    pub concurrency_limit: f64,
}

/// Both latency estimates of a target.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySnapshot {
    /// Time to the first event of streamed answers.
    pub streamed: EstimateSnapshot,
    /// Time to the answer of non-streamed requests.
    pub whole: EstimateSnapshot,
}

/// One latency estimate; `null` before its first sample.
#[derive(Debug, Clone, Serialize)]
pub struct EstimateSnapshot {
    pub ewma_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

/// A manual override of a provider's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Override {
    Auto,
    Up,
    Down,
}

/// What a provider's status page says, as routing uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageState {
    /// No status page, or not read yet.
    Unknown,
    Operational,
    Degraded,
    Down,
}

impl PageState {
    /// 0 unknown, 1 operational, 2 degraded, 3 down: worse is higher (as
    /// stored, and as the `detour_status_page_state` gauge shows it).
    pub fn level(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Operational => 1,
            Self::Degraded => 2,
            Self::Down => 3,
        }
    }
}

/// Per-provider state: the manual override and the status page.
#[derive(Debug, Default)]
pub struct ProviderHealth {
    over: AtomicU8,
    /// The page's state as routing uses it: this replica's own last reading,
    /// or another replica's newer one.
    page: AtomicU8,
    /// This replica's own last reading of the page.
    own_page: AtomicU8,
    /// The last status-page problem (cold path: written by the poller only).
    page_error: RwLock<Option<String>>,
    /// The last known state of each watched part of the page (a component,
    /// or `""` for the whole page), so that a push about one part is
    /// combined with what the last poll said of the others (cold path).
    page_parts: RwLock<BTreeMap<String, PageState>>,
    /// What changed here and other replicas have not been told yet
    /// ([`ProviderHealth::take_to_share`]): `SHARE_*` bits.
    to_share: AtomicU8,
}

/// Bits of [`ProviderHealth::to_share`].
const SHARE_OVERRIDE: u8 = 1;
const SHARE_PAGE: u8 = 2;

/// A change of a provider's health that other replicas apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChange {
    /// An operator set the override.
    Override(Override),
    /// This replica's reading of the status page changed.
    Page(PageState),
}

impl ProviderHealth {
    pub fn get(&self) -> Override {
        match self.over.load(Relaxed) {
            1 => Override::Up,
            2 => Override::Down,
            _ => Override::Auto,
        }
    }

    /// An operator's override on this replica (shared with the others).
    pub fn set(&self, o: Override) {
        self.store_override(o);
        self.to_share.fetch_or(SHARE_OVERRIDE, Relaxed);
    }

    fn store_override(&self, o: Override) {
        self.over.store(
            match o {
                Override::Auto => 0,
                Override::Up => 1,
                Override::Down => 2,
            },
            Relaxed,
        );
    }

    pub fn page_state(&self) -> PageState {
        page_of(self.page.load(Relaxed))
    }

    /// This replica's own reading of the page. With `error`, the page could
    /// not be read: the state passed in is kept as it was, and the reading
    /// is not a new one.
    pub fn set_page(&self, state: PageState, error: Option<String>) {
        if error.is_none() && self.own_page.swap(state.level(), Relaxed) != state.level() {
            self.to_share.fetch_or(SHARE_PAGE, Relaxed);
        }
        self.page.store(state.level(), Relaxed);
        *self.page_error.write().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Takes a reading of the page's watched parts and returns the state
    /// they add up to (the worst of them). A `whole` reading (a poll) says
    /// everything and replaces what was known; a partial one (a push)
    /// updates only the parts it names. The caller then sets the state
    /// ([`Self::set_page`]).
    pub fn read_page_parts(&self, parts: &[(String, PageState)], whole: bool) -> PageState {
        let mut known = self.page_parts.write().unwrap_or_else(|e| e.into_inner());
        if whole {
            known.clear();
        }
        for (name, state) in parts {
            known.insert(name.clone(), *state);
        }
        known.values().copied().max().unwrap_or(PageState::Unknown)
    }

    pub fn page_error(&self) -> Option<String> {
        self.page_error
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What an operator or this replica's poller changed since the last
    /// call, for the other replicas; changes applied from them
    /// ([`Self::apply`]) are never returned.
    pub fn take_to_share(&self) -> Vec<ProviderChange> {
        let bits = self.to_share.swap(0, Relaxed);
        let mut changes = Vec::new();
        if bits & SHARE_OVERRIDE != 0 {
            changes.push(ProviderChange::Override(self.get()));
        }
        if bits & SHARE_PAGE != 0 {
            changes.push(ProviderChange::Page(page_of(self.own_page.load(Relaxed))));
        }
        changes
    }

    /// Puts `changes` back when telling the other replicas failed.
    pub fn share_again(&self, changes: &[ProviderChange]) {
        for c in changes {
            let bit = match c {
                ProviderChange::Override(_) => SHARE_OVERRIDE,
                ProviderChange::Page(_) => SHARE_PAGE,
            };
            self.to_share.fetch_or(bit, Relaxed);
        }
    }

    /// Applies another replica's change without sharing it again. A page
    /// state holds until this replica's own poller reads the page again and
    /// finds something else.
    pub fn apply(&self, change: ProviderChange) {
        match change {
            ProviderChange::Override(o) => self.store_override(o),
            ProviderChange::Page(p) => self.page.store(p.level(), Relaxed),
        }
    }
}

fn page_of(level: u8) -> PageState {
    match level {
        1 => PageState::Operational,
        2 => PageState::Degraded,
        3 => PageState::Down,
        _ => PageState::Unknown,
    }
}

/// A target as every replica names it: route alias, provider name, model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetId {
    pub route: String,
    pub provider: String,
    pub model: String,
}

/// What a target's health is kept under (see [`Registry::target`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TargetKey {
    route: String,
    provider: String,
    base_url: String,
    model: String,
}

impl TargetKey {
    fn id(&self) -> TargetId {
        TargetId {
            route: self.route.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
        }
    }
}

/// Health state that outlives config reloads, looked up when a config is
/// built so that the request path holds direct references.
///
/// The gateway keeps one for its stable config; a canary gets a
/// [`Registry::fork`], so that what goes wrong with a candidate config (a
/// wrong key, a wrong model) never takes a target away from stable traffic.
#[derive(Debug, Default)]
pub struct Registry {
    clock: Clock,
    // Only touched when a config is built, never on the request path.
    targets: RwLock<HashMap<TargetKey, Arc<TargetHealth>>>,
    providers: RwLock<HashMap<String, Arc<ProviderHealth>>>,
}

impl Registry {
    /// The health of a route's target, the same across configs as long as
    /// the route's alias and the target's provider name, address and model
    /// stay the same.
    ///
    /// Keyed by route too: each route judges a target by its own `breaker`
    /// policy, so a route that tolerates failures is not shut out of a
    /// target by a stricter route's breaker (as Envoy keeps outlier
    /// detection per cluster). The price: each route learns on its own that
    /// a shared target is down.
    pub fn target(
        &self,
        route: &str,
        provider: &str,
        base_url: &str,
        model: &str,
    ) -> Arc<TargetHealth> {
        let key = TargetKey {
            route: route.to_owned(),
            provider: provider.to_owned(),
            base_url: base_url.to_owned(),
            model: model.to_owned(),
        };
        let mut map = self.targets.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry(key)
                .or_insert_with(|| Arc::new(TargetHealth::new(provider, model, self.clock))),
        )
    }

    pub fn provider(&self, name: &str) -> Arc<ProviderHealth> {
        let mut map = self.providers.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(name.to_owned()).or_default())
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The targets whose own traffic changed something since the last
    /// call, with what changed ([`TargetHealth::take_to_share`]): cold
    /// path, `health_sync` calls it a few times a second; a target that
    /// changed nothing costs one atomic swap.
    pub fn take_to_share(&self) -> Vec<(TargetId, Arc<TargetHealth>, Vec<Change>)> {
        let map = self.targets.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter_map(|(k, h)| {
                let changes = h.take_to_share();
                (!changes.is_empty()).then(|| (k.id(), Arc::clone(h), changes))
            })
            .collect()
    }

    /// Every target's health with its name as replicas share it (cold
    /// path: `health_sync` reads what other replicas keep for them).
    pub fn targets(&self) -> Vec<(TargetId, Arc<TargetHealth>)> {
        let map = self.targets.read().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, h)| (k.id(), Arc::clone(h))).collect()
    }

    /// The health of target `id` (whatever its `base_url`): where a change
    /// learned from another replica applies. Empty when no config here
    /// has that target.
    pub fn matching(&self, id: &TargetId) -> Vec<Arc<TargetHealth>> {
        let map = self.targets.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|(k, _)| {
                k.route == id.route && k.provider == id.provider && k.model == id.model
            })
            .map(|(_, h)| Arc::clone(h))
            .collect()
    }

    /// Every provider's health, by name (cold path).
    pub fn providers(&self) -> Vec<(String, Arc<ProviderHealth>)> {
        let map = self.providers.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(n, h)| (n.clone(), Arc::clone(h)))
            .collect()
    }

    /// The health a canary config runs on: its targets start afresh and
    /// keep their own breakers, cool-downs and misconfigured marks, while a
    /// provider's override and status-page state (facts about the provider,
    /// not about a config) are shared with this registry.
    pub fn fork(&self) -> Self {
        let providers = self
            .providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Self {
            clock: self.clock,
            targets: RwLock::default(),
            providers: RwLock::new(providers),
        }
    }

    /// Takes over what a promoted canary learned: its targets' health
    /// replaces the stable one, and its new providers join.
    pub fn adopt(&self, fork: &Registry) {
        let learned = fork.targets.read().unwrap_or_else(|e| e.into_inner());
        let mut targets = self.targets.write().unwrap_or_else(|e| e.into_inner());
        for (key, health) in learned.iter() {
            targets.insert(key.clone(), Arc::clone(health));
        }
        drop((learned, targets));
        let known = fork.providers.read().unwrap_or_else(|e| e.into_inner());
        let mut providers = self.providers.write().unwrap_or_else(|e| e.into_inner());
        for (name, health) in known.iter() {
            providers
                .entry(name.clone())
                .or_insert_with(|| Arc::clone(health));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            slow_start: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_then_a_probe_closes() {
        let h = TargetHealth::new("p", "m", Clock::new());
        for _ in 0..2 {
            let _ = h.on_failure(Failure::Fault, &policy(), false);
        }
        assert_eq!(h.state(), BreakerState::Closed);
        let _ = h.on_failure(Failure::Fault, &policy(), false);
        assert_eq!(h.state(), BreakerState::Open);
        assert_eq!(h.status(&policy()), Status::Skip);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            h.status(&policy()),
            Status::Probe,
            "one probe after open_for"
        );
        assert_eq!(h.claim_probe(), Some(Transition::HalfOpened));
        assert_eq!(h.claim_probe(), None, "only one probe at a time");
        assert_eq!(h.status(&policy()), Status::Skip);
        let _ = h.on_success(&policy(), true, Traffic::Whole, Duration::from_millis(10));
        assert_eq!(h.state(), BreakerState::Closed);
        // Slow start: the share ramps from 10% to 100% over the window.
        let Status::Available(share) = h.status(&policy()) else {
            panic!()
        };
        assert!((0.09..0.2).contains(&share), "{share}");
        tokio::time::advance(Duration::from_secs(5)).await;
        let Status::Available(share) = h.status(&policy()) else {
            panic!()
        };
        assert!((0.5..0.6).contains(&share), "{share}");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.status(&policy()), Status::Available(1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn each_transition_is_returned_once_to_the_caller() {
        let h = TargetHealth::new("p", "m", Clock::new());
        let fail = |probe| h.on_failure(Failure::Fault, &policy(), probe);
        assert_eq!(fail(false), None);
        assert_eq!(fail(false), None);
        assert_eq!(fail(false), Some(Transition::Opened));
        assert_eq!(fail(false), None, "already open");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.claim_probe(), Some(Transition::HalfOpened));
        assert_eq!(fail(true), Some(Transition::Opened), "the probe failed");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.claim_probe(), Some(Transition::HalfOpened));
        let ok = |probe| h.on_success(&policy(), probe, Traffic::Whole, Duration::from_millis(5));
        assert_eq!(ok(false), None, "a late success decides nothing");
        assert_eq!(ok(true), Some(Transition::Closed));
        assert_eq!(ok(true), None, "already closed");
        // A throttled probe re-opens too.
        assert_eq!((fail(false), fail(false)), (None, None));
        assert_eq!(fail(false), Some(Transition::Opened));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.claim_probe(), Some(Transition::HalfOpened));
        let throttled = Failure::Throttled {
            cool_down: Duration::from_secs(1),
        };
        assert_eq!(
            h.on_failure(throttled, &policy(), true),
            Some(Transition::Opened)
        );
        // Eight returned above, each counted once.
        assert_eq!(h.transitions(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens() {
        let h = TargetHealth::new("p", "m", Clock::new());
        for _ in 0..3 {
            let _ = h.on_failure(Failure::Fault, &policy(), false);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.claim_probe(), Some(Transition::HalfOpened));
        let _ = h.on_failure(Failure::Fault, &policy(), true);
        assert_eq!(h.state(), BreakerState::Open);
        assert_eq!(h.status(&policy()), Status::Skip);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_over_the_window_opens() {
        let h = TargetHealth::new("p", "m", Clock::new());
        // Alternating: never 3 in a row, but half of 10+ requests fail.
        for _ in 0..6 {
            let _ = h.on_success(&policy(), false, Traffic::Whole, Duration::from_millis(1));
            let _ = h.on_failure(Failure::Fault, &policy(), false);
        }
        assert_eq!(h.state(), BreakerState::Open, "{:?}", h.snapshot(&policy()));
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let h = TargetHealth::new("p", "m", Clock::new());
        for _ in 0..6 {
            let _ = h.on_success(&policy(), false, Traffic::Whole, Duration::from_millis(1));
            let _ = h.on_failure(Failure::Fault, &policy(), false);
            let _ = h.on_success(&policy(), false, Traffic::Whole, Duration::from_millis(1));
            tokio::time::advance(Duration::from_secs(3)).await;
        }
        assert_eq!(
            h.state(),
            BreakerState::Closed,
            "{:?}",
            h.snapshot(&policy())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_cools_down_without_opening() {
        let h = TargetHealth::new("p", "m", Clock::new());
        let _ = h.on_failure(
            Failure::Throttled {
                cool_down: Duration::from_secs(2),
            },
            &policy(),
            false,
        );
        assert_eq!(h.status(&policy()), Status::Skip);
        assert_eq!(h.state(), BreakerState::Closed);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(h.status(&policy()), Status::Available(1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn ttfb_ewma_tracks_latency() {
        let h = TargetHealth::new("p", "m", Clock::new());
        let _ = h.on_success(&policy(), false, Traffic::Whole, Duration::from_millis(100));
        assert_eq!(
            h.ttfb_ewma(Traffic::Whole),
            Some(Duration::from_millis(100))
        );
        for _ in 0..30 {
            let _ = h.on_success(&policy(), false, Traffic::Whole, Duration::from_millis(10));
        }
        assert!(h.ttfb_ewma(Traffic::Whole).unwrap() < Duration::from_millis(12));
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_probes_outcome_decides_a_half_open_breaker() {
        let h = TargetHealth::new("p", "m", Clock::new());
        for _ in 0..3 {
            let _ = h.on_failure(Failure::Fault, &policy(), false);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.claim_probe(), Some(Transition::HalfOpened));
        // Requests sent before the breaker opened end late, either way.
        let _ = h.on_success(&policy(), false, Traffic::Whole, Duration::from_millis(10));
        assert_eq!(h.state(), BreakerState::HalfOpen, "a late success");
        let _ = h.on_failure(Failure::Fault, &policy(), false);
        assert_eq!(h.state(), BreakerState::HalfOpen, "a late failure");
        let _ = h.on_success(&policy(), true, Traffic::Whole, Duration::from_millis(10));
        assert_eq!(h.state(), BreakerState::Closed, "the probe's success");
    }

    #[tokio::test(start_paused = true)]
    async fn the_policy_passed_in_is_the_one_applied() {
        let h = TargetHealth::new("p", "m", Clock::new());
        let lenient = BreakerPolicy {
            consecutive_failures: 100,
            min_requests: 100,
            ..policy()
        };
        for _ in 0..5 {
            let _ = h.on_failure(Failure::Fault, &lenient, false);
        }
        assert_eq!(h.state(), BreakerState::Closed);
        // A reload made it stricter: what was counted already applies.
        let _ = h.on_failure(Failure::Fault, &policy(), false);
        assert_eq!(h.state(), BreakerState::Open);
        let quick = BreakerPolicy {
            open_for: Duration::from_millis(100),
            ..policy()
        };
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(h.status(&policy()), Status::Skip);
        assert_eq!(h.status(&quick), Status::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn streamed_and_whole_latencies_are_kept_apart() {
        let h = TargetHealth::new("p", "m", Clock::new());
        assert_eq!(
            h.ttfb_p95(Traffic::Streamed),
            None,
            "no sample, no estimate"
        );
        assert_eq!(h.ttfb_p95(Traffic::Whole), None);
        for _ in 0..10 {
            let _ = h.on_success(
                &policy(),
                false,
                Traffic::Streamed,
                Duration::from_millis(5),
            );
        }
        assert_eq!(h.ttfb_ewma(Traffic::Whole), None);
        assert!(h.ttfb_p95(Traffic::Streamed).unwrap() < Duration::from_millis(10));
        let limit = h.concurrency_limit();
        // A whole answer takes far longer than a first event: not a sign of
        // overload, so the adaptive cap does not come down.
        let _ = h.on_success(&policy(), false, Traffic::Whole, Duration::from_secs(3));
        assert!(h.concurrency_limit() >= limit);
        assert_eq!(h.ttfb_ewma(Traffic::Whole), Some(Duration::from_secs(3)));
        assert!(h.ttfb_ewma(Traffic::Streamed).unwrap() < Duration::from_millis(10));
        let snap = serde_json::to_value(h.snapshot(&policy())).unwrap();
        assert_eq!(snap["latency"]["whole"]["ewma_ms"], 3000.0, "{snap}");
        assert!(snap["latency"]["streamed"]["p95_ms"].is_number(), "{snap}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_longer_window_after_a_reload_does_not_revive_old_failures() {
        let h = TargetHealth::new("p", "m", Clock::new());
        let short = BreakerPolicy {
            consecutive_failures: 100,
            failure_rate: 0.5,
            min_requests: 4,
            window: Duration::from_secs(10),
            ..policy()
        };
        tokio::time::advance(Duration::from_secs(100)).await;
        for _ in 0..3 {
            let _ = h.on_failure(Failure::Fault, &short, false);
        }
        let _ = h.on_success(&short, false, Traffic::Whole, Duration::from_millis(1));
        tokio::time::advance(Duration::from_secs(9_900)).await;
        // Reloaded with a 1000 s window: the failures of 9900 s ago are
        // outside it, whatever the bucket width was when they were counted.
        let long = BreakerPolicy {
            window: Duration::from_secs(1_000),
            ..short
        };
        let _ = h.on_failure(Failure::Fault, &long, false);
        let snap = h.snapshot(&long);
        assert_eq!((snap.window_ok, snap.window_failed), (0, 1), "{snap:?}");
        assert_eq!(h.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn own_changes_are_shared_once_and_applied_ones_never() {
        let a = TargetHealth::new("p", "m", Clock::new());
        let b = TargetHealth::new("p", "m", Clock::new());
        assert_eq!(a.take_to_share(), []);
        for _ in 0..3 {
            let _ = a.on_failure(Failure::Fault, &policy(), false);
        }
        tokio::time::advance(Duration::from_millis(40)).await;
        let told = a.take_to_share();
        let opened = Change::Opened {
            age: Duration::from_millis(40),
            open_for: Duration::from_secs(5),
        };
        assert_eq!(told, [opened]);
        assert_eq!(a.take_to_share(), [], "told once");
        // B applies it: open as long as A's, counted as nothing of B's own.
        assert_eq!(b.apply(opened), Some(Transition::Opened));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot(&policy()).consecutive_failures, 0);
        assert_eq!(b.take_to_share(), [], "no echo");
        tokio::time::advance(Duration::from_millis(4_900)).await;
        assert_eq!(b.status(&policy()), Status::Skip);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(b.status(&policy()), Status::Probe, "B probes on its own");
        // A's probe closes A's breaker; B closes too.
        assert_eq!(a.claim_probe(), Some(Transition::HalfOpened));
        let _ = a.on_success(&policy(), true, Traffic::Whole, Duration::from_millis(5));
        assert_eq!(a.take_to_share(), [Change::Closed]);
        assert_eq!(b.apply(Change::Closed), Some(Transition::Closed));
        assert_eq!(b.apply(Change::Closed), None);
        assert!(
            matches!(b.status(&policy()), Status::Available(s) if s < 0.2),
            "slow start"
        );
        // Cool-downs and misconfigured marks, with what is left of them.
        let throttled = Failure::Throttled {
            cool_down: Duration::from_secs(2),
        };
        let _ = a.on_failure(throttled, &policy(), false);
        let _ = a.on_failure(Failure::Credentials, &policy(), false);
        tokio::time::advance(Duration::from_millis(500)).await;
        let told = a.take_to_share();
        assert_eq!(
            told,
            [
                Change::CoolDown {
                    remaining: Duration::from_millis(1_500)
                },
                Change::Misconfigured {
                    remaining: MISCONFIGURED_FOR - Duration::from_millis(500)
                },
            ]
        );
        a.share_again(&told);
        assert_eq!(a.take_to_share(), told, "put back after a failed send");
        for c in told {
            assert_eq!(b.apply(c), None);
        }
        assert!(b.is_misconfigured());
        assert_eq!(b.snapshot(&policy()).cooling_down_ms, 1_500);
        assert_eq!(b.take_to_share(), []);
    }

    #[test]
    fn overrides_and_page_readings_are_shared_but_not_echoed() {
        let a = ProviderHealth::default();
        let b = ProviderHealth::default();
        a.set(Override::Down);
        a.set_page(PageState::Degraded, None);
        let told = a.take_to_share();
        assert_eq!(
            told,
            [
                ProviderChange::Override(Override::Down),
                ProviderChange::Page(PageState::Degraded)
            ]
        );
        a.set_page(PageState::Degraded, None);
        a.set_page(PageState::Degraded, Some("unreadable".into()));
        assert_eq!(a.take_to_share(), [], "the same reading, or none");
        for c in told {
            b.apply(c);
        }
        assert_eq!(
            (b.get(), b.page_state()),
            (Override::Down, PageState::Degraded)
        );
        assert_eq!(b.take_to_share(), []);
        // B's own poller reads the page: its reading wins there.
        b.set_page(PageState::Operational, None);
        assert_eq!(b.page_state(), PageState::Operational);
        assert_eq!(
            b.take_to_share(),
            [ProviderChange::Page(PageState::Operational)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fork_keeps_its_targets_apart_until_adopted() {
        let stable = Registry::default();
        let target = || ("fast", "p", "http://up/v1", "m");
        let (r, p, b, m) = target();
        let stable_health = stable.target(r, p, b, m);
        let over = stable.provider(p);
        let canary = stable.fork();
        let canary_health = canary.target(r, p, b, m);
        assert!(!Arc::ptr_eq(&stable_health, &canary_health));
        assert!(
            Arc::ptr_eq(&over, &canary.provider(p)),
            "overrides are shared"
        );
        let _ = canary_health.on_failure(Failure::Credentials, &policy(), false);
        assert!(canary_health.is_misconfigured());
        assert!(!stable.target(r, p, b, m).is_misconfigured());
        stable.adopt(&canary);
        assert!(Arc::ptr_eq(&stable.target(r, p, b, m), &canary_health));
    }
}
