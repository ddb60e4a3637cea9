//! IR → Gemini `generateContent` requests, and Gemini answers, streams and
//! errors → IR (PROVIDERS.md §3). There is no Gemini-format client side.
//!
//! Gemini differs from the other two in ways this module absorbs:
//! - Tool results are matched to calls by *name*, so the name is looked up
//!   from the call id in the history (the nearest earlier call with that id).
//! - Function calls usually carry no id; one is made from the response id
//!   and the call's position (`call_<responseId>_<n>`), unique per answer.
//! - A function call ends with `STOP`; with calls present it is `ToolCalls`.
//! - A stream's body just ends: [`StreamDecoder::finish`] emits `Done`.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::openai::to_bytes;
use super::{
    arguments_object, carry_extra, native_part, native_tool, result_text, with_tool_calls,
    TranslateError,
};
use crate::chat::{
    ChatRequest, ChatResponse, Choice, ErrorInfo, ErrorKind, FinishReason, Format, MediaSource,
    Output, Part, ResponseFormat, Role, StreamEvent, Tool, ToolCall, ToolChoice, ToolResult, Usage,
};

const FORMAT: Format = Format::Gemini;

/// Google's documented placeholder for a function call whose signature was
/// lost (history written by another model); Gemini 3 rejects calls without one.
pub const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

// ---------------------------------------------------------------------------
// Requests

