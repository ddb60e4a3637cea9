//! Probes never hold a client up, and streams that break after their first
//! event count against their target: over real loopback HTTP against
//! `detour mock` providers whose faults change mid-test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use detour::mock::{self, Flavor, MockOptions, MockServer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Route `fast`: `primary` (of `kind`) then `backup`, with `policy` lines
/// added to the route.
fn two_targets(kind: &str, primary: SocketAddr, backup: SocketAddr, policy: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "primary"
kind = "{kind}"
base_url = "http://{primary}/v1"
api_key = "sk-primary"

[[providers]]
name = "backup"
kind = "openai-compatible"
base_url = "http://{backup}/v1"

[[routes]]
model = "fast"
targets = [
  {{ provider = "primary", model = "gpt-a" }},
  {{ provider = "backup", model = "local-b" }},
]
{policy}
"#
    )
}

async fn flavored(flavor: Flavor) -> MockServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(flavor, listener, MockOptions::default())
        .await
        .unwrap()
}

/// A chat request; returns the provider that answered, the time to the
/// response headers, and the body read to its end.
async fn ask(gw: &detour::server::Running, stream: bool) -> (String, Duration, String) {
    let started = Instant::now();
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(stream))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 200);
    let provider = resp.headers()["x-detour-provider"]
        .to_str()
        .unwrap()
        .to_owned();
    (provider, took, resp.text().await.unwrap())
}

