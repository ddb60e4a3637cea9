//! The chaos suite: steady concurrent load through detour to mock providers,
//! with faults switched on mid-run over the mocks' control API. Each scenario
//! is a bounded run of a few seconds and asserts figures, not just success.
//!
//! Figures are printed, and appended as JSON lines to `$DETOUR_CHAOS_REPORT`
//! when it is set (`scripts/chaos.sh` turns them into RESILIENCE.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use detour::mock::MockServer;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug, Clone)]
struct Sample {
    /// When the request was sent, from the start of the run.
    at: Duration,
    latency: Duration,
    status: u16,
    provider: String,
}

/// Drives `concurrency` clients against `url` for `duration` while `script`
/// runs alongside (switching faults at set times).
async fn drive(
    url: String,
    concurrency: usize,
    duration: Duration,
    script: impl std::future::Future<Output = ()> + Send + 'static,
) -> Vec<Sample> {
    let start = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let script = tokio::spawn(script);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (url, samples) = (url.clone(), Arc::clone(&samples));
        workers.push(tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let body = serde_json::to_vec(&chat(false)).unwrap();
            while start.elapsed() < duration {
                let sent = Instant::now();
                let resp = c
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let (status, provider) = match resp {
                    Ok(r) => {
                        let p = r
                            .headers()
                            .get("x-detour-provider")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let s = r.status().as_u16();
                        let _ = r.bytes().await;
                        (s, p)
                    }
                    Err(_) => (0, "-".to_owned()),
                };
                samples.lock().await.push(Sample {
                    at: sent.duration_since(start),
                    latency: sent.elapsed(),
                    status,
                    provider,
                });
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    script.abort();
    let mut out = samples.lock().await.clone();
    out.sort_by_key(|s| s.at);
    out
}

/// Sets faults on a mock over its control API, as an operator would.
async fn set(mock: &str, f: Value) {
    client()
        .put(format!("{mock}/_mock/faults"))
        .json(&f)
        .send()
        .await
        .unwrap();
}

fn url(m: &MockServer) -> String {
    format!("http://{}", m.addr())
}

fn pct(latencies: &mut [Duration], p: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort_unstable();
    let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[i]
}

fn window(samples: &[Sample], from: f64, to: f64) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| s.at >= Duration::from_secs_f64(from) && s.at < Duration::from_secs_f64(to))
        .collect()
}

fn p99(samples: &[&Sample]) -> Duration {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    pct(&mut l, 0.99)
}

fn share(samples: &[&Sample], provider: &str) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.iter().filter(|s| s.provider == provider).count() as f64 / samples.len() as f64
}

fn errors(samples: &[Sample]) -> usize {
    samples.iter().filter(|s| s.status != 200).count()
}

fn report(scenario: &str, figures: Value) {
    println!("chaos {scenario}: {figures}");
    if let Ok(path) = std::env::var("DETOUR_CHAOS_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{}", json!({"scenario": scenario, "figures": figures})).unwrap();
    }
}

fn config(primary: &MockServer, backup: &MockServer, policy: &str) -> String {
    format!(
        r#"
[[providers]]
name = "primary"
kind = "openai"
base_url = "http://{}/v1"

[[providers]]
name = "backup"
kind = "openai-compatible"
base_url = "http://{}/v1"

[[routes]]
model = "fast"
targets = [
  {{ provider = "primary", model = "gpt-a" }},
  {{ provider = "backup", model = "local-b" }},
]
{policy}
"#,
        primary.addr(),
        backup.addr()
    )
}

