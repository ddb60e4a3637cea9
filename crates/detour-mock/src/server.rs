//! Accept loop, per-connection task, and the request pipeline:
//! count → read body → record → decide fault → (reset | hang | 429 | error | serve)
//! → reshape (malformed, stream error) → wait `latency` → headers → (streams: wait
//! `ttfb`, then paced events). The flavor decides routes, auth, bodies and headers.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use socket2::SockRef;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::body::{read_body, Ctx, MockBody, Payload, Reply, SseBody};
use super::faults::Decision;
use super::record::Endpoint;
use super::shared::Shared;
use super::statuspage;
use super::{anthropic, control, gemini, gen, gzip, openai, Flavor};

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
/// closes it. On h2c both affect the whole connection, other streams included.
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

/// A request's endpoint in its flavor.
#[derive(Clone, Copy, Debug)]
enum Route {
    Openai(openai::Route),
    Anthropic(anthropic::Route),
    Gemini(gemini::Route),
    Statuspage(statuspage::Route),
}

impl Route {
    fn of(flavor: Flavor, method: &http::Method, path: &str) -> Self {
        match flavor {
            Flavor::Openai => Self::Openai(openai::Route::of(method, path)),
            Flavor::Anthropic => Self::Anthropic(anthropic::Route::of(method, path)),
            Flavor::Gemini => Self::Gemini(gemini::Route::of(method, path)),
            Flavor::Statuspage => Self::Statuspage(statuspage::Route::of(method, path)),
        }
    }

    fn endpoint(self) -> Endpoint {
        use statuspage::Route as S;
        match self {
            Self::Openai(openai::Route::ChatCompletions) => Endpoint::ChatCompletions,
            Self::Openai(openai::Route::Embeddings) => Endpoint::Embeddings,
            Self::Openai(openai::Route::Responses) => Endpoint::Responses,
            Self::Anthropic(anthropic::Route::Messages) => Endpoint::Messages,
            Self::Gemini(gemini::Route::Generate | gemini::Route::Stream) => {
                Endpoint::GenerateContent
            }
            Self::Statuspage(S::NotFound) => Endpoint::Other,
            Self::Statuspage(_) => Endpoint::StatusPoll,
            Self::Openai(_) | Self::Anthropic(_) | Self::Gemini(_) => Endpoint::Other,
        }
    }
}

fn request_id(flavor: Flavor, seed: u64, seq: u64) -> String {
    match flavor {
        Flavor::Anthropic => anthropic::request_id(seed, seq),
        Flavor::Openai | Flavor::Gemini | Flavor::Statuspage => {
            format!("req_{}", gen::hex_id(seed, seq))
        }
    }
}

/// The flavor's error for a failure outside its handlers (an unreadable body).
fn status_error(flavor: Flavor, status: StatusCode, message: &str, ctx: &Ctx<'_>) -> Reply {
    match flavor {
        Flavor::Openai => openai::status_error(status, message),
        Flavor::Anthropic => anthropic::status_error(status, message, ctx),
        Flavor::Gemini => gemini::status_error(status, message),
        Flavor::Statuspage => statuspage::html(status, message),
    }
}

