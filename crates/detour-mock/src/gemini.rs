//! The Gemini flavor (PROVIDERS.md §3): `POST /v1beta/models/{model}:generateContent`,
//! `…:streamGenerateContent` (`?alt=sse`, or a JSON array without it),
//! `…:countTokens`, `GET /v1beta/models[/{model}]` (`/v1/` works too), Google's error
//! shape and headers.
//!
//! Pure like the other flavors: request bytes in, [`Reply`] out. Request field names
//! are accepted in lowerCamelCase and snake_case, as Google's front end does; unknown
//! top-level and `generationConfig` fields are rejected with 400 as Gemini does, which
//! catches OpenAI-shaped fields leaking through a gateway.
//!
//! What the mock answers:
//! - the last user turn holds `functionResponse` parts → text quoting their responses;
//! - function declarations are offered and the mode is not `NONE` → one whole
//!   `functionCall` part (no `id`) for the first declaration (with `ANY`, the first one
//!   in `allowedFunctionNames`), `args` built from `parametersJsonSchema` or
//!   `parameters`, `finishReason: STOP`;
//! - otherwise text, cut at the first `stopSequences` match (`STOP`) or at
//!   `maxOutputTokens` (`MAX_TOKENS`).
//!
//! Models named `gemini-3…` also act out thought signatures (§3.2): each `functionCall`
//! part they return carries a `thoughtSignature` (base64 of
//! `mock-thought-signature:{name}`), and a request whose current turn holds a model
//! `functionCall` without that signature gets 400 (Google's documented skip values
//! `skip_thought_signature_validator` / `context_engineering_is_the_way_to_go` pass).

use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{json, Map, Value};

use super::body::{Ctx, Reply, Stream};
use super::gen::{self, Fnv};

/// Which endpoint a request is for; decided before the body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Generate,
    Stream,
    CountTokens,
    Models,
    Model,
    NotFound,
}

/// `(version, rest)` for `/v1beta/…` and `/v1/…`.
fn versioned(path: &str) -> Option<&str> {
    path.strip_prefix("/v1beta/")
        .or_else(|| path.strip_prefix("/v1/"))
}

/// `models/{model}:{method}` → `(model, method)`.
fn model_method(path: &str) -> Option<(&str, &str)> {
    let rest = versioned(path)?.strip_prefix("models/")?;
    let (model, method) = rest.rsplit_once(':')?;
    (!model.is_empty() && !model.contains('/')).then_some((model, method))
}

impl Route {
    pub(crate) fn of(method: &Method, path: &str) -> Self {
        if method == Method::POST {
            return match model_method(path) {
                Some((_, "generateContent")) => Self::Generate,
                Some((_, "streamGenerateContent")) => Self::Stream,
                Some((_, "countTokens")) => Self::CountTokens,
                _ => Self::NotFound,
            };
        }
        if method != Method::GET {
            return Self::NotFound;
        }
        match versioned(path) {
            Some("models") => Self::Models,
            Some(rest)
                if rest
                    .strip_prefix("models/")
                    .is_some_and(|m| !m.is_empty() && !m.contains([':', '/'])) =>
            {
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
    query: Option<&str>,
    body: &[u8],
    ctx: &Ctx<'_>,
) -> Reply {
    let model = model_method(path).map_or("", |(model, _)| model);
    let result = match route {
        Route::Generate => generate(model, body, None, ctx),
        Route::Stream => {
            let sse = query_param(query, "alt").as_deref() == Some("sse");
            generate(model, body, Some(sse), ctx)
        }
        Route::CountTokens => count_tokens(body),
        Route::Models => Ok(models()),
        Route::Model => {
            let id = versioned(path)
                .and_then(|r| r.strip_prefix("models/"))
                .unwrap_or_default();
            Ok(Reply::json(StatusCode::OK, model_json(id).to_string()))
        }
        Route::NotFound => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            &format!("The requested URL {path} was not found on this server."),
            None,
        ))),
    };
    result.unwrap_or_else(|reply| *reply)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

// ---------------------------------------------------------------------------------
// Errors and headers

/// The canonical `google.rpc.Code` name for an HTTP status (§3.5).
fn status_name(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        500..=599 => "INTERNAL",
        _ => "FAILED_PRECONDITION",
    }
}

