//! Polling providers' status pages, and the one update both polls and
//! pushes go through ([`apply`]).
//!
//! A poller per provider with a `status_page` fetches it every
//! `status_poll`, reads it in its format ([`super::read`]) and sets the
//! provider's [`PageState`]:
//!
//! | page says | state | routing |
//! |---|---|---|
//! | operational, maintenance, no open incident | `operational` | normal |
//! | degraded performance, partial outage, indicator `minor` | `degraded` | demoted behind healthy peers |
//! | major or full outage, indicator `major` or `critical` | `down` | skipped |
//!
//! A page that cannot be fetched or read changes nothing: the last state
//! stays, and the error is logged and shown in `/admin/health`. Under
//! `status_page_format = "auto"` the format first read is kept: a page that
//! later reads as another format is reported the same way (a vendor that
//! moves its page is for an operator to confirm). This way an incident
//! steers traffic before detour's own requests have to discover it, and a
//! broken status page can never take a provider out.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{ReadError, Reading};
use crate::config::{Provider, StatusFormat};
use crate::health::{PageState, ProviderHealth};
use crate::incidents::{Impact, IncidentLog};

/// Where a reading came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A poll: it read every watched part.
    Poll,
    /// A push: it speaks of some parts only.
    Push,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Poll => "poll",
            Self::Push => "push",
        }
    }
}

/// Sets `provider`'s page state from a reading, as a poll or a push: the
/// state routing uses, the gauge, the incident log and the log line.
/// Returns the new state.
pub fn apply(
    provider: &Provider,
    health: &ProviderHealth,
    incidents: &IncidentLog,
    reading: &Reading,
    source: Source,
) -> PageState {
    let old = health.page_state();
    let state = health.read_page_parts(&reading.parts, source == Source::Poll);
    health.set_page(state, None);
    crate::metrics::status_page_state(&provider.name, state.level());
    let reported = match state {
        PageState::Down => Some(Impact::Down),
        PageState::Degraded => Some(Impact::Degraded),
        PageState::Operational | PageState::Unknown => None,
    };
    incidents.status_page(&provider.name, reported, SystemTime::now());
    if old != state {
        tracing::warn!(provider = %provider.name, from = ?old, to = ?state, source = source.as_str(), "status page changed");
    }
    state
}

/// Reads one fetched body, holding `auto` detection to the first format seen.
fn read_body(
    body: &[u8],
    provider: &Provider,
    detected: &mut Option<StatusFormat>,
) -> Result<Reading, ReadError> {
    let (format, reading) = super::read(
        body,
        provider.status_page_format,
        &provider.status_components,
    )?;
    if provider.status_page_format == StatusFormat::Auto {
        match *detected {
            Some(first) if first != format => {
                return Err(ReadError::FormatChanged {
                    from: first.as_str(),
                    to: format.as_str(),
                })
            }
            _ => *detected = Some(format),
        }
    }
    Ok(reading)
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
    let mut detected = None;
    loop {
        tick.tick().await;
        let result = match client.get(url.clone()).send().await {
            Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                Ok(body) => read_body(&body, &provider, &mut detected).map_err(|e| e.to_string()),
                Err(e) => Err(format!("reading the page failed: {}", without_url(e))),
            },
            Ok(resp) => Err(format!("the page answered {}", resp.status())),
            Err(e) => Err(format!("fetching the page failed: {}", without_url(e))),
        };
        match result {
            Ok(reading) => {
                apply(&provider, &health, &incidents, &reading, Source::Poll);
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

    fn provider(format: StatusFormat) -> Provider {
        Provider {
            name: "p".into(),
            kind: crate::config::ProviderKind::OpenAi,
            base_url: "http://127.0.0.1:1/v1".parse().unwrap(),
            api_key: None,
            status_page: None,
            status_components: vec!["API".into()],
            status_poll: Duration::from_secs(30),
            status_page_format: format,
            status_webhook_secret: None,
            default_max_tokens: 4096,
            tls: Default::default(),
            proxy: Default::default(),
            connect_timeout: Duration::from_secs(1),
        }
    }

    const SUMMARY: &[u8] = br#"{"status":{"indicator":"major"},"components":[{"id":"a","name":"API","status":"major_outage"}]}"#;
    const FEED: &[u8] =
        br#"<?xml version="1.0"?><rss version="2.0"><channel><title>x</title></channel></rss>"#;

    #[test]
    fn auto_keeps_the_first_format_it_read() {
        let p = provider(StatusFormat::Auto);
        let mut detected = None;
        assert!(read_body(SUMMARY, &p, &mut detected).is_ok());
        assert_eq!(detected, Some(StatusFormat::Statuspage));
        assert!(matches!(
            read_body(FEED, &p, &mut detected),
            Err(ReadError::FormatChanged { .. })
        ));
        assert!(read_body(SUMMARY, &p, &mut detected).is_ok());
    }

    #[test]
    fn a_set_format_refuses_another() {
        let p = provider(StatusFormat::Rss);
        assert!(matches!(
            read_body(SUMMARY, &p, &mut None),
            Err(ReadError::Shape { .. })
        ));
    }

    #[test]
    fn a_push_updates_its_parts_and_a_poll_replaces_them() {
        let mut p = provider(StatusFormat::Statuspage);
        p.status_components = vec!["API".into(), "Chat".into()];
        let health = ProviderHealth::default();
        let incidents = IncidentLog::new();
        let poll = Reading {
            parts: vec![
                ("API".into(), PageState::Operational),
                ("Chat".into(), PageState::Degraded),
            ],
        };
        assert_eq!(
            apply(&p, &health, &incidents, &poll, Source::Poll),
            PageState::Degraded
        );
        let push = Reading {
            parts: vec![("API".into(), PageState::Down)],
        };
        assert_eq!(
            apply(&p, &health, &incidents, &push, Source::Push),
            PageState::Down
        );
        let push = Reading {
            parts: vec![("API".into(), PageState::Operational)],
        };
        assert_eq!(
            apply(&p, &health, &incidents, &push, Source::Push),
            PageState::Degraded,
            "Chat is still degraded, as the last poll said"
        );
        assert_eq!(health.page_state(), PageState::Degraded);
    }
}
