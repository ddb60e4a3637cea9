//! The OpenAI flavor's Responses API, `POST /v1/responses` (the official SDK's
//! `types/responses/` are the reference): a `response` object, or its typed
//! event stream (`response.created` … `response.completed`, every event with
//! its `sequence_number`).
//!
//! Small on purpose: text or one function call, as the chat endpoint plans
//! them (a tool is called when offered, unless `tool_choice` is `"none"` or
//! the input ends with a `function_call_output`, which the answer then
//! quotes). `previous_response_id` and `store` are accepted and echoed (the
//! mock keeps nothing). Pure: request bytes in, [`Reply`] out.

use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Map, Value};

use super::body::{Ctx, Reply, Stream};
use super::gen::{self, unix_now, Fnv};

type Rejected = Box<Reply>;

const SSE: &str = "text/event-stream; charset=utf-8";

/// A 400 in OpenAI's error shape (as `openai::error_body` writes it).
fn invalid(message: &str, param: Option<&str>) -> Rejected {
    let body = json!({"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": null,
    }});
    Box::new(Reply::json(
        StatusCode::BAD_REQUEST,
        Bytes::from(body.to_string()),
    ))
}

/// What the answer will be.
enum Plan {
    Text {
        tool_result: Option<String>,
    },
    Call {
        name: String,
        parameters: Option<Value>,
    },
}

fn plan(req: &Map<String, Value>) -> Result<Plan, Rejected> {
    let last = req
        .get("input")
        .and_then(Value::as_array)
        .and_then(|items| items.last());
    if let Some(last) = last {
        if last.get("type").and_then(Value::as_str) == Some("function_call_output") {
            let tool_result = last.get("output").map(gen::text_of);
            return Ok(Plan::Text { tool_result });
        }
    }
    let functions: Vec<&Value> = req
        .get("tools")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .collect();
    let call = |f: &Value| {
        f.get("name")
            .and_then(Value::as_str)
            .map(|name| Plan::Call {
                name: name.to_owned(),
                parameters: f.get("parameters").cloned(),
            })
    };
    let text = Plan::Text { tool_result: None };
    match req.get("tool_choice") {
        Some(Value::String(c)) if c == "none" => Ok(text),
        Some(Value::Object(c)) if c.get("type").and_then(Value::as_str) == Some("function") => {
            let wanted = c.get("name").and_then(Value::as_str).unwrap_or_default();
            functions
                .iter()
                .find(|f| f.get("name").and_then(Value::as_str) == Some(wanted))
                .and_then(|f| call(f))
                .ok_or_else(|| {
                    invalid(
                        &format!("Tool choice '{wanted}' not found in 'tools' parameter."),
                        Some("tool_choice"),
                    )
                })
        }
        _ => Ok(functions.first().and_then(|f| call(f)).unwrap_or(text)),
    }
}

/// Answers one `POST /v1/responses`.
pub(crate) fn create(body: &[u8], ctx: &Ctx<'_>) -> Result<Reply, Rejected> {
    let req = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        _ => {
            return Err(invalid(
                "We could not parse the JSON body of your request.",
                None,
            ))
        }
    };
    let model = match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(invalid(
                "Missing required parameter: 'model'.",
                Some("model"),
            ))
        }
    };
    let input = match req.get("input") {
        Some(v @ (Value::String(_) | Value::Array(_))) => v,
        _ => {
            return Err(invalid(
                "Missing required parameter: 'input'.",
                Some("input"),
            ))
        }
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max_tokens = req.get("max_output_tokens").and_then(Value::as_u64);
    let plan = plan(&req)?;

    let mut hash = Fnv::new();
    hash.write(model.as_bytes());
    hash.write_json(input);
    let mut rng = fastrand::Rng::with_seed(gen::mix(ctx.seed, hash.finish()));
    let mut ids = fastrand::Rng::with_seed(gen::mix(ctx.seed ^ 0x2E5F_0A5E, ctx.seq));
    let id = format!("resp_{}", gen::alnum(&mut ids, 24));
    let item_id = format!("msg_{}", gen::alnum(&mut ids, 24));

    let (item, incomplete) = match &plan {
        Plan::Text { tool_result } => {
            let mut text = gen::answer_text(&model, tool_result.as_deref(), &mut rng);
            let cut = max_tokens.is_some_and(|limit| gen::truncate_to_tokens(&mut text, limit));
            (Item::Text { id: item_id, text }, cut)
        }
        Plan::Call { name, parameters } => (
            Item::Call {
                id: format!("fc_{}", gen::alnum(&mut ids, 24)),
                call_id: format!("call_{}", gen::alnum(&mut ids, 24)),
                name: name.clone(),
                arguments: gen::mock_args(parameters.as_ref()).to_string(),
            },
            false,
        ),
    };
    let input_tokens = gen::tokens_for(input.to_string().len());
    let output_tokens = gen::tokens_for(item.content().len());
    let head = Head {
        id,
        model,
        created_at: unix_now(),
        request: req,
        usage: json!({
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }),
        incomplete,
    };
    if stream {
        Ok(Reply::stream(events(&head, &item, ctx.chunks)))
    } else {
        let status = head.status();
        let body = head.object(status, vec![item.done(head.item_status())], true);
        Ok(Reply::json(StatusCode::OK, Bytes::from(body.to_string())))
    }
}

