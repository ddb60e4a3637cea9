//! The official Python SDKs as real clients of a real gateway.
//!
//! Needs a Python with the SDKs installed: `$DETOUR_PYTHON`, or `.venv/bin/python`
//! as `scripts/test.sh` (the README's test command) creates it. A missing SDK is
//! a failure, not a skip: a test that cannot fail is a defect.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::*;

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

#[tokio::test]
async fn openai_sdk_against_an_openai_provider() {
    let up = mock().await;
    let keys = "\n[[keys]]\nkey = \"dk-sdk\"\ntenant = \"sdk\"\n";
    let gw = gateway(&format!("{}{keys}", one_route(up.addr(), "", ""))).await;
    run_script(
        "openai_client.py",
        &[format!("{}/v1", gw.url()), "dk-sdk".to_owned()],
    )
    .await;
}
