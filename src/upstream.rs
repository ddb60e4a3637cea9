//! The HTTP client side: pooled keep-alive connections to providers (HTTP/2
//! where the provider offers it over TLS ALPN), rustls, and the time limits of
//! one attempt.
//!
//! Each provider's client is built once per config: its TLS config
//! (`upstream::tls`: the shared default, or the provider's own with
//! `ca_file`, `client_cert` / `client_key` or `tls_verify = false`) and its
//! egress (`upstream::egress`: direct, or through the HTTP proxy its
//! `proxy` or the environment names for its base URL). Nothing about TLS or
//! proxies is decided per request. A provider reached directly over plain
//! `http://` (a local server) is served by detour's own HTTP/1.1 pool
//! (`upstream::h1`), whose connections are driven by the request's own task,
//! so that a stream's events that arrived together are relayed together.
//!
//! Timeouts are layered so that nothing can hang and long streams still live:
//! connect (per provider, in the client), first byte (request sent → response
//! headers, and for streams → first body chunk), idle (gap between chunks) and
//! total (the whole attempt). Each ends in an [`UpstreamError::Timeout`] that
//! names which limit fired.
//!
//! Providers are asked for `accept-encoding: identity`; what they send anyway
//! is checked by the caller (`proxy::attempt`). A `retry-after` is parsed here,
//! with checked arithmetic: any text a provider sends is a hint, never a panic.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::config::{Provider, ProviderKind, Timeouts};
use crate::protocol::chat::Format;

mod egress;
mod h1;
mod tls;

/// A request ready to go to a provider. The URI and headers are the
/// adapter's, made once per provider (a Gemini URI names the model, so it is
/// made per request): borrowed, the plain pool writes them without a copy.
#[derive(Debug)]
pub struct UpstreamRequest<'a> {
    pub uri: std::borrow::Cow<'a, http::Uri>,
    pub headers: &'a HeaderMap,
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
        /// How long the provider asked to wait (`retry-after`, or Gemini's
        /// `RetryInfo`), capped by the route's `max_cool_down` once the
        /// attempt knows its route ([`UpstreamError::for_target`]).
        retry_after: Option<Duration>,
        content_type: Option<http::HeaderValue>,
        body: Bytes,
    },
    /// The provider does not have the target's model (a 404 that names the
    /// model, not the caller's request): the target is misconfigured.
    #[error("provider `{provider}` does not serve the model `{model}` (a misconfigured target)")]
    ModelNotFound { provider: String, model: String },
    /// A stream event grew past `server.max_event_bytes` without ending.
    #[error("provider `{provider}` sent a stream event larger than {limit} bytes (server.max_event_bytes)")]
    EventTooLarge { provider: String, limit: usize },
    /// A 2xx answer that is not what the endpoint returns.
    #[error("provider `{provider}` answered 2xx with {what}")]
    UnexpectedAnswer { provider: String, what: Unexpected },
    /// A non-streamed answer larger than detour reads whole to translate.
    #[error("the answer of provider `{provider}` is larger than {limit} bytes, the most detour translates")]
    AnswerTooLarge { provider: String, limit: usize },
    /// The provider answered, and detour could not translate the answer for
    /// the client: detour's failure, not the provider's.
    #[error("detour could not translate the answer of provider `{provider}`: {message}")]
    TranslationFailed { provider: String, message: String },
}

/// What was wrong with a 2xx answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unexpected {
    /// Neither JSON nor an event stream (an HTML page from a proxy in front of
    /// the provider): the media type, shortened.
    ContentType(String),
    /// Compressed (the encoding, shortened) although detour asked for
    /// identity, where the body must be read.
    Encoding(String),
    /// Labelled JSON, but not JSON.
    NotJson,
}

impl std::fmt::Display for Unexpected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ContentType(t) => {
                write!(f, "a body that is neither JSON nor an event stream ({t})")
            }
            Self::Encoding(e) => write!(f, "a `{e}`-encoded body although detour asked for none"),
            Self::NotJson => f.write_str("a body labelled JSON that is not JSON"),
        }
    }
}

