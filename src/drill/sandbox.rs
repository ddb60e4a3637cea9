//! The user's config with every provider replaced by a mock of its kind.
//!
//! The user's file is loaded once with the same loader as `detour check`
//! (same errors), then rewritten as TOML for each scenario: every provider's
//! `base_url` points at a fresh mock of its kind (by name through the drill's
//! own DNS when it runs, else at 127.0.0.1), API keys become dummies the mock
//! checks, status pages and webhooks are dropped, `[state]` is memory, the
//! listener is 127.0.0.1:0 and there is no admin listener. Gateway keys are
//! replaced by known ones (`drill-key-N`), keeping their tenant, tier, limits
//! and model lists, so the drill can call as each tier. Routes, policies,
//! limits and tiers stay as written: they are what the drill puts to the test.
//!
//! Each scenario gets fresh mocks and a fresh gateway, so no scenario inherits
//! another's breakers, counters or hanging connections.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{self, ApiKey, Config, ProviderKind, TenantLimits, Tier};
use crate::mock::{self, Faults, Flavor, MockOptions, MockServer};
use crate::server::Running;
use crate::state::Gateway;

use super::DrillError;

/// The API key every mock requires and every rewritten provider sends.
pub const UPSTREAM_KEY: &str = "drill-upstream-key";

/// What the drill knows of the user's config: enough to rewrite it and to
/// aim load at it.
#[derive(Debug)]
pub struct Plan {
    /// The file as written, parsed (for rewriting).
    table: toml::Table,
    /// The name diagnostics of the rewritten config carry.
    file: String,
    pub providers: Vec<ProviderPlan>,
    pub routes: Vec<RoutePlan>,
    /// One gateway key per tier present, best tier first; empty when the
    /// config has no keys (open access on loopback).
    pub callers: Vec<Caller>,
    /// `server.max_concurrent_requests`, for the report.
    pub max_concurrent_requests: usize,
}

#[derive(Debug, Clone)]
pub struct ProviderPlan {
    pub name: String,
    pub flavor: Flavor,
    /// The host name its mock is reached by when the drill's DNS runs.
    pub host: String,
}

#[derive(Debug, Clone)]
pub struct RoutePlan {
    pub alias: String,
    /// The provider of the target tried first (lowest priority, first
    /// written among equals).
    pub first_choice: String,
}

/// A gateway key the drill calls with.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tier: Tier,
    pub key: String,
    /// The routes (indexes into [`Plan::routes`]) this key may call.
    pub routes: Vec<usize>,
}

