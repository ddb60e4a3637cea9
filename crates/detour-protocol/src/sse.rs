//! Server-sent events framing for relaying streams.
//!
//! The gateway relays upstream SSE bytes as they arrive, but only whole events:
//! an event ends at a blank line (`\n\n` or `\r\n\r\n`). Holding back a partial
//! trailing event costs nothing in the common case (upstream chunks end on an
//! event boundary, so the chunk is passed on without a copy) and guarantees that
//! if the stream fails mid-way, an error event appended by the gateway is never
//! glued onto half an event: the client never sees truncated JSON.
//!
//! The partial event is bounded: a provider that sends an event without end
//! (data and never a blank line) gets [`EventTooLarge`] once it passes the
//! limit, instead of growing the gateway's memory without bound. Each byte is
//! scanned for a boundary once (plus three bytes of overlap), so framing stays
//! linear in the stream's length however the chunks are cut.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// An event grew past the framer's limit without ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event grew past {limit} bytes without ending")]
pub struct EventTooLarge {
    pub limit: usize,
}

/// Splits a byte stream into runs of complete SSE events.
#[derive(Debug)]
pub struct EventFramer {
    /// Bytes of an event that has not ended yet.
    partial: BytesMut,
    /// The most bytes `partial` may hold.
    limit: usize,
}

impl Default for EventFramer {
    fn default() -> Self {
        Self::with_limit(usize::MAX)
    }
}

impl EventFramer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A framer that holds at most `limit` bytes of an unfinished event.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            partial: BytesMut::new(),
            limit,
        }
    }

    /// Feeds a chunk; returns the complete events it closes (possibly empty),
    /// or [`EventTooLarge`] if the unfinished event now passes the limit.
    pub fn push(&mut self, chunk: Bytes) -> Result<Bytes, EventTooLarge> {
        let events = self.split(chunk);
        if self.partial.len() > self.limit {
            return Err(EventTooLarge { limit: self.limit });
        }
        Ok(events)
    }

    fn split(&mut self, chunk: Bytes) -> Bytes {
        if self.partial.is_empty() {
            match last_event_end(&chunk) {
                Some(end) if end == chunk.len() => return chunk,
                Some(end) => {
                    self.partial.extend_from_slice(&chunk[end..]);
                    return chunk.slice(..end);
                }
                None => {
                    self.partial.extend_from_slice(&chunk);
                    return Bytes::new();
                }
            }
        }
        // A boundary may straddle the old partial data and the new chunk, so
        // search from a few bytes back; the rest of the old data has been
        // searched already.
        let search_from = self.partial.len().saturating_sub(3);
        self.partial.extend_from_slice(&chunk);
        match last_event_end(&self.partial[search_from..]) {
            Some(end) => self.partial.split_to(search_from + end).freeze(),
            None => Bytes::new(),
        }
    }

    /// True when no partial event is held back.
    pub fn is_at_boundary(&self) -> bool {
        self.partial.is_empty()
    }
}

/// Index just past the last blank line (end of the last complete event).
fn last_event_end(buf: &[u8]) -> Option<usize> {
    let mut i = buf.len();
    while i >= 2 {
        if buf[i - 1] == b'\n' {
            if buf[i - 2] == b'\n' {
                return Some(i);
            }
            if i >= 4 && &buf[i - 4..i] == b"\r\n\r\n" {
                return Some(i);
            }
        }
        i -= 1;
    }
    None
}

/// Iterates over the `data:` payloads of complete events (joined per event
/// with `\n`, as the SSE spec says), skipping comments and other fields.
pub fn data_payloads(events: &[u8]) -> impl Iterator<Item = Cow<'_, [u8]>> + '_ {
    event_spans(events).filter_map(|span| data_payload(&events[span]))
}

/// The `data:` payload of one event (its lines joined with `\n`), or `None`
/// when it has no data line (a comment, a bare `event:`, blank lines).
/// Borrowed from `event` when the event has one data line (the usual case):
/// only multi-line data is copied.
pub fn data_payload(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut rest = event;
    while !rest.is_empty() {
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            match data.as_mut() {
                Some(d) => {
                    let d = d.to_mut();
                    d.push(b'\n');
                    d.extend_from_slice(rest);
                }
                None => data = Some(Cow::Borrowed(rest)),
            }
        }
    }
    data
}

