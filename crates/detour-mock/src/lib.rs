//! `detour mock`: fake upstream providers with scriptable faults.
//!
//! The gateway's tests and benchmarks use a mock as their upstream, and users point
//! detour at one to drill failover. Flavors, each following `PROVIDERS.md`:
//!
//! - `openai` (§1, `openai.rs`): chat completions, embeddings, models;
//! - `anthropic` (§2, `anthropic.rs`): messages (plain and streamed), count_tokens,
//!   models; requires `anthropic-version`;
//! - `gemini` (§3, `gemini.rs`): generateContent, streamGenerateContent (SSE or JSON
//!   array), countTokens, models;
//! - `statuspage` (§5.2, `statuspage.rs`): a Statuspage v2 page whose state is set with
//!   [`MockServer::set_status`] or `PUT /_mock/status` (see [`PageStatus`]).
//!
//! The LLM flavors answer any model name, call the first offered tool with arguments
//! built from its schema, quote tool results back, and add a few fields real clients
//! must ignore (`x_mock`, `obfuscation`, `caller`).
//!
//! # Fault model
//!
//! Faults are a [`Faults`] value, replaced at run time with [`MockServer::set_faults`]
//! or `PUT /_mock/faults` (the control API is documented in `control.rs`). Each traffic request
//! gets an arrival number `seq` (0, 1, 2, ... since start or the last reset) and one
//! draw from an RNG seeded with `(MockOptions::seed, seq)`. That draw picks at most one
//! request-level fault, in this order of precedence:
//!
//! - **reset** (`reset_rate`): the TCP connection is closed with RST, no response;
//! - **hang** (`hang_rate`): no response ever; the socket stays open until the client
//!   gives up;
//! - **rate limit** (`rate_limit_rate`): 429 with `retry-after: retry_after_secs`,
//!   `x-ratelimit-*` and a `rate_limit_exceeded` body;
//! - **error** (`error_rate`): `error_status` with the provider's body for that status
//!   (Anthropic: 529 is `overloaded_error`; status page: an HTML page).
//!
//! Rate limits per flavor: OpenAI and Anthropic send `retry-after` and their rate-limit
//! headers; Gemini only `RetryInfo.retryDelay` in the body, as Google does.
//! `should_retry` adds `x-should-retry` to OpenAI and Anthropic fault replies.
//!
//! Shape faults apply to every request: `latency_ms` before the headers; `ttfb_ms`
//! between headers and the first stream event (or added to the latency when not
//! streaming); `chunks` / `chunk_gap_ms` reshape streams; `stream_error_after_chunks`
//! ends a 200 stream with the provider's mid-stream error event after that many
//! content chunks (body ends cleanly); `cut_after_chunks` aborts a stream after that
//! many events, so no terminator arrives and the body is incomplete; `malformed` cuts
//! every 200 JSON body in half.
//!
//! Hostile-provider faults: `retry_after` sends any `retry-after` text on rate-limit
//! and error faults (`"1e20"`, `"NaN"`, a year-9999 date); `endless_event_after` starts
//! a stream event that never ends (64 KiB every 2 ms, no blank line); `gzip` compresses
//! every 2xx body with `content-encoding: gzip` whatever the request asked for;
//! `html_200` answers 200 with an HTML page, as a proxy in front of a provider does.
//!
//! So a run is reproducible: the same seed and the same request order give the same
//! fault decisions, and the generated content depends only on the seed and the request
//! (ids also on `seq`). Control requests are not traffic: they neither count in
//! [`Stats`] nor advance `seq`.
//!
//! # Speed
//!
//! A mock is the upstream in benchmarks, so the hot path holds no lock (faults behind
//! `ArcSwap`, atomic counters, a lock-free ring of recorded requests whose conversion to
//! JSON is deferred until asked), logs nothing per request, and sets `TCP_NODELAY`.

mod anthropic;
mod body;
mod control;
mod faults;
mod gemini;
mod gen;
mod gzip;
mod openai;
mod record;
mod responses;
mod server;
mod shared;
mod statuspage;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use faults::Faults;
pub use record::{FaultStats, RecordedRequest, Stats, RECORDED_REQUESTS};
pub use statuspage::{
    ComponentStatus, Incident, IncidentStatus, Indicator, PageStatus, DEFAULT_COMPONENTS,
};

use shared::Shared;

/// Which provider the mock imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavor {
    Openai,
    Anthropic,
    Gemini,
    Statuspage,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::Statuspage => "statuspage",
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Start-up settings. Faults are separate and can change at run time.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Seeds fault decisions and generated content.
    pub seed: u64,
    /// Content pieces per streamed choice (default 8).
    pub chunks: usize,
    /// Pause between consecutive stream events (default 0).
    pub chunk_gap: Duration,
    /// If set, traffic must carry the key the provider's way, else the provider's
    /// auth error: OpenAI `Authorization: Bearer` (401); Anthropic `x-api-key` or
    /// `Authorization: Bearer` (401); Gemini `x-goog-api-key` or `?key=` (wrong key
    /// 400 `API_KEY_INVALID`, none 403). The status page ignores it.
    pub api_key: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            chunks: 8,
            chunk_gap: Duration::ZERO,
            api_key: None,
        }
    }
}

/// A running mock. Dropping it (or [`MockServer::shutdown`]) stops the accept loop and
/// closes every connection.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
    /// Dropping the sender tells every connection task to stop.
    _stop: watch::Sender<()>,
}

impl MockServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn flavor(&self) -> Flavor {
        self.shared.flavor
    }

    /// Statuspage flavor: replaces the page's state, like `PUT /_mock/status`.
    pub fn set_status(&self, status: PageStatus) {
        self.shared.set_status(&status);
    }

    /// Statuspage flavor: the page's state with every field filled in.
    pub fn status(&self) -> PageStatus {
        self.shared.page.load().status.clone()
    }

    /// Replaces the faults (not validated; see [`Faults::validate`]).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.faults.store(Arc::new(faults));
    }

    pub fn faults(&self) -> Faults {
        Faults::clone(&self.shared.faults.load())
    }

    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// The last [`RECORDED_REQUESTS`] traffic requests, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.recorder.snapshot()
    }

    /// Same as `POST /_mock/reset`: clears faults, stats, recorded requests and the
    /// page status.
    pub fn reset(&self) {
        self.shared.reset();
    }

    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Serves `flavor` on `listener` in a background task until the handle is dropped.
pub async fn spawn(
    flavor: Flavor,
    listener: TcpListener,
    opts: MockOptions,
) -> io::Result<MockServer> {
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(flavor, opts));
    let (stop, stopped) = watch::channel(());
    let accept = tokio::spawn(server::accept_loop(listener, Arc::clone(&shared), stopped));
    Ok(MockServer {
        addr,
        shared,
        accept,
        _stop: stop,
    })
}

/// `detour mock`: binds `listen`, prints `detour mock (FLAVOR) listening on http://ADDR`,
/// and serves until ctrl-c.
pub async fn run(flavor: Flavor, listen: SocketAddr, opts: MockOptions) -> io::Result<()> {
    let server = spawn(flavor, bind(listen)?, opts).await?;
    println!(
        "detour mock ({flavor}) listening on http://{}",
        server.addr()
    );
    tokio::signal::ctrl_c().await?;
    server.shutdown();
    Ok(())
}

/// A listener with `SO_REUSEADDR` and a deep backlog, for benchmark connection storms.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}
