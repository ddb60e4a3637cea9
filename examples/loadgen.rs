//! A small HTTP/1.1 keep-alive load generator, used by `scripts/bench.sh`.
//!
//! One connection per worker (`hyper::client::conn::http1` over a
//! `TcpStream` with TCP_NODELAY), each sending a chat completion request and
//! reading the whole answer before the next.
//!
//! Two modes:
//! - **closed loop** (no `--rate`): every connection sends its next request as
//!   soon as the previous answer is read; measures throughput.
//! - **open loop** (`--rate R`): requests are scheduled at a fixed rate spread
//!   evenly over the connections (connection `i` of `C` sends at
//!   `start + i/R + k·C/R`). Latency is measured from the *scheduled* time, so
//!   a slow answer that delays the next send on its connection counts against
//!   the server (coordinated omission is not hidden, as in wrk2). One
//!   exception: when a connection was idle and tokio's timer (1 ms
//!   granularity) woke it late, latency starts at the actual send, since that
//!   lateness is the generator's; it is reported as `timer_lag_*`.
//!
//! Requests that *start* during the warm-up (`--warmup` seconds) are sent but
//! not counted. No new request starts after warm-up + `--duration`; those in
//! flight are awaited. Output is one JSON line on stdout: `requests`
//! (successful, in the window), `errors` (non-200, I/O, timeout, or a stream
//! without `data: [DONE]`), `rps`, latency percentiles in microseconds (and
//! time to first body byte for `--stream`), and `requests_total` (every
//! request sent, warm-up included, for per-request CPU accounting) and
//! `loadgen_cpu_ticks` (its own CPU time, Linux only).
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:9000/v1/chat/completions \
//!     --model gpt-4o-mini --connections 16 --duration 6 --warmup 1 [--rate 2000] [--stream]
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "HTTP/1.1 keep-alive load generator for chat completions")]
struct Args {
    /// Full URL, e.g. http://127.0.0.1:9000/v1/chat/completions (plain HTTP only).
    #[arg(long)]
    url: Uri,
    /// The `model` field of the request body.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Connections (one worker each).
    #[arg(long, short, default_value_t = 16)]
    connections: usize,
    /// Measured seconds, after the warm-up.
    #[arg(long, short, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Open loop: this many requests per second over all connections.
    /// Without it, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Send `"stream": true` and record time to first body byte.
    #[arg(long)]
    stream: bool,
    /// Runtime worker threads (1 = current-thread runtime).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A request that takes longer than this many seconds counts as an error.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
    /// Sent as `Authorization: Bearer <key>` (a gateway key with limits).
    #[arg(long)]
    api_key: Option<String>,
    /// Pads the user message so that the request body is about this many
    /// bytes (the cost per request byte); without it, a few dozen.
    #[arg(long)]
    body_bytes: Option<usize>,
}

/// What every worker shares.
struct Plan {
    addr: SocketAddr,
    /// `Bearer <key>`, when one is given.
    authorization: Option<http::HeaderValue>,
    authority: String,
    path: String,
    body: Bytes,
    stream: bool,
    /// Load starts here; measuring starts at `measure_from`; no request
    /// starts at or after `end`.
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Open loop: the gap between two sends on one connection.
    interval: Option<Duration>,
    /// Open loop: the gap between the first sends of two neighbouring connections.
    stagger: Duration,
    timeout: Duration,
}

/// One worker's results; merged at the end.
struct Stats {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    timer_lag: Histogram<u64>,
    ok: u64,
    errors: u64,
    total: u64,
    first_error: Option<String>,
}

impl Stats {
    fn new() -> Result<Self> {
        // 1 µs to 100 s, 3 significant digits.
        let h = || Histogram::<u64>::new_with_bounds(1, 100_000_000, 3);
        Ok(Self {
            latency: h()?,
            ttfb: h()?,
            timer_lag: h()?,
            ok: 0,
            errors: 0,
            total: 0,
            first_error: None,
        })
    }

