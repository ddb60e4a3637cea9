//! Providers of kind `openai` and `openai-compatible`: the OpenAI wire format
//! upstream. For OpenAI-format clients this is the passthrough fast path: the
//! body is forwarded with only `model` rewritten.

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
            upstream,
            headers,
            options: openai::RequestOptions {
                legacy_max_tokens: false,
                // Local servers take `top_k`; api.openai.com refuses it.
                top_k: provider.kind == ProviderKind::OpenAiCompatible,
            },
        })
    }

    pub fn request(
        &self,
        out: &Outgoing<'_>,
        model: &str,
    ) -> Result<UpstreamRequest, TranslateError> {
        let (uri, body) = match (out.endpoint, out.format) {
            (Endpoint::Embeddings, _) => (self.embeddings_uri.clone(), out.spliced(model)),
            // Usage is asked for even when the client did not (the relay
            // strips it): rate limits are settled from real counts.
            (_, Format::OpenAi) => (self.chat_uri.clone(), out.spliced_asking_usage(model)),
            _ => {
                let mut ir = (out.ir)()?.clone();
                // The client is told about usage in its own format; ask for it.
                ir.include_usage = ir.stream;
                (
                    self.chat_uri.clone(),
                    openai::encode_request(&ir, model, &self.options)?,
                )
            }
        };
        Ok(UpstreamRequest {
            uri,
            headers: self.headers.clone(),
            body,
        })
    }
}
