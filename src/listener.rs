//! Accepting client connections and bounding what each may cost: the accept
//! loop of the main and the admin listener.
//!
//! A connection is closed when
//! - it has not delivered a whole first request within `header_read_timeout`
//!   (nothing sent, a lone byte, a bare HTTP/2 preface, headers that never
//!   end: hyper-util's protocol sniffing and HTTP/2's handshake have no
//!   timeout of their own, and hyper's HTTP/1 one starts only after them);
//! - it has had no request in flight for `idle_timeout` (HTTP/1 keep-alive
//!   and HTTP/2 alike): a graceful close (GOAWAY), then a hard one after
//!   [`IDLE_CLOSE_GRACE`];
//! - it is HTTP/2 and does not answer a keep-alive ping (sent after
//!   `http2_keep_alive` of silence) within `http2_keep_alive`;
//! - the listener already has `max_connections` open: closed as soon as
//!   accepted, so a flood fails fast instead of queueing in the backlog;
//! - the listener shuts down: every connection is asked to close gracefully,
//!   and whatever is still open after `shutdown_timeout` is cut (and counted
//!   in the log).
//!
//! Every accepted socket gets `TCP_NODELAY`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::config::Server;
use crate::when_woken::WhenWoken;
use crate::workers::Workers;

/// After a graceful close of an idle connection (HTTP/2: GOAWAY and a ping),
/// how long the client has to let go before the socket is closed anyway.
/// Nothing is in flight by then, so this only lets a live client see the
/// GOAWAY and answer its ping.
pub const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a listener serves: an axum [`Router`](axum::Router) (the admin
/// listener) or any service like one (the main listener's,
/// [`crate::server::MainService`]). The bounds are hyper's and tower's,
/// written once here; each kind of app implements it (`impl App for ...`).
pub trait App:
    tower::Service<
        axum::extract::Request,
        Response = axum::response::Response,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
    /// The app that serves one connection, from `peer`, which it learns
    /// its own way.
    fn for_connection(&self, peer: SocketAddr) -> Self;
}

/// An axum router hands the peer to its handlers as axum does: the
/// [`ConnectInfo`] extension on every request (the extensions are a map
/// created on first insert: a few allocations per request, fine for the
/// admin listener; the main listener's service keeps the peer itself).
impl App for axum::Router {
    fn for_connection(&self, peer: SocketAddr) -> Self {
        self.clone().layer(axum::Extension(ConnectInfo(peer)))
    }
}

/// How one listener treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// `main` or `admin`: the metrics label and log field.
    pub listener: &'static str,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_keep_alive: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Policy {
    /// The main listener's policy, from `[server]`.
    pub fn main(server: &Server) -> Self {
        Self {
            listener: "main",
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            http2_keep_alive: server.http2_keep_alive,
            max_connections: server.max_connections,
            shutdown_timeout: server.shutdown_timeout,
        }
    }

    /// The admin listener's: the same timeouts, its own connection cap.
    pub fn admin(server: &Server) -> Self {
        Self {
            listener: "admin",
            max_connections: server.admin_max_connections,
            ..Self::main(server)
        }
    }
}

