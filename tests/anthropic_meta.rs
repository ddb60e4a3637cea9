//! Anthropic clients' metadata calls over loopback HTTP: `GET /v1/models`
//! in Anthropic's shape for Anthropic callers (filtered by the key's
//! models), and `POST /v1/messages/count_tokens` passed through to the
//! route's Anthropic target or estimated and marked so; and the official
//! `anthropic` Python SDK's `models.list()` and `messages.count_tokens()`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::*;
use detour::mock::{self, Flavor, MockOptions, MockServer};
use serde_json::{json, Value};

async fn upstream(flavor: Flavor) -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(flavor, listener, MockOptions::default())
        .await
        .unwrap()
}

/// Routes: `claude` → an Anthropic provider (after an OpenAI one, which
/// count_tokens skips), `gpt` → an OpenAI one, `down` → an Anthropic
/// provider nobody listens for, `claude-other` (another alias). Keys: `dk-all`, and
/// `dk-claude` that may call `claude*` only.
fn config(anthropic: SocketAddr, openai: SocketAddr, nobody: SocketAddr) -> String {
    format!(
        r#"
[[providers]]
name = "ant"
kind = "anthropic"
base_url = "http://{anthropic}/v1"
api_key = "sk-ant-upstream"

[[providers]]
name = "oai"
kind = "openai"
base_url = "http://{openai}/v1"
api_key = "sk-oai-upstream"

[[providers]]
name = "gone"
kind = "anthropic"
base_url = "http://{nobody}/v1"
connect_timeout = "500ms"

[[routes]]
model = "claude"
targets = [
  {{ provider = "oai", model = "gpt-first", priority = 1 }},
  {{ provider = "ant", model = "claude-sonnet-4-20250514", priority = 2 }},
]

[[routes]]
model = "gpt"
targets = [{{ provider = "oai", model = "gpt-4o" }}]

[[routes]]
model = "down"
targets = [{{ provider = "gone", model = "claude-x" }}]

[[routes]]
model = "claude-other"
targets = [{{ provider = "ant", model = "claude-3-5-haiku-20241022" }}]

[[keys]]
key = "dk-all"
tenant = "t"

[[keys]]
key = "dk-claude"
tenant = "t"
models = ["claude*"]
"#
    )
}

struct Setup {
    gw: detour::server::Running,
    anthropic: MockServer,
    openai: MockServer,
}

async fn setup() -> Setup {
    let anthropic = upstream(Flavor::Anthropic).await;
    let openai = upstream(Flavor::Openai).await;
    let nobody = common::serve::free_port();
    let gw = gateway(&config(anthropic.addr(), openai.addr(), nobody)).await;
    Setup {
        gw,
        anthropic,
        openai,
    }
}

fn anthropic_get(addr: SocketAddr, path: &str, key: &str) -> reqwest::RequestBuilder {
    client()
        .get(format!("http://{addr}{path}"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
}

fn ids(v: &Value) -> Vec<&str> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn anthropic_callers_get_anthropics_model_list_filtered_by_their_key() {
    let s = setup().await;
    let addr = s.gw.addr;
    let r = anthropic_get(addr, "/v1/models", "dk-all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(ids(&v), ["claude", "gpt", "down", "claude-other"]);
    assert_eq!(v["has_more"], false);
    assert_eq!(
        (v["first_id"].as_str(), v["last_id"].as_str()),
        (Some("claude"), Some("claude-other"))
    );
    let m = &v["data"][0];
    assert_eq!(
        (m["type"].as_str(), m["display_name"].as_str()),
        (Some("model"), Some("claude"))
    );
    assert!(m["created_at"].as_str().unwrap().ends_with('Z'), "{m}");
    assert!(v.get("object").is_none(), "not OpenAI's shape: {v}");

    // Only what the key may call.
    let v: Value = anthropic_get(addr, "/v1/models", "dk-claude")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&v), ["claude", "claude-other"]);

    // Pages, as Anthropic's list has them.
    let v: Value = anthropic_get(addr, "/v1/models?limit=1&after_id=claude", "dk-claude")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (ids(&v), &v["has_more"]),
        (vec!["claude-other"], &json!(false))
    );
    let r = anthropic_get(addr, "/v1/models?limit=0", "dk-all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "Anthropic's error shape: {v}");

    // `x-api-key` alone is Anthropic's way too.
    let v: Value = client()
        .get(format!("http://{addr}/v1/models"))
        .header("x-api-key", "dk-all")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["has_more"], false, "{v}");

    // `anthropic-version` with a bearer key (the SDK's `auth_token`).
    let v: Value = client()
        .get(format!("http://{addr}/v1/models"))
        .bearer_auth("dk-all")
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["has_more"], false, "{v}");

    // OpenAI's clients keep OpenAI's list.
    let v: Value = client()
        .get(format!("http://{addr}/v1/models"))
        .bearer_auth("dk-claude")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list", "{v}");
    assert_eq!(ids(&v), ["claude", "claude-other"]);

    // A wrong key is refused in the caller's format.
    let r = anthropic_get(addr, "/v1/models", "dk-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    assert_eq!(s.anthropic.stats().requests + s.openai.stats().requests, 0);
}

