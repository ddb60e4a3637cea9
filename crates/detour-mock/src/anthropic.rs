//! The Anthropic flavor (PROVIDERS.md §2): `POST /v1/messages` plain and streamed,
//! `POST /v1/messages/count_tokens`, `GET /v1/models[/{id}]`, error shapes and headers.
//!
//! Pure like the OpenAI flavor: request bytes in, [`Reply`] out. Content is a function
//! of the seed and the request (model, system, messages); ids of the seed and the
//! arrival number.
//!
//! What the mock answers:
//! - the last user turn holds `tool_result` blocks → one text block quoting them,
//!   `stop_reason: end_turn`;
//! - tools are offered and `tool_choice` is not `none` → a `tool_use` block for the
//!   first tool (or the named one), its `input` built from the tool's `input_schema`,
//!   `stop_reason: tool_use`; with `auto` (the default) a short text block comes first;
//! - otherwise a text answer, cut at the first `stop_sequences` match
//!   (`stop_reason: stop_sequence`) or at `max_tokens` (`stop_reason: max_tokens`).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, AUTHORIZATION, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{json, Map, Value};

use super::body::{Ctx, Reply, Stream};
use super::gen::{self, Fnv};

/// Which endpoint a request is for; decided before the body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Messages,
    CountTokens,
    Models,
    Model,
    NotFound,
}

const MODEL_PREFIX: &str = "/v1/models/";

impl Route {
    pub(crate) fn of(method: &Method, path: &str) -> Self {
        match (method, path) {
            (&Method::POST, "/v1/messages") => Self::Messages,
            (&Method::POST, "/v1/messages/count_tokens") => Self::CountTokens,
            (&Method::GET, "/v1/models") => Self::Models,
            (&Method::GET, p) if p.len() > MODEL_PREFIX.len() && p.starts_with(MODEL_PREFIX) => {
                Self::Model
            }
            _ => Self::NotFound,
        }
    }
}

/// Answers one (non-faulted, authenticated) request.
pub(crate) fn serve(
    route: Route,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    ctx: &Ctx<'_>,
) -> Reply {
    if route == Route::NotFound {
        return error(StatusCode::NOT_FOUND, "not_found_error", "Not Found", ctx);
    }
    if !headers.contains_key(ANTHROPIC_VERSION) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
            ctx,
        );
    }
    let result = match route {
        Route::Messages => messages(body, ctx),
        Route::CountTokens => count_tokens(body, ctx),
        Route::Models => Ok(models()),
        Route::Model => Ok(model(path.get(MODEL_PREFIX.len()..).unwrap_or_default())),
        Route::NotFound => Ok(error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "Not Found",
            ctx,
        )),
    };
    result.unwrap_or_else(|reply| *reply)
}

// ---------------------------------------------------------------------------------
// Errors and headers

/// `{"type":"error","error":{"type","message"},"request_id"}` (§2.5).
pub(crate) fn error(status: StatusCode, kind: &str, message: &str, ctx: &Ctx<'_>) -> Reply {
    let body = json!({
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": ctx.request_id,
    });
    Reply::json(status, body.to_string())
}

/// The `error.type` Anthropic uses for a status (§2.5).
fn kind_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// An error whose type follows from the status (for failures outside a handler).
pub(crate) fn status_error(status: StatusCode, message: &str, ctx: &Ctx<'_>) -> Reply {
    error(status, kind_for(status), message, ctx)
}

/// A refused request: boxed, as a `Reply` is large and refusals are the cold path.
type Rejected = Box<Reply>;

fn invalid(message: &str, ctx: &Ctx<'_>) -> Rejected {
    Box::new(error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        ctx,
    ))
}

/// The reply for an `error_rate` fault: the status with the body Anthropic sends for
/// it. A 429 here has no `retry-after` (the `rate_limit_rate` fault has one).
pub(crate) fn injected_error(status: u16, ctx: &Ctx<'_>) -> Reply {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match status.as_u16() {
        400 => "mock fault: injected bad request.",
        401 => "invalid x-api-key",
        402 => "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
        403 => "Your API key does not have permission to use the specified resource.",
        404 => "model: mock",
        413 => "Request exceeds the maximum allowed number of bytes.",
        429 => "Your organization has exceeded its acceleration limit. Please ramp up your usage gradually.",
        500 => "Internal server error",
        504 => "Request timed out",
        529 => "Overloaded",
        501..=599 => "mock fault: injected server error.",
        _ => "mock fault: injected client error.",
    };
    status_error(status, message, ctx)
}

