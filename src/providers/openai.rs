//! Providers of kind `openai` and `openai-compatible`: the OpenAI wire format
//! upstream. For OpenAI-format clients this is the passthrough fast path: the
//! body is forwarded with only `model` rewritten.

use std::ops::Range;

use http::{header, HeaderMap, HeaderValue};
use url::Url;

use super::{AdapterError, Endpoint};
use crate::config::Provider;
use crate::protocol::openai::rewrite_model;
use crate::upstream::{Upstream, UpstreamRequest};

#[derive(Debug)]
pub struct OpenAiAdapter {
    upstream: Upstream,
    chat_url: Url,
    embeddings_url: Url,
    headers: HeaderMap,
}

impl OpenAiAdapter {
    pub fn new(provider: &Provider, upstream: Upstream) -> Result<Self, AdapterError> {
        let err = |message: String| AdapterError::Build {
            provider: provider.name.clone(),
            message,
        };
        let join = |path: &str| {
            let base = provider.base_url.as_str().trim_end_matches('/');
            Url::parse(&format!("{base}/{path}")).map_err(|e| err(e.to_string()))
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(key) = &provider.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                .map_err(|_| err("api_key contains characters not allowed in a header".into()))?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        Ok(Self {
            chat_url: join("chat/completions")?,
            embeddings_url: join("embeddings")?,
            upstream,
            headers,
        })
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The upstream request for an OpenAI-format body: same bytes, upstream model.
    pub fn request(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        model_span: Range<usize>,
        model: &str,
    ) -> UpstreamRequest {
        let url = match endpoint {
            Endpoint::ChatCompletions => self.chat_url.clone(),
            Endpoint::Embeddings => self.embeddings_url.clone(),
        };
        UpstreamRequest {
            url,
            headers: self.headers.clone(),
            body: rewrite_model(body, model_span, model),
        }
    }
}