/// The span of each event in `buf`, its closing blank line included, so
/// that the spans of whole events tile `buf` exactly; a trailing piece
/// without a blank line is the last span.
pub fn event_spans(buf: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= buf.len() {
            return None;
        }
        let end = match find_blank_line(&buf[start..]) {
            Some((at, skip)) => start + at + skip,
            None => buf.len(),
        };
        let span = start..end;
        start = end;
        Some(span)
    })
}

/// Position of the first blank line and the length of its separator.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]).map(|i| from + i) {
        match buf.get(i + 1) {
            Some(b'\n') => return Some((i, 2)),
            Some(b'\r') if buf.get(i + 2) == Some(&b'\n') && i > 0 && buf[i - 1] == b'\r' => {
                return Some((i - 1, 4))
            }
            _ => from = i + 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(chunks: &[&[u8]]) -> Vec<Bytes> {
        let mut f = EventFramer::new();
        chunks
            .iter()
            .map(|c| f.push(Bytes::copy_from_slice(c)).unwrap())
            .collect()
    }

    #[test]
    fn an_event_that_never_ends_is_refused_at_the_limit() {
        let mut f = EventFramer::with_limit(16);
        assert_eq!(
            f.push(Bytes::from_static(b"data: a\n\ndata: ")),
            Ok(Bytes::from_static(b"data: a\n\n"))
        );
        assert_eq!(f.push(Bytes::from_static(b"0123456789")), Ok(Bytes::new()));
        assert_eq!(
            f.push(Bytes::from_static(b"x")),
            Err(EventTooLarge { limit: 16 })
        );
        // Whole events of any size pass: only the unfinished one is held.
        let mut f = EventFramer::with_limit(16);
        let big = format!("data: {}\n\n", "y".repeat(100));
        assert_eq!(f.push(Bytes::from(big.clone())), Ok(Bytes::from(big)));
    }

    #[test]
    fn framing_an_endless_event_byte_by_byte_stays_linear() {
        // 1 MiB one byte at a time: rescanning the held bytes on each push
        // would be ~5e11 steps and never finish within the test timeout.
        let mut f = EventFramer::new();
        for _ in 0..(1 << 20) {
            assert_eq!(f.push(Bytes::from_static(b"x")), Ok(Bytes::new()));
        }
        assert_eq!(
            f.push(Bytes::from_static(b"\n\n")).map(|b| b.len()),
            Ok((1 << 20) + 2)
        );
    }

    #[test]
    fn whole_events_pass_through_unchanged() {
        let out = frame_all(&[b"data: a\n\ndata: b\n\n"]);
        assert_eq!(out[0], Bytes::from_static(b"data: a\n\ndata: b\n\n"));
    }

    #[test]
    fn partial_event_is_held_until_it_ends() {
        let out = frame_all(&[b"data: a\n\ndata: {\"x\"", b":1}\n", b"\n"]);
        assert_eq!(out[0], Bytes::from_static(b"data: a\n\n"));
        assert!(out[1].is_empty());
        assert_eq!(out[2], Bytes::from_static(b"data: {\"x\":1}\n\n"));
    }

    #[test]
    fn crlf_boundaries_are_events_too() {
        let out = frame_all(&[b"data: a\r\n", b"\r\ndata: b"]);
        assert!(out[0].is_empty());
        assert_eq!(out[1], Bytes::from_static(b"data: a\r\n\r\n"));
    }

    #[test]
    fn payloads_join_multiline_data_and_skip_comments() {
        let got: Vec<Vec<u8>> =
            data_payloads(b": ping\n\ndata: a\ndata:b\n\nevent: x\ndata: [DONE]\n\n")
                .map(Cow::into_owned)
                .collect();
        assert_eq!(got, vec![b"a\nb".to_vec(), b"[DONE]".to_vec()]);
    }

    proptest::proptest! {
        #[test]
        fn framing_never_loses_or_reorders_bytes(
            events in proptest::collection::vec("[a-z{}\":]{0,12}", 0..8),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let stream: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut f = EventFramer::new();
            let mut out = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain(std::iter::once(bytes.len())) {
                let piece = f.push(Bytes::copy_from_slice(&bytes[start..cut])).unwrap();
                // Every emitted run ends on an event boundary.
                proptest::prop_assert!(piece.is_empty() || piece.ends_with(b"\n\n"));
                out.extend_from_slice(&piece);
                start = cut;
            }
            proptest::prop_assert_eq!(out, bytes.to_vec());
            proptest::prop_assert!(f.is_at_boundary());
        }
    }
}
