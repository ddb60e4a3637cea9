//! Anthropic Messages ⇄ IR (PROVIDERS.md §2), and Anthropic-shape error
//! bodies for clients that speak it.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::json::{self, Object};
use super::openai::to_bytes;
use super::{arguments_object, carry_extra, native_part, native_tool, TranslateError};
use crate::chat::{
    ChatRequest, ChatResponse, ErrorInfo, ErrorKind, FinishReason, Format, FunctionTool, Image,
    MediaSource, Message, Native, Output, Part, ResponseFormat, Role, StreamEvent, Tool, ToolCall,
    ToolChoice, ToolResult, Usage,
};

const FORMAT: Format = Format::Anthropic;

// ---------------------------------------------------------------------------
// Requests

/// Reads a client's `/v1/messages` request into the IR. `max_tokens` is
/// required, as Anthropic requires it. A streaming client always gets usage
/// (in `message_delta`), so `include_usage` follows `stream`.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, TranslateError> {
    let mut root = json::parse_object(body)?;
    let model = json::string(json::required(&mut root, "model", "")?, "model")?;
    let mut req = ChatRequest::new(FORMAT, model);
    req.max_tokens = Some(json::unsigned(
        json::required(&mut root, "max_tokens", "")?,
        "max_tokens",
    )?);

    if let Some(system) = json::take(&mut root, "system") {
        let content = match system {
            Value::String(s) => vec![Part::Text(s)],
            other => blocks(other, "system")?,
        };
        req.messages.push(Message::new(Role::System, content));
    }
    let messages = json::array(json::required(&mut root, "messages", "")?, "messages")?;
    if messages.is_empty() {
        return Err(json::invalid("messages", "must contain at least one message").into());
    }
    for (i, m) in messages.into_iter().enumerate() {
        parse_message(m, &json::idx("messages", i), &mut req.messages)?;
    }

    if let Some(stop) = json::take(&mut root, "stop_sequences") {
        req.stop = json::strings(stop, "stop_sequences")?;
    }
    req.temperature = json::opt_number(&mut root, "temperature", "")?;
    req.top_p = json::opt_number(&mut root, "top_p", "")?;
    req.top_k = json::opt_unsigned(&mut root, "top_k", "")?;
    req.stream = json::opt_bool(&mut root, "stream", "")?.unwrap_or(false);
    req.include_usage = req.stream;
    if let Some(tools) = json::take(&mut root, "tools") {
        for (i, t) in json::array(tools, "tools")?.into_iter().enumerate() {
            req.tools.push(parse_tool(t, &json::idx("tools", i))?);
        }
    }
    if let Some(choice) = json::take(&mut root, "tool_choice") {
        let mut c = json::object(choice, "tool_choice")?;
        let kind = json::string(
            json::required(&mut c, "type", "tool_choice")?,
            "tool_choice.type",
        )?;
        req.tool_choice = Some(match kind.as_str() {
            "auto" => ToolChoice::Auto,
            "any" => ToolChoice::Required,
            "none" => ToolChoice::None,
            "tool" => ToolChoice::Named(json::string(
                json::required(&mut c, "name", "tool_choice")?,
                "tool_choice.name",
            )?),
            _ => {
                return Err(json::invalid(
                    "tool_choice.type",
                    "expected 'auto', 'any', 'tool' or 'none'",
                )
                .into())
            }
        });
        if json::opt_bool(&mut c, "disable_parallel_tool_use", "tool_choice")? == Some(true) {
            req.parallel_tool_calls = Some(false);
        }
    }
    if let Some(metadata) = json::take(&mut root, "metadata") {
        let mut m = json::object(metadata, "metadata")?;
        req.user = json::opt_string(&mut m, "user_id", "metadata")?;
    }
    if let Some(config) = json::take(&mut root, "output_config") {
        let mut config = json::object(config, "output_config")?;
        if let Some(format) = json::take(&mut config, "format") {
            let mut f = json::object(format, "output_config.format")?;
            let kind = json::string(
                json::required(&mut f, "type", "output_config.format")?,
                "output_config.format.type",
            )?;
            if kind != "json_schema" {
                return Err(
                    json::invalid("output_config.format.type", "expected 'json_schema'").into(),
                );
            }
            req.response_format = Some(ResponseFormat::JsonSchema {
                // OpenAI requires a name; Anthropic has none.
                name: "response".to_owned(),
                description: None,
                schema: json::take(&mut f, "schema"),
                strict: None,
            });
        }
        if !config.is_empty() {
            root.insert("output_config".to_owned(), Value::Object(config));
        }
    }
    req.extra = root;
    Ok(req)
}