/// Builds a `generateContent` / `streamGenerateContent` body. The model and
/// the streaming choice go in the URL, not here.
pub fn encode_request(req: &ChatRequest) -> Result<Bytes, TranslateError> {
    if req.stream && req.n.is_some_and(|n| n > 1) {
        return Err(TranslateError::untranslatable(
            "n > 1 in a streamed request",
            FORMAT,
        ));
    }
    let mut out = Map::new();
    let mut system = Vec::new();
    let mut contents: Vec<(&'static str, Vec<Value>)> = Vec::new();
    // Call id → tool name, as far as the history has got.
    let mut names: Vec<(&str, &str)> = Vec::new();
    for m in &req.messages {
        if m.role == Role::System {
            for part in &m.content {
                match part {
                    Part::Text(t) if !t.is_empty() => system.push(json!({"text": t})),
                    Part::Text(_) => {}
                    Part::Native(n) => {
                        native_part(n, FORMAT)?;
                    }
                    _ => {
                        return Err(TranslateError::untranslatable(
                            "non-text system content",
                            FORMAT,
                        ))
                    }
                }
            }
            continue;
        }
        let role = if m.role == Role::Assistant {
            "model"
        } else {
            "user"
        };
        let mut parts = Vec::with_capacity(m.content.len());
        for part in &m.content {
            match part {
                Part::Text(t) if t.is_empty() => {}
                Part::Text(t) => parts.push(json!({"text": t})),
                Part::Image(img) => parts.push(match &img.source {
                    MediaSource::Base64 { media_type, data } => {
                        json!({"inlineData": {"mimeType": media_type, "data": data}})
                    }
                    MediaSource::Url(url) => {
                        let mut file = Map::new();
                        file.insert("fileUri".into(), url.as_str().into());
                        if let Some(mime) = mime_from_url(url) {
                            file.insert("mimeType".into(), mime.into());
                        }
                        json!({ "fileData": file })
                    }
                }),
                Part::Audio(a) => {
                    let mime = match a.format.as_str() {
                        "mp3" => "audio/mp3".to_owned(),
                        other => format!("audio/{other}"),
                    };
                    parts.push(json!({"inlineData": {"mimeType": mime, "data": a.data}}));
                }
                Part::ToolCall(c) => {
                    names.push((&c.id, &c.name));
                    let mut p = Map::new();
                    p.insert(
                        "functionCall".into(),
                        json!({"name": c.name, "args": arguments_object(&c.arguments, FORMAT)?}),
                    );
                    if let Some(sig) = &c.signature {
                        p.insert("thoughtSignature".into(), sig.as_str().into());
                    }
                    parts.push(Value::Object(p));
                }
                Part::ToolResult(r) => {
                    let name = names
                        .iter()
                        .rev()
                        .find(|(id, _)| *id == r.call_id)
                        .map(|(_, name)| *name)
                        .or(r.name.as_deref())
                        .ok_or_else(|| {
                            TranslateError::untranslatable(
                                format!(
                                    "a tool result for call `{}`, which is not in the history",
                                    r.call_id
                                ),
                                FORMAT,
                            )
                        })?;
                    parts.push(json!({"functionResponse": {
                        "name": name,
                        "response": function_response(r)?,
                    }}));
                }
                Part::Native(n) => {
                    native_part(n, FORMAT)?;
                }
            }
        }
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            Some((last, p)) if *last == role => p.extend(parts),
            _ => contents.push((role, parts)),
        }
    }
    for (role, parts) in &mut contents {
        if *role == "model" {
            sign_calls(parts);
        }
    }
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    let contents: Vec<Value> = contents
        .into_iter()
        .map(|(role, parts)| json!({"role": role, "parts": parts}))
        .collect();
    out.insert("contents".into(), Value::Array(contents));

    let mut config = Map::new();
    if let Some(n) = req.max_tokens {
        config.insert("maxOutputTokens".into(), n.into());
    }
    if let Some(t) = req.temperature {
        config.insert("temperature".into(), t.into());
    }
    if let Some(p) = req.top_p {
        config.insert("topP".into(), p.into());
    }
    if let Some(k) = req.top_k {
        config.insert("topK".into(), k.into());
    }
    if !req.stop.is_empty() {
        config.insert("stopSequences".into(), req.stop.clone().into());
    }
    if let Some(n) = req.n {
        config.insert("candidateCount".into(), n.into());
    }
    if let Some(seed) = req.seed {
        config.insert("seed".into(), seed.into());
    }
    if let Some(p) = req.presence_penalty {
        config.insert("presencePenalty".into(), p.into());
    }
    if let Some(p) = req.frequency_penalty {
        config.insert("frequencyPenalty".into(), p.into());
    }
    match &req.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            config.insert("responseMimeType".into(), "application/json".into());
        }
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            config.insert("responseMimeType".into(), "application/json".into());
            if let Some(schema) = schema {
                config.insert("responseJsonSchema".into(), schema.clone());
            }
        }
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }

    if !req.tools.is_empty() {
        let declarations = req
            .tools
            .iter()
            .map(|t| match t {
                Tool::Function(f) => {
                    let mut d = Map::new();
                    d.insert("name".into(), f.name.as_str().into());
                    if let Some(desc) = &f.description {
                        d.insert("description".into(), desc.as_str().into());
                    }
                    if let Some(p) = &f.parameters {
                        d.insert("parametersJsonSchema".into(), p.clone());
                    }
                    Ok(Value::Object(d))
                }
                Tool::Native(n) => native_tool(n, FORMAT).cloned(),
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(
            "tools".into(),
            json!([{ "functionDeclarations": declarations }]),
        );
        if let Some(choice) = &req.tool_choice {
            let config = match choice {
                ToolChoice::Auto => json!({"mode": "AUTO"}),
                ToolChoice::None => json!({"mode": "NONE"}),
                ToolChoice::Required => json!({"mode": "ANY"}),
                ToolChoice::Named(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
            };
            out.insert(
                "toolConfig".into(),
                json!({ "functionCallingConfig": config }),
            );
        }
    }
    carry_extra(req.source, &req.extra, FORMAT, &mut out)?;
    Ok(to_bytes(&Value::Object(out)))
}

/// A model turn with function calls but no signature gets the placeholder
/// on its first call (only the first of parallel calls carries one).
fn sign_calls(parts: &mut [Value]) {
    let calls = || parts.iter().filter(|p| p.get("functionCall").is_some());
    if calls().next().is_none() || calls().any(|p| p.get("thoughtSignature").is_some()) {
        return;
    }
    if let Some(Value::Object(first)) = parts.iter_mut().find(|p| p.get("functionCall").is_some()) {
        first.insert("thoughtSignature".into(), SKIP_SIGNATURE.into());
    }
}

/// Gemini wants an object: a JSON object result is used as it is, anything
/// else goes under `output` (or `error` for a failed call).
fn function_response(r: &ToolResult) -> Result<Value, TranslateError> {
    let text = result_text(r, FORMAT)?.concat();
    let key = if r.is_error { "error" } else { "output" };
    Ok(match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) if !r.is_error => v,
        Ok(v) => json!({ key: v }),
        Err(_) => json!({ key: text }),
    })
}

