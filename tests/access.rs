//! Per-key model access, trusted proxies, and the tenant in the request log
//! and metrics, over real loopback HTTP: `models` lists on keys and tenants
//! (aliases and globs, a key's list overriding its tenant's), refused with a
//! 403 in the client's format before any token is charged or anything
//! reaches a provider, `/v1/models` filtered; the failed-authentication
//! limit keyed by the address a trusted proxy forwarded; `tenant` on the
//! log line and on `detour_requests_total`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::serve::{free_port, Serve};
use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Four routes on one OpenAI mock, and `rest` (keys, tenants, server).
fn config(upstream: SocketAddr, server: &str, rest: &str) -> String {
    let routes: String = ["fast", "smart", "claude-3-haiku", "claude-3-opus"]
        .iter()
        .map(|m| {
            format!("[[routes]]\nmodel = \"{m}\"\ntargets = [{{ provider = \"p\", model = \"up-{m}\" }}]\n")
        })
        .collect();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server}

[[providers]]
name = "p"
kind = "openai"
base_url = "http://{upstream}/v1"

{routes}
{rest}
"#
    )
}

const KEYS: &str = r#"
[[tenants]]
name = "acme"
models = ["fast"]

# Inherits acme's list.
[[keys]]
key = "k-acme"
tenant = "acme"

# Its own list overrides acme's.
[[keys]]
key = "k-acme-claude"
tenant = "acme"
models = ["claude-*"]

# No list anywhere: every route.
[[keys]]
key = "k-free"
tenant = "free"

[[keys]]
key = "k-none"
tenant = "acme"
models = []
"#;

async fn openai(gw: &detour::server::Running, key: &str, model: &str) -> (u16, Value) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn anthropic(gw: &detour::server::Running, key: &str, model: &str) -> (u16, Value) {
    let body =
        json!({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});
    let resp = client()
        .post(format!("{}/v1/messages", gw.url()))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn models(gw: &detour::server::Running, key: &str) -> Vec<String> {
    let v: Value = client()
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The models the mock was asked for, in order.
fn upstream_models(up: &detour::mock::MockServer) -> Vec<String> {
    up.requests()
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn an_alias_outside_the_keys_list_is_refused_in_the_clients_format_before_the_provider() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "", KEYS)).await;

    let (status, _) = openai(&gw, "k-acme", "fast").await;
    assert_eq!(status, 200, "the tenant's list allows `fast`");

    let (status, v) = openai(&gw, "k-acme", "smart").await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "model_not_allowed", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["param"], "model", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("`smart`"), "names the model: {message}");
    assert!(!message.contains("k-acme"), "never the key: {message}");

    let (status, v) = anthropic(&gw, "k-acme", "claude-3-opus").await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`claude-3-opus`"),
        "{v}"
    );
    let (status, _) = anthropic(&gw, "k-acme", "fast").await;
    assert_eq!(status, 200);

    assert_eq!(
        upstream_models(&up),
        ["up-fast", "up-fast"],
        "refused requests never reach the provider"
    );
}

#[tokio::test]
async fn globs_match_and_a_keys_own_list_overrides_its_tenants() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "", KEYS)).await;

    // k-acme-claude: its own ["claude-*"], not acme's ["fast"].
    assert_eq!(openai(&gw, "k-acme-claude", "claude-3-haiku").await.0, 200);
    assert_eq!(
        anthropic(&gw, "k-acme-claude", "claude-3-opus").await.0,
        200
    );
    assert_eq!(openai(&gw, "k-acme-claude", "fast").await.0, 403);
    // The tenant's other key keeps the tenant's list.
    assert_eq!(openai(&gw, "k-acme", "claude-3-haiku").await.0, 403);
    // No list on the key or its tenant: everything, as before.
    for model in ["fast", "smart", "claude-3-opus"] {
        assert_eq!(openai(&gw, "k-free", model).await.0, 200, "{model}");
    }
    // An empty list allows nothing.
    assert_eq!(openai(&gw, "k-none", "fast").await.0, 403);

    // An alias that names no route: 403 if the list does not allow it (so a
    // key cannot probe which routes exist), 404 listing only what the key
    // may call if it does.
    let (status, v) = openai(&gw, "k-acme-claude", "gpt-9").await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = openai(&gw, "k-acme-claude", "claude-9").await;
    assert_eq!(status, 404, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("claude-3-haiku, claude-3-opus") && !message.contains("fast"),
        "{message}"
    );

    assert_eq!(
        upstream_models(&up),
        [
            "up-claude-3-haiku",
            "up-claude-3-opus",
            "up-fast",
            "up-smart",
            "up-claude-3-opus"
        ]
    );
}

