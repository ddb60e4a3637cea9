//! The OpenAI wire format: request checks, the `model` rewrite, error bodies,
//! and usage found in responses and streams.
//!
//! Requests are checked, not rebuilt: [`ChatRequest::parse`] reads the fields
//! the gateway acts on and validates the types of the common ones, borrowing
//! from the body. [`rewrite_model`] then splices the upstream model name into
//! the original bytes, so a passthrough request is forwarded without a full
//! re-serialisation and unknown fields survive untouched.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::json_check::Scan;

/// A request body that the gateway refuses, with the field to blame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    pub message: String,
    /// The offending field as a path (`messages[0].role`), when known.
    pub param: Option<String>,
}

impl InvalidRequest {
    fn new(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        Self {
            message: message.into(),
            param: param.into(),
        }
    }
}

/// What the gateway needs to know about a chat completion request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// The route alias the client asked for.
    pub model: String,
    /// Byte range of the `model` value (including its quotes) in the body.
    pub model_span: Range<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// The answer's token cap: `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// How to have a passthrough stream report usage the client did not ask
    /// for (so rate limits are settled from real counts).
    pub ask_usage: AskUsage,
}

/// The edit that makes a streamed request ask for usage
/// (`stream_options.include_usage`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AskUsage {
    /// Nothing to do: not a stream, or the client asked already.
    #[default]
    No,
    /// Insert `"stream_options":{"include_usage":true},` at this offset (just
    /// after the body's opening brace).
    Insert(usize),
    /// Replace the value of `stream_options` at `span` with `with` (the
    /// client's options plus `include_usage: true`).
    Replace { span: Range<usize>, with: String },
}

/// What the gateway needs to know about a Responses API request
/// (`POST /v1/responses`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsesRequest {
    pub model: String,
    pub model_span: Range<usize>,
    pub stream: bool,
    /// The answer's token cap (`max_output_tokens`).
    pub max_tokens: Option<u64>,
    /// The first feature that needs state OpenAI keeps, named for the
    /// client (`previous_response_id`, `store: true`, …): such a request can
    /// go only to providers of kind `openai`.
    pub stateful: Option<&'static str>,
}

/// What the gateway needs to know about an embeddings request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub model_span: Range<usize>,
}

// Shapes used only to check types; every field not named here passes through
// unchecked. Unknown fields are allowed: providers add them all the time.
// Fields read by nothing (`_name`) are there for their type check alone.
#[derive(Deserialize)]
struct ChatCheck<'a> {
    #[serde(borrow)]
    model: &'a RawValue,
    #[serde(borrow)]
    messages: Vec<MessageCheck<'a>>,
    stream: Option<bool>,
    /// Kept raw (`null` included) to be edited in place.
    #[serde(borrow, default, deserialize_with = "raw_even_null")]
    stream_options: Option<&'a RawValue>,
    #[serde(rename = "temperature")]
    _temperature: Option<f64>,
    #[serde(rename = "top_p")]
    _top_p: Option<f64>,
    #[serde(rename = "n")]
    _n: Option<u32>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    #[serde(borrow, rename = "tools")]
    _tools: Option<Vec<ToolCheck<'a>>>,
}

#[derive(Deserialize)]
struct MessageCheck<'a> {
    #[serde(borrow, rename = "role")]
    _role: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ToolCheck<'a> {
    #[serde(borrow, rename = "type")]
    _kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct StreamOptionsCheck {
    include_usage: Option<bool>,
}

/// A field's raw value, `null` included (`Option<&RawValue>` reads `null`
/// as absent).
fn raw_even_null<'de: 'a, 'a, D>(d: D) -> Result<Option<&'a RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(d).map(Some)
}

/// `stream_options` as the client wrote it (`null` or an object), its
/// `include_usage`, and the edit that makes it ask for usage.
fn stream_options(
    body: &[u8],
    span: Option<Range<usize>>,
    stream: bool,
) -> Result<(bool, AskUsage), InvalidRequest> {
    let invalid = |detail: String| {
        InvalidRequest::new(
            format!("invalid value for 'stream_options': {detail}"),
            Some("stream_options".to_owned()),
        )
    };
    let raw = span.clone().map(|span| {
        body.get(span)
            .and_then(|t| std::str::from_utf8(t).ok())
            .unwrap_or_default()
    });
    let given = raw.filter(|r| *r != "null");
    let options: Option<StreamOptionsCheck> = match given {
        Some(r) => Some(serde_json::from_str(r).map_err(|e| invalid(e.to_string()))?),
        None => None,
    };
    let include_usage = options.and_then(|o| o.include_usage).unwrap_or(false);
    if !stream || include_usage {
        return Ok((include_usage, AskUsage::No));
    }
    let ask = match span {
        Some(span) => {
            let mut object: serde_json::Map<String, serde_json::Value> = match given {
                Some(g) => serde_json::from_str(g).map_err(|e| invalid(e.to_string()))?,
                None => serde_json::Map::new(),
            };
            object.insert("include_usage".to_owned(), true.into());
            AskUsage::Replace {
                span,
                with: serde_json::Value::Object(object).to_string(),
            }
        }
        None => match body.iter().position(|b| *b == b'{') {
            Some(i) => AskUsage::Insert(i + 1),
            None => AskUsage::No,
        },
    };
    Ok((false, ask))
}

/// The byte range of `raw` (borrowed from `body`) in `body`.
fn span_of(body: &[u8], raw: &RawValue) -> Option<Range<usize>> {
    let start = (raw.get().as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    let span = start..start.checked_add(raw.get().len())?;
    (body.get(span.clone()) == Some(raw.get().as_bytes())).then_some(span)
}

#[derive(Deserialize)]
struct ResponsesCheck<'a> {
    #[serde(borrow)]
    model: &'a RawValue,
    /// Optional: OpenAI takes a request without it (a stored `prompt`, or
    /// `previous_response_id` alone); the translator requires it.
    #[serde(borrow, rename = "input")]
    _input: Option<&'a RawValue>,
    #[serde(rename = "instructions")]
    _instructions: Option<Cow<'a, str>>,
    stream: Option<bool>,
    #[serde(rename = "temperature")]
    _temperature: Option<f64>,
    #[serde(rename = "top_p")]
    _top_p: Option<f64>,
    max_output_tokens: Option<u64>,
    #[serde(borrow, rename = "tools")]
    _tools: Option<Vec<ToolCheck<'a>>>,
}

#[derive(Deserialize)]
struct EmbeddingsCheck<'a> {
    #[serde(borrow)]
    model: &'a RawValue,
    #[serde(borrow, rename = "input")]
    _input: &'a RawValue,
}

impl ChatRequest {
    pub fn parse(body: &[u8]) -> Result<Self, InvalidRequest> {
        // A body that is JSON of the usual shape is checked and read by hand
        // in one pass. Anything else is checked as before: the typed check
        // then the JSON check, so a request with several faults is refused
        // for the same one (a body that is not JSON gets the typed check's
        // error if it has one), in the typed check's words.
        if let Some(fields) = ChatFields::read(body) {
            return Self::from_fields(body, fields);
        }
        match validate_json(body) {
            Ok(()) => Self::from_fields(body, ChatFields::checked(body)?),
            Err(not_json) => {
                ChatFields::checked(body)?;
                Err(not_json)
            }
        }
    }

