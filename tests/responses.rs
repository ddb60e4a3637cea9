//! The Responses API (`POST /v1/responses`) over real loopback HTTP: passed
//! through to an OpenAI-kind mock (only `model` rewritten), translated for
//! Anthropic, Gemini and OpenAI-compatible mocks, failover before the first
//! event, honest error events after it, and stateful features kept to the
//! targets that can keep them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use detour::mock::{self, Flavor, MockOptions, MockServer};
use serde_json::{json, Value};

async fn upstream(flavor: Flavor) -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(flavor, listener, MockOptions::default())
        .await
        .unwrap()
}

fn base(kind: &str, up: &MockServer) -> String {
    match kind {
        "gemini" => format!("http://{}/v1beta", up.addr()),
        _ => format!("http://{}/v1", up.addr()),
    }
}

/// Route `fast` → providers `(name, kind, mock, model)` in this order of
/// priority.
fn route(targets: &[(&str, &str, &MockServer, &str)]) -> String {
    let mut out = String::new();
    for (name, kind, up, _) in targets {
        out.push_str(&format!(
            "[[providers]]\nname = \"{name}\"\nkind = \"{kind}\"\nbase_url = \"{}\"\n\n",
            base(kind, up)
        ));
    }
    out.push_str("[[routes]]\nmodel = \"fast\"\ntargets = [\n");
    for (i, (name, _, _, model)) in targets.iter().enumerate() {
        out.push_str(&format!(
            "  {{ provider = \"{name}\", model = \"{model}\", priority = {i} }},\n"
        ));
    }
    out.push_str("]\n");
    out
}

fn hello(stream: bool) -> Value {
    json!({
        "model": "fast",
        "instructions": "Be brief.",
        "input": "Say hello",
        "max_output_tokens": 200,
        "stream": stream,
    })
}

fn weather_tools() -> Value {
    json!([{
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }])
}

async fn post(gw: &detour::server::Running, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}/v1/responses", gw.url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// `(event name, data)` of every event of an SSE body.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_else(|_| Value::from(d));
                }
            }
            (name, data)
        })
        .collect()
}

/// Checks a stream's events are typed and numbered, and returns them.
fn typed_events(body: &str) -> Vec<(String, Value)> {
    let all = events(body);
    assert!(!all.is_empty(), "no events: {body}");
    for (i, (name, data)) in all.iter().enumerate() {
        assert_eq!(Some(name.as_str()), data["type"].as_str(), "{data}");
        assert_eq!(data["sequence_number"], i as u64, "{body}");
    }
    all
}

fn text_of(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// Passthrough to OpenAI

#[tokio::test]
async fn an_openai_provider_gets_the_request_itself_with_only_the_model_changed() {
    let up = upstream(Flavor::Openai).await;
    let gw = gateway(&route(&[("p", "openai", &up, "gpt-up")])).await;
    let body = json!({
        "model": "fast",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "tools": [{"type": "web_search"}],
        "previous_response_id": "resp_before",
        "store": true,
        "reasoning": {"effort": "low"},
        "x_unknown": {"kept": [1, 2]},
    });
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "p");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "response", "{v}");
    assert_eq!(v["model"], "gpt-up");
    assert_eq!(
        v["previous_response_id"], "resp_before",
        "the answer as it came"
    );
    assert!(v["x_mock"].as_bool().unwrap(), "relayed, not rebuilt: {v}");
    let sent = &up.requests()[0];
    assert_eq!(sent.path, "/v1/responses");
    let mut want = body.clone();
    want["model"] = "gpt-up".into();
    assert_eq!(sent.body.clone(), want);
    assert_eq!(up.stats().responses, 1);
    assert_eq!(up.stats().chat_completions, 0);
}

