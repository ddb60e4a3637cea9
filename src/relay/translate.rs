//! SSE in any provider's shape, decoded into IR events: re-encoded for the
//! client when it speaks another format, else relayed as it came (decoded
//! only to know where the stream ends, its usage, and whether it carried an
//! error event). Framing holds at most `server.max_event_bytes` of an
//! unfinished event, as for the OpenAI fast path.

use bytes::{Bytes, BytesMut};

use crate::protocol::chat::{ErrorKind, StreamEvent, Usage};
use crate::protocol::sse::{data_payloads, EventFramer, EventTooLarge};
use crate::protocol::translate::{StreamDecoder, StreamEncoder};

use super::framing::Step;

/// Why a decoded stream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Broken {
    #[error(transparent)]
    TooLarge(#[from] EventTooLarge),
    /// The decoder refused the stream (its message).
    #[error("{0}")]
    Decode(String),
}

/// What the decoded events said about the stream.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    usage: Option<Usage>,
    done: bool,
    /// An error event arrived from the provider (its message).
    error: Option<String>,
}

impl Seen {
    fn observe(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Usage(u) => self.usage = Some(*u),
            StreamEvent::Done => self.done = true,
            StreamEvent::Error { message, .. } => self.error = Some(message.clone()),
            _ => {}
        }
    }
}

/// What a stream that may be continued keeps (see [`Translated::keep_text`]).
#[derive(Debug, Default)]
struct Kept {
    /// The answer's text the client was given so far.
    text: String,
    /// A tool call was sent: such a stream is not continued.
    tool_calls: bool,
    /// The finish was sent: the answer is complete, nothing to continue.
    finished: bool,
    /// The continuation is being spliced in: its opening is not re-sent.
    splicing: bool,
    /// The text sent ends with whitespace (which a prefill cannot): the
    /// continuation's leading whitespace is dropped.
    trim_start: bool,
}

/// A decoded event stream, re-encoded when `encoder` is set.
pub struct Translated {
    framer: EventFramer,
    decoder: Box<StreamDecoder>,
    encoder: Option<Box<StreamEncoder>>,
    seen: Seen,
    max_event_bytes: usize,
    /// Kept only when the route continues broken streams.
    kept: Option<Kept>,
}

impl Translated {
    pub fn new(
        max_event_bytes: usize,
        decoder: Box<StreamDecoder>,
        encoder: Option<Box<StreamEncoder>>,
    ) -> Self {
        Self {
            framer: EventFramer::with_limit(max_event_bytes),
            decoder,
            encoder,
            seen: Seen::default(),
            max_event_bytes,
            kept: None,
        }
    }

    /// Keeps the text sent to the client, so that a broken stream can be
    /// continued: an error event from the provider is then held back (see
    /// [`Translated::held_error`]) rather than sent at once. Only for a
    /// re-encoded stream.
    pub fn keep_text(&mut self) {
        if self.encoder.is_some() {
            self.kept = Some(Kept::default());
        }
    }

    /// The text sent so far, if this stream can be continued: it keeps its
    /// text, sent some, and sent no tool call and no finish.
    pub fn continuable_text(&self) -> Option<&str> {
        let kept = self.kept.as_ref()?;
        let continuable = !kept.tool_calls && !kept.finished && !kept.text.is_empty();
        continuable.then_some(kept.text.as_str())
    }

    /// Splices another upstream's stream (decoded by `decoder`) after what
    /// was sent: its opening is dropped, its text, finish and usage go to
    /// the client through the same encoder (same ids, same block), with
    /// `extension` in the final event.
    pub fn resume(&mut self, decoder: Box<StreamDecoder>, extension: serde_json::Value) {
        self.framer = EventFramer::with_limit(self.max_event_bytes);
        self.decoder = decoder;
        self.seen = Seen::default();
        if let Some(kept) = &mut self.kept {
            kept.splicing = true;
            kept.trim_start = kept.text.ends_with(char::is_whitespace);
        }
        if let Some(encoder) = &mut self.encoder {
            encoder.set_extension(extension);
        }
    }