/// One Anthropic message becomes one IR message, except that a user turn's
/// `tool_result` blocks become [`Role::Tool`] messages of their own (in
/// order), as OpenAI keeps them.
fn parse_message(v: Value, path: &str, out: &mut Vec<Message>) -> Result<(), TranslateError> {
    let mut m = json::object(v, path)?;
    let role_path = json::at(path, "role");
    let role = json::string(json::required(&mut m, "role", path)?, &role_path)?;
    let role = match role.as_str() {
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "system" => Role::System,
        _ => {
            return Err(
                json::invalid(&role_path, "expected 'user', 'assistant' or 'system'").into(),
            )
        }
    };
    let content_path = json::at(path, "content");
    let content = match json::required(&mut m, "content", path)? {
        Value::String(s) => vec![Part::Text(s)],
        other => blocks(other, &content_path)?,
    };
    if role != Role::User {
        out.push(Message::new(role, content));
        return Ok(());
    }
    let mut current: Option<Message> = None;
    for part in content {
        let part_role = match part {
            Part::ToolResult(_) => Role::Tool,
            _ => Role::User,
        };
        match &mut current {
            Some(msg) if msg.role == part_role => msg.content.push(part),
            _ => {
                out.extend(current.take());
                current = Some(Message::new(part_role, vec![part]));
            }
        }
    }
    out.push(current.unwrap_or_else(|| Message::new(Role::User, Vec::new())));
    Ok(())
}

fn blocks(v: Value, path: &str) -> Result<Vec<Part>, TranslateError> {
    json::array(v, path)?
        .into_iter()
        .enumerate()
        .map(|(i, b)| block(b, &json::idx(path, i)))
        .collect()
}

fn block(v: Value, path: &str) -> Result<Part, TranslateError> {
    let kind = match v.get("type") {
        Some(Value::String(k)) => k.clone(),
        _ => {
            let _ = json::object(v, path)?;
            return Err(json::missing(&json::at(path, "type")).into());
        }
    };
    let mut b = json::object(v, path)?;
    let native = |mut b: Object, kind: String| {
        b.insert("type".to_owned(), Value::String(kind));
        Part::Native(Native {
            format: FORMAT,
            value: Value::Object(b),
        })
    };
    Ok(match kind.as_str() {
        "text" => Part::Text(json::string(
            json::required(&mut b, "text", path)?,
            &json::at(path, "text"),
        )?),
        "image" => {
            let s_path = json::at(path, "source");
            let source = json::object(json::required(&mut b, "source", path)?, &s_path)?;
            match image_source(source, &s_path)? {
                Ok(source) => Part::Image(Image {
                    source,
                    detail: None,
                }),
                Err(source) => {
                    b.insert("source".to_owned(), Value::Object(source));
                    native(b, kind)
                }
            }
        }
        "tool_use" => {
            let input = json::take(&mut b, "input").unwrap_or_else(|| json!({}));
            Part::ToolCall(ToolCall {
                id: json::string(json::required(&mut b, "id", path)?, &json::at(path, "id"))?,
                name: json::string(
                    json::required(&mut b, "name", path)?,
                    &json::at(path, "name"),
                )?,
                arguments: input.to_string(),
                signature: None,
            })
        }
        "tool_result" => {
            let call_id = json::string(
                json::required(&mut b, "tool_use_id", path)?,
                &json::at(path, "tool_use_id"),
            )?;
            let c_path = json::at(path, "content");
            let content = match json::take(&mut b, "content") {
                None => Vec::new(),
                Some(Value::String(s)) => vec![Part::Text(s)],
                Some(other) => blocks(other, &c_path)?,
            };
            Part::ToolResult(ToolResult {
                call_id,
                name: None,
                content,
                is_error: json::opt_bool(&mut b, "is_error", path)?.unwrap_or(false),
            })
        }
        _ => native(b, kind),
    })
}

/// The IR source, or the source object back when the IR has no such kind
/// (Anthropic Files API references).
fn image_source(mut s: Object, path: &str) -> Result<Result<MediaSource, Object>, TranslateError> {
    let kind = s.get("type").and_then(Value::as_str).unwrap_or_default();
    Ok(Ok(match kind {
        "base64" => MediaSource::Base64 {
            media_type: json::string(
                json::required(&mut s, "media_type", path)?,
                &json::at(path, "media_type"),
            )?,
            data: json::string(
                json::required(&mut s, "data", path)?,
                &json::at(path, "data"),
            )?,
        },
        "url" => MediaSource::Url(json::string(
            json::required(&mut s, "url", path)?,
            &json::at(path, "url"),
        )?),
        _ => return Ok(Err(s)),
    }))
}