#[tokio::test]
async fn a_passthrough_stream_is_relayed_as_it_came_to_its_last_event() {
    let up = upstream(Flavor::Openai).await;
    up.set_faults(faults(json!({"chunks": 4})));
    let gw = gateway(&route(&[("p", "openai", &up, "gpt-up")])).await;
    let resp = post(&gw, &hello(true)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = resp.text().await.unwrap();
    let all = typed_events(&body);
    assert_eq!(all[0].0, "response.created");
    let (last, done) = all.last().unwrap();
    assert_eq!(last, "response.completed");
    assert!(done["response"]["x_mock"].as_bool().unwrap(), "as it came");
    assert!(text_of(&all).contains("gpt-up"));
    assert!(done["response"]["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_passthrough_stream_cut_midway_ends_with_an_error_event() {
    let up = upstream(Flavor::Openai).await;
    up.set_faults(faults(json!({"chunks": 6, "cut_after_chunks": 2})));
    let gw = gateway(&route(&[("p", "openai", &up, "gpt-up")])).await;
    let resp = post(&gw, &hello(true)).await;
    assert_eq!(resp.status(), 200, "the stream had started");
    let body = resp.text().await.unwrap();
    let all = events(&body);
    let (name, error) = all.last().unwrap();
    assert_eq!(name, "error", "{body}");
    assert_eq!(error["type"], "error");
    assert!(
        error["message"].as_str().unwrap().contains("`p`"),
        "names the provider: {error}"
    );
    assert!(
        error["error"]["message"].is_string(),
        "the SDKs raise: {error}"
    );
    assert!(!all.iter().any(|(n, _)| n == "response.completed"));
}

#[tokio::test]
async fn a_providers_own_failure_event_midway_is_relayed() {
    let up = upstream(Flavor::Openai).await;
    up.set_faults(faults(json!({"chunks": 6, "stream_error_after_chunks": 2})));
    let gw = gateway(&route(&[("p", "openai", &up, "gpt-up")])).await;
    let body = post(&gw, &hello(true)).await.text().await.unwrap();
    let all = events(&body);
    assert_eq!(all.last().unwrap().0, "response.failed", "{body}");
}

// ---------------------------------------------------------------------------
// Translated

async fn translated_whole(kind: &str, flavor: Flavor, model: &str) {
    let up = upstream(flavor).await;
    let gw = gateway(&route(&[("p", kind, &up, model)])).await;
    let resp = post(&gw, &hello(false)).await;
    assert_eq!(resp.status(), 200, "{kind}");
    assert_eq!(resp.headers()["x-detour-provider"], "p");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "response", "{v}");
    assert_eq!(v["status"], "completed", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
    assert_eq!(v["model"], model);
    assert_eq!(v["instructions"], "Be brief.", "echoed: {v}");
    assert_eq!(v["max_output_tokens"], 200, "echoed: {v}");
    let item = &v["output"][0];
    assert_eq!(item["type"], "message", "{v}");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["content"][0]["type"], "output_text");
    assert!(item["content"][0]["text"].as_str().unwrap().contains(model));
    let usage = &v["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["output_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap())
    );
}

#[tokio::test]
async fn answers_from_anthropic_gemini_and_chat_completions_come_back_as_response_objects() {
    translated_whole("anthropic", Flavor::Anthropic, "claude-up").await;
    translated_whole("gemini", Flavor::Gemini, "gemini-up").await;
    translated_whole("openai-compatible", Flavor::Openai, "llama-local").await;
}

async fn translated_stream(kind: &str, flavor: Flavor, model: &str) {
    let up = upstream(flavor).await;
    up.set_faults(faults(json!({"chunks": 3})));
    let gw = gateway(&route(&[("p", kind, &up, model)])).await;
    let resp = post(&gw, &hello(true)).await;
    assert_eq!(resp.status(), 200, "{kind}");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = resp.text().await.unwrap();
    let all = typed_events(&body);
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ],
        "{kind}: {body}"
    );
    assert_eq!(
        &names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ],
        "{kind}: {body}"
    );
    assert!(text_of(&all).contains(model), "{kind}: {body}");
    let done = &all.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], text_of(&all));
    assert!(
        done["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{kind}: {done}"
    );
}

