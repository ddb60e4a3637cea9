//! The page in the formats other than Statuspage's: incident.io's two JSON
//! shapes, Google Cloud's incidents feed, RSS and Atom. Each is built from
//! the same [`Doc`] as the Statuspage documents.

use serde_json::{json, Value};

use super::{id_for, ComponentStatus, Doc, Indicator, CREATED_AT, PAGE_ID};

/// The group every component is in on the incident.io page.
const GROUP: &str = "APIs";

/// An incident shown in a format that lists incidents.
struct Shown {
    id: String,
    name: String,
    resolved: bool,
    status: &'static str,
    body: String,
    started: String,
    updated: String,
    /// Components not operational, with their status.
    affected: Vec<(String, ComponentStatus)>,
    impact: Indicator,
}

/// The page's incident, or "Service disruption" over its components that
/// are not operational; `None` when there is neither.
fn shown(doc: &Doc) -> Option<Shown> {
    let status = doc.page_status;
    let affected: Vec<(String, ComponentStatus)> = status
        .components
        .iter()
        .filter(|(_, s)| **s != ComponentStatus::Operational)
        .map(|(n, s)| (n.clone(), *s))
        .collect();
    let (name, resolved, state, body, impact) = match &status.incident {
        Some(i) => (
            i.name.clone(),
            !i.status.unresolved(),
            i.status,
            i.body.clone().unwrap_or_default(),
            i.impact.unwrap_or(Indicator::Minor),
        ),
        None if !affected.is_empty() => (
            "Service disruption".to_owned(),
            false,
            super::IncidentStatus::Investigating,
            "We are currently investigating this issue.".to_owned(),
            status.indicator.unwrap_or(Indicator::Minor),
        ),
        None => return None,
    };
    Some(Shown {
        id: id_for("incident", &name),
        status: match state {
            super::IncidentStatus::Investigating => "investigating",
            super::IncidentStatus::Identified => "identified",
            super::IncidentStatus::Monitoring => "monitoring",
            super::IncidentStatus::Resolved | super::IncidentStatus::Postmortem => "resolved",
        },
        name,
        resolved,
        body,
        started: doc.incident_started.clone(),
        updated: doc.updated_at.clone(),
        affected: if resolved { Vec::new() } else { affected },
        impact,
    })
}

/// incident.io's word for a component status (`None`: operational, not listed).
fn impact_word(s: ComponentStatus) -> Option<&'static str> {
    match s {
        ComponentStatus::Operational => None,
        ComponentStatus::UnderMaintenance => Some("under_maintenance"),
        ComponentStatus::DegradedPerformance => Some("degraded_performance"),
        ComponentStatus::PartialOutage => Some("partial_outage"),
        ComponentStatus::MajorOutage => Some("full_outage"),
    }
}

impl Shown {
    /// The worst impact, in incident.io's words.
    fn worst_impact(&self) -> &'static str {
        let worst = self.affected.iter().map(|(_, s)| *s).max();
        match worst.and_then(impact_word) {
            Some(w) if w != "under_maintenance" => w,
            _ => match self.impact {
                Indicator::Critical => "full_outage",
                Indicator::Major => "partial_outage",
                _ => "degraded_performance",
            },
        }
    }

    /// Google Cloud's `status_impact` and `severity`.
    fn google_impact(&self) -> (&'static str, &'static str) {
        let worst = self.affected.iter().map(|(_, s)| *s).max();
        match (worst, self.impact) {
            (Some(ComponentStatus::MajorOutage), _) | (None, Indicator::Critical) => {
                ("SERVICE_OUTAGE", "high")
            }
            (Some(ComponentStatus::DegradedPerformance | ComponentStatus::PartialOutage), _)
            | (None, Indicator::Major | Indicator::Minor) => ("SERVICE_DISRUPTION", "medium"),
            _ => ("SERVICE_INFORMATION", "low"),
        }
    }
}

