//! The OpenAI flavor (PROVIDERS.md §1): routes, request validation, response bodies,
//! SSE event sequences, error shapes and response headers.
//!
//! Pure: request bytes in, [`Reply`] out. Pacing, faults and I/O live in `server`.
//! Content is a function of the seed and the request (model + messages, or model +
//! input); ids are a function of the seed and the request's arrival number.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::body::{Ctx, Reply, Stream};
use super::gen::{self, unix_now, Fnv};

/// Which endpoint a request is for; decided before the body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    ChatCompletions,
    Responses,
    Embeddings,
    Models,
    Model,
    NotFound,
}

impl Route {
    pub(crate) fn of(method: &Method, path: &str) -> Self {
        match (method, path) {
            (&Method::POST, "/v1/chat/completions") => Self::ChatCompletions,
            (&Method::POST, "/v1/responses") => Self::Responses,
            (&Method::POST, "/v1/embeddings") => Self::Embeddings,
            (&Method::GET, "/v1/models") => Self::Models,
            (&Method::GET, p) if p.len() > MODEL_PREFIX.len() && p.starts_with(MODEL_PREFIX) => {
                Self::Model
            }
            _ => Self::NotFound,
        }
    }
}

const MODEL_PREFIX: &str = "/v1/models/";

/// Answers one (non-faulted, authenticated) request.
pub(crate) fn serve(
    route: Route,
    method: &Method,
    path: &str,
    body: &[u8],
    ctx: &Ctx<'_>,
) -> Reply {
    let result = match route {
        Route::ChatCompletions => chat_completions(body, ctx),
        Route::Responses => super::responses::create(body, ctx),
        Route::Embeddings => embeddings(body, ctx),
        Route::Models => Ok(models()),
        Route::Model => Ok(model(path.get(MODEL_PREFIX.len()..).unwrap_or_default())),
        Route::NotFound => Err(Box::new(not_found(method, path))),
    };
    result.unwrap_or_else(|reply| *reply)
}

// ---------------------------------------------------------------------------------
// Errors and headers

/// `{"error":{"message","type","param","code"}}` (§1.5).
pub(crate) fn error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Bytes {
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    Bytes::from(body.to_string())
}

pub(crate) fn error(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Reply {
    Reply::json(status, error_body(message, kind, param, code))
}

/// A refused request: boxed, as a `Reply` is large and refusals are the cold path.
type Rejected = Box<Reply>;

fn invalid(message: &str, param: Option<&str>, code: Option<&str>) -> Rejected {
    Box::new(error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        param,
        code,
    ))
}

fn not_found(method: &Method, path: &str) -> Reply {
    let message = format!("Invalid URL ({method} {path})");
    error(
        StatusCode::NOT_FOUND,
        &message,
        "invalid_request_error",
        None,
        None,
    )
}

/// An error whose type follows from the status (for failures outside a handler).
pub(crate) fn status_error(status: StatusCode, message: &str) -> Reply {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    error(status, message, kind, None, None)
}

/// The reply for an `error_rate` fault: the status with the body OpenAI sends for it.
pub(crate) fn injected_error(status: u16) -> Reply {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (message, kind, code) = match status.as_u16() {
        400 => ("mock fault: injected bad request.", "invalid_request_error", None),
        401 => (
            "Incorrect API key provided: sk-mock***. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        403 => (
            "Country, region, or territory not supported",
            "request_forbidden",
            Some("unsupported_country_region_territory"),
        ),
        404 => (
            "The model `mock` does not exist or you do not have access to it.",
            "invalid_request_error",
            Some("model_not_found"),
        ),
        // A 429 that is not a rate limit is a quota error: no retry-after (§1.6).
        429 => (
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            Some("insufficient_quota"),
        ),
        503 => ("The engine is currently overloaded, please try again later", "server_error", None),
        500..=599 => (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
        _ => ("mock fault: injected client error.", "invalid_request_error", None),
    };
    error(status, message, kind, None, code)
}

/// The reply for a `rate_limit_rate` fault: 429, `retry-after`, `x-ratelimit-*`.
pub(crate) fn rate_limited(retry_after_secs: u64) -> Reply {
    let wait = go_duration(retry_after_secs);
    let message = format!(
        "Rate limit reached in organization org-mock on requests per min (RPM): Limit 10000, Used 10000, Requested 1. Please try again in {wait}. Visit https://platform.openai.com/account/rate-limits to learn more."
    );
    let mut reply = error(
        StatusCode::TOO_MANY_REQUESTS,
        &message,
        "requests",
        None,
        Some("rate_limit_exceeded"),
    );
    let h = &mut reply.headers;
    h.insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs),
    );
    h.insert(LIMIT_REQUESTS, HeaderValue::from_static("10000"));
    h.insert(REMAINING_REQUESTS, HeaderValue::from_static("0"));
    if let Ok(wait) = HeaderValue::try_from(wait) {
        h.insert(RESET_REQUESTS, wait);
    }
    h.insert(LIMIT_TOKENS, HeaderValue::from_static("30000000"));
    h.insert(REMAINING_TOKENS, HeaderValue::from_static("30000000"));
    h.insert(RESET_TOKENS, HeaderValue::from_static("0s"));
    reply
}