    fn from_fields(body: &[u8], fields: ChatFields) -> Result<Self, InvalidRequest> {
        if fields.messages == 0 {
            return Err(InvalidRequest::new(
                "'messages' must contain at least one message",
                Some("messages".to_owned()),
            ));
        }
        let (model, model_span) = model_at(body, fields.model)?;
        let stream = fields.stream.unwrap_or(false);
        let (include_usage, ask_usage) = stream_options(body, fields.stream_options, stream)?;
        Ok(Self {
            model,
            model_span,
            stream,
            include_usage,
            max_tokens: fields.max_completion_tokens.or(fields.max_tokens),
            ask_usage,
        })
    }
}

/// What [`ChatCheck`] reads of a chat request, as byte ranges of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChatFields {
    model: Range<usize>,
    messages: usize,
    stream: Option<bool>,
    stream_options: Option<Range<usize>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
}

impl ChatFields {
    /// By the typed check.
    fn checked(body: &[u8]) -> Result<Self, InvalidRequest> {
        let check: ChatCheck = deserialize_checked(body)?;
        let locate = |raw: &RawValue, field: &str| {
            span_of(body, raw).ok_or_else(|| {
                InvalidRequest::new(
                    format!("could not locate '{field}'"),
                    Some(field.to_owned()),
                )
            })
        };
        Ok(Self {
            model: locate(check.model, "model")?,
            messages: check.messages.len(),
            stream: check.stream,
            stream_options: check
                .stream_options
                .map(|raw| locate(raw, "stream_options"))
                .transpose()?,
            max_tokens: check.max_tokens,
            max_completion_tokens: check.max_completion_tokens,
        })
    }

    /// By hand, in the one pass that also checks the body is JSON
    /// ([`Scan`]): what [`ChatCheck`] would read, when the body is JSON of
    /// the usual shape, and `None` for anything else: a body that is not
    /// JSON, or anything the typed check might refuse or read otherwise (a
    /// key written with escapes, a field given twice, a number it might not
    /// take, a message that is not an object). The caller then checks the
    /// old way, so every error keeps its wording. It allocates nothing: on a
    /// short request, checking and reading cost about 1.5k instructions,
    /// against about 3k for the check followed by a second walk, and 4k for
    /// the check and the typed check.
    fn read(body: &[u8]) -> Option<Self> {
        let mut s = Scan::new(body)?;
        if !s.eat(b'{') || s.eat(b'}') {
            return None;
        }
        let mut model = None;
        let mut messages = None;
        let mut stream = None;
        let mut stream_options = None;
        let mut max_tokens = None;
        let mut max_completion_tokens = None;
        let mut seen = [false; CHAT_FIELDS.len()];
        loop {
            let key = plain_key(&mut s)?;
            let field = CHAT_FIELDS.iter().position(|f| f.as_bytes() == key);
            let Some(n) = field else {
                s.value(1).ok()?;
                if s.eat(b',') {
                    continue;
                }
                break;
            };
            if std::mem::replace(&mut seen[n], true) {
                return None;
            }
            match CHAT_FIELDS[n] {
                "messages" => messages = Some(objects_with_string(&mut s, b"role")?),
                // `null`, or tools that each have a string `type`.
                "tools" if s.next_byte() == Some(b'n') => {
                    s.value(1).ok()?;
                }
                "tools" => {
                    objects_with_string(&mut s, b"type")?;
                }
                field => {
                    let span = s.value(1).ok()?;
                    let (value, end) = (span.start, span.end);
                    let text = body.get(span.clone())?;
                    let null = text == b"null";
                    match field {
                        "model" => model = Some(span),
                        "stream" => {
                            stream = match text {
                                b"true" => Some(true),
                                b"false" => Some(false),
                                b"null" => None,
                                _ => return None,
                            }
                        }
                        "stream_options" => stream_options = Some(span),
                        "temperature" | "top_p"
                            if !null && !matches!(text.first(), Some(b'-' | b'0'..=b'9')) =>
                        {
                            return None;
                        }
                        "n" if !null && u32::try_from(count_at(body, value, end)?).is_err() => {
                            return None;
                        }
                        "max_tokens" => max_tokens = count_or_null(body, value, end)?,
                        "max_completion_tokens" => {
                            max_completion_tokens = count_or_null(body, value, end)?;
                        }
                        _ => {}
                    }
                }
            }
            if !s.eat(b',') {
                break;
            }
        }
        if !s.eat(b'}') {
            return None;
        }
        s.finish().ok()?;
        Some(Self {
            model: model?,
            messages: messages?,
            stream,
            stream_options,
            max_tokens,
            max_completion_tokens,
        })
    }
}

/// The fields [`ChatCheck`] reads, by their names in the body.
const CHAT_FIELDS: [&str; 10] = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "tools",
];

/// The next member's key (checked, with its colon) as written; `None` for
/// a key with escapes, or one that is not JSON.
fn plain_key<'a>(s: &mut Scan<'a>) -> Option<&'a [u8]> {
    let key = s.member_key().ok()?;
    (!key.contains(&b'\\')).then_some(key)
}

/// Checks the array that comes next in the top-level object, each element
/// an object whose `key` is a string (given once), and says how many there
/// are; `None` otherwise.
fn objects_with_string(s: &mut Scan<'_>, key: &[u8]) -> Option<usize> {
    // The array is two deep, its objects three.
    if !s.eat(b'[') {
        return None;
    }
    if s.eat(b']') {
        return Some(0);
    }
    let mut count = 0;
    loop {
        if !s.eat(b'{') {
            return None;
        }
        let mut found = false;
        if !s.eat(b'}') {
            loop {
                let name = plain_key(s)?;
                let string = s.next_byte() == Some(b'"');
                s.value(3).ok()?;
                if name == key {
                    if found || !string {
                        return None;
                    }
                    found = true;
                }
                if s.eat(b',') {
                    continue;
                }
                if s.eat(b'}') {
                    break;
                }
                return None;
            }
        }
        if !found {
            return None;
        }
        count += 1;
        if s.eat(b',') {
            continue;
        }
        return s.eat(b']').then_some(count);
    }
}

/// The whole non-negative number that is all of `at..end`.
fn count_at(body: &[u8], at: usize, end: usize) -> Option<u64> {
    read_count(body, at).and_then(|(n, to)| (to == end).then_some(n))
}

/// `null`, or a whole non-negative number that fits a `u64`; `None` for
/// anything else.
fn count_or_null(body: &[u8], at: usize, end: usize) -> Option<Option<u64>> {
    if body.get(at..end) == Some(b"null") {
        return Some(None);
    }
    count_at(body, at, end).map(Some)
}