fn parse_tool(v: Value, path: &str) -> Result<Tool, TranslateError> {
    match v.get("type").and_then(Value::as_str) {
        None | Some("custom") => {}
        Some(_) => {
            return Ok(Tool::Native(Native {
                format: FORMAT,
                value: Value::Object(json::object(v, path)?),
            }))
        }
    }
    let mut t = json::object(v, path)?;
    Ok(Tool::Function(FunctionTool {
        name: json::string(
            json::required(&mut t, "name", path)?,
            &json::at(path, "name"),
        )?,
        description: json::opt_string(&mut t, "description", path)?,
        parameters: json::take(&mut t, "input_schema"),
        strict: json::opt_bool(&mut t, "strict", path)?,
    }))
}

/// Builds an upstream `/v1/messages` body for `model`. `default_max_tokens`
/// fills the required `max_tokens` when the client gave none.
pub fn encode_request(
    req: &ChatRequest,
    model: &str,
    default_max_tokens: u64,
) -> Result<Bytes, TranslateError> {
    if req.n.is_some_and(|n| n > 1) {
        return Err(TranslateError::untranslatable("n > 1", FORMAT));
    }
    if req.stop.iter().any(|s| s.trim().is_empty()) {
        return Err(TranslateError::untranslatable(
            "a whitespace-only stop sequence",
            FORMAT,
        ));
    }
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    out.insert(
        "max_tokens".into(),
        req.max_tokens.unwrap_or(default_max_tokens).into(),
    );

    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for m in &req.messages {
        if m.role == Role::System {
            for part in &m.content {
                match part {
                    Part::Text(t) if !t.is_empty() => system.push(text_block(t)),
                    Part::Text(_) => {}
                    Part::Native(n) => system.extend(native_part(n, FORMAT)?.cloned()),
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
            "assistant"
        } else {
            "user"
        };
        let mut content = Vec::with_capacity(m.content.len());
        for part in &m.content {
            if let Some(b) = encode_part(part)? {
                content.push(b);
            }
        }
        if content.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, blocks)) if *last == role => blocks.extend(content),
            _ => turns.push((role, content)),
        }
    }
    match system.as_slice() {
        [] => {}
        [Value::Object(b)] if b.len() == 2 && b.get("type") == Some(&"text".into()) => {
            out.insert("system".into(), b.get("text").cloned().unwrap_or_default());
        }
        _ => {
            out.insert("system".into(), Value::Array(system));
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": single_text(content)}))
        .collect();
    out.insert("messages".into(), Value::Array(messages));

    if !req.stop.is_empty() {
        out.insert("stop_sequences".into(), req.stop.clone().into());
    }
    if let Some(t) = req.temperature {
        out.insert("temperature".into(), t.min(1.0).into());
    }
    if let Some(p) = req.top_p {
        out.insert("top_p".into(), p.into());
    }
    if let Some(k) = req.top_k {
        out.insert("top_k".into(), k.into());
    }
    if req.stream {
        out.insert("stream".into(), true.into());
    }
    if !req.tools.is_empty() {
        let tools = req
            .tools
            .iter()
            .map(|t| match t {
                Tool::Function(f) => {
                    let mut tool = Map::new();
                    tool.insert("name".into(), f.name.as_str().into());
                    if let Some(d) = &f.description {
                        tool.insert("description".into(), d.as_str().into());
                    }
                    tool.insert(
                        "input_schema".into(),
                        f.parameters
                            .clone()
                            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                    );
                    if let Some(s) = f.strict {
                        tool.insert("strict".into(), s.into());
                    }
                    Ok(Value::Object(tool))
                }
                Tool::Native(n) => native_tool(n, FORMAT).cloned(),
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("tools".into(), Value::Array(tools));
        if let Some(choice) = tool_choice(req) {
            out.insert("tool_choice".into(), choice);
        }
    }
    match &req.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            return Err(TranslateError::untranslatable(
                "response_format `json_object`",
                FORMAT,
            ))
        }
        Some(ResponseFormat::JsonSchema { schema: None, .. }) => {
            return Err(TranslateError::untranslatable(
                "response_format `json_schema` without a schema",
                FORMAT,
            ))
        }
        Some(ResponseFormat::JsonSchema {
            schema: Some(schema),
            ..
        }) => {
            let mut config = match (req.source, req.extra.get("output_config")) {
                (FORMAT, Some(Value::Object(c))) => c.clone(),
                _ => Map::new(),
            };
            config.insert(
                "format".into(),
                json!({"type": "json_schema", "schema": schema}),
            );
            out.insert("output_config".into(), Value::Object(config));
        }
    }
    if let Some(user) = &req.user {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    carry_extra(req.source, &req.extra, FORMAT, &mut out)?;
    Ok(to_bytes(&Value::Object(out)))
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// A lone text block is sent as a plain string.
fn single_text(content: Vec<Value>) -> Value {
    match content.as_slice() {
        [Value::Object(b)] if b.len() == 2 && b.get("type") == Some(&"text".into()) => {
            b.get("text").cloned().unwrap_or_default()
        }
        _ => Value::Array(content),
    }
}

fn encode_part(part: &Part) -> Result<Option<Value>, TranslateError> {
    Ok(Some(match part {
        Part::Text(t) if t.is_empty() => return Ok(None),
        Part::Text(t) => text_block(t),
        Part::Image(img) => image_block(img),
        Part::Audio(_) => return Err(TranslateError::untranslatable("audio input", FORMAT)),
        Part::ToolCall(c) => json!({
            "type": "tool_use",
            "id": tool_id(&c.id),
            "name": c.name,
            "input": arguments_object(&c.arguments, FORMAT)?,
        }),
        Part::ToolResult(r) => tool_result_block(r)?,
        Part::Native(n) => return Ok(native_part(n, FORMAT)?.cloned()),
    }))
}

fn image_block(img: &Image) -> Value {
    let source = match &img.source {
        MediaSource::Base64 { media_type, data } => {
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
        MediaSource::Url(url) => json!({"type": "url", "url": url}),
    };
    json!({"type": "image", "source": source})
}

fn tool_result_block(r: &ToolResult) -> Result<Value, TranslateError> {
    let mut content = Vec::with_capacity(r.content.len());
    for part in &r.content {
        match part {
            Part::Text(t) if t.is_empty() => {}
            Part::Text(t) => content.push(text_block(t)),
            Part::Image(img) => content.push(image_block(img)),
            Part::Native(n) => content.extend(native_part(n, FORMAT)?.cloned()),
            _ => {
                return Err(TranslateError::untranslatable(
                    "non-text content in a tool result",
                    FORMAT,
                ))
            }
        }
    }
    let mut block = Map::new();
    block.insert("type".into(), "tool_result".into());
    block.insert("tool_use_id".into(), tool_id(&r.call_id).into());
    if !content.is_empty() {
        block.insert("content".into(), single_text(content));
    }
    if r.is_error {
        block.insert("is_error".into(), true.into());
    }
    Ok(Value::Object(block))
}

/// Anthropic tool ids match `^[a-zA-Z0-9_-]+$`; other characters become `_`
/// (the same way for calls and results, so they still pair up).
fn tool_id(id: &str) -> Cow<'_, str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.chars().all(ok) {
        return Cow::Borrowed(id);
    }
    if id.is_empty() {
        return Cow::Borrowed("_");
    }
    Cow::Owned(id.chars().map(|c| if ok(c) { c } else { '_' }).collect())
}

fn tool_choice(req: &ChatRequest) -> Option<Value> {
    let no_parallel = req.parallel_tool_calls == Some(false);
    let mut choice = match (&req.tool_choice, no_parallel) {
        (None, false) => return None,
        (None, true) | (Some(ToolChoice::Auto), _) => json!({"type": "auto"}),
        (Some(ToolChoice::None), _) => return Some(json!({"type": "none"})),
        (Some(ToolChoice::Required), _) => json!({"type": "any"}),
        (Some(ToolChoice::Named(name)), _) => json!({"type": "tool", "name": name}),
    };
    if let (true, Value::Object(c)) = (no_parallel, &mut choice) {
        c.insert("disable_parallel_tool_use".into(), true.into());
    }
    Some(choice)
}

// ---------------------------------------------------------------------------
// Responses

#[derive(Deserialize)]
struct WireMessage {
    id: Option<String>,
    model: Option<String>,
    content: Option<Vec<Value>>,
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Later counts (from `message_delta`) replace earlier ones.
    fn merge(&mut self, later: &WireUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
    }

    fn to_ir(self) -> Usage {
        let write = self.cache_creation_input_tokens.unwrap_or(0);
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let input = self
            .input_tokens
            .unwrap_or(0)
            .saturating_add(write)
            .saturating_add(read);
        let output = self.output_tokens.unwrap_or(0);
        Usage {
            input,
            output,
            cached_input: read,
            cache_write_input: write,
            total: input.saturating_add(output),
        }
    }
}

fn usage_value(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input.saturating_sub(u.cached_input).saturating_sub(u.cache_write_input),
        "output_tokens": u.output,
        "cache_creation_input_tokens": u.cache_write_input,
        "cache_read_input_tokens": u.cached_input,
    })
}

