//! Admission under overload, by tier.
//!
//! At most `limit` requests are in flight. Below the limit, admission is one
//! atomic increment. At the limit, a request waits in its tier's queue for at
//! most its tier's queue timeout (`critical` longest, `sheddable` not at all);
//! a freed slot goes to the highest tier waiting, oldest first. When the
//! queues are full, a newcomer takes the place of the lowest-tier waiter below
//! its own tier; if there is none, it is shed. So under overload the lowest
//! tier is shed first and the top tier keeps its slots: priority that holds.
//! Requests never wait past their timeout: a shed answer is fast and clear
//! (fail fast, as Linkerd's `failfast` does, instead of queueing forever).
//!
//! One `Admission` serves the process: a reload changes its limit and queue
//! timeout ([`Admission::retune`]) while the requests in flight and waiting
//! keep their places.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::Tier;

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const GONE: u8 = 2;

#[derive(Debug)]
struct Waiter {
    state: AtomicU8,
    wake: Notify,
}

#[derive(Debug)]
pub struct Admission {
    limit: AtomicUsize,
    max_queue: AtomicUsize,
    /// Queue timeout per tier, in microseconds.
    timeouts_us: [AtomicU64; 3],
    in_flight: AtomicUsize,
    // Taken only at capacity (overload), never across an await.
    #[allow(clippy::disallowed_types)]
    queues: std::sync::Mutex<[VecDeque<Arc<Waiter>>; 3]>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// No slot and the tier does not wait (or its wait ended).
    Full,
    /// A higher tier took its place in the queue.
    Displaced,
}

/// A slot; freeing it passes it to the best waiter.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release();
    }
}

fn rank(tier: Tier) -> usize {
    match tier {
        Tier::Critical => 0,
        Tier::Standard => 1,
        Tier::Sheddable => 2,
    }
}

impl Admission {
    /// `queue_timeout` is the critical tier's; standard waits half of it and
    /// sheddable not at all.
    pub fn new(limit: usize, queue_timeout: Duration) -> Self {
        let a = Self {
            limit: AtomicUsize::new(1),
            max_queue: AtomicUsize::new(16),
            timeouts_us: Default::default(),
            in_flight: AtomicUsize::new(0),
            #[allow(clippy::disallowed_types)]
            queues: std::sync::Mutex::new(Default::default()),
        };
        a.set(limit, queue_timeout);
        a
    }

