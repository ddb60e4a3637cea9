//! `detour mock --flavor openai` over real loopback HTTP: body shapes, stream event
//! order, tools, embeddings, every fault through the control API, determinism, stats.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed unwrap is a failed test

use std::time::Duration;

use detour_mock::{self as mock, Faults, Flavor, MockOptions, MockServer, Stats};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------
// Helpers

async fn start(opts: MockOptions) -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(Flavor::Openai, listener, opts).await.unwrap()
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

async fn post(
    client: &reqwest::Client,
    server: &MockServer,
    path: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{}{path}", server.url()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn chat(client: &reqwest::Client, server: &MockServer, body: &Value) -> reqwest::Response {
    post(client, server, "/v1/chat/completions", body).await
}

async fn body_json(resp: reqwest::Response) -> Value {
    let bytes = resp.bytes().await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

async fn put_faults(
    client: &reqwest::Client,
    server: &MockServer,
    body: &str,
) -> reqwest::Response {
    client
        .put(format!("{}/_mock/faults", server.url()))
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn set_faults(client: &reqwest::Client, server: &MockServer, faults: Value) {
    let resp = put_faults(client, server, &faults.to_string()).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

async fn get_json(client: &reqwest::Client, server: &MockServer, path: &str) -> Value {
    let resp = client
        .get(format!("{}{path}", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    body_json(resp).await
}

/// The payloads of a data-only SSE body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_owned()
        })
        .collect()
}

/// Parses every event but the final `[DONE]`, which must be there.
fn stream_chunks(text: &str) -> Vec<Value> {
    let mut events = sse_data(text);
    assert_eq!(
        events.pop().as_deref(),
        Some("[DONE]"),
        "stream must end with [DONE]"
    );
    events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello to the gateway tests."}
    ]})
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn assert_openai_error(body: &Value) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    for key in ["param", "code"] {
        assert!(
            error.as_object().unwrap().contains_key(key),
            "missing {key}: {body}"
        );
    }
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "days": {"type": "integer"},
                "metric": {"type": "boolean"}, "extra": {"type": "object"},
                "optional": {"type": "string"}
            }, "required": ["city", "days", "metric", "extra"]}
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}
        }}
    ])
}

// ---------------------------------------------------------------------------------
// Chat completions

