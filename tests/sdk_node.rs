//! The official Node SDKs (`openai` and `@anthropic-ai/sdk` from npm) as real
//! clients of a real gateway, each against every provider kind behind it: the
//! same scenarios as the Python SDK tests (tests/sdk.rs), run by the scripts in
//! tests/node/.
//!
//! Needs `node` (`$DETOUR_NODE`, or `node` on the PATH) and the SDKs installed
//! in tests/node/node_modules, as `scripts/test.sh` (the README's test command)
//! does with `npm ci`. A missing SDK is a failure, not a skip: a test that
//! cannot fail is a defect.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::sdk::{gateway_to, upstream};
use detour::mock::Flavor;

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/node")
}

fn node() -> PathBuf {
    let node = std::env::var_os("DETOUR_NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from);
    let modules = node_dir().join("node_modules");
    for package in ["openai", "@anthropic-ai/sdk"] {
        assert!(
            modules.join(package).join("package.json").exists(),
            "the Node SDK `{package}` is not installed in tests/node/node_modules: run \
             scripts/test.sh, or `npm ci --prefix tests/node`"
        );
    }
    node
}

/// How long one script may take: its SDK calls time out after 20 s each, but a
/// gateway that hangs must not hang the suite.
const SCRIPT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

async fn run_script(script: &str, args: &[String]) {
    let node = node();
    let mut command = tokio::process::Command::new(&node);
    command
        .arg(node_dir().join(script))
        .args(args)
        .current_dir(node_dir())
        // Loopback requests never go through a proxy set in the environment
        // (which Node honours with NODE_USE_ENV_PROXY).
        .env_remove("NODE_USE_ENV_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .kill_on_drop(true);
    let out = tokio::time::timeout(SCRIPT_DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{script} still ran after {SCRIPT_DEADLINE:?}"))
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{}` ({e}): install Node.js 18 or newer (scripts/test.sh does), \
                 or point $DETOUR_NODE at it",
                node.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Shown with --no-capture: which scenarios ran.
    print!("{stdout}");
}

async fn openai_sdk(kind: &str, flavor: Flavor, model: &str) {
    let up = upstream(flavor).await;
    let gw = gateway_to(kind, &up, model).await;
    let args = [
        format!("{}/v1", gw.url()),
        "dk-sdk".into(),
        "p".into(),
        model.into(),
    ];
    run_script("openai_client.mjs", &args).await;
}

async fn anthropic_sdk(kind: &str, flavor: Flavor, model: &str) {
    let up = upstream(flavor).await;
    let gw = gateway_to(kind, &up, model).await;
    let args = [gw.url(), "dk-sdk".into(), "p".into(), model.into()];
    run_script("anthropic_client.mjs", &args).await;
}

#[tokio::test]
async fn node_openai_sdk_against_an_openai_provider() {
    openai_sdk("openai", Flavor::Openai, "gpt-up").await;
}

#[tokio::test]
async fn node_openai_sdk_against_an_openai_compatible_provider() {
    openai_sdk("openai-compatible", Flavor::Openai, "llama-local").await;
}

#[tokio::test]
async fn node_openai_sdk_against_an_anthropic_provider() {
    openai_sdk("anthropic", Flavor::Anthropic, "claude-up").await;
}

#[tokio::test]
async fn node_openai_sdk_against_a_gemini_provider() {
    openai_sdk("gemini", Flavor::Gemini, "gemini-up").await;
}

#[tokio::test]
async fn node_anthropic_sdk_against_an_anthropic_provider() {
    anthropic_sdk("anthropic", Flavor::Anthropic, "claude-up").await;
}

#[tokio::test]
async fn node_anthropic_sdk_against_an_openai_provider() {
    anthropic_sdk("openai", Flavor::Openai, "gpt-up").await;
}

#[tokio::test]
async fn node_anthropic_sdk_against_an_openai_compatible_provider() {
    anthropic_sdk("openai-compatible", Flavor::Openai, "llama-local").await;
}

#[tokio::test]
async fn node_anthropic_sdk_against_a_gemini_provider() {
    anthropic_sdk("gemini", Flavor::Gemini, "gemini-up").await;
}
