//! Relaying a provider's answer body to the client as it arrives.
//!
//! [`RelayBody`] is an `http_body::Body` over the upstream body: no buffering
//! of whole responses, backpressure for free (hyper polls it only when the
//! client's socket has room). It enforces the idle and total limits, frames
//! streams into whole SSE events, and ends a failed stream with a well-formed
//! error event in the client's format (never a hang, never truncated JSON).
//! It owns the request's log record and writes it when the body ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::config::Timeouts;
use crate::error::{stream_error_event, ClientFormat, GatewayError};
use crate::protocol::openai::{usage_of, StreamWatch};
use crate::protocol::sse::EventFramer;
use crate::telemetry::RequestRecord;
use crate::upstream::{TimeoutKind, UpstreamError};

/// The message of an error event among the first events of a stream.
fn first_error_event(events: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct MaybeError {
        error: Option<serde_json::Value>,
    }
    crate::protocol::sse::data_payloads(events).find_map(|data| {
        let e = serde_json::from_slice::<MaybeError>(&data).ok()?.error?;
        Some(
            e.get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("error event")
                .to_owned(),
        )
    })
}

/// Non-streamed bodies up to this size are kept (as cheap `Bytes` handles)
/// to read usage from once they end.
const USAGE_SCAN_LIMIT: usize = 256 * 1024;

pub struct RelayBody {
    inner: reqwest::Body,
    mode: Mode,
    provider: String,
    timeouts: Timeouts,
    format: ClientFormat,
    timer: Pin<Box<Sleep>>,
    total_deadline: Instant,
    got_first_chunk: bool,
    first_byte: Option<Duration>,
    started: Instant,
    state: State,
    /// Events read by [`RelayBody::prime`], sent before anything else.
    primed: Option<Bytes>,
    /// Attached when the attempt is committed to the client.
    record: Option<RequestRecord>,
}

enum Mode {
    /// `text/event-stream`: relayed in whole events, watched for usage and `[DONE]`.
    Events {
        framer: EventFramer,
        watch: StreamWatch,
    },
    /// Any other body: relayed chunk by chunk.
    Plain { kept: Vec<Bytes>, kept_len: usize },
}

enum State {
    Relaying,
    /// One last frame (an error event) to send, then the end.
    Closing(Bytes),
    Done,
}

impl RelayBody {
    /// `started` is when the attempt began; the stream's first chunk must come
    /// before its first-byte deadline.
    pub fn new(
        inner: reqwest::Body,
        event_stream: bool,
        provider: String,
        timeouts: Timeouts,
        format: ClientFormat,
        started: Instant,
    ) -> Self {
        let total_deadline = started + timeouts.total;
        let first = if event_stream {
            started + timeouts.first_byte
        } else {
            Instant::now() + timeouts.idle
        };
        let mode = if event_stream {
            Mode::Events {
                framer: EventFramer::new(),
                watch: StreamWatch::default(),
            }
        } else {
            Mode::Plain {
                kept: Vec::new(),
                kept_len: 0,
            }
        };
        Self {
            inner,
            mode,
            provider,
            timeouts,
            format,
            timer: Box::pin(tokio::time::sleep_until(first.min(total_deadline))),
            total_deadline,
            got_first_chunk: false,
            // A plain body's first byte is its headers, which just arrived.
            first_byte: (!event_stream).then(|| started.elapsed()),
            started,
            state: State::Relaying,
            primed: None,
            record: None,
        }
    }

    /// Commits the body to a client request: from now on it writes that
    /// request's log line.
    pub fn attach(&mut self, mut record: RequestRecord) {
        if let Some(fb) = self.first_byte {
            record.first_byte.get_or_insert(fb);
        }
        self.record = Some(record);
    }

    /// For event streams: reads until the first whole event, without sending
    /// anything, so that a stream which fails before its first event, or whose
    /// first event is an error, can still fail over invisibly to the client.
    pub async fn prime(&mut self) -> Result<(), UpstreamError> {
        if !matches!(self.mode, Mode::Events { .. }) {
            return Ok(());
        }
        std::future::poll_fn(|cx| self.poll_prime(cx)).await
    }

