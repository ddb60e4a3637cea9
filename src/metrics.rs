//! Prometheus metrics: every name in one table, and one typed helper per
//! event so that a call site stays one line.
//!
//! A leaf: the helpers take plain values (names, numbers, fixed words) and
//! import nothing of detour's, so any layer may record. What is read from the
//! gateway at scrape time is read by the admin `/metrics` handler and handed
//! in ([`config_rejected`], [`rollout_baking`], [`dns_stale_uses`],
//! [`cache_rejected`]).
//!
//! Recording goes through the `metrics` facade into a
//! `metrics-exporter-prometheus` recorder that this module installs once per
//! process ([`handle`]); the admin listener serves [`render`] at
//! `GET /metrics`. Until something asks for the handle, no recorder is
//! installed and every helper is a cheap no-op.
//!
//! Labels stay low-cardinality: route aliases, provider and tenant names
//! come from the config, statuses are HTTP codes, reasons and outcomes are
//! fixed words.
//! Nothing a client sends becomes a label value: a request for an unknown
//! model alias is counted under `route="unknown"`.
//!
//! Histograms are rendered as Prometheus histograms with [`SECONDS_BUCKETS`].
//! Samples wait in the recorder until drained; a small thread drains them
//! every [`UPKEEP_EVERY`] so that memory stays flat when nobody scrapes.

