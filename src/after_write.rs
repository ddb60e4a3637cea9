//! Work a request leaves for after its response is written: the answer's
//! usage read, its log line and metrics, its limits settled.
//!
//! nginx writes its access log in the log phase, once the response is out.
//! Here the same bookkeeping ran when the body ended, between the answer's
//! arrival and hyper's write of it to the client: about 7,000 instructions
//! on the request's path, on caches other processes emptied since the last
//! request (at 500 req/s, about a microsecond per thousand instructions of
//! added latency, measured). It still runs on the request's thread, before
//! the thread moves on, so it is late by the write and nothing else.
//!
//! [`Scope`] wraps a client connection's task: while it polls, [`defer`]
//! queues; when the poll returns (hyper has written what that poll produced,
//! as far as the client's socket took it), the queue runs, on the same
//! thread, before the task yields. Outside a scope (an HTTP/2 stream's own
//! task, a test driving a body by hand), [`defer`] runs the work at once.
//! Nothing queued is ever left: a scope's poll ends by running its queue,
//! even when it unwinds.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type Work = Box<dyn FnOnce()>;

thread_local! {
    /// Whether a [`Scope`] is polling on this thread.
    static OPEN: Cell<bool> = const { Cell::new(false) };
    /// What the polling scope runs when its poll returns.
    static QUEUE: RefCell<Vec<Work>> = const { RefCell::new(Vec::new()) };
}

/// Runs `work` once the connection polling on this thread has written what
/// this poll produced, or now if no [`Scope`] is polling here.
pub fn defer(work: impl FnOnce() + 'static) {
    if OPEN.with(Cell::get) {
        QUEUE.with(|q| q.borrow_mut().push(Box::new(work)));
    } else {
        work();
    }
}

/// A future (a client connection's task) whose polls run the work they
/// deferred when they return.
pub struct Scope<F> {
    inner: Pin<Box<F>>,
}

impl<F: Future> Scope<F> {
    pub fn new(inner: F) -> Self {
        Self {
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for Scope<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _open = Open::enter();
        self.inner.as_mut().poll(cx)
    }
}

/// This thread's scope while it polls; closing it runs the queue. Only the
/// outermost scope of a thread runs it (a scope polled inside another
/// leaves the queue to that one).
struct Open {
    outermost: bool,
}

impl Open {
    fn enter() -> Self {
        Self {
            outermost: !OPEN.with(|open| open.replace(true)),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        OPEN.with(|open| open.set(false));
        // Most polls end no request.
        if QUEUE.with(|q| q.borrow().is_empty()) {
            return;
        }
        // Taken out first: the work may defer more (it then runs at once,
        // the scope being closed) or poll a scope of its own.
        let mut work = QUEUE.with(|q| std::mem::take(&mut *q.borrow_mut()));
        for w in work.drain(..) {
            w();
        }
        // The emptied vector goes back, to keep its capacity.
        QUEUE.with(|q| {
            let mut q = q.borrow_mut();
            if q.is_empty() && q.capacity() < work.capacity() {
                *q = work;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;

    fn log() -> (
        Rc<RefCell<Vec<&'static str>>>,
        impl Fn(&'static str) + Clone,
    ) {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let s = Rc::clone(&seen);
        (seen, move |what| s.borrow_mut().push(what))
    }

    #[test]
    fn outside_a_scope_the_work_runs_at_once() {
        let (seen, note) = log();
        let n = note.clone();
        defer(move || n("deferred"));
        note("after");
        assert_eq!(*seen.borrow(), ["deferred", "after"]);
    }

    #[test]
    fn inside_a_scope_the_work_runs_when_the_poll_returns() {
        let (seen, note) = log();
        let mut polls = 0;
        let mut scope = std::pin::pin!(Scope::new(std::future::poll_fn(|_| {
            polls += 1;
            let n = note.clone();
            defer(move || n("deferred"));
            note("written");
            if polls == 2 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(scope.as_mut().poll(&mut cx).is_pending());
        assert_eq!(*seen.borrow(), ["written", "deferred"]);
        assert!(scope.as_mut().poll(&mut cx).is_ready());
        assert_eq!(
            *seen.borrow(),
            ["written", "deferred", "written", "deferred"]
        );
        assert!(!OPEN.with(Cell::get), "the scope is closed after its poll");
    }

    #[test]
    fn a_nested_scope_leaves_the_queue_to_the_outer_one() {
        let (seen, note) = log();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut outer = std::pin::pin!(Scope::new(std::future::poll_fn(|cx| {
            let n = note.clone();
            let mut inner = std::pin::pin!(Scope::new(std::future::poll_fn(|_| {
                let n = n.clone();
                defer(move || n("deferred"));
                Poll::Ready(())
            })));
            let _ = inner.as_mut().poll(cx);
            note("outer's poll ends");
            Poll::Ready(())
        })));
        let _ = outer.as_mut().poll(&mut cx);
        assert_eq!(*seen.borrow(), ["outer's poll ends", "deferred"]);
    }

    #[test]
    fn a_poll_that_panics_still_runs_what_it_deferred() {
        let (seen, note) = log();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let mut scope = std::pin::pin!(Scope::new(std::future::poll_fn(|_| {
                let n = note.clone();
                defer(move || n("deferred"));
                panic!("a bug in the connection's code");
                #[allow(unreachable_code)]
                Poll::<()>::Pending
            })));
            let _ = scope.as_mut().poll(&mut cx);
        }));
        assert!(result.is_err());
        assert_eq!(*seen.borrow(), ["deferred"]);
        assert!(!OPEN.with(Cell::get));
    }
}
