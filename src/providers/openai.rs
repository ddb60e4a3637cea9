//! Providers of kind `openai` and `openai-compatible`: the OpenAI wire format
//! upstream. For OpenAI-format clients this is the passthrough fast path: the
//! body is forwarded with only `model` rewritten. Responses API requests are
//! passed through the same way to kind `openai` (its `/responses`), and
//! translated to Chat Completions for `openai-compatible` servers.

use std::borrow::Cow;

use bytes::Bytes;
use http::Uri;
use http::{header, HeaderMap};

use super::{join, json_headers, secret_header, AdapterError, Endpoint, Outgoing};
use crate::config::{Provider, ProviderKind};
use crate::protocol::chat::Format;
use crate::protocol::translate::{openai, TranslateError};
use crate::upstream::{Upstream, UpstreamRequest};

#[derive(Debug)]
pub struct OpenAiAdapter {
    pub(super) upstream: Upstream,
    chat_uri: Uri,
    embeddings_uri: Uri,
    responses_uri: Uri,
    /// Kind `openai`: the Responses API is passed through (with the state
    /// OpenAI keeps). `openai-compatible` servers get Chat Completions.
    serves_responses: bool,
    headers: HeaderMap,
    options: openai::RequestOptions,
}

impl OpenAiAdapter {
    pub fn new(provider: &Provider, upstream: Upstream) -> Result<Self, AdapterError> {
        let mut headers = json_headers();
        if let Some(key) = &provider.api_key {
            let v = secret_header(provider, &format!("Bearer {}", key.expose()))?;
            headers.insert(header::AUTHORIZATION, v);
        }
        Ok(Self {
            chat_uri: join(provider, "chat/completions")?,
            embeddings_uri: join(provider, "embeddings")?,
            responses_uri: join(provider, "responses")?,
            serves_responses: provider.kind == ProviderKind::OpenAi,
            upstream,
            headers,
            options: openai::RequestOptions {
                legacy_max_tokens: false,
                // Local servers take `top_k`; api.openai.com refuses it.
                top_k: provider.kind == ProviderKind::OpenAiCompatible,
            },
        })
    }

    /// A Chat Completions body from the request's IR.
    fn translated(&self, out: &Outgoing<'_>, model: &str) -> Result<Bytes, TranslateError> {
        let mut ir = (out.ir)()?.clone();
        // The client is told about usage in its own format; ask for it.
        ir.include_usage = ir.stream;
        openai::encode_request(&ir, model, &self.options)
    }

    /// Whether this provider serves the Responses API itself (kind
    /// `openai`), and keeps its state.
    pub fn serves_responses(&self) -> bool {
        self.serves_responses
    }

    pub fn request(
        &self,
        out: &Outgoing<'_>,
        model: &str,
    ) -> Result<UpstreamRequest<'_>, TranslateError> {
        let (uri, body) = match (out.endpoint, out.format) {
            (Endpoint::Embeddings, _) => (&self.embeddings_uri, out.spliced(model)),
            // Only `model` changes; a Responses stream always ends with its
            // usage.
            (Endpoint::Responses, _) if self.serves_responses => {
                (&self.responses_uri, out.spliced(model))
            }
            (Endpoint::Responses, _) => (&self.chat_uri, self.translated(out, model)?),
            // Usage is asked for even when the client did not (the relay
            // strips it): rate limits are settled from real counts.
            (_, Format::OpenAi) => (&self.chat_uri, out.spliced_asking_usage(model)),
            _ => (&self.chat_uri, self.translated(out, model)?),
        };
        Ok(UpstreamRequest {
            uri: Cow::Borrowed(uri),
            headers: &self.headers,
            body,
        })
    }
}
