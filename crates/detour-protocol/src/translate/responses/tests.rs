//! The Responses translator's tests: golden fixtures (data-driven, from
//! `tests/fixtures/responses/cases.txt`) and focused cases.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use serde_json::{json, Value};

use super::*;
use crate::chat::{ErrorKind, FinishReason, StreamEvent, Usage};
use crate::sse::data_payloads;
use crate::translate::tests::{pretty, same, sse_events};
use crate::translate::{anthropic, gemini, openai, StreamDecoder as AnyDecoder};

const MODEL: &str = "upstream-model";
const CREATED: u64 = 1_700_000_000;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/responses")
}

fn format_named(word: &str) -> Format {
    match word {
        "openai" => Format::OpenAi,
        "anthropic" => Format::Anthropic,
        "gemini" => Format::Gemini,
        other => panic!("unknown format `{other}`"),
    }
}

/// The source format and kind of an input fixture: its file name's first
/// two words (a path's last part).
fn words(name: &str) -> (&str, &str) {
    let file = name.rsplit('/').next().unwrap_or(name);
    let mut it = file.split('_');
    (it.next().unwrap_or_default(), it.next().unwrap_or_default())
}

/// A provider's whole stream through its decoder into the Responses encoder;
/// a decoder failure becomes an error event, as the relay does.
fn relay_stream(input: &[u8], upstream: Format, echo: Echo) -> Vec<u8> {
    let mut decoder = AnyDecoder::new(upstream);
    let mut encoder = StreamEncoder::new(echo, CREATED);
    let mut out = BytesMut::new();
    let fail = |e: TranslateError, out: &mut BytesMut, encoder: &mut StreamEncoder| {
        encoder.encode(
            &StreamEvent::Error {
                kind: ErrorKind::Server,
                message: e.to_string(),
            },
            out,
        );
    };
    for payload in data_payloads(input) {
        match decoder.push(&payload) {
            Ok(events) => events.iter().for_each(|e| encoder.encode(e, &mut out)),
            Err(e) => {
                fail(e, &mut out, &mut encoder);
                return out.to_vec();
            }
        }
    }
    match decoder.finish() {
        Ok(events) => events.iter().for_each(|e| encoder.encode(e, &mut out)),
        Err(e) => fail(e, &mut out, &mut encoder),
    }
    out.to_vec()
}

/// Runs one case: a Responses request to a target format, or a provider's
/// answer or stream to the Responses API (echoing `request`, if given).
fn run(
    input_name: &str,
    input: &[u8],
    target: &str,
    request: Option<&[u8]>,
) -> Result<Vec<u8>, TranslateError> {
    let echo = Echo::of_request(request.unwrap_or(b"{}"));
    let (source, kind) = words(input_name);
    Ok(match (source, kind) {
        ("responses", "request") => {
            let req = parse_request(input)?;
            match format_named(target) {
                Format::OpenAi => {
                    openai::encode_request(&req, MODEL, &openai::RequestOptions::default())?
                }
                Format::Anthropic => anthropic::encode_request(&req, MODEL, 4096)?,
                Format::Gemini => gemini::encode_request(&req)?,
            }
            .to_vec()
        }
        (upstream, "response") => {
            let resp = match format_named(upstream) {
                Format::OpenAi => openai::parse_response(input)?,
                Format::Anthropic => anthropic::parse_response(input)?,
                Format::Gemini => gemini::parse_response(input)?,
            };
            encode_response(&resp, &echo, CREATED).to_vec()
        }
        (upstream, "stream") => relay_stream(input, format_named(upstream), echo),
        other => panic!("unknown case {other:?} in {input_name}"),
    })
}

