//! `GET /status` and `GET /status.json` on the main listener, unauthenticated:
//! each provider's state now, the incidents of the last 24 hours
//! ([`crate::incidents`]) and the gateway's uptime.
//!
//! `/status` is one self-contained HTML page: inline CSS, no script, no
//! external asset (a CSP header forbids them), refreshed by
//! `<meta http-equiv="refresh">` every [`REFRESH_SECS`] seconds. Every string
//! is escaped. `/status.json` is the same in the shape of an Atlassian
//! Statuspage v2 `summary.json` (one component per provider, the unresolved
//! incidents), so tools that read status pages (detour's own
//! [`crate::status_pages`] poller among them) can read detour's; a `detour` key
//! adds the uptime and the day's incidents with their effect.
//!
//! A provider's state, worst first:
//!
//! | state | when | component status |
//! |---|---|---|
//! | `down` | overridden `down`; every target's breaker open; status page says down | `major_outage` |
//! | `degraded` | some breakers open, credentials rejected | `partial_outage` |
//! | `degraded` | cooling down after 429s; status page says degraded | `degraded_performance` |
//! | `overridden` | overridden `up`: used whatever its health | `operational` |
//! | `operational` | otherwise | `operational` |
//!
//! Each request reads atomics and the (small, bounded) incident log: no I/O,
//! no lock held for long.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::health::{BreakerState, Override, PageState, Status};
use crate::incidents::{self, Cause, Impact, Incident};
use crate::state::{Gateway, Live};

/// Seconds between the page's automatic refreshes.
pub const REFRESH_SECS: u32 = 10;
/// The Statuspage page id of detour's page.
pub const PAGE_ID: &str = "detour";
/// At most this many incidents are listed on the HTML page (newest first).
const MAX_LISTED: usize = 200;

/// A provider's state, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProviderState {
    Operational,
    /// Forced up by an operator: used whatever its health says.
    Overridden,
    /// Demoted (status page says degraded, or cooling down after 429s).
    Degraded,
    /// Some of its targets are out.
    PartialOutage,
    Down,
}

impl ProviderState {
    /// The word on the HTML page.
    pub fn label(self) -> &'static str {
        match self {
            Self::Operational => "operational",
            Self::Overridden => "overridden",
            Self::Degraded | Self::PartialOutage => "degraded",
            Self::Down => "down",
        }
    }

    /// The Statuspage v2 component status.
    pub fn component_status(self) -> &'static str {
        match self {
            Self::Operational | Self::Overridden => "operational",
            Self::Degraded => "degraded_performance",
            Self::PartialOutage => "partial_outage",
            Self::Down => "major_outage",
        }
    }
}

/// One provider on the page.
#[derive(Debug, Clone)]
pub struct ProviderView {
    pub name: String,
    pub state: ProviderState,
    /// Why, in a few words ("" when operational).
    pub why: String,
    /// When its last incident started or ended (else when the gateway started).
    pub updated_at: SystemTime,
}

/// Everything both documents show.
#[derive(Debug, Clone)]
pub struct Summary {
    pub now: SystemTime,
    pub started: SystemTime,
    pub uptime: Duration,
    pub providers: Vec<ProviderView>,
    /// Incidents of the last 24 hours of providers in the live config, oldest first.
    pub incidents: Vec<Incident>,
}

impl Summary {
    pub fn of(gw: &Gateway) -> Self {
        let now = SystemTime::now();
        let uptime = Duration::from_millis(gw.health().clock().now_ms());
        let started = now.checked_sub(uptime).unwrap_or(UNIX_EPOCH);
        let live = gw.live();
        let since = now.checked_sub(incidents::KEEP).unwrap_or(UNIX_EPOCH);
        let mut incidents = gw.incidents().since(since);
        incidents.retain(|i| live.config.providers.iter().any(|p| p.name == i.provider));
        let providers = (0..live.config.providers.len())
            .filter_map(|i| {
                let name = live.config.providers.get(i)?.name.clone();
                let (state, why) = provider_state(&live, i);
                let updated_at = incidents
                    .iter()
                    .filter(|inc| inc.provider == name)
                    .map(|inc| inc.ended.unwrap_or(inc.started))
                    .max()
                    .unwrap_or(started);
                Some(ProviderView {
                    name,
                    state,
                    why,
                    updated_at,
                })
            })
            .collect();
        Self {
            now,
            started,
            uptime,
            providers,
            incidents,
        }
    }

