//! Translation between wire formats through the IR in [`crate::chat`].
//!
//! Each format has one adapter that decodes into the IR and encodes out of it;
//! a request from an OpenAI-SDK client served by Claude goes
//! `openai::parse_request → anthropic::encode_request`, and the answer comes
//! back `anthropic::StreamDecoder → openai::StreamEncoder`. Everything here is
//! pure: bytes and types in, bytes and types out, and no input panics.
//!
//! # Public API
//!
//! | module | function / type | direction |
//! |---|---|---|
//! | [`openai`] | `parse_request(&[u8]) -> Result<ChatRequest>` | client body → IR |
//! | | `encode_request(&ChatRequest, model, &RequestOptions) -> Result<Bytes>` | IR → upstream body |
//! | | `parse_response(&[u8]) -> Result<ChatResponse>` | upstream body → IR |
//! | | `encode_response(&ChatResponse, created) -> Bytes` | IR → client body |
//! | | `StreamDecoder` / `StreamEncoder` | upstream SSE data ↔ IR events ↔ client SSE bytes |
//! | | `parse_error(&[u8]) -> Option<ErrorInfo>`, `error_type(ErrorKind)` | error bodies |
//! | [`anthropic`] | `parse_request`, `encode_request(&ChatRequest, model, default_max_tokens)` | as above |
//! | | `parse_response`, `encode_response(&ChatResponse) -> Result<Bytes>` | as above |
//! | | `StreamDecoder` / `StreamEncoder` | as above |
//! | | `error_body`, `error_event`, `error_type`, `error_status`, `error_kind`, `parse_error` | Anthropic-shape errors |
//! | [`gemini`] | `encode_request(&ChatRequest) -> Result<Bytes>` | IR → `generateContent` body |
//! | | `parse_response`, `StreamDecoder`, `parse_error` | upstream → IR |
//! | [`responses`] | `parse_request(&[u8]) -> Result<ChatRequest>` | Responses API client body → IR |
//! | | `encode_response(&ChatResponse, &Echo, created_at) -> Bytes` | IR → `response` object |
//! | | `StreamEncoder` / `StreamDecoder` | IR events → typed Responses events; a passthrough's events → IR |
//! | here | [`TranslateError`], [`StreamDecoder`], [`StreamEncoder`] | format-independent handles for the relay |
//!
//! Decoders are fed one SSE `data:` payload at a time (as split by
//! [`crate::sse::data_payloads`], OpenAI's `[DONE]` included) and
//! return IR events; at the end of the upstream body call `finish()`, which
//! emits `Done` for Gemini (whose body just ends) and fails if the stream was
//! cut short. Encoders append client SSE bytes to a buffer per event.
//!
//! # What does not translate
//!
//! A feature with no equivalent in the target is either dropped by a rule
//! below or refused with [`TranslateError::Untranslatable`] naming the feature
//! and the target. Nothing else is changed. A target in the request's own
//! format gets [`ChatRequest::extra`] and [`Native`] parts back verbatim.
//!
//! | feature | to OpenAI | to Anthropic | to Gemini |
//! |---|---|---|---|
//! | `n > 1` | kept | **refused** | `candidateCount`; **refused** when streaming |
//! | `seed` | kept | dropped (best-effort by definition) | kept |
//! | `frequency_penalty`, `presence_penalty` | kept | dropped (sampling hints) | kept |
//! | `top_k` (from Anthropic) | dropped unless `RequestOptions::top_k` (local servers accept it; api.openai.com rejects it) | kept | kept |
//! | `temperature` > 1 | kept | clamped to 1 (Anthropic's range is 0–1) | kept |
//! | whitespace-only stop sequence | kept | **refused** (Anthropic rejects it; dropping would change where output stops) | kept |
//! | `parallel_tool_calls: false` | kept | `disable_parallel_tool_use` | dropped (no switch) |
//! | `tool_choice` without tools | kept | dropped (no effect) | dropped (no effect) |
//! | `response_format: json_object` | kept | **refused** (no schema-less JSON mode) | `responseMimeType` |
//! | `response_format: json_schema` | kept | `output_config.format` (name, description, strict dropped); **refused** without a schema | `responseJsonSchema` (name, description, strict dropped) |
//! | tool `strict` | kept | kept | dropped |
//! | `user` | kept | `metadata.user_id` | dropped (no field) |
//! | image `detail` | kept | dropped (a cost hint) | dropped |
//! | image URL | kept | `source.type: url` | `fileData.fileUri` |
//! | audio input part | kept | **refused** | `inlineData` (`audio/wav`, `audio/mp3`) |
//! | image in a tool result | **refused** | kept | **refused** |
//! | tool result `is_error` | dropped (no field; the content says it) | kept | result sent as `{"error": …}` |
//! | message `name` | kept | dropped | dropped |
//! | system message after the first turn | kept in place | hoisted into `system` | hoisted into `systemInstruction` |
//! | empty text parts, then empty messages | kept | dropped (Anthropic rejects them) | dropped |
//! | tool-call id not matching `[A-Za-z0-9_-]+` | kept | invalid characters become `_` (calls and results alike) | — (Gemini matches results by name) |
//! | tool-call arguments not a JSON object (`""` counts as `{}`) | kept | **refused** (streamed fragments pass as they are) | **refused** |
//! | Gemini `thoughtSignature` | dropped (the gateway keeps it by call id) | dropped | sent back; a model turn with calls but no signature gets Google's documented `skip_thought_signature_validator` |
//! | `refusal` in OpenAI assistant history | becomes content text | text | text |
//! | OpenAI `developer` role | `system` (OpenAI treats them alike) | system | system |
//!
//! Fields of the source format the IR does not model ([`ChatRequest::extra`]),
//! when the target is another format:
//!
//! | source | dropped (hints and bookkeeping) | **refused** when set (they change the answer's shape or content) |
//! |---|---|---|
//! | OpenAI | `metadata`, `store`, `service_tier`, `prompt_cache_key`, `safety_identifier`, `prediction`, `reasoning_effort`, `verbosity`, `top_k`, any unknown field | `logprobs`, `top_logprobs`, `logit_bias`, `modalities`, `audio`, `web_search_options`, `functions`, `function_call`, `tool_choice` of type `allowed_tools`/`custom` |
//! | Anthropic | `thinking`, `service_tier`, `cache_control`, `output_config` (besides `format`), `context_management`, any unknown field | `container`, `mcp_servers`, `inference_geo` |
//!
//! Content parts and tools the IR does not model ([`Native`]): Anthropic
//! `thinking` and `redacted_thinking` blocks are dropped for other targets
//! (they are only valid with the model that wrote them); every other native
//! part (OpenAI `file`, Anthropic `document`, `search_result`, server tool
//! blocks, …) and every native tool (Anthropic server tools, OpenAI custom
//! tools) is **refused**. The deprecated OpenAI `function` role is refused at
//! parse time.
//!
//! Answers: Anthropic `thinking` blocks and Gemini `thought` parts are
//! dropped; finish reasons map per PROVIDERS.md §4.5 (Anthropic `refusal` and
//! the Gemini safety family → `ContentFilter`; `pause_turn`, Gemini `OTHER`,
//! `LANGUAGE` and the malformed-call family → `Stop`;
//! `model_context_window_exceeded` → `Length`; an Anthropic `stop_sequence`
//! is OpenAI `stop`, and OpenAI `stop` is Anthropic `end_turn` since OpenAI
//! does not say whether a stop string ended the output), and a `Stop` that
//! carries tool calls becomes `ToolCalls` (Gemini always says `STOP`; some
//! local servers do too). Gemini output parts other than text and function
//! calls (images, code execution) are dropped; they only come when asked
//! for, which no translated request does.

