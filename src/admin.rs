//! The admin listener: a separate port for operators, every call
//! authenticated with `Authorization: Bearer $DETOUR_ADMIN_TOKEN`.
//!
//! - `GET  /admin/health` — every target's breaker, latency, cool-down,
//!   misconfiguration, and every provider's override;
//! - `POST /admin/providers/{name}/down|up|auto` — manual override, effective on
//!   the next request;
//! - `GET  /admin/config` — the live config with secrets masked;
//! - `GET  /metrics` — Prometheus metrics (see [`crate::metrics`]);
//! - `POST /admin/status-webhook/{provider}` — a status page's push
//!   ([`crate::status_pages::webhook`]), authenticated by the provider's
//!   `status_webhook_secret`, never by the admin token.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::HedgeAfter;
use crate::health::{Override, PageState, TargetSnapshot};
use crate::reload::{Outcome, Reloader, Trigger};
use crate::rollout::Verdict;
use crate::state::Gateway;

/// The environment variable that holds the admin token.
pub const TOKEN_ENV: &str = "DETOUR_ADMIN_TOKEN";

#[derive(Clone)]
struct AdminState {
    gw: Arc<Gateway>,
    reloader: Arc<Reloader>,
    /// SHA-256 of the token; `None` refuses every call.
    token: Option<[u8; 32]>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

pub fn router(reloader: Arc<Reloader>, token: Option<String>) -> Router {
    let state = AdminState {
        gw: Arc::clone(reloader.gateway()),
        reloader,
        token: token
            .filter(|t| !t.is_empty())
            .map(|t| Sha256::digest(t.as_bytes()).into()),
        in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
    };
    // Installs the Prometheus recorder (once per process) before traffic.
    let _ = crate::metrics::handle();
    Router::new()
        .route("/admin/health", get(health))
        .route("/admin/config", get(config))
        .route("/admin/providers/{name}/{action}", post(set_override))
        .route("/admin/reload", get(last_reload).post(reload))
        .route("/admin/rollout", get(rollout))
        .route("/admin/rollout/promote", post(promote))
        .route("/admin/rollout/rollback", post(rollback))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        // Added after `authorize`, so outside it: a status page holds the
        // provider's webhook secret, never the admin token.
        .route("/admin/status-webhook/{provider}", post(status_webhook))
        .layer(middleware::from_fn_with_state(state.clone(), limit))
        .with_state(state)
}

/// Calls the admin listener serves at once; more get 503 at once.
const MAX_IN_FLIGHT: usize = 16;

/// Runs the admin listener on its own OS thread with its own single-threaded
/// runtime: however saturated the main listener's runtime is, operators get in
/// (the break-glass access OpenAI's engineers lacked in December 2024).
/// Its connections are bounded like the main listener's ([`crate::listener`]),
/// with their own cap, `server.admin_max_connections`.
pub fn spawn_thread(
    listener: std::net::TcpListener,
    reloader: Arc<Reloader>,
    token: Option<String>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("detour-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("admin listener failed: {e}");
                        return;
                    }
                };
                let server = &reloader.gateway().live().config.server;
                let policy = crate::listener::Policy::admin(server);
                let app = router(reloader, token);
                let forever = std::future::pending();
                if let Err(e) = crate::listener::serve(app, listener, policy, None, forever).await {
                    tracing::error!("admin listener failed: {e}");
                }
            });
        })?;
    Ok(())
}

async fn limit(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let Ok(_permit) = s.in_flight.try_acquire() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the admin API is busy; retry",
        );
    };
    next.run(req).await
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message}}))).into_response()
}

async fn authorize(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(expected) = s.token else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the admin API is disabled: set DETOUR_ADMIN_TOKEN",
        );
    };
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
    if presented != Some(expected) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
    }
    next.run(req).await
}

/// A status page's push for `provider`: 404 for an unknown provider (or
/// one without `status_webhook_secret`), 401 for a bad secret or
/// signature, 400 for a body that is not a known push; else the state it
/// left, also when it spoke of no watched component (`"changed": false`).
async fn status_webhook(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use crate::status_pages::{poller, webhook};
    let live = s.gw.live();
    let Some((provider, health)) = live
        .config
        .providers
        .iter()
        .zip(&live.overrides)
        .find(|(p, _)| p.name == name)
    else {
        return error(StatusCode::NOT_FOUND, "no such provider");
    };
    let Some(secret) = &provider.status_webhook_secret else {
        return error(
            StatusCode::NOT_FOUND,
            "this provider takes no status-page pushes (no status_webhook_secret)",
        );
    };
    let now = std::time::SystemTime::now();
    if let Err(e) = webhook::authenticate(secret, &headers, query.as_deref(), &body, now) {
        tracing::warn!(provider = %provider.name, error = %e, "status-page push refused");
        return error(StatusCode::UNAUTHORIZED, &e.to_string());
    }
    let reading = match webhook::read(&body, &provider.status_components) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let changed = reading.is_some();
    let state = match reading {
        Some(reading) => poller::apply(
            provider,
            health,
            s.gw.incidents(),
            &reading,
            poller::Source::Push,
        ),
        None => health.page_state(),
    };
    Json(json!({"provider": provider.name, "status_page": state, "changed": changed}))
        .into_response()
}

