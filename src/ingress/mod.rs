//! Ingress: the client-facing API formats. Each submodule reads requests in
//! one format, checks them, and hands them to [`crate::proxy`].

pub mod anthropic;
pub mod anthropic_meta;
pub mod openai;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use http_body_util::{BodyExt, Limited};

use crate::auth::Caller;
use crate::error::GatewayError;
use crate::limits::{estimate_tokens, TokenGate};
use crate::request::Tracked;
use crate::telemetry::RequestRecord;

/// The request id, from the client's `x-request-id` or generated.
#[derive(Debug, Clone)]
pub struct RequestId(String);

impl RequestId {
    /// `x-request-id`, the client's id on the way in and detour's on the way
    /// out (built once: a name given as `&str` is parsed on every use).
    pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

    /// The client's id if it is short printable ASCII, else a fresh one.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let theirs = headers
            .get(Self::HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()));
        match theirs {
            Some(id) => Self(id.to_owned()),
            None => Self::fresh(),
        }
    }

    /// `req_` and 128 random bits in 32 lowercase hex digits (written by
    /// hand: `format!` costs ten times as much, on every request).
    fn fresh() -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bits = fastrand::u128(..);
        let mut id = [0u8; 36];
        id[..4].copy_from_slice(b"req_");
        for (pair, byte) in id[4..].chunks_exact_mut(2).zip(bits.to_be_bytes()) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0xf)];
        }
        // ASCII by construction: the check is a few instructions and cannot
        // fail.
        Self(String::from_utf8(id.to_vec()).unwrap_or_default())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// What the gate ([`crate::server`]) hands an API handler: the request's
/// id, the one config snapshot it runs on, who calls, and the caller's
/// token buckets to charge once the body is read.
pub struct Admitted {
    pub id: RequestId,
    pub snapshot: crate::state::Snapshot,
    pub caller: Caller,
    pub tokens: TokenGate,
}

/// `GET /v1/models`: the aliases the caller may call, in Anthropic's shape
/// for an Anthropic caller ([`anthropic_meta::speaks_anthropic`]), else in
/// OpenAI's.
pub fn models(admitted: Box<Admitted>, req: &axum::extract::Request) -> axum::response::Response {
    let Admitted {
        snapshot, caller, ..
    } = *admitted;
    if anthropic_meta::speaks_anthropic(req.headers()) {
        return anthropic_meta::models(&snapshot.live, &caller, req.uri().query());
    }
    openai::models(&snapshot.live, &caller)
}

/// Reads a request body of at most `server.max_body_bytes`, arriving within
/// `server.body_read_timeout`.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    server: &crate::config::Server,
) -> Result<Bytes, GatewayError> {
    let limit = server.max_body_bytes;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    let collected = tokio::time::timeout(
        server.body_read_timeout,
        Limited::new(body, limit).collect(),
    )
    .await;
    match collected {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge { limit })
        }
        Ok(Err(e)) => Err(GatewayError::BodyRead(e.to_string())),
        Err(_) => Err(GatewayError::BodyTimeout {
            after: server.body_read_timeout,
        }),
    }
}

/// What every ingress handler starts with: the live state this request runs
/// on (stable, or the canary's), who calls, its log record, and its body read
/// within the limits.
pub struct Started {
    pub live: std::sync::Arc<crate::state::Live>,
    pub caller: Caller,
    pub record: Tracked,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The caller's token buckets: charge them with [`charge_tokens`] once
    /// the request's answer cap is known.
    pub tokens: TokenGate,
}

/// The gate every parsed request passes before [`crate::proxy::forward`]:
/// first the caller may call `alias` ([`allow_model`]), then its tokens are
/// charged ([`charge_tokens`]). One function, so that no handler charges a
/// request it then refuses, or forwards one it never checked.
pub async fn accept(
    record: &mut Tracked,
    live: &crate::state::Live,
    caller: &Caller,
    tokens: &TokenGate,
    alias: &str,
    body_len: usize,
    max_tokens: Option<u64>,
) -> Result<(), GatewayError> {
    allow_model(record, &live.config, caller, alias)?;
    charge_tokens(record, tokens, body_len, max_tokens)
        .await
        .map_err(rate_limited)
}

