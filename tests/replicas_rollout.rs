//! One rollout baked by several replicas on one Redis: one verdict from the
//! cohorts of all, a promote or rollback on any replica applied by all, and
//! a replica that starts during the bake serving the stable config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::redis::{wait_until_up, RedisServer};
use common::*;
use detour::reload::{apply_text, Outcome, Trigger};
use detour::server::Running;
use tokio::time::Instant;

fn text(upstream: SocketAddr, redis: &str, rollout: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"

[state]
backend = "redis"
redis_url = "{redis}"
timeout = "250ms"

{rollout}

[[providers]]
name = "p"
kind = "openai"
base_url = "http://{upstream}/v1"

[[routes]]
model = "fast"
targets = [{{ provider = "p", model = "m" }}]
"#
    )
}

/// A replica serving `stable`, its text kept as the stable source.
async fn replica(stable: &str) -> Running {
    let gw = gateway(stable).await;
    gw.gateway.set_source(Some(stable.to_owned()));
    wait_until_up(&gw).await;
    gw
}

/// The upstream the replica's stable config sends route `fast` to.
fn stable_upstream(gw: &Running) -> String {
    gw.gateway.live().config.routes[0].targets[0]
        .provider
        .base_url
        .to_string()
}

async fn until(what: &str, within: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failing_canary_seen_by_one_replica_is_rolled_back_on_all() {
    let redis = RedisServer::start();
    let (good, bad) = (mock().await, mock().await);
    bad.set_faults(faults(
        serde_json::json!({"error_rate": 1.0, "error_status": 500}),
    ));
    let stable = text(good.addr(), &redis.url(), "");
    let candidate = text(
        bad.addr(),
        &redis.url(),
        "[rollout]\ncanary_percent = 50\nbake = \"1s\"\nmin_requests = 10",
    );
    let mut gws = Vec::new();
    for _ in 0..3 {
        let gw = replica(&stable).await;
        let s = apply_text(&gw.gateway, &candidate, "new.toml", Trigger::Direct);
        assert_eq!(s.outcome, Outcome::RolloutStarted);
        gws.push(gw);
    }
    // Only replica 0 gets traffic: only it sees the canary fail.
    for _ in 0..40 {
        client()
            .post(format!("{}/v1/chat/completions", gws[0].url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap();
    }
    until("every replica rolled back", Duration::from_secs(5), || {
        gws.iter().all(|g| g.gateway.rollout().is_none())
    })
    .await;
    // On its own, a replica without traffic would have baked on, then
    // promoted for lack of evidence (four bake times): it must not.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let good_url = format!("http://{}/v1", good.addr());
    for g in &gws {
        assert!(g.gateway.rollout().is_none());
        assert!(
            stable_upstream(g).starts_with(&good_url),
            "{}",
            stable_upstream(g)
        );
    }
}

#[tokio::test]
async fn a_promote_on_any_replica_applies_to_all_and_a_replica_that_joins_follows() {
    let redis = RedisServer::start();
    let (old, new) = (mock().await, mock().await);
    let stable = text(old.addr(), &redis.url(), "");
    // A long bake (ticks of a second): only an operator ends it.
    let candidate = text(
        new.addr(),
        &redis.url(),
        "[rollout]\ncanary_percent = 10\nbake = \"8s\"\nmin_requests = 1000",
    );
    let mut gws = Vec::new();
    for _ in 0..2 {
        let gw = replica(&stable).await;
        apply_text(&gw.gateway, &candidate, "new.toml", Trigger::Direct);
        gws.push(gw);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A replica that starts with the candidate file while they bake serves
    // the stable config and joins the rollout.
    let joiner = gateway(&candidate).await;
    joiner.gateway.set_source(Some(candidate.clone()));
    detour::reload::join_replicas_rollout(
        &joiner.gateway,
        &candidate,
        "new.toml",
        Duration::from_secs(5),
    )
    .await;
    let old_url = format!("http://{}/v1", old.addr());
    let new_url = format!("http://{}/v1", new.addr());
    assert!(joiner.gateway.rollout().is_some(), "the joiner bakes too");
    assert!(
        stable_upstream(&joiner).starts_with(&old_url),
        "{}",
        stable_upstream(&joiner)
    );

    // An operator promotes on replica 1.
    let admin = admin(&gws[1], "t").await;
    let r = client()
        .post(format!("{admin}/admin/rollout/promote"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gws.push(joiner);
    until("every replica promoted", Duration::from_secs(4), || {
        gws.iter().all(|g| g.gateway.rollout().is_none())
    })
    .await;
    for g in &gws {
        assert!(
            stable_upstream(g).starts_with(&new_url),
            "{}",
            stable_upstream(g)
        );
    }

    // A replica that starts with the promoted file just serves it.
    let late = gateway(&candidate).await;
    detour::reload::join_replicas_rollout(
        &late.gateway,
        &candidate,
        "new.toml",
        Duration::from_secs(5),
    )
    .await;
    assert!(late.gateway.rollout().is_none());
    assert!(stable_upstream(&late).starts_with(&new_url));
}

#[tokio::test]
async fn a_rollback_by_hand_holds_for_a_replica_that_starts_with_the_rolled_back_file() {
    let redis = RedisServer::start();
    let (old, new) = (mock().await, mock().await);
    let stable = text(old.addr(), &redis.url(), "");
    let candidate = text(
        new.addr(),
        &redis.url(),
        "[rollout]\ncanary_percent = 10\nbake = \"8s\"\nmin_requests = 1000",
    );
    let a = replica(&stable).await;
    apply_text(&a.gateway, &candidate, "new.toml", Trigger::Direct);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let admin = admin(&a, "t").await;
    let r = client()
        .post(format!("{admin}/admin/rollout/rollback"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let late = gateway(&candidate).await;
    detour::reload::join_replicas_rollout(
        &late.gateway,
        &candidate,
        "new.toml",
        Duration::from_secs(5),
    )
    .await;
    assert!(late.gateway.rollout().is_none());
    let old_url = format!("http://{}/v1", old.addr());
    assert!(
        stable_upstream(&late).starts_with(&old_url),
        "{}",
        stable_upstream(&late)
    );
}
