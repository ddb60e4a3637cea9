//! Operating a running gateway: hot reload (file change, SIGHUP, admin),
//! phased rollout with automatic promotion and rollback, last-known-good,
//! the admin listener under a saturated main listener, and secrets kept out
//! of logs and admin output. Real processes, real signals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::serve::{Serve, BIN, TOKEN};
use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

use common::serve::free_port;

fn config_to(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr, extra: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin}"
{extra}

[[providers]]
name = "p"
kind = "openai"
base_url = "http://{upstream}/v1"
api_key = "${{DETOUR_TEST_UPSTREAM_KEY}}"

[[routes]]
model = "fast"
targets = [{{ provider = "p", model = "m" }}]

[[keys]]
key = "${{DETOUR_TEST_GATEWAY_KEY}}"
tenant = "t"
"#
    )
}

async fn ask(listen: SocketAddr) -> reqwest::Response {
    client()
        .post(format!("http://{listen}/v1/chat/completions"))
        .bearer_auth("dk-gateway-SECRET-2")
        .json(&chat(false))
        .send()
        .await
        .unwrap()
}

async fn admin_get(admin: SocketAddr, path: &str) -> Value {
    client()
        .get(format!("http://{admin}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls until `f` is true, failing after 5 s.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// As in production (the human format, to a pipe): one line per request,
/// written straight to the log writer, which `RUST_LOG` still governs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_logs_one_line_that_rust_log_can_turn_off() {
    let up = mock().await;
    for (rust_log, logged) in [("info", true), ("info,detour::request=warn", false)] {
        let dir = tempfile::tempdir().unwrap();
        let (listen, admin) = (free_port(), free_port());
        let path = dir.path().join("detour.toml");
        std::fs::write(&path, config_to(listen, admin, up.addr(), "")).unwrap();
        let serve = Serve::start_logging("human", &path, &[], &[("RUST_LOG", rust_log)]);
        serve.wait_ready(listen).await;
        assert_eq!(ask(listen).await.status(), 200);
        assert_eq!(ask(listen).await.status(), 200);
        let request_lines = || {
            serve
                .log()
                .lines()
                .filter(|l| l.contains(" INFO detour::request: request "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        if logged {
            eventually("two request lines", || {
                let n = request_lines().len();
                async move { n == 2 }
            })
            .await;
            let line = &request_lines()[0];
            for field in [
                "request_id=req_",
                " format=\"openai\" endpoint=\"chat_completions\" tenant=\"t\" route=\"fast\"",
                " provider=\"p\" model=\"m\" status=200 attempts=1 stream=false latency_ms=",
                " outcome=\"ok\"",
            ] {
                assert!(line.contains(field), "{field} in {line}");
            }
            assert!(!line.contains("continued_by"), "{line}");
        } else {
            // Other lines at info still come: the filter is the target's.
            eventually("the listening line", || {
                let seen = serve.log().contains("listening on");
                async move { seen }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(request_lines(), Vec::<String>::new(), "{}", serve.log());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_applied_and_a_broken_one_refused() {
    let (a, b) = (mock().await, mock().await);
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let path = dir.path().join("detour.toml");
    std::fs::write(&path, config_to(listen, admin, a.addr(), "")).unwrap();
    let serve = Serve::start(&path, &[]);
    serve.wait_ready(listen).await;
    assert_eq!(ask(listen).await.status(), 200);
    assert_eq!(a.stats().requests, 1);

    // A long stream that starts on the old config must finish on it.
    a.set_faults(faults(json!({"chunks": 6, "chunk_gap_ms": 150})));
    let mut body = chat(true);
    body["model"] = json!("fast");
    let in_flight = tokio::spawn(
        client()
            .post(format!("http://{listen}/v1/chat/completions"))
            .bearer_auth("dk-gateway-SECRET-2")
            .json(&body)
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    std::fs::write(&path, config_to(listen, admin, b.addr(), "")).unwrap();
    eventually("traffic moves to the new upstream", || async {
        ask(listen).await.status() == 200 && b.stats().requests > 0
    })
    .await;
    let text = in_flight.await.unwrap().unwrap().text().await.unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight stream was cut: {text}"
    );

    // A broken file: refused with file/line/key, the running config stays.
    std::fs::write(&path, "[server]\nlisten = 42\n").unwrap();
    eventually("the refusal is visible", || async {
        admin_get(admin, "/admin/reload").await["last_reload"]["outcome"] == "rejected"
    })
    .await;
    let status = admin_get(admin, "/admin/reload").await;
    let error = status["last_reload"]["errors"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("detour.toml:2:") && error.contains("server.listen"),
        "{error}"
    );
    let before = b.stats().requests;
    assert_eq!(ask(listen).await.status(), 200);
    assert_eq!(b.stats().requests, before + 1);
    assert!(serve.log().contains("config refused"), "{}", serve.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_the_admin_api_reload_too() {
    let (a, b) = (mock().await, mock().await);
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let path = dir.path().join("detour.toml");
    std::fs::write(&path, config_to(listen, admin, a.addr(), "")).unwrap();
    let serve = Serve::start(&path, &[]);
    serve.wait_ready(listen).await;

    let pid = serve.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    eventually("SIGHUP reloads", || async {
        admin_get(admin, "/admin/reload").await["last_reload"]["trigger"] == "sighup"
    })
    .await;
    assert_eq!(
        admin_get(admin, "/admin/reload").await["last_reload"]["outcome"],
        "unchanged"
    );

    std::fs::write(&path, config_to(listen, admin, b.addr(), "")).unwrap();
    let resp = client()
        .post(format!("http://{admin}/admin/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(ask(listen).await.status() == 200);
    eventually("the reloaded config serves", || async {
        ask(listen).await.status() == 200 && b.stats().requests > 0
    })
    .await;
}

fn rollout_config(upstream: SocketAddr, rollout: &str) -> String {
    format!(
        r#"
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

const CANARY: &str = "[rollout]\ncanary_percent = 50\nbake = \"1s\"\nmin_requests = 10";

#[tokio::test]
async fn a_healthy_canary_is_promoted_by_itself() {
    let (a, b) = (mock().await, mock().await);
    let gw = gateway(&rollout_config(a.addr(), "")).await;
    let status = detour::reload::apply_text(
        &gw.gateway,
        &rollout_config(b.addr(), CANARY),
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    assert_eq!(status.outcome, detour::reload::Outcome::RolloutStarted);
    let admin = admin(&gw, "t").await;
    let view: Value = client()
        .get(format!("{admin}/admin/rollout"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "baking");
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.gateway.rollout().is_some() {
        assert!(Instant::now() < deadline, "never promoted");
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(
        a.stats().requests > 0 && b.stats().requests > 0,
        "both configs served during the bake"
    );
    let before = a.stats().requests;
    for _ in 0..10 {
        client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(
        a.stats().requests,
        before,
        "after promotion only the new config serves"
    );
}

#[tokio::test]
async fn a_failing_canary_rolls_itself_back() {
    let (a, b) = (mock().await, mock().await);
    b.set_faults(faults(json!({"error_rate": 1.0, "error_status": 500})));
    let gw = gateway(&rollout_config(a.addr(), "")).await;
    detour::reload::apply_text(
        &gw.gateway,
        &rollout_config(b.addr(), CANARY),
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut errors = 0;
    while gw.gateway.rollout().is_some() {
        assert!(Instant::now() < deadline, "never rolled back");
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        errors += usize::from(resp.status() != 200);
    }
    assert!(errors > 0, "the canary did serve (and fail)");
    for _ in 0..10 {
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "the stable config is back for everyone");
    }
}

#[tokio::test]
async fn an_operator_can_promote_or_roll_back_by_hand() {
    let (a, b) = (mock().await, mock().await);
    let gw = gateway(&rollout_config(a.addr(), "")).await;
    let admin = admin(&gw, "t").await;
    let slow = "[rollout]\ncanary_percent = 10\nbake = \"1h\"";
    let post = |path: &'static str| {
        let admin = admin.clone();
        async move {
            client()
                .post(format!("{admin}{path}"))
                .bearer_auth("t")
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    detour::reload::apply_text(
        &gw.gateway,
        &rollout_config(b.addr(), slow),
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    assert_eq!(post("/admin/rollout/rollback").await, 200);
    assert!(gw.gateway.rollout().is_none());
    assert_eq!(post("/admin/rollout/rollback").await, 409);
    detour::reload::apply_text(
        &gw.gateway,
        &rollout_config(b.addr(), slow),
        "new.toml",
        detour::reload::Trigger::Direct,
    );
    assert_eq!(post("/admin/rollout/promote").await, 200);
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(b.stats().requests, 1);
    assert_eq!(a.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_can_start_from_the_last_known_good() {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let path = dir.path().join("detour.toml");
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap().to_owned();
    std::fs::write(&path, config_to(listen, admin, up.addr(), "")).unwrap();
    {
        let serve = Serve::start(&path, &["--state-dir", &state_arg]);
        serve.wait_ready(listen).await;
        assert_eq!(ask(listen).await.status(), 200);
        let lkg = detour::reload::lkg_path(&state);
        eventually("the config is saved as last-known-good", || async {
            lkg.exists()
        })
        .await;
        let saved = std::fs::read_to_string(&lkg).unwrap();
        assert!(
            !saved.contains("SECRET"),
            "secrets stay in the environment, not on disk"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&lkg).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o777,
                0o600,
                "a literal key would be readable: {mode:o}"
            );
        }
    }
    std::fs::write(&path, "[[routes]]\nmodel = 1\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--state-dir", &state_arg])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "without the flag a broken config is refused"
    );

    let serve = Serve::start(
        &path,
        &["--state-dir", &state_arg, "--fallback-last-known-good"],
    );
    serve.wait_ready(listen).await;
    assert_eq!(ask(listen).await.status(), 200);
    assert!(serve.log().contains("LAST-KNOWN-GOOD"), "{}", serve.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_while_the_main_one_is_saturated() {
    let up = mock().await;
    up.set_faults(faults(json!({"latency_ms": 3000})));
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let path = dir.path().join("detour.toml");
    std::fs::write(
        &path,
        config_to(listen, admin, up.addr(), "max_concurrent_requests = 20"),
    )
    .unwrap();
    let serve = Serve::start(&path, &[]);
    serve.wait_ready(listen).await;

    // The operator's client, connected before the storm.
    let operator = client();
    operator
        .get(format!("http://{admin}/admin/health"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    // 200 clients against a limit of 20: the main listener is far past capacity.
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(tokio::spawn(
            async move { ask(listen).await.status().as_u16() },
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let health: Value = operator
            .get(format!("http://{admin}/admin/health"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        assert!(health["routes"].is_array());
    }
    assert!(
        slowest < Duration::from_millis(100),
        "admin took {slowest:?}"
    );
    let statuses: Vec<u16> = futures_util::future::join_all(flood)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let shed = statuses.iter().filter(|s| **s == 503).count();
    assert!(shed >= 150, "the limit did not hold: {shed} shed");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_admin_output() {
    let up = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let path = dir.path().join("detour.toml");
    std::fs::write(&path, config_to(listen, admin, up.addr(), "")).unwrap();
    let serve = Serve::start(&path, &[]);
    serve.wait_ready(listen).await;
    assert_eq!(ask(listen).await.status(), 200);
    let wrong = client()
        .post(format!("http://{listen}/v1/chat/completions"))
        .bearer_auth("dk-guess-SECRET-3")
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let mut seen = String::new();
    for p in ["/admin/config", "/admin/health", "/admin/reload"] {
        seen.push_str(&admin_get(admin, p).await.to_string());
    }
    // The upstream did get detour's key: the test would see it if it leaked.
    assert!(up.requests()[0]
        .headers
        .iter()
        .any(|(_, v)| v.contains("sk-upstream-SECRET-1")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    seen.push_str(&serve.log());
    assert!(
        serve.log().contains("\"request_id\""),
        "the request log lines are there: {}",
        serve.log()
    );
    for secret in [
        "sk-upstream-SECRET-1",
        "dk-gateway-SECRET-2",
        "dk-guess-SECRET-3",
        "Say hello",
    ] {
        assert!(!seen.contains(secret), "{secret} leaked:\n{seen}");
    }
}