fn stop_reason(reason: Option<&str>, sequence: Option<String>) -> FinishReason {
    match reason {
        Some("stop_sequence") => FinishReason::StopSequence(sequence),
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

fn stop_reason_str(reason: &FinishReason) -> (&'static str, Option<&str>) {
    match reason {
        FinishReason::Stop => ("end_turn", None),
        FinishReason::StopSequence(s) => ("stop_sequence", s.as_deref()),
        FinishReason::Length => ("max_tokens", None),
        FinishReason::ToolCalls => ("tool_use", None),
        FinishReason::ContentFilter => ("refusal", None),
    }
}

/// Reads an upstream `message` body. Thinking and server-tool blocks are
/// dropped.
pub fn parse_response(body: &[u8]) -> Result<ChatResponse, TranslateError> {
    let wire: WireMessage =
        serde_json::from_slice(body).map_err(|e| TranslateError::upstream(FORMAT, e))?;
    let mut content = Vec::new();
    for b in wire.content.unwrap_or_default() {
        let str_of = |key: &str| b.get(key).and_then(Value::as_str).unwrap_or_default();
        match str_of("type") {
            "text" => content.push(Output::Text(str_of("text").to_owned())),
            "tool_use" => content.push(Output::ToolCall(ToolCall {
                id: str_of("id").to_owned(),
                name: str_of("name").to_owned(),
                arguments: b
                    .get("input")
                    .map_or_else(|| "{}".to_owned(), Value::to_string),
                signature: None,
            })),
            _ => {}
        }
    }
    Ok(ChatResponse {
        id: wire.id.unwrap_or_default(),
        model: wire.model.unwrap_or_default(),
        choices: vec![crate::chat::Choice {
            content,
            finish_reason: stop_reason(wire.stop_reason.as_deref(), wire.stop_sequence),
        }],
        usage: wire.usage.map(WireUsage::to_ir),
    })
}

/// Builds a `message` body for the client.
pub fn encode_response(resp: &ChatResponse) -> Result<Bytes, TranslateError> {
    let (content, reason) = match resp.choices.as_slice() {
        [] => (&[][..], FinishReason::Stop),
        [one] => (one.content.as_slice(), one.finish_reason.clone()),
        _ => return Err(TranslateError::untranslatable("n > 1", FORMAT)),
    };
    let blocks = content
        .iter()
        .map(|o| match o {
            Output::Text(t) => Ok(text_block(t)),
            Output::ToolCall(c) => Ok(json!({
                "type": "tool_use",
                "id": tool_id(&c.id),
                "name": c.name,
                "input": arguments_object(&c.arguments, FORMAT)?,
            })),
        })
        .collect::<Result<Vec<_>, TranslateError>>()?;
    let (stop_reason, stop_sequence) = stop_reason_str(&reason);
    let body = json!({
        "id": resp.id,
        "type": "message",
        "role": "assistant",
        "model": resp.model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_value(&resp.usage.unwrap_or_default()),
    });
    Ok(to_bytes(&body))
}

// ---------------------------------------------------------------------------
// Errors

/// The Anthropic `error.type` for a kind.
pub fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest => "invalid_request_error",
        ErrorKind::Authentication => "authentication_error",
        ErrorKind::Permission => "permission_error",
        ErrorKind::NotFound => "not_found_error",
        ErrorKind::RequestTooLarge => "request_too_large",
        ErrorKind::RateLimit => "rate_limit_error",
        ErrorKind::Server => "api_error",
        ErrorKind::Overloaded => "overloaded_error",
        ErrorKind::Timeout => "timeout_error",
    }
}