/// What kind of failure an [`UpstreamError`] is, and every word it is known
/// by: the one table to extend when a variant is added. `reason` names the
/// failure in the log, the `x-detour-tried` header and the
/// `detour_failovers_total` label; `code`, `error_type` and `status` are what
/// the client reads when the request ends in it (`error::ApiError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    ConnectError,
    ConnectTimeout,
    FirstByteTimeout,
    IdleTimeout,
    TotalTimeout,
    TransportError,
    StreamErrorEvent,
    Untranslatable,
    ModelNotFound,
    EventTooLarge,
    UnexpectedContentType,
    UnexpectedEncoding,
    InvalidJson,
    AnswerTooLarge,
    TranslationFailed,
    /// A 429.
    Throttled,
    /// A 401, 402 or 403: detour's own key was refused.
    CredentialsRejected,
    /// Any 5xx (and Anthropic's 529).
    ServerError,
    /// Any other 4xx that is not the caller's fault.
    OtherStatus,
}

/// One row of [`UpstreamKind`]'s table.
struct Row {
    reason: &'static str,
    code: &'static str,
    error_type: &'static str,
    status: StatusCode,
}

impl UpstreamKind {
    fn row(self) -> Row {
        use StatusCode as S;
        let row = |reason, code, error_type, status| Row {
            reason,
            code,
            error_type,
            status,
        };
        let upstream = |reason, code, status| row(reason, code, "upstream_error", status);
        match self {
            Self::ConnectError => {
                upstream("connect_error", "upstream_connect_error", S::BAD_GATEWAY)
            }
            Self::ConnectTimeout => upstream(
                "connect_timeout",
                "upstream_connect_timeout",
                S::GATEWAY_TIMEOUT,
            ),
            Self::FirstByteTimeout => upstream(
                "first_byte_timeout",
                "upstream_first_byte_timeout",
                S::GATEWAY_TIMEOUT,
            ),
            Self::IdleTimeout => {
                upstream("idle_timeout", "upstream_idle_timeout", S::GATEWAY_TIMEOUT)
            }
            Self::TotalTimeout => upstream(
                "total_timeout",
                "upstream_total_timeout",
                S::GATEWAY_TIMEOUT,
            ),
            Self::TransportError => upstream(
                "transport_error",
                "upstream_transport_error",
                S::BAD_GATEWAY,
            ),
            Self::StreamErrorEvent => upstream(
                "stream_error_event",
                "upstream_stream_error",
                S::BAD_GATEWAY,
            ),
            Self::Untranslatable => row(
                "untranslatable",
                "untranslatable",
                "invalid_request_error",
                S::BAD_REQUEST,
            ),
            Self::ModelNotFound => upstream(
                "model_not_found",
                "upstream_model_not_found",
                S::BAD_GATEWAY,
            ),
            Self::EventTooLarge => upstream(
                "event_too_large",
                "upstream_event_too_large",
                S::BAD_GATEWAY,
            ),
            Self::UnexpectedContentType => upstream(
                "unexpected_content_type",
                "upstream_unexpected_answer",
                S::BAD_GATEWAY,
            ),
            Self::UnexpectedEncoding => upstream(
                "unexpected_encoding",
                "upstream_unexpected_answer",
                S::BAD_GATEWAY,
            ),
            Self::InvalidJson => {
                upstream("invalid_json", "upstream_unexpected_answer", S::BAD_GATEWAY)
            }
            Self::AnswerTooLarge => upstream(
                "answer_too_large",
                "upstream_answer_too_large",
                S::BAD_GATEWAY,
            ),
            // detour's own failure, after the provider did its part.
            Self::TranslationFailed => row(
                "translation_failed",
                "translation_failed",
                "server_error",
                S::BAD_GATEWAY,
            ),
            Self::Throttled => row(
                "status_429",
                "rate_limit_exceeded",
                "rate_limit_error",
                S::TOO_MANY_REQUESTS,
            ),
            Self::CredentialsRejected => upstream(
                "credentials_rejected",
                "upstream_credentials_rejected",
                S::BAD_GATEWAY,
            ),
            Self::ServerError => upstream("status_5xx", "upstream_server_error", S::BAD_GATEWAY),
            Self::OtherStatus => upstream("status_4xx", "upstream_server_error", S::BAD_GATEWAY),
        }
    }

