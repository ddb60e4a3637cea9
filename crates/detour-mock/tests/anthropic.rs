//! `detour mock --flavor anthropic` over real loopback HTTP: message shapes, the §2.4
//! event sequence, tool use and tool results, validation, auth, error shapes (529
//! included), faults (stream errors included), determinism.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed unwrap is a failed test

use std::time::Duration;

use detour_mock::{self as mock, Flavor, MockOptions, MockServer};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------
// Helpers

async fn start(opts: MockOptions) -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(Flavor::Anthropic, listener, opts)
        .await
        .unwrap()
}

async fn start_default() -> MockServer {
    start(MockOptions::default()).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `POST /v1/messages` with `anthropic-version`, as the SDK sends it.
async fn messages(
    client: &reqwest::Client,
    server: &MockServer,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{}/v1/messages", server.url()))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn body_json(resp: reqwest::Response) -> Value {
    let bytes = resp.bytes().await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
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

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// `(event name, data JSON)` for each event; every event must have both lines and the
/// name must match `data.type`.
fn parse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e
                .strip_prefix("event: ")
                .and_then(|rest| rest.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not an event/data pair: {e:?}"));
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["type"], name, "{e}");
            (name.to_owned(), data)
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

fn hello(model: &str) -> Value {
    json!({
        "model": model, "max_tokens": 1024, "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say hello to the gateway tests."}]
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn assert_anthropic_error(body: &Value, kind: &str) {
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        body["request_id"].as_str().unwrap().starts_with("req_"),
        "{body}"
    );
}

fn weather_tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Current weather",
         "input_schema": {"type": "object", "properties": {
             "city": {"type": "string"}, "days": {"type": "integer"},
             "unit": {"type": "string", "enum": ["c", "f"]}, "optional": {"type": "string"}
         }, "required": ["city", "days", "unit"]}},
        {"name": "get_time",
         "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}
    ])
}

/// Joins the `text_delta`s and `input_json_delta`s per block index.
fn assemble(events: &[(String, Value)]) -> Vec<Value> {
    let mut blocks: Vec<Value> = Vec::new();
    let mut json_parts: Vec<String> = Vec::new();
    for (name, data) in events {
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(data["index"], blocks.len());
                blocks.push(data["content_block"].clone());
                json_parts.push(String::new());
            }
            "content_block_delta" => {
                let i = data["index"].as_u64().unwrap() as usize;
                let delta = &data["delta"];
                match delta["type"].as_str().unwrap() {
                    "text_delta" => {
                        let text = blocks[i]["text"].as_str().unwrap().to_owned();
                        blocks[i]["text"] = Value::from(text + delta["text"].as_str().unwrap());
                    }
                    "input_json_delta" => {
                        json_parts[i].push_str(delta["partial_json"].as_str().unwrap())
                    }
                    other => panic!("unexpected delta {other}"),
                }
            }
            "content_block_stop" => {
                let i = data["index"].as_u64().unwrap() as usize;
                if blocks[i]["type"] == "tool_use" {
                    blocks[i]["input"] = serde_json::from_str(&json_parts[i]).unwrap();
                }
            }
            _ => {}
        }
    }
    blocks
}

// ---------------------------------------------------------------------------------
// Messages