/// The pipeline for every non-control request.
async fn traffic(
    shared: &Shared,
    ctl: &ConnCtl,
    req: Request<Incoming>,
    start: Instant,
) -> Response<MockBody> {
    let flavor = shared.flavor;
    let route = Route::of(flavor, req.method(), req.uri().path());
    let seed = shared.opts.seed;
    let seq = shared.counters.arrive(route.endpoint());
    let request_id = request_id(flavor, seed, seq);
    let mut ctx = Ctx {
        seed,
        seq,
        fingerprint: &shared.fingerprint,
        chunks: shared.opts.chunks.max(1),
        request_id: &request_id,
    };
    let stamp = |mut response: Response<MockBody>| {
        let headers = response.headers_mut();
        match flavor {
            Flavor::Openai => openai::stamp_headers(headers, &request_id, start.elapsed()),
            Flavor::Anthropic => anthropic::stamp_headers(headers, &request_id),
            Flavor::Gemini => gemini::stamp_headers(headers, start.elapsed()),
            Flavor::Statuspage => {}
        }
        response
    };
    let (parts, body) = req.into_parts();
    let body = match read_body(body).await {
        Ok(body) => body,
        Err((status, message)) => {
            let reply = status_error(flavor, status, &message, &ctx);
            return stamp(response(reply, unpaced));
        }
    };
    shared.recorder.record(seq, &parts, &body);

    let faults = shared.faults.load_full();
    if let Some(chunks) = faults.chunks {
        ctx.chunks = chunks.max(1);
    }
    let decision = faults.decide(seed, seq);
    shared.counters.fault(decision);
    let latency = Duration::from_millis(faults.latency_ms);
    let ttfb = Duration::from_millis(faults.ttfb_ms);
    let mut reply = match decision {
        Decision::Hang => return ctl.take_over(ConnAction::Hang).await,
        Decision::Reset => {
            pause(latency).await;
            return ctl.take_over(ConnAction::Reset).await;
        }
        Decision::RateLimit | Decision::Error => {
            let secs = faults.retry_after_secs;
            let status = faults.error_status;
            let mut reply = match (flavor, decision == Decision::RateLimit) {
                (Flavor::Openai, true) => openai::rate_limited(secs),
                (Flavor::Openai, false) => openai::injected_error(status),
                (Flavor::Anthropic, true) => anthropic::rate_limited(secs, &ctx),
                (Flavor::Anthropic, false) => anthropic::injected_error(status, &ctx),
                (Flavor::Gemini, true) => gemini::rate_limited(secs),
                (Flavor::Gemini, false) => gemini::injected_error(status),
                (Flavor::Statuspage, true) => statuspage::rate_limited(secs),
                (Flavor::Statuspage, false) => statuspage::injected_error(status),
            };
            if let (Some(retry), Flavor::Openai | Flavor::Anthropic) = (faults.should_retry, flavor)
            {
                let value = HeaderValue::from_static(if retry { "true" } else { "false" });
                reply.headers.insert(X_SHOULD_RETRY, value);
            }
            if let Some(Ok(text)) = faults.retry_after.as_deref().map(HeaderValue::from_str) {
                reply.headers.insert(RETRY_AFTER, text);
            }
            reply
        }
        Decision::Serve if faults.html_200 => html_page(),
        Decision::Serve => serve(shared, route, &parts, &body, &ctx),
    };
    if faults.malformed && reply.status == StatusCode::OK {
        if let Payload::Json(json) = &mut reply.payload {
            *json = json.slice(..json.len() / 2);
            shared.counters.malformed();
        }
    }
    if let (Some(after), Payload::Stream(stream)) =
        (faults.stream_error_after_chunks, &mut reply.payload)
    {
        stream.fail_after(after);
        shared.counters.stream_error();
    }
    let endless = match (faults.endless_event_after, &mut reply.payload) {
        (Some(after), Payload::Stream(stream)) => {
            stream.events.truncate(after);
            true
        }
        _ => false,
    };
    if faults.gzip && reply.status.is_success() {
        match &mut reply.payload {
            Payload::Json(body) | Payload::Other { body, .. } => *body = gzip::body(body),
            Payload::Stream(stream) if !endless => stream.events = gzip::member(&stream.events),
            Payload::Stream(_) => {}
        }
        reply
            .headers
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    match &reply.payload {
        Payload::Stream(_) => pause(latency).await,
        Payload::Json(_) | Payload::Other { .. } => pause(latency + ttfb).await,
    }
    let paced = |events: Vec<Bytes>| {
        let cut = faults.cut_after_chunks.filter(|&n| n < events.len());
        if cut.is_some() {
            shared.counters.cut();
        }
        let gap = faults
            .chunk_gap_ms
            .map_or(shared.opts.chunk_gap, Duration::from_millis);
        let body = SseBody::new(events, ttfb, gap, cut);
        if endless {
            body.endless()
        } else {
            body
        }
    };
    stamp(response(reply, paced))
}

/// The `html_200` fault: what a proxy in front of a provider answers when it is down.
fn html_page() -> Reply {
    let page = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n\
                <body><h1>Bad Gateway</h1><p>The upstream server is unavailable.</p></body></html>\n";
    Reply::other(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(page.as_bytes()),
    )
}

const X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

/// Auth (if a key is set), then the flavor's answer.
fn serve(
    shared: &Shared,
    route: Route,
    parts: &http::request::Parts,
    body: &Bytes,
    ctx: &Ctx<'_>,
) -> Reply {
    let key = shared.opts.api_key.as_deref();
    let (path, query) = (parts.uri.path(), parts.uri.query());
    match route {
        Route::Openai(route) => key
            .and_then(|key| openai::check_auth(&parts.headers, key))
            .unwrap_or_else(|| openai::serve(route, &parts.method, path, body, ctx)),
        Route::Anthropic(route) => key
            .and_then(|key| anthropic::check_auth(&parts.headers, key, ctx))
            .unwrap_or_else(|| anthropic::serve(route, path, &parts.headers, body, ctx)),
        Route::Gemini(route) => key
            .and_then(|key| gemini::check_auth(&parts.headers, query, key))
            .unwrap_or_else(|| gemini::serve(route, path, query, body, ctx)),
        // Status pages are public: no key.
        Route::Statuspage(route) => statuspage::serve(route, &shared.page.load()),
    }
}

/// Turns a reply into a response; `sse` decides how a stream is paced.
fn response(reply: Reply, sse: impl FnOnce(Vec<Bytes>) -> SseBody) -> Response<MockBody> {
    let (content_type, body) = match reply.payload {
        Payload::Json(bytes) => ("application/json", MockBody::full(bytes)),
        Payload::Stream(stream) => (stream.content_type, MockBody::Sse(sse(stream.events))),
        Payload::Other { content_type, body } => (content_type, MockBody::full(body)),
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