/// Go-style duration string, as in `x-ratelimit-reset-*` (`1s`, `6m0s`, `1h2m3s`).
fn go_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m{}s", secs / 3600, secs % 3600 / 60, secs % 60),
    }
}

/// 401 unless `Authorization: Bearer <key>` matches.
pub(crate) fn check_auth(headers: &HeaderMap, key: &str) -> Option<Reply> {
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(given) if given == key => None,
        None | Some("") => Some(error(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). You can obtain an API key from https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
        )),
        Some(given) => {
            let message = format!(
                "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                mask(given)
            );
            Some(error(
                StatusCode::UNAUTHORIZED,
                &message,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ))
        }
    }
}

fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars.iter().take(3).collect();
    let tail: String = chars.iter().skip(chars.len() - 4).collect();
    format!("{head}***{tail}")
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const PROCESSING_MS: HeaderName = HeaderName::from_static("openai-processing-ms");
const VERSION: HeaderName = HeaderName::from_static("openai-version");
const ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// Headers OpenAI puts on every response (§1.6). Rate-limit headers already set by a
/// 429 are kept.
pub(crate) fn stamp_headers(headers: &mut HeaderMap, request_id: &str, processing: Duration) {
    if let Ok(id) = HeaderValue::try_from(request_id) {
        headers.insert(X_REQUEST_ID, id);
    }
    let ms = u64::try_from(processing.as_millis()).unwrap_or(u64::MAX);
    headers.insert(PROCESSING_MS, HeaderValue::from(ms));
    headers.insert(VERSION, HeaderValue::from_static("2020-10-01"));
    headers.insert(ORGANIZATION, HeaderValue::from_static("org-mock"));
    for (name, value) in [
        (LIMIT_REQUESTS, "10000"),
        (LIMIT_TOKENS, "30000000"),
        (REMAINING_REQUESTS, "9999"),
        (REMAINING_TOKENS, "29999000"),
        (RESET_REQUESTS, "6ms"),
        (RESET_TOKENS, "2ms"),
    ] {
        headers
            .entry(name)
            .or_insert_with(|| HeaderValue::from_static(value));
    }
}

// ---------------------------------------------------------------------------------
// Request parsing helpers

const BAD_JSON: &str = "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)";

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Rejected> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid(
            "Invalid type for request body: expected an object.",
            None,
            Some("invalid_type"),
        )),
        Err(_) => Err(invalid(BAD_JSON, None, None)),
    }
}

fn model_of(req: &Map<String, Value>) -> Result<&str, Rejected> {
    match req.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model),
        None | Some(Value::Null) | Some(Value::String(_)) => {
            Err(invalid("you must provide a model parameter", None, None))
        }
        Some(_) => Err(invalid(
            "Invalid type for 'model': expected a string.",
            Some("model"),
            Some("invalid_type"),
        )),
    }
}

