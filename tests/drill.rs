//! `detour drill` as a team's CI runs it: the real binary on a config file,
//! `--quick --json`, judged by its exit code and its JSON card.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Output;

use common::serve::BIN;
use serde_json::Value;

/// Two providers of different kinds on one route, hedged; a critical and a
/// sheddable key; admission by tier above 16 requests in flight.
const TWO_PROVIDERS: &str = r#"
[server]
listen = "127.0.0.1:8080"
max_concurrent_requests = 16

[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${DRILL_TEST_OPENAI_KEY}"
status_page = "https://status.openai.com/api/v2/summary.json"

[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key = "sk-ant-not-used"

[[routes]]
model = "chat"
targets = [
  { provider = "openai", model = "gpt-4o-mini" },
  { provider = "anthropic", model = "claude-3-5-haiku-latest" },
]
hedge_after = "300ms"
timeouts = { first_byte = "3s" }

[[keys]]
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
tenant = "app"
tier = "critical"

[[keys]]
key = "${DRILL_TEST_BATCH_KEY}"
tenant = "batch"
tier = "sheddable"

# A quick run judges the flood's p99 on some fifteen critical requests, and
# the mocks, the gateway and the flood share this machine's cores with the
# rest of the suite: the p99 mark is loose here, and the test checks what
# holds on a busy machine, that no critical request is shed while
# sheddable ones are.
[drill]
max_failover = "1500ms"
max_flood_p99_ratio = 10.0
"#;

/// One provider: nothing to fail over to.
const ONE_PROVIDER: &str = r#"
[[providers]]
name = "only"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "sk-not-used"

[[routes]]
model = "chat"
targets = [{ provider = "only", model = "gpt-4o-mini" }]
"#;

async fn drill(config: &str, args: &[&str]) -> (Output, Option<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("detour.toml");
    std::fs::write(&path, config).unwrap();
    let json = dir.path().join("card.json");
    let out = tokio::process::Command::new(BIN)
        .args(["drill", "--quick", "--config"])
        .arg(&path)
        .arg("--json")
        .arg(&json)
        .args(args)
        .env("DRILL_TEST_OPENAI_KEY", "sk-real-SECRET")
        .env("DRILL_TEST_BATCH_KEY", "dk-batch-SECRET")
        .output()
        .await
        .unwrap();
    (out, read_json(&json))
}

fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn has_fields(v: &Value, fields: &[&str], what: &str) {
    for f in fields {
        assert!(v.get(f).is_some(), "{what} has no `{f}`: {v:#}");
    }
}

const SCENARIO_FIELDS: [&str; 16] = [
    "name",
    "incident",
    "fault",
    "verdict",
    "reasons",
    "notes",
    "faulted_providers",
    "duration_ms",
    "requests",
    "errors",
    "limited",
    "error_rate",
    "failover_ms",
    "upstream_requests",
    "amplification",
    "tiers",
];

const TIER_FIELDS: [&str; 7] = [
    "tier",
    "requests",
    "errors",
    "limited",
    "error_rate",
    "p50_ms",
    "p99_ms",
];

#[tokio::test]
async fn a_route_with_two_providers_survives_every_incident() {
    let (out, card) = drill(TWO_PROVIDERS, &[]).await;
    let log = text(&out);
    let card = card.unwrap_or_else(|| panic!("no JSON card\n{log}"));
    assert_eq!(out.status.code(), Some(0), "{log}");
    has_fields(
        &card,
        &[
            "version",
            "config",
            "quick",
            "passed",
            "dns",
            "thresholds",
            "baseline",
            "scenarios",
        ],
        "the card",
    );
    assert_eq!(card["passed"], true);
    assert_eq!(card["thresholds"]["max_failover_ms"], 1500, "[drill] read");
    assert_eq!(card["thresholds"]["max_flood_p99_ratio"], 10.0);
    assert!(
        card["dns"].as_str().unwrap().starts_with("simulated"),
        "{log}"
    );
    let scenarios = card["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "provider_down",
            "provider_hanging",
            "rate_limit_storm",
            "brownout",
            "sheddable_flood",
            "dns_and_bad_reload"
        ]
    );
    for s in std::iter::once(&card["baseline"]).chain(scenarios) {
        let name = s["name"].as_str().unwrap();
        has_fields(s, &SCENARIO_FIELDS, name);
        assert_eq!(s["verdict"], "pass", "{name}: {s:#}");
        assert!(s["requests"].as_u64().unwrap() > 0, "{name}");
        let tiers = s["tiers"].as_array().unwrap();
        let tier_names: Vec<&str> = tiers.iter().map(|t| t["tier"].as_str().unwrap()).collect();
        assert_eq!(tier_names, ["critical", "sheddable"], "{name}");
        for t in tiers {
            has_fields(t, &TIER_FIELDS, name);
            assert!(t["p99_ms"].as_f64().unwrap() > 0.0, "{name}");
        }
    }
    for s in &scenarios[..4] {
        let name = s["name"].as_str().unwrap();
        assert_eq!(
            s["faulted_providers"],
            serde_json::json!(["openai"]),
            "{name}"
        );
        let failover = s["failover_ms"].as_u64().unwrap();
        assert!(failover <= 1500, "{name}: {failover} ms");
        let amplification = s["amplification"].as_f64().unwrap();
        assert!((0.5..=3.0).contains(&amplification), "{name}");
    }
    // The flood: critical traffic kept every request, sheddable was shed.
    let flood = &scenarios[4];
    let tier = |name: &str| {
        flood["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tier"] == name)
            .unwrap()
            .clone()
    };
    let critical = tier("critical");
    assert_eq!(critical["errors"], 0, "{flood:#}");
    assert_eq!(critical["limited"], 0, "{flood:#}");
    assert!(
        tier("sheddable")["limited"].as_u64().unwrap() > 0,
        "{flood:#}"
    );
    // The rejected reload is on the card, and the drill's log says so.
    let reload = &scenarios[5];
    assert!(
        reload["notes"]
            .to_string()
            .contains("invalid config was rejected"),
        "{reload:#}"
    );
    // The table a person reads, and progress while it ran.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PASSED"), "{log}");
    assert!(stdout.contains("provider_hanging"), "{log}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("drill: [6/6] dns_and_bad_reload: pass"),
        "{log}"
    );
    // The config's secrets never reach the output.
    assert!(!log.contains("SECRET"), "{log}");
}

