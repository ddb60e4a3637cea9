//! Failover across targets, circuit breakers, retry budgets, cool-downs and
//! overrides, over real loopback HTTP against `detour mock`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Route `fast`: `primary` then `backup`, with `policy` lines added to the route.
fn two_targets(primary: SocketAddr, backup: SocketAddr, policy: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "primary"
kind = "openai"
base_url = "http://{primary}/v1"

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

async fn post(gw: &detour::server::Running, stream: bool) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(stream))
        .send()
        .await
        .unwrap()
}

fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Polls `check` until it holds; panics naming `what` after 5 s, so that a
/// regression fails the test instead of hanging CI.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /admin/health` of the admin API at `admin`.
async fn admin_health(admin: &str, token: &str) -> Value {
    client()
        .get(format!("{admin}/admin/health"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_failing_primary_is_invisible_to_the_client() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), "")).await;
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-detour-provider"], "backup");
    assert_eq!(h["x-detour-model"], "local-b");
    assert_eq!(h["x-detour-attempts"], "2");
    assert_eq!(h["x-detour-tried"], "primary/gpt-a=status_5xx");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "local-b");
    assert_eq!(backup.requests()[0].body["model"], "local-b");
}

#[tokio::test]
async fn refused_connections_hangs_and_resets_fail_over() {
    let backup = mock().await;
    // Refused.
    let gw = gateway(&two_targets(dead_addr(), backup.addr(), "")).await;
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-detour-tried"],
        "primary/gpt-a=connect_error"
    );

    // Hang: the first-byte timeout moves on.
    let primary = mock().await;
    primary.set_faults(faults(json!({"hang_rate": 1.0})));
    let policy = r#"timeouts = { first_byte = "300ms" }"#;
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), policy)).await;
    let started = Instant::now();
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-detour-tried"],
        "primary/gpt-a=first_byte_timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // Reset.
    primary.set_faults(faults(json!({"reset_rate": 1.0})));
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), "")).await;
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "backup");
}

#[tokio::test]
async fn a_stream_that_dies_before_its_first_event_fails_over_invisibly() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"cut_after_chunks": 0})));
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), "")).await;
    let resp = post(&gw, true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "backup");
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]", "{text}");
    assert!(!text.contains("error"), "{text}");
}

#[tokio::test]
async fn the_callers_own_4xx_does_not_fail_over() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 400})));
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), "")).await;
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-detour-attempts"], "1");
    assert_eq!(backup.stats().requests, 0);
}

#[tokio::test]
async fn rejected_provider_credentials_fail_over_and_show_in_health() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 401})));
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), "")).await;
    let resp = post(&gw, false).await;
    assert_eq!(
        resp.status(),
        200,
        "the client never sees detour's own key problem"
    );
    assert_eq!(
        resp.headers()["x-detour-tried"],
        "primary/gpt-a=credentials_rejected"
    );
    // The target is now skipped while marked misconfigured.
    let resp = post(&gw, false).await;
    assert_eq!(resp.headers()["x-detour-attempts"], "1");
    assert_eq!(resp.headers()["x-detour-provider"], "backup");
    assert_eq!(primary.stats().requests, 1);

    let admin = admin(&gw, "t0ken").await;
    let health = admin_health(&admin, "t0ken").await;
    assert_eq!(
        health["routes"][0]["targets"][0]["misconfigured"], true,
        "{health}"
    );
}

#[tokio::test]
async fn the_breaker_opens_and_stops_sending_to_a_dead_primary() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 503})));
    let policy = r#"breaker = { consecutive_failures = 3, open_for = "60s" }"#;
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), policy)).await;
    for _ in 0..20 {
        assert_eq!(post(&gw, false).await.status(), 200);
    }
    assert_eq!(primary.stats().requests, 3, "only until the breaker opened");
    assert_eq!(backup.stats().requests, 20);
}

#[tokio::test]
async fn a_probe_closes_the_breaker_when_the_primary_recovers() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let policy = r#"breaker = { consecutive_failures = 2, open_for = "300ms", slow_start = "0s" }"#;
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), policy)).await;
    for _ in 0..4 {
        post(&gw, false).await;
    }
    assert_eq!(primary.stats().requests, 2);
    primary.set_faults(faults(json!({})));
    tokio::time::sleep(Duration::from_millis(350)).await;
    let resp = post(&gw, false).await;
    assert_eq!(
        resp.headers()["x-detour-provider"],
        "primary",
        "the probe succeeds"
    );
    for _ in 0..5 {
        assert_eq!(
            post(&gw, false).await.headers()["x-detour-provider"],
            "primary"
        );
    }
}

