//! The response cache: over real loopback HTTP through a gateway to `detour
//! mock`, and at the `Cache` API with counting and faulty backends.
//!
//! Every mock answer carries its own sequence number (`x_mock.seq`) and ids,
//! so two answers are byte-equal only if one is a replay of the other: a
//! body that equals another tenant's is a cross-tenant hit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::*;
use detour::cache::{Backend, BoxFuture, Cache, Entry, Key, Lookup, MemoryBackend};
use detour::error::ClientFormat;
use detour::providers::Endpoint;
use detour::server::Running;
use detour::state::Gateway;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// A route `fast` with the given cache table, a plain route `plain`, and one
/// key per tenant: `dk-<tenant>`.
fn config(upstream: SocketAddr, cache: &str, tenants: &[String]) -> String {
    let mut route = format!(
        "cache = {cache}\n\n[[routes]]\nmodel = \"plain\"\ntargets = [{{ provider = \"p\", model = \"gpt-up\" }}]\n"
    );
    for t in tenants {
        route.push_str(&format!("\n[[keys]]\nkey = \"dk-{t}\"\ntenant = \"{t}\"\n"));
    }
    one_route(upstream, &route, "")
}

fn two_tenants() -> Vec<String> {
    vec!["a".to_owned(), "b".to_owned()]
}

struct Answer {
    status: u16,
    cache: Option<String>,
    attempts: Option<String>,
    provider: Option<String>,
    content_type: String,
    content_length: Option<String>,
    body: String,
}

async fn send(
    gw: &Running,
    path: &str,
    tenant: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> Answer {
    let mut req = client()
        .post(format!("{}{path}", gw.url()))
        .bearer_auth(format!("dk-{tenant}"))
        .json(body);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let h = resp.headers().clone();
    let get = |name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
    Answer {
        status: resp.status().as_u16(),
        cache: get("x-detour-cache"),
        attempts: get("x-detour-attempts"),
        provider: get("x-detour-provider"),
        content_type: get("content-type").unwrap_or_default(),
        content_length: get("content-length"),
        body: resp.text().await.unwrap(),
    }
}

async fn chat_as(gw: &Running, tenant: &str, body: &Value) -> Answer {
    send(gw, "/v1/chat/completions", tenant, body, &[]).await
}

fn prompt(text: &str, stream: bool) -> Value {
    json!({
        "model": "fast",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    })
}

#[tokio::test]
async fn a_miss_then_a_hit_calls_upstream_once() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), r#"{ ttl = "5m" }"#, &two_tenants())).await;
    let first = chat_as(&gw, "a", &prompt("Say hello", false)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.cache.as_deref(), Some("miss"));
    assert_eq!(first.attempts.as_deref(), Some("1"));

    // Field order, whitespace and `user` do not make another request.
    let same = json!({"user": "end-user-7", "stream": false, "messages": [{"content": "Say hello", "role": "user"}], "model": "fast"});
    let second = chat_as(&gw, "a", &same).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.cache.as_deref(), Some("hit"));
    assert_eq!(second.attempts.as_deref(), Some("0"));
    assert_eq!(second.provider.as_deref(), Some("p"));
    assert_eq!(second.content_type, "application/json");
    assert_eq!(
        second.body, first.body,
        "the replay is the original's bytes"
    );
    assert_eq!(up.stats().chat_completions, 1, "upstream called once");

    // A different prompt is a different request.
    let other = chat_as(&gw, "a", &prompt("Say goodbye", false)).await;
    assert_eq!(other.cache.as_deref(), Some("miss"));
    assert_eq!(up.stats().chat_completions, 2);

    // Routes that did not opt in carry no cache header and are never cached.
    let mut plain = prompt("Say hello", false);
    plain["model"] = json!("plain");
    for _ in 0..2 {
        let a = chat_as(&gw, "a", &plain).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.cache, None);
    }
    assert_eq!(up.stats().chat_completions, 4);
    assert_eq!(gw.gateway.live().cache.mismatches(), 0);
}

