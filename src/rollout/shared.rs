//! One rollout baked by every replica together, on Redis.
//!
//! Replicas that reload the same file start rollouts with the same id (a
//! digest of the candidate's text). Under `<prefix>rollout:<id>:`:
//! - `cohorts`: a hash where each replica's judge adds what its cohorts saw
//!   since its last tick, and `started`, the Redis time of the first start:
//!   every judge reads the sum and the same elapsed bake time;
//! - `verdict`: the first verdict reached, by a judge (`SET NX`) or by hand
//!   on any replica (`SET`: an operator's word wins); every judge applies it
//!   at its next tick;
//! - `stable`: the stable config's text, for a replica that starts with the
//!   candidate while the rollout bakes: it serves the stable config and
//!   joins the rollout ([`join`]). The text is the config file as written:
//!   keep secrets in `${ENV}` references, as everywhere.
//!
//! These keys expire a day after the last write ([`KEEP`]): a verdict keeps
//! a rolled-back text from being baked again by a replica that reloads it.
//! While Redis cannot be reached, each replica judges its own cohorts, as a
//! single process does.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;

use super::{judge, Verdict};
use crate::shared::{Shared, Unavailable};
use crate::state::{CohortView, Rollout};

/// How long the rollout's keys outlive its last write.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);

/// A judge's link to the replicas' rollout of the same id.
#[derive(Debug)]
pub struct Sync {
    shared: Arc<Shared>,
    id: String,
    /// The local totals already added to Redis.
    flushed: [u64; 6],
}

fn key(shared: &Shared, id: &str, part: &str) -> String {
    shared.key(&format!("rollout:{id}:{part}"))
}

impl Sync {
    /// The link for `rollout`, if it has an id; records the stable text for
    /// replicas that join later.
    pub async fn start(
        shared: Arc<Shared>,
        rollout: &Rollout,
        stable_text: Option<String>,
    ) -> Option<Self> {
        let id = rollout.id.clone()?;
        if let Some(text) = stable_text {
            let k = key(&shared, &id, "stable");
            let _ = shared
                .call("rollout_start", |mut c| async move {
                    redis::cmd("SET")
                        .arg(k)
                        .arg(text)
                        .arg("NX")
                        .arg("PX")
                        .arg(KEEP.as_millis() as u64)
                        .query_async::<Option<String>>(&mut c)
                        .await
                })
                .await;
        }
        Some(Self {
            shared,
            id,
            flushed: [0; 6],
        })
    }

    /// Adds this replica's new outcomes, then judges the sum: the verdict
    /// of all replicas. `Err` when Redis cannot be asked (judge locally).
    pub async fn tick(&mut self, rollout: &Rollout) -> Result<Verdict, Unavailable> {
        let totals = rollout.totals();
        let mut invocation = TICK.prepare_invoke();
        invocation
            .key(key(&self.shared, &self.id, "cohorts"))
            .key(key(&self.shared, &self.id, "verdict"))
            .arg(KEEP.as_millis() as u64);
        for (now, before) in totals.iter().zip(self.flushed) {
            invocation.arg(now.saturating_sub(before));
        }
        let (sums, elapsed_ms, decided): (Vec<u64>, u64, Option<String>) =
            self.shared.script("rollout_tick", invocation).await?;
        self.flushed = totals;
        if let Some(v) = decided {
            return Ok(parse(&v));
        }
        let [a, b, c, d, e, f] = <[u64; 6]>::try_from(sums).unwrap_or_default();
        let stable = CohortView::from_totals(a, b, c);
        let canary = CohortView::from_totals(d, e, f);
        let elapsed = Duration::from_millis(elapsed_ms);
        match judge(&stable, &canary, &rollout.policy, elapsed) {
            Verdict::Wait => Ok(Verdict::Wait),
            mine => decide(&self.shared, &self.id, &mine, false).await,
        }
    }
}

/// Records `verdict` for rollout `id` (`force`: an operator's, which
/// replaces a judge's) and returns the verdict that holds.
pub async fn decide(
    shared: &Shared,
    id: &str,
    verdict: &Verdict,
    force: bool,
) -> Result<Verdict, Unavailable> {
    let text = match verdict {
        Verdict::Wait => return Ok(Verdict::Wait),
        Verdict::Promote => "promote".to_owned(),
        Verdict::Rollback(why) => format!("rollback:{why}"),
    };
    let mut invocation = DECIDE.prepare_invoke();
    invocation
        .key(key(shared, id, "verdict"))
        .arg(text)
        .arg(KEEP.as_millis() as u64)
        .arg(u8::from(force));
    let held: String = shared.script("rollout_decide", invocation).await?;
    Ok(parse(&held))
}

fn parse(text: &str) -> Verdict {
    match text.strip_prefix("rollback:") {
        Some(why) => Verdict::Rollback(format!("{why} (decided for all replicas)")),
        None if text == "promote" => Verdict::Promote,
        None => Verdict::Rollback(format!("unreadable shared verdict `{text}`")),
    }
}

/// What a replica starting with `text` finds: a rollout to `text` baking
/// (the stable config's text, to serve while joining it), rolled back (the
/// stable text, to serve instead), or nothing to follow.
#[derive(Debug, PartialEq, Eq)]
pub enum Joining {
    Nothing,
    Baking { stable: String },
    RolledBack { stable: String },
}

/// Asks the replicas about a rollout to `text`.
pub async fn join(shared: &Shared, text: &str) -> Result<Joining, Unavailable> {
    let id = crate::state::rollout_id(text);
    let stable = key(shared, &id, "stable");
    let verdict = key(shared, &id, "verdict");
    let (stable, verdict): (Option<String>, Option<String>) = shared
        .call("rollout_join", |mut c| async move {
            redis::pipe()
                .get(stable)
                .get(verdict)
                .query_async(&mut c)
                .await
        })
        .await?;
    Ok(match (stable, verdict.map(|v| parse(&v))) {
        (Some(stable), None) => Joining::Baking { stable },
        (Some(stable), Some(Verdict::Rollback(_))) => Joining::RolledBack { stable },
        _ => Joining::Nothing,
    })
}

/// KEYS: cohorts hash, verdict. ARGV: keep (ms), then the six deltas
/// (stable requests, errors, latency µs; canary the same). Returns the six
/// sums, the ms since the first replica started, and the verdict if any.
static TICK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSETNX', KEYS[1], 'started', now)
local names = {'s_req', 's_err', 's_lat', 'c_req', 'c_err', 'c_lat'}
local sums = {}
for i = 1, 6 do
  sums[i] = redis.call('HINCRBY', KEYS[1], names[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local started = tonumber(redis.call('HGET', KEYS[1], 'started'))
local verdict = redis.call('GET', KEYS[2])
return {sums, now - started, verdict}
",
    )
});

/// KEYS[1]: the verdict. ARGV: verdict, keep (ms), 1 to replace any.
/// Returns the verdict that holds.
static DECIDE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
end
return redis.call('GET', KEYS[1])
",
    )
});