/// The HTTP status Anthropic uses for a kind (overloaded is 529).
pub fn error_status(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::InvalidRequest => 400,
        ErrorKind::Authentication => 401,
        ErrorKind::Permission => 403,
        ErrorKind::NotFound => 404,
        ErrorKind::RequestTooLarge => 413,
        ErrorKind::RateLimit => 429,
        ErrorKind::Server => 500,
        ErrorKind::Timeout => 504,
        ErrorKind::Overloaded => 529,
    }
}

/// The kind an Anthropic `error.type` names; unknown types are server errors.
pub fn error_kind(error_type: &str) -> ErrorKind {
    match error_type {
        "invalid_request_error" => ErrorKind::InvalidRequest,
        "authentication_error" => ErrorKind::Authentication,
        "permission_error" | "billing_error" => ErrorKind::Permission,
        "not_found_error" => ErrorKind::NotFound,
        "request_too_large" => ErrorKind::RequestTooLarge,
        "rate_limit_error" => ErrorKind::RateLimit,
        "overloaded_error" => ErrorKind::Overloaded,
        "timeout_error" => ErrorKind::Timeout,
        _ => ErrorKind::Server,
    }
}

fn error_value(kind: ErrorKind, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(kind), "message": message}})
}

/// `{"type":"error","error":{"type":…,"message":…}}`.
pub fn error_body(kind: ErrorKind, message: &str) -> Bytes {
    to_bytes(&error_value(kind, message))
}