#[tokio::test]
async fn non_streamed_completion_has_the_openai_shape() {
    let server = start_default().await;
    let resp = chat(&client(), &server, &hello("gpt-4o-mini")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert!(header(&resp, "x-request-id").starts_with("req_"));
    assert!(header(&resp, "openai-processing-ms").parse::<u64>().is_ok());
    let body = body_json(resp).await;

    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(
        body["model"], "gpt-4o-mini",
        "the request's model is echoed"
    );
    assert!(body["system_fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("fp_"));
    assert!(
        body.get("x_mock").is_some(),
        "an unknown field is sent on purpose"
    );
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    let choice = &choices[0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["refusal"].is_null());
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(text.contains("gpt-4o-mini"), "{text}");
    assert!(text.split_whitespace().count() >= 15, "{text}");

    let usage = &body["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(prompt >= 1 && completion >= 1);
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
}

#[tokio::test]
async fn n_gives_n_choices_and_max_tokens_truncates() {
    let server = start_default().await;
    let client = client();
    let body = body_json(chat(&client, &server, &with(hello("m"), json!({"n": 3}))).await).await;
    let indexes: Vec<u64> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2]);

    let limited = with(hello("m"), json!({"max_completion_tokens": 3}));
    let body = body_json(chat(&client, &server, &limited).await).await;
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn stream_follows_the_openai_event_order_with_usage() {
    let server = start_default().await;
    let client = client();
    let request = with(
        hello("gpt-4o-mini"),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let resp = chat(&client, &server, &request).await;
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    let chunks = stream_chunks(&resp.text().await.unwrap());

    // role, 8 content pieces (default `chunks`), finish, usage
    assert_eq!(chunks.len(), 11, "{chunks:#?}");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o-mini");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    let mut text = String::new();
    for chunk in &chunks[1..9] {
        let delta = chunk["choices"][0]["delta"].as_object().unwrap();
        assert_eq!(delta.keys().collect::<Vec<_>>(), ["content"]);
        assert!(chunk["choices"][0]["finish_reason"].is_null());
        text.push_str(delta["content"].as_str().unwrap());
    }
    assert_eq!(chunks[9]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[9]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[10]["choices"], json!([]));
    let usage = &chunks[10]["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    for chunk in &chunks[..10] {
        assert!(chunk.as_object().unwrap().contains_key("usage") && chunk["usage"].is_null());
    }

    // The stream says what the non-streamed answer says.
    let whole = body_json(chat(&client, &server, &hello("gpt-4o-mini")).await).await;
    assert_eq!(whole["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(whole["usage"], *usage);
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_at_all() {
    let server = start_default().await;
    let request = with(hello("m"), json!({"stream": true, "n": 2}));
    let resp = chat(&client(), &server, &request).await;
    let chunks = stream_chunks(&resp.text().await.unwrap());
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert!(chunks
        .iter()
        .all(|c| c["choices"].as_array().unwrap().len() == 1));
    for index in 0..2 {
        let of_choice: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0])
            .filter(|c| c["index"] == index)
            .collect();
        assert_eq!(of_choice.first().unwrap()["delta"]["role"], "assistant");
        assert_eq!(of_choice.last().unwrap()["finish_reason"], "stop");
        assert_eq!(
            of_choice
                .iter()
                .filter(|c| !c["finish_reason"].is_null())
                .count(),
            1
        );
    }
}

#[tokio::test]
async fn tools_produce_a_tool_call_with_schema_arguments() {
    let server = start_default().await;
    let client = client();
    let request = with(hello("gpt-4o"), json!({"tools": weather_tools()}));
    let body = body_json(chat(&client, &server, &request).await).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        args,
        json!({"city": "mock", "days": 1, "metric": true, "extra": null})
    );

    let named = with(
        request.clone(),
        json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
    );
    let body = body_json(chat(&client, &server, &named).await).await;
    let call = &body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_time");
    assert_eq!(call["function"]["arguments"], r#"{"tz":"mock"}"#);

    let none = with(request.clone(), json!({"tool_choice": "none"}));
    let body = body_json(chat(&client, &server, &none).await).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["choices"][0]["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn a_tool_result_is_answered_with_text_that_quotes_it() {
    let server = start_default().await;
    let request = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temp_c\":18}"}
        ],
        "tools": weather_tools()
    });
    let body = body_json(chat(&client(), &server, &request).await).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains(r#"{"temp_c":18}"#), "{text}");
}

#[tokio::test]
async fn streamed_tool_call_fragments_join_into_the_arguments() {
    let server = start_default().await;
    let client = client();
    let request = with(
        hello("gpt-4o"),
        json!({"tools": weather_tools(), "stream": true}),
    );
    let chunks = stream_chunks(&chat(&client, &server, &request).await.text().await.unwrap());

    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert!(first["content"].is_null());
    let opening = &first["tool_calls"][0];
    assert_eq!(opening["index"], 0);
    assert!(opening["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(opening["type"], "function");
    assert_eq!(
        opening["function"],
        json!({"name": "get_weather", "arguments": ""})
    );

    let (last, fragments) = chunks[1..].split_last().unwrap();
    assert!(fragments.len() > 1, "arguments come in several fragments");
    let mut arguments = String::new();
    for chunk in fragments {
        let delta = &chunk["choices"][0]["delta"];
        let call = &delta["tool_calls"][0];
        assert_eq!(delta.as_object().unwrap().len(), 1, "{delta}");
        assert_eq!(
            call.as_object().unwrap().len(),
            2,
            "only index and function: {call}"
        );
        assert_eq!(call["index"], 0);
        assert_eq!(call["function"].as_object().unwrap().len(), 1);
        arguments.push_str(call["function"]["arguments"].as_str().unwrap());
    }
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
    let args: Value = serde_json::from_str(&arguments).unwrap();
    assert_eq!(
        args,
        json!({"city": "mock", "days": 1, "metric": true, "extra": null})
    );
}

#[tokio::test]
async fn invalid_chat_requests_get_400_in_openai_shape() {
    let server = start_default().await;
    let client = client();
    let resp = client
        .post(format!("{}/v1/chat/completions", server.url()))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body = body_json(resp).await;
    assert_openai_error(&body);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("parse the JSON"));

    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            Value::Null,
        ),
        (json!({"model": "m"}), json!("messages")),
        (json!({"model": "m", "messages": []}), json!("messages")),
        (
            json!({"model": "m", "messages": [{"content": "hi"}]}),
            json!("messages[0].role"),
        ),
        (
            with(
                hello("m"),
                json!({"stream_options": {"include_usage": true}}),
            ),
            json!("stream_options"),
        ),
    ];
    for (request, param) in cases {
        let resp = chat(&client, &server, &request).await;
        assert_eq!(resp.status(), 400, "{request}");
        let body = body_json(resp).await;
        assert_openai_error(&body);
        assert_eq!(body["error"]["param"], param, "{body}");
    }
}

#[tokio::test]
async fn api_key_is_enforced_when_set() {
    let server = start(MockOptions {
        api_key: Some("sk-test-123456789".into()),
        ..MockOptions::default()
    })
    .await;
    let client = client();
    let url = format!("{}/v1/chat/completions", server.url());
    let send = |key: Option<&str>| {
        let mut req = client.post(&url).body(hello("m").to_string());
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };

    let missing = send(None).await.unwrap();
    assert_eq!(missing.status(), 401);
    let body = body_json(missing).await;
    assert_openai_error(&body);
    assert!(body["error"]["code"].is_null());

    let wrong = send(Some("sk-wrong-000000000")).await.unwrap();
    assert_eq!(wrong.status(), 401);
    let body = body_json(wrong).await;
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(!body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sk-wrong-000000000"));

    assert_eq!(send(Some("sk-test-123456789")).await.unwrap().status(), 200);
    // The control API needs no key.
    get_json(&client, &server, "/_mock/stats").await;
}

// ---------------------------------------------------------------------------------
// Embeddings, models, unknown paths

fn decode_base64(text: &str) -> Vec<u8> {
    assert_eq!(text.len() % 4, 0, "padded base64");
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for &c in text.trim_end_matches('=').as_bytes() {
        acc = (acc << 6) | value(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn floats(embedding: &Value) -> Vec<f32> {
    embedding
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn embeddings_come_as_floats_or_little_endian_base64() {
    let server = start_default().await;
    let client = client();
    let request = json!({"model": "text-embedding-3-small", "input": ["hello", "world"]});
    let body = body_json(post(&client, &server, "/v1/embeddings", &request).await).await;
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "text-embedding-3-small");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() >= 2);
    assert_eq!(
        body["usage"]["total_tokens"],
        body["usage"]["prompt_tokens"]
    );
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let vectors: Vec<Vec<f32>> = data.iter().map(|d| floats(&d["embedding"])).collect();
    for (i, (item, vector)) in data.iter().zip(&vectors).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_eq!(vector.len(), 8, "default dimensions");
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    }
    assert_ne!(vectors[0], vectors[1]);

    let base64 = with(request.clone(), json!({"encoding_format": "base64"}));
    let body = body_json(post(&client, &server, "/v1/embeddings", &base64).await).await;
    for (item, want) in body["data"].as_array().unwrap().iter().zip(&vectors) {
        let bytes = decode_base64(item["embedding"].as_str().unwrap());
        let got: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
            "{got:?} vs {want:?}"
        );
    }

    let single = json!({"model": "e", "input": "hi", "dimensions": 16});
    let body = body_json(post(&client, &server, "/v1/embeddings", &single).await).await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 16);

    let tokens = json!({"model": "e", "input": [[1, 2, 3], [4, 5]]});
    let body = body_json(post(&client, &server, "/v1/embeddings", &tokens).await).await;
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["usage"]["prompt_tokens"], 5);

    let bad = json!({"model": "e", "input": 42});
    let resp = post(&client, &server, "/v1/embeddings", &bad).await;
    assert_eq!(resp.status(), 400);
    assert_openai_error(&body_json(resp).await);
}

#[tokio::test]
async fn models_list_and_unknown_paths() {
    let server = start_default().await;
    let client = client();
    let list = get_json(&client, &server, "/v1/models").await;
    assert_eq!(list["object"], "list");
    let data = list["data"].as_array().unwrap();
    assert!(data.len() >= 2);
    for model in data {
        assert_eq!(model["object"], "model");
        assert!(
            model["id"].is_string() && model["created"].is_u64() && model["owned_by"].is_string()
        );
    }
    let one = get_json(&client, &server, "/v1/models/gpt-4o").await;
    assert_eq!(one["id"], "gpt-4o");

    let resp = client
        .get(format!("{}/v1/nope", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(header(&resp, "x-request-id").starts_with("req_"));
    let body = body_json(resp).await;
    assert_openai_error(&body);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("GET /v1/nope"));
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_too() {
    let server = start_default().await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    stream_chunks(&resp.text().await.unwrap());
}

// ---------------------------------------------------------------------------------
// Faults, set through the control API

#[tokio::test]
async fn error_fault_answers_with_the_status_and_openai_body() {
    let server = start_default().await;
    let client = client();
    set_faults(
        &client,
        &server,
        json!({"error_rate": 1.0, "error_status": 503}),
    )
    .await;
    assert_eq!(
        get_json(&client, &server, "/_mock/faults").await["error_status"],
        503
    );

    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 503);
    assert!(header(&resp, "x-request-id").starts_with("req_"));
    let body = body_json(resp).await;
    assert_openai_error(&body);
    assert_eq!(body["error"]["type"], "server_error");

    set_faults(
        &client,
        &server,
        json!({"error_rate": 1.0, "error_status": 400}),
    )
    .await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        body_json(resp).await["error"]["type"],
        "invalid_request_error"
    );

    assert_eq!(server.stats().faults.error, 2);
}

#[tokio::test]
async fn rate_limit_fault_sends_429_with_retry_after() {
    let server = start_default().await;
    let client = client();
    set_faults(
        &client,
        &server,
        json!({"rate_limit_rate": 1.0, "retry_after_secs": 7}),
    )
    .await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), "7");
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&resp, "x-ratelimit-reset-requests"), "7s");
    assert!(header(&resp, "x-ratelimit-limit-requests")
        .parse::<u64>()
        .is_ok());
    let body = body_json(resp).await;
    assert_openai_error(&body);
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(server.stats().faults.rate_limit, 1);
}

