//! The `response` object a Responses client reads (SDK: `types/responses/
//! response.py`), built from an IR answer: its output items (an assistant
//! `message` with `output_text`, `function_call` items), status, usage, and
//! the request's own parameters echoed back as OpenAI does.
//!
//! Ids are made from the provider's: `resp_<id>` for the response, `msg_<id>`
//! for its message, `fc_<call id>` for a call, so that the same answer always
//! encodes the same (no clock, no randomness here).

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::chat::{ChatResponse, FinishReason, Output, Usage};
use crate::translate::openai::to_bytes;

/// The request parameters a `response` object repeats, as the client sent
/// them (absent ones get OpenAI's defaults).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Echo {
    fields: Map<String, Value>,
}

/// A request field and the value OpenAI reports when the request leaves it out.
type Echoed = (&'static str, fn() -> Value);

/// Request fields echoed in every `response` object.
const ECHOED: [Echoed; 13] = [
    ("instructions", || Value::Null),
    ("max_output_tokens", || Value::Null),
    ("metadata", || json!({})),
    ("parallel_tool_calls", || Value::Bool(true)),
    ("reasoning", || json!({"effort": null, "summary": null})),
    ("service_tier", || Value::from("default")),
    ("temperature", || Value::from(1.0)),
    ("text", || json!({"format": {"type": "text"}})),
    ("tool_choice", || Value::from("auto")),
    ("tools", || json!([])),
    ("top_p", || Value::from(1.0)),
    ("truncation", || Value::from("disabled")),
    ("user", || Value::Null),
];

impl Echo {
    /// The echoed fields of a client's request body (defaults for any that
    /// are absent, or for a body that is not a JSON object).
    pub fn of_request(body: &[u8]) -> Self {
        let mut given = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        let mut fields = Map::new();
        for (key, default) in ECHOED {
            let value = match given.remove(key) {
                Some(Value::Null) | None => default(),
                Some(v) => v,
            };
            fields.insert(key.to_owned(), value);
        }
        Self { fields }
    }
}

/// Where a response stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    InProgress,
    Completed,
    Incomplete,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Incomplete => "incomplete",
            Self::Failed => "failed",
        }
    }

    /// How an answer that ended for `reason` stands.
    pub(crate) fn of(reason: &FinishReason) -> Self {
        match incomplete_reason(reason) {
            Some(_) => Self::Incomplete,
            None => Self::Completed,
        }
    }
}

/// `incomplete_details.reason` for an answer cut short.
pub(crate) fn incomplete_reason(reason: &FinishReason) -> Option<&'static str> {
    match reason {
        FinishReason::Length => Some("max_output_tokens"),
        FinishReason::ContentFilter => Some("content_filter"),
        FinishReason::Stop | FinishReason::ToolCalls | FinishReason::StopSequence(_) => None,
    }
}

pub(crate) fn response_id(upstream: &str) -> String {
    format!("resp_{upstream}")
}

pub(crate) fn message_id(upstream: &str, n: usize) -> String {
    match n {
        0 => format!("msg_{upstream}"),
        n => format!("msg_{upstream}_{n}"),
    }
}

pub(crate) fn call_item_id(call_id: &str) -> String {
    format!("fc_{call_id}")
}

/// An `output_text` content part.
pub(crate) fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// An assistant `message` output item.
pub(crate) fn message_item(id: &str, status: &str, content: Vec<Value>) -> Value {
    json!({
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": content,
    })
}

/// A `function_call` output item.
pub(crate) fn call_item(call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call",
        "id": call_item_id(call_id),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

/// Usage as the Responses API reports it.
pub(crate) fn usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input,
        "input_tokens_details": {
            "cached_tokens": u.cached_input,
            "cache_write_tokens": u.cache_write_input,
        },
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total,
    })
}

/// What a `response` object holds besides the echo.
pub(crate) struct Snapshot<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub created_at: u64,
    pub status: Status,
    pub output: Vec<Value>,
    pub usage: Option<&'a Usage>,
    pub incomplete: Option<&'static str>,
    /// `error` of a failed response: its `code` and message.
    pub error: Option<(&'static str, &'a str)>,
}

/// The `response` object.
pub(crate) fn response_object(s: Snapshot<'_>, echo: &Echo) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), response_id(s.id).into());
    out.insert("object".into(), "response".into());
    out.insert("created_at".into(), s.created_at.into());
    out.insert("status".into(), s.status.as_str().into());
    out.insert("background".into(), false.into());
    out.insert(
        "error".into(),
        match s.error {
            Some((code, message)) => json!({"code": code, "message": message}),
            None => Value::Null,
        },
    );
    out.insert(
        "incomplete_details".into(),
        match s.incomplete {
            Some(reason) => json!({"reason": reason}),
            None => Value::Null,
        },
    );
    out.insert("model".into(), s.model.into());
    out.insert("output".into(), Value::Array(s.output));
    out.insert("previous_response_id".into(), Value::Null);
    out.insert("store".into(), false.into());
    for (key, value) in &echo.fields {
        out.insert(key.clone(), value.clone());
    }
    out.insert("usage".into(), s.usage.map_or(Value::Null, usage));
    Value::Object(out)
}

/// Builds a `response` object for the client from an IR answer (its first
/// choice: the Responses API has no `n`); `created_at` is the Unix time to
/// report (protocol code reads no clock).
pub fn encode_response(resp: &ChatResponse, echo: &Echo, created_at: u64) -> Bytes {
    let (content, reason) = match resp.choices.first() {
        Some(c) => (c.content.as_slice(), c.finish_reason.clone()),
        None => (&[][..], FinishReason::Stop),
    };
    let status = Status::of(&reason);
    let mut output = Vec::new();
    let mut texts: Vec<&str> = Vec::new();
    let mut messages = 0;
    let mut flush = |texts: &mut Vec<&str>, output: &mut Vec<Value>| {
        if texts.is_empty() {
            return;
        }
        let text: String = texts.drain(..).collect();
        let id = message_id(&resp.id, messages);
        messages += 1;
        output.push(message_item(&id, status.as_str(), vec![output_text(&text)]));
    };
    for o in content {
        match o {
            Output::Text(t) => texts.push(t),
            Output::ToolCall(call) => {
                flush(&mut texts, &mut output);
                output.push(call_item(
                    &call.id,
                    &call.name,
                    &call.arguments,
                    "completed",
                ));
            }
        }
    }
    flush(&mut texts, &mut output);
    let object = response_object(
        Snapshot {
            id: &resp.id,
            model: &resp.model,
            created_at,
            status,
            output,
            usage: resp.usage.as_ref(),
            incomplete: incomplete_reason(&reason),
            error: None,
        },
        echo,
    );
    to_bytes(&object)
}
