//! The Anthropic Messages API: `POST /v1/messages`, streamed and not, served
//! by any provider kind. `anthropic-version` is accepted (any value);
//! errors are written in Anthropic's shape.

use std::sync::OnceLock;

use axum::extract::Request;
use axum::response::Response;

use super::{accept, rate_limited, start, Admitted, Started};
use crate::cache;
use crate::error::{ClientFormat, GatewayError};
use crate::protocol::openai::{model_span, AskUsage};
use crate::protocol::translate::{anthropic, TranslateError};
use crate::providers::Endpoint;
use crate::proxy::{forward, reject, Forward};

const FORMAT: ClientFormat = ClientFormat::Anthropic;

pub async fn messages(admitted: Box<Admitted>, req: Box<Request>) -> Response {
    let Started {
        live,
        caller,
        mut record,
        headers,
        body,
        tokens,
    } = match start(admitted, FORMAT, Endpoint::Messages, req).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    // The full parse checks the request the way Anthropic would, and is kept
    // for targets of another format.
    let ir = match anthropic::parse_request(&body) {
        Ok(ir) => ir,
        Err(TranslateError::Invalid(e)) => return reject(record, FORMAT, e.into()),
        Err(e) => return reject(record, FORMAT, GatewayError::Untranslatable(e.to_string())),
    };
    // Where `model` is, for the passthrough to Anthropic providers.
    let span = match model_span(&body) {
        Ok((_, span)) => span,
        Err(e) => return reject(record, FORMAT, e.into()),
    };
    let (len, max) = (body.len(), ir.max_tokens);
    if let Err(e) = accept(&mut record, &live, &caller, &tokens, &ir.model, len, max).await {
        return reject(record, FORMAT, e);
    }
    if ir.stream {
        match live.limits.stream_permit(&caller).await {
            Ok(permit) => record.set_hold(permit),
            Err(e) => return reject(record, FORMAT, rate_limited(e)),
        }
    }
    let fwd = Forward {
        endpoint: Endpoint::Messages,
        format: FORMAT,
        alias: ir.model.clone(),
        body,
        model_span: span,
        stream: ir.stream,
        include_usage: false,
        ask_usage: AskUsage::No,
        ir: OnceLock::from(Ok(ir)),
        tenant: caller.tenant,
        cache_bypass: cache::bypass_requested(&headers),
        stateful: None,
    };
    forward(&live, std::sync::Arc::new(fwd), record).await
}
