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
//! | 429 (and 503/529 with `retry-after`) | yes | cool-down for `retry-after`, at most the breaker's `max_cool_down` |
//! | 401/402/403 from the provider (detour's own key) | yes | marked misconfigured |
//! | 404 saying the target's model does not exist there | yes | marked misconfigured |
//! | a stream that fails, ends or sends an error event before its first event | yes | failure |
//! | a stream event past `server.max_event_bytes` before the first event | yes | failure |
//! | a 2xx that is neither JSON nor an event stream (an HTML page), JSON that does not parse, or an encoded body that must be read (a stream, an answer to translate) | yes | failure |
//! | a stall mid-body of an answer read whole (idle limit) | yes | failure |
//! | an answer detour cannot translate, or one past the 32 MiB it reads whole | no: 502 | none (detour's limit, not the provider's fault) |
//! | the caller's own 4xx (400, 404, 409, 413, 415, 422) | no: relayed | none |
//! | a failure after the first event reached the client (cut, stall past `idle`, error event, no end marker) | no: error event | failure (a stream counts as a success only once it ended whole) |
//! | same, on a route with `continue_streams = true`, a text stream (no tool call) that sent some text | continued by the plan's next target, spliced into the same stream (see `continuation`); the error event only if that fails | failure |
//!
//! The attempts themselves (which target next, hedging, budget and backoff,
//! what each end tells health) are scheduled by [`attempts::Attempts`];
//! `forward` decides what the client is answered.
//!
//! A retry needs a token from the route's retry budget; without one, the
//! request ends with the last error instead of adding load to a failing fleet.
//!
//! Hedging (`hedge_after`): when the first attempt has no answer after the
//! delay (fixed, or the target's p95 for the request's kind of traffic, and
//! no hedge while that has no sample), a second target races it; the first
//! success wins and the other is cancelled. A non-retryable answer (the
//! caller's own 4xx) from one of the two does not cancel the other: it is the
//! answer only if the other fails too.
//!
//! Responses API requests that build on or write state OpenAI keeps
//! (`previous_response_id`, `conversation`, `store: true`,
//! `background: true`, a stored `prompt`, `item_reference` items) go only to
//! the route's targets of kind `openai` (the others are left out of the
//! plan), are never hedged and never answered from the cache; a route with
//! no such target answers 400 naming the feature. On a route with no
//! `openai` target, a Responses request no translation can carry (a
//! built-in tool, a malformed body) is refused before any attempt.
//!
//! Only the attempt that holds a half-open breaker's probe slot reports
//! itself as the probe (`probe` in `health::TargetHealth::on_whole` /
//! `on_failure`); a probe that ends telling nothing (cancelled, or the
//! caller's own 4xx) frees the slot. An attempt on a target whose health is
//! unknown or recovering (a probe, slow start) is raced by the next target
//! soon (`probe_hedge_after`, or the target's learned p95) and, when it
//! loses, goes on in the background to tell its target's health how it
//! ended (see [`attempts`]): a probe never holds a client up.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;

mod attempts;
mod continuation;
mod in_flight;

use attempts::{Answer, Attempts, Ended, Exhausted, Settle, Tried};

use crate::cache;
use crate::config::{Route, Target};
use crate::error::{ApiError, ClientFormat, GatewayError};
use crate::health::{BreakerState, Failure, TargetHealth, Traffic, Transition};
use crate::incidents::IncidentLog;
use crate::protocol::chat::{ChatRequest, Format};
use crate::protocol::translate::{self, StreamDecoder, StreamEncoder, TranslateError};
use crate::providers::{Adapter, Endpoint, Outgoing};
use crate::relay::{BodyEnd, Continuation, RelayBody, Shape};
use crate::request::Tracked;
use crate::routing;
use crate::state::Live;
use crate::telemetry::Outcome;
use crate::traces;
use crate::upstream::{Unexpected, UpstreamError};

