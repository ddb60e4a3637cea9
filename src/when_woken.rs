//! A future polled only when it asked to be: after its own waker fired (and
//! once at the start, so that it can register that waker).
//!
//! A client connection's task waits on its connection and, beside it, on a
//! watchdog timer and the shutdown signal. `select!` polls every branch each
//! time the task wakes, and the task wakes for each socket event of each
//! request, on the request's path; the timer and the signal have almost never
//! changed. Wrapped in [`WhenWoken`], they are skipped on those polls for the
//! price of one atomic swap (nginx's event loop does the same: a timer is
//! looked at when it expires, not on every event).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// `inner`, polled only after its own waker fired.
pub struct WhenWoken<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Signal>,
    /// The waker `inner` is polled with: it sets `signal.woken`, then wakes
    /// the task that polls this.
    waker: Waker,
}

struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    pub fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            // The first poll polls `inner`, which registers its waker.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            inner: Box::pin(inner),
            waker: Waker::from(Arc::clone(&signal)),
            signal,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read, so a wake between the two is
        // not lost (AtomicWaker keeps the waker it has when it will wake the
        // same task).
        self.signal.task.register(cx.waker());
        if !self.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    use super::*;

    /// Counts its polls; ready once `ready` is set, registering the waker
    /// it was given for the setter to wake.
    fn counted(
        polls: Rc<Cell<u32>>,
        ready: Rc<Cell<bool>>,
        waker: Rc<std::cell::RefCell<Option<Waker>>>,
    ) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            polls.set(polls.get() + 1);
            if ready.get() {
                return Poll::Ready(());
            }
            *waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    #[test]
    fn it_is_polled_first_then_only_after_its_own_waker_fired() {
        let (polls, ready, waker) = Default::default();
        let mut f = std::pin::pin!(WhenWoken::new(counted(
            Rc::clone(&polls),
            Rc::clone(&ready),
            Rc::clone(&waker),
        )));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(f.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.get(), 1, "the first poll reaches the inner future");
        for _ in 0..5 {
            assert!(f.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.get(), 1, "polls for other reasons skip it");
        ready.set(true);
        waker.borrow().as_ref().map(Waker::wake_by_ref);
        assert!(f.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_inside_still_wakes_the_task_that_polls_it() {
        let timer = WhenWoken::new(tokio::time::sleep(Duration::from_secs(5)));
        let started = tokio::time::Instant::now();
        let fired = tokio::time::timeout(Duration::from_secs(60), timer).await;
        assert!(fired.is_ok(), "the timer's wake reached the task");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_wake_from_another_thread_reaches_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let sender = std::thread::spawn(move || {
            let _ = wait.recv();
            let _ = tx.send(7);
        });
        let mut waiting = std::pin::pin!(WhenWoken::new(rx));
        let pending =
            std::future::poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "nothing was sent before the first poll");
        let _ = go.send(());
        let got = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(got.ok().and_then(Result::ok), Some(7));
        let _ = sender.join();
    }
}