#[tokio::test]
async fn a_route_with_one_provider_fails_when_it_goes_down() {
    let (out, card) = drill(ONE_PROVIDER, &["--scenario", "provider_down"]).await;
    let log = text(&out);
    let card = card.unwrap_or_else(|| panic!("no JSON card\n{log}"));
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert_eq!(card["passed"], false);
    assert_eq!(card["baseline"]["verdict"], "pass", "{log}");
    let scenarios = card["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 1, "only the scenario asked for");
    let down = &scenarios[0];
    assert_eq!(down["name"], "provider_down");
    assert_eq!(down["verdict"], "fail");
    assert!(down["failover_ms"].is_null(), "{down:#}");
    assert!(down["error_rate"].as_f64().unwrap() > 0.5, "{down:#}");
    assert!(
        down["reasons"]
            .to_string()
            .contains("nothing to fail over to"),
        "{down:#}"
    );
    // No keys: the open-access caller.
    assert_eq!(down["tiers"][0]["tier"], "open");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAILED"),
        "{log}"
    );
}

#[tokio::test]
async fn flags_override_the_drill_section_and_bad_input_is_refused() {
    // A mark no config can meet: the same single provider fails on the
    // flag's error rate... and a lenient one lets the baseline pass.
    let (out, card) = drill(
        ONE_PROVIDER,
        &[
            "--scenario",
            "provider_down",
            "--max-error-rate",
            "1.0",
            "--max-failover",
            "1s",
        ],
    )
    .await;
    let card = card.unwrap_or_else(|| panic!("no JSON card\n{}", text(&out)));
    assert_eq!(card["thresholds"]["max_error_rate"], 1.0);
    assert_eq!(card["thresholds"]["max_failover_ms"], 1000);

    // An unknown key in [drill] is refused like any other, before anything runs.
    let bad = format!("{ONE_PROVIDER}\n[drill]\nmax_errors = 1\n");
    let (out, card) = drill(&bad, &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(card.is_none());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("drill.max_errors: unknown key"), "{stderr}");

    let (out, _) = drill(ONE_PROVIDER, &["--scenario", "meteor_strike"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario `meteor_strike`"));
}