/// `{"error":{"code","message","status"[,"details"]}}` (§3.5).
fn error(status: StatusCode, message: &str, details: Option<Value>) -> Reply {
    let mut error = json!({
        "code": status.as_u16(),
        "message": message,
        "status": status_name(status),
    });
    if let Some(details) = details {
        error["details"] = details;
    }
    Reply::json(status, json!({ "error": error }).to_string())
}

/// An error whose status name follows from the status (for failures outside a handler).
pub(crate) fn status_error(status: StatusCode, message: &str) -> Reply {
    error(status, message, None)
}

type Rejected = Box<Reply>;

fn invalid(message: &str) -> Rejected {
    Box::new(error(StatusCode::BAD_REQUEST, message, None))
}

/// The reply for an `error_rate` fault. A 429 here has no `RetryInfo` (the
/// `rate_limit_rate` fault has one).
pub(crate) fn injected_error(status: u16) -> Reply {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match status.as_u16() {
        400 => "Request contains an invalid argument.",
        401 => "Request had invalid authentication credentials.",
        403 => "The caller does not have permission",
        404 => "models/mock is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods.",
        429 => "You exceeded your current quota, please check your plan and billing details.",
        500 => "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
        503 => "The model is overloaded. Please try again later.",
        504 => "Deadline expired before operation could complete.",
        501..=599 => "mock fault: injected server error.",
        _ => "mock fault: injected client error.",
    };
    error(status, message, None)
}

/// The reply for a `rate_limit_rate` fault: 429 `RESOURCE_EXHAUSTED` with
/// `QuotaFailure`, `Help` and `RetryInfo{retryDelay}` details. Like Google, no
/// `retry-after` header: the delay is only in the body.
pub(crate) fn rate_limited(retry_after_secs: u64) -> Reply {
    let message = format!(
        "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. Please retry in {retry_after_secs}s."
    );
    let details = json!([
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "quotaDimensions": {"location": "global", "model": "mock"},
            "quotaValue": "10"
        }]},
        {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits"
        }]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{retry_after_secs}s")}
    ]);
    error(StatusCode::TOO_MANY_REQUESTS, &message, Some(details))
}

const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

/// The key in `x-goog-api-key` or `?key=`: a wrong key gets Gemini's 400
/// `INVALID_ARGUMENT` with `ErrorInfo{reason: API_KEY_INVALID}`; no key at all gets
/// its 403 `PERMISSION_DENIED` ("unregistered callers").
pub(crate) fn check_auth(headers: &HeaderMap, query: Option<&str>, key: &str) -> Option<Reply> {
    let given = headers
        .get(X_GOOG_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .or_else(|| query_param(query, "key"));
    match given.as_deref() {
        Some(given) if given == key => None,
        None | Some("") => Some(error(
            StatusCode::FORBIDDEN,
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            None,
        )),
        Some(_) => {
            let message = "API key not valid. Please pass a valid API key.";
            let details = json!([
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com",
                 "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                 "message": message}
            ]);
            Some(error(StatusCode::BAD_REQUEST, message, Some(details)))
        }
    }
}

const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
const JSON: &str = "application/json; charset=UTF-8";
const SSE: &str = "text/event-stream";

/// Headers Gemini sends (§3.1): no request id and no rate-limit headers.
pub(crate) fn stamp_headers(headers: &mut HeaderMap, processing: Duration) {
    headers.insert(
        http::header::SERVER,
        HeaderValue::from_static("scaffolding on HTTPServer2"),
    );
    if let Ok(timing) = HeaderValue::try_from(format!("gfet4t7; dur={}", processing.as_millis())) {
        headers.insert(SERVER_TIMING, timing);
    }
    headers.insert(
        http::header::VARY,
        HeaderValue::from_static("Origin, X-Origin, Referer"),
    );
    let content_type = http::header::CONTENT_TYPE;
    if headers
        .get(&content_type)
        .is_some_and(|v| v == "application/json")
    {
        headers.insert(content_type, HeaderValue::from_static(JSON));
    } else if headers.get(&content_type).is_some_and(|v| v == SSE) {
        headers.insert(
            http::header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment"),
        );
    }
}

/// What Gemini is observed to send when a stream fails after the 200 (§0 says this is
/// undocumented): a data event holding an error object, then the body ends.
const STREAM_ERROR: &[u8] = b"data: {\"error\":{\"code\":503,\"message\":\"The model is overloaded. Please try again later.\",\"status\":\"UNAVAILABLE\"}}\r\n\r\n";
/// The same error as an element of the JSON-array stream (first, or later).
const ARRAY_ERROR_FIRST: &[u8] = b"[{\"error\":{\"code\":503,\"message\":\"The model is overloaded. Please try again later.\",\"status\":\"UNAVAILABLE\"}}]";
const ARRAY_ERROR_LATER: &[u8] = b",\r\n{\"error\":{\"code\":503,\"message\":\"The model is overloaded. Please try again later.\",\"status\":\"UNAVAILABLE\"}}]";

// ---------------------------------------------------------------------------------
// Request parsing

/// A field by its lowerCamelCase name or its snake_case alias.
fn field<'a>(obj: &'a Map<String, Value>, camel: &str, snake: &str) -> Option<&'a Value> {
    obj.get(camel)
        .or_else(|| obj.get(snake))
        .filter(|v| !v.is_null())
}

