//! The live gateway state: the validated config and what was built from it,
//! and the owners of the state that outlives configs.
//!
//! Architecture invariant: only this module swaps the live state. A request
//! takes one snapshot ([`Gateway::snapshot`], once, in `server`) at its start and
//! keeps it to the end, so a reload never changes a request half-way.
//!
//! What outlives a config has one owner each, held by the [`Gateway`] for the
//! life of the process; a new config reconciles with them instead of
//! starting afresh:
//!
//! | owner | holds | a new stable config | a canary |
//! |---|---|---|---|
//! | [`Registry`] (`health`) | breakers, cool-downs, latency per route and target; provider overrides and status-page state | finds the same target's health again | gets a [`Registry::fork`]: its own target health, the providers' shared; adopted on promotion |
//! | [`LimitStore`] | rate-limit buckets, concurrency and stream counts per key and tenant | applies its values to them | shares them under the stable values |
//! | [`Admission`] | the in-flight count and the tiered queues | applies its limit and timeout | shares it |
//! | [`KeptCache`] | the response cache (and, with a Redis in `[state]`, the process's one `RedisBackend` over [`Shared`]) | the same cache while `[cache]` is unchanged | the same cache, or its own if `[cache]` differs |
//! | [`AuthFailures`] | failed authentications per client IP | (kept) | (shared) |
//!
//! | [`IncidentLog`] | the incidents of the last day | (kept) | (shared) |
//!
//! With `[state] backend = "redis"`, `health_sync` shares the stable
//! [`Registry`] and the [`IncidentLog`] with the other replicas (a canary's
//! fork stays this replica's own).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;
use tokio::time::Instant;

use crate::auth::KeyTable;
use crate::budget::RetryBudget;
use crate::cache::{Cache, KeptCache};
use crate::config::{Config, RolloutPolicy};
use crate::health::{ProviderHealth, Registry, TargetHealth};
use crate::incidents::IncidentLog;
use crate::limits::admission::Admission;
use crate::limits::{AuthFailures, LimitStore, Limits};
use crate::providers::{Adapter, AdapterError};
use crate::shared::Shared;
use crate::traces::Traces;

/// Everything built from one config.
#[derive(Debug)]
pub struct Live {
    pub config: Arc<Config>,
    /// Set once a request served by this config succeeded (for last-known-good).
    pub served_ok: AtomicBool,
    /// Tiered admission: `server.max_concurrent_requests` (the process's).
    pub admission: Arc<Admission>,
    /// Per-key and per-tenant limits, on the process's [`LimitStore`].
    pub limits: Limits,
    /// Parallel to `config.providers`.
    pub adapters: Vec<Adapter>,
    /// Parallel to `config.providers`: manual overrides.
    pub overrides: Vec<Arc<ProviderHealth>>,
    /// Parallel to `config.routes`.
    pub routes: Vec<RouteState>,
    pub keys: KeyTable,
    /// The response cache (the process's [`KeptCache`]).
    pub cache: Arc<Cache>,
    /// The gateway's incident log.
    pub incidents: Arc<IncidentLog>,
    /// The gateway's tracer; `None` (no span made) without `otlp_endpoint`.
    pub traces: Option<Arc<Traces>>,
}

/// The one config snapshot a request runs on, taken once when its route
/// matched (`server`) and kept in its extensions: authentication, limits,
/// admission and the handler all read this one, so a reload or a rollout
/// can never make one request see two configs.
///
/// A canary request is authenticated by the canary's key table: a rollout
/// that adds a key accepts it on the canary share only (401 on the stable
/// share) until it is promoted, and one that removes a key refuses it on
/// the canary share first. 4xx answers do not count against the canary.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub live: Arc<Live>,
    /// The rollout cohort, while a rollout bakes.
    pub cohort: Option<CohortTag>,
}

/// A route's shared runtime state.
#[derive(Debug)]
pub struct RouteState {
    /// Parallel to the route's targets; kept per route (see
    /// [`Registry::target`]) and judged by the route's `breaker` policy of
    /// the request's snapshot.
    pub health: Vec<Arc<TargetHealth>>,
    pub budget: RetryBudget,
}