/// The primary target's entry in `GET /admin/health`.
async fn primary_health(admin: &str) -> Value {
    let health: Value = client()
        .get(format!("{admin}/admin/health"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    health["routes"][0]["targets"][0].clone()
}

/// Polls the primary's health until `check` holds; panics naming `what`
/// with the last reading after `within`.
async fn until(admin: &str, what: &str, within: Duration, check: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let h = primary_health(admin).await;
        if check(&h) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}; {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Headroom for a loaded CI machine on top of the bounds under test.
const MARGIN: Duration = Duration::from_millis(400);

#[tokio::test]
async fn a_provider_that_hangs_after_failing_never_holds_a_client_up() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let policy = r#"
timeouts = { first_byte = "1500ms" }
breaker = { consecutive_failures = 2, open_for = "200ms", slow_start = "0s" }
probe_hedge_after = "150ms"
"#;
    let gw = gateway(&two_targets(
        "openai",
        primary.addr(),
        backup.addr(),
        policy,
    ))
    .await;
    let admin = admin(&gw, "t").await;
    for _ in 0..2 {
        assert_eq!(ask(&gw, false).await.0, "backup");
    }
    until(&admin, "the breaker opened", Duration::from_secs(2), |h| {
        h["breaker"] == "open"
    })
    .await;

    // The healthy target's own latency, measured while nothing probes.
    let mut healthy = Duration::ZERO;
    for _ in 0..3 {
        healthy = healthy.max(ask(&gw, false).await.1);
    }
    // Now it hangs: each probe waits its whole first-byte timeout.
    primary.set_faults(faults(json!({"hang_rate": 1.0})));
    let failures = primary_health(&admin).await["consecutive_failures"]
        .as_u64()
        .unwrap();
    let bound = healthy + Duration::from_millis(150) + MARGIN;
    let probes_before = primary.stats().requests;
    let until_end = Instant::now() + Duration::from_millis(3_500);
    let (mut asked, mut slowest) = (0, Duration::ZERO);
    while Instant::now() < until_end {
        for stream in [false, true] {
            let (provider, took, body) = ask(&gw, stream).await;
            asked += 1;
            slowest = slowest.max(took);
            assert_eq!(provider, "backup");
            assert!(
                took < bound,
                "request {asked} (stream: {stream}) took {took:?}, more than the healthy target's {healthy:?} plus the probe delay"
            );
            if stream {
                assert!(body.contains("[DONE]"), "{body}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probes = primary.stats().requests - probes_before;
    println!(
        "probes: healthy target {healthy:?}; while the primary hangs: {asked} requests, slowest {slowest:?}, {probes} probes"
    );
    assert!(
        (1..=3).contains(&probes),
        "one probe at a time, each waiting its 1.5 s: {probes} in 3.5 s"
    );
    // The probes' timeouts reached the breaker from the background: each
    // counted a failure and re-opened it.
    until(
        &admin,
        "a probe's timeout re-opened the breaker",
        Duration::from_secs(3),
        |h| h["breaker"] == "open" && h["consecutive_failures"].as_u64() > Some(failures),
    )
    .await;
    until(
        &admin,
        "no probe left in the background",
        Duration::from_secs(3),
        |h| h["background"] == 0,
    )
    .await;
}

#[tokio::test]
async fn a_probe_that_answers_late_but_well_closes_the_breaker() {
    for stream in [false, true] {
        let (primary, backup) = (mock().await, mock().await);
        primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
        let policy = r#"
timeouts = { first_byte = "5s" }
breaker = { consecutive_failures = 2, open_for = "200ms", slow_start = "0s" }
probe_hedge_after = "100ms"
"#;
        let gw = gateway(&two_targets(
            "openai",
            primary.addr(),
            backup.addr(),
            policy,
        ))
        .await;
        let admin = admin(&gw, "t").await;
        for _ in 0..2 {
            ask(&gw, stream).await;
        }
        until(&admin, "the breaker opened", Duration::from_secs(2), |h| {
            h["breaker"] == "open"
        })
        .await;
        // Recovered, but slow to answer.
        primary.set_faults(faults(json!({"latency_ms": 1200})));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (provider, took, _) = ask(&gw, stream).await;
        assert_eq!(provider, "backup", "stream: {stream}");
        assert!(
            took < Duration::from_millis(100) + MARGIN,
            "the client did not wait for the probe (stream: {stream}): {took:?}"
        );
        assert_eq!(primary.stats().requests, 3, "the probe was sent");
        until(
            &admin,
            "the late probe closed the breaker",
            Duration::from_secs(4),
            |h| h["breaker"] == "closed",
        )
        .await;
        let h = primary_health(&admin).await;
        assert_eq!(h["background"], 0, "{h}");
        let kind = if stream { "streamed" } else { "whole" };
        assert!(
            h["latency"][kind]["ewma_ms"].as_f64() > Some(1000.0),
            "the probe's latency was learned: {h}"
        );
    }
}

#[tokio::test]
async fn streams_that_break_after_their_first_events_open_the_breaker() {
    let cases = [
        ("openai", json!({"cut_after_chunks": 2}), "cut"),
        (
            "openai",
            json!({"stream_error_after_chunks": 2}),
            "error event, no [DONE]",
        ),
        (
            "openai",
            json!({"chunks": 4, "chunk_gap_ms": 1000}),
            "stall past idle",
        ),
        (
            "anthropic",
            json!({"stream_error_after_chunks": 2}),
            "translated error event",
        ),
    ];
    for (kind, fault, what) in cases {
        let primary = match kind {
            "anthropic" => flavored(Flavor::Anthropic).await,
            _ => mock().await,
        };
        let backup = mock().await;
        primary.set_faults(faults(fault));
        let policy = r#"
timeouts = { idle = "300ms" }
breaker = { consecutive_failures = 3, failure_rate = 1.0, min_requests = 1000, open_for = "60s" }
"#;
        let gw = gateway(&two_targets(kind, primary.addr(), backup.addr(), policy)).await;
        let admin = admin(&gw, "t").await;
        for n in 1..=3u64 {
            let (provider, _, body) = ask(&gw, true).await;
            assert_eq!(
                provider, "primary",
                "{what}: stream {n} starts on the primary"
            );
            assert!(
                !body.contains("[DONE]"),
                "{what}: stream {n} broke off: {body}"
            );
            let h = primary_health(&admin).await;
            // Counted once, as a failure: no success at commit, no second count.
            assert_eq!(h["consecutive_failures"], n, "{what}: {h}");
            assert_eq!(
                (h["window_ok"].as_u64(), h["window_failed"].as_u64()),
                (Some(0), Some(n)),
                "{what}: {h}"
            );
            let open = if n < 3 { "closed" } else { "open" };
            assert_eq!(h["breaker"], open, "{what} after {n} broken streams: {h}");
        }
        let before = primary.stats().requests;
        for _ in 0..3 {
            let (provider, _, body) = ask(&gw, true).await;
            assert_eq!(provider, "backup", "{what}: traffic moved");
            assert!(body.contains("[DONE]"), "{what}: {body}");
        }
        assert_eq!(
            primary.stats().requests,
            before,
            "{what}: the breaker is open"
        );
    }
}

#[tokio::test]
async fn a_whole_stream_is_a_success_and_a_client_that_leaves_is_not_a_failure() {
    let (primary, backup) = (mock().await, mock().await);
    let policy = r#"breaker = { consecutive_failures = 1, open_for = "60s" }"#;
    let gw = gateway(&two_targets(
        "openai",
        primary.addr(),
        backup.addr(),
        policy,
    ))
    .await;
    let admin = admin(&gw, "t").await;
    let (provider, _, body) = ask(&gw, true).await;
    assert_eq!(provider, "primary");
    assert!(body.contains("[DONE]"));
    until(&admin, "one whole stream", Duration::from_secs(2), |h| {
        h["window_ok"] == 1
    })
    .await;
    // A client that leaves mid-stream: nothing against the target.
    primary.set_faults(faults(json!({"chunks": 20, "chunk_gap_ms": 50})));
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    let mut resp = resp;
    resp.chunk().await.unwrap();
    drop(resp);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = primary_health(&admin).await;
    assert_eq!(h["breaker"], "closed", "{h}");
    assert_eq!(h["consecutive_failures"], 0, "{h}");
}