#[tokio::test]
async fn retry_after_cools_a_target_down_then_traffic_returns() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(
        json!({"rate_limit_rate": 1.0, "retry_after_secs": 1}),
    ));
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), "")).await;
    let resp = post(&gw, false).await;
    assert_eq!(resp.headers()["x-detour-tried"], "primary/gpt-a=status_429");
    for _ in 0..5 {
        assert_eq!(post(&gw, false).await.headers()["x-detour-attempts"], "1");
    }
    assert_eq!(primary.stats().requests, 1, "cooling down: no traffic");
    primary.set_faults(faults(json!({})));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        post(&gw, false).await.headers()["x-detour-provider"],
        "primary"
    );
}

#[tokio::test]
async fn when_everything_is_down_answers_are_fast_503s_and_upstream_load_is_bounded() {
    let (primary, backup) = (mock().await, mock().await);
    for m in [&primary, &backup] {
        m.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    }
    let policy = r#"
retries = { budget = 0.2, min_per_sec = 0 }
breaker = { consecutive_failures = 1000, failure_rate = 1.0, min_requests = 1000 }
"#;
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), policy)).await;
    let n = 200;
    for _ in 0..n {
        let resp = post(&gw, false).await;
        assert!(
            resp.status() == 503 || resp.status() == 502,
            "{}",
            resp.status()
        );
    }
    let upstream = primary.stats().requests + backup.stats().requests;
    // The budget starts with the reserve a route in steady state holds (its
    // cap: 20 retries at a 20% ratio).
    assert!(
        upstream as f64 <= 1.2 * n as f64 + 21.0,
        "upstream requests {upstream} for {n} client requests exceed the 20% budget"
    );

    // With breakers that open, answers come fast and without upstream calls.
    let policy = r#"breaker = { consecutive_failures = 2, open_for = "60s" }"#;
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), policy)).await;
    for _ in 0..3 {
        post(&gw, false).await;
    }
    let before = primary.stats().requests + backup.stats().requests;
    let started = Instant::now();
    let resp = post(&gw, false).await;
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_healthy_target");
    assert_eq!(primary.stats().requests + backup.stats().requests, before);
}

#[tokio::test]
async fn all_targets_failing_is_a_503_naming_each() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let gw = gateway(&two_targets(primary.addr(), dead_addr(), "")).await;
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-detour-attempts"], "2");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "all_targets_failed");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("primary/gpt-a=status_5xx") && msg.contains("backup/local-b=connect_error"),
        "{msg}"
    );
    drop(backup);
}

#[tokio::test]
async fn admin_overrides_take_effect_on_the_next_request() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), "")).await;
    let admin = admin(&gw, "t0ken").await;
    let c = client();
    let resp = c
        .post(format!("{admin}/admin/providers/primary/down"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "the admin token is required");
    let resp = c
        .post(format!("{admin}/admin/providers/primary/down"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        post(&gw, false).await.headers()["x-detour-provider"],
        "backup"
    );
    assert_eq!(primary.stats().requests, 0);
    c.post(format!("{admin}/admin/providers/primary/auto"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(
        post(&gw, false).await.headers()["x-detour-provider"],
        "primary"
    );
    let resp = c
        .post(format!("{admin}/admin/providers/nope/down"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn weights_balance_a_priority_group() {
    let (a, b) = (mock().await, mock().await);
    let config = format!(
        r#"
[[providers]]
name = "a"
kind = "openai"
base_url = "http://{}/v1"

[[providers]]
name = "b"
kind = "openai"
base_url = "http://{}/v1"

[[routes]]
model = "fast"
targets = [
  {{ provider = "a", model = "m", priority = 0, weight = 3 }},
  {{ provider = "b", model = "m", priority = 0, weight = 1 }},
]
"#,
        a.addr(),
        b.addr()
    );
    let gw = gateway(&config).await;
    for _ in 0..200 {
        post(&gw, false).await;
    }
    let share = a.stats().requests as f64 / 200.0;
    assert!((0.65..0.85).contains(&share), "a got {share}");
}

#[tokio::test]
async fn hedging_races_a_slow_primary_and_the_first_answer_wins() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"latency_ms": 3000})));
    let gw = gateway(&two_targets(
        primary.addr(),
        backup.addr(),
        r#"hedge_after = "100ms""#,
    ))
    .await;
    let started = Instant::now();
    let resp = post(&gw, false).await;
    let took = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "backup");
    assert_eq!(resp.headers()["x-detour-attempts"], "2");
    assert!(took < Duration::from_millis(1000), "{took:?}");
    assert!(
        took >= Duration::from_millis(100),
        "the hedge waits its delay: {took:?}"
    );
    assert_eq!(primary.stats().requests, 1, "the primary was tried first");

    // Without hedging the same request waits for the slow primary.
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), "")).await;
    primary.set_faults(faults(json!({"latency_ms": 600})));
    let started = Instant::now();
    let resp = post(&gw, false).await;
    assert_eq!(resp.headers()["x-detour-provider"], "primary");
    assert!(started.elapsed() >= Duration::from_millis(600));
}

