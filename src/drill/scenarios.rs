//! The incidents the drill replays, each a timeline of faults on fresh mocks
//! while load runs, and the marks it is judged by.
//!
//! | scenario | incident | fault (on each route's first choice, after a healthy warm-up) |
//! |---|---|---|
//! | `provider_down` | June 2024: the OpenAI API answered 500s for hours | every request answered 500 |
//! | `provider_hanging` | a provider that accepts and never answers | every request hangs |
//! | `rate_limit_storm` | a 429 storm | every request answered 429, `retry-after: 2` |
//! | `brownout` | a slow provider, up but useless | every answer 2 s late |
//! | `sheddable_flood` | November 2023: a flood, 20x the critical traffic | sheddable traffic at 20x the critical rate joins halfway |
//! | `dns_and_bad_reload` | December 2024: DNS and control plane down | the DNS answers SERVFAIL, then a reload with an invalid config |
//!
//! Marks: client error rate, time to fail over (from the fault's start to
//! the first answer another provider served), upstream amplification
//! (upstream requests per client request while the fault lasts), and for
//! the flood the critical tier's p99 against its p99 before the flood.
//! Every mock answers in [`BASE_LATENCY`] when healthy, so latencies compare
//! against something like a provider rather than against loopback.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, Instant};

use super::dns::DnsServer;
use super::load::{self, Outcome, Sample, Stream};
use super::report::{millis, ScenarioResult, Verdict};
use super::sandbox::{Plan, Sandbox};
use super::DrillError;
use crate::config::{DrillThresholds, Tier};
use crate::mock::Faults;
use crate::reload::{Outcome as ReloadOutcome, Reloader, Trigger};

/// A healthy mock's time to answer.
pub const BASE_LATENCY: Duration = Duration::from_millis(100);
/// Requests per second sent to each route in the ordinary scenarios.
pub const ROUTE_RATE: f64 = 20.0;
/// Critical requests per second in the flood (all routes together)...
pub const FLOOD_CRITICAL_RATE: f64 = 10.0;
/// ...and the sheddable traffic's multiple of it.
pub const FLOOD_FACTOR: f64 = 20.0;
/// The brownout's extra delay.
pub const BROWNOUT: Duration = Duration::from_secs(2);
/// Requests sent at once while the DNS fails (all routes together)...
pub const DNS_BURST: usize = 32;
/// ...this long after it began (past the answers' 1 s TTL).
pub const DNS_BURST_AFTER: Duration = Duration::from_millis(1200);
/// The storm's `retry-after`.
pub const RETRY_AFTER_SECS: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    ProviderDown,
    ProviderHanging,
    RateLimitStorm,
    Brownout,
    SheddableFlood,
    DnsAndBadReload,
}

impl Scenario {
    pub const ALL: [Self; 6] = [
        Self::ProviderDown,
        Self::ProviderHanging,
        Self::RateLimitStorm,
        Self::Brownout,
        Self::SheddableFlood,
        Self::DnsAndBadReload,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ProviderDown => "provider_down",
            Self::ProviderHanging => "provider_hanging",
            Self::RateLimitStorm => "rate_limit_storm",
            Self::Brownout => "brownout",
            Self::SheddableFlood => "sheddable_flood",
            Self::DnsAndBadReload => "dns_and_bad_reload",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn incident(self) -> &'static str {
        match self {
            Self::ProviderDown => "June 2024: a provider answers 500 for hours",
            Self::ProviderHanging => "a provider accepts requests and never answers",
            Self::RateLimitStorm => "a 429 storm from a provider",
            Self::Brownout => "a brownout: a provider answers, slowly",
            Self::SheddableFlood => "November 2023: a flood of low-priority traffic",
            Self::DnsAndBadReload => "December 2024: DNS fails, and a bad config is pushed",
        }
    }