#[derive(Deserialize)]
struct StateCheck {
    #[serde(default)]
    previous_response_id: Option<IgnoredAny>,
    #[serde(default)]
    conversation: Option<IgnoredAny>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    prompt: Option<IgnoredAny>,
    #[serde(default)]
    input: Option<InputCheck>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InputCheck {
    Items(Vec<ItemCheck>),
    Other(IgnoredAny),
}

#[derive(Deserialize)]
struct ItemCheck {
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// The first feature of a Responses request that needs state OpenAI keeps
/// (`previous_response_id`, `conversation`, `store: true`,
/// `background: true`, a stored `prompt`, an `item_reference` input item),
/// named for the client; `None` when it has none (or is not a JSON object:
/// the request checks say so). `store` absent is not a request for state
/// here: OpenAI's own default does not bind other providers.
pub fn stateful_feature(body: &[u8]) -> Option<&'static str> {
    let check: StateCheck = serde_json::from_slice(body).ok()?;
    if check.previous_response_id.is_some() {
        return Some("`previous_response_id`");
    }
    if check.conversation.is_some() {
        return Some("`conversation`");
    }
    if check.store == Some(true) {
        return Some("`store: true`");
    }
    if check.background == Some(true) {
        return Some("`background: true`");
    }
    if check.prompt.is_some() {
        return Some("a stored `prompt`");
    }
    if let Some(InputCheck::Items(items)) = check.input {
        if items
            .iter()
            .any(|i| i.kind.as_deref() == Some("item_reference"))
        {
            return Some("an `item_reference` input item");
        }
    }
    None
}

impl ResponsesRequest {
    pub fn parse(body: &[u8]) -> Result<Self, InvalidRequest> {
        let check: ResponsesCheck = deserialize_checked(body)?;
        validate_json(body)?;
        let (model, model_span) = model_of(body, check.model)?;
        Ok(Self {
            model,
            model_span,
            stream: check.stream.unwrap_or(false),
            max_tokens: check.max_output_tokens,
            stateful: stateful_feature(body),
        })
    }
}

impl EmbeddingsRequest {
    pub fn parse(body: &[u8]) -> Result<Self, InvalidRequest> {
        let check: EmbeddingsCheck = deserialize_checked(body)?;
        validate_json(body)?;
        let (model, model_span) = model_of(body, check.model)?;
        Ok(Self { model, model_span })
    }
}

/// The `model` of any JSON request body and its byte range, checking nothing
/// else (for formats whose other fields are checked elsewhere).
pub fn model_span(body: &[u8]) -> Result<(String, Range<usize>), InvalidRequest> {
    #[derive(Deserialize)]
    struct ModelOnly<'a> {
        #[serde(borrow)]
        model: &'a RawValue,
    }
    let check: ModelOnly = deserialize_checked(body)?;
    model_of(body, check.model)
}

fn deserialize_checked<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, InvalidRequest> {
    // serde accepts a struct written as an array; a request body must be an object.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => return Err(InvalidRequest::new("request body is empty", None)),
        Some(_) => {
            return Err(InvalidRequest::new(
                "request body must be a JSON object",
                None,
            ))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = match T::deserialize(&mut de) {
        Ok(value) => value,
        // Parsed again for the message, this time tracking where it failed:
        // tracking the path costs about as much as the parse, and a good
        // request needs none.
        Err(e) => {
            let mut de = serde_json::Deserializer::from_slice(body);
            return Err(match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(tracked) => describe(tracked),
                Ok(_) => InvalidRequest::new(format!("request body is not valid: {e}"), None),
            });
        }
    };
    de.end()
        .map_err(|e| InvalidRequest::new(format!("request body is not valid JSON: {e}"), None))?;
    Ok(value)
}

/// Checks that the whole body is valid JSON, the parts the typed check skips
/// included: serde_json skips unknown fields without checking their strings'
/// UTF-8 or their depth, and a passthrough body is forwarded as it is.
///
/// [`super::json_check`] accepts exactly what serde_json would parse (UTF-8
/// strings, no lone surrogate escapes, at most 127 nested levels, numbers an
/// `f64` holds) in one pass without allocating.
pub fn validate_json(body: &[u8]) -> Result<(), InvalidRequest> {
    super::json_check::check(body)
        .map_err(|e| InvalidRequest::new(format!("request body is not valid JSON: {e}"), None))
}

/// Turns a serde error into a message that names the field.
fn describe(err: serde_path_to_error::Error<serde_json::Error>) -> InvalidRequest {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let detail = strip_position(&inner.to_string());
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            InvalidRequest::new(format!("request body is not valid JSON: {inner}"), None)
        }
        _ if path == "." => {
            // A problem with the top level: missing field or not an object.
            let param = missing_field(&detail);
            let message = match &param {
                Some(field) => format!("missing required parameter: '{field}'"),
                None => format!("request body must be a JSON object: {detail}"),
            };
            InvalidRequest::new(message, param)
        }
        _ => match missing_field(&detail) {
            Some(field) => InvalidRequest::new(
                format!("missing required parameter: '{path}.{field}'"),
                Some(format!("{path}.{field}")),
            ),
            None => {
                InvalidRequest::new(format!("invalid value for '{path}': {detail}"), Some(path))
            }
        },
    }
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

fn missing_field(detail: &str) -> Option<String> {
    let rest = detail.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// Reads the `model` value and finds its byte range in `body`.
fn model_of(body: &[u8], raw: &RawValue) -> Result<(String, Range<usize>), InvalidRequest> {
    // `RawValue` borrows from the body, so its text is a subslice of it.
    let Some(span) = span_of(body, raw) else {
        return Err(InvalidRequest::new(
            "could not locate 'model'",
            Some("model".to_owned()),
        ));
    };
    model_at(body, span)
}

/// The `model` whose value (valid JSON) is at `span` of the body, and that
/// span.
fn model_at(body: &[u8], span: Range<usize>) -> Result<(String, Range<usize>), InvalidRequest> {
    let text = body
        .get(span.clone())
        .and_then(|t| std::str::from_utf8(t).ok())
        .unwrap_or_default();
    let model = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        // A string without escapes is its own text.
        Some(plain) if !plain.contains(['\\', '"']) => Ok(plain.to_owned()),
        _ => serde_json::from_str::<String>(text),
    };
    let model = model.map_err(|_| {
        InvalidRequest::new(
            format!("invalid value for 'model': expected a string, got {text}"),
            Some("model".to_owned()),
        )
    })?;
    Ok((model, span))
}

/// Replaces the `model` value at `span` with `model`, copying the rest verbatim.
pub fn rewrite_model(body: &[u8], span: Range<usize>, model: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + model.len() + 2);
    out.put_slice(&body[..span.start]);
    put_json_string(&mut out, model);
    out.put_slice(&body[span.end..]);
    out.freeze()
}

/// Appends `s` as a JSON string (quoted, escaped).
fn put_json_string(out: &mut BytesMut, s: &str) {
    // A name with nothing to escape (serde_json escapes `"`, `\\` and
    // control characters) is written as it is.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.put_u8(b'"');
        out.put_slice(s.as_bytes());
        out.put_u8(b'"');
        return;
    }
    // serde_json fails only when its writer does, and memory does not.
    let _ = serde_json::to_writer(out.writer(), s);
}