#[derive(Serialize)]
struct Health {
    providers: Vec<ProviderView>,
    routes: Vec<RouteView>,
    /// The replicas' Redis (`[state] backend = "redis"`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<crate::shared::View>,
}

#[derive(Serialize)]
struct ProviderView {
    name: String,
    kind: &'static str,
    #[serde(rename = "override")]
    over: Override,
    status_page: PageState,
    status_page_error: Option<String>,
}

#[derive(Serialize)]
struct RouteView {
    model: String,
    targets: Vec<TargetSnapshot>,
}

async fn health(State(s): State<AdminState>) -> Json<Health> {
    let live = s.gw.live();
    let providers = live
        .config
        .providers
        .iter()
        .zip(&live.overrides)
        .map(|(p, o)| ProviderView {
            name: p.name.clone(),
            kind: p.kind.as_str(),
            over: o.get(),
            status_page: o.page_state(),
            status_page_error: o.page_error(),
        })
        .collect();
    let routes = live
        .config
        .routes
        .iter()
        .zip(&live.routes)
        .map(|(r, st)| RouteView {
            model: r.alias.clone(),
            targets: st.health.iter().map(|h| h.snapshot(&r.breaker)).collect(),
        })
        .collect();
    let redis = s.gw.shared().map(|r| r.view());
    Json(Health {
        providers,
        routes,
        redis,
    })
}

async fn set_override(
    State(s): State<AdminState>,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    let over = match action.as_str() {
        "down" => Override::Down,
        "up" => Override::Up,
        "auto" => Override::Auto,
        _ => return error(StatusCode::NOT_FOUND, "action must be down, up or auto"),
    };
    let live = s.gw.live();
    let Some(i) = live.config.providers.iter().position(|p| p.name == name) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no provider named `{name}`"),
        );
    };
    live.overrides[i].set(over);
    let down = over == Override::Down;
    s.gw.incidents()
        .overridden(&name, down, std::time::SystemTime::now());
    tracing::warn!(provider = %name, ?over, "provider override set by admin");
    Json(json!({"provider": name, "override": over})).into_response()
}

async fn reload(State(s): State<AdminState>) -> Response {
    // File reading and validation are quick, but blocking: keep them off the
    // async workers.
    let reloader = Arc::clone(&s.reloader);
    let status = match tokio::task::spawn_blocking(move || reloader.reload(Trigger::Admin)).await {
        Ok(status) => status,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("reload failed: {e}"),
            )
        }
    };
    let code = if status.outcome == Outcome::Rejected {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (code, Json(status)).into_response()
}

async fn last_reload(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let ops = s.gw.ops();
    Json(json!({
        "config_path": ops.config_path.map(|p| p.display().to_string()),
        "last_reload": s.reloader.last(),
        "rejected_configs": s.gw.rejected_configs(),
    }))
}

async fn rollout(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json(match s.gw.rollout() {
        Some(r) => json!({"state": "baking", "rollout": r.view()}),
        None => json!({"state": "stable"}),
    })
}

async fn promote(State(s): State<AdminState>) -> Response {
    decide_for_replicas(&s, Verdict::Promote).await;
    if s.gw.promote() {
        tracing::warn!("rollout promoted by admin");
        Json(json!({"state": "stable", "promoted": true})).into_response()
    } else {
        error(StatusCode::CONFLICT, "no rollout in progress")
    }
}

async fn rollback(State(s): State<AdminState>) -> Response {
    decide_for_replicas(&s, Verdict::Rollback("rolled back by an operator".into())).await;
    if s.gw.rollback() {
        tracing::warn!("rollout rolled back by admin");
        Json(json!({"state": "stable", "rolled_back": true})).into_response()
    } else {
        error(StatusCode::CONFLICT, "no rollout in progress")
    }
}