use bytes::BytesMut;
use serde_json::{Map, Value};

use crate::chat::{Format, Native, Part, StreamEvent, ToolResult};
use crate::openai::InvalidRequest;

pub mod anthropic;
pub mod gemini;
pub mod openai;
pub mod responses;

mod json;

#[cfg(test)]
mod tests;

/// Why a translation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The client's request is not valid in its own format.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// The request uses a feature the target format cannot express.
    #[error("{feature} cannot be translated to {target}")]
    Untranslatable { feature: String, target: Format },
    /// A Responses API feature only OpenAI's own Responses API serves (a
    /// built-in tool, stored state): any translated target refuses it.
    #[error("{feature} is served only by OpenAI's Responses API (a provider of kind `openai`)")]
    ResponsesOnly { feature: String },
    /// The provider sent something this translator cannot use: invalid in
    /// its format, cut short, or beyond the IR (several streamed choices).
    #[error("unusable {format} response: {detail}")]
    Upstream { format: Format, detail: String },
}

impl TranslateError {
    pub(crate) fn untranslatable(feature: impl Into<String>, target: Format) -> Self {
        Self::Untranslatable {
            feature: feature.into(),
            target,
        }
    }

    pub(crate) fn upstream(format: Format, detail: impl std::fmt::Display) -> Self {
        Self::Upstream {
            format,
            detail: detail.to_string(),
        }
    }
}

