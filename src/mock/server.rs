//! Accept loop, per-connection task, and the request pipeline:
//! count → read body → record → decide fault → (reset | hang | 429 | error | serve)
//! → wait `latency` → headers → (streams: wait `ttfb`, then paced events).

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use socket2::SockRef;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::body::{MockBody, Payload, Reply, SseBody};
use super::faults::{Decision, Faults};
use super::gen;
use super::openai::{self, Route};
use super::record::{Counters, Endpoint, Recorder};
use super::{control, MockOptions};

/// State shared by the server handle, the accept loop and every connection.
pub(crate) struct Shared {
    pub opts: MockOptions,
    pub faults: ArcSwap<Faults>,
    pub counters: Counters,
    pub recorder: Recorder,
    fingerprint: String,
    builder: auto::Builder<TokioExecutor>,
}

impl Shared {
    pub(crate) fn new(opts: MockOptions) -> Self {
        let fingerprint = format!("fp_{:010x}", gen::mix(opts.seed, 0xf1) >> 24);
        Self {
            opts,
            faults: ArcSwap::from_pointee(Faults::default()),
            counters: Counters::default(),
            recorder: Recorder::new(),
            fingerprint,
            builder: auto::Builder::new(TokioExecutor::new()),
        }
    }

    /// Clears faults, counters and recorded requests; arrival numbers restart at 0, so
    /// the fault sequence after a reset is the same as after start.
    pub(crate) fn reset(&self) {
        self.faults.store(Arc::new(Faults::default()));
        self.counters.clear();
        self.recorder.clear();
    }
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<()>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(
                    Arc::clone(&shared),
                    stream,
                    shutdown.clone(),
                ));
            }
            Err(error) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::debug!(%error, "mock: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// What a handler asks its connection task to do instead of answering.
#[derive(Clone, Copy, Debug)]
enum ConnAction {
    /// Close with RST and no response.
    Reset,
    /// Stop serving, keep the socket open until the peer closes it.
    Hang,
}

/// A handler's line to its connection task.
#[derive(Clone)]
struct ConnCtl(mpsc::UnboundedSender<ConnAction>);

impl ConnCtl {
    /// Hands the connection over and waits until the connection task is done with it.
    /// The response is never sent; it only satisfies the service signature (HTTP/2
    /// handlers run in their own task and get here once the connection is gone).
    async fn take_over(&self, action: ConnAction) -> Response<MockBody> {
        if self.0.send(action).is_ok() {
            self.0.closed().await;
        }
        let mut response = Response::new(MockBody::empty());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
    }
}

/// Serves one TCP connection (HTTP/1.1 or h2c).
///
/// To reset or hang a connection the task needs the socket after hyper owns it, so it
/// keeps a duplicate file descriptor. Reset: set `SO_LINGER` 0 on the duplicate, drop
/// the hyper connection (closing one descriptor sends nothing while the duplicate is
/// open), then drop the duplicate: the last close with linger 0 makes the kernel send
/// RST. Hang: drop the hyper connection and read from the duplicate until the peer
/// closes it.
async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    mut shutdown: watch::Receiver<()>,
) {
    // Headers and body are separate writes: without NODELAY, Nagle stalls keep-alive.
    let _ = stream.set_nodelay(true);
    let Ok((stream, duplicate)) = with_duplicate(stream) else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctl = ConnCtl(tx);
    let for_service = Arc::clone(&shared);
    let service = service_fn(move |req| handle(Arc::clone(&for_service), ctl.clone(), req));
    let mut conn = Box::pin(
        shared
            .builder
            .serve_connection(TokioIo::new(stream), service),
    );
    let action = tokio::select! {
        _ = conn.as_mut() => None,
        action = rx.recv() => action,
        _ = shutdown.changed() => None,
    };
    match action {
        Some(ConnAction::Reset) => {
            let _ = SockRef::from(&duplicate).set_linger(Some(Duration::ZERO));
            drop(conn);
            drop(duplicate);
        }
        Some(ConnAction::Hang) => {
            drop(conn);
            hold_until_peer_closes(duplicate, shutdown).await;
        }
        None => {}
    }
}

fn with_duplicate(stream: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let stream = stream.into_std()?;
    let duplicate = stream.try_clone()?;
    Ok((TcpStream::from_std(stream)?, duplicate))
}