use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use ::metrics::{counter, gauge, histogram, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The kind of a metric, for its `# TYPE` and `# HELP` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Declares each metric name once: a constant with its doc line, and the
/// same line in [`ALL`] for the exposition's `# HELP`.
macro_rules! metric_names {
    ($( #[doc = $doc:literal] $kind:ident $name:ident = $value:literal; )*) => {
        $( #[doc = $doc] pub const $name: &str = $value; )*
        /// Every metric: name, kind, help text.
        pub const ALL: &[(&str, Kind, &str)] = &[ $( ($value, Kind::$kind, $doc.trim_ascii()) ),* ];
    };
}

metric_names! {
    /// Requests, by route alias, provider that answered (`none` if none did), HTTP status, client format and tenant (`""` before authentication).
    Counter REQUESTS_TOTAL = "detour_requests_total";
    /// Time from a request's arrival to the end of its response body (streams included), by route and client format.
    Histogram REQUEST_DURATION_SECONDS = "detour_request_duration_seconds";
    /// Time from sending an attempt upstream to its first byte (for streams, its first event), by provider.
    Histogram TTFB_SECONDS = "detour_ttfb_seconds";
    /// Tokens reported by providers, by provider, kind (`prompt` or `completion`) and tenant.
    Counter TOKENS_TOTAL = "detour_tokens_total";
    /// Attempts that failed with a retryable error, after which the request moves on to another target if one is left, by route and reason.
    Counter FAILOVERS_TOTAL = "detour_failovers_total";
    /// Attempts started after a failed one (not counting hedges), by route.
    Counter RETRIES_TOTAL = "detour_retries_total";
    /// Requests that started a hedge, by route and outcome (`won`: the hedge's answer was used; `lost`: it was cancelled or failed).
    Counter HEDGES_TOTAL = "detour_hedges_total";
    /// Circuit-breaker transitions, by provider and new state (`open`, `half_open`, `closed`).
    Counter BREAKER_TRANSITIONS_TOTAL = "detour_breaker_transitions_total";
    /// Retries or hedges not started because the route's retry budget was empty, by route.
    Counter RETRY_BUDGET_EXHAUSTED_TOTAL = "detour_retry_budget_exhausted_total";
    /// Configs refused on reload or by a rollout (invalid, failed to build, or rolled back); the live config stays.
    Counter CONFIG_REJECTED_TOTAL = "detour_config_rejected_total";
    /// Config rollout: 1 while a candidate config is baking, 0 when the live config is stable.
    Gauge ROLLOUT_STATE = "detour_rollout_state";
    /// Upstream connections made with a DNS answer past its TTL because a fresh lookup failed.
    Counter DNS_STALE_USES_TOTAL = "detour_dns_stale_uses_total";
    /// Client connections open on the main listener.
    Gauge OPEN_CONNECTIONS = "detour_open_connections";
    /// Client connections closed as soon as accepted because their listener (`main` or `admin`) had `max_connections` open.
    Counter CONNECTIONS_REFUSED_TOTAL = "detour_connections_refused_total";
    /// Client connections closed by the gateway, by listener and reason (`header_timeout`: no whole request in time; `idle`: nothing in flight for `idle_timeout`).
    Counter CONNECTIONS_CLOSED_TOTAL = "detour_connections_closed_total";
    /// What each provider's status page says: 0 unknown, 1 operational, 2 degraded, 3 down.
    Gauge STATUS_PAGE_STATE = "detour_status_page_state";
    /// Requests on cached routes, by route and result (`hit`, `miss`, `bypass`).
    Counter CACHE_LOOKUPS_TOTAL = "detour_cache_lookups_total";
    /// Cache entries dropped, never served, because their tenant or request hash did not match the request that read them.
    Counter CACHE_MISMATCHES_TOTAL = "detour_cache_mismatches_total";
    /// Values read from the shared cache (Redis) that were refused, undecodable or too large, and served as misses.
    Counter CACHE_REJECTED_TOTAL = "detour_cache_rejected_total";
    /// 1 while this replica reaches the `[state]` Redis (shared limits, cache, health), 0 while it runs on local state.
    Gauge REDIS_UP = "detour_redis_up";
    /// Time of each call to the `[state]` Redis, by operation.
    Histogram REDIS_CALL_SECONDS = "detour_redis_call_seconds";
    /// Calls to the `[state]` Redis that failed, by operation and kind (`timeout`, `connection`, `server`, `down`: not tried because Redis is known down).
    Counter REDIS_FAILURES_TOTAL = "detour_redis_failures_total";
    /// Live replicas this replica sees registered in Redis.
    Gauge REDIS_REPLICAS = "detour_redis_replicas";
    /// Log lines dropped because the log writer could not keep up (its queue was full); requests never wait for the log.
    Counter LOG_LINES_DROPPED_TOTAL = "detour_log_lines_dropped_total";
    /// Finished spans dropped because the trace export queue was full (the collector slow or down); requests never wait for the export.
    Counter TRACE_SPANS_DROPPED_TOTAL = "detour_trace_spans_dropped_total";
    /// Trace exports (batches of spans) the collector did not take, by reason (`error`: refused or unreachable; `timeout`).
    Counter TRACE_EXPORTS_FAILED_TOTAL = "detour_trace_exports_failed_total";
    /// Health changes shared between replicas, by direction (`told`: found here and sent; `learned`: another replica's, applied here) and kind (`opened`, `closed`, `cool_down`, `misconfigured`, `override`, `page`).
    Counter HEALTH_SHARED_TOTAL = "detour_health_shared_total";
    /// Broken streams continued by another target (`continue_streams`), by route, the continuing provider and outcome (`ok`: the spliced answer ended whole; `broke`: the continuation broke too; `failed`: the continuation request failed, the client got the error event).
    Counter STREAM_CONTINUATIONS_TOTAL = "detour_stream_continuations_total";
}

/// Bucket bounds of the Redis call histogram: 50 µs to 1 s.
pub const REDIS_SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Bucket bounds of every `_seconds` histogram: 5 ms to 5 min, for first
/// bytes in milliseconds and streams that run for minutes.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// How often histogram samples are drained into their buckets.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's Prometheus handle, installing the recorder on first use.
/// `None` if another recorder was installed first (then nothing is recorded
/// here, and `/metrics` says so).
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE.get_or_init(install).as_ref()
}

/// The exposition text for `GET /metrics`.
pub fn render() -> String {
    match handle() {
        Some(h) => h.render(),
        None => "# detour: another metrics recorder is installed in this process\n".to_owned(),
    }
}

fn install() -> Option<PrometheusHandle> {
    let builder = match PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(REDIS_CALL_SECONDS.to_owned()),
                REDIS_SECONDS_BUCKETS,
            )
        }) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("metrics: {e}");
            return None;
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(e) = ::metrics::set_global_recorder(recorder) {
        tracing::error!("metrics: a recorder is already installed; detour's metrics are off: {e}");
        return None;
    }
    let _ = HANDLES.set(HandleCache::new());
    for &(name, kind, help) in ALL {
        let help = SharedString::const_str(help);
        match kind {
            Kind::Counter => ::metrics::describe_counter!(name, help),
            Kind::Gauge => ::metrics::describe_gauge!(name, help),
            Kind::Histogram => ::metrics::describe_histogram!(name, help),
        }
    }
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("detour-metrics-upkeep".to_owned())
        .spawn(move || loop {
            // A dedicated thread, not a runtime worker: sleeping blocks nothing.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        });
    if let Err(e) = spawned {
        // Scrapes still drain the samples; only an unscraped process grows.
        tracing::warn!("metrics: no upkeep thread: {e}");
    }
    Some(handle)
}

/// A request that ended, as its metrics need it.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// The caller's tenant (a config name), once authenticated.
    pub tenant: Option<&'a std::sync::Arc<str>>,
    /// The model alias the client asked for, once known.
    pub route: Option<&'a str>,
    /// The provider that answered, if one did.
    pub provider: Option<&'a str>,
    pub status: u16,
    /// The client format (`openai`, `anthropic`).
    pub format: &'static str,
    /// From arrival to the end of the response body.
    pub duration: Duration,
    /// To the first byte (or event) of the answer.
    pub first_byte: Option<Duration>,
    /// Prompt and completion tokens the provider reported.
    pub tokens: Option<(u64, u64)>,
}

