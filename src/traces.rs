//! Traces over OTLP/HTTP (protobuf), when `[telemetry] otlp_endpoint` is set:
//! one span per request and one child span per attempt, with the OpenTelemetry
//! GenAI semantic conventions and detour's own attributes.
//!
//! Spans are built directly with the `opentelemetry` API on a [`Traces`] the
//! gateway keeps (no tracing-opentelemetry bridge: log events never reach the
//! export path). Without `otlp_endpoint` there is no [`Traces`], so a
//! request's record carries no span and nothing here runs.
//!
//! - [`RequestSpan`]: made with the request's record (`ingress`), the child
//!   of an incoming W3C `traceparent` when it is valid (the SDK's
//!   `TraceContextPropagator`; an invalid one starts a new trace); ended when
//!   the record is written (`telemetry::RequestRecord::write`) with the
//!   record's route, provider, models, status and usage.
//! - [`AttemptSpan`]: one per attempt (`proxy::forward`), started when the
//!   attempt is (after any backoff), ended with its status or the failure's
//!   reason (the `x-detour-tried` word); cancelled ones (a lost hedge) say so.
//!
//! Export never waits on a request: a finished span is put in a bounded
//! queue ([`QUEUE_SPANS`]) without waiting, and dropped and counted
//! (`detour_trace_spans_dropped_total`) when it is full. One task on the
//! tokio runtime sends the queue in batches ([`BATCH_SPANS`], or whatever
//! came within `batch_delay`) through the tree's reqwest client.
//!
//! No prompt or completion text is ever put on a span: names, numbers and
//! fixed words only.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use crate::config::Otlp;

/// Finished spans the export queue holds; past it, new ones are dropped.
pub const QUEUE_SPANS: usize = 2048;
/// The most spans sent in one export.
pub const BATCH_SPANS: usize = 512;
/// The longest one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a collector's answer read (it is a small status message).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("traces need a tokio runtime to export from")]
    NoRuntime,
    #[error("cannot build the OTLP client: {0}")]
    Client(String),
}

/// The gateway's tracer: built once from `[telemetry]`, kept for the life of
/// the process (like `[state]`).
#[derive(Debug)]
pub struct Traces {
    tracer: SdkTracer,
    /// Kept so that the processor (and its queue) lives as long as this.
    _provider: SdkTracerProvider,
    /// Finished spans dropped because the queue was full.
    dropped: Arc<AtomicU64>,
}

impl Traces {
    /// Starts the export task on the current tokio runtime.
    pub fn start(otlp: &Otlp) -> Result<Self, TracesError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TracesError::NoRuntime)?;
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TracesError::Client(e.to_string()))?;
        let headers = otlp
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.expose().to_owned()))
            .collect();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Poster(client))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(otlp.traces_url())
            .with_headers(headers)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TracesError::Client(e.to_string()))?;
        let resource = Resource::builder_empty()
            .with_service_name(otlp.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(QUEUE_SPANS);
        let dropped = Arc::new(AtomicU64::new(0));
        runtime.spawn(export(exporter, rx, otlp.batch_delay));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Batcher {
                tx,
                dropped: Arc::clone(&dropped),
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                otlp.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "detour");
        Ok(Self {
            tracer,
            _provider: provider,
            dropped,
        })
    }

    /// Finished spans dropped so far because the export queue was full
    /// (read at scrape time: `detour_trace_spans_dropped_total`).
    pub fn spans_dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// The span of one request: a child of the incoming `traceparent` when
    /// it is valid. `endpoint` is the log line's (`chat_completions`, ...).
    pub fn request(
        self: &Arc<Self>,
        headers: &http::HeaderMap,
        endpoint: &'static str,
    ) -> RequestSpan {
        let parent =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        let operation = operation(endpoint);
        let span = self
            .tracer
            .span_builder(operation)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("detour.endpoint", endpoint),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            span,
            operation,
            attempts: Arc::new(Counts::default()),
            traces: Arc::clone(self),
        }
    }
}

/// GenAI's `gen_ai.operation.name` for one of detour's endpoints.
fn operation(endpoint: &'static str) -> &'static str {
    match endpoint {
        "chat_completions" | "messages" => "chat",
        other => other,
    }
}

/// GenAI's `gen_ai.provider.name` for a provider kind: the convention's
/// names where it has one, detour's kind otherwise.
pub fn provider_name(kind: crate::config::ProviderKind) -> &'static str {
    match kind {
        crate::config::ProviderKind::Gemini => "gcp.gemini",
        other => other.as_str(),
    }
}

/// What the attempts of one request did, for the request's span.
#[derive(Debug, Default)]
struct Counts {
    launched: AtomicU32,
    in_flight: AtomicU32,
    failed: AtomicBool,
    hedged: AtomicBool,
}

/// A request's span, held by its record until the record is written.
#[derive(Debug)]
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    operation: &'static str,
    attempts: Arc<Counts>,
    traces: Arc<Traces>,
}

