//! Several replicas on one Redis (`[state] backend = "redis"`): each test
//! starts its own `redis-server` on a free loopback port, so it can stop,
//! pause and restart it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use tokio::time::Instant;

use common::redis::RedisServer;
use common::*;

/// The config of one replica: route `fast` on `upstream`, state on `redis_url`.
fn replica_config(upstream: std::net::SocketAddr, redis_url: &str, extra_state: &str) -> String {
    one_route(
        upstream,
        "",
        &format!(
            "admin_listen = \"127.0.0.1:0\"\n\n[state]\nbackend = \"redis\"\nredis_url = \"{redis_url}\"\ntimeout = \"50ms\"\n{extra_state}"
        ),
    )
}

async fn redis_view(admin: &str) -> serde_json::Value {
    let health: serde_json::Value = client()
        .get(format!("{admin}/admin/health"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    health["redis"].clone()
}

async fn wait_for(admin: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = redis_view(admin).await;
        if check(&view) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_replica_starts_without_its_redis_serves_and_joins_when_it_comes() {
    let upstream = mock().await;
    // A port where nothing listens yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://:s3cret-pass@127.0.0.1:{port}");
    let gw = gateway(&replica_config(upstream.addr(), &url, "")).await;
    let admin = admin(&gw, "t").await;
    // Down is a warning, not a refusal: requests are served.
    let view = redis_view(&admin).await;
    assert_eq!(view["up"], false, "{view}");
    assert_eq!(view["on_redis_failure"], "local");
    let r = client()
        .post(format!("http://{}/v1/chat/completions", gw.addr))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The password is a secret: masked in /admin/health and /admin/config.
    let health = serde_json::to_string(&view).unwrap();
    assert!(!health.contains("s3cret-pass"), "{health}");
    let config = client()
        .get(format!("{admin}/admin/config"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!config.contains("s3cret-pass"), "{config}");
    assert!(config.contains("\"backend\":\"redis\""), "{config}");

    // Redis comes, with the password the URL carries.
    let redis = RedisServer::start_on(port, Some("s3cret-pass"));
    wait_for(&admin, "joins once Redis is up", |v| v["up"] == true).await;
    let view = redis_view(&admin).await;
    assert_eq!(view["live_replicas"], 1, "{view}");
    drop(redis);
    wait_for(&admin, "notices Redis is gone", |v| v["up"] == false).await;
}

#[tokio::test]
async fn rediss_with_a_password_verifies_the_server_against_the_systems_trust_store() {
    use common::serve::{free_port, Serve, TOKEN};
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key] = common::tls::certificates(dir.path());
    let redis = RedisServer::start_tls(&cert, &key, "tls-s3cret");
    let upstream = mock().await;
    let (listen, admin) = (free_port(), free_port());
    let config = |redis_url: &str| {
        let text = replica_config(upstream.addr(), redis_url, "")
            .replace(
                "admin_listen = \"127.0.0.1:0\"",
                &format!("admin_listen = \"{admin}\""),
            )
            .replace(
                "\nlisten = \"127.0.0.1:0\"",
                &format!("\nlisten = \"{listen}\""),
            );
        let path = dir.path().join("detour.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let view = || async {
        let h: serde_json::Value = client()
            .get(format!("http://{admin}/admin/health"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        h["redis"].clone()
    };
    let url = format!("rediss://:tls-s3cret@localhost:{}", redis.port);

    // The CA is trusted through the system's store (SSL_CERT_FILE here):
    // detour reaches Redis over TLS with the password.
    let path = config(&url);
    let trusted = Serve::start_with_env(&path, &[], &[("SSL_CERT_FILE", ca.to_str().unwrap())]);
    trusted.wait_ready(listen).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = view().await;
        if v["up"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reached Redis over TLS: {v}\n{}",
            trusted.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!trusted.log().contains("tls-s3cret"), "{}", trusted.log());
    drop(trusted);

    // A server its trust store does not vouch for is never used.
    let untrusted = Serve::start(&path, &[]);
    untrusted.wait_ready(listen).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = view().await;
    assert_eq!(v["up"], false, "{v}");
    assert!(
        !untrusted.log().contains("tls-s3cret"),
        "{}",
        untrusted.log()
    );
}
