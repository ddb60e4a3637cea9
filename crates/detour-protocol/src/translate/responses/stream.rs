//! Responses API streams: typed SSE events (`event: <type>` and a `data:`
//! object with the same `type` and a `sequence_number` counting from 0).
//!
//! [`StreamEncoder`] writes them from IR events, as OpenAI orders them:
//!
//! ```text
//! response.created, response.in_progress
//! per message:  response.output_item.added, response.content_part.added,
//!               response.output_text.delta…, response.output_text.done,
//!               response.content_part.done, response.output_item.done
//! per call:     response.output_item.added, response.function_call_arguments.delta…,
//!               response.function_call_arguments.done, response.output_item.done
//! response.completed (or response.incomplete), with the output and usage
//! ```
//!
//! An item is closed when the next one starts or the answer ends. A stream
//! that fails after its start ends with `response.failed` (the output so far,
//! `error.code` `server_error` or `rate_limit_exceeded`) and an `error` event.
//!
//! [`StreamDecoder`] reads a provider's Responses stream (a passthrough to
//! an `openai` provider) into IR events: what the relay needs to know where
//! it ends (`response.completed`, `response.incomplete`), its usage, and
//! whether it failed (`response.failed`, `error`).

use bytes::{BufMut, BytesMut};
use serde::Deserialize;
use serde_json::{json, Value};

use super::object::{self, Echo, Snapshot, Status};
use crate::chat::{ErrorKind, FinishReason, StreamEvent, Usage};
use crate::translate::openai::to_bytes;
use crate::translate::TranslateError;

/// One output item while it is streamed.
#[derive(Debug)]
enum Item {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        name: String,
        arguments: String,
    },
}

#[derive(Debug)]
struct OpenItem {
    item: Item,
    done: bool,
}

/// Encodes IR events as a Responses event stream.
#[derive(Debug)]
pub struct StreamEncoder {
    echo: Echo,
    created_at: u64,
    sequence: u64,
    id: String,
    model: String,
    started: bool,
    items: Vec<OpenItem>,
    /// The output index of each IR tool call (by its `index`).
    calls: Vec<usize>,
    messages: usize,
    reason: Option<FinishReason>,
    usage: Option<Usage>,
    closed: bool,
}

impl StreamEncoder {
    /// `echo` is the request's echoed parameters; `created_at` the Unix time
    /// every `response` object reports.
    pub fn new(echo: Echo, created_at: u64) -> Self {
        Self {
            echo,
            created_at,
            sequence: 0,
            id: String::new(),
            model: String::new(),
            started: false,
            items: Vec::new(),
            calls: Vec::new(),
            messages: 0,
            reason: None,
            usage: None,
            closed: false,
        }
    }

