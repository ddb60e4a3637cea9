//! Mid-stream continuation (`continue_streams = true`): a text stream that
//! breaks after content reached the client is finished by the route's next
//! target, spliced into the same client stream. Over real loopback HTTP
//! against `detour mock` providers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use detour::mock::{self, Flavor, MockOptions, MockServer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Route `fast`: provider `a` (of `kind_a`) then `b` (of `kind_b`).
fn config(kind_a: &str, a: SocketAddr, kind_b: &str, b: SocketAddr, route: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "a"
kind = "{kind_a}"
base_url = "http://{a}/v1"
api_key = "sk-a"

[[providers]]
name = "b"
kind = "{kind_b}"
base_url = "http://{b}/v1"
api_key = "sk-b"

[[routes]]
model = "fast"
targets = [
  {{ provider = "a", model = "model-a" }},
  {{ provider = "b", model = "model-b" }},
]
{route}
"#
    )
}

async fn flavored(flavor: Flavor) -> MockServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(flavor, listener, MockOptions::default())
        .await
        .unwrap()
}

async fn post(gw: &detour::server::Running, path: &str, body: &Value) -> String {
    let resp = client()
        .post(format!("{}{path}", gw.url()))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "a");
    resp.text().await.unwrap()
}

/// The text of a message's `content` (a string or blocks).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// The one recorded request of `mock`.
fn only_request(mock: &MockServer) -> Value {
    let requests = mock.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    requests[0].body.clone()
}

/// An OpenAI client's stream: the assembled text, checked well-formed (one
/// role chunk, one id, one finish, `[DONE]` last, no error), and its last
/// chunk before `[DONE]`.
fn openai_stream(body: &str) -> (String, Value) {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "{body}");
    let ids: std::collections::HashSet<&str> =
        chunks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one id: {body}");
    let deltas = chunks.iter().filter_map(|c| c["choices"].get(0));
    let roles = deltas.clone().filter(|c| c["delta"].get("role").is_some());
    assert_eq!(roles.count(), 1, "one role chunk: {body}");
    let finishes = deltas.clone().filter(|c| !c["finish_reason"].is_null());
    assert_eq!(finishes.count(), 1, "one finish: {body}");
    let text = deltas
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    (text, chunks.last().cloned().unwrap_or_default())
}

