//! Providers of kind `gemini`: `generateContent`, and
//! `streamGenerateContent?alt=sse` for streams (merged into `base_url`'s own
//! query); the key in `x-goog-api-key`. The model is part of the URL, so URLs
//! are built per request.

use std::borrow::Cow;

use http::HeaderMap;
use url::Url;

use super::{join_path, json_headers, secret_header, to_uri, AdapterError, Endpoint, Outgoing};
use crate::config::Provider;
use crate::protocol::chat::Format;
use crate::protocol::translate::{gemini, TranslateError};
use crate::upstream::{Upstream, UpstreamRequest};

#[derive(Debug)]
pub struct GeminiAdapter {
    pub(super) upstream: Upstream,
    /// `base_url`, its query kept on every request.
    base: Url,
    headers: HeaderMap,
}

impl GeminiAdapter {
    pub fn new(provider: &Provider, upstream: Upstream) -> Result<Self, AdapterError> {
        let mut headers = json_headers();
        if let Some(key) = &provider.api_key {
            headers.insert("x-goog-api-key", secret_header(provider, key.expose())?);
        }
        Ok(Self {
            base: provider.base_url.clone(),
            upstream,
            headers,
        })
    }

    pub fn request(
        &self,
        out: &Outgoing<'_>,
        model: &str,
    ) -> Result<UpstreamRequest<'_>, TranslateError> {
        if out.endpoint == Endpoint::Embeddings {
            return Err(TranslateError::Untranslatable {
                feature: "embeddings".to_owned(),
                target: Format::Gemini,
            });
        }
        let body = gemini::encode_request((out.ir)()?)?;
        let method = if out.stream {
            "streamGenerateContent"
        } else {
            "generateContent"
        };
        // The model is one path segment (percent-encoded); `alt=sse` joins
        // whatever query `base_url` has.
        let mut url =
            join_path(&self.base, ["models", &format!("{model}:{method}")]).ok_or_else(|| {
                TranslateError::Untranslatable {
                    feature: format!("model name `{model}` in a URL"),
                    target: Format::Gemini,
                }
            })?;
        if out.stream {
            url.query_pairs_mut().append_pair("alt", "sse");
        }
        let uri = to_uri(&url).ok_or_else(|| TranslateError::Untranslatable {
            feature: format!("model name `{model}` in a URL"),
            target: Format::Gemini,
        })?;
        Ok(UpstreamRequest {
            uri: Cow::Owned(uri),
            headers: &self.headers,
            body,
        })
    }
}
