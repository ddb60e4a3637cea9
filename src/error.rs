//! The client-facing error type and the one place that turns it into a
//! response in the client's format.
//!
//! Each boundary has its own error type (`config::ConfigError`,
//! `protocol::openai::InvalidRequest`, `upstream::UpstreamError`);
//! [`GatewayError`] is what a request can end in, and [`ApiError::into_response`]
//! is the only code that writes an error body.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};

pub use crate::protocol::chat::ClientFormat;
use crate::protocol::chat::ErrorKind;
use crate::protocol::openai::{self, InvalidRequest};
use crate::protocol::translate;
use crate::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive within {after:?}")]
    BodyTimeout { after: std::time::Duration },
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("detour is at capacity ({limit} requests in flight); retry shortly")]
    Overloaded { limit: usize },
    #[error("rate limits cannot be checked right now (the replicas' shared state is unreachable and `on_redis_failure = \"closed\"`); retry shortly")]
    LimitsUnavailable,
    #[error("rate limit reached: {what}; retry after {}s", retry_after_secs(.retry_after))]
    RateLimited {
        what: String,
        retry_after: std::time::Duration,
    },
    #[error("the model `{alias}` does not exist; available models: {}", list(.available))]
    ModelNotFound {
        alias: String,
        available: Vec<String>,
    },
    /// The caller's key (or its tenant) lists `models`, and this is not one
    /// of them. Names the model, never the key.
    #[error("this API key is not allowed to use the model `{alias}`")]
    ModelNotAllowed { alias: String },
    /// The request cannot be expressed for the chosen provider.
    #[error("{0}")]
    Untranslatable(String),
    #[error("unknown path {method} {path}")]
    NotFound { method: String, path: String },
    #[error("no target of route `{alias}` is healthy right now (breakers open, cooling down, or overridden down)")]
    NoHealthyTarget { alias: String },
    #[error("every target of route `{alias}` failed: {tried}")]
    AllTargetsFailed { alias: String, tried: String },
    /// What the client reads names the provider and what went wrong, never
    /// the transport's detail (URLs, addresses, reqwest's text): that goes to
    /// the log, with the `UpstreamError` itself.
    #[error("{}", client_message(.0))]
    Upstream(#[from] UpstreamError),
}

/// An upstream error as the client reads it.
fn client_message(e: &UpstreamError) -> std::borrow::Cow<'_, str> {
    match e {
        UpstreamError::Connect { provider, .. } => {
            format!("could not connect to provider `{provider}`").into()
        }
        UpstreamError::Transport { provider, .. } => format!(
            "the connection to provider `{provider}` failed or its answer could not be read"
        )
        .into(),
        other => other.to_string().into(),
    }
}

/// Whole seconds to wait, at least 1 (the `retry-after` header's value).
pub fn retry_after_secs(d: &std::time::Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none are configured".to_owned()
    } else {
        items.join(", ")
    }
}

/// A [`GatewayError`] on its way to a client that speaks `format`.
#[derive(Debug)]
pub struct ApiError {
    pub error: GatewayError,
    pub format: ClientFormat,
}

impl<E: Into<GatewayError>> From<E> for ApiError {
    fn from(e: E) -> Self {
        Self {
            error: e.into(),
            format: ClientFormat::OpenAi,
        }
    }
}

/// How an error shows to the client, independent of the wire format.
struct Shape<'a> {
    status: StatusCode,
    kind: &'a str,
    code: Option<&'a str>,
    param: Option<&'a str>,
}