fn field_of<'a>(v: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    v.as_object().and_then(|o| field(o, camel, snake))
}

fn to_camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

const REQUEST_FIELDS: [&str; 8] = [
    "contents",
    "systemInstruction",
    "generationConfig",
    "tools",
    "toolConfig",
    "safetySettings",
    "cachedContent",
    "model",
];

const GENERATION_CONFIG_FIELDS: [&str; 27] = [
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "_responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "enableEnhancedCivicAnswers",
    "speechConfig",
    "thinkingConfig",
    "imageConfig",
    "mediaResolution",
    "routingConfig",
    "modelSelectionConfig",
    "audioTimestamp",
    "enableAffectiveDialog",
    "responseVideoConfig",
    "labels",
];

/// Gemini's 400 for a field it does not know.
fn unknown_fields(obj: &Map<String, Value>, known: &[&str], prefix: &str) -> Result<(), Rejected> {
    match obj.keys().find(|k| !known.contains(&to_camel(k).as_str())) {
        Some(name) => Err(invalid(&format!(
            "Invalid JSON payload received. Unknown name \"{name}\"{prefix}: Cannot find field."
        ))),
        None => Ok(()),
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Rejected> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid(
            "Invalid JSON payload received. Expected an object.",
        )),
        Err(e) => Err(invalid(&format!("Invalid JSON payload received. {e}"))),
    }
}