    pub fn fault_text(self) -> String {
        match self {
            Self::ProviderDown => "first choice answers 500 to every request".to_owned(),
            Self::ProviderHanging => {
                "first choice accepts every request and never answers".to_owned()
            }
            Self::RateLimitStorm => {
                format!("first choice answers 429 with retry-after: {RETRY_AFTER_SECS}")
            }
            Self::Brownout => format!(
                "first choice answers every request {} ms late",
                millis(BROWNOUT)
            ),
            Self::SheddableFlood => {
                format!("sheddable traffic at {FLOOD_FACTOR}x the critical rate joins halfway")
            }
            Self::DnsAndBadReload => {
                "DNS answers SERVFAIL, then a reload with an invalid config".to_owned()
            }
        }
    }

    /// What to change in the config when the scenario fails.
    fn hint(self) -> &'static str {
        match self {
            Self::ProviderDown | Self::RateLimitStorm => {
                "hint: give each route a second target on another provider; \
                 `breaker.consecutive_failures` and `retries` decide how fast traffic leaves"
            }
            Self::ProviderHanging | Self::Brownout => {
                "hint: `hedge_after` on the route (\"p95\" or a duration such as \"300ms\") races \
                 the next target when the first is slow; `timeouts.first_byte` bounds the wait; \
                 requests that time out fail over only within `retries.budget` and `retries.min_per_sec`"
            }
            Self::SheddableFlood => {
                "hint: `server.max_concurrent_requests` sets where admission by tier begins; \
                 per-key `rpm` and `max_concurrent` cap a flood's source"
            }
            Self::DnsAndBadReload => {
                "hint: the running config must keep serving; see the errors above"
            }
        }
    }

    /// The fault put on each route's first choice, for the failover scenarios.
    fn fault(self) -> Option<Faults> {
        let base = healthy();
        Some(match self {
            Self::ProviderDown => Faults {
                error_rate: 1.0,
                error_status: 500,
                ..base
            },
            Self::ProviderHanging => Faults {
                hang_rate: 1.0,
                ..base
            },
            Self::RateLimitStorm => Faults {
                rate_limit_rate: 1.0,
                retry_after_secs: RETRY_AFTER_SECS,
                ..base
            },
            Self::Brownout => Faults {
                latency_ms: millis(BASE_LATENCY + BROWNOUT),
                ..base
            },
            Self::SheddableFlood | Self::DnsAndBadReload => return None,
        })
    }
}

/// Every mock's faults when healthy: only the ordinary answer time.
pub fn healthy() -> Faults {
    Faults {
        latency_ms: millis(BASE_LATENCY),
        ..Faults::default()
    }
}

/// How long things take.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Each scenario's load.
    pub window: Duration,
    /// Healthy load before the fault.
    pub warm: Duration,
    /// The baseline's load.
    pub baseline: Duration,
    /// A request unanswered for this long is an error.
    pub client_timeout: Duration,
}

impl Timing {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                window: Duration::from_secs(3),
                warm: Duration::from_millis(750),
                baseline: Duration::from_secs(1),
                client_timeout: Duration::from_secs(5),
            }
        } else {
            Self {
                window: Duration::from_secs(9),
                warm: Duration::from_secs(2),
                baseline: Duration::from_secs(2),
                client_timeout: Duration::from_secs(10),
            }
        }
    }
}

/// What every scenario runs with.
pub struct Context<'a> {
    pub plan: &'a Plan,
    pub timing: Timing,
    pub thresholds: DrillThresholds,
    /// The drill's DNS, when detour's resolver asks it.
    pub dns: Option<&'a DnsServer>,
    /// A directory of the drill's own, for the reload scenario's files.
    pub scratch: &'a Path,
}

