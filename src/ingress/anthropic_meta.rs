//! Anthropic clients' metadata calls: `GET /v1/models` in Anthropic's
//! shape, and `POST /v1/messages/count_tokens`.
//!
//! **Who is an Anthropic caller.** `GET /v1/models` is one path for both
//! APIs; the answer is in Anthropic's shape when the request carries
//! `anthropic-version` (every Anthropic SDK sends it), or `x-api-key`
//! without `authorization` (Anthropic's way to send a key; OpenAI's SDKs
//! send `authorization: Bearer`). Otherwise it is OpenAI's list. Either
//! lists only the aliases the caller's key may call.
//!
//! **count_tokens.** Sent to the route's first Anthropic target in the
//! routing plan (healthy ones first; a target whose breaker is probing is
//! left to real traffic), with `model` rewritten to the target's and the
//! provider's answer relayed; a target that fails in a way another could
//! survive (connection, timeout, 429, 5xx) passes to the next Anthropic
//! target, up to the route's `max_attempts`. The caller's own mistake (a
//! 4xx) is relayed as Anthropic wrote it. With no Anthropic target, or none
//! that answered, the count is estimated ([`estimate`]) and the answer says
//! so in `x-detour-estimated: true`. The request passes [`super::accept`]
//! like every other (the key's model access; one token charged: counting
//! generates nothing). Health is not told: a count is not traffic.

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{accept, start_as, Admitted, Started};
use crate::auth::Caller;
use crate::config::ProviderKind;
use crate::error::{ClientFormat, GatewayError};
use crate::protocol::openai::{model_span, rewrite_model, InvalidRequest};
use crate::providers::Adapter;
use crate::proxy::reject;
use crate::state::Live;
use crate::telemetry::Outcome;

const FORMAT: ClientFormat = ClientFormat::Anthropic;

/// Whether a request is an Anthropic client's (see the module doc).
pub fn speaks_anthropic(headers: &HeaderMap) -> bool {
    headers.contains_key("anthropic-version")
        || (headers.contains_key("x-api-key") && !headers.contains_key(header::AUTHORIZATION))
}

/// The `limit` Anthropic's model list uses when none is given, and its most.
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 1000;

/// One page of Anthropic's model list: `limit`, `after_id`, `before_id` as
/// Anthropic reads them (ids past the end, or unknown, give an empty page).
pub fn model_page(aliases: &[&str], query: Option<&str>) -> Result<Bytes, InvalidRequest> {
    let mut limit = DEFAULT_LIMIT;
    let (mut after, mut before) = (None, None);
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_LIMIT).contains(l))
                    .ok_or_else(|| InvalidRequest {
                        message: format!("limit: must be a number from 1 to {MAX_LIMIT}"),
                        param: Some("limit".to_owned()),
                    })?;
            }
            "after_id" => after = Some(value.into_owned()),
            "before_id" => before = Some(value.into_owned()),
            _ => {}
        }
    }
    let position = |id: &str| aliases.iter().position(|a| *a == id);
    let start = after
        .as_deref()
        .map_or(0, |id| position(id).map_or(aliases.len(), |i| i + 1));
    let end = before
        .as_deref()
        .map_or(aliases.len(), |id| position(id).unwrap_or(0));
    let (first, last, has_more) = if end <= start {
        (start, start, false)
    } else if before.is_some() && after.is_none() {
        // Paging backwards: the `limit` ids just before `before_id`.
        let first = end.saturating_sub(limit).max(start);
        (first, end, first > start)
    } else {
        let last = (start + limit).min(end);
        (start, last, last < end)
    };
    let page = &aliases[first..last];
    let body = json!({
        "data": page.iter().map(|id| json!({
            "type": "model",
            "id": id,
            "display_name": id,
            // Routes have no creation date; the epoch, as OpenAI's list says 0.
            "created_at": "1970-01-01T00:00:00Z",
        })).collect::<Vec<_>>(),
        "has_more": has_more,
        "first_id": page.first(),
        "last_id": page.last(),
    });
    Ok(Bytes::from(body.to_string()))
}

