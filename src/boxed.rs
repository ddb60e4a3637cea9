//! Futures boxed where they are made.
//!
//! `Box::pin(make())` builds the future beside the box and then copies it
//! in, whole: an `async` state machine is as large as its largest state
//! (kilobytes on the request path), even though its unstarted state holds
//! only its arguments. [`in_place`] allocates first, so that the future can
//! be written straight into the box (the compiler does, in release builds):
//! the per-request copy of the request's future and of each attempt's
//! futures goes away.

use std::pin::Pin;

/// `make()` in a box allocated before it is made.
pub fn in_place<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let slot = Box::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_boxed_future_runs_as_made() {
        let n = 41;
        let fut = super::in_place(|| async move { n + 1 });
        assert_eq!(fut.await, 42);
    }
}