/// What a request's span is told when the request ends (the record's values).
#[derive(Debug)]
pub struct RequestEnd<'a> {
    pub status: u16,
    pub outcome: &'static str,
    pub tenant: Option<&'a str>,
    pub route: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
    pub tokens: Option<(u64, u64)>,
}

impl RequestSpan {
    /// The route resolved: the alias the client asked for.
    pub fn route(&mut self, alias: &str) {
        self.span.update_name(format!("{} {alias}", self.operation));
        self.span.set_attributes([
            KeyValue::new("gen_ai.request.model", alias.to_owned()),
            KeyValue::new("detour.route", alias.to_owned()),
        ]);
    }

    /// The response cache's verdict (`hit`, `miss`, `bypass`).
    pub fn cache(&mut self, status: &'static str) {
        self.span
            .set_attribute(KeyValue::new("detour.cache", status));
    }

    /// The provider kind (`openai`, ...) of the target that answered.
    pub fn provider_kind(&mut self, kind: crate::config::ProviderKind) {
        self.span
            .set_attribute(KeyValue::new("gen_ai.provider.name", provider_name(kind)));
    }

    /// What starts this request's attempt spans (cloned into each attempt).
    pub fn attempts(&self, alias: &str) -> Attempts {
        Attempts {
            traces: Arc::clone(&self.traces),
            parent: Context::new().with_remote_span_context(self.span.span_context().clone()),
            operation: self.operation,
            alias: Arc::from(alias),
            counts: Arc::clone(&self.attempts),
        }
    }

    /// Ends the span with the request's outcome.
    pub fn end(mut self, end: &RequestEnd<'_>) {
        let s = &mut self.span;
        s.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(end.status),
        ));
        s.set_attribute(KeyValue::new("detour.outcome", end.outcome));
        if let Some(t) = end.tenant {
            s.set_attribute(KeyValue::new("detour.tenant", t.to_owned()));
        }
        if let Some(p) = end.provider {
            s.set_attribute(KeyValue::new("detour.provider", p.to_owned()));
        }
        if let Some(m) = end.model {
            s.set_attribute(KeyValue::new("gen_ai.response.model", m.to_owned()));
        }
        if end.route.is_some() {
            let c = &self.attempts;
            let launched = c.launched.load(Relaxed);
            s.set_attributes([
                KeyValue::new("detour.attempts", i64::from(launched)),
                KeyValue::new("detour.failover", c.failed.load(Relaxed) && launched > 1),
                KeyValue::new("detour.hedge", c.hedged.load(Relaxed)),
            ]);
        }
        if let Some((input, output)) = end.tokens {
            s.set_attributes([
                KeyValue::new(
                    "gen_ai.usage.input_tokens",
                    i64::try_from(input).unwrap_or(i64::MAX),
                ),
                KeyValue::new(
                    "gen_ai.usage.output_tokens",
                    i64::try_from(output).unwrap_or(i64::MAX),
                ),
            ]);
        }
        if end.status >= 500
            || end.outcome == "upstream_broke_off"
            || end.outcome.ends_with("timeout")
        {
            s.set_status(Status::error(end.outcome));
        }
        s.end();
    }
}

/// Starts the attempt spans of one request.
#[derive(Debug, Clone)]
pub struct Attempts {
    traces: Arc<Traces>,
    parent: Context,
    operation: &'static str,
    alias: Arc<str>,
    counts: Arc<Counts>,
}

/// The facts of a target an attempt span carries.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub provider: &'a str,
    pub kind: crate::config::ProviderKind,
    pub model: &'a str,
}

impl Attempts {
    /// An attempt is launched on `target` (now, while the scheduler decides:
    /// whether another is in flight makes it a hedge). Its span starts when
    /// [`Launched::start`] is called, after any backoff.
    pub fn launch(&self, target: Target<'_>) -> Launched {
        let number = self.counts.launched.fetch_add(1, Relaxed) + 1;
        let hedge = self.counts.in_flight.fetch_add(1, Relaxed) > 0;
        if hedge {
            self.counts.hedged.store(true, Relaxed);
        }
        let attributes = vec![
            KeyValue::new("gen_ai.operation.name", self.operation),
            KeyValue::new("gen_ai.request.model", self.alias.to_string()),
            KeyValue::new("gen_ai.response.model", target.model.to_owned()),
            KeyValue::new("gen_ai.provider.name", provider_name(target.kind)),
            KeyValue::new("detour.route", self.alias.to_string()),
            KeyValue::new("detour.provider", target.provider.to_owned()),
            KeyValue::new("detour.attempt", i64::from(number)),
            KeyValue::new("detour.hedge", hedge),
            KeyValue::new("detour.failover", number > 1 && !hedge),
        ];
        Launched {
            in_flight: InFlight(Arc::clone(&self.counts)),
            attempts: self.clone(),
            name: format!("{} {}", self.operation, target.model),
            attributes,
        }
    }
}