/// The reply for a `rate_limit_rate` fault: 429 `rate_limit_error`, `retry-after`, and
/// the request limit exhausted until `retry_after_secs` from now.
pub(crate) fn rate_limited(retry_after_secs: u64, ctx: &Ctx<'_>) -> Reply {
    let mut reply = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization (mock-org) of 4,000 requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.",
        ctx,
    );
    let h = &mut reply.headers;
    h.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    h.insert(REQUESTS_REMAINING, HeaderValue::from_static("0"));
    let reset = SystemTime::now() + Duration::from_secs(retry_after_secs);
    if let Ok(reset) = HeaderValue::try_from(gen::rfc3339(reset, false)) {
        h.insert(REQUESTS_RESET, reset);
    }
    reply
}

/// 401 unless `x-api-key` (or `Authorization: Bearer`, as newer SDKs send) matches.
pub(crate) fn check_auth(headers: &HeaderMap, key: &str, ctx: &Ctx<'_>) -> Option<Reply> {
    let from_header = headers
        .get(X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match from_header.or(bearer) {
        Some(given) if given == key => None,
        None | Some("") => Some(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
            ctx,
        )),
        Some(_) => Some(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
            ctx,
        )),
    }
}

/// `req_011C…`, like Anthropic's request ids.
pub(crate) fn request_id(seed: u64, seq: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(gen::mix(seed ^ 0xA7_0001, seq));
    format!("req_011C{}", gen::alnum(&mut rng, 20))
}

const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
const ORGANIZATION: HeaderName = HeaderName::from_static("anthropic-organization-id");
const REQUESTS_REMAINING: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-requests-remaining");
const REQUESTS_RESET: HeaderName = HeaderName::from_static("anthropic-ratelimit-requests-reset");
/// (limit, remaining, reset) header names and values per limit dimension.
const LIMITS: [(&str, &str, &str, &str, &str); 4] = [
    (
        "anthropic-ratelimit-requests-limit",
        "4000",
        "anthropic-ratelimit-requests-remaining",
        "3999",
        "anthropic-ratelimit-requests-reset",
    ),
    (
        "anthropic-ratelimit-tokens-limit",
        "2000000",
        "anthropic-ratelimit-tokens-remaining",
        "1999000",
        "anthropic-ratelimit-tokens-reset",
    ),
    (
        "anthropic-ratelimit-input-tokens-limit",
        "2000000",
        "anthropic-ratelimit-input-tokens-remaining",
        "1999000",
        "anthropic-ratelimit-input-tokens-reset",
    ),
    (
        "anthropic-ratelimit-output-tokens-limit",
        "400000",
        "anthropic-ratelimit-output-tokens-remaining",
        "400000",
        "anthropic-ratelimit-output-tokens-reset",
    ),
];

/// Headers Anthropic puts on every response (§2.1): `request-id`, the organization,
/// and `anthropic-ratelimit-*` with RFC 3339 resets. Headers a 429 already set are kept.
pub(crate) fn stamp_headers(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(id) = HeaderValue::try_from(request_id) {
        headers.insert(REQUEST_ID, id);
    }
    headers.insert(
        ORGANIZATION,
        HeaderValue::from_static("00000000-0000-4000-8000-00000000m0ck"),
    );
    let now = HeaderValue::try_from(gen::rfc3339(SystemTime::now(), false)).ok();
    for (limit_name, limit, remaining_name, remaining, reset_name) in LIMITS {
        let pairs = [
            (limit_name, HeaderValue::from_static(limit)),
            (remaining_name, HeaderValue::from_static(remaining)),
        ];
        for (name, value) in pairs {
            headers
                .entry(HeaderName::from_static(name))
                .or_insert(value);
        }
        if let Some(now) = &now {
            headers
                .entry(HeaderName::from_static(reset_name))
                .or_insert_with(|| now.clone());
        }
    }
}

/// The `event: error` Anthropic sends when a stream fails after the 200 (§2.4).
const STREAM_ERROR: &[u8] = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

const SSE: &str = "text/event-stream; charset=utf-8";

// ---------------------------------------------------------------------------------
// Request parsing

fn parse_object(body: &[u8], ctx: &Ctx<'_>) -> Result<Map<String, Value>, Rejected> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid("Input should be a valid dictionary", ctx)),
        Err(e) => Err(invalid(
            &format!("There was an error parsing the body: {e}"),
            ctx,
        )),
    }
}

fn model_of<'a>(req: &'a Map<String, Value>, ctx: &Ctx<'_>) -> Result<&'a str, Rejected> {
    match req.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model),
        None | Some(Value::Null) => Err(invalid("model: Field required", ctx)),
        Some(_) => Err(invalid("model: Input should be a valid string", ctx)),
    }
}