/// Every case in `cases.txt`. `DETOUR_BLESS=1` (re)writes the expected files
/// from the current output; review the diff.
#[test]
fn golden_fixtures() {
    let dir = fixtures();
    let bless = std::env::var("DETOUR_BLESS").is_ok_and(|v| v == "1");
    let cases = std::fs::read_to_string(dir.join("cases.txt")).unwrap();
    let mut failures = Vec::new();
    let mut count = 0;
    for line in cases.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        count += 1;
        let (lhs, expected) = line.split_once(" -> ").unwrap();
        let (input_name, request) = match lhs.split_once(" echoing ") {
            Some((input, request)) => (input, Some(std::fs::read(dir.join(request)).unwrap())),
            None => (lhs, None),
        };
        let input =
            std::fs::read(dir.join(input_name)).unwrap_or_else(|e| panic!("{input_name}: {e}"));
        if let Some(rest) = expected.strip_prefix("error(") {
            let (target, message) = rest.split_once("): ").unwrap();
            match run(input_name, &input, target, request.as_deref()) {
                Err(e) if e.to_string() == message => {}
                Err(e) => failures.push(format!("{line}\n  got error: {e}")),
                Ok(out) => failures.push(format!(
                    "{line}\n  got output: {}",
                    String::from_utf8_lossy(&out)
                )),
            }
            continue;
        }
        let target = expected.split('_').next().unwrap_or_default();
        let out = match run(input_name, &input, target, request.as_deref()) {
            Ok(out) => out,
            Err(e) => {
                failures.push(format!("{line}\n  failed: {e}"));
                continue;
            }
        };
        let path = dir.join(expected);
        if bless {
            std::fs::write(&path, pretty(expected, &out)).unwrap();
            continue;
        }
        let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{expected}: {e}"));
        if !same(expected, &out, &want) {
            failures.push(format!(
                "{line}\n--- expected\n{}\n--- actual\n{}",
                String::from_utf8_lossy(&want),
                pretty(expected, &out)
            ));
        }
    }
    assert!(count > 0, "no cases found");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------
// Focused cases

fn parse(body: Value) -> Result<ChatRequest, TranslateError> {
    parse_request(body.to_string().as_bytes())
}

#[test]
fn text_input_is_one_user_message_after_the_instructions() {
    let req = parse(json!({"model": "m", "input": "hi", "instructions": "be brief"})).unwrap();
    assert_eq!(
        req.messages,
        vec![
            Message::new(Role::System, vec![Part::Text("be brief".into())]),
            Message::new(Role::User, vec![Part::Text("hi".into())]),
        ]
    );
    assert!(req.extra.is_empty(), "{:?}", req.extra);
}

#[test]
fn function_calls_join_the_assistant_turn_they_follow() {
    let req = parse(json!({"model": "m", "input": [
        {"role": "user", "content": "weather?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"a\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
    ]}))
    .unwrap();
    assert_eq!(req.messages.len(), 4, "{:?}", req.messages);
    assert_eq!(req.messages[1].role, Role::Assistant);
    assert_eq!(req.messages[1].content.len(), 3);
    assert!(matches!(&req.messages[3].content[0], Part::ToolResult(r) if r.call_id == "c2"));
}

#[test]
fn a_call_without_a_turn_before_it_is_its_own_assistant_turn() {
    let req = parse(json!({"model": "m", "input": [
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
    ]}))
    .unwrap();
    assert_eq!(req.messages[0].role, Role::Assistant);
}

#[test]
fn stateful_features_are_named() {
    let cases = [
        (
            json!({"previous_response_id": "resp_1"}),
            Some("`previous_response_id`"),
        ),
        (json!({"conversation": "conv_1"}), Some("`conversation`")),
        (json!({"store": true}), Some("`store: true`")),
        (json!({"store": false}), None),
        (json!({}), None),
        (json!({"background": true}), Some("`background: true`")),
        (json!({"background": false}), None),
        (
            json!({"prompt": {"id": "pmpt_1"}}),
            Some("a stored `prompt`"),
        ),
        (
            json!({"input": [{"type": "item_reference", "id": "msg_1"}]}),
            Some("an `item_reference` input item"),
        ),
        (json!({"input": "text"}), None),
        (json!({"previous_response_id": null}), None),
    ];
    for (body, want) in cases {
        assert_eq!(
            stateful_feature(body.to_string().as_bytes()),
            want,
            "{body}"
        );
        let mut full = body.clone();
        full["model"] = "m".into();
        if full.get("input").is_none() {
            full["input"] = "hi".into();
        }
        match (parse(full), want) {
            (Err(TranslateError::ResponsesOnly { feature }), Some(want)) => {
                assert_eq!(feature, want)
            }
            (Ok(_), None) => {}
            (other, want) => panic!("{body}: {other:?}, wanted {want:?}"),
        }
    }
}

#[test]
fn built_in_tools_and_files_are_refused_for_translated_targets() {
    let cases = [
        (
            json!({"tools": [{"type": "web_search"}]}),
            "a tool of type `web_search`",
        ),
        (
            json!({"tool_choice": {"type": "file_search"}}),
            "`tool_choice` of type `file_search`",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            "content part of type `input_file`",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}),
            "an `input_image` by `file_id`",
        ),
        (
            json!({"input": [{"type": "web_search_call", "id": "ws"}]}),
            "input item of type `web_search_call`",
        ),
        (json!({"top_logprobs": 2}), "`top_logprobs`"),
    ];
    for (body, want) in cases {
        let mut full = body.clone();
        full["model"] = "m".into();
        if full.get("input").is_none() {
            full["input"] = "hi".into();
        }
        match parse(full) {
            Err(TranslateError::ResponsesOnly { feature }) => assert_eq!(feature, want),
            other => panic!("{body}: {other:?}"),
        }
    }
}