#[tokio::test]
async fn streams_from_anthropic_gemini_and_chat_completions_come_back_as_typed_events() {
    translated_stream("anthropic", Flavor::Anthropic, "claude-up").await;
    translated_stream("gemini", Flavor::Gemini, "gemini-up").await;
    translated_stream("openai-compatible", Flavor::Openai, "llama-local").await;
}

#[tokio::test]
async fn the_translated_request_carries_instructions_input_items_and_parameters() {
    let up = upstream(Flavor::Anthropic).await;
    let gw = gateway(&route(&[("p", "anthropic", &up, "claude-up")])).await;
    let body = json!({
        "model": "fast",
        "instructions": "You are a weather bot.",
        "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"},
        ],
        "tools": weather_tools(),
        "max_output_tokens": 300,
        "temperature": 0.3,
    });
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("sunny, 21C"),
        "the answer quotes the tool result: {v}"
    );
    let sent = up.requests()[0].body.clone();
    assert_eq!(up.requests()[0].path, "/v1/messages");
    assert_eq!(sent["model"], "claude-up");
    assert_eq!(sent["system"], "You are a weather bot.");
    assert_eq!(sent["max_tokens"], 300);
    assert_eq!(sent["temperature"], 0.3);
    assert_eq!(sent["tools"][0]["name"], "get_weather");
    assert_eq!(sent["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(sent["messages"][2]["content"][0]["type"], "tool_result");
}

#[tokio::test]
async fn a_translated_tool_call_streams_its_arguments() {
    let up = upstream(Flavor::Anthropic).await;
    up.set_faults(faults(json!({"chunks": 3})));
    let gw = gateway(&route(&[("p", "anthropic", &up, "claude-up")])).await;
    let body = json!({"model": "fast", "input": "Weather in Paris?", "tools": weather_tools(), "stream": true});
    let text = post(&gw, &body).await.text().await.unwrap();
    let all = typed_events(&text);
    let added = all
        .iter()
        .find(|(n, d)| n == "response.output_item.added" && d["item"]["type"] == "function_call")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(added.1["item"]["name"], "get_weather");
    let args: String = all
        .iter()
        .filter(|(n, _)| n == "response.function_call_arguments.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
        .collect();
    let done = all
        .iter()
        .find(|(n, _)| n == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(done.1["arguments"], args.as_str());
    assert!(serde_json::from_str::<Value>(&args).unwrap()["city"].is_string());
    assert_eq!(all.last().unwrap().0, "response.completed");
}

#[tokio::test]
async fn a_translated_stream_failing_midway_ends_with_response_failed_and_an_error() {
    let up = upstream(Flavor::Anthropic).await;
    up.set_faults(faults(json!({"chunks": 6, "stream_error_after_chunks": 2})));
    let gw = gateway(&route(&[("p", "anthropic", &up, "claude-up")])).await;
    let body = post(&gw, &hello(true)).await.text().await.unwrap();
    let all = typed_events(&body);
    let names: Vec<&str> = all.iter().rev().take(2).map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["error", "response.failed"], "{body}");
    assert_eq!(all[all.len() - 2].1["response"]["status"], "failed");
}

#[tokio::test]
async fn a_route_without_openai_refuses_what_only_openai_serves_before_any_attempt() {
    let (claude, gemini) = (
        upstream(Flavor::Anthropic).await,
        upstream(Flavor::Gemini).await,
    );
    let gw = gateway(&route(&[
        ("claude", "anthropic", &claude, "claude-up"),
        ("g", "gemini", &gemini, "gemini-up"),
    ]))
    .await;
    let body = json!({"model": "fast", "input": "news?", "tools": [{"type": "web_search"}]});
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 400, "the caller's, not every target failing");
    let v: Value = resp.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("web_search") && message.contains("`fast`"),
        "{message}"
    );
    let resp = post(&gw, &json!({"model": "fast"})).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "input", "{v}");
    assert_eq!(claude.requests().len() + gemini.requests().len(), 0);
}