/// The route label of a finished request: the alias only once it named a
/// route. A request for an unknown alias (a 404 with no provider) would
/// otherwise put the client's text into a label.
fn route_name<'a>(r: &Finished<'a>) -> &'a str {
    match r.route {
        Some(_) if r.provider.is_none() && r.status == 404 => "unknown",
        Some(route) => route,
        None => "none",
    }
}

/// [`route_name`] as a label value.
fn route_label(r: &Finished<'_>) -> SharedString {
    match route_name(r) {
        "unknown" => SharedString::const_str("unknown"),
        "none" => SharedString::const_str("none"),
        name => SharedString::from(name.to_owned()),
    }
}

/// The tenant label: the tenant's name (from the config, so bounded), or
/// `""` before a request is authenticated. Shared, not copied.
fn tenant_label(r: &Finished<'_>) -> SharedString {
    match r.tenant {
        Some(t) => SharedString::from(std::sync::Arc::clone(t)),
        None => SharedString::const_str(""),
    }
}

/// The status as a label, without an allocation for the common ones.
fn status_label(status: u16) -> SharedString {
    let known = match status {
        0 => "0",
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        413 => "413",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => return SharedString::from(status.to_string()),
    };
    SharedString::const_str(known)
}

/// A request ended (called once, where its log line is written): counts it,
/// and records its latency, time to first byte and tokens.
///
/// The handles of a label set are resolved once ([`RequestHandles`]): after
/// the first request with the same route, provider, status, format and
/// tenant, recording is a hash of those names and a few atomic increments,
/// not a label vector built and looked up in the registry per metric.
pub fn request_finished(r: &Finished<'_>) {
    let labels = Labels {
        route: route_name(r),
        answered: r.provider.is_some(),
        provider: r.provider.unwrap_or("none"),
        status: r.status,
        format: r.format,
        tenant: r.tenant.map_or("", |t| &**t),
    };
    match HANDLES.get() {
        // Our recorder is installed: handles made now stay valid.
        Some(cache) if cache.with(&labels, |h| h.record(r)) => {}
        // No recorder of ours (handles would be no-ops forever), or the
        // cache is full: look each metric up, as every other helper does.
        _ => record_uncached(r),
    }
}

/// The label values of a finished request, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Labels<'a> {
    route: &'a str,
    /// A provider answered (its name may be `none` too).
    answered: bool,
    provider: &'a str,
    status: u16,
    format: &'static str,
    tenant: &'a str,
}

/// The metrics of one label set of finished requests. The handles of
/// metrics that a request may not have (time to first byte, tokens) are
/// registered on first use, so that `/metrics` shows the same series as
/// when each request looked its metrics up.
struct RequestHandles {
    route: Box<str>,
    provider: Box<str>,
    status: u16,
    format: &'static str,
    tenant: Box<str>,
    answered: bool,
    requests: ::metrics::Counter,
    duration: ::metrics::Histogram,
    ttfb: OnceLock<::metrics::Histogram>,
    /// Prompt and completion tokens.
    tokens: OnceLock<(::metrics::Counter, ::metrics::Counter)>,
}