    fn poll_prime(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if let Some(events) = self.on_chunk(data) {
                        if let Some(message) = first_error_event(&events) {
                            return Poll::Ready(Err(UpstreamError::ErrorEvent {
                                provider: self.provider.clone(),
                                message,
                            }));
                        }
                        self.primed = Some(events);
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(UpstreamError::Transport {
                        provider: self.provider.clone(),
                        detail: format!("stream failed before its first event: {e}"),
                    }))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(UpstreamError::Transport {
                        provider: self.provider.clone(),
                        detail: "stream ended before its first event".to_owned(),
                    }))
                }
                Poll::Pending => {
                    if self.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let kind = self.expired();
                    return Poll::Ready(Err(UpstreamError::Timeout {
                        provider: self.provider.clone(),
                        kind,
                        after: self.limit(kind),
                    }));
                }
            }
        }
    }

    /// Time from the attempt's start to its first body chunk, once known.
    pub fn first_byte(&self) -> Option<Duration> {
        self.first_byte
    }

    fn on_chunk(&mut self, data: Bytes) -> Option<Bytes> {
        let now = Instant::now();
        if !self.got_first_chunk {
            self.got_first_chunk = true;
            self.first_byte = Some(now.duration_since(self.started));
        }
        self.timer
            .as_mut()
            .reset((now + self.timeouts.idle).min(self.total_deadline));
        match &mut self.mode {
            Mode::Events { framer, watch } => {
                let events = framer.push(data);
                if events.is_empty() {
                    return None;
                }
                watch.observe(&events);
                Some(events)
            }
            Mode::Plain { kept, kept_len } => {
                *kept_len += data.len();
                if *kept_len <= USAGE_SCAN_LIMIT {
                    kept.push(data.clone());
                } else {
                    kept.clear();
                }
                Some(data)
            }
        }
    }

    /// The upstream body ended.
    fn on_end(&mut self) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match &mut self.mode {
            Mode::Events { framer, watch } => {
                if let Some(r) = &mut self.record {
                    r.usage = watch.usage;
                }
                if !watch.done || !framer.is_at_boundary() {
                    let detail = format!(
                        "stream ended before its end marker ({} chunks relayed)",
                        watch.chunks
                    );
                    return self.fail(UpstreamError::Transport {
                        provider: self.provider.clone(),
                        detail,
                    });
                }
            }
            Mode::Plain { kept, kept_len } => {
                if let (true, Some(r)) = (*kept_len <= USAGE_SCAN_LIMIT, &mut self.record) {
                    r.usage = match kept.as_slice() {
                        [one] => usage_of(one),
                        many => usage_of(&many.concat()),
                    };
                }
            }
        }
        self.state = State::Done;
        if let Some(r) = self.record.take() {
            r.finish("ok");
        }
        Poll::Ready(None)
    }

    /// The upstream failed after the client got its headers.
    fn fail(&mut self, error: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let outcome = match &error {
            UpstreamError::Timeout {
                kind: TimeoutKind::Idle,
                ..
            } => "idle_timeout",
            UpstreamError::Timeout {
                kind: TimeoutKind::Total,
                ..
            } => "total_timeout",
            UpstreamError::Timeout { .. } => "first_byte_timeout",
            _ => "upstream_broke_off",
        };
        if let Some(r) = self.record.take() {
            tracing::warn!(
                request_id = %r.request_id,
                provider = %self.provider,
                error = %error,
                "upstream failed after the response started"
            );
            r.finish(outcome);
        }
        match self.mode {
            Mode::Events { .. } => {
                // Any partial event held back is dropped: the client gets only
                // whole events, then the error.
                let event = stream_error_event(self.format, &GatewayError::Upstream(error));
                self.state = State::Closing(event);
                self.poll_state()
            }
            Mode::Plain { .. } => {
                // A plain body cannot carry an error once started: abort it so
                // the client sees an incomplete response, not a silent cut.
                self.state = State::Done;
                Poll::Ready(Some(Err(std::io::Error::other(error.to_string()))))
            }
        }
    }

    fn poll_state(&mut self) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Closing(event) => Poll::Ready(Some(Ok(Frame::data(event)))),
            State::Done => Poll::Ready(None),
            State::Relaying => {
                self.state = State::Relaying;
                Poll::Pending
            }
        }
    }

    fn expired(&self) -> TimeoutKind {
        if Instant::now() >= self.total_deadline {
            TimeoutKind::Total
        } else if !self.got_first_chunk && matches!(self.mode, Mode::Events { .. }) {
            TimeoutKind::FirstByte
        } else {
            TimeoutKind::Idle
        }
    }

    fn limit(&self, kind: TimeoutKind) -> Duration {
        match kind {
            TimeoutKind::Total => self.timeouts.total,
            TimeoutKind::FirstByte | TimeoutKind::Connect => self.timeouts.first_byte,
            TimeoutKind::Idle => self.timeouts.idle,
        }
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if !matches!(this.state, State::Relaying) {
            return this.poll_state();
        }
        if let Some(events) = this.primed.take() {
            return Poll::Ready(Some(Ok(Frame::data(events))));
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not relayed; providers do not send them.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if let Some(out) = this.on_chunk(data) {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let detail = format!("{e}");
                    return this.fail(UpstreamError::Transport {
                        provider: this.provider.clone(),
                        detail,
                    });
                }
                Poll::Ready(None) => return this.on_end(),
                Poll::Pending => {
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let kind = this.expired();
                    let after = this.limit(kind);
                    return this.fail(UpstreamError::Timeout {
                        provider: this.provider.clone(),
                        kind,
                        after,
                    });
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.mode {
            Mode::Plain { .. } => self.inner.size_hint(),
            Mode::Events { .. } => SizeHint::default(),
        }
    }
}