impl Context<'_> {
    async fn sandbox(&self) -> Result<Sandbox, DrillError> {
        self.plan.start(&healthy(), self.dns.is_some()).await
    }

    /// Every route at [`ROUTE_RATE`], shared by the tiers that may call it.
    fn ordinary_load(&self, from: Duration, until: Duration) -> Vec<Stream> {
        let plan = self.plan;
        let mut streams = Vec::new();
        for (r, route) in plan.routes.iter().enumerate() {
            let callers: Vec<(Option<Tier>, Option<String>)> = if plan.callers.is_empty() {
                vec![(None, None)]
            } else {
                plan.callers
                    .iter()
                    .filter(|c| c.routes.contains(&r))
                    .map(|c| (Some(c.tier), Some(c.key.clone())))
                    .collect()
            };
            let n = callers.len().max(1) as f64;
            for (tier, key) in callers {
                streams.push(Stream {
                    route: r,
                    alias: route.alias.clone(),
                    tier,
                    key,
                    rate: ROUTE_RATE / n,
                    from,
                    until,
                });
            }
        }
        streams
    }

    /// Judges the error rate and notes requests the config's own limits refused.
    fn judge_errors(&self, r: &mut ScenarioResult) {
        if r.requests == 0 {
            r.fail("no request was sent: no key of the config may call any route".to_owned());
        }
        let max = self.thresholds.max_error_rate;
        if r.error_rate > max {
            r.fail(format!(
                "client error rate {:.2}% is above {:.2}% ({} of {} requests failed)",
                r.error_rate * 100.0,
                max * 100.0,
                r.errors,
                r.requests
            ));
        }
        if r.limited > 0 {
            r.notes.push(format!(
                "{} requests were refused by the config's own limits or admission \
                 (not counted as errors; the drill sends {ROUTE_RATE} requests/s per route)",
                r.limited
            ));
        }
    }
}

/// The config's traffic with every provider healthy.
pub async fn baseline(ctx: &Context<'_>) -> Result<ScenarioResult, DrillError> {
    let sandbox = ctx.sandbox().await?;
    let client = client()?;
    let epoch = Instant::now();
    let streams = ctx.ordinary_load(Duration::ZERO, ctx.timing.baseline);
    let samples = load::drive(
        &client,
        &sandbox.gateway.url(),
        &streams,
        epoch,
        ctx.timing.client_timeout,
    )
    .await;
    let mut r =
        ScenarioResult::measured("baseline", "none: every provider healthy", "none", &samples);
    r.duration_ms = millis(epoch.elapsed());
    r.upstream_requests = sandbox.upstream_requests();
    r.amplification = ratio(r.upstream_requests, r.requests);
    ctx.judge_errors(&mut r);
    if r.verdict == Verdict::Fail {
        r.reasons.push(
            "the config fails with every provider healthy: the scenarios below measure that too"
                .to_owned(),
        );
    }
    let plan = ctx.plan;
    for (i, route) in plan.routes.iter().enumerate() {
        if !plan.callers.is_empty() && !plan.callers.iter().any(|c| c.routes.contains(&i)) {
            r.notes.push(format!(
                "route `{}`: no key of the config may call it, so no scenario drills it",
                route.alias
            ));
        }
    }
    Ok(r)
}

pub async fn run(scenario: Scenario, ctx: &Context<'_>) -> Result<ScenarioResult, DrillError> {
    match scenario {
        Scenario::SheddableFlood => flood(ctx).await,
        Scenario::DnsAndBadReload => dns_and_bad_reload(ctx).await,
        _ => failover(scenario, ctx).await,
    }
}

