//! detour's own HTTP/1.1 client for providers reached directly over plain
//! `http://` (local OpenAI-compatible servers, `detour mock`): keep-alive
//! connections read and written by the task that sends on them, with the
//! wire format in [`wire`].
//!
//! hyper's client (and hyper-util's pool on it) hands an answer over from a
//! connection task, through channels, one decoded chunk at a time, and
//! parses every header of the answer into a map with names and values of
//! their own; a provider sends a dozen that detour never reads. Here the
//! request's task writes the request in one `writev`, parses the answer's
//! head where it was read, keeps only the headers detour reads
//! ([`wire::KEPT`]), and takes the body off the same buffer: every event one
//! read brought is available in that one poll, and no wake-up crosses
//! between tasks.
//!
//! A connection is checked out for one exchange and back in once its answer
//! ended whole, with nothing read past it, and the answer allowed another
//! request (`connection: close`, HTTP/1.0 and bodies that end with the
//! connection do not). Idle ones are kept most-recent first, at most
//! [`MAX_IDLE`], for [`super::POOL_IDLE`], and each is looked at once before
//! reuse, so one the provider closed meanwhile is dropped; a task of the
//! pool's own looks them over every [`SWEEP_EVERY`] and closes those, so that
//! a provider with no traffic holds no sockets. A request that a reused
//! connection refused while it was written is sent again on a new one
//! (the provider had closed it and read none of it); nothing else is retried
//! here (that is the proxy's call). TLS and proxied providers keep
//! hyper-util's client (HTTP/2 by ALPN).

