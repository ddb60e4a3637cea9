//! The `detour` binary as a user runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_detour");

fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("detour.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const BAD: &str = r#"[server]
listen = "127.0.0.1:0"

[[providers]]
name = "openai"
kind = "openai"
base_url = "ftp://example.com"
api_key = "${DETOUR_TEST_SURELY_UNSET}"
timeout = "5s"

[[routes]]
model = "fast"
targets = [{ provider = "anthropic", model = "claude" }]
"#;

#[test]
fn check_reports_every_error_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, BAD);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    let file = path.display().to_string();
    for needle in [
        format!("{file}:9:1: providers[0].timeout: unknown key"),
        format!("{file}:7:12: providers[0].base_url: `ftp` URLs are not supported"),
        format!("{file}:8:11: providers[0].api_key: environment variable `DETOUR_TEST_SURELY_UNSET` is not set"),
        format!("{file}:13:25: routes[0].targets[0].provider: unknown provider `anthropic`"),
    ] {
        assert!(err.contains(&needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn check_accepts_a_good_config_and_never_prints_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        r#"[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${DETOUR_TEST_KEY}"

[[routes]]
model = "fast"
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
"#,
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env("DETOUR_TEST_KEY", "sk-very-secret-value")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("ok (1 providers, 1 routes, 0 keys)"), "{all}");
    assert!(!all.contains("sk-very-secret-value"));
}

/// What `serve` would refuse, `check` refuses first: a `base_url` fragment
/// (which would be dropped from every URL) and an `api_key` that cannot be
/// sent in a header (serve fails building the provider's headers).
#[test]
fn check_refuses_a_base_url_fragment_and_a_key_that_cannot_be_a_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        r#"[[providers]]
name = "a"
kind = "openai"
base_url = "https://example.com/v1?api-version=1#frag"

[[providers]]
name = "b"
kind = "anthropic"
base_url = "https://example.com/v1?api-version=1"
api_key = "${DETOUR_TEST_BAD_KEY}"

[[routes]]
model = "fast"
targets = [{ provider = "a", model = "m" }, { provider = "b", model = "m" }]
"#,
    );
    for cmd in ["check", "serve"] {
        let out = Command::new(BIN)
            .args([cmd, "--config"])
            .arg(&path)
            .env("DETOUR_TEST_BAD_KEY", "sk-SECRET\nx-injected: 1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8(out.stderr).unwrap();
        let file = path.display().to_string();
        for needle in [
            format!("{file}:4:12: providers[0].base_url: "),
            "fragment".to_owned(),
            format!("{file}:10:11: providers[1].api_key: "),
            "header".to_owned(),
        ] {
            assert!(
                err.contains(&needle),
                "{cmd}: missing {needle:?} in:\n{err}"
            );
        }
        assert!(!err.contains("SECRET"), "{cmd}: {err}");
    }
}

#[test]
fn serve_refuses_an_invalid_config_with_the_same_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, BAD);
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("routes[0].targets[0].provider: unknown provider"),
        "{err}"
    );
}

/// Kills the child when the test ends, pass or fail.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_warns_loudly_when_running_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "[server]\nlisten = \"127.0.0.1:0\"\n");
    let mut child = Child(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut seen = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("listening on") {
            break;
        }
    }
    assert!(seen.contains("NO API KEYS CONFIGURED"), "{seen}");
    // The log goes to a pipe, not a terminal: plain text, no colour codes.
    assert!(!seen.contains('\x1b'), "{seen:?}");
}

#[test]
fn demo_starts_and_answers_without_keys() {
    let mut child = Child(
        Command::new(BIN)
            .args(["demo", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut url = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("gateway") {
            url = Some(rest.trim().to_owned());
            break;
        }
    }
    let url = url.expect("the demo prints the gateway's address");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).no_proxy().build().unwrap();
        let resp = client
            .post(format!("{url}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-detour-provider"], "primary");
    });
}
