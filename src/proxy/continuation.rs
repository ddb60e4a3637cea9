//! Continuing a stream that broke after text reached the client
//! (`continue_streams = true` on the route): the request goes to the
//! route's next target with the text already sent as the beginning of the
//! answer, and its stream is spliced into the client's by the relay
//! ([`crate::relay::RelayBody::continue_with`]).
//!
//! How each provider kind is given the text sent so far:
//! - Anthropic: a final `assistant` message holding it (a prefill, which
//!   the model continues); trailing whitespace trimmed, as Anthropic
//!   refuses a final assistant message that ends with it;
//! - Gemini: a final `model` turn holding it;
//! - OpenAI-format providers (no prefill in the Chat Completions API): an
//!   `assistant` message holding it, then a `user` message asking to go on
//!   from exactly where it stopped, without repeating it
//!   ([`CONTINUE_PROMPT`]).
//!
//! The next target is the first one of the request's plan that is not the
//! one that broke; there is one continuation at most per request, and none
//! when the plan has no other target.

use std::sync::Arc;

use tokio::time::Instant;

use crate::protocol::chat::{ChatRequest, Format, Message, Part, Role};
use crate::protocol::translate::StreamDecoder;
use crate::providers::Outgoing;
use crate::relay::{Continuation, ContinueFailed, Resumed};
use crate::state::Live;
use crate::upstream::{Unexpected, UpstreamError};

use super::Forward;

/// What an OpenAI-format provider is asked after the partial answer.
pub const CONTINUE_PROMPT: &str = "Your previous answer was cut off. Continue it exactly where it stopped, without repeating any of it and without any preamble.";

/// Whether `req` is a stream a route with `continue_streams` may continue:
/// chat completions or messages, from an OpenAI or Anthropic client.
pub fn applies(req: &Forward) -> bool {
    use crate::error::ClientFormat;
    use crate::providers::Endpoint;
    req.stream
        && matches!(req.format, ClientFormat::OpenAi | ClientFormat::Anthropic)
        && matches!(req.endpoint, Endpoint::ChatCompletions | Endpoint::Messages)
}

/// The continuation for a stream from target `failed` of route `position`:
/// the plan's (`order`) first other target; none if there is none.
pub fn next_target(
    live: &Arc<Live>,
    position: usize,
    req: &Arc<Forward>,
    order: &Arc<[usize]>,
    failed: usize,
) -> Option<Continuation> {
    let next = order.iter().copied().find(|&i| i != failed)?;
    let (live, req) = (Arc::clone(live), Arc::clone(req));
    Some(Box::new(move |text: String| {
        Box::pin(async move { resume(&live, position, next, &req, &text).await })
    }))
}

/// Sends the continuation request to target `index`; its answer's headers
/// must say it is an event stream.
async fn resume(
    live: &Live,
    position: usize,
    index: usize,
    req: &Forward,
    text: &str,
) -> Result<Resumed, ContinueFailed> {
    let route = &live.config.routes[position];
    let target = &route.targets[index];
    let adapter = &live.adapters[target.provider_index];
    let provider = target.provider.name.clone();
    let failed = |error| ContinueFailed {
        provider: provider.clone(),
        error,
    };
    let untranslatable = |message: String| UpstreamError::Untranslatable {
        provider: provider.clone(),
        message,
    };
    let ir = req
        .ir()
        .map_err(|e| failed(untranslatable(e.to_string())))?;
    let prefixed = with_prefix(ir, adapter.format(), text);
    let upstream_req = {
        let ir = || Ok(&prefixed);
        let out = Outgoing {
            endpoint: req.endpoint,
            // Never the client's bytes (they lack the prefix): the IR is
            // always encoded for the provider.
            format: other_than(adapter.format()),
            body: &req.body,
            model_span: req.model_span.clone(),
            stream: true,
            ask_usage: &req.ask_usage,
            ir: &ir,
        };
        adapter.request(&out, &target.model).map_err(failed)?
    };
    let started = Instant::now();
    let answer = adapter
        .upstream()
        .send(upstream_req, &route.timeouts, started)
        .await
        .map_err(|e| failed(e.for_target(&target.model, route.breaker.max_cool_down)))?;
    let unexpected = |what| {
        failed(UpstreamError::UnexpectedAnswer {
            provider: provider.clone(),
            what,
        })
    };
    if !super::is_event_stream(&answer.headers).map_err(unexpected)? {
        return Err(unexpected(Unexpected::NotJson));
    }
    if let Some(encoding) = super::content_encoding(&answer.headers) {
        return Err(unexpected(Unexpected::Encoding(encoding)));
    }
    Ok(Resumed {
        body: answer.body,
        decoder: Box::new(StreamDecoder::new(adapter.format())),
        provider,
        started,
    })
}

/// `ir` with the text sent so far as the answer's beginning, in the way a
/// provider of `format` continues it (see the module doc).
fn with_prefix(ir: &ChatRequest, format: Format, text: &str) -> ChatRequest {
    let mut prefixed = ir.clone();
    prefixed.stream = true;
    match format {
        Format::Anthropic | Format::Gemini => {
            let text = text.trim_end();
            prefixed.messages.push(Message::new(
                Role::Assistant,
                vec![Part::Text(text.to_owned())],
            ));
        }
        Format::OpenAi => {
            prefixed.messages.push(Message::new(
                Role::Assistant,
                vec![Part::Text(text.to_owned())],
            ));
            prefixed.messages.push(Message::new(
                Role::User,
                vec![Part::Text(CONTINUE_PROMPT.to_owned())],
            ));
        }
    }
    prefixed
}

/// A format that is not `format`: the adapter then encodes the IR.
fn other_than(format: Format) -> Format {
    match format {
        Format::OpenAi => Format::Anthropic,
        Format::Anthropic | Format::Gemini => Format::OpenAi,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ChatRequest {
        crate::protocol::translate::openai::parse_request(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn anthropic_and_gemini_get_a_prefill_without_trailing_whitespace() {
        for format in [Format::Anthropic, Format::Gemini] {
            let p = with_prefix(&request(), format, "Hello wor ");
            assert_eq!(p.messages.len(), 2);
            let last = &p.messages[1];
            assert_eq!(last.role, Role::Assistant);
            assert_eq!(last.content, vec![Part::Text("Hello wor".to_owned())]);
        }
    }

    #[test]
    fn openai_gets_the_partial_answer_and_a_request_to_continue() {
        let p = with_prefix(&request(), Format::OpenAi, "Hello wor");
        assert_eq!(p.messages.len(), 3);
        assert_eq!(p.messages[1].role, Role::Assistant);
        assert_eq!(
            p.messages[1].content,
            vec![Part::Text("Hello wor".to_owned())]
        );
        assert_eq!(p.messages[2].role, Role::User);
    }
}
