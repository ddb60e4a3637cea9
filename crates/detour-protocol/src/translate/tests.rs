//! Tests for the translators: golden fixtures (data-driven, from
//! `tests/fixtures/translate/cases.txt`), round-trip and no-panic property
//! tests, and focused cases.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::{anthropic, gemini, openai, StreamDecoder, StreamEncoder, TranslateError};
use crate::chat::{
    ChatRequest, ErrorKind, FinishReason, Format, Message, Part, Role, StreamEvent, ToolCall,
    ToolResult, Usage,
};
use crate::sse::data_payloads;

const MODEL: &str = "upstream-model";
const DEFAULT_MAX_TOKENS: u64 = 4096;
const CREATED: u64 = 1_700_000_000;

// ---------------------------------------------------------------------------
// Golden fixtures

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/translate")
}

fn format_named(word: &str) -> Format {
    match word {
        "openai" => Format::OpenAi,
        "anthropic" => Format::Anthropic,
        "gemini" => Format::Gemini,
        other => panic!("unknown format `{other}` in a fixture name"),
    }
}

fn words(name: &str) -> (Format, &str) {
    let mut it = name.split('_');
    let format = format_named(it.next().unwrap_or_default());
    (format, it.next().unwrap_or_default())
}

fn encoder(client: Format, include_usage: bool) -> StreamEncoder {
    match client {
        Format::OpenAi => StreamEncoder::OpenAi(openai::StreamEncoder::new(CREATED, include_usage)),
        Format::Anthropic => StreamEncoder::Anthropic(anthropic::StreamEncoder::new()),
        Format::Gemini => panic!("there is no Gemini-format client"),
    }
}

/// Runs a whole upstream stream through a decoder and an encoder, turning a
/// decoder failure into an error event as the relay does.
fn relay_stream(input: &[u8], upstream: Format, client: Format, include_usage: bool) -> Vec<u8> {
    let mut decoder = StreamDecoder::new(upstream);
    let mut encoder = encoder(client, include_usage);
    let mut out = BytesMut::new();
    let fail = |e: TranslateError, encoder: &mut StreamEncoder, out: &mut BytesMut| {
        let event = StreamEvent::Error {
            kind: ErrorKind::Server,
            message: e.to_string(),
        };
        encoder.encode(&event, out);
    };
    for payload in data_payloads(input) {
        match decoder.push(&payload) {
            Ok(events) => events.iter().for_each(|e| encoder.encode(e, &mut out)),
            Err(e) => {
                fail(e, &mut encoder, &mut out);
                return out.to_vec();
            }
        }
    }
    match decoder.finish() {
        Ok(events) => events.iter().for_each(|e| encoder.encode(e, &mut out)),
        Err(e) => fail(e, &mut encoder, &mut out),
    }
    out.to_vec()
}

fn translate(input_name: &str, input: &[u8], target: Format) -> Result<Vec<u8>, TranslateError> {
    let (source, kind) = words(input_name);
    Ok(match kind {
        "request" => {
            let req = match source {
                Format::OpenAi => openai::parse_request(input)?,
                Format::Anthropic => anthropic::parse_request(input)?,
                Format::Gemini => panic!("there is no Gemini-format client"),
            };
            match target {
                Format::OpenAi => {
                    openai::encode_request(&req, MODEL, &openai::RequestOptions::default())?
                }
                Format::Anthropic => anthropic::encode_request(&req, MODEL, DEFAULT_MAX_TOKENS)?,
                Format::Gemini => gemini::encode_request(&req)?,
            }
            .to_vec()
        }
        "response" => {
            let resp = match source {
                Format::OpenAi => openai::parse_response(input)?,
                Format::Anthropic => anthropic::parse_response(input)?,
                Format::Gemini => gemini::parse_response(input)?,
            };
            match target {
                Format::OpenAi => openai::encode_response(&resp, CREATED),
                Format::Anthropic => anthropic::encode_response(&resp)?,
                Format::Gemini => panic!("there is no Gemini-format client"),
            }
            .to_vec()
        }
        "stream" => relay_stream(input, source, target, true),
        "error" => {
            let info = match source {
                Format::OpenAi => openai::parse_error(input),
                Format::Anthropic => anthropic::parse_error(input),
                Format::Gemini => gemini::parse_error(input),
            }
            .expect("the fixture is an error body");
            match target {
                Format::OpenAi => crate::openai::error_body(
                    &info.message,
                    openai::error_type(info.kind),
                    None,
                    None,
                ),
                Format::Anthropic => anthropic::error_body(info.kind, &info.message),
                Format::Gemini => panic!("there is no Gemini-format client"),
            }
            .to_vec()
        }
        other => panic!("unknown kind `{other}` in {input_name}"),
    })
}

/// SSE as (event name, data) pairs, data as JSON where it is JSON.
pub(crate) fn sse_events(bytes: &[u8]) -> Vec<(Option<String>, Value)> {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = None;
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
            (name, data)
        })
        .collect()
}

