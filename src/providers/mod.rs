//! Provider adapters: how a request for one endpoint is sent to one provider
//! kind. Each adapter precomputes what it can (URLs, auth headers) when the
//! config is loaded, so the request path only copies.

pub mod openai;

use crate::config::{Provider, ProviderKind};
use crate::upstream::Upstream;

/// The gateway endpoints a provider can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Embeddings => "embeddings",
        }
    }
}

/// A configured provider, ready to send requests.
#[derive(Debug)]
pub enum Adapter {
    OpenAi(Box<openai::OpenAiAdapter>),
    /// A kind whose translation has not landed yet: every request to it is
    /// refused with a clear error instead of being mangled.
    Untranslated {
        upstream: Upstream,
        kind: ProviderKind,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("provider `{provider}`: {message}")]
    Build { provider: String, message: String },
}

impl Adapter {
    pub fn new(provider: &Provider) -> Result<Self, AdapterError> {
        let upstream = Upstream::new(provider).map_err(|e| AdapterError::Build {
            provider: provider.name.clone(),
            message: e.to_string(),
        })?;
        Ok(match provider.kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => {
                Self::OpenAi(Box::new(openai::OpenAiAdapter::new(provider, upstream)?))
            }
            kind @ (ProviderKind::Anthropic | ProviderKind::Gemini) => {
                Self::Untranslated { upstream, kind }
            }
        })
    }

    pub fn upstream(&self) -> &Upstream {
        match self {
            Self::OpenAi(a) => a.upstream(),
            Self::Untranslated { upstream, .. } => upstream,
        }
    }
}