#[tokio::test]
async fn an_openai_stream_cut_short_is_finished_by_an_anthropic_target() {
    let (a, b) = (mock().await, flavored(Flavor::Anthropic).await);
    a.set_faults(faults(json!({"cut_after_chunks": 2})));
    let gw = gateway(&config(
        "openai",
        a.addr(),
        "anthropic",
        b.addr(),
        "continue_streams = true",
    ))
    .await;
    // The first scrape installs the process's recorder.
    let admin = admin(&gw, "t").await;
    get(&format!("{admin}/metrics")).await;
    let body = post(&gw, "/v1/chat/completions", &chat(true)).await;
    let (text, last) = openai_stream(&body);
    assert_eq!(
        last["detour"],
        json!({"continued_by": "b"}),
        "the extension chunk comes last: {body}"
    );
    assert_eq!(last["choices"], json!([]), "{body}");

    // B was asked to continue from exactly the text A sent (a prefill).
    let asked = only_request(&b);
    let messages = asked["messages"].as_array().unwrap();
    let prefill = messages.last().unwrap();
    assert_eq!(prefill["role"], "assistant", "{asked}");
    let sent = text_of(&prefill["content"]);
    assert!(!sent.is_empty(), "A sent some text first: {body}");
    assert_eq!(messages[0]["role"], "user", "the original request: {asked}");
    // The client's answer: A's text, then B's continuation.
    let rest = text.strip_prefix(sent.as_str()).unwrap_or_else(|| {
        panic!("the answer starts with A's text {sent:?}: {text:?}");
    });
    assert!(!rest.trim().is_empty(), "B continued it: {text:?}");
    assert_eq!(a.stats().requests, 1);

    // Counted (the line and metrics are written as the body ends, a moment
    // after the client has it), and shown in the config view.
    let series = r#"detour_stream_continuations_total{route="fast",provider="b",outcome="ok"} 1"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = get(&format!("{admin}/metrics")).await;
        if text.lines().any(|l| l == series) {
            break;
        }
        assert!(Instant::now() < deadline, "no {series}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config: Value = serde_json::from_str(&get(&format!("{admin}/admin/config")).await).unwrap();
    assert_eq!(config["routes"][0]["continue_streams"], true, "{config}");
}

async fn get(url: &str) -> String {
    let resp = client().get(url).bearer_auth("t").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

#[tokio::test]
async fn a_stream_ended_by_an_error_event_is_continued_without_showing_the_error() {
    let (a, b) = (mock().await, flavored(Flavor::Anthropic).await);
    a.set_faults(faults(json!({"stream_error_after_chunks": 2})));
    let gw = gateway(&config(
        "openai",
        a.addr(),
        "anthropic",
        b.addr(),
        "continue_streams = true",
    ))
    .await;
    let body = post(&gw, "/v1/chat/completions", &chat(true)).await;
    let (text, last) = openai_stream(&body);
    assert_eq!(last["detour"], json!({"continued_by": "b"}), "{body}");
    let sent = text_of(
        &only_request(&b)["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["content"],
    );
    assert!(
        !sent.is_empty() && text.starts_with(&sent),
        "{sent:?} {text:?}"
    );
    assert!(text.len() > sent.len(), "{text:?}");
}

#[tokio::test]
async fn a_continuation_that_fails_ends_with_the_error_event() {
    let (a, b) = (mock().await, flavored(Flavor::Anthropic).await);
    a.set_faults(faults(json!({"cut_after_chunks": 2})));
    b.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let gw = gateway(&config(
        "openai",
        a.addr(),
        "anthropic",
        b.addr(),
        "continue_streams = true",
    ))
    .await;
    let body = post(&gw, "/v1/chat/completions", &chat(true)).await;
    let data = sse_data(&body);
    assert!(!data.iter().any(|d| d == "[DONE]"), "{body}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert!(last.get("error").is_some(), "ends with the error: {body}");
    let content = data.iter().filter(|d| d.contains("\"content\":\"")).count();
    assert!(content >= 1, "A's text came first: {body}");
    assert!(!body.contains("continued_by"), "{body}");
    assert_eq!(b.requests().len(), 1, "b was asked once");
}

#[tokio::test]
async fn an_anthropic_stream_cut_short_is_finished_by_an_openai_target() {
    let (a, b) = (flavored(Flavor::Anthropic).await, mock().await);
    // message_start, content_block_start, then two text deltas.
    a.set_faults(faults(json!({"cut_after_chunks": 4})));
    let gw = gateway(&config(
        "anthropic",
        a.addr(),
        "openai",
        b.addr(),
        "continue_streams = true",
    ))
    .await;
    let request = json!({
        "model": "fast",
        "max_tokens": 100,
        "stream": true,
        "messages": [{"role": "user", "content": "Say hello"}],
    });
    let body = post(&gw, "/v1/messages", &request).await;
    // Anthropic events: `event: NAME` then `data: {...}`.
    let events: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    let count = |kind: &str| kinds.iter().filter(|k| **k == kind).count();
    assert_eq!(count("message_start"), 1, "{body}");
    assert_eq!(count("error"), 0, "{body}");
    assert_eq!(count("message_delta"), 1, "{body}");
    assert_eq!(kinds.last(), Some(&"message_stop"), "{body}");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "content_block_delta")
        .map(|e| {
            assert_eq!(e["index"], 0, "one text block: {body}");
            e["delta"]["text"].as_str().unwrap_or_default()
        })
        .collect();
    let delta = events
        .iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["detour"], json!({"continued_by": "b"}), "{body}");

    // B was given the partial answer and asked to go on.
    let asked = only_request(&b);
    let messages = asked["messages"].as_array().unwrap();
    let n = messages.len();
    assert!(n >= 3, "{asked}");
    assert_eq!(messages[n - 2]["role"], "assistant", "{asked}");
    assert_eq!(messages[n - 1]["role"], "user", "{asked}");
    let sent = text_of(&messages[n - 2]["content"]);
    assert!(!sent.is_empty(), "{asked}");
    let rest = text.strip_prefix(sent.as_str()).unwrap_or_else(|| {
        panic!("the answer starts with A's text {sent:?}: {text:?}");
    });
    assert!(!rest.trim().is_empty(), "B continued it: {text:?}");
}

#[tokio::test]
async fn without_continue_streams_the_client_gets_the_error_event() {
    let (a, b) = (mock().await, flavored(Flavor::Anthropic).await);
    a.set_faults(faults(json!({"cut_after_chunks": 2})));
    let gw = gateway(&config("openai", a.addr(), "anthropic", b.addr(), "")).await;
    let body = post(&gw, "/v1/chat/completions", &chat(true)).await;
    let data = sse_data(&body);
    assert!(!data.iter().any(|d| d == "[DONE]"), "{body}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert!(last.get("error").is_some(), "ends with the error: {body}");
    assert!(!body.contains("continued_by"), "{body}");
    assert!(b.requests().is_empty(), "nothing asked of b");
}

#[tokio::test]
async fn a_stream_with_a_tool_call_is_not_continued() {
    let (a, b) = (flavored(Flavor::Anthropic).await, mock().await);
    // A short text block (start, 2 deltas, stop), then the tool_use block's
    // start and one argument delta: cut there.
    a.set_faults(faults(json!({"chunks": 2, "cut_after_chunks": 7})));
    let gw = gateway(&config(
        "anthropic",
        a.addr(),
        "openai",
        b.addr(),
        "continue_streams = true",
    ))
    .await;
    let mut request = chat(true);
    request["tools"] = json!([{"type": "function", "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    }}]);
    let body = post(&gw, "/v1/chat/completions", &request).await;
    assert!(
        body.contains("\"tool_calls\""),
        "a tool call was sent: {body}"
    );
    let data = sse_data(&body);
    assert!(!data.iter().any(|d| d == "[DONE]"), "{body}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert!(last.get("error").is_some(), "ends with the error: {body}");
    assert!(b.requests().is_empty(), "nothing asked of b");
}
