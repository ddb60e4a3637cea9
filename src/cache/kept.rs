//! The owner of the process's response cache.

use std::sync::{Arc, RwLock};

use super::{Cache, RedisBackend};
use crate::config::CacheStore;
use crate::shared::Shared;

/// The response cache of the process: it outlives configs while their
/// `[cache]` settings stay the same (a reload that changes them starts an
/// empty one), and a cache installed by code (a shared backend, a test's)
/// is kept whatever the settings.
///
/// With a Redis in `[state]`, it also owns the process's one
/// [`RedisBackend`], which every `backend = "redis"` cache uses.
#[derive(Debug, Default)]
pub struct KeptCache {
    // Only touched when a config is built, never on the request path.
    slot: RwLock<Option<Arc<Cache>>>,
    redis: Option<Arc<RedisBackend>>,
}

impl KeptCache {
    /// The owner for a process whose `[state]` is `shared` (if Redis).
    pub fn new(shared: Option<Arc<Shared>>) -> Self {
        Self {
            slot: RwLock::default(),
            redis: shared.map(|s| Arc::new(RedisBackend::new(s))),
        }
    }

    /// The cache for the stable config's `[cache]` settings.
    pub fn for_stable(&self, settings: &CacheStore) -> Arc<Cache> {
        let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some(c) if Self::fits(c, settings) => Arc::clone(c),
            _ => {
                let c = Arc::new(Cache::from_config(settings, self.redis.as_ref()));
                *slot = Some(Arc::clone(&c));
                c
            }
        }
    }

    /// The cache for a canary's settings: the stable one if they agree, else
    /// one of its own (the stable cache is not replaced before promotion).
    pub fn for_canary(&self, settings: &CacheStore) -> Arc<Cache> {
        let slot = self.slot.read().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some(c) if Self::fits(c, settings) => Arc::clone(c),
            _ => Arc::new(Cache::from_config(settings, self.redis.as_ref())),
        }
    }

    /// Keeps `cache` as the process's cache (after a canary is promoted).
    pub fn keep(&self, cache: Arc<Cache>) {
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(cache);
    }

    /// Uses `cache` for every config built from now on (a backend that
    /// `[cache]` cannot name: a shared one, or a test's).
    pub fn install(&self, cache: Arc<Cache>) {
        self.keep(cache);
    }

    fn fits(cache: &Cache, settings: &CacheStore) -> bool {
        cache.settings().is_none_or(|s| s == settings)
    }
}