#[tokio::test]
async fn reset_fault_resets_the_connection() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"reset_rate": 1.0})).await;

    let err = client
        .post(format!("{}/v1/chat/completions", server.url()))
        .body(hello("m").to_string())
        .send()
        .await
        .expect_err("a reset connection gives no response");
    assert!(!err.is_timeout(), "{err:?}");

    // On the wire: RST (ECONNRESET), not an orderly close.
    let mut raw = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    raw.write_all(b"GET /v1/models HTTP/1.1\r\nhost: mock\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = raw.read(&mut buf).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "expected a reset"
    );

    let stats = server.stats();
    assert!(stats.faults.reset >= 2);
    assert_eq!(
        stats.faults.reset, stats.requests,
        "every request was reset"
    );

    // The server itself is fine.
    client
        .delete(format!("{}/_mock/faults", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(chat(&client, &server, &hello("m")).await.status(), 200);
}

#[tokio::test]
async fn hang_fault_never_answers() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"hang_rate": 1.0})).await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = impatient
        .post(format!("{}/v1/chat/completions", server.url()))
        .body(hello("m").to_string())
        .send()
        .await
        .expect_err("a hung request gets no response");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(server.stats().faults.hang, 1);
}

#[tokio::test]
async fn latency_and_ttfb_delay_non_streamed_responses() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"latency_ms": 200, "ttfb_ms": 100})).await;
    let started = Instant::now();
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 200);
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(
        header(&resp, "openai-processing-ms")
            .parse::<u64>()
            .unwrap()
            >= 300
    );
}

