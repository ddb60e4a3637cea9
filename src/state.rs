//! The live gateway state: the validated config and what was built from it.
//!
//! Architecture invariant: only this module swaps the live state. A request
//! takes one snapshot ([`Gateway::live`]) at its start and keeps it to the
//! end, so a reload never changes a request half-way. Health state lives in
//! the [`Registry`], which outlives configs: a reload keeps what detour has
//! learned about each target.

use std::sync::Arc;

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
}

impl Gateway {
    pub fn new(config: Config) -> Result<Self, AdapterError> {
        let registry = Registry::default();
        let live = Live::build(config, &registry)?;
        Ok(Self {
            live: ArcSwap::from_pointee(live),
            registry,
        })
    }

    /// A snapshot of the live state for one request.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Builds `config` and makes it live; requests in flight keep their snapshot.
    pub fn swap(&self, config: Config) -> Result<(), AdapterError> {
        let live = Live::build(config, &self.registry)?;
        self.live.store(Arc::new(live));
        Ok(())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