#[test]
fn invalid_requests_name_the_field() {
    let cases = [
        (json!({"input": "hi"}), "missing required parameter: 'model'"),
        (json!({"model": "m"}), "missing required parameter: 'input'"),
        (
            json!({"model": "m", "input": [{"role": "tool", "content": "x"}]}),
            "invalid value for 'input[0].role': expected one of 'system', 'developer', 'user', 'assistant'",
        ),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": "9"}),
            "invalid value for 'max_output_tokens': expected a non-negative integer, got a string",
        ),
    ];
    for (body, want) in cases {
        match parse(body.clone()) {
            Err(TranslateError::Invalid(e)) => assert_eq!(e.message, want, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
}

#[test]
fn the_echo_repeats_what_the_client_sent_and_defaults_the_rest() {
    let echo =
        Echo::of_request(br#"{"model":"m","input":"x","temperature":0.5,"instructions":"hi"}"#);
    let resp = crate::chat::ChatResponse {
        id: "x".into(),
        model: MODEL.into(),
        choices: Vec::new(),
        usage: None,
    };
    let v: Value = serde_json::from_slice(&encode_response(&resp, &echo, CREATED)).unwrap();
    assert_eq!(v["temperature"], 0.5);
    assert_eq!(v["instructions"], "hi");
    assert_eq!(v["top_p"], 1.0);
    assert_eq!(v["tool_choice"], "auto");
    assert_eq!(v["output"], json!([]));
    assert_eq!(v["status"], "completed");
}

fn encode_all(events: &[StreamEvent]) -> Vec<(Option<String>, Value)> {
    let mut encoder = StreamEncoder::new(Echo::of_request(b"{}"), CREATED);
    let mut out = BytesMut::new();
    for e in events {
        encoder.encode(e, &mut out);
    }
    sse_events(&out)
}

#[test]
fn every_event_is_typed_and_numbered_in_order() {
    let events = encode_all(&[
        StreamEvent::Start {
            id: "up".into(),
            model: MODEL.into(),
        },
        StreamEvent::TextDelta("Hel".into()),
        StreamEvent::TextDelta("lo".into()),
        StreamEvent::ToolCallStart {
            index: 0,
            id: "call_1".into(),
            name: "w".into(),
            signature: None,
        },
        StreamEvent::ToolCallArgsDelta {
            index: 0,
            fragment: "{}".into(),
        },
        StreamEvent::Finish {
            reason: FinishReason::ToolCalls,
        },
        StreamEvent::Usage(Usage {
            input: 3,
            output: 4,
            total: 7,
            ..Usage::default()
        }),
        StreamEvent::Done,
    ]);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(name.as_deref(), data["type"].as_str(), "{data}");
        assert_eq!(data["sequence_number"], i as u64, "{data}");
    }
    let kinds: Vec<&str> = events.iter().filter_map(|(n, _)| n.as_deref()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["usage"]["total_tokens"], 7);
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["output"][1]["arguments"], "{}");
    assert_eq!(done["id"], "resp_up");
}

#[test]
fn a_failure_after_the_start_ends_with_response_failed_and_an_error_event() {
    let events = encode_all(&[
        StreamEvent::Start {
            id: "up".into(),
            model: MODEL.into(),
        },
        StreamEvent::TextDelta("Hel".into()),
        StreamEvent::Error {
            kind: ErrorKind::Overloaded,
            message: "gone".into(),
        },
        StreamEvent::Done,
    ]);
    let tail: Vec<&str> = events
        .iter()
        .rev()
        .take(2)
        .filter_map(|(n, _)| n.as_deref())
        .collect();
    assert_eq!(
        tail,
        ["error", "response.failed"],
        "nothing after the error"
    );
    let failed = &events[events.len() - 2].1["response"];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "server_error");
    assert_eq!(failed["output"][0]["content"][0]["text"], "Hel");
    let error = &events[events.len() - 1].1;
    assert_eq!(error["message"], "gone");
    assert_eq!(error["error"]["message"], "gone", "the SDKs raise on it");
}

