//! `GET /status` and `GET /status.json` on the main listener: the Statuspage v2
//! shape, providers going down (by traffic, status page and override) and
//! coming back, incidents with their effect; and the HTML page rendered in
//! headless Chromium (Debian's `chromium`, installed by `.ci/run`), with a
//! screenshot kept in `target/status-page.png`.
//!
//! Incidents are kept per process, so each test uses its own provider names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use detour::health::PageState;
use detour::mock::{self, Flavor, MockOptions};
use detour::server::Running;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Providers `{p}-primary` (optionally watching `status_page`) and
/// `{p}-backup` on route `{p}`; the breaker opens after two failures.
fn config(
    p: &str,
    primary: SocketAddr,
    backup: SocketAddr,
    status_page: Option<SocketAddr>,
) -> String {
    let page = status_page.map_or(String::new(), |a| {
        format!("status_page = \"http://{a}/api/v2/summary.json\"\nstatus_poll = \"50ms\"")
    });
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[keys]]
key = "sk-gateway-key"
tenant = "t"

[[providers]]
name = "{p}-primary"
kind = "openai"
base_url = "http://{primary}/v1"
{page}

[[providers]]
name = "{p}-backup"
kind = "openai-compatible"
base_url = "http://{backup}/v1"

[[routes]]
model = "{p}"
targets = [
  {{ provider = "{p}-primary", model = "gpt-a" }},
  {{ provider = "{p}-backup", model = "local-b" }},
]
breaker = {{ consecutive_failures = 2, open_for = "300ms", slow_start = "0s" }}
"#
    )
}

