//! Providers that misbehave on purpose: absurd `retry-after` values, events that
//! never end, bodies that stall, gzip nobody asked for, HTML pages with a 200,
//! answers detour cannot translate, and targets naming a model the provider does
//! not have. Over real loopback HTTP against `detour mock`, or a tiny hostile
//! server where the mock cannot misbehave that way.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use detour::mock::{self, Flavor, MockOptions, MockServer};
use detour::server::Running;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// No request in this file may take longer than this: a hang is a failure.
const BOUND: Duration = Duration::from_secs(10);

async fn upstream(flavor: Flavor) -> MockServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(flavor, listener, MockOptions::default())
        .await
        .unwrap()
}

/// Where a provider kind's API lives under the mock's address.
fn base_path(kind: &str) -> &'static str {
    match kind {
        "gemini" => "/v1beta",
        _ => "/v1",
    }
}

/// Route `fast`: `primary` (of `kind`, model `gpt-a`), then an OpenAI-kind
/// `backup` (model `local-b`) if given. `server` lines go under `[server]`,
/// `route` lines under the route.
fn config(
    kind: &str,
    primary: SocketAddr,
    backup: Option<SocketAddr>,
    server: &str,
    route: &str,
) -> String {
    let mut out = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\n\
         [[providers]]\nname = \"primary\"\nkind = \"{kind}\"\nbase_url = \"http://{primary}{}\"\n",
        base_path(kind)
    );
    let mut targets = "{ provider = \"primary\", model = \"gpt-a\" }".to_owned();
    if let Some(backup) = backup {
        out.push_str(&format!(
            "\n[[providers]]\nname = \"backup\"\nkind = \"openai\"\nbase_url = \"http://{backup}/v1\"\n"
        ));
        targets.push_str(", { provider = \"backup\", model = \"local-b\" }");
    }
    out.push_str(&format!(
        "\n[[routes]]\nmodel = \"fast\"\ntargets = [{targets}]\n{route}\n"
    ));
    out
}

#[derive(Clone, Copy, Debug)]
enum Client {
    OpenAi,
    Anthropic,
}

async fn post(gw: &Running, client_format: Client, stream: bool) -> reqwest::Response {
    let (path, body) = match client_format {
        Client::OpenAi => ("/v1/chat/completions", chat(stream)),
        Client::Anthropic => (
            "/v1/messages",
            json!({
                "model": "fast",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "Say hello"}],
                "stream": stream,
            }),
        ),
    };
    let send = client()
        .post(format!("{}{path}", gw.url()))
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send();
    tokio::time::timeout(BOUND, send)
        .await
        .expect("the gateway answered within the bound")
        .expect("the gateway answered at all")
}