/// Serves `app` on `listener` under `policy` until `shutdown` resolves, then
/// lets requests in flight finish for up to `policy.shutdown_timeout`.
///
/// With `workers`, each accepted connection runs on the worker with the
/// fewest open connections ([`Workers`]); without, on the calling runtime.
pub async fn serve<S>(
    app: S,
    listener: TcpListener,
    policy: Policy,
    workers: Option<&Workers>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    S: App,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(policy.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(policy.http2_keep_alive)
        .keep_alive_timeout(policy.http2_keep_alive);
    let slots = Arc::new(Semaphore::new(policy.max_connections));
    let requests = Arc::new(AtomicUsize::new(0));
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            // Reap ended connections so the set stays as large as what is open.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(listener = policy.listener, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(listener = policy.listener, %peer, "connection refused: max_connections open");
            crate::metrics::connection_refused(policy.listener);
            drop(tcp);
            continue;
        };
        let conn = Connection {
            activity: Arc::new(Activity::new()),
            requests: Arc::clone(&requests),
            policy,
            peer,
        };
        let (app, builder, stopping) = (app.clone(), builder.clone(), stopping.clone());
        let run = move |tcp: TcpStream| async move {
            let _slot = slot;
            // `detour_open_connections` counts the main listener's.
            let _open = (policy.listener == "main").then(crate::metrics::OpenConnection::new);
            // What a request leaves for after its response is written runs
            // when the connection's poll that wrote it returns.
            crate::after_write::Scope::new(conn.run(tcp, app, &builder, stopping)).await;
        };
        match workers.and_then(Workers::place) {
            Some((worker, placed)) => {
                // The socket moves to the worker's reactor: it is registered
                // with the runtime that first polls it.
                let tcp = tcp.into_std();
                connections.spawn_on(
                    async move {
                        let _placed = placed;
                        match tcp.and_then(TcpStream::from_std) {
                            Ok(tcp) => run(tcp).await,
                            Err(e) => {
                                tracing::debug!("could not move a connection to its worker: {e}")
                            }
                        }
                    },
                    worker,
                );
            }
            None => {
                connections.spawn(run(tcp));
            }
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(policy.shutdown_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            listener = policy.listener,
            connections = connections.len(),
            requests = requests.load(Ordering::Relaxed),
            shutdown_timeout_ms = policy.shutdown_timeout.as_millis() as u64,
            "shutdown deadline passed: cutting the connections and requests still open"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// One accepted connection.
struct Connection {
    activity: Arc<Activity>,
    /// Requests in flight on the whole listener (for the shutdown log).
    requests: Arc<AtomicUsize>,
    policy: Policy,
    peer: SocketAddr,
}

/// Why a connection's watchdog fired.
enum Expired {
    /// No whole request within the header timeout.
    NoRequest,
    /// No request in flight for the idle timeout.
    Idle,
}

impl Connection {
    async fn run<S: App>(
        self,
        tcp: TcpStream,
        app: S,
        builder: &Builder<TokioExecutor>,
        mut stopping: watch::Receiver<bool>,
    ) {
        // Without it, a response written as headers then body stalls ~40 ms on
        // a busy keep-alive connection (Nagle + delayed ACK).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY: {e}");
        }
        let (peer, activity, requests) = (self.peer, &self.activity, &self.requests);
        let service = {
            let activity = Arc::clone(activity);
            let requests = Arc::clone(requests);
            let app = app.for_connection(peer);
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let guard = InFlight::start(&activity, &requests);
                let answer = app.clone().oneshot(req.map(axum::body::Body::new));
                async move {
                    let resp = answer.await?;
                    Ok::<_, Infallible>(resp.map(|body| {
                        axum::body::Body::new(Tracked {
                            body,
                            _guard: guard,
                        })
                    }))
                }
            })
        };
        let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(tcp), service));
        // The task wakes for every socket event of every request; the
        // watchdog and the shutdown signal are polled only when they fired.
        let mut watchdog = pin!(WhenWoken::new(self.watchdog()));
        let mut stop = pin!(WhenWoken::new(stopping.wait_for(|s| *s)));
        let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut closing = false;
        loop {
            tokio::select! {
                biased;
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(listener = self.policy.listener, %peer, "connection ended: {e}");
                    }
                    return;
                }
                _ = &mut stop, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                expired = &mut watchdog, if !closing => {
                    closing = true;
                    match expired {
                        Expired::NoRequest => {
                            tracing::debug!(listener = self.policy.listener, %peer, "closed: no request within header_read_timeout");
                            crate::metrics::connection_closed(self.policy.listener, "header_timeout");
                            return;
                        }
                        Expired::Idle => {
                            crate::metrics::connection_closed(self.policy.listener, "idle");
                            conn.as_mut().graceful_shutdown();
                            grace = Some(Box::pin(tokio::time::sleep(IDLE_CLOSE_GRACE)));
                        }
                    }
                }
                () = async { if let Some(g) = grace.as_mut() { g.await } }, if grace.is_some() => return,
            }
        }
    }

    /// Resolves when the connection has overstayed: no first request within
    /// the header timeout, or nothing in flight for the idle timeout.
    async fn watchdog(&self) -> Expired {
        let a = &self.activity;
        let first_request = a.first_request.notified();
        if !a.seen.load(Ordering::Relaxed) {
            let deadline = a.accepted + self.policy.header_read_timeout;
            tokio::select! {
                () = first_request => {}
                () = tokio::time::sleep_until(deadline) => {
                    if !a.seen.load(Ordering::Relaxed) {
                        return Expired::NoRequest;
                    }
                }
            }
        }
        let idle = self.policy.idle_timeout;
        loop {
            match a.idle_since() {
                // Busy: look again later.
                None => tokio::time::sleep(idle).await,
                Some(since) if since + idle <= Instant::now() => return Expired::Idle,
                Some(since) => tokio::time::sleep_until(since + idle).await,
            }
        }
    }
}

