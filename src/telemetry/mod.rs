//! Logging: set-up, and the one structured line written per request (with
//! the request's metrics). What else ends with a request (limits, rollout
//! cohort) is settled by `request::Tracked`, which holds the record.
//!
//! Architecture invariant: no prompt text, response text or secret is ever
//! passed to a log macro. The request line carries ids, names, numbers.

pub mod human;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::chat::ClientFormat;
use crate::protocol::openai::Usage;
use crate::upstream::UpstreamKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Lines the log queue holds before new ones are dropped (and counted).
pub const LOG_QUEUE_LINES: usize = 64 * 1024;

/// The log writer, when request lines are written to it directly: set by
/// [`init`] for the human format without colours (a file, a collector).
/// Every other set-up (JSON, a terminal, a test's subscriber) gets the line
/// through tracing.
static REQUEST_LINES: std::sync::OnceLock<writer::Writer> = std::sync::OnceLock::new();

/// Bytes reserved for a request line: a typical one is about 300.
const LINE_CAPACITY: usize = 384;

/// Counts the lines dropped because the log writer could not keep up.
static DROPPED: std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>> = std::sync::OnceLock::new();

/// Keeps the log writer's thread: dropping it writes out what is queued.
/// Hold it until the process ends.
#[must_use]
pub struct LogGuard {
    _writer: Option<writer::WriterGuard>,
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_level`.
///
/// Lines are formatted on the thread that logs and written to stderr in
/// batches by a thread of their own through a bounded queue
/// ([`LOG_QUEUE_LINES`], [`writer`]): a slow stderr (a full pipe, a stalled
/// collector) never blocks a request, and a busy gateway does not wake the
/// writer per line. When the queue is full, lines are dropped, never waited
/// for, and counted ([`log_lines_dropped`], `detour_log_lines_dropped_total`).
pub fn init(format: LogFormat, default_level: &str) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only for a person at a terminal: a log file or a collector
    // gets plain text (and writing the escape codes cost every request).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let (writer, guard) =
        match writer::Writer::spawn(std::io::stderr(), LOG_QUEUE_LINES, "detour-log") {
            Ok(ok) => ok,
            Err(e) => {
                eprintln!("detour: cannot start the log writer thread: {e}");
                return LogGuard { _writer: None };
            }
        };
    let counter = writer.dropped_counter();
    let direct = (format == LogFormat::Human && !ansi).then(|| writer.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let result = match format {
        LogFormat::Human => builder.event_format(human::Human::new(ansi)).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    match result {
        Ok(()) => {
            let _ = DROPPED.set(counter);
            if let Some(direct) = direct {
                let _ = REQUEST_LINES.set(direct);
            }
            LogGuard {
                _writer: Some(guard),
            }
        }
        // Already initialised (tests, demo): keep the first subscriber.
        Err(_) => LogGuard { _writer: None },
    }
}

/// Log lines dropped so far because the writer could not keep up.
pub fn log_lines_dropped() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
}

/// How a request ended: the `outcome` of its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response body ended whole.
    Ok,
    /// Answered from the response cache.
    CacheHit,
    /// Ended with detour's error response, after ingress took the request.
    Rejected,
    /// Turned away by the middleware (limits, admission) before ingress.
    Refused,
    /// The client went away before the response ended (the default).
    ClientGone,
    /// The provider failed after the client got its headers. A time limit
    /// or an oversized event is named by its reason (`idle_timeout`,
    /// `event_too_large`, ...), which an operator can tune; any other
    /// failure is `upstream_broke_off`.
    BrokeOff(UpstreamKind),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::CacheHit => "cache_hit",
            Self::Rejected => "rejected",
            Self::Refused => "refused",
            Self::ClientGone => "client_gone",
            Self::BrokeOff(kind) if kind.is_timeout() || kind == UpstreamKind::EventTooLarge => {
                kind.reason()
            }
            Self::BrokeOff(_) => "upstream_broke_off",
        }
    }
}

/// What one request did; written as one log line when the request ends,
/// whether it completed, failed, or the client went away.
#[derive(Debug)]
pub struct RequestRecord {
    pub request_id: String,
    pub format: ClientFormat,
    pub endpoint: &'static str,
    /// The caller's tenant, once authenticated (never the key: the log and
    /// the metrics say whose traffic it was, not which credential).
    pub tenant: Option<Arc<str>>,
    pub route: Option<String>,
    /// The target's names, shared with the config's health state (see
    /// `health::TargetHealth`), not copied per request.
    pub provider: Option<Arc<str>>,
    pub model: Option<Arc<str>>,
    pub status: u16,
    pub attempts: u32,
    pub stream: bool,
    pub started: Instant,
    pub first_byte: Option<Duration>,
    pub usage: Option<Usage>,
    pub outcome: Outcome,
    /// The provider that continued a broken stream (`continue_streams`).
    pub continued_by: Option<String>,
    /// The request's trace span: `None` unless traces are exported. Boxed:
    /// a span is larger than the rest of the record, which moves with the
    /// request from layer to layer.
    pub span: Option<Box<crate::traces::RequestSpan>>,
    written: bool,
}

impl RequestRecord {
    pub fn new(request_id: String, format: ClientFormat, endpoint: &'static str) -> Self {
        Self {
            request_id,
            format,
            endpoint,
            tenant: None,
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
            outcome: Outcome::ClientGone,
            continued_by: None,
            span: None,
            written: false,
        }
    }

    /// Writes the line now (instead of on drop).
    pub fn finish(mut self, outcome: Outcome) {
        self.outcome = outcome;
        self.write();
    }

    /// Writes the line and counts the request, unless that was done
    /// already; true if this call did it.
    pub fn write(&mut self) -> bool {
        if self.written {
            return false;
        }
        self.written = true;
        let elapsed = self.started.elapsed();
        crate::metrics::request_finished(&crate::metrics::Finished {
            tenant: self.tenant.as_ref(),
            route: self.route.as_deref(),
            provider: self.provider.as_deref(),
            status: self.status,
            format: self.format.as_str(),
            duration: elapsed,
            first_byte: self.first_byte,
            tokens: self.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        });
        // Whole microseconds, shown in milliseconds: `0.326`, not
        // `0.32617899999999996` (shorter to read, and to format).
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let latency = micros(elapsed);
        let ttfb = self.first_byte.map(micros);
        if let Some(out) = REQUEST_LINES.get() {
            if tracing::enabled!(target: human::REQUEST_TARGET, tracing::Level::INFO) {
                self.write_line(out, latency, ttfb);
            }
        } else {
            self.log_line(latency, ttfb);
        }
        if let Some(span) = self.span.take() {
            span.end(&crate::traces::RequestEnd {
                status: self.status,
                outcome: self.outcome.as_str(),
                tenant: self.tenant.as_deref(),
                route: self.route.as_deref(),
                provider: self.provider.as_deref(),
                model: self.model.as_deref(),
                tokens: self.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            });
        }
        true
    }

    /// The line through tracing (JSON, a terminal, a test's subscriber).
    /// Its fields are [`RequestRecord::line_fields`]'s, in the same order
    /// (a test compares the two lines).
    fn log_line(&self, latency_us: u64, ttfb_us: Option<u64>) {
        let ms = |micros: u64| micros as f64 / 1e3;
        let (latency_ms, ttfb_ms) = (ms(latency_us), ttfb_us.map(ms));
        tracing::info!(
            target: human::REQUEST_TARGET,
            request_id = %self.request_id,
            format = self.format.as_str(),
            endpoint = self.endpoint,
            tenant = self.tenant.as_deref(),
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
            outcome = self.outcome.as_str(),
            continued_by = self.continued_by.as_deref(),
            "request"
        );
    }

    /// The line written straight to the log writer, as [`human::Human`]
    /// would write [`RequestRecord::log_line`]'s event.
    fn write_line(&self, out: &writer::Writer, latency_us: u64, ttfb_us: Option<u64>) {
        // Queued as it is: the one allocation the line costs.
        let mut line = String::with_capacity(LINE_CAPACITY);
        let fields = self.line_fields(latency_us, ttfb_us);
        if human::request_line(&mut line, std::time::SystemTime::now(), "request", &fields).is_ok()
        {
            out.send(line.into_bytes());
        }
    }

    /// The line's fields, in [`RequestRecord::log_line`]'s order.
    fn line_fields(
        &self,
        latency_us: u64,
        ttfb_us: Option<u64>,
    ) -> [(&'static str, Option<human::Value<'_>>); 16] {
        use human::Value::{Bool, Display, Millis, Str, U64};
        let u64_of = |n: u64| Some(U64(n));
        [
            ("request_id", Some(Display(&self.request_id))),
            ("format", Some(Str(self.format.as_str()))),
            ("endpoint", Some(Str(self.endpoint))),
            ("tenant", self.tenant.as_deref().map(Str)),
            ("route", self.route.as_deref().map(Str)),
            ("provider", self.provider.as_deref().map(Str)),
            ("model", self.model.as_deref().map(Str)),
            ("status", u64_of(self.status.into())),
            ("attempts", u64_of(self.attempts.into())),
            ("stream", Some(Bool(self.stream))),
            ("latency_ms", Some(Millis(latency_us))),
            ("ttfb_ms", ttfb_us.map(Millis)),
            ("prompt_tokens", self.usage.map(|u| U64(u.prompt_tokens))),
            (
                "completion_tokens",
                self.usage.map(|u| U64(u.completion_tokens)),
            ),
            ("outcome", Some(Str(self.outcome.as_str()))),
            ("continued_by", self.continued_by.as_deref().map(Str)),
        ]
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.write();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log line keeps the words dashboards and alerts search for.
    #[test]
    fn outcomes_keep_their_words() {
        #[rustfmt::skip]
        let table = [
            (Outcome::Ok, "ok"),
            (Outcome::CacheHit, "cache_hit"),
            (Outcome::Rejected, "rejected"),
            (Outcome::Refused, "refused"),
            (Outcome::ClientGone, "client_gone"),
            (Outcome::BrokeOff(UpstreamKind::IdleTimeout), "idle_timeout"),
            (Outcome::BrokeOff(UpstreamKind::TotalTimeout), "total_timeout"),
            (Outcome::BrokeOff(UpstreamKind::FirstByteTimeout), "first_byte_timeout"),
            (Outcome::BrokeOff(UpstreamKind::EventTooLarge), "event_too_large"),
            (Outcome::BrokeOff(UpstreamKind::TransportError), "upstream_broke_off"),
            (Outcome::BrokeOff(UpstreamKind::StreamErrorEvent), "upstream_broke_off"),
        ];
        for (outcome, word) in table {
            assert_eq!(outcome.as_str(), word, "{outcome:?}");
        }
    }

    #[test]
    fn the_line_is_written_once() {
        let mut r = RequestRecord::new("id".into(), ClientFormat::OpenAi, "chat");
        assert!(r.write());
        assert!(!r.write(), "written already");
    }
}