async fn text(resp: reqwest::Response) -> String {
    tokio::time::timeout(BOUND, resp.text())
        .await
        .expect("the body ended within the bound")
        .unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

/// The backup answered, after the primary failed for `reason` (`what` names
/// the case in a failure's message).
#[track_caller]
fn answered_by_backup_after(resp: &reqwest::Response, reason: &str, what: &str) {
    assert_eq!(resp.status(), 200, "{what}");
    assert_eq!(header(resp, "x-detour-provider"), Some("backup"), "{what}");
    let tried = format!("primary/gpt-a={reason}");
    assert_eq!(
        header(resp, "x-detour-tried"),
        Some(tried.as_str()),
        "{what}"
    );
}

/// A one-trick upstream: answers every request with `reply`, then closes the
/// connection, or with `hold` keeps it open and silent. Counts requests.
async fn hostile(reply: &'static [u8], hold: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_none() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = socket.write_all(reply).await;
                let _ = socket.flush().await;
                if hold {
                    // Silent until the gateway gives up and closes.
                    let mut sink = [0u8; 1024];
                    while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    (addr, hits)
}

/// Reads one HTTP/1.1 request (headers and a `content-length` body).
async fn read_request(socket: &mut TcpStream) -> Option<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    while buf.len() < end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(())
}

async fn health(gw: &Running) -> Value {
    let admin = admin(gw, "t0ken").await;
    client()
        .get(format!("{admin}/admin/health"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------
// 1. retry-after

#[tokio::test]
async fn a_retry_after_past_durations_range_cools_the_target_down_and_fails_over() {
    let (primary, backup) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Openai).await,
    );
    primary.set_faults(faults(
        json!({"rate_limit_rate": 1.0, "retry_after": "1e20"}),
    ));
    let gw = gateway(&config(
        "openai",
        primary.addr(),
        Some(backup.addr()),
        "",
        "",
    ))
    .await;

    let resp = post(&gw, Client::OpenAi, false).await;
    answered_by_backup_after(&resp, "status_429", "");
    // The cool-down was recorded: the next request goes straight to the backup.
    let resp = post(&gw, Client::OpenAi, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-detour-attempts"), Some("1"));
    assert_eq!(header(&resp, "x-detour-provider"), Some("backup"));
    assert_eq!(primary.stats().requests, 1);
}

#[tokio::test]
async fn clients_get_whole_seconds_within_the_cap_whatever_the_provider_sent() {
    let cases: &[(&str, Option<&str>)] = &[
        ("1e20", Some("30")),
        ("1e19", Some("30")),
        ("3600", Some("30")),
        ("Fri, 31 Dec 9999 23:59:59 GMT", Some("30")),
        ("Thu, 01 Jan 1970 00:00:00 GMT", Some("1")),
        ("2.5", Some("3")),
        ("0", Some("1")),
        ("7", Some("7")),
        ("-1", None),
        ("NaN", None),
        ("inf", None),
        ("soon", None),
    ];
    let p = upstream(Flavor::Openai).await;
    for (sent, relayed) in cases {
        p.set_faults(faults(json!({"rate_limit_rate": 1.0, "retry_after": sent})));
        // A fresh gateway each time: the first 429 cools the only target down.
        let route = r#"breaker = { max_cool_down = "30s" }"#;
        let gw = gateway(&config("openai", p.addr(), None, "", route)).await;
        let resp = post(&gw, Client::OpenAi, false).await;
        assert_eq!(resp.status(), 429, "retry-after {sent:?}");
        assert_eq!(
            header(&resp, "retry-after"),
            *relayed,
            "retry-after {sent:?} from the provider"
        );
    }
}

#[tokio::test]
async fn geminis_retry_info_is_capped_too() {
    let gem = upstream(Flavor::Gemini).await;
    gem.set_faults(faults(
        json!({"rate_limit_rate": 1.0, "retry_after_secs": 4_000_000_000u64}),
    ));
    let gw = gateway(&config("gemini", gem.addr(), None, "", "")).await;
    let resp = post(&gw, Client::OpenAi, false).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), Some("60"), "the default cap");
}

#[tokio::test]
async fn a_cool_down_lasts_at_most_max_cool_down() {
    let (primary, backup) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Openai).await,
    );
    primary.set_faults(faults(
        json!({"rate_limit_rate": 1.0, "retry_after": "3600"}),
    ));
    let route = r#"breaker = { max_cool_down = "1s" }"#;
    let gw = gateway(&config(
        "openai",
        primary.addr(),
        Some(backup.addr()),
        "",
        route,
    ))
    .await;
    let resp = post(&gw, Client::OpenAi, false).await;
    assert_eq!(header(&resp, "x-detour-provider"), Some("backup"));
    primary.set_faults(faults(json!({})));
    let cooled = Instant::now();
    // Traffic returns to the primary after the capped second, not an hour.
    let deadline = cooled + Duration::from_secs(5);
    loop {
        let resp = post(&gw, Client::OpenAi, false).await;
        if header(&resp, "x-detour-provider") == Some("primary") {
            break;
        }
        assert!(Instant::now() < deadline, "the primary never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cooled.elapsed() >= Duration::from_millis(800));
}

// ---------------------------------------------------------------------------
// 2. Events that never end

#[tokio::test]
async fn an_endless_first_event_fails_over_once_it_passes_the_cap() {
    let (primary, backup) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Openai).await,
    );
    primary.set_faults(faults(json!({"endless_event_after": 0})));
    let gw = gateway(&config(
        "openai",
        primary.addr(),
        Some(backup.addr()),
        "",
        "",
    ))
    .await;
    for format in [Client::OpenAi, Client::Anthropic] {
        let resp = post(&gw, format, true).await;
        answered_by_backup_after(&resp, "event_too_large", &format!("{format:?}"));
        let body = text(resp).await;
        assert!(!body.contains("xxxx"), "{format:?}");
    }
}

