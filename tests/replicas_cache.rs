//! The response cache shared by replicas on Redis (`[cache] backend =
//! "redis"`): a hit across replicas for the same tenant and never across
//! tenants; the cancellation proof of the March 2023 incident (PRODUCT.md);
//! Redis killed under load. Each test starts its own `redis-server`.
//!
//! The replicas are several `Gateway`s in one process, each with its own
//! `Shared` connection to Redis.
//!
//! That `Cache` drops an entry a broken backend hands to the wrong caller
//! (another tenant's or another request's) is shown at the `Cache` API by
//! `cache::tests::a_visit_reports_its_outcome_for_the_caller_to_count`,
//! and through a gateway by `tests/cache.rs`
//! (`a_faulty_backend_never_gets_a_wrong_entry_to_a_client`,
//! `lookup_checks_tenant_hash_and_age`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use common::redis::{wait_until_up, RedisServer};
use common::*;
use detour::cache::Key;
use detour::error::ClientFormat;
use detour::providers::Endpoint;
use detour::server::Running;

/// One replica: route `fast` cached for 60 s, a key `dk-<t>` per tenant, state
/// and cache on `redis_url` with `timeout`.
fn replica_config(
    upstream: SocketAddr,
    redis_url: &str,
    timeout: &str,
    tenants: &[String],
) -> String {
    let mut route = "cache = { ttl = \"60s\" }\n".to_owned();
    for t in tenants {
        route.push_str(&format!("\n[[keys]]\nkey = \"dk-{t}\"\ntenant = \"{t}\"\n"));
    }
    one_route(
        upstream,
        &route,
        &format!(
            "admin_listen = \"127.0.0.1:0\"\n\n[state]\nbackend = \"redis\"\nredis_url = \"{redis_url}\"\ntimeout = \"{timeout}\"\n\n[cache]\nbackend = \"redis\"\n"
        ),
    )
}

fn tenants(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tenant-{i:02}")).collect()
}

/// `n` replicas on the same Redis, each reaching it.
async fn replicas(n: usize, config: &str) -> Vec<Arc<Running>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(gateway(config).await));
    }
    for gw in &out {
        wait_until_up(gw).await;
    }
    out
}

fn prompt(text: &str, stream: bool) -> Value {
    json!({
        "model": "fast",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    })
}

struct Answer {
    status: u16,
    cache: String,
    body: String,
}

async fn ask(
    client: &reqwest::Client,
    gw: &Running,
    tenant: &str,
    body: &Value,
) -> reqwest::Result<Answer> {
    let resp = client
        .post(format!("http://{}/v1/chat/completions", gw.addr))
        .bearer_auth(format!("dk-{tenant}"))
        .json(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-detour-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.text().await?;
    Ok(Answer {
        status,
        cache,
        body,
    })
}

/// The text of an answer, whole or streamed.
fn content_of(body: &str, stream: bool) -> Option<String> {
    if !stream {
        let v: Value = serde_json::from_str(body).ok()?;
        return v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned);
    }
    let mut text = String::new();
    let mut done = false;
    for data in sse_data(body) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).ok()?;
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    done.then_some(text)
}