    /// The Statuspage indicator and its description.
    pub fn indicator(&self) -> (&'static str, &'static str) {
        let worst = self.providers.iter().map(|p| p.state).max();
        let all_down = !self.providers.is_empty()
            && self
                .providers
                .iter()
                .all(|p| p.state == ProviderState::Down);
        match worst {
            _ if all_down => ("critical", "Major Service Outage"),
            Some(ProviderState::Down) => ("major", "Partial System Outage"),
            Some(ProviderState::PartialOutage | ProviderState::Degraded) => {
                ("minor", "Minor Service Outage")
            }
            _ => ("none", "All Systems Operational"),
        }
    }
}

/// Provider `i`'s state from its override, its targets' health and its
/// status page.
pub fn provider_state(live: &Live, i: usize) -> (ProviderState, String) {
    let Some(health) = live.overrides.get(i) else {
        return (ProviderState::Operational, String::new());
    };
    match health.get() {
        Override::Down => return (ProviderState::Down, "overridden down by an operator".into()),
        Override::Up => {
            return (
                ProviderState::Overridden,
                "overridden up by an operator: used whatever its health".into(),
            )
        }
        Override::Auto => {}
    }
    let (mut total, mut open, mut misconfigured, mut cooling) = (0u32, 0u32, 0u32, 0u32);
    let mut seen: Vec<*const crate::health::TargetHealth> = Vec::new();
    for (route, state) in live.config.routes.iter().zip(&live.routes) {
        for (target, h) in route.targets.iter().zip(&state.health) {
            // Health is kept per route and target; a target listed twice
            // on one route shares one.
            if target.provider_index != i || seen.contains(&Arc::as_ptr(h)) {
                continue;
            }
            seen.push(Arc::as_ptr(h));
            total += 1;
            if h.state() != BreakerState::Closed {
                open += 1;
            } else if h.is_misconfigured() {
                misconfigured += 1;
            } else if h.status(&route.breaker) == Status::Skip {
                cooling += 1;
            }
        }
    }
    let mut found: Vec<(ProviderState, String)> = Vec::new();
    if total > 0 && open == total {
        found.push((
            ProviderState::Down,
            "every target's circuit breaker is open".into(),
        ));
    } else if open > 0 {
        found.push((
            ProviderState::PartialOutage,
            format!("{open} of {total} targets have an open circuit breaker"),
        ));
    }
    if misconfigured > 0 {
        found.push((
            ProviderState::PartialOutage,
            "it rejects detour's credentials".into(),
        ));
    }
    if cooling > 0 {
        found.push((ProviderState::Degraded, "rate-limited: cooling down".into()));
    }
    match health.page_state() {
        PageState::Down => found.push((
            ProviderState::Down,
            "its status page reports a major outage".into(),
        )),
        PageState::Degraded => found.push((
            ProviderState::Degraded,
            "its status page reports degraded service".into(),
        )),
        PageState::Operational | PageState::Unknown => {}
    }
    let state = found
        .iter()
        .map(|(s, _)| *s)
        .max()
        .unwrap_or(ProviderState::Operational);
    let why = found
        .into_iter()
        .map(|(_, w)| w)
        .collect::<Vec<_>>()
        .join("; ");
    (state, why)
}

/// `GET /status`.
/// `GET /status` and `GET /status.json`, public: for the main listener's
/// router ([`crate::server::router`]), outside authentication.
pub fn routes() -> axum::Router<Arc<Gateway>> {
    axum::Router::new()
        .route("/status", axum::routing::get(html))
        .route("/status.json", axum::routing::get(json))
}

pub async fn html(State(gw): State<Arc<Gateway>>) -> Response {
    let page = render_html(&Summary::of(&gw));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        page,
    )
        .into_response()
}

/// `GET /status.json`.
pub async fn json(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let url = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .map_or_else(|| "/status".to_owned(), |a| format!("http://{a}/status"));
    let body = statuspage_summary(&Summary::of(&gw), &url).to_string();
    let mut resp = (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response();
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

/// A stable 12-character id for a Statuspage object.
fn id_for(kind: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{kind}\0{name}").as_bytes());
    hex::encode(&digest[..6])
}

fn impact_of(i: &Incident) -> &'static str {
    match i.impact {
        Impact::Down => "major",
        Impact::Degraded => "minor",
    }
}

fn cause_text(cause: Cause) -> &'static str {
    match cause {
        Cause::Traffic => "detected from detour's own traffic",
        Cause::StatusPage => "reported by the provider's status page",
        Cause::Override => "set by an operator",
    }
}