/// A checked request in the client's format.
#[derive(Debug)]
pub struct Forward {
    pub endpoint: Endpoint,
    pub format: ClientFormat,
    pub alias: String,
    pub body: Bytes,
    pub model_span: Range<usize>,
    pub stream: bool,
    /// OpenAI clients: `stream_options.include_usage`.
    pub include_usage: bool,
    /// OpenAI clients: how a passthrough stream asks for usage anyway (it is
    /// stripped from the answer unless `include_usage`).
    pub ask_usage: crate::protocol::openai::AskUsage,
    /// The request in the IR; parsed only when a target needs translation
    /// (ingress may fill it when it parsed the IR anyway).
    pub ir: OnceLock<Result<ChatRequest, TranslateError>>,
    /// The authenticated caller's tenant: the response cache's partition.
    pub tenant: std::sync::Arc<str>,
    /// The client sent `x-detour-cache: bypass` (or `no-cache`).
    pub cache_bypass: bool,
    /// Responses API clients: the feature that needs state only OpenAI keeps
    /// (`previous_response_id`, `store: true`, …). Such a request goes only
    /// to the route's targets that keep it (kind `openai`), and is never
    /// hedged (two racing attempts would change that state twice).
    pub stateful: Option<&'static str>,
}

impl Forward {
    /// The request in the IR, parsed from the client's format on first use.
    fn ir(&self) -> Result<&ChatRequest, TranslateError> {
        let parsed = self.ir.get_or_init(|| match self.format {
            ClientFormat::OpenAi => translate::openai::parse_request(&self.body),
            ClientFormat::Anthropic => translate::anthropic::parse_request(&self.body),
            ClientFormat::Responses => translate::responses::parse_request(&self.body),
        });
        parsed.as_ref().map_err(Clone::clone)
    }
}

/// Largest non-streamed answer read whole to be translated.
const MAX_TRANSLATED_BODY: usize = 32 * 1024 * 1024;

/// An attempt that produced a response the client can get.
struct Committed {
    status: StatusCode,
    headers: HeaderMap,
    body: Box<RelayBody>,
    /// The config it was made on and the target's provider: a stream that
    /// breaks off may start a traffic incident.
    live: Arc<Live>,
    provider_index: usize,
}

impl Answer for Committed {
    fn took(&self) -> Duration {
        self.body.first_byte().unwrap_or_default()
    }

    fn settle_with(&mut self, settle: Settle) {
        if !self.body.is_event_stream() {
            // Whole once answered; a plain body cut later is only aborted.
            settle.ended(BodyEnd::Whole);
            return;
        }
        let (live, provider) = (Arc::clone(&self.live), self.provider_index);
        self.body.on_body_end(Box::new(move |end| {
            let broke = matches!(end, BodyEnd::Broke(_));
            settle.ended(end);
            if broke && all_breakers_open(&live, provider) {
                let name = &live.config.providers[provider].name;
                live.incidents.traffic_down(name, SystemTime::now());
            }
        }));
    }

    fn drain(self) -> BoxFuture<'static, ()> {
        use http_body_util::BodyExt;
        let mut body = self.body;
        // The body's own limits (idle, total) bound the read.
        Box::pin(async move { while let Some(Ok(_)) = body.frame().await {} })
    }
}