#[tokio::test]
async fn a_stream_is_cached_and_replayed_as_a_stream() {
    let up = mock().await;
    up.set_faults(faults(json!({"chunks": 6})));
    let gw = gateway(&config(up.addr(), "{}", &two_tenants())).await;
    let mut body = prompt("Tell a story", true);
    body["stream_options"] = json!({"include_usage": true});
    let first = chat_as(&gw, "a", &body).await;
    assert_eq!(first.cache.as_deref(), Some("miss"));
    let second = chat_as(&gw, "a", &body).await;
    assert_eq!(second.cache.as_deref(), Some("hit"));
    assert_eq!(second.attempts.as_deref(), Some("0"));
    assert!(
        second.content_type.starts_with("text/event-stream"),
        "{}",
        second.content_type
    );
    assert_eq!(second.content_length, None, "replayed chunked, as a stream");
    assert_eq!(second.body, first.body);
    let data = sse_data(&second.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 6, "{chunks:?}");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(
        chunks.last().unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(up.stats().chat_completions, 1);

    // The same prompt not streamed is another entry (and stream_options too).
    let whole = chat_as(&gw, "a", &prompt("Tell a story", true)).await;
    assert_eq!(whole.cache.as_deref(), Some("miss"));
    let whole = chat_as(&gw, "a", &prompt("Tell a story", false)).await;
    assert_eq!(whole.cache.as_deref(), Some("miss"));
    assert!(whole.content_type.starts_with("application/json"));
    assert_eq!(up.stats().chat_completions, 3);
}

#[tokio::test]
async fn broken_streams_are_relayed_but_never_stored() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "{}", &two_tenants())).await;
    // OpenAI clients (relayed as events) and Anthropic clients (re-encoded).
    let openai = (
        "/v1/chat/completions",
        prompt("Tell a story", true),
        "[DONE]",
    );
    let anthropic = (
        "/v1/messages",
        json!({
            "model": "fast",
            "max_tokens": 64,
            "stream": true,
            "messages": [{"role": "user", "content": "Tell a story"}],
        }),
        r#"{"type":"message_stop"}"#,
    );
    for (path, body, end) in [openai, anthropic] {
        up.reset();
        for fault in [
            json!({"cut_after_chunks": 2}),
            json!({"stream_error_after_chunks": 2}),
        ] {
            up.set_faults(faults(fault.clone()));
            let broken = send(&gw, path, "a", &body, &[]).await;
            assert_eq!(broken.status, 200, "{path} {fault}");
            assert_eq!(broken.cache.as_deref(), Some("miss"), "{path} {fault}");
            assert!(!broken.body.is_empty());
            assert_ne!(last_data(&broken.body), Some(end), "{path} {fault}");
        }
        up.set_faults(faults(json!({})));
        let whole = send(&gw, path, "a", &body, &[]).await;
        assert_eq!(
            whole.cache.as_deref(),
            Some("miss"),
            "{path}: nothing broken was stored"
        );
        assert_eq!(last_data(&whole.body), Some(end), "{path}");
        let again = send(&gw, path, "a", &body, &[]).await;
        assert_eq!(again.cache.as_deref(), Some("hit"), "{path}");
        assert_eq!(again.body, whole.body);
        assert_eq!(up.stats().chat_completions, 3, "{path}");
    }
}

#[tokio::test]
async fn errors_are_not_stored() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "{}", &two_tenants())).await;
    up.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let body = prompt("Say hello", false);
    let failed = chat_as(&gw, "a", &body).await;
    assert!(failed.status >= 500, "{}", failed.status);
    assert_eq!(
        failed.cache.as_deref(),
        Some("miss"),
        "failures are labelled too"
    );
    up.set_faults(faults(json!({})));
    assert_eq!(
        chat_as(&gw, "a", &body).await.cache.as_deref(),
        Some("miss")
    );
    assert_eq!(chat_as(&gw, "a", &body).await.cache.as_deref(), Some("hit"));
}

