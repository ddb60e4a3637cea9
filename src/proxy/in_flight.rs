//! The attempts of one request that are in flight: almost always one, polled
//! as it is. A second one (a hedge, or a tentative attempt still running)
//! moves both into a [`FuturesUnordered`], which costs two allocations to
//! make, one more per attempt, and a waker of its own in front of each; a
//! request with one attempt pays none of that.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};

pub enum InFlight<'a, T> {
    Idle,
    One(BoxFuture<'a, T>),
    Many(FuturesUnordered<BoxFuture<'a, T>>),
}

impl<'a, T> InFlight<'a, T> {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Idle => 0,
            Self::One(_) => 1,
            Self::Many(set) => set.len(),
        }
    }

    pub fn push(&mut self, attempt: BoxFuture<'a, T>) {
        *self = match std::mem::replace(self, Self::Idle) {
            Self::Idle => Self::One(attempt),
            Self::One(first) => {
                let set = FuturesUnordered::new();
                set.push(first);
                set.push(attempt);
                Self::Many(set)
            }
            Self::Many(set) => {
                set.push(attempt);
                Self::Many(set)
            }
        };
    }

    /// The next attempt to end; `None` when none is in flight.
    pub async fn next(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match self {
            Self::Idle => Poll::Ready(None),
            Self::One(attempt) => match attempt.as_mut().poll(cx) {
                Poll::Ready(ended) => {
                    *self = Self::Idle;
                    Poll::Ready(Some(ended))
                }
                Poll::Pending => Poll::Pending,
            },
            Self::Many(set) => set.poll_next_unpin(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::time::Duration;

    #[tokio::test]
    async fn one_then_many_end_in_the_order_they_finish() {
        let mut set: InFlight<'_, u32> = InFlight::Idle;
        assert!(set.is_empty());
        assert_eq!(set.next().await, None);
        set.push(async { 1 }.boxed());
        assert!(matches!(set, InFlight::One(_)));
        assert_eq!(set.next().await, Some(1));
        assert!(set.is_empty());

        let slow = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            2
        };
        set.push(slow.boxed());
        set.push(async { 3 }.boxed());
        assert!(matches!(set, InFlight::Many(_)));
        assert_eq!(set.len(), 2);
        assert_eq!(set.next().await, Some(3), "the quick one first");
        set.push(async { 4 }.boxed());
        assert_eq!(set.next().await, Some(4));
        assert_eq!(set.next().await, Some(2));
        assert!(set.is_empty());
        assert_eq!(set.next().await, None);
    }

    /// A pending attempt stays in the set, and a second one joins it.
    #[tokio::test]
    async fn a_pending_attempt_is_kept_when_a_second_joins() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let mut set = InFlight::Idle;
        set.push(async move { rx.await.unwrap_or(0) }.boxed());
        assert!(set.next().now_or_never().is_none(), "still pending");
        set.push(async { 7 }.boxed());
        assert_eq!(set.next().await, Some(7));
        tx.send(5).unwrap();
        assert_eq!(set.next().await, Some(5));
    }
}
