//! Traces over OTLP/HTTP: a collector of the test's own (POST /v1/traces,
//! protobuf decoded with `opentelemetry-proto`'s messages) receives what a
//! real gateway exports.
// A test's collector: a plain mutex is fine off the gateway's path.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_types
)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use tokio::time::Instant;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

#[derive(Default)]
struct Received {
    /// Every export's raw body, for the no-text check.
    bodies: Vec<Vec<u8>>,
    spans: Vec<Span>,
    service_names: Vec<String>,
    authorization: Vec<String>,
}

type Collector = Arc<Mutex<Received>>;

async fn traces(State(c): State<Collector>, headers: HeaderMap, body: Bytes) -> &'static str {
    let req = ExportTraceServiceRequest::decode(body.as_ref()).unwrap();
    let mut c = c.lock().unwrap();
    c.bodies.push(body.to_vec());
    if let Some(a) = headers.get("authorization") {
        c.authorization.push(a.to_str().unwrap().to_owned());
    }
    for rs in req.resource_spans {
        for kv in rs.resource.iter().flat_map(|r| &r.attributes) {
            if kv.key == "service.name" {
                c.service_names
                    .push(text(kv.value.as_ref().and_then(|v| v.value.as_ref())));
            }
        }
        for ss in rs.scope_spans {
            c.spans.extend(ss.spans);
        }
    }
    // An empty ExportTraceServiceResponse.
    ""
}

async fn collector() -> (SocketAddr, Collector) {
    let c = Collector::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .with_state(Arc::clone(&c));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, c)
}

fn text(v: Option<&Any>) -> String {
    match v {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// A span's attribute as text (`None` when absent).
fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
}

fn telemetry(collector: SocketAddr) -> String {
    format!(
        r#"
[telemetry]
otlp_endpoint = "http://{collector}"
otlp_headers = {{ authorization = "Bearer collector-token" }}
service_name = "detour-test"
batch_delay = "50ms"
"#
    )
}

/// Waits (5 s at most) until the collector holds `n` spans of trace `trace`.
async fn spans_of(c: &Collector, trace: &[u8], n: usize) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let spans: Vec<Span> = {
            let c = c.lock().unwrap();
            c.spans
                .iter()
                .filter(|s| s.trace_id == trace)
                .cloned()
                .collect()
        };
        if spans.len() >= n {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} spans of the trace; have {}",
            spans.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn one(spans: &[Span], kind: SpanKind) -> Vec<&Span> {
    spans.iter().filter(|s| s.kind == kind as i32).collect()
}

#[tokio::test]
async fn a_request_is_a_child_of_its_traceparent_with_one_attempt_span() {
    let (addr, c) = collector().await;
    let upstream = mock().await;
    let gw = gateway(&one_route(upstream.addr(), "", &telemetry(addr))).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let spans = spans_of(&c, &hex::decode(TRACE_ID).unwrap(), 2).await;

    let requests = one(&spans, SpanKind::Server);
    assert_eq!(requests.len(), 1, "one request span: {spans:?}");
    let request = requests[0];
    assert_eq!(request.parent_span_id, hex::decode(PARENT_ID).unwrap());
    assert_eq!(request.name, "chat fast");
    for (key, want) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "fast"),
        ("gen_ai.response.model", "gpt-up"),
        ("gen_ai.provider.name", "openai"),
        ("detour.route", "fast"),
        ("detour.provider", "p"),
        ("detour.failover", "false"),
        ("detour.hedge", "false"),
        ("http.response.status_code", "200"),
    ] {
        assert_eq!(
            attr(request, key).as_deref(),
            Some(want),
            "request span's {key}"
        );
    }
    let usage = &body["usage"];
    assert_eq!(
        attr(request, "gen_ai.usage.input_tokens"),
        Some(usage["prompt_tokens"].to_string())
    );
    assert_eq!(
        attr(request, "gen_ai.usage.output_tokens"),
        Some(usage["completion_tokens"].to_string())
    );

    let attempts = one(&spans, SpanKind::Client);
    assert_eq!(attempts.len(), 1, "one attempt span");
    let attempt = attempts[0];
    assert_eq!(attempt.parent_span_id, request.span_id);
    for (key, want) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "fast"),
        ("gen_ai.response.model", "gpt-up"),
        ("gen_ai.provider.name", "openai"),
        ("detour.provider", "p"),
        ("detour.attempt", "1"),
        ("http.response.status_code", "200"),
    ] {
        assert_eq!(
            attr(attempt, key).as_deref(),
            Some(want),
            "attempt span's {key}"
        );
    }
    assert_eq!(attr(attempt, "detour.attempt.reason"), None);

    let c = c.lock().unwrap();
    assert!(c.service_names.iter().all(|n| n == "detour-test"));
    assert!(!c.service_names.is_empty());
    assert!(c
        .authorization
        .iter()
        .all(|a| a == "Bearer collector-token"));
    assert!(!c.authorization.is_empty(), "otlp_headers are sent");
    // No prompt or completion text anywhere in what was exported.
    for body in &c.bodies {
        for text in ["Say hello", answer.as_str()] {
            assert!(
                !body.windows(text.len()).any(|w| w == text.as_bytes()),
                "`{text}` was exported"
            );
        }
    }
}