#[tokio::test]
async fn the_model_list_shows_only_what_the_key_may_call() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "", KEYS)).await;
    assert_eq!(models(&gw, "k-acme").await, ["fast"]);
    assert_eq!(
        models(&gw, "k-acme-claude").await,
        ["claude-3-haiku", "claude-3-opus"]
    );
    assert_eq!(models(&gw, "k-free").await.len(), 4);
    assert!(models(&gw, "k-none").await.is_empty());
}

/// A refused model costs no tokens: the key's allowance is whole for the
/// model it may call.
#[tokio::test]
async fn a_refused_model_is_not_charged_to_the_token_limit() {
    let up = mock().await;
    // One request's estimate (its body / 4 + 256 answer tokens) fits, two
    // do not: were refused requests charged, the second would be a 429.
    let keys = "[[keys]]\nkey = \"k\"\ntenant = \"t\"\ntpm = 300\nmodels = [\"fast\"]\n";
    let gw = gateway(&config(up.addr(), "", keys)).await;
    for _ in 0..5 {
        assert_eq!(openai(&gw, "k", "smart").await.0, 403);
    }
    let (status, v) = openai(&gw, "k", "fast").await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn a_reload_applies_new_lists() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "", KEYS)).await;
    assert_eq!(openai(&gw, "k-acme", "smart").await.0, 403);
    let widened = KEYS.replace("models = [\"fast\"]", "models = [\"fast\", \"smart\"]");
    let status = detour::reload::apply_text(
        &gw.gateway,
        &config(up.addr(), "", &widened),
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    assert_eq!(
        status.outcome,
        detour::reload::Outcome::Applied,
        "{status:?}"
    );
    assert_eq!(openai(&gw, "k-acme", "smart").await.0, 200);
    assert_eq!(models(&gw, "k-acme").await, ["fast", "smart"]);
}

async fn with_forwarded(
    gw: &detour::server::Running,
    key: &str,
    forwarded_for: Option<&str>,
) -> u16 {
    let mut req = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(key)
        .json(&chat(false));
    if let Some(xff) = forwarded_for {
        req = req.header("x-forwarded-for", xff);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn failed_auth_is_limited_per_forwarded_client_behind_a_trusted_proxy() {
    let up = mock().await;
    let keys = "[[keys]]\nkey = \"good\"\ntenant = \"t\"\n";
    let server = "auth_failures_per_minute = 2\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]";
    let gw = gateway(&config(up.addr(), server, keys)).await;

    let client_a = Some("198.51.100.1");
    assert_eq!(with_forwarded(&gw, "bad", client_a).await, 401);
    assert_eq!(with_forwarded(&gw, "bad", client_a).await, 401);
    assert_eq!(with_forwarded(&gw, "bad", client_a).await, 429);
    assert_eq!(
        with_forwarded(&gw, "good", client_a).await,
        429,
        "the forwarded client is blocked, even with a good key"
    );
    // A client cannot hide behind a made-up address: the proxy appended its
    // real one, and every hop to the right of it is trusted.
    let spoofed = Some("203.0.113.77, 198.51.100.1, 10.0.0.5");
    assert_eq!(with_forwarded(&gw, "good", spoofed).await, 429);
    // Other clients of the same proxy, and the proxy itself, are not.
    assert_eq!(with_forwarded(&gw, "good", Some("198.51.100.2")).await, 200);
    assert_eq!(with_forwarded(&gw, "good", None).await, 200);
    // A malformed header counts against the peer (the proxy).
    assert_eq!(with_forwarded(&gw, "bad", Some("not-an-ip")).await, 401);
    assert_eq!(with_forwarded(&gw, "bad", Some("not-an-ip")).await, 401);
    assert_eq!(with_forwarded(&gw, "good", None).await, 429);
    assert_eq!(with_forwarded(&gw, "good", Some("198.51.100.3")).await, 200);
}

#[tokio::test]
async fn without_trusted_proxies_the_forwarded_header_is_ignored() {
    let up = mock().await;
    let keys = "[[keys]]\nkey = \"good\"\ntenant = \"t\"\n";
    // Loopback is not trusted here: the peer is the client.
    let server = "auth_failures_per_minute = 2\ntrusted_proxies = [\"10.0.0.0/8\"]";
    let gw = gateway(&config(up.addr(), server, keys)).await;
    assert_eq!(with_forwarded(&gw, "bad", Some("198.51.100.1")).await, 401);
    assert_eq!(with_forwarded(&gw, "bad", Some("198.51.100.2")).await, 401);
    assert_eq!(
        with_forwarded(&gw, "good", Some("198.51.100.3")).await,
        429,
        "keyed by the peer, whatever the header says"
    );
}

#[tokio::test]
async fn the_tenant_labels_the_request_metrics() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "", KEYS)).await;
    let admin = admin(&gw, "t0k").await;
    let scrape = || async {
        client()
            .get(format!("{admin}/metrics"))
            .bearer_auth("t0k")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // The first scrape installs the process's recorder.
    scrape().await;
    assert_eq!(openai(&gw, "k-acme", "fast").await.0, 200);
    assert_eq!(openai(&gw, "k-acme", "smart").await.0, 403);
    assert_eq!(openai(&gw, "k-free", "fast").await.0, 200);
    assert_eq!(openai(&gw, "wrong-key", "fast").await.0, 401);
    let expected = [
        r#"detour_requests_total{route="fast",provider="p",status="200",format="openai",tenant="acme"} 1"#,
        r#"detour_requests_total{route="smart",provider="none",status="403",format="openai",tenant="acme"} 1"#,
        r#"detour_requests_total{route="fast",provider="p",status="200",format="openai",tenant="free"} 1"#,
        r#"detour_requests_total{route="none",provider="none",status="401",format="openai",tenant=""} 1"#,
    ];
    // A request is counted when its body ends, a moment after the client has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = scrape().await;
        if expected.iter().all(|s| text.lines().any(|l| l == *s)) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "missing some of {expected:#?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        text.contains(r#"detour_tokens_total{provider="p",kind="prompt",tenant="acme"}"#),
        "{text}"
    );
    assert!(!text.contains("k-acme"), "never the key");
}

