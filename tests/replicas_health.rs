//! Health shared between replicas (`[state] backend = "redis"`): what one
//! replica learns of a provider, the others apply within about a second.
//! Each test starts its own `redis-server`, and replicas are gateways in
//! this process with the same `[state]` (each has its own connection and
//! its own replica id).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use detour::server::Running;
use serde_json::{json, Value};
use tokio::time::Instant;

use common::redis::RedisServer;
use common::*;

/// How soon another replica must have learned what one replica found.
const LEARNED_WITHIN: Duration = Duration::from_millis(1500);

/// Route `fast`: `primary` then `backup`; a breaker that opens after two
/// failures and stays open a minute; state on `redis_url`.
fn config(primary: SocketAddr, backup: SocketAddr, redis_url: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[state]
backend = "redis"
redis_url = "{redis_url}"
timeout = "50ms"

[[providers]]
name = "primary"
kind = "openai"
base_url = "http://{primary}/v1"

[[providers]]
name = "backup"
kind = "openai-compatible"
base_url = "http://{backup}/v1"

[[routes]]
model = "fast"
targets = [
  {{ provider = "primary", model = "gpt-a" }},
  {{ provider = "backup", model = "local-b" }},
]
breaker = {{ consecutive_failures = 2, open_for = "60s" }}
"#
    )
}

/// A replica and its admin API.
struct Replica {
    gw: Running,
    admin: String,
}

async fn replica(config: &str) -> Replica {
    let gw = gateway(config).await;
    let admin = admin(&gw, "t").await;
    let r = Replica { gw, admin };
    r.until("Redis is up", Duration::from_secs(10), |h| {
        h["redis"]["up"] == true
    })
    .await;
    r
}