    /// Sends `event` to the encoder, unless it is held back or dropped.
    fn encode(&mut self, event: &StreamEvent, out: &mut BytesMut) {
        self.seen.observe(event);
        let Some(encoder) = &mut self.encoder else {
            return;
        };
        if let Some(kept) = &mut self.kept {
            match event {
                StreamEvent::TextDelta(text) if kept.trim_start => {
                    let text = text.trim_start();
                    if !text.is_empty() {
                        kept.trim_start = false;
                        kept.text.push_str(text);
                        encoder.encode(&StreamEvent::TextDelta(text.to_owned()), out);
                    }
                    return;
                }
                StreamEvent::TextDelta(text) => kept.text.push_str(text),
                StreamEvent::ToolCallStart { .. } => kept.tool_calls = true,
                StreamEvent::Finish { .. } => kept.finished = true,
                // Held: a continuation may follow instead.
                StreamEvent::Error { .. } => return,
                StreamEvent::Start { .. } if kept.splicing => return,
                _ => {}
            }
        }
        encoder.encode(event, out);
    }

    /// Whether an error event from the provider was held back (only when
    /// keeping text): the caller sends [`Translated::error_event`] if the
    /// stream is not continued.
    pub fn held_error(&self) -> bool {
        self.kept.is_some() && self.seen.error.is_some()
    }

    /// Takes one upstream chunk; gives the client's bytes for the whole
    /// events it completed.
    pub fn push(&mut self, data: Bytes) -> Result<Step, Broken> {
        let events = self.framer.push(data)?;
        if events.is_empty() {
            return Ok(Step::default());
        }
        let mut out = BytesMut::new();
        for payload in data_payloads(&events) {
            let decoded = self
                .decoder
                .push(&payload)
                .map_err(|e| Broken::Decode(e.to_string()))?;
            for event in &decoded {
                self.encode(event, &mut out);
            }
        }
        let out = if self.encoder.is_some() {
            out.freeze()
        } else {
            events
        };
        Ok(Step {
            out: (!out.is_empty()).then_some(out),
            whole_event: true,
        })
    }

    /// The upstream body ended: the client's last bytes, if any (only when
    /// re-encoding), or why the decoder refuses the end.
    pub fn finish(&mut self) -> Result<Option<Bytes>, Broken> {
        let decoded = self
            .decoder
            .finish()
            .map_err(|e| Broken::Decode(e.to_string()))?;
        let mut out = BytesMut::new();
        for event in &decoded {
            self.encode(event, &mut out);
        }
        if self.encoder.is_none() {
            return Ok(None);
        }
        Ok((!out.is_empty()).then(|| out.freeze()))
    }

    /// The message of an error event the provider sent, if one came.
    pub fn error(&self) -> Option<&str> {
        self.seen.error.as_deref()
    }

    /// The stream ended with its end marker and carried no error event: an
    /// answer the cache may keep.
    pub fn whole(&self) -> bool {
        self.seen.done && self.seen.error.is_none()
    }

    /// The usage the stream reported, in the log's (OpenAI's) terms.
    pub fn usage(&self) -> Option<crate::protocol::openai::Usage> {
        self.seen.usage.map(|u| crate::protocol::openai::Usage {
            prompt_tokens: u.input,
            completion_tokens: u.output,
            total_tokens: u.total,
        })
    }

