//! The live gateway state: the validated config and what was built from it.
//!
//! Architecture invariant: only this module swaps the live state. A request
//! takes one snapshot ([`Gateway::live`]) at its start and keeps it to the
//! end, so a reload never changes a request half-way.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::KeyTable;
use crate::config::Config;
use crate::providers::{Adapter, AdapterError};

/// Everything built from one config.
#[derive(Debug)]
pub struct Live {
    pub config: Arc<Config>,
    /// Parallel to `config.providers`.
    pub adapters: Vec<Adapter>,
    pub keys: KeyTable,
}

impl Live {
    pub fn build(config: Config) -> Result<Self, AdapterError> {
        let adapters = config
            .providers
            .iter()
            .map(|p| Adapter::new(p))
            .collect::<Result<_, _>>()?;
        let keys = KeyTable::new(&config.keys, config.server.open_access);
        Ok(Self {
            config: Arc::new(config),
            adapters,
            keys,
        })
    }
}

#[derive(Debug)]
pub struct Gateway {
    live: ArcSwap<Live>,
}

impl Gateway {
    pub fn new(live: Live) -> Self {
        Self {
            live: ArcSwap::from_pointee(live),
        }
    }

    /// A snapshot of the live state for one request.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Replaces the live state; requests in flight keep their snapshot.
    pub fn swap(&self, live: Live) {
        self.live.store(Arc::new(live));
    }
}