    /// The failure's name in logs, `x-detour-tried` and metric labels.
    pub fn reason(self) -> &'static str {
        self.row().reason
    }

    /// The `code` of the client's error body.
    pub fn code(self) -> &'static str {
        self.row().code
    }

    /// The `type` of the client's error body (OpenAI's shape).
    pub fn error_type(self) -> &'static str {
        self.row().error_type
    }

    /// The status of the client's error response.
    pub fn status(self) -> StatusCode {
        self.row().status
    }

    /// A time limit that fired.
    pub fn is_timeout(self) -> bool {
        matches!(
            self,
            Self::ConnectTimeout | Self::FirstByteTimeout | Self::IdleTimeout | Self::TotalTimeout
        )
    }
}

/// A header's text for an error message: printable, at most 40 characters.
pub fn shorten(v: &HeaderValue) -> String {
    let text = v.to_str().unwrap_or("(not text)");
    text.chars().take(40).collect()
}

impl UpstreamError {
    /// Which kind of failure this is (see [`UpstreamKind`]).
    pub fn kind(&self) -> UpstreamKind {
        match self {
            Self::Connect { .. } => UpstreamKind::ConnectError,
            Self::Timeout { kind, .. } => match kind {
                TimeoutKind::Connect => UpstreamKind::ConnectTimeout,
                TimeoutKind::FirstByte => UpstreamKind::FirstByteTimeout,
                TimeoutKind::Idle => UpstreamKind::IdleTimeout,
                TimeoutKind::Total => UpstreamKind::TotalTimeout,
            },
            Self::Transport { .. } => UpstreamKind::TransportError,
            Self::ErrorEvent { .. } => UpstreamKind::StreamErrorEvent,
            Self::Untranslatable { .. } => UpstreamKind::Untranslatable,
            Self::ModelNotFound { .. } => UpstreamKind::ModelNotFound,
            Self::EventTooLarge { .. } => UpstreamKind::EventTooLarge,
            Self::UnexpectedAnswer { what, .. } => match what {
                Unexpected::ContentType(_) => UpstreamKind::UnexpectedContentType,
                Unexpected::Encoding(_) => UpstreamKind::UnexpectedEncoding,
                Unexpected::NotJson => UpstreamKind::InvalidJson,
            },
            Self::AnswerTooLarge { .. } => UpstreamKind::AnswerTooLarge,
            Self::TranslationFailed { .. } => UpstreamKind::TranslationFailed,
            Self::Status { status, .. } => match status.as_u16() {
                429 => UpstreamKind::Throttled,
                401..=403 => UpstreamKind::CredentialsRejected,
                s if s >= 500 => UpstreamKind::ServerError,
                _ => UpstreamKind::OtherStatus,
            },
        }
    }

    /// Whether another target may be tried (used by failover).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Transport { .. }
            | Self::ErrorEvent { .. } => true,
            // Another target of the route may speak the client's format.
            Self::Untranslatable { .. } => true,
            // The provider misbehaved: another target may not.
            Self::ModelNotFound { .. }
            | Self::EventTooLarge { .. }
            | Self::UnexpectedAnswer { .. } => true,
            // The answer was generated: trying again would generate it again,
            // and detour's limit or translator would fail the same way.
            Self::AnswerTooLarge { .. } | Self::TranslationFailed { .. } => false,
            Self::Status { status, .. } => {
                status.is_server_error()
                    || matches!(status.as_u16(), 401 | 402 | 403 | 408 | 429 | 529)
            }
        }
    }

    /// Refines a provider's error with what the attempt knows: a 404 that says
    /// the target's `model` does not exist becomes [`UpstreamError::ModelNotFound`],
    /// and a wait the provider asked for is capped at `max_cool_down`.
    pub fn for_target(self, model: &str, max_cool_down: Duration) -> Self {
        match self {
            Self::Status {
                provider,
                format,
                status,
                ref body,
                ..
            } if model_missing(format, status, body) => Self::ModelNotFound {
                provider,
                model: model.to_owned(),
            },
            Self::Status {
                provider,
                format,
                status,
                retry_after,
                content_type,
                body,
            } => Self::Status {
                provider,
                format,
                status,
                retry_after: retry_after.map(|d| d.min(max_cool_down)),
                content_type,
                body,
            },
            other => other,
        }
    }
}

