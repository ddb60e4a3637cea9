//! OpenAI's Responses API (`POST /v1/responses`) ⇄ IR, for Responses clients
//! served by providers that speak another API (Chat Completions servers,
//! Anthropic, Gemini). A provider of kind `openai` gets the request itself
//! (only `model` rewritten) and is never translated.
//!
//! The official `openai` SDK's types (`openai/types/responses/`) are the
//! reference for every shape here.
//!
//! | module | direction |
//! |---|---|
//! | here: [`parse_request`] | client body → IR |
//! | [`object`]: [`encode_response`], [`Echo`] | IR answer → `response` object |
//! | [`stream`]: [`StreamEncoder`] | IR events → typed Responses events |
//! | [`stream`]: [`StreamDecoder`] | a passthrough's Responses events → IR (its end, usage and errors) |
//!
//! # What translates
//!
//! `instructions` becomes the first system message; `input` as text is one
//! user message; as items: messages (`input_text`, `input_image` by URL or
//! data URL, `input_audio`; assistant `output_text` and `refusal`),
//! `function_call` (joined to the assistant turn before it) and
//! `function_call_output` items. `max_output_tokens`, `temperature`,
//! `top_p`, function `tools`, `tool_choice` (`auto`, `none`, `required`, a
//! named function), `parallel_tool_calls`, `text.format` (`text`,
//! `json_object`, `json_schema`) and `user` map to their IR fields.
//!
//! Fields with a Chat Completions twin are carried under its name and then
//! follow the OpenAI rows of [`crate::translate`]'s rules (kept for
//! `openai-compatible`, dropped for Anthropic and Gemini): `metadata`,
//! `service_tier`, `prompt_cache_key`, `safety_identifier`,
//! `reasoning.effort` (as `reasoning_effort`), `text.verbosity` (as
//! `verbosity`). Dropped as hints: `include`, `truncation`,
//! `max_tool_calls`, `reasoning.summary`, `stream_options`, `store: false`,
//! reasoning input items (only valid with the model that wrote them), and
//! unknown fields.
//!
//! **Refused** ([`TranslateError::ResponsesOnly`]): state kept by OpenAI
//! (`previous_response_id`, `conversation`, `store: true`,
//! `background: true`, a stored `prompt`, `item_reference` items, images
//! and files by `file_id`), built-in and other non-function tools and their
//! `tool_choice`, `input_file` parts, `top_logprobs`, and every other input
//! item type. [`stateful_feature`] names the stateful ones without a full
//! parse, so that routing can send such a request only to `openai` targets.

pub mod object;
pub mod stream;

use serde_json::{Map, Value};

use super::json;
use super::TranslateError;
use crate::chat::{
    Audio, ChatRequest, Format, FunctionTool, Image, Message, Part, ResponseFormat, Role, Tool,
    ToolCall, ToolChoice, ToolResult,
};

pub use crate::openai::stateful_feature;
pub use object::{encode_response, Echo};
pub use stream::{error_event, StreamDecoder, StreamEncoder};

/// The IR of a translated Responses request is OpenAI-family: its `extra`
/// holds only Chat Completions names, so the rules table applies as for a
/// chat request.
const SOURCE: Format = Format::OpenAi;

fn responses_only(feature: impl Into<String>) -> TranslateError {
    TranslateError::ResponsesOnly {
        feature: feature.into(),
    }
}

// ---------------------------------------------------------------------------
// Requests

