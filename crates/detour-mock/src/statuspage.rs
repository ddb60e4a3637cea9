//! The status-page flavor: one page, whose state is set through [`PageStatus`]
//! (`PUT /_mock/status` or [`MockServer::set_status`](super::MockServer::set_status)),
//! served in each format vendors publish (the path selects it):
//!
//! | path (all `GET`, unauthenticated) | format |
//! |---|---|
//! | `/api/v2/summary.json`, `/api/v2/status.json`, `/api/v2/components.json`, `/api/v2/incidents/unresolved.json`, `/api/v2/incidents.json`, `/api/v2/scheduled-maintenances.json`, `…/upcoming.json`, `…/active.json` (always empty) | Atlassian Statuspage public API v2 (PROVIDERS.md §5.2) |
//! | `/proxy/<host>` | incident.io: the summary the page itself loads (`status.openai.com/proxy/status.openai.com`) |
//! | `/api/v1/summary` | incident.io: the widget API |
//! | `/incidents.json` | Google Cloud's incidents feed (`status.cloud.google.com/incidents.json`) |
//! | `/feed.rss`, `/history.rss` | RSS 2.0 incident feed |
//! | `/feed.atom`, `/history.atom` | Atom incident feed |
//!
//! Anything else is a 404 HTML page, as Statuspage sends. Formats that only
//! list incidents (Google Cloud, the feeds, incident.io's incidents) show
//! components that are not operational under the page's incident, or under
//! an incident named "Service disruption" when the status has none. The
//! feeds also carry one old resolved incident.
//!
//! The page has the components [`DEFAULT_COMPONENTS`] (flat, no groups) plus any
//! other name a status mentions, and at most one incident.

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::body::Reply;
use super::gen::{self, Fnv};

mod formats;

/// Components every mock page has, in this order; other names follow, sorted.
pub const DEFAULT_COMPONENTS: [&str; 3] = ["API", "Chat Completions", "Embeddings"];

/// `status.indicator`, least to most severe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Indicator {
    None,
    Maintenance,
    Minor,
    Major,
    Critical,
}

impl Indicator {
    /// The `status.description` Statuspage shows for it.
    pub fn description(self) -> &'static str {
        match self {
            Self::None => "All Systems Operational",
            Self::Maintenance => "Service Under Maintenance",
            Self::Minor => "Minor Service Outage",
            Self::Major => "Partial System Outage",
            Self::Critical => "Major System Outage",
        }
    }
}

/// A component's `status`, least to most severe.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ComponentStatus {
    #[default]
    Operational,
    UnderMaintenance,
    DegradedPerformance,
    PartialOutage,
    MajorOutage,
}

impl ComponentStatus {
    /// The page indicator this status implies on its own (the mock's rule).
    fn indicator(self) -> Indicator {
        match self {
            Self::Operational => Indicator::None,
            Self::UnderMaintenance => Indicator::Maintenance,
            Self::DegradedPerformance | Self::PartialOutage => Indicator::Minor,
            Self::MajorOutage => Indicator::Major,
        }
    }
}

/// An incident's `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentStatus {
    #[default]
    Investigating,
    Identified,
    Monitoring,
    Resolved,
    Postmortem,
}

impl IncidentStatus {
    fn unresolved(self) -> bool {
        !matches!(self, Self::Resolved | Self::Postmortem)
    }
}

/// The page's one incident. In JSON either just its name (`"Elevated error rates"`)
/// or `{"name", "status"?, "impact"?, "body"?}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "IncidentInput")]
pub struct Incident {
    pub name: String,
    /// Default `investigating`.
    pub status: IncidentStatus,
    /// Default: the components' indicator, at least `minor`.
    pub impact: Option<Indicator>,
    /// Text of its one update. Default "We are currently investigating this issue."
    pub body: Option<String>,
}