/// Routes `req` and answers it from the first target that does. `req` is
/// shared: each attempt owns what it needs, since a tentative one may outlive
/// the request (see `attempts`); and behind an `Arc` it is one word in every
/// future that carries it, not a 544-byte copy in each.
pub async fn forward(live: &Arc<Live>, req: Arc<Forward>, mut record: Tracked) -> Response {
    record.route = Some(req.alias.clone());
    record.stream = req.stream;
    let Some(position) = live.config.route_position(&req.alias) else {
        let error = GatewayError::ModelNotFound {
            alias: req.alias.clone(),
            available: live.config.aliases().map(str::to_owned).collect(),
        };
        return reject(record, req.format, error);
    };
    let route = &live.config.routes[position];
    // Only a configured alias names the span (not whatever a client sent).
    if let Some(span) = record.span.as_mut() {
        span.route(&route.alias);
    }
    // On a cached route: a verified hit is answered here; otherwise `visit`
    // labels the response and may store it.
    let mut visit = match route.cache {
        Some(policy) => {
            let ask = cache::Ask {
                tenant: &req.tenant,
                format: req.format,
                endpoint: req.endpoint,
                stream: req.stream,
                body: &req.body,
                bypass: req.cache_bypass,
            };
            let outcome = live.cache.visit(&ask, policy).await;
            crate::metrics::cache_lookup(&route.alias, outcome.status().as_str());
            if let Some(span) = record.span.as_mut() {
                span.cache(outcome.status().as_str());
            }
            if outcome.mismatched() {
                crate::metrics::cache_mismatch();
            }
            match outcome {
                cache::Outcome::Hit(entry) => return replay(&entry, record),
                cache::Outcome::Forward(visit) => Some(visit),
            }
        }
        None => None,
    };
    if let Some(feature) = req.stateful {
        // Another provider would answer without the state the request builds
        // on (or asks to keep): only targets that keep it are tried (below),
        // and a route without one refuses it.
        if !(0..route.targets.len()).any(|i| keeps_state(live, route, i)) {
            let error = GatewayError::Untranslatable(format!(
                "{feature} needs state kept by OpenAI's Responses API, and no target of route `{}` is a provider of kind `openai`",
                route.alias
            ));
            return with_cache_status(reject(record, req.format, error), visit.as_ref());
        }
    }
    if req.format == ClientFormat::Responses
        && !(0..route.targets.len()).any(|i| keeps_state(live, route, i))
    {
        // Every target translates: what no translation can carry (a
        // built-in tool, a malformed body) is the caller's 400 now, rather
        // than each target's refusal in turn.
        match req.ir() {
            Err(TranslateError::Invalid(e)) => {
                return with_cache_status(reject(record, req.format, e.into()), visit.as_ref());
            }
            Err(e @ TranslateError::ResponsesOnly { .. }) => {
                let error = GatewayError::Untranslatable(format!(
                    "{e}, and no target of route `{}` is one",
                    route.alias
                ));
                return with_cache_status(reject(record, req.format, error), visit.as_ref());
            }
            _ => {}
        }
    }
    let state = &live.routes[position];
    state.budget.deposit();
    let mut rng = fastrand::Rng::new();
    // Streamed and whole answers have their own latency estimates.
    let traffic = Traffic::of(req.stream);
    let mut plan = routing::plan(route, &state.health, &live.overrides, traffic, &mut rng);
    if req.stateful.is_some() {
        plan.retain(|c| keeps_state(live, route, c.index));
    }
    // The plan's order, for the target that continues a broken stream.
    let order: Option<Arc<[usize]>> = (route.continue_streams && continuation::applies(&req))
        .then(|| plan.iter().map(|c| c.index).collect());
    let trace = record.span.as_ref().map(|s| s.attempts(&route.alias));
    let mut attempts = Attempts::new(
        route,
        state,
        &live.incidents,
        plan,
        traffic,
        &record.request_id,
        rng,
        |index| {
            let (live, req) = (Arc::clone(live), Arc::clone(&req));
            let resume = order
                .as_ref()
                .and_then(|order| continuation::next_target(&live, position, &req, order, index));
            let launched = trace.as_ref().map(|t| {
                let target = &route.targets[index];
                t.launch(traces::Target {
                    provider: &target.provider.name,
                    kind: target.provider.kind,
                    model: &target.model,
                })
            });
            async move {
                let route = &live.config.routes[position];
                let span = launched.map(traces::Launched::start);
                let result = attempt(&live, route, &route.targets[index], &req, resume).await;
                if let Some(span) = span {
                    span.end(match &result {
                        Ok(c) => Ok(c.status.as_u16()),
                        Err(e) => Err(e.kind().reason()),
                    });
                }
                result
            }
        },
    );
    if req.stateful.is_some() {
        attempts.without_hedging();
    }
    attempts.launch();
    while let Some(Ended {
        index,
        probe,
        result,
    }) = attempts.next().await
    {
        match result {
            Ok(mut committed) => {
                let (tried, launched) = attempts.won(index, probe, &mut committed);
                record.attempts = launched;
                count_failed_over(live, position, index);
                if committed.status.is_success() && !live.served_ok.load(Ordering::Relaxed) {
                    live.served_ok.store(true, Ordering::Relaxed);
                }
                let names = &state.health[index];
                return commit(
                    committed,
                    record,
                    route,
                    index,
                    names,
                    &tried,
                    visit.as_mut(),
                );
            }
            Err(error) if !error.retryable() => attempts.refused(index, probe, error),
            Err(error) => {
                let target = &route.targets[index];
                attempts.failed(index, probe, error);
                if all_breakers_open(live, target.provider_index) {
                    live.incidents
                        .traffic_down(&target.provider.name, SystemTime::now());
                }
            }
        }
    }

    let (end, tried, launched) = attempts.finish();
    record.attempts = launched;
    let (error, target) = match end {
        Exhausted::Refused(index, error) => {
            return refuse(record, &req, route, index, error, &tried, visit.as_ref());
        }
        // One attempt: its own error says most (a 504 naming the timeout...).
        Exhausted::Failed(Some((index, error))) if launched == 1 => {
            (error.into(), Some(&route.targets[index]))
        }
        Exhausted::Failed(Some(_)) => (
            GatewayError::AllTargetsFailed {
                alias: route.alias.clone(),
                tried: tried.list(),
            },
            None,
        ),
        Exhausted::Failed(None) => (
            GatewayError::NoHealthyTarget {
                alias: route.alias.clone(),
            },
            None,
        ),
    };
    if let Some(t) = target {
        record.provider = Some(t.provider.name.as_str().into());
        record.model = Some(t.model.as_str().into());
        if let Some(span) = record.span.as_mut() {
            span.provider_kind(t.provider.kind);
        }
    }
    let resp = reject(record, req.format, error);
    let resp = with_attempt_headers(resp, target, launched, &tried);
    with_cache_status(resp, visit.as_ref())
}