/// A fault on every route's first choice after the warm-up, for the rest
/// of the window.
async fn failover(scenario: Scenario, ctx: &Context<'_>) -> Result<ScenarioResult, DrillError> {
    let Some(fault) = scenario.fault() else {
        return Err(DrillError::Rewrite(format!(
            "{} has no provider fault",
            scenario.name()
        )));
    };
    let plan = ctx.plan;
    let t = ctx.timing;
    let mut faulted: Vec<usize> = plan
        .routes
        .iter()
        .filter_map(|r| plan.provider(&r.first_choice))
        .collect();
    faulted.sort_unstable();
    faulted.dedup();
    let sandbox = ctx.sandbox().await?;
    let client = client()?;
    let epoch = Instant::now();
    let streams = ctx.ordinary_load(Duration::ZERO, t.window);
    let inject = async {
        sleep_until(epoch + t.warm).await;
        for &i in &faulted {
            if let Some(m) = sandbox.mocks.get(i) {
                m.set_faults(fault.clone());
            }
        }
        sandbox.upstream_requests()
    };
    let url = sandbox.gateway.url();
    let (samples, upstream_before) = tokio::join!(
        load::drive(&client, &url, &streams, epoch, t.client_timeout),
        inject
    );
    let mut r = ScenarioResult::measured(
        scenario.name(),
        scenario.incident(),
        &scenario.fault_text(),
        &samples,
    );
    r.duration_ms = millis(epoch.elapsed());
    r.faulted_providers = faulted
        .iter()
        .filter_map(|&i| plan.providers.get(i).map(|p| p.name.clone()))
        .collect();
    let during = samples.iter().filter(|s| s.start >= t.warm).count() as u64;
    r.upstream_requests = sandbox.upstream_requests().saturating_sub(upstream_before);
    r.amplification = ratio(r.upstream_requests, during);
    ctx.judge_errors(&mut r);
    judge_failover(ctx, &mut r, &samples);
    if let Some(a) = r.amplification {
        if a > ctx.thresholds.max_amplification {
            r.fail(format!(
                "upstream amplification {a:.2}x is above {}x: {} upstream requests for {during} client requests",
                ctx.thresholds.max_amplification, r.upstream_requests
            ));
        }
    }
    if r.verdict == Verdict::Fail {
        r.notes.push(scenario.hint().to_owned());
    }
    if scenario == Scenario::Brownout {
        let slow = samples
            .iter()
            .filter(|s| s.start >= t.warm && s.latency() >= BROWNOUT)
            .count();
        r.notes.push(format!(
            "{slow} of {during} requests after the brownout began waited {} ms or more",
            millis(BROWNOUT)
        ));
    }
    Ok(r)
}

/// The time to fail over: per route, from the fault's start to the first
/// answer from a provider other than the first choice; the slowest route's.
fn judge_failover(ctx: &Context<'_>, r: &mut ScenarioResult, samples: &[Sample]) {
    let warm = ctx.timing.warm;
    let mut worst: Option<Duration> = Some(Duration::ZERO);
    for (i, route) in ctx.plan.routes.iter().enumerate() {
        let sent = samples.iter().any(|s| s.route == i);
        if !sent {
            continue;
        }
        let first = samples
            .iter()
            .filter(|s| s.route == i && s.start >= warm && s.outcome == Outcome::Ok)
            .filter(|s| s.provider.as_deref() != Some(route.first_choice.as_str()))
            .map(|s| s.end.saturating_sub(warm))
            .min();
        match first {
            Some(d) => worst = worst.map(|w| w.max(d)),
            None => {
                worst = None;
                r.fail(format!(
                    "route `{}`: no answer came from a provider other than `{}` after the fault began: nothing to fail over to",
                    route.alias, route.first_choice
                ));
            }
        }
    }
    r.failover_ms = worst.map(millis);
    let max = ctx.thresholds.max_failover;
    if let Some(d) = worst {
        if d > max {
            r.fail(format!(
                "failover took {} ms, above {} ms",
                millis(d),
                millis(max)
            ));
        }
    }
}