/// An operator's verdict holds on every replica baking the same rollout
/// (best effort: without Redis, it holds here).
async fn decide_for_replicas(s: &AdminState, verdict: Verdict) {
    let (Some(shared), Some(id)) = (s.gw.shared(), s.gw.rollout().and_then(|r| r.id.clone()))
    else {
        return;
    };
    if let Err(e) = crate::rollout::shared::decide(shared, &id, &verdict, true).await {
        tracing::warn!(
            "the verdict could not be shared with the other replicas ({e}); it holds on this one"
        );
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    // What the gateway counts itself is read now, on the scrape.
    crate::metrics::config_rejected(s.gw.rejected_configs());
    crate::metrics::rollout_baking(s.gw.rollout().is_some());
    crate::metrics::dns_stale_uses(crate::dns::shared().stale_uses());
    crate::metrics::log_lines_dropped(crate::telemetry::log_lines_dropped());
    crate::metrics::cache_rejected(s.gw.live().cache.rejected());
    if let Some(t) = &s.gw.live().traces {
        crate::metrics::trace_spans_dropped(t.spans_dropped());
    }
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    (
        [(http::header::CONTENT_TYPE, content_type)],
        crate::metrics::render(),
    )
        .into_response()
}

/// A `models` list as written (`null`: none, every route).
fn models(list: Option<&[crate::config::ModelPattern]>) -> Option<Vec<&str>> {
    list.map(|l| l.iter().map(crate::config::ModelPattern::as_str).collect())
}

async fn config(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let live = s.gw.live();
    let c = &live.config;
    Json(json!({
        "server": {
            "listen": c.server.listen.to_string(),
            "admin_listen": c.server.admin_listen.map(|a| a.to_string()),
            "open_access": c.server.open_access,
            "max_body_bytes": c.server.max_body_bytes,
            "trusted_proxies": c.server.trusted_proxies.nets().iter()
                .map(ToString::to_string).collect::<Vec<_>>(),
        },
        "state": match c.state.redis() {
            None => json!({"backend": "memory"}),
            Some(r) => json!({
                "backend": "redis",
                // It may carry a password.
                "redis_url": r.masked_url(),
                "key_prefix": r.key_prefix,
                "timeout_ms": r.timeout.as_millis() as u64,
                "on_redis_failure": r.on_failure.as_str(),
            }),
        },
        "telemetry": match &c.telemetry.otlp {
            None => json!({"otlp_endpoint": null}),
            Some(o) => json!({
                // It may carry a password or a token in its query.
                "otlp_endpoint": crate::config::masked_url(&o.endpoint),
                // Their values are credentials.
                "otlp_headers": o.headers.iter().map(|(name, _)| (name.clone(), json!("***")))
                    .collect::<serde_json::Map<_, _>>(),
                "service_name": o.service_name,
                "sample_ratio": o.sample_ratio,
                "batch_delay_ms": o.batch_delay.as_millis() as u64,
            }),
        },
        "cache": {"backend": match c.cache.backend {
            crate::config::CacheBackend::Memory => "memory",
            crate::config::CacheBackend::Redis => "redis",
        }, "max_bytes": c.cache.max_bytes},
        "providers": c.providers.iter().map(|p| json!({
            "name": p.name,
            "kind": p.kind.as_str(),
            // It may carry a password or a key in its query.
            "base_url": crate::config::masked_url(&p.base_url),
            "api_key": p.api_key.as_ref().map(|_| "***"),
            "status_page": p.status_page.as_ref().map(crate::config::masked_url),
            "status_page_format": p.status_page_format.as_str(),
            "status_components": p.status_components,
            "status_webhook_secret": p.status_webhook_secret.as_ref().map(|_| "***"),
            "connect_timeout_ms": p.connect_timeout.as_millis() as u64,
            "tls_verify": p.tls.verify,
            "ca_file": p.tls.ca.as_ref().map(|c| c.path.display().to_string()),
            "client_cert": p.tls.identity.as_ref().map(|i| i.cert_file.display().to_string()),
            "client_key": p.tls.identity.as_ref().map(|i| i.key_file.display().to_string()),
            // Its credentials masked; `null`: the environment's.
            "proxy": match &p.proxy {
                crate::config::ProxySetting::Environment => None,
                other => Some(other.masked()),
            },
        })).collect::<Vec<_>>(),
        "routes": c.routes.iter().map(|r| json!({
            "model": r.alias,
            "targets": r.targets.iter().map(|t| json!({
                "provider": t.provider.name, "model": t.model,
                "weight": t.weight, "priority": t.priority,
            })).collect::<Vec<_>>(),
            "timeouts_ms": {
                "first_byte": r.timeouts.first_byte.as_millis() as u64,
                "idle": r.timeouts.idle.as_millis() as u64,
                "total": r.timeouts.total.as_millis() as u64,
            },
            "retries": {"budget": r.retries.budget, "min_per_sec": r.retries.min_per_sec, "max_attempts": r.retries.max_attempts},
            "hedge_after": r.hedge_after.map(|h| match h {
                HedgeAfter::Fixed(d) => format!("{}ms", d.as_millis()),
                HedgeAfter::P95 => "p95".to_owned(),
            }),
            "probe_hedge_after_ms": r.probe_hedge_after.as_millis() as u64,
            "continue_streams": r.continue_streams,
        })).collect::<Vec<_>>(),
        "keys": c.keys.iter().map(|k| json!({
            "name": k.name, "tenant": k.tenant, "tier": k.tier.as_str(),
            "models": models(k.models.as_deref()),
        })).collect::<Vec<_>>(),
        "tenants": c.tenants.iter().map(|t| json!({
            "name": t.name, "models": models(t.models.as_deref()),
        })).collect::<Vec<_>>(),
    }))
}
