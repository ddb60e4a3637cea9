//! The live gateway state: the validated config and what was built from it.
//!
//! Architecture invariant: only this module swaps the live state. A request
//! takes one snapshot ([`Gateway::live`]) at its start and keeps it to the
//! end, so a reload never changes a request half-way. Health state lives in
//! the [`Registry`], which outlives configs: a reload keeps what detour has
//! learned about each target.

use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;

use crate::auth::KeyTable;
use crate::budget::RetryBudget;
use crate::config::Config;
use crate::health::{ProviderHealth, Registry, TargetHealth};
use crate::providers::{Adapter, AdapterError};

/// Everything built from one config.
#[derive(Debug)]
pub struct Live {
    pub config: Arc<Config>,
    /// Parallel to `config.providers`.
    pub adapters: Vec<Adapter>,
    /// Parallel to `config.providers`: manual overrides.
    pub overrides: Vec<Arc<ProviderHealth>>,
    /// Parallel to `config.routes`.
    pub routes: Vec<RouteState>,
    pub keys: KeyTable,
}

/// A route's shared runtime state.
#[derive(Debug)]
pub struct RouteState {
    /// Parallel to the route's targets.
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
                    .map(|t| registry.target(&t.provider.name, &t.model, r.breaker))
                    .collect(),
                budget: RetryBudget::new(&r.retries, registry.clock()),
            })
            .collect();
        let keys = KeyTable::new(&config.keys, config.server.open_access);
        Ok(Self {
            config: Arc::new(config),
            adapters,
            overrides,
            routes,
            keys,
        })
    }
}

#[derive(Debug)]
pub struct Gateway {
    live: ArcSwap<Live>,
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
        let gw = Self {
            live: ArcSwap::from_pointee(live),
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

    /// A snapshot of the live state for one request.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Builds `config` and makes it live; requests in flight keep their snapshot.
    pub fn swap(&self, config: Config) -> Result<(), AdapterError> {
        let live = Live::build(config, &self.registry)?;
        self.live.store(Arc::new(live));
        self.restart_pollers();
        Ok(())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
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
