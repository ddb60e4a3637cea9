//! incident.io-hosted status pages (`status.openai.com` among them), in
//! either of the two public JSON shapes they serve:
//!
//! - `/proxy/<host>`, the document the page itself loads:
//!   `{"summary": {"components": [{id, name}], "structure": {"items": [{"group":
//!   {id, name, components: [{component_id, name}]}} | {"component": {component_id,
//!   name}}]}, "affected_components": [{component_id, status}],
//!   "ongoing_incidents": [...]}}`. A component not in `affected_components`
//!   is operational.
//! - the widget API (`/api/v1/summary` on a custom domain): `{"page_title",
//!   "ongoing_incidents": [{name, status, current_worst_impact,
//!   affected_components: [{id, name, group_name, current_status}]}],
//!   "in_progress_maintenances", "scheduled_maintenances"}`. Only affected
//!   components appear: any other is operational.
//!
//! Impacts are `degraded_performance`, `partial_outage` and `full_outage`
//! ([`super::component_state`]). With no component watched, the page's
//! state is the worst impact of its ongoing incidents and affected components.

use serde::Deserialize;

use super::{component_state, per_component, watched, ReadError, Reading};
use crate::health::PageState;

const FORMAT: &str = "incident.io status page";

#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    Proxy { summary: Proxy },
    Widget(Widget),
}

#[derive(Deserialize)]
struct Proxy {
    #[serde(default)]
    components: Vec<NamedComponent>,
    #[serde(default)]
    structure: Option<Structure>,
    #[serde(default)]
    affected_components: Vec<Affected>,
    #[serde(default)]
    ongoing_incidents: Vec<Incident>,
}

#[derive(Deserialize)]
struct NamedComponent {
    #[serde(alias = "component_id")]
    id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct Structure {
    #[serde(default)]
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    group: Option<Group>,
    component: Option<NamedComponent>,
}

#[derive(Deserialize)]
struct Group {
    #[serde(default)]
    name: String,
    #[serde(default)]
    components: Vec<NamedComponent>,
}

#[derive(Deserialize)]
struct Affected {
    component_id: String,
    #[serde(default)]
    status: String,
}

#[derive(Deserialize)]
struct Widget {
    ongoing_incidents: Vec<Incident>,
}

/// An ongoing incident, as both shapes (and incident.io's webhooks) write it.
#[derive(Deserialize)]
pub(super) struct Incident {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub current_worst_impact: Option<String>,
    #[serde(default)]
    pub affected_components: Vec<IncidentComponent>,
}

#[derive(Deserialize)]
pub(super) struct IncidentComponent {
    #[serde(default, alias = "component_id")]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub group_name: Option<String>,
    #[serde(default, alias = "status", alias = "component_status")]
    pub current_status: Option<String>,
}

impl Incident {
    fn ongoing(&self) -> bool {
        self.status != "resolved"
    }

