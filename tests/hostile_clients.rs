//! Clients that misbehave at the connection level, over raw loopback sockets:
//! silent connections, a lone byte, a bare HTTP/2 preface, idle and deaf
//! HTTP/2 connections, floods of connections on the main and admin
//! listeners, and a client that holds graceful shutdown open.
//!
//! Timeouts are set short so each test ends in seconds; every wait has a
//! deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use detour::state::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A gateway with no keys on loopback (open access) and these `[server]` lines.
fn config(upstream: SocketAddr, server: &str) -> String {
    one_route(upstream, "", server)
}

/// Reads until the server closes the connection (EOF or reset), within
/// `within`; returns how long that took, or `None` if it stayed open.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = started + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// An HTTP/2 frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: a literal header without indexing, its name from the static table.
fn literal(index: u8, value: &str) -> Vec<u8> {
    let mut out = vec![index, value.len() as u8];
    out.extend_from_slice(value.as_bytes());
    out
}

/// Preface, empty SETTINGS, then a HEADERS frame for `method` (static index:
/// 2 GET, 3 POST) `path` on stream 1; `end_stream` says the request is whole.
fn h2_request(method: u8, path: &str, end_stream: bool) -> Vec<u8> {
    let mut block = vec![0x80 | method, 0x86]; // :method, :scheme http
    block.extend(literal(0x04, path)); // :path
    block.extend(literal(0x01, "localhost")); // :authority
    let flags = 0x4 | if end_stream { 0x1 } else { 0 };
    let mut out = H2_PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, flags, 1, &block));
    out
}

#[tokio::test]
async fn silent_one_byte_and_bare_preface_connections_are_closed_on_the_header_timeout() {
    let up = mock().await;
    let gw = gateway(&config(up.addr(), "header_read_timeout = \"1s\"")).await;
    let mut cases = Vec::new();
    let kinds = [
        ("nothing", &b""[..]),
        ("one byte", &b"P"[..]),
        ("the HTTP/2 preface only", H2_PREFACE),
    ];
    // Many of each, as a flood would.
    for (name, send) in kinds.into_iter().cycle().take(60) {
        let addr = gw.addr;
        cases.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(send).await.unwrap();
            (name, closed_within(&mut tcp, Duration::from_secs(5)).await)
        }));
    }
    for case in cases {
        let (name, closed) = case.await.unwrap();
        let took = closed.unwrap_or_else(|| panic!("a client that sent {name} was kept open"));
        assert!(
            took < Duration::from_secs(3),
            "{name}: closed after {took:?}"
        );
    }
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let up = mock().await;
    let server = "header_read_timeout = \"5s\"\nidle_timeout = \"1s\"\nhttp2_keep_alive = \"30s\"";
    let gw = gateway(&config(up.addr(), server)).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(&h2_request(2, "/v1/models", true))
        .await
        .unwrap();
    // The answer comes, then nothing: the connection must not stay open for
    // the header timeout (5 s), let alone forever.
    let took = closed_within(&mut tcp, Duration::from_secs(8))
        .await
        .expect("an idle HTTP/2 connection was kept open");
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let up = mock().await;
    let server = "header_read_timeout = \"5s\"\nidle_timeout = \"1s\"";
    let gw = gateway(&config(up.addr(), server)).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let took = closed_within(&mut tcp, Duration::from_secs(8))
        .await
        .expect("an idle keep-alive connection was kept open");
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
}

#[tokio::test]
async fn an_http2_client_that_never_answers_pings_is_dropped() {
    let up = mock().await;
    // A request is in flight (its body never ends), so only the keep-alive
    // ping can find out that the client is gone.
    let server = "header_read_timeout = \"5s\"\nbody_read_timeout = \"60s\"\n\
                  idle_timeout = \"60s\"\nhttp2_keep_alive = \"1s\"";
    let gw = gateway(&config(up.addr(), server)).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(&h2_request(3, "/v1/chat/completions", false))
        .await
        .unwrap();
    let took = closed_within(&mut tcp, Duration::from_secs(10))
        .await
        .expect("a deaf HTTP/2 client was kept open");
    assert!(took < Duration::from_secs(6), "closed after {took:?}");
}

/// Connects and checks whether the server closes at once (refused).
async fn refused(addr: SocketAddr) -> bool {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    closed_within(&mut tcp, Duration::from_millis(700))
        .await
        .is_some()
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let up = mock().await;
    let server = "header_read_timeout = \"30s\"\nmax_connections = 2";
    let gw = gateway(&config(up.addr(), server)).await;
    let first = TcpStream::connect(gw.addr).await.unwrap();
    let mut second = TcpStream::connect(gw.addr).await.unwrap();
    second
        .write_all(b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    second.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(refused(gw.addr).await, "a third connection was accepted");
    // A slot frees when a connection ends.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = client()
            .get(format!("{}/status.json", gw.url()))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_admin_listener_times_out_silent_connections_and_caps_them() {
    let up = mock().await;
    let server = "header_read_timeout = \"1s\"\nadmin_max_connections = 2";
    let cfg = detour::config::load_str(&config(up.addr(), server), "test.toml").unwrap();
    let gw = Arc::new(Gateway::new(cfg).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = listener.local_addr().unwrap();
    let reloader = detour::reload::Reloader::new(gw);
    detour::admin::spawn_thread(listener, reloader, Some("t".into())).unwrap();

    let mut silent = TcpStream::connect(admin).await.unwrap();
    let _other = TcpStream::connect(admin).await.unwrap();
    assert!(
        refused(admin).await,
        "a third admin connection was accepted"
    );
    let took = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent admin connection was kept open");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
}

#[tokio::test]
async fn shutdown_closes_what_is_left_once_shutdown_timeout_passes() {
    let up = mock().await;
    let server = "header_read_timeout = \"30s\"\nbody_read_timeout = \"60s\"\n\
                  idle_timeout = \"60s\"\nshutdown_timeout = \"1s\"";
    let cfg = detour::config::load_str(&config(up.addr(), server), "test.toml").unwrap();
    let gw = Arc::new(Gateway::new(cfg).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(detour::server::serve(
        gw,
        listener,
        detour::public_status::routes(),
        None,
        async {
            let _ = stopped.await;
        },
    ));
    // An HTTP/2 client with a request in flight that never reads GOAWAY or
    // answers the shutdown's ping.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&h2_request(3, "/v1/chat/completions", false))
        .await
        .unwrap();
    // Let the request reach the handler before shutting down.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(6), serving).await;
    assert!(ended.is_ok(), "shutdown waited past its deadline");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the client got no grace: {:?}",
        started.elapsed()
    );
    assert!(
        closed_within(&mut tcp, Duration::from_secs(2))
            .await
            .is_some(),
        "the connection was left open after shutdown"
    );
}

#[tokio::test]
async fn the_binary_logs_what_it_cut_at_its_shutdown_deadline() {
    let up = mock().await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = "body_read_timeout = \"60s\"\nshutdown_timeout = \"1s\"";
    let text = config(up.addr(), server)
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("detour.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_detour"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "detour did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&h2_request(3, "/v1/chat/completions", false))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    let exited = tokio::time::timeout(Duration::from_secs(6), async {
        stderr.read_to_string(&mut log).await.unwrap();
        child.wait().await.unwrap()
    })
    .await;
    assert!(
        exited.is_ok(),
        "detour did not stop within its shutdown deadline"
    );
    let cut = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("shutdown deadline passed"))
        })
        .unwrap_or_else(|| panic!("no line about what was cut:\n{log}"));
    assert_eq!(cut["connections"], 1, "{cut}");
    assert_eq!(cut["requests"], 1, "{cut}");
}
