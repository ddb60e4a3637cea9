//! The response cache's copy of a relayed answer: a bounded copy of the
//! frames the client is sent, handed over to be stored when the body ends
//! whole, and dropped when it does not (cut short, failed, too large, or an
//! OpenAI stream that carried an error event yet ended with `[DONE]`).
//! The client's body ends only once the answer is stored, so the next
//! identical request finds it.

use std::task::{Context, Poll};

use bytes::Bytes;

use crate::cache::{BoxFuture, Capture};

use super::framing::has_error_event;

/// Where the copy goes: [`Capture`] in the gateway, a fake in tests.
pub trait Keep: Send {
    /// Keeps `data`; false once the answer outgrew the bound.
    fn push(&mut self, data: &Bytes) -> bool;
    /// The body ended whole: stores the answer.
    fn finish(self) -> BoxFuture<'static, ()>;
}

impl Keep for Capture {
    fn push(&mut self, data: &Bytes) -> bool {
        Capture::push(self, data)
    }

    fn finish(self) -> BoxFuture<'static, ()> {
        Capture::finish(self)
    }
}

/// The copy of one relayed body, and its storing once the body ended whole.
pub struct CacheCopy<K = Capture> {
    kept: Option<K>,
    storing: Option<BoxFuture<'static, ()>>,
    /// False for an answer the cache must not keep.
    cacheable: bool,
    /// The frames are OpenAI events, scanned for an error event.
    scan_errors: bool,
}

impl<K: Keep> CacheCopy<K> {
    /// `scan_errors` for an OpenAI event stream relayed as it came: such a
    /// stream can carry an error event and still end with `[DONE]`.
    pub fn new(scan_errors: bool) -> Self {
        Self {
            kept: None,
            storing: None,
            cacheable: true,
            scan_errors,
        }
    }

    /// Starts copying (unless the answer was kept out of the cache).
    pub fn start(&mut self, keep: K) {
        if self.cacheable {
            self.kept = Some(keep);
        }
    }

    /// The answer is relayed but never stored.
    pub fn keep_out(&mut self) {
        self.cacheable = false;
        self.kept = None;
    }

    /// A copy is being made: the end of the body must be polled for.
    pub fn is_copying(&self) -> bool {
        self.kept.is_some()
    }

    /// The answer is being stored.
    pub fn is_storing(&self) -> bool {
        self.storing.is_some()
    }

    /// Drives a store in progress: `Some(Ready)` once it is done, `None`
    /// when there is none.
    pub fn poll_storing(&mut self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        let storing = self.storing.as_mut()?;
        if storing.as_mut().poll(cx).is_pending() {
            return Some(Poll::Pending);
        }
        self.storing = None;
        Some(Poll::Ready(()))
    }

    /// Copies a data frame sent to the client.
    pub fn on_data(&mut self, data: &Bytes) {
        if let Some(kept) = &mut self.kept {
            let error = self.scan_errors && has_error_event(data);
            if error || !kept.push(data) {
                self.kept = None;
            }
        }
    }

    /// The body ended (`whole` if normally and whole) or failed: stores the
    /// copy of a whole answer, drops any other. Pending while storing.
    pub fn on_end(&mut self, whole: bool, cx: &mut Context<'_>) -> Poll<()> {
        let Some(kept) = self.kept.take() else {
            return Poll::Ready(());
        };
        if !whole {
            return Poll::Ready(());
        }
        let mut storing = kept.finish();
        if storing.as_mut().poll(cx).is_pending() {
            self.storing = Some(storing);
            return Poll::Pending;
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, OnceLock};

    use super::*;

    /// A copy bounded at `max` bytes that records what it stores.
    struct Fake {
        parts: Vec<Bytes>,
        len: usize,
        max: usize,
        stored: Arc<OnceLock<Vec<u8>>>,
        /// The store takes one extra poll.
        slow: bool,
    }

    impl Keep for Fake {
        fn push(&mut self, data: &Bytes) -> bool {
            self.len += data.len();
            self.parts.push(data.clone());
            self.len <= self.max
        }

        fn finish(self) -> BoxFuture<'static, ()> {
            let stored = self.stored.clone();
            let body = self.parts.concat();
            let slow = self.slow;
            Box::pin(async move {
                if slow {
                    tokio::task::yield_now().await;
                }
                let _ = stored.set(body);
            })
        }
    }

    fn copy(
        scan_errors: bool,
        max: usize,
        slow: bool,
    ) -> (CacheCopy<Fake>, Arc<OnceLock<Vec<u8>>>) {
        let stored = Arc::new(OnceLock::new());
        let mut c = CacheCopy::new(scan_errors);
        c.start(Fake {
            parts: Vec::new(),
            len: 0,
            max,
            stored: stored.clone(),
            slow,
        });
        (c, stored)
    }

    fn stored(s: &Arc<OnceLock<Vec<u8>>>) -> Option<Vec<u8>> {
        s.get().cloned()
    }

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[test]
    fn a_whole_answer_is_stored() {
        let (mut c, s) = copy(false, 100, false);
        c.on_data(&Bytes::from_static(b"ab"));
        c.on_data(&Bytes::from_static(b"cd"));
        assert!(c.is_copying());
        assert_eq!(c.on_end(true, &mut cx()), Poll::Ready(()));
        assert_eq!(stored(&s).as_deref(), Some(&b"abcd"[..]));
        assert!(!c.is_copying());
    }

    #[test]
    fn an_answer_that_did_not_end_whole_is_dropped() {
        let (mut c, s) = copy(false, 100, false);
        c.on_data(&Bytes::from_static(b"ab"));
        assert_eq!(c.on_end(false, &mut cx()), Poll::Ready(()));
        assert_eq!(stored(&s), None);
    }

    #[test]
    fn an_answer_over_the_bound_is_dropped() {
        let (mut c, s) = copy(false, 3, false);
        c.on_data(&Bytes::from_static(b"abcd"));
        assert!(!c.is_copying());
        let _ = c.on_end(true, &mut cx());
        assert_eq!(stored(&s), None);
    }

    #[test]
    fn an_openai_stream_with_an_error_event_is_dropped() {
        let error = Bytes::from_static(b"data: {\"error\":{\"message\":\"x\"}}\n\n");
        let (mut c, s) = copy(true, 1000, false);
        c.on_data(&error);
        let _ = c.on_end(true, &mut cx());
        assert_eq!(stored(&s), None);
        let (mut unscanned, s) = copy(false, 1000, false);
        unscanned.on_data(&error);
        let _ = unscanned.on_end(true, &mut cx());
        assert!(
            stored(&s).is_some(),
            "only OpenAI event streams are scanned"
        );
    }

    #[test]
    fn a_slow_store_is_driven_to_its_end() {
        let (mut c, s) = copy(false, 100, true);
        c.on_data(&Bytes::from_static(b"ab"));
        assert_eq!(c.on_end(true, &mut cx()), Poll::Pending);
        assert!(c.is_storing());
        assert_eq!(c.poll_storing(&mut cx()), Some(Poll::Ready(())));
        assert!(!c.is_storing());
        assert_eq!(c.poll_storing(&mut cx()), None);
        assert_eq!(stored(&s).as_deref(), Some(&b"ab"[..]));
    }

    #[test]
    fn an_answer_kept_out_is_never_copied() {
        let (mut c, s) = copy(false, 100, false);
        c.keep_out();
        assert!(!c.is_copying());
        c.start(Fake {
            parts: Vec::new(),
            len: 0,
            max: 100,
            stored: s.clone(),
            slow: false,
        });
        assert!(!c.is_copying());
    }
}