    /// The error event that ends a failed stream, in the client's format, if
    /// this stream is re-encoded (else the caller writes one).
    pub fn error_event(&mut self, message: String) -> Option<Bytes> {
        let encoder = self.encoder.as_mut()?;
        let mut out = BytesMut::new();
        encoder.encode(
            &StreamEvent::Error {
                kind: ErrorKind::Server,
                message,
            },
            &mut out,
        );
        Some(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chat::Format;
    use crate::protocol::translate;

    const START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"claude\",\"usage\":{\"input_tokens\":3,\"output_tokens\":0}}}\n\n";
    const DELTA: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n";
    const MSG_DELTA: &str = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n";
    const STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    const ERROR: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

    fn anthropic(encoder: Option<StreamEncoder>) -> Translated {
        Translated::new(
            64 * 1024,
            Box::new(StreamDecoder::new(Format::Anthropic)),
            encoder.map(Box::new),
        )
    }

    fn to_openai() -> Option<StreamEncoder> {
        Some(StreamEncoder::OpenAi(
            translate::openai::StreamEncoder::new(0, true),
        ))
    }

    fn push(t: &mut Translated, s: &str) -> Step {
        t.push(Bytes::copy_from_slice(s.as_bytes()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn passed_through_events_come_out_as_they_came_and_end_whole() {
        let mut t = anthropic(None);
        for event in [START, DELTA, MSG_DELTA, STOP] {
            let step = push(&mut t, event);
            assert_eq!(step.out.as_deref(), Some(event.as_bytes()));
        }
        assert!(matches!(t.finish(), Ok(None)));
        assert!(t.whole());
        assert_eq!(t.usage().map(|u| u.completion_tokens), Some(2));
        assert_eq!(
            t.error_event("x".to_owned()),
            None,
            "no encoder: caller writes it"
        );
    }

    #[test]
    fn re_encoded_events_come_out_in_the_clients_format() {
        let mut t = anthropic(to_openai());
        push(&mut t, START);
        let step = push(&mut t, DELTA);
        let out = step.out.unwrap_or_default();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("data: {"), "{text}");
        assert!(text.contains("\"content\":\"hi\""), "{text}");
        push(&mut t, MSG_DELTA);
        push(&mut t, STOP);
        let _ = t.finish();
        assert!(t.whole());
    }

    #[test]
    fn a_re_encoded_stream_that_fails_ends_with_an_error_event_in_the_clients_format() {
        let mut t = anthropic(to_openai());
        push(&mut t, START);
        push(&mut t, DELTA);
        let event = t.error_event("gone".to_owned()).unwrap_or_default();
        let text = String::from_utf8_lossy(&event);
        assert!(
            text.starts_with("data: {") && text.contains("gone"),
            "{text}"
        );
    }

    fn delta(text: &str) -> String {
        format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{text}\"}}}}\n\n"
        )
    }

    fn text_of(step: &Step) -> String {
        String::from_utf8_lossy(step.out.as_deref().unwrap_or_default()).into_owned()
    }

    #[test]
    fn a_continuation_is_spliced_into_the_same_stream() {
        let mut t = anthropic(to_openai());
        t.keep_text();
        push(&mut t, START);
        let first = text_of(&push(&mut t, &delta("Hello ")));
        assert!(first.contains("\"role\":\"assistant\""), "{first}");
        let _ = t.finish();
        assert!(!t.whole());
        assert_eq!(t.continuable_text(), Some("Hello "));

        t.resume(
            Box::new(StreamDecoder::new(Format::Anthropic)),
            serde_json::json!({"continued_by": "b"}),
        );
        assert_eq!(push(&mut t, START).out, None, "no second opening");
        let more = text_of(&push(&mut t, &delta(" world")));
        assert!(
            more.contains("\"content\":\"world\"") && !more.contains("role"),
            "the prefill's trimmed space is not sent twice: {more}"
        );
        push(&mut t, MSG_DELTA);
        let end = text_of(&push(&mut t, STOP));
        let detour = end.find("\"detour\":{\"continued_by\":\"b\"}");
        let done = end.find("[DONE]");
        assert!(detour.is_some() && detour < done, "{end}");
        assert!(t.whole());
    }

    #[test]
    fn a_kept_stream_holds_its_error_event_back_and_no_tool_stream_is_continued() {
        let mut t = anthropic(to_openai());
        t.keep_text();
        push(&mut t, START);
        push(&mut t, &delta("Hi"));
        assert_eq!(push(&mut t, ERROR).out, None, "held back");
        assert!(t.held_error());
        assert_eq!(t.continuable_text(), Some("Hi"));

        let mut plain = anthropic(to_openai());
        push(&mut plain, START);
        push(&mut plain, &delta("Hi"));
        assert_eq!(plain.continuable_text(), None, "kept only when asked");
    }

    #[test]
    fn a_partial_event_gives_nothing_yet() {
        let mut t = anthropic(None);
        assert_eq!(push(&mut t, &START[..20]), Step::default());
    }

    #[test]
    fn an_error_event_is_noted_and_the_stream_is_not_whole() {
        let mut t = anthropic(None);
        push(&mut t, START);
        push(&mut t, ERROR);
        assert_eq!(t.error(), Some("Overloaded"));
        assert!(!t.whole());
    }

    #[test]
    fn a_stream_cut_short_is_not_whole() {
        let mut t = anthropic(None);
        push(&mut t, START);
        push(&mut t, DELTA);
        let _ = t.finish();
        assert!(!t.whole());
    }

    #[test]
    fn an_event_over_the_cap_is_refused() {
        let mut t = Translated::new(16, Box::new(StreamDecoder::new(Format::Anthropic)), None);
        assert!(matches!(
            t.push(Bytes::copy_from_slice(&START.as_bytes()[..START.len() - 2])),
            Err(Broken::TooLarge(_))
        ));
    }
}
