//! OpenAI Chat Completions ⇄ IR (PROVIDERS.md §1).
//!
//! Also serves OpenAI-compatible servers (vLLM, llama.cpp, Ollama): the
//! decoders accept their variations (tool calls that arrive whole, a
//! `finish_reason` on the last content chunk, usage on every chunk, flat
//! error bodies with integer codes).

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::json::{self, Object};
use super::{carry_extra, native_part, native_tool, result_text, with_tool_calls, TranslateError};
use crate::chat::{
    Audio, ChatRequest, ChatResponse, Choice, ErrorInfo, ErrorKind, FinishReason, Format,
    FunctionTool, Image, MediaSource, Message, Native, Output, Part, ResponseFormat, Role,
    StreamEvent, Tool, ToolCall, ToolChoice, ToolResult, Usage,
};

const FORMAT: Format = Format::OpenAi;

// ---------------------------------------------------------------------------
// Requests

/// Reads a client's chat completion request into the IR, checking the types
/// of everything it keeps. Fields the IR does not model go to `extra`.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, TranslateError> {
    let mut root = json::parse_object(body)?;
    let model = json::string(json::required(&mut root, "model", "")?, "model")?;
    let mut req = ChatRequest::new(FORMAT, model);

    let messages = json::array(json::required(&mut root, "messages", "")?, "messages")?;
    if messages.is_empty() {
        return Err(json::invalid("messages", "must contain at least one message").into());
    }
    for (i, m) in messages.into_iter().enumerate() {
        req.messages
            .push(parse_message(m, &json::idx("messages", i))?);
    }

    req.max_tokens = json::opt_unsigned(&mut root, "max_completion_tokens", "")?;
    if req.max_tokens.is_none() {
        req.max_tokens = json::opt_unsigned(&mut root, "max_tokens", "")?;
    }
    req.temperature = json::opt_number(&mut root, "temperature", "")?;
    req.top_p = json::opt_number(&mut root, "top_p", "")?;
    if let Some(n) = json::opt_unsigned(&mut root, "n", "")? {
        req.n = Some(u32::try_from(n).map_err(|_| json::invalid("n", "too large"))?);
    }
    if let Some(stop) = json::take(&mut root, "stop") {
        req.stop = json::strings(stop, "stop")?;
    }
    if let Some(seed) = json::take(&mut root, "seed") {
        req.seed = Some(json::integer(seed, "seed")?);
    }
    req.frequency_penalty = json::opt_number(&mut root, "frequency_penalty", "")?;
    req.presence_penalty = json::opt_number(&mut root, "presence_penalty", "")?;
    if let Some(tools) = json::take(&mut root, "tools") {
        for (i, t) in json::array(tools, "tools")?.into_iter().enumerate() {
            req.tools.push(parse_tool(t, &json::idx("tools", i))?);
        }
    }
    if let Some(choice) = json::take(&mut root, "tool_choice") {
        match parse_tool_choice(&choice)? {
            Some(c) => req.tool_choice = Some(c),
            // `allowed_tools` and custom-tool choices stay OpenAI-only.
            None => {
                root.insert("tool_choice".to_owned(), choice);
            }
        }
    }
    req.parallel_tool_calls = json::opt_bool(&mut root, "parallel_tool_calls", "")?;
    if let Some(rf) = json::take(&mut root, "response_format") {
        req.response_format = Some(parse_response_format(rf, "response_format")?);
    }
    req.user = json::opt_string(&mut root, "user", "")?;
    req.stream = json::opt_bool(&mut root, "stream", "")?.unwrap_or(false);
    if let Some(options) = json::take(&mut root, "stream_options") {
        let mut options = json::object(options, "stream_options")?;
        req.include_usage =
            json::opt_bool(&mut options, "include_usage", "stream_options")?.unwrap_or(false);
    }
    req.extra = root;
    Ok(req)
}

