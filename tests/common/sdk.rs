//! The gateway the SDK tests (Python and Node) run their clients against.

use detour::mock::{self, Flavor, MockOptions, MockServer};

use super::gateway;

/// A mock provider of `flavor` on a free loopback port.
pub async fn upstream(flavor: Flavor) -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(flavor, listener, MockOptions::default())
        .await
        .unwrap()
}

/// A gateway with route `fast` → provider `p` of `kind` at `up`, model `model`.
pub async fn gateway_to(kind: &str, up: &MockServer, model: &str) -> detour::server::Running {
    let base = match kind {
        "gemini" => format!("http://{}/v1beta", up.addr()),
        _ => format!("http://{}/v1", up.addr()),
    };
    gateway(&format!(
        r#"
[[providers]]
name = "p"
kind = "{kind}"
base_url = "{base}"
api_key = "upstream-key"

[[routes]]
model = "fast"
targets = [{{ provider = "p", model = "{model}" }}]

[[keys]]
key = "dk-sdk"
tenant = "sdk"

# May call no route this gateway has: a 403 (the SDKs' PermissionDeniedError).
[[keys]]
key = "dk-sdk-limited"
tenant = "sdk"
models = ["other-*"]

# One request a minute: the second is a 429 (the SDKs' RateLimitError).
[[keys]]
key = "dk-sdk-rpm"
tenant = "sdk-rpm"
rpm = 1
"#
    ))
    .await
}
