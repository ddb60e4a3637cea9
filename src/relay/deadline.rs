//! The timers of a relayed body: first byte, idle and total.
//!
//! An event stream must deliver its first *whole event* before the attempt's
//! first-byte deadline (bytes that complete no event do not buy time); after
//! that, every chunk restarts the idle limit. A plain body's first byte is
//! its headers, which already arrived, so its idle limit runs from the
//! start. Nothing ever runs past the total deadline. One `Sleep` is reset
//! rather than three kept, and only when it must be: a chunk that pushes the
//! idle limit later only notes when it came, and the timer, when it fires,
//! moves itself on to the limit's new end (a reset re-registers the timer
//! with the runtime, which a stream would otherwise pay per event).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::config::Timeouts;
use crate::upstream::TimeoutKind;

pub struct Deadline {
    timer: Pin<Box<Sleep>>,
    timeouts: Timeouts,
    started: Instant,
    total: Instant,
    event_stream: bool,
    /// When the idle limit last restarted, if that is later than the timer
    /// was last set for; the timer catches up when it fires.
    idle_from: Option<Instant>,
    got_first_chunk: bool,
    /// An event stream's first whole event arrived (until then the
    /// first-byte deadline holds).
    got_first_event: bool,
    first_byte: Option<Duration>,
}

impl Deadline {
    /// `started` is when the attempt began.
    pub fn new(timeouts: Timeouts, started: Instant, event_stream: bool) -> Self {
        let total = started + timeouts.total;
        let first = if event_stream {
            started + timeouts.first_byte
        } else {
            Instant::now() + timeouts.idle
        };
        Self {
            timer: Box::pin(tokio::time::sleep_until(first.min(total))),
            timeouts,
            started,
            total,
            event_stream,
            idle_from: None,
            got_first_chunk: false,
            got_first_event: false,
            // A plain body's first byte is its headers, which just arrived.
            first_byte: (!event_stream).then(|| started.elapsed()),
        }
    }

    /// A body chunk arrived; `whole_event` if it completed an event (for a
    /// plain body, every chunk does).
    pub fn on_chunk(&mut self, whole_event: bool) {
        self.on_bytes();
        self.on_progress(whole_event);
    }

    /// Bytes arrived (even ones that turn out unusable): the first byte is
    /// timed.
    pub fn on_bytes(&mut self) {
        if !self.got_first_chunk {
            self.got_first_chunk = true;
            self.first_byte = Some(Instant::now().duration_since(self.started));
        }
    }

    /// Usable bytes arrived: once the first whole event has, each restarts
    /// the idle limit.
    pub fn on_progress(&mut self, whole_event: bool) {
        self.got_first_event |= whole_event;
        if self.got_first_event {
            let now = Instant::now();
            let due = (now + self.timeouts.idle).min(self.total);
            if due < self.timer.deadline() {
                // Sooner than the timer is set for (the first event, when
                // the idle limit is shorter than what was left of the
                // first-byte one): set it now.
                self.timer.as_mut().reset(due);
                self.idle_from = None;
            } else {
                self.idle_from = Some(now);
            }
        }
    }

    /// Time from the attempt's start to its first body chunk, once known.
    pub fn first_byte(&self) -> Option<Duration> {
        self.first_byte
    }