fn parse_message(v: Value, path: &str) -> Result<Message, TranslateError> {
    let mut m = json::object(v, path)?;
    let role_path = json::at(path, "role");
    let role = json::string(json::required(&mut m, "role", path)?, &role_path)?;
    let name = json::opt_string(&mut m, "name", path)?;
    let content_path = json::at(path, "content");
    let message = match role.as_str() {
        "system" | "developer" => {
            let content = json::required(&mut m, "content", path)?;
            Message {
                role: Role::System,
                content: text_content(content, &content_path)?,
                name,
            }
        }
        "user" => {
            let content = json::required(&mut m, "content", path)?;
            Message {
                role: Role::User,
                content: user_content(content, &content_path)?,
                name,
            }
        }
        "assistant" => {
            let mut content = match json::take(&mut m, "content") {
                Some(c) => text_content(c, &content_path)?,
                None => Vec::new(),
            };
            if let Some(refusal) = json::opt_string(&mut m, "refusal", path)? {
                content.push(Part::Text(refusal));
            }
            if let Some(calls) = json::take(&mut m, "tool_calls") {
                let calls_path = json::at(path, "tool_calls");
                for (i, c) in json::array(calls, &calls_path)?.into_iter().enumerate() {
                    content.push(parse_tool_call(c, &json::idx(&calls_path, i))?);
                }
            }
            Message {
                role: Role::Assistant,
                content,
                name,
            }
        }
        "tool" => {
            let call_id = json::string(
                json::required(&mut m, "tool_call_id", path)?,
                &json::at(path, "tool_call_id"),
            )?;
            let content = json::required(&mut m, "content", path)?;
            Message::new(
                Role::Tool,
                vec![Part::ToolResult(ToolResult {
                    call_id,
                    name: None,
                    content: text_content(content, &content_path)?,
                    is_error: false,
                })],
            )
        }
        "function" => {
            return Err(json::invalid(
                &role_path,
                "the deprecated 'function' role cannot be translated; send 'tool' messages",
            )
            .into())
        }
        _ => {
            return Err(json::invalid(
                &role_path,
                "expected one of 'system', 'developer', 'user', 'assistant', 'tool'",
            )
            .into())
        }
    };
    Ok(message)
}

/// A string, or an array of `text` (and `refusal`) parts.
fn text_content(v: Value, path: &str) -> Result<Vec<Part>, TranslateError> {
    if let Value::String(s) = v {
        return Ok(vec![Part::Text(s)]);
    }
    let mut parts = Vec::new();
    for (i, p) in json::array(v, path)?.into_iter().enumerate() {
        let p_path = json::idx(path, i);
        let mut p = json::object(p, &p_path)?;
        let kind = json::string(
            json::required(&mut p, "type", &p_path)?,
            &json::at(&p_path, "type"),
        )?;
        match kind.as_str() {
            "text" | "refusal" => {
                let text = json::required(&mut p, &kind, &p_path)?;
                parts.push(Part::Text(json::string(text, &json::at(&p_path, &kind))?));
            }
            _ => {
                return Err(json::invalid(
                    &json::at(&p_path, "type"),
                    "expected a 'text' content part",
                )
                .into())
            }
        }
    }
    Ok(parts)
}

fn user_content(v: Value, path: &str) -> Result<Vec<Part>, TranslateError> {
    if let Value::String(s) = v {
        return Ok(vec![Part::Text(s)]);
    }
    let mut parts = Vec::new();
    for (i, p) in json::array(v, path)?.into_iter().enumerate() {
        let p_path = json::idx(path, i);
        let kind = match p.get("type") {
            Some(Value::String(k)) => k.clone(),
            Some(_) | None => {
                let _ = json::object(p, &p_path)?;
                return Err(json::missing(&json::at(&p_path, "type")).into());
            }
        };
        let mut p = json::object(p, &p_path)?;
        let part = match kind.as_str() {
            "text" => Part::Text(json::string(
                json::required(&mut p, "text", &p_path)?,
                &json::at(&p_path, "text"),
            )?),
            "image_url" => {
                let img_path = json::at(&p_path, "image_url");
                let (url, detail) = match json::required(&mut p, "image_url", &p_path)? {
                    Value::String(url) => (url, None),
                    other => {
                        let mut img = json::object(other, &img_path)?;
                        let url = json::string(
                            json::required(&mut img, "url", &img_path)?,
                            &json::at(&img_path, "url"),
                        )?;
                        (url, json::opt_string(&mut img, "detail", &img_path)?)
                    }
                };
                Part::Image(Image {
                    source: media_source(url),
                    detail,
                })
            }
            "input_audio" => {
                let a_path = json::at(&p_path, "input_audio");
                let mut a = json::object(json::required(&mut p, "input_audio", &p_path)?, &a_path)?;
                Part::Audio(Audio {
                    data: json::string(
                        json::required(&mut a, "data", &a_path)?,
                        &json::at(&a_path, "data"),
                    )?,
                    format: json::string(
                        json::required(&mut a, "format", &a_path)?,
                        &json::at(&a_path, "format"),
                    )?,
                })
            }
            _ => {
                p.insert("type".to_owned(), Value::String(kind));
                Part::Native(Native {
                    format: FORMAT,
                    value: Value::Object(p),
                })
            }
        };
        parts.push(part);
    }
    Ok(parts)
}

/// An image URL as a media source (a data URL is base64 data).
pub(crate) fn media_source(url: String) -> MediaSource {
    match super::parse_data_url(&url) {
        Some((media_type, data)) => MediaSource::Base64 {
            media_type: media_type.to_owned(),
            data: data.to_owned(),
        },
        None => MediaSource::Url(url),
    }
}