pub(crate) fn pretty(name: &str, bytes: &[u8]) -> String {
    if name.ends_with(".json") {
        let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

pub(crate) fn same(name: &str, actual: &[u8], expected: &[u8]) -> bool {
    if name.ends_with(".json") {
        serde_json::from_slice::<Value>(actual).ok() == serde_json::from_slice(expected).ok()
    } else {
        sse_events(actual) == sse_events(expected)
    }
}

/// Whether `DETOUR_BLESS` asks for the golden files to be rewritten: only an
/// explicit yes (`1`, `true`, `yes`); unset, empty, `0` or `false` compare.
fn bless_requested(value: Option<&std::ffi::OsStr>) -> bool {
    value
        .and_then(|v| v.to_str())
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

#[test]
fn only_an_explicit_yes_blesses_the_golden_files() {
    use std::ffi::OsStr;
    for no in [
        None,
        Some(""),
        Some("0"),
        Some("false"),
        Some("no"),
        Some("off"),
    ] {
        assert!(!bless_requested(no.map(OsStr::new)), "{no:?}");
    }
    for yes in ["1", "true", "TRUE", "yes"] {
        assert!(bless_requested(Some(OsStr::new(yes))), "{yes}");
    }
}

/// Every case in `cases.txt`. Set `DETOUR_BLESS=1` to (re)write expected
/// files from the current output, then review the diff.
#[test]
fn golden_fixtures() {
    let dir = fixtures();
    let bless = bless_requested(std::env::var_os("DETOUR_BLESS").as_deref());
    let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
    let mut failures = Vec::new();
    let mut count = 0;
    for line in cases.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        count += 1;
        let (input_name, expected) = line.split_once(" -> ").unwrap();
        let input =
            std::fs::read(dir.join(input_name)).unwrap_or_else(|e| panic!("{input_name}: {e}"));
        if let Some(rest) = expected.strip_prefix("error(") {
            let (target, message) = rest.split_once("): ").unwrap();
            match translate(input_name, &input, format_named(target)) {
                Err(e) if e.to_string() == message => {}
                Err(e) => failures.push(format!("{line}\n  got error: {e}")),
                Ok(out) => {
                    failures.push(format!("{line}\n  got: {}", String::from_utf8_lossy(&out)))
                }
            }
            continue;
        }
        let (target, _) = words(expected);
        let actual = match translate(input_name, &input, target) {
            Ok(out) => out,
            Err(e) => {
                failures.push(format!("{line}\n  failed: {e}"));
                continue;
            }
        };
        let path = dir.join(expected);
        let want = std::fs::read(&path).unwrap_or_default();
        if !same(expected, &actual, &want) {
            if bless {
                std::fs::write(&path, pretty(expected, &actual)).unwrap();
            } else {
                failures.push(format!("{line}\n  got:\n{}", pretty(expected, &actual)));
            }
        }
    }
    assert!(count >= 30, "cases.txt lost its cases");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------
// Round trip: OpenAI → IR → OpenAI keeps the request's meaning

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ,.!?\"\\\\\n{}:é]{0,16}"
}

fn text_parts() -> impl Strategy<Value = Value> {
    prop::collection::vec(text(), 1..3).prop_map(|ts| {
        Value::Array(
            ts.into_iter()
                .map(|t| json!({"type": "text", "text": t}))
                .collect(),
        )
    })
}

fn text_content() -> impl Strategy<Value = Value> {
    prop_oneof![text().prop_map(Value::String), text_parts()]
}

fn arguments() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        prop::collection::btree_map("[a-z]{1,6}", text(), 0..3)
            .prop_map(|m| serde_json::to_string(&m).unwrap()),
    ]
}

fn tool_call() -> impl Strategy<Value = Value> {
    ("call_[a-zA-Z0-9]{1,8}", "[a-z_]{1,10}", arguments()).prop_map(|(id, name, args)| {
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
    })
}

fn user_part() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(|t| json!({"type": "text", "text": t})),
        (
            prop_oneof![
                Just("data:image/png;base64,iVBORw0KGgo=".to_owned()),
                "https://example\\.com/[a-z]{1,8}\\.jpg",
            ],
            prop::option::of(prop_oneof![Just("low"), Just("high"), Just("auto")]),
        )
            .prop_map(|(url, detail)| {
                let mut image = json!({"url": url});
                if let Some(d) = detail {
                    image["detail"] = d.into();
                }
                json!({"type": "image_url", "image_url": image})
            }),
        Just(json!({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})),
    ]
}

fn with_name(mut m: Value, name: Option<String>) -> Value {
    if let Some(n) = name {
        m["name"] = n.into();
    }
    m
}