impl RequestHandles {
    fn new(l: &Labels<'_>) -> Self {
        let route = SharedString::from(l.route.to_owned());
        let provider = SharedString::from(l.provider.to_owned());
        let tenant = SharedString::from(l.tenant.to_owned());
        Self {
            requests: counter!(REQUESTS_TOTAL, "route" => route.clone(),
                "provider" => provider, "status" => status_label(l.status),
                "format" => l.format, "tenant" => tenant),
            duration: histogram!(REQUEST_DURATION_SECONDS, "route" => route, "format" => l.format),
            route: l.route.into(),
            provider: l.provider.into(),
            status: l.status,
            format: l.format,
            tenant: l.tenant.into(),
            answered: l.answered,
            ttfb: OnceLock::new(),
            tokens: OnceLock::new(),
        }
    }

    fn labels(&self) -> Labels<'_> {
        Labels {
            route: &self.route,
            answered: self.answered,
            provider: &self.provider,
            status: self.status,
            format: self.format,
            tenant: &self.tenant,
        }
    }

    fn record(&self, r: &Finished<'_>) {
        self.requests.increment(1);
        self.duration.record(r.duration.as_secs_f64());
        if !self.answered {
            return;
        }
        if let Some(ttfb) = r.first_byte {
            self.ttfb
                .get_or_init(|| {
                    let provider = SharedString::from(self.provider.to_string());
                    histogram!(TTFB_SECONDS, "provider" => provider)
                })
                .record(ttfb.as_secs_f64());
        }
        if let Some((prompt, completion)) = r.tokens {
            let (p, c) = self.tokens.get_or_init(|| {
                let provider = SharedString::from(self.provider.to_string());
                let tenant = SharedString::from(self.tenant.to_string());
                (
                    counter!(TOKENS_TOTAL, "provider" => provider.clone(), "kind" => "prompt",
                        "tenant" => tenant.clone()),
                    counter!(TOKENS_TOTAL, "provider" => provider, "kind" => "completion",
                        "tenant" => tenant),
                )
            });
            p.increment(prompt);
            c.increment(completion);
        }
    }
}

/// Label sets kept at most; past that (a label value that should not vary,
/// varying), requests are recorded uncached rather than growing the cache.
const MAX_CACHED_LABEL_SETS: usize = 4096;

/// [`RequestHandles`] by label set: read-mostly (written once per new label
/// set), keyed by a fast hash of the borrowed labels so that a lookup
/// copies nothing.
struct HandleCache {
    hasher: foldhash::fast::RandomState,
    by_hash: RwLock<foldhash::HashMap<u64, Vec<Arc<RequestHandles>>>>,
}

impl HandleCache {
    fn new() -> Self {
        Self {
            hasher: foldhash::fast::RandomState::default(),
            by_hash: RwLock::default(),
        }
    }

    /// Calls `f` with the handles of `labels`, made on first use; false
    /// (and `f` not called) when the cache is full.
    fn with(&self, labels: &Labels<'_>, f: impl FnOnce(&RequestHandles)) -> bool {
        let hash = self.hasher.hash_one(labels);
        {
            let map = self.by_hash.read().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = find(&map, hash, labels) {
                f(h);
                return true;
            }
        }
        let handles = {
            let mut map = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
            match find(&map, hash, labels) {
                Some(h) => Arc::clone(h),
                None if map.values().map(Vec::len).sum::<usize>() >= MAX_CACHED_LABEL_SETS => {
                    return false;
                }
                None => {
                    let h = Arc::new(RequestHandles::new(labels));
                    map.entry(hash).or_default().push(Arc::clone(&h));
                    h
                }
            }
        };
        f(&handles);
        true
    }
}

fn find<'m>(
    map: &'m foldhash::HashMap<u64, Vec<Arc<RequestHandles>>>,
    hash: u64,
    labels: &Labels<'_>,
) -> Option<&'m Arc<RequestHandles>> {
    map.get(&hash)?.iter().find(|h| h.labels() == *labels)
}

/// Set when our recorder is installed: before that (or with another
/// recorder), handles would be no-ops for good.
static HANDLES: OnceLock<HandleCache> = OnceLock::new();