/// Critical traffic all along; sheddable traffic at 20x joins halfway.
async fn flood(ctx: &Context<'_>) -> Result<ScenarioResult, DrillError> {
    let s = Scenario::SheddableFlood;
    let plan = ctx.plan;
    let top = plan.callers.iter().find(|c| c.tier != Tier::Sheddable);
    let low = plan.callers.iter().find(|c| c.tier == Tier::Sheddable);
    let (Some(top), Some(low)) = (top, low) else {
        return Ok(ScenarioResult::skipped(
            s.name(),
            s.incident(),
            &s.fault_text(),
            "no tiers configured: needs a key of tier `sheddable` and one of tier `critical` or `standard`",
        ));
    };
    if top.routes.is_empty() || low.routes.is_empty() {
        return Ok(ScenarioResult::skipped(
            s.name(),
            s.incident(),
            &s.fault_text(),
            "the tiers' keys may call no route",
        ));
    }
    let t = ctx.timing;
    let half = t.window / 2;
    let mut streams = Vec::new();
    let share = |rate: f64, n: usize| rate / n.max(1) as f64;
    for &r in &top.routes {
        streams.push(Stream {
            route: r,
            alias: plan.routes[r].alias.clone(),
            tier: Some(top.tier),
            key: Some(top.key.clone()),
            rate: share(FLOOD_CRITICAL_RATE, top.routes.len()),
            from: Duration::ZERO,
            until: t.window,
        });
    }
    for &r in &low.routes {
        streams.push(Stream {
            route: r,
            alias: plan.routes[r].alias.clone(),
            tier: Some(Tier::Sheddable),
            key: Some(low.key.clone()),
            rate: share(FLOOD_CRITICAL_RATE * FLOOD_FACTOR, low.routes.len()),
            from: half,
            until: t.window,
        });
    }
    let sandbox = ctx.sandbox().await?;
    let client = client()?;
    let epoch = Instant::now();
    let upstream_at_half = async {
        sleep_until(epoch + half).await;
        sandbox.upstream_requests()
    };
    let url = sandbox.gateway.url();
    let (samples, upstream_before) = tokio::join!(
        load::drive(&client, &url, &streams, epoch, t.client_timeout),
        upstream_at_half
    );
    let (before, during): (Vec<Sample>, Vec<Sample>) =
        samples.into_iter().partition(|x| x.start < half);
    let mut r = ScenarioResult::measured(s.name(), s.incident(), &s.fault_text(), &during);
    r.duration_ms = millis(epoch.elapsed());
    r.upstream_requests = sandbox.upstream_requests().saturating_sub(upstream_before);
    r.amplification = ratio(r.upstream_requests, r.requests);
    let name = top.tier.as_str();
    let calm = ScenarioResult::measured("", "", "", &before);
    let calm_p99 = calm.tier(Some(top.tier)).and_then(|x| x.p99_ms);
    let (requests, failed, p99) = match r.tier(Some(top.tier)) {
        Some(x) => (x.requests, x.errors + x.limited, x.p99_ms),
        None => (0, 0, None),
    };
    let failed_rate = if requests == 0 {
        1.0
    } else {
        failed as f64 / requests as f64
    };
    if failed_rate > ctx.thresholds.max_error_rate {
        r.fail(format!(
            "{name} tier: {failed} of {requests} requests failed or were shed during the flood \
             ({:.2}%, above {:.2}%)",
            failed_rate * 100.0,
            ctx.thresholds.max_error_rate * 100.0
        ));
    }
    match (calm_p99, p99) {
        (Some(calm), Some(p99)) => {
            let allowed = calm * ctx.thresholds.max_flood_p99_ratio;
            r.notes.push(format!(
                "{name} p99 {calm:.0} ms before the flood, {p99:.0} ms during it"
            ));
            if p99 > allowed {
                r.fail(format!(
                    "{name} tier: p99 {p99:.0} ms during the flood is above {}x its {calm:.0} ms before",
                    ctx.thresholds.max_flood_p99_ratio
                ));
            }
        }
        _ => r.fail(format!("{name} tier: no latency measured")),
    }
    if let Some(shed) = r.tier(Some(Tier::Sheddable)) {
        r.notes.push(format!(
            "sheddable: {} of {} requests shed by admission or limits, {} failed",
            shed.limited, shed.requests, shed.errors
        ));
    }
    r.notes.push(format!(
        "server.max_concurrent_requests = {}: admission by tier acts only above it",
        plan.max_concurrent_requests
    ));
    if r.verdict == Verdict::Fail {
        r.notes.push(s.hint().to_owned());
    }
    Ok(r)
}