fn message() -> impl Strategy<Value = Value> {
    let name = || prop::option::of("[a-z]{1,6}");
    prop_oneof![
        (
            prop_oneof![Just("system"), Just("developer")],
            text_content(),
            name()
        )
            .prop_map(|(role, c, n)| with_name(json!({"role": role, "content": c}), n)),
        (
            prop_oneof![
                text().prop_map(Value::String),
                prop::collection::vec(user_part(), 1..4).prop_map(Value::Array),
            ],
            name()
        )
            .prop_map(|(c, n)| with_name(json!({"role": "user", "content": c}), n)),
        (
            prop::option::of(text_content()),
            prop::collection::vec(tool_call(), 0..3),
            name()
        )
            .prop_map(|(c, calls, n)| {
                let mut m = json!({"role": "assistant"});
                match (c, calls.is_empty()) {
                    (Some(c), _) => m["content"] = c,
                    (None, true) => m["content"] = "".into(),
                    (None, false) => {}
                }
                if !calls.is_empty() {
                    m["tool_calls"] = Value::Array(calls);
                }
                with_name(m, n)
            }),
        ("call_[a-zA-Z0-9]{1,8}", text_content())
            .prop_map(|(id, c)| { json!({"role": "tool", "tool_call_id": id, "content": c}) }),
    ]
}

fn float(max: u32) -> impl Strategy<Value = f64> {
    (0..=max).prop_map(|x| f64::from(x) / 100.0)
}

fn tool() -> impl Strategy<Value = Value> {
    (
        "[a-z_]{1,10}",
        prop::option::of(text()),
        prop::option::of(Just(
            json!({"type": "object", "properties": {"x": {"type": "string"}}}),
        )),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(name, description, parameters, strict)| {
            let mut f = json!({"name": name});
            if let Some(d) = description {
                f["description"] = d.into();
            }
            if let Some(p) = parameters {
                f["parameters"] = p;
            }
            if let Some(s) = strict {
                f["strict"] = s.into();
            }
            json!({"type": "function", "function": f})
        })
}

prop_compose! {
    fn openai_request()(
        messages in prop::collection::vec(message(), 1..6),
        max in prop::option::of((any::<bool>(), 1u64..100_000)),
        temperature in prop::option::of(float(200)),
        top_p in prop::option::of(float(100)),
        n in prop::option::of(1u32..4),
        stop in prop::option::of(prop_oneof![
            text().prop_map(Value::String),
            prop::collection::vec(text(), 1..4).prop_map(|v| json!(v)),
        ]),
        seed in prop::option::of(any::<i64>()),
        penalties in (prop::option::of(float(200)), prop::option::of(float(200))),
        tools in prop::collection::vec(tool(), 0..3),
        tool_choice in prop::option::of(prop_oneof![
            Just(json!("auto")), Just(json!("none")), Just(json!("required")),
            "[a-z_]{1,10}".prop_map(|n| json!({"type": "function", "function": {"name": n}})),
        ]),
        parallel in prop::option::of(any::<bool>()),
        response_format in prop::option::of(prop_oneof![
            Just(json!({"type": "text"})),
            Just(json!({"type": "json_object"})),
            (prop::option::of(any::<bool>()), prop::option::of(text())).prop_map(|(strict, d)| {
                let mut s = json!({"name": "out", "schema": {"type": "object"}});
                if let Some(strict) = strict { s["strict"] = strict.into(); }
                if let Some(d) = d { s["description"] = d.into(); }
                json!({"type": "json_schema", "json_schema": s})
            }),
        ]),
        user in prop::option::of("[a-z0-9-]{1,12}"),
        stream in prop::option::of((any::<bool>(), prop::option::of(any::<bool>()))),
        extras in (prop::option::of(any::<bool>()), prop::option::of(any::<i32>())),
    ) -> Value {
        let mut r = json!({"model": "fast", "messages": messages});
        if let Some((legacy, m)) = max {
            r[if legacy { "max_tokens" } else { "max_completion_tokens" }] = m.into();
        }
        if let Some(t) = temperature { r["temperature"] = t.into(); }
        if let Some(p) = top_p { r["top_p"] = p.into(); }
        if let Some(n) = n { r["n"] = n.into(); }
        if let Some(s) = stop { r["stop"] = s; }
        if let Some(s) = seed { r["seed"] = s.into(); }
        if let Some(p) = penalties.0 { r["frequency_penalty"] = p.into(); }
        if let Some(p) = penalties.1 { r["presence_penalty"] = p.into(); }
        if !tools.is_empty() { r["tools"] = Value::Array(tools); }
        if let Some(c) = tool_choice { r["tool_choice"] = c; }
        if let Some(p) = parallel { r["parallel_tool_calls"] = p.into(); }
        if let Some(f) = response_format { r["response_format"] = f; }
        if let Some(u) = user { r["user"] = u.into(); }
        if let Some((s, usage)) = stream {
            r["stream"] = s.into();
            if let Some(u) = usage { r["stream_options"] = json!({"include_usage": u}); }
        }
        if let Some(l) = extras.0 { r["logprobs"] = l.into(); }
        if let Some(x) = extras.1 { r["x_vendor"] = json!({"k": x}); }
        r
    }
}