/// `retry-after` as a wait: seconds (fractions and exponents tolerated, as
/// providers send them), or an HTTP date, converted to the time from `now`
/// (a date past is no wait). Negative, NaN, infinite or unreadable values are
/// no wait at all; a number past what a `Duration` holds is the longest wait,
/// for the caller to cap.
pub fn parse_retry_after(v: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = v.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        return Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether a provider's 404 says that the model does not exist there (the
/// target is misconfigured), as opposed to a 404 about the caller's request.
/// OpenAI: code `model_not_found`, or "The model `x` does not exist" (also
/// vLLM's top-level error and Ollama's string error, "model ... not found");
/// Anthropic: `not_found_error` with "model: x"; Gemini: `NOT_FOUND` naming
/// `models/x` (the model is the only name in Gemini's path).
pub fn model_missing(format: Format, status: StatusCode, body: &[u8]) -> bool {
    use serde_json::Value;
    if status != StatusCode::NOT_FOUND {
        return false;
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    if let Value::Array(items) = &mut v {
        // Gemini may wrap its error in an array.
        v = items.first().cloned().unwrap_or(Value::Null);
    }
    let error = match v.get("error") {
        Some(e) => e,
        None => &v,
    };
    let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or_default();
    let message = match error.as_str() {
        Some(s) => s,
        None => text("message"),
    };
    let lower = message.to_ascii_lowercase();
    match format {
        Format::OpenAi => {
            text("code") == "model_not_found"
                || (lower.contains("model")
                    && (lower.contains("does not exist") || lower.contains("not found")))
        }
        Format::Anthropic => text("type") == "not_found_error" && lower.starts_with("model:"),
        Format::Gemini => text("status") == "NOT_FOUND" && message.contains("models/"),
    }
}

/// Largest error body read from a provider.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Why a request could not be sent, from either client (paired with
/// whether no connection was made, for [`Upstream::classify`]).
type SendError = Box<dyn std::error::Error + Send + Sync>;

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

type Connector = hyper_rustls::HttpsConnector<HttpConnector<crate::dns::ForConnector>>;
type ProxiedConnector = hyper_rustls::HttpsConnector<egress::Egress>;

/// A provider's answer body, read as it arrives: from hyper-util's pool, or
/// from one of detour's own plain HTTP/1.1 connections, driven as it is read
/// ([`h1`]).
#[derive(Debug)]
pub enum ResponseBody {
    Pooled(hyper::body::Incoming),
    Driven(h1::Body),
}

/// Why reading a provider's answer body failed, by the client it came on.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Pooled(#[from] hyper::Error),
    #[error(transparent)]
    Driven(#[from] h1::Error),
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Pooled(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::Pooled))),
            ResponseBody::Driven(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::Driven))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Pooled(body) => body.is_end_stream(),
            ResponseBody::Driven(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ResponseBody::Pooled(body) => body.size_hint(),
            ResponseBody::Driven(body) => body.size_hint(),
        }
    }
}

/// A pooled client for one provider: hyper-util's client over rustls, HTTP/2
/// where the provider offers it by ALPN, names resolved by detour's caching
/// resolver (the proxy's name, when there is one: a tunnelled host is the
/// proxy's to resolve). Requests go out as prepared (URI and header block built once
/// per target by the adapter), without a layer that re-parses them.
#[derive(Clone)]
pub struct Upstream {
    provider: String,
    format: Format,
    connect_timeout: Duration,
    /// One per [`crate::workers`] slot (never empty): a connection's task runs
    /// on the runtime that opened it, so each worker reuses its own.
    pools: Arc<[Pool]>,
}

