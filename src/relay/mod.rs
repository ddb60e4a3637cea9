//! Relaying a provider's answer body to the client as it arrives.
//!
//! [`RelayBody`] is an `http_body::Body` over the upstream body: no buffering
//! of whole responses, backpressure for free (hyper polls it only when the
//! client's socket has room). It composes one part per job:
//! - [`framing`]: OpenAI SSE to an OpenAI client, cut into whole events
//!   (holding at most `server.max_event_bytes` of an unfinished one), usage
//!   read and, when the client did not ask for it, stripped;
//! - [`translate`]: SSE in another shape, decoded into IR events and
//!   re-encoded for the client (or passed through, decoded only to know where
//!   it ends);
//! - [`plain`]: any other body, relayed chunk by chunk, scanned for usage;
//! - [`deadline`]: the first-byte, idle and total limits (an event stream's
//!   first-byte limit holds until its first whole event);
//! - [`capture`]: the response cache's bounded copy, stored when the body
//!   ends whole.
//!
//! `RelayBody` itself primes event streams to their first event (so an early
//! failure can still fail over unseen), ends a failed stream with a
//! well-formed error event in the client's format (never a hang, never
//! truncated JSON), and holds the request (`request::Tracked`: its log
//! record and what is settled with it), ending it when the body ends: the
//! usage read and the record written once the end is written to the client
//! ([`crate::after_write`]). It tells the target's health how a committed
//! body ended ([`BodyEnd`], once: whole, broken off, or dropped) through the
//! hook the proxy gives it.
//!
//! On a route with `continue_streams = true`, a re-encoded text stream keeps
//! the text it sent ([`translate::Translated::keep_text`]; nothing is kept
//! otherwise). When it breaks after some text and before any tool call or
//! finish (cut, stall past `idle`, error event, no end marker), the broken
//! target's health hears `Broke`, the provider's error event is held back,
//! and the [`Continuation`] the proxy gave ([`RelayBody::continue_with`])
//! asks the next target to go on from that text. Its events are decoded
//! and spliced in through the same encoder (its opening dropped: same id,
//! no second role chunk or `message_start`, the same text block), under a
//! fresh deadline; the final event carries `"detour": {"continued_by":
//! provider}` (see `StreamEncoder::set_extension`), the log line
//! `continued_by`, and `detour_stream_continuations_total` counts it. If
//! the continuation request fails, the client gets the original error
//! event; one continuation at most per request. The continuing target's
//! own health is not told how its stream ended.

pub mod capture;
pub mod deadline;
pub mod framing;
pub mod plain;
pub mod translate;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::cache::Capture;
use crate::config::Timeouts;
use crate::error::{stream_error_event, ClientFormat, GatewayError};
use crate::protocol::sse::EventTooLarge;
use crate::protocol::translate::{StreamDecoder, StreamEncoder};
use crate::request::Tracked;
use crate::telemetry::Outcome;
use crate::upstream::{ResponseBody, TimeoutKind, UpstreamError};

use capture::CacheCopy;
use deadline::Deadline;
use framing::{error_event, OpenAiEvents, Step};
use plain::UsageScan;
use translate::{Broken, Translated};

pub struct RelayBody {
    /// The provider's body; none for a body the gateway made whole.
    inner: Option<ResponseBody>,
    mode: Mode,
    provider: String,
    format: ClientFormat,
    deadline: Deadline,
    state: State,
    /// Events read by [`RelayBody::prime`], sent before anything else.
    primed: Option<Bytes>,
    /// Attached when the attempt is committed to the client.
    record: Option<Tracked>,
    /// A copy of what the client is sent, for the response cache.
    copy: CacheCopy,
    /// The body ended normally and whole (a stream with its end marker).
    whole: bool,
    /// What the upstream did after the events last batched: handled on the
    /// next poll, once the batch is sent.
    after_batch: Option<AfterBatch>,
    /// Told once how the body ended, for the target's health.
    end_hook: Option<EndHook>,
    /// Set on routes that continue broken streams: asks the next target.
    continuation: Option<Continuation>,
    timeouts: Timeouts,
    /// The provider that continued this stream, once one did.
    continued_by: Option<String>,
}

