//! Providers of kind `gemini`: `generateContent`, and
//! `streamGenerateContent?alt=sse` for streams; the key in `x-goog-api-key`.
//! The model is part of the URL, so URLs are built per request.

use http::HeaderMap;

use super::{json_headers, secret_header, AdapterError, Endpoint, Outgoing};
use crate::config::Provider;
use crate::protocol::chat::Format;
use crate::protocol::translate::{gemini, TranslateError};
use crate::upstream::{Upstream, UpstreamRequest};

#[derive(Debug)]
pub struct GeminiAdapter {
    pub(super) upstream: Upstream,
    /// `base_url` without a trailing slash.
    base: String,
    headers: HeaderMap,
}

impl GeminiAdapter {
    pub fn new(provider: &Provider, upstream: Upstream) -> Result<Self, AdapterError> {
        let mut headers = json_headers();
        if let Some(key) = &provider.api_key {
            headers.insert("x-goog-api-key", secret_header(provider, key.expose())?);
        }
        Ok(Self {
            base: provider.base_url.as_str().trim_end_matches('/').to_owned(),
            upstream,
            headers,
        })
    }

    pub fn request(
        &self,
        out: &Outgoing<'_>,
        model: &str,
    ) -> Result<UpstreamRequest, TranslateError> {
        if out.endpoint == Endpoint::Embeddings {
            return Err(TranslateError::Untranslatable {
                feature: "embeddings".to_owned(),
                target: Format::Gemini,
            });
        }
        let body = gemini::encode_request((out.ir)()?)?;
        let method = if out.stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        let url = format!("{}/models/{}:{method}", self.base, model);
        let url = url::Url::parse(&url).map_err(|e| TranslateError::Untranslatable {
            feature: format!("model name `{model}` in a URL ({e})"),
            target: Format::Gemini,
        })?;
        Ok(UpstreamRequest {
            url,
            headers: self.headers.clone(),
            body,
        })
    }
}