const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_500s_then_resets_then_hangs() {
    let (primary, backup) = (mock().await, mock().await);
    let policy = r#"
timeouts = { first_byte = "1s" }
breaker = { consecutive_failures = 3, open_for = "1s", slow_start = "0s" }
"#;
    let gw = gateway(&config(&primary, &backup, policy)).await;
    let p = url(&primary);
    let samples = drive(
        format!("{}/v1/chat/completions", gw.url()),
        CLIENTS,
        Duration::from_secs(8),
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            set(&p, json!({"error_rate": 1.0, "error_status": 500})).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            set(&p, json!({"reset_rate": 1.0})).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            set(&p, json!({"hang_rate": 1.0})).await;
        },
    )
    .await;
    let baseline = window(&samples, 0.5, 2.0);
    let backup_alone = window(&samples, 2.5, 3.9);
    let outage = window(&samples, 2.0, 8.0);
    let bound = 2 * p99(&backup_alone) + Duration::from_secs(1);
    let slow = outage.iter().filter(|s| s.latency > bound).count();
    let first_backup = outage
        .iter()
        .find(|s| s.provider == "backup")
        .map(|s| s.at.as_secs_f64() - 2.0);
    let upstream = primary.stats().requests + backup.stats().requests;
    report(
        "primary 500s, then resets, then hangs",
        json!({
            "client_requests": samples.len(),
            "client_errors": errors(&samples),
            "baseline_p99_ms": p99(&baseline).as_secs_f64() * 1e3,
            "outage_p99_ms": p99(&outage).as_secs_f64() * 1e3,
            "requests_slower_than_2x_fallback_plus_first_byte": slow,
            "time_to_fail_over_s": first_backup,
            "upstream_amplification": upstream as f64 / samples.len() as f64,
        }),
    );
    assert_eq!(
        errors(&samples),
        0,
        "no client-visible errors while the backup is healthy"
    );
    // Only requests caught at a phase switch or by a breaker probe may be slow.
    assert!(slow <= 3 * CLIENTS + 8, "{slow} slow requests");
    assert!(first_backup.unwrap() < 0.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brownout_with_hedging_keeps_p99_near_baseline() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&config(&primary, &backup, r#"hedge_after = "p95""#)).await;
    let p = url(&primary);
    let samples = drive(
        format!("{}/v1/chat/completions", gw.url()),
        CLIENTS,
        Duration::from_secs(7),
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            set(&p, json!({"latency_ms": 5000})).await;
        },
    )
    .await;
    let baseline = window(&samples, 0.5, 2.0);
    let late = window(&samples, 4.0, 7.0);
    report(
        "brownout (primary 5 s to first byte), hedging on",
        json!({
            "client_errors": errors(&samples),
            "baseline_p99_ms": p99(&baseline).as_secs_f64() * 1e3,
            "brownout_p99_ms_after_2s": p99(&late).as_secs_f64() * 1e3,
            "backup_share_after_2s": share(&late, "backup"),
        }),
    );
    assert_eq!(errors(&samples), 0);
    assert!(
        late.len() > 100,
        "clients were stuck on the slow primary: {} requests",
        late.len()
    );
    let bound = (2 * p99(&baseline)).max(Duration::from_millis(20));
    assert!(p99(&late) <= bound, "p99 {:?} > {bound:?}", p99(&late));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brownout_without_hedging_demotes_the_primary() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&config(&primary, &backup, "")).await;
    let p = url(&primary);
    let samples = drive(
        format!("{}/v1/chat/completions", gw.url()),
        CLIENTS,
        Duration::from_secs(7),
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            set(&p, json!({"latency_ms": 1000})).await;
        },
    )
    .await;
    let late = window(&samples, 4.0, 7.0);
    report(
        "brownout (primary 1 s to first byte), hedging off",
        json!({
            "client_errors": errors(&samples),
            "backup_share_from_3s_after": share(&late, "backup"),
            "p99_ms_from_3s_after": p99(&late).as_secs_f64() * 1e3,
        }),
    );
    assert_eq!(errors(&samples), 0);
    assert!(
        share(&late, "backup") > 0.9,
        "primary not demoted: backup share {}",
        share(&late, "backup")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_moves_traffic_away_until_the_cool_down_ends() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&config(
        &primary,
        &backup,
        r#"breaker = { slow_start = "0s" }"#,
    ))
    .await;
    let p = url(&primary);
    let samples = drive(
        format!("{}/v1/chat/completions", gw.url()),
        CLIENTS,
        Duration::from_secs(7),
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            set(&p, json!({"rate_limit_rate": 1.0, "retry_after_secs": 2})).await;
            // The storm ends before the 2 s cool-down does.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            set(&p, json!({})).await;
        },
    )
    .await;
    let storm = window(&samples, 1.2, 2.5);
    let after = window(&samples, 5.5, 7.0);
    let primary_requests_in_storm = primary.stats().faults.rate_limit;
    report(
        "429 storm with retry-after: 2",
        json!({
            "client_errors": errors(&samples),
            "primary_share_during_storm": share(&storm, "primary"),
            "primary_share_after_cool_down": share(&after, "primary"),
            "429s_sent_to_primary": primary_requests_in_storm,
        }),
    );
    assert_eq!(errors(&samples), 0);
    assert_eq!(share(&storm, "primary"), 0.0);
    assert!(
        primary_requests_in_storm <= 2 * CLIENTS as u64,
        "retry-after was not honoured: {primary_requests_in_storm} 429s"
    );
    assert!(share(&after, "primary") > 0.9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_primary_causes_no_errors_and_no_breaker_storm() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&config(&primary, &backup, "")).await;
    let p = url(&primary);
    let samples = drive(
        format!("{}/v1/chat/completions", gw.url()),
        CLIENTS,
        Duration::from_secs(8),
        async move {
            for i in 0.. {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let f = if i % 2 == 0 {
                    json!({"error_rate": 1.0, "error_status": 502})
                } else {
                    json!({})
                };
                set(&p, f).await;
            }
        },
    )
    .await;
    let transitions = gw.gateway.live().routes[0].health[0].transitions();
    report(
        "flapping primary (1 s up, 1 s down)",
        json!({
            "client_requests": samples.len(),
            "client_errors": errors(&samples),
            "breaker_transitions": transitions,
            "upstream_amplification": (primary.stats().requests + backup.stats().requests) as f64 / samples.len() as f64,
        }),
    );
    assert_eq!(errors(&samples), 0);
    assert!(
        transitions <= 16,
        "the breaker oscillated: {transitions} transitions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_down_gives_fast_503s_and_bounded_upstream_load() {
    let (primary, backup) = (mock().await, mock().await);
    for m in [&primary, &backup] {
        m.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    }
    let policy = r#"breaker = { open_for = "1s" }
retries = { budget = 0.2, min_per_sec = 5 }"#;
    let gw = gateway(&config(&primary, &backup, policy)).await;
    let samples = drive(
        format!("{}/v1/chat/completions", gw.url()),
        CLIENTS,
        Duration::from_secs(5),
        async {},
    )
    .await;
    let settled = window(&samples, 1.0, 5.0);
    let mut latencies: Vec<Duration> = settled.iter().map(|s| s.latency).collect();
    latencies.sort_unstable();
    let slowest = latencies.last().copied().unwrap_or_default();
    let p999 = latencies
        .get(latencies.len() * 999 / 1000)
        .copied()
        .unwrap_or_default();
    let upstream = primary.stats().requests + backup.stats().requests;
    let bound = 1.2 * samples.len() as f64 + 5.0 * 5.0;
    report(
        "every target down",
        json!({
            "client_requests": samples.len(),
            "status_503_share": samples.iter().filter(|s| s.status == 503).count() as f64 / samples.len() as f64,
            "slowest_answer_after_1s_ms": slowest.as_secs_f64() * 1e3,
            "p999_after_1s_ms": p999.as_secs_f64() * 1e3,
            "upstream_requests": upstream,
            "upstream_amplification": upstream as f64 / samples.len() as f64,
        }),
    );
    assert!(settled.iter().all(|s| s.status == 503 || s.status == 502));
    // Answers take 10 to 16 ms here at most; nothing in detour may wait (a
    // probe's hedge would wait 250 ms, a connect timeout longer). The
    // slowest answer is allowed one scheduling stall of a shared machine
    // (103 ms was seen once among 15,000); the 99.9th percentile is not.
    assert!(p999 < Duration::from_millis(50), "p99.9 {p999:?}");
    assert!(slowest < Duration::from_millis(200), "{slowest:?}");
    assert!(
        (upstream as f64) <= bound,
        "{upstream} upstream requests > {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_primary_ramps_up_over_slow_start() {
    let (primary, backup) = (mock().await, mock().await);
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let policy = r#"breaker = { consecutive_failures = 3, open_for = "500ms", slow_start = "4s" }"#;
    let gw = gateway(&config(&primary, &backup, policy)).await;
    let p = url(&primary);
    let samples = drive(
        format!("{}/v1/chat/completions", gw.url()),
        CLIENTS,
        Duration::from_secs(7),
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            set(&p, json!({})).await;
        },
    )
    .await;
    let shares: Vec<f64> = (1..7)
        .map(|s| share(&window(&samples, s as f64, s as f64 + 1.0), "primary"))
        .collect();
    report(
        "recovery with a 4 s slow start",
        json!({"client_errors": errors(&samples), "primary_share_per_second_after_recovery": shares}),
    );
    assert_eq!(errors(&samples), 0);
    assert!(
        shares[0] < 0.5,
        "the recovered primary took its full share at once: {shares:?}"
    );
    assert!(
        shares[5] > 0.9,
        "the primary never got its traffic back: {shares:?}"
    );
    assert!(
        shares[0] < shares[2] && shares[2] <= shares[5],
        "{shares:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_page_outage_takes_traffic_away_by_the_next_poll() {
    use detour::mock::{Flavor, MockOptions};
    let (primary, backup) = (mock().await, mock().await);
    let page = detour::mock::spawn(
        Flavor::Statuspage,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        MockOptions::default(),
    )
    .await
    .unwrap();
    let config = config(&primary, &backup, "").replace(
        "name = \"primary\"\n",
        &format!(
            "name = \"primary\"\nstatus_page = \"http://{}/api/v2/summary.json\"\nstatus_components = [\"API\"]\nstatus_poll = \"250ms\"\n",
            page.addr()
        ),
    );
    let gw = gateway(&config).await;
    let page_url = url(&page);
    let samples = drive(
        format!("{}/v1/chat/completions", gw.url()),
        CLIENTS,
        Duration::from_secs(4),
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            client()
                .put(format!("{page_url}/_mock/status"))
                .json(&json!({"components": {"API": "major_outage"}}))
                .send()
                .await
                .unwrap();
        },
    )
    .await;
    // One poll interval (plus the poll's own time) after the switch.
    let after = window(&samples, 1.4, 4.0);
    let before = window(&samples, 0.3, 1.0);
    report(
        "status page switches to major_outage (polled every 250 ms)",
        json!({
            "client_errors": errors(&samples),
            "primary_share_before": share(&before, "primary"),
            "primary_share_from_one_poll_after": share(&after, "primary"),
            "last_primary_request_after_switch_ms": samples
                .iter()
                .filter(|s| s.provider == "primary")
                .map(|s| s.at.as_secs_f64() * 1e3 - 1000.0)
                .fold(f64::MIN, f64::max),
        }),
    );
    assert_eq!(errors(&samples), 0);
    assert!(share(&before, "primary") > 0.99);
    assert_eq!(
        share(&after, "primary"),
        0.0,
        "requests still went to a provider whose page says down"
    );
}