/// Spellings that mean the same to OpenAI, reduced to one.
fn normalise(mut r: Value) -> Value {
    let Some(obj) = r.as_object_mut() else {
        return r;
    };
    if let Some(m) = obj.remove("max_tokens") {
        obj.entry("max_completion_tokens").or_insert(m);
    }
    if let Some(Value::String(s)) = obj.get("stop").cloned() {
        obj.insert("stop".into(), json!([s]));
    }
    let streaming = obj.get("stream") == Some(&json!(true));
    if !streaming {
        obj.remove("stream");
        obj.remove("stream_options");
    } else if obj.get("stream_options") == Some(&json!({"include_usage": false})) {
        obj.remove("stream_options");
    }
    if let Some(Value::Array(messages)) = obj.get_mut("messages") {
        for m in messages {
            if m["role"] == "developer" {
                m["role"] = "system".into();
            }
            if let Some(Value::Array(parts)) = m.get("content") {
                if let [p] = parts.as_slice() {
                    if p["type"] == "text" {
                        m["content"] = p["text"].clone();
                    }
                }
            }
            if m["role"] == "assistant" && m.get("content").is_none() {
                m["content"] = Value::Null;
            }
        }
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn openai_request_survives_a_round_trip(req in openai_request()) {
        let body = serde_json::to_vec(&req).unwrap();
        let ir = openai::parse_request(&body).unwrap();
        let out = openai::encode_request(&ir, "fast", &openai::RequestOptions::default()).unwrap();
        let back: Value = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(normalise(back), normalise(req));
    }
}

// ---------------------------------------------------------------------------
// No input panics any parser, decoder or encoder

const KEYS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "tool_calls",
    "id",
    "function",
    "name",
    "arguments",
    "tool_call_id",
    "image_url",
    "url",
    "detail",
    "input_audio",
    "data",
    "format",
    "tools",
    "tool_choice",
    "parameters",
    "response_format",
    "json_schema",
    "schema",
    "stop",
    "n",
    "max_tokens",
    "stream",
    "stream_options",
    "include_usage",
    "system",
    "source",
    "media_type",
    "input",
    "tool_use_id",
    "is_error",
    "choices",
    "delta",
    "index",
    "finish_reason",
    "usage",
    "prompt_tokens",
    "error",
    "message",
    "candidates",
    "parts",
    "functionCall",
    "args",
    "finishReason",
    "usageMetadata",
    "content_block",
    "partial_json",
    "stop_reason",
    "promptFeedback",
    "blockReason",
    "thought",
    "thoughtSignature",
    "status",
    "code",
    "details",
    "user",
    "metadata",
    "user_id",
    "output_config",
    "seed",
    "temperature",
    "disable_parallel_tool_use",
    "input_schema",
    "refusal",
    "responseId",
    "object",
    "logprobs",
];

const WORDS: &[&str] = &[
    "user",
    "assistant",
    "system",
    "tool",
    "developer",
    "function",
    "text",
    "image_url",
    "image",
    "tool_use",
    "tool_result",
    "thinking",
    "base64",
    "url",
    "auto",
    "none",
    "required",
    "any",
    "json_schema",
    "json_object",
    "message_start",
    "content_block_start",
    "content_block_delta",
    "text_delta",
    "input_json_delta",
    "message_delta",
    "message_stop",
    "error",
    "ping",
    "STOP",
    "MAX_TOKENS",
    "SAFETY",
    "RESOURCE_EXHAUSTED",
    "tool_calls",
    "length",
    "data:image/png;base64,AA",
    "[DONE]",
    "",
    "{}",
    "{\"a\":1}",
    "[1]",
    "\n",
    "call_1",
];

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..7).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

fn encode_everywhere(req: &ChatRequest) {
    let _ = openai::encode_request(req, MODEL, &openai::RequestOptions::default());
    let _ = openai::encode_request(
        req,
        MODEL,
        &openai::RequestOptions {
            legacy_max_tokens: true,
            top_k: true,
        },
    );
    let _ = anthropic::encode_request(req, MODEL, DEFAULT_MAX_TOKENS);
    let _ = gemini::encode_request(req);
}

fn parse_everything(body: &[u8]) {
    for req in [openai::parse_request(body), anthropic::parse_request(body)]
        .into_iter()
        .flatten()
    {
        encode_everywhere(&req);
    }
    for resp in [
        openai::parse_response(body),
        anthropic::parse_response(body),
        gemini::parse_response(body),
    ]
    .into_iter()
    .flatten()
    {
        let _ = openai::encode_response(&resp, CREATED);
        let _ = anthropic::encode_response(&resp);
    }
    let _ = openai::parse_error(body);
    let _ = anthropic::parse_error(body);
    let _ = gemini::parse_error(body);
}

