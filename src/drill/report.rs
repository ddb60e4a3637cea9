//! The report card: what each scenario measured, its verdict, the table a
//! person reads and the JSON a CI job reads.
//!
//! The JSON's field names are stable (`version` says which shape): `passed`,
//! `thresholds`, `dns`, `baseline` and `scenarios`, each scenario with
//! `name`, `incident`, `fault`, `verdict` (`pass` | `fail` | `skipped`),
//! `reasons`, `notes`, `faulted_providers`, `duration_ms`, `requests`,
//! `errors`, `limited`, `error_rate`, `failover_ms`, `upstream_requests`,
//! `amplification` and `tiers` (`tier`, `requests`, `errors`, `limited`,
//! `error_rate`, `p50_ms`, `p99_ms`). A value that was not measured is `null`.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::load::{Outcome, Sample};
use crate::config::{DrillThresholds, Tier};

/// The shape of the JSON card; raised when a field changes meaning or goes.
pub const CARD_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Skipped,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "FAIL",
            Self::Skipped => "skipped",
        }
    }
}

/// The marks, as the card shows them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Thresholds {
    pub max_error_rate: f64,
    pub max_failover_ms: u64,
    pub max_amplification: f64,
    pub max_flood_p99_ratio: f64,
}

impl From<DrillThresholds> for Thresholds {
    fn from(t: DrillThresholds) -> Self {
        Self {
            max_error_rate: t.max_error_rate,
            max_failover_ms: millis(t.max_failover),
            max_amplification: t.max_amplification,
            max_flood_p99_ratio: t.max_flood_p99_ratio,
        }
    }
}

/// One tier's share of a scenario's requests.
#[derive(Debug, Clone, Serialize)]
pub struct TierStats {
    /// `critical`, `standard`, `sheddable`, or `open` when the config has
    /// no keys.
    pub tier: String,
    pub requests: u64,
    pub errors: u64,
    pub limited: u64,
    /// Errors over requests (limited requests are not errors, but count in
    /// the requests).
    pub error_rate: f64,
    /// Latency of the requests that were not limited, answered or not.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One scenario's measurements and verdict.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    /// The incident it replays.
    pub incident: String,
    /// What the drill did to the providers.
    pub fault: String,
    pub verdict: Verdict,
    /// Why it failed or was skipped (empty on a pass).
    pub reasons: Vec<String>,
    /// What else an on-call engineer should know.
    pub notes: Vec<String>,
    pub faulted_providers: Vec<String>,
    pub duration_ms: u64,
    pub requests: u64,
    pub errors: u64,
    pub limited: u64,
    pub error_rate: f64,
    /// From the fault's start to the first answer another provider served
    /// (the slowest route's); `null` if none did, or for scenarios without
    /// a failover.
    pub failover_ms: Option<u64>,
    /// Requests the mocks saw while the fault lasted.
    pub upstream_requests: u64,
    /// `upstream_requests` per client request sent while the fault lasted.
    pub amplification: Option<f64>,
    pub tiers: Vec<TierStats>,
}

impl ScenarioResult {
    /// A result with the counts of `samples` and no verdict yet (pass).
    pub fn measured(name: &str, incident: &str, fault: &str, samples: &[Sample]) -> Self {
        let (requests, errors, limited) = counts(samples.iter());
        Self {
            name: name.to_owned(),
            incident: incident.to_owned(),
            fault: fault.to_owned(),
            verdict: Verdict::Pass,
            reasons: Vec::new(),
            notes: Vec::new(),
            faulted_providers: Vec::new(),
            duration_ms: 0,
            requests,
            errors,
            limited,
            error_rate: rate(errors, requests),
            failover_ms: None,
            upstream_requests: 0,
            amplification: None,
            tiers: tier_stats(samples),
        }
    }

    pub fn skipped(name: &str, incident: &str, fault: &str, why: &str) -> Self {
        let mut r = Self::measured(name, incident, fault, &[]);
        r.verdict = Verdict::Skipped;
        r.reasons.push(why.to_owned());
        r
    }

    /// Records a failed mark: the scenario fails, saying why.
    pub fn fail(&mut self, why: String) {
        self.verdict = Verdict::Fail;
        self.reasons.push(why);
    }

    /// The stats of `tier` (`None`: the open-access caller).
    pub fn tier(&self, tier: Option<Tier>) -> Option<&TierStats> {
        self.tiers.iter().find(|t| t.tier == tier_name(tier))
    }
}

/// The whole card.
#[derive(Debug, Clone, Serialize)]
pub struct Card {
    pub version: u32,
    pub config: String,
    pub quick: bool,
    /// Every scenario passed (skipped ones do not fail the card).
    pub passed: bool,
    /// `simulated`, or `not simulated: <why>`.
    pub dns: String,
    pub thresholds: Thresholds,
    /// The config's traffic with every provider healthy.
    pub baseline: ScenarioResult,
    pub scenarios: Vec<ScenarioResult>,
}

impl Card {
    pub fn new(
        config: String,
        quick: bool,
        dns: String,
        thresholds: Thresholds,
        baseline: ScenarioResult,
        scenarios: Vec<ScenarioResult>,
    ) -> Self {
        let passed = baseline.verdict != Verdict::Fail
            && scenarios.iter().all(|s| s.verdict != Verdict::Fail);
        Self {
            version: CARD_VERSION,
            config,
            quick,
            passed,
            dns,
            thresholds,
            baseline,
            scenarios,
        }
    }