/// Whether target `index` of `route` keeps the Responses API's state.
fn keeps_state(live: &Live, route: &Route, index: usize) -> bool {
    route.targets.get(index).is_some_and(|t| {
        live.adapters
            .get(t.provider_index)
            .is_some_and(crate::providers::Adapter::keeps_responses_state)
    })
}

/// Hands the winning attempt's response to the client: the record (and, on
/// a cached route, the capture) go with the body, which ends them. The
/// record shares the target's names with its health state (`names`).
fn commit(
    mut committed: Committed,
    mut record: Tracked,
    route: &Route,
    index: usize,
    names: &TargetHealth,
    tried: &Tried,
    visit: Option<&mut cache::Visit>,
) -> Response {
    let target = &route.targets[index];
    let attempts = record.attempts;
    record.provider = Some(Arc::clone(&names.provider));
    record.model = Some(Arc::clone(&names.model));
    record.status = committed.status.as_u16();
    if let Some(span) = record.span.as_mut() {
        span.provider_kind(target.provider.kind);
    }
    let (provider, model) = (&target.provider.name, &target.model);
    let mut visit = visit;
    let capture = visit
        .as_mut()
        .and_then(|v| v.capture(committed.status, &committed.headers, provider, model));
    if let Some(capture) = capture {
        committed.body.capture(capture);
    }
    let visit = visit.map(|v| &*v);
    committed.body.attach(record);
    let mut resp = Response::new(Body::new(committed.body));
    *resp.status_mut() = committed.status;
    copy_headers(&committed.headers, resp.headers_mut());
    let resp = with_attempt_headers(resp, Some(target), attempts, tried);
    with_cache_status(resp, visit)
}

/// Reports a breaker's change of state, which health only returns: the
/// metric, the incident log (a closed breaker ends a traffic incident), the
/// log line.
fn report(incidents: &IncidentLog, provider: &str, model: &str, transition: Transition) {
    crate::metrics::breaker_transition(provider, transition.as_str());
    match transition {
        Transition::Opened => tracing::warn!(%provider, %model, "breaker opened"),
        Transition::HalfOpened => {
            tracing::info!(%provider, %model, "breaker half-open: probing");
        }
        Transition::Closed => {
            incidents.traffic_recovered(provider, SystemTime::now());
            tracing::info!(%provider, %model, "breaker closed: target recovered");
        }
    }
}

/// Whether every target of provider `provider_index` on every route has a
/// breaker that is not closed (a traffic incident). False for a provider no
/// route uses.
fn all_breakers_open(live: &Live, provider_index: usize) -> bool {
    let mut any = false;
    for (route, state) in live.config.routes.iter().zip(&live.routes) {
        for (target, health) in route.targets.iter().zip(&state.health) {
            if target.provider_index == provider_index {
                if health.state() == BreakerState::Closed {
                    return false;
                }
                any = true;
            }
        }
    }
    any
}

/// Target `target` of route `route` answered: counts the request for every
/// ongoing incident of a provider with a target in an earlier priority group
/// on that route. Lock-free without incidents.
fn count_failed_over(live: &Live, route: usize, target: usize) {
    let Some(route) = live.config.routes.get(route) else {
        return;
    };
    let Some(serving) = route.targets.get(target) else {
        return;
    };
    live.incidents.count_failed_over(|provider| {
        provider != serving.provider.name
            && route
                .targets
                .iter()
                .any(|t| t.priority < serving.priority && t.provider.name == provider)
    });
}

