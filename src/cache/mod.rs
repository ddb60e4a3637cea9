//! The response cache: opt-in per route, exact match on the normalised
//! request, streams replayed as streams.
//!
//! Isolation is the first requirement (the March 2023 incident: a Redis
//! client bug handed cached data to the wrong users). Three layers, any one
//! of which keeps tenants apart:
//! 1. the key ([`Key`]) is SHA-256 over the tenant, client format, endpoint,
//!    stream flag and normalised body, so two tenants never share a key;
//! 2. every entry carries the tenant and the request hash it was stored
//!    for, and [`Cache::lookup`] compares both with the request on every read;
//!    an entry that does not match (a backend that answered for another key,
//!    a corrupted or crossed reply) is dropped, logged at error level
//!    (tenants and key hashes only, never prompt text), counted in
//!    [`Cache::mismatches`] and `detour_cache_mismatches_total`, and never
//!    served: the request goes upstream as a miss;
//! 3. the tenant comes from the authenticated key (`auth::Caller`), never
//!    from anything the client sends.
//!
//! What is stored: only `200` answers, and only once their body ended
//! normally (a stream with its end marker: `[DONE]` or `message_stop`); the
//! exact bytes the client was sent, up to the route's `max_entry_bytes`
//! (larger answers are relayed, not stored). A hit replays those bytes with
//! the original content type, provider and model, `x-detour-attempts: 0`;
//! a stream is replayed as `text/event-stream`, event by event.
//!
//! `x-detour-cache` on every response of a cached route says `hit`, `miss`
//! or `bypass`; a request with `x-detour-cache: bypass` (or `no-cache`)
//! neither reads nor writes the cache.
//!
//! Storage is behind [`Backend`] (get, put, remove; object-safe): the
//! in-process [`MemoryBackend`] (`[cache] backend = "memory"`, bounded by
//! `[cache] max_bytes`), or [`RedisBackend`] (`backend = "redis"`: shared by
//! every replica on `[state]`'s Redis, bounded by Redis's `maxmemory`; values
//! in the self-describing layout of `encoding`). The checks above run in
//! [`Cache`], whatever the backend returns.

mod encoding;
mod kept;
mod key;
mod memory;
mod redis;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

pub use kept::KeptCache;
pub use key::{normalise, Key, IGNORED_FIELDS};
pub use memory::MemoryBackend;
pub use redis::{RedisBackend, MAX_VALUE_BYTES};

use crate::config::{CacheBackend, CacheStore, RouteCache};
use crate::protocol::chat::{ClientFormat, Endpoint};

/// The request and response header (built once: a name given as `&str` is
/// parsed on every lookup and insert).
pub const HEADER: HeaderName = HeaderName::from_static("x-detour-cache");

/// A boxed future, as the object-safe [`Backend`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where entries are kept. Implementations need not be trusted: [`Cache`]
/// verifies every entry a backend returns. A backend that fails (a lost
/// connection) answers `None` and logs; a miss is always safe.
pub trait Backend: Send + Sync + fmt::Debug {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Arc<Entry>>>;
    fn put(&self, key: Key, entry: Arc<Entry>) -> BoxFuture<'_, ()>;
    fn remove<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, ()>;

    /// Values the backend found but refused (undecodable, too large) and
    /// answered as misses, since it was made.
    fn rejected(&self) -> u64 {
        0
    }
}

/// A stored answer and whom it belongs to.
#[derive(Clone)]
pub struct Entry {
    /// The tenant whose request produced it.
    pub tenant: String,
    /// The key of that request.
    pub request_hash: Key,
    pub format: ClientFormat,
    pub stream: bool,
    pub status: u16,
    pub content_type: Option<String>,
    /// Who answered originally (`x-detour-provider`, `x-detour-model`).
    pub provider: String,
    pub model: String,
    /// The bytes the client was sent.
    pub body: Bytes,
    pub stored_at: SystemTime,
    pub ttl: Duration,
}

impl fmt::Debug for Entry {
    // No body: it is the answer's text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("tenant", &self.tenant)
            .field("request_hash", &self.request_hash)
            .field("format", &self.format)
            .field("stream", &self.stream)
            .field("status", &self.status)
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("body_len", &self.body.len())
            .field("stored_at", &self.stored_at)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Entry {
    /// Younger than its TTL at `now`. A clock that stepped back counts as
    /// age zero; the backend's own expiry still bounds the entry's life.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        now.duration_since(self.stored_at).unwrap_or_default() < self.ttl
    }