impl GatewayError {
    fn shape(&self) -> Shape<'_> {
        let shape = |status, kind, code| Shape {
            status,
            kind,
            code,
            param: None,
        };
        match self {
            Self::InvalidRequest(e) => Shape {
                param: e.param.as_deref(),
                ..shape(StatusCode::BAD_REQUEST, "invalid_request_error", None)
            },
            Self::PayloadTooLarge { .. } => shape(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            Self::BodyRead(_) => shape(StatusCode::BAD_REQUEST, "invalid_request_error", None),
            Self::BodyTimeout { .. } => shape(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
            ),
            Self::Untranslatable(_) => shape(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("untranslatable"),
            ),
            Self::Unauthorized => shape(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            Self::ModelNotFound { .. } => Shape {
                param: Some("model"),
                ..shape(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    Some("model_not_found"),
                )
            },
            Self::ModelNotAllowed { .. } => Shape {
                param: Some("model"),
                ..shape(
                    StatusCode::FORBIDDEN,
                    "invalid_request_error",
                    Some("model_not_allowed"),
                )
            },
            Self::NotFound { .. } => shape(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("unknown_url"),
            ),
            Self::RateLimited { .. } => shape(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            Self::Overloaded { .. } => shape(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("overloaded"),
            ),
            Self::LimitsUnavailable => shape(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("limits_unavailable"),
            ),
            Self::NoHealthyTarget { .. } => shape(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                Some("no_healthy_target"),
            ),
            Self::AllTargetsFailed { .. } => shape(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                Some("all_targets_failed"),
            ),
            Self::Upstream(e) => upstream_shape(e),
        }
    }
}

/// An upstream error's shape: a row of `UpstreamKind`'s table.
fn upstream_shape(e: &UpstreamError) -> Shape<'static> {
    let kind = e.kind();
    Shape {
        status: kind.status(),
        kind: kind.error_type(),
        code: Some(kind.code()),
        param: None,
    }
}

/// Upstream 4xx answers that are the caller's fault and are relayed as they
/// are (the provider's body is already in OpenAI shape for OpenAI kinds).
pub fn is_callers_fault(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 404 | 409 | 413 | 415 | 422)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let GatewayError::Upstream(UpstreamError::Status {
            status,
            content_type,
            body,
            format,
            ..
        }) = &self.error
        {
            if is_callers_fault(*status) {
                // The caller's own mistake: relay it, as it is when the
                // provider speaks the client's format, else re-shaped.
                if *format == self.format.wire() {
                    let mut resp = (*status, body.clone()).into_response();
                    let ct = content_type
                        .clone()
                        .unwrap_or(HeaderValue::from_static("application/json"));
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
                    return resp;
                }
                let message = translate::parse_error(*format, body)
                    .map(|e| e.message)
                    .unwrap_or_else(|| format!("the provider rejected the request ({status})"));
                return render(
                    self.format,
                    *status,
                    &message,
                    ErrorKind::from_status(status.as_u16()),
                    None,
                    None,
                    None,
                );
            }
        }
        let shape = self.error.shape();
        let message = self.error.to_string();
        let retry_after = match &self.error {
            // Whole seconds, at least 1: the provider's text is never passed
            // on (already capped at the route's `max_cool_down`).
            GatewayError::Upstream(UpstreamError::Status { retry_after, .. }) => retry_after
                .as_ref()
                .map(|d| HeaderValue::from(retry_after_secs(d).max(1))),
            GatewayError::RateLimited { retry_after, .. } => {
                Some(HeaderValue::from(retry_after_secs(retry_after).max(1)))
            }
            GatewayError::Overloaded { .. } | GatewayError::LimitsUnavailable => {
                Some(HeaderValue::from_static("1"))
            }
            _ => None,
        };
        render(
            self.format,
            shape.status,
            &message,
            ErrorKind::from_status(shape.status.as_u16()),
            Some(shape.kind),
            shape.code,
            shape.param,
        )
        .with_retry_after(retry_after)
    }
}

/// Writes one error response in the client's format.
fn render(
    format: ClientFormat,
    status: StatusCode,
    message: &str,
    kind: ErrorKind,
    openai_type: Option<&str>,
    code: Option<&str>,
    param: Option<&str>,
) -> Response {
    let body = match format {
        ClientFormat::OpenAi | ClientFormat::Responses => openai::error_body(
            message,
            openai_type.unwrap_or_else(|| translate::openai::error_type(kind)),
            param,
            code,
        ),
        ClientFormat::Anthropic => translate::anthropic::error_body(kind, message),
    };
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

trait WithRetryAfter {
    fn with_retry_after(self, v: Option<HeaderValue>) -> Self;
}

impl WithRetryAfter for Response {
    fn with_retry_after(mut self, v: Option<HeaderValue>) -> Self {
        if let Some(v) = v {
            self.headers_mut().insert(header::RETRY_AFTER, v);
        }
        self
    }
}

/// The event that ends a stream which failed after it started, in the
/// client's stream format.
pub fn stream_error_event(format: ClientFormat, error: &GatewayError) -> Bytes {
    let shape = error.shape();
    let message = error.to_string();
    match format {
        ClientFormat::OpenAi => openai::error_event(&message, shape.kind, shape.code),
        ClientFormat::Responses => {
            translate::responses::error_event(&message, shape.kind, shape.code)
        }
        ClientFormat::Anthropic => translate::anthropic::error_event(
            ErrorKind::from_status(shape.status.as_u16()),
            &message,
        ),
    }
}