impl Incident {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: IncidentStatus::default(),
            impact: None,
            body: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IncidentInput {
    Name(String),
    Full(IncidentFields),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncidentFields {
    name: String,
    #[serde(default)]
    status: IncidentStatus,
    #[serde(default)]
    impact: Option<Indicator>,
    #[serde(default)]
    body: Option<String>,
}

impl From<IncidentInput> for Incident {
    fn from(input: IncidentInput) -> Self {
        match input {
            IncidentInput::Name(name) => Self::new(name),
            IncidentInput::Full(f) => Self {
                name: f.name,
                status: f.status,
                impact: f.impact,
                body: f.body,
            },
        }
    }
}

/// The state of a mock status page: the JSON of `PUT`/`GET /_mock/status`.
///
/// A `PUT` replaces the whole state; missing keys take their default:
/// ```json
/// {"indicator": "major",                        // none|minor|major|critical|maintenance
///  "description": "Partial System Outage",      // default: from the indicator
///  "components": {"API": "major_outage"},       // others: operational
///  "incident": "Elevated error rates"}          // or {"name","status","impact","body"}, or null
/// ```
/// Without `indicator`, it is derived: the worst of the components (degraded or
/// partial → `minor`, major outage → `major`, maintenance → `maintenance`) and of an
/// unresolved incident's impact. `GET` answers with every field filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PageStatus {
    pub indicator: Option<Indicator>,
    pub description: Option<String>,
    pub components: BTreeMap<String, ComponentStatus>,
    pub incident: Option<Incident>,
}

impl PageStatus {
    /// All operational, no incident.
    pub fn operational() -> Self {
        Self::default()
    }

    pub fn with_indicator(mut self, indicator: Indicator) -> Self {
        self.indicator = Some(indicator);
        self
    }

    pub fn with_component(mut self, name: impl Into<String>, status: ComponentStatus) -> Self {
        self.components.insert(name.into(), status);
        self
    }

    pub fn with_incident(mut self, incident: Incident) -> Self {
        self.incident = Some(incident);
        self
    }

    /// Every default component listed, indicator, description and incident fields
    /// filled in.
    pub fn effective(&self) -> Self {
        let mut components = self.components.clone();
        for name in DEFAULT_COMPONENTS {
            components.entry(name.to_owned()).or_default();
        }
        let from_components = components
            .values()
            .map(|s| s.indicator())
            .max()
            .unwrap_or(Indicator::None);
        let incident = self.incident.as_ref().map(|i| Incident {
            name: i.name.clone(),
            status: i.status,
            impact: Some(i.impact.unwrap_or(from_components.max(Indicator::Minor))),
            body: Some(
                i.body
                    .clone()
                    .unwrap_or_else(|| "We are currently investigating this issue.".to_owned()),
            ),
        });
        let from_incident = incident
            .as_ref()
            .filter(|i| i.status.unresolved())
            .and_then(|i| i.impact)
            .unwrap_or(Indicator::None);
        let indicator = self.indicator.unwrap_or(from_components.max(from_incident));
        Self {
            indicator: Some(indicator),
            description: Some(
                self.description
                    .clone()
                    .unwrap_or_else(|| indicator.description().to_owned()),
            ),
            components,
            incident,
        }
    }
}

/// The live page: its effective status and when it changed.
pub(crate) struct Page {
    pub status: PageStatus,
    pub updated_at: SystemTime,
    pub incident_started: SystemTime,
}

impl Page {
    pub(crate) fn new(status: &PageStatus, previous: Option<&Page>) -> Self {
        let now = SystemTime::now();
        let status = status.effective();
        let same_incident = previous.filter(|p| {
            let name = |s: &PageStatus| s.incident.as_ref().map(|i| i.name.clone());
            name(&p.status).is_some() && name(&p.status) == name(&status)
        });
        Self {
            status,
            updated_at: now,
            incident_started: same_incident.map_or(now, |p| p.incident_started),
        }
    }
}

/// Which document a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Summary,
    Status,
    Components,
    Unresolved,
    Incidents,
    Maintenances,
    IncidentIoProxy,
    IncidentIoWidget,
    GoogleCloud,
    Rss,
    Atom,
    NotFound,
}

impl Route {
    pub(crate) fn of(method: &Method, path: &str) -> Self {
        if method != Method::GET {
            return Self::NotFound;
        }
        match path {
            "/api/v2/summary.json" => Self::Summary,
            "/api/v2/status.json" => Self::Status,
            "/api/v2/components.json" => Self::Components,
            "/api/v2/incidents/unresolved.json" => Self::Unresolved,
            "/api/v2/incidents.json" => Self::Incidents,
            "/api/v2/scheduled-maintenances.json"
            | "/api/v2/scheduled-maintenances/upcoming.json"
            | "/api/v2/scheduled-maintenances/active.json" => Self::Maintenances,
            "/api/v1/summary" => Self::IncidentIoWidget,
            "/incidents.json" => Self::GoogleCloud,
            "/feed.rss" | "/history.rss" => Self::Rss,
            "/feed.atom" | "/history.atom" => Self::Atom,
            p if p.len() > "/proxy/".len() && p.starts_with("/proxy/") => Self::IncidentIoProxy,
            _ => Self::NotFound,
        }
    }
}

