//! `detour drill`: replays the incidents of PRODUCT.md against the user's own
//! config, in one process, and grades it.
//!
//! The config is loaded as `detour check` loads it (same errors), then every
//! provider is replaced by a mock of its kind ([`sandbox`]), a gateway runs
//! in front of the mocks, and each scenario ([`scenarios`]) drives load at
//! every route ([`load`]) while it breaks the providers, the DNS ([`dns`]) or
//! the config. The [`report`] card says, per scenario, the client error rate,
//! the time to fail over, the upstream amplification and p50/p99 per tier,
//! with a verdict against the marks of `[drill]` or the command line.
//!
//! This module is the orchestration: options, the order of things, progress
//! on stderr.

mod dns;
mod load;
pub mod report;
mod sandbox;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{self, ConfigError, DrillThresholds};

pub use report::{Card, ScenarioResult, Verdict};
pub use scenarios::Scenario;

/// What `detour drill` was asked.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: PathBuf,
    /// About 3 s per scenario instead of about 9.
    pub quick: bool,
    /// Scenario names; empty: all of them.
    pub scenarios: Vec<String>,
    pub marks: Marks,
}

/// Marks from the command line; each replaces the config's `[drill]` value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Marks {
    pub max_error_rate: Option<f64>,
    pub max_failover: Option<Duration>,
    pub max_amplification: Option<f64>,
    pub max_flood_p99_ratio: Option<f64>,
}

impl Marks {
    fn over(self, config: DrillThresholds) -> Result<DrillThresholds, DrillError> {
        if let Some(r) = self.max_error_rate {
            if !(0.0..=1.0).contains(&r) {
                return Err(DrillError::Flag(format!(
                    "--max-error-rate must be between 0 and 1, got {r}"
                )));
            }
        }
        for (flag, v) in [
            ("--max-amplification", self.max_amplification),
            ("--max-flood-p99-ratio", self.max_flood_p99_ratio),
        ] {
            if let Some(v) = v {
                if v.is_nan() || v < 1.0 {
                    return Err(DrillError::Flag(format!(
                        "{flag} must be at least 1.0, got {v}"
                    )));
                }
            }
        }
        Ok(DrillThresholds {
            max_error_rate: self.max_error_rate.unwrap_or(config.max_error_rate),
            max_failover: self.max_failover.unwrap_or(config.max_failover),
            max_amplification: self.max_amplification.unwrap_or(config.max_amplification),
            max_flood_p99_ratio: self
                .max_flood_p99_ratio
                .unwrap_or(config.max_flood_p99_ratio),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// The user's config is invalid: the same errors as `detour check`.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("unknown scenario `{0}` (expected one of: {names})", names = scenario_names())]
    UnknownScenario(String),
    #[error("{0}")]
    Flag(String),
    #[error("the config has no routes: there is nothing to drill")]
    NoRoutes,
    #[error("cannot rewrite the config for the drill's mocks: {0}")]
    Rewrite(String),
    #[error("cannot build the gateway: {0}")]
    Gateway(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl DrillError {
    fn io(what: &str, source: std::io::Error) -> Self {
        Self::Io {
            what: what.to_owned(),
            source,
        }
    }

    /// The user's input is wrong (config, scenario name, flag), as opposed
    /// to the drill failing to run.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Config(_) | Self::UnknownScenario(_) | Self::Flag(_) | Self::NoRoutes
        )
    }
}

fn scenario_names() -> String {
    Scenario::ALL
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the drill and returns its card.
pub async fn run(opts: Options) -> Result<Card, DrillError> {
    let selected = select(&opts.scenarios)?;
    let file = opts.config.display().to_string();
    let cfg = config::load_file(&opts.config)?;
    let thresholds = opts.marks.over(cfg.drill)?;
    let text = std::fs::read_to_string(&opts.config).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    let plan = sandbox::Plan::new(&cfg, &text, &file)?;
    let (dns_server, dns_state) = start_dns().await;
    let scratch = Scratch::new()?;
    let timing = scenarios::Timing::new(opts.quick);
    let ctx = scenarios::Context {
        plan: &plan,
        timing,
        thresholds,
        dns: dns_server.as_ref(),
        scratch: &scratch.0,
    };
    let tiers: Vec<&str> = plan.callers.iter().map(|c| c.tier.as_str()).collect();
    eprintln!(
        "drill: {file}: {} providers replaced by mocks, {} routes, callers: {}; DNS {dns_state}",
        plan.providers.len(),
        plan.routes.len(),
        if tiers.is_empty() {
            "no keys (open access)".to_owned()
        } else {
            tiers.join(", ")
        }
    );
    eprintln!("drill: baseline: every provider healthy ...");
    let baseline = scenarios::baseline(&ctx).await?;
    eprintln!("drill: baseline: {}", summary(&baseline));
    let mut results = Vec::with_capacity(selected.len());
    for (i, s) in selected.iter().enumerate() {
        eprintln!(
            "drill: [{}/{}] {} ({}): {} ...",
            i + 1,
            selected.len(),
            s.name(),
            s.incident(),
            s.fault_text()
        );
        let r = scenarios::run(*s, &ctx).await?;
        eprintln!(
            "drill: [{}/{}] {}: {}",
            i + 1,
            selected.len(),
            s.name(),
            summary(&r)
        );
        results.push(r);
    }
    Ok(Card::new(
        file,
        opts.quick,
        dns_state,
        thresholds.into(),
        baseline,
        results,
    ))
}

fn select(names: &[String]) -> Result<Vec<Scenario>, DrillError> {
    if names.is_empty() {
        return Ok(Scenario::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in names {
        let s = Scenario::parse(name).ok_or_else(|| DrillError::UnknownScenario(name.clone()))?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The drill's DNS, made detour's resolver; `None` (and why) if it cannot be.
async fn start_dns() -> (Option<dns::DnsServer>, String) {
    let server = match dns::DnsServer::start().await {
        Ok(s) => s,
        Err(e) => {
            return (
                None,
                format!("not simulated: cannot start the drill's DNS: {e}"),
            )
        }
    };
    let resolver = match crate::dns::CachingResolver::with_servers(
        &[server.addr],
        crate::dns::Options::default(),
    ) {
        Ok(r) => r,
        Err(e) => return (None, format!("not simulated: {e}")),
    };
    match crate::dns::install_shared(resolver) {
        Ok(()) => (
            Some(server),
            format!(
                "simulated: providers reached as *.{} through detour's resolver",
                dns::DOMAIN
            ),
        ),
        Err(_) => (
            None,
            "not simulated: detour's resolver was already in use".to_owned(),
        ),
    }
}

fn summary(r: &ScenarioResult) -> String {
    match r.verdict {
        Verdict::Skipped => format!("skipped: {}", r.reasons.join("; ")),
        v => format!(
            "{} ({} requests, {:.2}% errors, failover {}, amplification {})",
            if v == Verdict::Pass { "pass" } else { "FAIL" },
            r.requests,
            r.error_rate * 100.0,
            r.failover_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms")),
            r.amplification
                .map_or_else(|| "-".to_owned(), |a| format!("{a:.2}x"))
        ),
    }
}

/// A directory of the drill's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self, DrillError> {
        let dir = std::env::temp_dir().join(format!("detour-drill-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| DrillError::io(&format!("cannot create {}", dir.display()), e))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
