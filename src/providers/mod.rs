//! Provider adapters: how a request is sent to one provider kind.
//!
//! Each adapter precomputes what it can (URLs, auth headers) when the config
//! is loaded. A request in the provider's own format is passed through with
//! only `model` spliced in (the fast path); any other goes through the IR
//! (`protocol::translate`). What a provider cannot express ends the attempt
//! with [`UpstreamError::Untranslatable`] naming the feature and the target.

pub mod anthropic;
pub mod gemini;
pub mod openai;

use std::ops::Range;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use crate::config::{Provider, ProviderKind};
pub use crate::protocol::chat::Endpoint;
use crate::protocol::chat::{ChatRequest, ClientFormat, Format};
use crate::protocol::openai::{rewrite_model, rewrite_model_asking_usage, AskUsage};
use crate::protocol::translate::TranslateError;
use crate::upstream::{Upstream, UpstreamError, UpstreamRequest};

/// A client's request as a provider adapter needs it.
pub struct Outgoing<'a> {
    pub endpoint: Endpoint,
    /// The format the body is in.
    pub format: Format,
    pub body: &'a Bytes,
    /// Where `model` is in `body`.
    pub model_span: Range<usize>,
    pub stream: bool,
    /// How the passthrough body asks for stream usage (OpenAI clients).
    pub ask_usage: &'a AskUsage,
    /// The request in the IR, parsed on first use.
    pub ir: &'a dyn Fn() -> Result<&'a ChatRequest, TranslateError>,
}

impl Outgoing<'_> {
    /// The same body for `model` (the passthrough fast path).
    fn spliced(&self, model: &str) -> Bytes {
        rewrite_model(self.body, self.model_span.clone(), model)
    }

    /// The same body for `model`, a stream asking for usage.
    fn spliced_asking_usage(&self, model: &str) -> Bytes {
        rewrite_model_asking_usage(self.body, self.model_span.clone(), model, self.ask_usage)
    }
}

/// A configured provider, ready to send requests.
#[derive(Debug)]
pub enum Adapter {
    OpenAi(Box<openai::OpenAiAdapter>),
    Anthropic(Box<anthropic::AnthropicAdapter>),
    Gemini(Box<gemini::GeminiAdapter>),
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("provider `{provider}`: {message}")]
    Build { provider: String, message: String },
}

impl Adapter {
    pub fn new(provider: &Provider) -> Result<Self, AdapterError> {
        let upstream = Upstream::new(provider).map_err(|e| build_error(provider, e.to_string()))?;
        Ok(match provider.kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => {
                Self::OpenAi(Box::new(openai::OpenAiAdapter::new(provider, upstream)?))
            }
            ProviderKind::Anthropic => Self::Anthropic(Box::new(anthropic::AnthropicAdapter::new(
                provider, upstream,
            )?)),
            ProviderKind::Gemini => {
                Self::Gemini(Box::new(gemini::GeminiAdapter::new(provider, upstream)?))
            }
        })
    }

    pub fn upstream(&self) -> &Upstream {
        match self {
            Self::OpenAi(a) => &a.upstream,
            Self::Anthropic(a) => &a.upstream,
            Self::Gemini(a) => &a.upstream,
        }
    }

    /// The wire format this provider speaks.
    pub fn format(&self) -> Format {
        self.upstream().format()
    }

    /// Whether this provider answers `endpoint` in the client's own format
    /// (the request and answer pass through): its wire format is the
    /// client's, or, for the Responses API, it serves that API itself.
    pub fn passes_through(&self, client: ClientFormat, endpoint: Endpoint) -> bool {
        match (self, endpoint) {
            (Self::OpenAi(a), Endpoint::Responses) => a.serves_responses(),
            (_, Endpoint::Responses) => false,
            _ => self.format() == client.wire(),
        }
    }

    /// Whether this provider keeps the Responses API's server-side state
    /// (`previous_response_id`, `store`, background responses): kind
    /// `openai` only.
    pub fn keeps_responses_state(&self) -> bool {
        matches!(self, Self::OpenAi(a) if a.serves_responses())
    }

    /// The upstream request for `out`, with `model` as the upstream model.
    // The error is rare (an untranslatable request); not worth a box.
    #[allow(clippy::result_large_err)]
    pub fn request(
        &self,
        out: &Outgoing<'_>,
        model: &str,
    ) -> Result<UpstreamRequest<'_>, UpstreamError> {
        let untranslatable = |e: TranslateError| UpstreamError::Untranslatable {
            provider: self.upstream().provider().to_owned(),
            message: e.to_string(),
        };
        match self {
            Self::OpenAi(a) => a.request(out, model),
            Self::Anthropic(a) => a.request(out, model),
            Self::Gemini(a) => a.request(out, model),
        }
        .map_err(untranslatable)
    }
}

