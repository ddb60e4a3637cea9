//! Keys, tiers and limits over real loopback HTTP: rate limits per key, per
//! tenant and per IP for failed authentication, token limits with correction,
//! concurrency limits, and the overload test: a flooding sheddable tenant
//! against a steady critical one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

fn with_keys(upstream: SocketAddr, keys: &str, server: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server}

[[providers]]
name = "p"
kind = "openai"
base_url = "http://{upstream}/v1"

[[routes]]
model = "fast"
targets = [{{ provider = "p", model = "m" }}]

{keys}
"#
    )
}

async fn call(gw: &detour::server::Running, key: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(key)
        .json(&chat(false))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_keys_request_rate_is_limited_with_retry_after() {
    let up = mock().await;
    let keys = "[[keys]]\nkey = \"k1\"\ntenant = \"a\"\nrpm = 3\n";
    let gw = gateway(&with_keys(up.addr(), keys, "")).await;
    for _ in 0..3 {
        assert_eq!(call(&gw, "k1").await.status(), 200);
    }
    let resp = call(&gw, "k1").await;
    assert_eq!(resp.status(), 429);
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("requests per minute for this key"));
    assert_eq!(
        up.stats().requests,
        3,
        "refused requests never reach the provider"
    );

    // Anthropic clients get Anthropic's shape.
    let resp = client()
        .post(format!("{}/v1/messages", gw.url()))
        .header("x-api-key", "k1")
        .json(&json!({"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn a_tenants_limit_is_shared_by_its_keys() {
    let up = mock().await;
    let keys = "[[tenants]]\nname = \"acme\"\nrpm = 4\n\n\
                [[keys]]\nkey = \"k1\"\ntenant = \"acme\"\n\n[[keys]]\nkey = \"k2\"\ntenant = \"acme\"\n\n\
                [[keys]]\nkey = \"k3\"\ntenant = \"other\"\n";
    let gw = gateway(&with_keys(up.addr(), keys, "")).await;
    for key in ["k1", "k2", "k1", "k2"] {
        assert_eq!(call(&gw, key).await.status(), 200);
    }
    assert_eq!(call(&gw, "k1").await.status(), 429);
    assert_eq!(call(&gw, "k2").await.status(), 429);
    assert_eq!(
        call(&gw, "k3").await.status(),
        200,
        "another tenant is not affected"
    );
}

#[tokio::test]
async fn token_limits_are_estimated_then_corrected_from_usage() {
    let up = mock().await;
    // Each small request is estimated at ~280 tokens but uses far fewer:
    // without the correction the second request would already be refused.
    let keys = "[[keys]]\nkey = \"k1\"\ntenant = \"a\"\ntpm = 500\n";
    let gw = gateway(&with_keys(up.addr(), keys, "")).await;
    for i in 0..3 {
        let resp = call(&gw, "k1").await;
        assert_eq!(resp.status(), 200, "request {i}");
        resp.bytes().await.unwrap();
    }
    // A request whose estimate alone exceeds the budget is refused.
    let mut big = chat(false);
    big["messages"][0]["content"] = json!("x".repeat(4000));
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth("k1")
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per minute"),
        "{v}"
    );
}

#[tokio::test]
async fn concurrent_requests_per_key_are_bounded() {
    let up = mock().await;
    up.set_faults(faults(json!({"latency_ms": 500})));
    let keys = "[[keys]]\nkey = \"k1\"\ntenant = \"a\"\nmax_concurrent = 2\n";
    let gw = gateway(&with_keys(up.addr(), keys, "")).await;
    let url = gw.url();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                client()
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth("k1")
                    .json(&chat(false))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses: Vec<u16> = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 200, 429, 429, 429]);
}

#[tokio::test]
async fn guessing_keys_from_one_address_is_slowed_down() {
    let up = mock().await;
    let keys = "[[keys]]\nkey = \"good\"\ntenant = \"a\"\n";
    let gw = gateway(&with_keys(up.addr(), keys, "auth_failures_per_minute = 5")).await;
    for i in 0..5 {
        assert_eq!(call(&gw, &format!("guess-{i}")).await.status(), 401);
    }
    let resp = call(&gw, "guess-5").await;
    assert_eq!(
        resp.status(),
        429,
        "the sixth failure in a minute is rate limited"
    );
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(
        call(&gw, "good").await.status(),
        429,
        "even a right key waits from that address"
    );
}