/// Feeds payloads to every decoder and every decoder's events to every encoder.
fn decode_everything(payloads: &[Vec<u8>]) {
    for upstream in [Format::OpenAi, Format::Anthropic, Format::Gemini] {
        let mut decoder = StreamDecoder::new(upstream);
        let mut encoders = [
            encoder(Format::OpenAi, true),
            encoder(Format::Anthropic, true),
        ];
        let mut out = BytesMut::new();
        let mut results: Vec<_> = payloads.iter().map(|p| decoder.push(p)).collect();
        results.push(decoder.finish());
        for events in results.into_iter().flatten() {
            for e in &events {
                encoders.iter_mut().for_each(|enc| enc.encode(e, &mut out));
            }
        }
    }
}

fn stream_event() -> impl Strategy<Value = StreamEvent> {
    let reason = prop_oneof![
        Just(FinishReason::Stop),
        Just(FinishReason::Length),
        Just(FinishReason::ToolCalls),
        Just(FinishReason::ContentFilter),
        prop::option::of("\\PC{0,4}").prop_map(FinishReason::StopSequence),
    ];
    prop_oneof![
        ("\\PC{0,6}", "\\PC{0,6}").prop_map(|(id, model)| StreamEvent::Start { id, model }),
        "\\PC{0,8}".prop_map(StreamEvent::TextDelta),
        (0usize..4, "\\PC{0,6}", "\\PC{0,6}").prop_map(|(index, id, name)| {
            StreamEvent::ToolCallStart {
                index,
                id,
                name,
                signature: None,
            }
        }),
        (0usize..4, "\\PC{0,8}")
            .prop_map(|(index, fragment)| StreamEvent::ToolCallArgsDelta { index, fragment }),
        reason.prop_map(|reason| StreamEvent::Finish { reason }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| StreamEvent::Usage(
            Usage {
                input: a,
                output: b,
                cached_input: c,
                cache_write_input: c / 2,
                total: a.wrapping_add(b),
            }
        )),
        "\\PC{0,8}".prop_map(|message| StreamEvent::Error {
            kind: ErrorKind::Overloaded,
            message
        }),
        Just(StreamEvent::Done),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        parse_everything(&body);
        decode_everything(&[body]);
    }

    #[test]
    fn arbitrary_json_never_panics(v in arbitrary_json()) {
        parse_everything(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn arbitrary_json_requests_never_panic(
        messages in prop::collection::vec(arbitrary_json(), 0..4),
        rest in arbitrary_json(),
    ) {
        // Start from a valid skeleton so parsing gets past the first checks.
        for skeleton in [
            json!({"model": "m", "messages": messages.clone()}),
            json!({"model": "m", "max_tokens": 5, "messages": messages.clone()}),
        ] {
            let mut body = skeleton;
            if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), &rest) {
                for (k, v) in extra {
                    if k != "messages" {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
            parse_everything(&serde_json::to_vec(&body).unwrap());
        }
    }

    #[test]
    fn arbitrary_stream_payloads_never_panic(chunks in prop::collection::vec(arbitrary_json(), 0..8)) {
        let payloads: Vec<Vec<u8>> =
            chunks.iter().map(|c| serde_json::to_vec(c).unwrap()).collect();
        decode_everything(&payloads);
    }

    /// Whatever events arrive, each encoder writes a stream its own
    /// format's decoder reads without complaint.
    #[test]
    fn encoders_write_well_formed_streams(events in prop::collection::vec(stream_event(), 0..12)) {
        for client in [Format::OpenAi, Format::Anthropic] {
            let mut enc = encoder(client, true);
            let mut out = BytesMut::new();
            events.iter().for_each(|e| enc.encode(e, &mut out));
            let mut dec = StreamDecoder::new(client);
            for payload in data_payloads(&out) {
                prop_assert!(dec.push(&payload).is_ok(), "{client}: {}", String::from_utf8_lossy(&payload));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tool-call argument fragments survive every hop

/// Splits `s` at the given char positions.
fn split_at_chars(s: &str, cuts: &[usize]) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (chars.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain(std::iter::once(chars.len())) {
        out.push(chars[start..cut].iter().collect());
        start = cut;
    }
    out
}

fn openai_chunk(delta: Value, finish: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    }))
    .unwrap()
}

/// Runs events through an encoder and that format's decoder.
fn hop(events: &[StreamEvent], client: Format) -> Vec<StreamEvent> {
    let mut enc = encoder(client, true);
    let mut out = BytesMut::new();
    events.iter().for_each(|e| enc.encode(e, &mut out));
    let mut dec = StreamDecoder::new(client);
    let mut back = Vec::new();
    for payload in data_payloads(&out) {
        back.extend(dec.push(&payload).unwrap());
    }
    back
}

fn arguments_by_call(events: &[StreamEvent]) -> Vec<String> {
    let mut calls: Vec<String> = Vec::new();
    for e in events {
        match e {
            StreamEvent::ToolCallStart { index, .. } => {
                calls.resize(calls.len().max(index + 1), String::new());
            }
            StreamEvent::ToolCallArgsDelta { index, fragment } => {
                calls.resize(calls.len().max(index + 1), String::new());
                calls[*index].push_str(fragment);
            }
            _ => {}
        }
    }
    calls
}

proptest! {
    #[test]
    fn argument_fragments_concatenate_to_the_arguments(
        args in prop::collection::vec("\\PC{0,24}", 1..3),
        cuts in prop::collection::vec(prop::collection::vec(any::<usize>(), 0..5), 3),
        text in "\\PC{0,8}",
    ) {
        // An OpenAI upstream stream: text, then each call in fragments.
        let mut payloads = vec![
            openai_chunk(json!({"role": "assistant", "content": ""}), None),
            openai_chunk(json!({"content": text}), None),
        ];
        for (i, a) in args.iter().enumerate() {
            payloads.push(openai_chunk(json!({"tool_calls": [{
                "index": i, "id": format!("call_{i}"), "type": "function",
                "function": {"name": "f", "arguments": ""},
            }]}), None));
            for fragment in split_at_chars(a, &cuts[i]) {
                payloads.push(openai_chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]}),
                    None,
                ));
            }
        }
        payloads.push(openai_chunk(json!({}), Some("tool_calls")));
        payloads.push(b"[DONE]".to_vec());

        let mut decoder = StreamDecoder::new(Format::OpenAi);
        let mut events = Vec::new();
        for p in &payloads {
            events.extend(decoder.push(p).unwrap());
        }
        prop_assert_eq!(&arguments_by_call(&events), &args);
        // OpenAI upstream → Anthropic client → (as upstream) → OpenAI client.
        let via_anthropic = hop(&events, Format::Anthropic);
        prop_assert_eq!(&arguments_by_call(&via_anthropic), &args);
        let via_openai = hop(&via_anthropic, Format::OpenAi);
        prop_assert_eq!(&arguments_by_call(&via_openai), &args);
    }
}