    fn merge(&mut self, other: &Self) -> Result<()> {
        self.latency.add(&other.latency)?;
        self.ttfb.add(&other.ttfb)?;
        self.timer_lag.add(&other.timer_lag)?;
        self.ok += other.ok;
        self.errors += other.errors;
        self.total += other.total;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        Ok(())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    let line = runtime.block_on(run(args))?;
    println!("{line}");
    Ok(())
}

async fn run(args: Args) -> Result<serde_json::Value> {
    if args.url.scheme_str() != Some("http") {
        bail!("only http:// URLs are supported, got {}", args.url);
    }
    if args.connections == 0 || args.duration <= 0.0 || args.warmup < 0.0 {
        bail!("--connections and --duration must be positive, --warmup not negative");
    }
    let authority = args
        .url
        .authority()
        .context("the URL has no host")?
        .as_str()
        .to_owned();
    let host_port = if args.url.port().is_some() {
        authority.clone()
    } else {
        format!("{authority}:80")
    };
    let addr = tokio::net::lookup_host(&host_port)
        .await?
        .next()
        .with_context(|| format!("cannot resolve {host_port}"))?;
    let path = args
        .url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let content = match args.body_bytes {
        Some(n) => "hello ".repeat(n / 6 + 1),
        None => "hello".to_owned(),
    };
    let mut body = serde_json::json!({
        "model": args.model,
        "messages": [{"role": "user", "content": content}],
    });
    if args.stream {
        body["stream"] = serde_json::Value::Bool(true);
    }
    let body = Bytes::from(serde_json::to_vec(&body)?);

    let conns = args.connections;
    let (interval, stagger) = match args.rate {
        Some(r) if r > 0.0 => (
            Some(Duration::from_secs_f64(conns as f64 / r)),
            Duration::from_secs_f64(1.0 / r),
        ),
        Some(_) => bail!("--rate must be positive"),
        None => (None, Duration::ZERO),
    };
    // A moment for every worker to be spawned before the first send.
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let authorization = match &args.api_key {
        Some(k) => Some(http::HeaderValue::from_str(&format!("Bearer {k}"))?),
        None => None,
    };
    let plan = Arc::new(Plan {
        addr,
        authorization,
        authority,
        path,
        body,
        stream: args.stream,
        start,
        measure_from,
        end: measure_from + Duration::from_secs_f64(args.duration),
        interval,
        stagger,
        timeout: Duration::from_secs_f64(args.timeout),
    });

    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        tasks.push(tokio::spawn(worker(i, Arc::clone(&plan))));
    }
    let mut all = Stats::new()?;
    for task in tasks {
        all.merge(&task.await??)?;
    }

    let pct = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            serde_json::Value::Null
        } else {
            h.value_at_quantile(q).into()
        }
    };
    let mut out = serde_json::json!({
        "label": args.label,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "stream": args.stream,
        "connections": conns,
        "rate": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "requests": all.ok,
        "errors": all.errors,
        "requests_total": all.total,
        "rps": (all.ok as f64 / args.duration * 10.0).round() / 10.0,
        "p50_us": pct(&all.latency, 0.50),
        "p99_us": pct(&all.latency, 0.99),
        "p999_us": pct(&all.latency, 0.999),
        "max_us": pct(&all.latency, 1.0),
        "mean_us": all.latency.mean().round(),
        "first_error": all.first_error,
        "loadgen_cpu_ticks": own_cpu_ticks(),
    });
    if args.stream {
        out["ttfb_p50_us"] = pct(&all.ttfb, 0.50);
        out["ttfb_p99_us"] = pct(&all.ttfb, 0.99);
        out["ttfb_p999_us"] = pct(&all.ttfb, 0.999);
    }
    if args.rate.is_some() {
        out["timer_lag_p50_us"] = pct(&all.timer_lag, 0.50);
        out["timer_lag_p99_us"] = pct(&all.timer_lag, 0.99);
    }
    Ok(out)
}

