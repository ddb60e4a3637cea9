//! `detour serve` runs client connections on worker threads, one runtime each
//! (`server.worker_threads`), and each worker keeps its own upstream pool: a
//! connection's requests never hop to another thread's upstream connection.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::serve::{free_port, Serve};
use tokio::net::TcpListener;

/// A TCP relay in front of `to` that counts the connections it accepts.
async fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (addr, accepted)
}

fn config(listen: SocketAddr, upstream: SocketAddr, workers: Option<u32>) -> String {
    let workers = workers.map_or(String::new(), |n| format!("worker_threads = {n}\n"));
    format!(
        r#"[server]
listen = "{listen}"
{workers}
[[providers]]
name = "mock"
kind = "openai"
base_url = "http://{upstream}/v1"
api_key = "k"

[[routes]]
model = "m"
targets = [{{ provider = "mock", model = "gpt-4o-mini" }}]
"#
    )
}

/// Two keep-alive client connections taking turns, five requests each;
/// returns how many upstream connections detour opened.
async fn upstream_connections(workers: Option<u32>) -> usize {
    let mock = common::mock().await;
    let (relay, accepted) = counting_relay(mock.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("detour.toml");
    let listen = free_port();
    std::fs::write(&file, config(listen, relay, workers)).unwrap();
    let serve = Serve::start(&file, &[]);
    serve.wait_ready(listen).await;
    // One connection each (reqwest pools per client).
    let clients = [common::client(), common::client()];
    for _ in 0..5 {
        for c in &clients {
            let r = c
                .post(format!("http://{listen}/v1/chat/completions"))
                .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", serve.log());
            r.bytes().await.unwrap();
        }
    }
    assert!(
        serve.log().contains("worker threads"),
        "the start announces its workers:\n{}",
        serve.log()
    );
    accepted.load(Ordering::SeqCst)
}

#[tokio::test]
async fn each_worker_keeps_its_own_upstream_pool() {
    // Two client connections land on two workers; each worker's requests
    // reuse its own upstream connection, so two, however many requests.
    assert_eq!(upstream_connections(Some(2)).await, 2);
    // One worker: one pool, one upstream connection for both clients.
    assert_eq!(upstream_connections(Some(1)).await, 1);
}

#[tokio::test]
async fn zero_workers_is_refused_at_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("detour.toml");
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    std::fs::write(&file, config(free_port(), upstream, Some(0))).unwrap();
    let out = std::process::Command::new(common::serve::BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.worker_threads") && err.contains("greater than 0"),
        "{err}"
    );
}