/// Per-key model access: may `caller` call `alias` ([`crate::access`])?
///
/// Checked here, as soon as the body is parsed, because the model is in
/// the body, and the body is read only after authentication and admission
/// (reading bodies before admission would let a flood past the concurrency
/// caps). So a refused request has counted against its key's requests per
/// minute, like any other bad request, and holds its concurrency slot only
/// until this answer; but it is refused before its tokens are charged,
/// before the cache is asked, and before anything reaches a provider.
///
/// A key with a list is answered 403 for an alias outside it, whether or not
/// a route of that name exists; an alias it may call that names no route is
/// a 404 listing only the aliases it may call. A key without a list is
/// unchanged (`proxy::forward` answers an unknown alias).
fn allow_model(
    record: &mut Tracked,
    config: &crate::config::Config,
    caller: &Caller,
    alias: &str,
) -> Result<(), GatewayError> {
    if !caller.access.is_restricted() {
        return Ok(());
    }
    let position = config.route_position(alias);
    if !caller.access.allows(position, alias) {
        // The alias is logged (and labels metrics) only if it names a route:
        // anything else is the client's text.
        if position.is_some() {
            record.route = Some(alias.to_owned());
        }
        return Err(GatewayError::ModelNotAllowed {
            alias: alias.to_owned(),
        });
    }
    if position.is_none() {
        record.route = Some(alias.to_owned());
        let available = caller.access.callable(config).map(str::to_owned).collect();
        return Err(GatewayError::ModelNotFound {
            alias: alias.to_owned(),
            available,
        });
    }
    Ok(())
}

/// Charges the caller's tokens-per-minute limits with the estimate for a
/// body of `body_len` bytes (as read: chunked and HTTP/2 bodies count too)
/// asking for at most `max_tokens` of answer; the tracked request settles
/// the charge from the real usage when it ends.
async fn charge_tokens(
    record: &mut Tracked,
    tokens: &TokenGate,
    body_len: usize,
    max_tokens: Option<u64>,
) -> Result<(), crate::limits::Limited> {
    let estimate = estimate_tokens(u64::try_from(body_len).unwrap_or(u64::MAX), max_tokens);
    record.set_charge(tokens.charge(estimate).await?);
    Ok(())
}

/// A limit's refusal, as the client gets it: a 429 with `retry-after`.
/// (Here, not a `From` in `error`: errors sit above the limits they report.)
pub fn rate_limited(l: crate::limits::Limited) -> GatewayError {
    if l.unavailable {
        return GatewayError::LimitsUnavailable;
    }
    GatewayError::RateLimited {
        what: l.what,
        retry_after: l.retry_after,
    }
}

/// Starts handling `req`; a body that cannot be read ends it in `format`.
///
/// Its future (two kilobytes: it reads the body) is made in its own box, so
/// that the handler's future neither holds it nor copies it in and out.
pub fn start(
    admitted: Box<Admitted>,
    format: crate::error::ClientFormat,
    endpoint: crate::providers::Endpoint,
    req: Box<axum::extract::Request>,
) -> std::pin::Pin<Box<impl std::future::Future<Output = Result<Started, axum::response::Response>>>>
{
    crate::boxed::in_place(move || start_as(admitted, format, endpoint.as_str(), req))
}

/// [`start`] for a call that is not one of the proxied endpoints, named
/// `endpoint` in the log line and metrics.
pub async fn start_as(
    admitted: Box<Admitted>,
    format: crate::error::ClientFormat,
    endpoint: &'static str,
    req: Box<axum::extract::Request>,
) -> Result<Started, axum::response::Response> {
    let Admitted {
        id,
        snapshot: crate::state::Snapshot { live, cohort },
        caller,
        tokens,
    } = *admitted;
    let (parts, body) = req.into_parts();
    let mut record = Tracked::new(RequestRecord::new(id.into_string(), format, endpoint));
    record.set_cohort(cohort);
    record.span = live
        .traces
        .as_ref()
        .map(|t| Box::new(t.request(&parts.headers, endpoint)));
    record.tenant = Some(std::sync::Arc::clone(&caller.tenant));
    match read_body(&parts.headers, body, &live.config.server).await {
        Ok(body) => Ok(Started {
            live,
            caller,
            record,
            headers: parts.headers,
            body,
            tokens,
        }),
        Err(e) => Err(crate::proxy::reject(record, format, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::RequestId;
    use http::{HeaderMap, HeaderValue};

    fn id_for(theirs: Option<&str>) -> String {
        let mut headers = HeaderMap::new();
        if let Some(v) = theirs {
            headers.insert("x-request-id", HeaderValue::from_str(v).unwrap());
        }
        RequestId::from_headers(&headers).into_string()
    }

    #[test]
    fn a_fresh_id_is_req_and_32_lowercase_hex_digits() {
        let (a, b) = (id_for(None), id_for(None));
        for id in [&a, &b] {
            let hex = id.strip_prefix("req_").expect(id);
            assert_eq!(hex.len(), 32, "{id}");
            assert!(
                hex.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{id}"
            );
        }
        assert_ne!(a, b);
    }

    #[test]
    fn the_clients_id_is_kept_when_short_and_printable() {
        assert_eq!(id_for(Some("abc-123")), "abc-123");
        assert!(id_for(Some("has space")).starts_with("req_"));
        assert!(id_for(Some(&"x".repeat(129))).starts_with("req_"));
    }
}