#[tokio::test]
async fn the_bypass_header_neither_reads_nor_writes() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "{}", &two_tenants())).await;
    let body = prompt("Say hello", false);
    let bypass = [("x-detour-cache", "bypass")];
    let a = send(&gw, "/v1/chat/completions", "a", &body, &bypass).await;
    assert_eq!(a.cache.as_deref(), Some("bypass"));
    // It did not store: the next plain request misses.
    let b = chat_as(&gw, "a", &body).await;
    assert_eq!(b.cache.as_deref(), Some("miss"));
    assert_ne!(b.body, a.body);
    // And it does not read: with an entry present, it still goes upstream.
    let no_cache = [("x-detour-cache", "no-cache")];
    let c = send(&gw, "/v1/chat/completions", "a", &body, &no_cache).await;
    assert_eq!(c.cache.as_deref(), Some("bypass"));
    assert_ne!(c.body, b.body);
    let d = chat_as(&gw, "a", &body).await;
    assert_eq!(d.cache.as_deref(), Some("hit"));
    assert_eq!(d.body, b.body, "the bypass did not overwrite the entry");
    assert_eq!(up.stats().chat_completions, 3);
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), r#"{ ttl = "1s" }"#, &two_tenants())).await;
    let body = prompt("Say hello", false);
    let first = chat_as(&gw, "a", &body).await;
    assert_eq!(chat_as(&gw, "a", &body).await.cache.as_deref(), Some("hit"));
    // The TTL itself is what is tested here: real time has to pass.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = chat_as(&gw, "a", &body).await;
    assert_eq!(later.cache.as_deref(), Some("miss"));
    assert_ne!(later.body, first.body);
    assert_eq!(up.stats().chat_completions, 2);
}

#[tokio::test]
async fn answers_over_max_entry_bytes_are_relayed_not_stored() {
    let up = mock().await;
    let gw = gateway(&config(
        up.addr(),
        "{ max_entry_bytes = 64 }",
        &two_tenants(),
    ))
    .await;
    for stream in [false, true] {
        let body = prompt("Say hello", stream);
        let a = chat_as(&gw, "a", &body).await;
        assert!(
            a.body.len() > 64,
            "the mock's answer is larger than the bound"
        );
        assert_eq!(a.status, 200);
        let b = chat_as(&gw, "a", &body).await;
        assert_eq!(b.cache.as_deref(), Some("miss"), "stream: {stream}");
    }
    assert_eq!(up.stats().chat_completions, 4);
}

#[tokio::test]
async fn the_memory_backend_keeps_to_its_total_size() {
    let backend = MemoryBackend::new(20_000);
    let cache = Cache::new(Arc::new(backend.clone()));
    for i in 0..100 {
        cache.store(entry(&format!("t{i}"), "p", 1000)).await;
    }
    backend.sync().await;
    assert!(
        backend.weighted_size() <= 20_000,
        "{}",
        backend.weighted_size()
    );
    assert!(backend.entry_count() < 100 && backend.entry_count() > 0);
}

#[tokio::test]
async fn one_tenants_entry_is_never_served_to_another() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "{}", &two_tenants())).await;
    let body = prompt("The same prompt", false);
    let a1 = chat_as(&gw, "a", &body).await;
    let b1 = chat_as(&gw, "b", &body).await;
    assert_eq!(a1.cache.as_deref(), Some("miss"));
    assert_eq!(
        b1.cache.as_deref(),
        Some("miss"),
        "b does not hit a's entry"
    );
    assert_ne!(a1.body, b1.body);
    let a2 = chat_as(&gw, "a", &body).await;
    let b2 = chat_as(&gw, "b", &body).await;
    assert_eq!(
        (a2.cache.as_deref(), b2.cache.as_deref()),
        (Some("hit"), Some("hit"))
    );
    assert_eq!(a2.body, a1.body);
    assert_eq!(b2.body, b1.body);
    assert_eq!(up.stats().chat_completions, 2);
    assert_eq!(gw.gateway.live().cache.mismatches(), 0);
}