/// The Statuspage v2 `summary.json` document, with a `detour` extension.
pub fn statuspage_summary(s: &Summary, url: &str) -> Value {
    let gateway_started = rfc3339(s.started);
    let component = |p: &ProviderView, position: usize| {
        json!({
            "id": id_for("component", &p.name),
            "name": p.name,
            "status": p.state.component_status(),
            "created_at": gateway_started,
            "updated_at": rfc3339(p.updated_at),
            "position": position,
            "description": (!p.why.is_empty()).then_some(&p.why),
            "showcase": true,
            "start_date": null,
            "group_id": null,
            "page_id": PAGE_ID,
            "group": false,
            "only_show_if_degraded": false,
        })
    };
    let components: Vec<Value> = s
        .providers
        .iter()
        .enumerate()
        .map(|(i, p)| component(p, i + 1))
        .collect();
    let incidents: Vec<Value> = s
        .incidents
        .iter()
        .filter(|i| i.ended.is_none())
        .map(|i| {
            let id = format!("detour{:06}", i.id);
            let started = rfc3339(i.started);
            let provider = s.providers.iter().position(|p| p.name == i.provider);
            let affected: Vec<Value> = provider
                .and_then(|n| s.providers.get(n).map(|p| component(p, n + 1)))
                .into_iter()
                .collect();
            let codes: Vec<Value> = affected
                .iter()
                .map(|c| json!({"code": c["id"], "name": c["name"], "old_status": "operational", "new_status": c["status"]}))
                .collect();
            let body = format!(
                "{}: {} ({}). {} requests failed over so far.",
                i.provider,
                i.detail,
                cause_text(i.cause),
                i.failed_over
            );
            json!({
                "id": id,
                "name": format!("{} unavailable: {}", i.provider, i.detail),
                "status": "investigating",
                "impact": impact_of(i),
                "created_at": started,
                "updated_at": started,
                "monitoring_at": null,
                "resolved_at": null,
                "started_at": started,
                "shortlink": url,
                "page_id": PAGE_ID,
                "incident_updates": [{
                    "id": format!("{id}u"),
                    "status": "investigating",
                    "body": body,
                    "incident_id": id,
                    "created_at": started,
                    "updated_at": started,
                    "display_at": started,
                    "affected_components": codes,
                    "deliver_notifications": false,
                    "custom_tweet": null,
                    "tweet_id": null,
                }],
                "components": affected,
                "reminder_intervals": null,
            })
        })
        .collect();
    let (indicator, description) = s.indicator();
    let updated_at = s
        .providers
        .iter()
        .map(|p| p.updated_at)
        .max()
        .unwrap_or(s.started);
    json!({
        "page": {
            "id": PAGE_ID,
            "name": "detour",
            "url": url,
            "time_zone": "Etc/UTC",
            "updated_at": rfc3339(updated_at),
        },
        "status": {"indicator": indicator, "description": description},
        "components": components,
        "incidents": incidents,
        "scheduled_maintenances": [],
        "detour": {
            "started_at": gateway_started,
            "uptime_seconds": s.uptime.as_secs(),
            "incidents": s.incidents.iter().map(|i| json!({
                "id": format!("detour{:06}", i.id),
                "provider": i.provider,
                "cause": i.cause,
                "impact": i.impact,
                "detail": i.detail,
                "started_at": rfc3339(i.started),
                "ended_at": i.ended.map(rfc3339),
                "failed_over": i.failed_over,
            })).collect::<Vec<_>>(),
        },
    })
}