/// The owners of what outlives a config (see the module doc), besides health.
#[derive(Debug)]
struct Owners {
    /// The replicas' Redis, when `[state] backend = "redis"` (fixed at start).
    shared: Option<Arc<Shared>>,
    limits: LimitStore,
    admission: Arc<Admission>,
    cache: KeptCache,
    incidents: Arc<IncidentLog>,
    /// The tracer, when `[telemetry] otlp_endpoint` is set (fixed at start).
    traces: Option<Arc<Traces>>,
}

/// Whether a config is built to serve everyone or to bake on a canary share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Stable,
    Canary,
}

impl Live {
    /// Builds `config` on the state the gateway keeps: target health from
    /// `health`, the rest from the gateway's owners.
    fn build(
        config: Config,
        gw: &Owners,
        health: &Registry,
        role: Role,
    ) -> Result<Self, AdapterError> {
        let adapters = config
            .providers
            .iter()
            .map(|p| Adapter::new(p))
            .collect::<Result<_, _>>()?;
        let overrides = config
            .providers
            .iter()
            .map(|p| health.provider(&p.name))
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| RouteState {
                health: r
                    .targets
                    .iter()
                    .map(|t| {
                        let base = t.provider.base_url.as_str();
                        health.target(&r.alias, &t.provider.name, base, &t.model)
                    })
                    .collect(),
                budget: RetryBudget::new(&r.retries, health.clock()),
            })
            .collect();
        let keys = KeyTable::new(&config);
        let (limits, cache) = match role {
            Role::Stable => {
                let s = &config.server;
                gw.admission
                    .retune(s.max_concurrent_requests, s.queue_timeout);
                (
                    gw.limits.reconcile(&config),
                    gw.cache.for_stable(&config.cache),
                )
            }
            Role::Canary => (gw.limits.share(&config), gw.cache.for_canary(&config.cache)),
        };
        Ok(Self {
            config: Arc::new(config),
            served_ok: AtomicBool::new(false),
            admission: Arc::clone(&gw.admission),
            limits,
            adapters,
            overrides,
            routes,
            keys,
            cache,
            incidents: Arc::clone(&gw.incidents),
            traces: gw.traces.clone(),
        })
    }
}

#[derive(Debug)]
pub struct Gateway {
    /// The stable config.
    live: ArcSwap<Live>,
    /// A candidate config being baked on a share of traffic.
    rollout: ArcSwapOption<Rollout>,
    /// The stable config's text, when it came from a file.
    source: RwLock<Option<String>>,
    ops: RwLock<Ops>,
    rejected_configs: AtomicU64,
    /// Failed authentications per client IP (survives reloads).
    pub auth_failures: AuthFailures,
    /// The stable configs' health.
    health: Arc<Registry>,
    owners: Owners,
    /// Bumped whenever the stable config changes, for the control plane
    /// (status-page pollers) to follow it.
    changes: tokio::sync::watch::Sender<u64>,
}

/// The tracer `[telemetry]` asks for; none (with a warning) when it cannot
/// start, which never stops the gateway.
fn start_traces(config: &Config) -> Option<Arc<Traces>> {
    let otlp = config.telemetry.otlp.as_ref()?;
    match Traces::start(otlp) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            tracing::warn!(error = %e, "traces are not exported");
            None
        }
    }
}

impl Gateway {
    /// Builds the gateway. Status pages are polled by the control plane
    /// (`status_pages::keep_polling`), which follows [`Gateway::changes`].
    pub fn new(config: Config) -> Result<Self, AdapterError> {
        let health = Arc::new(Registry::default());
        let clock = health.clock();
        let s = &config.server;
        let auth_per_minute = u64::from(s.auth_failures_per_minute);
        let admission = Admission::new(s.max_concurrent_requests, s.queue_timeout);
        let shared = config.state.redis().cloned().map(Shared::start);
        let limits = match &shared {
            Some(s) => LimitStore::with_shared(clock, Arc::clone(s)),
            None => LimitStore::new(clock),
        };
        let auth_failures = AuthFailures::with_shared(auth_per_minute, clock, shared.clone());
        let owners = Owners {
            cache: KeptCache::new(shared.clone()),
            shared,
            limits,
            admission: Arc::new(admission),
            incidents: Arc::new(IncidentLog::new()),
            traces: start_traces(&config),
        };
        if let Some(shared) = &owners.shared {
            crate::health_sync::start(shared, &health, &owners.incidents);
        }
        let live = Live::build(config, &owners, &health, Role::Stable)?;
        let gw = Self {
            live: ArcSwap::from_pointee(live),
            rollout: ArcSwapOption::empty(),
            source: RwLock::new(None),
            ops: RwLock::new(Ops::default()),
            rejected_configs: AtomicU64::new(0),
            auth_failures,
            health,
            owners,
            changes: tokio::sync::watch::Sender::new(0),
        };
        Ok(gw)
    }