enum Item {
    Text {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

impl Item {
    /// The text or the arguments: what is streamed in pieces.
    fn content(&self) -> &str {
        match self {
            Self::Text { text, .. } => text,
            Self::Call { arguments, .. } => arguments,
        }
    }

    fn id(&self) -> &str {
        match self {
            Self::Text { id, .. } | Self::Call { id, .. } => id,
        }
    }

    fn with(&self, content: &str, status: &str) -> Value {
        match self {
            Self::Text { id, .. } => json!({
                "type": "message", "id": id, "status": status, "role": "assistant",
                "content": if status == "in_progress" { json!([]) } else { json!([output_text(content)]) },
            }),
            Self::Call {
                id, call_id, name, ..
            } => json!({
                "type": "function_call", "id": id, "call_id": call_id, "name": name,
                "arguments": content, "status": status,
            }),
        }
    }

    fn done(&self, status: &str) -> Value {
        self.with(self.content(), status)
    }
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

struct Head {
    id: String,
    model: String,
    created_at: u64,
    request: Map<String, Value>,
    usage: Value,
    incomplete: bool,
}

impl Head {
    fn status(&self) -> &'static str {
        if self.incomplete {
            "incomplete"
        } else {
            "completed"
        }
    }

    fn item_status(&self) -> &'static str {
        self.status()
    }

    fn object(&self, status: &str, output: Vec<Value>, with_usage: bool) -> Value {
        let echo = |key: &str, default: Value| {
            self.request
                .get(key)
                .filter(|v| !v.is_null())
                .cloned()
                .unwrap_or(default)
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": echo("background", false.into()),
            "error": null,
            "incomplete_details": if self.incomplete && status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "instructions": echo("instructions", Value::Null),
            "max_output_tokens": echo("max_output_tokens", Value::Null),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": echo("parallel_tool_calls", true.into()),
            "previous_response_id": echo("previous_response_id", Value::Null),
            "store": echo("store", true.into()),
            "temperature": echo("temperature", 1.0.into()),
            "text": echo("text", json!({"format": {"type": "text"}})),
            "tool_choice": echo("tool_choice", "auto".into()),
            "tools": echo("tools", json!([])),
            "top_p": echo("top_p", 1.0.into()),
            "truncation": echo("truncation", "disabled".into()),
            "usage": if with_usage { self.usage.clone() } else { Value::Null },
            "metadata": echo("metadata", json!({})),
            // Deliberately unknown to clients: parsers must ignore fields they don't know.
            "x_mock": true,
        })
    }
}

/// Typed events, each `event: <type>` with the type and sequence number in
/// its data.
struct Events {
    seq: u64,
    out: Vec<Bytes>,
}

impl Events {
    fn push(&mut self, kind: &str, mut data: Value) {
        if let Value::Object(map) = &mut data {
            map.insert("type".into(), kind.into());
            map.insert("sequence_number".into(), self.seq.into());
        }
        self.seq += 1;
        self.out
            .push(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")));
    }
}

/// The event sequence of one answer, its content in `chunks` pieces; the
/// mid-stream error for `stream_error_after_chunks` is `response.failed`.
fn events(head: &Head, item: &Item, chunks: usize) -> Stream {
    let mut e = Events {
        seq: 0,
        out: Vec::new(),
    };
    for kind in ["response.created", "response.in_progress"] {
        e.push(
            kind,
            json!({"response": head.object("in_progress", Vec::new(), false)}),
        );
    }
    let id = item.id().to_owned();
    e.push(
        "response.output_item.added",
        json!({"output_index": 0, "item": item.with("", "in_progress")}),
    );
    let text = matches!(item, Item::Text { .. });
    if text {
        e.push(
            "response.content_part.added",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "part": output_text("")}),
        );
    }
    let mut breaks = vec![e.out.len()];
    for piece in gen::split_pieces(item.content(), chunks.max(1)) {
        if text {
            e.push(
                "response.output_text.delta",
                json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []}),
            );
        } else {
            e.push(
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": 0, "delta": piece}),
            );
        }
        breaks.push(e.out.len());
    }
    let content = item.content();
    if text {
        e.push(
            "response.output_text.done",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "text": content, "logprobs": []}),
        );
        e.push(
            "response.content_part.done",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "part": output_text(content)}),
        );
    } else {
        e.push(
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": 0, "arguments": content}),
        );
    }
    let done = item.done(head.item_status());
    e.push(
        "response.output_item.done",
        json!({"output_index": 0, "item": done.clone()}),
    );
    let last = if head.incomplete {
        "response.incomplete"
    } else {
        "response.completed"
    };
    e.push(
        last,
        json!({"response": head.object(head.status(), vec![done], true)}),
    );
    Stream {
        content_type: SSE,
        events: e.out,
        breaks,
        error: [STREAM_ERROR; 2],
    }
}

/// What OpenAI sends when a Responses stream fails after the 200.
const STREAM_ERROR: &[u8] = b"event: response.failed\ndata: {\"type\":\"response.failed\",\"sequence_number\":999,\"response\":{\"id\":\"resp_failed\",\"object\":\"response\",\"status\":\"failed\",\"output\":[],\"error\":{\"code\":\"server_error\",\"message\":\"The server had an error while processing your request. Sorry about that!\"}}}\n\n";