const STYLE: &str = "\
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:60rem;padding:1.5rem;color:#1d2329;background:#f7f8fa}\
h1{font-size:1.6rem;margin:0 0 .25rem}h2{font-size:1.15rem;margin:2rem 0 .5rem}\
.meta{color:#5a6470;margin:.25rem 0}\
.overall{padding:.8rem 1rem;border-radius:6px;font-weight:600;margin:1rem 0;color:#fff}\
.ind-none{background:#2f9e44}.ind-minor{background:#e8a317}.ind-major{background:#e8590c}.ind-critical{background:#c92a2a}\
table{width:100%;border-collapse:collapse;background:#fff;border:1px solid #dde1e6;border-radius:6px}\
th,td{text-align:left;padding:.5rem .75rem;border-bottom:1px solid #eef0f3;vertical-align:top}\
th{font-weight:600;color:#5a6470;font-size:.85rem;text-transform:uppercase;letter-spacing:.03em}\
.badge{display:inline-block;padding:.1rem .5rem;border-radius:999px;font-size:.85rem;font-weight:600;color:#fff}\
.operational{background:#2f9e44}.degraded{background:#e8a317}.down{background:#c92a2a}.overridden{background:#5f3dc4}\
.ongoing{font-weight:600;color:#c92a2a}.empty{color:#5a6470;font-style:italic}.num{text-align:right}\
";

/// The HTML page.
pub fn render_html(s: &Summary) -> String {
    let (indicator, description) = s.indicator();
    let mut out = String::with_capacity(4096 + 256 * (s.providers.len() + s.incidents.len()));
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>detour status</title><link rel=\"icon\" href=\"data:,\"><style>{STYLE}</style></head>\n<body>\n\
         <h1>detour status</h1>\n\
         <p class=\"meta\">Up <span id=\"uptime\">{}</span>, since <time datetime=\"{}\">{}</time>. Updated <time datetime=\"{}\">{}</time>; refreshes every {REFRESH_SECS} s.</p>\n\
         <p class=\"overall ind-{indicator}\" id=\"overall\" data-indicator=\"{indicator}\">{}</p>\n",
        human_duration(s.uptime),
        rfc3339(s.started),
        human_time(s.started),
        rfc3339(s.now),
        human_time(s.now),
        esc(description),
    );
    out.push_str(
        "<h2>Providers</h2>\n<table id=\"providers\"><thead><tr><th>Provider</th><th>State</th><th>Why</th></tr></thead><tbody>\n",
    );
    for p in &s.providers {
        let label = p.state.label();
        let _ = writeln!(
            out,
            "<tr data-provider=\"{name}\" data-state=\"{label}\"><td>{name}</td><td><span class=\"badge {label}\">{label}</span></td><td>{}</td></tr>",
            esc(&p.why),
            name = esc(&p.name),
        );
    }
    if s.providers.is_empty() {
        out.push_str("<tr><td colspan=\"3\" class=\"empty\">No providers configured.</td></tr>\n");
    }
    out.push_str("</tbody></table>\n<h2>Incidents in the last 24 hours</h2>\n");
    out.push_str(
        "<table id=\"incidents\"><thead><tr><th>Provider</th><th>Started</th><th>Ended</th><th>Cause</th><th>Effect</th><th class=\"num\">Requests failed over</th></tr></thead><tbody>\n",
    );
    for i in s.incidents.iter().rev().take(MAX_LISTED) {
        let ended = match i.ended {
            Some(t) => format!(
                "<time datetime=\"{}\">{}</time> ({})",
                rfc3339(t),
                human_time(t),
                human_duration(t.duration_since(i.started).unwrap_or_default())
            ),
            None => format!(
                "<span class=\"ongoing\">ongoing</span> ({})",
                human_duration(s.now.duration_since(i.started).unwrap_or_default())
            ),
        };
        let effect = match i.impact {
            Impact::Down => "down: not used",
            Impact::Degraded => "degraded: demoted",
        };
        let _ = writeln!(
            out,
            "<tr data-incident=\"{}\" data-provider=\"{}\" data-cause=\"{}\" data-ongoing=\"{}\"><td>{}</td><td><time datetime=\"{}\">{}</time></td><td>{ended}</td><td>{} <span class=\"meta\">({})</span></td><td>{effect}</td><td class=\"num\">{}</td></tr>",
            i.id,
            esc(&i.provider),
            i.cause.as_str(),
            i.ended.is_none(),
            esc(&i.provider),
            rfc3339(i.started),
            human_time(i.started),
            esc(i.detail),
            cause_text(i.cause),
            i.failed_over,
        );
    }
    if s.incidents.is_empty() {
        out.push_str("<tr><td colspan=\"6\" class=\"empty\">No incidents.</td></tr>\n");
    } else if s.incidents.len() > MAX_LISTED {
        let _ = writeln!(
            out,
            "<tr><td colspan=\"6\" class=\"empty\">{} older incidents in /status.json.</td></tr>",
            s.incidents.len() - MAX_LISTED
        );
    }
    out.push_str(
        "</tbody></table>\n<p class=\"meta\">The same as a Statuspage v2 summary: <a href=\"/status.json\">/status.json</a>.</p>\n</body></html>\n",
    );
    out
}

