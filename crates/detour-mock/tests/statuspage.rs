//! `detour mock --flavor statuspage` over real loopback HTTP: the Statuspage v2
//! documents, state switching through `/_mock/status` and `MockServer::set_status`,
//! and the faults a poller must survive (errors, hangs, latency, malformed JSON).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed unwrap is a failed test

use std::time::Duration;

use detour_mock::{
    self as mock, ComponentStatus, Flavor, Incident, IncidentStatus, Indicator, MockOptions,
    MockServer, PageStatus, DEFAULT_COMPONENTS,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------
// Helpers

async fn start() -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(Flavor::Statuspage, listener, MockOptions::default())
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get(client: &reqwest::Client, server: &MockServer, path: &str) -> reqwest::Response {
    client
        .get(format!("{}{path}", server.url()))
        .send()
        .await
        .unwrap()
}

async fn get_json(client: &reqwest::Client, server: &MockServer, path: &str) -> Value {
    let resp = get(client, server, path).await;
    assert_eq!(resp.status(), 200, "{path}");
    let bytes = resp.bytes().await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

async fn put_status(
    client: &reqwest::Client,
    server: &MockServer,
    body: &str,
) -> reqwest::Response {
    client
        .put(format!("{}/_mock/status", server.url()))
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn set_faults(client: &reqwest::Client, server: &MockServer, faults: Value) {
    let resp = client
        .put(format!("{}/_mock/faults", server.url()))
        .body(faults.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

fn component<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no component {name}"))
}

fn assert_page(doc: &Value) {
    let page = &doc["page"];
    for key in ["id", "name", "url", "time_zone", "updated_at"] {
        assert!(page[key].is_string(), "page.{key}: {doc}");
    }
    assert!(page["updated_at"].as_str().unwrap().ends_with('Z'));
}

// ---------------------------------------------------------------------------------
// Documents

#[tokio::test]
async fn an_operational_page_serves_every_document() {
    let server = start().await;
    let client = client();
    let resp = get(&client, &server, "/api/v2/summary.json").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let summary: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_page(&summary);
    assert_eq!(
        summary["status"],
        json!({"indicator": "none", "description": "All Systems Operational"})
    );
    let components = summary["components"].as_array().unwrap();
    let names: Vec<&str> = components
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, DEFAULT_COMPONENTS);
    for (i, c) in components.iter().enumerate() {
        assert_eq!(c["status"], "operational");
        assert_eq!(c["position"], i + 1);
        assert_eq!(c["id"].as_str().unwrap().len(), 12);
        assert_eq!(c["group"], false);
        assert_eq!(c["page_id"], summary["page"]["id"]);
    }
    assert_eq!(summary["incidents"], json!([]));
    assert_eq!(summary["scheduled_maintenances"], json!([]));

    let status = get_json(&client, &server, "/api/v2/status.json").await;
    assert_page(&status);
    assert_eq!(status["status"]["indicator"], "none");
    assert!(status.get("components").is_none());
    let listed = get_json(&client, &server, "/api/v2/components.json").await;
    assert_eq!(listed["components"], summary["components"]);
    let unresolved = get_json(&client, &server, "/api/v2/incidents/unresolved.json").await;
    assert_eq!(unresolved["incidents"], json!([]));
    let upcoming = get_json(
        &client,
        &server,
        "/api/v2/scheduled-maintenances/upcoming.json",
    )
    .await;
    assert_eq!(upcoming["scheduled_maintenances"], json!([]));

    let resp = get(&client, &server, "/api/v2/nope.json").await;
    assert_eq!(resp.status(), 404);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(server.stats().status_polls, 5);
}

#[tokio::test]
async fn put_status_switches_the_page_and_get_reads_it_back() {
    let server = start().await;
    let client = client();
    let resp = put_status(
        &client,
        &server,
        r#"{"indicator":"major","components":{"API":"major_outage"},"incident":"Elevated error rates"}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let effective: Value = resp.json().await.unwrap();
    assert_eq!(
        effective,
        json!({
            "indicator": "major",
            "description": "Partial System Outage",
            "components": {"API": "major_outage", "Chat Completions": "operational", "Embeddings": "operational"},
            "incident": {"name": "Elevated error rates", "status": "investigating", "impact": "major",
                         "body": "We are currently investigating this issue."}
        })
    );
    assert_eq!(get_json(&client, &server, "/_mock/status").await, effective);

    let summary = get_json(&client, &server, "/api/v2/summary.json").await;
    assert_eq!(summary["status"]["indicator"], "major");
    assert_eq!(summary["status"]["description"], "Partial System Outage");
    assert_eq!(component(&summary, "API")["status"], "major_outage");
    assert_eq!(component(&summary, "Embeddings")["status"], "operational");
    let incidents = summary["incidents"].as_array().unwrap();
    assert_eq!(incidents.len(), 1);
    let incident = &incidents[0];
    assert_eq!(incident["name"], "Elevated error rates");
    assert_eq!(incident["status"], "investigating");
    assert_eq!(incident["impact"], "major");
    assert!(incident["resolved_at"].is_null());
    assert_eq!(incident["components"][0]["name"], "API");
    let update = &incident["incident_updates"][0];
    assert_eq!(update["status"], "investigating");
    assert_eq!(update["incident_id"], incident["id"]);
    assert_eq!(
        update["affected_components"][0]["new_status"],
        "major_outage"
    );
    let unresolved = get_json(&client, &server, "/api/v2/incidents/unresolved.json").await;
    assert_eq!(unresolved["incidents"][0]["id"], incident["id"]);

    // Resolving keeps the incident in incidents.json only.
    let resp = put_status(
        &client,
        &server,
        r#"{"incident":{"name":"Elevated error rates","status":"resolved","body":"Fixed."}}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let summary = get_json(&client, &server, "/api/v2/summary.json").await;
    assert_eq!(
        summary["status"]["indicator"], "none",
        "derived: all operational, resolved"
    );
    assert_eq!(summary["incidents"], json!([]));
    let all = get_json(&client, &server, "/api/v2/incidents.json").await;
    assert_eq!(all["incidents"][0]["status"], "resolved");
    assert!(all["incidents"][0]["resolved_at"].is_string());
    assert_eq!(all["incidents"][0]["incident_updates"][0]["body"], "Fixed.");
    assert_eq!(
        all["incidents"][0]["created_at"], incident["created_at"],
        "the same incident keeps its start"
    );

    // DELETE returns to operational.
    let resp = client
        .delete(format!("{}/_mock/status", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let summary = get_json(&client, &server, "/api/v2/summary.json").await;
    assert_eq!(summary["status"]["indicator"], "none");
    assert!(
        get_json(&client, &server, "/api/v2/incidents.json").await["incidents"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn every_indicator_and_component_status_round_trips() {
    let server = start().await;
    let client = client();
    for indicator in ["none", "minor", "major", "critical", "maintenance"] {
        let resp = put_status(
            &client,
            &server,
            &json!({"indicator": indicator}).to_string(),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let status = get_json(&client, &server, "/api/v2/status.json").await;
        assert_eq!(status["status"]["indicator"], indicator);
    }
    for (state, derived) in [
        ("operational", "none"),
        ("degraded_performance", "minor"),
        ("partial_outage", "minor"),
        ("major_outage", "major"),
        ("under_maintenance", "maintenance"),
    ] {
        let body = json!({"components": {"Chat Completions": state, "Realtime": state}});
        assert_eq!(
            put_status(&client, &server, &body.to_string())
                .await
                .status(),
            200
        );
        let summary = get_json(&client, &server, "/api/v2/summary.json").await;
        assert_eq!(component(&summary, "Chat Completions")["status"], state);
        assert_eq!(
            component(&summary, "Realtime")["status"],
            state,
            "new names are added"
        );
        assert_eq!(summary["status"]["indicator"], derived, "{state}");
    }
}

#[tokio::test]
async fn bad_status_bodies_are_rejected_and_change_nothing() {
    let server = start().await;
    let client = client();
    for (body, mentions) in [
        ("{nope", "invalid status JSON"),
        (r#"{"indicator":"purple"}"#, "indicator"),
        (r#"{"components":{"API":"on_fire"}}"#, "API"),
        (r#"{"colour":"red"}"#, "colour"),
    ] {
        let resp = put_status(&client, &server, body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let error: Value = resp.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{message}");
    }
    assert_eq!(server.status(), PageStatus::operational().effective());
}

#[tokio::test]
async fn set_status_in_rust_is_visible_over_http() {
    let server = start().await;
    server.set_status(
        PageStatus::operational()
            .with_component("Embeddings", ComponentStatus::PartialOutage)
            .with_incident(Incident {
                status: IncidentStatus::Identified,
                ..Incident::new("Embeddings are slow")
            }),
    );
    assert_eq!(server.status().indicator, Some(Indicator::Minor));
    let summary = get_json(&client(), &server, "/api/v2/summary.json").await;
    assert_eq!(summary["status"]["indicator"], "minor");
    assert_eq!(summary["incidents"][0]["status"], "identified");
    assert_eq!(summary["incidents"][0]["impact"], "minor");
    let over_http: PageStatus =
        serde_json::from_value(get_json(&client(), &server, "/_mock/status").await).unwrap();
    assert_eq!(over_http, server.status());

    // A reset clears the page too.
    server.reset();
    assert_eq!(server.status().indicator, Some(Indicator::None));
}

// ---------------------------------------------------------------------------------
// Faults a poller has to survive

#[tokio::test]
async fn malformed_serves_invalid_json() {
    let server = start().await;
    let client = client();
    set_faults(&client, &server, json!({"malformed": true})).await;
    for path in ["/api/v2/summary.json", "/api/v2/status.json"] {
        let resp = get(&client, &server, path).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let bytes = resp.bytes().await.unwrap();
        assert!(!bytes.is_empty());
        assert!(serde_json::from_slice::<Value>(&bytes).is_err(), "{path}");
    }
    assert_eq!(server.stats().faults.malformed, 2);
    // The control API is not affected.
    assert_eq!(
        get_json(&client, &server, "/_mock/faults").await["malformed"],
        true
    );
}

#[tokio::test]
async fn error_rate_and_rate_limit_answer_with_html() {
    let server = start().await;
    let client = client();
    for status in [404, 500, 503] {
        set_faults(
            &client,
            &server,
            json!({"error_rate": 1.0, "error_status": status}),
        )
        .await;
        let resp = get(&client, &server, "/api/v2/status.json").await;
        assert_eq!(resp.status(), status);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
    }
    set_faults(
        &client,
        &server,
        json!({"rate_limit_rate": 1.0, "retry_after_secs": 30}),
    )
    .await;
    let resp = get(&client, &server, "/api/v2/status.json").await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "30");
}

#[tokio::test]
async fn hang_and_latency_apply() {
    let server = start().await;
    let client = client();
    set_faults(&client, &server, json!({"hang_rate": 1.0})).await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = impatient
        .get(format!("{}/api/v2/summary.json", server.url()))
        .send()
        .await
        .expect_err("a hung page never answers");
    assert!(err.is_timeout(), "{err:?}");

    set_faults(&client, &server, json!({"latency_ms": 200})).await;
    let started = tokio::time::Instant::now();
    get_json(&client, &server, "/api/v2/status.json").await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(server.stats().faults.hang, 1);
}
