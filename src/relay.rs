//! Relaying a provider's answer body to the client as it arrives.
//!
//! [`RelayBody`] is an `http_body::Body` over the upstream body: no buffering
//! of whole responses, backpressure for free (hyper polls it only when the
//! client's socket has room). It enforces the idle and total limits (for an
//! event stream, the first-byte limit until its first whole event: bytes that
//! complete no event do not buy time), frames streams into whole SSE events
//! (holding at most `server.max_event_bytes` of an unfinished one), and ends
//! a failed stream with a well-formed error event in the client's format
//! (never a hang, never truncated JSON).
//! It holds the request (`request::Tracked`: its log record and what is
//! settled with it) and ends it when the body ends.
//! On a cached route it also keeps a bounded copy of what it sends, and
//! stores it (`crate::cache::Capture`) when the body ends whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::cache::{BoxFuture, Capture};
use crate::config::Timeouts;
use crate::error::{stream_error_event, ClientFormat, GatewayError};
use crate::protocol::chat::{ErrorKind, StreamEvent, Usage};
use crate::protocol::openai::{usage_of, StreamWatch};
use crate::protocol::sse::{EventFramer, EventTooLarge};
use crate::protocol::translate::{StreamDecoder, StreamEncoder};
use crate::request::Tracked;
use crate::upstream::{TimeoutKind, UpstreamError};

/// Notes what a run of decoded events says about the stream.
fn observe(
    events: &[StreamEvent],
    usage: &mut Option<Usage>,
    done: &mut bool,
    error: &mut Option<String>,
) {
    for e in events {
        match e {
            StreamEvent::Usage(u) => *usage = Some(*u),
            StreamEvent::Done => *done = true,
            StreamEvent::Error { message, .. } => *error = Some(message.clone()),
            _ => {}
        }
    }
}

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

/// Whether whole SSE events include an error event (a cheap scan first).
fn has_error_event(events: &[u8]) -> bool {
    events.windows(7).any(|w| w == b"\"error\"") && first_error_event(events).is_some()
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
    /// An event stream's first whole event arrived (until then the first-byte
    /// deadline holds: bytes that complete no event do not buy time).
    got_first_event: bool,
    first_byte: Option<Duration>,
    started: Instant,
    state: State,
    /// Events read by [`RelayBody::prime`], sent before anything else.
    primed: Option<Bytes>,
    /// Attached when the attempt is committed to the client.
    record: Option<Tracked>,
    /// A copy of what the client is sent, for the response cache (bounded).
    capture: Option<Capture>,
    /// The body ended normally and whole (a stream with its end marker).
    whole: bool,
    /// Storing the capture; the client's body ends once it is stored, so
    /// the next identical request finds it.
    storing: Option<BoxFuture<'static, ()>>,
    /// False for an answer the cache must not keep (see `keep_out_of_cache`).
    cacheable: bool,
}

enum Mode {
    /// OpenAI SSE to an OpenAI client: relayed in whole events, watched for
    /// usage and `[DONE]`. The fast path: nothing is parsed but usage.
    Events {
        framer: EventFramer,
        watch: StreamWatch,
        /// Drop the usage chunk: the gateway asked for it, the client did not.
        strip_usage: bool,
    },
    /// SSE in another format, or to be passed through in Anthropic's:
    /// decoded into IR events; re-encoded for the client when `encoder` is
    /// set, else relayed as it came.
    Decoded {
        framer: EventFramer,
        decoder: Box<StreamDecoder>,
        encoder: Option<Box<StreamEncoder>>,
        usage: Option<Usage>,
        done: bool,
        /// An error event arrived from the provider.
        error: Option<String>,
    },
    /// Any other body: relayed chunk by chunk.
    Plain { kept: Vec<Bytes>, kept_len: usize },
    /// A body the gateway made whole (a translated non-streamed answer).
    Ready(Option<Bytes>),
}