/// The `event: error` that ends a failed stream.
pub fn error_event(kind: ErrorKind, message: &str) -> Bytes {
    let mut out = BytesMut::new();
    write_event(&mut out, "error", &error_value(kind, message));
    out.freeze()
}

/// Reads an Anthropic error body (or `error` event payload).
pub fn parse_error(body: &[u8]) -> Option<ErrorInfo> {
    let v: Value = serde_json::from_slice(body).ok()?;
    error_from_value(&v)
}

fn error_from_value(v: &Value) -> Option<ErrorInfo> {
    let e = v.get("error")?;
    let kind = e.get("type").and_then(Value::as_str).unwrap_or_default();
    Some(ErrorInfo {
        kind: error_kind(kind),
        message: e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        retry_after: None,
    })
}

// ---------------------------------------------------------------------------
// Streams

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    message: Option<EventMessage>,
    index: Option<u64>,
    content_block: Option<EventBlock>,
    #[serde(borrow)]
    delta: Option<EventDelta<'a>>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct EventMessage {
    id: Option<String>,
    model: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct EventBlock {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    name: Option<String>,
    text: Option<String>,
    input: Option<Value>,
}

#[derive(Deserialize)]
struct EventDelta<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(borrow)]
    stop_reason: Option<Cow<'a, str>>,
    stop_sequence: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// A tool_use block and its tool-call counter.
    Tool(usize),
    Other,
}