    pub fn encode(&mut self, event: &crate::chat::StreamEvent, out: &mut BytesMut) {
        if self.closed {
            return;
        }
        match event {
            StreamEvent::Start { id, model } => {
                self.id.clone_from(id);
                self.model.clone_from(model);
                self.start(out);
            }
            StreamEvent::TextDelta(text) => {
                self.start(out);
                if text.is_empty() {
                    return;
                }
                let index = self.message(out);
                let Some(OpenItem {
                    item: Item::Message { id, text: all },
                    ..
                }) = self.items.get_mut(index)
                else {
                    return;
                };
                all.push_str(text);
                let id = id.clone();
                self.emit(
                    out,
                    "response.output_text.delta",
                    json!({
                        "item_id": id,
                        "output_index": index,
                        "content_index": 0,
                        "delta": text,
                        "logprobs": [],
                    }),
                );
            }
            StreamEvent::ToolCallStart {
                index, id, name, ..
            } => {
                self.start(out);
                self.close_open(out);
                let output_index = self.items.len();
                if self.calls.len() <= *index {
                    self.calls.resize(*index + 1, usize::MAX);
                }
                if let Some(slot) = self.calls.get_mut(*index) {
                    *slot = output_index;
                }
                self.items.push(OpenItem {
                    item: Item::Call {
                        id: id.clone(),
                        name: name.clone(),
                        arguments: String::new(),
                    },
                    done: false,
                });
                self.emit(
                    out,
                    "response.output_item.added",
                    json!({
                        "output_index": output_index,
                        "item": object::call_item(id, name, "", "in_progress"),
                    }),
                );
            }
            StreamEvent::ToolCallArgsDelta { index, fragment } => {
                let Some(&output_index) = self.calls.get(*index) else {
                    return;
                };
                let Some(OpenItem {
                    item: Item::Call { id, arguments, .. },
                    ..
                }) = self.items.get_mut(output_index)
                else {
                    return;
                };
                if fragment.is_empty() {
                    return;
                }
                arguments.push_str(fragment);
                let item_id = object::call_item_id(id);
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({
                        "item_id": item_id,
                        "output_index": output_index,
                        "delta": fragment,
                    }),
                );
            }
            StreamEvent::Finish { reason } => self.reason = Some(reason.clone()),
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Error { kind, message } => {
                self.start(out);
                let code = match kind {
                    ErrorKind::RateLimit => "rate_limit_exceeded",
                    _ => "server_error",
                };
                let response = self.snapshot(Status::Failed, Some((code, message)));
                self.emit(out, "response.failed", json!({ "response": response }));
                let seq = self.next_sequence();
                write_error(
                    out,
                    message,
                    super::super::openai::error_type(*kind),
                    code,
                    Some(seq),
                );
                self.closed = true;
            }
            StreamEvent::Done => {
                self.start(out);
                let reason = self.reason.clone().unwrap_or(FinishReason::Stop);
                let status = Status::of(&reason);
                let item_status = match status {
                    Status::Incomplete => "incomplete",
                    _ => "completed",
                };
                self.close_all(out, item_status);
                let kind = match status {
                    Status::Incomplete => "response.incomplete",
                    _ => "response.completed",
                };
                let response = self.snapshot(status, None);
                self.emit(out, kind, json!({ "response": response }));
                self.closed = true;
            }
        }
    }

    /// `response.created` and `response.in_progress`, once.
    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        for kind in ["response.created", "response.in_progress"] {
            let response = self.snapshot(Status::InProgress, None);
            self.emit(out, kind, json!({ "response": response }));
        }
    }

    /// The output index of the open message, opening one if the last item is
    /// not a message still open.
    fn message(&mut self, out: &mut BytesMut) -> usize {
        if let Some(last) = self.items.len().checked_sub(1) {
            if matches!(
                self.items.get(last),
                Some(OpenItem {
                    item: Item::Message { .. },
                    done: false
                })
            ) {
                return last;
            }
        }
        self.close_open(out);
        let index = self.items.len();
        let id = object::message_id(&self.id, self.messages);
        self.messages += 1;
        self.emit(
            out,
            "response.output_item.added",
            json!({
                "output_index": index,
                "item": object::message_item(&id, "in_progress", Vec::new()),
            }),
        );
        self.emit(
            out,
            "response.content_part.added",
            json!({
                "item_id": id,
                "output_index": index,
                "content_index": 0,
                "part": object::output_text(""),
            }),
        );
        self.items.push(OpenItem {
            item: Item::Message {
                id,
                text: String::new(),
            },
            done: false,
        });
        index
    }

    /// Closes the last item if it is still open (a new one starts).
    fn close_open(&mut self, out: &mut BytesMut) {
        if let Some(last) = self.items.len().checked_sub(1) {
            self.close(last, "completed", out);
        }
    }

    fn close_all(&mut self, out: &mut BytesMut, status: &str) {
        for index in 0..self.items.len() {
            self.close(index, status, out);
        }
    }

    /// The `.done` events of item `index`, unless it was closed already.
    fn close(&mut self, index: usize, status: &str, out: &mut BytesMut) {
        let Some(open) = self.items.get_mut(index) else {
            return;
        };
        if open.done {
            return;
        }
        open.done = true;
        let events: Vec<(&str, Value)> = match &open.item {
            Item::Message { id, text } => vec![
                (
                    "response.output_text.done",
                    json!({
                        "item_id": id,
                        "output_index": index,
                        "content_index": 0,
                        "text": text,
                        "logprobs": [],
                    }),
                ),
                (
                    "response.content_part.done",
                    json!({
                        "item_id": id,
                        "output_index": index,
                        "content_index": 0,
                        "part": object::output_text(text),
                    }),
                ),
                (
                    "response.output_item.done",
                    json!({
                        "output_index": index,
                        "item": object::message_item(id, status, vec![object::output_text(text)]),
                    }),
                ),
            ],
            Item::Call {
                id,
                name,
                arguments,
            } => vec![
                (
                    "response.function_call_arguments.done",
                    json!({
                        "item_id": object::call_item_id(id),
                        "output_index": index,
                        "name": name,
                        "arguments": arguments,
                    }),
                ),
                (
                    "response.output_item.done",
                    json!({
                        "output_index": index,
                        "item": object::call_item(id, name, arguments, "completed"),
                    }),
                ),
            ],
        };
        for (kind, data) in events {
            self.emit(out, kind, data);
        }
    }

    /// The output items as they stand.
    fn output(&self) -> Vec<Value> {
        self.items
            .iter()
            .map(|open| {
                let status = if open.done {
                    "completed"
                } else {
                    "in_progress"
                };
                match &open.item {
                    Item::Message { id, text } => {
                        object::message_item(id, status, vec![object::output_text(text)])
                    }
                    Item::Call {
                        id,
                        name,
                        arguments,
                    } => object::call_item(id, name, arguments, status),
                }
            })
            .collect()
    }

    fn snapshot(&self, status: Status, error: Option<(&'static str, &str)>) -> Value {
        let output = match status {
            Status::InProgress => Vec::new(),
            _ => self.output(),
        };
        let incomplete = match (status, &self.reason) {
            (Status::Incomplete, Some(reason)) => object::incomplete_reason(reason),
            _ => None,
        };
        let usage = match status {
            Status::Completed | Status::Incomplete => self.usage.as_ref(),
            _ => None,
        };
        object::response_object(
            Snapshot {
                id: &self.id,
                model: &self.model,
                created_at: self.created_at,
                status,
                output,
                usage,
                incomplete,
                error,
            },
            &self.echo,
        )
    }

    fn next_sequence(&mut self) -> u64 {
        let n = self.sequence;
        self.sequence += 1;
        n
    }

    /// Writes one event: `data`'s fields after `type` and `sequence_number`.
    fn emit(&mut self, out: &mut BytesMut, kind: &str, data: Value) {
        let mut object = serde_json::Map::new();
        object.insert("type".into(), kind.into());
        object.insert("sequence_number".into(), self.next_sequence().into());
        if let Value::Object(fields) = data {
            object.extend(fields);
        }
        write_event(out, kind, &to_bytes(&Value::Object(object)));
    }
}