/// Asks another target to continue a broken stream, given the text the
/// client was sent so far (see [`RelayBody::continue_with`]).
pub type Continuation =
    Box<dyn FnOnce(String) -> BoxFuture<'static, Result<Resumed, ContinueFailed>> + Send>;

/// A continuation's stream, its headers received.
pub struct Resumed {
    pub body: ResponseBody,
    /// Decodes the continuing provider's stream.
    pub decoder: Box<StreamDecoder>,
    pub provider: String,
    /// When its request was sent: its first event must come within the
    /// route's first-byte limit.
    pub started: Instant,
}

/// The continuation request failed: the client gets the original error.
pub struct ContinueFailed {
    pub provider: String,
    pub error: UpstreamError,
}

/// How a committed body ended, as the target's health hears it.
pub enum BodyEnd<'e> {
    /// Whole: an event stream with its end marker and no error event.
    Whole,
    /// The upstream failed after the client got its headers (cut, stall,
    /// error event, no end marker).
    Broke(&'e UpstreamError),
    /// Dropped before its end (the client left): says nothing of the target.
    Dropped,
}

/// Called once with how the body ended (see [`RelayBody::on_body_end`]).
pub type EndHook = Box<dyn FnOnce(BodyEnd<'_>) + Send>;

/// The most bytes of ready events joined into one frame.
const MAX_BATCH: usize = 64 * 1024;

/// How the upstream ended while a batch of events waited to be sent.
enum AfterBatch {
    End,
    Fail(UpstreamError),
}

/// Events ready at once, joined so that the client gets them in one write
/// (one frame: hyper writes and flushes each frame it is given).
#[derive(Default)]
struct Batch {
    first: Option<Bytes>,
    joined: Option<bytes::BytesMut>,
}

impl Batch {
    fn push(&mut self, events: Bytes) {
        if let Some(joined) = &mut self.joined {
            joined.extend_from_slice(&events);
            return;
        }
        match self.first.take() {
            None => self.first = Some(events),
            Some(first) => {
                let mut joined = bytes::BytesMut::with_capacity(2 * (first.len() + events.len()));
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&events);
                self.joined = Some(joined);
            }
        }
    }

    fn len(&self) -> usize {
        match (&self.joined, &self.first) {
            (Some(j), _) => j.len(),
            (None, Some(f)) => f.len(),
            (None, None) => 0,
        }
    }

    fn take(self) -> Option<Bytes> {
        match self.joined {
            Some(joined) => Some(joined.freeze()),
            None => self.first,
        }
    }
}

enum Mode {
    /// OpenAI SSE to an OpenAI client. The fast path.
    Events(OpenAiEvents),
    /// SSE decoded into IR events, re-encoded or relayed as it came.
    Decoded(Translated),
    /// Any other body: relayed chunk by chunk.
    Plain(UsageScan),
    /// A body the gateway made whole (a translated non-streamed answer).
    Ready(Option<Bytes>),
}

impl Mode {
    fn is_event_stream(&self) -> bool {
        matches!(self, Mode::Events(_) | Mode::Decoded(_))
    }
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
    /// Waiting for another target to continue the stream that broke with
    /// this error.
    Continuing(
        BoxFuture<'static, Result<Resumed, ContinueFailed>>,
        UpstreamError,
    ),
    /// One last frame (an error event) to send, then the end.
    Closing(Bytes),
    Done,
}

type Polled = Poll<Option<Result<Frame<Bytes>, std::io::Error>>>;

/// The outcome a request's log line records when its upstream failed after
/// the client got its headers (its words: `telemetry::Outcome::as_str`).
fn broken_off_outcome(error: &UpstreamError) -> Outcome {
    Outcome::BrokeOff(error.kind())
}

