//! detour's own HTTP/1.1 client for providers reached directly over plain
//! `http://` (local OpenAI-compatible servers, `detour mock`): keep-alive
//! connections whose hyper [`http1::Connection`] is driven by the task that
//! sends on it, not by a task of its own.
//!
//! hyper-util's pooled client spawns a task per connection that reads the
//! socket and hands the answer's body over one decoded chunk at a time, through
//! a channel that holds one. The relaying task then sees one SSE event per
//! wake-up and writes each to the client on its own, even when the provider's
//! whole stream arrived in one read. Here the relaying task polls the
//! connection itself whenever the body has nothing ready ([`Body`]), so every
//! event one read brought is decoded in that one poll and relayed in one write;
//! and no wake-up crosses between two tasks for a request.
//!
//! A connection is checked out for one exchange and back in once its answer
//! ended whole and hyper says it can take another request. Idle ones are kept
//! most-recent first, at most [`MAX_IDLE`], for [`super::POOL_IDLE`], and each
//! is polled once before reuse, so one the provider closed meanwhile is
//! dropped; a task of the pool's own looks them over every [`SWEEP_EVERY`]
//! and closes those, so that a provider with no traffic holds no sockets. A
//! request that a reused connection refused before writing it is sent again
//! on a new one; nothing else is retried here (that is the proxy's call). TLS
//! and proxied providers keep hyper-util's client (HTTP/2 by ALPN).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
// The idle list's lock is taken by one thread only: each worker has its own
// pool (`Upstream::pool`); slot 0, shared by the threads that are not
// workers, serves tests, the demo and the drill. Uncontended, it is one
// compare-and-swap and one store, with no system call.
use std::sync::atomic::{AtomicBool, Ordering};
#[allow(clippy::disallowed_types)]
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::dns::ForConnector;

/// Most idle connections one pool keeps; a connection given back beyond it
/// is closed.
pub const MAX_IDLE: usize = 1024;

type Driver = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// Why a request could not be sent on this client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection: refused, unreachable, the name did not resolve, or
    /// the provider's connect limit fired.
    #[error("connect error")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The exchange failed on an open connection.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }
}

/// One provider's connections for one worker.
pub struct Pool {
    connector: HttpConnector<ForConnector>,
    /// The `host` header every request carries: the base URL's host, and
    /// its port when not 80.
    host: HeaderValue,
    idle: Arc<Idle>,
}

/// Connections ready for another request, the most recently used last.
#[derive(Default)]
struct Idle {
    #[allow(clippy::disallowed_types)] // See the `use` above.
    conns: Mutex<VecDeque<(Box<Conn>, Instant)>>,
    /// Whether [`Idle::sweep`]'s task runs (started by the first give-back).
    swept: AtomicBool,
}

/// How often idle connections are looked over: those kept past
/// [`super::POOL_IDLE`], and those the provider closed, are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// One open connection: the handle requests are sent through and the
/// connection itself, which makes progress only while it is polled. Boxed
/// once when it is made (hyper's connection state is about 700 bytes), so that
/// handing it between the pool, a request and its body moves a pointer.
struct Conn {
    send: http1::SendRequest<Full<Bytes>>,
    /// `None` once it ended (closed or failed). It is dropped then, not kept:
    /// dropping it is what answers a request still queued on it (hyper
    /// hands such a request back, unsent).
    driver: Option<Driver>,
}

impl Pool {
    /// A pool for the provider at `base` (an `http://` URI with a host).
    pub fn new(connector: HttpConnector<ForConnector>, base: &Uri) -> Option<Self> {
        let host = base.host()?;
        let host = match base.port_u16() {
            Some(port) if port != 80 => HeaderValue::from_str(&format!("{host}:{port}")),
            _ => HeaderValue::from_str(host),
        }
        .ok()?;
        Some(Self {
            connector,
            host,
            idle: Arc::default(),
        })
    }

