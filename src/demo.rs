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
breaker = {{ consecutive_failures = 3, open_for = "2s", slow_start = "8s" }}
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
    tokio::spawn(crate::status_pages::keep_polling(Arc::clone(&gw)));
    let gateway =
        crate::server::Running::start(gw, listener, crate::public_status::routes()).await?;
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
  curl -si {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"demo","messages":[{{"role":"user","content":"Hello"}}]}}'
  curl -sN {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"demo","stream":true,"messages":[{{"role":"user","content":"Hello"}}]}}'

  # or with the OpenAI SDK:
  python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="none"); print(c.chat.completions.create(model="demo", messages=[{{"role":"user","content":"Hi"}}]).choices[0].message.content)'

  # break the primary yourself, and mend it:
  curl -s -X PUT http://{primary}/_mock/faults -d '{{"error_rate":1.0,"error_status":500}}'
  curl -s -X DELETE http://{primary}/_mock/faults

Below, a request every half second, and a scripted outage of the primary
every 30 seconds. Watch traffic move to the backup and come back.
Press Ctrl-C to stop.
"#,
        primary = demo.primary.addr(),
        backup = demo.backup.addr(),
    );
    tokio::select! {
        () = shutdown => {}
        () = show_failover(&demo) => {}
    }
    Ok(())
}

/// Sends a request every half second and prints who served it, while the
/// primary goes through a scripted outage: healthy 8 s, failing 12 s,
/// recovering (slow start) 10 s.
async fn show_failover(demo: &Demo) {
    let client = match reqwest::Client::builder().no_proxy().build() {
        Ok(c) => c,
        Err(_) => return std::future::pending().await,
    };
    let url = format!("{}/v1/chat/completions", demo.gateway.url());
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"Hello"}]}"#;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    for n in 0u64.. {
        tick.tick().await;
        match n % 60 {
            16 => {
                demo.primary.set_faults(outage());
                println!("--- outage: the primary now answers every request with 500 ---");
            }
            40 => {
                demo.primary.set_faults(mock::Faults::default());
                println!("--- the primary has recovered; detour probes it, then ramps its share back up ---");
            }
            _ => {}
        }
        let started = tokio::time::Instant::now();
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        match sent {
            Ok(resp) => {
                let h = resp.headers();
                let get = |k: &str| {
                    h.get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned()
                };
                let tried = h
                    .get("x-detour-tried")
                    .and_then(|v| v.to_str().ok())
                    .map(|t| format!("  (failed over from {t})"))
                    .unwrap_or_default();
                println!(
                    "request {n:>4}: {} from {:<8} attempts {} {ms:>6.1} ms{tried}",
                    resp.status().as_u16(),
                    get("x-detour-provider"),
                    get("x-detour-attempts"),
                );
            }
            Err(e) => println!("request {n:>4}: failed: {e}"),
        }
    }
}

fn outage() -> mock::Faults {
    mock::Faults {
        error_rate: 1.0,
        error_status: 500,
        ..mock::Faults::default()
    }
}
