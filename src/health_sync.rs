//! Health shared between replicas (`[state] backend = "redis"`): what one
//! replica's traffic, status-page poller or operator learns, the others
//! apply within about a second, so that N replicas do not each pay for
//! discovering the same outage.
//!
//! What is shared:
//!
//! | what | told by | held in Redis as | applied as |
//! |---|---|---|---|
//! | a breaker opened | pub/sub | `health:open:<target>`, expiring when its `open_for` ends | open since the same moment; each replica probes on its own after `open_for` |
//! | a probe closed a breaker | pub/sub | the `open` key deleted | closed (slow start follows); a traffic incident ends |
//! | a `retry-after` cool-down | pub/sub | `health:cool_down:<target>`, expiring with it | cooling down as long |
//! | a misconfigured mark | pub/sub | `health:misconfigured:<target>`, expiring with it | marked as long |
//! | an operator's override | pub/sub | field of the hash `health:overrides`, no expiry; `auto` deletes it | the same override, and its incident |
//! | a status-page reading | pub/sub | `health:page:<provider>`, the latest reading, kept 10 minutes | the page's state, until this replica's own poll reads otherwise |
//! | incidents | — | `incidents:<replica>`, each replica's own log, kept a day | merged into `/status` and `/status.json` ([`crate::incidents::merge`]) |
//!
//! A target is named by route alias, provider name and model, the same on
//! every replica running the same config. Times travel as durations from
//! now (how long ago a breaker opened, how long a cool-down has left),
//! never as clock readings, so replicas' clocks need not agree; the keys'
//! expiry is Redis's own.
//!
//! How: health marks what this replica's own traffic changed
//! ([`TargetHealth::take_to_share`], an atomic bit per kind, so the request
//! path gains no lock and no I/O); one task per gateway scans for those
//! marks every [`SCAN_EVERY`], writes the keys and publishes one message
//! per scan on the `health` channel. Messages carry the sender's replica
//! id; a replica ignores its own, and what it applies from others is never
//! marked to share again: no echo. A replica that starts, or reconnects
//! after Redis was away, subscribes, publishes what it learned meanwhile,
//! then reads the keys of its targets and the overrides (so it misses
//! nothing between reading and subscribing).
//!
//! Redis never stops health: every call goes through [`Shared`] (bounded by
//! its timeout). While Redis is down each replica keeps its own health, as
//! a single process does; its changes wait, marked, and are told when Redis
//! is back.
//!
//! Incidents are each replica's own log: every [`INCIDENTS_EVERY`] a
//! replica reads the others' logs and writes its own to its own key when it
//! changed (and every [`REWRITE_EVERY`] to show it is alive). A replica
//! that stopped writing for [`STALE_AFTER`] (it died) has its ongoing
//! incidents shown as ended when it last wrote.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::health::{
    Change, Override, PageState, ProviderChange, ProviderHealth, Registry, TargetHealth, TargetId,
    Transition,
};
use crate::incidents::{self, Cause, Impact, Incident, IncidentLog};
use crate::shared::{Shared, Unavailable};

/// How often this replica's changes are looked for and told.
pub const SCAN_EVERY: Duration = Duration::from_millis(100);
/// How often incidents are written and read.
pub const INCIDENTS_EVERY: Duration = Duration::from_millis(500);
/// A replica whose incidents were not written for this long is gone.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// An unchanged incident log is written again this often, to show that
/// its replica is alive (well within [`STALE_AFTER`]).
const REWRITE_EVERY: Duration = Duration::from_secs(5);
/// While Redis is down, how often the task looks whether it is back.
const WAIT_FOR_UP: Duration = Duration::from_millis(20);
/// Wait before trying to subscribe again after a failure.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

/// Starts sharing `health` (the stable config's) and `incidents` through
/// `shared`, on a task that ends with the gateway. Needs a tokio runtime.
pub fn start(shared: &Arc<Shared>, health: &Arc<Registry>, incidents: &Arc<IncidentLog>) {
    incidents.set_others(Vec::new());
    let task = Task {
        shared: Arc::downgrade(shared),
        health: Arc::downgrade(health),
        incidents: Arc::downgrade(incidents),
        others: HashMap::new(),
        written: None,
    };
    tokio::spawn(task.run());
}