/// `/proxy/<host>`: `{"summary": {…}}` as incident.io pages load it.
pub(super) fn incident_io_proxy(doc: &Doc) -> Value {
    let names: Vec<&str> = doc
        .components
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let shown = shown(doc);
    let affected: Vec<Value> = shown
        .iter()
        .flat_map(|i| &i.affected)
        .filter_map(|(n, s)| {
            impact_word(*s).map(|w| json!({"component_id": id_for("component", n), "status": w}))
        })
        .collect();
    let incidents: Vec<Value> = shown
        .iter()
        .filter(|i| !i.resolved)
        .map(|i| {
            json!({
                "id": i.id, "name": i.name, "status": i.status,
                "url": format!("https://status.mock.invalid/incidents/{}", i.id),
                "last_update_at": i.updated, "last_update_message": i.body,
                "current_worst_impact": i.worst_impact(),
                "affected_components": affected,
            })
        })
        .collect();
    json!({"summary": {
        "id": PAGE_ID, "name": "Mock Status", "public_url": "https://status.mock.invalid",
        "components": names.iter().map(|n| json!({
            "id": id_for("component", n), "name": n, "status_page_id": PAGE_ID,
        })).collect::<Vec<_>>(),
        "structure": {"items": [{"group": {
            "id": id_for("group", GROUP), "name": GROUP, "hidden": false,
            "components": names.iter().map(|n| json!({
                "component_id": id_for("component", n), "name": n, "hidden": false,
            })).collect::<Vec<_>>(),
        }}]},
        "affected_components": affected,
        "ongoing_incidents": incidents,
        "scheduled_maintenances": [],
    }})
}

/// `/api/v1/summary`: incident.io's widget API.
pub(super) fn incident_io_widget(doc: &Doc) -> Value {
    let incidents: Vec<Value> = shown(doc)
        .iter()
        .filter(|i| !i.resolved)
        .map(|i| {
            json!({
                "id": i.id, "name": i.name, "status": i.status,
                "url": format!("https://status.mock.invalid/incidents/{}", i.id),
                "last_update_at": i.updated, "last_update_message": i.body,
                "current_worst_impact": i.worst_impact(),
                "affected_components": i.affected.iter().filter_map(|(n, s)| impact_word(*s).map(|w| json!({
                    "id": id_for("component", n), "name": n, "group_name": GROUP, "current_status": w,
                }))).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "page_title": "Mock Status", "page_url": "https://status.mock.invalid",
        "ongoing_incidents": incidents, "in_progress_maintenances": [], "scheduled_maintenances": [],
    })
}

/// `/incidents.json`: Google Cloud's feed, newest first, with one old
/// closed incident.
pub(super) fn google_cloud(doc: &Doc) -> Value {
    let mut list = Vec::new();
    if let Some(i) = shown(doc) {
        let (impact, severity) = i.google_impact();
        let end = i.resolved.then(|| i.updated.clone());
        let update = json!({
            "created": i.updated, "modified": i.updated, "when": i.updated,
            "text": i.body, "status": if i.resolved { "AVAILABLE" } else { impact },
            "affected_locations": [],
        });
        list.push(json!({
            "id": i.id, "number": "1", "begin": i.started, "created": i.started,
            "end": end, "modified": i.updated, "external_desc": i.name,
            "updates": [update], "most_recent_update": update,
            "status_impact": impact, "severity": severity,
            "service_key": id_for("product", "Mock"), "service_name": "Mock Service",
            "affected_products": i.affected.iter().map(|(n, _)| json!({
                "title": n, "id": id_for("component", n),
            })).collect::<Vec<_>>(),
            "uri": format!("incidents/{}", i.id),
            "currently_affected_locations": [], "previously_affected_locations": [],
        }));
    }
    list.push(json!({
        "id": id_for("incident", "old"), "number": "0", "begin": CREATED_AT, "created": CREATED_AT,
        "end": CREATED_AT, "modified": CREATED_AT, "external_desc": "An old incident",
        "updates": [], "most_recent_update": {"created": CREATED_AT, "text": "Resolved.", "status": "AVAILABLE"},
        "status_impact": "SERVICE_OUTAGE", "severity": "high",
        "service_key": id_for("product", "Mock"), "service_name": "Mock Service",
        "affected_products": [{"title": "API", "id": id_for("component", "API")}],
        "uri": "incidents/old", "currently_affected_locations": [], "previously_affected_locations": [],
    }));
    Value::Array(list)
}

/// One feed entry: (id, title, HTML body, RFC 3339 time).
fn entries(doc: &Doc) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    if let Some(i) = shown(doc) {
        let status = if i.resolved {
            "Resolved"
        } else {
            capitalised(i.status)
        };
        let components: String = i
            .affected
            .iter()
            .map(|(n, s)| format!("<li>{} ({})</li>", escape(n), human(*s)))
            .collect();
        let body = format!(
            "<b>Status: {status}</b><br/><br/>{}<br/><br/><b>Affected components</b><ul>{components}</ul>",
            escape(&i.body)
        );
        out.push((i.id, i.name, body, i.updated));
    }
    out.push((
        id_for("incident", "old"),
        "An old incident".to_owned(),
        "<b>Status: Resolved</b><br/><br/>This incident has been resolved.".to_owned(),
        CREATED_AT.to_owned(),
    ));
    out
}

fn capitalised(status: &str) -> &'static str {
    match status {
        "identified" => "Identified",
        "monitoring" => "Monitoring",
        _ => "Investigating",
    }
}