const PAGE_ID: &str = "mockpage0001";
const CREATED_AT: &str = "2023-01-01T00:00:00.000Z";

/// Answers one (non-faulted) request.
pub(crate) fn serve(route: Route, page: &Page) -> Reply {
    let doc = Doc::new(page);
    let body = match route {
        Route::Summary => json!({
            "page": doc.page,
            "components": doc.components,
            "incidents": doc.incidents(true),
            "scheduled_maintenances": [],
            "status": doc.status,
        }),
        Route::Status => json!({"page": doc.page, "status": doc.status}),
        Route::Components => json!({"page": doc.page, "components": doc.components}),
        Route::Unresolved => json!({"page": doc.page, "incidents": doc.incidents(true)}),
        Route::Incidents => json!({"page": doc.page, "incidents": doc.incidents(false)}),
        Route::Maintenances => json!({"page": doc.page, "scheduled_maintenances": []}),
        Route::IncidentIoProxy => formats::incident_io_proxy(&doc),
        Route::IncidentIoWidget => formats::incident_io_widget(&doc),
        Route::GoogleCloud => formats::google_cloud(&doc),
        Route::Rss => {
            let body = formats::rss(&doc);
            return Reply::other(
                StatusCode::OK,
                "application/rss+xml; charset=utf-8",
                body.into(),
            );
        }
        Route::Atom => {
            let body = formats::atom(&doc);
            return Reply::other(
                StatusCode::OK,
                "application/atom+xml; charset=utf-8",
                body.into(),
            );
        }
        Route::NotFound => {
            return html(
                StatusCode::NOT_FOUND,
                "The page you were looking for doesn't exist.",
            )
        }
    };
    Reply::json(StatusCode::OK, body.to_string())
}

/// A small HTML error page, as Statuspage's edge sends for errors.
pub(crate) fn html(status: StatusCode, message: &str) -> Reply {
    let reason = status.canonical_reason().unwrap_or("Error");
    let code = status.as_u16();
    let body = format!(
        "<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head><body><h1>{code} {reason}</h1><p>{message}</p></body></html>\n"
    );
    Reply::other(status, "text/html; charset=utf-8", Bytes::from(body))
}

/// The reply for an `error_rate` fault.
pub(crate) fn injected_error(status: u16) -> Reply {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    html(status, "mock fault: injected error.")
}

/// The reply for a `rate_limit_rate` fault: 429 with `retry-after`.
pub(crate) fn rate_limited(retry_after_secs: u64) -> Reply {
    let mut reply = html(StatusCode::TOO_MANY_REQUESTS, "Rate limited.");
    reply.headers.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_after_secs),
    );
    reply
}

/// A stable 12-character Statuspage-style id for `kind` and `name`.
fn id_for(kind: &str, name: &str) -> String {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut hash = Fnv::new();
    hash.write(kind.as_bytes());
    hash.write(name.as_bytes());
    let mut rng = fastrand::Rng::with_seed(hash.finish());
    (0..12)
        .map(|_| char::from(ALPHABET[rng.usize(..ALPHABET.len())]))
        .collect()
}

fn status_name<T: Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The pieces every document is built from.
struct Doc<'a> {
    page_status: &'a PageStatus,
    updated_at: String,
    incident_started: String,
    page: Value,
    status: Value,
    components: Vec<Value>,
}

