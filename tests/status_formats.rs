//! Status pages in every format vendors publish (the mock serves each), and
//! pushes on `POST /admin/status-webhook/<provider>`: the same observable
//! effect as the Statuspage poll (`failover.rs`), for each format.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use detour::mock::{ComponentStatus, Flavor, MockOptions, MockServer, PageStatus};
use serde_json::{json, Value};
use tokio::time::Instant;

const TOKEN: &str = "admin-token";
const SECRET: &str = "status-webhook-secret-1";

/// `primary` watches the page's component `API` at `path` in `format`,
/// polled every `poll`; `backup` takes the traffic when it is down.
fn config(primary: SocketAddr, backup: SocketAddr, page: &str, format: &str, poll: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "primary"
kind = "openai"
base_url = "http://{primary}/v1"
status_page = "{page}"
status_page_format = "{format}"
status_components = ["API"]
status_poll = "{poll}"
status_webhook_secret = "{SECRET}"

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
"#
    )
}

async fn page_mock() -> MockServer {
    detour::mock::spawn(
        Flavor::Statuspage,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        MockOptions::default(),
    )
    .await
    .unwrap()
}

async fn post(gw: &detour::server::Running) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(false))
        .send()
        .await
        .unwrap()
}

async fn primary_health(admin: &str) -> Value {
    let v: Value = client()
        .get(format!("{admin}/admin/health"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "primary")
        .cloned()
        .unwrap()
}

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

/// The page at `path`, read as `format`: a major outage of `API` takes
/// the primary out of the route; recovery brings it back.
async fn an_outage_on_the_page_routes_around_the_provider(path: &str, format: &str) {
    let (primary, backup, page) = (mock().await, mock().await, page_mock().await);
    let url = format!("http://{}{path}", page.addr());
    let gw = gateway(&config(
        primary.addr(),
        backup.addr(),
        &url,
        format,
        "100ms",
    ))
    .await;
    let admin = admin(&gw, TOKEN).await;
    eventually(&format!("{format}: the first poll"), || async {
        primary_health(&admin).await["status_page"] == "operational"
    })
    .await;
    assert_eq!(post(&gw).await.headers()["x-detour-provider"], "primary");

    page.set_status(PageStatus::operational().with_component("API", ComponentStatus::MajorOutage));
    eventually(
        &format!("{format} at {path}: the page to say down"),
        || async { primary_health(&admin).await["status_page"] == "down" },
    )
    .await;
    let before = primary.stats().requests;
    for _ in 0..5 {
        let resp = post(&gw).await;
        assert_eq!(resp.headers()["x-detour-provider"], "backup", "{format}");
        assert_eq!(resp.headers()["x-detour-attempts"], "1", "{format}");
    }
    assert_eq!(
        primary.stats().requests,
        before,
        "{format}: nothing went to the primary"
    );

    page.set_status(PageStatus::operational());
    eventually(&format!("{format}: the page to recover"), || async {
        primary_health(&admin).await["status_page"] == "operational"
    })
    .await;
    assert_eq!(post(&gw).await.headers()["x-detour-provider"], "primary");
}

#[tokio::test]
async fn statuspage_summary() {
    an_outage_on_the_page_routes_around_the_provider("/api/v2/summary.json", "statuspage").await;
}

#[tokio::test]
async fn incident_io_proxy() {
    an_outage_on_the_page_routes_around_the_provider("/proxy/status.mock.invalid", "incident_io")
        .await;
}

#[tokio::test]
async fn incident_io_widget_api() {
    an_outage_on_the_page_routes_around_the_provider("/api/v1/summary", "incident_io").await;
}

#[tokio::test]
async fn google_cloud_incidents() {
    an_outage_on_the_page_routes_around_the_provider("/incidents.json", "google_cloud").await;
}

#[tokio::test]
async fn rss_feed() {
    an_outage_on_the_page_routes_around_the_provider("/feed.rss", "rss").await;
}

#[tokio::test]
async fn atom_feed() {
    an_outage_on_the_page_routes_around_the_provider("/feed.atom", "atom").await;
}

#[tokio::test]
async fn auto_detects_each_format() {
    for path in ["/proxy/status.mock.invalid", "/incidents.json", "/feed.rss"] {
        an_outage_on_the_page_routes_around_the_provider(path, "auto").await;
    }
}

#[tokio::test]
async fn an_unreadable_page_changes_nothing_and_is_reported() {
    // (A page that changes format under `auto` is refused the same way:
    // `status_pages::poller`'s unit tests.)
    let (primary, backup, page) = (mock().await, mock().await, page_mock().await);
    let url = format!("http://{}/api/v2/summary.json", page.addr());
    let gw = gateway(&config(
        primary.addr(),
        backup.addr(),
        &url,
        "auto",
        "100ms",
    ))
    .await;
    let admin = admin(&gw, TOKEN).await;
    page.set_status(PageStatus::operational().with_component("API", ComponentStatus::MajorOutage));
    eventually("down", || async {
        primary_health(&admin).await["status_page"] == "down"
    })
    .await;
    // An HTML page with a 200: no status page at all.
    page.set_faults(faults(json!({"html_200": true})));
    eventually("the unreadable page to be reported", || async {
        !primary_health(&admin).await["status_page_error"].is_null()
    })
    .await;
    assert_eq!(
        primary_health(&admin).await["status_page"],
        "down",
        "the last state stays"
    );
}

/// POSTs `body` to the webhook URL of `provider`.
async fn push(
    admin: &str,
    provider: &str,
    query: &str,
    headers: &[(&str, String)],
    body: &str,
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{admin}/admin/status-webhook/{provider}{query}"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    req.send().await.unwrap()
}

fn statuspage_push(status: &str) -> String {
    json!({
        "meta": {"unsubscribe": "https://status.mock.invalid/?unsubscribe=x", "documentation": "https://support.atlassian.com/statuspage/docs/enable-webhook-notifications/"},
        "page": {"id": "mockpage0001", "status_indicator": if status == "operational" { "none" } else { "major" }, "status_description": "x"},
        "component_update": {"created_at": "2025-06-10T12:00:00Z", "new_status": status, "old_status": "operational", "id": "u1", "component_id": "c1"},
        "component": {"created_at": "2023-01-01T00:00:00Z", "id": "c1", "name": "API", "status": status},
    })
    .to_string()
}

fn incident_io_push(status: &str, impact: &str) -> String {
    json!({
        "event_type": "status_page_incident.updated",
        "status_page_incident.updated": {
            "id": "01JXE9Q5V2ZB8D3K6T1M4R7WNA", "name": "API errors", "status": status,
            "current_worst_impact": impact,
            "affected_components": [{"id": "c1", "name": "API", "current_status": impact}],
        },
    })
    .to_string()
}

/// Svix headers signing `body` with `secret`'s bytes.
fn svix(secret: &str, body: &str) -> Vec<(&'static str, String)> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("msg_1.{ts}.{body}").as_bytes());
    let signature = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    );
    vec![
        ("webhook-id", "msg_1".to_owned()),
        ("webhook-timestamp", ts),
        ("webhook-signature", signature),
    ]
}