/// Reads a client's Responses request into the IR, checking the types of
/// everything it keeps; refuses what only OpenAI's Responses API can serve.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, TranslateError> {
    let mut root = json::parse_object(body)?;
    let model = json::string(json::required(&mut root, "model", "")?, "model")?;
    let mut req = ChatRequest::new(SOURCE, model);

    if let Some(feature) = stateful_feature(body) {
        return Err(responses_only(feature));
    }
    for key in [
        "previous_response_id",
        "conversation",
        "prompt",
        "background",
    ] {
        root.remove(key);
    }

    if let Some(instructions) = json::opt_string(&mut root, "instructions", "")? {
        req.messages
            .push(Message::new(Role::System, vec![Part::Text(instructions)]));
    }
    match json::required(&mut root, "input", "")? {
        Value::String(text) => req
            .messages
            .push(Message::new(Role::User, vec![Part::Text(text)])),
        other => {
            for (i, item) in json::array(other, "input")?.into_iter().enumerate() {
                push_item(&mut req.messages, item, &json::idx("input", i))?;
            }
        }
    }
    if req.messages.is_empty() {
        return Err(json::invalid("input", "must contain at least one item").into());
    }

    req.max_tokens = json::opt_unsigned(&mut root, "max_output_tokens", "")?;
    req.temperature = json::opt_number(&mut root, "temperature", "")?;
    req.top_p = json::opt_number(&mut root, "top_p", "")?;
    if let Some(n) = json::opt_unsigned(&mut root, "top_logprobs", "")? {
        if n > 0 {
            return Err(responses_only("`top_logprobs`"));
        }
    }
    if let Some(tools) = json::take(&mut root, "tools") {
        for (i, t) in json::array(tools, "tools")?.into_iter().enumerate() {
            req.tools.push(parse_tool(t, &json::idx("tools", i))?);
        }
    }
    if let Some(choice) = json::take(&mut root, "tool_choice") {
        req.tool_choice = Some(parse_tool_choice(choice)?);
    }
    req.parallel_tool_calls = json::opt_bool(&mut root, "parallel_tool_calls", "")?;
    if let Some(text) = json::take(&mut root, "text") {
        let mut text = json::object(text, "text")?;
        if let Some(format) = json::take(&mut text, "format") {
            req.response_format = Some(parse_text_format(format)?);
        }
        if let Some(verbosity) = json::take(&mut text, "verbosity") {
            req.extra.insert("verbosity".into(), verbosity);
        }
    }
    if let Some(reasoning) = json::take(&mut root, "reasoning") {
        let mut reasoning = json::object(reasoning, "reasoning")?;
        if let Some(effort) = json::take(&mut reasoning, "effort") {
            req.extra.insert("reasoning_effort".into(), effort);
        }
    }
    req.user = json::opt_string(&mut root, "user", "")?;
    req.stream = json::opt_bool(&mut root, "stream", "")?.unwrap_or(false);
    // Responses streams always end with their usage: the translated upstream
    // is asked for it.
    req.include_usage = req.stream;
    for key in [
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    ] {
        if let Some(v) = json::take(&mut root, key) {
            req.extra.insert(key.into(), v);
        }
    }
    // Everything left (`include`, `truncation`, `max_tool_calls`,
    // `stream_options`, `store: false`, unknown fields) is a hint: dropped.
    Ok(req)
}

/// Adds one input item to the conversation.
fn push_item(messages: &mut Vec<Message>, item: Value, path: &str) -> Result<(), TranslateError> {
    let mut item = json::object(item, path)?;
    let kind = match json::take(&mut item, "type") {
        Some(k) => json::string(k, &json::at(path, "type"))?,
        // The SDK's `EasyInputMessage` may leave out `type`.
        None => "message".to_owned(),
    };
    match kind.as_str() {
        "message" => messages.push(parse_message(item, path)?),
        "function_call" => {
            let call = ToolCall {
                id: json::required_string(&mut item, "call_id", path)?,
                name: json::required_string(&mut item, "name", path)?,
                arguments: match json::take(&mut item, "arguments") {
                    None => String::new(),
                    Some(Value::String(s)) => s,
                    Some(v @ Value::Object(_)) => v.to_string(),
                    Some(_) => {
                        return Err(json::invalid(
                            &json::at(path, "arguments"),
                            "expected a JSON string",
                        )
                        .into())
                    }
                },
                signature: None,
            };
            // Calls belong to the assistant turn they follow.
            match messages.last_mut() {
                Some(last) if last.role == Role::Assistant => {
                    last.content.push(Part::ToolCall(call));
                }
                _ => messages.push(Message::new(Role::Assistant, vec![Part::ToolCall(call)])),
            }
        }
        "function_call_output" => {
            let call_id = json::required_string(&mut item, "call_id", path)?;
            let output_path = json::at(path, "output");
            let content = match json::required(&mut item, "output", path)? {
                Value::String(s) => vec![Part::Text(s)],
                other => input_parts(other, &output_path)?,
            };
            messages.push(Message::new(
                Role::Tool,
                vec![Part::ToolResult(ToolResult {
                    call_id,
                    name: None,
                    content,
                    is_error: false,
                })],
            ));
        }
        // Reasoning is only valid with the model that wrote it.
        "reasoning" => {}
        "item_reference" => return Err(responses_only("an `item_reference` input item")),
        other => return Err(responses_only(format!("input item of type `{other}`"))),
    }
    Ok(())
}