fn text_len(content: &Value) -> usize {
    match content {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------
// Chat completions (§1.2–1.4)

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn messages_of(req: &Map<String, Value>) -> Result<&[Value], Rejected> {
    let messages = match req.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                Some("messages"),
                Some("empty_array"),
            ))
        }
        None | Some(Value::Null) => {
            return Err(invalid(
                "Missing required parameter: 'messages'.",
                Some("messages"),
                Some("missing_required_parameter"),
            ))
        }
        Some(_) => {
            return Err(invalid(
                "Invalid type for 'messages': expected an array of objects.",
                Some("messages"),
                Some("invalid_type"),
            ))
        }
    };
    for (i, message) in messages.iter().enumerate() {
        match message.get("role") {
            Some(Value::String(role)) if ROLES.contains(&role.as_str()) => {}
            None => {
                let param = format!("messages[{i}].role");
                let message = format!("Missing required parameter: '{param}'.");
                return Err(invalid(
                    &message,
                    Some(&param),
                    Some("missing_required_parameter"),
                ));
            }
            Some(other) => {
                let param = format!("messages[{i}].role");
                let message = format!(
                    "Invalid value: {other}. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'."
                );
                return Err(invalid(&message, Some(&param), Some("invalid_value")));
            }
        }
    }
    Ok(messages)
}

/// What the assistant will say.
enum Plan<'a> {
    Text {
        tool_result: Option<String>,
    },
    Tool {
        name: &'a str,
        parameters: Option<&'a Value>,
    },
}

/// Tools are called when offered, unless `tool_choice` is `"none"` or the conversation
/// ends with a tool result (then the answer quotes that result).
fn plan<'a>(req: &'a Map<String, Value>, messages: &'a [Value]) -> Result<Plan<'a>, Rejected> {
    let last = messages.last();
    if last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("tool") {
        let tool_result = last.and_then(|m| m.get("content")).map(gen::text_of);
        return Ok(Plan::Text { tool_result });
    }
    let mut functions = req
        .get("tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .filter_map(|t| t.get("function"));
    let as_plan = |f: &'a Value| {
        f.get("name")
            .and_then(Value::as_str)
            .map(|name| Plan::Tool {
                name,
                parameters: f.get("parameters"),
            })
    };
    let text = Plan::Text { tool_result: None };
    match req.get("tool_choice") {
        Some(Value::String(choice)) if choice == "none" => Ok(text),
        Some(Value::Object(choice))
            if choice.get("type").and_then(Value::as_str) == Some("function") =>
        {
            let wanted = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            functions
                .find(|f| f.get("name").and_then(Value::as_str) == Some(wanted))
                .and_then(as_plan)
                .ok_or_else(|| {
                    let message = format!(
                        "Invalid value for 'tool_choice': function '{wanted}' is not among the provided tools."
                    );
                    invalid(&message, Some("tool_choice"), Some("invalid_value"))
                })
        }
        _ => Ok(functions.next().and_then(as_plan).unwrap_or(text)),
    }
}

/// The arguments JSON for a tool call: see [`gen::mock_args`].
fn mock_arguments(parameters: Option<&Value>) -> String {
    gen::mock_args(parameters).to_string()
}

enum Content {
    Text(String),
    Tool {
        id: String,
        name: String,
        arguments: String,
    },
}

struct Choice {
    content: Content,
    finish: &'static str,
    tokens: u64,
}