/// The one message a replica publishes per scan.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    /// The sender's replica id: a replica ignores its own messages.
    from: String,
    events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Event {
    Opened {
        target: Target,
        age_ms: u64,
        open_for_ms: u64,
    },
    Closed {
        target: Target,
    },
    CoolDown {
        target: Target,
        for_ms: u64,
    },
    Misconfigured {
        target: Target,
        for_ms: u64,
    },
    Override {
        provider: String,
        set: Override,
    },
    Page {
        provider: String,
        page: PageState,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Target {
    route: String,
    provider: String,
    model: String,
}

impl Target {
    fn of(id: &TargetId) -> Self {
        Self {
            route: id.route.clone(),
            provider: id.provider.clone(),
            model: id.model.clone(),
        }
    }

    fn id(&self) -> TargetId {
        TargetId {
            route: self.route.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
        }
    }

    /// The key suffix naming this target: unambiguous whatever the names hold.
    fn key(&self) -> String {
        serde_json::to_string(&[&self.route, &self.provider, &self.model]).unwrap_or_default()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Event {
    fn of_target(id: &TargetId, change: Change) -> Self {
        let target = Target::of(id);
        match change {
            Change::Opened { age, open_for } => Self::Opened {
                target,
                age_ms: millis(age),
                open_for_ms: millis(open_for),
            },
            Change::Closed => Self::Closed { target },
            Change::CoolDown { remaining } => Self::CoolDown {
                target,
                for_ms: millis(remaining),
            },
            Change::Misconfigured { remaining } => Self::Misconfigured {
                target,
                for_ms: millis(remaining),
            },
        }
    }

    fn of_provider(name: &str, change: ProviderChange) -> Self {
        let provider = name.to_owned();
        match change {
            ProviderChange::Override(set) => Self::Override { provider, set },
            ProviderChange::Page(page) => Self::Page { provider, page },
        }
    }

    /// Its `kind` label in metrics.
    fn kind(&self) -> &'static str {
        match self {
            Self::Opened { .. } => "opened",
            Self::Closed { .. } => "closed",
            Self::CoolDown { .. } => "cool_down",
            Self::Misconfigured { .. } => "misconfigured",
            Self::Override { .. } => "override",
            Self::Page { .. } => "page",
        }
    }

    /// The key writes that keep this event for replicas that start later.
    fn store(&self, sync: &Shared, pipe: &mut redis::Pipeline) {
        match self {
            Self::Opened {
                target,
                age_ms,
                open_for_ms,
            } => {
                let left = open_for_ms.saturating_sub(*age_ms);
                if left > 0 {
                    pipe.cmd("SET")
                        .arg(target_key(sync, "open", target))
                        .arg(open_for_ms)
                        .arg("PX")
                        .arg(left)
                        .ignore();
                }
            }
            Self::Closed { target } => {
                pipe.cmd("DEL")
                    .arg(target_key(sync, "open", target))
                    .ignore();
            }
            Self::CoolDown { target, for_ms } | Self::Misconfigured { target, for_ms } => {
                let kind = match self {
                    Self::CoolDown { .. } => "cool_down",
                    _ => "misconfigured",
                };
                if *for_ms > 0 {
                    pipe.cmd("SET")
                        .arg(target_key(sync, kind, target))
                        .arg(1)
                        .arg("PX")
                        .arg(for_ms)
                        .ignore();
                }
            }
            Self::Override { provider, set } => {
                let key = sync.key("health:overrides");
                // The hash always holds this field, so that a missing hash
                // means Redis lost its data (see `Link::catch_up`).
                pipe.cmd("HSET").arg(&key).arg(KEPT).arg(1).ignore();
                match set {
                    Override::Auto => pipe.cmd("HDEL").arg(key).arg(provider).ignore(),
                    Override::Up => pipe.cmd("HSET").arg(key).arg(provider).arg("up").ignore(),
                    Override::Down => pipe.cmd("HSET").arg(key).arg(provider).arg("down").ignore(),
                };
            }
            Self::Page { provider, page } => {
                if let Ok(value) = serde_json::to_string(page) {
                    pipe.cmd("SET")
                        .arg(page_key(sync, provider))
                        .arg(value)
                        .arg("PX")
                        .arg(millis(PAGE_KEPT))
                        .ignore();
                }
            }
        }
    }
}

/// How long the latest status-page reading is kept for replicas that
/// start later (each replica's own poller reads the page soon anyway).
const PAGE_KEPT: Duration = Duration::from_secs(600);

fn page_key(shared: &Shared, provider: &str) -> String {
    shared.key(&format!("health:page:{provider}"))
}

/// The field every overrides hash holds (no provider has an empty name).
const KEPT: &str = "";

fn target_key(shared: &Shared, kind: &str, target: &Target) -> String {
    shared.key(&format!("health:{kind}:{}", target.key()))
}

/// The health keys of `targets`, three each (open, cool-down,
/// misconfigured), in that order.
fn keys_of(shared: &Shared, targets: &[(TargetId, Arc<TargetHealth>)]) -> Vec<String> {
    targets
        .iter()
        .flat_map(|(id, _)| {
            let t = Target::of(id);
            ["open", "cool_down", "misconfigured"].map(|k| target_key(shared, k, &t))
        })
        .collect()
}

/// Each key's time left (ms; negative when it has none or is missing) and
/// value ("" when missing).
static READ_KEYS: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = {redis.call('PTTL', k), redis.call('GET', k) or ''}
end
return out
",
    )
});

