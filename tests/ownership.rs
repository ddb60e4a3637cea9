//! Who owns the state that outlives a config: rate-limit buckets and in-flight
//! counts survive a reload (new values apply), a canary's failures stay out of
//! the stable config's health, and a request runs on one config snapshot from
//! authentication to its answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use detour::mock::MockOptions;
use serde_json::json;
use tokio::time::Instant;

fn config(upstream: SocketAddr, api_key: &str, alias: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

{extra}

[[providers]]
name = "p"
kind = "openai"
base_url = "http://{upstream}/v1"
api_key = "{api_key}"

[[routes]]
model = "{alias}"
targets = [{{ provider = "p", model = "m" }}]
"#
    )
}

fn load(text: &str) -> detour::config::Config {
    detour::config::load_str(text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

async fn call(gw: &detour::server::Running, key: &str) -> u16 {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(key)
        .json(&chat(false))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_key_at_its_rate_limit_stays_limited_across_a_reload_and_a_raised_limit_applies() {
    let up = mock().await;
    let keys = |rpm: u32, other: &str| {
        format!("[[keys]]\nkey = \"k1\"\ntenant = \"a\"\nrpm = {rpm}\n{other}")
    };
    let gw = gateway(&config(up.addr(), "sk", "fast", &keys(2, ""))).await;
    assert_eq!(call(&gw, "k1").await, 200);
    assert_eq!(call(&gw, "k1").await, 200);
    assert_eq!(call(&gw, "k1").await, 429);

    // An unrelated change (one more key): k1 gets no fresh minute.
    let unrelated = keys(2, "\n[[keys]]\nkey = \"k2\"\ntenant = \"b\"\n");
    gw.gateway
        .swap(load(&config(up.addr(), "sk", "fast", &unrelated)))
        .unwrap();
    assert_eq!(call(&gw, "k1").await, 429, "the reload reset k1's bucket");
    assert_eq!(call(&gw, "k2").await, 200);

    // A raised limit applies at once, counting what k1 already used.
    gw.gateway
        .swap(load(&config(up.addr(), "sk", "fast", &keys(5, ""))))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(call(&gw, "k1").await, 200, "the raised limit did not apply");
    }
    assert_eq!(call(&gw, "k1").await, 429, "2 + 3 of 5 used");
}

#[tokio::test]
async fn requests_in_flight_keep_counting_against_a_concurrency_limit_across_a_reload() {
    let up = mock().await;
    up.set_faults(faults(json!({"latency_ms": 1500})));
    let keys = |extra: &str| {
        format!("[[keys]]\nkey = \"k1\"\ntenant = \"a\"\nmax_concurrent = 1\n{extra}")
    };
    let gw = gateway(&config(up.addr(), "sk", "fast", &keys(""))).await;
    let url = gw.url();
    let slow = tokio::spawn(async move {
        client()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth("k1")
            .json(&chat(false))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.stats().requests == 0 {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unrelated = keys("\n[[keys]]\nkey = \"k2\"\ntenant = \"b\"\n");
    gw.gateway
        .swap(load(&config(up.addr(), "sk", "fast", &unrelated)))
        .unwrap();
    assert_eq!(
        call(&gw, "k1").await,
        429,
        "the request in flight no longer counted after the reload"
    );
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn a_canary_with_a_wrong_provider_key_leaves_stable_traffic_served() {
    let up = mock_with(MockOptions {
        api_key: Some("sk-right".into()),
        ..MockOptions::default()
    })
    .await;
    let gw = gateway(&config(up.addr(), "sk-right", "fast", "")).await;
    assert_eq!(call(&gw, "any").await, 200);

    // The canary takes every request, and its key is wrong: 401 upstream.
    let canary = "[rollout]\ncanary_percent = 100\nbake = \"60s\"\nmin_requests = 1000";
    let status = detour::reload::apply_text(
        &gw.gateway,
        &config(up.addr(), "sk-wrong", "fast", canary),
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    assert_eq!(status.outcome, detour::reload::Outcome::RolloutStarted);
    for _ in 0..3 {
        assert_ne!(call(&gw, "any").await, 200, "the canary's key is wrong");
    }

    assert!(gw.gateway.rollback());
    for _ in 0..5 {
        assert_eq!(
            call(&gw, "any").await,
            200,
            "the canary's rejected key took the target away from the stable config"
        );
    }
}

#[tokio::test]
async fn a_request_runs_on_one_config_from_authentication_to_its_answer() {
    let up = mock().await;
    up.set_faults(faults(json!({"latency_ms": 1000})));
    let server = "[server]\nmax_concurrent_requests = 1\nqueue_timeout = \"20s\"\n";
    let with_key = |alias: &str, key: &str| {
        config(
            up.addr(),
            "sk",
            alias,
            &format!("[[keys]]\nkey = \"{key}\"\ntenant = \"a\"\n"),
        )
        .replacen("[server]", server, 1)
    };
    let gw = gateway(&with_key("fast", "k1")).await;
    let url = gw.url();
    let first = {
        let url = url.clone();
        tokio::spawn(async move {
            client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth("k1")
                .json(&chat(false))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.stats().requests == 0 {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The second request is authenticated with k1 and waits for the slot.
    let second = tokio::spawn(async move {
        let resp = client()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth("k1")
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    while gw.gateway.admission().waiting() == 0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A reload while it waits: k1 is gone and `fast` is now `other`.
    gw.gateway.swap(load(&with_key("other", "k2"))).unwrap();
    assert_eq!(first.await.unwrap(), 200);
    let (status, body) = second.await.unwrap();
    assert_eq!(
        status, 200,
        "the request saw two configs (authenticated on one, answered on another): {body}"
    );
}

#[tokio::test]
async fn a_reload_keeps_failed_authentications_counted_and_applies_a_new_allowance() {
    let up = mock().await;
    let text = |per_minute: u32| {
        let server = format!("[server]\nauth_failures_per_minute = {per_minute}\n");
        config(
            up.addr(),
            "sk",
            "fast",
            "[[keys]]\nkey = \"k1\"\ntenant = \"a\"\n",
        )
        .replacen("[server]", &server, 1)
    };
    let gw = gateway(&text(2)).await;
    assert_eq!(call(&gw, "wrong").await, 401);
    assert_eq!(call(&gw, "wrong").await, 401);
    assert_eq!(call(&gw, "k1").await, 429, "2 of 2 failures used");

    gw.gateway.swap(load(&text(2))).unwrap();
    assert_eq!(call(&gw, "k1").await, 429, "the reload forgave the address");

    gw.gateway.swap(load(&text(10))).unwrap();
    assert_eq!(
        call(&gw, "k1").await,
        200,
        "the raised allowance did not apply"
    );
}

#[tokio::test]
async fn requests_in_flight_keep_their_admission_slots_across_a_reload() {
    let up = mock().await;
    up.set_faults(faults(json!({"latency_ms": 1500})));
    let text = |alias: &str| {
        config(up.addr(), "sk", alias, "").replacen(
            "[server]",
            "[server]\nmax_concurrent_requests = 1\nqueue_timeout = \"2ms\"\n",
            1,
        )
    };
    let gw = gateway(&text("fast")).await;
    let url = gw.url();
    let slow = tokio::spawn(async move {
        client()
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat(false))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.stats().requests == 0 {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An unrelated change: a second alias.
    let unrelated = text("fast")
        + "\n[[routes]]\nmodel = \"other\"\ntargets = [{ provider = \"p\", model = \"m\" }]\n";
    gw.gateway.swap(load(&unrelated)).unwrap();
    assert_eq!(
        call(&gw, "any").await,
        503,
        "the reload gave a fresh slot while the only one is taken"
    );
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn a_canary_request_is_authenticated_by_the_canarys_keys() {
    let up = mock().await;
    let keys = |key: &str| format!("[[keys]]\nkey = \"{key}\"\ntenant = \"a\"\n");
    let gw = gateway(&config(up.addr(), "sk", "fast", &keys("k1"))).await;
    assert_eq!(call(&gw, "k2").await, 401);
    // Every request is the canary's, and the canary knows k2 only.
    let canary = "[rollout]\ncanary_percent = 100\nbake = \"60s\"\nmin_requests = 1000\n";
    let status = detour::reload::apply_text(
        &gw.gateway,
        &config(
            up.addr(),
            "sk",
            "fast",
            &format!("{canary}\n{}", keys("k2")),
        ),
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    assert_eq!(status.outcome, detour::reload::Outcome::RolloutStarted);
    assert_eq!(
        call(&gw, "k2").await,
        200,
        "the canary's own key was refused"
    );
    assert_eq!(
        call(&gw, "k1").await,
        401,
        "a key the canary removed still served it"
    );
    assert!(gw.gateway.rollback());
    assert_eq!(call(&gw, "k1").await, 200);
}