/// Reads a provider's error body in its format.
pub fn parse_error(format: Format, body: &[u8]) -> Option<crate::chat::ErrorInfo> {
    match format {
        Format::OpenAi => openai::parse_error(body),
        Format::Anthropic => anthropic::parse_error(body),
        Format::Gemini => gemini::parse_error(body),
    }
}

/// A stream decoder for whichever format the upstream speaks.
#[derive(Debug)]
pub enum StreamDecoder {
    OpenAi(openai::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
    Gemini(gemini::StreamDecoder),
    /// OpenAI Responses events (a passthrough, decoded to know its end).
    Responses(responses::StreamDecoder),
}

impl StreamDecoder {
    pub fn new(upstream: Format) -> Self {
        match upstream {
            Format::OpenAi => Self::OpenAi(openai::StreamDecoder::new()),
            Format::Anthropic => Self::Anthropic(anthropic::StreamDecoder::new()),
            Format::Gemini => Self::Gemini(gemini::StreamDecoder::new()),
        }
    }

    /// Decodes one SSE data payload.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<StreamEvent>, TranslateError> {
        match self {
            Self::OpenAi(d) => d.push(data),
            Self::Anthropic(d) => d.push(data),
            Self::Gemini(d) => d.push(data),
            Self::Responses(d) => d.push(data),
        }
    }

    /// Call when the upstream body ended; fails if the stream was cut short.
    pub fn finish(&mut self) -> Result<Vec<StreamEvent>, TranslateError> {
        match self {
            Self::OpenAi(d) => d.finish(),
            Self::Anthropic(d) => d.finish(),
            Self::Gemini(d) => d.finish(),
            Self::Responses(d) => d.finish(),
        }
    }
}

/// A stream encoder for whichever format the client speaks.
#[derive(Debug)]
pub enum StreamEncoder {
    OpenAi(openai::StreamEncoder),
    Anthropic(anthropic::StreamEncoder),
    Responses(Box<responses::StreamEncoder>),
}

impl StreamEncoder {
    /// Appends the client bytes for `event` to `out` (possibly none).
    pub fn encode(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        match self {
            Self::OpenAi(e) => e.encode(event, out),
            Self::Anthropic(e) => e.encode(event, out),
            Self::Responses(e) => e.encode(event, out),
        }
    }

    /// detour's own extension object, sent at the stream's end: OpenAI, a
    /// last chunk `{"choices":[],"detour":…}` before `[DONE]`; Anthropic, a
    /// `detour` field of the final `message_delta`. Responses streams carry
    /// none.
    pub fn set_extension(&mut self, extension: serde_json::Value) {
        match self {
            Self::OpenAi(e) => e.set_extension(extension),
            Self::Anthropic(e) => e.set_extension(extension),
            Self::Responses(_) => {}
        }
    }
}

/// What becomes of a source-only top-level field when the target differs.
enum Rule {
    Drop,
    Refuse,
}