    /// The card as a table, then the reasons and notes.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\ndetour drill: {}{}\n",
            self.config,
            if self.quick { " (quick)" } else { "" }
        );
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:>10} {:>10} {:>9}  latency p50/p99 by tier",
            "scenario", "result", "errors", "failover", "amplif."
        );
        for s in std::iter::once(&self.baseline).chain(&self.scenarios) {
            let _ = writeln!(out, "{}", row(s));
        }
        let t = &self.thresholds;
        let _ = writeln!(
            out,
            "\nmarks: error rate <= {}, failover <= {} ms, amplification <= {}x, \
             critical p99 in a flood <= {}x its p99 before",
            percent(t.max_error_rate),
            t.max_failover_ms,
            t.max_amplification,
            t.max_flood_p99_ratio
        );
        let _ = writeln!(out, "DNS: {}", self.dns);
        for s in std::iter::once(&self.baseline).chain(&self.scenarios) {
            for r in &s.reasons {
                let _ = writeln!(out, "{} {}: {r}", s.name, s.verdict.as_str());
            }
            for n in &s.notes {
                let _ = writeln!(out, "{} note: {n}", s.name);
            }
        }
        let _ = writeln!(
            out,
            "\n{}",
            if self.passed {
                "PASSED: every scenario met its marks"
            } else {
                "FAILED: see the reasons above"
            }
        );
        out
    }
}

fn row(s: &ScenarioResult) -> String {
    let skipped = s.verdict == Verdict::Skipped;
    let dash = || "-".to_owned();
    let errors = if skipped {
        dash()
    } else {
        percent(s.error_rate)
    };
    let failover = s.failover_ms.map_or_else(dash, |ms| format!("{ms} ms"));
    let amplification = s.amplification.map_or_else(dash, |a| format!("{a:.2}x"));
    let tiers: Vec<String> = s
        .tiers
        .iter()
        .map(|t| format!("{} {}/{} ms", t.tier, ms(t.p50_ms), ms(t.p99_ms)))
        .collect();
    format!(
        "{:<20} {:<8} {errors:>10} {failover:>10} {amplification:>9}  {}",
        s.name,
        s.verdict.as_str(),
        tiers.join(", ")
    )
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
}

fn percent(r: f64) -> String {
    format!("{:.2}%", r * 100.0)
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn counts<'a>(samples: impl Iterator<Item = &'a Sample>) -> (u64, u64, u64) {
    let (mut requests, mut errors, mut limited) = (0, 0, 0);
    for s in samples {
        requests += 1;
        match s.outcome {
            Outcome::Ok => {}
            Outcome::Error => errors += 1,
            Outcome::Limited => limited += 1,
        }
    }
    (requests, errors, limited)
}

pub fn tier_name(tier: Option<Tier>) -> &'static str {
    tier.map_or("open", Tier::as_str)
}

/// Per-tier counts and latencies, best tier first.
pub fn tier_stats(samples: &[Sample]) -> Vec<TierStats> {
    let mut tiers: Vec<Option<Tier>> = samples.iter().map(|s| s.tier).collect();
    tiers.sort();
    tiers.dedup();
    tiers
        .into_iter()
        .map(|tier| {
            let mine = || samples.iter().filter(move |s| s.tier == tier);
            let (requests, errors, limited) = counts(mine());
            let mut latencies: Vec<Duration> = mine()
                .filter(|s| s.outcome != Outcome::Limited)
                .map(Sample::latency)
                .collect();
            latencies.sort();
            TierStats {
                tier: tier_name(tier).to_owned(),
                requests,
                errors,
                limited,
                error_rate: rate(errors, requests),
                p50_ms: percentile(&latencies, 0.50),
                p99_ms: percentile(&latencies, 0.99),
            }
        })
        .collect()
}

/// Nearest-rank percentile of sorted `values`, in milliseconds.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    let at = rank.clamp(1, sorted.len()) - 1;
    sorted.get(at).map(|d| d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tier: Option<Tier>, ms: u64, outcome: Outcome) -> Sample {
        Sample {
            route: 0,
            tier,
            start: Duration::ZERO,
            end: Duration::from_millis(ms),
            outcome,
            provider: None,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.50), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn tiers_count_errors_and_leave_limited_out_of_latency() {
        let samples = [
            sample(Some(Tier::Critical), 10, Outcome::Ok),
            sample(Some(Tier::Critical), 30, Outcome::Error),
            sample(Some(Tier::Sheddable), 1, Outcome::Limited),
            sample(Some(Tier::Sheddable), 20, Outcome::Ok),
        ];
        let r = ScenarioResult::measured("x", "y", "z", &samples);
        assert_eq!((r.requests, r.errors, r.limited), (4, 1, 1));
        let critical = r.tier(Some(Tier::Critical)).unwrap();
        assert_eq!(critical.error_rate, 0.5);
        assert_eq!(critical.p99_ms, Some(30.0));
        let sheddable = r.tier(Some(Tier::Sheddable)).unwrap();
        assert_eq!(sheddable.p50_ms, Some(20.0));
        assert_eq!(r.tiers[0].tier, "critical");
    }
}