    /// The answer replayed to a client: same status, content type and bytes;
    /// a stream as a chunked event stream, one frame per event.
    pub fn response(&self) -> Response {
        let body = if self.stream {
            let events = split_events(&self.body);
            Body::from_stream(futures_util::stream::iter(
                events.into_iter().map(Ok::<Bytes, Infallible>),
            ))
        } else {
            Body::from(self.body.clone())
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let h = resp.headers_mut();
        if let Some(v) = self.content_type.as_deref().and_then(|v| v.parse().ok()) {
            h.insert(header::CONTENT_TYPE, v);
        }
        let age = SystemTime::now()
            .duration_since(self.stored_at)
            .unwrap_or_default();
        h.insert(header::AGE, HeaderValue::from(age.as_secs()));
        h.insert(HEADER, Status::Hit.header());
        if let Ok(v) = HeaderValue::from_str(&self.provider) {
            h.insert("x-detour-provider", v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.model) {
            h.insert("x-detour-model", v);
        }
        h.insert("x-detour-attempts", HeaderValue::from(0u32));
        resp
    }
}

/// SSE bytes cut after each blank line (zero-copy slices).
fn split_events(body: &Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < body.len() {
        if body[i] == b'\n' && body[i + 1] == b'\n' {
            out.push(body.slice(start..i + 2));
            start = i + 2;
            i = start;
        } else {
            i += 1;
        }
    }
    if start < body.len() {
        out.push(body.slice(start..));
    }
    out
}

/// The result of [`Cache::lookup`].
#[derive(Debug)]
pub enum Lookup {
    /// A verified, fresh entry of this tenant for this request.
    Hit(Arc<Entry>),
    /// Nothing servable (absent, stale, or dropped as a mismatch).
    Miss,
}

/// `x-detour-cache` on responses of cached routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Hit,
    Miss,
    Bypass,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }

    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// The client asked to skip the cache: `x-detour-cache: bypass` or `no-cache`.
pub fn bypass_requested(headers: &HeaderMap) -> bool {
    headers.get_all(HEADER).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            let v = v.trim();
            v.eq_ignore_ascii_case("bypass") || v.eq_ignore_ascii_case("no-cache")
        })
    })
}

/// One gateway's response cache: a backend and the checks around it.
#[derive(Debug)]
pub struct Cache {
    backend: Arc<dyn Backend>,
    /// The `[cache]` settings it was built from (`None`: a given backend).
    settings: Option<CacheStore>,
    hits: AtomicU64,
    misses: AtomicU64,
    mismatches: AtomicU64,
}

