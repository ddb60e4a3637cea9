//! The gateway over real loopback HTTP, against `detour mock`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

#[tokio::test]
async fn non_streamed_chat_is_forwarded_with_the_target_model() {
    let up = mock().await;
    let gw = gateway(&one_route(up.addr(), "", "")).await;
    let body = json!({
        "model": "fast",
        "messages": [{"role": "user", "content": "Say hello"}],
        "temperature": 0.2,
        "x_vendor_field": {"kept": true},
    });
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert!(h["x-request-id"].to_str().unwrap().starts_with("req_"));
    assert_eq!(h["x-detour-provider"], "p");
    assert_eq!(h["x-detour-model"], "gpt-up");
    assert_eq!(h["x-detour-attempts"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-up");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Upstream saw the same body with only the model changed, and detour's key.
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    let mut expected = body.clone();
    expected["model"] = json!("gpt-up");
    assert_eq!(seen[0].body, expected);
    let auth = seen[0]
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .unwrap();
    assert_eq!(auth.1, "Bearer sk-upstream-secret");
}

#[tokio::test]
async fn the_clients_request_id_is_kept() {
    let up = mock().await;
    let gw = gateway(&one_route(up.addr(), "", "")).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("x-request-id", "trace-abc-123")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-abc-123");
    // Errors carry it too.
    let resp = client()
        .post(format!("{}/v1/nope", gw.url()))
        .header("x-request-id", "trace-xyz")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-xyz");
}

#[tokio::test]
async fn streams_are_relayed_event_by_event_as_they_arrive() {
    let up = mock().await;
    up.set_faults(faults(json!({"chunks": 5, "chunk_gap_ms": 150})));
    let gw = gateway(&one_route(up.addr(), "", "")).await;
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let started = Instant::now();
    let mut resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(resp.headers()["x-detour-model"], "gpt-up");
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        arrivals.push(started.elapsed());
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // The first content reached the client long before the upstream finished:
    // nothing was buffered.
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    assert!(last - first >= Duration::from_millis(500), "{arrivals:?}");
    assert!(arrivals.len() >= 5, "{arrivals:?}");

    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert!(content.contains("gpt-up"), "{content}");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn tools_and_tool_calls_pass_through() {
    let up = mock().await;
    let gw = gateway(&one_route(up.addr(), "", "")).await;
    let mut body = chat(false);
    body["tools"] = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }]);
    let v: Value = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string());
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(up.requests()[0].body["tools"], body["tools"]);
}

