//! Translation over real loopback HTTP: any client format served by any
//! provider kind, failover across kinds, and what cannot be translated.
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

/// Route `fast` → one provider of `kind` at `up` (under `path`), model `model`;
/// `extra` follows the provider's lines (an `api_key` line, `[[keys]]`...).
fn one_provider(up: &MockServer, kind: &str, path: &str, model: &str, extra: &str) -> String {
    format!(
        "[[providers]]\nname = \"p\"\nkind = \"{kind}\"\nbase_url = \"http://{}{path}\"\n{extra}\n\
         [[routes]]\nmodel = \"fast\"\ntargets = [{{ provider = \"p\", model = \"{model}\" }}]\n",
        up.addr()
    )
}

/// Route `fast`: an OpenAI-kind `primary`, then an Anthropic-kind `claude`.
fn cross_kind(primary: &MockServer, claude: &MockServer) -> String {
    format!(
        r#"
[[providers]]
name = "primary"
kind = "openai"
base_url = "http://{}/v1"

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "http://{}/v1"
default_max_tokens = 777

[[routes]]
model = "fast"
targets = [
  {{ provider = "primary", model = "gpt-a" }},
  {{ provider = "claude", model = "claude-b" }},
]
"#,
        primary.addr(),
        claude.addr()
    )
}

#[tokio::test]
async fn an_openai_client_fails_over_to_claude_without_noticing() {
    let (primary, claude) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Anthropic).await,
    );
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 503})));
    let gw = gateway(&cross_kind(&primary, &claude)).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-provider"], "claude");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("claude-b"));
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    // The upstream got a real Messages request, with the default max_tokens.
    let sent = &claude.requests()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.body["model"], "claude-b");
    assert_eq!(sent.body["max_tokens"], 777);
    let has = |k: &str| sent.headers.iter().any(|(name, _)| name == k);
    assert!(has("anthropic-version") && !has("x-api-key"));
}

#[tokio::test]
async fn streams_are_translated_event_by_event() {
    let (primary, claude) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Anthropic).await,
    );
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let gw = gateway(&cross_kind(&primary, &claude)).await;
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let text = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]", "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{text}"
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert!(content.contains("claude-b"), "{content}");
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{text}"
    );
}

#[tokio::test]
async fn a_translated_stream_that_breaks_ends_with_an_error_in_the_clients_format() {
    let claude = upstream(Flavor::Anthropic).await;
    claude.set_faults(faults(json!({"stream_error_after_chunks": 2})));
    let config = one_provider(&claude, "anthropic", "/v1", "c", "");
    let gw = gateway(&config).await;
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
    for d in &data {
        serde_json::from_str::<Value>(d).unwrap_or_else(|e| panic!("not whole JSON {d:?}: {e}"));
    }
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert!(last["error"]["message"].is_string(), "{text}");
}

#[tokio::test]
async fn anthropic_clients_get_anthropic_shaped_errors() {
    let claude = upstream(Flavor::Anthropic).await;
    let config = one_provider(
        &claude,
        "anthropic",
        "/v1",
        "c",
        "\n[[keys]]\nkey = \"dk\"\ntenant = \"t\"",
    );
    let gw = gateway(&config).await;
    let url = format!("{}/v1/messages", gw.url());
    let resp = client().post(&url).json(&json!({})).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("authentication_error"))
    );

    let resp = client()
        .post(&url)
        .header("x-api-key", "dk")
        .json(&json!({"model": "fast", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{v}"
    );
}

#[tokio::test]
async fn what_cannot_be_translated_is_a_400_naming_feature_and_target() {
    let claude = upstream(Flavor::Anthropic).await;
    let config = one_provider(&claude, "anthropic", "/v1", "c", "");
    let gw = gateway(&config).await;
    let mut body = chat(false);
    body["n"] = json!(3);
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("n > 1") && msg.contains("Anthropic"), "{msg}");
    assert_eq!(v["error"]["code"], "untranslatable");
    assert!(claude.requests().is_empty(), "nothing mangled was sent");
}

#[tokio::test]
async fn a_gemini_provider_gets_the_model_in_its_url() {
    let gem = upstream(Flavor::Gemini).await;
    let config = one_provider(&gem, "gemini", "/v1beta", "gemini-x", "api_key = \"gk\"\n");
    let gw = gateway(&config).await;
    for stream in [false, true] {
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("gemini-x"));
    }
    let paths: Vec<String> = gem.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        vec![
            "/v1beta/models/gemini-x:generateContent".to_owned(),
            "/v1beta/models/gemini-x:streamGenerateContent?alt=sse".to_owned()
        ]
    );
    let key = gem.requests()[0]
        .headers
        .iter()
        .find(|(k, _)| k == "x-goog-api-key")
        .cloned();
    assert_eq!(key.map(|(_, v)| v).as_deref(), Some("gk"));
}

#[tokio::test]
async fn geminis_retry_info_becomes_retry_after_and_a_cool_down() {
    let gem = upstream(Flavor::Gemini).await;
    gem.set_faults(faults(
        json!({"rate_limit_rate": 1.0, "retry_after_secs": 3}),
    ));
    let alone = one_provider(&gem, "gemini", "/v1beta", "gemini-x", "");
    let gw = gateway(&alone).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(
        resp.headers()["retry-after"],
        "3",
        "from the body's RetryInfo"
    );
    // And the target cools down: the next request does not reach it.
    let before = gem.stats().requests;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(gem.stats().requests, before);
}