/// How an upstream body reaches the client.
pub enum Shape {
    /// OpenAI SSE to an OpenAI client; `strip_usage` drops the usage chunk.
    OpenAiEvents { strip_usage: bool },
    /// SSE decoded with `decoder`; re-encoded with `encoder` if given.
    Decoded {
        decoder: Box<StreamDecoder>,
        encoder: Option<Box<StreamEncoder>>,
    },
    /// Bytes as they come.
    Plain,
    /// A complete body already in the client's format.
    Ready(Bytes),
}

enum State {
    Relaying,
    /// One last frame (an error event) to send, then the end.
    Closing(Bytes),
    Done,
}

impl RelayBody {
    /// `started` is when the attempt began; a stream's first whole event must
    /// come before its first-byte deadline. An event stream holds at most
    /// `max_event_bytes` of an unfinished event.
    pub fn new(
        inner: reqwest::Body,
        shape: Shape,
        provider: String,
        timeouts: Timeouts,
        max_event_bytes: usize,
        format: ClientFormat,
        started: Instant,
    ) -> Self {
        let total_deadline = started + timeouts.total;
        let event_stream = matches!(shape, Shape::OpenAiEvents { .. } | Shape::Decoded { .. });
        let first = if event_stream {
            started + timeouts.first_byte
        } else {
            Instant::now() + timeouts.idle
        };
        let mode = match shape {
            Shape::OpenAiEvents { strip_usage } => Mode::Events {
                framer: EventFramer::with_limit(max_event_bytes),
                watch: StreamWatch::default(),
                strip_usage,
            },
            Shape::Decoded { decoder, encoder } => Mode::Decoded {
                framer: EventFramer::with_limit(max_event_bytes),
                decoder,
                encoder,
                usage: None,
                done: false,
                error: None,
            },
            Shape::Plain => Mode::Plain {
                kept: Vec::new(),
                kept_len: 0,
            },
            Shape::Ready(body) => Mode::Ready(Some(body)),
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
            got_first_event: false,
            // A plain body's first byte is its headers, which just arrived.
            first_byte: (!event_stream).then(|| started.elapsed()),
            started,
            state: State::Relaying,
            primed: None,
            record: None,
            capture: None,
            whole: false,
            storing: None,
            cacheable: true,
        }
    }

    /// Keeps a copy of the bytes sent to the client, to be stored in the
    /// response cache if the body ends whole (and the answer may be kept).
    pub fn capture(&mut self, capture: Capture) {
        if self.cacheable {
            self.capture = Some(capture);
        }
    }

    /// The answer is relayed but never stored (an encoded body: the cache
    /// keeps only the content type, and would replay it mislabelled).
    pub fn keep_out_of_cache(&mut self) {
        self.cacheable = false;
        self.capture = None;
    }

    /// Commits the body to a client request: from now on it writes that
    /// request's log line.
    pub fn attach(&mut self, mut record: Tracked) {
        if let Some(fb) = self.first_byte {
            record.first_byte.get_or_insert(fb);
        }
        self.record = Some(record);
    }