#[tokio::test]
async fn anthropic_clients_and_embeddings_are_cached_too() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "{}", &two_tenants())).await;
    let messages = json!({
        "model": "fast",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello"}],
    });
    let version = [("anthropic-version", "2023-06-01")];
    let m1 = send(&gw, "/v1/messages", "a", &messages, &version).await;
    assert_eq!(
        (m1.status, m1.cache.as_deref()),
        (200, Some("miss")),
        "{}",
        m1.body
    );
    let m2 = send(&gw, "/v1/messages", "a", &messages, &version).await;
    assert_eq!(m2.cache.as_deref(), Some("hit"));
    assert_eq!(m2.body, m1.body);
    let v: Value = serde_json::from_str(&m2.body).unwrap();
    assert_eq!(v["type"], "message", "still in the Anthropic shape");

    let embed = json!({"model": "fast", "input": "Say hello"});
    let e1 = send(&gw, "/v1/embeddings", "a", &embed, &[]).await;
    let e2 = send(&gw, "/v1/embeddings", "a", &embed, &[]).await;
    assert_eq!(
        (e1.cache.as_deref(), e2.cache.as_deref()),
        (Some("miss"), Some("hit"))
    );
    assert_eq!(e2.body, e1.body);
    assert_eq!(up.stats().chat_completions, 1);
    assert_eq!(up.stats().embeddings, 1);
}

/// 1,000 tenants send the same prompt at once, twice: every first answer is a
/// miss, every second a hit with that tenant's own first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_tenants_with_one_prompt_get_only_their_own_entries() {
    let up = mock().await;
    let tenants: Vec<String> = (0..1000).map(|i| format!("tenant-{i:04}")).collect();
    let gw = Arc::new(gateway(&config(up.addr(), "{}", &tenants)).await);
    let body = prompt("Identical prompt for everyone", false);
    let round = |gw: Arc<Running>| {
        let body = body.clone();
        futures_util::future::join_all(tenants.iter().cloned().map(move |t| {
            let gw = Arc::clone(&gw);
            let body = body.clone();
            tokio::spawn(async move {
                let a = chat_as(&gw, &t, &body).await;
                assert_eq!(a.status, 200, "{}", a.body);
                (t, a.cache.unwrap_or_default(), a.body)
            })
        }))
    };
    let first: Vec<_> = round(Arc::clone(&gw))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(first.iter().all(|(_, c, _)| c == "miss"));
    let own: std::collections::HashMap<&str, &str> = first
        .iter()
        .map(|(t, _, b)| (t.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        own.values().collect::<HashSet<_>>().len(),
        1000,
        "every tenant's answer is distinct"
    );
    assert_eq!(up.stats().chat_completions, 1000);

    let second: Vec<_> = round(Arc::clone(&gw))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut hits = 0;
    let mut cross_tenant_hits = 0;
    for (t, c, b) in &second {
        if c == "hit" {
            hits += 1;
        }
        if own
            .iter()
            .any(|(other, body)| *other != t.as_str() && body == b)
        {
            cross_tenant_hits += 1;
        }
    }
    assert_eq!(cross_tenant_hits, 0);
    assert_eq!(hits, 1000);
    assert!(second.iter().all(|(t, _, b)| own[t.as_str()] == b));
    assert_eq!(
        up.stats().chat_completions,
        1000,
        "no second round went upstream"
    );
    assert_eq!(gw.gateway.live().cache.mismatches(), 0);
}