#[tokio::test]
async fn a_fast_primary_is_never_hedged() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&two_targets(
        primary.addr(),
        backup.addr(),
        r#"hedge_after = "500ms""#,
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(post(&gw, false).await.headers()["x-detour-attempts"], "1");
    }
    assert_eq!(backup.stats().requests, 0);
}

#[tokio::test]
async fn a_status_page_outage_steers_traffic_before_any_request_fails() {
    use detour::mock::{ComponentStatus, Flavor, MockOptions, PageStatus};
    let (primary, backup) = (mock().await, mock().await);
    let page = detour::mock::spawn(
        Flavor::Statuspage,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        MockOptions::default(),
    )
    .await
    .unwrap();
    let config = two_targets(primary.addr(), backup.addr(), "").replace(
        "name = \"primary\"\n",
        &format!(
            "name = \"primary\"\nstatus_page = \"http://{}/api/v2/summary.json\"\nstatus_components = [\"API\"]\nstatus_poll = \"100ms\"\n",
            page.addr()
        ),
    );
    let gw = gateway(&config).await;
    let admin = admin(&gw, "t").await;
    let health = || async { admin_health(&admin, "t").await["providers"][0].clone() };
    eventually("the first status-page poll", || async {
        health().await["status_page"] == "operational"
    })
    .await;
    assert_eq!(
        post(&gw, false).await.headers()["x-detour-provider"],
        "primary"
    );

    page.set_status(PageStatus::operational().with_component("API", ComponentStatus::MajorOutage));
    eventually("the status page to say down", || async {
        health().await["status_page"] == "down"
    })
    .await;
    let before = primary.stats().requests;
    for _ in 0..10 {
        let resp = post(&gw, false).await;
        assert_eq!(resp.headers()["x-detour-provider"], "backup");
        assert_eq!(resp.headers()["x-detour-attempts"], "1");
    }
    assert_eq!(
        primary.stats().requests,
        before,
        "no request went to a provider whose page says down"
    );

    // A broken page changes nothing, and is reported.
    page.set_faults(faults(json!({"malformed": true})));
    eventually("the broken page to be reported", || async {
        !health().await["status_page_error"].is_null()
    })
    .await;
    assert_eq!(
        health().await["status_page"],
        "down",
        "the last state stays"
    );

    page.set_faults(faults(json!({})));
    page.set_status(PageStatus::operational());
    eventually("the status page to recover", || async {
        health().await["status_page"] == "operational"
    })
    .await;
    assert_eq!(
        post(&gw, false).await.headers()["x-detour-provider"],
        "primary"
    );
}

/// `fast` and `other` over the same two targets, each with its own breaker.
fn two_routes(primary: SocketAddr, backup: SocketAddr, fast: &str, other: &str) -> String {
    let base = two_targets(primary, backup, fast);
    format!(
        r#"{base}
[[routes]]
model = "other"
targets = [
  {{ provider = "primary", model = "gpt-a" }},
  {{ provider = "backup", model = "local-b" }},
]
{other}
"#
    )
}