impl Replica {
    async fn post(&self) -> reqwest::Response {
        client()
            .post(format!("{}/v1/chat/completions", self.gw.url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap()
    }

    /// Posts and checks the answer came from `provider` at the first attempt.
    async fn served_by(&self, provider: &str) {
        let resp = self.post().await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-detour-provider"], provider);
        assert_eq!(resp.headers()["x-detour-attempts"], "1");
    }

    async fn health(&self) -> Value {
        client()
            .get(format!("{}/admin/health", self.admin))
            .bearer_auth("t")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The health of route `fast`'s `primary` target.
    async fn primary_target(&self) -> Value {
        self.health().await["routes"][0]["targets"][0].clone()
    }

    async fn set_override(&self, provider: &str, action: &str) {
        let resp = client()
            .post(format!(
                "{}/admin/providers/{provider}/{action}",
                self.admin
            ))
            .bearer_auth("t")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    async fn status_json(&self) -> Value {
        client()
            .get(format!("{}/status.json", self.gw.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls `/admin/health` until `check` holds; panics naming `what`
    /// after `within`. Returns how long it took.
    async fn until(
        &self,
        what: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let h = self.health().await;
            if check(&h) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{what}: not within {within:?}: {h:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn failing() -> detour::mock::Faults {
    faults(json!({"error_rate": 1.0, "error_status": 500}))
}

#[tokio::test]
async fn a_breaker_opened_by_one_replica_holds_on_another_that_sent_no_traffic() {
    let redis = RedisServer::start();
    let (primary, backup) = (mock().await, mock().await);
    let cfg = config(primary.addr(), backup.addr(), &redis.url());
    let (a, b) = (replica(&cfg).await, replica(&cfg).await);

    primary.set_faults(failing());
    for _ in 0..2 {
        assert_eq!(a.post().await.headers()["x-detour-provider"], "backup");
    }
    assert_eq!(a.primary_target().await["breaker"], "open");
    assert_eq!(primary.stats().requests, 2, "A paid for the discovery");

    b.until("B learns the breaker is open", LEARNED_WITHIN, |h| {
        h["routes"][0]["targets"][0]["breaker"] == "open"
    })
    .await;
    for _ in 0..10 {
        b.served_by("backup").await;
    }
    assert_eq!(
        primary.stats().requests,
        2,
        "B sent the failing provider nothing"
    );
    // What B learned is not counted as its own failures.
    assert_eq!(b.primary_target().await["consecutive_failures"], 0);
}

#[tokio::test]
async fn a_retry_after_cool_down_on_one_replica_holds_on_another() {
    let redis = RedisServer::start();
    let (primary, backup) = (mock().await, mock().await);
    let cfg = config(primary.addr(), backup.addr(), &redis.url());
    let (a, b) = (replica(&cfg).await, replica(&cfg).await);

    primary.set_faults(faults(
        json!({"rate_limit_rate": 1.0, "retry_after_secs": 30}),
    ));
    let resp = a.post().await;
    assert_eq!(resp.headers()["x-detour-tried"], "primary/gpt-a=status_429");
    b.until("B learns the cool-down", LEARNED_WITHIN, |h| {
        h["routes"][0]["targets"][0]["cooling_down_ms"].as_u64() > Some(25_000)
    })
    .await;
    for _ in 0..10 {
        b.served_by("backup").await;
    }
    assert_eq!(
        primary.stats().requests,
        1,
        "B sent the throttled provider nothing"
    );
    let target = b.primary_target().await;
    assert_eq!(
        target["breaker"], "closed",
        "a cool-down is not a breaker: {target}"
    );
}

#[tokio::test]
async fn a_target_one_replica_found_misconfigured_is_skipped_by_another() {
    let redis = RedisServer::start();
    let (primary, backup) = (mock().await, mock().await);
    let cfg = config(primary.addr(), backup.addr(), &redis.url());
    let (a, b) = (replica(&cfg).await, replica(&cfg).await);

    // The provider refuses detour's key.
    primary.set_faults(faults(json!({"error_rate": 1.0, "error_status": 401})));
    assert_eq!(a.post().await.headers()["x-detour-provider"], "backup");
    b.until("B learns the mark", LEARNED_WITHIN, |h| {
        h["routes"][0]["targets"][0]["misconfigured"] == true
    })
    .await;
    for _ in 0..5 {
        b.served_by("backup").await;
    }
    assert_eq!(primary.stats().requests, 1);
}

#[tokio::test]
async fn an_override_given_to_one_replica_holds_on_all_and_auto_on_any_clears_it() {
    let redis = RedisServer::start();
    let (primary, backup) = (mock().await, mock().await);
    let cfg = config(primary.addr(), backup.addr(), &redis.url());
    let (a, b) = (replica(&cfg).await, replica(&cfg).await);
    b.served_by("primary").await;

    a.set_override("primary", "down").await;
    let down = |h: &Value| h["providers"][0]["override"] == "down";
    b.until("B holds A's override", LEARNED_WITHIN, down).await;
    b.served_by("backup").await;

    // A replica started afterwards reads it.
    let c = replica(&cfg).await;
    c.until("C, started later, holds the override", LEARNED_WITHIN, down)
        .await;
    c.served_by("backup").await;
    let before = primary.stats().requests;

    // `auto` on B clears it everywhere.
    b.set_override("primary", "auto").await;
    let auto = |h: &Value| h["providers"][0]["override"] == "auto";
    a.until("A clears the override", LEARNED_WITHIN, auto).await;
    c.until("C clears the override", LEARNED_WITHIN, auto).await;
    assert_eq!(primary.stats().requests, before);
    a.served_by("primary").await;
    c.served_by("primary").await;

    // And a replica that starts now has none.
    let d = replica(&cfg).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(auto(&d.health().await));

    // A replica's override incident ended with the override, on every
    // replica (no incident stays open on the one that set it).
    let start = Instant::now();
    loop {
        let v = a.status_json().await;
        let all = v["detour"]["incidents"].as_array().unwrap().clone();
        if v["incidents"] == json!([]) {
            assert_eq!(all.len(), 1, "one override incident: {v:#}");
            assert_eq!(all[0]["cause"], "override");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "still unresolved: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_status_page_of_any_replica_shows_the_incidents_of_all_once() {
    let redis = RedisServer::start();
    let (primary, backup) = (mock().await, mock().await);
    let cfg = config(primary.addr(), backup.addr(), &redis.url());
    let (a, b) = (replica(&cfg).await, replica(&cfg).await);
    let incidents = |v: &Value| {
        v["detour"]["incidents"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(incidents(&b.status_json().await), Vec::<Value>::new());

    // A's traffic finds the outage: A records the incident.
    primary.set_faults(failing());
    for _ in 0..2 {
        a.post().await;
    }
    let start = Instant::now();
    let v = loop {
        let v = b.status_json().await;
        if !incidents(&v).is_empty() {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "B's status page never showed A's incident: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let on_b = incidents(&v);
    assert_eq!(on_b.len(), 1, "{v:#}");
    assert_eq!(on_b[0]["provider"], "primary");
    assert_eq!(on_b[0]["cause"], "traffic");
    assert!(on_b[0]["ended_at"].is_null());
    assert_eq!(
        v["incidents"][0]["components"][0]["name"], "primary",
        "{v:#}"
    );
    assert_eq!(v["components"][0]["status"], "major_outage", "{v:#}");
    let html = client()
        .get(format!("{}/status", b.gw.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("every target&#39;s circuit breaker opened")
            || html.contains("every target's circuit breaker opened"),
        "{html}"
    );

    // An override set on A is applied, and recorded, on both: still one
    // incident per outage on each, with the same id everywhere.
    a.set_override("primary", "down").await;
    b.until("B holds the override", LEARNED_WITHIN, |h| {
        h["providers"][0]["override"] == "down"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (on_a, on_b) = (
        incidents(&a.status_json().await),
        incidents(&b.status_json().await),
    );
    let causes = |list: &[Value]| {
        let mut c: Vec<String> = list
            .iter()
            .map(|i| i["cause"].as_str().unwrap().to_owned())
            .collect();
        c.sort();
        c
    };
    assert_eq!(causes(&on_a), ["override", "traffic"], "{on_a:#?}");
    assert_eq!(causes(&on_b), ["override", "traffic"], "{on_b:#?}");
    let ids = |list: &[Value]| {
        let mut ids: Vec<String> = list
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&on_a), ids(&on_b), "the same ids on every replica");
}

#[tokio::test]
async fn with_redis_paused_or_killed_replicas_serve_on_local_health_and_share_again_after() {
    let mut redis = RedisServer::start();
    let (primary, backup) = (mock().await, mock().await);
    let cfg = config(primary.addr(), backup.addr(), &redis.url());
    let (a, b) = (replica(&cfg).await, replica(&cfg).await);

    // Paused: every request is still served, at once.
    redis.pause();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        for r in [&a, &b] {
            let t = Instant::now();
            assert_eq!(r.post().await.status(), 200);
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "{:?}",
                t.elapsed()
            );
        }
    }
    redis.resume();
    for r in [&a, &b] {
        r.until("Redis is back", Duration::from_secs(10), |h| {
            h["redis"]["up"] == true
        })
        .await;
    }

    // Killed: health is each replica's own. A finds the outage; B, not
    // told, finds it too with its own traffic.
    redis.kill();
    for r in [&a, &b] {
        r.until("Redis is seen down", Duration::from_secs(10), |h| {
            h["redis"]["up"] == false
        })
        .await;
    }
    primary.set_faults(failing());
    for _ in 0..2 {
        assert_eq!(a.post().await.status(), 200);
    }
    assert_eq!(a.primary_target().await["breaker"], "open");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.primary_target().await["breaker"],
        "closed",
        "local health"
    );
    assert_eq!(b.post().await.headers()["x-detour-attempts"], "2");
    primary.set_faults(detour::mock::Faults::default());

    // Redis returns (empty): what A learned meanwhile is told, and A's new
    // findings reach B again.
    redis.restart();
    for r in [&a, &b] {
        r.until("Redis is back", Duration::from_secs(10), |h| {
            h["redis"]["up"] == true
        })
        .await;
    }
    b.until(
        "B learns what A found while Redis was away",
        Duration::from_secs(3),
        |h| h["routes"][0]["targets"][0]["breaker"] == "open",
    )
    .await;
    a.set_override("backup", "down").await;
    b.until("B learns A's next change", LEARNED_WITHIN, |h| {
        h["providers"][1]["override"] == "down"
    })
    .await;
}

#[tokio::test]
async fn a_status_page_outage_one_replica_reads_holds_on_another_until_it_reads_otherwise() {
    use detour::mock::{ComponentStatus, Flavor, MockOptions, PageStatus};
    let redis = RedisServer::start();
    let (primary, backup) = (mock().await, mock().await);
    let page = || async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        detour::mock::spawn(Flavor::Statuspage, listener, MockOptions::default())
            .await
            .unwrap()
    };
    // Each replica reads its own copy of the page: A's every 100 ms, B's
    // once a minute (its first read is at start).
    let (page_a, page_b) = (page().await, page().await);
    let with_page = |page: SocketAddr, every: &str| {
        config(primary.addr(), backup.addr(), &redis.url()).replace(
            "name = \"primary\"\n",
            &format!(
                "name = \"primary\"\nstatus_page = \"http://{page}/api/v2/summary.json\"\nstatus_components = [\"API\"]\nstatus_poll = \"{every}\"\n"
            ),
        )
    };
    let a = replica(&with_page(page_a.addr(), "100ms")).await;
    let b = replica(&with_page(page_b.addr(), "60s")).await;
    let page_says =
        |state: &'static str| move |h: &Value| h["providers"][0]["status_page"] == state;
    b.until("B's first read", LEARNED_WITHIN, page_says("operational"))
        .await;

    page_a
        .set_status(PageStatus::operational().with_component("API", ComponentStatus::MajorOutage));
    a.until(
        "A reads the outage",
        Duration::from_secs(3),
        page_says("down"),
    )
    .await;
    b.until("B learns it from A", LEARNED_WITHIN, page_says("down"))
        .await;
    b.served_by("backup").await;
    assert_eq!(primary.stats().requests, 0);

    page_a.set_status(PageStatus::operational());
    b.until(
        "B learns it is over",
        Duration::from_secs(3),
        page_says("operational"),
    )
    .await;
    b.served_by("primary").await;
}