/// The provider's client: detour's own for plain `http://` reached directly
/// (local servers: [`h1`]), hyper-util's for TLS (HTTP/2 by ALPN), or
/// hyper-util's through the proxy its base URL is routed to.
// The direct clients stay inline (most providers' every request); the
// proxied one is boxed.
#[allow(clippy::large_enum_variant)]
enum Pool {
    Plain(h1::Pool),
    Direct(Client<Connector, Full<Bytes>>),
    Proxied(Box<ProxiedPool>),
}

#[derive(Clone)]
struct ProxiedPool {
    client: Client<ProxiedConnector, Full<Bytes>>,
    /// `proxy-authorization` for plain-http requests sent to the proxy in
    /// absolute form (a tunnel carries it in its `CONNECT`).
    auth: Option<HeaderValue>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("provider", &self.provider)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// A provider's answer with a 2xx status, body not yet read.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: ResponseBody,
}

/// Why a provider's client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no TLS configuration: {0}")]
    Tls(String),
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("base_url is not a URI: {0}")]
    BaseUrl(String),
}

impl Upstream {
    /// The provider's client: its TLS config ([`tls::client_config`]: the
    /// shared one unless it sets `ca_file`, `client_cert` or `tls_verify`)
    /// and its proxy ([`egress::route`], decided here once for its base
    /// URL).
    pub fn new(provider: &Provider) -> Result<Self, BuildError> {
        let mut http =
            HttpConnector::new_with_resolver(crate::dns::ForConnector(crate::dns::shared()));
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(provider.connect_timeout));
        let tls = tls::client_config(&provider.tls)?;
        let base: http::Uri = provider
            .base_url
            .as_str()
            .parse()
            .map_err(|e: http::uri::InvalidUri| BuildError::BaseUrl(e.to_string()))?;
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new()).pool_idle_timeout(POOL_IDLE);
            b
        };
        let route = egress::route(&provider.proxy, &base)?;
        if let Some(route) = &route {
            tracing::info!(
                provider = %provider.name,
                proxy = %route.proxy,
                "upstream: the provider is reached through a proxy"
            );
        }
        let plain = base.scheme() == Some(&http::uri::Scheme::HTTP);
        let pool = || match &route {
            None if plain => match h1::Pool::new(http.clone(), &base) {
                Some(pool) => Ok(Pool::Plain(pool)),
                None => Err(BuildError::BaseUrl(format!("{base}: no host"))),
            },
            None => Ok(Pool::Direct(
                builder().build(
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(tls.clone())
                        .https_or_http()
                        .enable_all_versions()
                        .wrap_connector(http.clone()),
                ),
            )),
            Some(route) => {
                let auth = match base.scheme() == Some(&http::uri::Scheme::HTTP) {
                    true => route.auth.clone(),
                    false => None,
                };
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls.clone())
                    .https_or_http()
                    .enable_all_versions()
                    .wrap_connector(egress::Egress::new(http.clone(), route));
                Ok(Pool::Proxied(Box::new(ProxiedPool {
                    client: builder().build(connector),
                    auth,
                })))
            }
        };
        // One pool per data-plane worker, so that a request's upstream
        // connection is driven by the thread the request runs on.
        let pools = (0..crate::workers::slots())
            .map(|_| pool())
            .collect::<Result<_, _>>()?;
        Ok(Self {
            provider: provider.name.clone(),
            format: match provider.kind {
                ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => Format::OpenAi,
                ProviderKind::Anthropic => Format::Anthropic,
                ProviderKind::Gemini => Format::Gemini,
            },
            connect_timeout: provider.connect_timeout,
            pools,
        })
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The calling worker's pool (the shared one off the workers).
    fn pool(&self) -> &Pool {
        let slot = crate::workers::current();
        self.pools.get(slot).unwrap_or(&self.pools[0])
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
        req: UpstreamRequest<'_>,
        timeouts: &Timeouts,
        started: Instant,
    ) -> Result<Answer, UpstreamError> {
        let (limit, kind) = first_deadline(started, timeouts);
        let UpstreamRequest { uri, headers, body } = req;
        // Either client's answer head, its body wrapped the same way and a
        // failure reduced to what `classify` reads (boxed: failures only).
        let pooled = |sent: hyper_util::client::legacy::ResponseFuture| {
            sent.map(|sent| match sent {
                Ok(resp) => Ok(resp.map(ResponseBody::Pooled)),
                Err(e) => Err((e.is_connect(), Box::new(e) as SendError)),
            })
        };
        // hyper's client takes the request whole: its own copies.
        let hyper_request = |body: Bytes| {
            let mut request = http::Request::new(Full::new(body));
            *request.method_mut() = http::Method::POST;
            *request.uri_mut() = uri.as_ref().clone();
            *request.headers_mut() = headers.clone();
            request
        };
        let sent = match self.pool() {
            Pool::Plain(pool) => Either::Left(async {
                match pool.request(&uri, headers, body).await {
                    Ok(resp) => Ok(resp.map(ResponseBody::Driven)),
                    Err(e) => Err((e.is_connect(), Box::new(e) as SendError)),
                }
            }),
            Pool::Direct(client) => Either::Right(pooled(client.request(hyper_request(body)))),
            Pool::Proxied(proxied) => {
                let mut request = hyper_request(body);
                if let Some(auth) = &proxied.auth {
                    request
                        .headers_mut()
                        .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
                }
                Either::Right(pooled(proxied.client.request(request)))
            }
        };
        match tokio::time::timeout_at(limit, sent).await {
            Ok(Ok(resp)) => self.answer(resp, timeouts, started).await,
            Ok(Err((connect, e))) => Err(self.classify(&*e, connect, &uri)),
            Err(_) => Err(self.timeout(kind, timeouts)),
        }
    }

    /// A 2xx answer as it is; any other read (bounded) into
    /// [`UpstreamError::Status`].
    async fn answer(
        &self,
        resp: http::Response<ResponseBody>,
        timeouts: &Timeouts,
        started: Instant,
    ) -> Result<Answer, UpstreamError> {
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        if status.is_success() {
            return Ok(Answer {
                status,
                headers: parts.headers,
                body,
            });
        }
        let header = parts
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let content_type = parts.headers.get(http::header::CONTENT_TYPE).cloned();
        let body = read_error_body(body, timeouts, started).await;
        // Gemini says how long to wait only in its body (`RetryInfo`).
        let retry_after = header
            .or_else(|| crate::protocol::translate::parse_error(self.format, &body)?.retry_after);
        Err(UpstreamError::Status {
            provider: self.provider.clone(),
            format: self.format,
            status,
            retry_after,
            content_type,
            body,
        })
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
    /// `error::GatewayError::Upstream`) names where the request went, with
    /// the URL's secrets (credentials, query values) masked.
    fn classify(
        &self,
        e: &(dyn std::error::Error + 'static),
        connect: bool,
        uri: &http::Uri,
    ) -> UpstreamError {
        let provider = self.provider.clone();
        let detail = format!("{}: {}", masked_uri(uri), error_chain(e));
        if connect {
            if timed_out(e) {
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

/// Reads a provider's error body: at most [`MAX_ERROR_BODY`] bytes, each
/// chunk within the idle limit, the whole within the total limit. A body that
/// breaks off is still worth what it has.
async fn read_error_body(mut body: ResponseBody, timeouts: &Timeouts, started: Instant) -> Bytes {
    use http_body_util::BodyExt;
    let total = started + timeouts.total;
    let mut out = Vec::new();
    loop {
        let next = Instant::now() + timeouts.idle;
        let frame = match tokio::time::timeout_at(next.min(total), body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            _ => break,
        };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let room = MAX_ERROR_BODY.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Bytes::from(out)
}

/// Whether a connect error is the connect timeout firing.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// A request's URI for a log line: no credentials, query values masked.
fn masked_uri(uri: &http::Uri) -> String {
    match url::Url::parse(&uri.to_string()) {
        Ok(url) => crate::config::masked_url(&url),
        Err(_) => "(a URI that is not a URL)".to_owned(),
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

/// An error and its sources on one line: a client's own message is vague.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> UpstreamError {
        UpstreamError::Status {
            provider: "p".to_owned(),
            format: Format::OpenAi,
            status: StatusCode::from_u16(code).unwrap(),
            retry_after: None,
            content_type: None,
            body: Bytes::new(),
        }
    }

    /// The wire words of each kind, as clients, logs and dashboards know them.
    #[test]
    fn each_kind_keeps_its_words() {
        let p = || "p".to_owned();
        let timeout = |kind| UpstreamError::Timeout {
            provider: p(),
            kind,
            after: Duration::from_secs(1),
        };
        let unexpected = |what| UpstreamError::UnexpectedAnswer {
            provider: p(),
            what,
        };
        #[rustfmt::skip]
        let table = [
            (UpstreamError::Connect { provider: p(), detail: p() }, "connect_error", "upstream_connect_error", "upstream_error", 502),
            (timeout(TimeoutKind::Connect), "connect_timeout", "upstream_connect_timeout", "upstream_error", 504),
            (timeout(TimeoutKind::FirstByte), "first_byte_timeout", "upstream_first_byte_timeout", "upstream_error", 504),
            (timeout(TimeoutKind::Idle), "idle_timeout", "upstream_idle_timeout", "upstream_error", 504),
            (timeout(TimeoutKind::Total), "total_timeout", "upstream_total_timeout", "upstream_error", 504),
            (UpstreamError::Transport { provider: p(), detail: p() }, "transport_error", "upstream_transport_error", "upstream_error", 502),
            (UpstreamError::ErrorEvent { provider: p(), message: p() }, "stream_error_event", "upstream_stream_error", "upstream_error", 502),
            (UpstreamError::Untranslatable { provider: p(), message: p() }, "untranslatable", "untranslatable", "invalid_request_error", 400),
            (UpstreamError::ModelNotFound { provider: p(), model: p() }, "model_not_found", "upstream_model_not_found", "upstream_error", 502),
            (UpstreamError::EventTooLarge { provider: p(), limit: 1 }, "event_too_large", "upstream_event_too_large", "upstream_error", 502),
            (unexpected(Unexpected::ContentType(p())), "unexpected_content_type", "upstream_unexpected_answer", "upstream_error", 502),
            (unexpected(Unexpected::Encoding(p())), "unexpected_encoding", "upstream_unexpected_answer", "upstream_error", 502),
            (unexpected(Unexpected::NotJson), "invalid_json", "upstream_unexpected_answer", "upstream_error", 502),
            (UpstreamError::AnswerTooLarge { provider: p(), limit: 1 }, "answer_too_large", "upstream_answer_too_large", "upstream_error", 502),
            (UpstreamError::TranslationFailed { provider: p(), message: p() }, "translation_failed", "translation_failed", "server_error", 502),
            (status(429), "status_429", "rate_limit_exceeded", "rate_limit_error", 429),
            (status(401), "credentials_rejected", "upstream_credentials_rejected", "upstream_error", 502),
            (status(403), "credentials_rejected", "upstream_credentials_rejected", "upstream_error", 502),
            (status(500), "status_5xx", "upstream_server_error", "upstream_error", 502),
            (status(529), "status_5xx", "upstream_server_error", "upstream_error", 502),
            (status(408), "status_4xx", "upstream_server_error", "upstream_error", 502),
        ];
        for (error, reason, code, error_type, http) in table {
            let kind = error.kind();
            assert_eq!(
                (
                    kind.reason(),
                    kind.code(),
                    kind.error_type(),
                    kind.status().as_u16()
                ),
                (reason, code, error_type, http),
                "{error:?}"
            );
        }
    }

    fn wait(text: &str) -> Option<Duration> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        parse_retry_after(&HeaderValue::from_str(text).unwrap(), now)
    }

    #[test]
    fn retry_after_never_panics_and_reads_what_providers_send() {
        assert_eq!(wait("7"), Some(Duration::from_secs(7)));
        assert_eq!(wait(" 2.5 "), Some(Duration::from_millis(2500)));
        assert_eq!(wait("0"), Some(Duration::ZERO));
        // Past what a Duration holds: the longest wait, for the caller to cap.
        assert_eq!(wait("1e20"), Some(Duration::MAX));
        assert_eq!(wait("18446744073709551616"), Some(Duration::MAX));
        for junk in ["-1", "NaN", "inf", "-inf", "soon", "", "1s"] {
            assert_eq!(wait(junk), None, "{junk:?}");
        }
        assert_eq!(
            wait("Tue, 14 Nov 2023 22:13:27 GMT"),
            Some(Duration::from_secs(7)),
            "an HTTP date is the time from now"
        );
        assert_eq!(wait("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
        assert!(wait("Fri, 31 Dec 9999 23:59:59 GMT").unwrap() > Duration::from_secs(1 << 37));
    }

    #[test]
    fn retry_after_is_capped_for_the_target() {
        let e = UpstreamError::Status {
            provider: "p".to_owned(),
            format: Format::OpenAi,
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(Duration::MAX),
            content_type: None,
            body: Bytes::new(),
        };
        let UpstreamError::Status { retry_after, .. } = e.for_target("m", Duration::from_secs(60))
        else {
            panic!("still a status");
        };
        assert_eq!(retry_after, Some(Duration::from_secs(60)));
    }

    #[test]
    fn a_404_for_the_model_is_told_from_the_callers_404() {
        let missing =
            |format, body: &str| model_missing(format, StatusCode::NOT_FOUND, body.as_bytes());
        // The model is not there: a misconfigured target.
        assert!(missing(
            Format::OpenAi,
            r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#
        ));
        assert!(missing(
            Format::OpenAi,
            r#"{"object":"error","message":"The model `llama` does not exist.","type":"NotFoundError","param":null,"code":404}"#
        ));
        assert!(missing(
            Format::OpenAi,
            r#"{"error":"model \"llama3\" not found, try pulling it first"}"#
        ));
        assert!(missing(
            Format::Anthropic,
            r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-9"}}"#
        ));
        assert!(missing(
            Format::Gemini,
            r#"{"error":{"code":404,"message":"models/gemini-9 is not found for API version v1beta","status":"NOT_FOUND"}}"#
        ));
        assert!(missing(
            Format::Gemini,
            r#"[{"error":{"code":404,"message":"models/gemini-9 is not found","status":"NOT_FOUND"}}]"#
        ));
        // The caller's own 404s.
        assert!(!missing(
            Format::OpenAi,
            r#"{"error":{"message":"Invalid URL (POST /v1/chat/x)","type":"invalid_request_error","code":null}}"#
        ));
        assert!(!missing(
            Format::OpenAi,
            r#"{"error":{"message":"No such file: file-abc","type":"invalid_request_error","code":null}}"#
        ));
        assert!(!missing(
            Format::Anthropic,
            r#"{"type":"error","error":{"type":"not_found_error","message":"file_abc not found"}}"#
        ));
        assert!(!missing(
            Format::Gemini,
            r#"{"error":{"code":404,"message":"cachedContents/x not found","status":"NOT_FOUND"}}"#
        ));
        assert!(!missing(Format::OpenAi, "<html>404</html>"));
        // Only a 404 says so.
        let body =
            br#"{"error":{"code":"model_not_found","message":"The model `x` does not exist"}}"#;
        assert!(!model_missing(
            Format::OpenAi,
            StatusCode::BAD_REQUEST,
            body
        ));
    }
}
