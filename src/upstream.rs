//! The HTTP client side: pooled keep-alive connections to providers (HTTP/2
//! where the provider offers it over TLS ALPN), rustls, and the time limits of
//! one attempt.
//!
//! Timeouts are layered so that nothing can hang and long streams still live:
//! connect (per provider, in the client), first byte (request sent → response
//! headers, and for streams → first body chunk), idle (gap between chunks) and
//! total (the whole attempt). Each ends in an [`UpstreamError::Timeout`] that
//! names which limit fired.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

use crate::config::{Provider, ProviderKind, Timeouts};
use crate::protocol::chat::Format;

/// A request ready to go to a provider.
#[derive(Debug)]
pub struct UpstreamRequest {
    pub url: url::Url,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Which time limit ended an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    Connect,
    FirstByte,
    Idle,
    Total,
}

impl TimeoutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::FirstByte => "first_byte",
            Self::Idle => "idle",
            Self::Total => "total",
        }
    }
}

/// What went wrong talking to a provider. Failover (and the client's error)
/// is decided on these variants, never on message strings.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to provider `{provider}`: {detail}")]
    Connect { provider: String, detail: String },
    #[error("{} timeout ({after:?}) exceeded waiting for provider `{provider}`", kind.as_str())]
    Timeout {
        provider: String,
        kind: TimeoutKind,
        after: Duration,
    },
    #[error("connection to provider `{provider}` failed: {detail}")]
    Transport { provider: String, detail: String },
    /// The request cannot be expressed in this provider's format.
    #[error("provider `{provider}`: {message}")]
    Untranslatable { provider: String, message: String },
    #[error("provider `{provider}` sent an error event before any content: {message}")]
    ErrorEvent { provider: String, message: String },
    #[error("provider `{provider}` answered {status}")]
    Status {
        provider: String,
        /// The wire format of the body.
        format: Format,
        status: StatusCode,
        retry_after: Option<http::HeaderValue>,
        content_type: Option<http::HeaderValue>,
        body: Bytes,
    },
}

impl UpstreamError {
    /// Whether another target may be tried (used by failover).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Transport { .. }
            | Self::ErrorEvent { .. } => true,
            // Another target of the route may speak the client's format.
            Self::Untranslatable { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error()
                    || matches!(status.as_u16(), 401 | 402 | 403 | 408 | 429 | 529)
            }
        }
    }
}

/// Largest error body read from a provider.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A pooled client for one provider.
#[derive(Debug, Clone)]
pub struct Upstream {
    provider: String,
    format: Format,
    connect_timeout: Duration,
    client: reqwest::Client,
}

/// A provider's answer with a 2xx status, body not yet read.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: reqwest::Body,
}

impl Upstream {
    pub fn new(provider: &Provider) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(provider.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            // Upstream names go through detour's caching, stale-serving resolver.
            .dns_resolver(crate::dns::shared())
            .user_agent(concat!("detour/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            provider: provider.name.clone(),
            format: match provider.kind {
                ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => Format::OpenAi,
                ProviderKind::Anthropic => Format::Anthropic,
                ProviderKind::Gemini => Format::Gemini,
            },
            connect_timeout: provider.connect_timeout,
            client,
        })
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The wire format this provider speaks.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Sends the request and waits for a 2xx answer's headers, within the
    /// first-byte and total limits that start at `started`. Non-2xx answers
    /// are read (bounded) and returned as [`UpstreamError::Status`].
    pub async fn send(
        &self,
        req: UpstreamRequest,
        timeouts: &Timeouts,
        started: Instant,
    ) -> Result<Answer, UpstreamError> {
        let (limit, kind) = first_deadline(started, timeouts);
        let pending = self
            .client
            .post(req.url)
            .headers(req.headers)
            .body(req.body)
            .send();
        let resp = match tokio::time::timeout_at(limit, pending).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(self.classify(&e)),
            Err(_) => return Err(self.timeout(kind, timeouts)),
        };
        let status = resp.status();
        if status.is_success() {
            let resp: http::Response<reqwest::Body> = resp.into();
            let (parts, body) = resp.into_parts();
            return Ok(Answer {
                status,
                headers: parts.headers,
                body,
            });
        }
        let header = resp.headers().get(http::header::RETRY_AFTER).cloned();
        let content_type = resp.headers().get(http::header::CONTENT_TYPE).cloned();
        let body = self.read_error_body(resp, timeouts, started).await;
        // Gemini says how long to wait only in its body (`RetryInfo`).
        let retry_after = header.or_else(|| {
            let wait = crate::protocol::translate::parse_error(self.format, &body)?.retry_after?;
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Some(http::HeaderValue::from(secs))
        });
        Err(UpstreamError::Status {
            provider: self.provider.clone(),
            format: self.format,
            status,
            retry_after,
            content_type,
            body,
        })
    }

    async fn read_error_body(
        &self,
        mut resp: reqwest::Response,
        timeouts: &Timeouts,
        started: Instant,
    ) -> Bytes {
        let total = started + timeouts.total;
        let mut body = Vec::new();
        loop {
            let next = Instant::now() + timeouts.idle;
            match tokio::time::timeout_at(next.min(total), resp.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    let room = MAX_ERROR_BODY.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if room <= chunk.len() {
                        break;
                    }
                }
                // An error body that breaks off is still worth what it has.
                _ => break,
            }
        }
        Bytes::from(body)
    }

    pub fn timeout(&self, kind: TimeoutKind, timeouts: &Timeouts) -> UpstreamError {
        let after = match kind {
            TimeoutKind::Connect => self.connect_timeout,
            TimeoutKind::FirstByte => timeouts.first_byte,
            TimeoutKind::Idle => timeouts.idle,
            TimeoutKind::Total => timeouts.total,
        };
        UpstreamError::Timeout {
            provider: self.provider.clone(),
            kind,
            after,
        }
    }

    /// The typed error for a failed send. Its detail (for the log only; see
    /// `error::GatewayError::Upstream`) has the URL's secrets masked.
    pub fn classify(&self, e: &reqwest::Error) -> UpstreamError {
        let provider = self.provider.clone();
        let mut detail = error_chain(e);
        if let Some(url) = e.url() {
            detail = detail.replace(url.as_str(), &crate::config::masked_url(url));
        }
        if e.is_connect() {
            if e.is_timeout() {
                return UpstreamError::Timeout {
                    provider,
                    kind: TimeoutKind::Connect,
                    after: self.connect_timeout,
                };
            }
            return UpstreamError::Connect { provider, detail };
        }
        UpstreamError::Transport { provider, detail }
    }

    pub fn transport(&self, detail: String) -> UpstreamError {
        UpstreamError::Transport {
            provider: self.provider.clone(),
            detail,
        }
    }
}

/// The earlier of the first-byte and total deadlines, and which one it is.
pub fn first_deadline(started: Instant, t: &Timeouts) -> (Instant, TimeoutKind) {
    if t.first_byte <= t.total {
        (started + t.first_byte, TimeoutKind::FirstByte)
    } else {
        (started + t.total, TimeoutKind::Total)
    }
}

/// An error and its sources on one line: reqwest's own message is vague.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