/// Checks `messages` and every message's role and content.
fn messages_of<'a>(req: &'a Map<String, Value>, ctx: &Ctx<'_>) -> Result<&'a [Value], Rejected> {
    let messages = match req.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(invalid("messages: at least one message is required", ctx))
        }
        None | Some(Value::Null) => return Err(invalid("messages: Field required", ctx)),
        Some(_) => return Err(invalid("messages: Input should be a valid list", ctx)),
    };
    for (i, message) in messages.iter().enumerate() {
        match message.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            Some(_) => {
                let message = format!("messages.{i}.role: Input should be 'user' or 'assistant'");
                return Err(invalid(&message, ctx));
            }
            None => return Err(invalid(&format!("messages.{i}.role: Field required"), ctx)),
        }
        match message.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(blocks)) => {
                if let Some(j) = blocks
                    .iter()
                    .position(|b| b.get("type").and_then(Value::as_str).is_none())
                {
                    let message = format!("messages.{i}.content.{j}.type: Field required");
                    return Err(invalid(&message, ctx));
                }
            }
            None => {
                return Err(invalid(
                    &format!("messages.{i}.content: Field required"),
                    ctx,
                ))
            }
            Some(_) => {
                let message = format!("messages.{i}.content: Input should be a valid list");
                return Err(invalid(&message, ctx));
            }
        }
    }
    Ok(messages)
}

/// The text of a `content` (string or blocks), tool results included.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b
                    .get("text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                Some("tool_result") => b.get("content").map(text_of).unwrap_or_default(),
                Some("tool_use") => b.get("input").map(Value::to_string).unwrap_or_default(),
                _ => String::new(),
            })
            .collect(),
        _ => String::new(),
    }
}

fn input_tokens(req: &Map<String, Value>, messages: &[Value]) -> u64 {
    let system = req.get("system").map(text_of).unwrap_or_default();
    let bytes: usize = system.len()
        + messages
            .iter()
            .filter_map(|m| m.get("content"))
            .map(|c| text_of(c).len())
            .sum::<usize>();
    (bytes as u64 / 4).max(1)
}

/// What the assistant will say.
enum Plan<'a> {
    Text {
        tool_result: Option<String>,
    },
    Tool {
        name: &'a str,
        schema: Option<&'a Value>,
        preamble: bool,
    },
}

fn plan<'a>(
    req: &'a Map<String, Value>,
    messages: &'a [Value],
    ctx: &Ctx<'_>,
) -> Result<Plan<'a>, Rejected> {
    let last = messages.last();
    if last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("user") {
        let results: Vec<String> = last
            .and_then(|m| m.get("content"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .map(|b| b.get("content").map(text_of).unwrap_or_default())
            .collect();
        if !results.is_empty() {
            return Ok(Plan::Text {
                tool_result: Some(results.join("; ")),
            });
        }
    }
    let tools = req
        .get("tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, tool) in tools.iter().enumerate() {
        if tool.get("name").and_then(Value::as_str).is_none() {
            return Err(invalid(&format!("tools.{i}.name: Field required"), ctx));
        }
    }
    // Server tools (web search, ...) have no input_schema; the mock only calls custom ones.
    let mut custom = tools.iter().filter(|t| t.get("input_schema").is_some());
    let text = Plan::Text { tool_result: None };
    let choice = req.get("tool_choice");
    let kind = choice.and_then(|c| c.get("type")).and_then(Value::as_str);
    let as_plan = |tool: &'a Value, preamble: bool| {
        tool.get("name")
            .and_then(Value::as_str)
            .map(|name| Plan::Tool {
                name,
                schema: tool.get("input_schema"),
                preamble,
            })
    };
    match kind {
        Some("none") => Ok(text),
        Some("tool") => {
            let wanted = choice
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            custom
                .find(|t| t.get("name").and_then(Value::as_str) == Some(wanted))
                .and_then(|t| as_plan(t, false))
                .ok_or_else(|| {
                    invalid(
                        &format!("tool_choice.name: Tool '{wanted}' not found in tools"),
                        ctx,
                    )
                })
        }
        Some("any") => {
            let first = custom.next().and_then(|t| as_plan(t, false));
            first.ok_or_else(|| invalid("tool_choice: 'any' requires at least one tool", ctx))
        }
        None | Some("auto") => Ok(custom.next().and_then(|t| as_plan(t, true)).unwrap_or(text)),
        Some(other) => Err(invalid(
            &format!("tool_choice.type: Input tag '{other}' found using 'type' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'"),
            ctx,
        )),
    }
}