#[tokio::test]
async fn a_feature_only_openai_serves_is_refused_by_name_for_other_providers() {
    let up = upstream(Flavor::Anthropic).await;
    let gw = gateway(&route(&[("p", "anthropic", &up, "claude-up")])).await;
    let body = json!({"model": "fast", "input": "news?", "tools": [{"type": "web_search"}]});
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("web_search"), "{message}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(up.requests().len(), 0);
}

// ---------------------------------------------------------------------------
// Failover and state

#[tokio::test]
async fn a_stream_that_fails_before_its_first_event_fails_over_unseen() {
    let (primary, claude) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Anthropic).await,
    );
    primary.set_faults(faults(json!({"reset_rate": 1.0})));
    let gw = gateway(&route(&[
        ("primary", "openai", &primary, "gpt-up"),
        ("claude", "anthropic", &claude, "claude-up"),
    ]))
    .await;
    let resp = post(&gw, &hello(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "claude");
    assert!(resp.headers()["x-detour-tried"]
        .to_str()
        .unwrap()
        .contains("primary"));
    let body = resp.text().await.unwrap();
    let all = typed_events(&body);
    assert_eq!(all.last().unwrap().0, "response.completed");
    assert!(text_of(&all).contains("claude-up"));
    assert_eq!(primary.stats().responses, 1);
}

#[tokio::test]
async fn a_whole_answer_fails_over_from_openai_to_gemini() {
    let (primary, gemini) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Gemini).await,
    );
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 503})));
    let gw = gateway(&route(&[
        ("primary", "openai", &primary, "gpt-up"),
        ("g", "gemini", &gemini, "gemini-up"),
    ]))
    .await;
    let resp = post(&gw, &hello(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "g");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "response");
}

#[tokio::test]
async fn a_stateful_request_goes_only_to_openai_targets() {
    let (claude, primary) = (
        upstream(Flavor::Anthropic).await,
        upstream(Flavor::Openai).await,
    );
    // Claude comes first; the request needs OpenAI's stored response.
    let gw = gateway(&route(&[
        ("claude", "anthropic", &claude, "claude-up"),
        ("openai", "openai", &primary, "gpt-up"),
    ]))
    .await;
    let body = json!({"model": "fast", "input": "and then?", "previous_response_id": "resp_1"});
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "openai");
    assert_eq!(claude.requests().len(), 0);
    // OpenAI failing: the request is not sent to Claude, which would answer
    // without the conversation.
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 503})));
    let resp = post(&gw, &body).await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert_eq!(resp.headers()["x-detour-attempts"], "1");
    assert_eq!(claude.requests().len(), 0);
    // Without the state, Claude serves it.
    let resp = post(&gw, &hello(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "claude");
}