impl Cache {
    /// A cache over any backend.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            settings: None,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
        }
    }

    /// The cache the `[cache]` section describes; `redis` is the process's
    /// shared backend, when `[state]` has a Redis. (Without one, which a
    /// config that changed `[state]` after start can ask for, a `redis`
    /// cache is kept in this process until the next start.)
    pub fn from_config(settings: &CacheStore, redis: Option<&Arc<RedisBackend>>) -> Self {
        let backend: Arc<dyn Backend> = match (settings.backend, redis) {
            (CacheBackend::Redis, Some(r)) => Arc::clone(r) as Arc<dyn Backend>,
            (CacheBackend::Redis, None) => {
                tracing::warn!(
                    "[cache] backend = \"redis\" without a Redis in this process's [state]: the cache stays local until the next start"
                );
                Arc::new(MemoryBackend::new(settings.max_bytes))
            }
            (CacheBackend::Memory, _) => Arc::new(MemoryBackend::new(settings.max_bytes)),
        };
        Self {
            settings: Some(*settings),
            ..Self::new(backend)
        }
    }

    pub fn settings(&self) -> Option<&CacheStore> {
        self.settings.as_ref()
    }

    /// The entry for `key`, if the backend has one that belongs to `tenant`
    /// and to this very request, and is fresh. Anything else is a miss; an
    /// entry of another tenant or request is also dropped, logged and counted.
    pub async fn lookup(&self, tenant: &str, key: &Key) -> Lookup {
        self.read(tenant, key).await.0
    }

    /// [`Self::lookup`], and whether an entry of another tenant or request
    /// was dropped on the way.
    async fn read(&self, tenant: &str, key: &Key) -> (Lookup, bool) {
        let Some(entry) = self.backend.get(key).await else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return (Lookup::Miss, false);
        };
        if entry.tenant != tenant || entry.request_hash != *key {
            self.mismatches.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                tenant = %tenant,
                key = %key,
                entry_tenant = %entry.tenant,
                entry_request_hash = %entry.request_hash,
                "response cache: the backend returned an entry of another {}; dropped, not served",
                if entry.tenant == tenant { "request" } else { "tenant" },
            );
            self.backend.remove(key).await;
            self.misses.fetch_add(1, Ordering::Relaxed);
            return (Lookup::Miss, true);
        }
        if !entry.is_fresh(SystemTime::now()) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return (Lookup::Miss, false);
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        (Lookup::Hit(entry), false)
    }

    /// Stores `entry` under its own `request_hash`.
    pub async fn store(&self, entry: Entry) {
        let key = entry.request_hash;
        self.backend.put(key, Arc::new(entry)).await;
    }

    /// The cache step of one request on a route with `policy`: a verified
    /// hit to replay, or the request goes upstream with what to do after.
    /// The caller counts the outcome ([`Outcome::status`],
    /// [`Outcome::mismatched`]).
    pub async fn visit(self: &Arc<Self>, ask: &Ask<'_>, policy: RouteCache) -> Outcome {
        let key = if ask.bypass {
            None
        } else {
            Key::of(ask.tenant, ask.format, ask.endpoint, ask.stream, ask.body)
        };
        let Some(key) = key else {
            return Outcome::Forward(Visit {
                status: Status::Bypass,
                mismatched: false,
                pending: None,
            });
        };
        let (lookup, mismatched) = self.read(ask.tenant, &key).await;
        if let Lookup::Hit(entry) = lookup {
            return Outcome::Hit(entry);
        }
        Outcome::Forward(Visit {
            status: Status::Miss,
            mismatched,
            pending: Some(Pending {
                cache: Arc::clone(self),
                key,
                tenant: ask.tenant.to_owned(),
                format: ask.format,
                stream: ask.stream,
                policy,
            }),
        })
    }

    /// Entries served.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Lookups that found nothing servable (mismatches included).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Entries the backend returned for another tenant or request: dropped.
    pub fn mismatches(&self) -> u64 {
        self.mismatches.load(Ordering::Relaxed)
    }

    /// Values the backend refused as unreadable (see [`Backend::rejected`]).
    pub fn rejected(&self) -> u64 {
        self.backend.rejected()
    }
}

/// What a request on a cached route brings to the cache.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The authenticated caller's tenant.
    pub tenant: &'a str,
    pub format: ClientFormat,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub body: &'a [u8],
    /// The client sent `x-detour-cache: bypass`.
    pub bypass: bool,
}

/// What [`Cache::visit`] decided.
#[derive(Debug)]
pub enum Outcome {
    Hit(Arc<Entry>),
    /// Go upstream; the visit says how to label and maybe store the answer.
    Forward(Visit),
}

impl Outcome {
    /// `hit`, `miss` or `bypass`: for `x-detour-cache` and the lookup count.
    pub fn status(&self) -> Status {
        match self {
            Self::Hit(_) => Status::Hit,
            Self::Forward(v) => v.status,
        }
    }

    /// The backend offered an entry of another tenant or request, which was
    /// dropped (and logged): a miss the operator should hear about.
    pub fn mismatched(&self) -> bool {
        matches!(self, Self::Forward(v) if v.mismatched)
    }
}

/// A request on a cached route that goes upstream.
#[derive(Debug)]
pub struct Visit {
    status: Status,
    mismatched: bool,
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    cache: Arc<Cache>,
    key: Key,
    tenant: String,
    format: ClientFormat,
    stream: bool,
    policy: RouteCache,
}

impl Visit {
    /// `miss` or `bypass`, for `x-detour-cache`.
    pub fn status(&self) -> Status {
        self.status
    }

    /// For the answer the client is about to get: the capture that stores it
    /// once its body ends whole, if it may be stored (a miss, status 200).
    pub fn capture(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        provider: &str,
        model: &str,
    ) -> Option<Capture> {
        if status != StatusCode::OK {
            return None;
        }
        let p = self.pending.take()?;
        let entry = Entry {
            tenant: p.tenant,
            request_hash: p.key,
            format: p.format,
            stream: p.stream,
            status: status.as_u16(),
            content_type: headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            provider: provider.to_owned(),
            model: model.to_owned(),
            body: Bytes::new(),
            stored_at: SystemTime::UNIX_EPOCH,
            ttl: p.policy.ttl,
        };
        Some(Capture {
            cache: p.cache,
            entry,
            parts: Vec::new(),
            len: 0,
            max_bytes: p.policy.max_entry_bytes,
        })
    }
}