    /// Ready with the limit that ran out (and its length) once one has.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<(TimeoutKind, Duration)> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: at the end of the limit, unless chunks since moved it.
            let Some(from) = self.idle_from.take() else {
                break;
            };
            let due = (from + self.timeouts.idle).min(self.total);
            if due <= self.timer.deadline() {
                break;
            }
            self.timer.as_mut().reset(due);
        }
        let kind = if Instant::now() >= self.total {
            TimeoutKind::Total
        } else if !self.got_first_event && self.event_stream {
            TimeoutKind::FirstByte
        } else {
            TimeoutKind::Idle
        };
        let limit = match kind {
            TimeoutKind::Total => self.timeouts.total,
            TimeoutKind::FirstByte | TimeoutKind::Connect => self.timeouts.first_byte,
            TimeoutKind::Idle => self.timeouts.idle,
        };
        Poll::Ready((kind, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        first_byte: Duration::from_secs(10),
        idle: Duration::from_secs(3),
        total: Duration::from_secs(60),
    };

    /// Whether the deadline has run out, without waiting.
    fn expired(d: &mut Deadline) -> Option<TimeoutKind> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match d.poll_expired(&mut cx) {
            Poll::Ready((kind, _)) => Some(kind),
            Poll::Pending => None,
        }
    }

    async fn advance(secs: u64) {
        tokio::time::advance(Duration::from_secs(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_stream_has_its_first_byte_limit_until_a_whole_event() {
        let mut d = Deadline::new(TIMEOUTS, Instant::now(), true);
        advance(9).await;
        d.on_chunk(false);
        assert_eq!(d.first_byte(), Some(Duration::from_secs(9)));
        advance(1).await;
        assert_eq!(
            expired(&mut d),
            Some(TimeoutKind::FirstByte),
            "a partial event buys no time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_whole_event_each_chunk_restarts_the_idle_limit() {
        let mut d = Deadline::new(TIMEOUTS, Instant::now(), true);
        assert_eq!(d.first_byte(), None);
        advance(5).await;
        d.on_chunk(true);
        advance(2).await;
        d.on_chunk(false);
        advance(2).await;
        assert_eq!(expired(&mut d), None);
        advance(1).await;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert_eq!(
            d.poll_expired(&mut cx),
            Poll::Ready((TimeoutKind::Idle, TIMEOUTS.idle))
        );
    }

    /// The timer is moved on lazily: it still fires at the end of the idle
    /// limit counted from the last chunk, however many chunks came, and a
    /// limit that ran out is reported again if polled again.
    #[tokio::test(start_paused = true)]
    async fn the_idle_limit_counts_from_the_last_of_many_chunks() {
        let long = Timeouts {
            first_byte: Duration::from_secs(2),
            ..TIMEOUTS
        };
        let mut d = Deadline::new(long, Instant::now(), true);
        d.on_chunk(true);
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(500)).await;
            d.on_chunk(true);
            assert_eq!(expired(&mut d), None);
        }
        advance(2).await;
        assert_eq!(expired(&mut d), None, "2 s after the last chunk");
        advance(1).await;
        assert_eq!(expired(&mut d), Some(TimeoutKind::Idle));
        assert_eq!(expired(&mut d), Some(TimeoutKind::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_body_runs_on_idle_from_the_start() {
        let start = Instant::now();
        advance(1).await;
        let mut d = Deadline::new(TIMEOUTS, start, false);
        assert_eq!(d.first_byte(), Some(Duration::from_secs(1)), "its headers");
        advance(2).await;
        assert_eq!(expired(&mut d), None);
        advance(1).await;
        assert_eq!(expired(&mut d), Some(TimeoutKind::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_runs_past_the_total_deadline() {
        let mut d = Deadline::new(TIMEOUTS, Instant::now(), true);
        for _ in 0..29 {
            advance(2).await;
            d.on_chunk(true);
            assert_eq!(expired(&mut d), None);
        }
        advance(2).await;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert_eq!(
            d.poll_expired(&mut cx),
            Poll::Ready((TimeoutKind::Total, TIMEOUTS.total))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unusable_bytes_are_timed_but_buy_no_time() {
        let mut d = Deadline::new(TIMEOUTS, Instant::now(), true);
        d.on_chunk(true);
        advance(2).await;
        d.on_bytes();
        assert_eq!(
            d.first_byte(),
            Some(Duration::ZERO),
            "the first chunk's time stays"
        );
        advance(1).await;
        assert_eq!(expired(&mut d), Some(TimeoutKind::Idle));
    }
}