/// Answers a non-retryable error (the caller's own 4xx) from target `index`.
fn refuse(
    mut record: Tracked,
    req: &Forward,
    route: &Route,
    index: usize,
    error: UpstreamError,
    tried: &Tried,
    visit: Option<&cache::Visit>,
) -> Response {
    let target = &route.targets[index];
    record.provider = Some(target.provider.name.as_str().into());
    record.model = Some(target.model.as_str().into());
    if let Some(span) = record.span.as_mut() {
        span.provider_kind(target.provider.kind);
    }
    let attempts = record.attempts;
    let resp = reject(record, req.format, error.into());
    let resp = with_attempt_headers(resp, Some(target), attempts, tried);
    with_cache_status(resp, visit)
}

/// Answers from the response cache: no attempt, the original answer's bytes.
fn replay(entry: &cache::Entry, mut record: Tracked) -> Response {
    record.model = Some(entry.model.as_str().into());
    record.status = entry.status;
    record.finish(Outcome::CacheHit);
    entry.response()
}

/// `x-detour-cache` on the responses of cached routes.
fn with_cache_status(mut resp: Response, visit: Option<&cache::Visit>) -> Response {
    if let Some(v) = visit {
        resp.headers_mut()
            .insert(cache::HEADER, v.status().header());
    }
    resp
}

/// One attempt on one target, up to the point where the client can be given
/// a response: headers for plain bodies, the first whole event for streams.
/// With `resume` (a route that continues broken streams), a stream is
/// decoded and re-encoded, so that another target's can be spliced in.
async fn attempt(
    live: &Arc<Live>,
    route: &Route,
    target: &Target,
    req: &Forward,
    resume: Option<Continuation>,
) -> Result<Committed, UpstreamError> {
    let adapter = &live.adapters[target.provider_index];
    let upstream_req = {
        let ir = || req.ir();
        let out = Outgoing {
            endpoint: req.endpoint,
            format: req.format.wire(),
            body: &req.body,
            model_span: req.model_span.clone(),
            stream: req.stream,
            ask_usage: &req.ask_usage,
            ir: &ir,
        };
        adapter.request(&out, &target.model)?
    };
    let started = Instant::now();
    let answer = adapter
        .upstream()
        .send(upstream_req, &route.timeouts, started)
        .await
        .map_err(|e| e.for_target(&target.model, route.breaker.max_cool_down))?;
    let unexpected = |what| UpstreamError::UnexpectedAnswer {
        provider: target.provider.name.clone(),
        what,
    };
    let event_stream = is_event_stream(&answer.headers).map_err(unexpected)?;
    let encoding = content_encoding(&answer.headers);
    let crate::upstream::Answer {
        status,
        mut headers,
        body: upstream_body,
    } = answer;
    let upstream_format = adapter.format();
    let client_format = req.format.wire();
    // The provider answers in the client's own format (a passthrough).
    let native = adapter.passes_through(req.format, req.endpoint);
    let relayed_as_is = native && !event_stream;
    if let (Some(encoding), false) = (&encoding, relayed_as_is) {
        // A stream or an answer to translate must be read, and detour asked
        // for no encoding: another target will do.
        return Err(unexpected(Unexpected::Encoding(encoding.clone())));
    }
    let (shape, inner) = match (native, event_stream) {
        (true, true) if req.format == ClientFormat::Responses => {
            // Decoded only to know where it ends, its usage and errors.
            let decoder = Box::new(StreamDecoder::Responses(
                translate::responses::StreamDecoder::new(),
            ));
            let shape = Shape::Decoded {
                decoder,
                encoder: None,
            };
            (shape, Some(upstream_body))
        }
        // Decoded and re-encoded, so that a continuation can be spliced in.
        (true, true) if resume.is_some() => {
            let shape = Shape::Decoded {
                decoder: Box::new(StreamDecoder::new(upstream_format)),
                encoder: Some(Box::new(encoder_for(req))),
            };
            (shape, Some(upstream_body))
        }
        (true, true) if client_format == Format::OpenAi => {
            let strip_usage = !req.include_usage;
            (Shape::OpenAiEvents { strip_usage }, Some(upstream_body))
        }
        // Other formats are decoded to know where the stream ends.
        (true, true) => {
            let decoder = Box::new(StreamDecoder::new(upstream_format));
            let shape = Shape::Decoded {
                decoder,
                encoder: None,
            };
            (shape, Some(upstream_body))
        }
        (true, false) => (Shape::Plain, Some(upstream_body)),
        (false, true) => {
            let shape = Shape::Decoded {
                decoder: Box::new(StreamDecoder::new(upstream_format)),
                encoder: Some(Box::new(encoder_for(req))),
            };
            let sse = HeaderValue::from_static("text/event-stream");
            headers.insert(header::CONTENT_TYPE, sse);
            (shape, Some(upstream_body))
        }
        (false, false) => {
            let body = read_whole(adapter, upstream_body, &route.timeouts, started).await?;
            let translated = match translate_response(upstream_format, req, &body) {
                Ok(translated) => translated,
                // Not even JSON: the provider's fault, another target may do.
                Err(_) if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() => {
                    return Err(unexpected(Unexpected::NotJson))
                }
                // The provider did its part; generating the answer again
                // elsewhere would cost twice and fail the same way.
                Err(e) => {
                    // No message: it may quote the answer's text.
                    tracing::error!(
                        provider = %target.provider.name,
                        model = %target.model,
                        from = ?upstream_format,
                        to = req.format.as_str(),
                        "could not translate a provider's answer: a detour bug or a change in the provider's format"
                    );
                    return Err(UpstreamError::TranslationFailed {
                        provider: target.provider.name.clone(),
                        message: e.to_string(),
                    });
                }
            };
            let json = HeaderValue::from_static("application/json");
            headers.insert(header::CONTENT_TYPE, json);
            (Shape::Ready(translated), None)
        }
    };
    let mut body = RelayBody::new(
        inner,
        shape,
        target.provider.name.clone(),
        route.timeouts,
        live.config.server.max_event_bytes,
        req.format,
        started,
    );
    if encoding.is_some() {
        // The cache keeps the content type only: an encoded answer would be
        // replayed mislabelled.
        body.keep_out_of_cache();
    }
    if let Some(resume) = resume {
        body.continue_with(resume);
    }
    body.prime().await?;
    Ok(Committed {
        status,
        headers,
        body,
        live: Arc::clone(live),
        provider_index: target.provider_index,
    })
}