#[tokio::test]
async fn ttfb_separates_stream_headers_from_the_first_event() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"ttfb_ms": 400})).await;
    let started = Instant::now();
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    let headers_at = started.elapsed();
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(first.starts_with(b"data: "));
    assert!(first_at >= Duration::from_millis(400), "{first_at:?}");
    assert!(
        first_at - headers_at >= Duration::from_millis(200),
        "headers at {headers_at:?}, first event at {first_at:?}"
    );
}

#[tokio::test]
async fn chunks_and_gap_reshape_the_stream() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"chunks": 3, "chunk_gap_ms": 40})).await;
    let started = Instant::now();
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    let chunks = stream_chunks(&resp.text().await.unwrap());
    let elapsed = started.elapsed();
    // role, 3 pieces, finish, [DONE]: 5 gaps
    assert_eq!(chunks.len(), 5);
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
}

#[tokio::test]
async fn cut_after_chunks_aborts_the_stream_without_done() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"cut_after_chunks": 3})).await;
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut received = Vec::new();
    let mut failed = false;
    while let Some(frame) = body.next().await {
        match frame {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end with an error, not cleanly");
    let text = String::from_utf8(received).unwrap();
    let events = sse_data(&text);
    assert_eq!(events.len(), 3, "{text}");
    assert!(events.iter().all(|e| e != "[DONE]"));
    assert_eq!(server.stats().faults.cut, 1);
}

#[tokio::test]
async fn stream_error_after_chunks_sends_the_error_event_and_ends_cleanly() {
    let server = start_default().await;
    let client = client();
    set_faults(
        &client,
        &server,
        json!({"chunks": 4, "stream_error_after_chunks": 2}),
    )
    .await;
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    assert_eq!(resp.status(), 200);
    // `text()` fails if the body does not end cleanly.
    let events = sse_data(&resp.text().await.unwrap());
    // role chunk, 2 content chunks, the error; no finish, no [DONE]
    assert_eq!(events.len(), 4, "{events:?}");
    let chunks: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[1]["choices"][0]["delta"]["content"].is_string());
    assert!(chunks[2]["choices"][0]["delta"]["content"].is_string());
    let error = &chunks[3];
    assert_openai_error(error);
    assert_eq!(error["error"]["type"], "server_error");
    assert!(error.get("choices").is_none());

    // 0: right after the opening (role) chunk.
    set_faults(&client, &server, json!({"stream_error_after_chunks": 0})).await;
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    let events = sse_data(&resp.text().await.unwrap());
    assert_eq!(events.len(), 2);
    assert!(events[1].starts_with(r#"{"error":"#));

    // More than there are: all the content, then the error instead of the finish.
    set_faults(
        &client,
        &server,
        json!({"chunks": 3, "stream_error_after_chunks": 99}),
    )
    .await;
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    let events = sse_data(&resp.text().await.unwrap());
    assert_eq!(events.len(), 5);
    assert!(events.iter().all(|e| !e.contains("finish_reason\":\"stop")));

    // Non-streamed requests are unaffected.
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(server.stats().faults.stream_error, 3);
}

#[tokio::test]
async fn should_retry_adds_the_header_to_fault_replies() {
    let server = start_default().await;
    let client = client();
    set_faults(
        &client,
        &server,
        json!({"error_rate": 1.0, "error_status": 503, "should_retry": false}),
    )
    .await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "x-should-retry"), "false");
    set_faults(
        &client,
        &server,
        json!({"rate_limit_rate": 1.0, "should_retry": true}),
    )
    .await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "x-should-retry"), "true");
    set_faults(&client, &server, json!({"error_rate": 1.0})).await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert!(resp.headers().get("x-should-retry").is_none());
}

