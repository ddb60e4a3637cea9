//! Rate limits shared by replicas on Redis: exact across three `detour
//! serve` processes, concurrency leases that a dead replica cannot keep,
//! tokens reserved then settled, failed authentications counted together,
//! and every `on_redis_failure` mode with Redis killed and paused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis::{wait_until_up, RedisServer};
use common::serve::{free_port, Serve};
use common::*;
use detour::limits::shared as shared_limits;
use detour::mock::MockOptions;
use tokio::time::Instant;

const KEY: &str = "dk-replica-key";

/// The process's metrics are global, and `cargo test` runs this file's tests
/// as threads of one process: the test that counts Redis calls in them runs
/// alone (it takes this for writing), the others beside each other (for
/// reading). nextest runs each test in a process of its own, where this
/// changes nothing.
static METRICS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn state(redis: &str, extra: &str) -> String {
    format!("[state]\nbackend = \"redis\"\nredis_url = \"{redis}\"\ntimeout = \"250ms\"\n{extra}\n")
}

/// One replica's config: route `fast` on `upstream`, key `KEY` of tenant
/// `a` with `key_limits`, the shared `state`.
fn config(
    listen: SocketAddr,
    upstream: SocketAddr,
    key_limits: &str,
    state: &str,
    server: &str,
) -> String {
    format!(
        r#"[server]
listen = "{listen}"
{server}

{state}

[[providers]]
name = "p"
kind = "openai"
base_url = "http://{upstream}/v1"

[[routes]]
model = "fast"
targets = [{{ provider = "p", model = "m" }}]

[[keys]]
key = "{KEY}"
tenant = "a"
{key_limits}

[[keys]]
key = "dk-other"
tenant = "b"
"#
    )
}