impl RelayBody {
    /// `started` is when the attempt began; a stream's first whole event must
    /// come before its first-byte deadline. An event stream holds at most
    /// `max_event_bytes` of an unfinished event.
    ///
    /// Boxed: a relay is large (its request record, cache copy and timer
    /// make it about 1.7 KiB), and an answer passes through several futures
    /// and results before the client's connection takes it. A box moves as
    /// one pointer; the relay itself would be copied at every step.
    pub fn new(
        inner: Option<ResponseBody>,
        shape: Shape,
        provider: String,
        timeouts: Timeouts,
        max_event_bytes: usize,
        format: ClientFormat,
        started: Instant,
    ) -> Box<Self> {
        let mode = match shape {
            Shape::OpenAiEvents { strip_usage } => {
                Mode::Events(OpenAiEvents::new(max_event_bytes, strip_usage))
            }
            Shape::Decoded { decoder, encoder } => {
                Mode::Decoded(Translated::new(max_event_bytes, decoder, encoder))
            }
            Shape::Plain => Mode::Plain(UsageScan::default()),
            Shape::Ready(body) => Mode::Ready(Some(body)),
        };
        let event_stream = mode.is_event_stream();
        Box::new(Self {
            inner,
            copy: CacheCopy::new(matches!(mode, Mode::Events(_))),
            mode,
            provider,
            format,
            deadline: Deadline::new(timeouts, started, event_stream),
            state: State::Relaying,
            primed: None,
            record: None,
            whole: false,
            after_batch: None,
            end_hook: None,
            continuation: None,
            timeouts,
            continued_by: None,
        })
    }

    /// On a route that continues broken streams: a text stream that breaks
    /// after some text reached the client (and before any tool call) is
    /// continued by `continuation`'s target, its events spliced into this
    /// stream. Only for a re-encoded stream (`Shape::Decoded` with an
    /// encoder); otherwise nothing changes.
    pub fn continue_with(&mut self, continuation: Continuation) {
        if let Mode::Decoded(translated) = &mut self.mode {
            translated.keep_text();
            self.continuation = Some(continuation);
        }
    }

    /// Whether the body is an event stream (whose end is still to come once
    /// it is committed), rather than an answer that is whole once started.
    pub fn is_event_stream(&self) -> bool {
        self.mode.is_event_stream()
    }

    /// `hook` is told once how the body ends: whole, broken off, or dropped.
    pub fn on_body_end(&mut self, hook: EndHook) {
        self.end_hook = Some(hook);
    }

    fn tell_end(&mut self, end: BodyEnd<'_>) {
        if let Some(hook) = self.end_hook.take() {
            hook(end);
        }
    }

    /// Keeps a copy of the bytes sent to the client, to be stored in the
    /// response cache if the body ends whole (and the answer may be kept).
    pub fn capture(&mut self, capture: Capture) {
        self.copy.start(capture);
    }

    /// The answer is relayed but never stored (an encoded body: the cache
    /// keeps only the content type, and would replay it mislabelled).
    pub fn keep_out_of_cache(&mut self) {
        self.copy.keep_out();
    }

    /// Commits the body to a client request: from now on it writes that
    /// request's log line.
    pub fn attach(&mut self, mut record: Tracked) {
        if let Some(fb) = self.deadline.first_byte() {
            record.first_byte.get_or_insert(fb);
        }
        self.record = Some(record);
    }

    /// For event streams: reads until the first whole event, without sending
    /// anything, so that a stream which fails before its first event, or whose
    /// first event is an error, can still fail over invisibly to the client.
    pub async fn prime(&mut self) -> Result<(), UpstreamError> {
        if !self.mode.is_event_stream() {
            return Ok(());
        }
        std::future::poll_fn(|cx| self.poll_prime(cx)).await
    }