fn parse_tool_call(v: Value, path: &str) -> Result<Part, TranslateError> {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("function");
    if kind != "function" {
        let value = Value::Object(json::object(v, path)?);
        return Ok(Part::Native(Native {
            format: FORMAT,
            value,
        }));
    }
    let mut c = json::object(v, path)?;
    let id = json::string(json::required(&mut c, "id", path)?, &json::at(path, "id"))?;
    let f_path = json::at(path, "function");
    let mut f = json::object(json::required(&mut c, "function", path)?, &f_path)?;
    let name = json::string(
        json::required(&mut f, "name", &f_path)?,
        &json::at(&f_path, "name"),
    )?;
    let arguments = match json::take(&mut f, "arguments") {
        None => String::new(),
        Some(Value::String(s)) => s,
        // Some clients send the object itself; it means the same.
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => {
            return Err(
                json::invalid(&json::at(&f_path, "arguments"), "expected a JSON string").into(),
            )
        }
    };
    Ok(Part::ToolCall(ToolCall {
        id,
        name,
        arguments,
        signature: None,
    }))
}

fn parse_tool(v: Value, path: &str) -> Result<Tool, TranslateError> {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("function");
    if kind != "function" {
        let value = Value::Object(json::object(v, path)?);
        return Ok(Tool::Native(Native {
            format: FORMAT,
            value,
        }));
    }
    let mut t = json::object(v, path)?;
    let f_path = json::at(path, "function");
    let mut f = json::object(json::required(&mut t, "function", path)?, &f_path)?;
    Ok(Tool::Function(FunctionTool {
        name: json::string(
            json::required(&mut f, "name", &f_path)?,
            &json::at(&f_path, "name"),
        )?,
        description: json::opt_string(&mut f, "description", &f_path)?,
        parameters: json::take(&mut f, "parameters"),
        strict: json::opt_bool(&mut f, "strict", &f_path)?,
    }))
}

/// `None` for choices the IR does not model (`allowed_tools`, custom tools).
fn parse_tool_choice(v: &Value) -> Result<Option<ToolChoice>, TranslateError> {
    match v {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            "required" => Ok(Some(ToolChoice::Required)),
            _ => Err(json::invalid(
                "tool_choice",
                "expected 'none', 'auto', 'required' or an object",
            )
            .into()),
        },
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                match o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                {
                    Some(name) => Ok(Some(ToolChoice::Named(name.to_owned()))),
                    None => Err(json::missing("tool_choice.function.name").into()),
                }
            }
            Some(_) => Ok(None),
            None => Err(json::missing("tool_choice.type").into()),
        },
        _ => Err(json::invalid("tool_choice", "expected a string or an object").into()),
    }
}

fn parse_response_format(v: Value, path: &str) -> Result<ResponseFormat, TranslateError> {
    let mut o = json::object(v, path)?;
    let type_path = json::at(path, "type");
    let kind = json::string(json::required(&mut o, "type", path)?, &type_path)?;
    match kind.as_str() {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        "json_schema" => {
            let s_path = json::at(path, "json_schema");
            let mut s = json::object(json::required(&mut o, "json_schema", path)?, &s_path)?;
            Ok(ResponseFormat::JsonSchema {
                name: json::string(
                    json::required(&mut s, "name", &s_path)?,
                    &json::at(&s_path, "name"),
                )?,
                description: json::opt_string(&mut s, "description", &s_path)?,
                schema: json::take(&mut s, "schema"),
                strict: json::opt_bool(&mut s, "strict", &s_path)?,
            })
        }
        _ => Err(json::invalid(
            &type_path,
            "expected 'text', 'json_object' or 'json_schema'",
        )
        .into()),
    }
}

/// Choices for building an upstream OpenAI-format request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// Send the output limit as the legacy `max_tokens` (older local servers)
    /// instead of `max_completion_tokens` (required by OpenAI's o-series).
    pub legacy_max_tokens: bool,
    /// Send `top_k`: vLLM, llama.cpp and Ollama accept it, api.openai.com
    /// rejects it.
    pub top_k: bool,
}

