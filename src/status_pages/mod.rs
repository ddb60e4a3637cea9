//! Providers' status pages, read in the formats vendors publish, polled and
//! pushed into one per-provider state.
//!
//! | format (`status_page_format`) | what is read | a watched part is |
//! |---|---|---|
//! | `statuspage` ([`statuspage`]) | Atlassian Statuspage v2 `summary.json` (Anthropic's `status.claude.com`) | a component (by name or id, or a group by name), else `status.indicator` |
//! | `incident_io` ([`incident_io`]) | an incident.io-hosted page: `/proxy/<host>` (what `status.openai.com` itself loads) or the widget API | a component (by name or id, or a group by name), else the worst ongoing impact |
//! | `google_cloud` ([`google_cloud`]) | `status.cloud.google.com/incidents.json` | a product of an open incident (by title or id); products must be named |
//! | `rss`, `atom` ([`feed`]) | any incident feed, the generic fallback | an open entry that mentions it |
//! | `auto` (default) | detected from the body ([`detect`]): a JSON shape or an XML root | |
//!
//! Every reader maps the page onto [`PageState`] per watched part (a
//! component named in `status_components`, or the whole page when none is):
//! operational and maintenance → `operational`; degraded performance and
//! partial outages → `degraded`; a major or full outage → `down`. The
//! provider's state is the worst of its parts ([`crate::health::ProviderHealth::read_page_parts`]).
//!
//! Polling ([`poller`]) reads the whole page; a push ([`webhook`], on the
//! admin listener) says what changed for some parts, and goes through the
//! same update ([`poller::apply`]). A page that cannot be read, or that
//! changes format under `auto`, changes nothing: the last state stays and
//! the problem is shown in `/admin/health`.

pub mod feed;
pub mod google_cloud;
pub mod incident_io;
pub mod poller;
pub mod statuspage;
pub mod webhook;

pub use poller::keep_polling;

use crate::config::StatusFormat;
use crate::health::PageState;

/// The part name of the whole page, when no component is watched.
pub const WHOLE_PAGE: &str = "";

/// What one reading of a page says: a state for each watched part it
/// speaks of (every watched part, for a poll).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub parts: Vec<(String, PageState)>,
}

impl Reading {
    /// The state of the whole page (no component watched).
    pub fn whole(state: PageState) -> Self {
        Self {
            parts: vec![(WHOLE_PAGE.to_owned(), state)],
        }
    }

    /// The worst state of its parts (`Unknown` when it has none).
    pub fn worst(&self) -> PageState {
        self.parts
            .iter()
            .map(|(_, s)| *s)
            .max()
            .unwrap_or(PageState::Unknown)
    }
}

/// Why a page could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("not a {format} page: {detail}")]
    Shape {
        format: &'static str,
        detail: String,
    },
    #[error("none of the components {0:?} is on the page")]
    NoComponent(Vec<String>),
    #[error("the format could not be recognised: {0}")]
    Unrecognised(String),
    #[error("a Google Cloud feed needs `status_components` (the products to watch)")]
    NeedsComponents,
    #[error(
        "the page changed format from {from} to {to}; set `status_page_format` to read the new one"
    )]
    FormatChanged {
        from: &'static str,
        to: &'static str,
    },
}

impl ReadError {
    fn shape(format: &'static str, detail: impl std::fmt::Display) -> Self {
        Self::Shape {
            format,
            detail: detail.to_string(),
        }
    }
}

/// Reads `body` in `format` (detected when `Auto`) for the watched
/// `components`. Returns the format it was read in, too.
pub fn read(
    body: &[u8],
    format: StatusFormat,
    components: &[String],
) -> Result<(StatusFormat, Reading), ReadError> {
    let format = match format {
        StatusFormat::Auto => detect(body)?,
        f => f,
    };
    let reading = match format {
        StatusFormat::Statuspage => statuspage::read(body, components),
        StatusFormat::IncidentIo => incident_io::read(body, components),
        StatusFormat::GoogleCloud => google_cloud::read(body, components),
        StatusFormat::Rss | StatusFormat::Atom => {
            feed::read(body, format, components, std::time::SystemTime::now())
        }
        StatusFormat::Auto => Err(ReadError::Unrecognised("no format".into())),
    }?;
    Ok((format, reading))
}

/// A Statuspage v2 summary's state for `components` (the worst of them),
/// or the page's indicator when none is named.
pub fn state_of(body: &[u8], components: &[String]) -> Result<PageState, ReadError> {
    statuspage::read(body, components).map(|r| r.worst())
}