async fn chat(gw: &Running, model: &str) -> reqwest::Response {
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth("sk-gateway-key")
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// `/status.json`, without any credentials.
async fn summary(gw: &Running) -> Value {
    let resp = client()
        .get(format!("{}/status.json", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    resp.json().await.unwrap()
}

fn component<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no component {name}: {v:#}"))
}

/// Polls `/status.json` until `done` holds (status pages are polled, and a
/// request's effect is counted as its answer is committed).
async fn summary_until(gw: &Running, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = summary(gw).await;
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never {what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn assert_v2_shape(v: &Value) {
    for key in ["id", "name", "url", "time_zone", "updated_at"] {
        assert!(v["page"][key].is_string(), "page.{key}: {v:#}");
    }
    assert!(v["status"]["indicator"].is_string());
    assert!(v["status"]["description"].is_string());
    assert_eq!(v["scheduled_maintenances"], json!([]));
    assert!(v["incidents"].is_array());
    for c in v["components"].as_array().unwrap() {
        for key in [
            "id",
            "name",
            "status",
            "created_at",
            "updated_at",
            "position",
            "description",
            "showcase",
            "group_id",
            "page_id",
            "group",
            "only_show_if_degraded",
        ] {
            assert!(c.get(key).is_some(), "component.{key}: {c:#}");
        }
        assert_eq!(c["page_id"], v["page"]["id"]);
    }
    for i in v["incidents"].as_array().unwrap() {
        for key in [
            "id",
            "name",
            "status",
            "impact",
            "created_at",
            "started_at",
            "incident_updates",
            "components",
        ] {
            assert!(i.get(key).is_some(), "incident.{key}: {i:#}");
        }
        assert!(i["resolved_at"].is_null());
    }
}

/// detour's own status-page reader, pointed at detour's page.
fn read_as_status_page(v: &Value, component: &str) -> PageState {
    detour::status_pages::state_of(v.to_string().as_bytes(), &[component.to_owned()]).unwrap()
}

#[tokio::test]
async fn an_outage_found_by_traffic_opens_an_incident_until_a_probe_closes_it() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&config("sp-traffic", primary.addr(), backup.addr(), None)).await;

    let v = summary(&gw).await;
    assert_v2_shape(&v);
    assert_eq!(v["status"]["indicator"], "none", "{v:#}");
    assert_eq!(v["status"]["description"], "All Systems Operational");
    assert_eq!(component(&v, "sp-traffic-primary")["status"], "operational");
    assert_eq!(component(&v, "sp-traffic-primary")["position"], 1);
    assert_eq!(v["incidents"], json!([]));

    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    for _ in 0..4 {
        chat(&gw, "sp-traffic").await.bytes().await.unwrap();
    }
    let v = summary_until(&gw, "counted 3 requests failed over", |v| {
        v["detour"]["incidents"][0]["failed_over"] == 3
    })
    .await;
    assert_v2_shape(&v);
    assert_eq!(v["status"]["indicator"], "major", "{v:#}");
    let c = component(&v, "sp-traffic-primary");
    assert_eq!(c["status"], "major_outage");
    assert_eq!(c["description"], "every target's circuit breaker is open");
    assert_eq!(component(&v, "sp-traffic-backup")["status"], "operational");
    assert_eq!(
        read_as_status_page(&v, "sp-traffic-primary"),
        PageState::Down
    );
    assert_eq!(
        read_as_status_page(&v, "sp-traffic-backup"),
        PageState::Operational
    );

    let incidents = v["incidents"].as_array().unwrap();
    assert_eq!(incidents.len(), 1, "{v:#}");
    let i = &incidents[0];
    assert_eq!(i["impact"], "major");
    assert_eq!(i["status"], "investigating");
    assert!(i["name"]
        .as_str()
        .unwrap()
        .starts_with("sp-traffic-primary"));
    assert_eq!(i["components"][0]["id"], c["id"]);
    let d = &v["detour"]["incidents"][0];
    assert_eq!(d["cause"], "traffic");
    assert!(d["ended_at"].is_null());

    // The provider recovers: after `open_for` a probe succeeds and closes
    // the breaker, which ends the incident.
    primary.set_faults(faults(json!({})));
    tokio::time::sleep(Duration::from_millis(350)).await;
    let resp = chat(&gw, "sp-traffic").await;
    assert_eq!(resp.headers()["x-detour-provider"], "sp-traffic-primary");
    let v = summary(&gw).await;
    assert_eq!(v["status"]["indicator"], "none", "{v:#}");
    assert_eq!(component(&v, "sp-traffic-primary")["status"], "operational");
    assert_eq!(v["incidents"], json!([]));
    let d = &v["detour"]["incidents"][0];
    assert!(d["ended_at"].is_string(), "{v:#}");
    assert_eq!(d["failed_over"], 3);
    assert!(v["detour"]["uptime_seconds"].is_u64());
}

#[tokio::test]
async fn the_status_page_and_overrides_open_incidents_too() {
    let (primary, backup) = (mock().await, mock().await);
    let page = mock::spawn(
        Flavor::Statuspage,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        MockOptions::default(),
    )
    .await
    .unwrap();
    let gw = gateway(&config(
        "sp-page",
        primary.addr(),
        backup.addr(),
        Some(page.addr()),
    ))
    .await;
    summary_until(&gw, "read the operational page", |v| {
        component(v, "sp-page-primary")["status"] == "operational"
    })
    .await;

    let put = client()
        .put(format!("{}/_mock/status", page.url()))
        .body(r#"{"components":{"API":"major_outage"},"incident":"Elevated error rates"}"#)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let v = summary_until(&gw, "saw the status page go down", |v| {
        component(v, "sp-page-primary")["status"] == "major_outage"
    })
    .await;
    assert_v2_shape(&v);
    assert_eq!(
        component(&v, "sp-page-primary")["description"],
        "its status page reports a major outage"
    );
    assert_eq!(v["detour"]["incidents"][0]["cause"], "status_page");
    // While its page says down, requests go to the backup: each counts.
    for _ in 0..2 {
        let resp = chat(&gw, "sp-page").await;
        assert_eq!(resp.headers()["x-detour-provider"], "sp-page-backup");
        resp.bytes().await.unwrap();
    }
    assert_eq!(primary.stats().requests, 0);
    summary_until(&gw, "counted 2 requests", |v| {
        v["detour"]["incidents"][0]["failed_over"] == 2
    })
    .await;

    // An operator takes the backup out too: everything is down.
    let admin = admin(&gw, "adm").await;
    let set = |action: &'static str| {
        let admin = admin.clone();
        async move {
            let resp = client()
                .post(format!("{admin}/admin/providers/sp-page-backup/{action}"))
                .bearer_auth("adm")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    };
    set("down").await;
    let v = summary(&gw).await;
    assert_eq!(v["status"]["indicator"], "critical", "{v:#}");
    assert_eq!(component(&v, "sp-page-backup")["status"], "major_outage");
    assert_eq!(v["incidents"].as_array().unwrap().len(), 2, "{v:#}");
    assert_eq!(v["detour"]["incidents"][1]["cause"], "override");
    set("auto").await;
    let v = summary(&gw).await;
    assert_eq!(component(&v, "sp-page-backup")["status"], "operational");
    assert!(v["detour"]["incidents"][1]["ended_at"].is_string(), "{v:#}");

    // The page clears: the incident ends.
    let del = client()
        .delete(format!("{}/_mock/status", page.url()))
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success());
    let v = summary_until(&gw, "saw the page clear", |v| v["incidents"] == json!([])).await;
    assert_eq!(v["status"]["indicator"], "none", "{v:#}");
    assert!(v["detour"]["incidents"][0]["ended_at"].is_string());
}

#[tokio::test]
async fn the_status_page_needs_no_key_and_lists_no_secrets() {
    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&config("sp-open", primary.addr(), backup.addr(), None)).await;
    // The API itself still wants a key.
    let resp = client()
        .get(format!("{}/v1/models", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client()
        .get(format!("{}/status", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'none'"));
    assert!(h.contains_key("x-request-id"));
    let html = resp.text().await.unwrap();
    assert!(html.contains(r#"<meta http-equiv="refresh" content="10">"#));
    assert!(!html.contains("sk-gateway-key") && !html.contains(&primary.addr().to_string()));
    // Self-contained: nothing to fetch, no script.
    assert!(!html.contains("<script"), "{html}");
    for attr in ["src=", "href="] {
        for (at, _) in html.match_indices(attr) {
            let rest = &html[at + attr.len()..];
            assert!(
                rest.starts_with("\"data:") || rest.starts_with("\"/status.json\""),
                "{}",
                &html[at..at + 40]
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Headless Chromium

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium on `url` with `extra` flags; returns (stdout, stderr).
async fn chromium(url: &str, extra: &[&str]) -> (String, String) {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run installs it)"
    );
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1100,800",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium hung")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "chromium failed: {stderr}");
    (stdout, stderr)
}

/// What the page logged to its console: Chromium writes each console
/// message and uncaught exception to stderr as an `INFO:CONSOLE` line.
fn console_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE") || l.contains("Uncaught"))
        .collect()
}

async fn dom(url: &str) -> String {
    let (dom, stderr) = chromium(url, &["--dump-dom"]).await;
    let console = console_lines(&stderr);
    assert!(
        console.is_empty(),
        "console output from {url}:\n{}",
        console.join("\n")
    );
    dom
}

fn screenshot_path() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target>/tmp`.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("status-page.png")
}

#[tokio::test]
async fn chromium_renders_the_page_and_shows_a_provider_going_down() {
    // The console check must be able to fail: a page that logs is caught.
    let canary = tempfile::tempdir().unwrap();
    let page = canary.path().join("canary.html");
    std::fs::write(
        &page,
        "<!DOCTYPE html><title>c</title><script>console.error('canary'); nope();</script>",
    )
    .unwrap();
    let (_, stderr) = chromium(&format!("file://{}", page.display()), &["--dump-dom"]).await;
    let console = console_lines(&stderr);
    assert!(console.iter().any(|l| l.contains("canary")), "{stderr}");
    assert!(
        console
            .iter()
            .any(|l| l.contains("Uncaught ReferenceError")),
        "{stderr}"
    );

    let (primary, backup) = (mock().await, mock().await);
    let gw = gateway(&config("br", primary.addr(), backup.addr(), None)).await;
    let url = format!("{}/status", gw.url());

    let before = dom(&url).await;
    assert!(before.contains(r#"<h1>detour status</h1>"#), "{before}");
    assert!(
        before.contains(r#"data-provider="br-primary" data-state="operational""#),
        "{before}"
    );
    assert!(before.contains(r#"data-indicator="none""#), "{before}");
    assert!(before.contains("No incidents."), "{before}");

    // The outage.
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 503})));
    for _ in 0..3 {
        chat(&gw, "br").await.bytes().await.unwrap();
    }
    let during = dom(&url).await;
    assert!(
        during.contains(r#"data-provider="br-primary" data-state="down""#),
        "{during}"
    );
    assert!(
        during.contains(r#"data-provider="br-backup" data-state="operational""#),
        "{during}"
    );
    assert!(during.contains(r#"data-indicator="major""#), "{during}");
    assert!(
        during.contains(r#"data-provider="br-primary" data-cause="traffic" data-ongoing="true""#),
        "{during}"
    );
    assert!(
        during.contains("every target's circuit breaker is open"),
        "{during}"
    );

    // For people to look at.
    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    let (_, stderr) = chromium(&url, &[&format!("--screenshot={}", shot.display())]).await;
    assert!(console_lines(&stderr).is_empty(), "{stderr}");
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}\n{stderr}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000,
        "{}",
        png.len()
    );
    eprintln!("status page screenshot: {}", shot.display());
}