/// Builds an upstream request body for `model`.
pub fn encode_request(
    req: &ChatRequest,
    model: &str,
    opts: &RequestOptions,
) -> Result<Bytes, TranslateError> {
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    out.insert(
        "messages".into(),
        Value::Array(encode_messages(&req.messages)?),
    );
    if let Some(n) = req.max_tokens {
        let key = if opts.legacy_max_tokens {
            "max_tokens"
        } else {
            "max_completion_tokens"
        };
        out.insert(key.into(), n.into());
    }
    if let Some(t) = req.temperature {
        out.insert("temperature".into(), t.into());
    }
    if let Some(p) = req.top_p {
        out.insert("top_p".into(), p.into());
    }
    if let (Some(k), true) = (req.top_k, opts.top_k) {
        out.insert("top_k".into(), k.into());
    }
    if !req.stop.is_empty() {
        out.insert("stop".into(), req.stop.clone().into());
    }
    if let Some(n) = req.n {
        out.insert("n".into(), n.into());
    }
    if let Some(seed) = req.seed {
        out.insert("seed".into(), seed.into());
    }
    if let Some(p) = req.frequency_penalty {
        out.insert("frequency_penalty".into(), p.into());
    }
    if let Some(p) = req.presence_penalty {
        out.insert("presence_penalty".into(), p.into());
    }
    if !req.tools.is_empty() {
        let tools = req
            .tools
            .iter()
            .map(encode_tool)
            .collect::<Result<Vec<_>, _>>()?;
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = &req.tool_choice {
        out.insert("tool_choice".into(), encode_tool_choice(choice));
    }
    if let Some(p) = req.parallel_tool_calls {
        out.insert("parallel_tool_calls".into(), p.into());
    }
    if let Some(rf) = &req.response_format {
        out.insert("response_format".into(), encode_response_format(rf));
    }
    if let Some(user) = &req.user {
        out.insert("user".into(), user.as_str().into());
    }
    if req.stream {
        out.insert("stream".into(), true.into());
        if req.include_usage {
            out.insert("stream_options".into(), json!({"include_usage": true}));
        }
    }
    carry_extra(req.source, &req.extra, FORMAT, &mut out)?;
    Ok(to_bytes(&Value::Object(out)))
}

fn encode_messages(messages: &[Message]) -> Result<Vec<Value>, TranslateError> {
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        // Tool results are messages of their own in OpenAI's format.
        let mut rest = Vec::new();
        for part in &m.content {
            match part {
                Part::ToolResult(r) => out.push(encode_tool_result(r)?),
                other => rest.push(other),
            }
        }
        if rest.is_empty() && m.role == Role::Tool {
            continue;
        }
        let mut msg = match m.role {
            Role::System => system_message(&rest)?,
            Role::User | Role::Tool => user_message(&rest)?,
            Role::Assistant => assistant_message(&rest)?,
        };
        if let Some(name) = &m.name {
            msg.insert("name".into(), name.as_str().into());
        }
        out.push(Value::Object(msg));
    }
    Ok(out)
}

fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// A string for a single text part, else an array of text parts.
fn texts_value(texts: &[&str]) -> Value {
    match texts {
        [] => Value::String(String::new()),
        [one] => Value::String((*one).to_owned()),
        many => Value::Array(many.iter().map(|t| text_part(t)).collect()),
    }
}

fn system_message(parts: &[&Part]) -> Result<Object, TranslateError> {
    let mut texts = Vec::new();
    for part in parts {
        match part {
            Part::Text(t) => texts.push(t.as_str()),
            Part::Native(n) if native_part(n, FORMAT)?.is_none() => {}
            _ => {
                return Err(TranslateError::untranslatable(
                    "non-text system content",
                    FORMAT,
                ))
            }
        }
    }
    let mut m = Map::new();
    m.insert("role".into(), "system".into());
    m.insert("content".into(), texts_value(&texts));
    Ok(m)
}

fn user_message(parts: &[&Part]) -> Result<Object, TranslateError> {
    let mut content = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Part::Text(t) => content.push(text_part(t)),
            Part::Image(img) => content.push(encode_image(img)),
            Part::Audio(a) => content.push(json!({
                "type": "input_audio",
                "input_audio": {"data": a.data, "format": a.format},
            })),
            Part::Native(n) => {
                if let Some(v) = native_part(n, FORMAT)? {
                    content.push(v.clone());
                }
            }
            Part::ToolCall(_) | Part::ToolResult(_) => {
                return Err(TranslateError::untranslatable(
                    "a tool call in a user message",
                    FORMAT,
                ))
            }
        }
    }
    let content = match content.as_slice() {
        [Value::Object(p)] if p.get("type") == Some(&Value::from("text")) => {
            p.get("text").cloned().unwrap_or_default()
        }
        _ => Value::Array(content),
    };
    let mut m = Map::new();
    m.insert("role".into(), "user".into());
    m.insert("content".into(), content);
    Ok(m)
}

fn encode_image(img: &Image) -> Value {
    let url = match &img.source {
        MediaSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        MediaSource::Url(url) => url.clone(),
    };
    let mut image_url = Map::new();
    image_url.insert("url".into(), url.into());
    if let Some(detail) = &img.detail {
        image_url.insert("detail".into(), detail.as_str().into());
    }
    json!({"type": "image_url", "image_url": image_url})
}