#[tokio::test]
async fn non_streamed_message_has_the_anthropic_shape() {
    let server = start_default().await;
    let resp = messages(&client(), &server, &hello("claude-sonnet-4-20250514")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert!(header(&resp, "request-id").starts_with("req_011C"));
    assert!(header(&resp, "anthropic-organization-id").len() > 10);
    assert_eq!(header(&resp, "anthropic-ratelimit-requests-limit"), "4000");
    let reset = header(&resp, "anthropic-ratelimit-requests-reset");
    assert!(
        reset.ends_with('Z') && reset.contains('T'),
        "RFC 3339: {reset}"
    );
    let body = body_json(resp).await;

    assert!(body["id"].as_str().unwrap().starts_with("msg_01"));
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["model"], "claude-sonnet-4-20250514");
    assert_eq!(body["stop_reason"], "end_turn");
    assert!(body["stop_sequence"].is_null());
    let content = body["content"].as_array().unwrap();
    assert_eq!(content.len(), 1);
    assert_eq!(content[0]["type"], "text");
    assert!(content[0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Hello from mock model claude-sonnet-4-20250514."));
    let usage = &body["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() >= 1);
    assert!(usage["output_tokens"].as_u64().unwrap() >= 1);
    assert_eq!(usage["cache_creation_input_tokens"], 0);
    assert_eq!(usage["cache_read_input_tokens"], 0);
    assert!(
        body.get("x_mock").is_some(),
        "an unknown field is sent on purpose"
    );
}

#[tokio::test]
async fn max_tokens_and_stop_sequences_set_the_stop_reason() {
    let server = start_default().await;
    let client = client();
    let body = body_json(
        messages(
            &client,
            &server,
            &with(hello("m"), json!({"max_tokens": 3})),
        )
        .await,
    )
    .await;
    assert_eq!(body["stop_reason"], "max_tokens");
    assert!(body["content"][0]["text"].as_str().unwrap().len() <= 12);
    assert_eq!(body["usage"]["output_tokens"], 3);

    let request = with(hello("m"), json!({"stop_sequences": ["zzz", "mock"]}));
    let body = body_json(messages(&client, &server, &request).await).await;
    assert_eq!(body["stop_reason"], "stop_sequence");
    assert_eq!(body["stop_sequence"], "mock");
    assert_eq!(body["content"][0]["text"], "Hello from ");
}

#[tokio::test]
async fn stream_follows_the_anthropic_event_sequence() {
    let server = start_default().await;
    let resp = messages(
        &client(),
        &server,
        &with(hello("claude-x"), json!({"stream": true})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "content-type"),
        "text/event-stream; charset=utf-8"
    );
    let events = parse_events(&resp.text().await.unwrap());
    let mut seq = names(&events);
    let pings = seq.iter().filter(|n| **n == "ping").count();
    assert_eq!(pings, 1, "one ping somewhere: {seq:?}");
    assert_ne!(seq[0], "ping");
    seq.retain(|n| *n != "ping");
    let mut want = vec!["message_start", "content_block_start"];
    want.extend(std::iter::repeat_n("content_block_delta", 8));
    want.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(seq, want);

    let start = &events[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["model"], "claude-x");
    assert_eq!(start["content"], json!([]));
    assert!(start["stop_reason"].is_null());
    assert!(start["usage"]["input_tokens"].as_u64().unwrap() >= 1);
    let (_, delta) = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert!(delta["delta"]["stop_sequence"].is_null());
    let output_tokens = delta["usage"]["output_tokens"].as_u64().unwrap();

    let blocks = assemble(&events);
    assert_eq!(blocks.len(), 1);
    let text = blocks[0]["text"].as_str().unwrap();
    assert!(text.starts_with("Hello from mock model claude-x."));

    // The streamed answer is the non-streamed one.
    let plain = body_json(messages(&client(), &server, &hello("claude-x")).await).await;
    assert_eq!(plain["content"][0]["text"], text);
    assert_eq!(plain["usage"]["output_tokens"], output_tokens);
}

#[tokio::test]
async fn tools_produce_text_then_tool_use_with_schema_input() {
    let server = start_default().await;
    let client = client();
    let request = with(hello("m"), json!({"tools": weather_tools()}));
    let body = body_json(messages(&client, &server, &request).await).await;
    assert_eq!(body["stop_reason"], "tool_use");
    let content = body["content"].as_array().unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["type"], "text");
    let tool = &content[1];
    assert_eq!(tool["type"], "tool_use");
    assert!(tool["id"].as_str().unwrap().starts_with("toolu_01"));
    assert_eq!(tool["name"], "get_weather");
    assert_eq!(
        tool["input"],
        json!({"city": "mock", "days": 1, "unit": "c"})
    );

    // A named tool: no preamble text.
    let request = with(
        hello("m"),
        json!({"tools": weather_tools(), "tool_choice": {"type": "tool", "name": "get_time"}}),
    );
    let body = body_json(messages(&client, &server, &request).await).await;
    let content = body["content"].as_array().unwrap();
    assert_eq!(content.len(), 1);
    assert_eq!(content[0]["name"], "get_time");
    assert_eq!(content[0]["input"], json!({"tz": "mock"}));

    let request = with(
        hello("m"),
        json!({"tools": weather_tools(), "tool_choice": {"type": "any"}}),
    );
    let body = body_json(messages(&client, &server, &request).await).await;
    assert_eq!(body["content"][0]["name"], "get_weather");

    let request = with(
        hello("m"),
        json!({"tools": weather_tools(), "tool_choice": {"type": "none"}}),
    );
    let body = body_json(messages(&client, &server, &request).await).await;
    assert_eq!(body["stop_reason"], "end_turn");

    let request = with(
        hello("m"),
        json!({"tools": weather_tools(), "tool_choice": {"type": "tool", "name": "nope"}}),
    );
    let resp = messages(&client, &server, &request).await;
    assert_eq!(resp.status(), 400);
    assert_anthropic_error(&body_json(resp).await, "invalid_request_error");
}

#[tokio::test]
async fn streamed_tool_use_starts_empty_and_fragments_join_into_the_input() {
    let server = start_default().await;
    let request = with(
        hello("m"),
        json!({"tools": weather_tools(), "stream": true}),
    );
    let resp = messages(&client(), &server, &request).await;
    let events = parse_events(&resp.text().await.unwrap());
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[0]["content_block"]["type"], "text");
    assert_eq!(starts[1]["index"], 1);
    let tool = &starts[1]["content_block"];
    assert_eq!(tool["type"], "tool_use");
    assert_eq!(tool["input"], json!({}));
    assert!(tool["id"].as_str().unwrap().starts_with("toolu_"));

    let json_deltas: Vec<&str> = events
        .iter()
        .filter(|(n, d)| n == "content_block_delta" && d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(json_deltas[0], "", "the first fragment is empty");
    assert!(json_deltas.len() > 2, "{json_deltas:?}");

    let blocks = assemble(&events);
    assert_eq!(
        blocks[1]["input"],
        json!({"city": "mock", "days": 1, "unit": "c"})
    );
    let (_, delta) = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
}

#[tokio::test]
async fn a_tool_result_is_answered_with_text_that_quotes_it() {
    let server = start_default().await;
    let request = json!({
        "model": "m", "max_tokens": 200, "tools": weather_tools(),
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "{\"temp_c\":18}"}
            ]}
        ]
    });
    let body = body_json(messages(&client(), &server, &request).await).await;
    assert_eq!(body["stop_reason"], "end_turn");
    let text = body["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("received the tool result: {\"temp_c\":18}"),
        "{text}"
    );

    // Block-array tool result content works too.
    let mut request = request;
    request["messages"][2]["content"][0]["content"] = json!([{"type": "text", "text": "sunny"}]);
    let body = body_json(messages(&client(), &server, &request).await).await;
    assert!(body["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("tool result: sunny"));
}

#[tokio::test]
async fn invalid_requests_get_400_invalid_request_error() {
    let server = start_default().await;
    let client = client();
    let cases = [
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            "max_tokens: Field required",
        ),
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            "model",
        ),
        (json!({"model": "m", "max_tokens": 5}), "messages"),
        (
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            "messages",
        ),
        (
            json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}),
            "max_tokens",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}),
            "messages.0.role",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]}),
            "messages.0.content",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]}),
            "temperature",
        ),
    ];
    for (body, mentions) in cases {
        let resp = messages(&client, &server, &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let error = body_json(resp).await;
        assert_anthropic_error(&error, "invalid_request_error");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{message}");
    }
    let resp = client
        .post(format!("{}/v1/messages", server.url()))
        .header("anthropic-version", "2023-06-01")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // anthropic-version is required.
    let resp = client
        .post(format!("{}/v1/messages", server.url()))
        .body(hello("m").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let error = body_json(resp).await;
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic-version"));
}

#[tokio::test]
async fn api_key_is_enforced_when_set() {
    let server = start(MockOptions {
        api_key: Some("sk-ant-mock".into()),
        ..MockOptions::default()
    })
    .await;
    let client = client();
    let send = |auth: Option<(&'static str, &'static str)>| {
        let mut req = client
            .post(format!("{}/v1/messages", server.url()))
            .header("anthropic-version", "2023-06-01")
            .body(hello("m").to_string());
        if let Some((name, value)) = auth {
            req = req.header(name, value);
        }
        req.send()
    };
    let resp = send(None).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body = body_json(resp).await;
    assert_anthropic_error(&body, "authentication_error");
    let resp = send(Some(("x-api-key", "wrong"))).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        body_json(resp).await["error"]["message"],
        "invalid x-api-key"
    );
    assert_eq!(
        send(Some(("x-api-key", "sk-ant-mock")))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        send(Some(("authorization", "Bearer sk-ant-mock")))
            .await
            .unwrap()
            .status(),
        200,
        "newer SDKs send the key as a bearer token"
    );
}