fn chat_completions(body: &[u8], ctx: &Ctx<'_>) -> Result<Reply, Rejected> {
    let req = parse_object(body)?;
    let model = model_of(&req)?;
    let messages = messages_of(&req)?;
    let n = match req.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=128) => n as usize,
            _ => {
                return Err(invalid(
                    "Invalid 'n': expected an integer between 1 and 128.",
                    Some("n"),
                    Some("invalid_value"),
                ))
            }
        },
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let stream_options = req.get("stream_options").filter(|v| !v.is_null());
    if stream_options.is_some() && !stream {
        return Err(invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
            None,
        ));
    }
    let option = |key: &str| {
        stream_options
            .and_then(|o| o.get(key))
            .and_then(Value::as_bool)
    };
    let include_usage = option("include_usage").unwrap_or(false);
    let obfuscate = option("include_obfuscation").unwrap_or(true);
    let max_tokens = req
        .get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| req.get("max_tokens").and_then(Value::as_u64));
    let plan = plan(&req, messages)?;

    let mut content_hash = Fnv::new();
    content_hash.write(model.as_bytes());
    for message in messages {
        content_hash.write_json(message);
    }
    let content_seed = gen::mix(ctx.seed, content_hash.finish());
    let mut ids = fastrand::Rng::with_seed(gen::mix(ctx.seed ^ 0xC4A7_C0DE, ctx.seq));
    let id = format!("chatcmpl-{}", gen::alnum(&mut ids, 29));

    let choices: Vec<Choice> = (0..n)
        .map(|i| {
            let mut rng = fastrand::Rng::with_seed(gen::mix(content_seed, i as u64));
            match &plan {
                Plan::Text { tool_result } => {
                    text_choice(model, tool_result.as_deref(), max_tokens, &mut rng)
                }
                Plan::Tool { name, parameters } => {
                    let arguments = mock_arguments(*parameters);
                    Choice {
                        tokens: gen::tokens_for(name.len() + arguments.len()),
                        content: Content::Tool {
                            id: format!("call_{}", gen::alnum(&mut ids, 24)),
                            name: (*name).to_owned(),
                            arguments,
                        },
                        finish: "tool_calls",
                    }
                }
            }
        })
        .collect();

    let prompt_chars: usize = messages
        .iter()
        .filter_map(|m| m.get("content"))
        .map(text_len)
        .sum();
    let prompt_tokens = (prompt_chars as u64 / 4).max(1);
    let completion_tokens: u64 = choices.iter().map(|c| c.tokens).sum();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    });
    let head = Head {
        id: &id,
        created: unix_now(),
        model,
        fingerprint: ctx.fingerprint,
    };
    if stream {
        let shape = StreamShape {
            chunks: ctx.chunks,
            include_usage,
            obfuscate,
        };
        let pad_rng = fastrand::Rng::with_seed(gen::mix(content_seed, 0x0bf5));
        Ok(Reply::stream(stream_events(
            &head, &choices, &usage, &shape, pad_rng,
        )))
    } else {
        Ok(Reply::json(
            StatusCode::OK,
            completion_body(&head, &choices, usage, ctx.seq),
        ))
    }
}

fn text_choice(
    model: &str,
    tool_result: Option<&str>,
    max_tokens: Option<u64>,
    rng: &mut fastrand::Rng,
) -> Choice {
    let mut text = gen::answer_text(model, tool_result, rng);
    let mut finish = "stop";
    if max_tokens.is_some_and(|limit| gen::truncate_to_tokens(&mut text, limit)) {
        finish = "length";
    }
    Choice {
        tokens: gen::tokens_for(text.len()),
        content: Content::Text(text),
        finish,
    }
}

/// Fields shared by a completion and all chunks of its stream.
struct Head<'a> {
    id: &'a str,
    created: u64,
    model: &'a str,
    fingerprint: &'a str,
}

fn completion_body(head: &Head<'_>, choices: &[Choice], usage: Value, seq: u64) -> Bytes {
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, choice)| {
            let message = match &choice.content {
                Content::Text(text) => json!({
                    "role": "assistant", "content": text, "refusal": null, "annotations": []
                }),
                Content::Tool {
                    id,
                    name,
                    arguments,
                } => json!({
                    "role": "assistant", "content": null, "refusal": null, "annotations": [],
                    "tool_calls": [{
                        "id": id, "type": "function",
                        "function": {"name": name, "arguments": arguments}
                    }]
                }),
            };
            json!({
                "index": index, "message": message, "logprobs": null,
                "finish_reason": choice.finish
            })
        })
        .collect();
    let body = json!({
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": choices,
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": head.fingerprint,
        // Deliberately unknown to clients: parsers must ignore fields they don't know.
        "x_mock": {"seq": seq},
    });
    Bytes::from(body.to_string())
}

struct StreamShape {
    chunks: usize,
    include_usage: bool,
    obfuscate: bool,
}

/// Serialises `chat.completion.chunk` events. The fields shared by every chunk are
/// rendered once into `prefix`; each event only serialises its `choices`.
struct Events {
    prefix: String,
    include_usage: bool,
    obfuscate: bool,
    pad: fastrand::Rng,
    out: Vec<Bytes>,
}

impl Events {
    fn push(&mut self, choices: &str, usage: Option<&Value>) {
        let mut event = String::with_capacity(self.prefix.len() + choices.len() + 64);
        event.push_str(&self.prefix);
        event.push_str(choices);
        match usage {
            Some(usage) => {
                event.push_str(",\"usage\":");
                event.push_str(&usage.to_string());
            }
            None if self.include_usage => event.push_str(",\"usage\":null"),
            None => {}
        }
        if self.obfuscate {
            let len = self.pad.usize(1..=12);
            event.push_str(",\"obfuscation\":\"");
            event.push_str(&gen::alnum(&mut self.pad, len));
            event.push('"');
        }
        event.push_str("}\n\n");
        self.out.push(Bytes::from(event));
    }