/// Decodes an upstream Anthropic stream, one `data:` payload at a time.
/// Tool calls are numbered by a counter of tool_use blocks, not by the block
/// index (which also counts text blocks; PROVIDERS.md §4.7).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    started: bool,
    finished: bool,
    ended: bool,
    /// Each block index's latest block: a delta finds its block in O(1),
    /// however many blocks the stream has.
    blocks: HashMap<u64, Block>,
    /// Blocks started (the index of one that comes without an index).
    started_blocks: u64,
    tools: usize,
    usage: WireUsage,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn block(&self, index: Option<u64>) -> Option<Block> {
        self.blocks.get(&index?).copied()
    }

    fn start_block(&mut self, index: u64, block: Block) {
        self.started_blocks += 1;
        self.blocks.insert(index, block);
    }

    pub fn push(&mut self, data: &[u8]) -> Result<Vec<StreamEvent>, TranslateError> {
        let mut events = Vec::new();
        if self.ended || data.trim_ascii().is_empty() {
            return Ok(events);
        }
        let event: Event =
            serde_json::from_slice(data).map_err(|e| TranslateError::upstream(FORMAT, e))?;
        match event.kind.as_ref() {
            "message_start" => {
                let message = event.message;
                if !self.started {
                    self.started = true;
                    events.push(StreamEvent::Start {
                        id: message
                            .as_ref()
                            .and_then(|m| m.id.clone())
                            .unwrap_or_default(),
                        model: message
                            .as_ref()
                            .and_then(|m| m.model.clone())
                            .unwrap_or_default(),
                    });
                }
                if let Some(u) = message.and_then(|m| m.usage) {
                    self.usage.merge(&u);
                    events.push(StreamEvent::Usage(self.usage.to_ir()));
                }
            }
            "content_block_start" => {
                let Some(block) = event.content_block else {
                    return Ok(events);
                };
                let index = event.index.unwrap_or(self.started_blocks);
                match block.kind.as_deref() {
                    Some("text") => {
                        self.start_block(index, Block::Text);
                        if let Some(text) = block.text.filter(|t| !t.is_empty()) {
                            events.push(StreamEvent::TextDelta(text));
                        }
                    }
                    Some("tool_use") => {
                        let k = self.tools;
                        self.tools += 1;
                        self.start_block(index, Block::Tool(k));
                        events.push(StreamEvent::ToolCallStart {
                            index: k,
                            id: block.id.unwrap_or_default(),
                            name: block.name.unwrap_or_default(),
                            signature: None,
                        });
                        // Anthropic starts with `input: {}` and streams the
                        // rest; a server that sends it whole here is heard.
                        if let Some(input) = block.input.filter(|i| match i {
                            Value::Object(o) => !o.is_empty(),
                            Value::Null => false,
                            _ => true,
                        }) {
                            events.push(StreamEvent::ToolCallArgsDelta {
                                index: k,
                                fragment: input.to_string(),
                            });
                        }
                    }
                    _ => self.start_block(index, Block::Other),
                }
            }
            "content_block_delta" => {
                let Some(delta) = event.delta else {
                    return Ok(events);
                };
                let block = self.block(event.index);
                match (delta.kind.as_deref(), block) {
                    (Some("text_delta"), Some(Block::Text) | None) => {
                        if let Some(text) = delta.text.filter(|t| !t.is_empty()) {
                            events.push(StreamEvent::TextDelta(text.into_owned()));
                        }
                    }
                    (Some("input_json_delta"), Some(Block::Tool(k))) => {
                        if let Some(fragment) = delta.partial_json.filter(|f| !f.is_empty()) {
                            events.push(StreamEvent::ToolCallArgsDelta {
                                index: k,
                                fragment: fragment.into_owned(),
                            });
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(u) = &event.usage {
                    self.usage.merge(u);
                }
                if let Some(delta) = event.delta {
                    if let (Some(reason), false) = (delta.stop_reason, self.finished) {
                        self.finished = true;
                        events.push(StreamEvent::Finish {
                            reason: stop_reason(Some(&reason), delta.stop_sequence),
                        });
                    }
                }
                if event.usage.is_some() {
                    events.push(StreamEvent::Usage(self.usage.to_ir()));
                }
            }
            "message_stop" => {
                self.ended = true;
                events.push(StreamEvent::Done);
            }
            "error" => {
                let v: Value = serde_json::from_slice(data).unwrap_or_default();
                let info = error_from_value(&v).unwrap_or(ErrorInfo {
                    kind: ErrorKind::Server,
                    message: String::new(),
                    retry_after: None,
                });
                self.ended = true;
                events.push(StreamEvent::Error {
                    kind: info.kind,
                    message: info.message,
                });
            }
            // ping, content_block_stop, and event types added later.
            _ => {}
        }
        Ok(events)
    }

    /// The upstream body ended: a stream without `message_stop` was cut
    /// short, unless its stop reason had already come.
    pub fn finish(&mut self) -> Result<Vec<StreamEvent>, TranslateError> {
        if self.ended {
            return Ok(Vec::new());
        }
        self.ended = true;
        if self.finished {
            Ok(vec![StreamEvent::Done])
        } else {
            Err(TranslateError::upstream(
                FORMAT,
                "stream ended before message_stop",
            ))
        }
    }
}

#[derive(Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    delta: DeltaBody<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum DeltaBody<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "input_json_delta")]
    Json { partial_json: &'a str },
}

/// Encodes IR events as an Anthropic Messages stream (`event: NAME` +
/// `data: {...}`): `message_start` (input usage 0 when not yet known, the
/// real counts in `message_delta`), one content block per run of text and
/// per tool call with start/stop bookkeeping, `message_delta`,
/// `message_stop`. An error event ends the stream.
#[derive(Debug, Default)]
pub struct StreamEncoder {
    id: String,
    model: String,
    started: bool,
    /// The open block: its index, and the tool call it holds (if any).
    open: Option<(usize, Option<usize>)>,
    next_block: usize,
    /// Tool-call index → block index.
    tool_blocks: HashMap<usize, usize>,
    reason: Option<FinishReason>,
    usage: Option<Usage>,
    closed: bool,
    extension: Option<Value>,
}

impl StreamEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// An object sent as `"detour"` in the final `message_delta`.
    pub fn set_extension(&mut self, extension: Value) {
        self.extension = Some(extension);
    }

    pub fn encode(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        if self.closed {
            return;
        }
        match event {
            StreamEvent::Start { id, model } => {
                self.id.clone_from(id);
                self.model.clone_from(model);
            }
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::TextDelta(text) => {
                self.start(out);
                if text.is_empty() {
                    return;
                }
                let index = match self.open {
                    Some((index, None)) => index,
                    _ => {
                        self.close_block(out);
                        let index = self.open_block(None);
                        write_event(
                            out,
                            "content_block_start",
                            &json!({
                                "type": "content_block_start",
                                "index": index,
                                "content_block": {"type": "text", "text": ""},
                            }),
                        );
                        index
                    }
                };
                write_event(
                    out,
                    "content_block_delta",
                    &BlockDelta {
                        kind: "content_block_delta",
                        index,
                        delta: DeltaBody::Text { text },
                    },
                );
            }
            StreamEvent::ToolCallStart {
                index: call,
                id,
                name,
                ..
            } => {
                self.start(out);
                self.close_block(out);
                let index = self.open_block(Some(*call));
                self.tool_blocks.insert(*call, index);
                write_event(
                    out,
                    "content_block_start",
                    &json!({
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": tool_id(id),
                            "name": name,
                            "input": {},
                        },
                    }),
                );
            }
            StreamEvent::ToolCallArgsDelta {
                index: call,
                fragment,
            } => {
                self.start(out);
                // Fragments of a call whose block is no longer open (no known
                // server interleaves calls) still go to that call's block.
                let block = self.tool_blocks.get(call).copied();
                if let (Some(index), false) = (block, fragment.is_empty()) {
                    write_event(
                        out,
                        "content_block_delta",
                        &BlockDelta {
                            kind: "content_block_delta",
                            index,
                            delta: DeltaBody::Json {
                                partial_json: fragment,
                            },
                        },
                    );
                }
            }
            StreamEvent::Finish { reason } => {
                self.start(out);
                self.close_block(out);
                self.reason = Some(reason.clone());
            }
            StreamEvent::Error { kind, message } => {
                write_event(out, "error", &error_value(*kind, message));
                self.closed = true;
            }
            StreamEvent::Done => {
                self.start(out);
                self.close_block(out);
                let reason = self.reason.take().unwrap_or(FinishReason::Stop);
                let (stop_reason, stop_sequence) = stop_reason_str(&reason);
                let usage = match &self.usage {
                    Some(u) => usage_value(u),
                    None => json!({"output_tokens": 0}),
                };
                let mut delta = json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": usage,
                });
                if let (Some(extension), Some(fields)) =
                    (self.extension.take(), delta.as_object_mut())
                {
                    fields.insert("detour".to_owned(), extension);
                }
                write_event(out, "message_delta", &delta);
                write_event(out, "message_stop", &json!({"type": "message_stop"}));
                self.closed = true;
            }
        }
    }

    /// Sends `message_start` once, before anything else.
    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let usage = match &self.usage {
            Some(u) => usage_value(u),
            None => json!({"input_tokens": 0, "output_tokens": 0}),
        };
        write_event(
            out,
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": usage,
                },
            }),
        );
    }

    fn open_block(&mut self, call: Option<usize>) -> usize {
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some((index, call));
        index
    }

    fn close_block(&mut self, out: &mut BytesMut) {
        if let Some((index, _)) = self.open.take() {
            write_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }
}

