//! Stage two: from the file's text to a validated [`Config`], or every problem
//! found, each with file, line, column and key.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use toml::de::{DeTable, DeValue};
use toml::Spanned;
use url::Url;

use super::chunks::{Offsets, Plan};
use super::env::expand;
use super::raw::{RawConfig, RawKey, RawProvider, RawRoute, RawServer, Str};
use super::*;

/// The smallest `server.max_event_bytes` accepted: real events are larger.
const MIN_EVENT_BYTES: u64 = 1024;
/// The shortest `status_webhook_secret` accepted.
const MIN_WEBHOOK_SECRET: usize = 16;

/// Reads and validates a config file.
pub fn load_file(path: &std::path::Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    load_str(&text, &file)
}

/// Validates config text; `file` names it in diagnostics.
pub fn load_str(text: &str, file: &str) -> Result<Config, ConfigError> {
    let lookup = |name: &str| std::env::var(name).ok();
    Loader {
        text,
        file,
        lookup: &lookup,
        diags: Vec::new(),
        warnings: Vec::new(),
        fall_back: false,
        offsets: Offsets::default(),
    }
    .load()
}

struct Loader<'a> {
    text: &'a str,
    file: &'a str,
    lookup: &'a dyn Fn(&str) -> Option<String>,
    diags: Vec<Diagnostic>,
    /// Problems that do not refuse the config ([`Config::warnings`]).
    warnings: Vec<Diagnostic>,
    /// A batch of keys did not parse cleanly: load it whole instead.
    fall_back: bool,
    /// Where the text being validated is in the file (a part of it, when
    /// loading in batches).
    offsets: Offsets,
}