mod wire;

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
// The idle list's lock is taken by one thread only: each worker has its own
// pool (`Upstream::pool`); slot 0, shared by the threads that are not
// workers, serves tests, the demo and the drill. Uncontended, it is one
// compare-and-swap and one store, with no system call.
use std::sync::atomic::{AtomicBool, Ordering};
#[allow(clippy::disallowed_types)]
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, Uri};
use http_body::{Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::dns::ForConnector;

pub use wire::WireError;

/// Most idle connections one pool keeps; a connection given back beyond it
/// is closed.
pub const MAX_IDLE: usize = 1024;

/// The read buffer's first size, and its largest: it doubles while reads
/// fill it (a large answer is read in fewer, larger reads; 64 KiB is what
/// loopback hands over at once, and 64 connections' buffers stay at 4 MiB).
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;

/// Why a request could not be sent, or its answer read, on this client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection: refused, unreachable, the name did not resolve, or
    /// the provider's connect limit fired.
    #[error("connect error")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("connection error")]
    Io(#[from] std::io::Error),
    #[error("the provider closed the connection before the answer's head ended")]
    ClosedBeforeHead,
    #[error("the provider closed the connection before the answer's body ended")]
    ClosedBeforeEnd,
    #[error("the provider's answer is not valid HTTP/1.1")]
    Wire(#[from] WireError),
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }
}

/// An exchange that failed, and whether the request can be sent again
/// elsewhere: its write failed and nothing was answered. (`Failed::sent`:
/// the provider may have read it.)
struct Failed {
    error: Error,
    unsent: bool,
}

impl Failed {
    fn sent(error: Error) -> Self {
        Self {
            error,
            unsent: false,
        }
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

/// One open connection and what was read from it and not yet used. Boxed
/// once when it is made, so that handing it between the pool, a request
/// and its body moves a pointer.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// How much the next read asks for, at least.
    read_size: usize,
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

    /// POSTs `body` with `headers` to `address` (absolute, as the adapters
    /// build it: a path joined onto the provider's base URL, so one `host`
    /// and one set of connections serve them all) and reads the answer's
    /// head. The body is read through the returned [`Body`], which gives the
    /// connection back when it ends whole.
    pub async fn request(
        &self,
        address: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, Error> {
        let target = address.path_and_query().map_or("/", |p| p.as_str());
        let sent = wire::request_head(target, &self.host, headers, body.len());
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect(address).await?, false),
            };
            let answer = match conn.exchange(&sent, &body).await {
                Ok(answer) => answer,
                // A kept connection the provider had just closed: it read
                // none of the request.
                Err(Failed { unsent: true, .. }) if reused => continue,
                Err(failed) => return Err(failed.error),
            };
            let mut resp = Response::new(());
            *resp.status_mut() = answer.status;
            *resp.headers_mut() = answer.headers;
            let body = Body {
                conn: Some(conn),
                remaining: answer.body,
                reusable: answer.reusable,
                idle: Arc::clone(&self.idle),
            }
            .checked_for_end();
            return Ok(resp.map(|()| body));
        }
    }

    async fn connect(&self, address: &Uri) -> Result<Box<Conn>, Error> {
        let io = tower::ServiceExt::oneshot(self.connector.clone(), address.clone())
            .await
            .map_err(|e| Error::Connect(e.into()))?;
        Ok(Box::new(Conn {
            io: io.into_inner(),
            buf: BytesMut::new(),
            read_size: FIRST_READ,
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
            if conn.is_open() {
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
            now.duration_since(*since) <= super::POOL_IDLE && conn.is_open()
        });
    }
}

impl Conn {
    /// Writes the request (its head and body in one `writev` when the
    /// socket takes them whole) and reads the answer's head, past any 1xx
    /// interim ones. It reads while it writes: an answer that comes before
    /// the request is all written (a provider refusing a large body without
    /// reading it) is the answer, and the connection is not reused.
    async fn exchange(&mut self, head: &[u8], body: &[u8]) -> Result<wire::Head, Failed> {
        let mut written = 0;
        let mut write_error = None;
        std::future::poll_fn(|cx| {
            self.poll_exchange(cx, [head, body], &mut written, &mut write_error)
        })
        .await
    }

    fn poll_exchange(
        &mut self,
        cx: &mut Context<'_>,
        [head, body]: [&[u8]; 2],
        written: &mut usize,
        write_error: &mut Option<std::io::Error>,
    ) -> Poll<Result<wire::Head, Failed>> {
        use tokio::io::AsyncWrite;
        let total = head.len() + body.len();
        while *written < total && write_error.is_none() {
            let rest = match head.get(*written..) {
                Some(head) if !head.is_empty() => [IoSlice::new(head), IoSlice::new(body)],
                _ => [
                    IoSlice::new(&body[*written - head.len()..]),
                    IoSlice::new(&[]),
                ],
            };
            match Pin::new(&mut self.io).poll_write_vectored(cx, &rest) {
                Poll::Ready(Ok(0)) => *write_error = Some(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => *write_error = Some(e),
                Poll::Pending => break,
            }
        }
        loop {
            if !self.buf.is_empty() {
                match wire::parse_head(&self.buf) {
                    Ok(Some(mut answer)) => {
                        self.buf.advance(answer.len);
                        if answer.status.is_informational() {
                            continue;
                        }
                        if *written < total {
                            answer.reusable = false;
                        }
                        return Poll::Ready(Ok(answer));
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(Failed::sent(e.into()))),
                }
            }
            let read = self.poll_fill(cx);
            // A write that failed with no answer to read: the provider
            // closed the connection and read none of the request whole.
            if let Some(e) = write_error.take() {
                if !matches!(read, Poll::Ready(Ok(n)) if n > 0) {
                    let unsent = self.buf.is_empty();
                    return Poll::Ready(Err(Failed {
                        error: e.into(),
                        unsent,
                    }));
                }
                *write_error = Some(e);
            }
            match read {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Failed::sent(Error::ClosedBeforeHead)))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::sent(e.into()))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads what the socket has into the buffer: how many bytes (0 at the
    /// end of the connection).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        // Through `AsyncRead`: a read that fills less than the room clears
        // the socket's readiness (the kernel's buffer is empty), so neither
        // the next read nor `is_open` asks the kernel again for nothing.
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Lets go of a read buffer that large answers grew, so that idle
    /// connections hold little memory (a pool keeps up to [`MAX_IDLE`]).
    fn shrink(&mut self) {
        if self.buf.capacity() > 2 * FIRST_READ {
            self.buf = BytesMut::new();
            self.read_size = FIRST_READ;
        }
    }

    /// Whether an idle connection can take a request: the provider has
    /// neither closed it nor sent anything on it since.
    fn is_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        // `try_read` asks the kernel only when the I/O driver saw the socket
        // become readable (a close, or bytes nobody asked for), and unlike
        // `poll_read_ready` it draws nothing from the task's budget: a task
        // out of budget would see every connection as quiet.
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// An answer's body on a [`Pool`] connection: reading it reads the
/// connection, and its end gives the connection back.
pub struct Body {
    /// `None` once given back, closed, or once the exchange failed.
    conn: Option<Box<Conn>>,
    remaining: wire::Remaining,
    /// Whether the answer allows another request on its connection.
    reusable: bool,
    idle: Arc<Idle>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("open", &self.conn.is_some())
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl Body {
    /// A body that is empty from the start gives its connection back now.
    fn checked_for_end(mut self) -> Self {
        if self.remaining.is_done() {
            self.give_back();
        }
        self
    }

    /// The exchange is over: the connection goes back to the pool if it can
    /// take another request, else it is closed.
    fn give_back(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if self.reusable && conn.is_open() {
                conn.shrink();
                self.idle.give_back(conn);
            }
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = &mut this.conn else {
                // Ended (given back or closed) or failed.
                return Poll::Ready(None);
            };
            match this.remaining.take(&mut conn.buf) {
                Ok(Some(data)) => {
                    if this.remaining.is_done() {
                        this.give_back();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) if this.remaining.is_done() => {
                    this.give_back();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    if matches!(this.remaining, wire::Remaining::UntilClose) {
                        this.remaining = wire::Remaining::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Error::ClosedBeforeEnd)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining.exact() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_types)] // The test provider's record of what it was sent.
mod tests {
    use super::*;
    use http_body::Body as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Waker;
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

    /// POSTs `{}` to `path`.
    async fn send(
        pool: &Pool,
        addr: std::net::SocketAddr,
        path: &str,
    ) -> Result<Response<Body>, Error> {
        let uri: Uri = format!("http://{addr}{path}").parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer k"),
        );
        pool.request(&uri, &headers, Bytes::from_static(b"{}"))
            .await
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
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
        let mut body = resp.into_body();
        let (chunks, waits) = read_all(&mut body).await;
        assert_eq!(chunks.len(), 10);
        assert_eq!(chunks[9].as_ref(), b"data: {\"n\":9}\n\n");
        // With a connection task of its own (hyper-util's client) each
        // chunk would wait for that task: ten waits.
        assert!(waits <= 1, "waited {waits} times for events already read");
    }

    /// Waits until the provider's close of every idle connection has reached
    /// this side (each socket reads as readable: its end), rather than
    /// guessing how long that takes.
    async fn until_closed_by_provider(pool: &Pool) {
        let conns: Vec<_> = pool.idle.lock().drain(..).collect();
        for (conn, _) in &conns {
            conn.io.readable().await.unwrap();
        }
        pool.idle.lock().extend(conns);
    }

    /// A pool holding one idle connection that the provider has closed.
    async fn a_closed_idle_connection() -> Pool {
        // The provider closes its side 20 ms after its answer.
        let (addr, _, _) = provider(json, 1).await;
        let pool = pool(addr);
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
        read_all(&mut resp.into_body()).await;
        until_closed_by_provider(&pool).await;
        assert_eq!(pool.idle_count(), 1);
        pool
    }

    #[tokio::test]
    async fn a_connection_is_reused_and_one_the_provider_closed_is_replaced() {
        let (addr, accepted, heads) = provider(json, 2).await;
        let pool = pool(addr);
        for _ in 0..2 {
            let resp = send(&pool, addr, "/v1/chat?x=1").await.unwrap();
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
        until_closed_by_provider(&pool).await;
        let resp = send(&pool, addr, "/v1/chat?x=1").await.unwrap();
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
        // No request comes to notice the close.
        let pool = a_closed_idle_connection().await;
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
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
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
        let sent = send(&pool, addr, "/v1/chat");
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
        let e = send(&pool(addr), addr, "/v1/chat").await.unwrap_err();
        assert!(e.is_connect(), "{e:?}");
    }

    /// What a [`scripted`] provider does once it has answered.
    #[derive(Clone, Copy)]
    enum Then {
        /// Closes the connection.
        Close,
        /// Reads on until the client closes it.
        Wait,
        /// Neither reads nor closes, for as long as the test runs.
        Stall,
    }

    /// A provider that reads one request's head on each connection, answers
    /// with `pieces`, written 5 ms apart (so each is read on its own), then
    /// does `then`. Returns its address and the request heads it read.
    async fn scripted(
        pieces: Vec<Vec<u8>>,
        then: Then,
    ) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (pieces, seen) = (pieces.clone(), Arc::clone(&seen));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut more = [0u8; 4096];
                        match sock.read(&mut more).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&more[..n]),
                        }
                    }
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf).into_owned());
                    for piece in pieces {
                        if sock.write_all(&piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                    match then {
                        Then::Close => {}
                        Then::Wait => {
                            let mut sink = [0u8; 4096];
                            while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
                        }
                        Then::Stall => std::future::pending().await,
                    }
                });
            }
        });
        (addr, heads)
    }

    /// Reads the body to its end or its first error.
    async fn read_to_end(body: &mut Body) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while let Some(frame) = http_body_util::BodyExt::frame(body).await {
            out.extend_from_slice(&frame?.into_data().unwrap());
        }
        Ok(out)
    }

    /// `whole` cut into pieces of `size` bytes.
    fn cut(whole: &[u8], size: usize) -> Vec<Vec<u8>> {
        whole.chunks(size).map(<[u8]>::to_vec).collect()
    }

    #[tokio::test]
    async fn the_request_goes_out_as_given_and_only_the_headers_detour_reads_come_back() {
        let answer = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n\
            x-request-id: req_1\r\nopenai-processing-ms: 12\r\nRetry-After: 3\r\n\
            cache-control: no-store\r\nset-cookie: a=b\r\ncontent-length: 2\r\n\r\n{}";
        let (addr, heads) = scripted(vec![answer.to_vec()], Then::Wait).await;
        let pool = pool(addr);
        let resp = send(&pool, addr, "/v1/chat?a=1").await.unwrap();
        assert_eq!(resp.status(), 429);
        let kept: Vec<_> = resp
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            kept,
            [
                ("content-type", "application/json"),
                ("retry-after", "3"),
                ("cache-control", "no-store")
            ]
        );
        assert_eq!(read_to_end(&mut resp.into_body()).await.unwrap(), b"{}");
        assert_eq!(pool.idle_count(), 1);
        let head = heads.lock().unwrap()[0].clone();
        assert_eq!(
            head,
            format!(
                "POST /v1/chat?a=1 HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer k\r\n\
                 content-length: 2\r\n\r\n{{}}"
            )
        );
    }

    #[tokio::test]
    async fn a_chunked_answer_cut_anywhere_reads_whole_and_its_connection_is_kept() {
        let mut whole = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let mut expected = Vec::new();
        for i in 0..20 {
            let event = format!("data: {{\"n\":{i}}}\n\n");
            whole.extend_from_slice(format!("{:x};ext=1\r\n{event}\r\n", event.len()).as_bytes());
            expected.extend_from_slice(event.as_bytes());
        }
        whole.extend_from_slice(b"0\r\ntrailer: x\r\n\r\n");
        for size in [1, 3, 7, 64] {
            let (addr, _) = scripted(cut(&whole, size), Then::Wait).await;
            let pool = pool(addr);
            let resp = send(&pool, addr, "/v1/chat").await.unwrap();
            assert_eq!(
                read_to_end(&mut resp.into_body()).await.unwrap(),
                expected,
                "{size}"
            );
            assert_eq!(pool.idle_count(), 1, "cut into {size}-byte pieces");
        }
    }

    #[tokio::test]
    async fn an_answer_cut_off_before_its_length_is_an_error() {
        let (addr, _) = scripted(
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcd".to_vec()],
            Then::Close,
        )
        .await;
        let pool = pool(addr);
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
        let e = read_to_end(&mut resp.into_body()).await.unwrap_err();
        assert!(matches!(e, Error::ClosedBeforeEnd), "{e:?}");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_that_ends_with_the_connection_is_read_to_the_end_and_not_kept() {
        let (addr, _) = scripted(
            cut(
                b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nhello there",
                9,
            ),
            Then::Close,
        )
        .await;
        let pool = pool(addr);
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
        assert_eq!(
            read_to_end(&mut resp.into_body()).await.unwrap(),
            b"hello there"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn answers_that_forbid_reuse_close_their_connection() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"[..],
            // Both framings: the chunks count, and the connection is not trusted again.
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        ] {
            let (addr, _) = scripted(vec![answer.to_vec()], Then::Wait).await;
            let pool = pool(addr);
            let resp = send(&pool, addr, "/v1/chat").await.unwrap();
            assert_eq!(read_to_end(&mut resp.into_body()).await.unwrap(), b"{}");
            assert_eq!(pool.idle_count(), 0, "{}", String::from_utf8_lossy(answer));
        }
    }

    #[tokio::test]
    async fn an_interim_answer_is_skipped() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let (addr, _) = scripted(cut(answer, 20), Then::Wait).await;
        let pool = pool(addr);
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(read_to_end(&mut resp.into_body()).await.unwrap(), b"{}");
    }

    #[tokio::test]
    async fn what_is_not_http_fails_the_request_or_the_body() {
        let (addr, _) = scripted(vec![b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()], Then::Wait).await;
        let e = send(&pool(addr), addr, "/v1/chat").await.unwrap_err();
        assert!(matches!(e, Error::Wire(WireError::Head(_))), "{e:?}");

        let mut endless = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
        endless.resize(80 * 1024, b'a');
        let (addr, _) = scripted(cut(&endless, 8192), Then::Wait).await;
        let e = send(&pool(addr), addr, "/v1/chat").await.unwrap_err();
        assert!(matches!(e, Error::Wire(WireError::HeadTooLarge)), "{e:?}");

        let (addr, _) = scripted(
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n".to_vec(),
            ],
            Then::Wait,
        )
        .await;
        let pool = pool(addr);
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
        let e = read_to_end(&mut resp.into_body()).await.unwrap_err();
        assert!(matches!(e, Error::Wire(WireError::ChunkSize)), "{e:?}");
        // What the log's detail says (the relay writes the whole chain).
        assert_eq!(
            crate::upstream::error_chain(&e),
            "the provider's answer is not valid HTTP/1.1: a chunk's size line is invalid"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_large_answer_is_read_in_growing_reads_and_its_buffer_not_kept_idle() {
        let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 300000\r\n\r\n".to_vec();
        let head = answer.len();
        answer.resize(head + 300_000, b'x');
        let (addr, _) = scripted(vec![answer], Then::Wait).await;
        let pool = pool(addr);
        let resp = send(&pool, addr, "/v1/chat").await.unwrap();
        let mut body = resp.into_body();
        let mut frames = 0;
        let mut len = 0;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            len += frame.unwrap().into_data().unwrap().len();
            frames += 1;
        }
        assert_eq!(len, 300_000);
        assert!(frames < 300_000 / FIRST_READ, "{frames} reads");
        let idle = pool.idle.lock();
        assert_eq!(idle.len(), 1);
        assert!(
            idle[0].0.buf.capacity() <= 2 * FIRST_READ,
            "{}",
            idle[0].0.buf.capacity()
        );
        assert_eq!(idle[0].0.read_size, FIRST_READ);
    }

    #[tokio::test]
    async fn an_answer_before_the_request_is_all_written_is_the_answer() {
        // The provider reads the head only, refuses the body, and holds the
        // connection open without reading more: the write cannot finish.
        let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\n{}";
        let (addr, _) = scripted(vec![answer.to_vec()], Then::Stall).await;
        let pool = pool(addr);
        let uri: Uri = format!("http://{addr}/v1/chat").parse().unwrap();
        let body = Bytes::from(vec![b' '; 64 << 20]);
        let headers = HeaderMap::new();
        let sent = pool.request(&uri, &headers, body);
        // Waiting for the write to finish would wait forever; the bound
        // only turns that hang into a failure.
        let resp = tokio::time::timeout(std::time::Duration::from_secs(60), sent)
            .await
            .expect("the early answer, not a wait for the write")
            .unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(read_to_end(&mut resp.into_body()).await.unwrap(), b"{}");
        assert_eq!(
            pool.idle_count(),
            0,
            "a half-written request's connection is not reused"
        );
    }

    #[tokio::test]
    async fn a_task_out_of_budget_still_sees_that_the_provider_closed_a_connection() {
        let pool = a_closed_idle_connection().await;
        let (mut conn, _) = pool.idle.lock().pop_back().unwrap();
        let open = std::future::poll_fn(|cx| {
            // Spend the task's budget, as a busy relay would have.
            loop {
                let mut spend = std::pin::pin!(tokio::task::consume_budget());
                if std::future::Future::poll(spend.as_mut(), cx).is_pending() {
                    break;
                }
            }
            Poll::Ready(conn.is_open())
        })
        .await;
        assert!(!open, "a closed connection looked open");
    }
}