/// An attempt launched but not yet started.
#[derive(Debug)]
pub struct Launched {
    in_flight: InFlight,
    attempts: Attempts,
    name: String,
    attributes: Vec<KeyValue>,
}

impl Launched {
    pub fn start(self) -> AttemptSpan {
        let a = &self.attempts;
        let span = a
            .traces
            .tracer
            .span_builder(self.name)
            .with_kind(SpanKind::Client)
            .with_attributes(self.attributes)
            .start_with_context(&a.traces.tracer, &a.parent);
        AttemptSpan {
            span: Some(span),
            in_flight: self.in_flight,
        }
    }
}

/// One attempt's span; a span dropped without [`AttemptSpan::end`] (the
/// attempt was cancelled) ends with `detour.attempt.reason = "cancelled"`.
#[derive(Debug)]
pub struct AttemptSpan {
    span: Option<opentelemetry_sdk::trace::Span>,
    in_flight: InFlight,
}

/// One attempt in flight, from its launch until its span ends or it is
/// dropped (for telling a hedge from a retry).
#[derive(Debug)]
struct InFlight(Arc<Counts>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl AttemptSpan {
    /// The attempt answered with `status`, or failed for `reason` (the
    /// `x-detour-tried` word).
    pub fn end(mut self, result: Result<u16, &'static str>) {
        let Some(mut span) = self.span.take() else {
            return;
        };
        match result {
            Ok(status) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 400 {
                    span.set_status(Status::error(status.to_string()));
                }
            }
            Err(reason) => {
                self.in_flight.0.failed.store(true, Relaxed);
                span.set_attributes([
                    KeyValue::new("detour.attempt.reason", reason),
                    KeyValue::new("error.type", reason),
                ]);
                span.set_status(Status::error(reason));
            }
        }
        span.end();
    }
}

impl Drop for AttemptSpan {
    fn drop(&mut self) {
        if let Some(mut span) = self.span.take() {
            span.set_attribute(KeyValue::new("detour.attempt.reason", "cancelled"));
            span.end();
        }
    }
}

/// Hands finished spans to the export task without waiting: a full queue
/// drops the span and counts it.
#[derive(Debug)]
struct Batcher {
    tx: mpsc::Sender<SpanData>,
    dropped: Arc<AtomicU64>,
}

/// Queues `item` without waiting; counts it in `dropped` when the queue is
/// full (or the export task is gone).
fn offer<T>(tx: &mpsc::Sender<T>, item: T, dropped: &AtomicU64) {
    if tx.try_send(item).is_err() {
        dropped.fetch_add(1, Relaxed);
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        offer(&self.tx, span, &self.dropped);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// The export task: a batch goes when it is full or `delay` after its first
/// span came; the queue's end (the tracer dropped) sends what is left.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    delay: Duration,
) {
    let mut batch = Vec::with_capacity(BATCH_SPANS);
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + delay;
        let mut open = true;
        while batch.len() < BATCH_SPANS {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let spans = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_SPANS));
        match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                crate::metrics::trace_export_failed("error");
                tracing::debug!(error = %e, "trace export failed");
            }
            Err(_) => crate::metrics::trace_export_failed("timeout"),
        }
        if !open {
            return;
        }
    }
}

/// The exporter's HTTP client: the tree's reqwest, on the runtime the
/// export task runs on.
#[derive(Debug)]
struct Poster(reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for Poster {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let mut answer = self.0.execute(request).await?;
        let mut response = Response::builder().status(answer.status());
        if let Some(h) = response.headers_mut() {
            *h = std::mem::take(answer.headers_mut());
        }
        let mut body = Vec::new();
        while let Some(chunk) = answer.chunk().await? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err("the collector's answer is too large".into());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(response.body(Bytes::from(body))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (tx, mut rx) = mpsc::channel(2);
        let dropped = AtomicU64::new(0);
        for i in 0..5 {
            offer(&tx, i, &dropped);
        }
        assert_eq!(dropped.load(Relaxed), 3);
        assert_eq!((rx.recv().await, rx.recv().await), (Some(0), Some(1)));
        drop(rx);
        offer(&tx, 9, &dropped);
        assert_eq!(dropped.load(Relaxed), 4, "no export task: dropped too");
    }

    #[test]
    fn operations_and_providers_use_the_conventions_words() {
        assert_eq!(operation("chat_completions"), "chat");
        assert_eq!(operation("messages"), "chat");
        assert_eq!(operation("responses"), "responses");
        assert_eq!(operation("embeddings"), "embeddings");
        assert_eq!(
            provider_name(crate::config::ProviderKind::Gemini),
            "gcp.gemini"
        );
        assert_eq!(provider_name(crate::config::ProviderKind::OpenAi), "openai");
        assert_eq!(
            provider_name(crate::config::ProviderKind::Anthropic),
            "anthropic"
        );
    }
}