impl Plan {
    /// Plans a drill of `cfg`, loaded from `text` (the file `file`).
    pub fn new(cfg: &Config, text: &str, file: &str) -> Result<Self, DrillError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| DrillError::Rewrite(e.message().to_owned()))?;
        if cfg.routes.is_empty() {
            return Err(DrillError::NoRoutes);
        }
        let providers = cfg
            .providers
            .iter()
            .enumerate()
            .map(|(i, p)| ProviderPlan {
                name: p.name.clone(),
                flavor: flavor(p.kind),
                host: format!("p{i}.drill.test"),
            })
            .collect();
        let routes = cfg
            .routes
            .iter()
            .map(|r| RoutePlan {
                alias: r.alias.clone(),
                first_choice: r
                    .targets
                    .iter()
                    .min_by_key(|t| t.priority)
                    .map(|t| t.provider.name.clone())
                    .unwrap_or_default(),
            })
            .collect::<Vec<_>>();
        let mut callers: Vec<Caller> = Vec::new();
        for (i, k) in cfg.keys.iter().enumerate() {
            if callers.iter().any(|c| c.tier == k.tier) {
                continue;
            }
            callers.push(Caller {
                tier: k.tier,
                key: key_text(i),
                routes: (0..routes.len())
                    .filter(|&r| allowed(k, &cfg.tenants, &routes[r].alias))
                    .collect(),
            });
        }
        callers.sort_by_key(|c| c.tier);
        Ok(Self {
            table,
            file: format!("{file} (drill copy)"),
            providers,
            routes,
            callers,
            max_concurrent_requests: cfg.server.max_concurrent_requests,
        })
    }

    /// The config text with provider `i` at `upstreams[i]`.
    pub fn rewrite(&self, upstreams: &[String]) -> Result<String, DrillError> {
        let mut t = self.table.clone();
        if !t.get("server").is_some_and(toml::Value::is_table) {
            t.insert("server".into(), toml::Value::Table(toml::Table::new()));
        }
        if let Some(server) = t.get_mut("server").and_then(toml::Value::as_table_mut) {
            server.insert("listen".into(), "127.0.0.1:0".into());
            server.remove("admin_listen");
        }
        t.remove("state");
        if let Some(cache) = t.get_mut("cache").and_then(toml::Value::as_table_mut) {
            cache.insert("backend".into(), "memory".into());
        }
        if let Some(providers) = t.get_mut("providers").and_then(toml::Value::as_array_mut) {
            for (i, p) in providers.iter_mut().enumerate() {
                let Some(p) = p.as_table_mut() else { continue };
                let Some(url) = upstreams.get(i) else {
                    return Err(DrillError::Rewrite(format!("no mock for provider {i}")));
                };
                p.insert("base_url".into(), url.clone().into());
                p.insert("api_key".into(), UPSTREAM_KEY.into());
                for key in [
                    "status_page",
                    "status_components",
                    "status_poll",
                    "status_page_format",
                    "status_webhook_secret",
                ] {
                    p.remove(key);
                }
            }
        }
        if let Some(keys) = t.get_mut("keys").and_then(toml::Value::as_array_mut) {
            for (i, k) in keys.iter_mut().enumerate() {
                let Some(k) = k.as_table_mut() else { continue };
                k.remove("key_sha256");
                k.insert("key".into(), key_text(i).into());
            }
        }
        toml::to_string(&t).map_err(|e| DrillError::Rewrite(e.to_string()))
    }

    /// Fresh mocks, one per provider, with `faults` on each, and a gateway in
    /// front of them. `by_name`: reach the mocks through the drill's DNS.
    pub async fn start(&self, base: &Faults, by_name: bool) -> Result<Sandbox, DrillError> {
        let opts = MockOptions {
            api_key: Some(UPSTREAM_KEY.to_owned()),
            ..MockOptions::default()
        };
        let mut mocks = Vec::with_capacity(self.providers.len());
        let mut upstreams = Vec::with_capacity(self.providers.len());
        for p in &self.providers {
            let listener = bind().await?;
            let server = mock::spawn(p.flavor, listener, opts.clone())
                .await
                .map_err(|e| DrillError::io("cannot start a mock provider", e))?;
            server.set_faults(base.clone());
            let host = if by_name {
                p.host.as_str()
            } else {
                "127.0.0.1"
            };
            let path = if p.flavor == Flavor::Gemini {
                "v1beta"
            } else {
                "v1"
            };
            upstreams.push(format!("http://{host}:{}/{path}", server.addr().port()));
            mocks.push(server);
        }
        let text = self.rewrite(&upstreams)?;
        let cfg = config::load_str(&text, &self.file)
            .map_err(|e| DrillError::Rewrite(format!("the rewritten config does not load: {e}")))?;
        let gw = Arc::new(Gateway::new(cfg).map_err(|e| DrillError::Gateway(e.to_string()))?);
        gw.set_source(Some(text.clone()));
        let gateway = Running::start(gw, bind().await?, crate::public_status::routes())
            .await
            .map_err(|e| DrillError::io("cannot start the gateway", e))?;
        Ok(Sandbox {
            mocks,
            gateway,
            text,
        })
    }

    /// The index of provider `name`.
    pub fn provider(&self, name: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.name == name)
    }
}

/// One scenario's mocks and gateway; dropping it stops them all.
pub struct Sandbox {
    /// Parallel to [`Plan::providers`].
    pub mocks: Vec<MockServer>,
    pub gateway: Running,
    /// The config the gateway serves.
    pub text: String,
}

impl Sandbox {
    /// Upstream requests every mock has seen so far.
    pub fn upstream_requests(&self) -> u64 {
        self.mocks.iter().map(|m| m.stats().requests).sum()
    }
}

