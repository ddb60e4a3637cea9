//! Logging: set-up, and the one structured line written per request.
//!
//! Architecture invariant: no prompt text, response text or secret is ever
//! passed to a log macro. The request line carries ids, names, numbers.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::ClientFormat;
use crate::protocol::openai::Usage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_level`.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already initialised (tests, demo): keep the first subscriber.
    drop(result);
}

/// What one request did; written as one log line when the request ends,
/// whether it completed, failed, or the client went away.
#[derive(Debug)]
pub struct RequestRecord {
    pub request_id: String,
    pub format: ClientFormat,
    pub endpoint: &'static str,
    pub route: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub status: u16,
    pub attempts: u32,
    pub stream: bool,
    pub started: Instant,
    pub first_byte: Option<Duration>,
    pub usage: Option<Usage>,
    pub outcome: &'static str,
    /// The rollout cohort the request ran in, if a rollout is baking.
    pub cohort: Option<crate::rollout::CohortTag>,
    /// A limit's permit held for as long as the request lives (open streams).
    pub hold: Option<crate::limits::Slot>,
    /// Tokens charged to rate limits before the call, settled from `usage`.
    pub charge: Option<crate::limits::TokenCharge>,
    written: bool,
}

impl RequestRecord {
    pub fn new(request_id: String, format: ClientFormat, endpoint: &'static str) -> Self {
        Self {
            request_id,
            format,
            endpoint,
            route: None,
            provider: None,
            model: None,
            status: 0,
            attempts: 0,
            stream: false,
            started: Instant::now(),
            first_byte: None,
            usage: None,
            // Until told otherwise, the request ended because the client left.
            outcome: "client_gone",
            cohort: None,
            hold: None,
            charge: None,
            written: false,
        }
    }

    /// Writes the line now (instead of on drop).
    pub fn finish(mut self, outcome: &'static str) {
        self.outcome = outcome;
        self.write();
    }

    fn write(&mut self) {
        if self.written {
            return;
        }
        self.written = true;
        crate::metrics::request_finished(self);
        if let (Some(charge), Some(usage)) = (&self.charge, self.usage) {
            charge.settle(usage.prompt_tokens + usage.completion_tokens);
        }
        if let Some(c) = &self.cohort {
            c.rollout
                .record(c.canary, self.status, self.started.elapsed());
        }
        let latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let ttfb_ms = self.first_byte.map(|d| d.as_secs_f64() * 1e3);
        tracing::info!(
            target: "detour::request",
            request_id = %self.request_id,
            format = self.format.as_str(),
            endpoint = self.endpoint,
            route = self.route.as_deref(),
            provider = self.provider.as_deref(),
            model = self.model.as_deref(),
            status = self.status,
            attempts = self.attempts,
            stream = self.stream,
            latency_ms,
            ttfb_ms,
            prompt_tokens = self.usage.map(|u| u.prompt_tokens),
            completion_tokens = self.usage.map(|u| u.completion_tokens),
            outcome = self.outcome,
            "request"
        );
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.write();
    }
}