#[tokio::test]
async fn the_request_log_line_names_the_tenant_never_the_key() {
    let up = mock().await;
    let listen = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("detour.toml");
    let text = config(up.addr(), "", KEYS).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{listen}\""),
    );
    std::fs::write(&path, text).unwrap();
    let serve = Serve::start(&path, &[]);
    serve.wait_ready(listen).await;

    let call = |id: &'static str, key: &'static str, model: &'static str| async move {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let resp = client()
            .post(format!("http://{listen}/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-request-id", id)
            .json(&body)
            .send()
            .await
            .unwrap();
        resp.status().as_u16()
    };
    assert_eq!(call("req-1", "k-acme", "fast").await, 200);
    assert_eq!(call("req-2", "k-acme", "smart").await, 403);
    assert_eq!(call("req-3", "nobody", "fast").await, 401);

    let line_of = |id: &str| -> Option<Value> {
        serve.log().lines().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["message"] == "request" && v["request_id"] == id).then_some(v)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let ids = ["req-1", "req-2", "req-3"];
    while ids.iter().any(|id| line_of(id).is_none()) {
        assert!(Instant::now() < deadline, "no log lines:\n{}", serve.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ok = line_of("req-1").unwrap();
    assert_eq!(ok["tenant"], "acme", "{ok}");
    let refused = line_of("req-2").unwrap();
    assert_eq!(
        (&refused["tenant"], &refused["status"], &refused["route"]),
        (&json!("acme"), &json!(403), &json!("smart")),
        "{refused}"
    );
    let unknown = line_of("req-3").unwrap();
    assert!(
        unknown.get("tenant").is_none(),
        "no tenant before authentication: {unknown}"
    );
    let log = serve.log();
    assert!(!log.contains("k-acme"), "the key never shows:\n{log}");
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"k-acme"))
    };
    assert!(!log.contains(&digest), "nor its digest:\n{log}");
}

#[test]
fn check_warns_about_entries_that_match_no_route_and_empty_lists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("detour.toml");
    let rest = "[[tenants]]\nname = \"acme\"\nmodels = [\"fast\", \"gemini-*\"]\n\
                [[keys]]\nkey = \"k\"\ntenant = \"acme\"\nmodels = []\n";
    std::fs::write(&path, config("127.0.0.1:1".parse().unwrap(), "", rest)).unwrap();
    let out = std::process::Command::new(common::serve::BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "warnings do not refuse:\n{stdout}");
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 2, "{stdout}");
    assert!(
        warnings[0].contains("keys[0].models: an empty list allows no model"),
        "{stdout}"
    );
    assert!(
        warnings[1].contains("tenants[0].models[1]: `gemini-*` matches no route"),
        "{stdout}"
    );
    assert!(stdout.contains(": ok ("), "{stdout}");

    // A bad trusted proxy is an error, with its line.
    std::fs::write(
        &path,
        config(
            "127.0.0.1:1".parse().unwrap(),
            "trusted_proxies = [\"10.0.0.0/8\", \"proxy.internal\"]",
            "",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::serve::BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "server.trusted_proxies[1]: `proxy.internal` is not an IP address or a CIDR network"
        ),
        "{stderr}"
    );
}