fn assistant_message(parts: &[&Part]) -> Result<Object, TranslateError> {
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for part in parts {
        match part {
            Part::Text(t) => texts.push(t.as_str()),
            Part::ToolCall(c) => calls.push(json!({
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })),
            Part::Native(n) if n.format == FORMAT => calls.push(n.value.clone()),
            Part::Native(n) => {
                native_part(n, FORMAT)?;
            }
            Part::Image(_) | Part::Audio(_) => {
                return Err(TranslateError::untranslatable(
                    "media in an assistant message",
                    FORMAT,
                ))
            }
            Part::ToolResult(_) => {
                return Err(TranslateError::untranslatable(
                    "a tool result in an assistant message",
                    FORMAT,
                ))
            }
        }
    }
    let mut m = Map::new();
    m.insert("role".into(), "assistant".into());
    let content = if texts.is_empty() && !calls.is_empty() {
        Value::Null
    } else {
        texts_value(&texts)
    };
    m.insert("content".into(), content);
    if !calls.is_empty() {
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(m)
}

fn encode_tool_result(r: &ToolResult) -> Result<Value, TranslateError> {
    let texts = result_text(r, FORMAT)?;
    Ok(json!({
        "role": "tool",
        "tool_call_id": r.call_id,
        "content": texts_value(&texts),
    }))
}

fn encode_tool(tool: &Tool) -> Result<Value, TranslateError> {
    match tool {
        Tool::Function(f) => {
            let mut function = Map::new();
            function.insert("name".into(), f.name.as_str().into());
            if let Some(d) = &f.description {
                function.insert("description".into(), d.as_str().into());
            }
            if let Some(p) = &f.parameters {
                function.insert("parameters".into(), p.clone());
            }
            if let Some(s) = f.strict {
                function.insert("strict".into(), s.into());
            }
            Ok(json!({"type": "function", "function": function}))
        }
        Tool::Native(n) => native_tool(n, FORMAT).cloned(),
    }
}

fn encode_tool_choice(choice: &ToolChoice) -> Value {
    match choice {
        ToolChoice::Auto => "auto".into(),
        ToolChoice::None => "none".into(),
        ToolChoice::Required => "required".into(),
        ToolChoice::Named(name) => json!({"type": "function", "function": {"name": name}}),
    }
}

fn encode_response_format(rf: &ResponseFormat) -> Value {
    match rf {
        ResponseFormat::Text => json!({"type": "text"}),
        ResponseFormat::JsonObject => json!({"type": "json_object"}),
        ResponseFormat::JsonSchema {
            name,
            description,
            schema,
            strict,
        } => {
            let mut s = Map::new();
            s.insert("name".into(), name.as_str().into());
            if let Some(d) = description {
                s.insert("description".into(), d.as_str().into());
            }
            if let Some(schema) = schema {
                s.insert("schema".into(), schema.clone());
            }
            if let Some(strict) = strict {
                s.insert("strict".into(), (*strict).into());
            }
            json!({"type": "json_schema", "json_schema": s})
        }
    }
}

pub(crate) fn to_bytes(v: &Value) -> Bytes {
    // Serialising a `Value` cannot fail (its keys are strings).
    serde_json::to_vec(v).map(Bytes::from).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Responses

#[derive(Deserialize)]
struct WireResponse {
    id: Option<String>,
    model: Option<String>,
    choices: Option<Vec<WireChoice>>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    index: Option<u64>,
    message: Option<WireMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<Value>,
    refusal: Option<String>,
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    id: Option<String>,
    function: Option<WireFunction>,
}

#[derive(Deserialize)]
struct WireFunction {
    name: Option<String>,
    arguments: Option<Value>,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<WireUsageDetails>,
}

#[derive(Deserialize, Default)]
struct WireUsageDetails {
    cached_tokens: Option<u64>,
}

impl WireUsage {
    fn to_ir(&self) -> Usage {
        let input = self.prompt_tokens.unwrap_or(0);
        let output = self.completion_tokens.unwrap_or(0);
        Usage {
            input,
            output,
            cached_input: self
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            cache_write_input: 0,
            total: self.total_tokens.unwrap_or(input.saturating_add(output)),
        }
    }
}

/// Reads an upstream `chat.completion` body.
pub fn parse_response(body: &[u8]) -> Result<ChatResponse, TranslateError> {
    let wire: WireResponse =
        serde_json::from_slice(body).map_err(|e| TranslateError::upstream(FORMAT, e))?;
    let mut choices = wire.choices.unwrap_or_default();
    choices.sort_by_key(|c| c.index.unwrap_or(0));
    let choices = choices
        .into_iter()
        .map(|c| {
            let mut content = Vec::new();
            if let Some(m) = c.message {
                match m.content {
                    Some(Value::String(s)) if !s.is_empty() => content.push(Output::Text(s)),
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            if let Some(t) = p.get("text").and_then(Value::as_str) {
                                content.push(Output::Text(t.to_owned()));
                            }
                        }
                    }
                    _ => {}
                }
                if let Some(r) = m.refusal {
                    content.push(Output::Text(r));
                }
                for call in m.tool_calls.unwrap_or_default() {
                    let f = call.function.unwrap_or(WireFunction {
                        name: None,
                        arguments: None,
                    });
                    content.push(Output::ToolCall(ToolCall {
                        id: call.id.unwrap_or_default(),
                        name: f.name.unwrap_or_default(),
                        arguments: arguments_text(f.arguments),
                        signature: None,
                    }));
                }
            }
            let saw_call = content.iter().any(|o| matches!(o, Output::ToolCall(_)));
            Choice {
                finish_reason: with_tool_calls(finish_reason(c.finish_reason.as_deref()), saw_call),
                content,
            }
        })
        .collect();
    Ok(ChatResponse {
        id: wire.id.unwrap_or_default(),
        model: wire.model.unwrap_or_default(),
        choices,
        usage: wire.usage.map(|u| u.to_ir()),
    })
}

