//! The state replicas share, on Redis (`[state] backend = "redis"`).
//!
//! [`Shared`] is the one handle to it: the connection, whether Redis is up,
//! how many replicas are alive, and every call's deadline. The policy
//! modules keep their own keys and scripts (`limits`, `cache`, `health`);
//! this module only carries calls and says how they went.
//!
//! Invariants:
//! - **Cancellation is safe.** Calls go through redis-rs's multiplexed
//!   connection (inside its `ConnectionManager`), which pairs each reply
//!   with its own request through a channel per call; a call dropped between
//!   sending and reading (a client that disconnects, a timeout) has its reply
//!   discarded, never handed to the next caller. `tests/replicas.rs` proves it
//!   with many tenants, cut requests and timed-out calls.
//! - **Redis never stops traffic.** Every call is bounded by `timeout`; a
//!   failure is an `Err` the caller turns into its local behaviour. While
//!   Redis is known down, calls fail at once (`Unavailable::Down`) instead of
//!   each waiting out the timeout; a heartbeat brings it back.
//! - **The URL is a secret**: it is never logged or shown unmasked.
//!
//! The heartbeat (every second, every quarter second while down) registers
//! this replica in a sorted set with its time, drops replicas not seen for
//! [`REPLICA_TTL`], and reads how many are alive: the divisor of each limit
//! while Redis is down (`on_redis_failure = "local"`).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::{OnRedisFailure, RedisSettings};
use crate::metrics;

/// A replica not seen for this long is no longer counted as alive.
pub const REPLICA_TTL: Duration = Duration::from_secs(5);
const BEAT_EVERY: Duration = Duration::from_secs(1);
const BEAT_EVERY_WHILE_DOWN: Duration = Duration::from_millis(250);
/// Timeouts in a row after which Redis counts as down.
const TIMEOUTS_FOR_DOWN: u32 = 3;

/// Why a shared-state call did not happen or did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("Redis is down")]
    Down,
    #[error("Redis did not answer within the timeout")]
    Timeout,
    #[error("the connection to Redis failed")]
    Connection,
    /// Redis answered with an error (a script error, OOM, READONLY).
    #[error("Redis answered an error: {0}")]
    Server(String),
}

impl Unavailable {
    fn kind(&self) -> &'static str {
        match self {
            Self::Down => "down",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Server(_) => "server",
        }
    }
}

/// The handle to the replicas' Redis.
pub struct Shared {
    settings: RedisSettings,
    /// This replica's id in the replica set (and in lease names).
    replica: String,
    conn: ArcSwapOption<ConnectionManager>,
    up: AtomicBool,
    timeouts_in_a_row: AtomicU32,
    live_replicas: AtomicUsize,
    /// Wakes the heartbeat when a call finds Redis gone, so that it is
    /// asked again within [`BEAT_EVERY_WHILE_DOWN`], not a whole beat later.
    wake: tokio::sync::Notify,
    /// When the state last changed, and what went wrong last (for operators).
    last_error: std::sync::RwLock<Option<(String, std::time::SystemTime)>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("url", &self.settings.masked_url())
            .field("replica", &self.replica)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// What `/admin/health` shows of Redis.
#[derive(Debug, Serialize)]
pub struct View {
    pub url: String,
    pub up: bool,
    pub replica: String,
    pub live_replicas: usize,
    pub on_redis_failure: &'static str,
    pub timeout_ms: u64,
    pub last_error: Option<String>,
}

impl Shared {
    /// The handle for `settings`, connecting in the background: a Redis
    /// that cannot be reached at start is a warning, and the handle reports
    /// down until the heartbeat reaches it. Needs a tokio runtime.
    pub fn start(settings: RedisSettings) -> Arc<Self> {
        let replica = format!(
            "{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            fastrand::u32(..)
        );
        let shared = Arc::new(Self {
            settings,
            replica,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            timeouts_in_a_row: AtomicU32::new(0),
            live_replicas: AtomicUsize::new(1),
            wake: tokio::sync::Notify::new(),
            last_error: std::sync::RwLock::new(None),
        });
        metrics::redis_up(false);
        tokio::spawn(keep_connected(Arc::downgrade(&shared)));
        shared
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether calls are being made (the last heartbeat reached Redis and
    /// no connection failure since).
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Replicas alive at the last heartbeat that reached Redis (at least 1).
    pub fn live_replicas(&self) -> usize {
        self.live_replicas.load(Relaxed).max(1)
    }

    pub fn on_failure(&self) -> OnRedisFailure {
        self.settings.on_failure
    }

    /// `parts` under this deployment's key prefix.
    pub fn key(&self, parts: &str) -> String {
        let mut k = String::with_capacity(self.settings.key_prefix.len() + parts.len());
        k.push_str(&self.settings.key_prefix);
        k.push_str(parts);
        k
    }

    pub fn view(&self) -> View {
        let last_error = self
            .last_error
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(e, at)| format!("{e} (at {})", httpdate::fmt_http_date(*at)));
        View {
            url: self.settings.masked_url(),
            up: self.is_up(),
            replica: self.replica.clone(),
            live_replicas: self.live_replicas(),
            on_redis_failure: self.settings.on_failure.as_str(),
            timeout_ms: self.settings.timeout.as_millis() as u64,
            last_error,
        }
    }

    /// Runs `call` on the connection within the timeout. `op` names it in
    /// metrics. Fails at once while Redis is down.
    pub async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = match self.conn.load_full() {
            Some(c) if self.is_up() => (*c).clone(),
            _ => {
                metrics::redis_failure(op, Unavailable::Down.kind());
                return Err(Unavailable::Down);
            }
        };
        self.call_on(op, conn, self.settings.timeout, call).await
    }