    fn impact(&self) -> PageState {
        self.current_worst_impact
            .as_deref()
            .map_or(PageState::Degraded, component_state)
    }
}

pub fn read(body: &[u8], components: &[String]) -> Result<Reading, ReadError> {
    let doc: Document = serde_json::from_slice(body).map_err(|_| {
        ReadError::shape(
            FORMAT,
            "neither a `/proxy/<host>` summary nor a widget API document",
        )
    })?;
    match doc {
        Document::Proxy { summary } => read_proxy(&summary, components),
        Document::Widget(widget) => read_widget(&widget, components),
    }
}

fn read_proxy(summary: &Proxy, components: &[String]) -> Result<Reading, ReadError> {
    let status_of = |id: &str| {
        summary
            .affected_components
            .iter()
            .filter(|a| a.component_id == id)
            .map(|a| component_state(&a.status))
            .max()
            .unwrap_or(PageState::Operational)
    };
    if components.is_empty() {
        let affected = summary
            .affected_components
            .iter()
            .map(|a| component_state(&a.status));
        let incidents = summary
            .ongoing_incidents
            .iter()
            .filter(|i| i.ongoing())
            .map(Incident::impact);
        let worst = affected
            .chain(incidents)
            .max()
            .unwrap_or(PageState::Operational);
        return Ok(Reading::whole(worst));
    }
    // Every component the page names, with the group it is in.
    let mut listed: Vec<(&NamedComponent, Option<&str>)> =
        summary.components.iter().map(|c| (c, None)).collect();
    for item in summary.structure.iter().flat_map(|s| &s.items) {
        if let Some(c) = &item.component {
            listed.push((c, None));
        }
        if let Some(g) = &item.group {
            listed.extend(g.components.iter().map(|c| (c, Some(g.name.as_str()))));
        }
    }
    let found: Vec<(&String, PageState)> = listed
        .iter()
        .filter_map(|(c, group)| {
            watched(components, &[&c.name, &c.id, group.unwrap_or_default()])
                .map(|w| (w, status_of(&c.id)))
        })
        .collect();
    per_component(components, &found, false)
}

fn read_widget(widget: &Widget, components: &[String]) -> Result<Reading, ReadError> {
    let ongoing = widget.ongoing_incidents.iter().filter(|i| i.ongoing());
    if components.is_empty() {
        let worst = ongoing
            .map(Incident::impact)
            .max()
            .unwrap_or(PageState::Operational);
        return Ok(Reading::whole(worst));
    }
    let mut found = Vec::new();
    for incident in ongoing {
        for c in &incident.affected_components {
            let group = c.group_name.as_deref().unwrap_or_default();
            if let Some(w) = watched(components, &[&c.name, &c.id, group]) {
                let state = c
                    .current_status
                    .as_deref()
                    .map_or_else(|| incident.impact(), component_state);
                found.push((w, state));
            }
        }
    }
    per_component(components, &found, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    fn worst(body: &[u8], c: &[&str]) -> Result<PageState, ReadError> {
        read(body, &names(c)).map(|r| r.worst())
    }

    const PROXY: &[u8] = include_bytes!("../../tests/fixtures/statuspages/incident_io_proxy.json");
    const WIDGET: &[u8] =
        include_bytes!("../../tests/fixtures/statuspages/incident_io_widget.json");

    #[test]
    fn the_proxy_summary_reads_components_groups_and_the_whole_page() {
        assert_eq!(worst(PROXY, &["Chat Completions"]), Ok(PageState::Down));
        assert_eq!(worst(PROXY, &["Responses"]), Ok(PageState::Degraded));
        assert_eq!(worst(PROXY, &["Embeddings"]), Ok(PageState::Operational));
        assert_eq!(worst(PROXY, &["APIs"]), Ok(PageState::Down), "a group");
        assert_eq!(
            worst(PROXY, &["01JMYB4A6RWSZ1AXJN7V3J6A3Q"]),
            Ok(PageState::Down),
            "by id"
        );
        assert_eq!(worst(PROXY, &[]), Ok(PageState::Down));
        assert!(matches!(
            worst(PROXY, &["Nope"]),
            Err(ReadError::NoComponent(_))
        ));
    }

    #[test]
    fn the_widget_api_counts_absent_components_as_operational() {
        assert_eq!(worst(WIDGET, &["Conversations"]), Ok(PageState::Down));
        assert_eq!(worst(WIDGET, &["Login"]), Ok(PageState::Degraded));
        assert_eq!(worst(WIDGET, &["Embeddings"]), Ok(PageState::Operational));
        assert_eq!(worst(WIDGET, &[]), Ok(PageState::Down));
        let calm = br#"{"page_title":"x","page_url":"u","ongoing_incidents":[],"in_progress_maintenances":[],"scheduled_maintenances":[]}"#;
        assert_eq!(worst(calm, &[]), Ok(PageState::Operational));
    }

    #[test]
    fn other_documents_are_refused() {
        assert!(read(b"{\"page\": {}}", &[]).is_err());
        assert!(read(b"[]", &[]).is_err());
    }
}
