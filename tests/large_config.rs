//! A config with thousands of keys (issue 12, item 5): loaded a batch of
//! `[[keys]]` tables at a time (config::chunks), with the same keys, the
//! same limits and the same diagnostics (file line and key path) as one
//! whole parse gives.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, client, gateway, mock, one_route};
use detour::config::{load_str, ConfigError, Tier};
use sha2::{Digest, Sha256};

const KEYS: usize = 3000;

/// `KEYS` keys (over 256 KiB, so loaded in batches), with a route table,
/// comments, a multi-line array and a multi-line string in between.
/// `key(i)` may replace key `i`'s table.
fn keys(key: impl Fn(usize) -> Option<String>) -> String {
    let mut text = String::new();
    for i in 0..KEYS {
        match key(i) {
            Some(own) => text.push_str(&own),
            None => text.push_str(&format!(
                "[[keys]] # key {i}\nkey = \"dk-{i:06}\"\ntenant = \"t{}\"\nrpm = {}\n\
                 tier = \"{}\"\n\n",
                i % 7,
                i + 1,
                if i % 2 == 0 { "critical" } else { "sheddable" },
            )),
        }
        if i == 1500 {
            text.push_str(
                "[[routes]]\nmodel = \"later\"\n# [[keys]] in a comment\n\
                 targets = [\n  { provider = \"p\", model = \"m\" },\n]\n\n",
            );
        }
        if i == 10 {
            text.push_str(&format!("# {}\n", "padding ".repeat(40_000)));
        }
    }
    text
}

fn config(keys: &str) -> String {
    one_route("127.0.0.1:9".parse().unwrap(), "", "") + keys
}

/// The 1-based line of the first `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text[..text.find(needle).unwrap()].lines().count() + 1
}

#[test]
fn every_key_is_loaded_in_order_with_its_own_values() {
    let text = config(&keys(|_| None));
    assert!(text.len() > 256 * 1024, "large enough to load in batches");
    let c = load_str(&text, "big.toml").unwrap();
    assert_eq!(c.keys.len(), KEYS);
    assert_eq!(c.routes.len(), 2, "the route between the keys");
    for (i, k) in c.keys.iter().enumerate() {
        let digest: [u8; 32] = Sha256::digest(format!("dk-{i:06}")).into();
        assert_eq!(k.sha256, digest, "key {i}");
        assert_eq!(k.name, format!("key-{i}"));
        assert_eq!(k.tenant, format!("t{}", i % 7));
        assert_eq!(k.rpm, Some(i as u32 + 1));
        let tier = if i % 2 == 0 {
            Tier::Critical
        } else {
            Tier::Sheddable
        };
        assert_eq!(k.tier, tier);
    }
}

fn diagnostics(text: &str) -> Vec<detour::config::Diagnostic> {
    match load_str(text, "big.toml") {
        Err(ConfigError::Invalid(d)) => d,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_problem_in_a_late_key_is_reported_at_its_line_in_the_file() {
    let bad = |i: usize| {
        (i == 2500).then(|| {
            "[[keys]]\nkey = \"dk-bad\"\ntenant = \"t\"\n\n\ntier = \"urgent\"\n\n".to_owned()
        })
    };
    let text = config(&keys(bad));
    let d = diagnostics(&text);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].key, "keys[2500].tier");
    assert_eq!(d[0].line, line_of(&text, "tier = \"urgent\""));
    assert_eq!(d[0].column, 8);
}

#[test]
fn a_problem_after_the_keys_is_reported_at_its_line_in_the_file() {
    let text = config(&keys(|_| None)) + "\n[[routes]]\nmodel = \"fast\"\ntargets = []\n";
    let d = diagnostics(&text);
    let dup = d.iter().find(|d| d.message.contains("duplicate")).unwrap();
    assert_eq!(dup.key, "routes[2].model");
    assert_eq!(dup.line, text.lines().count() - 1);
}

#[test]
fn an_unknown_key_or_a_broken_table_is_still_found_and_placed() {
    let unknown = |i: usize| {
        (i == 2999).then(|| "[[keys]]\nkey = \"dk-x\"\ntenant = \"t\"\nrmp = 5\n".to_owned())
    };
    let text = config(&keys(unknown));
    let d = diagnostics(&text);
    assert_eq!(d[0].key, "keys[2999].rmp");
    assert_eq!(d[0].message, "unknown key");
    assert_eq!(d[0].line, line_of(&text, "rmp = 5"));

    let broken = |i: usize| (i == 700).then(|| "[[keys]]\nkey = \"dk-x\ntenant = 1\n".to_owned());
    let text = config(&keys(broken));
    let d = diagnostics(&text);
    assert_eq!(d[0].line, line_of(&text, "key = \"dk-x"), "{d:?}");
}

#[tokio::test]
async fn the_limits_of_a_late_key_hold_through_the_gateway() {
    let up = mock().await;
    let limited = |i: usize| {
        (i == 2998).then(|| "[[keys]]\nkey = \"dk-late\"\ntenant = \"t\"\nrpm = 2\n\n".to_owned())
    };
    let text = one_route(up.addr(), "", "") + &keys(limited);
    let gw = gateway(&text).await;
    let call = |key: &'static str| {
        client()
            .post(format!("http://{}/v1/chat/completions", gw.addr))
            .bearer_auth(key)
            .json(&chat(false))
            .send()
    };
    assert_eq!(call("dk-late").await.unwrap().status(), 200);
    assert_eq!(call("dk-late").await.unwrap().status(), 200);
    assert_eq!(call("dk-late").await.unwrap().status(), 429, "rpm = 2");
    assert_eq!(call("dk-002997").await.unwrap().status(), 200);
    assert_eq!(call("dk-nope").await.unwrap().status(), 401);
}