    fn push_choice(&mut self, index: usize, delta: Value, finish: Option<&str>) {
        let choices = json!([{
            "index": index, "delta": delta, "logprobs": null, "finish_reason": finish
        }]);
        self.push(&choices.to_string(), None);
    }
}

/// The §1.4 sequence: role chunk per choice, content or argument pieces (choices
/// interleaved), a finish chunk per choice with `delta: {}`, the usage chunk when asked
/// for, then `data: [DONE]`. Each content or argument piece is a content chunk for
/// `stream_error_after_chunks`.
fn stream_events(
    head: &Head<'_>,
    choices: &[Choice],
    usage: &Value,
    shape: &StreamShape,
    pad: fastrand::Rng,
) -> Stream {
    let prefix = format!(
        "data: {{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\"service_tier\":\"default\",\"system_fingerprint\":{},\"choices\":",
        Value::from(head.id),
        head.created,
        Value::from(head.model),
        Value::from(head.fingerprint),
    );
    let pieces: Vec<Vec<&str>> = choices
        .iter()
        .map(|c| match &c.content {
            Content::Text(text) => gen::split_pieces(text, shape.chunks),
            Content::Tool { arguments, .. } => gen::split_pieces(arguments, shape.chunks),
        })
        .collect();
    let rounds = pieces.iter().map(Vec::len).max().unwrap_or(0);
    let mut events = Events {
        prefix,
        include_usage: shape.include_usage,
        obfuscate: shape.obfuscate,
        pad,
        out: Vec::with_capacity(choices.len() * (rounds + 2) + 2),
    };
    for (index, choice) in choices.iter().enumerate() {
        let delta = match &choice.content {
            Content::Text(_) => json!({"role": "assistant", "content": "", "refusal": null}),
            Content::Tool { id, name, .. } => json!({
                "role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{
                    "index": 0, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}
                }]
            }),
        };
        events.push_choice(index, delta, None);
    }
    let mut breaks = Vec::with_capacity(rounds * choices.len() + 1);
    breaks.push(events.out.len());
    for round in 0..rounds {
        for (index, choice) in choices.iter().enumerate() {
            let Some(piece) = pieces.get(index).and_then(|p| p.get(round)) else {
                continue;
            };
            let delta = match choice.content {
                Content::Text(_) => json!({"content": piece}),
                Content::Tool { .. } => json!({
                    "tool_calls": [{"index": 0, "function": {"arguments": piece}}]
                }),
            };
            events.push_choice(index, delta, None);
            breaks.push(events.out.len());
        }
    }
    for (index, choice) in choices.iter().enumerate() {
        events.push_choice(index, json!({}), Some(choice.finish));
    }
    if shape.include_usage {
        events.push("[]", Some(usage));
    }
    events.out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Stream {
        content_type: SSE,
        events: events.out,
        breaks,
        error: [STREAM_ERROR; 2],
    }
}

pub(crate) const SSE: &str = "text/event-stream; charset=utf-8";

/// What OpenAI sends when a stream fails after the 200 (§0, §1.4): a data event whose
/// JSON has a top-level `error`, and no `[DONE]`.
const STREAM_ERROR: &[u8] = b"data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";

// ---------------------------------------------------------------------------------
// Embeddings (§1.9)

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

const MAX_DIMENSIONS: u64 = 4096;