// ---------------------------------------------------------------------------------
// Messages (§2.2–2.4)

enum Block {
    Text(String),
    Tool {
        id: String,
        name: String,
        input: Value,
    },
}

impl Block {
    fn tokens(&self) -> u64 {
        match self {
            Self::Text(text) => gen::tokens_for(text.len()),
            Self::Tool { name, input, .. } => gen::tokens_for(name.len() + input.to_string().len()),
        }
    }

    fn json(&self) -> Value {
        match self {
            Self::Text(text) => json!({"type": "text", "text": text}),
            Self::Tool { id, name, input } => {
                json!({"type": "tool_use", "id": id, "name": name, "input": input})
            }
        }
    }
}

struct Answer<'a> {
    id: String,
    model: &'a str,
    blocks: Vec<Block>,
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    input_tokens: u64,
    output_tokens: u64,
}

fn messages(body: &[u8], ctx: &Ctx<'_>) -> Result<Reply, Rejected> {
    let req = parse_object(body, ctx)?;
    let model = model_of(&req, ctx)?;
    let max_tokens = match req.get("max_tokens") {
        None | Some(Value::Null) => return Err(invalid("max_tokens: Field required", ctx)),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n,
            _ => {
                return Err(invalid(
                    "max_tokens: Input should be a valid integer greater than or equal to 1",
                    ctx,
                ))
            }
        },
    };
    let messages = messages_of(&req, ctx)?;
    if let Some(t) = req.get("temperature").filter(|t| !t.is_null()) {
        if !t.as_f64().is_some_and(|t| (0.0..=1.0).contains(&t)) {
            return Err(invalid("temperature: range: 0..1", ctx));
        }
    }
    let stops: Vec<&str> = match req.get("stop_sequences") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).collect()
        }
        Some(_) => {
            return Err(invalid(
                "stop_sequences: Input should be a valid list of strings",
                ctx,
            ))
        }
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let plan = plan(&req, messages, ctx)?;

    let mut hash = Fnv::new();
    hash.write(model.as_bytes());
    if let Some(system) = req.get("system") {
        hash.write_json(system);
    }
    for message in messages {
        hash.write_json(message);
    }
    let content_seed = gen::mix(ctx.seed, hash.finish());
    let mut rng = fastrand::Rng::with_seed(content_seed);
    let mut ids = fastrand::Rng::with_seed(gen::mix(ctx.seed ^ 0xA7_C0DE, ctx.seq));
    let id = format!("msg_01{}", gen::alnum(&mut ids, 22));

    let (blocks, stop_reason, stop_sequence) = match plan {
        Plan::Text { tool_result } => {
            let mut text = gen::answer_text(model, tool_result.as_deref(), &mut rng);
            let (reason, matched) = if let Some(stop) = gen::cut_at_stop(&mut text, stops) {
                ("stop_sequence", Some(stop.to_owned()))
            } else if gen::truncate_to_tokens(&mut text, max_tokens) {
                ("max_tokens", None)
            } else {
                ("end_turn", None)
            };
            (vec![Block::Text(text)], reason, matched)
        }
        Plan::Tool {
            name,
            schema,
            preamble,
        } => {
            let mut blocks = Vec::with_capacity(2);
            if preamble {
                blocks.push(Block::Text(format!("I'll use the {name} tool.")));
            }
            blocks.push(Block::Tool {
                id: format!("toolu_01{}", gen::alnum(&mut ids, 22)),
                name: name.to_owned(),
                input: gen::mock_args(schema),
            });
            (blocks, "tool_use", None)
        }
    };
    let answer = Answer {
        id,
        model,
        output_tokens: blocks.iter().map(Block::tokens).sum(),
        blocks,
        stop_reason,
        stop_sequence,
        input_tokens: input_tokens(&req, messages),
    };
    if stream {
        Ok(Reply::stream(stream_events(&answer, ctx.chunks, &mut rng)))
    } else {
        Ok(Reply::json(StatusCode::OK, message_body(&answer, ctx.seq)))
    }
}

fn usage(answer: &Answer<'_>, output_tokens: u64) -> Value {
    json!({
        "input_tokens": answer.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    })
}