/// Whether a 2xx answer is an event stream (else JSON); an answer that is
/// neither (an HTML page from a proxy in front of the provider) is not what
/// the endpoint returns. No content type at all is read as JSON.
fn is_event_stream(headers: &HeaderMap) -> Result<bool, Unexpected> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Ok(false);
    };
    // What providers send, compared as it is before the general reading.
    match v.as_bytes() {
        b"application/json" => return Ok(false),
        b"text/event-stream" => return Ok(true),
        _ => {}
    }
    let media = v.to_str().unwrap_or_default();
    let media = media.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case("text/event-stream") {
        return Ok(true);
    }
    let json = media.eq_ignore_ascii_case("application/json")
        || media
            .get(media.len().saturating_sub(5)..)
            .is_some_and(|s| s.eq_ignore_ascii_case("+json"));
    if json {
        Ok(false)
    } else {
        Err(Unexpected::ContentType(crate::upstream::shorten(v)))
    }
}

/// The answer's `content-encoding`, unless none or `identity`.
fn content_encoding(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_ENCODING)?;
    let identity = v
        .to_str()
        .is_ok_and(|s| s.trim().is_empty() || s.trim().eq_ignore_ascii_case("identity"));
    (!identity).then(|| crate::upstream::shorten(v))
}

/// The stream encoder for the client's format.
fn encoder_for(req: &Forward) -> StreamEncoder {
    match req.format {
        ClientFormat::OpenAi => StreamEncoder::OpenAi(translate::openai::StreamEncoder::new(
            unix_now(),
            req.include_usage,
        )),
        ClientFormat::Anthropic => {
            StreamEncoder::Anthropic(translate::anthropic::StreamEncoder::new())
        }
        ClientFormat::Responses => {
            StreamEncoder::Responses(Box::new(translate::responses::StreamEncoder::new(
                translate::responses::Echo::of_request(&req.body),
                unix_now(),
            )))
        }
    }
}