/// A copy of the bytes sent to one client, bounded, to be stored when the
/// body ends whole. Dropped unused when it does not.
#[derive(Debug)]
pub struct Capture {
    cache: Arc<Cache>,
    /// Everything but the body and `stored_at`.
    entry: Entry,
    parts: Vec<Bytes>,
    len: usize,
    max_bytes: usize,
}

impl Capture {
    /// Keeps `data`; false once the answer outgrew the bound (then the
    /// capture holds nothing and should be dropped).
    pub fn push(&mut self, data: &Bytes) -> bool {
        self.len = self.len.saturating_add(data.len());
        if self.len > self.max_bytes {
            self.parts = Vec::new();
            return false;
        }
        self.parts.push(data.clone());
        true
    }

    /// The body ended whole: stores the answer.
    pub fn finish(self) -> BoxFuture<'static, ()> {
        let Self {
            cache,
            mut entry,
            parts,
            len,
            ..
        } = self;
        Box::pin(async move {
            // A fresh copy: the parts may be views into larger buffers.
            let mut body = BytesMut::with_capacity(len);
            for p in &parts {
                body.extend_from_slice(p);
            }
            entry.body = body.freeze();
            entry.stored_at = SystemTime::now();
            cache.store(entry).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_after_blank_lines() {
        let body = Bytes::from_static(b"data: a\n\ndata: b\n\ndata: [DONE]\n\n");
        let parts = split_events(&body);
        assert_eq!(parts.len(), 3);
        assert_eq!(&parts[2][..], b"data: [DONE]\n\n");
        assert_eq!(parts.concat(), body.to_vec());
        let tail = Bytes::from_static(b"data: a\n\npartial");
        assert_eq!(split_events(&tail).concat(), tail.to_vec());
        assert!(split_events(&Bytes::new()).is_empty());
    }

    /// A backend that answers every key with the one entry it holds.
    #[derive(Debug, Default)]
    struct Crossed(std::sync::RwLock<Option<Arc<Entry>>>);

    impl Backend for Crossed {
        fn get<'a>(&'a self, _: &'a Key) -> BoxFuture<'a, Option<Arc<Entry>>> {
            Box::pin(async move { self.0.read().unwrap().clone() })
        }
        fn put(&self, _: Key, entry: Arc<Entry>) -> BoxFuture<'_, ()> {
            *self.0.write().unwrap() = Some(entry);
            Box::pin(async {})
        }
        fn remove<'a>(&'a self, _: &'a Key) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
    }

    fn ask<'a>(tenant: &'a str, bypass: bool) -> Ask<'a> {
        Ask {
            tenant,
            format: ClientFormat::OpenAi,
            endpoint: Endpoint::ChatCompletions,
            stream: false,
            body: b"{}",
            bypass,
        }
    }

    #[tokio::test]
    async fn a_visit_reports_its_outcome_for_the_caller_to_count() {
        let cache = Arc::new(Cache::new(Arc::new(Crossed::default())));
        let policy = RouteCache {
            ttl: Duration::from_secs(60),
            max_entry_bytes: 1 << 20,
        };
        let bypass = cache.visit(&ask("a", true), policy).await;
        assert_eq!(
            (bypass.status(), bypass.mismatched()),
            (Status::Bypass, false)
        );
        let miss = cache.visit(&ask("a", false), policy).await;
        assert_eq!((miss.status(), miss.mismatched()), (Status::Miss, false));
        let Outcome::Forward(mut visit) = miss else {
            panic!("a miss goes upstream")
        };
        let mut capture = visit
            .capture(StatusCode::OK, &HeaderMap::new(), "p", "m")
            .unwrap();
        assert!(capture.push(&Bytes::from_static(b"{}")));
        capture.finish().await;
        let hit = cache.visit(&ask("a", false), policy).await;
        assert_eq!((hit.status(), hit.mismatched()), (Status::Hit, false));
        // The backend hands a's entry to b: dropped, and said so.
        let crossed = cache.visit(&ask("b", false), policy).await;
        assert_eq!(
            (crossed.status(), crossed.mismatched()),
            (Status::Miss, true)
        );
        assert_eq!(cache.mismatches(), 1);
    }

    #[test]
    fn the_bypass_header() {
        let mut h = HeaderMap::new();
        assert!(!bypass_requested(&h));
        h.insert(HEADER, HeaderValue::from_static("No-Cache"));
        assert!(bypass_requested(&h));
        h.insert(HEADER, HeaderValue::from_static(" bypass "));
        assert!(bypass_requested(&h));
        h.insert(HEADER, HeaderValue::from_static("please"));
        assert!(!bypass_requested(&h));
    }
}
