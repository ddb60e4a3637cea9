//! Hardening (issue 9): what clients and operators see, and what the gateway
//! refuses to pass on. Real loopback HTTP against `detour mock`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

#[tokio::test]
async fn a_basic_authorization_beside_a_valid_x_api_key_is_let_in() {
    let up = mock().await;
    let keys = "[[keys]]\nkey = \"dk-good\"\ntenant = \"t\"\n";
    let gw = gateway(&format!("{}\n{keys}", one_route(up.addr(), "", ""))).await;
    let ask = |auth: Option<&'static str>, x_api_key: Option<&'static str>| {
        let mut req = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&chat(false));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(k) = x_api_key {
            req = req.header("x-api-key", k);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // A proxy or SDK adds its own Basic credentials; the gateway key is in x-api-key.
    assert_eq!(ask(Some("Basic dXNlcjpwYXNz"), Some("dk-good")).await, 200);
    assert_eq!(ask(Some("Bearer dk-good"), None).await, 200);
    assert_eq!(ask(None, Some("dk-good")).await, 200);
    // A Bearer key is the one presented: a wrong one is not rescued by x-api-key.
    assert_eq!(ask(Some("Bearer dk-bad"), Some("dk-good")).await, 401);
    assert_eq!(ask(Some("Basic dXNlcjpwYXNz"), Some("dk-bad")).await, 401);
    assert_eq!(ask(Some("Basic dXNlcjpwYXNz"), None).await, 401);
}