#[tokio::test]
async fn malformed_cuts_json_bodies_but_not_streams() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"malformed": true})).await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/json");
    let bytes = resp.bytes().await.unwrap();
    assert!(!bytes.is_empty());
    assert!(serde_json::from_slice::<Value>(&bytes).is_err());
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    stream_chunks(&resp.text().await.unwrap());
    assert_eq!(server.stats().faults.malformed, 1);
}

#[tokio::test]
async fn hostile_faults_send_any_retry_after_html_and_unasked_gzip() {
    let server = start_default().await;
    let client = client();
    // Any retry-after text, on rate limits and on errors.
    set_faults(
        &client,
        &server,
        json!({"rate_limit_rate": 1.0, "retry_after": "1e20"}),
    )
    .await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(
        (resp.status().as_u16(), header(&resp, "retry-after")),
        (429, "1e20")
    );
    set_faults(
        &client,
        &server,
        json!({"error_rate": 1.0, "error_status": 503, "retry_after": "Fri, 31 Dec 9999 23:59:59 GMT"}),
    )
    .await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(
        header(&resp, "retry-after"),
        "Fri, 31 Dec 9999 23:59:59 GMT"
    );
    let resp = put_faults(&client, &server, r#"{"retry_after": "a\nb"}"#).await;
    assert_eq!(resp.status(), 400);

    // A 200 HTML page instead of the answer.
    set_faults(&client, &server, json!({"html_200": true})).await;
    let resp = chat(&client, &server, &hello("m")).await;
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "content-type").starts_with("text/html"));
    assert!(resp.text().await.unwrap().contains("<html>"));

    // gzip although the request asked for none: one gzip member, stored blocks.
    set_faults(&client, &server, json!({"gzip": true})).await;
    for stream in [false, true] {
        let resp = chat(
            &client,
            &server,
            &with(hello("m"), json!({"stream": stream})),
        )
        .await;
        assert_eq!(header(&resp, "content-encoding"), "gzip");
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(&bytes[..3], &[0x1f, 0x8b, 8]);
        let (mut at, mut plain) = (10, Vec::new());
        loop {
            let len = usize::from(u16::from_le_bytes([bytes[at + 1], bytes[at + 2]]));
            plain.extend_from_slice(&bytes[at + 5..at + 5 + len]);
            let last = bytes[at] == 1;
            at += 5 + len;
            if last {
                break;
            }
        }
        let size = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        assert_eq!(size as usize, plain.len());
        let text = String::from_utf8(plain).unwrap();
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        } else {
            assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
        }
    }
}