/// [`request_finished`] without the cache: each metric looked up by its
/// labels.
fn record_uncached(r: &Finished<'_>) {
    let route = route_label(r);
    let format = r.format;
    let provider = r.provider.map_or(SharedString::const_str("none"), |p| {
        SharedString::from(p.to_owned())
    });
    let tenant = tenant_label(r);
    counter!(REQUESTS_TOTAL, "route" => route.clone(), "provider" => provider.clone(),
        "status" => status_label(r.status), "format" => format, "tenant" => tenant.clone())
    .increment(1);
    histogram!(REQUEST_DURATION_SECONDS, "route" => route, "format" => format)
        .record(r.duration.as_secs_f64());
    if r.provider.is_none() {
        return;
    }
    if let Some(ttfb) = r.first_byte {
        histogram!(TTFB_SECONDS, "provider" => provider.clone()).record(ttfb.as_secs_f64());
    }
    if let Some((prompt, completion)) = r.tokens {
        counter!(TOKENS_TOTAL, "provider" => provider.clone(), "kind" => "prompt",
            "tenant" => tenant.clone())
        .increment(prompt);
        counter!(TOKENS_TOTAL, "provider" => provider, "kind" => "completion",
            "tenant" => tenant)
        .increment(completion);
    }
}

/// An attempt failed with a retryable error (`reason` as in `x-detour-tried`).
pub fn failover(route: &str, reason: &'static str) {
    counter!(FAILOVERS_TOTAL, "route" => route.to_owned(), "reason" => reason).increment(1);
}

/// The `nth` attempt of a request started; `hedge` if another is still in
/// flight. Counts the retries (later attempts that are not hedges).
pub fn attempt_launched(route: &str, nth: u32, hedge: bool) {
    if nth > 1 && !hedge {
        counter!(RETRIES_TOTAL, "route" => route.to_owned()).increment(1);
    }
}

/// A request that launched a hedge (the target index `hedge`) ended with an
/// answer from target `winner`, or with none. No-op if it never hedged.
pub fn hedge_decided(route: &str, hedge: Option<usize>, winner: Option<usize>) {
    let Some(hedge) = hedge else { return };
    let outcome = if winner == Some(hedge) { "won" } else { "lost" };
    counter!(HEDGES_TOTAL, "route" => route.to_owned(), "outcome" => outcome).increment(1);
}

/// A breaker of one of `provider`'s targets moved to `to` (`open`,
/// `half_open` or `closed`).
pub fn breaker_transition(provider: &str, to: &'static str) {
    counter!(BREAKER_TRANSITIONS_TOTAL, "provider" => provider.to_owned(), "to" => to).increment(1);
}

/// A broken stream of `route` was continued (or not) by `provider`.
pub fn stream_continuation(route: &str, provider: &str, outcome: &'static str) {
    counter!(STREAM_CONTINUATIONS_TOTAL, "route" => route.to_owned(), "provider" => provider.to_owned(), "outcome" => outcome).increment(1);
}

/// A retry or hedge was not started: the route's budget was empty.
pub fn retry_budget_exhausted(route: &str) {
    counter!(RETRY_BUDGET_EXHAUSTED_TOTAL, "route" => route.to_owned()).increment(1);
}

// Counts the gateway keeps itself, handed in on each scrape.

/// Configs refused so far (the gateway's own count).
pub fn config_rejected(total: u64) {
    counter!(CONFIG_REJECTED_TOTAL).absolute(total);
}

/// Whether a candidate config is baking now.
pub fn rollout_baking(baking: bool) {
    gauge!(ROLLOUT_STATE).set(if baking { 1.0 } else { 0.0 });
}

/// Connections made with a stale DNS answer so far (the resolver's count).
pub fn dns_stale_uses(total: u64) {
    counter!(DNS_STALE_USES_TOTAL).absolute(total);
}

/// Shared-cache values refused so far (the backend's count).
pub fn cache_rejected(total: u64) {
    counter!(CACHE_REJECTED_TOTAL).absolute(total);
}

/// Counts an open client connection for as long as it lives.
#[derive(Debug)]
pub struct OpenConnection(());

impl OpenConnection {
    pub fn new() -> Self {
        gauge!(OPEN_CONNECTIONS).increment(1.0);
        Self(())
    }
}

