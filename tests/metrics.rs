//! `GET /metrics` on the admin listener: the series a failover, a hedge race
//! and an empty retry budget leave behind, with their labels and values.
//!
//! The recorder is process-wide, so each test uses its own route and
//! provider names and asserts on its own series only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::time::Instant;

const TOKEN: &str = "metrics-t0ken";

/// Route `route`: provider `{route}-primary` then `{route}-backup`.
fn two_targets(route: &str, primary: SocketAddr, backup: SocketAddr, policy: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "{route}-primary"
kind = "openai"
base_url = "http://{primary}/v1"

[[providers]]
name = "{route}-backup"
kind = "openai-compatible"
base_url = "http://{backup}/v1"

[[routes]]
model = "{route}"
targets = [
  {{ provider = "{route}-primary", model = "gpt-a" }},
  {{ provider = "{route}-backup", model = "local-b" }},
]
{policy}
"#
    )
}

async fn post(gw: &detour::server::Running, model: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap()
}

async fn scrape(admin: &str) -> String {
    let resp = client()
        .get(format!("{admin}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    resp.text().await.unwrap()
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until every `(series, value)` is there: a request's line (and its
/// metrics) is written when its body ends, a moment after the client has it.
async fn scrape_until(admin: &str, expected: &[(&str, f64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(admin).await;
        let missing: Vec<_> = expected
            .iter()
            .filter(|(s, v)| value(&text, s) != Some(*v))
            .map(|(s, v)| format!("{s} = {v} (found {:?})", value(&text, s)))
            .collect();
        if missing.is_empty() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "missing series:\n{}\n\n{text}",
            missing.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_admin_token_is_required() {
    let backup = mock().await;
    let gw = gateway(&two_targets("m-auth", backup.addr(), backup.addr(), "")).await;
    let admin = admin(&gw, TOKEN).await;
    let url = format!("{admin}/metrics");
    let resp = client().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client()
        .get(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(!resp.text().await.unwrap().contains("detour_"));
}

#[tokio::test]
async fn a_failover_shows_as_requests_failovers_retries_breaker_and_latency() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let policy = r#"breaker = { consecutive_failures = 2, open_for = "60s" }"#;
    let gw = gateway(&two_targets("m-fo", primary.addr(), backup.addr(), policy)).await;
    let admin = admin(&gw, TOKEN).await;
    for _ in 0..3 {
        let resp = post(&gw, "m-fo").await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    // A stream that reports its usage.
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(
            &json!({"model": "m-fo", "messages": [{"role": "user", "content": "Hi"}],
            "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    // A model alias the client made up is not a label value.
    let resp = post(&gw, "m-fo-typed-by-a-client").await;
    assert_eq!(resp.status(), 404);
    assert_eq!(primary.stats().requests, 2, "the breaker opened after two");

    let text = scrape_until(
        &admin,
        &[
            (
                r#"detour_requests_total{route="m-fo",provider="m-fo-backup",status="200",format="openai",tenant="anonymous"}"#,
                4.0,
            ),
            (
                r#"detour_request_duration_seconds_count{route="m-fo",format="openai"}"#,
                4.0,
            ),
            (
                r#"detour_failovers_total{route="m-fo",reason="status_5xx"}"#,
                2.0,
            ),
            (r#"detour_retries_total{route="m-fo"}"#, 2.0),
            (
                r#"detour_breaker_transitions_total{provider="m-fo-primary",to="open"}"#,
                1.0,
            ),
            (r#"detour_ttfb_seconds_count{provider="m-fo-backup"}"#, 4.0),
        ],
    )
    .await;
    assert!(!text.contains("m-fo-typed-by-a-client"), "{text}");
    let unknown = r#"detour_requests_total{route="unknown",provider="none",status="404",format="openai",tenant="anonymous"}"#;
    assert!(value(&text, unknown).unwrap() >= 1.0, "{text}");
    // Histograms have buckets, the last one counting every sample.
    assert_eq!(
        value(
            &text,
            r#"detour_ttfb_seconds_bucket{provider="m-fo-backup",le="+Inf"}"#
        ),
        Some(4.0),
        "{text}"
    );
    assert!(value(&text, r#"detour_ttfb_seconds_sum{provider="m-fo-backup"}"#).unwrap() > 0.0);
    // The stream's usage (a non-streamed answer's is not read yet: see the
    // relay's `Mode::Plain`).
    for kind in ["prompt", "completion"] {
        let series = format!(
            r#"detour_tokens_total{{provider="m-fo-backup",kind="{kind}",tenant="anonymous"}}"#
        );
        assert!(
            value(&text, &series).unwrap_or(0.0) >= 1.0,
            "{series}\n{text}"
        );
    }
    // Every metric is described.
    for (name, _, _) in detour::metrics::ALL {
        if text.contains(&format!("\n{name}")) {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}\n{text}");
        }
    }
    // Read from the gateway at each scrape.
    assert_eq!(
        value(&text, "detour_config_rejected_total"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(value(&text, "detour_rollout_state"), Some(0.0), "{text}");
    // Nothing for the primary that never answered.
    assert!(
        !text.contains(r#"provider="m-fo-primary",status"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_hedge_that_answers_first_is_counted_as_won() {
    let (slow, fast) = (mock().await, mock().await);
    slow.set_faults(faults(json!({"latency_ms": 2000})));
    let policy = r#"hedge_after = "50ms""#;
    let gw = gateway(&two_targets("m-hedge", slow.addr(), fast.addr(), policy)).await;
    let admin = admin(&gw, TOKEN).await;
    let resp = post(&gw, "m-hedge").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "m-hedge-backup");
    resp.bytes().await.unwrap();
    let text = scrape_until(
        &admin,
        &[(r#"detour_hedges_total{route="m-hedge",outcome="won"}"#, 1.0)],
    )
    .await;
    assert_eq!(
        value(&text, r#"detour_retries_total{route="m-hedge"}"#),
        None,
        "a hedge is not a retry"
    );
}

#[tokio::test]
async fn an_empty_retry_budget_is_counted() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 503})));
    // No deposits and no floor: only the ten tokens a route starts with.
    let policy = r#"retries = { budget = 0.0, min_per_sec = 0 }
breaker = { consecutive_failures = 1000, min_requests = 1000 }"#;
    let gw = gateway(&two_targets(
        "m-budget",
        primary.addr(),
        backup.addr(),
        policy,
    ))
    .await;
    let admin = admin(&gw, TOKEN).await;
    for _ in 0..10 {
        let resp = post(&gw, "m-budget").await;
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let resp = post(&gw, "m-budget").await;
    assert_eq!(resp.status(), 502, "no token left for a second attempt");
    resp.bytes().await.unwrap();
    assert_eq!(backup.stats().requests, 10);
    scrape_until(
        &admin,
        &[
            (
                r#"detour_retry_budget_exhausted_total{route="m-budget"}"#,
                1.0,
            ),
            (
                r#"detour_requests_total{route="m-budget",provider="m-budget-primary",status="502",format="openai",tenant="anonymous"}"#,
                1.0,
            ),
        ],
    )
    .await;
}

/// What the hot path's shortcuts must not change: a finished request's
/// metrics recorded through handles resolved once per label set
/// (`metrics::request_finished`), and the usage read from the top level of
/// a non-streamed answer only (`protocol::openai::usage_of`).
/// Each label set counts on its own (same route and provider, two
/// statuses), and the tokens counted are exactly those of the answers the
/// client got, read from non-streamed answers.
#[tokio::test]
async fn cached_handles_count_each_label_set_and_the_answers_tokens() {
    let upstream = mock().await;
    let config = one_route(upstream.addr(), "", "").replace(r#"name = "p""#, r#"name = "hp""#);
    let config = config.replace(r#"provider = "p""#, r#"provider = "hp""#);
    let gw = gateway(&config).await;
    // The recorder is installed before the first request (as `serve` does).
    let admin = admin(&gw, TOKEN).await;
    let (mut prompt, mut completion) = (0.0, 0.0);
    for i in 0..3 {
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&json!({"model": "fast", "messages": [{"role": "user", "content": format!("Hi {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        prompt += body["usage"]["prompt_tokens"].as_f64().unwrap();
        completion += body["usage"]["completion_tokens"].as_f64().unwrap();
    }
    assert!(prompt > 0.0 && completion > 0.0);
    // The caller's own 400, relayed: another label set of the same route.
    upstream.set_faults(faults(json!({"error_rate": 1.0, "error_status": 400})));
    for _ in 0..2 {
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        resp.bytes().await.unwrap();
        assert_eq!(status, 400);
    }
    let series = |status: u16| {
        format!(
            r#"detour_requests_total{{route="fast",provider="hp",status="{status}",format="openai",tenant="anonymous"}}"#
        )
    };
    let tokens = |kind: &str| {
        format!(r#"detour_tokens_total{{provider="hp",kind="{kind}",tenant="anonymous"}}"#)
    };
    let (ok, refused) = (series(200), series(400));
    let (prompt_series, completion_series) = (tokens("prompt"), tokens("completion"));
    scrape_until(
        &admin,
        &[
            (ok.as_str(), 3.0),
            (refused.as_str(), 2.0),
            (prompt_series.as_str(), prompt),
            (completion_series.as_str(), completion),
            (
                r#"detour_request_duration_seconds_count{route="fast",format="openai"}"#,
                5.0,
            ),
            // Only answers relayed to the client have a first byte (the
            // refused 400s do not).
            (r#"detour_ttfb_seconds_count{provider="hp"}"#, 3.0),
        ],
    )
    .await;
}