#[test]
fn a_length_finish_is_an_incomplete_response() {
    let events = encode_all(&[
        StreamEvent::Start {
            id: "up".into(),
            model: MODEL.into(),
        },
        StreamEvent::TextDelta("Hel".into()),
        StreamEvent::Finish {
            reason: FinishReason::Length,
        },
        StreamEvent::Done,
    ]);
    let (name, last) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("response.incomplete"));
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

fn decode(stream: &[u8]) -> Result<Vec<StreamEvent>, TranslateError> {
    let mut d = StreamDecoder::new();
    let mut all = Vec::new();
    for p in data_payloads(stream) {
        all.extend(d.push(&p)?);
    }
    all.extend(d.finish()?);
    Ok(all)
}

#[test]
fn a_providers_responses_stream_decodes_to_its_end_and_usage() {
    let stream = std::fs::read(fixtures().join("responses_stream_text_tool.sse")).unwrap();
    let events = decode(&stream).unwrap();
    assert!(matches!(events.first(), Some(StreamEvent::Start { .. })));
    assert_eq!(events.last(), Some(&StreamEvent::Done));
    assert!(events.contains(&StreamEvent::ToolCallArgsDelta {
        index: 0,
        fragment: "{\"city\":".into()
    }));
    let usage = events.iter().find_map(|e| match e {
        StreamEvent::Usage(u) => Some(*u),
        _ => None,
    });
    assert_eq!(usage.map(|u| u.total), Some(30));
}

#[test]
fn a_responses_stream_cut_short_or_failed_is_not_whole() {
    let stream = std::fs::read(fixtures().join("responses_stream_text_tool.sse")).unwrap();
    let text = String::from_utf8_lossy(&stream);
    let cut = text.split("event: response.completed").next().unwrap();
    assert!(decode(cut.as_bytes()).is_err());
    let failed = format!(
        "{cut}event: response.failed\ndata: {}\n\n",
        json!({"type": "response.failed", "sequence_number": 99, "response": {"error": {"code": "rate_limit_exceeded", "message": "slow down"}}})
    );
    let events = decode(failed.as_bytes()).unwrap();
    assert_eq!(
        events.last(),
        Some(&StreamEvent::Error {
            kind: ErrorKind::RateLimit,
            message: "slow down".into()
        })
    );
    let error = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"sequence_number\":0}\n\n";
    let events = decode(error.as_bytes()).unwrap();
    assert!(matches!(events.last(), Some(StreamEvent::Error { message, .. }) if message == "boom"));
}

#[test]
fn the_passthrough_error_event_is_typed_and_makes_sdks_raise() {
    let event = error_event("gone", "server_error", None);
    let events = sse_events(&event);
    assert_eq!(events[0].0.as_deref(), Some("error"));
    assert_eq!(events[0].1["type"], "error");
    assert_eq!(events[0].1["message"], "gone");
    assert_eq!(events[0].1["error"]["message"], "gone");
}

#[test]
fn hostile_input_never_panics() {
    let inputs: [&[u8]; 8] = [
        b"",
        b"[]",
        b"{\"model\":1}",
        b"{\"model\":\"m\",\"input\":[1]}",
        b"{\"model\":\"m\",\"input\":[{\"type\":\"function_call\"}]}",
        b"{\"model\":\"m\",\"input\":[{\"role\":\"user\",\"content\":[{}]}]}",
        b"{\"model\":\"m\",\"input\":\"x\",\"tools\":[{}]}",
        b"{\"model\":\"m\",\"input\":\"x\",\"text\":{\"format\":{}}}",
    ];
    for input in inputs {
        assert!(
            parse_request(input).is_err(),
            "{}",
            String::from_utf8_lossy(input)
        );
        let _ = stateful_feature(input);
        let _ = Echo::of_request(input);
        let mut d = StreamDecoder::new();
        let _ = d.push(input);
        let _ = d.finish();
    }
}