/// What a connection is doing, shared by its requests and its watchdog.
#[derive(Debug)]
struct Activity {
    accepted: Instant,
    /// A request has started on this connection.
    seen: AtomicBool,
    /// Notified when the first request starts.
    first_request: tokio::sync::Notify,
    in_flight: AtomicUsize,
    /// When the last request ended, in ms after `accepted`.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            seen: AtomicBool::new(false),
            first_request: tokio::sync::Notify::new(),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// Since when nothing has been in flight; `None` while something is.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let ms = self.last_end_ms.load(Ordering::Relaxed);
        Some(self.accepted + Duration::from_millis(ms))
    }
}

/// One request in flight, from its headers to the end (or drop) of its
/// response body.
struct InFlight {
    activity: Arc<Activity>,
    requests: Arc<AtomicUsize>,
}

impl InFlight {
    fn start(activity: &Arc<Activity>, requests: &Arc<AtomicUsize>) -> Self {
        if !activity.seen.swap(true, Ordering::Relaxed) {
            // A permit is kept if the watchdog is not waiting yet.
            activity.first_request.notify_one();
        }
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        requests.fetch_add(1, Ordering::Relaxed);
        Self {
            activity: Arc::clone(activity),
            requests: Arc::clone(requests),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.activity;
        let ms = a.accepted.elapsed().as_millis();
        a.last_end_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until it
/// ends or is dropped.
struct Tracked {
    body: axum::body::Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_types)] // A test's hand-off from the server's thread.
mod tests {
    use std::io::Read;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body::Frame;

    use super::*;

    /// A body of one chunk which, at its end, defers `work` (as the relay
    /// defers the request's record).
    struct DefersAtEnd {
        chunk: Option<Bytes>,
        work: Option<Box<dyn FnOnce() + Send>>,
    }

    impl http_body::Body for DefersAtEnd {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if let Some(chunk) = self.chunk.take() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if let Some(work) = self.work.take() {
                crate::after_write::defer(work);
            }
            Poll::Ready(None)
        }
    }

    /// What a request defers runs once its response is in the client's
    /// socket: the work reads it from there.
    #[tokio::test]
    async fn deferred_work_runs_after_the_response_is_written() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = Arc::new(std::net::TcpStream::connect(addr).unwrap());
        // The work reads the client's socket on the server's thread: were it
        // run before the write, the write could not happen while it waits.
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let seen = Arc::new(Mutex::new(None::<String>));
        let (reader, found) = (Arc::clone(&client), Arc::clone(&seen));
        let work = Arc::new(Mutex::new(Some(Box::new(move || {
            let mut buf = [0u8; 4096];
            let got = match (&*reader).read(&mut buf) {
                Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e) => format!("nothing to read within 2 s: {e}"),
            };
            *found.lock().unwrap() = Some(got);
        }) as Box<dyn FnOnce() + Send>)));
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                let work = work.lock().unwrap().take();
                async move {
                    axum::body::Body::new(DefersAtEnd {
                        chunk: Some(Bytes::from_static(b"the answer")),
                        work,
                    })
                }
            }),
        );
        let policy = Policy {
            listener: "test",
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            http2_keep_alive: Duration::from_secs(5),
            max_connections: 4,
            shutdown_timeout: Duration::from_secs(1),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(app, listener, policy, None, async {
            let _ = stopped.await;
        }));
        std::io::Write::write_all(&mut &*client, b"GET / HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            if let Some(got) = seen.lock().unwrap().take() {
                break got;
            }
            assert!(Instant::now() < deadline, "the deferred work never ran");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.contains("the answer"), "{got}");
        drop(stop);
        server.await.unwrap().unwrap();
    }

    /// Counts the wakes of the connection's task.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A request whose whole body came with its head is read, answered and
    /// written in one poll of its connection, and reading the body does not
    /// wake the connection's task for nothing: hyper's body channel woke the
    /// sender's stale waker after the sender was gone, which ran the task
    /// once more per request. detour's patch of hyper (`vendor/README.md`)
    /// stops that; this fails if the patch is lost in an upgrade.
    #[tokio::test]
    async fn reading_a_whole_body_does_not_wake_the_connection() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut client, server) = tokio::io::duplex(16 * 1024);
        client
            .write_all(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let service =
            hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(body)))
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), service);
        let mut conn = pin!(conn);
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let poll = conn.as_mut().poll(&mut Context::from_waker(&waker));
        assert!(poll.is_pending(), "the connection stays open: {poll:?}");
        let mut answer = vec![0u8; 1024];
        let n = client.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "the task was woken");
    }
}