#[tokio::test]
async fn an_endless_event_after_the_first_ends_the_stream_with_an_error_event() {
    let p = upstream(Flavor::Openai).await;
    p.set_faults(faults(json!({"endless_event_after": 2})));
    let gw = gateway(&config(
        "openai",
        p.addr(),
        None,
        "max_event_bytes = 1048576",
        "",
    ))
    .await;

    let resp = post(&gw, Client::OpenAi, true).await;
    assert_eq!(resp.status(), 200);
    let body = text(resp).await;
    let data = sse_data(&body);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_event_too_large", "{body}");
    assert!(!body.contains("xxxx"));

    // Translated for an Anthropic client: the same end, in its format.
    let resp = post(&gw, Client::Anthropic, true).await;
    assert_eq!(resp.status(), 200);
    let body = text(resp).await;
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error"), "{body}");
    assert!(last.contains("max_event_bytes"), "{body}");
}

#[tokio::test]
async fn the_first_byte_deadline_runs_until_the_first_whole_event() {
    let (primary, backup) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Openai).await,
    );
    // 64 KiB every 50 ms: the default event cap is seconds away.
    primary.set_faults(faults(
        json!({"endless_event_after": 0, "chunk_gap_ms": 50}),
    ));
    let route = r#"timeouts = { first_byte = "400ms" }"#;
    let gw = gateway(&config(
        "openai",
        primary.addr(),
        Some(backup.addr()),
        "",
        route,
    ))
    .await;
    let started = Instant::now();
    let resp = post(&gw, Client::OpenAi, true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "x-detour-tried"),
        Some("primary/gpt-a=first_byte_timeout")
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

// ---------------------------------------------------------------------------
// 3. A translated answer that stalls

