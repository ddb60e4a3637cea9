//! The config file as written: serde structs with spans, before validation.
//!
//! Unknown keys are not rejected here at the first one; the loader collects
//! every unknown key (with `serde_ignored`) so `detour check` can report them all.

use serde::Deserialize;
use toml::Spanned;

pub type Str = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub providers: Vec<RawProvider>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    pub rollout: Option<RawRollout>,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    /// `[cache]`: where the response cache keeps entries.
    #[serde(default)]
    pub cache: RawCacheStore,
    /// `[state]`: where state shared by replicas lives.
    #[serde(default)]
    pub state: RawState,
    /// `[drill]`: the pass marks of `detour drill` (`serve` ignores them).
    #[serde(default)]
    pub drill: RawDrill,
    /// `[telemetry]`: traces exported over OTLP/HTTP.
    #[serde(default)]
    pub telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDrill {
    pub max_error_rate: Option<Spanned<f64>>,
    pub max_failover: Option<Str>,
    pub max_amplification: Option<Spanned<f64>>,
    pub max_flood_p99_ratio: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTelemetry {
    pub otlp_endpoint: Option<Str>,
    pub otlp_headers: Option<Spanned<std::collections::BTreeMap<String, Str>>>,
    pub service_name: Option<Str>,
    pub sample_ratio: Option<Spanned<f64>>,
    /// The longest a finished span waits before it is sent.
    pub batch_delay: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawState {
    pub backend: Option<Str>,
    pub redis_url: Option<Str>,
    pub key_prefix: Option<Str>,
    pub timeout: Option<Str>,
    pub on_redis_failure: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawCacheStore {
    pub backend: Option<Str>,
    pub max_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
pub struct RawTenant {
    pub name: Str,
    pub rpm: Option<Spanned<u32>>,
    pub tpm: Option<Spanned<u64>>,
    pub max_concurrent: Option<Spanned<u32>>,
    /// Route aliases or globs the tenant's keys may call (default: all).
    pub models: Option<Spanned<Vec<Str>>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRollout {
    pub canary_percent: Option<Spanned<f64>>,
    pub bake: Option<Str>,
    pub max_error_rate_increase: Option<Spanned<f64>>,
    pub max_latency_ratio: Option<Spanned<f64>>,
    pub min_requests: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    pub listen: Option<Str>,
    pub admin_listen: Option<Str>,
    pub allow_unauthenticated: Option<bool>,
    pub max_body_bytes: Option<Spanned<u64>>,
    pub max_concurrent_requests: Option<Spanned<u32>>,
    /// Longest wait for a slot under overload (critical tier; standard waits half).
    pub queue_timeout: Option<Str>,
    /// How long a client may take to send its request headers / its body.
    pub header_read_timeout: Option<Str>,
    pub body_read_timeout: Option<Str>,
    /// Failed authentications per minute per client IP before it gets 429.
    pub auth_failures_per_minute: Option<Spanned<u32>>,
    /// Largest single event of a provider's stream.
    pub max_event_bytes: Option<Spanned<u64>>,
    /// Client connections open at once on the main / admin listener.
    pub max_connections: Option<Spanned<u32>>,
    pub admin_max_connections: Option<Spanned<u32>>,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Option<Str>,
    /// HTTP/2 keep-alive ping interval (and how long an answer may take).
    pub http2_keep_alive: Option<Str>,
    /// Longest wait for requests in flight at shutdown.
    pub shutdown_timeout: Option<Str>,
    /// Data-plane threads; default one per CPU.
    pub worker_threads: Option<Spanned<u32>>,
    /// Peers (CIDRs or addresses) whose `x-forwarded-for` names the client.
    pub trusted_proxies: Option<Vec<Str>>,
}

#[derive(Debug, Deserialize)]
pub struct RawProvider {
    pub name: Str,
    pub kind: Str,
    pub base_url: Str,
    pub api_key: Option<Str>,
    pub status_page: Option<Str>,
    /// Components of the status page that matter (default: the page's
    /// overall indicator).
    pub status_components: Option<Vec<String>>,
    pub status_poll: Option<Str>,
    /// How to read `status_page`: `statuspage`, `incident_io`,
    /// `google_cloud`, `rss`, `atom` or `auto` (the default).
    pub status_page_format: Option<Str>,
    /// The secret that authenticates pushes to
    /// `POST /admin/status-webhook/<provider>` (usually `${ENV}`).
    pub status_webhook_secret: Option<Str>,
    pub connect_timeout: Option<Str>,
    /// `max_tokens` sent to Anthropic when the client gave none.
    pub default_max_tokens: Option<Spanned<u64>>,
    /// Extra trusted roots for this provider (PEM), on top of the bundled
    /// and system roots.
    pub ca_file: Option<Str>,
    /// A client certificate chain and its key (PEM): mTLS. Both or neither.
    pub client_cert: Option<Str>,
    pub client_key: Option<Str>,
    /// `false` turns certificate verification off (loudly); default true.
    pub tls_verify: Option<Spanned<bool>>,
    /// `http://[user:pass@]host:port`, or `""` for none; absent: the
    /// environment's `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`.
    pub proxy: Option<Str>,
}

#[derive(Debug, Deserialize)]
pub struct RawRoute {
    pub model: Str,
    #[serde(default)]
    pub targets: Vec<RawTarget>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub retries: RawRetries,
    #[serde(default)]
    pub breaker: RawBreaker,
    /// Start a second attempt on the next target after this long without a
    /// first byte (opt-in): a duration, or "p95" for the first target's
    /// estimated p95 time to first byte.
    pub hedge_after: Option<Str>,
    /// Hedge an attempt on a target of unknown or recovering health (a
    /// probe, slow start) after this long when its latency is not known.
    pub probe_hedge_after: Option<Str>,
    /// Response cache for this route (opt-in): `cache = { ttl = "5m" }`.
    pub cache: Option<RawRouteCache>,
    /// Continue a text stream that breaks after content reached the client
    /// on the next target (opt-in).
    #[serde(default)]
    pub continue_streams: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRouteCache {
    pub ttl: Option<Str>,
    pub max_entry_bytes: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRetries {
    pub budget: Option<Spanned<f64>>,
    pub min_per_sec: Option<Spanned<u32>>,
    pub max_attempts: Option<Spanned<u32>>,
    pub backoff: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawBreaker {
    pub consecutive_failures: Option<Spanned<u32>>,
    pub failure_rate: Option<Spanned<f64>>,
    pub min_requests: Option<Spanned<u32>>,
    pub window: Option<Str>,
    pub open_for: Option<Str>,
    pub slow_start: Option<Str>,
    pub max_cool_down: Option<Str>,
}

#[derive(Debug, Deserialize)]
pub struct RawTarget {
    pub provider: Str,
    pub model: Str,
    pub weight: Option<Spanned<u32>>,
    pub priority: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTimeouts {
    pub first_byte: Option<Str>,
    pub idle: Option<Str>,
    pub total: Option<Str>,
}

#[derive(Debug, Deserialize)]
pub struct RawKey {
    pub name: Option<Str>,
    pub key: Option<Str>,
    pub key_sha256: Option<Str>,
    pub tenant: Str,
    pub tier: Option<Str>,
    pub rpm: Option<Spanned<u32>>,
    pub tpm: Option<Spanned<u64>>,
    pub max_concurrent: Option<Spanned<u32>>,
    pub max_streams: Option<Spanned<u32>>,
    /// Route aliases or globs this key may call (default: its tenant's).
    pub models: Option<Spanned<Vec<Str>>>,
}