    /// Runs a script invocation (keys and arguments set; see
    /// [`Shared::call`]). The script is sent by hash, and in full once when
    /// Redis does not know it yet.
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'static>,
    ) -> Result<T, Unavailable> {
        self.call(
            op,
            |mut c| async move { invocation.invoke_async(&mut c).await },
        )
        .await
    }

    async fn call_on<T, F, Fut>(
        &self,
        op: &'static str,
        conn: ConnectionManager,
        timeout: Duration,
        call: F,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, call(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Unavailable::Timeout),
        };
        let failure = result.as_ref().err();
        metrics::redis_call(op, started.elapsed(), failure.map(Unavailable::kind));
        match failure {
            None => self.timeouts_in_a_row.store(0, Relaxed),
            Some(Unavailable::Timeout) => {
                let n = self.timeouts_in_a_row.fetch_add(1, Relaxed) + 1;
                if n >= TIMEOUTS_FOR_DOWN {
                    self.mark_down(&Unavailable::Timeout);
                }
            }
            Some(e @ Unavailable::Connection) => self.mark_down(e),
            Some(e) => self.note(e),
        }
        result
    }

    fn note(&self, e: &Unavailable) {
        *self.last_error.write().unwrap_or_else(|e| e.into_inner()) =
            Some((e.to_string(), std::time::SystemTime::now()));
    }

    fn mark_down(&self, why: &Unavailable) {
        self.note(why);
        if self.up.swap(false, Relaxed) {
            tracing::warn!(
                redis = %self.settings.masked_url(),
                "shared state: {why}; running on local state ({} limits) until it is back",
                self.settings.on_failure.as_str()
            );
            metrics::redis_up(false);
            self.wake.notify_one();
        }
    }

    fn mark_up(&self, replicas: usize) {
        self.live_replicas.store(replicas.max(1), Relaxed);
        metrics::redis_replicas(replicas.max(1));
        self.timeouts_in_a_row.store(0, Relaxed);
        if !self.up.swap(true, Relaxed) {
            tracing::info!(
                redis = %self.settings.masked_url(),
                replicas,
                "shared state: Redis reached; limits, cache and health are shared"
            );
            metrics::redis_up(true);
        }
    }

    /// One heartbeat: registers this replica and counts the live ones.
    async fn beat(&self, conn: ConnectionManager) -> Result<usize, Unavailable> {
        let replicas = self.key("replicas");
        let ttl_ms = REPLICA_TTL.as_millis() as u64;
        let id = self.replica.clone();
        // A heartbeat may wait longer than a request's call: it decides up
        // or down, not a request's latency.
        let timeout = self.settings.timeout.max(Duration::from_millis(250));
        self.call_on("heartbeat", conn, timeout, |mut c| async move {
            HEARTBEAT
                .key(replicas)
                .arg(id)
                .arg(ttl_ms)
                .invoke_async::<usize>(&mut c)
                .await
        })
        .await
    }

    /// A connection of its own for pub/sub (a subscribed connection can
    /// carry nothing else), opened within a bounded wait. The URL stays
    /// inside: errors say what failed, never where.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, Unavailable> {
        let client = redis::Client::open(self.settings.url.expose())
            .map_err(|e| Unavailable::Server(format!("bad redis_url: {:?}", e.kind())))?;
        let wait = self.settings.timeout.max(Duration::from_millis(500)) * 2;
        let result = match tokio::time::timeout(wait, client.get_async_pubsub()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Unavailable::Timeout),
        };
        if let Err(e) = &result {
            metrics::redis_failure("pubsub", e.kind());
            self.note(e);
        }
        result
    }

    /// Leaves the replica set (at shutdown), so the others' shares grow at
    /// once instead of after [`REPLICA_TTL`].
    pub async fn leave(&self) {
        let replicas = self.key("replicas");
        let id = self.replica.clone();
        let _ = self
            .call("leave", |mut c| async move {
                redis::cmd("ZREM")
                    .arg(replicas)
                    .arg(id)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}

/// Registers `ARGV[1]` as alive now in the sorted set `KEYS[1]`, forgets
/// members older than `ARGV[2]` ms, and returns how many are alive. The time
/// is Redis's, so replicas' clocks never disagree.
static HEARTBEAT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 4)
return redis.call('ZCARD', KEYS[1])
",
    )
});