/// The same at the `Cache` API, over a backend that counts what it is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_tenants_at_the_cache_api() {
    let counting = Arc::new(Counting {
        inner: MemoryBackend::new(64 * 1024 * 1024),
        gets: AtomicU64::new(0),
        puts: AtomicU64::new(0),
    });
    let cache = Arc::new(Cache::new(counting.clone()));
    let body = br#"{"model":"fast","messages":[{"role":"user","content":"same"}]}"#;
    let tasks = (0..1000).map(|i| {
        let cache = Arc::clone(&cache);
        tokio::spawn(async move {
            let tenant = format!("tenant-{i}");
            let key = key_of(&tenant, body);
            assert!(matches!(cache.lookup(&tenant, &key).await, Lookup::Miss));
            let mut e = entry(&tenant, "same", 100);
            e.request_hash = key;
            e.body = Bytes::from(format!("answer for {tenant}"));
            cache.store(e).await;
            tokio::task::yield_now().await;
            match cache.lookup(&tenant, &key).await {
                Lookup::Hit(e) => (tenant, key, e),
                Lookup::Miss => panic!("{tenant}: its own entry is missing"),
            }
        })
    });
    let results = futures_util::future::join_all(tasks).await;
    let mut keys = HashSet::new();
    let mut cross_tenant_hits = 0;
    for r in results {
        let (tenant, key, e) = r.unwrap();
        keys.insert(key);
        if e.tenant != tenant || e.body != format!("answer for {tenant}") {
            cross_tenant_hits += 1;
        }
    }
    assert_eq!(cross_tenant_hits, 0);
    assert_eq!(keys.len(), 1000, "one key per tenant for the same body");
    assert_eq!(counting.gets.load(Ordering::Relaxed), 2000);
    assert_eq!(counting.puts.load(Ordering::Relaxed), 1000);
    assert_eq!((cache.hits(), cache.mismatches()), (1000, 0));
}

/// A backend that answers every read with an entry stored under another key
/// (the crossed-replies failure of a shared cache's client).
#[derive(Debug, Default)]
struct Faulty {
    stored: RwLock<Vec<(Key, Arc<Entry>)>>,
    wrong_answers: AtomicU64,
}

impl Backend for Faulty {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Arc<Entry>>> {
        let stored = self.stored.read().unwrap();
        let other = stored
            .iter()
            .rev()
            .find(|(k, _)| k != key)
            .map(|(_, e)| Arc::clone(e));
        if other.is_some() {
            self.wrong_answers.fetch_add(1, Ordering::Relaxed);
        }
        Box::pin(async move { other })
    }

    fn put(&self, key: Key, entry: Arc<Entry>) -> BoxFuture<'_, ()> {
        self.stored.write().unwrap().push((key, entry));
        Box::pin(async {})
    }

    fn remove<'a>(&'a self, _: &'a Key) -> BoxFuture<'a, ()> {
        // Faulty indeed: forgets nothing.
        Box::pin(async {})
    }
}

#[tokio::test]
async fn a_faulty_backend_never_gets_a_wrong_entry_to_a_client() {
    let up = mock().await;
    let text = config(up.addr(), "{}", &two_tenants());
    let cfg = || detour::config::load_str(&text, "test.toml").unwrap();
    let gw = Arc::new(Gateway::new(cfg()).unwrap());
    let faulty = Arc::new(Faulty::default());
    let cache = Arc::new(Cache::new(faulty.clone()));
    gw.cache().install(Arc::clone(&cache));
    gw.swap(cfg()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = Running::start(gw, listener, detour::public_status::routes())
        .await
        .unwrap();

    let same = prompt("The same prompt", false);
    let asks = [
        ("a", same.clone()),
        ("b", same.clone()), // a's entry offered: another tenant
        ("a", same.clone()), // b's entry offered: another tenant
        ("a", prompt("Another prompt", false)), // a's entry offered: another request
        ("b", prompt("Another prompt", true)),
    ];
    let mut seen = Vec::new();
    for (tenant, body) in &asks {
        let answer = chat_as(&gw, tenant, body).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.cache.as_deref(), Some("miss"));
        assert!(
            !seen.contains(&answer.body),
            "a stored answer reached {tenant}: the faulty backend's entry was served"
        );
        seen.push(answer.body);
    }
    assert_eq!(up.stats().chat_completions, asks.len() as u64);
    let offered = faulty.wrong_answers.load(Ordering::Relaxed);
    assert_eq!(
        offered,
        asks.len() as u64 - 1,
        "every read after the first got a wrong entry"
    );
    assert_eq!(cache.mismatches(), offered, "each wrong entry was counted");
    assert_eq!(cache.hits(), 0);
    assert_eq!(gw.gateway.live().cache.mismatches(), offered);
}