/// This process's resident memory (gateway, mock and clients together).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Steady critical traffic: `clients` closed-loop clients for `duration`.
async fn critical_load(url: String, clients: usize, duration: Duration) -> (usize, Vec<Duration>) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut out = Vec::new();
            while start.elapsed() < duration {
                let sent = Instant::now();
                let ok = c
                    .post(&url)
                    .bearer_auth("critical-key")
                    .json(&chat(false))
                    .send()
                    .await
                    .map(|r| r.status() == 200)
                    .unwrap_or(false);
                out.push((ok, sent.elapsed()));
            }
            out
        }));
    }
    let mut failed = 0;
    let mut latencies = Vec::new();
    for t in tasks {
        for (ok, l) in t.await.unwrap() {
            failed += usize::from(!ok);
            latencies.push(l);
        }
    }
    (failed, latencies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sheddable_flood_cannot_take_the_critical_tiers_capacity() {
    let up = mock().await;
    // The provider answers in 100 ms; detour admits 16 at a time: about 160
    // requests a second in all.
    up.set_faults(faults(json!({"latency_ms": 100})));
    let keys = r#"
[[keys]]
key = "critical-key"
tenant = "bank"
tier = "critical"

[[keys]]
key = "flood-key"
tenant = "freebie"
tier = "sheddable"
rpm = 600
"#;
    let gw = gateway(&with_keys(
        up.addr(),
        keys,
        "max_concurrent_requests = 16\nqueue_timeout = \"2s\"",
    ))
    .await;
    let url = format!("{}/v1/chat/completions", gw.url());

    let rss_before = rss_kib();
    let (base_failed, base) = critical_load(url.clone(), 4, Duration::from_secs(3)).await;
    assert_eq!(base_failed, 0);
    let base_p99 = percentile(base.clone(), 0.99);

    // The flood: 200 requests a second (20x its 10/s limit), open loop, and
    // more than the provider can take.
    let flood_url = url.clone();
    let flood = tokio::spawn(async move {
        let c = client();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let start = Instant::now();
        let mut pending = Vec::new();
        while start.elapsed() < Duration::from_secs(6) {
            tick.tick().await;
            let c = c.clone();
            let url = flood_url.clone();
            pending.push(tokio::spawn(async move {
                let sent = Instant::now();
                let status = c
                    .post(&url)
                    .bearer_auth("flood-key")
                    .json(&chat(false))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                (status, sent.elapsed())
            }));
        }
        let mut out = Vec::new();
        for p in pending {
            out.push(p.await.unwrap());
        }
        out
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (failed, during) = critical_load(url, 4, Duration::from_secs(5)).await;
    let flood = flood.await.unwrap();

    let success = 1.0 - failed as f64 / during.len() as f64;
    let p99 = percentile(during.clone(), 0.99);
    let refused = flood.iter().filter(|(s, _)| *s == 429 || *s == 503).count();
    let timed_out = flood.iter().filter(|(s, _)| *s == 0).count();
    let slowest_refusal = flood
        .iter()
        .filter(|(s, _)| *s == 429 || *s == 503)
        .map(|(_, l)| *l)
        .max()
        .unwrap_or_default();
    println!(
        "overload: critical success {:.4} ({} requests), p99 {:?} vs baseline {:?}; flood: {} sent, {} refused (429/503), {} ok, {} timed out, slowest refusal {:?}",
        success,
        during.len(),
        p99,
        base_p99,
        flood.len(),
        refused,
        flood.iter().filter(|(s, _)| *s == 200).count(),
        timed_out,
        slowest_refusal
    );
    let grown = rss_kib().saturating_sub(rss_before);
    println!("overload: resident memory grew by {} KiB", grown);
    assert!(
        grown < 64 * 1024,
        "memory grew by {grown} KiB during the flood"
    );
    assert!(success >= 0.999, "critical success rate {success}");
    assert!(
        p99.as_secs_f64() <= 1.5 * base_p99.as_secs_f64(),
        "critical p99 {p99:?} > 1.5 x baseline {base_p99:?}"
    );
    assert!(
        refused * 2 > flood.len(),
        "the flood was not refused: {refused}/{}",
        flood.len()
    );
    assert!(
        flood.iter().all(|(s, _)| matches!(s, 200 | 429 | 503)),
        "the flood gets answers, 429s or 503s only"
    );
    assert_eq!(timed_out, 0, "the flood gets clear refusals, not timeouts");
    assert!(
        slowest_refusal < Duration::from_secs(1),
        "{slowest_refusal:?}"
    );
}

#[tokio::test]
async fn slow_clients_are_cut_off_headers_and_bodies_alike() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = mock().await;
    let server = "header_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"";
    let gw = gateway(&with_keys(up.addr(), "", server)).await;

    // Slowloris: headers that never finish. The connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the half-sent request was kept open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A body that stops coming: 408 in the client's format.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"",
    )
    .await
    .unwrap();
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("request_timeout"), "{head}");
    assert_eq!(up.stats().requests, 0);
}

#[tokio::test]
async fn open_streams_per_key_are_bounded() {
    let up = mock().await;
    up.set_faults(faults(json!({"chunks": 4, "chunk_gap_ms": 300})));
    let keys = "[[keys]]\nkey = \"k1\"\ntenant = \"a\"\nmax_streams = 1\n";
    let gw = gateway(&with_keys(up.addr(), keys, "")).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let open = client()
        .post(&url)
        .bearer_auth("k1")
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let second = client()
        .post(&url)
        .bearer_auth("k1")
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429, "a second stream while one is open");
    assert_eq!(
        call(&gw, "k1").await.status(),
        200,
        "non-streamed requests are not capped"
    );
    open.text().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = client()
        .post(&url)
        .bearer_auth("k1")
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(
        third.status(),
        200,
        "the stream's slot is free once it ended"
    );
}