fn classify(e: &redis::RedisError) -> Unavailable {
    if e.is_timeout() {
        Unavailable::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        Unavailable::Connection
    } else {
        // Server errors name the command or script, never the URL.
        Unavailable::Server(e.to_string())
    }
}

/// Connects (retrying with backoff), then beats until the handle is gone.
async fn keep_connected(shared: std::sync::Weak<Shared>) {
    let client = {
        let Some(s) = shared.upgrade() else { return };
        match redis::Client::open(s.settings.url.expose()) {
            Ok(c) => c,
            Err(e) => {
                // Checked when the config was loaded; never echo the URL.
                s.note(&Unavailable::Server(format!(
                    "bad redis_url: {:?}",
                    e.kind()
                )));
                tracing::error!(redis = %s.settings.masked_url(), "shared state: the redis_url cannot be used; serving on local state");
                return;
            }
        }
    };
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    let manager = loop {
        let Some(s) = shared.upgrade() else { return };
        let timeout = s.settings.timeout.max(Duration::from_millis(500));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(s.settings.timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        match tokio::time::timeout(
            timeout * 4,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        {
            Ok(Ok(m)) => break m,
            Ok(Err(e)) => s.note(&classify(&e)),
            Err(_) => s.note(&Unavailable::Timeout),
        }
        if !warned {
            warned = true;
            tracing::warn!(
                redis = %s.settings.masked_url(),
                "shared state: Redis cannot be reached; serving on local state and retrying"
            );
        }
        drop(s);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    };
    {
        let Some(s) = shared.upgrade() else { return };
        s.conn.store(Some(Arc::new(manager.clone())));
    }
    loop {
        let Some(s) = shared.upgrade() else { return };
        let every = match s.beat(manager.clone()).await {
            Ok(n) => {
                s.mark_up(n);
                BEAT_EVERY
            }
            Err(e) => {
                s.mark_down(&e);
                BEAT_EVERY_WHILE_DOWN
            }
        };
        let woken = async {
            s.wake.notified().await;
            tokio::time::sleep(BEAT_EVERY_WHILE_DOWN).await;
        };
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = woken => {}
        }
        drop(s);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "detour".to_owned())
}
