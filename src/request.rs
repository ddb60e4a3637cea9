//! What one request holds until its response ends, and what happens then.
//!
//! Each part belongs to its own layer and is read and tested there:
//! - the log line and the request's metrics: [`RequestRecord`] (`telemetry`);
//! - the tokens charged to the caller's rate limits before the call, settled
//!   from the real usage: [`TokenCharge`] (`limits`);
//! - the rollout cohort the request ran in, told its status and latency:
//!   [`CohortTag`] (`rollout`);
//! - a limit's permit (open streams), held until the body ends.
//!
//! [`Tracked`] only holds them together and ends them once, in that order:
//! when told ([`Tracked::finish`]) or when dropped (the client went away).
//! It travels with the request: ingress makes it, `proxy` fills it in, the
//! committed `relay::RelayBody` keeps it until the body ends, and ends it
//! once the answer is written (`crate::after_write`).

use std::ops::{Deref, DerefMut};

use crate::limits::TokenCharge;
use crate::state::CohortTag;
use crate::telemetry::{Outcome, RequestRecord};

/// A request's log record and the guards settled when it ends. Reads and
/// writes of the record's fields go through to it ([`Deref`]).
///
/// Boxed: it travels through every layer of the handler and into the relay,
/// and each layer moves it; a pointer costs less to move than its 380 bytes.
#[derive(Debug)]
pub struct Tracked {
    held: Box<Held>,
}

#[derive(Debug)]
struct Held {
    record: RequestRecord,
    charge: Option<TokenCharge>,
    cohort: Option<CohortTag>,
    hold: Option<crate::limits::StreamPermit>,
}

impl Tracked {
    pub fn new(record: RequestRecord) -> Self {
        Self {
            held: Box::new(Held {
                record,
                charge: None,
                cohort: None,
                hold: None,
            }),
        }
    }

    /// Tokens charged to rate limits before the call, settled from `usage`.
    pub fn set_charge(&mut self, charge: Option<TokenCharge>) {
        self.held.charge = charge;
    }

    /// The rollout cohort the request ran in, if a rollout is baking.
    pub fn set_cohort(&mut self, cohort: Option<CohortTag>) {
        self.held.cohort = cohort;
    }

    /// A limit's permit, held for as long as the request lives (open
    /// streams).
    pub fn set_hold(&mut self, hold: Option<crate::limits::StreamPermit>) {
        self.held.hold = hold;
    }

    /// Ends the request now with `outcome` (instead of on drop).
    pub fn finish(mut self, outcome: Outcome) {
        self.held.record.outcome = outcome;
        self.end();
    }

    /// Writes the record, then settles the charge and the cohort from it;
    /// once. The permit goes when `self` does.
    fn end(&mut self) {
        let held = &mut *self.held;
        if !held.record.write() {
            return;
        }
        if let (Some(charge), Some(usage)) = (held.charge.take(), held.record.usage) {
            charge.settle(usage.prompt_tokens + usage.completion_tokens);
        }
        if let Some(c) = held.cohort.take() {
            let latency = held.record.started.elapsed();
            c.rollout.record(c.canary, held.record.status, latency);
        }
    }
}

impl Deref for Tracked {
    type Target = RequestRecord;

    fn deref(&self) -> &RequestRecord {
        &self.held.record
    }
}

impl DerefMut for Tracked {
    fn deref_mut(&mut self) -> &mut RequestRecord {
        &mut self.held.record
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.end();
    }
}

/// A request in a rollout's cohort, whose end is seen in the rollout's view.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Tracked;
    use crate::config::RolloutPolicy;
    use crate::protocol::chat::ClientFormat;
    use crate::state::{CohortTag, Rollout};
    use crate::telemetry::RequestRecord;

    pub fn rollout() -> Arc<Rollout> {
        let cfg = crate::config::load_str("", "t.toml").unwrap();
        let live = crate::state::Gateway::new(cfg).unwrap().live();
        let policy = RolloutPolicy {
            canary_percent: 50.0,
            bake: Duration::from_secs(10),
            max_error_rate_increase: 0.05,
            max_latency_ratio: 1.5,
            min_requests: 10,
        };
        let health = crate::health::Registry::default();
        Arc::new(Rollout::new(live, health, policy, None))
    }

    pub fn tracked(rollout: &Arc<Rollout>, canary: bool) -> Tracked {
        let mut t = Tracked::new(RequestRecord::new(
            "id".into(),
            ClientFormat::OpenAi,
            "chat",
        ));
        t.set_cohort(Some(CohortTag {
            rollout: Arc::clone(rollout),
            canary,
        }));
        t
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testing::{rollout, tracked};
    use super::*;

    #[tokio::test]
    async fn the_cohort_is_told_once_whether_finished_or_dropped() {
        let r = rollout();
        let mut finished = tracked(&r, true);
        finished.status = 502;
        finished.finish(Outcome::Rejected);
        let mut dropped = tracked(&r, false);
        dropped.status = 200;
        drop(dropped);
        let view = r.view();
        assert_eq!((view.canary.requests, view.canary.errors), (1, 1));
        assert_eq!((view.stable.requests, view.stable.errors), (1, 0));
    }

    #[tokio::test]
    async fn the_permit_is_held_until_the_request_ends() {
        let streams = Arc::new(crate::limits::Slots::new(1));
        let mut t = tracked(&rollout(), false);
        t.set_hold(Some(streams.try_take().unwrap().into()));
        assert_eq!(streams.in_flight(), 1);
        t.finish(Outcome::Ok);
        assert_eq!(streams.in_flight(), 0);
    }
}