#[tokio::test]
async fn lookup_checks_tenant_hash_and_age() {
    let faulty = Arc::new(Faulty::default());
    let cache = Cache::new(faulty.clone());
    let key_a = key_of("a", b"{}");
    let mut e = entry("a", "p", 10);
    e.request_hash = key_a;
    cache.store(e.clone()).await;
    // The faulty backend offers a's entry for b's key: dropped.
    assert!(matches!(
        cache.lookup("b", &key_of("b", b"{}")).await,
        Lookup::Miss
    ));
    // An entry that names a tenant but was stored for another request.
    let mut forged = e.clone();
    forged.tenant = "b".into();
    cache.store(forged).await;
    assert!(matches!(
        cache.lookup("b", &key_of("b", b"{}")).await,
        Lookup::Miss
    ));
    assert_eq!(cache.mismatches(), 2);

    // A correct backend, an entry past its TTL: a plain miss, not a mismatch.
    let honest = Cache::new(Arc::new(MemoryBackend::new(1 << 20)));
    let mut old = e.clone();
    old.stored_at = SystemTime::now() - Duration::from_secs(120);
    old.ttl = Duration::from_secs(60);
    honest.store(old).await;
    assert!(matches!(honest.lookup("a", &key_a).await, Lookup::Miss));
    honest.store(e).await;
    assert!(matches!(honest.lookup("a", &key_a).await, Lookup::Hit(_)));
    assert!(matches!(honest.lookup("b", &key_a).await, Lookup::Miss));
    assert_eq!(honest.mismatches(), 1, "right key, wrong tenant: dropped");
}

#[derive(Debug)]
struct Counting {
    inner: MemoryBackend,
    gets: AtomicU64,
    puts: AtomicU64,
}

impl Backend for Counting {
    fn get<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Option<Arc<Entry>>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key)
    }

    fn put(&self, key: Key, entry: Arc<Entry>) -> BoxFuture<'_, ()> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put(key, entry)
    }

    fn remove<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, ()> {
        self.inner.remove(key)
    }
}

/// The data of an SSE body's last event (events may have `event:` lines).
fn last_data(body: &str) -> Option<&str> {
    body.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .last()
}

fn key_of(tenant: &str, body: &[u8]) -> Key {
    Key::of(
        tenant,
        ClientFormat::OpenAi,
        Endpoint::ChatCompletions,
        false,
        body,
    )
    .unwrap()
}

/// An entry of `tenant` for the request `{"p": prompt}`, with a body of `len` bytes.
fn entry(tenant: &str, prompt: &str, len: usize) -> Entry {
    Entry {
        tenant: tenant.to_owned(),
        request_hash: key_of(tenant, json!({ "p": prompt }).to_string().as_bytes()),
        format: ClientFormat::OpenAi,
        stream: false,
        status: 200,
        content_type: Some("application/json".into()),
        provider: "p".into(),
        model: "m".into(),
        body: Bytes::from(vec![b'x'; len]),
        stored_at: SystemTime::now(),
        ttl: Duration::from_secs(60),
    }
}