async fn post_to(gw: &detour::server::Running, alias: &str) -> reqwest::Response {
    let mut body = chat(false);
    body["model"] = json!(alias);
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

const LENIENT: &str =
    r#"breaker = { consecutive_failures = 1000, failure_rate = 1.0, min_requests = 1000 }"#;

#[tokio::test]
async fn a_reload_that_changes_the_breaker_takes_effect() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), LENIENT)).await;
    for _ in 0..5 {
        assert_eq!(post(&gw, false).await.status(), 200);
    }
    assert_eq!(
        primary.stats().requests,
        5,
        "the lenient breaker stays closed"
    );

    // Stricter: the failures already counted (5 in a row) open it at the next one.
    let strict = r#"breaker = { consecutive_failures = 2, open_for = "60s" }"#;
    let config = two_targets(primary.addr(), backup.addr(), strict);
    let status = detour::reload::apply_text(
        &gw.gateway,
        &config,
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    assert_eq!(
        status.outcome,
        detour::reload::Outcome::Applied,
        "{:?}",
        status.errors
    );
    for _ in 0..10 {
        assert_eq!(post(&gw, false).await.status(), 200);
    }
    assert_eq!(
        primary.stats().requests,
        6,
        "after the reload the breaker opens at 2 consecutive failures"
    );

    // A shorter `open_for` lets the probe through sooner.
    primary.set_faults(faults(json!({})));
    let short = r#"breaker = { consecutive_failures = 2, open_for = "100ms", slow_start = "0s" }"#;
    let config = two_targets(primary.addr(), backup.addr(), short);
    let status = detour::reload::apply_text(
        &gw.gateway,
        &config,
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    assert_eq!(
        status.outcome,
        detour::reload::Outcome::Applied,
        "{:?}",
        status.errors
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let resp = post(&gw, false).await;
    assert_eq!(
        resp.headers()["x-detour-provider"],
        "primary",
        "the reloaded open_for (100ms, not 60s) let a probe through"
    );
}

#[tokio::test]
async fn routes_sharing_a_target_keep_their_own_breakers() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let strict = r#"breaker = { consecutive_failures = 2, open_for = "60s" }"#;
    let gw = gateway(&two_routes(primary.addr(), backup.addr(), strict, LENIENT)).await;
    for _ in 0..3 {
        assert_eq!(post_to(&gw, "fast").await.status(), 200);
    }
    assert_eq!(primary.stats().requests, 2, "`fast` opened its breaker");
    for _ in 0..5 {
        let resp = post_to(&gw, "other").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-detour-attempts"], "2");
    }
    assert_eq!(
        primary.stats().requests,
        7,
        "`other`'s lenient breaker is its own: it still tries the primary"
    );
    let resp = post_to(&gw, "fast").await;
    assert_eq!(
        resp.headers()["x-detour-attempts"],
        "1",
        "`fast` stays open"
    );
}

#[tokio::test]
async fn only_the_probe_closes_a_half_open_breaker() {
    let (primary, backup) = (mock().await, mock().await);
    let policy = r#"
breaker = { consecutive_failures = 2, open_for = "200ms", slow_start = "0s" }
timeouts = { first_byte = "10s" }
"#;
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), policy)).await;
    let admin = admin(&gw, "t").await;
    let breaker =
        || async { admin_health(&admin, "t").await["routes"][0]["targets"][0]["breaker"].clone() };

    // A slow request that will succeed, sent while the breaker is closed.
    primary.set_faults(faults(json!({"latency_ms": 2500})));
    let url = gw.url();
    let late = tokio::spawn(async move {
        client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat(false))
            .send()
            .await
            .unwrap()
    });
    eventually("the slow request to reach the primary", || async {
        primary.stats().requests == 1
    })
    .await;

    // Two failures open the breaker; after open_for, a probe hangs.
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    for _ in 0..2 {
        assert_eq!(
            post(&gw, false).await.headers()["x-detour-provider"],
            "backup"
        );
    }
    assert_eq!(breaker().await, "open");
    primary.set_faults(faults(json!({"hang_rate": 1.0})));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let url = gw.url();
    let _probe = tokio::spawn(async move {
        client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat(false))
            .send()
            .await
    });
    eventually("the probe to reach the primary", || async {
        primary.stats().requests == 4
    })
    .await;
    assert_eq!(breaker().await, "half_open");

    // The old request succeeds late: it says nothing about now.
    let resp = late.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "primary");
    assert_eq!(
        breaker().await,
        "half_open",
        "a success that is not the probe's leaves the breaker half-open"
    );
    let resp = post(&gw, false).await;
    assert_eq!(resp.headers()["x-detour-provider"], "backup");
    assert_eq!(resp.headers()["x-detour-attempts"], "1");
}