#[tokio::test]
async fn models_count_tokens_and_unknown_paths() {
    let server = start_default().await;
    let client = client();
    let get = |path: &str| {
        client
            .get(format!("{}{path}", server.url()))
            .header("anthropic-version", "2023-06-01")
            .send()
    };
    let resp = get("/v1/models").await.unwrap();
    assert_eq!(resp.status(), 200);
    let list = body_json(resp).await;
    let data = list["data"].as_array().unwrap();
    assert!(!data.is_empty());
    assert_eq!(data[0]["type"], "model");
    assert_eq!(list["has_more"], false);
    assert_eq!(list["first_id"], data[0]["id"]);
    assert_eq!(list["last_id"], data[data.len() - 1]["id"]);
    assert!(data
        .iter()
        .all(|m| m["display_name"].is_string() && m["created_at"].is_string()));

    let model = body_json(get("/v1/models/claude-anything").await.unwrap()).await;
    assert_eq!(model["id"], "claude-anything");

    let resp = client
        .post(format!("{}/v1/messages/count_tokens", server.url()))
        .header("anthropic-version", "2023-06-01")
        .body(
            json!({"model": "m", "messages": [{"role": "user", "content": "12345678"}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(body_json(resp).await, json!({"input_tokens": 2}));

    let resp = get("/v1/nope").await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_anthropic_error(&body_json(resp).await, "not_found_error");
}

// ---------------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn error_faults_use_anthropic_types_including_529() {
    let server = start_default().await;
    let client = client();
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ] {
        set_faults(
            &client,
            &server,
            json!({"error_rate": 1.0, "error_status": status}),
        )
        .await;
        let resp = messages(&client, &server, &hello("m")).await;
        assert_eq!(resp.status(), status);
        let request_id = header(&resp, "request-id").to_owned();
        let body = body_json(resp).await;
        assert_anthropic_error(&body, kind);
        assert_eq!(
            body["request_id"],
            request_id.as_str(),
            "header and body agree"
        );
    }
    set_faults(
        &client,
        &server,
        json!({"error_rate": 1.0, "error_status": 529, "should_retry": true}),
    )
    .await;
    let resp = messages(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 529);
    assert_eq!(header(&resp, "x-should-retry"), "true");
    assert_eq!(body_json(resp).await["error"]["message"], "Overloaded");
}

#[tokio::test]
async fn rate_limit_fault_sends_429_with_retry_after_and_reset() {
    let server = start_default().await;
    let client = client();
    set_faults(
        &client,
        &server,
        json!({"rate_limit_rate": 1.0, "retry_after_secs": 9}),
    )
    .await;
    let resp = messages(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), "9");
    assert_eq!(header(&resp, "anthropic-ratelimit-requests-remaining"), "0");
    assert!(header(&resp, "anthropic-ratelimit-requests-reset").ends_with('Z'));
    assert_anthropic_error(&body_json(resp).await, "rate_limit_error");
    assert_eq!(server.stats().faults.rate_limit, 1);
}

#[tokio::test]
async fn stream_error_after_chunks_sends_event_error_and_ends_cleanly() {
    let server = start_default().await;
    let client = client();
    set_faults(
        &client,
        &server,
        json!({"chunks": 5, "stream_error_after_chunks": 2}),
    )
    .await;
    let resp = messages(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    assert_eq!(resp.status(), 200);
    let events = parse_events(&resp.text().await.unwrap());
    let seq: Vec<&str> = names(&events)
        .into_iter()
        .filter(|n| *n != "ping")
        .collect();
    assert_eq!(
        seq,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "error"
        ]
    );
    let (_, error) = events.last().unwrap();
    assert_eq!(error["error"]["type"], "overloaded_error");
    assert_eq!(error["error"]["message"], "Overloaded");

    // 0: right after message_start.
    set_faults(&client, &server, json!({"stream_error_after_chunks": 0})).await;
    let resp = messages(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    let events = parse_events(&resp.text().await.unwrap());
    assert_eq!(names(&events), ["message_start", "error"]);
    assert_eq!(server.stats().faults.stream_error, 2);
    assert_eq!(server.stats().messages, 2);
}

#[tokio::test]
async fn cut_and_latency_faults_apply_too() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"cut_after_chunks": 2})).await;
    let resp = messages(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.text().await.is_err(),
        "a cut stream does not end cleanly"
    );

    set_faults(&client, &server, json!({"latency_ms": 150})).await;
    let started = tokio::time::Instant::now();
    let resp = messages(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn same_seed_gives_the_same_answer_and_ids() {
    let seeded = |seed| MockOptions {
        seed,
        ..MockOptions::default()
    };
    let (a, b, other) = (
        start(seeded(7)).await,
        start(seeded(7)).await,
        start(seeded(8)).await,
    );
    let client = client();
    let request = with(
        hello("m"),
        json!({"stream": true, "tools": weather_tools()}),
    );
    let from_a = messages(&client, &a, &request).await.text().await.unwrap();
    let from_b = messages(&client, &b, &request).await.text().await.unwrap();
    assert_eq!(from_a, from_b);
    let from_other = messages(&client, &other, &request)
        .await
        .text()
        .await
        .unwrap();
    assert_ne!(from_a, from_other);
}
