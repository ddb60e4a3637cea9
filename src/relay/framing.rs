//! OpenAI SSE relayed to an OpenAI client: cut into whole events (holding
//! at most `server.max_event_bytes` of an unfinished one), watched for usage
//! and the `[DONE]` marker, and stripped of the usage chunk the gateway asked
//! for when the client did not. Nothing else is parsed: the fast path.
//! Also the scans for an error event among whole events, which priming and
//! the cache copy use.

use bytes::Bytes;

use crate::protocol::openai::{StreamWatch, Usage};
use crate::protocol::sse::{data_payloads, EventFramer, EventTooLarge};

/// What one upstream chunk gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Bytes for the client, if any.
    pub out: Option<Bytes>,
    /// A whole event arrived (even one that was stripped or encoded to
    /// nothing): the stream is alive, the first-byte deadline is met.
    pub whole_event: bool,
}

/// An OpenAI event stream on its way to an OpenAI client.
pub struct OpenAiEvents {
    framer: EventFramer,
    watch: StreamWatch,
    /// Drop the usage chunk: the gateway asked for it, the client did not.
    strip_usage: bool,
}

/// The stream ended without its `[DONE]` marker, or inside an event.
#[derive(Debug, PartialEq, Eq)]
pub struct Unfinished {
    /// Data events relayed before the end.
    pub chunks: u64,
}

impl OpenAiEvents {
    pub fn new(max_event_bytes: usize, strip_usage: bool) -> Self {
        Self {
            framer: EventFramer::with_limit(max_event_bytes),
            watch: StreamWatch::default(),
            strip_usage,
        }
    }

    /// Takes one upstream chunk; gives the whole events it completed.
    pub fn push(&mut self, data: Bytes) -> Result<Step, EventTooLarge> {
        let events = self.framer.push(data)?;
        if events.is_empty() {
            return Ok(Step::default());
        }
        let events = self.watch.observe(events, self.strip_usage);
        Ok(Step {
            out: (!events.is_empty()).then_some(events),
            whole_event: true,
        })
    }

    /// The usage the stream reported, if any.
    pub fn usage(&self) -> Option<Usage> {
        self.watch.usage
    }

    /// The upstream body ended: whole only with `[DONE]` and no partial event.
    pub fn finish(&self) -> Result<(), Unfinished> {
        if self.watch.done && self.framer.is_at_boundary() {
            Ok(())
        } else {
            Err(Unfinished {
                chunks: self.watch.chunks,
            })
        }
    }
}

/// The message of an error event among whole SSE events.
pub fn first_error_event(events: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct MaybeError {
        error: Option<serde_json::Value>,
    }
    data_payloads(events).find_map(|data| {
        let e = serde_json::from_slice::<MaybeError>(&data).ok()?.error?;
        Some(
            e.get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("error event")
                .to_owned(),
        )
    })
}

/// The first error event's message, after a cheap scan: events that do
/// not mention `"error"` are not parsed.
pub fn error_event(events: &[u8]) -> Option<String> {
    // Built once: `memmem::find` builds its searcher on every call.
    static ERROR_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"error\""));
    ERROR_KEY.find(events)?;
    first_error_event(events)
}

/// Whether whole SSE events include an error event (a cheap scan first).
pub fn has_error_event(events: &[u8]) -> bool {
    error_event(events).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn push(events: &mut OpenAiEvents, s: &str) -> Step {
        events
            .push(Bytes::copy_from_slice(s.as_bytes()))
            .unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn a_partial_event_is_held_until_it_completes() {
        let mut events = OpenAiEvents::new(1024, false);
        let (head, tail) = CHUNK.split_at(10);
        assert_eq!(push(&mut events, head), Step::default());
        let step = push(&mut events, tail);
        assert_eq!(step.out.as_deref(), Some(CHUNK.as_bytes()));
        assert!(step.whole_event);
    }

    #[test]
    fn the_usage_chunk_is_stripped_but_still_read_and_counts_as_an_event() {
        let mut events = OpenAiEvents::new(1024, true);
        let step = push(&mut events, USAGE);
        assert_eq!(step.out, None);
        assert!(
            step.whole_event,
            "a stripped event still meets the deadline"
        );
        assert_eq!(events.usage().map(|u| u.total_tokens), Some(5));
        let kept = push(&mut events, USAGE);
        assert_eq!(kept.out, None);
        let mut unstripped = OpenAiEvents::new(1024, false);
        assert_eq!(
            push(&mut unstripped, USAGE).out.as_deref(),
            Some(USAGE.as_bytes())
        );
    }

    #[test]
    fn an_event_over_the_cap_is_refused() {
        let mut events = OpenAiEvents::new(16, false);
        let unfinished = &CHUNK[..CHUNK.len() - 2];
        let err = events.push(Bytes::copy_from_slice(unfinished.as_bytes()));
        assert_eq!(err.map_err(|e| e.limit).err(), Some(16));
        let mut roomy = OpenAiEvents::new(16, false);
        assert!(
            roomy.push(Bytes::from_static(CHUNK.as_bytes())).is_ok(),
            "whole events pass"
        );
    }

    #[test]
    fn a_stream_is_whole_only_with_done_at_an_event_boundary() {
        let mut events = OpenAiEvents::new(1024, false);
        push(&mut events, CHUNK);
        assert_eq!(events.finish(), Err(Unfinished { chunks: 1 }));
        push(&mut events, DONE);
        assert_eq!(events.finish(), Ok(()));
        push(&mut events, "data: {\"cho");
        assert!(events.finish().is_err(), "a partial event after [DONE]");
    }

    #[test]
    fn error_events_are_found_and_their_message_read() {
        let err = "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        assert_eq!(
            first_error_event(err.as_bytes()).as_deref(),
            Some("overloaded")
        );
        assert!(has_error_event(err.as_bytes()));
        let bare = "data: {\"error\":\"x\"}\n\n";
        assert_eq!(
            first_error_event(bare.as_bytes()).as_deref(),
            Some("error event")
        );
        assert!(!has_error_event(CHUNK.as_bytes()));
        let mentions = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"error\\\"\"}}]}\n\n";
        assert!(
            !has_error_event(mentions.as_bytes()),
            "only a real error field counts"
        );
    }
}