/// What the provider answers `text` with, asked directly: the mock's content
/// depends only on its seed, the model and the messages.
async fn expected_content(upstream: SocketAddr, text: &str) -> String {
    let body: Value = client()
        .post(format!("http://{upstream}/v1/chat/completions"))
        .json(&json!({"model": "gpt-up", "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The value of the series `series` (exact text before the value) in a
/// Prometheus scrape, summed over the lines that start with it.
fn metric_sum(text: &str, prefix: &str, must_contain: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && must_contain.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(admin: &str) -> String {
    client()
        .get(format!("{admin}/metrics"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_hit_on_another_replica_for_the_same_tenant_and_never_for_another() {
    let redis = RedisServer::start();
    let up = mock().await;
    let config = replica_config(up.addr(), &redis.url(), "100ms", &tenants(3));
    let gws = replicas(2, &config).await;
    let (a, b) = (&gws[0], &gws[1]);
    let c = client();
    let body = prompt("One prompt, three tenants", false);

    let first = ask(&c, a, "tenant-00", &body).await.unwrap();
    assert_eq!(
        (first.status, first.cache.as_str()),
        (200, "miss"),
        "{}",
        first.body
    );
    let second = ask(&c, b, "tenant-00", &body).await.unwrap();
    assert_eq!(
        second.cache, "hit",
        "stored by replica A, read by replica B"
    );
    assert_eq!(second.body, first.body);
    assert_eq!(
        up.stats().chat_completions,
        1,
        "the provider saw one request"
    );

    // Other tenants, the same request: a miss on either replica, never the
    // first tenant's answer; then each one's own answer on the other replica.
    let on_b = ask(&c, b, "tenant-01", &body).await.unwrap();
    let on_a = ask(&c, a, "tenant-02", &body).await.unwrap();
    assert_eq!((on_b.cache.as_str(), on_a.cache.as_str()), ("miss", "miss"));
    assert_ne!(on_b.body, first.body);
    assert_ne!(on_a.body, first.body);
    assert_ne!(on_a.body, on_b.body);
    let again_a = ask(&c, a, "tenant-01", &body).await.unwrap();
    let again_b = ask(&c, b, "tenant-02", &body).await.unwrap();
    assert_eq!(
        (again_a.cache.as_str(), again_b.cache.as_str()),
        ("hit", "hit")
    );
    assert_eq!(again_a.body, on_b.body);
    assert_eq!(again_b.body, on_a.body);
    assert_eq!(up.stats().chat_completions, 3);

    // One entry per tenant in Redis, under the prefix, expiring by Redis.
    let keys = redis.command("KEYS detour:cache:*").unwrap();
    assert!(keys.starts_with("*3\r\n"), "{keys}");
    let name = keys.lines().nth(2).unwrap();
    let pttl = redis.command(&format!("PTTL {name}")).unwrap();
    let ms: i64 = pttl.trim().trim_start_matches(':').parse().unwrap();
    assert!(ms > 50_000 && ms <= 60_000, "{pttl}");
    for gw in &gws {
        let cache = &gw.gateway.live().cache;
        assert_eq!((cache.mismatches(), cache.rejected()), (0, 0));
    }
}

fn key_name(tenant: &str, body: &Value) -> String {
    let key = Key::of(
        tenant,
        ClientFormat::OpenAi,
        Endpoint::ChatCompletions,
        false,
        body.to_string().as_bytes(),
    )
    .unwrap();
    format!("detour:cache:{key}")
}

/// What is in Redis is not trusted: a value that is not an entry is a
/// counted miss, and an entry under another tenant's key (a crossed or forged
/// value) is dropped, counted and deleted, never served.
#[tokio::test]
async fn values_in_redis_are_checked_on_every_read() {
    let redis = RedisServer::start();
    let up = mock().await;
    let config = replica_config(up.addr(), &redis.url(), "100ms", &tenants(2));
    let gws = replicas(1, &config).await;
    let gw = &gws[0];
    let admin = admin(gw, "t").await;
    let c = client();
    let body = prompt("Is what Redis holds trusted?", false);

    // Garbage where tenant-00's entry would be.
    let own = key_name("tenant-00", &body);
    assert!(redis
        .command(&format!("SET {own} not-an-entry"))
        .unwrap()
        .starts_with("+OK"));
    let first = ask(&c, gw, "tenant-00", &body).await.unwrap();
    assert_eq!((first.status, first.cache.as_str()), (200, "miss"));
    let cache = &gw.gateway.live().cache;
    assert_eq!((cache.rejected(), cache.mismatches()), (1, 0));
    let metrics = scrape(&admin).await;
    assert_eq!(
        metric_sum(&metrics, "detour_cache_rejected_total ", &[]),
        1.0,
        "{metrics}"
    );
    // The answer replaced it.
    let again = ask(&c, gw, "tenant-00", &body).await.unwrap();
    assert_eq!(again.cache, "hit");
    assert_eq!(again.body, first.body);

    // tenant-00's entry copied under tenant-01's key for the same request.
    let other = key_name("tenant-01", &body);
    assert_eq!(
        redis
            .command(&format!("COPY {own} {other}"))
            .unwrap()
            .trim(),
        ":1"
    );
    let theirs = ask(&c, gw, "tenant-01", &body).await.unwrap();
    assert_eq!((theirs.status, theirs.cache.as_str()), (200, "miss"));
    assert_ne!(theirs.body, first.body, "tenant-00's answer was served");
    assert_eq!(cache.mismatches(), 1);
    let theirs_again = ask(&c, gw, "tenant-01", &body).await.unwrap();
    assert_eq!(theirs_again.cache, "hit");
    assert_eq!(
        theirs_again.body, theirs.body,
        "its own answer, stored after the drop"
    );
    assert_eq!(up.stats().chat_completions, 2);
}

/// What one client got, or did not.
enum Seen {
    Answer {
        tenant: usize,
        prompt: usize,
        stream: bool,
        cache: String,
        status: u16,
        body: String,
    },
    /// The client gave up on purpose (a disconnect mid-request).
    Cut,
    /// A transport error the client did not cause.
    Failed(String),
}

/// The March 2023 incident, replayed: a Redis client that, when a request was
/// cancelled between sending a command and reading its reply, handed that
/// reply to the next caller. Many tenants at once on two replicas, each
/// request with a distinct answer computable on its own (asked of the mock
/// directly first); clients hang up mid-request at random (during the cache
/// read, the upstream call, the relay or the store); Redis calls time out at
/// random. Every answer any client received must be exactly its own
/// request's answer, and Redis's client must never have crossed a reply.
///
/// The timeouts: `[state] timeout = "30ms"` (a loaded machine exceeds it now
/// and then) and Redis frozen (SIGSTOP) for 15–90 ms at random moments. A
/// freeze around the timeout's length leaves calls that timed out (their
/// replies come after the thaw, to nobody) ahead of calls sent later on the
/// same connection that are answered: the incident's window. Between freezes
/// the test waits for both replicas to be back on Redis (a replica that saw
/// three timeouts in a row bypasses it until its next heartbeat, up to 1 s)
/// and a calm spell, since it needs hits as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_answer_reaches_another_request_while_clients_hang_up_and_redis_times_out() {
    const TENANTS: usize = 16;
    const PROMPTS: usize = 3;
    const WORKERS_PER_TENANT: usize = 2;
    const CHAOS_FOR: Duration = Duration::from_secs(4);

    let redis = Arc::new(RedisServer::start());
    let up = mock().await;
    let names = tenants(TENANTS);
    let config = replica_config(up.addr(), &redis.url(), "30ms", &names);
    let gws = replicas(2, &config).await;
    let admin = admin(&gws[0], "t").await;

    // Each tenant's prompts are its own; every expected answer is distinct,
    // so an answer that reached the wrong request cannot pass for right.
    let text = |t: usize, p: usize| format!("Question {p} of {}", names[t]);
    let mut expected = HashMap::new();
    for t in 0..TENANTS {
        for p in 0..PROMPTS {
            expected.insert((t, p), expected_content(up.addr(), &text(t, p)).await);
        }
    }
    let distinct: std::collections::HashSet<_> = expected.values().collect();
    assert_eq!(
        distinct.len(),
        TENANTS * PROMPTS,
        "the mock's answers differ"
    );
    let asked_directly = up.stats().chat_completions;

    let until = Instant::now() + CHAOS_FOR;
    // Redis frozen in short bursts: calls sent before a freeze get their
    // replies after it, long after their callers gave up.
    let chaos = {
        let redis = Arc::clone(&redis);
        let gws = gws.clone();
        tokio::spawn(async move {
            let mut freezes = 0u32;
            while Instant::now() < until {
                // A calm spell with both replicas on Redis, for entries to be
                // stored and hit, however slow the machine.
                while !gws.iter().all(|gw| gw.gateway.shared().unwrap().is_up())
                    && Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(150..400))).await;
                redis.pause();
                tokio::time::sleep(Duration::from_millis(fastrand::u64(15..90))).await;
                redis.resume();
                freezes += 1;
            }
            freezes
        })
    };
    let mut workers = Vec::new();
    for (t, tenant) in names.iter().enumerate() {
        for _ in 0..WORKERS_PER_TENANT {
            let gws = gws.clone();
            let tenant = tenant.clone();
            let texts: Vec<String> = (0..PROMPTS).map(|p| text(t, p)).collect();
            workers.push(tokio::spawn(async move {
                let c = client();
                let mut seen = Vec::new();
                while Instant::now() < until {
                    let p = fastrand::usize(..PROMPTS);
                    let stream = fastrand::bool();
                    let gw = &gws[fastrand::usize(..gws.len())];
                    let body = prompt(&texts[p], stream);
                    // A third of the clients hang up after a few ms: during
                    // the cache read, the upstream call, the relay or the store.
                    // The others wait long enough for any bounded answer.
                    let cut = fastrand::u8(..3) == 0;
                    let patience = if cut {
                        Duration::from_millis(fastrand::u64(0..15))
                    } else {
                        Duration::from_secs(5)
                    };
                    seen.push(
                        match tokio::time::timeout(patience, ask(&c, gw, &tenant, &body)).await {
                            Err(_) if cut => Seen::Cut,
                            Err(_) => Seen::Failed("no answer within 5 s".to_owned()),
                            Ok(Err(e)) => Seen::Failed(e.to_string()),
                            Ok(Ok(a)) => Seen::Answer {
                                tenant: t,
                                prompt: p,
                                stream,
                                cache: a.cache,
                                status: a.status,
                                body: a.body,
                            },
                        },
                    );
                }
                seen
            }));
        }
    }
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }
    let freezes = chaos.await.unwrap();
    redis.resume();

    let (mut answers, mut hits, mut cut, mut wrong) = (0, 0, 0, Vec::new());
    for s in &seen {
        match s {
            Seen::Cut => cut += 1,
            Seen::Failed(e) => panic!("a client failed without hanging up: {e}"),
            Seen::Answer {
                tenant,
                prompt,
                stream,
                cache,
                status,
                body,
            } => {
                assert_eq!(*status, 200, "{body}");
                answers += 1;
                if cache == "hit" {
                    hits += 1;
                }
                let own = &expected[&(*tenant, *prompt)];
                if content_of(body, *stream).as_ref() != Some(own) {
                    wrong.push(format!(
                        "{} asked prompt {prompt} (stream {stream}, cache {cache}) and got: {body}",
                        names[*tenant]
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {answers} answers were not their own request's, e.g. {}",
        wrong.len(),
        wrong[0]
    );

    let metrics = scrape(&admin).await;
    let failures = "detour_redis_failures_total{";
    let timeouts = metrics_sum_ops(&metrics, failures, "timeout");
    let server_errors = metrics_sum_ops(&metrics, failures, "server");
    eprintln!(
        "{answers} answers ({hits} hits), {cut} cut, {freezes} freezes, {timeouts} cache calls timed out, upstream {}",
        up.stats().chat_completions - asked_directly
    );
    // Otherwise the test proves nothing.
    assert!(hits >= 30, "cache hits: {hits} of {answers}");
    assert!(cut >= 30, "clients that hung up: {cut}");
    assert!(
        timeouts >= 3.0,
        "cache calls that timed out: {timeouts}\n{metrics}"
    );
    // A reply handed to the wrong call would have shown up in Redis's
    // client as an entry of another key (a mismatch), a value of the wrong
    // shape (rejected) or a type error (a `server` failure).
    assert_eq!(server_errors, 0.0, "{metrics}");
    for gw in &gws {
        let cache = &gw.gateway.live().cache;
        assert_eq!(
            (cache.mismatches(), cache.rejected()),
            (0, 0),
            "the Redis client crossed replies"
        );
    }
}

/// The failures of the cache's Redis calls (`cache_get`, `cache_put`,
/// `cache_remove`) of `kind`.
fn metrics_sum_ops(metrics: &str, prefix: &str, kind: &str) -> f64 {
    let kind = format!("kind=\"{kind}\"");
    metric_sum(metrics, prefix, &[&kind, "op=\"cache_"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load_costs_no_request_and_the_cache_comes_back() {
    let mut redis = RedisServer::start();
    let up = mock().await;
    let names = tenants(4);
    let config = replica_config(up.addr(), &redis.url(), "50ms", &names);
    let gws = replicas(2, &config).await;
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Clients asking a few prompts over and over, on both replicas: each
    // answer with when it was asked.
    let mut workers = Vec::new();
    for (t, tenant) in names.iter().enumerate() {
        for w in 0..2 {
            let gws = gws.clone();
            let tenant = tenant.clone();
            let stop = Arc::clone(&stop);
            workers.push(tokio::spawn(async move {
                let c = client();
                let mut seen = Vec::new();
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = prompt(&format!("Prompt {} of tenant {t}", i % 3), false);
                    let gw = &gws[(i + w) % gws.len()];
                    let at = started.elapsed();
                    let result =
                        tokio::time::timeout(Duration::from_secs(5), ask(&c, gw, &tenant, &body))
                            .await
                            .map_err(|_| "no answer within 5 s".to_owned())
                            .and_then(|r| r.map_err(|e| e.to_string()))
                            .map(|a| (a.status, a.cache));
                    seen.push((at, result));
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            }));
        }
    }

    tokio::time::sleep(Duration::from_millis(700)).await;
    let killed_at = started.elapsed();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let down_seen = gws.iter().all(|gw| !gw.gateway.shared().unwrap().is_up());
    redis.restart();
    let restarted_at = started.elapsed();
    // The cache hits again within a few seconds of Redis's return: a request
    // asked after it that was a hit.
    let deadline = Instant::now() + Duration::from_secs(6);
    let probe = client();
    let mut back_at = None;
    while Instant::now() < deadline {
        let body = prompt("A probe after the restart", false);
        let a = ask(&probe, &gws[0], "tenant-00", &body).await.unwrap();
        let b = ask(&probe, &gws[1], "tenant-00", &body).await.unwrap();
        assert_eq!((a.status, b.status), (200, 200));
        if a.cache == "hit" || b.cache == "hit" {
            back_at = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }

    let back_at = back_at.expect("no cache hit within 6 s of Redis's restart");
    assert!(down_seen, "the replicas noticed Redis was gone");
    let errors: Vec<_> = seen
        .iter()
        .filter(|(_, r)| !matches!(r, Ok((200, _))))
        .collect();
    assert!(
        errors.is_empty(),
        "{} of {} requests failed: {:?}",
        errors.len(),
        seen.len(),
        errors.first()
    );
    let hits_in = |from: Duration, to: Duration| {
        seen.iter()
            .filter(|(at, r)| *at >= from && *at < to && matches!(r, Ok((_, c)) if c == "hit"))
            .count()
    };
    let while_down = seen
        .iter()
        .filter(|(at, _)| *at >= killed_at && *at < restarted_at)
        .count();
    eprintln!(
        "{} requests, {while_down} while Redis was down; the cache was back {:?} after the restart",
        seen.len(),
        back_at - restarted_at
    );
    assert!(
        hits_in(Duration::ZERO, killed_at) > 0,
        "hits before the kill"
    );
    assert!(while_down > 20, "load while Redis was down: {while_down}");
}