fn extra_rule(source: Format, key: &str) -> Rule {
    match (source, key) {
        (
            Format::OpenAi,
            "logprobs" | "top_logprobs" | "logit_bias" | "modalities" | "audio"
            | "web_search_options" | "functions" | "function_call" | "tool_choice",
        ) => Rule::Refuse,
        (Format::Anthropic, "container" | "mcp_servers" | "inference_geo") => Rule::Refuse,
        _ => Rule::Drop,
    }
}

/// Null, false, zero and empty values (and text-only `modalities`) ask
/// for nothing.
fn is_unset(key: &str, v: &Value) -> bool {
    if key == "modalities" && v.as_array().is_some_and(|m| m.iter().all(|x| x == "text")) {
        return true;
    }
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(true) => false,
    }
}

/// Copies `extra` into a `target` body: verbatim for the same format,
/// otherwise by the rules table (keys the encoder already wrote win).
pub(crate) fn carry_extra(
    source: Format,
    extra: &Map<String, Value>,
    target: Format,
    out: &mut Map<String, Value>,
) -> Result<(), TranslateError> {
    for (key, value) in extra {
        if source == target {
            if !out.contains_key(key) {
                out.insert(key.clone(), value.clone());
            }
            continue;
        }
        if is_unset(key, value) {
            continue;
        }
        match extra_rule(source, key) {
            Rule::Drop => {}
            Rule::Refuse => {
                let feature = match (key.as_str(), value.get("type").and_then(Value::as_str)) {
                    ("tool_choice", Some(kind)) => {
                        format!("{source} `tool_choice` of type `{kind}`")
                    }
                    _ => format!("{source} parameter `{key}`"),
                };
                return Err(TranslateError::untranslatable(feature, target));
            }
        }
    }
    Ok(())
}

/// A native part in a `target` body: itself for the same format, nothing
/// for the droppable kinds, otherwise a refusal.
pub(crate) fn native_part(n: &Native, target: Format) -> Result<Option<&Value>, TranslateError> {
    if n.format == target {
        return Ok(Some(&n.value));
    }
    match (n.format, n.kind()) {
        (Format::Anthropic, "thinking" | "redacted_thinking") => Ok(None),
        (format, kind) => Err(TranslateError::untranslatable(
            format!("{format} content part `{kind}`"),
            target,
        )),
    }
}

/// A native tool in a `target` body: itself for the same format, else refused.
pub(crate) fn native_tool(n: &Native, target: Format) -> Result<&Value, TranslateError> {
    if n.format == target {
        return Ok(&n.value);
    }
    Err(TranslateError::untranslatable(
        format!("{} tool of type `{}`", n.format, n.kind()),
        target,
    ))
}

/// Tool-call arguments as the JSON object Anthropic and Gemini carry.
/// An empty string is `{}` (some servers send it for argument-less calls).
pub(crate) fn arguments_object(arguments: &str, target: Format) -> Result<Value, TranslateError> {
    if arguments.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(TranslateError::untranslatable(
            "tool call arguments that are not a JSON object",
            target,
        )),
    }
}

/// The text of a tool result, for formats whose results are text only.
pub(crate) fn result_text(
    result: &ToolResult,
    target: Format,
) -> Result<Vec<&str>, TranslateError> {
    result
        .content
        .iter()
        .map(|part| match part {
            Part::Text(t) => Ok(t.as_str()),
            Part::Image(_) => Err(TranslateError::untranslatable(
                "image in a tool result",
                target,
            )),
            _ => Err(TranslateError::untranslatable(
                "non-text content in a tool result",
                target,
            )),
        })
        .collect()
}

/// Splits `data:<media type>;base64,<data>`.
pub(crate) fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media_type = meta.strip_suffix(";base64")?;
    Some((media_type, data))
}

/// Maps finish reasons that say "stop" while tool calls were made.
pub(crate) fn with_tool_calls(
    reason: crate::chat::FinishReason,
    saw_tool_call: bool,
) -> crate::chat::FinishReason {
    use crate::chat::FinishReason;
    match reason {
        FinishReason::Stop if saw_tool_call => FinishReason::ToolCalls,
        other => other,
    }
}