fn arguments_text(v: Option<Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
    }
}

fn finish_reason(s: Option<&str>) -> FinishReason {
    match s {
        Some("length") => FinishReason::Length,
        Some("tool_calls" | "function_call") => FinishReason::ToolCalls,
        Some("content_filter") => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    }
}

fn finish_reason_str(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::StopSequence(_) => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
    }
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: CachedOut,
}

#[derive(Serialize)]
struct CachedOut {
    cached_tokens: u64,
}

impl From<&Usage> for UsageOut {
    fn from(u: &Usage) -> Self {
        Self {
            prompt_tokens: u.input,
            completion_tokens: u.output,
            total_tokens: u.total,
            prompt_tokens_details: CachedOut {
                cached_tokens: u.cached_input,
            },
        }
    }
}

/// Builds a `chat.completion` body for the client; `created` is the Unix
/// time to report (protocol code reads no clock).
pub fn encode_response(resp: &ChatResponse, created: u64) -> Bytes {
    let choices: Vec<Value> = resp
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let text: String = c
                .content
                .iter()
                .filter_map(|o| match o {
                    Output::Text(t) => Some(t.as_str()),
                    Output::ToolCall(_) => None,
                })
                .collect();
            let calls: Vec<Value> = c
                .content
                .iter()
                .filter_map(|o| match o {
                    Output::ToolCall(call) => Some(json!({
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    })),
                    Output::Text(_) => None,
                })
                .collect();
            let has_text = c.content.iter().any(|o| matches!(o, Output::Text(_)));
            let mut message = Map::new();
            message.insert("role".into(), "assistant".into());
            message.insert(
                "content".into(),
                if has_text { text.into() } else { Value::Null },
            );
            message.insert("refusal".into(), Value::Null);
            if !calls.is_empty() {
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            json!({
                "index": i,
                "message": message,
                "logprobs": null,
                "finish_reason": finish_reason_str(&c.finish_reason),
            })
        })
        .collect();
    let mut out = Map::new();
    out.insert("id".into(), resp.id.as_str().into());
    out.insert("object".into(), "chat.completion".into());
    out.insert("created".into(), created.into());
    out.insert("model".into(), resp.model.as_str().into());
    out.insert("choices".into(), Value::Array(choices));
    if let Some(u) = &resp.usage {
        out.insert(
            "usage".into(),
            serde_json::to_value(UsageOut::from(u)).unwrap_or_default(),
        );
    }
    to_bytes(&Value::Object(out))
}

// ---------------------------------------------------------------------------
// Errors

/// The OpenAI error `type` for a kind.
pub fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest
        | ErrorKind::Authentication
        | ErrorKind::Permission
        | ErrorKind::NotFound
        | ErrorKind::RequestTooLarge => "invalid_request_error",
        ErrorKind::RateLimit => "rate_limit_error",
        ErrorKind::Server | ErrorKind::Overloaded | ErrorKind::Timeout => "server_error",
    }
}

/// Reads an OpenAI-style error body or stream event: the nested
/// `{"error":{...}}` form, or the flat vLLM form with an integer `code`.
pub fn parse_error(body: &[u8]) -> Option<ErrorInfo> {
    let v: Value = serde_json::from_slice(body).ok()?;
    error_from_value(&v)
}

fn error_from_value(v: &Value) -> Option<ErrorInfo> {
    let e = match v.get("error") {
        Some(e @ Value::Object(_)) => e,
        Some(Value::String(message)) => {
            return Some(ErrorInfo {
                kind: ErrorKind::Server,
                message: message.clone(),
                retry_after: None,
            })
        }
        _ if v.get("object").and_then(Value::as_str) == Some("error") => v,
        _ => return None,
    };
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("An error occurred during streaming")
        .to_owned();
    let kind_name = e.get("type").and_then(Value::as_str).unwrap_or("");
    let kind = match e.get("code") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .map(ErrorKind::from_status),
        Some(Value::String(code)) => kind_from_name(code),
        _ => None,
    }
    .or_else(|| kind_from_name(kind_name))
    .unwrap_or(ErrorKind::Server);
    Some(ErrorInfo {
        kind,
        message,
        retry_after: None,
    })
}

