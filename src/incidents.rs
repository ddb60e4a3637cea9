//! The incidents detour detects itself, kept for the last 24 hours and shown
//! on `GET /status`.
//!
//! A provider has an incident while it is unavailable for one of three causes,
//! each tracked on its own (an outage can show as a traffic incident first and
//! a status-page incident minutes later):
//!
//! | cause | opens when | closes when |
//! |---|---|---|
//! | `traffic` | a failed attempt leaves every one of the provider's targets with an open breaker | one of its breakers closes (a probe succeeded) |
//! | `status_page` | its status page says `degraded` or `down` | the page says `operational` again |
//! | `override` | an operator overrides it `down` | the override is lifted (`up` or `auto`) |
//!
//! An incident's effect is the number of requests another target served in
//! its place while it was open: requests answered by a target of a later
//! priority group on a route where the provider has a target ahead of it.
//!
//! The log is one per gateway (`state::Gateway::incidents`) and keyed by
//! provider name. It is
//! a cold-path structure behind a `RwLock`, never held across an `.await`;
//! the request path only touches it during an incident (an atomic count of
//! open incidents keeps it lock-free otherwise). It holds at most
//! [`MAX_ENTRIES`] incidents, and forgets those that ended more than
//! [`KEEP`] ago.
//!
//! With replicas (`[state] backend = "redis"`), `health_sync` hands each log
//! the incidents the other replicas recorded ([`IncidentLog::set_others`]);
//! [`IncidentLog::since`] then shows them all, one incident per outage: the
//! records of one provider and cause whose times overlap (each replica
//! records what it saw) are merged ([`merge`]), and take an id made from
//! what every replica knows of them, so that it is the same on all.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// How long an ended incident is kept.
pub const KEEP: Duration = Duration::from_secs(24 * 60 * 60);
/// The most incidents kept; the oldest go first.
pub const MAX_ENTRIES: usize = 1000;

/// Why a provider is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// detour's own requests failed until every breaker opened.
    Traffic,
    /// The provider's status page reported it.
    StatusPage,
    /// An operator set the provider `down`.
    Override,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Traffic => "traffic",
            Self::StatusPage => "status_page",
            Self::Override => "override",
        }
    }
}

/// How bad an incident is (the worst it has been).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Impact {
    /// Still used, behind healthy peers.
    Degraded,
    /// Not used.
    Down,
}

/// One incident, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incident {
    pub id: u64,
    pub provider: String,
    pub cause: Cause,
    pub impact: Impact,
    /// What detour saw, in a few words.
    pub detail: &'static str,
    pub started: SystemTime,
    /// `None` while ongoing.
    pub ended: Option<SystemTime>,
    /// Requests another target served in its place while it was open.
    pub failed_over: u64,
}

struct Entry {
    id: u64,
    provider: String,
    cause: Cause,
    impact: Impact,
    detail: &'static str,
    started: SystemTime,
    ended: Option<SystemTime>,
    failed_over: AtomicU64,
}

impl Entry {
    fn view(&self) -> Incident {
        Incident {
            id: self.id,
            provider: self.provider.clone(),
            cause: self.cause,
            impact: self.impact,
            detail: self.detail,
            started: self.started,
            ended: self.ended,
            failed_over: self.failed_over.load(Relaxed),
        }
    }

    fn ongoing(&self, provider: &str, cause: Cause) -> bool {
        self.ended.is_none() && self.cause == cause && self.provider == provider
    }
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// Oldest first.
    entries: VecDeque<Entry>,
}

/// The incident log.
#[derive(Default)]
pub struct IncidentLog {
    inner: RwLock<Inner>,
    /// How many incidents are ongoing: zero keeps [`Self::count_failed_over`] lock-free.
    ongoing: AtomicUsize,
    /// The other replicas' incidents; `None` while not sharing (memory state).
    others: RwLock<Option<Vec<Incident>>>,
}