    /// The replicas' Redis, when `[state]` names one.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.owners.shared.as_ref()
    }

    /// Wakes on every change of the stable config (a swap or a promotion).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// The stable live state (admin views, keys).
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The live state one request runs on: the candidate's for the canary
    /// share while a rollout bakes, else the stable one.
    pub fn pick(&self) -> (Arc<Live>, Option<CohortTag>) {
        let Some(rollout) = self.rollout.load_full() else {
            return (self.live(), None);
        };
        let canary = rollout.takes(&mut fastrand::Rng::new());
        let live = if canary {
            Arc::clone(&rollout.candidate)
        } else {
            self.live()
        };
        (live, Some(CohortTag { rollout, canary }))
    }

    /// The snapshot one request runs on: see [`Snapshot`].
    pub fn snapshot(&self) -> Snapshot {
        let (live, cohort) = self.pick();
        Snapshot { live, cohort }
    }

    /// Builds `config` and makes it the stable config at once; requests in
    /// flight keep their snapshot. Any rollout in progress is dropped.
    pub fn swap(&self, config: Config) -> Result<(), AdapterError> {
        self.swap_with_source(config, None)
    }

    pub fn swap_with_source(
        &self,
        config: Config,
        source: Option<String>,
    ) -> Result<(), AdapterError> {
        self.warn_if_state_changed(&config);
        let live = Live::build(config, &self.owners, &self.health, Role::Stable)?;
        let auth_per_minute = u64::from(live.config.server.auth_failures_per_minute);
        self.auth_failures.retune(auth_per_minute);
        self.rollout.store(None);
        self.live.store(Arc::new(live));
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = source;
        self.changed();
        Ok(())
    }

    /// `[state]` and `[telemetry]` are read once, at start: say so when a
    /// new config changes them.
    fn warn_if_state_changed(&self, config: &Config) {
        if config.telemetry != self.live().config.telemetry {
            tracing::warn!("[telemetry] changed: it applies at the next start");
        }
        let now = self.owners.shared.as_ref().map(|s| s.settings());
        if config.state.redis() != now {
            tracing::warn!(
                "[state] changed: it applies at the next start; this process keeps {}",
                now.map_or("memory".to_owned(), |s| format!(
                    "redis at {}",
                    s.masked_url()
                ))
            );
        }
    }

    /// Starts baking `config` on its rollout's canary share.
    pub fn start_rollout(
        &self,
        config: Config,
        policy: RolloutPolicy,
        source: Option<String>,
    ) -> Result<Arc<Rollout>, AdapterError> {
        let health = self.health.fork();
        let live = Arc::new(Live::build(config, &self.owners, &health, Role::Canary)?);
        let rollout = Arc::new(Rollout::new(live, health, policy, source));
        self.rollout.store(Some(Arc::clone(&rollout)));
        Ok(rollout)
    }

    /// The rollout in progress, if any.
    pub fn rollout(&self) -> Option<Arc<Rollout>> {
        self.rollout.load_full()
    }

    /// Makes the candidate stable. False when there was no rollout.
    pub fn promote(&self) -> bool {
        let Some(r) = self.rollout.swap(None) else {
            return false;
        };
        // The candidate's values apply to the state the process keeps, and
        // what it learned about its targets becomes the stable health.
        let (config, s) = (&r.candidate.config, &r.candidate.config.server);
        let owners = &self.owners;
        owners
            .admission
            .retune(s.max_concurrent_requests, s.queue_timeout);
        let _ = owners.limits.reconcile(config);
        self.auth_failures
            .retune(u64::from(s.auth_failures_per_minute));
        owners.cache.keep(Arc::clone(&r.candidate.cache));
        self.health.adopt(&r.health);
        self.live.store(Arc::clone(&r.candidate));
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = r.source.clone();
        self.changed();
        true
    }

    /// Drops the candidate; the stable config stays. False when there was none.
    pub fn rollback(&self) -> bool {
        self.rollout.swap(None).is_some()
    }

    /// Where the config comes from and where state is kept.
    pub fn ops(&self) -> Ops {
        self.ops.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_ops(&self, config_path: Option<PathBuf>, state_dir: Option<PathBuf>) {
        let mut ops = self.ops.write().unwrap_or_else(|e| e.into_inner());
        ops.config_path = config_path;
        ops.state_dir = state_dir;
    }

    pub fn count_rejected_config(&self) {
        self.rejected_configs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected_configs(&self) -> u64 {
        self.rejected_configs.load(Ordering::Relaxed)
    }

    /// Records the stable config's text (for reloads and last-known-good).
    pub fn set_source(&self, text: Option<String>) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = text;
    }

    /// The stable config's text, when known.
    pub fn source(&self) -> Option<String> {
        self.source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The stable configs' health (its clock is the process's uptime).
    pub fn health(&self) -> &Registry {
        &self.health
    }

    /// The gateway's incident log.
    pub fn incidents(&self) -> &Arc<IncidentLog> {
        &self.owners.incidents
    }

    /// The process's response cache.
    pub fn cache(&self) -> &KeptCache {
        &self.owners.cache
    }

    /// The process's tiered admission.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.owners.admission
    }
}