fn kind_from_name(name: &str) -> Option<ErrorKind> {
    Some(match name {
        "invalid_api_key" | "authentication_error" => ErrorKind::Authentication,
        "permission_error" | "unsupported_country_region_territory" | "request_forbidden" => {
            ErrorKind::Permission
        }
        "model_not_found" | "not_found_error" => ErrorKind::NotFound,
        "request_too_large" => ErrorKind::RequestTooLarge,
        "rate_limit_exceeded"
        | "rate_limit_error"
        | "insufficient_quota"
        | "tokens"
        | "requests" => ErrorKind::RateLimit,
        "invalid_request_error" | "context_length_exceeded" | "BadRequestError" => {
            ErrorKind::InvalidRequest
        }
        "unavailable_error" | "service_unavailable_error" | "overloaded" => ErrorKind::Overloaded,
        "server_error" | "api_error" | "internal_error" => ErrorKind::Server,
        "timeout" | "timeout_error" => ErrorKind::Timeout,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Streams

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    usage: Option<WireUsage>,
    error: Option<Value>,
    object: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    arguments: Option<Value>,
}

/// Decodes an upstream OpenAI-format stream, one `data:` payload at a time.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    started: bool,
    finished: bool,
    ended: bool,
    /// Upstream tool-call index and id → IR index, in order of appearance.
    calls: Vec<(Option<u64>, String)>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) -> Result<Vec<StreamEvent>, TranslateError> {
        let mut events = Vec::new();
        if self.ended {
            return Ok(events);
        }
        let data = data.trim_ascii();
        if data.is_empty() {
            return Ok(events);
        }
        if data.starts_with(b"[DONE]") {
            self.ended = true;
            events.push(StreamEvent::Done);
            return Ok(events);
        }
        let chunk: Chunk =
            serde_json::from_slice(data).map_err(|e| TranslateError::upstream(FORMAT, e))?;
        let flat_error = chunk.object.as_deref() == Some("error");
        if chunk.error.is_some() || flat_error {
            let v: Value = serde_json::from_slice(data).unwrap_or_default();
            let info = error_from_value(&v).unwrap_or(ErrorInfo {
                kind: ErrorKind::Server,
                message: "An error occurred during streaming".to_owned(),
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
            events.push(StreamEvent::Start {
                id: chunk.id.as_deref().unwrap_or_default().to_owned(),
                model: chunk.model.as_deref().unwrap_or_default().to_owned(),
            });
        }
        for choice in chunk.choices.unwrap_or_default() {
            if choice.index.unwrap_or(0) != 0 {
                return Err(TranslateError::upstream(
                    FORMAT,
                    "a stream with more than one choice (n > 1) cannot be translated",
                ));
            }
            if let Some(delta) = choice.delta {
                self.delta(delta, &mut events);
            }
            if let (Some(reason), false) = (choice.finish_reason, self.finished) {
                self.finished = true;
                events.push(StreamEvent::Finish {
                    reason: with_tool_calls(finish_reason(Some(&reason)), !self.calls.is_empty()),
                });
            }
        }
        if let Some(u) = chunk.usage {
            events.push(StreamEvent::Usage(u.to_ir()));
        }
        Ok(events)
    }

    fn delta(&mut self, delta: Delta<'_>, events: &mut Vec<StreamEvent>) {
        for text in [delta.content, delta.refusal].into_iter().flatten() {
            if !text.is_empty() {
                events.push(StreamEvent::TextDelta(text.into_owned()));
            }
        }
        for call in delta.tool_calls.unwrap_or_default() {
            let (name, arguments) = match call.function {
                Some(f) => (f.name, arguments_text(f.arguments)),
                None => (None, String::new()),
            };
            // A fragment continues the latest call with its upstream index,
            // unless it carries a new id (servers that reuse index 0 for every
            // whole call) or no call has that index yet.
            let existing = self
                .calls
                .iter()
                .rposition(|(i, _)| call.index.is_none() || *i == call.index);
            let index = match (existing, call.id.as_deref()) {
                (Some(at), Some(id))
                    if self.calls.get(at).is_some_and(|(_, known)| known == id) =>
                {
                    at
                }
                (Some(at), None) => at,
                (_, id) => {
                    let id = id.unwrap_or_default().to_owned();
                    self.calls.push((call.index, id.clone()));
                    let index = self.calls.len() - 1;
                    events.push(StreamEvent::ToolCallStart {
                        index,
                        id,
                        name: name.as_deref().unwrap_or_default().to_owned(),
                        signature: None,
                    });
                    index
                }
            };
            if !arguments.is_empty() {
                events.push(StreamEvent::ToolCallArgsDelta {
                    index,
                    fragment: arguments,
                });
            }
        }
    }

    /// The upstream body ended. Servers that skip `[DONE]` after a finish
    /// reason get one; a stream cut before its finish is an error.
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
                "stream ended before [DONE]",
            ))
        }
    }
}

#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
    /// detour's own extension object (see [`StreamEncoder::set_extension`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    detour: Option<&'a Value>,
}

