//! `detour demo`: two mock providers and a gateway in one process, with a
//! config that needs no API keys.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config;
use crate::mock::{self, Flavor, MockOptions, MockServer};
use crate::state::Gateway;

/// The demo's config, for mocks at `primary` and `backup`.
pub fn config_text(listen: SocketAddr, primary: SocketAddr, backup: SocketAddr) -> String {
    format!(
        r#"# detour demo: two mock OpenAI-style providers, no keys needed.
[server]
listen = "{listen}"

[[providers]]
name = "primary"
kind = "openai"
base_url = "http://{primary}/v1"

[[providers]]
name = "backup"
kind = "openai-compatible"
base_url = "http://{backup}/v1"

[[routes]]
model = "demo"
targets = [
  {{ provider = "primary", model = "gpt-4o-mini" }},
  {{ provider = "backup", model = "local-llama" }},
]
timeouts = {{ first_byte = "5s", idle = "5s" }}
"#
    )
}

/// The demo's parts, running.
pub struct Demo {
    pub primary: MockServer,
    pub backup: MockServer,
    pub gateway: crate::server::Running,
}

pub async fn start(listen: SocketAddr) -> anyhow::Result<Demo> {
    let mock_opts = MockOptions {
        chunk_gap: std::time::Duration::from_millis(40),
        ..MockOptions::default()
    };
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let primary = mock::spawn(
        Flavor::Openai,
        TcpListener::bind(loopback).await?,
        mock_opts.clone(),
    )
    .await?;
    let backup = mock::spawn(
        Flavor::Openai,
        TcpListener::bind(loopback).await?,
        mock_opts,
    )
    .await?;
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen}: {e} (try --listen 127.0.0.1:0)")
    })?;
    let addr = listener.local_addr()?;
    let text = config_text(addr, primary.addr(), backup.addr());
    let cfg = config::load_str(&text, "demo.toml")?;
    let gw = Arc::new(Gateway::new(cfg)?);
    let gateway = crate::server::Running::start(gw, listener).await?;
    Ok(Demo {
        primary,
        backup,
        gateway,
    })
}

pub async fn run(listen: SocketAddr, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let demo = start(listen).await?;
    let url = demo.gateway.url();
    println!(
        r#"
detour demo is running.

  gateway        {url}
  primary mock   http://{primary}   (faults: http://{primary}/_mock/faults)
  backup mock    http://{backup}

Try it:

  curl -s {url}/v1/models
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"demo","messages":[{{"role":"user","content":"Hello"}}]}}'
  curl -sN {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"demo","stream":true,"messages":[{{"role":"user","content":"Hello"}}]}}'

  # or with the OpenAI SDK:
  python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="none"); print(c.chat.completions.create(model="demo", messages=[{{"role":"user","content":"Hi"}}]).choices[0].message.content)'

Break the primary and watch the answers (failover arrives with the resilience work):

  curl -s -X PUT http://{primary}/_mock/faults -d '{{"error_rate":1.0,"error_status":500}}'

Press Ctrl-C to stop.
"#,
        primary = demo.primary.addr(),
        backup = demo.backup.addr(),
    );
    shutdown.await;
    Ok(())
}