async fn hold_until_peer_closes(socket: std::net::TcpStream, mut shutdown: watch::Receiver<()>) {
    let Ok(mut socket) = TcpStream::from_std(socket) else {
        return;
    };
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            read = socket.read(&mut buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return;
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    ctl: ConnCtl,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let start = Instant::now();
    if req.uri().path().starts_with(control::PREFIX) {
        return Ok(response(control::handle(&shared, req).await, unpaced));
    }
    Ok(traffic(&shared, &ctl, req, start).await)
}

/// The pipeline for every non-control request.
async fn traffic(
    shared: &Shared,
    ctl: &ConnCtl,
    req: Request<Incoming>,
    start: Instant,
) -> Response<MockBody> {
    let route = Route::of(req.method(), req.uri().path());
    let endpoint = match route {
        Route::ChatCompletions => Endpoint::ChatCompletions,
        Route::Embeddings => Endpoint::Embeddings,
        Route::Models | Route::Model | Route::NotFound => Endpoint::Other,
    };
    let seed = shared.opts.seed;
    let seq = shared.counters.arrive(endpoint);
    let stamp = |mut response: Response<MockBody>| {
        let id = gen::hex_id(seed, seq);
        openai::stamp_headers(response.headers_mut(), &id, start.elapsed());
        response
    };
    let (parts, body) = req.into_parts();
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(reply) => return stamp(response(reply, unpaced)),
    };
    shared.recorder.record(seq, &parts, &body);

    let faults = shared.faults.load_full();
    let decision = faults.decide(seed, seq);
    shared.counters.fault(decision);
    let latency = Duration::from_millis(faults.latency_ms);
    let ttfb = Duration::from_millis(faults.ttfb_ms);
    let reply = match decision {
        Decision::Hang => return ctl.take_over(ConnAction::Hang).await,
        Decision::Reset => {
            pause(latency).await;
            return ctl.take_over(ConnAction::Reset).await;
        }
        Decision::RateLimit => openai::rate_limited(faults.retry_after_secs),
        Decision::Error => openai::injected_error(faults.error_status),
        Decision::Serve => {
            let denied = shared
                .opts
                .api_key
                .as_deref()
                .and_then(|key| openai::check_auth(&parts.headers, key));
            denied.unwrap_or_else(|| {
                let ctx = openai::Ctx {
                    seed,
                    seq,
                    fingerprint: &shared.fingerprint,
                    chunks: faults.chunks.unwrap_or(shared.opts.chunks).max(1),
                };
                openai::serve(route, &parts.method, parts.uri.path(), &body, &ctx)
            })
        }
    };
    match &reply.payload {
        Payload::Json(_) => pause(latency + ttfb).await,
        Payload::Sse(_) => pause(latency).await,
    }
    let paced = |events: Vec<Bytes>| {
        let cut = faults.cut_after_chunks.filter(|&n| n < events.len());
        if cut.is_some() {
            shared.counters.cut();
        }
        let gap = faults
            .chunk_gap_ms
            .map_or(shared.opts.chunk_gap, Duration::from_millis);
        SseBody::new(events, ttfb, gap, cut)
    };
    stamp(response(reply, paced))
}

/// Turns a reply into a response; `sse` decides how a stream is paced.
fn response(reply: Reply, sse: impl FnOnce(Vec<Bytes>) -> SseBody) -> Response<MockBody> {
    let (content_type, body) = match reply.payload {
        Payload::Json(bytes) => ("application/json", MockBody::full(bytes)),
        Payload::Sse(events) => (
            "text/event-stream; charset=utf-8",
            MockBody::Sse(sse(events)),
        ),
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    *response.headers_mut() = reply.headers;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn unpaced(events: Vec<Bytes>) -> SseBody {
    SseBody::new(events, Duration::ZERO, Duration::ZERO, None)
}

async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

const MAX_BODY_BYTES: usize = 32 << 20;

pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, Reply> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(openai::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "mock: request body is larger than 32 MiB",
            "invalid_request_error",
            None,
            None,
        )),
        Err(error) => Err(openai::error(
            StatusCode::BAD_REQUEST,
            &format!("mock: could not read the request body: {error}"),
            "invalid_request_error",
            None,
            None,
        )),
    }
}