async fn ask(addr: SocketAddr, key: &str, body: &serde_json::Value) -> reqwest::Response {
    client()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// In-process replicas on one Redis (each `Gateway` its own connection).
async fn replicas(
    n: usize,
    upstream: SocketAddr,
    key_limits: &str,
    state: &str,
) -> Vec<detour::server::Running> {
    let mut out = Vec::new();
    for _ in 0..n {
        let text = config(
            "127.0.0.1:0".parse().unwrap(),
            upstream,
            key_limits,
            state,
            "",
        );
        let gw = gateway(&text).await;
        wait_until_up(&gw).await;
        out.push(gw);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_hold_exactly_across_three_processes() {
    let _metrics = METRICS.read().await;
    let redis = RedisServer::start();
    let upstream = mock().await;
    // 300 a minute: a minute's worth at once, then one every 200 ms.
    let rpm = 300.0;
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let listen = free_port();
        let admin = free_port();
        let text = config(
            listen,
            upstream.addr(),
            "rpm = 300",
            &state(&redis.url(), ""),
            &format!("admin_listen = \"{admin}\""),
        );
        let path = dir.path().join(format!("r{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let p = Serve::start(&path, &[]);
        p.wait_ready(listen).await;
        procs.push(p);
        addrs.push((listen, admin));
    }
    // Every replica has reached Redis before the load starts.
    for (_, admin) in &addrs {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h: serde_json::Value = client()
                .get(format!("http://{admin}/admin/health"))
                .bearer_auth(common::serve::TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if h["redis"]["up"] == true && h["redis"]["live_replicas"] == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "{h}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // 12 clients spread over the three replicas for 4 s, far over the limit.
    let window = Duration::from_secs(4);
    let start = Instant::now();
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..12 {
        let (addr, _) = addrs[c % 3];
        let refused = Arc::clone(&refused);
        tasks.push(tokio::spawn(async move {
            let mut admitted = Vec::new();
            while start.elapsed() < window {
                let r = ask(addr, KEY, &chat(false)).await;
                match r.status().as_u16() {
                    200 => admitted.push(start.elapsed().as_secs_f64()),
                    429 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
                }
            }
            admitted
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let total = times.len() as f64;
    // GCRA with a minute's burst: rpm at once, then rpm/60 a second.
    let expected = rpm + (elapsed * rpm / 60.0).floor();
    assert!(
        (total - expected).abs() <= expected * 0.02,
        "admitted {total}, expected {expected} ± 2% over {elapsed:.2}s ({} refused)",
        refused.load(Ordering::Relaxed)
    );
    // No moment where more got through than the limit allows by then (an
    // answer's time is after its admission, so this bound is safe).
    for (i, t) in times.iter().enumerate() {
        let allowed = rpm + (t * rpm / 60.0).floor() + 1.0;
        assert!(
            (i + 1) as f64 <= allowed,
            "{} admitted by {t:.3}s, the limit allows {allowed}",
            i + 1
        );
    }
    assert!(
        refused.load(Ordering::Relaxed) > 100,
        "the load was over the limit"
    );
    drop(procs);
}

#[tokio::test]
async fn concurrency_is_leased_across_replicas_and_a_dead_replica_gives_its_leases_back() {
    let _metrics = METRICS.read().await;
    let redis = RedisServer::start();
    let upstream = mock_with(MockOptions::default()).await;
    upstream.set_faults(faults(serde_json::json!({"latency_ms": 1500})));
    let st = state(&redis.url(), "");
    let [a, b] = <[_; 2]>::try_from(replicas(2, upstream.addr(), "max_concurrent = 2", &st).await)
        .ok()
        .unwrap();
    // Two slow requests on A hold the key's two slots: B refuses a third.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let addr = a.addr;
            tokio::spawn(async move { ask(addr, KEY, &chat(false)).await.status() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = ask(b.addr, KEY, &chat(false)).await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
    // Another tenant's key is not held back.
    assert_eq!(ask(b.addr, "dk-other", &chat(false)).await.status(), 200);
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    // Released: B admits again.
    assert_eq!(ask(b.addr, KEY, &chat(false)).await.status(), 200);

    // A replica that dies holding slots: its leases expire, never held for good.
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let text = config(listen, upstream.addr(), "max_concurrent = 2", &st, "");
    let path = dir.path().join("dying.toml");
    std::fs::write(&path, text).unwrap();
    let mut dying = Serve::start(&path, &[]);
    dying.wait_ready(listen).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // reaches Redis
    upstream.set_faults(faults(serde_json::json!({"hang_rate": 1.0})));
    let hung: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { ask(listen, KEY, &chat(false)).await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    upstream.set_faults(faults(serde_json::json!({})));
    assert_eq!(
        ask(b.addr, KEY, &chat(false)).await.status(),
        429,
        "the dying replica holds both"
    );
    dying.child.kill().unwrap();
    dying.child.wait().unwrap();
    for h in hung {
        let _ = h.await;
    }
    let died = Instant::now();
    let deadline = died + detour::limits::shared::LEASE_TTL + Duration::from_secs(3);
    loop {
        let status = ask(b.addr, KEY, &chat(false)).await.status();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead replica's leases never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn tokens_are_reserved_then_settled_across_replicas() {
    let _metrics = METRICS.read().await;
    let redis = RedisServer::start();
    let upstream = mock().await;
    upstream.set_faults(faults(serde_json::json!({"latency_ms": 1000})));
    let st = state(&redis.url(), "");
    let [a, b] = <[_; 2]>::try_from(replicas(2, upstream.addr(), "tpm = 1000", &st).await)
        .ok()
        .unwrap();
    let asking = |max_tokens: u64| {
        let mut body = chat(false);
        body["max_tokens"] = max_tokens.into();
        body
    };
    // A reserves about 10 (body) + 700 (max_tokens) while its call runs...
    let on_a = {
        let body = asking(700);
        tokio::spawn(async move { ask(a.addr, KEY, &body).await.status() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so B cannot reserve 410 more of the same 1000.
    let r = ask(b.addr, KEY, &asking(400)).await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("tokens per minute"));
    assert_eq!(on_a.await.unwrap(), 200);
    // A's call used a few dozen tokens: the rest was given back, for B too.
    upstream.set_faults(faults(serde_json::json!({})));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = ask(b.addr, KEY, &asking(800)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn failed_authentications_are_counted_by_every_replica_together() {
    let _metrics = METRICS.read().await;
    let redis = RedisServer::start();
    let upstream = mock().await;
    let st = state(&redis.url(), "");
    let mut gws = Vec::new();
    for _ in 0..2 {
        let text = config(
            "127.0.0.1:0".parse().unwrap(),
            upstream.addr(),
            "",
            &st,
            "auth_failures_per_minute = 3",
        );
        let gw = gateway(&text).await;
        wait_until_up(&gw).await;
        gws.push(gw);
    }
    let statuses = [
        ask(gws[0].addr, "wrong", &chat(false)).await.status(),
        ask(gws[1].addr, "wrong", &chat(false)).await.status(),
        ask(gws[0].addr, "wrong", &chat(false)).await.status(),
        ask(gws[1].addr, "wrong", &chat(false)).await.status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [401, 401, 401, 429]);
    // Once blocked here, even a good key waits on this replica.
    assert_eq!(ask(gws[1].addr, KEY, &chat(false)).await.status(), 429);
}

async fn statuses(addr: SocketAddr, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(ask(addr, KEY, &chat(false)).await.status().as_u16());
    }
    out
}

#[tokio::test]
async fn with_redis_gone_each_replica_enforces_its_share_and_shared_limits_come_back() {
    let _metrics = METRICS.read().await;
    let mut redis = RedisServer::start();
    let upstream = mock().await;
    let st = state(&redis.url(), "");
    let gws = replicas(2, upstream.addr(), "rpm = 20", &st).await;
    // Both see two replicas alive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while gws[0].gateway.shared().unwrap().live_replicas() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.kill();
    // Local: 20 / 2 replicas = 10 each, no error beyond the 429s.
    let a = statuses(gws[0].addr, 14).await;
    assert_eq!(a.iter().filter(|s| **s == 200).count(), 10, "{a:?}");
    assert!(a.iter().all(|s| *s == 200 || *s == 429), "{a:?}");
    assert!(!gws[0].gateway.shared().unwrap().is_up());
    // B learns it too (by its heartbeat, or its own first failed call).
    let deadline = Instant::now() + Duration::from_secs(3);
    while gws[1].gateway.shared().unwrap().is_up() {
        assert!(Instant::now() < deadline, "B never noticed Redis is gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back: shared again within a few seconds (fresh Redis: a fresh minute).
    redis.restart();
    for gw in &gws {
        wait_until_up(gw).await;
    }
    let a = statuses(gws[0].addr, 15).await;
    let b = statuses(gws[1].addr, 10).await;
    let ok = a.iter().chain(&b).filter(|s| **s == 200).count();
    assert_eq!(ok, 20, "one limit for both again: {a:?} {b:?}");
}

#[tokio::test]
async fn on_redis_failure_open_admits_and_closed_refuses_with_503() {
    let _metrics = METRICS.read().await;
    let redis = RedisServer::start();
    let upstream = mock().await;
    let open = replicas(
        1,
        upstream.addr(),
        "rpm = 2",
        &state(&redis.url(), "on_redis_failure = \"open\""),
    )
    .await;
    let closed = replicas(
        1,
        upstream.addr(),
        "rpm = 2",
        &state(&redis.url(), "on_redis_failure = \"closed\""),
    )
    .await;
    redis.pause();
    // The first calls wait out the timeout; then Redis counts as down.
    let o = statuses(open[0].addr, 6).await;
    assert_eq!(o, [200; 6], "open: limits off while Redis is away");
    let c = client()
        .post(format!("http://{}/v1/chat/completions", closed[0].addr))
        .bearer_auth(KEY)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(c.status(), 503);
    assert_eq!(c.headers()["retry-after"], "1");
    let body = c.text().await.unwrap();
    assert!(body.contains("limits_unavailable"), "{body}");
    // A key without limits is never refused, whatever the mode.
    assert_eq!(
        ask(closed[0].addr, "dk-other", &chat(false)).await.status(),
        200
    );
    redis.resume();
}

#[tokio::test]
async fn a_paused_redis_costs_no_request_more_than_the_timeout() {
    let _metrics = METRICS.read().await;
    let redis = RedisServer::start();
    let upstream = mock().await;
    let st = "[state]\nbackend = \"redis\"\nredis_url = \"URL\"\ntimeout = \"30ms\"\n"
        .replace("URL", &redis.url());
    let gws = replicas(1, upstream.addr(), "rpm = 100000", &st).await;
    let addr = gws[0].addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let s = ask(addr, KEY, &chat(false)).await.status();
                assert_eq!(s, 200);
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (worst, n)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.pause();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.resume();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (worst, n) = load.await.unwrap();
    assert!(n > 20, "{n} requests");
    // One Redis call per request stage, each bounded by the 30 ms timeout.
    assert!(worst < Duration::from_millis(500), "worst {worst:?}");
    assert!(
        gws[0].gateway.shared().unwrap().is_up(),
        "back after the pause"
    );
}

/// The count of Redis calls `op` made by this test process's replicas.
async fn redis_calls(gw: &detour::server::Running, op: &str) -> u64 {
    let admin = admin(gw, "t").await;
    let text = client()
        .get(format!("{admin}/metrics"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("detour_redis_call_seconds_count{{op=\"{op}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn a_large_limit_is_admitted_from_allowances_without_a_call_each() {
    let _metrics = METRICS.write().await;
    // Record from the first request on.
    let _ = detour::metrics::handle();
    let redis = RedisServer::start();
    let upstream = mock().await;
    // 60,000 a minute over two replicas: each takes 150 ahead of need.
    let gws = replicas(2, upstream.addr(), "rpm = 60000", &state(&redis.url(), "")).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while gws[0].gateway.shared().unwrap().live_replicas() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for gw in &gws {
        assert!(statuses(gw.addr, 250).await.iter().all(|s| *s == 200));
    }
    // 1 + 150 taken at the 1st and the 151st... request of each replica.
    let calls = redis_calls(&gws[0], "limits_admit").await;
    assert!(
        (2..=6).contains(&calls),
        "{calls} admission calls for 500 requests"
    );
    // Unused, the allowances go back to Redis.
    let refunds = redis_calls(&gws[0], "limits_adjust").await;
    tokio::time::sleep(shared_limits::POOL_IDLE * 2 + Duration::from_millis(500)).await;
    let after = redis_calls(&gws[0], "limits_adjust").await;
    assert!(
        after >= refunds + 2,
        "the idle allowances were not given back ({refunds} -> {after})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowances_never_let_the_replicas_admit_past_the_limit() {
    let _metrics = METRICS.read().await;
    let redis = RedisServer::start();
    let upstream = mock().await;
    // 1,000 a minute over two replicas: each takes 2 ahead of need.
    let rpm = 1000.0;
    let gws = replicas(2, upstream.addr(), "rpm = 1000", &state(&redis.url(), "")).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while gws[0].gateway.shared().unwrap().live_replicas() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let window = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..16 {
        let addr = gws[c % 2].addr;
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            while start.elapsed() < window {
                match ask(addr, KEY, &chat(false)).await.status().as_u16() {
                    200 => ok += 1,
                    429 => refused += 1,
                    other => panic!("{other}"),
                }
            }
            (ok, refused)
        }));
    }
    let (mut admitted, mut refused) = (0, 0);
    for t in tasks {
        let (ok, no) = t.await.unwrap();
        admitted += ok;
        refused += no;
    }
    assert!(
        refused > 50,
        "the load never reached the limit ({refused} refused)"
    );
    let elapsed = start.elapsed().as_secs_f64();
    let expected = rpm + (elapsed * rpm / 60.0).floor();
    let admitted = admitted as f64;
    assert!(
        admitted <= expected + 1.0,
        "admitted {admitted}, the limit allows {expected}"
    );
    assert!(
        admitted >= expected * 0.98 - 2.0 * 3.0,
        "admitted {admitted}, expected {expected}: allowances held too much back"
    );
}
