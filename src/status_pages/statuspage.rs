//! Atlassian Statuspage v2 `summary.json` (`status.claude.com`, and the
//! Statuspage-compatible summary other hosts serve).
//!
//! Watched components are matched by name or id; a watched group (a
//! component with `group: true`) stands for the components whose
//! `group_id` is its id. With none watched, `status.indicator` decides:
//! `minor` → degraded, `major`/`critical` → down, else operational.

use serde::Deserialize;

use super::{component_state, per_component, watched, ReadError, Reading};
use crate::health::PageState;

const FORMAT: &str = "Statuspage v2 summary";

#[derive(Deserialize)]
struct Summary {
    status: Option<Indicator>,
    #[serde(default)]
    components: Vec<Component>,
}

#[derive(Deserialize)]
struct Indicator {
    indicator: String,
}

#[derive(Deserialize)]
struct Component {
    #[serde(default)]
    id: String,
    name: String,
    status: String,
    #[serde(default)]
    group_id: Option<String>,
    #[serde(default)]
    group: bool,
}

/// The state `status.indicator` (or a webhook's `page.status_indicator`)
/// gives the whole page.
pub fn indicator_state(indicator: &str) -> PageState {
    match indicator {
        "minor" => PageState::Degraded,
        "major" | "critical" => PageState::Down,
        _ => PageState::Operational,
    }
}

pub fn read(body: &[u8], components: &[String]) -> Result<Reading, ReadError> {
    let summary: Summary = serde_json::from_slice(body).map_err(|e| ReadError::shape(FORMAT, e))?;
    if components.is_empty() {
        let indicator = summary
            .status
            .ok_or_else(|| ReadError::shape(FORMAT, "the summary has no `status.indicator`"))?
            .indicator;
        return Ok(Reading::whole(indicator_state(&indicator)));
    }
    // Watched groups, by their id.
    let groups: Vec<(&str, &String)> = summary
        .components
        .iter()
        .filter(|c| c.group)
        .filter_map(|c| watched(components, &[&c.name, &c.id]).map(|w| (c.id.as_str(), w)))
        .collect();
    let found: Vec<(&String, PageState)> = summary
        .components
        .iter()
        .filter_map(|c| {
            let direct = watched(components, &[&c.name, &c.id]);
            let by_group = c.group_id.as_deref().and_then(|g| {
                groups
                    .iter()
                    .find(|(id, _)| !id.is_empty() && *id == g)
                    .map(|(_, w)| *w)
            });
            direct.or(by_group).map(|w| (w, component_state(&c.status)))
        })
        .collect();
    per_component(components, &found, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"{"page":{"id":"x"},"status":{"indicator":"minor","description":"d"},
      "components":[{"id":"a1","name":"API","status":"major_outage"},{"id":"c1","name":"Chat","status":"degraded_performance"},{"id":"d1","name":"Docs","status":"operational"},
      {"id":"g1","name":"Claude","status":"partial_outage","group":true},{"id":"k1","name":"Claude Code","status":"partial_outage","group_id":"g1"}]}"#;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    fn worst(c: &[&str]) -> Result<PageState, ReadError> {
        read(PAGE.as_bytes(), &names(c)).map(|r| r.worst())
    }

    #[test]
    fn components_decide_when_named() {
        assert_eq!(worst(&["Docs"]), Ok(PageState::Operational));
        assert_eq!(worst(&["Chat"]), Ok(PageState::Degraded));
        assert_eq!(worst(&["Chat", "API"]), Ok(PageState::Down));
        assert_eq!(worst(&["a1"]), Ok(PageState::Down), "by id");
        assert_eq!(worst(&["Claude"]), Ok(PageState::Degraded), "a group");
        assert!(matches!(worst(&["Nope"]), Err(ReadError::NoComponent(_))));
    }

    #[test]
    fn the_indicator_decides_otherwise() {
        assert_eq!(worst(&[]), Ok(PageState::Degraded));
        assert!(read(b"<html>", &[]).is_err());
        assert!(read(b"{}", &[]).is_err());
    }

    #[test]
    fn the_fixture_reads() {
        let body = include_bytes!("../../tests/fixtures/statuspages/statuspage_summary.json");
        assert_eq!(
            read(body, &names(&["Claude API (api.anthropic.com)"])).map(|r| r.worst()),
            Ok(PageState::Down)
        );
        assert_eq!(
            read(body, &names(&["Claude Code"])).map(|r| r.worst()),
            Ok(PageState::Operational)
        );
        assert_eq!(read(body, &[]).map(|r| r.worst()), Ok(PageState::Down));
    }
}
