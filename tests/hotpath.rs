//! What the hot path's shortcuts must not change: a finished request's
//! metrics recorded through handles resolved once per label set
//! (`metrics::request_finished`), and the usage read from the top level of
//! a non-streamed answer only (`protocol::openai::usage_of`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::time::Instant;

const TOKEN: &str = "hotpath-t0ken";

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until every `(series, value)` is there (a request's metrics are
/// recorded when its body ends, a moment after the client has it).
async fn scrape_until(admin: &str, expected: &[(String, f64)]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = client()
            .get(format!("{admin}/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
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
    scrape_until(
        &admin,
        &[
            (series(200), 3.0),
            (series(400), 2.0),
            (tokens("prompt"), prompt),
            (tokens("completion"), completion),
            (
                r#"detour_request_duration_seconds_count{route="fast",format="openai"}"#.to_owned(),
                5.0,
            ),
            // Only answers relayed to the client have a first byte (the
            // refused 400s do not).
            (
                r#"detour_ttfb_seconds_count{provider="hp"}"#.to_owned(),
                3.0,
            ),
        ],
    )
    .await;
}
