//! The internal representation (IR) of a chat exchange: one request, one
//! response and one stream-event type that every wire format is decoded into
//! and encoded from, so N formats need N adapters instead of N×N.
//!
//! The IR holds what the formats share. What only one format can say is kept
//! as [`Native`] (a content part or tool in its source format's JSON) or in
//! [`ChatRequest::extra`] (top-level fields): a target in the same format gets
//! it back verbatim, any other target applies the rules written down in
//! [`crate::translate`] (drop it, or refuse the request).
//!
//! Conventions:
//! - Tool-call arguments are JSON *text*, as OpenAI sends them; formats that
//!   carry an object serialise and parse at their edge.
//! - System text is a [`Role::System`] message where the client put it;
//!   formats with a single top-level system prompt hoist it.
//! - Token counts follow OpenAI's meaning: `input` includes cached tokens.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

/// The wire formats detour translates between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// OpenAI Chat Completions (and OpenAI-compatible servers).
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini `generateContent`.
    Gemini,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OpenAi => "OpenAI",
            Self::Anthropic => "Anthropic",
            Self::Gemini => "Gemini",
        })
    }
}

/// The API format a client speaks; its errors are written in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFormat {
    OpenAi,
    Anthropic,
    /// OpenAI's Responses API (`POST /v1/responses`): error bodies in
    /// OpenAI's shape, its own objects and stream events
    /// ([`crate::translate::responses`]).
    Responses,
}

impl ClientFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Responses => "responses",
        }
    }

    /// The wire format this client speaks, for telling whether a provider's
    /// body (an error, or a chat answer) is already in it. A Responses client
    /// is of the OpenAI family: its error bodies are OpenAI's; whether a
    /// provider answers in the Responses API itself is the provider adapter's
    /// to say (by [`Endpoint::Responses`]).
    pub fn wire(self) -> Format {
        match self {
            Self::OpenAi | Self::Responses => Format::OpenAi,
            Self::Anthropic => Format::Anthropic,
        }
    }
}

/// The gateway endpoints a client can call and a provider can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Messages,
    Embeddings,
    /// OpenAI's Responses API.
    Responses,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Messages => "messages",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
        }
    }
}

/// A chat request, whatever format it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The format the request was parsed from; [`Self::extra`] is in it.
    pub source: Format,
    /// The model (route alias) the client asked for.
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u64>,
    pub stop: Vec<String>,
    /// Number of choices (OpenAI `n`, Gemini `candidateCount`).
    pub n: Option<u32>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    /// End-user id (OpenAI `user`, Anthropic `metadata.user_id`).
    pub user: Option<String>,
    pub stream: bool,
    /// The client wants usage in the stream. Anthropic-format clients always
    /// get it, so their parser sets this whenever `stream` is set.
    pub include_usage: bool,
    /// Top-level fields the IR has no place for, in [`Self::source`]'s terms.
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// An empty request (no messages, no parameters) from `source`.
    pub fn new(source: Format, model: impl Into<String>) -> Self {
        Self {
            source,
            model: model.into(),
            messages: Vec::new(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            stop: Vec::new(),
            n: None,
            seed: None,
            frequency_penalty: None,
            presence_penalty: None,
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            user: None,
            stream: false,
            include_usage: false,
            extra: Map::new(),
        }
    }
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Part>,
    /// OpenAI's participant name; other formats have none.
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: Vec<Part>) -> Self {
        Self {
            role,
            content,
            name: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// Results of tool calls; its content is [`Part::ToolResult`]s.
    Tool,
}

/// A piece of message content.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image(Image),
    Audio(Audio),
    ToolCall(ToolCall),
    ToolResult(ToolResult),
    /// A part only its source format knows (a document, a thinking block, …).
    Native(Native),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub source: MediaSource,
    /// OpenAI's `detail` hint (`auto`, `low`, `high`).
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaSource {
    Base64 { media_type: String, data: String },
    Url(String),
}

/// Audio input, base64 with its container format (`wav`, `mp3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audio {
    pub format: String,
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (usually an object).
    pub arguments: String,
    /// Gemini's opaque `thoughtSignature`, which must go back on the same
    /// call in the next request.
    pub signature: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    pub call_id: String,
    /// The tool's name, when the source format says it.
    pub name: Option<String>,
    /// Text and image parts.
    pub content: Vec<Part>,
    pub is_error: bool,
}

/// JSON in one format's own shape, for things the IR does not model.
#[derive(Debug, Clone, PartialEq)]
pub struct Native {
    pub format: Format,
    pub value: Value,
}

impl Native {
    /// The value's `type` field, for naming it in errors.
    pub fn kind(&self) -> &str {
        self.value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Tool {
    Function(FunctionTool),
    /// A provider tool (Anthropic server tools, OpenAI custom tools).
    Native(Native),
}

#[derive(Debug, Clone, PartialEq)]
pub struct FunctionTool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Option<Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        description: Option<String>,
        schema: Option<Value>,
        strict: Option<bool>,
    },
}

/// A complete (non-streamed) answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatResponse {
    pub id: String,
    pub model: String,
    /// One per requested choice; Anthropic answers always have one.
    pub choices: Vec<Choice>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub content: Vec<Output>,
    pub finish_reason: FinishReason,
}

/// A piece of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Text(String),
    ToolCall(ToolCall),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
    /// A stop sequence ended the output (the matched one, when known).
    StopSequence(Option<String>),
}

/// Token counts. `input` includes `cached_input` and `cache_write_input`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    /// Prompt tokens read from a cache.
    pub cached_input: u64,
    /// Prompt tokens written to a cache (Anthropic `cache_creation_input_tokens`).
    pub cache_write_input: u64,
    pub total: u64,
}

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Start {
        id: String,
        model: String,
    },
    TextDelta(String),
    /// A tool call begins; `index` counts tool calls (0, 1, …), not blocks.
    ToolCallStart {
        index: usize,
        id: String,
        name: String,
        signature: Option<String>,
    },
    /// More argument text for the call at `index`; fragments concatenate.
    ToolCallArgsDelta {
        index: usize,
        fragment: String,
    },
    Finish {
        reason: FinishReason,
    },
    /// Usage so far; the last one seen is the final count.
    Usage(Usage),
    /// The stream failed after it started; nothing follows.
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// The stream ended normally.
    Done,
}

/// What went wrong, independent of how a format spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    Permission,
    NotFound,
    RequestTooLarge,
    RateLimit,
    /// The provider failed (HTTP 500, or an unknown error).
    Server,
    /// The provider is overloaded (HTTP 503, Anthropic 529).
    Overloaded,
    Timeout,
}

impl ErrorKind {
    /// The kind an HTTP status stands for.
    pub fn from_status(status: u16) -> Self {
        match status {
            401 => Self::Authentication,
            402 | 403 => Self::Permission,
            404 => Self::NotFound,
            413 => Self::RequestTooLarge,
            429 => Self::RateLimit,
            408 | 504 => Self::Timeout,
            503 | 529 => Self::Overloaded,
            400..=499 => Self::InvalidRequest,
            _ => Self::Server,
        }
    }
}

/// An error body or event read from a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    pub kind: ErrorKind,
    pub message: String,
    /// How long the provider asked us to wait (Gemini `RetryInfo`).
    pub retry_after: Option<Duration>,
}