#[tokio::test]
async fn a_translated_answer_that_stalls_mid_body_ends_at_the_idle_limit() {
    let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"id\":\"chatcmpl-1\",";
    let (addr, _) = hostile(reply, true).await;
    let route = r#"timeouts = { idle = "300ms" }"#;
    let gw = gateway(&config("openai", addr, None, "", route)).await;
    let started = Instant::now();
    let resp = post(&gw, Client::Anthropic, false).await;
    assert_eq!(resp.status(), 504);
    let body = text(resp).await;
    assert!(body.contains("idle timeout"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

// ---------------------------------------------------------------------------
// 4. Encodings and answers that are not what the endpoint returns

/// Inflates a gzip member made of stored deflate blocks (what the mock sends).
fn gunzip_stored(bytes: &[u8]) -> Vec<u8> {
    assert_eq!(&bytes[..3], &[0x1f, 0x8b, 8], "a gzip member");
    let mut at = 10;
    let mut out = Vec::new();
    loop {
        let last = bytes[at] & 1 == 1;
        assert_eq!(bytes[at] & 0b110, 0, "stored blocks only");
        let len = usize::from(u16::from_le_bytes([bytes[at + 1], bytes[at + 2]]));
        out.extend_from_slice(&bytes[at + 5..at + 5 + len]);
        at += 5 + len;
        if last {
            return out;
        }
    }
}

#[tokio::test]
async fn a_gzip_answer_is_relayed_with_its_content_encoding() {
    let p = upstream(Flavor::Openai).await;
    p.set_faults(faults(json!({"gzip": true})));
    let gw = gateway(&config("openai", p.addr(), None, "", "")).await;
    let resp = post(&gw, Client::OpenAi, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-encoding"), Some("gzip"));
    let bytes = resp.bytes().await.unwrap();
    let v: Value = serde_json::from_slice(&gunzip_stored(&bytes)).unwrap();
    assert_eq!(v["object"], "chat.completion");
    // detour asked for no encoding; the provider ignored it.
    let asked = p.requests()[0]
        .headers
        .iter()
        .find(|(k, _)| k == "accept-encoding")
        .map(|(_, v)| v.clone());
    assert_eq!(asked.as_deref(), Some("identity"));
}

#[tokio::test]
async fn a_gzip_answer_that_must_be_read_fails_over() {
    let (primary, backup) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Openai).await,
    );
    primary.set_faults(faults(json!({"gzip": true})));
    let gw = gateway(&config(
        "openai",
        primary.addr(),
        Some(backup.addr()),
        "",
        "",
    ))
    .await;
    // A stream, and an answer to translate: neither can be read compressed.
    for (format, stream) in [(Client::OpenAi, true), (Client::Anthropic, false)] {
        let resp = post(&gw, format, stream).await;
        let what = format!("{format:?} stream={stream}");
        answered_by_backup_after(&resp, "unexpected_encoding", &what);
        assert_eq!(header(&resp, "content-encoding"), None);
        let body = text(resp).await;
        assert!(body.contains("local-b"), "{body}");
    }
}

#[tokio::test]
async fn an_html_200_fails_over() {
    let (primary, backup) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Openai).await,
    );
    primary.set_faults(faults(json!({"html_200": true})));
    let gw = gateway(&config(
        "openai",
        primary.addr(),
        Some(backup.addr()),
        "",
        "",
    ))
    .await;
    for stream in [false, true] {
        let resp = post(&gw, Client::OpenAi, stream).await;
        answered_by_backup_after(
            &resp,
            "unexpected_content_type",
            &format!("stream={stream}"),
        );
    }
}

