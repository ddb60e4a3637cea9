//! The main listener's service: the API routes, matched here and run as one
//! future, and an axum router for the rest.
//!
//! Order, outermost first, and why:
//! 1. request id — every response, including auth failures and 404s, carries
//!    `x-request-id`, so it wraps everything;
//! 2. on an API route ([`Api`]), the gate: the request's one config snapshot
//!    ([`Snapshot`](crate::state::Snapshot): the stable config, or the
//!    canary's), taken once and read by every later stage, so a reload cannot
//!    split a request; then auth, on API routes only, so an unknown path
//!    answers 404 without revealing whether a key is valid; then limits and
//!    admission (after auth, since they need the caller): requests per
//!    minute, concurrency and a spent token allowance refuse before the body
//!    is read;
//! 3. the handler, given what the gate found ([`Admitted`]): ingress reads
//!    and checks the body and charges the caller's tokens from it, then
//!    [`crate::proxy`] runs routing → provider adapter → upstream → relay.
//!
//! Anything else (detour's status page, unknown paths, an API path called
//! with the wrong method) goes through `rest`, an axum router, which answers
//! unknown paths and methods 404.
//!
//! Why not axum's router and middleware for the API routes: each `from_fn`
//! layer and each route boxes the request's future once more, clones the
//! service it wraps, and moves the future between boxes; each `Extension`
//! is one more allocation and a clone when extracted. On the hot path those
//! were thousands of instructions per request; a `match` on six paths and
//! plain `async fn`s cost none of them.
//!
//! Connections (timeouts, keep-alive, caps, shutdown) are [`crate::listener`]'s.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{HeaderValue, Method};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::auth::Caller;
use crate::error::{ApiError, ClientFormat, GatewayError};
use crate::ingress::{self, Admitted, RequestId};
use crate::state::{Gateway, Snapshot};
use crate::telemetry::RequestRecord;

/// The main listener's service (see the module doc). The listener makes one
/// per connection ([`App::for_connection`](crate::listener::App)), which
/// keeps the connection's peer for the gate: requests do not carry it as an
/// extension.
#[derive(Clone)]
pub struct MainService {
    inner: Arc<Inner>,
    peer: Option<SocketAddr>,
}

struct Inner {
    gw: Arc<Gateway>,
    /// Everything that is not an API route: the `public` routes handed in
    /// (detour's status page: the caller hands them in, so the data plane
    /// does not import the control plane's pages) and the 404s.
    rest: Router,
}

impl MainService {
    pub fn new(gw: Arc<Gateway>, public: Router<Arc<Gateway>>) -> Self {
        let rest = public
            .fallback(not_found)
            .method_not_allowed_fallback(not_found)
            .with_state(Arc::clone(&gw));
        Self {
            inner: Arc::new(Inner { gw, rest }),
            peer: None,
        }
    }
}

impl tower::Service<Request> for MainService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let (inner, peer) = (Arc::clone(&self.inner), self.peer);
        // The request (240 bytes) in a box of its own, so that each layer of
        // the handler passes a pointer on, not the request by value into its
        // future and out again; the future written into its box, not copied
        // in (see `crate::boxed`).
        let req = Box::new(req);
        crate::boxed::in_place(move || async move { Ok(inner.handle(peer, req).await) })
    }
}

impl crate::listener::App for MainService {
    fn for_connection(&self, peer: SocketAddr) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            peer: Some(peer),
        }
    }
}

