//! The forwarding pipeline for one request, after ingress has checked it:
//! route → plan of targets → attempts (failover under a retry budget) →
//! provider adapter → upstream → relay.
//!
//! Failover rule, decided on error types (`UpstreamError::retryable`), never on
//! strings:
//!
//! | what happened | failover? | health |
//! |---|---|---|
//! | connect error, reset, first-byte/connect timeout | yes | failure |
//! | 5xx, Anthropic 529 | yes | failure |
//! | 429 (and 503/529 with `retry-after`) | yes | cool-down for `retry-after` |
//! | 401/402/403 from the provider (detour's own key) | yes | marked misconfigured |
//! | a stream that fails, ends or sends an error event before its first event | yes | failure |
//! | the caller's own 4xx (400, 404, 409, 413, 415, 422) | no: relayed | none |
//! | a failure after the first event reached the client | no: error event | — |
//!
//! A retry needs a token from the route's retry budget; without one, the
//! request ends with the last error instead of adding load to a failing fleet.

use std::ops::Range;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::config::{Route, Target};
use crate::error::{ApiError, ClientFormat, GatewayError};
use crate::health::{Failure, TargetHealth};
use crate::providers::{Adapter, Endpoint};
use crate::relay::RelayBody;
use crate::routing;
use crate::state::Live;
use crate::telemetry::RequestRecord;
use crate::upstream::UpstreamError;

/// A checked request in the client's format.
#[derive(Debug)]
pub struct Forward {
    pub endpoint: Endpoint,
    pub format: ClientFormat,
    pub alias: String,
    pub body: Bytes,
    pub model_span: Range<usize>,
    pub stream: bool,
}

/// An attempt that produced a response the client can get.
struct Committed {
    status: StatusCode,
    headers: HeaderMap,
    body: RelayBody,
}

/// What each failed attempt was, for the `x-detour-tried` header and logs.
#[derive(Debug, Default)]
struct Tried(Vec<String>);

impl Tried {
    fn push(&mut self, target: &Target, reason: &str) {
        self.0.push(format!(
            "{}/{}={reason}",
            target.provider.name, target.model
        ));
    }

    fn header(&self) -> Option<HeaderValue> {
        if self.0.is_empty() {
            return None;
        }
        HeaderValue::from_str(&self.0.join(", ")).ok()
    }
}

pub async fn forward(live: &Live, req: Forward, mut record: RequestRecord) -> Response {
    record.route = Some(req.alias.clone());
    record.stream = req.stream;
    let Some(position) = live.config.route_position(&req.alias) else {
        let error = GatewayError::ModelNotFound {
            alias: req.alias,
            available: live.config.aliases().map(str::to_owned).collect(),
        };
        return reject(record, req.format, error);
    };
    let route = &live.config.routes[position];
    let state = &live.routes[position];
    state.budget.deposit();
    let mut rng = fastrand::Rng::new();
    let plan = routing::plan(route, &state.health, &live.overrides, &mut rng);

    let mut tried = Tried::default();
    let mut attempts = 0u32;
    let mut last: Option<(usize, UpstreamError)> = None;
    for candidate in plan {
        if attempts >= route.retries.max_attempts {
            break;
        }
        let target = &route.targets[candidate.index];
        let health = &state.health[candidate.index];
        if attempts > 0 {
            if !state.budget.try_withdraw() {
                tracing::warn!(request_id = %record.request_id, route = %route.alias, "retry budget exhausted: not failing over");
                tried.push(target, "skipped_budget_exhausted");
                break;
            }
            backoff(route, attempts, &mut rng).await;
        }
        if candidate.probe && !health.claim_probe() {
            continue;
        }
        attempts += 1;
        let outcome = {
            let guard = ProbeGuard(health);
            let outcome = attempt(live, route, target, &req).await;
            std::mem::forget(guard);
            outcome
        };
        match outcome {
            Ok(mut committed) => {
                health.on_success(committed.body.first_byte().unwrap_or_default());
                record.attempts = attempts;
                record.provider = Some(target.provider.name.clone());
                record.model = Some(target.model.clone());
                record.status = committed.status.as_u16();
                committed.body.attach(record);
                let mut resp = Response::new(Body::new(committed.body));
                *resp.status_mut() = committed.status;
                copy_headers(&committed.headers, resp.headers_mut());
                return with_attempt_headers(resp, Some(target), attempts, &tried);
            }
            Err(error) if !error.retryable() => {
                record.attempts = attempts;
                record.provider = Some(target.provider.name.clone());
                record.model = Some(target.model.clone());
                let resp = reject(record, req.format, error.into());
                return with_attempt_headers(resp, Some(target), attempts, &tried);
            }
            Err(error) => {
                if !matches!(error, UpstreamError::Untranslated { .. }) {
                    health.on_failure(failure_of(&error));
                }
                tracing::warn!(
                    request_id = %record.request_id,
                    route = %route.alias,
                    provider = %target.provider.name,
                    model = %target.model,
                    reason = reason_of(&error),
                    error = %error,
                    "attempt failed; failing over if another target is available"
                );
                tried.push(target, reason_of(&error));
                last = Some((candidate.index, error));
            }
        }
    }

    record.attempts = attempts;
    let (error, target) = match last {
        // One attempt: its own error says most (a 504 naming the timeout...).
        Some((index, error)) if attempts == 1 => (error.into(), Some(&route.targets[index])),
        Some(_) => (
            GatewayError::AllTargetsFailed {
                alias: route.alias.clone(),
                tried: tried.0.join(", "),
            },
            None,
        ),
        None => (
            GatewayError::NoHealthyTarget {
                alias: route.alias.clone(),
            },
            None,
        ),
    };
    if let Some(t) = target {
        record.provider = Some(t.provider.name.clone());
        record.model = Some(t.model.clone());
    }
    let resp = reject(record, req.format, error);
    with_attempt_headers(resp, target, attempts, &tried)
}