impl std::fmt::Debug for IncidentLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncidentLog")
            .field("ongoing", &self.ongoing.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl IncidentLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens an incident for `provider` and `cause`, or raises the impact of
    /// the ongoing one. Returns its id.
    pub fn open(
        &self,
        provider: &str,
        cause: Cause,
        impact: Impact,
        detail: &'static str,
        now: SystemTime,
    ) -> u64 {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner
            .entries
            .iter_mut()
            .find(|e| e.ongoing(provider, cause))
        {
            if impact > e.impact {
                e.impact = impact;
                e.detail = detail;
            }
            return e.id;
        }
        let cutoff = now.checked_sub(KEEP).unwrap_or(SystemTime::UNIX_EPOCH);
        inner
            .entries
            .retain(|e| e.ended.is_none_or(|ended| ended >= cutoff));
        while inner.entries.len() >= MAX_ENTRIES {
            inner.entries.pop_front();
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.entries.push_back(Entry {
            id,
            provider: provider.to_owned(),
            cause,
            impact,
            detail,
            started: now,
            ended: None,
            failed_over: AtomicU64::new(0),
        });
        self.recount(&inner);
        tracing::warn!(provider, cause = cause.as_str(), ?impact, "incident opened");
        id
    }

    /// Ends the ongoing incident of `provider` for `cause`, if there is one.
    pub fn close(&self, provider: &str, cause: Cause, now: SystemTime) {
        if !self.is_ongoing(provider, cause) {
            return;
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for e in inner
            .entries
            .iter_mut()
            .filter(|e| e.ongoing(provider, cause))
        {
            e.ended = Some(now.max(e.started));
            tracing::info!(
                provider,
                cause = cause.as_str(),
                failed_over = e.failed_over.load(Relaxed),
                "incident closed"
            );
        }
        self.recount(&inner);
    }

    pub fn is_ongoing(&self, provider: &str, cause: Cause) -> bool {
        self.ongoing.load(Relaxed) > 0
            && self
                .inner
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .iter()
                .any(|e| e.ongoing(provider, cause))
    }

    fn recount(&self, inner: &Inner) {
        let n = inner.entries.iter().filter(|e| e.ended.is_none()).count();
        self.ongoing.store(n, Relaxed);
    }

    /// Adds one served-in-its-place request to every ongoing incident of a
    /// provider for which `ahead` is true.
    pub fn count_failed_over(&self, ahead: impl Fn(&str) -> bool) {
        if self.ongoing.load(Relaxed) == 0 {
            return;
        }
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        for e in inner
            .entries
            .iter()
            .filter(|e| e.ended.is_none() && ahead(&e.provider))
        {
            e.failed_over.fetch_add(1, Relaxed);
        }
    }

    /// Incidents ongoing or ended at or after `since`, oldest first: this
    /// log's own and, while replicas share them, the others' ([`merge`]d).
    pub fn since(&self, since: SystemTime) -> Vec<Incident> {
        let own = self.own_since(since);
        let guard = self.others.read().unwrap_or_else(|e| e.into_inner());
        let Some(others) = guard.as_ref() else {
            return own;
        };
        let mut all = own;
        all.extend(
            others
                .iter()
                .filter(|e| e.ended.is_none_or(|ended| ended >= since))
                .cloned(),
        );
        drop(guard);
        merge(all)
    }

    /// The incidents the other replicas recorded (`health_sync` refreshes
    /// them); from the first call on, [`Self::since`] merges them in.
    pub fn set_others(&self, others: Vec<Incident>) {
        *self.others.write().unwrap_or_else(|e| e.into_inner()) = Some(others);
    }

    /// This log's own incidents ongoing or ended at or after `since`, oldest
    /// first (what this replica tells the others).
    pub fn own_since(&self, since: SystemTime) -> Vec<Incident> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .entries
            .iter()
            .filter(|e| e.ended.is_none_or(|ended| ended >= since))
            .map(Entry::view)
            .collect()
    }
}

/// Records of one provider and cause closer than this count as one incident.
const MERGE_GAP: Duration = Duration::from_secs(5);

/// One incident per outage from the records of several replicas, oldest
/// first: the records of one provider and cause that overlap in time (or
/// are less than [`MERGE_GAP`] apart) become one, from the first start to
/// the last end (ongoing while any is), at the worst impact, with the
/// requests each replica failed over added up. Its id is made from the
/// provider, the cause and the start, the same on every replica that sees
/// the same records.
pub fn merge(mut all: Vec<Incident>) -> Vec<Incident> {
    all.sort_by(|a, b| {
        (a.provider.as_str(), a.cause.as_str(), a.started).cmp(&(
            b.provider.as_str(),
            b.cause.as_str(),
            b.started,
        ))
    });
    let mut out: Vec<Incident> = Vec::with_capacity(all.len());
    for i in all {
        if let Some(last) = out.last_mut() {
            let overlaps = last.provider == i.provider
                && last.cause == i.cause
                && last.ended.is_none_or(|e| e + MERGE_GAP >= i.started);
            if overlaps {
                last.ended = match (last.ended, i.ended) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
                if i.impact > last.impact {
                    last.impact = i.impact;
                    last.detail = i.detail;
                }
                last.failed_over += i.failed_over;
                continue;
            }
        }
        out.push(i);
    }
    for i in &mut out {
        i.id = shared_id(&i.provider, i.cause, i.started);
    }
    out.sort_by_key(|i| (i.started, i.id));
    out
}

/// An id for a merged incident: a hash of what every replica knows of it,
/// below 10^9 (it is shown as `detour` and at least six digits).
fn shared_id(provider: &str, cause: Cause, started: SystemTime) -> u64 {
    use sha2::{Digest, Sha256};
    let ms = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let digest = Sha256::digest(format!("{provider}\n{}\n{ms}", cause.as_str()).as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first) % 1_000_000_000
}

/// The `detail` of an incident another replica recorded: one of the words
/// this module writes, or a neutral one for words it does not know (an
/// older or newer replica).
pub fn known_detail(detail: &str) -> &'static str {
    const KNOWN: &[&str] = &[TRAFFIC_DOWN, PAGE_DOWN, PAGE_DEGRADED, OVERRIDDEN_DOWN];
    KNOWN
        .iter()
        .find(|k| **k == detail)
        .copied()
        .unwrap_or("reported by another replica")
}

