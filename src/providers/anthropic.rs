//! Providers of kind `anthropic`: the Messages API (`x-api-key`,
//! `anthropic-version`). Anthropic-format clients pass through.

use std::borrow::Cow;

use http::{HeaderMap, HeaderValue};

use super::{join, json_headers, secret_header, AdapterError, Endpoint, Outgoing};
use crate::config::Provider;
use crate::protocol::chat::Format;
use crate::protocol::translate::{anthropic, TranslateError};
use crate::upstream::{Upstream, UpstreamRequest};

/// The API version detour speaks to Anthropic.
pub const VERSION: &str = "2023-06-01";

#[derive(Debug)]
pub struct AnthropicAdapter {
    pub(super) upstream: Upstream,
    uri: http::Uri,
    /// `POST /v1/messages/count_tokens`.
    count_tokens_uri: http::Uri,
    headers: HeaderMap,
    default_max_tokens: u64,
}

impl AnthropicAdapter {
    pub fn new(provider: &Provider, upstream: Upstream) -> Result<Self, AdapterError> {
        let mut headers = json_headers();
        headers.insert("anthropic-version", HeaderValue::from_static(VERSION));
        if let Some(key) = &provider.api_key {
            headers.insert("x-api-key", secret_header(provider, key.expose())?);
        }
        Ok(Self {
            uri: join(provider, "messages")?,
            count_tokens_uri: join(provider, "messages/count_tokens")?,
            upstream,
            headers,
            default_max_tokens: provider.default_max_tokens,
        })
    }

    /// A `count_tokens` request: the client's body, `model` already the
    /// target's.
    pub fn count_tokens(&self, body: bytes::Bytes) -> UpstreamRequest<'_> {
        UpstreamRequest {
            uri: Cow::Borrowed(&self.count_tokens_uri),
            headers: &self.headers,
            body,
        }
    }

    pub fn request(
        &self,
        out: &Outgoing<'_>,
        model: &str,
    ) -> Result<UpstreamRequest<'_>, TranslateError> {
        let body = match (out.endpoint, out.format) {
            (Endpoint::Embeddings, _) => {
                return Err(TranslateError::Untranslatable {
                    feature: "embeddings".to_owned(),
                    target: Format::Anthropic,
                })
            }
            (_, Format::Anthropic) => out.spliced(model),
            _ => anthropic::encode_request((out.ir)()?, model, self.default_max_tokens)?,
        };
        Ok(UpstreamRequest {
            uri: Cow::Borrowed(&self.uri),
            headers: &self.headers,
            body,
        })
    }
}
