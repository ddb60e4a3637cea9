//! The in-process backend: a `moka` cache (TinyLFU admission, LRU eviction)
//! bounded by the total size of the bodies it holds, with each entry expiring
//! after its own route's TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache as Moka;
use moka::Expiry;

use super::{Backend, BoxFuture, Entry, Key};

/// Bytes counted for an entry besides its body (key, headers, names).
const ENTRY_OVERHEAD: usize = 256;

#[derive(Debug, Clone)]
pub struct MemoryBackend {
    entries: Moka<Key, Arc<Entry>>,
}

impl MemoryBackend {
    /// A backend holding at most about `max_bytes` of entries.
    pub fn new(max_bytes: u64) -> Self {
        let entries = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &Key, e: &Arc<Entry>| weight(e))
            .expire_after(PerEntryTtl)
            .build();
        Self { entries }
    }

    /// Bytes held (approximate until [`MemoryBackend::sync`]).
    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    /// Entries held (approximate until [`MemoryBackend::sync`]).
    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Applies pending evictions and expiries now (tests, admin views).
    pub async fn sync(&self) {
        self.entries.run_pending_tasks().await;
    }
}

fn weight(e: &Entry) -> u32 {
    let bytes = e.body.len() + e.tenant.len() + e.provider.len() + e.model.len() + ENTRY_OVERHEAD;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Each entry lives for the TTL it was stored with (its route's).
struct PerEntryTtl;

impl Expiry<Key, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _: &Key, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(e.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Key,
        e: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.ttl)
    }
}

impl Backend for MemoryBackend {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Arc<Entry>>> {
        Box::pin(self.entries.get(key))
    }

    fn put(&self, key: Key, entry: Arc<Entry>) -> BoxFuture<'_, ()> {
        Box::pin(self.entries.insert(key, entry))
    }

    fn remove<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.entries.invalidate(key).await;
        })
    }
}
