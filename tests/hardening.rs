//! Hardening (issue 9): what clients and operators see, and what the gateway
//! refuses to pass on. Real loopback HTTP against `detour mock`.
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

/// A loopback port nothing listens on.
fn closed_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn a_client_error_names_the_provider_never_a_url_or_its_secrets() {
    let dead = closed_port();
    let config = format!(
        r#"
[[providers]]
name = "azure-east"
kind = "openai"
base_url = "http://user:pw-SECRET-1@{dead}/v1?api-version=2024&token=tok-SECRET-2"

[[routes]]
model = "fast"
targets = [{{ provider = "azure-east", model = "m" }}]
"#
    );
    let gw = gateway(&config).await;
    for stream in [false, true] {
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502);
        let text = resp.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "upstream_connect_error", "{text}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("azure-east"), "names the provider: {text}");
        for leak in [
            "SECRET",
            "127.0.0.1",
            &dead.port().to_string(),
            "http://",
            "error sending request",
            "api-version",
        ] {
            assert!(!text.contains(leak), "{leak} leaked to the client: {text}");
        }
    }
}

#[tokio::test]
async fn the_admin_config_view_masks_base_url_passwords_and_query_values() {
    let config = r#"
[[providers]]
name = "azure"
kind = "openai"
base_url = "https://user:pw-SECRET-1@example.com/openai?api-version=2024-06-01&key=k-SECRET-2"

[[providers]]
name = "plain"
kind = "openai"
base_url = "https://api.openai.com/v1"

[[routes]]
model = "fast"
targets = [{ provider = "azure", model = "m" }, { provider = "plain", model = "m" }]
"#;
    let gw = gateway(config).await;
    let base = admin(&gw, "t0ken").await;
    let view: Value = client()
        .get(format!("{base}/admin/config"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = view.to_string();
    assert!(!text.contains("SECRET"), "{text}");
    assert_eq!(
        view["providers"][0]["base_url"],
        "https://user:***@example.com/openai?api-version=***&key=***"
    );
    assert_eq!(
        view["providers"][1]["base_url"],
        "https://api.openai.com/v1"
    );
}

/// `base_url` with a query (Azure's `?api-version=`): every provider kind
/// joins its path before the query and keeps it; Gemini merges its `alt=sse`.
#[tokio::test]
async fn a_base_url_query_is_kept_by_every_provider_kind() {
    let openai = upstream(Flavor::Openai).await;
    let compatible = upstream(Flavor::Openai).await;
    let claude = upstream(Flavor::Anthropic).await;
    let gem = upstream(Flavor::Gemini).await;
    let config = format!(
        r#"
[[providers]]
name = "openai"
kind = "openai"
base_url = "http://{}/v1?api-version=x"

[[providers]]
name = "compatible"
kind = "openai-compatible"
base_url = "http://{}/v1/?api-version=x"

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "http://{}/v1?api-version=x"

[[providers]]
name = "gemini"
kind = "gemini"
base_url = "http://{}/v1beta?api-version=x"

[[routes]]
model = "openai"
targets = [{{ provider = "openai", model = "m" }}]

[[routes]]
model = "compatible"
targets = [{{ provider = "compatible", model = "m" }}]

[[routes]]
model = "claude"
targets = [{{ provider = "claude", model = "m" }}]

[[routes]]
model = "gemini"
targets = [{{ provider = "gemini", model = "gem" }}]
"#,
        openai.addr(),
        compatible.addr(),
        claude.addr(),
        gem.addr()
    );
    let gw = gateway(&config).await;
    for model in ["openai", "compatible", "claude", "gemini"] {
        for stream in [false, true] {
            let mut body = chat(stream);
            body["model"] = json!(model);
            let resp = client()
                .post(format!("{}/v1/chat/completions", gw.url()))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert_eq!(status, 200, "{model} stream={stream}: {text}");
        }
    }
    let embed = client()
        .post(format!("{}/v1/embeddings", gw.url()))
        .json(&json!({"model": "openai", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(embed.status(), 200);
    let paths =
        |m: &MockServer| -> Vec<String> { m.requests().iter().map(|r| r.path.clone()).collect() };
    assert_eq!(
        paths(&openai),
        [
            "/v1/chat/completions?api-version=x",
            "/v1/chat/completions?api-version=x",
            "/v1/embeddings?api-version=x"
        ]
    );
    assert_eq!(
        paths(&compatible),
        ["/v1/chat/completions?api-version=x"; 2]
    );
    assert_eq!(paths(&claude), ["/v1/messages?api-version=x"; 2]);
    assert_eq!(
        paths(&gem),
        [
            "/v1beta/models/gem:generateContent?api-version=x",
            "/v1beta/models/gem:streamGenerateContent?api-version=x&alt=sse"
        ]
    );
}

/// Bodies that are not valid JSON are refused with a 400 in OpenAI's shape,
/// even where the fields the gateway reads are fine, and never forwarded.
#[tokio::test]
async fn bodies_that_are_not_valid_json_get_a_400_and_are_not_forwarded() {
    let up = mock().await;
    let gw = gateway(&one_route(up.addr(), "", "")).await;
    let prefix = br#"{"model":"fast","messages":[{"role":"user","content":"hi"}],"x_extra":"#;
    let mut bad_utf8 = prefix.to_vec();
    bad_utf8.extend_from_slice(b"\"caf\xff\"}");
    let mut deep = prefix.to_vec();
    deep.extend(std::iter::repeat_n(b'[', 100_000));
    deep.extend(std::iter::repeat_n(b']', 100_000));
    deep.push(b'}');
    let mut bad_utf8_key =
        br#"{"model":"fast","messages":[{"role":"user","content":"hi"}],""#.to_vec();
    bad_utf8_key.extend_from_slice(b"k\xc3\x28\":1}");
    let mut deep_in_message =
        br#"{"model":"fast","messages":[{"role":"user","content":"hi","x":"#.to_vec();
    deep_in_message.extend(br#"{"a":"#.repeat(200));
    deep_in_message.push(b'1');
    deep_in_message.extend(std::iter::repeat_n(b'}', 200));
    deep_in_message.extend_from_slice(b"}]}");
    for (what, path, body) in [
        (
            "invalid UTF-8 in an unknown string",
            "chat/completions",
            bad_utf8.clone(),
        ),
        ("100,000 levels of nesting", "chat/completions", deep),
        (
            "invalid UTF-8 in an unknown key",
            "chat/completions",
            bad_utf8_key,
        ),
        (
            "200 levels inside a message",
            "chat/completions",
            deep_in_message,
        ),
        ("invalid UTF-8 in an embeddings body", "embeddings", {
            let mut b = br#"{"model":"fast","input":"x","user":""#.to_vec();
            b.extend_from_slice(b"\xfe\"}");
            b
        }),
    ] {
        let resp = client()
            .post(format!("{}/v1/{path}", gw.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 400, "{what}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["error"]["type"], "invalid_request_error",
            "{what}: {text}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not valid JSON"),
            "{what}: {text}"
        );
    }
    assert_eq!(up.stats().requests, 0, "nothing invalid was forwarded");
    // Valid bodies, unknown fields and escapes included, still pass.
    let ok = br#"{"model":"fast","messages":[{"role":"user","content":"caf\u00e9 \ud83d\ude00"}],"x_extra":{"a":[1,2.5e3,null,true,"\u0000"]}}"#;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .header("content-type", "application/json")
        .body(ok.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.stats().requests, 1);
}

#[tokio::test]
async fn a_basic_authorization_beside_a_valid_x_api_key_is_let_in() {
    let up = mock().await;
    let keys = "[[keys]]\nkey = \"dk-good\"\ntenant = \"t\"\n";
    let gw = gateway(&format!("{}\n{keys}", one_route(up.addr(), "", ""))).await;
    let ask = |auth: Option<&'static str>, x_api_key: Option<&'static str>| {
        let mut req = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(k) = x_api_key {
            req = req.header("x-api-key", k);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // A proxy or SDK adds its own Basic credentials; the gateway key is in x-api-key.
    assert_eq!(ask(Some("Basic dXNlcjpwYXNz"), Some("dk-good")).await, 200);
    assert_eq!(ask(Some("Bearer dk-good"), None).await, 200);
    assert_eq!(ask(None, Some("dk-good")).await, 200);
    // A Bearer key is the one presented: a wrong one is not rescued by x-api-key.
    assert_eq!(ask(Some("Bearer dk-bad"), Some("dk-good")).await, 401);
    assert_eq!(ask(Some("Basic dXNlcjpwYXNz"), Some("dk-bad")).await, 401);
    assert_eq!(ask(Some("Basic dXNlcjpwYXNz"), None).await, 401);
}

/// What the log gets for a failed connection: the detail, with the URL's
/// password and query values masked (host and port stay: operators need them).
#[tokio::test]
async fn the_logged_detail_of_a_failed_connection_masks_the_urls_secrets() {
    let dead = closed_port();
    let base = format!("http://user:pw-SECRET-1@{dead}/v1?api-version=2024&token=tok-SECRET-2");
    let config = format!(
        "[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"{base}\"\n\
         [[routes]]\nmodel = \"fast\"\ntargets = [{{ provider = \"p\", model = \"m\" }}]\n"
    );
    let cfg = detour::config::load_str(&config, "t.toml").unwrap();
    let upstream = detour::upstream::Upstream::new(&cfg.providers[0]).unwrap();
    let headers = http::HeaderMap::new();
    let req = detour::upstream::UpstreamRequest {
        uri: std::borrow::Cow::Owned(format!("{base}/chat/completions").parse().unwrap()),
        headers: &headers,
        body: Default::default(),
    };
    let timeouts = cfg.routes[0].timeouts;
    let err = upstream
        .send(req, &timeouts, tokio::time::Instant::now())
        .await
        .unwrap_err();
    let detour::upstream::UpstreamError::Connect { detail, .. } = &err else {
        panic!("a refused connection: {err:?}");
    };
    assert!(!detail.contains("SECRET"), "{detail}");
    assert!(
        detail.contains(&format!("{dead}")) && detail.contains("api-version=***&token=***"),
        "the log names where the request went: {detail}"
    );
}

/// A status page that cannot be fetched is reported in `/admin/health`, but
/// never with its URL: a token in the page's query stays out of it.
#[tokio::test]
async fn a_failing_status_page_is_reported_without_its_urls_secrets() {
    let dead = closed_port();
    let config = format!(
        r#"
[[providers]]
name = "p"
kind = "openai"
base_url = "http://{dead}/v1"
status_page = "http://{dead}/api/v2/summary.json?token=tok-SECRET-3"
status_poll = "100ms"

[[routes]]
model = "fast"
targets = [{{ provider = "p", model = "m" }}]
"#
    );
    let gw = gateway(&config).await;
    let base = admin(&gw, "t0ken").await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let error = loop {
        let health: Value = client()
            .get(format!("{base}/admin/health"))
            .bearer_auth("t0ken")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let error = &health["providers"][0]["status_page_error"];
        if let Some(e) = error.as_str() {
            break e.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failing page was never reported: {health}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(error.contains("fetching the page failed"), "{error}");
    for leak in ["SECRET", "token", &dead.to_string()] {
        assert!(!error.contains(leak), "{leak} leaked: {error}");
    }
}