async fn count(addr: SocketAddr, key: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("http://{addr}/v1/messages/count_tokens"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

fn ask(model: &str) -> Value {
    // 400 bytes: Anthropic's mock counts 100 tokens, detour's estimate 101
    // (it counts the role too).
    json!({"model": model, "messages": [{"role": "user", "content": "x".repeat(400)}]})
}

#[tokio::test]
async fn count_tokens_goes_to_the_routes_anthropic_target_with_its_model() {
    let s = setup().await;
    let r = count(s.gw.addr, "dk-all", &ask("claude")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-detour-estimated").is_none());
    assert_eq!(r.headers()["x-detour-provider"], "ant");
    assert_eq!(r.headers()["x-detour-model"], "claude-sonnet-4-20250514");
    assert_eq!(r.headers()["x-detour-attempts"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"input_tokens": 100}), "the provider's count");
    let sent = s.anthropic.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/messages/count_tokens");
    assert_eq!(sent[0].body["model"], "claude-sonnet-4-20250514");
    assert!(sent[0]
        .headers
        .iter()
        .any(|(k, v)| k == "x-api-key" && v == "sk-ant-upstream"));
    // The OpenAI target first in the route's order was not asked.
    assert_eq!(s.openai.stats().requests, 0);

    // The caller's mistake is the provider's answer, as it wrote it.
    let r = count(s.gw.addr, "dk-all", &json!({"model": "claude"})).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
}

#[tokio::test]
async fn count_tokens_is_estimated_and_marked_without_an_anthropic_target() {
    let s = setup().await;
    for model in ["gpt", "down"] {
        let r = count(s.gw.addr, "dk-all", &ask(model)).await;
        assert_eq!(r.status(), 200, "{model}");
        assert_eq!(r.headers()["x-detour-estimated"], "true", "{model}");
        // `down`'s Anthropic target was tried, and failed: then the estimate.
        let tried = if model == "down" { "1" } else { "0" };
        assert_eq!(r.headers()["x-detour-attempts"], tried, "{model}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v, json!({"input_tokens": 101}), "{model}: the estimate");
    }
    assert_eq!(
        s.openai.stats().requests,
        0,
        "nothing sent to a provider that cannot count"
    );

    // An estimate still wants messages.
    let r = count(s.gw.addr, "dk-all", &json!({"model": "gpt"})).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
}

#[tokio::test]
async fn count_tokens_keeps_to_the_keys_models_and_known_routes() {
    let s = setup().await;
    let r = count(s.gw.addr, "dk-claude", &ask("gpt")).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    let r = count(s.gw.addr, "dk-all", &ask("nope")).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    let r = count(s.gw.addr, "dk-wrong", &ask("claude")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        s.anthropic.stats().requests + s.openai.stats().requests,
        0,
        "nothing reached a provider"
    );
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("DETOUR_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the SDKs: run scripts/test.sh, or create .venv with \
         `python3 -m venv .venv && .venv/bin/pip install -r tests/sdk/requirements.txt`"
    );
    venv
}

#[tokio::test]
async fn the_anthropic_sdk_lists_models_and_counts_tokens() {
    let s = setup().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/anthropic_meta.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(format!("http://{}", s.gw.addr))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.anthropic.stats().requests, 1, "one count passed through");
}