/// This process's utime + stime in clock ticks (Linux), for the script's
/// accounting of who used the machine during a run.
fn own_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; count from its closing paren.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

async fn worker(index: usize, plan: Arc<Plan>) -> Result<Stats> {
    let mut stats = Stats::new()?;
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    let mut next_send = plan.start + plan.stagger * u32::try_from(index)?;
    tokio::time::sleep_until(plan.start).await;
    loop {
        // `begin` decides warm-up membership; `origin` is where latency starts.
        let now = Instant::now();
        let (begin, origin) = match plan.interval {
            Some(interval) => {
                let scheduled = next_send;
                next_send += interval;
                if scheduled >= plan.end {
                    break;
                }
                if now < scheduled {
                    tokio::time::sleep_until(scheduled).await;
                    let sent = Instant::now();
                    stats.timer_lag.record(micros(sent - scheduled))?;
                    (scheduled, sent)
                } else {
                    // Behind schedule because of a slow answer: that wait is
                    // the server's and counts.
                    (scheduled, scheduled)
                }
            }
            None => {
                if now >= plan.end {
                    break;
                }
                (now, now)
            }
        };
        let counted = begin >= plan.measure_from;
        let outcome = tokio::time::timeout(plan.timeout, one_request(&mut conn, &plan)).await;
        stats.total += 1;
        let error = match outcome {
            Ok(Ok((first_byte, done))) => {
                if counted {
                    stats.ok += 1;
                    stats.latency.record(micros(done - origin))?;
                    if plan.stream {
                        stats.ttfb.record(micros(first_byte - origin))?;
                    }
                }
                continue;
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no complete answer within {:?}", plan.timeout),
        };
        // The connection's state is unknown after a failure: start afresh.
        conn = None;
        if counted {
            stats.errors += 1;
        }
        stats.first_error.get_or_insert(error);
        if plan.interval.is_none() {
            // Do not spin on a refused connection.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(stats)
}

async fn connect(plan: &Plan) -> Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(plan.addr)
        .await
        .with_context(|| format!("connect to {}", plan.addr))?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        // Its errors surface on the sender.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request and reads the whole answer; returns when the first body
/// byte and the end arrived.
async fn one_request(
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    plan: &Plan,
) -> Result<(Instant, Instant)> {
    // A keep-alive connection the server closed while idle is replaced
    // silently: that is not a failed request.
    let reusable = match conn.as_mut() {
        Some(sender) => !sender.is_closed() && sender.ready().await.is_ok(),
        None => false,
    };
    if !reusable {
        *conn = Some(connect(plan).await?);
    }
    let Some(sender) = conn.as_mut() else {
        bail!("no connection");
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(plan.path.as_str())
        .header(HOST, plan.authority.as_str())
        .header(CONTENT_TYPE, "application/json");
    if let Some(auth) = &plan.authorization {
        req = req.header(http::header::AUTHORIZATION, auth);
    }
    let req = req.body(Full::new(plan.body.clone()))?;
    let resp = sender.send_request(req).await.context("send")?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut first_byte = None;
    // The last bytes seen, to check a stream's terminator.
    let mut tail: Vec<u8> = Vec::with_capacity(64);
    while let Some(frame) = body.frame().await {
        let frame = frame.context("read body")?;
        if let Some(data) = frame.data_ref() {
            if data.is_empty() {
                continue;
            }
            if first_byte.is_none() {
                first_byte = Some(Instant::now());
            }
            if plan.stream {
                tail.extend_from_slice(&data[data.len().saturating_sub(64)..]);
                let excess = tail.len().saturating_sub(64);
                tail.drain(..excess);
            }
        }
    }
    let done = Instant::now();
    if status != StatusCode::OK {
        bail!("status {status}");
    }
    if plan.stream && !tail.trim_ascii_end().ends_with(b"data: [DONE]") {
        bail!("stream ended without `data: [DONE]`");
    }
    Ok((first_byte.unwrap_or(done), done))
}