#[tokio::test]
async fn a_probe_refused_with_the_callers_4xx_frees_the_probe_slot() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let policy = r#"breaker = { consecutive_failures = 2, open_for = "200ms", slow_start = "0s" }"#;
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), policy)).await;
    for _ in 0..2 {
        post(&gw, false).await;
    }
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 400})));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 400, "the probe got the caller's own 4xx");
    assert_eq!(primary.stats().requests, 3);

    // That said nothing about the primary: the next request probes again.
    primary.set_faults(faults(json!({})));
    let resp = post(&gw, false).await;
    assert_eq!(
        resp.headers()["x-detour-provider"],
        "primary",
        "the breaker is not stuck half-open"
    );
}

#[tokio::test]
async fn a_hedge_that_gets_the_callers_4xx_lets_the_other_attempt_answer() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"latency_ms": 500})));
    backup.set_faults(faults(json!({"error_rate": 1.0, "error_status": 400})));
    let hedged = r#"hedge_after = "100ms""#;
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), hedged)).await;
    let resp = post(&gw, false).await;
    assert_eq!(
        resp.status(),
        200,
        "the hedge's 400 did not cancel the attempt that succeeds"
    );
    assert_eq!(resp.headers()["x-detour-provider"], "primary");
    assert_eq!(resp.headers()["x-detour-attempts"], "2");
    assert_eq!(backup.stats().requests, 1);

    // When the other attempt fails too, the 4xx is the answer: it says more
    // than "all targets failed", and no third attempt is made. (A new
    // gateway: this one now explores the unmeasured backup first.)
    let gw = gateway(&two_targets(primary.addr(), backup.addr(), hedged)).await;
    primary.set_faults(faults(
        json!({"latency_ms": 500, "error_rate": 1.0, "error_status": 500}),
    ));
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-detour-attempts"], "2");
    assert_eq!(resp.headers()["x-detour-provider"], "backup");
}

#[tokio::test]
async fn p95_hedging_waits_for_samples() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"latency_ms": 400})));
    let gw = gateway(&two_targets(
        primary.addr(),
        backup.addr(),
        r#"hedge_after = "p95""#,
    ))
    .await;
    let resp = post(&gw, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-detour-attempts"],
        "1",
        "no samples, no estimate: no hedge"
    );
    assert_eq!(backup.stats().requests, 0);
}

#[tokio::test]
async fn p95_hedging_keeps_streamed_and_whole_answers_apart() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&two_targets(
        primary.addr(),
        backup.addr(),
        r#"hedge_after = "p95""#,
    ))
    .await;
    // Fast first events teach nothing about how long a whole answer takes.
    for _ in 0..10 {
        post(&gw, true).await.text().await.unwrap();
    }
    let before = backup.stats().requests;
    primary.set_faults(faults(json!({"latency_ms": 400})));
    let resp = post(&gw, false).await;
    assert_eq!(resp.headers()["x-detour-provider"], "primary");
    assert_eq!(
        resp.headers()["x-detour-attempts"],
        "1",
        "the stream estimate does not hedge whole answers"
    );
    assert_eq!(backup.stats().requests, before);

    // With samples of its own kind, a slow answer is hedged. (A new gateway:
    // one slow sample would make this one explore the unmeasured backup.)
    let gw = gateway(&two_targets(
        primary.addr(),
        backup.addr(),
        r#"hedge_after = "p95""#,
    ))
    .await;
    primary.set_faults(faults(json!({})));
    for stream in [false, true].repeat(10) {
        post(&gw, stream).await.text().await.unwrap();
    }
    primary.set_faults(faults(json!({"latency_ms": 2000})));
    let started = Instant::now();
    let resp = post(&gw, false).await;
    assert_eq!(resp.headers()["x-detour-provider"], "backup");
    assert_eq!(resp.headers()["x-detour-attempts"], "2");
    assert!(started.elapsed() < Duration::from_millis(1000));

    // /admin/health shows both estimates.
    let admin = admin(&gw, "t").await;
    let target = admin_health(&admin, "t").await["routes"][0]["targets"][0].clone();
    assert!(
        target["latency"]["streamed"]["ewma_ms"].is_number(),
        "{target}"
    );
    assert!(
        target["latency"]["streamed"]["p95_ms"].is_number(),
        "{target}"
    );
    assert!(
        target["latency"]["whole"]["ewma_ms"].is_number(),
        "{target}"
    );
    assert!(target["latency"]["whole"]["p95_ms"].is_number(), "{target}");
}
