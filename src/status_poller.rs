//! Watching providers' status pages (Atlassian Statuspage v2 `summary.json`).
//!
//! A poller per provider with a `status_page` fetches the summary every
//! `status_poll`, reads the components the config names (or the page's overall
//! indicator when it names none) and sets the provider's [`PageState`]:
//!
//! | page says | state | routing |
//! |---|---|---|
//! | `operational`, indicator `none` or `maintenance` | `operational` | normal |
//! | `degraded_performance`, `partial_outage`, indicator `minor` | `degraded` | demoted behind healthy peers |
//! | `major_outage`, indicator `major` or `critical` | `down` | skipped |
//!
//! A page that cannot be fetched or read changes nothing: the last state
//! stays, and the error is logged and shown in `/admin/health`. This way an
//! incident steers traffic before detour's own requests have to discover it,
//! and a broken status page can never take a provider out.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::config::Provider;
use crate::health::{PageState, ProviderHealth};
use crate::incidents::{Impact, IncidentLog};

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
    name: String,
    status: String,
}

/// Reads a summary body into a state for the given components.
pub fn state_of(body: &[u8], components: &[String]) -> Result<PageState, String> {
    let summary: Summary =
        serde_json::from_slice(body).map_err(|e| format!("not a Statuspage v2 summary: {e}"))?;
    if components.is_empty() {
        let indicator = summary
            .status
            .ok_or("the summary has no `status.indicator`")?
            .indicator;
        return Ok(match indicator.as_str() {
            "minor" => PageState::Degraded,
            "major" | "critical" => PageState::Down,
            _ => PageState::Operational,
        });
    }
    let mut worst = PageState::Operational;
    let mut found = 0;
    for c in summary
        .components
        .iter()
        .filter(|c| components.contains(&c.name))
    {
        found += 1;
        let state = match c.status.as_str() {
            "degraded_performance" | "partial_outage" => PageState::Degraded,
            "major_outage" => PageState::Down,
            _ => PageState::Operational,
        };
        worst = worst.max(state);
    }
    if found == 0 {
        return Err(format!(
            "none of the components {components:?} is on the page"
        ));
    }
    Ok(worst)
}

/// Polls `provider`'s status page until the task is aborted.
pub async fn poll(
    provider: Arc<Provider>,
    health: Arc<ProviderHealth>,
    incidents: Arc<IncidentLog>,
) {
    let Some(url) = provider.status_page.clone() else {
        return;
    };
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(provider = %provider.name, "status page client: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(provider.status_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match client.get(url.clone()).send().await {
            Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                Ok(body) => state_of(&body, &provider.status_components),
                Err(e) => Err(format!("reading the page failed: {}", without_url(e))),
            },
            Ok(resp) => Err(format!("the page answered {}", resp.status())),
            Err(e) => Err(format!("fetching the page failed: {}", without_url(e))),
        };
        match result {
            Ok(state) => {
                let old = health.page_state();
                health.set_page(state, None);
                crate::metrics::status_page_state(&provider.name, state.level());
                let reported = match state {
                    PageState::Down => Some(Impact::Down),
                    PageState::Degraded => Some(Impact::Degraded),
                    PageState::Operational | PageState::Unknown => None,
                };
                incidents.status_page(&provider.name, reported, SystemTime::now());
                if old != state {
                    tracing::warn!(provider = %provider.name, from = ?old, to = ?state, "status page changed");
                }
            }
            Err(e) => {
                tracing::warn!(provider = %provider.name, error = %e, "status page unusable; keeping the last state");
                health.set_page(health.page_state(), Some(e));
            }
        }
    }
}

/// Polls the status pages of the gateway's stable config, following it:
/// when the stable config changes (a reload, a promotion), the old pollers
/// stop and the new config's start. Runs on the task that calls it (the
/// main runtime, never the admin listener's), until that task is dropped or
/// the gateway is; the pollers end with it.
pub async fn keep_polling(gw: Arc<crate::state::Gateway>) {
    let mut changes = gw.changes();
    // Not kept alive by its pollers: the gateway's end ends them.
    let gw = Arc::downgrade(&gw);
    loop {
        let Some((live, incidents)) = gw
            .upgrade()
            .map(|gw| (gw.live(), Arc::clone(gw.incidents())))
        else {
            return;
        };
        let mut pollers = tokio::task::JoinSet::new();
        for (provider, health) in live.config.providers.iter().zip(&live.overrides) {
            if provider.status_page.is_some() {
                pollers.spawn(poll(
                    Arc::clone(provider),
                    Arc::clone(health),
                    Arc::clone(&incidents),
                ));
            }
        }
        drop(live);
        if changes.changed().await.is_err() {
            return; // the gateway is gone
        }
        // Dropping the set aborts the old config's pollers.
    }
}

/// What went wrong, without the page's URL: it may carry a token in its
/// query, and the message reaches the log and `/admin/health`.
fn without_url(e: reqwest::Error) -> String {
    crate::upstream::error_chain(&e.without_url())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"{"page":{"id":"x"},"status":{"indicator":"minor","description":"d"},
      "components":[{"name":"API","status":"major_outage"},{"name":"Chat","status":"degraded_performance"},{"name":"Docs","status":"operational"}]}"#;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn components_decide_when_named() {
        assert_eq!(
            state_of(PAGE.as_bytes(), &names(&["Docs"])),
            Ok(PageState::Operational)
        );
        assert_eq!(
            state_of(PAGE.as_bytes(), &names(&["Chat"])),
            Ok(PageState::Degraded)
        );
        assert_eq!(
            state_of(PAGE.as_bytes(), &names(&["Chat", "API"])),
            Ok(PageState::Down)
        );
        assert!(state_of(PAGE.as_bytes(), &names(&["Nope"])).is_err());
    }

    #[test]
    fn the_indicator_decides_otherwise() {
        assert_eq!(state_of(PAGE.as_bytes(), &[]), Ok(PageState::Degraded));
        assert!(state_of(b"<html>", &[]).is_err());
        assert!(state_of(b"{}", &[]).is_err());
    }
}