fn message_body(answer: &Answer<'_>, seq: u64) -> Bytes {
    let content: Vec<Value> = answer.blocks.iter().map(Block::json).collect();
    let body = json!({
        "id": answer.id,
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": content,
        "stop_reason": answer.stop_reason,
        "stop_sequence": answer.stop_sequence,
        "usage": usage(answer, answer.output_tokens),
        // Deliberately unknown to clients: parsers must ignore fields they don't know.
        "x_mock": {"seq": seq},
    });
    Bytes::from(body.to_string())
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

const PING: &[u8] = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";

/// The §2.4 sequence: `message_start`; per block `content_block_start`,
/// `content_block_delta`s (`text_delta`, or `input_json_delta` starting with an empty
/// fragment), `content_block_stop`; `message_delta` with the stop reason and
/// cumulative usage; `message_stop`. One `ping` sits at a seeded position after
/// `message_start`. Each `content_block_delta` is a content chunk for
/// `stream_error_after_chunks`.
fn stream_events(answer: &Answer<'_>, chunks: usize, rng: &mut fastrand::Rng) -> Stream {
    let mut events = Vec::with_capacity(answer.blocks.len() * (chunks + 3) + 4);
    let mut breaks = Vec::with_capacity(answer.blocks.len() * (chunks + 1) + 1);
    let start = json!({"type": "message_start", "message": {
        "id": answer.id, "type": "message", "role": "assistant", "model": answer.model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": usage(answer, 1),
    }});
    events.push(event("message_start", &start));
    breaks.push(events.len());
    for (index, block) in answer.blocks.iter().enumerate() {
        let (opening, deltas) = match block {
            Block::Text(text) => {
                let deltas: Vec<Value> = gen::split_pieces(text, chunks)
                    .into_iter()
                    .map(|piece| json!({"type": "text_delta", "text": piece}))
                    .collect();
                (json!({"type": "text", "text": ""}), deltas)
            }
            Block::Tool { id, name, input } => {
                let input = input.to_string();
                let deltas: Vec<Value> = std::iter::once("")
                    .chain(gen::split_pieces(&input, chunks))
                    .map(|piece| json!({"type": "input_json_delta", "partial_json": piece}))
                    .collect();
                let opening = json!({
                    "type": "tool_use", "id": id, "name": name, "input": {},
                    "caller": {"type": "direct"}
                });
                (opening, deltas)
            }
        };
        let start =
            json!({"type": "content_block_start", "index": index, "content_block": opening});
        events.push(event("content_block_start", &start));
        for delta in deltas {
            let delta = json!({"type": "content_block_delta", "index": index, "delta": delta});
            events.push(event("content_block_delta", &delta));
            breaks.push(events.len());
        }
        let stop = json!({"type": "content_block_stop", "index": index});
        events.push(event("content_block_stop", &stop));
    }
    let ping_at = rng.usize(1..=events.len());
    events.insert(ping_at, Bytes::from_static(PING));
    for b in &mut breaks {
        if *b > ping_at {
            *b += 1;
        }
    }
    let delta = json!({
        "type": "message_delta",
        "delta": {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence},
        "usage": {"output_tokens": answer.output_tokens},
    });
    events.push(event("message_delta", &delta));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    Stream {
        content_type: SSE,
        events,
        breaks,
        error: [STREAM_ERROR; 2],
    }
}

fn count_tokens(body: &[u8], ctx: &Ctx<'_>) -> Result<Reply, Rejected> {
    let req = parse_object(body, ctx)?;
    model_of(&req, ctx)?;
    let messages = messages_of(&req, ctx)?;
    let body = json!({"input_tokens": input_tokens(&req, messages)});
    Ok(Reply::json(StatusCode::OK, body.to_string()))
}

// ---------------------------------------------------------------------------------
// Models (§2.7)

const MODELS: [(&str, &str, &str); 3] = [
    (
        "claude-sonnet-4-20250514",
        "Claude Sonnet 4",
        "2025-05-22T00:00:00Z",
    ),
    (
        "claude-opus-4-1-20250805",
        "Claude Opus 4.1",
        "2025-08-05T00:00:00Z",
    ),
    (
        "claude-3-5-haiku-20241022",
        "Claude Haiku 3.5",
        "2024-10-22T00:00:00Z",
    ),
];

fn model_json(id: &str, display_name: &str, created_at: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": display_name, "created_at": created_at})
}

fn models() -> Reply {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|(id, name, created)| model_json(id, name, created))
        .collect();
    let body = json!({
        "data": data,
        "has_more": false,
        "first_id": MODELS[0].0,
        "last_id": MODELS[MODELS.len() - 1].0,
    });
    Reply::json(StatusCode::OK, body.to_string())
}

/// Any id is served, as the messages endpoint accepts any model name.
fn model(id: &str) -> Reply {
    let body = match MODELS.iter().find(|(known, _, _)| *known == id) {
        Some((id, name, created)) => model_json(id, name, created),
        None => model_json(id, id, "2025-01-01T00:00:00Z"),
    };
    Reply::json(StatusCode::OK, body.to_string())
}