    fn poll_prime(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        loop {
            match poll_upstream(&mut self.inner, cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let out = self.on_chunk(data);
                    if let Mode::Decoded(translated) = &self.mode {
                        if let Some(message) = translated.error() {
                            return Poll::Ready(Err(UpstreamError::ErrorEvent {
                                provider: self.provider.clone(),
                                message: message.to_owned(),
                            }));
                        }
                    }
                    let out = match out {
                        Ok(out) => out,
                        Err(error) => return Poll::Ready(Err(error)),
                    };
                    if let Some(events) = out {
                        if let Some(message) = error_event(&events) {
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
                        detail: format!(
                            "stream failed before its first event: {}",
                            crate::upstream::error_chain(&e)
                        ),
                    }))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(UpstreamError::Transport {
                        provider: self.provider.clone(),
                        detail: "stream ended before its first event".to_owned(),
                    }))
                }
                Poll::Pending => {
                    return self
                        .deadline
                        .poll_expired(cx)
                        .map(|(kind, after)| Err(self.timeout(kind, after)));
                }
            }
        }
    }

    /// Time from the attempt's start to its first body chunk, once known.
    pub fn first_byte(&self) -> Option<Duration> {
        self.deadline.first_byte()
    }

    fn timeout(&self, kind: TimeoutKind, after: Duration) -> UpstreamError {
        UpstreamError::Timeout {
            provider: self.provider.clone(),
            kind,
            after,
        }
    }

    /// Takes one upstream chunk; returns the bytes for the client (if any),
    /// or why the upstream's stream cannot be used.
    fn on_chunk(&mut self, data: Bytes) -> Result<Option<Bytes>, UpstreamError> {
        self.deadline.on_bytes();
        let too_large = |e: EventTooLarge| UpstreamError::EventTooLarge {
            provider: self.provider.clone(),
            limit: e.limit,
        };
        let step = match &mut self.mode {
            Mode::Events(events) => events.push(data).map_err(too_large),
            Mode::Decoded(translated) => translated.push(data).map_err(|e| match e {
                Broken::TooLarge(e) => too_large(e),
                Broken::Decode(detail) => UpstreamError::Transport {
                    provider: self.provider.clone(),
                    detail,
                },
            }),
            Mode::Plain(scan) => {
                scan.push(&data);
                Ok(Step {
                    out: Some(data),
                    whole_event: true,
                })
            }
            Mode::Ready(_) => Ok(Step {
                out: None,
                whole_event: true,
            }),
        };
        // Until an event stream's first whole event, the first-byte deadline
        // stands; after it, every usable chunk restarts the idle limit.
        let step = step?;
        self.deadline.on_progress(step.whole_event);
        Ok(step.out)
    }

    /// The upstream body ended.
    fn on_end(&mut self, cx: &mut Context<'_>) -> Polled {
        let mut tail = None;
        let mut plain = None;
        match &mut self.mode {
            Mode::Events(events) => {
                if let Some(r) = &mut self.record {
                    r.usage = events.usage();
                }
                if let Err(unfinished) = events.finish() {
                    let detail = format!(
                        "stream ended before its end marker ({} chunks relayed)",
                        unfinished.chunks
                    );
                    return self.fail(
                        UpstreamError::Transport {
                            provider: self.provider.clone(),
                            detail,
                        },
                        cx,
                    );
                }
            }
            Mode::Decoded(translated) => {
                tail = match translated.finish() {
                    Ok(tail) => tail,
                    Err(e) => {
                        let detail = e.to_string();
                        return self.fail(
                            UpstreamError::Transport {
                                provider: self.provider.clone(),
                                detail,
                            },
                            cx,
                        );
                    }
                };
                if let Some(r) = &mut self.record {
                    r.usage = translated.usage();
                }
            }
            // Read with the record, after the write (below).
            Mode::Plain(scan) => plain = Some(std::mem::take(scan)),
            Mode::Ready(_) => {}
        }
        // A decoded stream without its end marker (or with an error event)
        // is relayed as it came, but is not an answer to keep.
        self.whole = match &self.mode {
            Mode::Decoded(translated) => translated.whole(),
            _ => true,
        };
        if self.whole {
            self.tell_end(BodyEnd::Whole);
            self.count_continuation("ok");
        } else {
            // Relayed as it came, but a failure of the target all the same
            // (a decoded stream: the others are whole once they end).
            let provider = self.provider.clone();
            let error = match &self.mode {
                Mode::Decoded(translated) => translated.error(),
                _ => None,
            };
            let error = match error {
                Some(message) => UpstreamError::ErrorEvent {
                    provider,
                    message: message.to_owned(),
                },
                None => UpstreamError::Transport {
                    provider,
                    detail: "stream ended before its end marker".to_owned(),
                },
            };
            let error = match self.start_continuation(error, tail.take()) {
                Ok(()) => return self.poll_state(cx),
                Err(error) => error,
            };
            self.tell_end(BodyEnd::Broke(&error));
            if let Mode::Decoded(translated) = &mut self.mode {
                if translated.held_error() {
                    // Held back for a continuation that did not come.
                    let event = translated.error_event(error.to_string());
                    tail = join(tail, event);
                }
            }
        }
        if !self.whole {
            self.count_continuation("broke");
        }
        if let Some(mut r) = self.record.take() {
            // The answer's usage, the log line, the metrics and the settled
            // limits wait until the client has the answer.
            crate::after_write::defer(move || {
                if let Some(usage) = plain.and_then(|scan| scan.usage()) {
                    r.usage = usage;
                }
                r.finish(Outcome::Ok);
            });
        }
        match tail {
            Some(bytes) => {
                self.state = State::Closing(bytes);
                self.poll_state(cx)
            }
            None => {
                self.state = State::Done;
                Poll::Ready(None)
            }
        }
    }

    /// Starts the continuation of a stream that broke with `error`, if the
    /// route continues streams and this one can be: `tail` (the broken
    /// stream's last bytes for the client) goes out first. Else gives the
    /// error back.
    fn start_continuation(
        &mut self,
        error: UpstreamError,
        tail: Option<Bytes>,
    ) -> Result<(), UpstreamError> {
        let text = match &self.mode {
            Mode::Decoded(translated) => translated.continuable_text(),
            _ => None,
        };
        let (Some(text), Some(_)) = (text, &self.continuation) else {
            return Err(error);
        };
        let text = text.to_owned();
        let Some(continuation) = self.continuation.take() else {
            return Err(error);
        };
        // The broken target failed, whoever finishes the answer.
        self.tell_end(BodyEnd::Broke(&error));
        if let Some(r) = &self.record {
            tracing::warn!(
                request_id = %r.request_id,
                provider = %self.provider,
                error = %error,
                "upstream failed after the response started: continuing on the next target"
            );
        }
        self.inner = None;
        self.primed = join(self.primed.take(), tail);
        self.state = State::Continuing(continuation(text), error);
        Ok(())
    }

    /// The continuation's stream replaces the broken one.
    fn resume(&mut self, resumed: Resumed) {
        let Resumed {
            body,
            decoder,
            provider,
            started,
        } = resumed;
        if let Mode::Decoded(translated) = &mut self.mode {
            translated.resume(decoder, serde_json::json!({ "continued_by": provider }));
        }
        self.inner = Some(body);
        self.deadline = Deadline::new(self.timeouts, started, true);
        if let Some(r) = &mut self.record {
            r.continued_by = Some(provider.clone());
        }
        self.provider.clone_from(&provider);
        self.continued_by = Some(provider);
        self.whole = false;
        self.state = State::Relaying;
    }

    /// Counts how a continued stream ended (no-op for one not continued).
    fn count_continuation(&self, outcome: &'static str) {
        if let (Some(provider), Some(r)) = (&self.continued_by, &self.record) {
            let route = r.route.as_deref().unwrap_or_default();
            crate::metrics::stream_continuation(route, provider, outcome);
        }
    }

    /// The upstream failed after the client got its headers.
    fn fail(&mut self, error: UpstreamError, cx: &mut Context<'_>) -> Polled {
        let error = match self.start_continuation(error, None) {
            Ok(()) => return self.poll_state(cx),
            Err(error) => error,
        };
        self.count_continuation("broke");
        self.tell_end(BodyEnd::Broke(&error));
        if let Some(r) = self.record.take() {
            tracing::warn!(
                request_id = %r.request_id,
                provider = %self.provider,
                error = %error,
                "upstream failed after the response started"
            );
            r.finish(broken_off_outcome(&error));
        }
        let error = GatewayError::Upstream(error);
        let event = match &mut self.mode {
            // Any partial event held back is dropped: the client gets only
            // whole events, then the error.
            Mode::Decoded(translated) => translated
                .error_event(error.to_string())
                .unwrap_or_else(|| stream_error_event(self.format, &error)),
            Mode::Events(_) => stream_error_event(self.format, &error),
            Mode::Plain(_) | Mode::Ready(_) => {
                // A plain body cannot carry an error once started: abort it so
                // the client sees an incomplete response, not a silent cut.
                self.state = State::Done;
                return Poll::Ready(Some(Err(std::io::Error::other(error.to_string()))));
            }
        };
        self.state = State::Closing(event);
        self.poll_state(cx)
    }

    fn poll_state(&mut self, cx: &mut Context<'_>) -> Polled {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Closing(event) => Poll::Ready(Some(Ok(Frame::data(event)))),
            State::Done => Poll::Ready(None),
            State::Relaying => {
                self.state = State::Relaying;
                Poll::Pending
            }
            State::Continuing(mut pending, error) => match pending.as_mut().poll(cx) {
                Poll::Pending => {
                    self.state = State::Continuing(pending, error);
                    // What the broken stream sent last goes out meanwhile.
                    match self.primed.take() {
                        Some(events) => Poll::Ready(Some(Ok(Frame::data(events)))),
                        None => Poll::Pending,
                    }
                }
                Poll::Ready(Ok(resumed)) => {
                    self.resume(resumed);
                    self.poll_relay(cx)
                }
                Poll::Ready(Err(failed)) => {
                    if let Some(r) = &self.record {
                        let route = r.route.as_deref().unwrap_or_default();
                        crate::metrics::stream_continuation(route, &failed.provider, "failed");
                        tracing::warn!(
                            request_id = %r.request_id,
                            provider = %failed.provider,
                            error = %failed.error,
                            "could not continue the broken stream"
                        );
                    }
                    self.state = State::Relaying;
                    self.fail(error, cx)
                }
            },
        }
    }

    /// Copies a frame into the cache copy, and hands the copy over to be
    /// stored when the body ended whole.
    fn keep(&mut self, out: Polled, cx: &mut Context<'_>) -> Polled {
        match &out {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.copy.on_data(data);
                }
            }
            Poll::Ready(end) => {
                let whole = end.is_none() && self.whole;
                if self.copy.on_end(whole, cx).is_pending() {
                    return Poll::Pending;
                }
            }
            Poll::Pending => {}
        }
        out
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Polled {
        if !matches!(self.state, State::Relaying) {
            return self.poll_state(cx);
        }
        if let Some(events) = self.primed.take() {
            return Poll::Ready(Some(Ok(Frame::data(events))));
        }
        if let Mode::Ready(body) = &mut self.mode {
            return match body.take() {
                Some(b) => {
                    // Finish now: hyper stops polling a body once its
                    // length is written, so a later end would never be seen.
                    let _ = self.on_end(cx);
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                None => self.on_end(cx),
            };
        }
        match self.after_batch.take() {
            Some(AfterBatch::End) => return self.on_end(cx),
            Some(AfterBatch::Fail(error)) => return self.fail(error, cx),
            None => {}
        }
        // Events that are ready together go out together; a plain body is
        // relayed chunk by chunk as it comes.
        let batching = self.mode.is_event_stream();
        let mut batch = Batch::default();
        loop {
            let after = match poll_upstream(&mut self.inner, cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not relayed; providers do not send them.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match self.on_chunk(data) {
                        Ok(Some(out)) if batching => {
                            batch.push(out);
                            if batch.len() < MAX_BATCH {
                                continue;
                            }
                            break;
                        }
                        Ok(Some(out)) => {
                            // The last chunk of a body of known length: finish
                            // now, as hyper will not poll for the end.
                            if self.inner.as_ref().is_none_or(Body::is_end_stream) {
                                let _ = self.on_end(cx);
                            }
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        Ok(None) => continue,
                        Err(error) => AfterBatch::Fail(error),
                    }
                }
                Poll::Ready(Some(Err(e))) => AfterBatch::Fail(UpstreamError::Transport {
                    provider: self.provider.clone(),
                    detail: crate::upstream::error_chain(&e),
                }),
                Poll::Ready(None) => AfterBatch::End,
                Poll::Pending if batch.len() > 0 => break,
                Poll::Pending => {
                    let Poll::Ready((kind, after)) = self.deadline.poll_expired(cx) else {
                        return Poll::Pending;
                    };
                    AfterBatch::Fail(self.timeout(kind, after))
                }
            };
            // The upstream ended or failed: the events before it go first.
            if batch.len() > 0 {
                self.after_batch = Some(after);
                break;
            }
            return match after {
                AfterBatch::End => self.on_end(cx),
                AfterBatch::Fail(error) => self.fail(error, cx),
            };
        }
        match batch.take() {
            Some(events) => Poll::Ready(Some(Ok(Frame::data(events)))),
            None => Poll::Pending,
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        self.tell_end(BodyEnd::Dropped);
    }
}

/// `a` then `b`, either possibly absent.
fn join(a: Option<Bytes>, b: Option<Bytes>) -> Option<Bytes> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let mut joined = bytes::BytesMut::with_capacity(a.len() + b.len());
            joined.extend_from_slice(&a);
            joined.extend_from_slice(&b);
            Some(joined.freeze())
        }
        (a, b) => a.or(b),
    }
}