#[tokio::test]
async fn an_answer_whose_framing_cannot_be_trusted_fails_over() {
    // Each is refused by the plain-http client before a byte reaches the
    // client: a transfer-coding detour did not ask for, lengths that
    // disagree, and a head that is not HTTP at all.
    let replies: [&'static [u8]; 3] = [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ];
    for reply in replies {
        let (addr, hits) = hostile(reply, false).await;
        let backup = upstream(Flavor::Openai).await;
        let gw = gateway(&config("openai", addr, Some(backup.addr()), "", "")).await;
        for stream in [false, true] {
            let resp = post(&gw, Client::OpenAi, stream).await;
            let what = format!("{} stream={stream}", String::from_utf8_lossy(reply));
            answered_by_backup_after(&resp, "transport_error", &what);
        }
        assert!(hits.load(Ordering::SeqCst) >= 1);
    }
}

#[tokio::test]
async fn an_html_200_is_never_cached() {
    let p = upstream(Flavor::Openai).await;
    p.set_faults(faults(json!({"html_200": true})));
    let route = r#"cache = { ttl = "5m" }"#;
    let gw = gateway(&config("openai", p.addr(), None, "", route)).await;
    let resp = post(&gw, Client::OpenAi, false).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unexpected_answer", "{v}");

    p.set_faults(faults(json!({})));
    let resp = post(&gw, Client::OpenAi, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-detour-cache"), Some("miss"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
}

// ---------------------------------------------------------------------------
// 5. Retry on what happened: detour's own failures, misconfigured targets

#[tokio::test]
async fn an_answer_detour_cannot_translate_is_a_502_and_is_not_generated_again() {
    // Valid JSON, but not a chat completion detour can read.
    let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 33\r\nconnection: close\r\n\r\n{\"id\":\"x\",\"choices\":\"not a list\"}";
    let (addr, hits) = hostile(reply, false).await;
    let backup = upstream(Flavor::Openai).await;
    let gw = gateway(&config("openai", addr, Some(backup.addr()), "", "")).await;
    for n in 1..=2 {
        let resp = post(&gw, Client::Anthropic, false).await;
        assert_eq!(resp.status(), 502);
        assert_eq!(header(&resp, "x-detour-attempts"), Some("1"));
        let body = text(resp).await;
        assert!(body.contains("could not translate"), "{body}");
        // Not a fault of the provider: it stays first in line.
        assert_eq!(hits.load(Ordering::SeqCst), n);
    }
    assert_eq!(backup.stats().requests, 0, "never generated twice");
}

#[tokio::test]
async fn a_provider_404_for_the_targets_model_fails_over_as_misconfigured() {
    for (flavor, kind) in [
        (Flavor::Openai, "openai"),
        (Flavor::Anthropic, "anthropic"),
        (Flavor::Gemini, "gemini"),
    ] {
        let (primary, backup) = (upstream(flavor).await, upstream(Flavor::Openai).await);
        primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 404})));
        let gw = gateway(&config(kind, primary.addr(), Some(backup.addr()), "", "")).await;
        let resp = post(&gw, Client::OpenAi, false).await;
        answered_by_backup_after(&resp, "model_not_found", kind);
        // Marked misconfigured: skipped for a while.
        let resp = post(&gw, Client::OpenAi, false).await;
        assert_eq!(header(&resp, "x-detour-attempts"), Some("1"), "{kind}");
        assert_eq!(primary.stats().requests, 1, "{kind}");
        let health = health(&gw).await;
        assert_eq!(
            health["routes"][0]["targets"][0]["misconfigured"], true,
            "{kind}: {health}"
        );
    }
}

#[tokio::test]
async fn the_callers_own_404_is_still_relayed() {
    let reply = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 96\r\nconnection: close\r\n\r\n{\"error\":{\"message\":\"Invalid URL (POST /v1/chat/x)\",\"type\":\"invalid_request_error\",\"code\":null}}";
    let (addr, _) = hostile(reply, false).await;
    let backup = upstream(Flavor::Openai).await;
    let gw = gateway(&config("openai", addr, Some(backup.addr()), "", "")).await;
    let resp = post(&gw, Client::OpenAi, false).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(header(&resp, "x-detour-attempts"), Some("1"));
    assert_eq!(backup.stats().requests, 0);
}

#[tokio::test]
async fn an_answer_to_translate_that_is_not_json_fails_over() {
    let (primary, backup) = (
        upstream(Flavor::Openai).await,
        upstream(Flavor::Openai).await,
    );
    primary.set_faults(faults(json!({"malformed": true})));
    let gw = gateway(&config(
        "openai",
        primary.addr(),
        Some(backup.addr()),
        "",
        "",
    ))
    .await;
    let resp = post(&gw, Client::Anthropic, false).await;
    answered_by_backup_after(&resp, "invalid_json", "");
}

#[tokio::test]
async fn an_answer_past_what_detour_reads_whole_is_a_502_and_not_generated_again() {
    // 40 MB announced and sent: more than the 32 MiB detour translates.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_none() {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40000000\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let spaces = vec![b' '; 1 << 20];
                for _ in 0..40 {
                    if socket.write_all(&spaces[..1_000_000]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let backup = upstream(Flavor::Openai).await;
    let gw = gateway(&config("openai", addr, Some(backup.addr()), "", "")).await;
    let resp = post(&gw, Client::Anthropic, false).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "x-detour-attempts"), Some("1"));
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than"),
        "{v}"
    );
    assert_eq!(backup.stats().requests, 0, "never generated twice");
}
