//! The forwarding pipeline for one request, after ingress has checked it:
//! route → target → provider adapter → upstream → relay.

use std::ops::Range;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use tokio::time::Instant;

use crate::config::Target;
use crate::error::{ApiError, ClientFormat, GatewayError};
use crate::providers::{Adapter, Endpoint};
use crate::relay::RelayBody;
use crate::routing;
use crate::state::Live;
use crate::telemetry::RequestRecord;

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

pub async fn forward(live: &Live, req: Forward, mut record: RequestRecord) -> Response {
    record.route = Some(req.alias.clone());
    record.stream = req.stream;
    let Some(route) = live.config.route(&req.alias) else {
        let error = GatewayError::ModelNotFound {
            alias: req.alias,
            available: live.config.aliases().map(str::to_owned).collect(),
        };
        return reject(record, req.format, error);
    };
    let Some(target) = routing::plan(route).next() else {
        let error = GatewayError::NoTarget {
            alias: req.alias,
            endpoint: req.endpoint.as_str(),
        };
        return reject(record, req.format, error);
    };
    record.attempts = 1;
    record.provider = Some(target.provider.name.clone());
    record.model = Some(target.model.clone());
    let adapter = &live.adapters[target.provider_index];
    let Adapter::OpenAi(openai) = adapter else {
        let error = GatewayError::NoTarget {
            alias: req.alias,
            endpoint: req.endpoint.as_str(),
        };
        return with_target_headers(reject(record, req.format, error), target, 1);
    };
    let upstream_req = openai.request(req.endpoint, &req.body, req.model_span, &target.model);
    let started = Instant::now();
    let timeouts = route.timeouts;
    match openai
        .upstream()
        .send(upstream_req, &timeouts, started)
        .await
    {
        Ok(answer) => {
            record.status = answer.status.as_u16();
            let event_stream = answer
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if !event_stream {
                record.first_byte = Some(started.elapsed());
            }
            let body = RelayBody::new(
                answer.body,
                event_stream,
                target.provider.name.clone(),
                timeouts,
                req.format,
                started,
                record,
            );
            let mut resp = Response::new(Body::new(body));
            *resp.status_mut() = answer.status;
            copy_headers(&answer.headers, resp.headers_mut());
            with_target_headers(resp, target, 1)
        }
        Err(error) => {
            tracing::warn!(
                request_id = %record.request_id,
                provider = %target.provider.name,
                error = %error,
                "upstream attempt failed"
            );
            with_target_headers(reject(record, req.format, error.into()), target, 1)
        }
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

pub fn with_target_headers(mut resp: Response, target: &Target, attempts: u32) -> Response {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&target.provider.name) {
        h.insert("x-detour-provider", v);
    }
    if let Ok(v) = HeaderValue::from_str(&target.model) {
        h.insert("x-detour-model", v);
    }
    h.insert("x-detour-attempts", HeaderValue::from(attempts));
    resp
}