fn parse_message(mut m: Map<String, Value>, path: &str) -> Result<Message, TranslateError> {
    let role_path = json::at(path, "role");
    let role = json::string(json::required(&mut m, "role", path)?, &role_path)?;
    let role = match role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        _ => {
            return Err(json::invalid(
                &role_path,
                "expected one of 'system', 'developer', 'user', 'assistant'",
            )
            .into())
        }
    };
    let content_path = json::at(path, "content");
    let content = match json::required(&mut m, "content", path)? {
        Value::String(s) => vec![Part::Text(s)],
        other => input_parts(other, &content_path)?,
    };
    Ok(Message::new(role, content))
}

/// An array of content parts: input and output text, refusals, images by
/// URL, audio.
fn input_parts(v: Value, path: &str) -> Result<Vec<Part>, TranslateError> {
    let mut parts = Vec::new();
    for (i, p) in json::array(v, path)?.into_iter().enumerate() {
        let p_path = json::idx(path, i);
        let mut p = json::object(p, &p_path)?;
        let kind = json::required_string(&mut p, "type", &p_path)?;
        let part = match kind.as_str() {
            "input_text" | "output_text" | "text" => {
                Part::Text(json::required_string(&mut p, "text", &p_path)?)
            }
            "refusal" => Part::Text(json::required_string(&mut p, "refusal", &p_path)?),
            "input_image" => {
                let detail = json::opt_string(&mut p, "detail", &p_path)?;
                match json::opt_string(&mut p, "image_url", &p_path)? {
                    Some(url) => Part::Image(Image {
                        source: super::openai::media_source(url),
                        detail,
                    }),
                    None => return Err(responses_only("an `input_image` by `file_id`")),
                }
            }
            "input_audio" => {
                let a_path = json::at(&p_path, "input_audio");
                let mut a = json::object(json::required(&mut p, "input_audio", &p_path)?, &a_path)?;
                Part::Audio(Audio {
                    data: json::required_string(&mut a, "data", &a_path)?,
                    format: json::required_string(&mut a, "format", &a_path)?,
                })
            }
            other => return Err(responses_only(format!("content part of type `{other}`"))),
        };
        parts.push(part);
    }
    Ok(parts)
}

/// A function tool is flat in the Responses API (`name` beside `type`).
fn parse_tool(v: Value, path: &str) -> Result<Tool, TranslateError> {
    let mut t = json::object(v, path)?;
    let kind = json::required_string(&mut t, "type", path)?;
    if kind != "function" {
        return Err(responses_only(format!("a tool of type `{kind}`")));
    }
    Ok(Tool::Function(FunctionTool {
        name: json::required_string(&mut t, "name", path)?,
        description: json::opt_string(&mut t, "description", path)?,
        parameters: json::take(&mut t, "parameters"),
        strict: json::opt_bool(&mut t, "strict", path)?,
    }))
}

fn parse_tool_choice(v: Value) -> Result<ToolChoice, TranslateError> {
    match v {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            _ => Err(json::invalid(
                "tool_choice",
                "expected 'none', 'auto', 'required' or an object",
            )
            .into()),
        },
        Value::Object(mut o) => {
            let kind = json::string(
                json::required(&mut o, "type", "tool_choice")?,
                "tool_choice.type",
            )?;
            if kind != "function" {
                return Err(responses_only(format!("`tool_choice` of type `{kind}`")));
            }
            let name = json::string(
                json::required(&mut o, "name", "tool_choice")?,
                "tool_choice.name",
            )?;
            Ok(ToolChoice::Named(name))
        }
        _ => Err(json::invalid("tool_choice", "expected a string or an object").into()),
    }
}

/// `text.format`: flat, unlike Chat Completions' `response_format`.
fn parse_text_format(v: Value) -> Result<ResponseFormat, TranslateError> {
    const PATH: &str = "text.format";
    let mut o = json::object(v, PATH)?;
    let type_path = json::at(PATH, "type");
    let kind = json::string(json::required(&mut o, "type", PATH)?, &type_path)?;
    match kind.as_str() {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        "json_schema" => Ok(ResponseFormat::JsonSchema {
            name: json::required_string(&mut o, "name", PATH)?,
            description: json::opt_string(&mut o, "description", PATH)?,
            schema: json::take(&mut o, "schema"),
            strict: json::opt_bool(&mut o, "strict", PATH)?,
        }),
        _ => Err(json::invalid(
            &type_path,
            "expected 'text', 'json_object' or 'json_schema'",
        )
        .into()),
    }
}

#[cfg(test)]
mod tests;