/// The provider's next frame; the end at once when there is no provider body.
fn poll_upstream(
    inner: &mut Option<ResponseBody>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, crate::upstream::BodyError>>> {
    match inner {
        Some(body) => Pin::new(body).poll_frame(cx),
        None => Poll::Ready(None),
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        if let Some(stored) = this.copy.poll_storing(cx) {
            // The client's body ends once the answer is stored.
            return stored.map(|()| None);
        }
        let out = this.poll_relay(cx);
        if !this.copy.is_copying() {
            return out;
        }
        this.keep(out, cx)
    }

    fn is_end_stream(&self) -> bool {
        // With a copy to hand over, the end must be polled for.
        matches!(self.state, State::Done) && !self.copy.is_copying() && !self.copy.is_storing()
    }

    fn size_hint(&self) -> SizeHint {
        if self.copy.is_copying() {
            // No length: the client sees the end only after the answer is stored.
            return SizeHint::default();
        }
        match &self.mode {
            Mode::Plain(_) => self.inner.as_ref().map(Body::size_hint).unwrap_or_default(),
            Mode::Ready(Some(b)) => SizeHint::with_exact(b.len() as u64),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request's record (its line, metrics, settled limits and rollout
    /// cohort) is written once the connection's poll that wrote the answer
    /// returns, not before hyper has the answer's end in hand.
    #[tokio::test]
    async fn a_request_is_recorded_after_its_answer_is_written() {
        let rollout = crate::request::testing::rollout();
        let mut relay = RelayBody::new(
            None,
            Shape::Ready(Bytes::from_static(b"{}")),
            "p".to_owned(),
            Timeouts::default(),
            1024,
            ClientFormat::OpenAi,
            Instant::now(),
        );
        let mut record = crate::request::testing::tracked(&rollout, false);
        record.status = 200;
        relay.attach(record);
        let told = || rollout.view().stable.requests;
        let mut answered = false;
        let connection = crate::after_write::Scope::new(std::future::poll_fn(|cx| {
            let last = Pin::new(&mut *relay).poll_frame(cx);
            assert!(matches!(last, Poll::Ready(Some(Ok(_)))));
            assert!(relay.is_end_stream(), "the answer is whole");
            assert_eq!(told(), 0, "recorded before the answer was written");
            answered = true;
            Poll::Ready(())
        }));
        connection.await;
        assert!(answered);
        assert_eq!(told(), 1, "recorded once the poll that wrote it returned");
    }

    #[test]
    fn a_broken_off_stream_logs_which_limit_or_fault_ended_it() {
        let timeout = |kind| UpstreamError::Timeout {
            provider: "p".to_owned(),
            kind,
            after: Duration::from_secs(1),
        };
        let cases = [
            (timeout(TimeoutKind::Idle), "idle_timeout"),
            (timeout(TimeoutKind::Total), "total_timeout"),
            (timeout(TimeoutKind::FirstByte), "first_byte_timeout"),
            (
                UpstreamError::EventTooLarge {
                    provider: "p".to_owned(),
                    limit: 1,
                },
                "event_too_large",
            ),
            (
                UpstreamError::Transport {
                    provider: "p".to_owned(),
                    detail: "reset".to_owned(),
                },
                "upstream_broke_off",
            ),
        ];
        for (error, outcome) in cases {
            assert_eq!(broken_off_outcome(&error).as_str(), outcome, "{error}");
        }
    }
}