fn write_event<T: Serialize>(out: &mut BytesMut, name: &str, data: &T) {
    // Serialising these values cannot fail.
    let Ok(payload) = serde_json::to_vec(data) else {
        return;
    };
    out.reserve(payload.len() + name.len() + 16);
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(&payload);
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deltas are matched to their block through an index, not a scan of
    /// every block so far: a stream of many blocks whose deltas name early
    /// (or unknown) blocks stays linear.
    #[test]
    fn many_blocks_decode_in_linear_time() {
        // Decodes `BLOCKS` rounds of (an event, a delta for block 0, a delta
        // for a block never started) and returns the time taken. With
        // `many_blocks`, each round's event starts a new block; otherwise it
        // is a ping. A decoder that scans every block per delta is quadratic
        // in the first case (the scan took 30 s here in a debug build) and
        // linear in the second; indexed, both cost about the same. Comparing
        // the two runs, back to back, keeps a loaded machine out of it: no
        // absolute time bound.
        const BLOCKS: usize = 20_000;
        // Wall time of a pure function: no runtime, no paused clock to honour.
        #[allow(clippy::disallowed_methods)]
        fn run(many_blocks: bool) -> std::time::Duration {
            let mut d = StreamDecoder::new();
            let started = std::time::Instant::now();
            d.push(br#"{"type":"message_start","message":{"id":"m","model":"c"}}"#)
                .unwrap();
            d.push(br#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}"#)
                .unwrap();
            let mut tool_fragments = 0;
            for i in 1..BLOCKS {
                let event = if many_blocks {
                    format!(
                        r#"{{"type":"content_block_start","index":{i},"content_block":{{"type":"text","text":""}}}}"#
                    )
                } else {
                    r#"{"type":"ping"}"#.to_owned()
                };
                d.push(event.as_bytes()).unwrap();
                for delta in [
                    r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"1"}}"#,
                    r#"{"type":"content_block_delta","index":999999999,"delta":{"type":"text_delta","text":"x"}}"#,
                ] {
                    for e in d.push(delta.as_bytes()).unwrap() {
                        if matches!(e, StreamEvent::ToolCallArgsDelta { index: 0, .. }) {
                            tool_fragments += 1;
                        }
                    }
                }
            }
            assert_eq!(tool_fragments, BLOCKS - 1);
            started.elapsed()
        }
        let few = run(false);
        let many = run(true);
        assert!(
            many < 5 * few.max(std::time::Duration::from_millis(10)),
            "{BLOCKS} blocks took {many:?}, against {few:?} for as many events on one block"
        );
    }

    #[test]
    fn a_restarted_index_belongs_to_the_latest_block() {
        let mut d = StreamDecoder::new();
        d.push(br#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#)
            .unwrap();
        d.push(br#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}"#)
            .unwrap();
        let out = d
            .push(br#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#)
            .unwrap();
        assert!(
            matches!(
                out.as_slice(),
                [StreamEvent::ToolCallArgsDelta { index: 0, .. }]
            ),
            "{out:?}"
        );
    }
}