/// Where a gateway's config comes from and where it keeps files (cold path).
/// What reloads did is the control plane's (`reload::Reloader`).
#[derive(Debug, Clone, Default)]
pub struct Ops {
    pub config_path: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

// The rollout's data: what the request path records. The verdict is
// `crate::rollout`'s (the control plane).

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
        let [requests, errors, latency_us] = self.totals();
        CohortView::from_totals(requests, errors, latency_us)
    }

    /// Requests, server errors, and summed latency in microseconds.
    fn totals(&self) -> [u64; 3] {
        [
            self.requests.load(Relaxed),
            self.errors.load(Relaxed),
            self.latency_us.load(Relaxed),
        ]
    }
}

impl CohortView {
    /// The view of `requests` with `errors` among them and `latency_us` in all.
    pub fn from_totals(requests: u64, errors: u64, latency_us: u64) -> Self {
        let per_request = |n: u64| {
            if requests == 0 {
                0.0
            } else {
                n as f64 / requests as f64
            }
        };
        Self {
            requests,
            errors,
            error_rate: per_request(errors),
            mean_latency_ms: per_request(latency_us) / 1e3,
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

/// A candidate config being baked on a canary share, and the outcomes of
/// both cohorts; [`crate::rollout`] judges them.
#[derive(Debug)]
pub struct Rollout {
    pub candidate: Arc<Live>,
    /// The candidate's target health, apart from the stable one's.
    pub health: Registry,
    pub policy: RolloutPolicy,
    /// The candidate's config text, kept as last-known-good once it serves.
    pub source: Option<String>,
    /// The same for every replica that bakes the same text: a digest of it
    /// (`None` without a text, then the rollout is this process's alone).
    pub id: Option<String>,
    started: Instant,
    stable: Cohort,
    canary: Cohort,
}

impl Rollout {
    pub fn new(
        candidate: Arc<Live>,
        health: Registry,
        policy: RolloutPolicy,
        source: Option<String>,
    ) -> Self {
        let id = source.as_deref().map(rollout_id);
        Self {
            candidate,
            health,
            policy,
            source,
            id,
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

    /// How long the candidate has baked.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The raw counts of both cohorts (stable, then canary): requests,
    /// server errors, summed latency in µs.
    pub fn totals(&self) -> [u64; 6] {
        let [a, b, c] = self.stable.totals();
        let [d, e, f] = self.canary.totals();
        [a, b, c, d, e, f]
    }

    /// The stable and the canary cohorts' outcomes so far.
    pub fn cohorts(&self) -> (CohortView, CohortView) {
        (self.stable.snapshot(), self.canary.snapshot())
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

/// The id of a rollout to the config `text`: its SHA-256, shortened.
pub fn rollout_id(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
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