const TRAFFIC_DOWN: &str = "every target's circuit breaker opened";
const PAGE_DOWN: &str = "its status page reports a major outage";
const PAGE_DEGRADED: &str = "its status page reports degraded service";
const OVERRIDDEN_DOWN: &str = "overridden down by an operator";

// The events its callers hand it, one method each. The log reads no gateway
// state: the data plane tells it what traffic showed, the status-page poller
// what a page said, the admin API what an operator did.
impl IncidentLog {
    /// A failed attempt left every target of `provider` with a breaker that
    /// is not closed: opens its traffic incident, unless one is ongoing.
    pub fn traffic_down(&self, provider: &str, now: SystemTime) {
        if !self.is_ongoing(provider, Cause::Traffic) {
            self.open(provider, Cause::Traffic, Impact::Down, TRAFFIC_DOWN, now);
        }
    }

    /// A breaker of one of `provider`'s targets closed: it answers again.
    pub fn traffic_recovered(&self, provider: &str, now: SystemTime) {
        self.close(provider, Cause::Traffic, now);
    }

    /// A status-page poll for `provider`: `Some(impact)` while the page
    /// reports a problem, `None` once it says operational (or nothing).
    pub fn status_page(&self, provider: &str, reported: Option<Impact>, now: SystemTime) {
        let Some(impact) = reported else {
            return self.close(provider, Cause::StatusPage, now);
        };
        let detail = match impact {
            Impact::Down => PAGE_DOWN,
            Impact::Degraded => PAGE_DEGRADED,
        };
        self.open(provider, Cause::StatusPage, impact, detail, now);
    }