/// `GET /v1/models` for an Anthropic caller.
pub fn models(live: &Live, caller: &Caller, query: Option<&str>) -> Response {
    let allowed: Vec<&str> = caller.access.callable(&live.config).collect();
    match model_page(&allowed, query) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => crate::error::ApiError {
            error: e.into(),
            format: FORMAT,
        }
        .into_response(),
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Tokens counted for an image or a document block (Anthropic's own figure
/// for an image of about a megapixel).
const TOKENS_PER_ATTACHMENT: u64 = 1600;

/// The estimate of a `count_tokens` body's input tokens: one token per 4
/// bytes (rounded up) of every string in `system` and `messages` and of
/// `tools` as JSON text, plus [`TOKENS_PER_ATTACHMENT`] for each image or
/// document block (whose base64 data is not text); at least 1.
pub fn estimate(body: &Value) -> u64 {
    fn walk(v: &Value, bytes: &mut u64, attachments: &mut u64) {
        match v {
            Value::String(s) => *bytes += s.len() as u64,
            Value::Array(items) => items.iter().for_each(|i| walk(i, bytes, attachments)),
            Value::Object(map) => {
                let kind = map.get("type").and_then(Value::as_str);
                let attachment = matches!(kind, Some("image" | "document"));
                if attachment {
                    *attachments += 1;
                }
                for (key, value) in map {
                    // The block's kind is not text, nor is an attachment's data.
                    if key == "type" || (attachment && key == "source") {
                        continue;
                    }
                    walk(value, bytes, attachments);
                }
            }
            _ => {}
        }
    }
    let (mut bytes, mut attachments) = (0, 0);
    for key in ["system", "messages"] {
        if let Some(v) = body.get(key) {
            walk(v, &mut bytes, &mut attachments);
        }
    }
    if let Some(tools) = body.get("tools") {
        bytes += tools.to_string().len() as u64;
    }
    (bytes.div_ceil(4) + attachments * TOKENS_PER_ATTACHMENT).max(1)
}

/// `POST /v1/messages/count_tokens` (see the module doc).
pub async fn count_tokens(admitted: Box<Admitted>, req: Box<Request>) -> Response {
    let Started {
        live,
        caller,
        mut record,
        body,
        tokens,
        ..
    } = match start_as(admitted, FORMAT, "count_tokens", req).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let (alias, span) = match model_span(&body) {
        Ok(m) => m,
        Err(e) => return reject(record, FORMAT, e.into()),
    };
    // One token: counting generates nothing, but it is a call on the key.
    if let Err(e) = accept(&mut record, &live, &caller, &tokens, &alias, 0, Some(0)).await {
        return reject(record, FORMAT, e);
    }
    let Some(position) = live.config.route_position(&alias) else {
        let available = caller
            .access
            .callable(&live.config)
            .map(str::to_owned)
            .collect();
        return reject(
            record,
            FORMAT,
            GatewayError::ModelNotFound { alias, available },
        );
    };
    record.route = Some(alias);
    let route = &live.config.routes[position];
    let state = &live.routes[position];
    let mut rng = fastrand::Rng::new();
    let plan = crate::routing::plan(
        route,
        &state.health,
        &live.overrides,
        crate::health::Traffic::of(false),
        &mut rng,
    );
    let anthropic = plan
        .iter()
        .filter(|c| !c.probe)
        .map(|c| &route.targets[c.index])
        .filter(|t| t.provider.kind == ProviderKind::Anthropic)
        .take(route.retries.max_attempts.max(1) as usize);
    for target in anthropic {
        let adapter = &live.adapters[target.provider_index];
        let Adapter::Anthropic(a) = adapter else {
            continue;
        };
        record.attempts += 1;
        record.provider = Some(target.provider.name.as_str().into());
        record.model = Some(target.model.as_str().into());
        let request = a.count_tokens(rewrite_model(&body, span.clone(), &target.model));
        let started = Instant::now();
        let answer = match adapter
            .upstream()
            .send(request, &route.timeouts, started)
            .await
        {
            Ok(answer) => answer,
            Err(e) => {
                let e = e.for_target(&target.model, route.breaker.max_cool_down);
                tracing::warn!(
                    request_id = %record.request_id,
                    provider = %target.provider.name,
                    reason = e.kind().reason(),
                    error = %e,
                    "count_tokens attempt failed"
                );
                if e.retryable() {
                    continue;
                }
                return reject(record, FORMAT, GatewayError::Upstream(e));
            }
        };
        let whole = match read_small(answer.body, &route.timeouts, started).await {
            Some(whole) => whole,
            None => continue,
        };
        let mut resp = json_response(answer.status, whole);
        if let Some((provider, model)) = target.headers.clone() {
            resp.headers_mut().insert("x-detour-provider", provider);
            resp.headers_mut().insert("x-detour-model", model);
        }
        resp.headers_mut()
            .insert("x-detour-attempts", HeaderValue::from(record.attempts));
        record.status = resp.status().as_u16();
        record.finish(Outcome::Ok);
        return resp;
    }
    // No Anthropic target answered: an estimate, marked as one.
    let Ok(parsed) = serde_json::from_slice::<Value>(&body) else {
        return reject(record, FORMAT, invalid("the body is not JSON", None));
    };
    if !parsed.get("messages").is_some_and(Value::is_array) {
        return reject(
            record,
            FORMAT,
            invalid("messages: Field required", Some("messages")),
        );
    }
    let body = json!({"input_tokens": estimate(&parsed)}).to_string();
    let mut resp = json_response(StatusCode::OK, Bytes::from(body));
    resp.headers_mut()
        .insert("x-detour-estimated", HeaderValue::from_static("true"));
    resp.headers_mut()
        .insert("x-detour-attempts", HeaderValue::from(record.attempts));
    record.status = 200;
    record.finish(Outcome::Ok);
    resp
}

fn invalid(message: &str, param: Option<&str>) -> GatewayError {
    GatewayError::InvalidRequest(InvalidRequest {
        message: message.to_owned(),
        param: param.map(str::to_owned),
    })
}

/// The largest `count_tokens` answer read (it is `{"input_tokens": n}`).
const MAX_ANSWER: usize = 64 * 1024;

/// A small answer, whole, within the attempt's limits; `None` if it broke
/// off, took too long or was larger than [`MAX_ANSWER`].
async fn read_small(
    mut body: crate::upstream::ResponseBody,
    timeouts: &crate::config::Timeouts,
    started: Instant,
) -> Option<Bytes> {
    use http_body_util::BodyExt;
    let total = started + timeouts.total;
    let mut whole = Vec::new();
    loop {
        let deadline = (Instant::now() + timeouts.idle).min(total);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => return Some(Bytes::from(whole)),
            _ => return None,
        };
        if let Ok(data) = frame.into_data() {
            if whole.len() + data.len() > MAX_ANSWER {
                return None;
            }
            whole.extend_from_slice(&data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(aliases: &[&str], query: &str) -> Value {
        serde_json::from_slice(&model_page(aliases, Some(query)).unwrap()).unwrap()
    }

    fn ids(v: &Value) -> Vec<&str> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn the_model_list_pages_as_anthropics_does() {
        let all = ["a", "b", "c", "d", "e"];
        let v = page(&all, "");
        assert_eq!(ids(&v), all);
        assert_eq!(
            (&v["has_more"], &v["first_id"], &v["last_id"]),
            (&json!(false), &json!("a"), &json!("e"))
        );
        assert_eq!(v["data"][0]["type"], "model");
        assert_eq!(v["data"][0]["display_name"], "a");
        assert_eq!(v["data"][0]["created_at"], "1970-01-01T00:00:00Z");
        let v = page(&all, "limit=2");
        assert_eq!((ids(&v), &v["has_more"]), (vec!["a", "b"], &json!(true)));
        let v = page(&all, "limit=2&after_id=b");
        assert_eq!((ids(&v), &v["has_more"]), (vec!["c", "d"], &json!(true)));
        let v = page(&all, "limit=2&after_id=d");
        assert_eq!((ids(&v), &v["has_more"]), (vec!["e"], &json!(false)));
        let v = page(&all, "limit=2&before_id=d");
        assert_eq!((ids(&v), &v["has_more"]), (vec!["b", "c"], &json!(true)));
        let v = page(&all, "after_id=zzz");
        assert_eq!((ids(&v), &v["first_id"]), (vec![], &Value::Null));
        let v = page(&[], "");
        assert_eq!((ids(&v), &v["last_id"]), (vec![], &Value::Null));
        for bad in ["limit=0", "limit=1001", "limit=x"] {
            assert!(model_page(&all, Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_estimate_counts_text_not_attachments_data() {
        let text = "x".repeat(400);
        let plain = json!({"model": "m", "messages": [{"role": "user", "content": text}]});
        // 400 bytes of text and "user": 101 tokens.
        assert_eq!(estimate(&plain), 101);
        let with_system = json!({"system": "y".repeat(40), "messages": plain["messages"]});
        assert_eq!(estimate(&with_system), 111);
        let image = json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A".repeat(100_000)}},
            {"type": "text", "text": "what is it?"},
        ]}]});
        assert_eq!(estimate(&image), TOKENS_PER_ATTACHMENT + 4);
        let tools =
            json!({"messages": [], "tools": [{"name": "f", "input_schema": {"type": "object"}}]});
        let json_text = tools["tools"].to_string().len() as u64;
        assert_eq!(estimate(&tools), json_text.div_ceil(4));
        assert_eq!(estimate(&json!({"messages": []})), 1);
    }

    #[test]
    fn anthropic_callers_are_told_by_their_headers() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(speaks_anthropic(&h(&[("anthropic-version", "2023-06-01")])));
        assert!(speaks_anthropic(&h(&[
            ("anthropic-version", "2023-06-01"),
            ("authorization", "Bearer k")
        ])));
        assert!(speaks_anthropic(&h(&[("x-api-key", "k")])));
        assert!(!speaks_anthropic(&h(&[("authorization", "Bearer k")])));
        assert!(!speaks_anthropic(&h(&[
            ("x-api-key", "k"),
            ("authorization", "Bearer k")
        ])));
        assert!(!speaks_anthropic(&h(&[])));
    }
}