impl Inner {
    async fn handle(&self, peer: Option<SocketAddr>, mut req: Box<Request>) -> Response {
        let id = RequestId::from_headers(req.headers());
        let header = HeaderValue::from_str(id.as_str()).ok();
        let mut resp = match Api::of(req.method(), req.uri().path()) {
            Some(api) => gate(&self.gw, api, id, peer, req).await,
            None => {
                // axum's handlers find the peer where axum puts it.
                if let Some(peer) = peer {
                    req.extensions_mut().insert(ConnectInfo(peer));
                }
                match self.rest.clone().oneshot(*req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        };
        if let Some(v) = header {
            resp.headers_mut().insert(RequestId::HEADER, v);
        }
        resp
    }
}

/// The API routes: the paths and methods that pass the gate to a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    ChatCompletions,
    Responses,
    Embeddings,
    Models,
    Messages,
    CountTokens,
}

impl Api {
    /// The API route `method path` calls, if any. An API path called with
    /// another method is not one: it answers 404, like any unknown path.
    fn of(method: &Method, path: &str) -> Option<Self> {
        let api = match path {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/responses" => Self::Responses,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/models" => Self::Models,
            "/v1/messages" => Self::Messages,
            "/v1/messages/count_tokens" => Self::CountTokens,
            _ => return None,
        };
        let allowed = match api {
            Self::Models => method == Method::GET || method == Method::HEAD,
            _ => method == Method::POST,
        };
        allowed.then_some(api)
    }

    async fn run(self, admitted: Box<Admitted>, req: Box<Request>) -> Response {
        match self {
            Self::ChatCompletions => ingress::openai::chat_completions(admitted, req).await,
            Self::Responses => ingress::openai::responses(admitted, req).await,
            Self::Embeddings => ingress::openai::embeddings(admitted, req).await,
            Self::Models => ingress::models(admitted, &req),
            Self::Messages => ingress::anthropic::messages(admitted, req).await,
            Self::CountTokens => ingress::anthropic_meta::count_tokens(admitted, req).await,
        }
    }
}

/// The gate of an API route: the request's one config snapshot (see
/// [`Snapshot`]), then who calls ([`authenticate`]), then whether they may
/// now ([`admit`]).
async fn gate(
    gw: &Gateway,
    api: Api,
    id: RequestId,
    peer: Option<SocketAddr>,
    req: Box<Request>,
) -> Response {
    let snapshot = gw.snapshot();
    let caller = match authenticate(gw, &snapshot.live, peer, &req) {
        Ok(caller) => caller,
        Err(Denied::Blocked(wait)) => return refuse(id, &req, None, "auth", blocked(wait)),
        Err(Denied::Unknown(ip)) => {
            let wait = match ip {
                Some(ip) => gw.auth_failures.failed(ip).await,
                None => None,
            };
            let error = wait.map_or(GatewayError::Unauthorized, blocked);
            return refuse(id, &req, None, "auth", error);
        }
    };
    admit(api, id, snapshot, caller, req).await
}

/// Why a request has no caller.
enum Denied {
    /// Its address failed to authenticate too often: it waits this long.
    Blocked(std::time::Duration),
    /// No key, or one detour does not know; the client's address, to count.
    Unknown(Option<std::net::IpAddr>),
}

fn blocked(wait: std::time::Duration) -> GatewayError {
    GatewayError::RateLimited {
        what: "failed authentications from this address".into(),
        retry_after: wait,
    }
}

/// Authenticates the caller. The per-IP failure limit is keyed by the
/// client's address: the TCP peer's, or from a `server.trusted_proxies`
/// peer the one its `x-forwarded-for` names ([`crate::auth::client_ip`]).
fn authenticate(
    gw: &Gateway,
    live: &crate::state::Live,
    peer: Option<SocketAddr>,
    req: &Request,
) -> Result<Caller, Denied> {
    let ip = peer.map(|peer| {
        let trusted = &live.config.server.trusted_proxies;
        crate::auth::client_ip(peer.ip(), req.headers(), trusted)
    });
    // An address that keeps failing to authenticate waits, even with a good key.
    if let Some(wait) = ip.and_then(|ip| gw.auth_failures.blocked(ip)) {
        return Err(Denied::Blocked(wait));
    }
    live.keys
        .authenticate(req.headers())
        .ok_or(Denied::Unknown(ip))
}

/// Answers `req` with `error` in the called API's format, with a log line.
fn refuse(
    id: RequestId,
    req: &Request,
    tenant: Option<Arc<str>>,
    stage: &'static str,
    error: GatewayError,
) -> Response {
    let format = format_of(req);
    let mut record = RequestRecord::new(id.into_string(), format, stage);
    record.tenant = tenant;
    let resp = ApiError { error, format }.into_response();
    record.status = resp.status().as_u16();
    record.finish(crate::telemetry::Outcome::Refused);
    resp
}

/// Limits and admission, after auth: the caller's key and tenant limits
/// (requests, concurrency, a spent token allowance), then a slot among
/// `server.max_concurrent_requests`, waited for by tier ([`Admission`]).
/// Both are held until the response body ends. Tokens are charged by the
/// ingress handler once it has read the body, through the [`TokenGate`]
/// handed to it in [`Admitted`].
///
/// [`TokenGate`]: crate::limits::TokenGate
///
/// [`Admission`]: crate::limits::admission::Admission
async fn admit(
    api: Api,
    id: RequestId,
    snapshot: Snapshot,
    caller: Caller,
    req: Box<Request>,
) -> Response {
    let live = &snapshot.live;
    let (held, tokens) = match live.limits.admit(&caller).await {
        Ok(ok) => ok,
        Err(limited) => {
            let error = ingress::rate_limited(limited);
            return drain_then_refuse(id, req, caller, error).await;
        }
    };
    let permit = match live.admission.acquire(caller.tier).await {
        Ok(p) => p,
        Err(_) => {
            let error = GatewayError::Overloaded {
                limit: live.config.server.max_concurrent_requests,
            };
            return drain_then_refuse(id, req, caller, error).await;
        }
    };
    // Boxed, as the request is (see `MainService::call`).
    let admitted = Box::new(Admitted {
        id,
        snapshot,
        caller,
        tokens,
    });
    let resp = api.run(admitted, req).await;
    let (parts, body) = resp.into_parts();
    let holding = Holding {
        body,
        _held: (permit, held),
    };
    Response::from_parts(parts, axum::body::Body::new(holding))
}

/// Refuses after reading (a bounded amount of) the body: answering while the
/// client is still sending makes some clients lose the answer.
async fn drain_then_refuse(
    id: RequestId,
    mut req: Box<Request>,
    caller: Caller,
    error: GatewayError,
) -> Response {
    let body = std::mem::take(req.body_mut());
    let drain = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 256 * 1024));
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), drain).await;
    refuse(id, &req, Some(caller.tenant), "limits", error)
}

