//! Shared test harness: real mock providers and a real gateway on loopback
//! port 0, configured from TOML text exactly as a user would write it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod redis;
pub mod sdk;
pub mod serve;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use detour::mock::{self, Faults, Flavor, MockOptions, MockServer};
use detour::server::Running;
use detour::state::Gateway;
use tokio::net::TcpListener;

pub async fn mock_with(opts: MockOptions) -> MockServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(Flavor::Openai, listener, opts).await.unwrap()
}

pub async fn mock() -> MockServer {
    mock_with(MockOptions::default()).await
}

pub async fn gateway(config: &str) -> Running {
    let cfg = detour::config::load_str(config, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    let gw = Arc::new(Gateway::new(cfg).unwrap());
    tokio::spawn(detour::status_pages::keep_polling(Arc::clone(&gw)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Running::start(gw, listener, detour::public_status::routes())
        .await
        .unwrap()
}

/// One provider `p` of kind openai at `upstream`, route `fast` → `gpt-up`.
pub fn one_route(upstream: SocketAddr, extra_route: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{extra}

[[providers]]
name = "p"
kind = "openai"
base_url = "http://{upstream}/v1"
api_key = "sk-upstream-secret"

[[routes]]
model = "fast"
targets = [{{ provider = "p", model = "gpt-up" }}]
{extra_route}
"#
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub fn chat(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "fast",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
    })
}

pub fn faults(f: serde_json::Value) -> Faults {
    serde_json::from_value(f).unwrap()
}

/// Data payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// Serves the admin API of `gw` on a loopback port; returns its base URL.
pub async fn admin(gw: &Running, token: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reloader = detour::reload::Reloader::new(Arc::clone(&gw.gateway));
    let router = detour::admin::router(reloader, Some(token.to_owned()));
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}