impl Loader<'_> {
    fn load(mut self) -> Result<Config, ConfigError> {
        // Many keys: parsed a batch at a time, when that goes cleanly; else
        // (a problem to report) the one whole parse below reports it.
        if let Some(plan) = Plan::new(self.text) {
            if let Some(loaded) = self.load_in_batches(&plan) {
                return loaded;
            }
            self.diags.clear();
            self.warnings.clear();
            self.fall_back = false;
        }
        // One parse when the file is good; the spanned document that
        // diagnostics need is parsed only when there is something to report
        // (a large config's parse is most of what loading it costs).
        let mut unknown = Vec::new();
        let raw: Result<RawConfig, _> = toml::de::Deserializer::parse(self.text)
            .and_then(|de| serde_ignored::deserialize(de, |path| unknown.push(segments(&path))));
        if raw.is_err() || !unknown.is_empty() {
            let doc = match DeTable::parse(self.text) {
                Ok(doc) => doc,
                Err(e) => {
                    let offset = e.span().map_or(0, |s| s.start);
                    self.report_at(offset, "(syntax)", e.message().trim());
                    return Err(ConfigError::Invalid(self.diags));
                }
            };
            for path in unknown {
                let (offset, key) = locate(doc.get_ref(), &path);
                self.report_at(offset, &key, "unknown key");
            }
            if let Err(e) = &raw {
                let offset = e.span().map_or(0, |s| s.start);
                let key = key_at(doc.get_ref(), offset);
                self.report_at(offset, &key, e.message().trim());
                return Err(ConfigError::Invalid(self.diags));
            }
        }
        let Ok(raw) = raw else {
            return Err(ConfigError::Invalid(self.diags));
        };
        let config = self.validate(raw, None);
        self.finish(config)
    }

    /// [`Loader::load`] with the `[[keys]]` tables parsed in batches
    /// ([`chunks`](super::chunks)); `None` when a part does not parse
    /// cleanly or has an unknown key, for the whole parse to report.
    fn load_in_batches(&mut self, plan: &Plan) -> Option<Result<Config, ConfigError>> {
        let (rest, offsets) = plan.rest(self.text);
        let mut unknown = false;
        let raw: RawConfig = toml::de::Deserializer::parse(&rest)
            .and_then(|de| serde_ignored::deserialize(de, |_| unknown = true))
            .ok()?;
        drop(rest);
        if unknown || !raw.keys.is_empty() {
            return None;
        }
        self.offsets = offsets;
        let config = self.validate(raw, Some(plan));
        self.offsets = Offsets::default();
        if self.fall_back {
            return None;
        }
        Some(self.finish(config))
    }

    fn finish(&mut self, config: Option<Config>) -> Result<Config, ConfigError> {
        let diags = std::mem::take(&mut self.diags);
        if diags.is_empty() {
            if let Some(mut config) = config {
                config.warnings = std::mem::take(&mut self.warnings);
                return Ok(config);
            }
        }
        Err(ConfigError::Invalid(diags))
    }

    /// The keys: `raw`'s, or the batches of `plan`'s tables, each parsed,
    /// checked and dropped before the next (`None`, with `fall_back` set,
    /// when a batch does not parse cleanly).
    fn keys(
        &mut self,
        raw: &[RawKey],
        plan: Option<&Plan>,
        routes: &[Arc<Route>],
    ) -> Option<Vec<ApiKey>> {
        let Some(plan) = plan else {
            return Some(
                raw.iter()
                    .enumerate()
                    .filter_map(|(i, k)| self.key(i, k, routes))
                    .collect(),
            );
        };
        #[derive(serde::Deserialize)]
        struct Batch {
            keys: Vec<RawKey>,
        }
        let mut keys = Vec::with_capacity(plan.len());
        let mut buf = String::new();
        for b in 0..plan.batches() {
            let (first, count, offsets) = plan.batch(self.text, b, &mut buf);
            let mut unknown = false;
            let parsed: Result<Batch, _> = toml::de::Deserializer::parse(&buf)
                .and_then(|de| serde_ignored::deserialize(de, |_| unknown = true));
            let batch = match parsed {
                Ok(batch) if !unknown && batch.keys.len() == count => batch,
                _ => {
                    self.fall_back = true;
                    return None;
                }
            };
            // The batch's spans, for the diagnostics of its keys.
            let rest = std::mem::replace(&mut self.offsets, offsets);
            for (i, k) in batch.keys.iter().enumerate() {
                keys.extend(self.key(first + i, k, routes));
            }
            self.offsets = rest;
        }
        Some(keys)
    }

    fn validate(&mut self, raw: RawConfig, plan: Option<&Plan>) -> Option<Config> {
        let providers: Vec<Arc<Provider>> = raw
            .providers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.provider(i, p).map(Arc::new))
            .collect();
        let mut seen = HashSet::new();
        for (i, p) in raw.providers.iter().enumerate() {
            if !seen.insert(p.name.get_ref().as_str()) {
                self.report(
                    &p.name,
                    &format!("providers[{i}].name"),
                    "duplicate provider name",
                );
            }
        }
        let by_name: HashMap<&str, (usize, &Arc<Provider>)> = providers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), (i, p)))
            .collect();
        let known: Vec<&str> = raw
            .providers
            .iter()
            .map(|p| p.name.get_ref().as_str())
            .collect();

        let mut routes = Vec::new();
        let mut route_index = HashMap::default();
        for (i, r) in raw.routes.iter().enumerate() {
            if let Some(route) = self.route(i, r, &by_name, &known) {
                if route_index
                    .insert(route.alias.clone(), routes.len())
                    .is_some()
                {
                    self.report(
                        &r.model,
                        &format!("routes[{i}].model"),
                        "duplicate route alias",
                    );
                }
                routes.push(Arc::new(route));
            }
        }
        let keys = self.keys(&raw.keys, plan, &routes)?;
        let mut hashes = HashSet::new();
        for (i, k) in keys.iter().enumerate() {
            if !hashes.insert(k.sha256) {
                self.report_at(0, &format!("keys[{i}]"), "the same key is configured twice");
            }
        }
        let rollout = match &raw.rollout {
            Some(r) => Some(self.rollout(r)?),
            None => None,
        };
        let server = self.server(&raw.server, keys.is_empty())?;
        let mut tenants = Vec::with_capacity(raw.tenants.len());
        for (i, t) in raw.tenants.iter().enumerate() {
            let models = match &t.models {
                Some(list) => Some(self.models(list, &format!("tenants[{i}].models"), &routes)?),
                None => None,
            };
            tenants.push(TenantLimits {
                name: t.name.get_ref().clone(),
                rpm: t.rpm.as_ref().map(|v| *v.get_ref()),
                tpm: t.tpm.as_ref().map(|v| *v.get_ref()),
                max_concurrent: t.max_concurrent.as_ref().map(|v| *v.get_ref()),
                models,
            });
        }
        let cache = self.cache_store(&raw.cache)?;
        let state = self.state_store(&raw.state)?;
        let drill = self.drill(&raw.drill)?;
        let telemetry = self.telemetry(&raw.telemetry)?;
        if cache.backend == CacheBackend::Redis && state.redis().is_none() {
            let at = raw.cache.backend.as_ref()?;
            self.report(
                at,
                "cache.backend",
                "`redis` needs `[state] backend = \"redis\"` and its `redis_url`",
            );
            return None;
        }
        Some(Config {
            server,
            rollout,
            tenants,
            providers,
            routes,
            keys,
            cache,
            state,
            drill,
            telemetry,
            warnings: Vec::new(),
            route_index,
        })
    }

    /// A `models` list: each entry an alias or a glob. An entry that matches
    /// no route is a warning (routes may come in a later config), and so is
    /// an empty list, which allows nothing.
    fn models(
        &mut self,
        list: &Spanned<Vec<Str>>,
        key: &str,
        routes: &[Arc<Route>],
    ) -> Option<Vec<ModelPattern>> {
        if list.get_ref().is_empty() {
            self.warn(
                list,
                key,
                "an empty list allows no model: every request it applies to is refused (403)",
            );
        }
        let mut out = Vec::with_capacity(list.get_ref().len());
        let mut ok = true;
        for (j, entry) in list.get_ref().iter().enumerate() {
            let text = entry.get_ref().trim();
            if text.is_empty() {
                self.report(entry, &format!("{key}[{j}]"), "must not be empty");
                ok = false;
                continue;
            }
            let pattern = ModelPattern::new(text.to_owned());
            if !routes.iter().any(|r| pattern.matches(&r.alias)) {
                self.warn(
                    entry,
                    &format!("{key}[{j}]"),
                    &format!("`{text}` matches no route (yet): it allows nothing today"),
                );
            }
            out.push(pattern);
        }
        ok.then_some(out)
    }

    /// `server.trusted_proxies`: each entry a CIDR or an address.
    fn trusted_proxies(&mut self, list: Option<&Vec<Str>>) -> Option<TrustedProxies> {
        let mut nets = Vec::new();
        let mut ok = true;
        for (i, entry) in list.into_iter().flatten().enumerate() {
            match TrustedProxies::parse_entry(entry.get_ref()) {
                Some(net) => nets.push(net),
                None => {
                    self.report(
                        entry,
                        &format!("server.trusted_proxies[{i}]"),
                        &format!(
                            "`{}` is not an IP address or a CIDR network \
                             (for example 10.0.0.0/8, 127.0.0.1 or ::1)",
                            entry.get_ref()
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then(|| TrustedProxies::new(nets))
    }

    fn server(&mut self, raw: &RawServer, no_keys: bool) -> Option<Server> {
        let listen = match &raw.listen {
            Some(s) => self.socket_addr(s, "server.listen")?,
            None => DEFAULT_LISTEN.parse().ok()?,
        };
        let admin_listen = match &raw.admin_listen {
            Some(s) => Some(self.socket_addr(s, "server.admin_listen")?),
            None => None,
        };
        let explicit_open = raw.allow_unauthenticated.unwrap_or(false);
        if no_keys && !explicit_open && !listen.ip().is_loopback() {
            let at = raw.listen.as_ref().map_or(0, |s| s.span().start);
            self.report_at(
                at,
                "server.listen",
                &format!(
                    "no [[keys]] are configured and {listen} is not a loopback address; \
                     add [[keys]] or set `allow_unauthenticated = true` to run open on purpose"
                ),
            );
        }
        let max_body_bytes = match &raw.max_body_bytes {
            Some(n) if *n.get_ref() == 0 => {
                self.report(n, "server.max_body_bytes", "must be greater than 0");
                return None;
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
            None => usize::try_from(DEFAULT_MAX_BODY_BYTES).unwrap_or(usize::MAX),
        };
        let max_event_bytes = match &raw.max_event_bytes {
            Some(n) if *n.get_ref() < MIN_EVENT_BYTES => {
                self.report(
                    n,
                    "server.max_event_bytes",
                    &format!("must be at least {MIN_EVENT_BYTES} (1 KiB)"),
                );
                return None;
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
            None => usize::try_from(DEFAULT_MAX_EVENT_BYTES).unwrap_or(usize::MAX),
        };
        let max_concurrent_requests = match &raw.max_concurrent_requests {
            Some(n) if *n.get_ref() == 0 => {
                self.report(
                    n,
                    "server.max_concurrent_requests",
                    "must be greater than 0",
                );
                return None;
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
            None => DEFAULT_MAX_CONCURRENT_REQUESTS,
        };
        let queue_timeout = match &raw.queue_timeout {
            Some(s) => self.duration(s, "server.queue_timeout")?,
            None => DEFAULT_QUEUE_TIMEOUT,
        };
        let header_read_timeout = match &raw.header_read_timeout {
            Some(s) => self.duration(s, "server.header_read_timeout")?,
            None => DEFAULT_HEADER_READ_TIMEOUT,
        };
        let body_read_timeout = match &raw.body_read_timeout {
            Some(s) => self.duration(s, "server.body_read_timeout")?,
            None => DEFAULT_BODY_READ_TIMEOUT,
        };
        // Each is checked even if another failed, so all are reported.
        let max_connections = self.count(
            raw.max_connections.as_ref(),
            "server.max_connections",
            DEFAULT_MAX_CONNECTIONS,
        );
        let admin_max_connections = self.count(
            raw.admin_max_connections.as_ref(),
            "server.admin_max_connections",
            DEFAULT_ADMIN_MAX_CONNECTIONS,
        );
        let idle_timeout = self.duration_or(
            raw.idle_timeout.as_ref(),
            "server.idle_timeout",
            DEFAULT_IDLE_TIMEOUT,
        );
        let http2_keep_alive = self.duration_or(
            raw.http2_keep_alive.as_ref(),
            "server.http2_keep_alive",
            DEFAULT_HTTP2_KEEP_ALIVE,
        );
        let shutdown_timeout = self.duration_or(
            raw.shutdown_timeout.as_ref(),
            "server.shutdown_timeout",
            DEFAULT_SHUTDOWN_TIMEOUT,
        );
        let worker_threads = raw
            .worker_threads
            .as_ref()
            .map(|n| self.count(Some(n), "server.worker_threads", 1));
        let (max_connections, admin_max_connections) = (max_connections?, admin_max_connections?);
        let worker_threads = match worker_threads {
            Some(counted) => Some(counted?),
            None => None,
        };
        let trusted_proxies = self.trusted_proxies(raw.trusted_proxies.as_ref());
        let (idle_timeout, http2_keep_alive, shutdown_timeout) =
            (idle_timeout?, http2_keep_alive?, shutdown_timeout?);
        let trusted_proxies = trusted_proxies?;
        Some(Server {
            trusted_proxies,
            header_read_timeout,
            body_read_timeout,
            max_connections,
            admin_max_connections,
            idle_timeout,
            http2_keep_alive,
            shutdown_timeout,
            worker_threads,
            listen,
            admin_listen,
            open_access: no_keys,
            max_body_bytes,
            max_event_bytes,
            max_concurrent_requests,
            queue_timeout,
            auth_failures_per_minute: raw
                .auth_failures_per_minute
                .as_ref()
                .map_or(DEFAULT_AUTH_FAILURES_PER_MINUTE, |v| (*v.get_ref()).max(1)),
        })
    }

    fn provider(&mut self, i: usize, p: &RawProvider) -> Option<Provider> {
        let at = |field: &str| format!("providers[{i}].{field}");
        let name = p.name.get_ref().trim().to_owned();
        if name.is_empty() {
            self.report(&p.name, &at("name"), "must not be empty");
        }
        let kind = match p.kind.get_ref().as_str() {
            "openai" => Some(ProviderKind::OpenAi),
            "openai-compatible" => Some(ProviderKind::OpenAiCompatible),
            "anthropic" => Some(ProviderKind::Anthropic),
            "gemini" => Some(ProviderKind::Gemini),
            other => {
                self.report(
                    &p.kind,
                    &at("kind"),
                    &format!(
                        "unknown provider kind `{other}` (expected one of: {})",
                        ProviderKind::NAMES.join(", ")
                    ),
                );
                None
            }
        };
        let base_url = self
            .url(&p.base_url, &at("base_url"))
            .and_then(|u| self.base_url(u, &p.base_url, &at("base_url")));
        let status_page = match &p.status_page {
            Some(s) => Some(self.url(s, &at("status_page"))?),
            None => None,
        };
        let api_key = match &p.api_key {
            Some(s) => Some(self.api_key(s, &at("api_key"))?),
            None => None,
        };
        let status_poll = match &p.status_poll {
            Some(s) => self.duration(s, &at("status_poll"))?,
            None => DEFAULT_STATUS_POLL,
        };
        let connect_timeout = match &p.connect_timeout {
            Some(s) => self.duration(s, &at("connect_timeout"))?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let status_components = p.status_components.clone().unwrap_or_default();
        let status_page_format = match &p.status_page_format {
            Some(s) => self.status_format(s, &at("status_page_format"), &status_components)?,
            None => StatusFormat::Auto,
        };
        let status_webhook_secret = match &p.status_webhook_secret {
            Some(s) => Some(self.webhook_secret(s, &at("status_webhook_secret"))?),
            None => None,
        };
        let tls = self.provider_tls(i, p, &name);
        let proxy = match &p.proxy {
            Some(s) => {
                let text = self.expand(s, &at("proxy"))?;
                match ProxySetting::parse(&text) {
                    Ok(proxy) => proxy,
                    Err(e) => {
                        self.report(s, &at("proxy"), &format!("provider `{name}`: {e}"));
                        return None;
                    }
                }
            }
            None => ProxySetting::Environment,
        };
        Some(Provider {
            tls: tls?,
            proxy,
            name,
            kind: kind?,
            base_url: base_url?,
            api_key,
            status_page,
            status_components,
            status_poll,
            status_page_format,
            status_webhook_secret,
            connect_timeout,
            default_max_tokens: p
                .default_max_tokens
                .as_ref()
                .map_or(DEFAULT_MAX_TOKENS, |m| (*m.get_ref()).max(1)),
        })
    }

    /// `ca_file`, `client_cert` / `client_key` (both or neither) and
    /// `tls_verify`: the files are read here, each error naming the file
    /// and the provider; `tls_verify = false` is a warning at every load.
    fn provider_tls(&mut self, i: usize, p: &RawProvider, name: &str) -> Option<ProviderTls> {
        let at = |field: &str| format!("providers[{i}].{field}");
        let mut ok = true;
        let path = |this: &mut Self, value: &Str, key: &str| -> Option<std::path::PathBuf> {
            let text = this.expand(value, key)?;
            if text.trim().is_empty() {
                this.report(value, key, &format!("provider `{name}`: must name a file"));
                return None;
            }
            match tls::absolute(text.trim()) {
                Ok(p) => Some(p),
                Err(e) => {
                    this.report(value, key, &format!("provider `{name}`: {e}"));
                    None
                }
            }
        };
        let ca = match &p.ca_file {
            Some(s) => match path(self, s, &at("ca_file")).map(tls::ca_file) {
                Some(Ok(ca)) => Some(ca),
                Some(Err(e)) => {
                    self.report(s, &at("ca_file"), &format!("provider `{name}`: {e}"));
                    ok = false;
                    None
                }
                None => {
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let identity = match (&p.client_cert, &p.client_key) {
            (Some(cert), Some(key)) => {
                let files = (
                    path(self, cert, &at("client_cert")),
                    path(self, key, &at("client_key")),
                );
                match files {
                    (Some(c), Some(k)) => match tls::client_identity(c, k) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            self.report(
                                cert,
                                &at("client_cert"),
                                &format!("provider `{name}`: {e}"),
                            );
                            ok = false;
                            None
                        }
                    },
                    _ => {
                        ok = false;
                        None
                    }
                }
            }
            (Some(one), None) | (None, Some(one)) => {
                let (key, other) = match p.client_cert {
                    Some(_) => ("client_cert", "client_key"),
                    None => ("client_key", "client_cert"),
                };
                self.report(
                    one,
                    &at(key),
                    &format!(
                        "provider `{name}`: `{key}` needs `{other}` (mTLS takes both or neither)"
                    ),
                );
                ok = false;
                None
            }
            (None, None) => None,
        };
        let verify = p.tls_verify.as_ref().is_none_or(|v| *v.get_ref());
        if let Some(v) = p.tls_verify.as_ref().filter(|_| !verify) {
            self.warn(
                v,
                &at("tls_verify"),
                &format!(
                    "provider `{name}`: TLS certificate verification is OFF (`tls_verify = false`): \
                     anyone on the path to it can read and change its traffic, detour's API key included"
                ),
            );
            if let Some(s) = &p.ca_file {
                self.warn(
                    s,
                    &at("ca_file"),
                    &format!("provider `{name}`: has no effect with `tls_verify = false`"),
                );
            }
        }
        ok.then_some(ProviderTls {
            ca,
            identity,
            verify,
        })
    }

    fn route(
        &mut self,
        i: usize,
        r: &RawRoute,
        providers: &HashMap<&str, (usize, &Arc<Provider>)>,
        known: &[&str],
    ) -> Option<Route> {
        let alias = r.model.get_ref().trim().to_owned();
        if alias.is_empty() {
            self.report(&r.model, &format!("routes[{i}].model"), "must not be empty");
        }
        if r.targets.is_empty() {
            self.report(
                &r.model,
                &format!("routes[{i}].targets"),
                "a route needs at least one target",
            );
        }
        let mut targets = Vec::new();
        for (j, t) in r.targets.iter().enumerate() {
            let at = |field: &str| format!("routes[{i}].targets[{j}].{field}");
            let provider = providers.get(t.provider.get_ref().as_str());
            if provider.is_none() && !known.contains(&t.provider.get_ref().as_str()) {
                self.report(
                    &t.provider,
                    &at("provider"),
                    &format!(
                        "unknown provider `{}` (configured: {})",
                        t.provider.get_ref(),
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            if t.model.get_ref().trim().is_empty() {
                self.report(&t.model, &at("model"), "must not be empty");
            }
            let weight = t.weight.as_ref().map_or(1, |w| *w.get_ref());
            let priority = t
                .priority
                .as_ref()
                .map_or(u32::try_from(j).unwrap_or(u32::MAX), |p| *p.get_ref());
            if let (Some((index, provider)), false) =
                (provider, t.model.get_ref().trim().is_empty())
            {
                targets.push(Target {
                    provider: Arc::clone(provider),
                    provider_index: *index,
                    model: t.model.get_ref().clone(),
                    weight,
                    priority,
                    headers: http::HeaderValue::from_str(&provider.name)
                        .ok()
                        .zip(http::HeaderValue::from_str(t.model.get_ref()).ok()),
                });
            }
        }
        let defaults = Timeouts::default();
        let mut timeout = |field: &str, value: &Option<Str>, default: Duration| match value {
            Some(s) => self.duration(s, &format!("routes[{i}].timeouts.{field}")),
            None => Some(default),
        };
        let timeouts = Timeouts {
            first_byte: timeout("first_byte", &r.timeouts.first_byte, defaults.first_byte)?,
            idle: timeout("idle", &r.timeouts.idle, defaults.idle)?,
            total: timeout("total", &r.timeouts.total, defaults.total)?,
        };
        let retries = self.retries(i, &r.retries)?;
        let breaker = self.breaker(i, &r.breaker)?;
        let hedge_after = match &r.hedge_after {
            Some(s) if s.get_ref() == "p95" => Some(HedgeAfter::P95),
            Some(s) => Some(HedgeAfter::Fixed(
                self.duration(s, &format!("routes[{i}].hedge_after"))?,
            )),
            None => None,
        };
        let probe_hedge_after = match &r.probe_hedge_after {
            Some(s) => self.duration(s, &format!("routes[{i}].probe_hedge_after"))?,
            None => super::DEFAULT_PROBE_HEDGE_AFTER,
        };
        let cache = match &r.cache {
            Some(c) => Some(self.route_cache(i, c)?),
            None => None,
        };
        Some(Route {
            alias,
            targets,
            timeouts,
            retries,
            breaker,
            hedge_after,
            probe_hedge_after,
            cache,
            continue_streams: r.continue_streams,
        })
    }

    fn route_cache(&mut self, i: usize, c: &super::raw::RawRouteCache) -> Option<RouteCache> {
        let at = |f: &str| format!("routes[{i}].cache.{f}");
        let ttl = match &c.ttl {
            Some(s) => self.duration(s, &at("ttl"))?,
            None => DEFAULT_CACHE_TTL,
        };
        let max_entry_bytes = match &c.max_entry_bytes {
            Some(n) if *n.get_ref() == 0 => {
                self.report(n, &at("max_entry_bytes"), "must be greater than 0");
                return None;
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_CACHE_MAX_ENTRY_BYTES,
        };
        Some(RouteCache {
            ttl,
            max_entry_bytes: usize::try_from(max_entry_bytes).unwrap_or(usize::MAX),
        })
    }

    fn cache_store(&mut self, raw: &super::raw::RawCacheStore) -> Option<CacheStore> {
        let d = CacheStore::default();
        let backend = match &raw.backend {
            None => d.backend,
            Some(b) => match b.get_ref().as_str() {
                "memory" => CacheBackend::Memory,
                "redis" => CacheBackend::Redis,
                other => {
                    self.report(
                        b,
                        "cache.backend",
                        &format!(
                            "unknown cache backend `{other}` (expected one of: {})",
                            CacheBackend::NAMES.join(", ")
                        ),
                    );
                    return None;
                }
            },
        };
        let max_bytes = match &raw.max_bytes {
            Some(n) if *n.get_ref() == 0 => {
                self.report(n, "cache.max_bytes", "must be greater than 0");
                return None;
            }
            Some(n) => *n.get_ref(),
            None => d.max_bytes,
        };
        Some(CacheStore { backend, max_bytes })
    }

    fn telemetry(&mut self, raw: &super::raw::RawTelemetry) -> Option<Telemetry> {
        let Some(raw_endpoint) = &raw.otlp_endpoint else {
            let stray = [
                ("telemetry.service_name", raw.service_name.as_ref()),
                ("telemetry.batch_delay", raw.batch_delay.as_ref()),
            ];
            let mut ok = true;
            for (key, value) in stray {
                if let Some(v) = value {
                    self.report(v, key, "only used with `otlp_endpoint`");
                    ok = false;
                }
            }
            if let Some(v) = &raw.otlp_headers {
                self.report(
                    v,
                    "telemetry.otlp_headers",
                    "only used with `otlp_endpoint`",
                );
                ok = false;
            }
            if let Some(v) = &raw.sample_ratio {
                self.report(
                    v,
                    "telemetry.sample_ratio",
                    "only used with `otlp_endpoint`",
                );
                ok = false;
            }
            return ok.then_some(Telemetry::default());
        };
        let endpoint = self.url(raw_endpoint, "telemetry.otlp_endpoint")?;
        let mut headers = Vec::new();
        let mut ok = true;
        for (name, value) in raw.otlp_headers.iter().flat_map(|h| h.get_ref()) {
            let key = format!("telemetry.otlp_headers.{name}");
            let Some(text) = self.expand(value, &key) else {
                ok = false;
                continue;
            };
            let valid = http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && http::HeaderValue::from_str(&text).is_ok();
            if !valid {
                // Never echo the value: it may be a credential.
                self.report(value, &key, "not a valid HTTP header name and value");
                ok = false;
                continue;
            }
            headers.push((name.clone(), Secret::new(text)));
        }
        let service_name = match &raw.service_name {
            Some(s) if s.get_ref().trim().is_empty() => {
                self.report(s, "telemetry.service_name", "must not be empty");
                return None;
            }
            Some(s) => s.get_ref().clone(),
            None => DEFAULT_SERVICE_NAME.to_owned(),
        };
        let sample_ratio = match &raw.sample_ratio {
            Some(r) if !(0.0..=1.0).contains(r.get_ref()) => {
                self.report(r, "telemetry.sample_ratio", "must be between 0.0 and 1.0");
                return None;
            }
            Some(r) => *r.get_ref(),
            None => 1.0,
        };
        let batch_delay = self.duration_or(
            raw.batch_delay.as_ref(),
            "telemetry.batch_delay",
            DEFAULT_BATCH_DELAY,
        )?;
        ok.then_some(Telemetry {
            otlp: Some(Otlp {
                endpoint,
                headers,
                service_name,
                sample_ratio,
                batch_delay,
            }),
        })
    }

    fn state_store(&mut self, raw: &super::raw::RawState) -> Option<StateStore> {
        let redis = match raw.backend.as_ref().map(|b| (b, b.get_ref().as_str())) {
            None | Some((_, "memory")) => false,
            Some((_, "redis")) => true,
            Some((b, other)) => {
                self.report(
                    b,
                    "state.backend",
                    &format!("unknown state backend `{other}` (expected one of: memory, redis)"),
                );
                return None;
            }
        };
        if !redis {
            let stray = [
                ("state.redis_url", &raw.redis_url),
                ("state.key_prefix", &raw.key_prefix),
                ("state.timeout", &raw.timeout),
                ("state.on_redis_failure", &raw.on_redis_failure),
            ];
            let mut ok = true;
            for (key, value) in stray {
                if let Some(v) = value {
                    self.report(v, key, "only used with `backend = \"redis\"`");
                    ok = false;
                }
            }
            return ok.then_some(StateStore::Memory);
        }
        let Some(raw_url) = &raw.redis_url else {
            let at = raw.backend.as_ref()?;
            self.report(
                at,
                "state.redis_url",
                "`backend = \"redis\"` needs a `redis_url`",
            );
            return None;
        };
        let text = self.expand(raw_url, "state.redis_url")?;
        match Url::parse(&text) {
            Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.host().is_some() => {}
            Ok(u) => {
                let scheme = u.scheme().to_owned();
                self.report(
                    raw_url,
                    "state.redis_url",
                    &format!("`{scheme}` URLs are not supported; use redis:// or rediss://"),
                );
                return None;
            }
            // Never echo the text: it may hold a password.
            Err(e) => {
                self.report(raw_url, "state.redis_url", &format!("not a valid URL: {e}"));
                return None;
            }
        }
        let key_prefix = match &raw.key_prefix {
            Some(p)
                if p.get_ref()
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()) =>
            {
                self.report(
                    p,
                    "state.key_prefix",
                    "may not contain spaces or control characters",
                );
                return None;
            }
            Some(p) => p.get_ref().clone(),
            None => DEFAULT_KEY_PREFIX.to_owned(),
        };
        let timeout =
            self.duration_or(raw.timeout.as_ref(), "state.timeout", DEFAULT_REDIS_TIMEOUT)?;
        if timeout > Duration::from_secs(1) {
            let at = raw.timeout.as_ref()?;
            self.report(
                at,
                "state.timeout",
                "at most 1s: every limited request may wait this long for Redis",
            );
            return None;
        }
        let on_failure = match raw
            .on_redis_failure
            .as_ref()
            .map(|v| (v, v.get_ref().as_str()))
        {
            None => OnRedisFailure::default(),
            Some((_, "local")) => OnRedisFailure::Local,
            Some((_, "open")) => OnRedisFailure::Open,
            Some((_, "closed")) => OnRedisFailure::Closed,
            Some((v, other)) => {
                self.report(
                    v,
                    "state.on_redis_failure",
                    &format!(
                        "unknown value `{other}` (expected one of: {})",
                        OnRedisFailure::NAMES.join(", ")
                    ),
                );
                return None;
            }
        };
        Some(StateStore::Redis(RedisSettings {
            url: Secret::new(text),
            key_prefix,
            timeout,
            on_failure,
        }))
    }

    /// `[drill]`: a rate within 0..=1, ratios of at least 1.
    fn drill(&mut self, raw: &super::raw::RawDrill) -> Option<DrillThresholds> {
        let d = DrillThresholds::default();
        let max_error_rate = match &raw.max_error_rate {
            Some(r) if !(0.0..=1.0).contains(r.get_ref()) => {
                self.report(r, "drill.max_error_rate", "must be between 0.0 and 1.0");
                return None;
            }
            Some(r) => *r.get_ref(),
            None => d.max_error_rate,
        };
        let mut ratio = |value: &Option<Spanned<f64>>, key: &str, default: f64| match value {
            Some(x) if x.get_ref().is_nan() || *x.get_ref() < 1.0 => {
                self.report(x, key, "must be at least 1.0");
                None
            }
            Some(x) => Some(*x.get_ref()),
            None => Some(default),
        };
        let max_amplification = ratio(
            &raw.max_amplification,
            "drill.max_amplification",
            d.max_amplification,
        );
        let max_flood_p99_ratio = ratio(
            &raw.max_flood_p99_ratio,
            "drill.max_flood_p99_ratio",
            d.max_flood_p99_ratio,
        );
        let max_failover = self.duration_or(
            raw.max_failover.as_ref(),
            "drill.max_failover",
            d.max_failover,
        );
        Some(DrillThresholds {
            max_error_rate,
            max_failover: max_failover?,
            max_amplification: max_amplification?,
            max_flood_p99_ratio: max_flood_p99_ratio?,
        })
    }

    fn rollout(&mut self, r: &super::raw::RawRollout) -> Option<RolloutPolicy> {
        let d = RolloutPolicy::default();
        let canary_percent = match &r.canary_percent {
            Some(p) if !(0.0..=100.0).contains(p.get_ref()) => {
                self.report(p, "rollout.canary_percent", "must be between 0 and 100");
                return None;
            }
            Some(p) => *p.get_ref(),
            None => d.canary_percent,
        };
        let bake = match &r.bake {
            Some(b) => self.duration(b, "rollout.bake")?,
            None => d.bake,
        };
        let ratio = match &r.max_latency_ratio {
            Some(x) if *x.get_ref() < 1.0 => {
                self.report(x, "rollout.max_latency_ratio", "must be at least 1.0");
                return None;
            }
            Some(x) => *x.get_ref(),
            None => d.max_latency_ratio,
        };
        Some(RolloutPolicy {
            canary_percent,
            bake,
            max_error_rate_increase: r
                .max_error_rate_increase
                .as_ref()
                .map_or(d.max_error_rate_increase, |x| x.get_ref().clamp(0.0, 1.0)),
            max_latency_ratio: ratio,
            min_requests: r
                .min_requests
                .as_ref()
                .map_or(d.min_requests, |m| *m.get_ref()),
        })
    }

    fn retries(&mut self, i: usize, r: &super::raw::RawRetries) -> Option<RetryPolicy> {
        let d = RetryPolicy::default();
        let at = |f: &str| format!("routes[{i}].retries.{f}");
        let budget = match &r.budget {
            Some(b) if !(0.0..=10.0).contains(b.get_ref()) => {
                self.report(
                    b,
                    &at("budget"),
                    "must be between 0.0 and 10.0 (a share of requests)",
                );
                return None;
            }
            Some(b) => *b.get_ref(),
            None => d.budget,
        };
        let max_attempts = match &r.max_attempts {
            Some(m) if *m.get_ref() == 0 => {
                self.report(m, &at("max_attempts"), "must be at least 1");
                return None;
            }
            Some(m) => *m.get_ref(),
            None => d.max_attempts,
        };
        let backoff = match &r.backoff {
            // No backoff is a choice: the next target is tried at once.
            Some(s) if parse_duration(s.get_ref()) == Some(Duration::ZERO) => Duration::ZERO,
            Some(s) => self.duration(s, &at("backoff"))?,
            None => d.backoff,
        };
        Some(RetryPolicy {
            budget,
            min_per_sec: r
                .min_per_sec
                .as_ref()
                .map_or(d.min_per_sec, |m| *m.get_ref()),
            max_attempts,
            backoff,
        })
    }

    fn breaker(&mut self, i: usize, b: &super::raw::RawBreaker) -> Option<BreakerPolicy> {
        let d = BreakerPolicy::default();
        let at = |f: &str| format!("routes[{i}].breaker.{f}");
        let failure_rate = match &b.failure_rate {
            Some(r) if !(0.0..=1.0).contains(r.get_ref()) || *r.get_ref() == 0.0 => {
                self.report(r, &at("failure_rate"), "must be in (0.0, 1.0]");
                return None;
            }
            Some(r) => *r.get_ref(),
            None => d.failure_rate,
        };
        let mut dur = |f: &str, v: &Option<Str>, default: Duration| match v {
            Some(s) => self.duration(s, &at(f)),
            None => Some(default),
        };
        let window = dur("window", &b.window, d.window)?;
        let open_for = dur("open_for", &b.open_for, d.open_for)?;
        let max_cool_down = dur("max_cool_down", &b.max_cool_down, d.max_cool_down)?;
        // "0s" turns slow start off, so zero is allowed here.
        let slow_start = match &b.slow_start {
            Some(s) if parse_duration(s.get_ref()) == Some(Duration::ZERO) => Duration::ZERO,
            _ => dur("slow_start", &b.slow_start, d.slow_start)?,
        };
        Some(BreakerPolicy {
            consecutive_failures: b
                .consecutive_failures
                .as_ref()
                .map_or(d.consecutive_failures, |c| (*c.get_ref()).max(1)),
            failure_rate,
            min_requests: b
                .min_requests
                .as_ref()
                .map_or(d.min_requests, |m| *m.get_ref()),
            window,
            open_for,
            slow_start,
            max_cool_down,
        })
    }

    fn key(&mut self, i: usize, k: &RawKey, routes: &[Arc<Route>]) -> Option<ApiKey> {
        let at = |field: &str| format!("keys[{i}].{field}");
        let sha256 = match (&k.key, &k.key_sha256) {
            (Some(plain), None) => {
                let plain = self.expand(plain, &at("key"))?;
                if plain.is_empty() {
                    self.report(k.key.as_ref()?, &at("key"), "must not be empty");
                    return None;
                }
                Sha256::digest(plain.as_bytes()).into()
            }
            (None, Some(hash)) => {
                let text = self.expand(hash, &at("key_sha256"))?;
                let mut out = [0u8; 32];
                if hex::decode_to_slice(text.trim(), &mut out).is_err() {
                    self.report(
                        hash,
                        &at("key_sha256"),
                        "must be 64 hexadecimal characters (a SHA-256 digest)",
                    );
                    return None;
                }
                out
            }
            (Some(plain), Some(_)) => {
                self.report(
                    plain,
                    &at("key"),
                    "give either `key` or `key_sha256`, not both",
                );
                return None;
            }
            (None, None) => {
                self.report(
                    &k.tenant,
                    &format!("keys[{i}]"),
                    "needs `key` or `key_sha256`",
                );
                return None;
            }
        };
        let tenant = k.tenant.get_ref().trim().to_owned();
        if tenant.is_empty() {
            self.report(&k.tenant, &at("tenant"), "must not be empty");
        }
        let tier = match &k.tier {
            None => Tier::Standard,
            Some(t) => match t.get_ref().as_str() {
                "critical" => Tier::Critical,
                "standard" => Tier::Standard,
                "sheddable" => Tier::Sheddable,
                other => {
                    self.report(
                        t,
                        &at("tier"),
                        &format!(
                            "unknown tier `{other}` (expected one of: {})",
                            Tier::NAMES.join(", ")
                        ),
                    );
                    return None;
                }
            },
        };
        let name = k
            .name
            .as_ref()
            .map_or_else(|| format!("key-{i}"), |n| n.get_ref().clone());
        let models = match &k.models {
            Some(list) => Some(self.models(list, &at("models"), routes)?),
            None => None,
        };
        Some(ApiKey {
            models,
            name,
            sha256,
            tenant,
            tier,
            rpm: k.rpm.as_ref().map(|v| (*v.get_ref()).max(1)),
            tpm: k.tpm.as_ref().map(|v| (*v.get_ref()).max(1)),
            max_concurrent: k.max_concurrent.as_ref().map(|v| (*v.get_ref()).max(1)),
            max_streams: k.max_streams.as_ref().map(|v| (*v.get_ref()).max(1)),
        })
    }

    fn expand(&mut self, value: &Str, key: &str) -> Option<String> {
        match expand(value.get_ref(), self.lookup) {
            Ok(v) => Some(v),
            Err(e) => {
                self.report(value, key, &e.to_string());
                None
            }
        }
    }

    fn url(&mut self, value: &Str, key: &str) -> Option<Url> {
        let text = self.expand(value, key)?;
        match Url::parse(&text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
            Ok(u) => {
                self.report(
                    value,
                    key,
                    &format!("`{}` URLs are not supported; use http or https", u.scheme()),
                );
                None
            }
            Err(e) => {
                self.report(value, key, &format!("not a valid URL: {e}"));
                None
            }
        }
    }

    /// A provider's `base_url`: paths are joined onto it and its query is
    /// kept; a fragment would be dropped from every request, so it is refused.
    fn base_url(&mut self, url: Url, value: &Str, key: &str) -> Option<Url> {
        if url.fragment().is_some() {
            self.report(
                value,
                key,
                "must not have a fragment (`#...`): it is never sent to the provider; \
                 put parameters in the query (`?name=value`) instead",
            );
            return None;
        }
        Some(url)
    }

    /// An `api_key` goes into a request header (`authorization`,
    /// `x-api-key`...): refuse here what building that header would refuse,
    /// without printing the key.
    fn api_key(&mut self, value: &Str, key: &str) -> Option<Secret> {
        let text = self.expand(value, key)?;
        if http::HeaderValue::from_str(&text).is_err() {
            self.report(
                value,
                key,
                "contains characters not allowed in an HTTP header \
                 (control characters such as a newline)",
            );
            return None;
        }
        Some(Secret::new(text))
    }

    /// `status_page_format`: one of [`StatusFormat::NAMES`]. Google Cloud's
    /// feed covers every Google Cloud product, so it needs the products that
    /// matter named: any incident anywhere would otherwise take the provider
    /// out.
    fn status_format(
        &mut self,
        value: &Str,
        key: &str,
        components: &[String],
    ) -> Option<StatusFormat> {
        let Some(format) = StatusFormat::parse(value.get_ref()) else {
            self.report(
                value,
                key,
                &format!(
                    "unknown status page format `{}` (expected one of: {})",
                    value.get_ref(),
                    StatusFormat::NAMES.join(", ")
                ),
            );
            return None;
        };
        if format == StatusFormat::GoogleCloud && components.is_empty() {
            self.report(
                value,
                key,
                "`google_cloud` needs `status_components`: the products to watch \
                 (for example [\"Vertex Gemini API\"]); the feed lists every Google Cloud product",
            );
            return None;
        }
        Some(format)
    }

    /// `status_webhook_secret`: expanded, and long enough not to be guessed.
    fn webhook_secret(&mut self, value: &Str, key: &str) -> Option<Secret> {
        let text = self.expand(value, key)?;
        if text.len() < MIN_WEBHOOK_SECRET {
            self.report(
                value,
                key,
                &format!("must be at least {MIN_WEBHOOK_SECRET} characters (it is the only thing that authenticates a push)"),
            );
            return None;
        }
        Some(Secret::new(text))
    }

    fn socket_addr(&mut self, value: &Str, key: &str) -> Option<SocketAddr> {
        let text = self.expand(value, key)?;
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.report(
                    value,
                    key,
                    &format!("`{text}` is not an IP:port address (for example 127.0.0.1:8080)"),
                );
                None
            }
        }
    }

    /// A count that must be at least 1, or `default` when not given.
    fn count(&mut self, value: Option<&Spanned<u32>>, key: &str, default: usize) -> Option<usize> {
        match value {
            Some(n) if *n.get_ref() == 0 => {
                self.report(n, key, "must be greater than 0");
                None
            }
            Some(n) => Some(usize::try_from(*n.get_ref()).unwrap_or(usize::MAX)),
            None => Some(default),
        }
    }

    /// A duration, or `default` when not given.
    fn duration_or(
        &mut self,
        value: Option<&Str>,
        key: &str,
        default: Duration,
    ) -> Option<Duration> {
        match value {
            Some(s) => self.duration(s, key),
            None => Some(default),
        }
    }

    fn duration(&mut self, value: &Str, key: &str) -> Option<Duration> {
        match parse_duration(value.get_ref()) {
            Some(d) if !d.is_zero() => Some(d),
            _ => {
                self.report(
                    value,
                    key,
                    &format!(
                        "`{}` is not a duration (for example 250ms, 30s, 5m)",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn report<T>(&mut self, at: &Spanned<T>, key: &str, message: &str) {
        self.report_at(at.span().start, key, message);
    }

    fn warn<T>(&mut self, at: &Spanned<T>, key: &str, message: &str) {
        let (line, column) = line_col(self.text, self.offsets.in_file(at.span().start));
        self.warnings.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key: key.to_owned(),
            message: message.to_owned(),
        });
    }

    fn report_at(&mut self, offset: usize, key: &str, message: &str) {
        let (line, column) = line_col(self.text, self.offsets.in_file(offset));
        self.diags.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key: key.to_owned(),
            message: message.to_owned(),
        });
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

#[derive(Debug, Clone)]
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(path: &serde_ignored::Path) -> Vec<Segment> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    match path {
        Path::Seq { index, .. } => out.push(Segment::Index(*index)),
        Path::Map { key, .. } => out.push(Segment::Key(key.clone())),
        _ => {}
    }
    out
}

fn render_path(path: &[Segment]) -> String {
    let mut out = String::new();
    for s in path {
        match s {
            Segment::Key(k) if out.is_empty() => out.push_str(k),
            Segment::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The byte offset of the key at `path` and its printable name.
fn locate(root: &DeTable, path: &[Segment]) -> (usize, String) {
    let mut offset = 0;
    let mut table = Some(root);
    let mut array: Option<&toml::de::DeArray> = None;
    for seg in path {
        let value: Option<&Spanned<DeValue>> = match (seg, table, array) {
            (Segment::Key(k), Some(t), _) => {
                t.iter()
                    .find(|(key, _)| key.get_ref() == k)
                    .map(|(key, v)| {
                        offset = key.span().start;
                        v
                    })
            }
            (Segment::Index(i), _, Some(a)) => a.get(*i),
            _ => None,
        };
        let Some(value) = value else { break };
        if matches!(seg, Segment::Index(_)) {
            offset = value.span().start;
        }
        (table, array) = match value.get_ref() {
            DeValue::Table(t) => (Some(t), None),
            DeValue::Array(a) => (None, Some(a)),
            _ => (None, None),
        };
    }
    (offset, render_path(path))
}

/// The deepest key whose key or value contains `offset`, as a printable path.
/// Searches every table: a `[section]` header's span does not cover its body.
fn key_at(root: &DeTable, offset: usize) -> String {
    let mut path = Vec::new();
    if find_in_table(root, offset, &mut path) {
        render_path(&path)
    } else {
        "(document)".to_owned()
    }
}

fn find_in_table(table: &DeTable, offset: usize, path: &mut Vec<Segment>) -> bool {
    table.iter().any(|(k, v)| {
        path.push(Segment::Key(k.get_ref().to_string()));
        let hit = find_in_value(v, offset, path)
            || k.span().contains(&offset)
            || v.span().contains(&offset)
            || v.span().end == offset;
        if !hit {
            path.pop();
        }
        hit
    })
}

fn find_in_value(value: &Spanned<DeValue>, offset: usize, path: &mut Vec<Segment>) -> bool {
    match value.get_ref() {
        DeValue::Table(t) => find_in_table(t, offset, path),
        DeValue::Array(a) => a.iter().enumerate().any(|(i, v)| {
            path.push(Segment::Index(i));
            let hit = find_in_value(v, offset, path) || v.span().contains(&offset);
            if !hit {
                path.pop();
            }
            hit
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, Vec<Diagnostic>> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        Loader {
            text,
            file: "t.toml",
            lookup: &lookup,
            diags: Vec::new(),
            warnings: Vec::new(),
            fall_back: false,
            offsets: Offsets::default(),
        }
        .load()
        .map_err(|e| match e {
            ConfigError::Invalid(d) => d,
            ConfigError::Read { .. } => unreachable!(),
        })
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"

[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY}"

[[routes]]
model = "fast"
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
timeouts = { first_byte = "10s" }

[[keys]]
key = "${TEAM_KEY}"
tenant = "acme"
tier = "critical"
"#;

    #[test]
    fn a_good_config_loads() {
        let c = load(GOOD, &[("OPENAI_API_KEY", "sk-1"), ("TEAM_KEY", "dk-1")]).unwrap();
        let route = c.route("fast").unwrap();
        assert_eq!(route.targets[0].model, "gpt-4o-mini");
        assert_eq!(route.timeouts.first_byte, Duration::from_secs(10));
        assert_eq!(route.timeouts.idle, Timeouts::default().idle);
        assert_eq!(c.providers[0].api_key.as_ref().unwrap().expose(), "sk-1");
        assert_eq!(c.keys[0].tier, Tier::Critical);
        assert!(!c.server.open_access);
    }

    #[test]
    fn drill_thresholds_have_defaults_and_are_checked() {
        let base = "[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n";
        let c = load(base, &[]).unwrap();
        assert_eq!(c.drill, DrillThresholds::default());
        let c = load(
            &format!("{base}[drill]\nmax_error_rate = 0.05\nmax_failover = \"500ms\"\nmax_amplification = 1.5\nmax_flood_p99_ratio = 3.0\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.drill.max_error_rate, 0.05);
        assert_eq!(c.drill.max_failover, Duration::from_millis(500));
        assert_eq!(c.drill.max_amplification, 1.5);
        assert_eq!(c.drill.max_flood_p99_ratio, 3.0);
        let errors = load(
            &format!("{base}[drill]\nmax_error_rate = 2.0\nmax_amplification = 0.5\nmax_failover = \"soon\"\nmax_errors = 1\n"),
            &[],
        )
        .unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for key in [
            "drill.max_error_rate: must be between",
            "drill.max_errors: unknown key",
        ] {
            assert!(text.iter().any(|e| e.contains(key)), "{key}: {text:#?}");
        }
        let errors = load(
            &format!("{base}[drill]\nmax_amplification = 0.5\nmax_failover = \"soon\"\n"),
            &[],
        )
        .unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for key in [
            "drill.max_amplification: must be at least 1.0",
            "drill.max_failover: `soon` is not a duration",
        ] {
            assert!(text.iter().any(|e| e.contains(key)), "{key}: {text:#?}");
        }
    }

    #[test]
    fn status_page_formats_and_webhook_secrets_are_checked() {
        let with = |extra: &str| {
            GOOD.replace(
                "api_key = \"${OPENAI_API_KEY}\"\n",
                &format!("api_key = \"${{OPENAI_API_KEY}}\"\n{extra}\n"),
            )
        };
        let env = [
            ("OPENAI_API_KEY", "sk-1"),
            ("TEAM_KEY", "dk-1"),
            ("HOOK", "a-long-enough-secret"),
        ];
        let c = load(
            &with("status_page_format = \"incident_io\"\nstatus_webhook_secret = \"${HOOK}\""),
            &env,
        )
        .unwrap();
        assert_eq!(c.providers[0].status_page_format, StatusFormat::IncidentIo);
        assert_eq!(
            c.providers[0]
                .status_webhook_secret
                .as_ref()
                .map(Secret::expose),
            Some("a-long-enough-secret")
        );
        assert_eq!(
            load(GOOD, &env).unwrap().providers[0].status_page_format,
            StatusFormat::Auto
        );
        for (extra, key, words) in [
            (
                "status_page_format = \"html\"",
                "status_page_format",
                "unknown status page format `html`",
            ),
            (
                "status_page_format = \"google_cloud\"",
                "status_page_format",
                "needs `status_components`",
            ),
            (
                "status_webhook_secret = \"short\"",
                "status_webhook_secret",
                "at least 16 characters",
            ),
            (
                "status_webhook_secret = \"${NOPE}\"",
                "status_webhook_secret",
                "NOPE",
            ),
        ] {
            let errors = load(&with(extra), &env).unwrap_err();
            assert_eq!(errors.len(), 1, "{extra}: {errors:?}");
            assert_eq!(errors[0].key, format!("providers[0].{key}"));
            assert!(
                errors[0].message.contains(words),
                "{extra}: {}",
                errors[0].message
            );
            assert_eq!(errors[0].line, 10, "{extra}");
        }
        let c = load(
            &with("status_page_format = \"google_cloud\"\nstatus_components = [\"Vertex Gemini API\"]"),
            &env,
        )
        .unwrap();
        assert_eq!(c.providers[0].status_page_format, StatusFormat::GoogleCloud);
    }

    #[test]
    fn every_error_is_reported_with_line_and_key() {
        let text = r#"[server]
listen = "127.0.0.1:0"
colour = "blue"

[[providers]]
name = "openai"
kind = "openai"
base_url = "not a url"
api_key = "${MISSING_KEY}"
bse_url = "x"

[[routes]]
model = "fast"
targets = [{ provider = "opena", model = "gpt-4o-mini" }]
"#;
        let diags = load(text, &[]).unwrap_err();
        let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
        let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
        assert!(has("t.toml:3:1: server.colour: unknown key"), "{lines:#?}");
        assert!(
            has("t.toml:10:1: providers[0].bse_url: unknown key"),
            "{lines:#?}"
        );
        assert!(
            has("t.toml:8:12: providers[0].base_url: not a valid URL"),
            "{lines:#?}"
        );
        assert!(
            has("t.toml:9:11: providers[0].api_key: environment variable `MISSING_KEY` is not set"),
            "{lines:#?}"
        );
        assert!(has("t.toml:14:25: routes[0].targets[0].provider: unknown provider `opena` (configured: openai)"), "{lines:#?}");
        assert_eq!(diags.len(), 5, "{lines:#?}");
    }

    #[test]
    fn type_errors_and_syntax_errors_name_a_line() {
        let diags = load("[server]\nmax_body_bytes = \"big\"\n", &[]).unwrap_err();
        assert_eq!(
            (diags[0].line, diags[0].key.as_str()),
            (2, "server.max_body_bytes"),
            "{diags:?}"
        );
        let diags = load("[server\nlisten = 1\n", &[]).unwrap_err();
        assert_eq!(diags[0].line, 1, "{diags:?}");
        let diags = load("[[providers]]\nname = \"a\"\n", &[]).unwrap_err();
        assert!(diags[0].message.contains("kind"), "{diags:?}");
    }

    #[test]
    fn hostile_provider_limits_have_defaults_and_are_checked() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.server.max_event_bytes, 8 * 1024 * 1024);
        let c = load("[server]\nmax_event_bytes = 65536\n", &[]).unwrap();
        assert_eq!(c.server.max_event_bytes, 65536);
        let diags = load("[server]\nmax_event_bytes = 10\n", &[]).unwrap_err();
        assert_eq!(
            (diags[0].line, diags[0].key.as_str()),
            (2, "server.max_event_bytes"),
            "{diags:?}"
        );

        let route = |breaker: &str| {
            format!(
                "[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
                 [[routes]]\nmodel = \"m\"\ntargets = [{{ provider = \"p\", model = \"x\" }}]\n{breaker}"
            )
        };
        let c = load(&route(""), &[]).unwrap();
        assert_eq!(c.routes[0].breaker.max_cool_down, Duration::from_secs(60));
        let c = load(&route("breaker = { max_cool_down = \"5s\" }\n"), &[]).unwrap();
        assert_eq!(c.routes[0].breaker.max_cool_down, Duration::from_secs(5));
        let diags = load(&route("breaker = { max_cool_down = \"forever\" }\n"), &[]).unwrap_err();
        assert_eq!(diags[0].key, "routes[0].breaker.max_cool_down", "{diags:?}");
        assert_eq!(diags[0].line, 8, "{diags:?}");
    }

    #[test]
    fn base_urls_keep_their_query_and_refuse_a_fragment() {
        let provider = |base_url: &str, key: &str| {
            format!(
                "[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"{base_url}\"\napi_key = \"{key}\"\n"
            )
        };
        let c = load(&provider("https://h.example/v1?api-version=1", "sk-1"), &[]).unwrap();
        assert_eq!(c.providers[0].base_url.query(), Some("api-version=1"));
        let diags = load(&provider("https://h.example/v1#x", "sk-1"), &[]).unwrap_err();
        assert_eq!(
            (diags[0].line, diags[0].key.as_str()),
            (4, "providers[0].base_url"),
            "{diags:?}"
        );
        assert!(diags[0].message.contains("fragment"), "{diags:?}");
        for bad in ["sk-\\nx", "sk-\\u007f", "sk-\\u0000"] {
            let diags = load(&provider("https://h.example/v1", bad), &[]).unwrap_err();
            assert_eq!(
                (diags[0].line, diags[0].key.as_str()),
                (5, "providers[0].api_key"),
                "{bad}: {diags:?}"
            );
            assert!(diags[0].message.contains("header"), "{diags:?}");
            assert!(!diags[0].message.contains("sk-"), "{diags:?}");
        }
    }

    #[test]
    fn connection_limits_have_defaults_and_refuse_zero() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            c.server.admin_max_connections,
            DEFAULT_ADMIN_MAX_CONNECTIONS
        );
        assert_eq!(c.server.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.server.http2_keep_alive, DEFAULT_HTTP2_KEEP_ALIVE);
        assert_eq!(c.server.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
        let text = "[server]\nmax_connections = 0\nadmin_max_connections = 0\n\
                    idle_timeout = \"soon\"\nshutdown_timeout = \"0s\"\n";
        let diags = load(text, &[]).unwrap_err();
        let keys: Vec<(usize, &str)> = diags.iter().map(|d| (d.line, d.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (2, "server.max_connections"),
                (3, "server.admin_max_connections"),
                (4, "server.idle_timeout"),
                (5, "server.shutdown_timeout"),
            ],
            "{diags:?}"
        );
    }

    #[test]
    fn open_access_needs_loopback_or_consent() {
        let open = "[server]\nlisten = \"0.0.0.0:8080\"\n";
        let diags = load(open, &[]).unwrap_err();
        assert!(diags[0].message.contains("allow_unauthenticated"));
        let c = load(
            "[server]\nlisten = \"0.0.0.0:8080\"\nallow_unauthenticated = true\n",
            &[],
        )
        .unwrap();
        assert!(c.server.open_access);
        assert!(load("", &[]).unwrap().server.open_access);
    }

    #[test]
    fn keys_by_hash_and_bad_hashes() {
        let hash = hex::encode(Sha256::digest(b"dk-1"));
        let c = load(
            &format!("[[keys]]\nkey_sha256 = \"{hash}\"\ntenant = \"t\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.keys[0].sha256, <[u8; 32]>::from(Sha256::digest(b"dk-1")));
        let diags = load(
            "[[keys]]\nkey_sha256 = \"abc\"\ntenant = \"t\"\ntier = \"gold\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(diags[0].key, "keys[0].key_sha256");
    }

    #[test]
    fn the_response_cache_is_opt_in_per_route() {
        let text = r#"
[[providers]]
name = "p"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"

[[routes]]
model = "cached"
targets = [{ provider = "p", model = "m" }]
cache = { ttl = "90s", max_entry_bytes = 4096 }

[[routes]]
model = "defaults"
targets = [{ provider = "p", model = "m" }]
cache = {}

[[routes]]
model = "plain"
targets = [{ provider = "p", model = "m" }]
"#;
        let c = load(text, &[]).unwrap();
        let cache = |alias: &str| c.route(alias).unwrap().cache;
        assert_eq!(
            cache("cached"),
            Some(RouteCache {
                ttl: Duration::from_secs(90),
                max_entry_bytes: 4096
            })
        );
        assert_eq!(cache("defaults").unwrap().ttl, DEFAULT_CACHE_TTL);
        assert_eq!(cache("plain"), None);
        assert_eq!(c.cache, CacheStore::default());

        let bad = format!(
            "[cache]\nbackend = \"redis\"\n{}",
            text.replace("\"90s\"", "\"soon\"")
        );
        let diags = load(&bad, &[]).unwrap_err();
        let keys: Vec<&str> = diags.iter().map(|d| d.key.as_str()).collect();
        assert!(keys.contains(&"cache.backend"), "{diags:?}");
        assert!(keys.contains(&"routes[0].cache.ttl"), "{diags:?}");
        let diags = load(
            &text.replace("max_entry_bytes = 4096", "max_entry_byte = 1"),
            &[],
        )
        .unwrap_err();
        assert_eq!(diags[0].key, "routes[0].cache.max_entry_byte", "{diags:?}");
    }

    #[test]
    fn a_zero_backoff_means_none() {
        let route = |retries: &str| {
            format!(
                "[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\
                 [[routes]]\nmodel = \"m\"\ntargets = [{{ provider = \"p\", model = \"x\" }}]\n{retries}"
            )
        };
        let c = load(&route("retries = { backoff = \"0ms\" }\n"), &[]).unwrap();
        assert_eq!(c.routes[0].retries.backoff, Duration::ZERO);
        let diags = load(&route("retries = { backoff = \"soon\" }\n"), &[]).unwrap_err();
        assert_eq!(diags[0].key, "routes[0].retries.backoff", "{diags:?}");
    }

    #[test]
    fn models_lists_warn_about_what_matches_no_route() {
        let text = r#"
[[providers]]
name = "p"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"

[[routes]]
model = "fast"
targets = [{ provider = "p", model = "m" }]

[[tenants]]
name = "acme"
models = ["fast", "claude-*"]

[[keys]]
key = "k1"
tenant = "acme"
models = []

[[keys]]
key = "k2"
tenant = "acme"
models = ["f?st", "later"]
"#;
        let c = load(text, &[]).unwrap();
        let models = |m: &Option<Vec<ModelPattern>>| -> Option<Vec<String>> {
            m.as_ref()
                .map(|l| l.iter().map(|p| p.as_str().to_owned()).collect())
        };
        assert_eq!(
            models(&c.tenants[0].models),
            Some(vec!["fast".to_owned(), "claude-*".to_owned()])
        );
        assert_eq!(models(&c.keys[0].models), Some(vec![]));
        let warned: Vec<(usize, &str)> = c
            .warnings
            .iter()
            .map(|w| (w.line, w.key.as_str()))
            .collect();
        assert_eq!(
            warned,
            [
                (18, "keys[0].models"),
                (23, "keys[1].models[1]"),
                (13, "tenants[0].models[1]"),
            ],
            "{:#?}",
            c.warnings
        );
        assert!(c.warnings[0].message.contains("allows no model"));
        assert!(c.warnings[1].message.contains("`later` matches no route"));

        let diags = load(&text.replace("\"later\"", "\" \""), &[]).unwrap_err();
        assert_eq!(diags[0].key, "keys[1].models[1]", "{diags:?}");
        assert!(load(&text.replace("[\"fast\", ", "[1, "), &[]).is_err());
    }

    #[test]
    fn trusted_proxies_are_networks_or_addresses() {
        let c = load("", &[]).unwrap();
        assert!(c.server.trusted_proxies.is_empty());
        let c = load(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\", \"::1\"]\n",
            &[],
        )
        .unwrap();
        let t = &c.server.trusted_proxies;
        assert!(t.contains("10.2.3.4".parse().unwrap()));
        assert!(t.contains("::1".parse().unwrap()));
        assert!(!t.contains("127.0.0.2".parse().unwrap()));
        let diags = load(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"proxy.internal\", \"10.0.0.0/40\"]\n",
            &[],
        )
        .unwrap_err();
        let keys: Vec<(&str, usize)> = diags.iter().map(|d| (d.key.as_str(), d.line)).collect();
        assert_eq!(
            keys,
            [
                ("server.trusted_proxies[1]", 2),
                ("server.trusted_proxies[2]", 2)
            ],
            "{diags:?}"
        );
        assert!(diags[0].message.contains("`proxy.internal`"), "{diags:?}");
    }

    #[test]
    fn state_on_redis_is_checked_and_its_url_is_a_secret() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.state, StateStore::Memory);
        let text = "[state]\nbackend = \"redis\"\nredis_url = \"${REDIS_URL}\"\n\
                    key_prefix = \"prod:\"\ntimeout = \"5ms\"\non_redis_failure = \"closed\"\n\
                    [cache]\nbackend = \"redis\"\n";
        let url = "rediss://:hunter2@redis.internal:6380/2";
        let c = load(text, &[("REDIS_URL", url)]).unwrap();
        let r = c.state.redis().unwrap();
        assert_eq!(r.url.expose(), url);
        assert_eq!(r.key_prefix, "prod:");
        assert_eq!(r.timeout, Duration::from_millis(5));
        assert_eq!(r.on_failure, OnRedisFailure::Closed);
        assert_eq!(c.cache.backend, CacheBackend::Redis);
        assert!(!r.masked_url().contains("hunter2"), "{}", r.masked_url());
        assert!(!format!("{c:?}").contains("hunter2"));
        let d = load(
            "[state]\nbackend = \"redis\"\nredis_url = \"redis://h\"\n",
            &[],
        )
        .unwrap();
        let d = d.state.redis().unwrap();
        assert_eq!(
            (d.key_prefix.as_str(), d.timeout, d.on_failure),
            (
                DEFAULT_KEY_PREFIX,
                DEFAULT_REDIS_TIMEOUT,
                OnRedisFailure::Local
            )
        );

        let keys = |text: &str| -> Vec<String> {
            let diags = load(text, &[]).unwrap_err();
            let all = format!("{diags:?}");
            assert!(!all.contains("hunter2"), "{all}");
            diags.into_iter().map(|d| d.key).collect()
        };
        assert_eq!(keys("[state]\nbackend = \"etcd\"\n"), ["state.backend"]);
        assert_eq!(keys("[state]\nbackend = \"redis\"\n"), ["state.redis_url"]);
        assert_eq!(
            keys("[state]\nbackend = \"redis\"\nredis_url = \"http://:hunter2@h\"\n"),
            ["state.redis_url"]
        );
        assert_eq!(
            keys("[state]\nredis_url = \"redis://:hunter2@h\"\n"),
            ["state.redis_url"],
            "a URL without the backend would be silently unused"
        );
        let redis = "[state]\nbackend = \"redis\"\nredis_url = \"redis://h\"\n";
        assert_eq!(
            keys(&format!("{redis}timeout = \"5s\"\n")),
            ["state.timeout"]
        );
        assert_eq!(
            keys(&format!("{redis}on_redis_failure = \"maybe\"\n")),
            ["state.on_redis_failure"]
        );
        assert_eq!(keys("[cache]\nbackend = \"redis\"\n"), ["cache.backend"]);
    }
}
