//! Upstream TLS: a provider behind a TLS server with its own CA, trusted
//! through the operating system's store (`SSL_CERT_FILE`), reached over
//! HTTP/2 chosen by ALPN; and refused, never used, when nothing vouches for
//! its certificate. One TLS config serves every provider.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::serve::{free_port, Serve};
use common::*;

fn config(listen: std::net::SocketAddr, upstream: std::net::SocketAddr) -> String {
    format!(
        r#"[server]
listen = "{listen}"

[[providers]]
name = "internal"
kind = "openai-compatible"
base_url = "https://localhost:{port}/v1"

[[routes]]
model = "fast"
targets = [{{ provider = "internal", model = "m" }}]
retries = {{ max_attempts = 1 }}
"#,
        port = upstream.port()
    )
}

async fn ask(listen: std::net::SocketAddr) -> reqwest::Response {
    client()
        .post(format!("http://{listen}/v1/chat/completions"))
        .json(&chat(false))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_provider_with_an_internal_ca_is_reached_over_http2_when_the_system_trusts_it() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = common::tls::certificates(dir.path());
    let upstream = mock().await;
    let (front, mut handshakes) = common::tls::front(&cert, &key, upstream.addr()).await;
    let listen = free_port();
    let path = dir.path().join("detour.toml");
    std::fs::write(&path, config(listen, front)).unwrap();

    let trusted = Serve::start_with_env(&path, &[], &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    trusted.wait_ready(listen).await;
    let r = ask(listen).await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}\n{}", trusted.log());
    assert!(body.contains("\"choices\""), "{body}");
    let alpn = tokio::time::timeout(Duration::from_secs(1), handshakes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(alpn, "h2", "HTTP/2, chosen by ALPN");
    assert_eq!(upstream.stats().requests, 1);
    drop(trusted);

    // Nothing vouches for the certificate: the provider is never used.
    let untrusted = Serve::start(&path, &[]);
    untrusted.wait_ready(listen).await;
    let r = ask(listen).await;
    assert!(r.status().is_server_error(), "{}", r.status());
    assert_eq!(upstream.stats().requests, 1, "no request got through");
}