#[tokio::test]
async fn a_failover_has_two_attempt_spans_the_first_with_its_reason() {
    let (addr, c) = collector().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let backup = mock().await;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "primary"
kind = "openai"
base_url = "http://{dead}/v1"

[[providers]]
name = "backup"
kind = "openai-compatible"
base_url = "http://{}/v1"

[[routes]]
model = "fast"
targets = [
  {{ provider = "primary", model = "gpt-a" }},
  {{ provider = "backup", model = "claude-b" }},
]
{}
"#,
        backup.addr(),
        telemetry(addr)
    );
    let gw = gateway(&config).await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    let tried = resp.headers()["x-detour-tried"]
        .to_str()
        .unwrap()
        .to_owned();
    let reason = tried.strip_prefix("primary/gpt-a=").unwrap().to_owned();
    let _ = resp.text().await.unwrap();
    let spans = spans_of(&c, &hex::decode(trace).unwrap(), 3).await;

    let request = one(&spans, SpanKind::Server)[0];
    assert_eq!(attr(request, "detour.failover").as_deref(), Some("true"));
    assert_eq!(attr(request, "detour.attempts").as_deref(), Some("2"));
    assert_eq!(attr(request, "detour.provider").as_deref(), Some("backup"));
    assert_eq!(
        attr(request, "gen_ai.provider.name").as_deref(),
        Some("openai-compatible")
    );
    assert_eq!(
        attr(request, "gen_ai.response.model").as_deref(),
        Some("claude-b")
    );

    let mut attempts = one(&spans, SpanKind::Client);
    attempts.sort_by_key(|s| attr(s, "detour.attempt"));
    assert_eq!(attempts.len(), 2, "two attempt spans");
    let (first, second) = (attempts[0], attempts[1]);
    assert!(attempts.iter().all(|a| a.parent_span_id == request.span_id));
    assert_eq!(attr(first, "detour.provider").as_deref(), Some("primary"));
    assert_eq!(attr(first, "detour.attempt.reason"), Some(reason));
    assert_eq!(
        first.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(attr(second, "detour.provider").as_deref(), Some("backup"));
    assert_eq!(attr(second, "detour.failover").as_deref(), Some("true"));
    assert_eq!(attr(second, "detour.attempt.reason"), None);
    assert_ne!(
        second.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
}

#[tokio::test]
async fn an_invalid_traceparent_starts_a_new_trace() {
    let (addr, c) = collector().await;
    let upstream = mock().await;
    let gw = gateway(&one_route(upstream.addr(), "", &telemetry(addr))).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("traceparent", format!("00-{TRACE_ID}-zz-01"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    let request = loop {
        let found = {
            let c = c.lock().unwrap();
            c.spans
                .iter()
                .find(|s| s.kind == SpanKind::Server as i32)
                .cloned()
        };
        if let Some(s) = found {
            break s;
        }
        assert!(Instant::now() < deadline, "no request span");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(request.trace_id, hex::decode(TRACE_ID).unwrap());
    assert!(request.parent_span_id.is_empty(), "a root span");
}

#[tokio::test]
async fn telemetry_is_checked_and_off_by_default() {
    let upstream = mock().await;
    let gw = gateway(&one_route(upstream.addr(), "", "")).await;
    assert!(
        gw.gateway.live().traces.is_none(),
        "no tracer without otlp_endpoint"
    );
    for bad in [
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nbogus = 1\n",
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nsample_ratio = 2.0\n",
        "[telemetry]\notlp_endpoint = \"ftp://127.0.0.1\"\n",
        "[telemetry]\nservice_name = \"x\"\n",
    ] {
        let text = one_route(upstream.addr(), "", bad);
        assert!(detour::config::load_str(&text, "t.toml").is_err(), "{bad}");
    }
    // The admin view shows the section, header values masked.
    let (addr, _c) = collector().await;
    let gw = gateway(&one_route(upstream.addr(), "", &telemetry(addr))).await;
    let admin = admin(&gw, "tok").await;
    let view: Value = client()
        .get(format!("{admin}/admin/config"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = &view["telemetry"];
    assert_eq!(t["otlp_headers"]["authorization"], "***");
    assert_eq!(t["service_name"], "detour-test");
    assert!(!view.to_string().contains("collector-token"));
}

#[tokio::test]
async fn a_collector_that_never_answers_does_not_slow_requests() {
    // Accepts connections and never answers: every export hangs.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hang.accept().await {
            held.push(socket);
        }
    });
    let upstream = mock().await;
    let extra = format!("[telemetry]\notlp_endpoint = \"http://{addr}\"\nbatch_delay = \"10ms\"\n");
    let gw = gateway(&one_route(upstream.addr(), "", &extra)).await;
    assert!(gw.gateway.live().traces.is_some());
    let started = Instant::now();
    for _ in 0..30 {
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.text().await.unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // 30 requests with exports pending the whole time: no wait on them
    // (an export waited for would hold each request for its 10 s timeout).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
