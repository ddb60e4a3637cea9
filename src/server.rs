//! The main listener: the router and the middleware stack, built in one place.
//!
//! Order, outermost first, and why:
//! 1. request id — every response, including auth failures and 404s, carries
//!    `x-request-id`, so it wraps everything;
//! 2. snapshot — on matched API routes, the one config snapshot the request
//!    runs on ([`Snapshot`](crate::state::Snapshot): the stable config, or
//!    the canary's), taken once and read by every later stage, so a reload
//!    cannot split a request;
//! 3. auth — on matched API routes only, so an unknown path answers 404
//!    without revealing whether a key is valid;
//! 4. limits and admission (after auth, since they need the caller):
//!    requests per minute, concurrency and a spent token allowance refuse
//!    before the body is read (2 to 4 are one `route_layer`, [`gate`]);
//! 5. the handler: ingress reads and checks the body and charges the caller's
//!    tokens from it, then [`crate::proxy`] runs routing → provider adapter →
//!    upstream → relay.
//!
//! Connections (timeouts, keep-alive, caps, shutdown) are [`crate::listener`]'s.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::HeaderValue;
use tokio::net::TcpListener;

use crate::auth::Caller;
use crate::error::{ApiError, ClientFormat, GatewayError};
use crate::ingress::{self, RequestId};
use crate::state::Gateway;
use crate::telemetry::RequestRecord;

/// The main listener's router: the API routes behind the middleware stack,
/// and `public` routes outside it (detour's status page: the caller hands
/// them in, so the data plane does not import the control plane's pages).
pub fn router(gw: Arc<Gateway>, public: Router<Arc<Gateway>>) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(ingress::openai::chat_completions),
        )
        .route("/v1/responses", post(ingress::openai::responses))
        .route("/v1/embeddings", post(ingress::openai::embeddings))
        .route("/v1/models", get(ingress::models))
        .route("/v1/messages", post(ingress::anthropic::messages))
        .route(
            "/v1/messages/count_tokens",
            post(ingress::anthropic_meta::count_tokens),
        )
        .route_layer(middleware::from_fn_with_state(Arc::clone(&gw), gate))
        // Public routes (the status page): added after (outside) the
        // gate (snapshot, auth and admission).
        .merge(public)
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn(request_id))
        .with_state(gw)
}

/// `x-request-id`, parsed once.
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = RequestId::from_headers(req.headers());
    let header = HeaderValue::from_str(&id.0).ok();
    req.extensions_mut().insert(id);
    let mut resp = next.run(req).await;
    if let Some(v) = header {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    resp
}

/// Stages 2 to 4 on a matched API route, in one layer (each layer of its
/// own would box the request's future once more and move it between boxes):
/// the request's one config snapshot (see
/// [`Snapshot`](crate::state::Snapshot)), then who calls ([`authenticate`]),
/// then whether they may now ([`admit`]).
async fn gate(State(gw): State<Arc<Gateway>>, mut req: Request, next: Next) -> Response {
    let snapshot = gw.snapshot();
    let live = Arc::clone(&snapshot.live);
    req.extensions_mut().insert(snapshot);
    let caller = match authenticate(&gw, &live, &req) {
        Ok(caller) => caller,
        Err(Denied::Blocked(wait)) => return refuse(&req, "auth", blocked(wait)),
        Err(Denied::Unknown(ip)) => {
            let wait = match ip {
                Some(ip) => gw.auth_failures.failed(ip).await,
                None => None,
            };
            let error = wait.map_or(GatewayError::Unauthorized, blocked);
            return refuse(&req, "auth", error);
        }
    };
    req.extensions_mut().insert(caller.clone());
    admit(&live, caller, req, next).await
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
fn authenticate(gw: &Gateway, live: &crate::state::Live, req: &Request) -> Result<Caller, Denied> {
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| {
        let trusted = &live.config.server.trusted_proxies;
        crate::auth::client_ip(c.0.ip(), req.headers(), trusted)
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
fn refuse(req: &Request, stage: &'static str, error: GatewayError) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map_or_else(String::new, |id| id.0.clone());
    let format = format_of(req);
    let mut record = RequestRecord::new(id, format, stage);
    record.tenant = req
        .extensions()
        .get::<Caller>()
        .map(|c| Arc::clone(&c.tenant));
    let resp = ApiError { error, format }.into_response();
    record.status = resp.status().as_u16();
    record.finish(crate::telemetry::Outcome::Refused);
    resp
}

/// Limits and admission, after auth: the caller's key and tenant limits
/// (requests, concurrency, a spent token allowance), then a slot among
/// `server.max_concurrent_requests`, waited for by tier ([`Admission`]).
/// Both are held until the response body ends. Tokens are charged by the
/// ingress handler once it has read the body, through the [`TokenGate`] this
/// leaves in the request's extensions.
///
/// [`TokenGate`]: crate::limits::TokenGate
///
/// [`Admission`]: crate::limits::admission::Admission
async fn admit(
    live: &crate::state::Live,
    caller: Caller,
    mut req: Request,
    next: Next,
) -> Response {
    let (held, tokens) = match live.limits.admit(&caller).await {
        Ok(ok) => ok,
        Err(limited) => {
            let error = ingress::rate_limited(limited);
            return drain_then_refuse(req, error).await;
        }
    };
    let permit = match live.admission.acquire(caller.tier).await {
        Ok(p) => p,
        Err(_) => {
            let error = GatewayError::Overloaded {
                limit: live.config.server.max_concurrent_requests,
            };
            return drain_then_refuse(req, error).await;
        }
    };
    req.extensions_mut().insert(tokens);
    let resp = next.run(req).await;
    let (parts, body) = resp.into_parts();
    let holding = Holding {
        body,
        _held: (permit, held),
    };
    Response::from_parts(parts, axum::body::Body::new(holding))
}

/// Refuses after reading (a bounded amount of) the body: answering while the
/// client is still sending makes some clients lose the answer.
async fn drain_then_refuse(req: Request, error: GatewayError) -> Response {
    let (parts, body) = req.into_parts();
    let drain = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, 256 * 1024));
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), drain).await;
    refuse(
        &Request::from_parts(parts, axum::body::Body::empty()),
        "limits",
        error,
    )
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
    crate::listener::serve(router(gw, public), listener, policy, workers, shutdown).await
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