#[tokio::test]
async fn a_target_that_slows_down_under_load_gets_a_lower_concurrency_cap() {
    let (slow, spare) = (mock().await, mock().await);
    let config = format!(
        "[[providers]]\nname = \"slow\"\nkind = \"openai\"\nbase_url = \"http://{}/v1\"\n\n\
         [[providers]]\nname = \"spare\"\nkind = \"openai\"\nbase_url = \"http://{}/v1\"\n\n\
         [[routes]]\nmodel = \"fast\"\ntargets = [{{ provider = \"slow\", model = \"m\" }}, {{ provider = \"spare\", model = \"m\" }}]\n",
        slow.addr(),
        spare.addr()
    );
    let gw = gateway(&config).await;
    let health = || {
        let live = gw.gateway.live();
        live.routes[0].health[0].snapshot(&live.config.routes[0].breaker)
    };
    for _ in 0..20 {
        call(&gw, "").await;
    }
    let before = health().concurrency_limit;
    // The provider becomes 10x slower: each answer is an overload signal.
    slow.set_faults(faults(json!({"latency_ms": 60})));
    for _ in 0..6 {
        call(&gw, "").await;
    }
    let after = health().concurrency_limit;
    assert!(
        after < 16.0,
        "the cap did not come down: {before} -> {after}"
    );
    // At its cap, traffic goes to the peer instead of queueing on the slow one.
    let mut calls = Vec::new();
    for _ in 0..30 {
        let url = gw.url();
        calls.push(tokio::spawn(async move {
            client()
                .post(format!("{url}/v1/chat/completions"))
                .json(&chat(false))
                .send()
                .await
                .unwrap()
                .headers()["x-detour-provider"]
                .to_str()
                .unwrap()
                .to_owned()
        }));
    }
    let mut to_spare = 0;
    for c in calls {
        to_spare += usize::from(c.await.unwrap() == "spare");
    }
    assert!(to_spare > 0, "nothing spilled over to the peer");
}

/// A chat request whose body is sent chunked (no `Content-Length`).
async fn call_chunked(gw: &detour::server::Running, key: &str, body: &Value) -> reqwest::Response {
    let bytes = bytes::Bytes::from(serde_json::to_vec(body).unwrap());
    let (head, tail) = (bytes.slice(..10), bytes.slice(10..));
    let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(head), Ok(tail)]);
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_chunked_body_is_charged_by_its_size() {
    let up = mock().await;
    let keys = "[[keys]]\nkey = \"k1\"\ntenant = \"a\"\ntpm = 4000\n";
    let gw = gateway(&with_keys(up.addr(), keys, "")).await;
    // ~3500 prompt tokens: fits once in 4000 a minute, not twice.
    let mut big = chat(false);
    big["messages"][0]["content"] = json!("x".repeat(14_000));
    let first = call_chunked(&gw, "k1", &big).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let second = call_chunked(&gw, "k1", &big).await;
    assert_eq!(
        second.status(),
        429,
        "a chunked body was charged less than its size"
    );
    let v: Value = second.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per minute"),
        "{v}"
    );
    assert_eq!(up.stats().requests, 1);
}

#[tokio::test]
async fn the_answers_token_cap_counts_in_the_estimate() {
    let up = mock().await;
    let keys = "[[keys]]\nkey = \"k1\"\ntenant = \"a\"\ntpm = 2000\n";
    let gw = gateway(&with_keys(up.addr(), keys, "")).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let send = |body: Value| client().post(&url).bearer_auth("k1").json(&body).send();
    let mut small = chat(false);
    small["max_tokens"] = json!(10);
    assert_eq!(send(small).await.unwrap().status(), 200);
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat(false);
        body[field] = json!(3000);
        let resp = send(body).await.unwrap();
        assert_eq!(resp.status(), 429, "{field} was not counted");
    }
    let resp = client()
        .post(format!("{}/v1/messages", gw.url()))
        .header("x-api-key", "k1")
        .json(&json!({"model": "fast", "max_tokens": 3000, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429, "Anthropic's max_tokens was not counted");
    assert_eq!(up.stats().requests, 1);
}

#[tokio::test]
async fn a_stream_is_settled_from_usage_the_client_did_not_ask_for_and_does_not_see() {
    let up = mock().await;
    // Each stream is estimated at ~280 tokens and uses ~40. Unsettled, the
    // fourth would be refused.
    let keys = "[[keys]]\nkey = \"k1\"\ntenant = \"a\"\ntpm = 1000\n";
    let gw = gateway(&with_keys(up.addr(), keys, "")).await;
    for i in 0..6 {
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth("k1")
            .json(&chat(true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "stream {i} was refused: not settled");
        let body = resp.text().await.unwrap();
        let data = sse_data(&body);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
        for chunk in &data[..data.len() - 1] {
            let v: Value = serde_json::from_str(chunk).unwrap();
            assert!(
                v["usage"].is_null() && !v["choices"].as_array().unwrap().is_empty(),
                "the client saw a usage chunk it did not ask for: {chunk}"
            );
        }
    }
}
