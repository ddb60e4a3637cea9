//! The shared backend: entries in the replicas' Redis (`[cache] backend =
//! "redis"`, over `[state]`'s connection), so a request answered by one
//! replica is a hit on every other.
//!
//! - **Keys**: `<key_prefix>cache:<hex of the request's Key>`. The key
//!   already separates tenants (layer 1, see the module doc of `cache`).
//! - **Values**: an [`Entry`] in the layout of `cache::encoding`, which
//!   carries its tenant and request hash, so [`Cache`](super::Cache) checks
//!   every value read back (layer 2), whatever Redis or its client returned.
//! - **Expiry**: Redis's (`SET … PX ttl`): an entry leaves Redis when its
//!   route's TTL ends. `[cache] max_bytes` does not apply here: Redis's own
//!   `maxmemory` (and a `maxmemory-policy` such as `volatile-lru` or
//!   `allkeys-lru`) bounds what it holds.
//! - **Bounded values**: bodies are bounded by the route's `max_entry_bytes`
//!   before they are stored; besides, a value is never written or read past
//!   [`MAX_VALUE_BYTES`] (a read asks for at most that many bytes with
//!   `GETRANGE`, so an oversized value written by something else is never
//!   transferred whole). A value that is too large or does not decode is a
//!   miss, logged and counted ([`RedisBackend::rejected`], read by the admin
//!   scrape as `detour_cache_rejected_total`).
//! - **Redis never stops traffic**: every call goes through
//!   [`Shared`] (bounded by `[state] timeout`). A failed or timed-out read is
//!   a miss, a failed write a skipped store, a failed removal a no-op; no
//!   error reaches the client. While Redis is known down the cache is
//!   bypassed: no call is made at all. Failures are counted by `Shared` as
//!   `detour_redis_failures_total{op="cache_get"|"cache_put"|"cache_remove"}`.
//!   What Redis adds to a request: a read before a cached route's request
//!   goes upstream, and a write before a miss's body ends (the body ends once
//!   stored, see `relay::capture`), each within the timeout.
//! - **Cancellation**: a read or write dropped half-way (a client that
//!   disconnects, a timeout) leaves nothing behind: the connection pairs each
//!   reply with its own call (see `shared`), and this backend keeps no state
//!   between calls but a counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::encoding::{decode, encode};
use super::{Backend, BoxFuture, Entry, Key};
use crate::shared::Shared;

/// The largest value read or written: answers above this are not shared.
/// It bounds what one read may transfer and allocate.
pub const MAX_VALUE_BYTES: usize = 32 * 1024 * 1024;

/// The cache's entries in `[state]`'s Redis. One per process (the values
/// refused are counted across configs).
#[derive(Debug)]
pub struct RedisBackend {
    shared: Arc<Shared>,
    rejected: AtomicU64,
}

impl RedisBackend {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            rejected: AtomicU64::new(0),
        }
    }

    /// Values read that were refused (too large or undecodable), served as
    /// misses.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn key(&self, key: &Key) -> String {
        self.shared.key(&format!("cache:{key}"))
    }

    async fn read(&self, key: &Key) -> Option<Arc<Entry>> {
        if !self.shared.is_up() {
            return None;
        }
        let name = self.key(key);
        let last = MAX_VALUE_BYTES as u64;
        // GETRANGE's end is inclusive: at most one byte more than the cap,
        // which tells an oversized value apart. An absent key reads as "".
        let value: Vec<u8> = self
            .shared
            .call("cache_get", |mut c| async move {
                ::redis::cmd("GETRANGE")
                    .arg(name)
                    .arg(0)
                    .arg(last)
                    .query_async(&mut c)
                    .await
            })
            .await
            .ok()?;
        if value.is_empty() {
            return None;
        }
        if value.len() > MAX_VALUE_BYTES {
            self.reject(key, "larger than the cap");
            return None;
        }
        match decode(Bytes::from(value)) {
            Ok(entry) => Some(Arc::new(entry)),
            Err(e) => {
                self.reject(key, &e.to_string());
                None
            }
        }
    }

    fn reject(&self, key: &Key, why: &str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(key = %key, "response cache: a value in Redis was refused ({why}); a miss");
    }

    async fn write(&self, key: Key, entry: Arc<Entry>) {
        if !self.shared.is_up() {
            return;
        }
        // An entry with no life left would be refused by Redis (`PX 0`).
        let Some(ttl) = remaining_ms(entry.ttl) else {
            return;
        };
        let value = match encode(&entry) {
            Ok(v) if v.len() <= MAX_VALUE_BYTES => v,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(key = %key, "response cache: not stored in Redis: {e}");
                return;
            }
        };
        let name = self.key(&key);
        let _ = self
            .shared
            .call("cache_put", |mut c| async move {
                ::redis::cmd("SET")
                    .arg(name)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
    }

    async fn delete(&self, key: &Key) {
        if !self.shared.is_up() {
            return;
        }
        let name = self.key(key);
        let _ = self
            .shared
            .call("cache_remove", |mut c| async move {
                ::redis::cmd("DEL")
                    .arg(name)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}

/// A TTL in whole milliseconds for `PX`, if at least one.
fn remaining_ms(ttl: Duration) -> Option<u64> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    // Redis refuses expiries that overflow its clock arithmetic.
    (ms > 0).then_some(ms.min(i64::MAX as u64 / 2))
}

impl Backend for RedisBackend {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Arc<Entry>>> {
        Box::pin(self.read(key))
    }

    fn put(&self, key: Key, entry: Arc<Entry>) -> BoxFuture<'_, ()> {
        Box::pin(self.write(key, entry))
    }

    fn remove<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, ()> {
        Box::pin(self.delete(key))
    }

    fn rejected(&self) -> u64 {
        RedisBackend::rejected(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_for_px() {
        assert_eq!(remaining_ms(Duration::ZERO), None);
        assert_eq!(remaining_ms(Duration::from_micros(999)), None);
        assert_eq!(remaining_ms(Duration::from_secs(60)), Some(60_000));
        assert!(remaining_ms(Duration::MAX).is_some_and(|ms| ms < i64::MAX as u64));
    }
}