#[derive(Serialize)]
struct ChoiceOut<'a> {
    index: u32,
    delta: DeltaOut<'a>,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    /// `Some(None)` writes `"content": null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallOut<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallOut<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// Encodes IR events as an OpenAI `chat.completion.chunk` stream: the role
/// chunk, content and tool-call chunks, the finish chunk, the usage chunk
/// (only when the client asked for it, held until the end so it carries the
/// final count), then `data: [DONE]`. An error event ends the stream.
#[derive(Debug)]
pub struct StreamEncoder {
    created: u64,
    include_usage: bool,
    id: String,
    model: String,
    role_sent: bool,
    usage: Option<Usage>,
    closed: bool,
    extension: Option<Value>,
}

impl StreamEncoder {
    /// `created` is the Unix time every chunk reports.
    pub fn new(created: u64, include_usage: bool) -> Self {
        Self {
            created,
            include_usage,
            id: String::new(),
            model: String::new(),
            role_sent: false,
            usage: None,
            closed: false,
            extension: None,
        }
    }

    /// An object sent as `"detour"` in one last chunk (no choices) just
    /// before `data: [DONE]`.
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
            StreamEvent::TextDelta(text) => {
                self.role(Some(""), out);
                if !text.is_empty() {
                    self.chunk(
                        DeltaOut {
                            content: Some(Some(text)),
                            ..DeltaOut::default()
                        },
                        None,
                        out,
                    );
                }
            }
            StreamEvent::ToolCallStart {
                index, id, name, ..
            } => {
                self.role(None, out);
                let call = ToolCallOut {
                    index: *index,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionOut {
                        name: Some(name),
                        arguments: "",
                    },
                };
                self.chunk(
                    DeltaOut {
                        tool_calls: Some([call]),
                        ..DeltaOut::default()
                    },
                    None,
                    out,
                );
            }
            StreamEvent::ToolCallArgsDelta { index, fragment } => {
                self.role(None, out);
                if !fragment.is_empty() {
                    let call = ToolCallOut {
                        index: *index,
                        id: None,
                        kind: None,
                        function: FunctionOut {
                            name: None,
                            arguments: fragment,
                        },
                    };
                    self.chunk(
                        DeltaOut {
                            tool_calls: Some([call]),
                            ..DeltaOut::default()
                        },
                        None,
                        out,
                    );
                }
            }
            StreamEvent::Finish { reason } => {
                self.role(Some(""), out);
                self.chunk(DeltaOut::default(), Some(finish_reason_str(reason)), out);
            }
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Error { kind, message } => {
                let body = json!({"error": {
                    "message": message,
                    "type": error_type(*kind),
                    "param": null,
                    "code": null,
                }});
                data_line(out, &to_bytes(&body));
                self.closed = true;
            }
            StreamEvent::Done => {
                self.role(Some(""), out);
                if let (true, Some(u)) = (self.include_usage, self.usage) {
                    let chunk = ChunkOut {
                        id: &self.id,
                        object: "chat.completion.chunk",
                        created: self.created,
                        model: &self.model,
                        choices: Vec::new(),
                        usage: Some(UsageOut::from(&u)),
                        detour: None,
                    };
                    write_json(out, &chunk);
                }
                if let Some(extension) = &self.extension {
                    let chunk = ChunkOut {
                        id: &self.id,
                        object: "chat.completion.chunk",
                        created: self.created,
                        model: &self.model,
                        choices: Vec::new(),
                        usage: None,
                        detour: Some(extension),
                    };
                    write_json(out, &chunk);
                }
                out.put_slice(b"data: [DONE]\n\n");
                self.closed = true;
            }
        }
    }

    /// The first chunk carries the role; `content` is `""` before text and
    /// `null` before tool calls, as OpenAI sends it.
    fn role(&mut self, content: Option<&str>, out: &mut BytesMut) {
        if self.role_sent {
            return;
        }
        self.role_sent = true;
        self.chunk(
            DeltaOut {
                role: Some("assistant"),
                content: Some(content),
                tool_calls: None,
            },
            None,
            out,
        );
    }

    fn chunk(&self, delta: DeltaOut<'_>, finish: Option<&'static str>, out: &mut BytesMut) {
        let chunk = ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChoiceOut {
                index: 0,
                delta,
                logprobs: (),
                finish_reason: finish,
            }],
            usage: None,
            detour: None,
        };
        write_json(out, &chunk);
    }
}

fn write_json<T: Serialize>(out: &mut BytesMut, value: &T) {
    // Serialising these plain structs cannot fail.
    if let Ok(bytes) = serde_json::to_vec(value) {
        data_line(out, &bytes);
    }
}

fn data_line(out: &mut BytesMut, payload: &[u8]) {
    out.reserve(payload.len() + 8);
    out.put_slice(b"data: ");
    out.put_slice(payload);
    out.put_slice(b"\n\n");
}