/// The DNS breaks a quarter in (if the drill runs the resolver's DNS), and
/// at half time an invalid config is written and reloaded the way
/// `POST /admin/reload` does.
async fn dns_and_bad_reload(ctx: &Context<'_>) -> Result<ScenarioResult, DrillError> {
    let s = Scenario::DnsAndBadReload;
    let t = ctx.timing;
    let sandbox = ctx.sandbox().await?;
    let gw = Arc::clone(&sandbox.gateway.gateway);
    let path = ctx.scratch.join("detour.toml");
    let state_dir = ctx.scratch.join("state");
    write(&path, sandbox.text.clone()).await?;
    gw.set_ops(Some(path.clone()), Some(state_dir));
    let reloader = Reloader::new(Arc::clone(&gw));
    let stale_before = crate::dns::shared().stale_uses();
    let client = client()?;
    let epoch = Instant::now();
    let mut streams = ctx.ordinary_load(Duration::ZERO, t.window);
    // Pooled connections need no lookup: a burst past the DNS's TTL needs
    // new connections, so names must be resolved while the DNS fails.
    let burst_at = t.warm + DNS_BURST_AFTER;
    let bursts: Vec<Stream> = streams
        .iter()
        .map(|x| Stream {
            rate: DNS_BURST as f64 * 10.0 / streams.len() as f64,
            from: burst_at,
            until: burst_at + Duration::from_millis(100),
            ..x.clone()
        })
        .collect();
    streams.extend(bursts);
    let incident = async {
        sleep_until(epoch + t.warm).await;
        if let Some(dns) = ctx.dns {
            dns.set_failing(true);
        }
        let upstream_before = sandbox.upstream_requests();
        sleep_until(epoch + t.window / 2).await;
        let bad = format!(
            "{}\n[[routes]]\nmodel = \"drill-bad-reload\"\ntargets = [{{ provider = \"drill-no-such-provider\", model = \"x\" }}]\n",
            sandbox.text
        );
        let written = write(&path, bad).await;
        let rl = Arc::clone(&reloader);
        let status = tokio::task::spawn_blocking(move || rl.reload(Trigger::Admin))
            .await
            .ok();
        (upstream_before, written, status)
    };
    let url = sandbox.gateway.url();
    let (samples, (upstream_before, written, status)) = tokio::join!(
        load::drive(&client, &url, &streams, epoch, t.client_timeout),
        incident
    );
    if let Some(dns) = ctx.dns {
        dns.set_failing(false);
    }
    written?;
    let mut r = ScenarioResult::measured(s.name(), s.incident(), &s.fault_text(), &samples);
    r.duration_ms = millis(epoch.elapsed());
    let during = samples.iter().filter(|x| x.start >= t.warm).count() as u64;
    r.upstream_requests = sandbox.upstream_requests().saturating_sub(upstream_before);
    r.amplification = ratio(r.upstream_requests, during);
    ctx.judge_errors(&mut r);
    match status {
        Some(st) if st.outcome == ReloadOutcome::Rejected => {
            let first = st.errors.first().cloned().unwrap_or_default();
            r.notes
                .push(format!("the invalid config was rejected: {first}"));
        }
        Some(st) => r.fail(format!(
            "the invalid config was not rejected: the reload says `{}`",
            st.outcome.as_str()
        )),
        None => r.fail("the reload did not finish".to_owned()),
    }
    if gw.source().as_deref() != Some(sandbox.text.as_str()) {
        r.fail("the gateway no longer serves the config it started with".to_owned());
    }
    match ctx.dns {
        Some(dns) => r.notes.push(format!(
            "DNS failed for {} ms, with a burst of {DNS_BURST} requests {} ms in; detour's resolver served {} lookups from its stale cache ({} queries reached the DNS)",
            millis(t.window.saturating_sub(t.warm)),
            millis(DNS_BURST_AFTER),
            crate::dns::shared().stale_uses().saturating_sub(stale_before),
            dns.queries()
        )),
        None => r.notes.push("DNS not simulated: providers were reached by address".to_owned()),
    }
    Ok(r)
}

async fn write(path: &Path, text: String) -> Result<(), DrillError> {
    let p: PathBuf = path.to_owned();
    let shown = p.display().to_string();
    tokio::task::spawn_blocking(move || std::fs::write(&p, text))
        .await
        .map_err(|e| DrillError::io(&format!("cannot write {shown}"), std::io::Error::other(e)))?
        .map_err(|e| DrillError::io(&format!("cannot write {shown}"), e))
}

fn client() -> Result<reqwest::Client, DrillError> {
    load::client()
        .map_err(|e| DrillError::io("cannot build the HTTP client", std::io::Error::other(e)))
}

fn ratio(upstream: u64, client: u64) -> Option<f64> {
    (client > 0).then(|| upstream as f64 / client as f64)
}