/// A gateway that polls the page once an hour: only a push can change it.
async fn pushed_gateway() -> (
    MockServer,
    MockServer,
    MockServer,
    detour::server::Running,
    String,
) {
    let (primary, backup, page) = (mock().await, mock().await, page_mock().await);
    let url = format!("http://{}/api/v2/summary.json", page.addr());
    let gw = gateway(&config(
        primary.addr(),
        backup.addr(),
        &url,
        "statuspage",
        "1h",
    ))
    .await;
    let admin = admin(&gw, TOKEN).await;
    eventually("the first poll", || async {
        primary_health(&admin).await["status_page"] == "operational"
    })
    .await;
    (primary, backup, page, gw, admin)
}

#[tokio::test]
async fn a_statuspage_push_flips_the_state_within_a_second_with_no_poll() {
    let (primary, _backup, page, gw, admin) = pushed_gateway().await;
    let polls = page.stats().status_polls;
    let start = Instant::now();
    let resp = push(
        &admin,
        "primary",
        &format!("?secret={SECRET}"),
        &[],
        &statuspage_push("major_outage"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status_page"], "down");
    assert_eq!(primary_health(&admin).await["status_page"], "down");
    assert!(start.elapsed() < Duration::from_secs(1));
    let before = primary.stats().requests;
    assert_eq!(post(&gw).await.headers()["x-detour-provider"], "backup");
    assert_eq!(primary.stats().requests, before);

    // The push opened the same incident a poll would have.
    let status: Value = client()
        .get(format!("{}/status.json", gw.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["detour"]["incidents"][0]["cause"], "status_page");

    let resp = push(
        &admin,
        "primary",
        &format!("?secret={SECRET}"),
        &[],
        &statuspage_push("operational"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(primary_health(&admin).await["status_page"], "operational");
    assert_eq!(post(&gw).await.headers()["x-detour-provider"], "primary");
    assert_eq!(page.stats().status_polls, polls, "no poll in between");
}

#[tokio::test]
async fn a_signed_incident_io_push_flips_the_state_within_a_second_with_no_poll() {
    let (_primary, _backup, page, gw, admin) = pushed_gateway().await;
    let polls = page.stats().status_polls;
    let start = Instant::now();
    let body = incident_io_push("investigating", "full_outage");
    let resp = push(&admin, "primary", "", &svix(SECRET, &body), &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(primary_health(&admin).await["status_page"], "down");
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(post(&gw).await.headers()["x-detour-provider"], "backup");

    // A signature made with another key, or over another body: refused.
    let forged = svix("another-secret-entirely", &body);
    assert_eq!(
        push(&admin, "primary", "", &forged, &body).await.status(),
        401
    );
    let resolved = incident_io_push("resolved", "full_outage");
    let replayed = svix(SECRET, &body);
    assert_eq!(
        push(&admin, "primary", "", &replayed, &resolved)
            .await
            .status(),
        401
    );
    assert_eq!(primary_health(&admin).await["status_page"], "down");

    let resp = push(&admin, "primary", "", &svix(SECRET, &resolved), &resolved).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(primary_health(&admin).await["status_page"], "operational");
    assert_eq!(page.stats().status_polls, polls, "no poll in between");
}

#[tokio::test]
async fn webhook_errors_are_json_and_the_admin_token_is_no_secret() {
    let (_primary, _backup, _page, _gw, admin) = pushed_gateway().await;
    let body = statuspage_push("major_outage");
    let cases = [
        ("nobody", format!("?secret={SECRET}"), body.clone(), 404),
        ("backup", format!("?secret={SECRET}"), body.clone(), 404),
        (
            "primary",
            "?secret=wrong-secret-value".to_owned(),
            body.clone(),
            401,
        ),
        ("primary", String::new(), body.clone(), 401),
        ("primary", format!("?secret={TOKEN}"), body.clone(), 401),
        ("primary", format!("?token={TOKEN}"), body.clone(), 401),
        (
            "primary",
            format!("?secret={SECRET}"),
            "not json".to_owned(),
            400,
        ),
        (
            "primary",
            format!("?secret={SECRET}"),
            "{\"x\": 1}".to_owned(),
            400,
        ),
    ];
    for (provider, query, body, status) in cases {
        let resp = push(&admin, provider, &query, &[], &body).await;
        assert_eq!(resp.status(), status, "{provider}{query} {body}");
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // The admin token as a bearer does not authenticate a push either.
    let resp = client()
        .post(format!("{admin}/admin/status-webhook/primary"))
        .bearer_auth(TOKEN)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(primary_health(&admin).await["status_page"], "operational");

    // The secret is masked where the config is shown.
    let config = client()
        .get(format!("{admin}/admin/config"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!config.contains(SECRET), "{config}");
    let v: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(v["providers"][0]["status_webhook_secret"], "***");
    assert_eq!(v["providers"][0]["status_page_format"], "statuspage");
}
