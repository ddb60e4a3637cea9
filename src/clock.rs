//! The monotonic clock shared by the policy state (health, budgets, rate
//! limits): milliseconds since the clock was made, on `tokio::time::Instant`
//! so that tests can pause and advance time.
//!
//! A leaf: it imports nothing of detour's, so every layer may use it.

use tokio::time::Instant;

/// Milliseconds on one monotonic clock; copies share its origin.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