fn embeddings(body: &[u8], ctx: &Ctx<'_>) -> Result<Reply, Rejected> {
    let req = parse_object(body)?;
    let model = model_of(&req)?;
    let bad_input = || {
        invalid(
            "Invalid 'input': expected a non-empty string, an array of non-empty strings, an array of tokens, or an array of token arrays (at most 2048 items).",
            Some("input"),
            Some("invalid_value"),
        )
    };
    let is_tokens = |v: &Value| {
        v.as_array()
            .is_some_and(|t| !t.is_empty() && t.iter().all(Value::is_u64))
    };
    let is_text = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
    // Each input and its token count.
    let inputs: Vec<(&Value, u64)> = match req.get("input") {
        None | Some(Value::Null) => {
            return Err(invalid(
                "Missing required parameter: 'input'.",
                Some("input"),
                Some("missing_required_parameter"),
            ))
        }
        Some(text @ Value::String(s)) if !s.is_empty() => vec![(text, gen::tokens_for(s.len()))],
        Some(tokens @ Value::Array(t)) if is_tokens(tokens) && t.len() <= 2048 => {
            vec![(tokens, t.len() as u64)]
        }
        Some(Value::Array(items))
            if !items.is_empty() && items.len() <= 2048 && items.iter().all(is_text) =>
        {
            items
                .iter()
                .map(|v| (v, gen::tokens_for(v.as_str().map_or(0, str::len))))
                .collect()
        }
        Some(Value::Array(items))
            if !items.is_empty() && items.len() <= 2048 && items.iter().all(is_tokens) =>
        {
            items
                .iter()
                .map(|v| (v, v.as_array().map_or(0, Vec::len) as u64))
                .collect()
        }
        Some(_) => return Err(bad_input()),
    };
    let base64 = match req.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(invalid(
                "Invalid value for 'encoding_format': expected 'float' or 'base64'.",
                Some("encoding_format"),
                Some("invalid_value"),
            ))
        }
    };
    let dimensions = match req.get("dimensions") {
        None | Some(Value::Null) => 8,
        Some(v) => match v.as_u64() {
            Some(d @ 1..=MAX_DIMENSIONS) => d as usize,
            _ => {
                return Err(invalid(
                    "Invalid 'dimensions': expected an integer between 1 and 4096.",
                    Some("dimensions"),
                    Some("invalid_value"),
                ))
            }
        },
    };
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, (input, _))| {
            let mut hash = Fnv::new();
            hash.write(model.as_bytes());
            hash.write_json(input);
            let vector = unit_vector(gen::mix(ctx.seed, hash.finish()), dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(gen::base64(&bytes))
            } else {
                Vector::Float(vector)
            };
            Embedding {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let tokens = inputs.iter().map(|(_, t)| t).sum();
    let list = EmbeddingList {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    match serde_json::to_vec(&list) {
        Ok(body) => Ok(Reply::json(StatusCode::OK, body)),
        Err(e) => Err(Box::new(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("mock: could not serialise embeddings: {e}"),
            "server_error",
            None,
            None,
        ))),
    }
}

/// A deterministic vector of length 1.
fn unit_vector(seed: u64, dimensions: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v: Vec<f32> = (0..dimensions).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

// ---------------------------------------------------------------------------------
// Models (§1.8)

const MODELS: [(&str, u64); 3] = [
    ("gpt-4o-mini", 1_721_172_741),
    ("gpt-4o", 1_715_367_049),
    ("text-embedding-3-small", 1_705_948_997),
];

fn models() -> Reply {
    let mut data: Vec<Value> = MODELS
        .iter()
        .map(|(id, created)| json!({"id": id, "object": "model", "created": created, "owned_by": "system"}))
        .collect();
    data.push(json!({
        "id": "gpt-mock-legacy", "object": "model", "created": 1_686_935_002,
        "owned_by": "openai", "shutdown_date": "2026-10-23"
    }));
    Reply::json(
        StatusCode::OK,
        json!({"object": "list", "data": data}).to_string(),
    )
}

/// Any id is served, as the chat endpoint accepts any model name.
fn model(id: &str) -> Reply {
    let created = MODELS
        .iter()
        .find(|(known, _)| *known == id)
        .map_or(1_686_935_002, |(_, created)| *created);
    let body = json!({"id": id, "object": "model", "created": created, "owned_by": "system"});
    Reply::json(StatusCode::OK, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_arguments_fill_required_properties() {
        let schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "maybe": {"type": ["null", "number"]},
                "extra": {"type": "object"},
                "optional": {"type": "string"}
            },
            "required": ["city", "days", "metric", "unit", "maybe", "extra"]
        });
        let args: Value = serde_json::from_str(&mock_arguments(Some(&schema))).unwrap_or_default();
        assert_eq!(
            args,
            json!({"city": "mock", "days": 1, "metric": true, "unit": "c", "maybe": 1, "extra": null})
        );
        assert_eq!(mock_arguments(None), "{}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(1), "1s");
        assert_eq!(go_duration(360), "6m0s");
        assert_eq!(go_duration(3723), "1h2m3s");
    }

    #[test]
    fn keys_are_masked() {
        assert_eq!(mask("short"), "*****");
        assert_eq!(mask("sk-abcdefghijklmnop"), "sk-***mnop");
    }
}