fn flavor(kind: ProviderKind) -> Flavor {
    match kind {
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => Flavor::Openai,
        ProviderKind::Anthropic => Flavor::Anthropic,
        ProviderKind::Gemini => Flavor::Gemini,
    }
}

fn key_text(i: usize) -> String {
    format!("drill-key-{i}")
}

/// Whether key `k` may call `alias` (its own list, else its tenant's).
fn allowed(k: &ApiKey, tenants: &[TenantLimits], alias: &str) -> bool {
    let list = k.models.as_ref().or_else(|| {
        tenants
            .iter()
            .find(|t| t.name == k.tenant)
            .and_then(|t| t.models.as_ref())
    });
    list.is_none_or(|l| l.iter().any(|p| p.matches(alias)))
}

async fn bind() -> Result<TcpListener, DrillError> {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| DrillError::io("cannot listen on 127.0.0.1", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = r#"
[server]
listen = "0.0.0.0:8080"
admin_listen = "0.0.0.0:9090"

[state]
backend = "redis"
redis_url = "redis://10.0.0.1:6379"

[cache]
backend = "redis"

[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "sk-live-secret"
status_page = "https://status.openai.com/api/v2/summary.json"
status_webhook_secret = "0123456789abcdef0123"

[[providers]]
name = "claude"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"

[[routes]]
model = "chat"
targets = [{ provider = "openai", model = "m", priority = 1 }, { provider = "claude", model = "c", priority = 0 }]

[[routes]]
model = "batch"
targets = [{ provider = "openai", model = "m" }]

[[keys]]
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
tenant = "app"
tier = "critical"
models = ["chat"]

[[keys]]
key = "dk-batch"
tenant = "batch"
tier = "sheddable"
"#;

    #[test]
    fn the_rewrite_points_every_provider_at_its_mock_and_keeps_the_policy() {
        let cfg = config::load_str(USER, "user.toml").unwrap();
        let plan = Plan::new(&cfg, USER, "user.toml").unwrap();
        assert_eq!(
            plan.routes[0].first_choice, "claude",
            "priority 0 goes first"
        );
        assert_eq!(plan.routes[1].first_choice, "openai");
        let tiers: Vec<(Tier, Vec<usize>)> = plan
            .callers
            .iter()
            .map(|c| (c.tier, c.routes.clone()))
            .collect();
        assert_eq!(
            tiers,
            [(Tier::Critical, vec![0]), (Tier::Sheddable, vec![0, 1])]
        );
        let text = plan
            .rewrite(&[
                "http://p0.drill.test:1/v1".into(),
                "http://127.0.0.1:2/v1".into(),
            ])
            .unwrap();
        assert!(
            !text.contains("sk-live-secret") && !text.contains("10.0.0.1"),
            "{text}"
        );
        let drilled = config::load_str(&text, "drill.toml").unwrap();
        assert_eq!(drilled.server.listen.to_string(), "127.0.0.1:0");
        assert_eq!(drilled.server.admin_listen, None);
        assert_eq!(drilled.state, config::StateStore::Memory);
        assert_eq!(drilled.cache.backend, config::CacheBackend::Memory);
        let p = &drilled.providers[0];
        assert_eq!(p.base_url.as_str(), "http://p0.drill.test:1/v1");
        assert_eq!(
            p.api_key.as_ref().map(config::Secret::expose),
            Some(UPSTREAM_KEY)
        );
        assert!(p.status_page.is_none() && p.status_webhook_secret.is_none());
        assert_eq!(
            drilled.providers[1].base_url.as_str(),
            "http://127.0.0.1:2/v1"
        );
        // Keys: the drill's own, with tier and model list kept.
        assert_eq!(drilled.keys.len(), 2);
        assert_eq!(drilled.keys[0].tier, Tier::Critical);
        assert!(drilled.keys[0].models.is_some());
        assert_eq!(plan.callers[0].key, "drill-key-0");
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(b"drill-key-0").into();
        assert_eq!(
            drilled.keys[0].sha256, digest,
            "the key the drill calls with"
        );
        assert_eq!(drilled.routes.len(), 2);
        assert_eq!(drilled.routes[0].targets[1].priority, 0);
    }
}
