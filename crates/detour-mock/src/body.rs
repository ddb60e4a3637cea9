//! Request bodies read whole (bounded), replies, and the response body type, including
//! the paced, cuttable SSE body.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// Per-request inputs that do not come from the request itself.
pub(crate) struct Ctx<'a> {
    pub seed: u64,
    /// Arrival number of the request, for ids.
    pub seq: u64,
    /// OpenAI's `system_fingerprint`.
    pub fingerprint: &'a str,
    /// Content pieces per streamed answer.
    pub chunks: usize,
    /// The request id the flavor puts in its headers (and Anthropic in error bodies).
    pub request_id: &'a str,
}

/// What a flavor or the control API wants to send, before pacing and faults are applied.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub payload: Payload,
}

pub(crate) enum Payload {
    /// A complete `application/json` body.
    Json(Bytes),
    /// A body sent one event at a time (SSE, or Gemini's JSON-array stream).
    Stream(Stream),
    /// Any other complete body (the status page's HTML errors).
    Other {
        content_type: &'static str,
        body: Bytes,
    },
}

/// A streamed answer, and where it can be broken off by `stream_error_after_chunks`.
pub(crate) struct Stream {
    pub content_type: &'static str,
    /// One complete event per item (for SSE `data: ...\n\n`, with `event:` if any).
    pub events: Vec<Bytes>,
    /// `breaks[k]` is the number of events sent once `k` content chunks have been
    /// sent: `breaks[0]` is right after the opening event(s), the last entry is where
    /// the content ends and the finish begins.
    pub breaks: Vec<usize>,
    /// The provider's mid-stream error event: `[0]` when it is the very first event,
    /// `[1]` otherwise (they differ only for JSON-array streams).
    pub error: [&'static [u8]; 2],
}

impl Stream {
    /// Keeps the events up to `k` content chunks (all the content if there are fewer),
    /// then the error event; the finish and terminator never come.
    pub(crate) fn fail_after(&mut self, k: usize) {
        let at = self
            .breaks
            .get(k)
            .or(self.breaks.last())
            .copied()
            .unwrap_or(0)
            .min(self.events.len());
        self.events.truncate(at);
        let error = if at == 0 {
            self.error[0]
        } else {
            self.error[1]
        };
        self.events.push(Bytes::from_static(error));
    }
}

impl Reply {
    pub(crate) fn json(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            payload: Payload::Json(body.into()),
        }
    }

    pub(crate) fn stream(stream: Stream) -> Self {
        Self {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            payload: Payload::Stream(stream),
        }
    }

    pub(crate) fn other(status: StatusCode, content_type: &'static str, body: Bytes) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            payload: Payload::Other { content_type, body },
        }
    }
}

/// The body of every mock response: either one buffer, or a paced event stream.
pub(crate) enum MockBody {
    Full(Option<Bytes>),
    Sse(SseBody),
}

impl MockBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            Self::Full(None)
        } else {
            Self::Full(Some(bytes))
        }
    }

    pub(crate) fn empty() -> Self {
        Self::Full(None)
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Sse(sse) => sse.poll_event(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Sse(sse) => sse.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Sse(_) => SizeHint::default(),
        }
    }
}

/// Sends events one frame at a time: `first_delay` before the first, `gap` between the
/// rest. With `cut_after`, it ends with an error after that many events, which makes
/// hyper abort the connection (HTTP/1: no terminating chunk; HTTP/2: `RST_STREAM`).
pub(crate) struct SseBody {
    events: std::vec::IntoIter<Bytes>,
    delay: Duration,
    gap: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    timer_armed: bool,
    cut_after: Option<usize>,
    sent: usize,
    cut_yielded: bool,
    /// After the events: one event that never ends (the `endless_event_after` fault).
    endless: Option<Endless>,
}

/// The never-ending event: `data: ` and then 64 KiB of payload at a time, no blank line.
struct Endless {
    started: bool,
    filler: Bytes,
}

/// Bytes per frame of an endless event.
const ENDLESS_CHUNK: usize = 64 * 1024;
/// The shortest pause between two frames of an endless event.
const ENDLESS_MIN_GAP: Duration = Duration::from_millis(2);

impl SseBody {
    pub(crate) fn new(
        events: Vec<Bytes>,
        first_delay: Duration,
        gap: Duration,
        cut_after: Option<usize>,
    ) -> Self {
        Self {
            events: events.into_iter(),
            delay: first_delay,
            gap,
            timer: None,
            timer_armed: false,
            cut_after,
            sent: 0,
            cut_yielded: false,
            endless: None,
        }
    }

    /// Ends the events with one that never ends.
    pub(crate) fn endless(mut self) -> Self {
        self.endless = Some(Endless {
            started: false,
            filler: Bytes::from(vec![b'x'; ENDLESS_CHUNK]),
        });
        self
    }

    fn cutting(&self) -> bool {
        self.cut_after.is_some_and(|n| self.sent >= n)
    }

    fn is_done(&self) -> bool {
        !self.cutting() && self.events.len() == 0 && self.endless.is_none()
    }

    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.is_done() {
            return Poll::Ready(None);
        }
        if !self.delay.is_zero() {
            if !self.timer_armed {
                let deadline = Instant::now() + self.delay;
                match &mut self.timer {
                    Some(timer) => timer.as_mut().reset(deadline),
                    None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                self.timer_armed = true;
            }
            if let Some(timer) = &mut self.timer {
                ready!(timer.as_mut().poll(cx));
            }
            self.timer_armed = false;
            self.delay = Duration::ZERO;
        }
        if self.cutting() {
            if !self.cut_yielded {
                // Return Pending once so hyper flushes the events already buffered;
                // an error now would drop them along with the connection.
                self.cut_yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "mock fault: stream cut",
            ))));
        }
        match self.events.next() {
            Some(event) => {
                self.sent += 1;
                self.delay = self.gap;
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            None => match &mut self.endless {
                Some(endless) => {
                    self.delay = self.gap.max(ENDLESS_MIN_GAP);
                    let chunk = if endless.started {
                        endless.filler.clone()
                    } else {
                        endless.started = true;
                        let mut first = b"data: ".to_vec();
                        first.extend_from_slice(&endless.filler);
                        Bytes::from(first)
                    };
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                None => Poll::Ready(None),
            },
        }
    }
}

const MAX_BODY_BYTES: usize = 32 << 20;

/// The body, or the status and message to refuse it with.
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, (StatusCode, String)> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "mock: request body is larger than 32 MiB".to_owned(),
        )),
        Err(error) => Err((
            StatusCode::BAD_REQUEST,
            format!("mock: could not read the request body: {error}"),
        )),
    }
}