/// The incidents every replica wrote: the values of `ARGV[1] .. id` for
/// each id in the set `KEYS[1]`; ids whose key expired leave the set.
static READ_INCIDENTS: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', ARGV[1] .. id)
  if v then
    table.insert(out, v)
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
",
    )
});

/// One replica's incident log as it writes it.
#[derive(Debug, Serialize, Deserialize)]
struct Written {
    replica: String,
    /// When it was written (Unix ms, the writer's clock).
    written_ms: u64,
    incidents: Vec<WrittenIncident>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WrittenIncident {
    provider: String,
    cause: Cause,
    impact: Impact,
    detail: String,
    started_ms: u64,
    ended_ms: Option<u64>,
    failed_over: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    millis(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl WrittenIncident {
    fn of(i: &Incident) -> Self {
        Self {
            provider: i.provider.clone(),
            cause: i.cause,
            impact: i.impact,
            detail: i.detail.to_owned(),
            started_ms: unix_ms(i.started),
            ended_ms: i.ended.map(unix_ms),
            failed_over: i.failed_over,
        }
    }

    /// As the status page shows it; ongoing incidents of a replica that
    /// stopped writing end when it last wrote.
    fn view(&self, written_ms: u64, stale: bool) -> Incident {
        let ended_ms = match self.ended_ms {
            None if stale => Some(written_ms.max(self.started_ms)),
            e => e,
        };
        Incident {
            id: 0,
            provider: self.provider.clone(),
            cause: self.cause,
            impact: self.impact,
            detail: incidents::known_detail(&self.detail),
            started: from_unix_ms(self.started_ms),
            ended: ended_ms.map(from_unix_ms),
            failed_over: self.failed_over,
        }
    }
}

/// The gateway's parts the task works on, while the gateway lives.
struct Link {
    shared: Arc<Shared>,
    health: Arc<Registry>,
    incidents: Arc<IncidentLog>,
}

struct Task {
    shared: Weak<Shared>,
    health: Weak<Registry>,
    incidents: Weak<IncidentLog>,
    /// The other replicas' logs as last read, by replica.
    others: HashMap<String, Written>,
    /// When this replica last wrote its log, and what it held (so an
    /// unchanged log is written only every [`REWRITE_EVERY`], and an
    /// emptied one is written too).
    written: Option<(Instant, String)>,
}

impl Task {
    fn link(&self) -> Option<Link> {
        Some(Link {
            shared: self.shared.upgrade()?,
            health: self.health.upgrade()?,
            incidents: self.incidents.upgrade()?,
        })
    }

    async fn run(mut self) {
        let mut messages: Option<redis::aio::PubSubStream> = None;
        let mut tick = tokio::time::interval(SCAN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut incidents_at = Instant::now();
        loop {
            let Some(link) = self.link() else { return };
            if !link.shared.is_up() {
                // Local health until Redis is back; then subscribe afresh
                // and catch up.
                messages = None;
            } else if messages.is_none() {
                match link.subscribe().await {
                    Ok(stream) => {
                        messages = Some(stream);
                        link.publish_changes().await;
                        link.catch_up().await;
                    }
                    Err(e) => {
                        tracing::debug!("health sharing: cannot subscribe: {e}");
                        drop(link);
                        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                        continue;
                    }
                }
            }
            let message = match messages.as_mut() {
                Some(stream) => tokio::select! {
                    m = stream.next() => Some(m),
                    _ = tick.tick() => None,
                },
                None => {
                    // Not subscribed: look again soon, to subscribe as soon
                    // as Redis is up.
                    tokio::time::sleep(WAIT_FOR_UP).await;
                    None
                }
            };
            match message {
                Some(Some(m)) => link.receive(&m),
                // The connection ended (Redis restarted): subscribe again.
                Some(None) => messages = None,
                None => {
                    if messages.is_some() {
                        link.publish_changes().await;
                    }
                    if incidents_at.elapsed() >= INCIDENTS_EVERY {
                        incidents_at = Instant::now();
                        if messages.is_some() {
                            self.exchange_incidents(&link).await;
                        }
                        self.show_others(&link);
                    }
                }
            }
        }
    }

    /// Writes this replica's incidents and reads the others'.
    async fn exchange_incidents(&mut self, link: &Link) {
        let now = SystemTime::now();
        let since = now.checked_sub(incidents::KEEP).unwrap_or(UNIX_EPOCH);
        let own = link.incidents.own_since(since);
        let shared = &link.shared;
        let set = shared.key("incidents:replicas");
        let prefix = shared.key("incidents:");
        let mine: Vec<WrittenIncident> = own.iter().map(WrittenIncident::of).collect();
        let fingerprint = serde_json::to_string(&mine).unwrap_or_default();
        let due = self
            .written
            .as_ref()
            .is_none_or(|(at, last)| *last != fingerprint || at.elapsed() >= REWRITE_EVERY);
        if due && (!mine.is_empty() || self.written.is_some()) {
            let written = Written {
                replica: shared.replica().to_owned(),
                written_ms: unix_ms(now),
                incidents: mine,
            };
            let Ok(json) = serde_json::to_string(&written) else {
                return;
            };
            let keep = millis(incidents::KEEP);
            let key = format!("{prefix}{}", shared.replica());
            let replica = shared.replica().to_owned();
            let set = set.clone();
            let wrote = shared
                .call("incidents_write", |mut c| async move {
                    redis::pipe()
                        .cmd("SET")
                        .arg(key)
                        .arg(json)
                        .arg("PX")
                        .arg(keep)
                        .ignore()
                        .cmd("SADD")
                        .arg(&set)
                        .arg(replica)
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(&set)
                        .arg(keep)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            if wrote.is_ok() {
                self.written = Some((Instant::now(), fingerprint));
            }
        }
        let mut invocation = READ_INCIDENTS.prepare_invoke();
        invocation.key(set).arg(prefix);
        let Ok(values) = shared
            .script::<Vec<String>>("incidents_read", invocation)
            .await
        else {
            return;
        };
        self.others = values
            .iter()
            .filter_map(|v| serde_json::from_str::<Written>(v).ok())
            .filter(|w| w.replica != shared.replica())
            .map(|w| (w.replica.clone(), w))
            .collect();
    }

    /// Hands the others' incidents, as last read, to the log.
    fn show_others(&self, link: &Link) {
        let now = unix_ms(SystemTime::now());
        let stale_ms = millis(STALE_AFTER);
        let others = self
            .others
            .values()
            .flat_map(|w| {
                let stale = now.saturating_sub(w.written_ms) > stale_ms;
                w.incidents.iter().map(move |i| i.view(w.written_ms, stale))
            })
            .collect();
        link.incidents.set_others(others);
    }
}

impl Link {
    async fn subscribe(&self) -> Result<redis::aio::PubSubStream, Unavailable> {
        let mut pubsub = self.shared.pubsub().await?;
        let channel = self.shared.key("health");
        let wait = self
            .shared
            .settings()
            .timeout
            .max(Duration::from_millis(500));
        match tokio::time::timeout(wait, pubsub.subscribe(channel)).await {
            Ok(Ok(())) => Ok(pubsub.into_on_message()),
            Ok(Err(_)) => Err(Unavailable::Connection),
            Err(_) => Err(Unavailable::Timeout),
        }
    }

    /// Tells the other replicas what this one changed since the last scan:
    /// one transaction that writes the keys and publishes one message. On
    /// failure the changes are marked again, for the next scan.
    async fn publish_changes(&self) {
        let taken = self.health.take_to_share();
        let providers = self.health.providers();
        let mut taken_providers: Vec<(&Arc<ProviderHealth>, Vec<ProviderChange>)> = Vec::new();
        let mut events = Vec::new();
        for (id, _, changes) in &taken {
            events.extend(changes.iter().map(|c| Event::of_target(id, *c)));
        }
        for (name, h) in &providers {
            let changes = h.take_to_share();
            if !changes.is_empty() {
                events.extend(changes.iter().map(|c| Event::of_provider(name, *c)));
                taken_providers.push((h, changes));
            }
        }
        if events.is_empty() {
            return;
        }
        let shared = &self.shared;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for e in &events {
            e.store(shared, &mut pipe);
        }
        let kinds: Vec<&'static str> = events.iter().map(Event::kind).collect();
        let message = Message {
            from: shared.replica().to_owned(),
            events,
        };
        let Ok(json) = serde_json::to_string(&message) else {
            return;
        };
        pipe.cmd("PUBLISH")
            .arg(shared.key("health"))
            .arg(json)
            .ignore();
        let told = shared
            .call("health_publish", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await;
        if let Err(e) = told {
            tracing::debug!("health sharing: could not tell the other replicas: {e}");
            for (_, h, changes) in taken {
                h.share_again(&changes);
            }
            for (h, changes) in taken_providers {
                h.share_again(&changes);
            }
        } else {
            for kind in kinds {
                crate::metrics::health_shared("told", kind);
            }
        }
    }

    /// Applies a message of another replica.
    fn receive(&self, msg: &redis::Msg) {
        let Ok(payload) = msg.get_payload::<String>() else {
            return;
        };
        let Ok(message) = serde_json::from_str::<Message>(&payload) else {
            tracing::debug!("health sharing: a message that does not parse");
            return;
        };
        if message.from == self.shared.replica() {
            return;
        }
        for event in message.events {
            self.apply(event);
        }
    }

    fn apply(&self, event: Event) {
        crate::metrics::health_shared("learned", event.kind());
        let (target, change) = match event {
            Event::Opened {
                target,
                age_ms,
                open_for_ms,
            } => (
                target,
                Change::Opened {
                    age: Duration::from_millis(age_ms),
                    open_for: Duration::from_millis(open_for_ms),
                },
            ),
            Event::Closed { target } => (target, Change::Closed),
            Event::CoolDown { target, for_ms } => (
                target,
                Change::CoolDown {
                    remaining: Duration::from_millis(for_ms),
                },
            ),
            Event::Misconfigured { target, for_ms } => (
                target,
                Change::Misconfigured {
                    remaining: Duration::from_millis(for_ms),
                },
            ),
            Event::Override { provider, set } => return self.apply_override(&provider, set),
            Event::Page { provider, page } => {
                let health = self.health.provider(&provider);
                if health.page_state() != page {
                    tracing::info!(%provider, ?page, "status page state learned from another replica");
                }
                health.apply(ProviderChange::Page(page));
                return;
            }
        };
        self.apply_to_target(&target, change);
    }

    fn apply_to_target(&self, target: &Target, change: Change) {
        for h in self.health.matching(&target.id()) {
            let transition = h.apply(change);
            let (provider, model) = (&target.provider, &target.model);
            match transition {
                Some(Transition::Opened) => {
                    crate::metrics::breaker_transition(provider, "open");
                    tracing::warn!(%provider, %model, route = %target.route, "breaker opened by another replica");
                }
                Some(Transition::Closed) => {
                    crate::metrics::breaker_transition(provider, "closed");
                    self.incidents
                        .traffic_recovered(provider, SystemTime::now());
                    tracing::info!(%provider, %model, route = %target.route, "breaker closed by another replica's probe");
                }
                Some(Transition::HalfOpened) | None => {}
            }
        }
    }

    fn apply_override(&self, provider: &str, set: Override) {
        let health = self.health.provider(provider);
        if health.get() == set {
            return;
        }
        health.apply(ProviderChange::Override(set));
        self.incidents
            .overridden(provider, set == Override::Down, SystemTime::now());
        tracing::warn!(%provider, override = ?set, "provider override set on another replica");
    }

    /// Reads what the other replicas hold now: the overrides and the keys
    /// of this replica's targets (after subscribing, so that nothing falls
    /// between).
    async fn catch_up(&self) {
        let shared = &self.shared;
        let key = shared.key("health:overrides");
        let overrides = shared
            .call("health_catch_up", |mut c| async move {
                redis::cmd("HGETALL")
                    .arg(key)
                    .query_async::<Vec<(String, String)>>(&mut c)
                    .await
            })
            .await;
        if let Ok(overrides) = overrides {
            if overrides.is_empty() {
                // No override ever set, or Redis lost its data (restarted
                // without persistence): this replica's overrides stand, and
                // are told again.
                for (_, h) in self.health.providers() {
                    if h.get() != Override::Auto {
                        h.share_again(&[ProviderChange::Override(h.get())]);
                    }
                }
                return self.catch_up_targets().await;
            }
            let set: HashMap<String, Override> = overrides
                .into_iter()
                .filter_map(|(p, v)| match v.as_str() {
                    "up" => Some((p, Override::Up)),
                    "down" => Some((p, Override::Down)),
                    _ => None,
                })
                .collect();
            for (name, _) in self.health.providers() {
                let o = set.get(&name).copied().unwrap_or(Override::Auto);
                self.apply_override(&name, o);
            }
            for (name, o) in &set {
                self.apply_override(name, *o);
            }
        }
        self.catch_up_targets().await;
    }

    /// Reads the keys of this replica's targets and the latest page
    /// readings of its providers.
    async fn catch_up_targets(&self) {
        let shared = &self.shared;
        let providers = self.health.providers();
        if !providers.is_empty() {
            let mut invocation = READ_KEYS.prepare_invoke();
            for (name, _) in &providers {
                invocation.key(page_key(shared, name));
            }
            if let Ok(values) = shared
                .script::<Vec<(i64, String)>>("health_catch_up", invocation)
                .await
            {
                for ((_, h), (_, value)) in providers.iter().zip(values) {
                    if let Ok(page) = serde_json::from_str::<PageState>(&value) {
                        h.apply(ProviderChange::Page(page));
                    }
                }
            }
        }
        let targets = self.health.targets();
        if targets.is_empty() {
            return;
        }
        let mut invocation = READ_KEYS.prepare_invoke();
        for k in keys_of(shared, &targets) {
            invocation.key(k);
        }
        let Ok(values) = shared
            .script::<Vec<(i64, String)>>("health_catch_up", invocation)
            .await
        else {
            return;
        };
        for ((id, h), kinds) in targets.iter().zip(values.chunks(3)) {
            let left = |i: usize| {
                kinds
                    .get(i)
                    .and_then(|(ttl, _)| u64::try_from(*ttl).ok())
                    .filter(|ttl| *ttl > 0)
                    .map(Duration::from_millis)
            };
            if let Some(left) = left(0) {
                let open_for = kinds
                    .first()
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                    .map_or(left, Duration::from_millis);
                let change = Change::Opened {
                    age: open_for.saturating_sub(left),
                    open_for,
                };
                self.apply_to_target(&Target::of(id), change);
            }
            if let Some(remaining) = left(1) {
                let _ = h.apply(Change::CoolDown { remaining });
            }
            if let Some(remaining) = left(2) {
                let _ = h.apply(Change::Misconfigured { remaining });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_written() {
        let target = Target {
            route: "fast".into(),
            provider: "p\"q".into(),
            model: "m:1".into(),
        };
        let events = vec![
            Event::Opened {
                target: target.clone(),
                age_ms: 3,
                open_for_ms: 5000,
            },
            Event::Closed {
                target: target.clone(),
            },
            Event::Override {
                provider: "p".into(),
                set: Override::Down,
            },
            Event::Page {
                provider: "p".into(),
                page: PageState::Degraded,
            },
        ];
        let json = serde_json::to_string(&Message {
            from: "r1".into(),
            events: events.clone(),
        })
        .unwrap();
        let back: Message = serde_json::from_str(&json).unwrap();
        assert_eq!((back.from.as_str(), back.events), ("r1", events));
        assert_eq!(target.key(), r#"["fast","p\"q","m:1"]"#);
    }

    #[test]
    fn a_gone_replicas_ongoing_incidents_end_when_it_last_wrote() {
        let i = WrittenIncident {
            provider: "p".into(),
            cause: Cause::Traffic,
            impact: Impact::Down,
            detail: "every target's circuit breaker opened".into(),
            started_ms: 1_000,
            ended_ms: None,
            failed_over: 2,
        };
        assert_eq!(i.view(5_000, false).ended, None);
        assert_eq!(i.view(5_000, true).ended, Some(from_unix_ms(5_000)));
        assert_eq!(
            i.view(5_000, true).detail,
            "every target's circuit breaker opened"
        );
    }
}
