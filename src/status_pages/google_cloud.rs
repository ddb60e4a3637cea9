//! Google Cloud's incidents feed, `https://status.cloud.google.com/incidents.json`
//! (Vertex AI's Gemini API among its products; Google Workspace publishes
//! the same schema): a JSON array of incidents, newest first, each with
//! `begin`, `end` (absent, null or empty while open), `severity`
//! (`low`/`medium`/`high`), `status_impact`, `most_recent_update`,
//! `service_name` and `affected_products: [{title, id}]`.
//!
//! An open incident affects a watched product named by its title or id (or
//! the incident's `service_name`). Its state: `SERVICE_OUTAGE` → down,
//! `SERVICE_DISRUPTION` → degraded, `SERVICE_INFORMATION` → operational (a
//! notice); without a `status_impact` (or one of another word), the severity
//! decides: `high` → down, `medium` → degraded, else operational. Products
//! with no open incident are operational. The feed covers every Google Cloud
//! product, so products must be named ([`ReadError::NeedsComponents`]).

use serde::Deserialize;

use super::{per_component, watched, ReadError, Reading};
use crate::health::PageState;

const FORMAT: &str = "Google Cloud incidents feed";

#[derive(Deserialize)]
struct Incident {
    #[serde(default)]
    end: Option<String>,
    #[serde(default)]
    severity: Option<String>,
    #[serde(default)]
    status_impact: Option<String>,
    #[serde(default)]
    most_recent_update: Option<Update>,
    #[serde(default)]
    service_name: Option<String>,
    #[serde(default)]
    affected_products: Vec<Product>,
}

#[derive(Deserialize)]
struct Update {
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct Product {
    #[serde(default)]
    title: String,
    #[serde(default)]
    id: String,
}

impl Incident {
    fn open(&self) -> bool {
        // The last update says AVAILABLE once Google has closed it, even
        // when `end` is not written yet.
        let available = self
            .most_recent_update
            .as_ref()
            .and_then(|u| u.status.as_deref())
            == Some("AVAILABLE");
        self.end.as_deref().is_none_or(|e| e.trim().is_empty()) && !available
    }

    fn state(&self) -> PageState {
        match self.status_impact.as_deref() {
            Some("SERVICE_OUTAGE") => PageState::Down,
            Some("SERVICE_DISRUPTION") => PageState::Degraded,
            Some("SERVICE_INFORMATION") => PageState::Operational,
            _ => match self.severity.as_deref() {
                Some("high") => PageState::Down,
                Some("medium") => PageState::Degraded,
                _ => PageState::Operational,
            },
        }
    }
}

pub fn read(body: &[u8], components: &[String]) -> Result<Reading, ReadError> {
    let incidents: Vec<Incident> =
        serde_json::from_slice(body).map_err(|e| ReadError::shape(FORMAT, e))?;
    if components.is_empty() {
        return Err(ReadError::NeedsComponents);
    }
    let mut found = Vec::new();
    for incident in incidents.iter().filter(|i| i.open()) {
        let service = incident.service_name.as_deref().unwrap_or_default();
        for p in &incident.affected_products {
            if let Some(w) = watched(components, &[&p.title, &p.id]) {
                found.push((w, incident.state()));
            }
        }
        if let Some(w) = watched(components, &[service]) {
            found.push((w, incident.state()));
        }
    }
    per_component(components, &found, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEED: &[u8] =
        include_bytes!("../../tests/fixtures/statuspages/google_cloud_incidents.json");

    fn worst(body: &[u8], c: &[&str]) -> Result<PageState, ReadError> {
        let c: Vec<String> = c.iter().map(|s| (*s).to_owned()).collect();
        read(body, &c).map(|r| r.worst())
    }

    #[test]
    fn open_incidents_of_watched_products_decide() {
        // An open SERVICE_OUTAGE of Vertex Gemini API.
        assert_eq!(worst(FEED, &["Vertex Gemini API"]), Ok(PageState::Down));
        // An open SERVICE_DISRUPTION, by product id.
        assert_eq!(
            worst(FEED, &["9CcrhHUcFevXPSVaSxkf"]),
            Ok(PageState::Degraded)
        );
        // Closed incidents and notices count for nothing.
        assert_eq!(worst(FEED, &["Cloud Run"]), Ok(PageState::Operational));
        assert_eq!(worst(FEED, &["Cloud Storage"]), Ok(PageState::Operational));
        // Not in the feed at all: no incident, operational.
        assert_eq!(
            worst(FEED, &["Vertex AI Search"]),
            Ok(PageState::Operational)
        );
    }

    #[test]
    fn the_feed_needs_products_and_an_array() {
        assert_eq!(worst(FEED, &[]), Err(ReadError::NeedsComponents));
        assert!(worst(b"{\"incidents\": []}", &["x"]).is_err());
        assert_eq!(worst(b"[]", &["x"]), Ok(PageState::Operational));
    }

    #[test]
    fn severity_decides_without_a_status_impact() {
        let body = br#"[{"begin":"2025-01-01T00:00:00+00:00","severity":"high","affected_products":[{"title":"Gemini","id":"g"}]},
                        {"begin":"2025-01-01T00:00:00+00:00","end":"","severity":"medium","affected_products":[{"title":"Vertex","id":"v"}]}]"#;
        assert_eq!(worst(body, &["Gemini"]), Ok(PageState::Down));
        assert_eq!(worst(body, &["Vertex"]), Ok(PageState::Degraded));
    }
}