/// The format of `body`: JSON by its shape (an array: Google Cloud; an
/// object with `summary` or `ongoing_incidents`: incident.io; with `page`,
/// `status` or `components`: Statuspage), XML by its root element (`rss`
/// or `feed`).
pub fn detect(body: &[u8]) -> Result<StatusFormat, ReadError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ReadError::Unrecognised("the body is not UTF-8".into()))?;
    let text = text.trim_start_matches('\u{feff}').trim_start();
    if text.starts_with('<') {
        return match feed::root_element(text) {
            Some(root) if root.eq_ignore_ascii_case("rss") || root.ends_with("RDF") => {
                Ok(StatusFormat::Rss)
            }
            Some("feed") => Ok(StatusFormat::Atom),
            Some(root) => Err(ReadError::Unrecognised(format!(
                "an XML document with root <{root}>, not an RSS or Atom feed"
            ))),
            None => Err(ReadError::Unrecognised("unreadable XML".into())),
        };
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ReadError::Unrecognised(format!("neither JSON nor XML ({e})")))?;
    match &value {
        serde_json::Value::Array(_) => Ok(StatusFormat::GoogleCloud),
        serde_json::Value::Object(o)
            if o.get("summary").is_some_and(|s| s.is_object())
                || o.contains_key("ongoing_incidents") =>
        {
            Ok(StatusFormat::IncidentIo)
        }
        serde_json::Value::Object(o)
            if o.contains_key("page")
                || o.contains_key("status")
                || o.contains_key("components") =>
        {
            Ok(StatusFormat::Statuspage)
        }
        _ => Err(ReadError::Unrecognised(
            "JSON of no known status-page shape".into(),
        )),
    }
}

/// The watched component that any of `names` (a component's name, id or
/// group) is, compared without case or surrounding blanks.
pub fn watched<'a>(components: &'a [String], names: &[&str]) -> Option<&'a String> {
    components.iter().find(|c| {
        let c = c.trim();
        names
            .iter()
            .any(|n| !n.trim().is_empty() && n.trim().eq_ignore_ascii_case(c))
    })
}

/// A component status in Statuspage's or incident.io's words (also used by
/// their webhooks): operational and maintenance are `operational`, degraded
/// performance and partial outages `degraded`, major and full outages
/// `down`. Unknown words count as operational: a page's new vocabulary
/// never takes a provider out.
pub fn component_state(status: &str) -> PageState {
    match status.trim().to_ascii_lowercase().as_str() {
        "degraded_performance" | "partial_outage" | "degraded" => PageState::Degraded,
        "major_outage" | "full_outage" => PageState::Down,
        _ => PageState::Operational,
    }
}

/// One state for each watched component: from `found` (component → its
/// state, the worst when several parts map to one), `Operational` for the
/// others when `absent_is_operational` (pages that list only affected
/// components), else an error when none was found.
fn per_component(
    components: &[String],
    found: &[(&String, PageState)],
    absent_is_operational: bool,
) -> Result<Reading, ReadError> {
    let mut parts = Vec::new();
    for c in components {
        let state = found
            .iter()
            .filter(|(name, _)| *name == c)
            .map(|(_, s)| *s)
            .max();
        match state {
            Some(s) => parts.push((c.clone(), s)),
            None if absent_is_operational => parts.push((c.clone(), PageState::Operational)),
            None => {}
        }
    }
    if parts.is_empty() {
        return Err(ReadError::NoComponent(components.to_vec()));
    }
    Ok(Reading { parts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/statuspages/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn each_fixture_is_detected_as_its_format() {
        for (name, format) in [
            ("statuspage_summary.json", StatusFormat::Statuspage),
            ("incident_io_proxy.json", StatusFormat::IncidentIo),
            ("incident_io_widget.json", StatusFormat::IncidentIo),
            ("google_cloud_incidents.json", StatusFormat::GoogleCloud),
            ("statuspage_history.rss", StatusFormat::Rss),
            ("incident_io_feed.atom", StatusFormat::Atom),
        ] {
            assert_eq!(detect(&fixture(name)), Ok(format), "{name}");
        }
        assert!(detect(b"<!DOCTYPE html><html><body>hi</body></html>").is_err());
        assert!(detect(b"{\"hello\": 1}").is_err());
        assert!(detect(b"not anything").is_err());
    }

    #[test]
    fn components_are_matched_by_any_of_their_names_without_case() {
        let watched_list = vec!["Chat Completions".to_owned(), "01ABC".to_owned()];
        assert_eq!(
            watched(&watched_list, &["chat completions "]),
            Some(&watched_list[0])
        );
        assert_eq!(
            watched(&watched_list, &["x", "01abc"]),
            Some(&watched_list[1])
        );
        assert_eq!(watched(&watched_list, &["", "Embeddings"]), None);
    }
}