impl<'a> Doc<'a> {
    fn new(page: &'a Page) -> Self {
        let status = &page.status;
        let updated_at = gen::rfc3339(page.updated_at, true);
        let mut names: Vec<&String> = status.components.keys().collect();
        names.sort_by_key(|n| {
            let default = DEFAULT_COMPONENTS.iter().position(|d| d == n);
            (default.unwrap_or(usize::MAX), n.as_str())
        });
        let components = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let state = status.components.get(*name).copied().unwrap_or_default();
                json!({
                    "id": id_for("component", name), "name": name, "status": status_name(state),
                    "created_at": CREATED_AT, "updated_at": updated_at, "position": i + 1,
                    "description": null, "showcase": true, "start_date": null,
                    "group_id": null, "page_id": PAGE_ID, "group": false,
                    "only_show_if_degraded": false,
                })
            })
            .collect();
        let indicator = status.indicator.unwrap_or(Indicator::None);
        Self {
            page_status: status,
            page: json!({
                "id": PAGE_ID, "name": "Mock Status", "url": "https://status.mock.invalid",
                "time_zone": "Etc/UTC", "updated_at": updated_at,
            }),
            status: json!({
                "indicator": status_name(indicator),
                "description": status.description.clone().unwrap_or_else(|| indicator.description().to_owned()),
            }),
            incident_started: gen::rfc3339(page.incident_started, true),
            updated_at,
            components,
        }
    }

    fn incidents(&self, unresolved_only: bool) -> Vec<Value> {
        let Some(incident) = &self.page_status.incident else {
            return Vec::new();
        };
        if unresolved_only && !incident.status.unresolved() {
            return Vec::new();
        }
        let id = id_for("incident", &incident.name);
        let affected: Vec<&Value> = self
            .components
            .iter()
            .filter(|c| c["status"] != "operational")
            .collect();
        let affected_codes: Vec<Value> = affected
            .iter()
            .map(|c| json!({"code": c["id"], "name": c["name"], "old_status": "operational", "new_status": c["status"]}))
            .collect();
        let resolved_at = (!incident.status.unresolved()).then(|| self.updated_at.clone());
        let status = status_name(incident.status);
        let update = json!({
            "id": id_for("update", &incident.name), "status": status,
            "body": incident.body.as_deref().unwrap_or_default(), "incident_id": id,
            "created_at": self.updated_at, "updated_at": self.updated_at, "display_at": self.updated_at,
            "affected_components": affected_codes, "deliver_notifications": true,
            "custom_tweet": null, "tweet_id": null,
        });
        vec![json!({
            "id": id, "name": incident.name, "status": status,
            "impact": status_name(incident.impact.unwrap_or(Indicator::Minor)),
            "created_at": self.incident_started, "updated_at": self.updated_at,
            "monitoring_at": null, "resolved_at": resolved_at, "started_at": self.incident_started,
            "shortlink": format!("https://stspg.io/{}", &id[..6]), "page_id": PAGE_ID,
            "incident_updates": [update], "components": affected, "reminder_intervals": null,
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_status_derives_indicator_and_fills_components() {
        let s = PageStatus::operational().effective();
        assert_eq!(s.indicator, Some(Indicator::None));
        assert_eq!(s.description.as_deref(), Some("All Systems Operational"));
        assert_eq!(s.components.len(), DEFAULT_COMPONENTS.len());

        let s = PageStatus::operational()
            .with_component("API", ComponentStatus::MajorOutage)
            .effective();
        assert_eq!(s.indicator, Some(Indicator::Major));

        let s = PageStatus::operational()
            .with_incident(Incident::new("Slow"))
            .effective();
        assert_eq!(s.indicator, Some(Indicator::Minor));
        assert_eq!(s.incident.and_then(|i| i.impact), Some(Indicator::Minor));

        let s = PageStatus::operational()
            .with_indicator(Indicator::Critical)
            .effective();
        assert_eq!(s.description.as_deref(), Some("Major System Outage"));
        assert_eq!(s.effective(), s, "effective is idempotent");
    }

    #[test]
    fn incidents_parse_from_a_name_or_an_object() {
        let s: PageStatus = serde_json::from_str(r#"{"incident": "Down"}"#).unwrap_or_default();
        assert_eq!(s.incident, Some(Incident::new("Down")));
        let s: PageStatus =
            serde_json::from_str(r#"{"incident": {"name": "Down", "status": "resolved"}}"#)
                .unwrap_or_default();
        assert_eq!(s.incident.map(|i| i.status), Some(IncidentStatus::Resolved));
        assert!(
            serde_json::from_str::<PageStatus>(r#"{"components": {"API": "broken"}}"#).is_err()
        );
    }
}