    /// An operator set `provider`'s override: `down`, or lifted it (`up`,
    /// `auto`).
    pub fn overridden(&self, provider: &str, down: bool, now: SystemTime) {
        if down {
            self.open(
                provider,
                Cause::Override,
                Impact::Down,
                OVERRIDDEN_DOWN,
                now,
            );
        } else {
            self.close(provider, Cause::Override, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn one_incident_per_provider_and_cause_until_closed() {
        let log = IncidentLog::new();
        let a = log.open("p", Cause::StatusPage, Impact::Degraded, "d", at(0));
        let b = log.open("p", Cause::StatusPage, Impact::Down, "down", at(5));
        assert_eq!(a, b, "the same incident, now worse");
        let t = log.open("p", Cause::Traffic, Impact::Down, "t", at(6));
        assert_ne!(a, t, "each cause is its own incident");
        log.close("p", Cause::StatusPage, at(10));
        let all = log.since(at(0));
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].impact, Impact::Down);
        assert_eq!(all[0].detail, "down");
        assert_eq!((all[0].started, all[0].ended), (at(0), Some(at(10))));
        assert_eq!(all[1].ended, None);
        assert!(log.is_ongoing("p", Cause::Traffic));
        assert!(!log.is_ongoing("p", Cause::StatusPage));
        // Closing what is not open changes nothing.
        log.close("q", Cause::Traffic, at(11));
        assert_eq!(log.since(at(0)).len(), 2);
    }

    #[test]
    fn failed_over_counts_only_ongoing_incidents_of_matching_providers() {
        let log = IncidentLog::new();
        log.count_failed_over(|_| true);
        log.open("a", Cause::Traffic, Impact::Down, "t", at(0));
        log.open("b", Cause::Traffic, Impact::Down, "t", at(0));
        log.close("b", Cause::Traffic, at(1));
        for _ in 0..3 {
            log.count_failed_over(|p| p != "c");
        }
        let all = log.since(at(0));
        assert_eq!((all[0].provider.as_str(), all[0].failed_over), ("a", 3));
        assert_eq!((all[1].provider.as_str(), all[1].failed_over), ("b", 0));
    }

    #[test]
    fn the_events_callers_hand_it_open_and_close_incidents() {
        let log = IncidentLog::new();
        log.traffic_down("p", at(0));
        log.traffic_down("p", at(1));
        log.status_page("p", Some(Impact::Degraded), at(2));
        log.status_page("p", Some(Impact::Down), at(3));
        log.overridden("q", true, at(4));
        let all = log.since(at(0));
        assert_eq!(all.len(), 3, "one incident per provider and cause: {all:?}");
        assert_eq!(
            (all[0].cause, all[0].impact),
            (Cause::Traffic, Impact::Down)
        );
        assert_eq!(all[1].detail, "its status page reports a major outage");
        assert_eq!(
            (all[2].provider.as_str(), all[2].cause),
            ("q", Cause::Override)
        );
        log.traffic_recovered("p", at(5));
        log.status_page("p", None, at(6));
        log.overridden("q", false, at(7));
        let ended: Vec<_> = log.since(at(0)).iter().map(|i| i.ended).collect();
        assert_eq!(ended, [Some(at(5)), Some(at(6)), Some(at(7))]);
    }

    #[test]
    fn the_records_of_one_outage_on_several_replicas_merge_into_one() {
        let rec = |provider: &str, cause, impact, started: u64, ended: Option<u64>, n| Incident {
            id: 7,
            provider: provider.to_owned(),
            cause,
            impact,
            detail: "d",
            started: at(started),
            ended: ended.map(at),
            failed_over: n,
        };
        let a = rec("p", Cause::Traffic, Impact::Degraded, 10, Some(20), 1);
        let b = rec("p", Cause::Traffic, Impact::Down, 12, Some(25), 2);
        let later = rec("p", Cause::Traffic, Impact::Down, 100, Some(110), 4);
        let other_cause = rec("p", Cause::Override, Impact::Down, 11, Some(12), 0);
        let merged = merge(vec![
            later.clone(),
            b.clone(),
            other_cause.clone(),
            a.clone(),
        ]);
        assert_eq!(merged.len(), 3, "{merged:?}");
        let first = &merged[0];
        assert_eq!(
            (first.cause, first.started, first.ended),
            (Cause::Traffic, at(10), Some(at(25)))
        );
        assert_eq!((first.impact, first.failed_over), (Impact::Down, 3));
        assert_eq!(merged[1].cause, Cause::Override);
        assert_eq!(merged[2].started, at(100));
        // The same records in any order, on any replica: the same ids.
        let again = merge(vec![a, other_cause, later, b]);
        let ids = |m: &[Incident]| m.iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(ids(&merged), ids(&again));
        assert!(ids(&merged)
            .iter()
            .all(|id| *id < 1_000_000_000 && *id != 7));
    }

    #[test]
    fn a_log_shows_the_others_incidents_only_once_it_shares() {
        let log = IncidentLog::new();
        log.open("p", Cause::Traffic, Impact::Down, "t", at(0));
        let own = log.since(at(0));
        assert_eq!(own[0].id, 1, "alone: its own ids");
        let theirs = Incident {
            started: at(1),
            ..own[0].clone()
        };
        log.set_others(vec![theirs]);
        let all = log.since(at(0));
        assert_eq!(all.len(), 1, "one outage: {all:?}");
        assert_eq!(log.own_since(at(0)).len(), 1);
        assert_eq!(
            known_detail("every target's circuit breaker opened"),
            TRAFFIC_DOWN
        );
        assert_eq!(known_detail("<script>"), "reported by another replica");
    }

    #[test]
    fn keeps_a_day_and_at_most_max_entries() {
        let log = IncidentLog::new();
        log.open("old", Cause::Traffic, Impact::Down, "t", at(0));
        log.close("old", Cause::Traffic, at(60));
        log.open("long", Cause::Override, Impact::Down, "o", at(0));
        let day = KEEP.as_secs();
        log.open("new", Cause::Traffic, Impact::Down, "t", at(day + 61));
        let names: Vec<String> = log.since(at(0)).into_iter().map(|i| i.provider).collect();
        assert_eq!(
            names,
            ["long", "new"],
            "ended over a day ago: gone; ongoing: kept"
        );
        for i in 0..MAX_ENTRIES as u64 + 10 {
            let name = format!("p{i}");
            log.open(&name, Cause::Traffic, Impact::Down, "t", at(day + 100 + i));
            log.close(&name, Cause::Traffic, at(day + 100 + i));
        }
        assert_eq!(log.since(at(0)).len(), MAX_ENTRIES);
        assert_eq!(log.since(at(day + 100 + MAX_ENTRIES as u64)).len(), 10);
    }
}