fn human(s: ComponentStatus) -> &'static str {
    match s {
        ComponentStatus::Operational => "Operational",
        ComponentStatus::UnderMaintenance => "Under maintenance",
        ComponentStatus::DegradedPerformance => "Degraded performance",
        ComponentStatus::PartialOutage => "Partial outage",
        ComponentStatus::MajorOutage => "Full outage",
    }
}

/// XML text escaping.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// RFC 3339 (`2023-01-01T00:00:00.000Z`) as RFC 2822 without the weekday
/// (`01 Jan 2023 00:00:00 +0000`), as RSS wants.
fn rfc2822(rfc3339: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = rfc3339
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .unwrap_or(&"Jan");
    format!(
        "{} {month} {} {} +0000",
        rfc3339.get(8..10).unwrap_or("01"),
        rfc3339.get(0..4).unwrap_or("1970"),
        rfc3339.get(11..19).unwrap_or("00:00:00"),
    )
}

pub(super) fn rss(doc: &Doc) -> String {
    let items: String = entries(doc)
        .iter()
        .map(|(id, title, body, at)| {
            format!(
                "<item><title>{}</title><description>{}</description><pubDate>{}</pubDate><link>https://status.mock.invalid/incidents/{id}</link><guid>https://status.mock.invalid/incidents/{id}</guid></item>",
                escape(title),
                escape(body),
                rfc2822(at)
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<rss version=\"2.0\"><channel><title>Mock Status - Incident history</title><link>https://status.mock.invalid</link><description>Statuspage</description>{items}</channel></rss>\n"
    )
}

pub(super) fn atom(doc: &Doc) -> String {
    let entries: String = entries(doc)
        .iter()
        .map(|(id, title, body, at)| {
            format!(
                "<entry><id>https://status.mock.invalid/incidents/{id}</id><title>{}</title><updated>{at}</updated><published>{at}</published><link rel=\"alternate\" type=\"text/html\" href=\"https://status.mock.invalid/incidents/{id}\"/><content type=\"html\">{}</content></entry>",
                escape(title),
                escape(body),
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<feed xmlns=\"http://www.w3.org/2005/Atom\" xml:lang=\"en-US\"><id>https://status.mock.invalid/history</id><title>Mock Status - Incident History</title><updated>{}</updated><link rel=\"alternate\" type=\"text/html\" href=\"https://status.mock.invalid\"/>{entries}</feed>\n",
        doc.updated_at
    )
}