/// A body that holds admission and limit permits until it ends or is dropped.
struct Holding {
    body: axum::body::Body,
    _held: (crate::limits::admission::Permit, crate::limits::Held),
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The API format of the endpoint a request called.
fn format_of(req: &Request) -> ClientFormat {
    let path = req.uri().path();
    if path.starts_with("/v1/messages")
        || (path == "/v1/models" && ingress::anthropic_meta::speaks_anthropic(req.headers()))
    {
        ClientFormat::Anthropic
    } else {
        ClientFormat::OpenAi
    }
}

async fn not_found(req: Request) -> Response {
    ApiError::from(GatewayError::NotFound {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    })
    .into_response()
}

/// Serves the gateway on `listener` until `shutdown` resolves, then lets
/// requests in flight finish (up to `server.shutdown_timeout`). Connections
/// run on `workers` when given ([`crate::workers`]: `detour serve`), on the
/// calling runtime otherwise (tests, the demo, the drill).
///
/// Connections are bounded by [`crate::listener`]: header and idle timeouts,
/// HTTP/2 keep-alive, `server.max_connections`.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    public: Router<Arc<Gateway>>,
    workers: Option<&crate::workers::Workers>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let policy = crate::listener::Policy::main(&gw.live().config.server);
    let service = MainService::new(gw, public);
    crate::listener::serve(service, listener, policy, workers, shutdown).await
}

/// A gateway running on a background task (tests, the demo).
pub struct Running {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub async fn start(
        gw: Arc<Gateway>,
        listener: TcpListener,
        public: Router<Arc<Gateway>>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let pending = std::future::pending();
        let task = tokio::spawn(serve(Arc::clone(&gw), listener, public, None, pending));
        Ok(Self {
            addr,
            gateway: gw,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}