fn parts_of(content: &Value) -> &[Value] {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Checks `contents`: present, non-empty, roles `user`/`model` (or absent), parts.
fn contents_of(req: &Map<String, Value>) -> Result<&[Value], Rejected> {
    let contents = match field(req, "contents", "contents") {
        Some(Value::Array(c)) if !c.is_empty() => c,
        Some(Value::Array(_)) | None => {
            return Err(invalid(
                "* GenerateContentRequest.contents: contents is not specified\n",
            ))
        }
        Some(_) => {
            return Err(invalid(
                "Invalid JSON payload received. Invalid value at 'contents', expected a list.",
            ))
        }
    };
    for (i, content) in contents.iter().enumerate() {
        match content.get("role").filter(|r| !r.is_null()) {
            None => {}
            Some(Value::String(role)) if matches!(role.as_str(), "user" | "model" | "function") => {
            }
            Some(_) => return Err(invalid("Please use a valid role: user, model.")),
        }
        if parts_of(content).is_empty() {
            return Err(invalid(&format!(
                "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
            )));
        }
    }
    Ok(contents)
}

fn role_of(content: &Value) -> &str {
    content
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or("user")
}

fn text_len(contents: &[Value]) -> usize {
    contents
        .iter()
        .flat_map(parts_of)
        .map(|p| match p.get("text").and_then(Value::as_str) {
            Some(text) => text.len(),
            None => p
                .as_object()
                .and_then(|o| {
                    field(o, "functionResponse", "function_response")
                        .or_else(|| field(o, "functionCall", "function_call"))
                })
                .map_or(0, |v| v.to_string().len()),
        })
        .sum()
}

fn prompt_tokens(req: &Map<String, Value>, contents: &[Value]) -> u64 {
    let system = field(req, "systemInstruction", "system_instruction")
        .map_or(0, |s| text_len(std::slice::from_ref(s)));
    ((system + text_len(contents)) as u64 / 4).max(1)
}

/// Models whose function calls carry thought signatures (Gemini 3 and later).
fn signs_calls(model: &str) -> bool {
    model.starts_with("gemini-3")
}

/// The signature the mock issues for a call to `name`.
fn signature_for(name: &str) -> String {
    gen::base64(format!("mock-thought-signature:{name}").as_bytes())
}

/// Signature values Google documents as "skip validation", for histories that came
/// from another model.
const SKIP_SIGNATURES: [&str; 2] = [
    "skip_thought_signature_validator",
    "context_engineering_is_the_way_to_go",
];

/// In the current turn (everything after the last user content with a text part), the
/// first `functionCall` part of each model content must carry the signature issued
/// for it (or a documented skip value).
fn check_signatures(contents: &[Value]) -> Result<(), Rejected> {
    let turn_start = contents
        .iter()
        .rposition(|c| role_of(c) == "user" && parts_of(c).iter().any(|p| p.get("text").is_some()))
        .map_or(0, |i| i + 1);
    for (index, content) in contents.iter().enumerate().skip(turn_start) {
        if role_of(content) != "model" {
            continue;
        }
        let Some(part) = parts_of(content)
            .iter()
            .find(|p| field_of(p, "functionCall", "function_call").is_some())
        else {
            continue;
        };
        let name = field_of(part, "functionCall", "function_call")
            .and_then(|c| c.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        match field_of(part, "thoughtSignature", "thought_signature").and_then(Value::as_str) {
            None => {
                return Err(invalid(&format!(
                    "Function call is missing a thought_signature in functionCall parts. This is required for tools to work correctly, and missing thought_signature may lead to degraded model performance. Additional data, function call `default_api:{name}` , position {}. Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures for more details.",
                    index + 1
                )))
            }
            Some(sig) if sig != signature_for(name) && !SKIP_SIGNATURES.contains(&sig) => {
                return Err(invalid("Corrupted thought signature."))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// What the model will say.
enum Plan<'a> {
    Text {
        function_result: Option<String>,
    },
    Call {
        name: &'a str,
        schema: Option<&'a Value>,
    },
}

fn plan<'a>(req: &'a Map<String, Value>, contents: &'a [Value]) -> Result<Plan<'a>, Rejected> {
    if let Some(last) = contents.last().filter(|c| role_of(c) != "model") {
        let results: Vec<String> = parts_of(last)
            .iter()
            .filter_map(|p| field_of(p, "functionResponse", "function_response"))
            .map(|r| {
                let response = r.get("response");
                let shown = response.and_then(|v| v.get("output")).or(response);
                match shown {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                }
            })
            .collect();
        if !results.is_empty() {
            return Ok(Plan::Text {
                function_result: Some(results.join("; ")),
            });
        }
    }
    let declarations: Vec<&Value> = field(req, "tools", "tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|t| field_of(t, "functionDeclarations", "function_declarations"))
        .filter_map(Value::as_array)
        .flatten()
        .collect();
    let calling = field(req, "toolConfig", "tool_config")
        .and_then(|c| field_of(c, "functionCallingConfig", "function_calling_config"));
    let mode = calling
        .and_then(|c| c.get("mode"))
        .and_then(Value::as_str)
        .unwrap_or("AUTO");
    let allowed: Vec<&str> = calling
        .and_then(|c| field_of(c, "allowedFunctionNames", "allowed_function_names"))
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let text = Plan::Text {
        function_result: None,
    };
    if mode == "NONE" {
        return Ok(text);
    }
    let chosen = declarations.into_iter().find(|d| {
        mode != "ANY"
            || allowed.is_empty()
            || d.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| allowed.contains(&n))
    });
    let Some(declaration) = chosen else {
        return Ok(text);
    };
    let Some(name) = declaration.get("name").and_then(Value::as_str) else {
        return Err(invalid(
            "* GenerateContentRequest.tools[0].function_declarations[0].name: Name is required.\n",
        ));
    };
    let schema = field_of(
        declaration,
        "parametersJsonSchema",
        "parameters_json_schema",
    )
    .or_else(|| field_of(declaration, "parameters", "parameters"));
    Ok(Plan::Call { name, schema })
}

// ---------------------------------------------------------------------------------
// generateContent and streamGenerateContent (§3.2–3.4)

enum Output {
    Text(String),
    Call {
        name: String,
        args: Value,
        signature: Option<String>,
    },
}

struct Answer<'a> {
    model: &'a str,
    response_id: String,
    output: Output,
    finish: &'static str,
    prompt_tokens: u64,
    output_tokens: u64,
}

impl Answer<'_> {
    fn usage(&self, done: bool) -> Value {
        let p = self.prompt_tokens;
        let details = |n: u64| json!([{"modality": "TEXT", "tokenCount": n}]);
        if done {
            let c = self.output_tokens;
            json!({
                "promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c,
                "promptTokensDetails": details(p), "candidatesTokensDetails": details(c)
            })
        } else {
            json!({"promptTokenCount": p, "totalTokenCount": p, "promptTokensDetails": details(p)})
        }
    }

    /// A `GenerateContentResponse` holding `parts`; `finish` on the last one.
    fn response(&self, parts: Value, done: bool, stream: bool) -> Value {
        let mut candidate = json!({"content": {"parts": parts, "role": "model"}});
        if done {
            candidate["finishReason"] = Value::from(self.finish);
            if !stream {
                candidate["avgLogprobs"] = Value::from(-0.125);
            }
        }
        json!({
            "candidates": [candidate],
            "usageMetadata": self.usage(done),
            "modelVersion": self.model,
            "responseId": self.response_id,
        })
    }
}

fn call_part(name: &str, args: &Value, signature: Option<&String>) -> Value {
    let mut part = json!({"functionCall": {"name": name, "args": args}});
    if let Some(signature) = signature {
        part["thoughtSignature"] = Value::from(signature.as_str());
    }
    part
}

/// `stream`: `None` for `generateContent`, `Some(sse)` for `streamGenerateContent`.
fn generate(
    model: &str,
    body: &[u8],
    stream: Option<bool>,
    ctx: &Ctx<'_>,
) -> Result<Reply, Rejected> {
    let req = parse_object(body)?;
    unknown_fields(&req, &REQUEST_FIELDS, "")?;
    let config = match field(&req, "generationConfig", "generation_config") {
        None => None,
        Some(Value::Object(config)) => {
            unknown_fields(config, &GENERATION_CONFIG_FIELDS, " at 'generation_config'")?;
            Some(config)
        }
        Some(_) => {
            return Err(invalid(
                "Invalid JSON payload received. Invalid value at 'generation_config', expected an object.",
            ))
        }
    };
    let contents = contents_of(&req)?;
    if signs_calls(model) {
        check_signatures(contents)?;
    }
    let max_tokens = config
        .and_then(|c| field(c, "maxOutputTokens", "max_output_tokens"))
        .and_then(Value::as_u64);
    let stops: Vec<&str> = config
        .and_then(|c| field(c, "stopSequences", "stop_sequences"))
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let plan = plan(&req, contents)?;

    let mut hash = Fnv::new();
    hash.write(model.as_bytes());
    if let Some(system) = field(&req, "systemInstruction", "system_instruction") {
        hash.write_json(system);
    }
    for content in contents {
        hash.write_json(content);
    }
    let mut rng = fastrand::Rng::with_seed(gen::mix(ctx.seed, hash.finish()));
    let mut ids = fastrand::Rng::with_seed(gen::mix(ctx.seed ^ 0x6E_C0DE, ctx.seq));
    let (output, finish) = match plan {
        Plan::Text { function_result } => {
            let mut text = gen::answer_text(model, function_result.as_deref(), &mut rng);
            let finish = if gen::cut_at_stop(&mut text, stops).is_some() {
                "STOP"
            } else if max_tokens.is_some_and(|limit| gen::truncate_to_tokens(&mut text, limit)) {
                "MAX_TOKENS"
            } else {
                "STOP"
            };
            (Output::Text(text), finish)
        }
        Plan::Call { name, schema } => (
            Output::Call {
                name: name.to_owned(),
                args: gen::mock_args(schema),
                signature: signs_calls(model).then(|| signature_for(name)),
            },
            "STOP",
        ),
    };
    let output_tokens = match &output {
        Output::Text(text) => gen::tokens_for(text.len()),
        Output::Call { name, args, .. } => gen::tokens_for(name.len() + args.to_string().len()),
    };
    let answer = Answer {
        model,
        response_id: gen::alnum(&mut ids, 23),
        output,
        finish,
        prompt_tokens: prompt_tokens(&req, contents),
        output_tokens,
    };
    Ok(match stream {
        None => {
            let parts = match &answer.output {
                Output::Text(text) => json!([{"text": text}]),
                Output::Call {
                    name,
                    args,
                    signature,
                } => json!([call_part(name, args, signature.as_ref())]),
            };
            Reply::json(
                StatusCode::OK,
                answer.response(parts, true, false).to_string(),
            )
        }
        Some(sse) => Reply::stream(stream_events(&answer, ctx.chunks, sse)),
    })
}

/// §3.4: every event a whole `GenerateContentResponse` with only the new parts and
/// `usageMetadata` (prompt counts only until the last); text in `chunks` pieces, the
/// last carrying `finishReason`; a function call whole in one event. SSE events are
/// `data:` lines ending in CRLF CRLF with no terminator; without `alt=sse` the
/// objects form one JSON array. Every event but the last (which holds the finish) is a
/// content chunk for `stream_error_after_chunks`.
fn stream_events(answer: &Answer<'_>, chunks: usize, sse: bool) -> Stream {
    let responses: Vec<Value> = match &answer.output {
        Output::Text(text) => {
            let pieces = gen::split_pieces(text, chunks);
            let last = pieces.len() - 1;
            pieces
                .into_iter()
                .enumerate()
                .map(|(i, piece)| answer.response(json!([{"text": piece}]), i == last, true))
                .collect()
        }
        Output::Call {
            name,
            args,
            signature,
        } => {
            vec![answer.response(
                json!([call_part(name, args, signature.as_ref())]),
                true,
                true,
            )]
        }
    };
    let count = responses.len();
    let mut events: Vec<Bytes> = responses
        .iter()
        .enumerate()
        .map(|(i, response)| {
            Bytes::from(match (sse, i) {
                (true, _) => format!("data: {response}\r\n\r\n"),
                (false, 0) => format!("[{response}"),
                (false, _) => format!(",\r\n{response}"),
            })
        })
        .collect();
    if !sse {
        events.push(Bytes::from_static(b"]"));
    }
    Stream {
        content_type: if sse { SSE } else { JSON },
        events,
        breaks: (0..count).collect(),
        error: if sse {
            [STREAM_ERROR; 2]
        } else {
            [ARRAY_ERROR_FIRST, ARRAY_ERROR_LATER]
        },
    }
}

fn count_tokens(body: &[u8]) -> Result<Reply, Rejected> {
    let req = parse_object(body)?;
    let nested = field(&req, "generateContentRequest", "generate_content_request")
        .and_then(Value::as_object);
    let req = nested.unwrap_or(&req);
    let contents = contents_of(req)?;
    let tokens = prompt_tokens(req, contents);
    let body = json!({
        "totalTokens": tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}]
    });
    Ok(Reply::json(StatusCode::OK, body.to_string()))
}

// ---------------------------------------------------------------------------------
// Models (§3.7)

const MODELS: [&str; 3] = [
    "gemini-2.0-flash",
    "gemini-2.5-flash",
    "gemini-3-pro-preview",
];

/// Any model is described, as generation accepts any model name.
fn model_json(id: &str) -> Value {
    let version = id
        .strip_prefix("gemini-")
        .and_then(|rest| rest.split('-').next())
        .unwrap_or("001");
    json!({
        "name": format!("models/{id}"),
        "version": version,
        "displayName": id,
        "description": format!("Mock model {id}"),
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 65_536,
        "supportedGenerationMethods": ["generateContent", "countTokens"],
        "temperature": 1.0,
        "maxTemperature": 2.0,
        "topP": 0.95,
        "topK": 64,
    })
}

fn models() -> Reply {
    let models: Vec<Value> = MODELS.iter().map(|id| model_json(id)).collect();
    Reply::json(StatusCode::OK, json!({ "models": models }).to_string())
}