#[tokio::test]
async fn stateful_features_are_refused_with_a_400_naming_them_when_no_target_keeps_state() {
    let up = upstream(Flavor::Anthropic).await;
    let gw = gateway(&route(&[("p", "anthropic", &up, "claude-up")])).await;
    for (extra, named) in [
        (
            json!({"previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"store": true}), "store: true"),
        (json!({"background": true}), "background: true"),
        (json!({"conversation": "conv_1"}), "conversation"),
    ] {
        let mut body = hello(false);
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let resp = post(&gw, &body).await;
        assert_eq!(resp.status(), 400, "{extra}");
        let v: Value = resp.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{message}");
        assert!(message.contains("openai"), "{message}");
    }
    // `store: false`, and no `store` at all (OpenAI's default), are served.
    let mut body = hello(false);
    body["store"] = false.into();
    assert_eq!(post(&gw, &body).await.status(), 200);
    assert_eq!(post(&gw, &hello(false)).await.status(), 200);
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn bad_requests_are_refused_in_openais_shape() {
    let up = upstream(Flavor::Openai).await;
    let gw = gateway(&route(&[("p", "openai", &up, "gpt-up")])).await;
    let resp = post(
        &gw,
        &json!({"model": "fast", "input": "x", "stream": "yes"}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["param"], "stream", "{v}");
    let resp = post(&gw, &json!({"model": "nope", "input": "x"})).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    assert_eq!(up.requests().len(), 0);
}

#[tokio::test]
async fn a_cached_route_replays_a_responses_answer() {
    let up = upstream(Flavor::Anthropic).await;
    let config = route(&[("p", "anthropic", &up, "claude-up")]) + "cache = { ttl = \"1m\" }\n";
    let gw = gateway(&config).await;
    let first: Value = post(&gw, &hello(false)).await.json().await.unwrap();
    let resp = post(&gw, &hello(false)).await;
    assert_eq!(resp.headers()["x-detour-cache"], "hit");
    let second: Value = resp.json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn a_slow_answer_is_hedged_but_never_a_stateful_request() {
    let (a, b) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Openai).await,
    );
    // Both slow: whichever goes first, a hedge starts after 30ms.
    for up in [&a, &b] {
        up.set_faults(faults(json!({"latency_ms": 200})));
    }
    let config = route(&[("a", "openai", &a, "gpt-a"), ("b", "openai", &b, "gpt-b")])
        + "hedge_after = \"30ms\"\n";
    let gw = gateway(&config).await;
    let resp = post(&gw, &hello(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-attempts"], "2", "hedged");
    // Two racing attempts would store, or append to a conversation, twice.
    let mut body = hello(false);
    body["conversation"] = "conv_1".into();
    let before = a.stats().responses + b.stats().responses;
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-attempts"], "1", "not hedged");
    assert_eq!(a.stats().responses + b.stats().responses, before + 1);
}

#[tokio::test]
async fn a_stateful_request_is_never_answered_from_the_cache() {
    let up = upstream(Flavor::Openai).await;
    let config = route(&[("p", "openai", &up, "gpt-up")]) + "cache = { ttl = \"1m\" }\n";
    let gw = gateway(&config).await;
    let mut body = hello(false);
    body["store"] = true.into();
    for _ in 0..2 {
        let resp = post(&gw, &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-detour-cache"], "bypass");
    }
    assert_eq!(up.stats().responses, 2);
}

/// The value of the series `name` (labels included) in a scrape.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn usage_is_counted_for_passed_through_and_translated_answers() {
    let (primary, claude, streams) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Anthropic).await,
        upstream(Flavor::Openai).await,
    );
    let gw = gateway(&route(&[
        ("resp-pass", "openai", &primary, "gpt-up"),
        ("resp-claude", "anthropic", &claude, "claude-up"),
    ]))
    .await;
    let gw_streams = gateway(&route(&[("resp-stream", "openai", &streams, "gpt-up")])).await;
    let admin = admin(&gw, "t0k").await;
    let scrape = || async {
        let resp = client().get(format!("{admin}/metrics")).bearer_auth("t0k");
        resp.send().await.unwrap().text().await.unwrap()
    };
    // The first scrape installs the process's recorder.
    scrape().await;
    // Passed through whole, passed through streamed, translated streamed.
    assert_eq!(post(&gw, &hello(false)).await.status(), 200);
    post(&gw_streams, &hello(true)).await.text().await.unwrap();
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    post(&gw, &hello(true)).await.text().await.unwrap();
    let series = |provider: &str, kind: &str| {
        format!(r#"detour_tokens_total{{provider="{provider}",kind="{kind}",tenant="anonymous"}}"#)
    };
    let wanted: Vec<String> = ["resp-pass", "resp-stream", "resp-claude"]
        .iter()
        .flat_map(|p| [series(p, "prompt"), series(p, "completion")])
        .collect();
    let requests = r#"detour_requests_total{route="fast",provider="resp-pass",status="200",format="responses",tenant="anonymous"}"#;
    // A request is counted when its body ends, a moment after the client has it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = scrape().await;
        if wanted.iter().all(|w| value(&text, w) > 0.0) && value(&text, requests) == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing some of {wanted:#?} in:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