/// Escapes text for HTML content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `2024-06-04 07:21:03 UTC`.
fn human_time(t: SystemTime) -> String {
    let iso = rfc3339(t);
    format!("{} {} UTC", &iso[..10], &iso[11..19])
}

/// RFC 3339 in UTC with milliseconds, as Statuspage writes times.
pub fn rfc3339(t: SystemTime) -> String {
    crate::protocol::timefmt::rfc3339(t, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn summary(providers: &[(&str, ProviderState)], incidents: Vec<Incident>) -> Summary {
        Summary {
            now: at(1_700_000_600),
            started: at(1_700_000_000),
            uptime: Duration::from_secs(600),
            providers: providers
                .iter()
                .map(|(n, s)| ProviderView {
                    name: (*n).to_owned(),
                    state: *s,
                    why: String::new(),
                    updated_at: at(1_700_000_000),
                })
                .collect(),
            incidents,
        }
    }

    #[test]
    fn times_and_durations() {
        assert_eq!(rfc3339(at(1_700_000_000)), "2023-11-14T22:13:20.000Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(human_time(at(1_700_000_000)), "2023-11-14 22:13:20 UTC");
        assert_eq!(human_duration(Duration::from_secs(59)), "59 s");
        assert_eq!(human_duration(Duration::from_secs(3725)), "1 h 2 min");
        assert_eq!(human_duration(Duration::from_secs(90_000)), "1 d 1 h");
    }

    #[test]
    fn every_string_is_escaped() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let s = summary(
            &[("<script>alert(1)</script>", ProviderState::Down)],
            vec![],
        );
        let page = render_html(&s);
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;"));
    }

    #[test]
    fn the_indicator_is_the_worst_state() {
        use ProviderState::*;
        let ind = |p: &[(&str, ProviderState)]| summary(p, vec![]).indicator().0;
        assert_eq!(ind(&[("a", Operational), ("b", Overridden)]), "none");
        assert_eq!(ind(&[("a", Operational), ("b", Degraded)]), "minor");
        assert_eq!(ind(&[("a", PartialOutage), ("b", Operational)]), "minor");
        assert_eq!(ind(&[("a", Down), ("b", Operational)]), "major");
        assert_eq!(ind(&[("a", Down), ("b", Down)]), "critical");
        assert_eq!(ind(&[]), "none");
    }

    #[test]
    fn the_json_is_a_statuspage_summary_that_detour_itself_reads() {
        let incident = Incident {
            id: 7,
            provider: "a".into(),
            cause: Cause::Traffic,
            impact: Impact::Down,
            detail: "every target's circuit breaker opened",
            started: at(1_700_000_100),
            ended: None,
            failed_over: 12,
        };
        let s = summary(
            &[
                ("a", ProviderState::Down),
                ("b", ProviderState::Operational),
            ],
            vec![incident],
        );
        let v = statuspage_summary(&s, "http://x/status");
        assert_eq!(v["status"]["indicator"], "major");
        assert_eq!(v["components"][0]["status"], "major_outage");
        assert_eq!(v["components"][1]["position"], 2);
        assert_eq!(v["incidents"][0]["impact"], "major");
        assert_eq!(v["incidents"][0]["components"][0]["name"], "a");
        assert_eq!(v["detour"]["incidents"][0]["failed_over"], 12);
        assert_eq!(v["detour"]["uptime_seconds"], 600);
        let body = v.to_string();
        let read = |c: &[&str]| {
            let names: Vec<String> = c.iter().map(|s| (*s).to_owned()).collect();
            crate::status_pages::state_of(body.as_bytes(), &names)
        };
        assert_eq!(read(&["a"]), Ok(PageState::Down));
        assert_eq!(read(&["b"]), Ok(PageState::Operational));
        assert_eq!(read(&[]), Ok(PageState::Down));
    }
}