fn mime_from_url(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Responses

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    candidates: Option<Vec<WireCandidate>>,
    usage_metadata: Option<WireUsage>,
    model_version: Option<String>,
    response_id: Option<String>,
    prompt_feedback: Option<Value>,
    error: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate {
    content: Option<WireContent>,
    finish_reason: Option<String>,
    index: Option<u64>,
}

#[derive(Deserialize)]
struct WireContent {
    parts: Option<Vec<Value>>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    tool_use_prompt_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    total_token_count: Option<u64>,
}

impl WireUsage {
    fn to_ir(self) -> Usage {
        let input = self
            .prompt_token_count
            .unwrap_or(0)
            .saturating_add(self.tool_use_prompt_token_count.unwrap_or(0));
        let output = self
            .candidates_token_count
            .unwrap_or(0)
            .saturating_add(self.thoughts_token_count.unwrap_or(0));
        Usage {
            input,
            output,
            cached_input: self.cached_content_token_count.unwrap_or(0),
            cache_write_input: 0,
            total: self
                .total_token_count
                .unwrap_or(input.saturating_add(output)),
        }
    }
}

fn finish_reason(s: &str) -> FinishReason {
    match s {
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

fn blocked(feedback: Option<&Value>) -> bool {
    feedback.is_some_and(|f| f.get("blockReason").is_some())
}

/// A call id for a function call: its own, else one made from the
/// response id and the call's position in the answer.
fn call_id(given: Option<&str>, response_id: Option<&str>, n: usize) -> String {
    if let Some(id) = given.filter(|id| !id.is_empty()) {
        return id.to_owned();
    }
    let rid: String = response_id
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    if rid.is_empty() {
        format!("call_{n}")
    } else {
        format!("call_{rid}_{n}")
    }
}

/// What one part says: text (thought parts dropped), or a function call.
enum Said {
    Text(String),
    Call {
        id: Option<String>,
        name: String,
        args: String,
        signature: Option<String>,
    },
    Nothing,
}

fn read_part(p: &Value) -> Said {
    if p.get("thought").and_then(Value::as_bool) == Some(true) {
        return Said::Nothing;
    }
    if let Some(call) = p.get("functionCall") {
        let str_of = |key: &str| call.get(key).and_then(Value::as_str);
        return Said::Call {
            id: str_of("id").map(str::to_owned),
            name: str_of("name").unwrap_or_default().to_owned(),
            args: match call.get("args") {
                None | Some(Value::Null) => "{}".to_owned(),
                Some(args) => args.to_string(),
            },
            signature: p
                .get("thoughtSignature")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
    }
    match p.get("text").and_then(Value::as_str) {
        Some(t) if !t.is_empty() => Said::Text(t.to_owned()),
        _ => Said::Nothing,
    }
}

/// Reads a `generateContent` body. A prompt blocked before any candidate
/// becomes one empty choice that ended by `ContentFilter`.
pub fn parse_response(body: &[u8]) -> Result<ChatResponse, TranslateError> {
    let wire: WireResponse =
        serde_json::from_slice(body).map_err(|e| TranslateError::upstream(FORMAT, e))?;
    let mut candidates = wire.candidates.unwrap_or_default();
    candidates.sort_by_key(|c| c.index.unwrap_or(0));
    let mut calls = 0;
    let mut choices: Vec<Choice> = candidates
        .into_iter()
        .map(|c| {
            let mut content = Vec::new();
            for p in c.content.and_then(|c| c.parts).unwrap_or_default() {
                match read_part(&p) {
                    Said::Text(t) => content.push(Output::Text(t)),
                    Said::Call {
                        id,
                        name,
                        args,
                        signature,
                    } => {
                        content.push(Output::ToolCall(ToolCall {
                            id: call_id(id.as_deref(), wire.response_id.as_deref(), calls),
                            name,
                            arguments: args,
                            signature,
                        }));
                        calls += 1;
                    }
                    Said::Nothing => {}
                }
            }
            let saw_call = content.iter().any(|o| matches!(o, Output::ToolCall(_)));
            let reason = c
                .finish_reason
                .as_deref()
                .map_or(FinishReason::Stop, finish_reason);
            Choice {
                content,
                finish_reason: with_tool_calls(reason, saw_call),
            }
        })
        .collect();
    if choices.is_empty() && blocked(wire.prompt_feedback.as_ref()) {
        choices.push(Choice {
            content: Vec::new(),
            finish_reason: FinishReason::ContentFilter,
        });
    }
    Ok(ChatResponse {
        id: wire.response_id.unwrap_or_default(),
        model: wire.model_version.unwrap_or_default(),
        choices,
        usage: wire.usage_metadata.map(WireUsage::to_ir),
    })
}

// ---------------------------------------------------------------------------
// Errors

/// Reads a Google error body, `{"error":{"code","message","status","details"}}`
/// (also wrapped in an array, as the non-SSE stream sends it), with the
/// delay from a `RetryInfo` detail.
pub fn parse_error(body: &[u8]) -> Option<ErrorInfo> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let v = match v {
        Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    error_from_value(&v)
}

fn error_from_value(v: &Value) -> Option<ErrorInfo> {
    let e = v.get("error")?;
    let details = e.get("details").and_then(Value::as_array);
    let detail_of = |suffix: &str| {
        details.into_iter().flatten().find(|d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(suffix))
        })
    };
    let bad_key = detail_of("google.rpc.ErrorInfo")
        .and_then(|d| d.get("reason"))
        .and_then(Value::as_str)
        == Some("API_KEY_INVALID");
    let retry_after = detail_of("google.rpc.RetryInfo")
        .and_then(|d| d.get("retryDelay"))
        .and_then(Value::as_str)
        .and_then(parse_duration);
    let status = e.get("status").and_then(Value::as_str).unwrap_or_default();
    let kind = match status {
        _ if bad_key => ErrorKind::Authentication,
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => ErrorKind::InvalidRequest,
        "UNAUTHENTICATED" => ErrorKind::Authentication,
        "PERMISSION_DENIED" => ErrorKind::Permission,
        "NOT_FOUND" => ErrorKind::NotFound,
        "RESOURCE_EXHAUSTED" => ErrorKind::RateLimit,
        "UNAVAILABLE" => ErrorKind::Overloaded,
        "DEADLINE_EXCEEDED" => ErrorKind::Timeout,
        "" => e
            .get("code")
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
            .map_or(ErrorKind::Server, ErrorKind::from_status),
        _ => ErrorKind::Server,
    };
    Some(ErrorInfo {
        kind,
        message: e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        retry_after,
    })
}

/// A protobuf JSON duration such as `"53s"` or `"47.174066935s"`.
fn parse_duration(s: &str) -> Option<Duration> {
    let secs: f64 = s.strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

// ---------------------------------------------------------------------------
// Streams

/// Decodes `streamGenerateContent?alt=sse`: every event is a whole
/// `GenerateContentResponse` with only the new parts. Text parts become text
/// deltas; a function call arrives whole and becomes a tool-call start plus
/// one argument fragment with the full JSON; the finish reason becomes
/// `Finish`; the last `usageMetadata` is emitted by [`Self::finish`], with
/// `Done`, when the body ends.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    started: bool,
    finished: bool,
    ended: bool,
    response_id: Option<String>,
    calls: usize,
    usage: Option<Usage>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) -> Result<Vec<StreamEvent>, TranslateError> {
        let mut events = Vec::new();
        if self.ended || data.trim_ascii().is_empty() {
            return Ok(events);
        }
        let wire: WireResponse =
            serde_json::from_slice(data).map_err(|e| TranslateError::upstream(FORMAT, e))?;
        if let Some(e) = &wire.error {
            let info = error_from_value(&json!({ "error": e })).unwrap_or(ErrorInfo {
                kind: ErrorKind::Server,
                message: String::new(),
                retry_after: None,
            });
            self.ended = true;
            events.push(StreamEvent::Error {
                kind: info.kind,
                message: info.message,
            });
            return Ok(events);
        }
        if !self.started {
            self.started = true;
            self.response_id.clone_from(&wire.response_id);
            events.push(StreamEvent::Start {
                id: wire.response_id.clone().unwrap_or_default(),
                model: wire.model_version.clone().unwrap_or_default(),
            });
        }
        if let Some(u) = wire.usage_metadata {
            self.usage = Some(u.to_ir());
        }
        let candidates = wire.candidates.unwrap_or_default();
        if candidates.is_empty() && blocked(wire.prompt_feedback.as_ref()) && !self.finished {
            self.finished = true;
            events.push(StreamEvent::Finish {
                reason: FinishReason::ContentFilter,
            });
        }
        for c in candidates {
            if c.index.unwrap_or(0) != 0 {
                return Err(TranslateError::upstream(
                    FORMAT,
                    "a stream with more than one candidate cannot be translated",
                ));
            }
            for p in c.content.and_then(|c| c.parts).unwrap_or_default() {
                match read_part(&p) {
                    Said::Text(t) => events.push(StreamEvent::TextDelta(t)),
                    Said::Call {
                        id,
                        name,
                        args,
                        signature,
                    } => {
                        let index = self.calls;
                        self.calls += 1;
                        events.push(StreamEvent::ToolCallStart {
                            index,
                            id: call_id(id.as_deref(), self.response_id.as_deref(), index),
                            name,
                            signature,
                        });
                        events.push(StreamEvent::ToolCallArgsDelta {
                            index,
                            fragment: args,
                        });
                    }
                    Said::Nothing => {}
                }
            }
            if let (Some(reason), false) = (c.finish_reason, self.finished) {
                self.finished = true;
                events.push(StreamEvent::Finish {
                    reason: with_tool_calls(finish_reason(&reason), self.calls > 0),
                });
            }
        }
        Ok(events)
    }

    /// The body ended. After a finish reason this emits the final usage and
    /// `Done`; without one the stream was cut short, which is an error.
    pub fn finish(&mut self) -> Result<Vec<StreamEvent>, TranslateError> {
        if self.ended {
            return Ok(Vec::new());
        }
        self.ended = true;
        if !self.finished {
            return Err(TranslateError::upstream(
                FORMAT,
                "stream ended without a finish reason",
            ));
        }
        let mut events = Vec::with_capacity(2);
        events.extend(self.usage.map(StreamEvent::Usage));
        events.push(StreamEvent::Done);
        Ok(events)
    }
}
