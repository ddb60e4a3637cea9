//! The official Python SDKs as real clients of a real gateway, each against
//! every provider kind behind it: the OpenAI SDK served by OpenAI-, Anthropic-
//! and Gemini-kind mocks, the Anthropic SDK by Anthropic- and OpenAI-kind ones.
//!
//! Needs a Python with the SDKs installed: `$DETOUR_PYTHON`, or `.venv/bin/python`
//! as `scripts/test.sh` (the README's test command) creates it. A missing SDK is
//! a failure, not a skip: a test that cannot fail is a defect.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::sdk::{gateway_to, upstream};
use detour::mock::Flavor;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("DETOUR_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the SDKs: run scripts/test.sh, or create .venv with \
         `python3 -m venv .venv && .venv/bin/pip install -r tests/sdk/requirements.txt`"
    );
    venv
}

async fn run_script(script: &str, args: &[String]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = tokio::process::Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
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
    run_script("openai_client.py", &args).await;
}

async fn anthropic_sdk(kind: &str, flavor: Flavor, model: &str) {
    let up = upstream(flavor).await;
    let gw = gateway_to(kind, &up, model).await;
    let args = [gw.url(), "dk-sdk".into(), "p".into(), model.into()];
    run_script("anthropic_client.py", &args).await;
}

#[tokio::test]
async fn openai_sdk_against_an_openai_provider() {
    openai_sdk("openai", Flavor::Openai, "gpt-up").await;
}

#[tokio::test]
async fn openai_sdk_against_an_openai_compatible_provider() {
    openai_sdk("openai-compatible", Flavor::Openai, "llama-local").await;
}

#[tokio::test]
async fn openai_sdk_against_an_anthropic_provider() {
    openai_sdk("anthropic", Flavor::Anthropic, "claude-up").await;
}

#[tokio::test]
async fn openai_sdk_against_a_gemini_provider() {
    openai_sdk("gemini", Flavor::Gemini, "gemini-up").await;
}

#[tokio::test]
async fn anthropic_sdk_against_an_anthropic_provider() {
    anthropic_sdk("anthropic", Flavor::Anthropic, "claude-up").await;
}

#[tokio::test]
async fn anthropic_sdk_against_an_openai_provider() {
    anthropic_sdk("openai", Flavor::Openai, "gpt-up").await;
}

#[tokio::test]
async fn anthropic_sdk_against_an_openai_compatible_provider() {
    anthropic_sdk("openai-compatible", Flavor::Openai, "llama-local").await;
}

#[tokio::test]
async fn anthropic_sdk_against_a_gemini_provider() {
    anthropic_sdk("gemini", Flavor::Gemini, "gemini-up").await;
}

/// The Responses API (`client.responses.create`: plain, streamed, the stream
/// helper, a tools round trip, errors, `previous_response_id`) against every
/// provider kind: passed through to OpenAI, translated for the others.
#[tokio::test]
async fn openai_sdk_responses_against_every_provider_kind() {
    for (kind, flavor, model) in [
        ("openai", Flavor::Openai, "gpt-up"),
        ("openai-compatible", Flavor::Openai, "llama-local"),
        ("anthropic", Flavor::Anthropic, "claude-up"),
        ("gemini", Flavor::Gemini, "gemini-up"),
    ] {
        let up = upstream(flavor).await;
        let gw = gateway_to(kind, &up, model).await;
        let args = [
            format!("{}/v1", gw.url()),
            "dk-sdk".into(),
            "p".into(),
            model.into(),
            kind.into(),
        ];
        run_script("openai_responses_client.py", &args).await;
    }
}