/// Releases a half-open probe slot if the attempt is dropped midway (the
/// client went away). Forgotten once the attempt has an outcome.
struct ProbeGuard<'a>(&'a TargetHealth);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.on_abandoned();
    }
}

/// One attempt on one target, up to the point where the client can be given
/// a response: headers for plain bodies, the first whole event for streams.
async fn attempt(
    live: &Live,
    route: &Route,
    target: &Target,
    req: &Forward,
) -> Result<Committed, UpstreamError> {
    let adapter = &live.adapters[target.provider_index];
    let Adapter::OpenAi(openai) = adapter else {
        return Err(UpstreamError::Untranslated {
            provider: target.provider.name.clone(),
            kind: target.provider.kind.as_str(),
        });
    };
    let upstream_req = openai.request(
        req.endpoint,
        &req.body,
        req.model_span.clone(),
        &target.model,
    );
    let started = Instant::now();
    let answer = openai
        .upstream()
        .send(upstream_req, &route.timeouts, started)
        .await?;
    let event_stream = answer
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = RelayBody::new(
        answer.body,
        event_stream,
        target.provider.name.clone(),
        route.timeouts,
        req.format,
        started,
    );
    body.prime().await?;
    Ok(Committed {
        status: answer.status,
        headers: answer.headers,
        body,
    })
}

/// Full-jitter exponential backoff before retry number `attempts`.
async fn backoff(route: &Route, attempts: u32, rng: &mut fastrand::Rng) {
    let base = route.retries.backoff.as_micros() as u64;
    let cap = base.saturating_mul(1 << attempts.saturating_sub(1).min(10));
    if cap > 0 {
        tokio::time::sleep(Duration::from_micros(rng.u64(0..=cap))).await;
    }
}

fn failure_of(error: &UpstreamError) -> Failure {
    match error {
        UpstreamError::Status {
            status,
            retry_after,
            ..
        } => match status.as_u16() {
            401..=403 => Failure::Credentials,
            429 => Failure::Throttled {
                cool_down: retry_after_of(retry_after.as_ref()).unwrap_or_default(),
            },
            503 | 529 => match retry_after_of(retry_after.as_ref()) {
                Some(cool_down) => Failure::Throttled { cool_down },
                None => Failure::Fault,
            },
            _ => Failure::Fault,
        },
        _ => Failure::Fault,
    }
}

/// `retry-after` in seconds (HTTP dates are not worth a cool-down guess).
fn retry_after_of(v: Option<&HeaderValue>) -> Option<Duration> {
    let secs: f64 = v?.to_str().ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn reason_of(error: &UpstreamError) -> &'static str {
    match error {
        UpstreamError::Connect { .. } => "connect_error",
        UpstreamError::Timeout { kind, .. } => match kind {
            crate::upstream::TimeoutKind::Connect => "connect_timeout",
            crate::upstream::TimeoutKind::FirstByte => "first_byte_timeout",
            crate::upstream::TimeoutKind::Idle => "idle_timeout",
            crate::upstream::TimeoutKind::Total => "total_timeout",
        },
        UpstreamError::Transport { .. } => "transport_error",
        UpstreamError::ErrorEvent { .. } => "stream_error_event",
        UpstreamError::Untranslated { .. } => "untranslated",
        UpstreamError::Status { status, .. } => match status.as_u16() {
            429 => "status_429",
            401..=403 => "credentials_rejected",
            s if s >= 500 => "status_5xx",
            _ => "status_4xx",
        },
    }
}

/// Ends a request with an error response and its log line.
pub fn reject(mut record: RequestRecord, format: ClientFormat, error: GatewayError) -> Response {
    let resp = ApiError { error, format }.into_response();
    record.status = resp.status().as_u16();
    record.finish("rejected");
    resp
}

/// Upstream headers that describe the body and are safe to pass on.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = from.get(&name) {
            to.insert(name, v.clone());
        }
    }
}

fn with_attempt_headers(
    mut resp: Response,
    target: Option<&Target>,
    attempts: u32,
    tried: &Tried,
) -> Response {
    let h = resp.headers_mut();
    if let Some(target) = target {
        if let Ok(v) = HeaderValue::from_str(&target.provider.name) {
            h.insert("x-detour-provider", v);
        }
        if let Ok(v) = HeaderValue::from_str(&target.model) {
            h.insert("x-detour-model", v);
        }
    }
    h.insert("x-detour-attempts", HeaderValue::from(attempts));
    if let Some(v) = tried.header() {
        h.insert("x-detour-tried", v);
    }
    resp
}