// ---------------------------------------------------------------------------
// Focused cases

fn request(body: Value) -> ChatRequest {
    openai::parse_request(&serde_json::to_vec(&body).unwrap()).unwrap()
}

fn invalid_param(result: Result<ChatRequest, TranslateError>) -> Option<String> {
    match result {
        Err(TranslateError::Invalid(e)) => e.param,
        other => panic!("expected an invalid request, got {other:?}"),
    }
}

#[test]
fn request_errors_name_the_field() {
    let parse = |v: Value| openai::parse_request(&serde_json::to_vec(&v).unwrap());
    assert_eq!(
        invalid_param(parse(json!({"model": "m", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]},
        ]}))),
        Some("messages[1].content[0].image_url.url".to_owned())
    );
    assert_eq!(
        invalid_param(parse(
            json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]})
        )),
        Some("messages[0].tool_call_id".to_owned())
    );
    assert_eq!(
        invalid_param(parse(
            json!({"model": "m", "messages": [{"role": "function", "name": "f", "content": "x"}]})
        )),
        Some("messages[0].role".to_owned())
    );
    assert_eq!(
        invalid_param(parse(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"})
        )),
        Some("temperature".to_owned())
    );
    assert_eq!(
        invalid_param(parse(json!({"messages": []}))),
        Some("model".to_owned())
    );
    let anthropic = |v: Value| anthropic::parse_request(&serde_json::to_vec(&v).unwrap());
    assert_eq!(
        invalid_param(anthropic(
            json!({"model": "m", "max_tokens": 1, "messages": [
                {"role": "user", "content": [{"type": "tool_result", "content": "x"}]},
            ]})
        )),
        Some("messages[0].content[0].tool_use_id".to_owned())
    );
    assert!(matches!(
        openai::parse_request(b"{\"model\":"),
        Err(TranslateError::Invalid(e)) if e.message.contains("not valid JSON")
    ));
}

#[test]
fn anthropic_clients_always_get_usage_upstream() {
    let req = anthropic::parse_request(
        br#"{"model":"m","max_tokens":10,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap();
    let body = openai::encode_request(&req, MODEL, &openai::RequestOptions::default()).unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["stream_options"], json!({"include_usage": true}));
    assert_eq!(v["max_completion_tokens"], json!(10));
    let legacy = openai::RequestOptions {
        legacy_max_tokens: true,
        top_k: false,
    };
    let v: Value =
        serde_json::from_slice(&openai::encode_request(&req, MODEL, &legacy).unwrap()).unwrap();
    assert_eq!(v["max_tokens"], json!(10));
}