    fn set(&self, limit: usize, queue_timeout: Duration) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.limit.store(limit.max(1), SeqCst);
        // Waiters cost a few bytes each; a deeper queue than the limit lets
        // bursts ride through instead of being shed.
        self.max_queue.store((4 * limit).max(16), SeqCst);
        let timeouts = [queue_timeout, queue_timeout / 2, Duration::ZERO];
        for (slot, t) in self.timeouts_us.iter().zip(timeouts) {
            slot.store(us(t), SeqCst);
        }
    }

    /// Applies a new config's limit and queue timeout. Requests in flight
    /// keep their slots (a lower limit admits no one until they end); a
    /// higher one admits waiters at once. Waiters keep the timeout they
    /// started with.
    pub fn retune(&self, limit: usize, queue_timeout: Duration) {
        self.set(limit, queue_timeout);
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        'grant: for queue in queues.iter_mut() {
            while let Some(w) = queue.front() {
                if !self.try_fast() {
                    break 'grant;
                }
                let granted = w
                    .state
                    .compare_exchange(WAITING, GRANTED, SeqCst, SeqCst)
                    .is_ok();
                if granted {
                    w.wake.notify_one();
                } else {
                    self.in_flight.fetch_sub(1, SeqCst);
                }
                queue.pop_front();
            }
        }
    }

    pub fn limit(&self) -> usize {
        self.limit.load(SeqCst)
    }

    /// Requests waiting in the queues (cold path: takes the queues' lock).
    pub fn waiting(&self) -> usize {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues
            .iter()
            .flatten()
            .filter(|w| w.state.load(SeqCst) == WAITING)
            .count()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    fn try_fast(&self) -> bool {
        self.in_flight
            .fetch_update(SeqCst, SeqCst, |n| (n < self.limit()).then_some(n + 1))
            .is_ok()
    }

    pub async fn acquire(self: &Arc<Self>, tier: Tier) -> Result<Permit, Shed> {
        if self.try_fast() {
            return Ok(Permit {
                admission: Arc::clone(self),
            });
        }
        let timeout = Duration::from_micros(self.timeouts_us[rank(tier)].load(SeqCst));
        let waiter = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            // A slot may have freed while we took the lock.
            if self.try_fast() {
                return Ok(Permit {
                    admission: Arc::clone(self),
                });
            }
            if timeout.is_zero() {
                return Err(Shed::Full);
            }
            let queued: usize = queues.iter().map(VecDeque::len).sum();
            if queued >= self.max_queue.load(SeqCst) {
                // Make room by shedding the newest waiter of the lowest tier
                // below ours; else we are the one shed.
                let victim = (rank(tier) + 1..3).rev().find_map(|r| queues[r].pop_back());
                match victim {
                    Some(v) => {
                        v.state.store(GONE, SeqCst);
                        v.wake.notify_one();
                    }
                    None => return Err(Shed::Full),
                }
            }
            let w = Arc::new(Waiter {
                state: AtomicU8::new(WAITING),
                wake: Notify::new(),
            });
            queues[rank(tier)].push_back(Arc::clone(&w));
            w
        };
        let woke = tokio::time::timeout(timeout, waiter.wake.notified()).await;
        let permit = Permit {
            admission: Arc::clone(self),
        };
        if woke.is_err() {
            // Timed out; unless a slot was granted at the same moment.
            if waiter
                .state
                .compare_exchange(WAITING, GONE, SeqCst, SeqCst)
                .is_ok()
            {
                std::mem::forget(permit);
                return Err(Shed::Full);
            }
        }
        match waiter.state.load(SeqCst) {
            GRANTED => Ok(permit),
            _ => {
                std::mem::forget(permit);
                Err(Shed::Displaced)
            }
        }
    }

    /// A slot is free: hand it to the best waiter, or give it back.
    fn release(&self) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for queue in queues.iter_mut() {
            while let Some(w) = queue.pop_front() {
                if w.state
                    .compare_exchange(WAITING, GRANTED, SeqCst, SeqCst)
                    .is_ok()
                {
                    // The slot passes on: in_flight stays the same.
                    w.wake.notify_one();
                    return;
                }
            }
        }
        self.in_flight.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_top_tier_gets_freed_slots_first_and_the_bottom_is_shed() {
        let a = Arc::new(Admission::new(1, Duration::from_secs(2)));
        let held = a.acquire(Tier::Standard).await.unwrap();
        assert_eq!(a.acquire(Tier::Sheddable).await.unwrap_err(), Shed::Full);
        let (a1, a2) = (Arc::clone(&a), Arc::clone(&a));
        let standard =
            tokio::spawn(async move { a1.acquire(Tier::Standard).await.map(|_| "standard") });
        tokio::task::yield_now().await;
        let critical =
            tokio::spawn(async move { a2.acquire(Tier::Critical).await.map(|_| "critical") });
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(
            critical.await.unwrap(),
            Ok("critical"),
            "the freed slot went to the top tier"
        );
        assert_eq!(standard.await.unwrap(), Ok("standard"));
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_at_the_tier_timeout() {
        let a = Arc::new(Admission::new(1, Duration::from_secs(2)));
        let _held = a.acquire(Tier::Critical).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(a.acquire(Tier::Standard).await.unwrap_err(), Shed::Full);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(a.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_displaces_the_lower_tier() {
        let a = Arc::new(Admission::new(1, Duration::from_secs(10)));
        let held = a.acquire(Tier::Critical).await.unwrap();
        let mut low = Vec::new();
        for _ in 0..16 {
            let a1 = Arc::clone(&a);
            low.push(tokio::spawn(async move {
                a1.acquire(Tier::Standard).await.map(|_| ())
            }));
        }
        tokio::task::yield_now().await;
        let a2 = Arc::clone(&a);
        let high = tokio::spawn(async move { a2.acquire(Tier::Critical).await.map(|_| ()) });
        tokio::task::yield_now().await;
        // The newest standard waiter made room for the critical one.
        assert_eq!(low.pop().unwrap().await.unwrap(), Err(Shed::Displaced));
        drop(held);
        assert_eq!(high.await.unwrap(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_limit_keeps_the_requests_in_flight_and_admits_waiters() {
        let a = Arc::new(Admission::new(1, Duration::from_secs(10)));
        let held = a.acquire(Tier::Critical).await.unwrap();
        let a1 = Arc::clone(&a);
        let waiter = tokio::spawn(async move { a1.acquire(Tier::Critical).await.map(|_| ()) });
        tokio::task::yield_now().await;
        a.retune(2, Duration::from_secs(10));
        assert_eq!(waiter.await.unwrap(), Ok(()), "the raised limit admits it");
        a.retune(1, Duration::from_secs(10));
        assert_eq!(a.in_flight(), 1, "the request in flight still counts");
        assert_eq!(a.acquire(Tier::Sheddable).await.unwrap_err(), Shed::Full);
        drop(held);
        assert!(a.acquire(Tier::Sheddable).await.is_ok());
    }
}