    /// For event streams: reads until the first whole event, without sending
    /// anything, so that a stream which fails before its first event, or whose
    /// first event is an error, can still fail over invisibly to the client.
    pub async fn prime(&mut self) -> Result<(), UpstreamError> {
        if !matches!(self.mode, Mode::Events { .. } | Mode::Decoded { .. }) {
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
                    let out = self.on_chunk(data);
                    if let Mode::Decoded {
                        error: Some(message),
                        ..
                    } = &self.mode
                    {
                        return Poll::Ready(Err(UpstreamError::ErrorEvent {
                            provider: self.provider.clone(),
                            message: message.clone(),
                        }));
                    }
                    let out = match out {
                        Ok(out) => out,
                        Err(error) => return Poll::Ready(Err(error)),
                    };
                    if let Some(events) = out {
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

    /// Takes one upstream chunk; returns the bytes for the client (if any),
    /// or why the upstream's stream cannot be used.
    fn on_chunk(&mut self, data: Bytes) -> Result<Option<Bytes>, UpstreamError> {
        let now = Instant::now();
        if !self.got_first_chunk {
            self.got_first_chunk = true;
            self.first_byte = Some(now.duration_since(self.started));
        }
        let too_large = |e: EventTooLarge| UpstreamError::EventTooLarge {
            provider: self.provider.clone(),
            limit: e.limit,
        };
        let (out, whole_event) = match &mut self.mode {
            Mode::Events {
                framer,
                watch,
                strip_usage,
            } => {
                let mut events = framer.push(data).map_err(too_large)?;
                if events.is_empty() {
                    (None, false)
                } else {
                    watch.observe(&events);
                    if *strip_usage {
                        events = crate::protocol::openai::strip_usage_chunks(events);
                    }
                    // A whole event arrived, even if it was the stripped one.
                    ((!events.is_empty()).then_some(events), true)
                }
            }
            Mode::Decoded {
                framer,
                decoder,
                encoder,
                usage,
                done,
                error,
            } => {
                let events = framer.push(data).map_err(too_large)?;
                if events.is_empty() {
                    (None, false)
                } else {
                    let mut out = BytesMut::new();
                    for payload in crate::protocol::sse::data_payloads(&events) {
                        let decoded =
                            decoder
                                .push(&payload)
                                .map_err(|e| UpstreamError::Transport {
                                    provider: self.provider.clone(),
                                    detail: e.to_string(),
                                })?;
                        observe(&decoded, usage, done, error);
                        if let Some(encoder) = encoder {
                            for event in &decoded {
                                encoder.encode(event, &mut out);
                            }
                        }
                    }
                    let out = if encoder.is_some() {
                        out.freeze()
                    } else {
                        events
                    };
                    ((!out.is_empty()).then_some(out), true)
                }
            }
            Mode::Plain { kept, kept_len } => {
                *kept_len += data.len();
                if *kept_len <= USAGE_SCAN_LIMIT {
                    kept.push(data.clone());
                } else {
                    kept.clear();
                }
                (Some(data), true)
            }
            Mode::Ready(_) => (None, true),
        };
        // Until an event stream's first whole event, the first-byte deadline
        // stands; after it, every chunk restarts the idle limit.
        self.got_first_event |= whole_event;
        if self.got_first_event {
            self.timer
                .as_mut()
                .reset((now + self.timeouts.idle).min(self.total_deadline));
        }
        Ok(out)
    }

    /// The upstream body ended.
    fn on_end(&mut self) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let mut tail = None;
        match &mut self.mode {
            Mode::Events { framer, watch, .. } => {
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
            Mode::Decoded {
                decoder,
                encoder,
                usage,
                done,
                error,
                ..
            } => {
                let decoded = match decoder.finish() {
                    Ok(d) => d,
                    Err(e) => {
                        let detail = e.to_string();
                        return self.fail(UpstreamError::Transport {
                            provider: self.provider.clone(),
                            detail,
                        });
                    }
                };
                observe(&decoded, usage, done, error);
                if let Some(encoder) = encoder {
                    let mut out = BytesMut::new();
                    for event in &decoded {
                        encoder.encode(event, &mut out);
                    }
                    tail = (!out.is_empty()).then(|| out.freeze());
                }
                if let Some(r) = &mut self.record {
                    r.usage = usage.map(|u| crate::protocol::openai::Usage {
                        prompt_tokens: u.input,
                        completion_tokens: u.output,
                        total_tokens: u.total,
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
            Mode::Ready(_) => {}
        }
        // A decoded stream without its end marker (or with an error event)
        // is relayed as it came, but is not an answer to keep.
        self.whole = !matches!(
            &self.mode,
            Mode::Decoded { done: false, .. } | Mode::Decoded { error: Some(_), .. }
        );
        if let Some(r) = self.record.take() {
            r.finish(crate::telemetry::Outcome::Ok);
        }
        match tail {
            Some(bytes) => {
                self.state = State::Closing(bytes);
                self.poll_state()
            }
            None => {
                self.state = State::Done;
                Poll::Ready(None)
            }
        }
    }

    /// The upstream failed after the client got its headers.
    fn fail(&mut self, error: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let outcome = crate::telemetry::Outcome::BrokeOff(error.kind());
        if let Some(r) = self.record.take() {
            tracing::warn!(
                request_id = %r.request_id,
                provider = %self.provider,
                error = %error,
                "upstream failed after the response started"
            );
            r.finish(outcome);
        }
        match &mut self.mode {
            // Any partial event held back is dropped: the client gets only
            // whole events, then the error.
            Mode::Decoded {
                encoder: Some(encoder),
                ..
            } => {
                let error = GatewayError::Upstream(error);
                let mut out = BytesMut::new();
                encoder.encode(
                    &StreamEvent::Error {
                        kind: ErrorKind::Server,
                        message: error.to_string(),
                    },
                    &mut out,
                );
                self.state = State::Closing(out.freeze());
                self.poll_state()
            }
            Mode::Events { .. } | Mode::Decoded { .. } => {
                let event = stream_error_event(self.format, &GatewayError::Upstream(error));
                self.state = State::Closing(event);
                self.poll_state()
            }
            Mode::Plain { .. } | Mode::Ready(_) => {
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
        } else if !self.got_first_event
            && matches!(self.mode, Mode::Events { .. } | Mode::Decoded { .. })
        {
            TimeoutKind::FirstByte
        } else {
            TimeoutKind::Idle
        }
    }

    /// Copies a frame into the capture, and hands the capture over to be
    /// stored when the body ended whole.
    fn keep(
        &mut self,
        out: Poll<Option<Result<Frame<Bytes>, std::io::Error>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match &out {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(capture), Some(data)) = (&mut self.capture, frame.data_ref()) {
                    // An OpenAI stream can carry an error event and still end
                    // with `[DONE]`: relayed, never stored.
                    let error = matches!(self.mode, Mode::Events { .. }) && has_error_event(data);
                    if error || !capture.push(data) {
                        self.capture = None;
                    }
                }
            }
            Poll::Ready(None) if self.whole => {
                if let Some(capture) = self.capture.take() {
                    let mut storing = capture.finish();
                    if storing.as_mut().poll(cx).is_pending() {
                        self.storing = Some(storing);
                        return Poll::Pending;
                    }
                }
            }
            Poll::Ready(_) => self.capture = None,
            Poll::Pending => {}
        }
        out
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
        if let Some(storing) = &mut this.storing {
            if storing.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.storing = None;
            return Poll::Ready(None);
        }
        let out = this.poll_relay(cx);
        if this.capture.is_none() {
            return out;
        }
        this.keep(out, cx)
    }

    fn is_end_stream(&self) -> bool {
        // With a capture to hand over, the end must be polled for.
        matches!(self.state, State::Done) && self.capture.is_none() && self.storing.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.capture.is_some() {
            // No length: the client sees the end only after the answer is stored.
            return SizeHint::default();
        }
        match &self.mode {
            Mode::Plain { .. } => self.inner.size_hint(),
            Mode::Ready(Some(b)) => SizeHint::with_exact(b.len() as u64),
            _ => SizeHint::default(),
        }
    }
}

impl RelayBody {
    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self;
        if !matches!(this.state, State::Relaying) {
            return this.poll_state();
        }
        if let Some(events) = this.primed.take() {
            return Poll::Ready(Some(Ok(Frame::data(events))));
        }
        if let Mode::Ready(body) = &mut this.mode {
            return match body.take() {
                Some(b) => {
                    // Finish now: hyper stops polling a body once its
                    // length is written, so a later end would never be seen.
                    let _ = this.on_end();
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                None => this.on_end(),
            };
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not relayed; providers do not send them.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match this.on_chunk(data) {
                        Ok(Some(out)) => {
                            // The last chunk of a body of known length: finish
                            // now, as hyper will not poll for the end.
                            if matches!(this.mode, Mode::Plain { .. }) && this.inner.is_end_stream()
                            {
                                let _ = this.on_end();
                            }
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        Ok(None) => {}
                        Err(error) => return this.fail(error),
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
}