#[tokio::test]
async fn endless_event_after_sends_an_event_that_never_ends() {
    let server = start_default().await;
    let client = client();
    set_faults(&client, &server, json!({"endless_event_after": 1})).await;
    let resp = chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = Vec::new();
    while seen.len() < 1 << 20 {
        seen.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    let first_end = seen.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    assert!(seen[..first_end].starts_with(b"data: {"));
    assert!(seen[first_end..].starts_with(b"data: xxxx"));
    assert!(
        !seen[first_end..].windows(2).any(|w| w == b"\n\n"),
        "the second event never ends"
    );
}

// ---------------------------------------------------------------------------------
// Determinism, stats, control API

async fn statuses(server: &MockServer, count: usize) -> Vec<u16> {
    let client = client();
    set_faults(
        &client,
        server,
        json!({"error_rate": 0.3, "rate_limit_rate": 0.2}),
    )
    .await;
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(chat(&client, server, &hello("m")).await.status().as_u16());
    }
    out
}

#[tokio::test]
async fn same_seed_and_order_give_the_same_faults_and_content() {
    let seeded = |seed| MockOptions {
        seed,
        ..MockOptions::default()
    };
    let (a, b, other) = (
        start(seeded(42)).await,
        start(seeded(42)).await,
        start(seeded(43)).await,
    );
    let from_a = statuses(&a, 40).await;
    assert_eq!(from_a, statuses(&b, 40).await);
    assert_ne!(from_a, statuses(&other, 40).await, "the seed matters");
    for status in [200, 429, 500] {
        assert!(from_a.contains(&status), "{status} missing from {from_a:?}");
    }

    // A reset restarts the sequence.
    client()
        .post(format!("{}/_mock/reset", a.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(from_a, statuses(&a, 40).await);

    // Content depends on seed and request only.
    a.reset();
    b.reset();
    let client = client();
    let request = with(hello("m"), json!({"n": 2}));
    let from_a = body_json(chat(&client, &a, &request).await).await;
    let from_b = body_json(chat(&client, &b, &request).await).await;
    assert_eq!(from_a["choices"], from_b["choices"]);
    assert_eq!(from_a["id"], from_b["id"]);
    assert_ne!(
        from_a["choices"][0]["message"],
        from_a["choices"][1]["message"]
    );
}

#[tokio::test]
async fn stats_count_traffic_but_not_control_calls() {
    let server = start_default().await;
    let client = client();
    chat(&client, &server, &hello("m")).await;
    chat(&client, &server, &with(hello("m"), json!({"stream": true}))).await;
    post(
        &client,
        &server,
        "/v1/embeddings",
        &json!({"model": "e", "input": "x"}),
    )
    .await;
    client
        .get(format!("{}/v1/models", server.url()))
        .send()
        .await
        .unwrap();
    client
        .post(format!("{}/v1/nope?x=1", server.url()))
        .header("x-test", "yes")
        .body("plain text")
        .send()
        .await
        .unwrap();
    get_json(&client, &server, "/_mock/faults").await;
    get_json(&client, &server, "/_mock/requests").await;

    let stats: Stats =
        serde_json::from_value(get_json(&client, &server, "/_mock/stats").await).unwrap();
    assert_eq!(stats, server.stats());
    assert_eq!(
        (stats.requests, stats.chat_completions, stats.embeddings),
        (5, 2, 1)
    );
    assert_eq!(stats.faults, mock::FaultStats::default());
    let raw = get_json(&client, &server, "/_mock/stats").await;
    assert_eq!(
        raw["faults"],
        json!({"error": 0, "rate_limit": 0, "reset": 0, "hang": 0, "cut": 0,
               "stream_error": 0, "malformed": 0})
    );

    let recorded = server.requests();
    assert_eq!(recorded.len(), 5);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(recorded[0].body["model"], "m");
    assert_eq!(recorded[4].path, "/v1/nope?x=1");
    assert!(recorded[4]
        .headers
        .contains(&("x-test".into(), "yes".into())));
    assert!(recorded[4].body.is_null());
    let over_http = get_json(&client, &server, "/_mock/requests").await;
    assert_eq!(over_http.as_array().unwrap().len(), 5);
    assert_eq!(over_http[2]["path"], "/v1/embeddings");

    set_faults(&client, &server, json!({"error_rate": 1.0})).await;
    let resp = client
        .post(format!("{}/_mock/reset", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(server.stats(), Stats::default());
    assert!(server.requests().is_empty());
    assert_eq!(server.faults(), Faults::default());
}

#[tokio::test]
async fn bad_control_requests_are_rejected() {
    let server = start_default().await;
    let client = client();
    for (body, mentions) in [
        ("{not json", "invalid faults JSON"),
        (r#"{"nope": 1}"#, "nope"),
        (r#"{"error_rate": 2}"#, "error_rate"),
        (r#"{"error_status": 200}"#, "error_status"),
    ] {
        let resp = put_faults(&client, &server, body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let error = body_json(resp).await;
        assert_openai_error(&error);
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{message}");
    }
    assert_eq!(
        server.faults(),
        Faults::default(),
        "a rejected PUT changes nothing"
    );

    let resp = client
        .get(format!("{}/_mock/nothing", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = client
        .post(format!("{}/_mock/stats", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(server.stats().requests, 0);
}

#[tokio::test]
async fn faults_set_in_rust_are_visible_over_http() {
    let server = start_default().await;
    let faults = Faults {
        latency_ms: 5,
        cut_after_chunks: Some(2),
        ..Faults::default()
    };
    server.set_faults(faults.clone());
    let over_http: Faults =
        serde_json::from_value(get_json(&client(), &server, "/_mock/faults").await).unwrap();
    assert_eq!(over_http, faults);
}

#[tokio::test]
async fn every_flavor_starts_and_reports_itself() {
    for flavor in [
        Flavor::Openai,
        Flavor::Anthropic,
        Flavor::Gemini,
        Flavor::Statuspage,
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = mock::spawn(flavor, listener, MockOptions::default())
            .await
            .unwrap();
        assert_eq!(server.flavor(), flavor);
    }
}

#[tokio::test]
async fn status_control_exists_only_on_the_statuspage_flavor() {
    let server = start_default().await;
    let resp = client()
        .get(format!("{}/_mock/status", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body = body_json(resp).await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("statuspage"));
}
