//! The main listener: the router and the middleware stack, built in one place.
//!
//! Order, outermost first, and why:
//! 1. request id — every response, including auth failures and 404s, carries
//!    `x-request-id`, so it wraps everything;
//! 2. auth — on matched API routes only (a `route_layer`), so an unknown path
//!    answers 404 without revealing whether a key is valid;
//! 3. the handler: ingress checks the body, then [`crate::proxy`] runs
//!    routing → provider adapter → upstream → relay.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use http::HeaderValue;
use tokio::net::TcpListener;

use crate::error::{ApiError, ClientFormat, GatewayError};
use crate::ingress::{self, RequestId};
use crate::state::Gateway;
use crate::telemetry::RequestRecord;

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(ingress::openai::chat_completions),
        )
        .route("/v1/embeddings", post(ingress::openai::embeddings))
        .route("/v1/models", get(ingress::openai::models))
        .route("/v1/messages", post(ingress::anthropic::messages))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&gw),
            authenticate,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(middleware::from_fn(request_id))
        .with_state(gw)
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = RequestId::from_headers(req.headers());
    let header = HeaderValue::from_str(&id.0).ok();
    req.extensions_mut().insert(id);
    let mut resp = next.run(req).await;
    if let Some(v) = header {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn authenticate(State(gw): State<Arc<Gateway>>, mut req: Request, next: Next) -> Response {
    let caller = gw.live().keys.authenticate(req.headers());
    match caller {
        Some(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None => {
            let id = req
                .extensions()
                .get::<RequestId>()
                .map_or_else(String::new, |id| id.0.clone());
            // Answer in the format of the API the client called.
            let format = if req.uri().path() == "/v1/messages" {
                ClientFormat::Anthropic
            } else {
                ClientFormat::OpenAi
            };
            let mut record = RequestRecord::new(id, format, "auth");
            let resp = ApiError {
                error: GatewayError::Unauthorized,
                format,
            }
            .into_response();
            record.status = resp.status().as_u16();
            record.finish("unauthorized");
            resp
        }
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
/// requests in flight finish.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        // Without it, a response written as headers then body stalls ~40 ms on
        // a busy keep-alive connection (Nagle + delayed ACK).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(gw))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A gateway running on a background task (tests, the demo).
pub struct Running {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub async fn start(gw: Arc<Gateway>, listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(Arc::clone(&gw), listener, std::future::pending()));
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