#[tokio::test]
async fn embeddings_and_models() {
    let up = mock().await;
    let gw = gateway(&one_route(up.addr(), "", "")).await;
    let v: Value = client()
        .post(format!("{}/v1/embeddings", gw.url()))
        .json(&json!({"model": "fast", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(up.requests()[0].body["model"], "gpt-up");
    assert_eq!(up.requests()[0].path, "/v1/embeddings");

    let v: Value = client()
        .get(format!("{}/v1/models", gw.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "fast");
    assert_eq!(v["data"][0]["object"], "model");
}

const KEYED: &str = r#"
[[keys]]
key = "dk-team-key"
tenant = "acme"
"#;

#[tokio::test]
async fn gateway_keys_are_required_when_configured() {
    let up = mock().await;
    let gw = gateway(&format!("{}{KEYED}", one_route(up.addr(), "", ""))).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let resp = client().post(&url).json(&chat(false)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let resp = client()
        .post(&url)
        .bearer_auth("dk-wrong")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client()
        .post(&url)
        .bearer_auth("dk-team-key")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .post(&url)
        .header("x-api-key", "dk-team-key")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The client's key never goes upstream: detour sends its own.
    assert!(up
        .requests()
        .iter()
        .all(|r| r.headers.iter().all(|(_, v)| !v.contains("dk-team-key"))));
    // /v1/models needs a key too.
    let resp = client()
        .get(format!("{}/v1/models", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_in_openai_shape() {
    let up = mock().await;
    let gw = gateway(&one_route(up.addr(), "", "max_body_bytes = 2048")).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let c = client();

    let (s, v) = error_of(c.post(&url).body("{not json").send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));

    let (s, v) = error_of(
        c.post(&url)
            .json(&json!({"model": "fast"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("messages")));

    let (s, v) = error_of(
        c.post(&url)
            .json(&json!({"messages": [{"role": "user"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("model")));

    let wrong = json!({"model": "fast", "messages": [{"role": "user"}], "max_tokens": "ten"});
    let (s, v) = error_of(c.post(&url).json(&wrong).send().await.unwrap()).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("max_tokens")));

    let unknown = json!({"model": "slow", "messages": [{"role": "user"}]});
    let (s, v) = error_of(c.post(&url).json(&unknown).send().await.unwrap()).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("fast"),
        "{v}"
    );

    let big = json!({"model": "fast", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let (s, v) = error_of(c.post(&url).json(&big).send().await.unwrap()).await;
    assert_eq!(s, 413);
    assert!(v["error"]["message"].as_str().unwrap().contains("2048"));

    // Chunked, so no content-length to refuse early: the limit still holds.
    let stream =
        futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let (s, _) = error_of(
        c.post(&url)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 413);

    let (s, v) = error_of(
        c.get(format!("{}/v2/whatever", gw.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "unknown_url");
    let (s, _) = error_of(c.get(&url).send().await.unwrap()).await;
    assert_eq!(s, 404);

    assert!(
        up.requests().is_empty(),
        "bad input must not reach the provider"
    );
}

/// A fresh single-target gateway whose provider has `fault` on; returns the
/// answer to one chat request.
async fn one_request_with_fault(fault: Value) -> reqwest::Response {
    let up = mock().await;
    up.set_faults(faults(fault));
    let gw = gateway(&one_route(up.addr(), "", "")).await;
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(false))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn callers_upstream_4xx_is_relayed() {
    let resp = one_request_with_fault(json!({"error_rate": 1.0, "error_status": 400})).await;
    let (s, v) = error_of(resp).await;
    assert_eq!(s, 400);
    assert_eq!(
        v["error"]["type"], "invalid_request_error",
        "the provider's own error is relayed: {v}"
    );
}

#[tokio::test]
async fn provider_faults_are_mapped_for_a_single_target() {
    let resp = one_request_with_fault(json!({"error_rate": 1.0, "error_status": 500})).await;
    assert_eq!(resp.headers()["x-detour-provider"], "p");
    assert_eq!(resp.headers()["x-detour-tried"], "p/gpt-up=status_5xx");
    let (s, v) = error_of(resp).await;
    assert_eq!(s, 502);
    assert_eq!(v["error"]["code"], "upstream_server_error");

    let resp = one_request_with_fault(json!({"rate_limit_rate": 1.0, "retry_after_secs": 7})).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");

    let resp = one_request_with_fault(json!({"error_rate": 1.0, "error_status": 401})).await;
    let (s, v) = error_of(resp).await;
    assert_eq!(
        s, 502,
        "a provider rejecting detour's key is not the client's 401"
    );
    assert_eq!(v["error"]["code"], "upstream_credentials_rejected");

    let resp = one_request_with_fault(json!({"reset_rate": 1.0})).await;
    let (s, v) = error_of(resp).await;
    assert_eq!(s, 502);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`p`"),
        "{v}"
    );
}

#[tokio::test]
async fn a_dead_upstream_is_a_502_not_a_hang() {
    // A port with nothing listening.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = gateway(&one_route(addr, "", "")).await;
    let (s, v) = error_of(
        client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 502);
    assert_eq!(v["error"]["code"], "upstream_connect_error");
}

#[tokio::test]
async fn first_byte_timeout_is_a_504_that_names_it() {
    let up = mock().await;
    up.set_faults(faults(json!({"hang_rate": 1.0})));
    let gw = gateway(&one_route(
        up.addr(),
        r#"timeouts = { first_byte = "300ms" }"#,
        "",
    ))
    .await;
    let started = Instant::now();
    let (s, v) = error_of(
        client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 504);
    assert_eq!(v["error"]["code"], "upstream_first_byte_timeout");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("first_byte"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_stream_whose_first_event_never_comes_is_a_first_byte_504() {
    let up = mock().await;
    up.set_faults(faults(json!({"ttfb_ms": 5000})));
    let gw = gateway(&one_route(
        up.addr(),
        r#"timeouts = { first_byte = "300ms", idle = "10s" }"#,
        "",
    ))
    .await;
    let started = Instant::now();
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    // Nothing was sent before the first event, so the client gets a plain
    // error response, not a broken stream.
    let (s, v) = error_of(resp).await;
    assert_eq!(s, 504);
    assert_eq!(v["error"]["code"], "upstream_first_byte_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_idle_timeout_error_event() {
    let up = mock().await;
    up.set_faults(faults(json!({"chunks": 4, "chunk_gap_ms": 2000})));
    let gw = gateway(&one_route(
        up.addr(),
        r#"timeouts = { idle = "300ms" }"#,
        "",
    ))
    .await;
    let started = Instant::now();
    let text = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let data = sse_data(&text);
    // Every event is whole JSON, and the last one is the error.
    for d in &data {
        serde_json::from_str::<Value>(d).unwrap_or_else(|e| panic!("truncated event {d:?}: {e}"));
    }
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_idle_timeout");
    assert!(last["error"]["message"].as_str().unwrap().contains("idle"));
}

#[tokio::test]
async fn total_timeout_bounds_a_slow_stream() {
    let up = mock().await;
    up.set_faults(faults(json!({"chunks": 20, "chunk_gap_ms": 100})));
    let gw = gateway(&one_route(
        up.addr(),
        r#"timeouts = { total = "500ms", idle = "5s" }"#,
        "",
    ))
    .await;
    let text = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let last: Value = serde_json::from_str(sse_data(&text).last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_total_timeout", "{text}");
}

#[tokio::test]
async fn a_cut_stream_ends_with_a_well_formed_error() {
    let up = mock().await;
    up.set_faults(faults(json!({"chunks": 6, "cut_after_chunks": 2})));
    let gw = gateway(&one_route(up.addr(), "", "")).await;
    let text = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert!(!data.contains(&"[DONE]".to_owned()), "{text}");
    for d in &data {
        serde_json::from_str::<Value>(d).unwrap_or_else(|e| panic!("truncated event {d:?}: {e}"));
    }
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_transport_error", "{text}");
}