fn build_error(provider: &Provider, message: String) -> AdapterError {
    AdapterError::Build {
        provider: provider.name.clone(),
        message,
    }
}

/// A header value holding a secret (never shown in debug output).
fn secret_header(provider: &Provider, value: &str) -> Result<HeaderValue, AdapterError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        build_error(
            provider,
            "api_key contains characters not allowed in a header".into(),
        )
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// `base_url` with `path` appended, as the URI requests are sent to (made
/// once per provider: cloning it per request costs reference counts).
fn join(provider: &Provider, path: &str) -> Result<http::Uri, AdapterError> {
    join_path(&provider.base_url, path.split('/'))
        .and_then(|url| to_uri(&url))
        .ok_or_else(|| build_error(provider, "base_url cannot take a path".into()))
}

/// A URL as an `http::Uri`; `None` if `http` reads it otherwise.
pub(crate) fn to_uri(url: &url::Url) -> Option<http::Uri> {
    http::Uri::try_from(url.as_str()).ok()
}

/// `base` with `segments` appended to its path (each percent-encoded as one
/// segment), its query kept: `https://h/v1?api-version=1` + `chat/completions`
/// is `https://h/v1/chat/completions?api-version=1`. Trailing slashes of the
/// base do not double. `None` for a URL that cannot have a path (config
/// admits only http and https URLs with a host, which all can).
pub(crate) fn join_path<'a>(
    base: &url::Url,
    segments: impl IntoIterator<Item = &'a str>,
) -> Option<url::Url> {
    let mut url = base.clone();
    url.set_fragment(None);
    let trimmed = url.path().trim_end_matches('/').to_owned();
    url.set_path(&trimmed);
    url.path_segments_mut()
        .ok()?
        .pop_if_empty()
        .extend(segments);
    Some(url)
}

/// The headers of every request to a provider: a JSON body, detour's name,
/// and no content encoding asked for (bodies are relayed and read as they
/// are; what a provider sends anyway is checked by `proxy::attempt`).
fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static(concat!("detour/", env!("CARGO_PKG_VERSION"))),
    );
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_before_the_query() {
        let cases = [
            ("https://h/v1", "https://h/v1/chat/completions"),
            ("https://h/v1/", "https://h/v1/chat/completions"),
            ("https://h/v1//", "https://h/v1/chat/completions"),
            ("https://h", "https://h/chat/completions"),
            ("https://h/", "https://h/chat/completions"),
            (
                "https://h/openai/deployments/d?api-version=2024-06-01",
                "https://h/openai/deployments/d/chat/completions?api-version=2024-06-01",
            ),
            (
                "https://h/v1/?a=1&b=%2F",
                "https://h/v1/chat/completions?a=1&b=%2F",
            ),
        ];
        for (base, joined) in cases {
            let base = url::Url::parse(base).unwrap();
            let url = join_path(&base, "chat/completions".split('/')).unwrap();
            assert_eq!(url.as_str(), joined);
        }
    }
}