/// [`rewrite_model`], and the edit that makes a stream ask for usage.
pub fn rewrite_model_asking_usage(
    body: &[u8],
    model_span: Range<usize>,
    model: &str,
    ask: &AskUsage,
) -> Bytes {
    const INSERT: &[u8] = br#""stream_options":{"include_usage":true},"#;
    let (at, cut, with): (usize, usize, &[u8]) = match ask {
        AskUsage::No => return rewrite_model(body, model_span, model),
        AskUsage::Insert(at) => (*at, *at, INSERT),
        AskUsage::Replace { span, with } => (span.start, span.end, with.as_bytes()),
    };
    let mut quoted = BytesMut::with_capacity(model.len() + 2);
    put_json_string(&mut quoted, model);
    // The two edits, in the order they appear in the body (they never overlap).
    let mut edits = [
        (model_span.start, model_span.end, &quoted[..]),
        (at, cut, with),
    ];
    edits.sort_by_key(|e| e.0);
    let mut out = BytesMut::with_capacity(body.len() + quoted.len() + with.len());
    let mut from = 0;
    for (start, end, bytes) in edits {
        let (Some(keep), true) = (body.get(from..start), end >= start) else {
            return rewrite_model(body, model_span, model);
        };
        out.put_slice(keep);
        out.put_slice(bytes);
        from = end;
    }
    out.put_slice(body.get(from..).unwrap_or_default());
    out.freeze()
}

/// A searcher for the `"usage"` key, built once (`memmem::find` builds one
/// per call, which costs more than searching a small answer).
static USAGE_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));

/// Whether an SSE data payload holds a `usage` object (not `null`): a
/// cheap byte scan, so that only such chunks are parsed.
fn has_usage_object(data: &[u8]) -> bool {
    let mut rest = data;
    while let Some(i) = USAGE_KEY.find(rest) {
        rest = &rest[i + USAGE_KEY.needle().len()..];
        let value = rest
            .iter()
            .position(|b| !b.is_ascii_whitespace() && *b != b':')
            .and_then(|j| rest.get(j));
        if value == Some(&b'{') {
            return true;
        }
    }
    false
}

/// Token counts as OpenAI reports them (Chat Completions' names; a
/// Responses API body's `input_tokens` and `output_tokens` read the same).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Usage {
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// Usage from a complete (non-streamed) response body, if present: the
/// top-level `usage` object, in OpenAI's or Anthropic's names.
///
/// Only `usage` is read: the rest of the answer is skipped by a scan that
/// follows strings and nesting without building or validating anything
/// (the answer is relayed as the provider sent it, not judged here). So a
/// body that is not JSON has no usage, but one that is malformed after its
/// `usage` still reports it (of a duplicated `usage` key, which serde's
/// derive refused, the last or the first counts). Inside `usage`, what
/// [`Usage`]'s serde derive refuses is refused too (a count that is not a
/// whole number, a name given twice).
pub fn usage_of(body: &[u8]) -> Option<Usage> {
    if let Some(usage) = usage_near_the_end(body) {
        return Some(usage);
    }
    read_usage(body, top_level_value(body, b"usage")?).map(|(usage, _)| usage)
}

/// The top-level `usage`, found from the end: answers put `usage` among
/// their last members, so the last `"usage"` key is read, and checked to
/// be the top level's by scanning only what follows it, instead of the
/// whole answer. `None` when it is not (or there is none, or the body is
/// not well formed after it): the scan from the start decides then.
fn usage_near_the_end(body: &[u8]) -> Option<Usage> {
    // Searched forward: memchr's reverse search has no vector prefilter.
    let quote = USAGE_KEY.find_iter(body).last()?;
    // An unescaped quote outside a string starts a key or a value; inside
    // one it would be escaped (an odd run of backslashes before it).
    let backslashes = body
        .get(..quote)?
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    if backslashes % 2 == 1 {
        return None;
    }
    let colon = skip_ws(body, quote + USAGE_KEY.needle().len());
    if body.get(colon) != Some(&b':') {
        return None;
    }
    let (usage, end) = read_usage(body, skip_ws(body, colon + 1))?;
    // A key at the top level: after its value come the object's other
    // members, its closing brace, and nothing else.
    let closed = object_rest(body, end)?;
    (skip_ws(body, closed) == body.len()).then_some(usage)
}

/// Where the object whose member's value ended at `from` ends: past its
/// other members (`,"key":value`, values skipped) and its closing brace.
fn object_rest(body: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i = skip_ws(body, i);
        match body.get(i)? {
            b'}' => return Some(i + 1),
            b',' => {}
            _ => return None,
        }
        i = skip_ws(body, i + 1);
        if body.get(i) != Some(&b'"') {
            return None;
        }
        i = skip_ws(body, string_end(body, i + 1)? + 1);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_value(body, skip_ws(body, i + 1))?;
    }
}

/// The [`Usage`] object that starts at `at`, and where it ends: its three
/// counts read by hand, anything else skipped.
fn read_usage(body: &[u8], at: usize) -> Option<(Usage, usize)> {
    if body.get(at) != Some(&b'{') {
        return None;
    }
    let mut counts = [None::<u64>; 3];
    let mut i = skip_ws(body, at + 1);
    if body.get(i) != Some(&b'}') {
        loop {
            if body.get(i) != Some(&b'"') {
                return None;
            }
            let end = string_end(body, i + 1)?;
            let key = body.get(i + 1..end)?;
            i = skip_ws(body, end + 1);
            if body.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(body, i + 1);
            let slot = match key {
                b"prompt_tokens" | b"input_tokens" => Some(0),
                b"completion_tokens" | b"output_tokens" => Some(1),
                b"total_tokens" => Some(2),
                _ => None,
            };
            i = match slot.and_then(|n| counts.get_mut(n)) {
                // The same count twice (or under both its names).
                Some(Some(_)) => return None,
                Some(count) => {
                    let (value, next) = read_count(body, i)?;
                    *count = Some(value);
                    next
                }
                None => skip_value(body, i)?,
            };
            i = skip_ws(body, i);
            match body.get(i) {
                Some(b',') => i = skip_ws(body, i + 1),
                Some(b'}') => break,
                _ => return None,
            }
        }
    }
    let [prompt, completion, total] = counts;
    let usage = Usage {
        prompt_tokens: prompt.unwrap_or(0),
        completion_tokens: completion.unwrap_or(0),
        total_tokens: total.unwrap_or(0),
    };
    // `i` is at the object's closing brace.
    Some((usage, i + 1))
}