#[test]
fn anthropic_gets_a_default_max_tokens() {
    let req = request(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    let v: Value =
        serde_json::from_slice(&anthropic::encode_request(&req, MODEL, 777).unwrap()).unwrap();
    assert_eq!(v["max_tokens"], json!(777));
    assert_eq!(v["messages"], json!([{"role": "user", "content": "hi"}]));
}

#[test]
fn gemini_needs_the_call_for_a_tool_result() {
    let mut req = ChatRequest::new(Format::OpenAi, "m");
    req.messages.push(Message::new(
        Role::Tool,
        vec![Part::ToolResult(ToolResult {
            call_id: "call_lost".into(),
            name: None,
            content: vec![Part::Text("1".into())],
            is_error: false,
        })],
    ));
    assert_eq!(
        gemini::encode_request(&req).unwrap_err().to_string(),
        "a tool result for call `call_lost`, which is not in the history cannot be translated to Gemini"
    );
    // A result that names its tool needs no lookup.
    if let Some(Part::ToolResult(r)) = req.messages[0].content.first_mut() {
        r.name = Some("clock".into());
    }
    let v: Value = serde_json::from_slice(&gemini::encode_request(&req).unwrap()).unwrap();
    assert_eq!(
        v["contents"][0]["parts"][0]["functionResponse"],
        json!({"name": "clock", "response": {"output": 1}})
    );
}

#[test]
fn gemini_keeps_signatures_and_fills_missing_ones() {
    let call = |id: &str, signature: Option<&str>| {
        Part::ToolCall(ToolCall {
            id: id.into(),
            name: "f".into(),
            arguments: "{}".into(),
            signature: signature.map(Into::into),
        })
    };
    let mut req = ChatRequest::new(Format::OpenAi, "m");
    req.messages
        .push(Message::new(Role::User, vec![Part::Text("go".into())]));
    req.messages.push(Message::new(
        Role::Assistant,
        vec![call("a", None), call("b", Some("sig-b"))],
    ));
    req.messages
        .push(Message::new(Role::User, vec![Part::Text("again".into())]));
    req.messages.push(Message::new(
        Role::Assistant,
        vec![call("c", None), call("d", None)],
    ));
    let v: Value = serde_json::from_slice(&gemini::encode_request(&req).unwrap()).unwrap();
    let sig =
        |turn: usize, part: usize| v["contents"][turn]["parts"][part]["thoughtSignature"].clone();
    assert_eq!((sig(1, 0), sig(1, 1)), (Value::Null, json!("sig-b")));
    assert_eq!(
        (sig(3, 0), sig(3, 1)),
        (json!(gemini::SKIP_SIGNATURE), Value::Null)
    );
}

#[test]
fn error_kinds_map_both_ways() {
    for kind in [
        ErrorKind::InvalidRequest,
        ErrorKind::Authentication,
        ErrorKind::Permission,
        ErrorKind::NotFound,
        ErrorKind::RequestTooLarge,
        ErrorKind::RateLimit,
        ErrorKind::Server,
        ErrorKind::Overloaded,
        ErrorKind::Timeout,
    ] {
        assert_eq!(anthropic::error_kind(anthropic::error_type(kind)), kind);
        assert_eq!(ErrorKind::from_status(anthropic::error_status(kind)), kind);
        let info = anthropic::parse_error(&anthropic::error_body(kind, "m")).unwrap();
        assert_eq!((info.kind, info.message.as_str()), (kind, "m"));
    }
    assert_eq!(anthropic::error_status(ErrorKind::Overloaded), 529);
    assert_eq!(ErrorKind::from_status(502), ErrorKind::Server);
    assert_eq!(ErrorKind::from_status(422), ErrorKind::InvalidRequest);
    let event = anthropic::error_event(ErrorKind::Overloaded, "Overloaded");
    let text = std::str::from_utf8(&event).unwrap();
    assert!(text.starts_with("event: error\ndata: {") && text.ends_with("}\n\n"));
    assert_eq!(
        sse_events(&event),
        vec![(
            Some("error".to_owned()),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        )]
    );
}

#[test]
fn provider_error_bodies_are_read() {
    let gemini_429 = std::fs::read(fixtures().join("gemini_error_429.json")).unwrap();
    let info = gemini::parse_error(&gemini_429).unwrap();
    assert_eq!(info.kind, ErrorKind::RateLimit);
    assert_eq!(info.retry_after, Some(Duration::from_secs(15)));
    let bad_key = br#"[{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}]"#;
    assert_eq!(
        gemini::parse_error(bad_key).unwrap().kind,
        ErrorKind::Authentication
    );
    let vllm =
        br#"{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}"#;
    assert_eq!(
        openai::parse_error(vllm).unwrap().kind,
        ErrorKind::InvalidRequest
    );
    let llama = br#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#;
    assert_eq!(
        openai::parse_error(llama).unwrap().kind,
        ErrorKind::Overloaded
    );
    let quota = br#"{"error":{"message":"quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    assert_eq!(
        openai::parse_error(quota).unwrap().kind,
        ErrorKind::RateLimit
    );
    assert_eq!(gemini::parse_error(b"not json"), None);
}