impl Default for OpenConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        gauge!(OPEN_CONNECTIONS).decrement(1.0);
    }
}

/// A connection to `listener` was closed at once: too many open.
pub fn connection_refused(listener: &'static str) {
    counter!(CONNECTIONS_REFUSED_TOTAL, "listener" => listener).increment(1);
}

/// The gateway closed a connection to `listener` for `reason`.
pub fn connection_closed(listener: &'static str, reason: &'static str) {
    counter!(CONNECTIONS_CLOSED_TOTAL, "listener" => listener, "reason" => reason).increment(1);
}

/// A status-page poll read `level` for `provider`: 0 unknown, 1
/// operational, 2 degraded, 3 down.
pub fn status_page_state(provider: &str, level: u8) {
    gauge!(STATUS_PAGE_STATE, "provider" => provider.to_owned()).set(f64::from(level));
}

/// A request on a cached route was a `hit`, a `miss` or a `bypass`.
pub fn cache_lookup(route: &str, result: &'static str) {
    counter!(CACHE_LOOKUPS_TOTAL, "route" => route.to_owned(), "result" => result).increment(1);
}

/// The cache dropped an entry that belonged to another tenant or request.
pub fn cache_mismatch() {
    counter!(CACHE_MISMATCHES_TOTAL).increment(1);
}

/// Log lines dropped so far (read at scrape time).
pub fn log_lines_dropped(total: u64) {
    counter!(LOG_LINES_DROPPED_TOTAL).absolute(total);
}

/// Finished spans dropped so far from the trace export queue (read at
/// scrape time).
pub fn trace_spans_dropped(total: u64) {
    counter!(TRACE_SPANS_DROPPED_TOTAL).absolute(total);
}

/// A batch of spans was not exported (`error` or `timeout`).
pub fn trace_export_failed(reason: &'static str) {
    counter!(TRACE_EXPORTS_FAILED_TOTAL, "reason" => reason).increment(1);
}

/// Whether this replica reaches its Redis.
pub fn redis_up(up: bool) {
    gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

/// A Redis call `op` took `took`; `failure` names how it failed, if it did.
pub fn redis_call(op: &'static str, took: Duration, failure: Option<&'static str>) {
    histogram!(REDIS_CALL_SECONDS, "op" => op).record(took.as_secs_f64());
    if let Some(kind) = failure {
        redis_failure(op, kind);
    }
}

/// A Redis call `op` failed (or was not tried) for `kind`.
pub fn redis_failure(op: &'static str, kind: &'static str) {
    counter!(REDIS_FAILURES_TOTAL, "op" => op, "kind" => kind).increment(1);
}

/// A health change shared between replicas: `direction` is `told` or
/// `learned`.
pub fn health_shared(direction: &'static str, kind: &'static str) {
    counter!(HEALTH_SHARED_TOTAL, "direction" => direction, "kind" => kind).increment(1);
}

/// Live replicas seen in Redis.
pub fn redis_replicas(n: usize) {
    gauge!(REDIS_REPLICAS).set(n as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_prefixed_unique_and_documented() {
        let mut names: Vec<&str> = ALL.iter().map(|(n, _, _)| *n).collect();
        for (name, kind, help) in ALL {
            assert!(name.starts_with("detour_"), "{name}");
            assert!(
                !help.is_empty() && !help.starts_with(' '),
                "{name}: {help:?}"
            );
            let counter_name = name.ends_with("_total");
            assert_eq!(counter_name, *kind == Kind::Counter, "{name}");
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }

    #[test]
    fn an_unknown_alias_never_becomes_a_label() {
        let mut r = Finished {
            tenant: None,
            route: None,
            provider: None,
            status: 0,
            format: "openai",
            duration: Duration::ZERO,
            first_byte: None,
            tokens: None,
        };
        assert_eq!(&*route_label(&r), "none");
        r.route = Some("whatever-the-client-sent");
        r.status = 404;
        assert_eq!(&*route_label(&r), "unknown");
        r.status = 503;
        assert_eq!(&*route_label(&r), "whatever-the-client-sent");
        r.status = 404;
        r.provider = Some("p");
        assert_eq!(&*route_label(&r), "whatever-the-client-sent");
    }
}
