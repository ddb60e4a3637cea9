//! The OpenAI API: `/v1/chat/completions`, `/v1/responses`, `/v1/embeddings`,
//! `/v1/models`.

use std::sync::OnceLock;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue};

use super::{accept, rate_limited, start, Admitted, Started};
use crate::auth::Caller;
use crate::cache;
use crate::error::ClientFormat;
use crate::protocol::openai::{
    model_list, AskUsage, ChatRequest, EmbeddingsRequest, ResponsesRequest,
};
use crate::providers::Endpoint;
use crate::proxy::{forward, reject, Forward};

const FORMAT: ClientFormat = ClientFormat::OpenAi;

pub async fn chat_completions(admitted: Box<Admitted>, req: Box<Request>) -> Response {
    let started = match start(admitted, FORMAT, Endpoint::ChatCompletions, req).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let parsed = match ChatRequest::parse(&started.body) {
        Ok(p) => p,
        Err(e) => return reject(started.record, FORMAT, e.into()),
    };
    let checked = Checked {
        endpoint: Endpoint::ChatCompletions,
        format: FORMAT,
        model: parsed.model,
        model_span: parsed.model_span,
        stream: parsed.stream,
        max_tokens: parsed.max_tokens,
        include_usage: parsed.include_usage,
        ask_usage: parsed.ask_usage,
        stateful: None,
    };
    accept_and_forward(started, checked).await
}

/// `POST /v1/responses`: OpenAI's Responses API, passed through to `openai`
/// providers and translated for the others (`protocol::translate::responses`).
/// Its errors are in OpenAI's shape; a stream that fails after it started
/// ends with Responses events (`response.failed`, `error`).
pub async fn responses(admitted: Box<Admitted>, req: Box<Request>) -> Response {
    const FORMAT: ClientFormat = ClientFormat::Responses;
    let started = match start(admitted, FORMAT, Endpoint::Responses, req).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let parsed = match ResponsesRequest::parse(&started.body) {
        Ok(p) => p,
        Err(e) => return reject(started.record, FORMAT, e.into()),
    };
    let checked = Checked {
        endpoint: Endpoint::Responses,
        format: FORMAT,
        model: parsed.model,
        model_span: parsed.model_span,
        stream: parsed.stream,
        max_tokens: parsed.max_tokens,
        // Usage comes with every Responses answer; nothing is stripped.
        include_usage: true,
        ask_usage: AskUsage::No,
        stateful: parsed.stateful,
    };
    accept_and_forward(started, checked).await
}

/// What a handler read of a chat-like request (Chat Completions, Responses).
struct Checked {
    endpoint: Endpoint,
    format: ClientFormat,
    model: String,
    model_span: std::ops::Range<usize>,
    stream: bool,
    max_tokens: Option<u64>,
    include_usage: bool,
    ask_usage: AskUsage,
    stateful: Option<&'static str>,
}

/// What every chat-like request goes through once read: model access and its
/// tokens ([`accept`]), a stream slot, then [`forward`].
async fn accept_and_forward(started: Started, c: Checked) -> Response {
    let Started {
        live,
        caller,
        mut record,
        headers,
        body,
        tokens,
    } = started;
    let (len, max) = (body.len(), c.max_tokens);
    if let Err(e) = accept(&mut record, &live, &caller, &tokens, &c.model, len, max).await {
        return reject(record, c.format, e);
    }
    if c.stream {
        match live.limits.stream_permit(&caller).await {
            Ok(permit) => record.set_hold(permit),
            Err(e) => return reject(record, c.format, rate_limited(e)),
        }
    }
    let fwd = Forward {
        endpoint: c.endpoint,
        format: c.format,
        alias: c.model,
        body,
        model_span: c.model_span,
        stream: c.stream,
        include_usage: c.include_usage,
        ask_usage: c.ask_usage,
        ir: OnceLock::new(),
        tenant: caller.tenant,
        // A stateful request is never answered from the cache: its answer
        // also changed state upstream (a stored response, a conversation).
        cache_bypass: cache::bypass_requested(&headers) || c.stateful.is_some(),
        stateful: c.stateful,
    };
    forward(&live, std::sync::Arc::new(fwd), record).await
}

pub async fn embeddings(admitted: Box<Admitted>, req: Box<Request>) -> Response {
    let Started {
        live,
        caller,
        mut record,
        headers,
        body,
        tokens,
    } = match start(admitted, FORMAT, Endpoint::Embeddings, req).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let parsed = match EmbeddingsRequest::parse(&body) {
        Ok(p) => p,
        Err(e) => return reject(record, FORMAT, e.into()),
    };
    // An embedding has no answer tokens.
    let len = body.len();
    if let Err(e) = accept(
        &mut record,
        &live,
        &caller,
        &tokens,
        &parsed.model,
        len,
        Some(0),
    )
    .await
    {
        return reject(record, FORMAT, e);
    }
    let fwd = Forward {
        endpoint: Endpoint::Embeddings,
        format: FORMAT,
        alias: parsed.model,
        body,
        model_span: parsed.model_span,
        stream: false,
        include_usage: false,
        ask_usage: AskUsage::No,
        ir: OnceLock::new(),
        tenant: caller.tenant,
        cache_bypass: cache::bypass_requested(&headers),
        stateful: None,
    };
    forward(&live, std::sync::Arc::new(fwd), record).await
}

/// The aliases the caller may call (its key's or tenant's `models`).
pub fn models(live: &crate::state::Live, caller: &Caller) -> Response {
    let mut resp = model_list(caller.access.callable(&live.config)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