fn write_event(out: &mut BytesMut, kind: &str, data: &[u8]) {
    out.reserve(kind.len() + data.len() + 16);
    out.put_slice(b"event: ");
    out.put_slice(kind.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(data);
    out.put_slice(b"\n\n");
}

/// An `error` event. Its fields are the SDK's `ResponseErrorEvent`'s, plus
/// the `error` object of OpenAI's other streams, which makes the SDKs raise
/// instead of handing the event on as data.
fn write_error(out: &mut BytesMut, message: &str, kind: &str, code: &str, seq: Option<u64>) {
    let mut object = serde_json::Map::new();
    object.insert("type".into(), "error".into());
    if let Some(seq) = seq {
        object.insert("sequence_number".into(), seq.into());
    }
    object.insert("code".into(), code.into());
    object.insert("message".into(), message.into());
    object.insert("param".into(), Value::Null);
    object.insert(
        "error".into(),
        json!({"type": kind, "code": code, "message": message, "param": null}),
    );
    write_event(out, "error", &to_bytes(&Value::Object(object)));
}

/// The `error` event that ends a Responses stream the gateway relayed as it
/// came (whose sequence numbers it did not count: the event has none).
pub fn error_event(message: &str, kind: &str, code: Option<&str>) -> bytes::Bytes {
    let mut out = BytesMut::new();
    write_error(
        &mut out,
        message,
        kind,
        code.unwrap_or("server_error"),
        None,
    );
    out.freeze()
}

// ---------------------------------------------------------------------------
// Decoding a provider's Responses stream

#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    delta: Option<Value>,
    output_index: Option<u64>,
    item: Option<WireItem>,
    response: Option<WireResponse>,
    code: Option<Value>,
    message: Option<String>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireItem {
    #[serde(rename = "type")]
    kind: Option<String>,
    call_id: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    id: Option<String>,
    model: Option<String>,
    usage: Option<WireUsage>,
    incomplete_details: Option<WireIncomplete>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireIncomplete {
    reason: Option<String>,
}

#[derive(Deserialize)]
struct WireError {
    code: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens_details: Option<WireInputDetails>,
}

#[derive(Deserialize)]
struct WireInputDetails {
    cached_tokens: Option<u64>,
    cache_write_tokens: Option<u64>,
}

impl WireUsage {
    fn to_ir(&self) -> Usage {
        let input = self.input_tokens.unwrap_or(0);
        let output = self.output_tokens.unwrap_or(0);
        let details = self.input_tokens_details.as_ref();
        Usage {
            input,
            output,
            cached_input: details.and_then(|d| d.cached_tokens).unwrap_or(0),
            cache_write_input: details.and_then(|d| d.cache_write_tokens).unwrap_or(0),
            total: self.total_tokens.unwrap_or(input.saturating_add(output)),
        }
    }
}

/// The kind an error code (or type) names.
fn error_kind(code: Option<&Value>, kind: Option<&str>) -> ErrorKind {
    let name = code.and_then(Value::as_str).or(kind).unwrap_or_default();
    match name {
        "rate_limit_exceeded" | "rate_limit_error" | "insufficient_quota" => ErrorKind::RateLimit,
        "invalid_prompt" | "invalid_request_error" | "context_length_exceeded" => {
            ErrorKind::InvalidRequest
        }
        "overloaded" | "service_unavailable" | "server_is_overloaded" => ErrorKind::Overloaded,
        _ => ErrorKind::Server,
    }
}

/// Decodes a provider's Responses stream, one `data:` payload at a time.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    started: bool,
    ended: bool,
    /// Output index of each function call, in order: the IR call index.
    calls: Vec<u64>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) -> Result<Vec<StreamEvent>, TranslateError> {
        let mut events = Vec::new();
        let data = data.trim_ascii();
        if self.ended || data.is_empty() || data.starts_with(b"[DONE]") {
            return Ok(events);
        }
        let event: WireEvent = serde_json::from_slice(data)
            .map_err(|e| TranslateError::upstream(crate::chat::Format::OpenAi, e))?;
        match event.kind.as_str() {
            "response.created" | "response.in_progress" if !self.started => {
                self.started = true;
                let r = event.response.as_ref();
                events.push(StreamEvent::Start {
                    id: r.and_then(|r| r.id.clone()).unwrap_or_default(),
                    model: r.and_then(|r| r.model.clone()).unwrap_or_default(),
                });
            }
            "response.output_text.delta" | "response.refusal.delta" => {
                if let Some(Value::String(delta)) = event.delta {
                    events.push(StreamEvent::TextDelta(delta));
                }
            }
            "response.output_item.added" => {
                let item = event.item.as_ref();
                if item.and_then(|i| i.kind.as_deref()) == Some("function_call") {
                    self.calls.push(event.output_index.unwrap_or(0));
                    events.push(StreamEvent::ToolCallStart {
                        index: self.calls.len() - 1,
                        id: item.and_then(|i| i.call_id.clone()).unwrap_or_default(),
                        name: item.and_then(|i| i.name.clone()).unwrap_or_default(),
                        signature: None,
                    });
                }
            }
            "response.function_call_arguments.delta" => {
                let at = event.output_index.unwrap_or(0);
                if let (Some(index), Some(Value::String(fragment))) =
                    (self.calls.iter().position(|o| *o == at), event.delta)
                {
                    events.push(StreamEvent::ToolCallArgsDelta { index, fragment });
                }
            }
            "response.completed" | "response.incomplete" => {
                self.ended = true;
                let r = event.response.as_ref();
                let reason = match r
                    .and_then(|r| r.incomplete_details.as_ref())
                    .and_then(|d| d.reason.as_deref())
                {
                    Some("max_output_tokens") => FinishReason::Length,
                    Some("content_filter") => FinishReason::ContentFilter,
                    _ if !self.calls.is_empty() => FinishReason::ToolCalls,
                    _ => FinishReason::Stop,
                };
                events.push(StreamEvent::Finish { reason });
                if let Some(u) = r.and_then(|r| r.usage.as_ref()) {
                    events.push(StreamEvent::Usage(u.to_ir()));
                }
                events.push(StreamEvent::Done);
            }
            "response.failed" => {
                self.ended = true;
                let error = event.response.and_then(|r| r.error);
                let kind = error.as_ref().map_or(ErrorKind::Server, |e| {
                    error_kind(e.code.as_ref(), e.kind.as_deref())
                });
                let message = error
                    .and_then(|e| e.message)
                    .unwrap_or_else(|| "the response failed".to_owned());
                events.push(StreamEvent::Error { kind, message });
            }
            "error" => {
                self.ended = true;
                let nested = event.error.as_ref();
                let kind = match nested {
                    Some(e) => error_kind(e.code.as_ref(), e.kind.as_deref()),
                    None => error_kind(event.code.as_ref(), None),
                };
                let message = event
                    .message
                    .or_else(|| event.error.and_then(|e| e.message))
                    .unwrap_or_else(|| "An error occurred during streaming".to_owned());
                events.push(StreamEvent::Error { kind, message });
            }
            _ => {}
        }
        Ok(events)
    }

    /// The provider's body ended: whole only after its final event.
    pub fn finish(&mut self) -> Result<Vec<StreamEvent>, TranslateError> {
        if self.ended {
            return Ok(Vec::new());
        }
        self.ended = true;
        Err(TranslateError::upstream(
            crate::chat::Format::OpenAi,
            "Responses stream ended before response.completed",
        ))
    }
}
