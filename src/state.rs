//! The live gateway state: the validated config and what was built from it.
//!
//! Architecture invariant: only this module swaps the live state. A request
//! takes one snapshot ([`Gateway::live`]) at its start and keeps it to the
//! end, so a reload never changes a request half-way. Health state lives in
//! the [`Registry`], which outlives configs: a reload keeps what detour has
//! learned about each target.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::auth::KeyTable;
use crate::budget::RetryBudget;
use crate::config::{Config, RolloutPolicy};
use crate::health::{ProviderHealth, Registry, TargetHealth};
use crate::limits::admission::Admission;
use crate::limits::{AuthFailures, Limits};
use crate::providers::{Adapter, AdapterError};
use crate::reload::ReloadStatus;
use crate::rollout::{CohortTag, Rollout};

/// Everything built from one config.
#[derive(Debug)]
pub struct Live {
    pub config: Arc<Config>,
    /// Set once a request served by this config succeeded (for last-known-good).
    pub served_ok: AtomicBool,
    /// Tiered admission: `server.max_concurrent_requests`.
    pub admission: Arc<Admission>,
    /// Per-key and per-tenant limits.
    pub limits: Limits,
    /// Parallel to `config.providers`.
    pub adapters: Vec<Adapter>,
    /// Parallel to `config.providers`: manual overrides.
    pub overrides: Vec<Arc<ProviderHealth>>,
    /// Parallel to `config.routes`.
    pub routes: Vec<RouteState>,
    pub keys: KeyTable,
    /// The response cache (from the registry: it outlives reloads).
    pub cache: Arc<crate::cache::Cache>,
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

impl Live {
    pub fn build(config: Config, registry: &Registry) -> Result<Self, AdapterError> {
        let adapters = config
            .providers
            .iter()
            .map(|p| Adapter::new(p))
            .collect::<Result<_, _>>()?;
        let overrides = config
            .providers
            .iter()
            .map(|p| registry.provider(&p.name))
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
                        registry.target(&r.alias, &t.provider.name, base, &t.model)
                    })
                    .collect(),
                budget: RetryBudget::new(&r.retries, registry.clock()),
            })
            .collect();
        let keys = KeyTable::new(&config.keys, config.server.open_access);
        let cache = registry.cache(&config.cache);
        let max_in_flight = config.server.max_concurrent_requests;
        let queue_timeout = config.server.queue_timeout;
        let limits = Limits::new(&config, registry.clock());
        Ok(Self {
            config: Arc::new(config),
            served_ok: AtomicBool::new(false),
            admission: Arc::new(Admission::new(max_in_flight, queue_timeout)),
            limits,
            adapters,
            overrides,
            routes,
            keys,
            cache,
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
    registry: Registry,
    /// Status-page pollers of the live config (cold path: config changes only).
    pollers: RwLock<Vec<tokio::task::AbortHandle>>,
}

impl Gateway {
    /// Builds the gateway; inside a tokio runtime it also starts the
    /// status-page pollers.
    pub fn new(config: Config) -> Result<Self, AdapterError> {
        let registry = Registry::default();
        let live = Live::build(config, &registry)?;
        let auth_per_minute = u64::from(live.config.server.auth_failures_per_minute);
        let gw = Self {
            live: ArcSwap::from_pointee(live),
            rollout: ArcSwapOption::empty(),
            source: RwLock::new(None),
            ops: RwLock::new(Ops::default()),
            rejected_configs: AtomicU64::new(0),
            auth_failures: AuthFailures::new(auth_per_minute, registry.clock()),
            registry,
            pollers: RwLock::new(Vec::new()),
        };
        gw.restart_pollers();
        Ok(gw)
    }

    fn restart_pollers(&self) {
        let live = self.live();
        let mut pollers = self.pollers.write().unwrap_or_else(|e| e.into_inner());
        for p in pollers.drain(..) {
            p.abort();
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for (provider, health) in live.config.providers.iter().zip(&live.overrides) {
            if provider.status_page.is_some() {
                let task = rt.spawn(crate::statuspage::poll(
                    Arc::clone(provider),
                    Arc::clone(health),
                ));
                pollers.push(task.abort_handle());
            }
        }
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
        let live = Live::build(config, &self.registry)?;
        self.rollout.store(None);
        self.live.store(Arc::new(live));
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = source;
        self.restart_pollers();
        Ok(())
    }

    /// Starts baking `config` on its rollout's canary share.
    pub fn start_rollout(
        &self,
        config: Config,
        policy: RolloutPolicy,
        source: Option<String>,
    ) -> Result<Arc<Rollout>, AdapterError> {
        let live = Arc::new(Live::build(config, &self.registry)?);
        let rollout = Arc::new(Rollout::new(live, policy, source));
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
        self.live.store(Arc::clone(&r.candidate));
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = r.source.clone();
        self.restart_pollers();
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

    pub fn set_last_reload(&self, status: ReloadStatus) {
        self.ops
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .last_reload = Some(status);
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

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Operational settings and history of a gateway (cold path).
#[derive(Debug, Clone, Default)]
pub struct Ops {
    pub config_path: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub last_reload: Option<ReloadStatus>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for p in self
            .pollers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            p.abort();
        }
    }
}