    /// Sends `req` (its URI absolute, as the adapters build it: a path joined
    /// onto the provider's base URL, so one `host` and one set of
    /// connections serve them all) and waits for the answer's head, driving
    /// the connection meanwhile. The body is read through the returned
    /// [`Body`], which gives the connection back when it ends whole.
    pub async fn request(&self, req: Request<Full<Bytes>>) -> Result<Response<Body>, Error> {
        let (mut parts, body) = req.into_parts();
        let address = std::mem::take(&mut parts.uri);
        if let Some(path) = address.path_and_query() {
            if path.as_str() != "/" {
                parts.uri = Uri::from(path.clone());
            }
        }
        parts
            .headers
            .entry(http::header::HOST)
            .or_insert_with(|| self.host.clone());
        let mut req = Request::from_parts(parts, body);
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect(&address).await?, false),
            };
            let answer = conn.send.try_send_request(req);
            match conn.drive_until(answer).await {
                Ok(resp) => {
                    return Ok(resp.map(|incoming| Body {
                        incoming,
                        conn: Some(conn),
                        idle: Arc::clone(&self.idle),
                    }))
                }
                // Closed before the request went out: a kept connection
                // the provider had just closed. The request was not sent.
                Err(mut e) if reused && e.message().is_some() => {
                    req = e
                        .take_message()
                        .ok_or_else(|| Error::Http(e.into_error()))?;
                }
                Err(e) => return Err(Error::Http(e.into_error())),
            }
        }
    }

    async fn connect(&self, address: &Uri) -> Result<Box<Conn>, Error> {
        let io = tower::ServiceExt::oneshot(self.connector.clone(), address.clone())
            .await
            .map_err(|e| Error::Connect(e.into()))?;
        let (send, driver) = http1::Builder::new().handshake(io).await?;
        Ok(Box::new(Conn {
            send,
            driver: Some(driver),
        }))
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Box<Conn>> {
        loop {
            let (mut conn, since) = self.idle.lock().pop_back()?;
            if since.elapsed() > super::POOL_IDLE {
                // The others were given back earlier still.
                self.idle.lock().clear();
                return None;
            }
            if conn.settle() {
                return Some(conn);
            }
        }
    }

    /// How many idle connections are kept (tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}

impl Idle {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Box<Conn>, Instant)>> {
        // A panic elsewhere while holding it leaves a list that is still whole.
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps `conn` for the next request (those kept too long are the
    /// sweep's to close, and checkout skips them).
    fn give_back(self: &Arc<Self>, conn: Box<Conn>) {
        {
            let mut conns = self.lock();
            if conns.len() < MAX_IDLE {
                conns.push_back((conn, Instant::now()));
            }
        }
        if !self.swept.load(Ordering::Relaxed) {
            self.start_sweeping();
        }
    }

    /// Starts the task that closes idle connections nobody will use: with no
    /// traffic, nothing else would look at them. It runs on the runtime that
    /// drives them (the worker's) and ends with the pool.
    fn start_sweeping(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.swept.swap(true, Ordering::Relaxed) {
            return;
        }
        let idle = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(idle) = idle.upgrade() else {
                    return;
                };
                idle.sweep();
            }
        });
    }

    /// Closes the connections kept past [`super::POOL_IDLE`] and those the
    /// provider closed.
    fn sweep(&self) {
        let now = Instant::now();
        let mut conns = self.lock();
        conns.retain_mut(|(conn, since)| {
            now.duration_since(*since) <= super::POOL_IDLE && conn.settle()
        });
    }
}

impl Conn {
    /// Polls `answer` to its end, driving the connection while it waits.
    async fn drive_until<F: Future>(&mut self, answer: F) -> F::Output {
        let mut answer = std::pin::pin!(answer);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = answer.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            // Once the connection has ended, hyper has answered the request
            // with the reason (or does so as it is dropped).
            self.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await
    }

    /// Polls the connection: it reads and writes what it can, and hands
    /// the answer's head or next body chunk over. Says whether it is still
    /// open; one that ended is dropped.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(driver) = &mut self.driver else {
            return false;
        };
        if Pin::new(driver).poll(cx).is_pending() {
            return true;
        }
        self.driver = None;
        false
    }

    /// Lets the connection make what progress it can without waiting (an
    /// exchange that ended goes idle; a close the provider sent is read),
    /// and says whether it can take another request.
    fn settle(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.send.is_ready()
    }
}