#[test]
fn openai_stream_framing_and_usage_opt_in() {
    let events = [
        StreamEvent::Start {
            id: "x".into(),
            model: "m".into(),
        },
        StreamEvent::TextDelta("hi".into()),
        StreamEvent::Finish {
            reason: FinishReason::Stop,
        },
        StreamEvent::Usage(Usage {
            input: 3,
            output: 1,
            cached_input: 0,
            cache_write_input: 0,
            total: 4,
        }),
        StreamEvent::Done,
    ];
    for include_usage in [false, true] {
        let mut enc = openai::StreamEncoder::new(CREATED, include_usage);
        let mut out = BytesMut::new();
        events.iter().for_each(|e| enc.encode(e, &mut out));
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("data: {"), "{text}");
        assert!(text.ends_with("}\n\ndata: [DONE]\n\n"), "{text}");
        assert_eq!(text.matches("\n\n").count(), 4 + usize::from(include_usage));
        assert_eq!(text.contains("\"usage\""), include_usage, "{text}");
        // Nothing after the end.
        let mut more = BytesMut::new();
        enc.encode(&StreamEvent::TextDelta("late".into()), &mut more);
        assert!(more.is_empty());
    }
}

#[test]
fn anthropic_message_start_carries_input_usage_when_known() {
    let mut enc = anthropic::StreamEncoder::new();
    let mut out = BytesMut::new();
    for e in [
        StreamEvent::Start {
            id: "msg".into(),
            model: "m".into(),
        },
        StreamEvent::Usage(Usage {
            input: 50,
            output: 1,
            cached_input: 20,
            cache_write_input: 0,
            total: 51,
        }),
        StreamEvent::TextDelta("x".into()),
    ] {
        enc.encode(&e, &mut out);
    }
    let events = sse_events(&out);
    assert_eq!(events[0].0.as_deref(), Some("message_start"));
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], json!(30));
    assert_eq!(
        events[0].1["message"]["usage"]["cache_read_input_tokens"],
        json!(20)
    );
    assert!(String::from_utf8(out.to_vec())
        .unwrap()
        .starts_with("event: message_start\ndata: {"));
}

#[test]
fn cut_streams_are_errors() {
    let mut d = StreamDecoder::new(Format::OpenAi);
    d.push(&openai_chunk(json!({"content": "par"}), None))
        .unwrap();
    assert!(d.finish().is_err());

    let mut d = StreamDecoder::new(Format::Anthropic);
    d.push(
        br#"{"type":"message_start","message":{"id":"m","model":"c","usage":{"input_tokens":1}}}"#,
    )
    .unwrap();
    assert!(d.finish().is_err());

    // A server that ends after its finish reason without `[DONE]` is done.
    let mut d = StreamDecoder::new(Format::OpenAi);
    d.push(&openai_chunk(json!({}), Some("stop"))).unwrap();
    assert_eq!(d.finish().unwrap(), vec![StreamEvent::Done]);
    // After the end, input is ignored.
    assert!(d.push(b"garbage").unwrap().is_empty());
}

#[test]
fn more_than_one_choice_in_a_stream_is_refused() {
    let mut d = StreamDecoder::new(Format::OpenAi);
    let chunk =
        br#"{"id":"x","choices":[{"index":1,"delta":{"content":"b"},"finish_reason":null}]}"#;
    assert!(matches!(
        d.push(chunk),
        Err(TranslateError::Upstream { .. })
    ));
    let mut req = request(
        json!({"model": "m", "n": 2, "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    );
    assert!(gemini::encode_request(&req).is_err());
    req.stream = false;
    let v: Value = serde_json::from_slice(&gemini::encode_request(&req).unwrap()).unwrap();
    assert_eq!(v["generationConfig"]["candidateCount"], json!(2));
}

#[test]
fn same_format_targets_get_extras_verbatim() {
    let req = request(json!({
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f1"}}]}],
        "logprobs": true,
        "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
    }));
    let v: Value = serde_json::from_slice(
        &openai::encode_request(&req, MODEL, &openai::RequestOptions::default()).unwrap(),
    )
    .unwrap();
    assert_eq!(v["logprobs"], json!(true));
    assert_eq!(v["tool_choice"]["type"], json!("allowed_tools"));
    assert_eq!(
        v["messages"][0]["content"][0]["file"]["file_id"],
        json!("f1")
    );
    assert_eq!(
        anthropic::encode_request(&req, MODEL, 1)
            .unwrap_err()
            .to_string(),
        "OpenAI content part `file` cannot be translated to Anthropic"
    );
}