/// A whole, non-negative JSON number at `at` that fits a `u64`, and where
/// it ends.
fn read_count(body: &[u8], at: usize) -> Option<(u64, usize)> {
    let rest = body.get(at..)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let text = rest.get(..digits)?;
    // JSON has no leading zeros; a fraction or exponent makes a float.
    let float = matches!(rest.get(digits), Some(b'.' | b'e' | b'E'));
    if digits == 0 || (digits > 1 && text.first() == Some(&b'0')) || float {
        return None;
    }
    let mut value = 0u64;
    for d in text {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some((value, at + digits))
}

/// Where the JSON value that starts at `at` ends, skipped without reading
/// it.
fn skip_value(body: &[u8], at: usize) -> Option<usize> {
    match body.get(at)? {
        b'"' => Some(string_end(body, at + 1)? + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match body.get(i)? {
                    b'"' => {
                        i = string_end(body, i + 1)?;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let len = body
                .get(at..)?
                .iter()
                .take_while(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
                .count();
            (len > 0).then_some(at + len)
        }
    }
}

/// Whether the top-level `choices` is an empty array (a stream's usage
/// chunk).
fn empty_choices(body: &[u8]) -> bool {
    top_level_value(body, b"choices").is_some_and(|at| {
        body.get(at) == Some(&b'[') && body.get(skip_ws(body, at + 1)) == Some(&b']')
    })
}

/// Where the value of the top-level object's `key` starts in `body`, found
/// without parsing the other values: strings are skipped with `memchr`,
/// nesting is counted. A key is compared as written (a key spelled with
/// escapes is not found).
fn top_level_value(body: &[u8], key: &[u8]) -> Option<usize> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut depth = 1usize;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                let start = i + 1;
                let end = string_end(body, start)?;
                i = end + 1;
                if depth == 1 {
                    let after = skip_ws(body, i);
                    if body.get(after) == Some(&b':') && body.get(start..end) == Some(key) {
                        return Some(skip_ws(body, after + 1));
                    }
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return None;
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The index of the quote that ends the string whose content starts at
/// `from`.
fn string_end(body: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', body.get(from..)?)?;
        if body.get(at) == Some(&b'"') {
            return Some(at);
        }
        // An escape: skip the backslash and the character it escapes.
        from = at + 2;
    }
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while body.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// Watches a relayed stream for usage and the `[DONE]` terminator without
/// parsing chunks that cannot hold them.
#[derive(Debug, Default)]
pub struct StreamWatch {
    pub usage: Option<Usage>,
    pub done: bool,
    /// Data events seen (excluding `[DONE]`).
    pub chunks: u64,
}

impl StreamWatch {
    /// Feeds complete events (as framed by [`super::sse::EventFramer`]):
    /// notes usage, `[DONE]` and the events seen, and with `strip_usage`
    /// drops the usage chunk (empty `choices` and a `usage` object: the one a
    /// stream ends with under `include_usage`), for clients that did not ask
    /// for it when the gateway did. One pass over the events; they are copied
    /// only when one is dropped.
    pub fn observe(&mut self, events: Bytes, strip_usage: bool) -> Bytes {
        let mut kept: Option<BytesMut> = None;
        for span in super::sse::event_spans(&events) {
            let event = &events[span.clone()];
            let mut drop = false;
            if let Some(data) = super::sse::data_payload(event) {
                if data.starts_with(b"[DONE]") {
                    self.done = true;
                } else {
                    self.chunks += 1;
                    // Read by hand (`usage_of`): parsing each event whole
                    // cost more than relaying it.
                    if has_usage_object(&data) {
                        if let Some(usage) = usage_of(&data) {
                            self.usage = Some(usage);
                            drop = strip_usage && empty_choices(&data);
                        }
                    }
                }
            }
            match (&mut kept, drop) {
                (Some(out), false) => out.put_slice(event),
                (None, true) => {
                    let mut out = BytesMut::with_capacity(events.len());
                    out.put_slice(&events[..span.start]);
                    kept = Some(out);
                }
                _ => {}
            }
        }
        match kept {
            Some(out) => out.freeze(),
            None => events,
        }
    }
}

/// An error body in OpenAI's shape.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Bytes {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Detail<'a>,
    }
    #[derive(Serialize)]
    struct Detail<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: Option<&'a str>,
    }
    let body = Body {
        error: Detail {
            message,
            kind,
            param,
            code,
        },
    };
    // Serialising plain strings cannot fail; an empty body would still be a
    // well-formed HTTP error.
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// A stream event carrying an error, for streams that fail after their start.
pub fn error_event(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    let body = error_body(message, kind, None, code);
    let mut out = BytesMut::with_capacity(body.len() + 8);
    out.put_slice(b"data: ");
    out.put_slice(&body);
    out.put_slice(b"\n\n");
    out.freeze()
}

/// `GET /v1/models` body listing the given aliases.
pub fn model_list<'a>(aliases: impl Iterator<Item = &'a str>) -> Bytes {
    #[derive(Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
    }
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Model<'a>>,
    }
    let list = List {
        object: "list",
        data: aliases
            .map(|id| Model {
                id,
                object: "model",
                created: 0,
                owned_by: "detour",
            })
            .collect(),
    };
    serde_json::to_vec(&list)
        .map(Bytes::from)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(body: &str) -> InvalidRequest {
        match ChatRequest::parse(body.as_bytes()) {
            Ok(r) => unreachable!("expected an error, parsed {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_the_fields_the_gateway_needs() {
        let body = br#"{"model":"fast","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"x_unknown":1}"#;
        let r = ChatRequest::parse(body).unwrap();
        assert_eq!(r.model, "fast");
        assert_eq!(&body[r.model_span.clone()], b"\"fast\"");
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn rewrite_changes_only_the_model() {
        let body = br#"{ "messages": [{"role":"user","content":"\"model\": x"}], "model" : "fast", "z": [1,2] }"#;
        let r = ChatRequest::parse(body).unwrap();
        let out = rewrite_model(body, r.model_span, "gpt-4o\"mini");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "messages": [{"role":"user","content":"\"model\": x"}], "model" : "gpt-4o\"mini", "z": [1,2] }"#
        );
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let body = br#"{"model":"f\u0061st","messages":[{"role":"user"}]}"#;
        assert_eq!(ChatRequest::parse(body).unwrap().model, "fast");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err(r#"{"messages":[]}"#).param.as_deref(), Some("model"));
        assert_eq!(err(r#"{"model":"m"}"#).param.as_deref(), Some("messages"));
        assert_eq!(
            err(r#"{"model":3,"messages":[{"role":"user"}]}"#)
                .param
                .as_deref(),
            Some("model")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[]}"#).param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#)
                .param
                .as_deref(),
            Some("stream")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"content":"x"}]}"#)
                .param
                .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"role":"user"}],"temperature":"hot"}"#)
                .param
                .as_deref(),
            Some("temperature")
        );
        let e = err(r#"{"model":"m","#);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        assert!(err(r#"[1,2]"#).message.contains("JSON object"));
        assert!(
            err(r#"{"model":"m","messages":[{"role":"user"}]} trailing"#)
                .message
                .contains("JSON")
        );
    }

    /// The upstream body of `body` for model `m`, as JSON.
    fn asking_usage(body: &str) -> serde_json::Value {
        let r = ChatRequest::parse(body.as_bytes()).unwrap();
        let out = rewrite_model_asking_usage(body.as_bytes(), r.model_span, "m", &r.ask_usage);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn streams_ask_for_usage_whatever_the_client_wrote() {
        let msgs = r#""messages":[{"role":"user","content":"{\"model\":1}"}]"#;
        let cases = [
            // No stream_options: inserted.
            (
                format!(r#" {{"model":"fast",{msgs},"stream":true}}"#),
                json!({}),
            ),
            // Options of its own: kept, include_usage added.
            (
                format!(
                    r#"{{{msgs},"stream_options":{{"include_obfuscation":false}},"stream":true,"model":"fast"}}"#
                ),
                json!({"include_obfuscation": false}),
            ),
            // null, or include_usage false: replaced.
            (
                format!(r#"{{"model":"fast","stream_options":null,{msgs},"stream":true}}"#),
                json!({}),
            ),
            (
                format!(
                    r#"{{"stream_options" : {{ "include_usage" : false }},"model":"fast",{msgs},"stream":true}}"#
                ),
                json!({}),
            ),
        ];
        for (body, mut options) in cases {
            let v = asking_usage(&body);
            options["include_usage"] = json!(true);
            assert_eq!(v["stream_options"], options, "{body}");
            assert_eq!(v["model"], "m", "{body}");
            assert_eq!(v["messages"][0]["content"], "{\"model\":1}", "{body}");
            assert!(!ChatRequest::parse(body.as_bytes()).unwrap().include_usage);
        }
        // Not a stream, or usage asked for already: only the model changes.
        for body in [
            format!(r#"{{"model":"fast",{msgs}}}"#),
            format!(
                r#"{{"model":"fast",{msgs},"stream":true,"stream_options":{{"include_usage":true}}}}"#
            ),
        ] {
            let r = ChatRequest::parse(body.as_bytes()).unwrap();
            assert_eq!(r.ask_usage, AskUsage::No, "{body}");
            let out = rewrite_model_asking_usage(
                body.as_bytes(),
                r.model_span.clone(),
                "m",
                &r.ask_usage,
            );
            assert_eq!(out, rewrite_model(body.as_bytes(), r.model_span, "m"));
        }
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let parse = |extra: &str| {
            let body = format!(r#"{{"model":"m","messages":[{{"role":"user"}}]{extra}}}"#);
            ChatRequest::parse(body.as_bytes()).unwrap().max_tokens
        };
        assert_eq!(parse(""), None);
        assert_eq!(parse(r#","max_tokens":7"#), Some(7));
        assert_eq!(
            parse(r#","max_tokens":7,"max_completion_tokens":9"#),
            Some(9)
        );
    }

    #[test]
    fn only_the_usage_chunk_is_stripped() {
        let events = "data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n\
                      data: [DONE]\n\n";
        let strip =
            |events: &'static str| StreamWatch::default().observe(Bytes::from(events), true);
        let out = strip(events);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: [DONE]\n\n"
        );
        // A content chunk that mentions usage, or carries it beside choices, stays.
        let keep = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\": {\"}}],\"usage\":{\"prompt_tokens\":1}}\r\n\r\n";
        assert_eq!(strip(keep), keep);
        // Only the top-level `choices` counts; spaces inside `[ ]` do not.
        let nested =
            "data: {\"x\":{\"choices\":[]},\"choices\":[{}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        assert_eq!(strip(nested), nested);
        let spaced = "data: {\"choices\" : [ ] ,\"usage\":{\"prompt_tokens\":1}}\n\n";
        assert_eq!(strip(spaced), "");
    }

    #[test]
    fn what_the_typed_check_skips_is_validated_too() {
        let with_extra = |extra: &[u8]| {
            let mut body = br#"{"model":"m","messages":[{"role":"user","x":"#.to_vec();
            body.extend_from_slice(extra);
            body.extend_from_slice(b"}]}");
            body
        };
        let deep = |n: usize| {
            let mut v = "[".repeat(n).into_bytes();
            v.extend("]".repeat(n).into_bytes());
            with_extra(&v)
        };
        for bad in [
            with_extra(b"\"\xff\""),
            with_extra(b"{\"\xc3\x28\":1}"),
            with_extra(b"\"\\ud800\""),
            deep(200),
            deep(100_000),
            // As for the typed fields: a number no f64 can hold.
            with_extra(b"1e400"),
        ] {
            let e = ChatRequest::parse(&bad).unwrap_err();
            assert!(e.message.contains("not valid JSON"), "{}", e.message);
        }
        // Nesting within the limit, escapes and every kind of value pass.
        ChatRequest::parse(&deep(100)).unwrap();
        ChatRequest::parse(&with_extra(
            br#"{"s":"caf\u00e9 \ud83d\ude00 \"q\"","n":[-1,2.5e3,18446744073709551615,1e300],"b":[true,false,null]}"#,
        ))
        .unwrap();
    }

    #[test]
    fn duplicate_model_keys_are_refused() {
        err(r#"{"model":"a","model":"b","messages":[{"role":"user"}]}"#);
    }

    #[test]
    fn stream_watch_finds_usage_and_done() {
        let mut w = StreamWatch::default();
        let _ = w.observe(Bytes::from_static(b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\ndata: [DONE]\n\n"), false);
        assert_eq!(w.usage.map(|u| u.total_tokens), Some(7));
        assert!(w.done);
        assert_eq!(w.chunks, 2);
    }

    proptest::proptest! {
        /// No input makes the parser panic, and whatever it accepts can be rewritten
        /// into valid JSON with the new model.
        #[test]
        fn parser_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = ChatRequest::parse(&body);
            let _ = EmbeddingsRequest::parse(&body);
        }

        /// Whatever serde_json writes (any text in keys and values, any
        /// number it can hold) passes the validating pass.
        #[test]
        fn valid_json_is_never_refused(
            key in "\\PC{0,12}",
            text in proptest::arbitrary::any::<String>(),
            n in proptest::num::f64::NORMAL,
            i in proptest::num::i64::ANY,
        ) {
            let body = serde_json::json!({
                "model": "m",
                "messages": [{"role": "user", "content": text.clone()}],
                // Not a field the typed check reads.
                format!("x_{key}"): {"text": text, "n": [n, i], "deep": [[[[{"a": null}]]]]},
            });
            let bytes = serde_json::to_vec(&body).unwrap();
            proptest::prop_assert!(validate_json(&bytes).is_ok());
            proptest::prop_assert!(ChatRequest::parse(&bytes).is_ok());
        }

        #[test]
        fn rewrite_keeps_json_valid(
            model in "\\PC{0,16}",
            target in "\\PC{0,16}",
            extra in "x_[a-z]{1,8}",
            stream in proptest::bool::ANY,
        ) {
            let body = serde_json::json!({
                "messages": [{"role": "user", "content": model.clone()}],
                "model": model,
                extra.clone(): [1, {"model": "inner"}],
                "stream": stream,
            });
            let bytes = serde_json::to_vec(&body).unwrap();
            let parsed = ChatRequest::parse(&bytes).unwrap();
            proptest::prop_assert_eq!(&parsed.model, body["model"].as_str().unwrap());
            let out = rewrite_model(&bytes, parsed.model_span, &target);
            let mut back: serde_json::Value = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert_eq!(back["model"].as_str(), Some(target.as_str()));
            back["model"] = body["model"].clone();
            proptest::prop_assert_eq!(back, body);
        }
    }

    /// The full parse `usage_of` replaced: every JSON answer must read the
    /// same through the scan.
    fn usage_by_full_parse(body: &[u8]) -> Option<Usage> {
        #[derive(Deserialize)]
        struct WithUsage {
            usage: Option<Usage>,
        }
        serde_json::from_slice::<WithUsage>(body).ok()?.usage
    }

    #[test]
    fn usage_is_read_from_the_top_level_only() {
        let u = |p, c, t| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
                total_tokens: t,
            })
        };
        #[rustfmt::skip]
        let table: &[(&str, Option<Usage>)] = &[
            (r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#, u(3, 2, 5)),
            // Anthropic's and the Responses API's names.
            (r#"{"type":"message","usage":{"input_tokens":7,"output_tokens":1}}"#, u(7, 1, 0)),
            (r#" { "usage" : { "prompt_tokens" : 1 } , "id" : "x" } "#, u(1, 0, 0)),
            (r#"{"usage":null}"#, None),
            (r#"{"id":"x"}"#, None),
            // Nested objects and strings that hold the word are not it.
            (r#"{"choices":[{"usage":{"prompt_tokens":9}}],"x":{"usage":{"prompt_tokens":8}}}"#, None),
            (r#"{"text":"\"usage\":{\"prompt_tokens\":9}","usage":{"prompt_tokens":2}}"#, u(2, 0, 0)),
            (r#"{"a":"usage","b":["usage",{"usage":1}],"usage":{"completion_tokens":4}}"#, u(0, 4, 0)),
            (r#"{"k\\":"\\","usage":{"total_tokens":6}}"#, u(0, 0, 6)),
            // Found from the end: a later `usage` that is not the top level's,
            // or not a key, or inside a string, leaves the search to the scan
            // from the start.
            (r#"{"usage":{"prompt_tokens":1},"x":{"usage":{"prompt_tokens":8}}}"#, u(1, 0, 0)),
            (r#"{"usage":{"prompt_tokens":1},"x":[{"y":1},{"usage":{"prompt_tokens":8}}]}"#, u(1, 0, 0)),
            (r#"{"usage":{"prompt_tokens":1},"x":["usage"],"y":"usage"}"#, u(1, 0, 0)),
            (r#"{"usage":{"prompt_tokens":1},"t":"say \"usage\": {}}"}"#, u(1, 0, 0)),
            (r#"{"usage":{"prompt_tokens":1},"t":"\\\"usage\": {}}"}"#, u(1, 0, 0)),
            (r#"{"usage":{"prompt_tokens":1},"x\"usage":{"prompt_tokens":5}}"#, u(1, 0, 0)),
            (r#"{"usage":{"prompt_tokens":1},"x\\\"usage":{"prompt_tokens":5}}"#, u(1, 0, 0)),
            (r#"{"choices":[],"usage":{"prompt_tokens":3},"service_tier":"default","x":{"a":[1,{}]}}"#, u(3, 0, 0)),
            (r#"{"choices":[{"usage":{"prompt_tokens":9}}]}"#, None),
            (r#"{"usage":{"prompt_tokens":2}} "#, u(2, 0, 0)),
            // (As the scan from the start reads it: it stops at `usage`.)
            (r#"{"usage":{"prompt_tokens":2},"x":"unterminated}"#, u(2, 0, 0)),
            // Usage nested deeper than the answer's top level, after it.
            (r#"{"x":[[{"y":"}"}]],"usage":{"prompt_tokens":1,"details":{"a":[1,2]}}}"#, u(1, 0, 0)),
            // Not an object, not JSON, a usage of the wrong shape.
            (r#"[{"usage":{"prompt_tokens":1}}]"#, None),
            ("", None),
            ("<html>usage</html>", None),
            (r#"{"usage":"many"}"#, None),
            (r#"{"usage":{"prompt_tokens":-1}}"#, None),
            (r#"{"unterminated":"usage"#, None),
            // Inside usage: what the serde derive refused.
            (r#"{"usage":{"prompt_tokens":1.0}}"#, None),
            (r#"{"usage":{"prompt_tokens":1e3}}"#, None),
            (r#"{"usage":{"prompt_tokens":01}}"#, None),
            (r#"{"usage":{"prompt_tokens":null}}"#, None),
            (r#"{"usage":{"prompt_tokens":"1"}}"#, None),
            (r#"{"usage":{"prompt_tokens":18446744073709551616}}"#, None),
            (r#"{"usage":{"prompt_tokens":1,"input_tokens":2}}"#, None),
            (r#"{"usage":{"total_tokens":1,"total_tokens":1}}"#, None),
            (r#"{"usage":{"prompt_tokens":1,}}"#, None),
            (r#"{"usage":{"prompt_tokens" 1}}"#, None),
            (r#"{"usage":{}}"#, u(0, 0, 0)),
            (r#"{"usage":{"prompt_tokens":18446744073709551615}}"#, u(u64::MAX, 0, 0)),
            (r#"{"usage":{"a":{"b":[1,"}",{"c":null}]},"s":"x\"y","t":true,"n":-1.5e3,"output_tokens":0}}"#, u(0, 0, 0)),
            (r#"{"usage":{ "a" : [ ] , "input_tokens" : 12 , "z" : { } }}"#, u(12, 0, 0)),
        ];
        for (body, want) in table {
            assert_eq!(usage_of(body.as_bytes()), *want, "{body}");
            // (Of an array the derive read the first element as `usage`.)
            let object = body.trim_start().starts_with('{');
            if object && serde_json::from_str::<serde_json::Value>(body).is_ok() {
                assert_eq!(usage_by_full_parse(body.as_bytes()), *want, "{body}");
            }
        }
    }

    /// Strings end at their first unescaped quote.
    #[test]
    fn strings_end_at_their_closing_quote() {
        for len in 0..72 {
            for escape_at in std::iter::once(None).chain((0..len).map(Some)) {
                let mut text = vec![b'a'; len];
                if let Some(at) = escape_at {
                    // An escaped quote (`\"`) inside the string, not its end.
                    text.splice(at..at + 1, *b"\\\"");
                }
                let body = [b"\"", &text[..], b"\",\"x\""].concat();
                let shown = String::from_utf8_lossy(&body);
                assert_eq!(string_end(&body, 1), Some(1 + text.len()), "{shown}");
                // Cut before its closing quote, it has no end.
                assert_eq!(string_end(&body[..=text.len()], 1), None, "{shown}");
            }
        }
    }

    #[test]
    fn usage_reads_as_the_full_parse_did_on_every_fixture() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut seen = 0;
        let mut with_usage = 0;
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "json") {
                    let body = std::fs::read(&path).unwrap();
                    let want = usage_by_full_parse(&body);
                    assert_eq!(usage_of(&body), want, "{}", path.display());
                    seen += 1;
                    with_usage += usize::from(want.is_some());
                }
            }
        }
        assert!(
            seen > 20 && with_usage > 5,
            "{seen} fixtures, {with_usage} with usage"
        );
    }

    proptest::proptest! {
        #[test]
        fn usage_reads_as_the_full_parse_did(
            text in "\\PC{0,48}",
            prompt in 0u64..1_000_000,
            before in proptest::bool::ANY,
            nested in proptest::bool::ANY,
        ) {
            let usage = serde_json::json!({
                "prompt_tokens": prompt,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 0, text.clone(): [text.clone(), null, 1.5]},
                text.clone(): text.clone(),
            });
            let mut body = serde_json::Map::new();
            if before {
                body.insert("usage".into(), usage.clone());
            }
            body.insert(text.clone(), serde_json::json!([text.clone(), {"usage": {"prompt_tokens": 5}}]));
            if nested {
                body.insert("choices".into(), serde_json::json!([{"message": {"content": text, "usage": usage}}]));
            }
            if !before {
                body.insert("usage".into(), usage);
            }
            let bytes = serde_json::to_vec(&body).unwrap();
            proptest::prop_assert_eq!(usage_of(&bytes), usage_by_full_parse(&bytes));
            proptest::prop_assert_eq!(usage_of(&bytes).map(|u| u.prompt_tokens), Some(prompt));
        }
    }

    /// The typed check alone, in the order the checks ran before the hand
    /// reader: what [`ChatRequest::parse`] must match, errors included.
    fn parse_typed(body: &[u8]) -> Result<ChatRequest, InvalidRequest> {
        let fields = ChatFields::checked(body)?;
        validate_json(body)?;
        ChatRequest::from_fields(body, fields)
    }

    /// The fields the reader knows, then one it skips and one written with
    /// an escape.
    fn key(k: usize) -> &'static str {
        match CHAT_FIELDS.get(k) {
            Some(field) => field,
            None if k == CHAT_FIELDS.len() => "user",
            None => "mod\\u0065l",
        }
    }
    const KEY_COUNT: usize = CHAT_FIELDS.len() + 2;
    const VALUES: [&str; 38] = [
        r#""gpt-4o""#,
        r#""g\u0070t""#,
        "null",
        "true",
        "false",
        "0",
        "1",
        "-1",
        "1.5",
        "1e3",
        "4294967295",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        r#""yes""#,
        "{}",
        "[]",
        r#"{"include_usage":true}"#,
        r#"{"include_usage":false,"x":[1,{"y":null}]}"#,
        r#"{"include_usage":"no"}"#,
        r#"[{"role":"user","content":"hi"}]"#,
        r#"[{"content":"x","role":"system"},{"role":"user","content":[{"type":"text","text":"a\"b"}]}]"#,
        r#"[{"content":"x"}]"#,
        r#"[{"role":5}]"#,
        r#"[["user"]]"#,
        r#"[{"role":"a","role":"b"}]"#,
        r#"[{"r\u006fle":"user"}]"#,
        r#"[{"type":"function","function":{"name":"f"}}]"#,
        r#"[{"type":"function"},{}]"#,
        r#"[{"type":null}]"#,
        r#""\ud800""#,
        r#"[1, 2, {"a": []}]"#,
        r#""a\\\"b}""#,
        "01",
        // Not JSON deep inside what the reader walks.
        r#"[{"role":"user","content":"\ud800"}]"#,
        r#"[{"role":"user","content":[01]}]"#,
        r#"[{"type":"function","function":{"name":tru}}]"#,
        r#"{"include_usage":true,}"#,
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// The hand reader reads what the typed check reads and refuses
        /// nothing itself: every body gets the same answer, or the same
        /// error, as from the typed check.
        #[test]
        fn the_hand_reader_agrees_with_the_typed_check(
            members in proptest::collection::vec((0..KEY_COUNT, 0..VALUES.len()), 0..9),
            must in proptest::collection::vec(0..VALUES.len(), 2),
            spaced in proptest::bool::ANY,
            cut in proptest::option::weighted(0.1, 0usize..400),
            trailing in proptest::option::weighted(0.05, proptest::sample::select(vec!["}", "x", ",", "{}"])),
        ) {
            let gap = if spaced { " \n " } else { "" };
            // Usually a model and messages first, so that most bodies are
            // requests and the reader's whole path is taken.
            let mut parts = vec![
                format!(r#""model"{gap}:{gap}{}"#, VALUES[must[0] % 3]),
                format!(r#""messages"{gap}:{gap}{}"#, VALUES[20 + must[1] % 2]),
            ];
            for (k, v) in members {
                parts.push(format!(r#""{}"{gap}:{gap}{}"#, key(k), VALUES[v]));
            }
            let mut body = format!("{gap}{{{gap}{}{gap}}}{gap}", parts.join(&format!("{gap},{gap}")));
            if let Some(at) = cut {
                body.truncate(at.min(body.len()));
            }
            body.push_str(trailing.unwrap_or_default());
            let body = body.as_bytes();
            proptest::prop_assert_eq!(ChatRequest::parse(body), parse_typed(body));
            // The reader's own promise: it reads only JSON, and what it
            // reads is what the typed check reads.
            if let Some(fast) = ChatFields::read(body) {
                proptest::prop_assert!(validate_json(body).is_ok());
                proptest::prop_assert_eq!(Some(fast), ChatFields::checked(body).ok());
            }
        }
    }

    #[test]
    fn a_usual_request_is_read_by_hand() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}],"stream":true,"max_tokens":5}"#;
        let fields = ChatFields::read(body).expect("the usual shape");
        assert_eq!(Some(fields.clone()), ChatFields::checked(body).ok());
        assert_eq!(fields.messages, 1);
        assert_eq!(fields.stream, Some(true));
        assert_eq!(fields.max_tokens, Some(5));
    }

    #[test]
    fn a_string_ends_at_its_first_unescaped_quote_wherever_that_is() {
        // Escapes anywhere, strings short and long.
        for len in 0..40 {
            for escape_at in [None, Some(0), Some(len / 2), Some(14), Some(15), Some(16)] {
                let mut text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                if let Some(at) = escape_at.filter(|&at| at < len) {
                    text.splice(at..at, *br#"\""#);
                }
                let body = [b"\"".as_slice(), &text, b"\" tail".as_slice()].concat();
                let want = serde_json::from_slice::<String>(&body[..text.len() + 2]).ok();
                assert!(want.is_some(), "{}", String::from_utf8_lossy(&body));
                assert_eq!(
                    string_end(&body, 1),
                    Some(text.len() + 1),
                    "{}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        assert_eq!(string_end(br#""abc"#, 1), None, "unterminated");
        assert_eq!(string_end(br#""ab\"#, 1), None, "an escape at the end");
    }

    #[test]
    fn a_model_name_is_written_as_serde_json_writes_it() {
        for name in [
            "gpt-4o",
            "",
            "a\"b",
            "back\\slash",
            "tab\there",
            "caf\u{e9}",
            "del\u{7f}",
        ] {
            let mut out = BytesMut::new();
            put_json_string(&mut out, name);
            assert_eq!(
                &out[..],
                serde_json::to_string(name).unwrap().as_bytes(),
                "{name:?}"
            );
        }
    }
}