fn translate_response(
    upstream: Format,
    req: &Forward,
    body: &[u8],
) -> Result<Bytes, TranslateError> {
    let resp = match upstream {
        Format::OpenAi => translate::openai::parse_response(body)?,
        Format::Anthropic => translate::anthropic::parse_response(body)?,
        Format::Gemini => translate::gemini::parse_response(body)?,
    };
    match req.format {
        ClientFormat::OpenAi => Ok(translate::openai::encode_response(&resp, unix_now())),
        ClientFormat::Anthropic => translate::anthropic::encode_response(&resp),
        ClientFormat::Responses => Ok(translate::responses::encode_response(
            &resp,
            &translate::responses::Echo::of_request(&req.body),
            unix_now(),
        )),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a whole (non-streamed) answer to translate it: each chunk within the
/// idle limit, the whole within the attempt's total limit (from `started`),
/// at most `MAX_TRANSLATED_BODY` bytes.
async fn read_whole(
    adapter: &Adapter,
    mut body: crate::upstream::ResponseBody,
    timeouts: &crate::config::Timeouts,
    started: Instant,
) -> Result<Bytes, UpstreamError> {
    use crate::upstream::TimeoutKind;
    use http_body_util::BodyExt;
    let total = started + timeouts.total;
    let mut whole = bytes::BytesMut::new();
    loop {
        let deadline = (Instant::now() + timeouts.idle).min(total);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => return Ok(whole.freeze()),
            Ok(Some(Err(e))) => {
                return Err(adapter.upstream().transport(format!(
                    "reading the answer: {}",
                    crate::upstream::error_chain(&e)
                )))
            }
            Err(_) if Instant::now() >= total => {
                return Err(adapter.upstream().timeout(TimeoutKind::Total, timeouts))
            }
            Err(_) => return Err(adapter.upstream().timeout(TimeoutKind::Idle, timeouts)),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if whole.len() + data.len() > MAX_TRANSLATED_BODY {
            return Err(UpstreamError::AnswerTooLarge {
                provider: adapter.upstream().provider().to_owned(),
                limit: MAX_TRANSLATED_BODY,
            });
        }
        whole.extend_from_slice(&data);
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
                cool_down: retry_after.unwrap_or_default(),
            },
            503 | 529 => match retry_after {
                Some(cool_down) => Failure::Throttled {
                    cool_down: *cool_down,
                },
                None => Failure::Fault,
            },
            _ => Failure::Fault,
        },
        UpstreamError::ModelNotFound { .. } => Failure::ModelNotFound,
        _ => Failure::Fault,
    }
}

/// Ends a request with an error response and its log line.
pub fn reject(mut record: Tracked, format: ClientFormat, error: GatewayError) -> Response {
    let resp = ApiError { error, format }.into_response();
    record.status = resp.status().as_u16();
    record.finish(Outcome::Rejected);
    resp
}

/// Upstream headers that describe the body and are safe to pass on. Only a
/// body relayed as it came can carry a `content-encoding` (see `attempt`).
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CACHE_CONTROL,
    ] {
        if let Some(v) = from.get(&name) {
            to.insert(name, v.clone());
        }
    }
}

// Built once: a name given as `&str` is parsed (and copied) on every insert.
const X_DETOUR_PROVIDER: HeaderName = HeaderName::from_static("x-detour-provider");
const X_DETOUR_MODEL: HeaderName = HeaderName::from_static("x-detour-model");
const X_DETOUR_ATTEMPTS: HeaderName = HeaderName::from_static("x-detour-attempts");
const X_DETOUR_TRIED: HeaderName = HeaderName::from_static("x-detour-tried");

fn with_attempt_headers(
    mut resp: Response,
    target: Option<&Target>,
    attempts: u32,
    tried: &Tried,
) -> Response {
    let h = resp.headers_mut();
    if let Some((provider, model)) = target.and_then(|t| t.headers.clone()) {
        h.insert(X_DETOUR_PROVIDER, provider);
        h.insert(X_DETOUR_MODEL, model);
    }
    h.insert(X_DETOUR_ATTEMPTS, count_value(attempts));
    if let Some(v) = tried.header() {
        h.insert(X_DETOUR_TRIED, v);
    }
    resp
}

/// A count as a header value, without an allocation for the usual ones.
fn count_value(n: u32) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match usize::try_from(n).ok().and_then(|i| DIGITS.get(i)) {
        Some(digit) => HeaderValue::from_static(digit),
        None => HeaderValue::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_as_their_numbers() {
        for n in [0, 1, 2, 9, 10, 11, 100, u32::MAX] {
            assert_eq!(count_value(n), HeaderValue::from(n), "{n}");
        }
    }
}