/// An answer's body on a [`Pool`] connection: reading it drives the
/// connection, and its end gives the connection back.
pub struct Body {
    incoming: Incoming,
    /// `None` once given back, or once the exchange failed.
    conn: Option<Box<Conn>>,
    idle: Arc<Idle>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("open", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl Body {
    fn poll_incoming(&mut self, cx: &mut Context<'_>) -> Poll<Option<hyper::Result<Frame<Bytes>>>> {
        let polled = Pin::new(&mut self.incoming).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.incoming.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    /// The exchange is over: the connection goes back to the pool if it can
    /// take another request, else it is closed.
    fn give_back(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if conn.settle() {
                self.idle.give_back(conn);
            }
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = this.poll_incoming(cx) {
            return Poll::Ready(frame);
        }
        // Nothing handed over yet: let the connection decode the next chunk
        // from what it has read, or read the socket (waking this task when
        // more arrives).
        let Some(conn) = &mut this.conn else {
            return Poll::Pending;
        };
        if !conn.drive(cx) {
            // Closed or failed: the body hears why on the next poll; the
            // connection is of no further use.
            this.conn = None;
        }
        this.poll_incoming(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // Ended whole without the end being polled for (a known length's
        // last chunk): still reusable.
        if self.incoming.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_types)] // The test provider's record of what it was sent.
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A provider on loopback that answers each request on a connection with
    /// `answer` (given the request's head), written in one write, and closes
    /// the connection 20 ms after its `close_after`th answer. Returns its address and
    /// how many connections it accepted.
    async fn provider(
        answer: fn(&str) -> Vec<u8>,
        close_after: usize,
    ) -> (
        std::net::SocketAddr,
        Arc<AtomicUsize>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (Arc::clone(&accepted), Arc::clone(&heads));
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..close_after {
                        let head = loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                                let len = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length: "))
                                    .map_or(0, |n| n.parse::<usize>().unwrap());
                                if buf.len() >= end + 4 + len {
                                    buf.drain(..end + 4 + len);
                                    break head;
                                }
                            }
                            let mut more = [0u8; 4096];
                            match sock.read(&mut more).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&more[..n]),
                            }
                        };
                        let reply = answer(&head);
                        seen.lock().unwrap().push(head);
                        if sock.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                });
            }
        });
        (addr, accepted, heads)
    }

    fn pool(addr: std::net::SocketAddr) -> Pool {
        let mut http = HttpConnector::new_with_resolver(ForConnector(crate::dns::shared()));
        http.set_nodelay(true);
        let base: Uri = format!("http://{addr}/v1").parse().unwrap();
        Pool::new(http, &base).unwrap()
    }

    fn request(addr: std::net::SocketAddr, path: &str) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from_static(b"{}")));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = format!("http://{addr}{path}").parse().unwrap();
        req.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        req
    }

    fn json(_: &str) -> Vec<u8> {
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec()
    }

    fn events(_: &str) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for i in 0..10 {
            let event = format!("data: {{\"n\":{i}}}\n\n");
            out.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    /// Reads the body to its end; returns its chunks and how many times it
    /// had nothing ready.
    async fn read_all(body: &mut Body) -> (Vec<Bytes>, usize) {
        let mut chunks = Vec::new();
        let mut waits = 0;
        loop {
            let mut cx = Context::from_waker(Waker::noop());
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => chunks.extend(frame.into_data().ok()),
                Poll::Ready(Some(Err(e))) => panic!("body failed: {e}"),
                Poll::Ready(None) => return (chunks, waits),
                Poll::Pending => {
                    waits += 1;
                    assert!(waits < 500, "the body never ended");
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        }
    }

    #[tokio::test]
    async fn events_that_arrived_together_are_read_without_waiting() {
        let (addr, _, _) = provider(events, 1).await;
        let pool = pool(addr);
        let resp = pool.request(request(addr, "/v1/chat")).await.unwrap();
        let mut body = resp.into_body();
        let (chunks, waits) = read_all(&mut body).await;
        assert_eq!(chunks.len(), 10);
        assert_eq!(chunks[9].as_ref(), b"data: {\"n\":9}\n\n");
        // With a connection task of its own (hyper-util's client) each
        // chunk would wait for that task: ten waits.
        assert!(waits <= 1, "waited {waits} times for events already read");
    }

    #[tokio::test]
    async fn a_connection_is_reused_and_one_the_provider_closed_is_replaced() {
        let (addr, accepted, heads) = provider(json, 2).await;
        let pool = pool(addr);
        for _ in 0..2 {
            let resp = pool.request(request(addr, "/v1/chat?x=1")).await.unwrap();
            let (chunks, _) = read_all(&mut resp.into_body()).await;
            assert_eq!(chunks.concat(), b"{}");
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for both"
        );
        // The provider closes its side after two answers; the kept
        // connection is found closed and a new one made, without an error.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let resp = pool.request(request(addr, "/v1/chat?x=1")).await.unwrap();
        read_all(&mut resp.into_body()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let heads = heads.lock().unwrap();
        let first = heads[0].to_ascii_lowercase();
        assert!(
            first.starts_with("post /v1/chat?x=1 http/1.1\r\n"),
            "{first}"
        );
        assert!(
            first.lines().any(|l| l == format!("host: {addr}")),
            "{first}"
        );
    }

    #[tokio::test]
    async fn idle_connections_the_provider_closed_are_swept_without_traffic() {
        let (addr, _, _) = provider(json, 1).await;
        let pool = pool(addr);
        let resp = pool.request(request(addr, "/v1/chat")).await.unwrap();
        read_all(&mut resp.into_body()).await;
        // The provider closes its side 20 ms after its answer; no request
        // comes to notice.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(), 1);
        tokio::time::pause();
        tokio::time::advance(SWEEP_EVERY + std::time::Duration::from_secs(1)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.idle_count(), 0, "the closed connection is still kept");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted, _) = provider(events, 2).await;
        let pool = pool(addr);
        let resp = pool.request(request(addr, "/v1/chat")).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        let resp = pool.request(request(addr, "/v1/chat")).await.unwrap();
        read_all(&mut resp.into_body()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_provider_that_closes_without_answering_fails_the_request_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                // The request was read; the connection closes unanswered.
            }
        });
        let pool = pool(addr);
        let sent = pool.request(request(addr, "/v1/chat"));
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), sent)
            .await
            .expect("an answer that will not come is an error, not a wait")
            .unwrap_err();
        assert!(!e.is_connect(), "{e:?}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = pool(addr)
            .request(request(addr, "/v1/chat"))
            .await
            .unwrap_err();
        assert!(e.is_connect(), "{e:?}");
    }
}
