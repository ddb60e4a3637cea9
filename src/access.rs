//! Per-key model access: which route aliases a caller may call.
//!
//! `[[keys]]` and `[[tenants]]` may list `models` (aliases, or globs of `*`
//! and `?`); a key's effective list is its own, else its tenant's, else
//! there is none and every route is allowed. Lists are compiled once per
//! config against its routes ([`Compiler`]): a request then costs one
//! look-up of its alias's route position (which routing does anyway) and an
//! index into the key's table. Only an alias that names no route is matched
//! against the patterns, to tell a model the key may not call (403) from one
//! it may call that does not exist (404), without revealing which routes
//! exist to a key that may not call them.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{ApiKey, Config, ModelPattern};

/// What one caller may call. Cheap to clone (one `Arc`).
#[derive(Debug, Clone, Default)]
pub struct Access(Option<Arc<Allowed>>);

#[derive(Debug)]
struct Allowed {
    /// Parallel to the config's routes: may this route be called.
    routes: Box<[bool]>,
    /// The list as written, for aliases that name no route.
    patterns: Box<[ModelPattern]>,
}

impl Access {
    /// Every route (no `models` list applies).
    pub fn all() -> Self {
        Self(None)
    }

    /// The routes of `config` that `patterns` allow.
    pub fn compile(patterns: &[ModelPattern], config: &Config) -> Self {
        let routes = config
            .routes
            .iter()
            .map(|r| patterns.iter().any(|p| p.matches(&r.alias)))
            .collect();
        Self(Some(Arc::new(Allowed {
            routes,
            patterns: patterns.into(),
        })))
    }

    /// Whether a `models` list applies at all.
    pub fn is_restricted(&self) -> bool {
        self.0.is_some()
    }

    /// May the caller call `alias`? `position` is the alias's route in the
    /// config this access was compiled for ([`Config::route_position`]).
    pub fn allows(&self, position: Option<usize>, alias: &str) -> bool {
        let Some(allowed) = &self.0 else {
            return true;
        };
        match position {
            Some(i) => allowed.routes.get(i).copied().unwrap_or(false),
            None => allowed.patterns.iter().any(|p| p.matches(alias)),
        }
    }

    /// May the caller call the route at `position` (model listings)?
    pub fn allows_route(&self, position: usize) -> bool {
        match &self.0 {
            None => true,
            Some(allowed) => allowed.routes.get(position).copied().unwrap_or(false),
        }
    }

    /// The aliases of `config`'s routes the caller may call, in config order
    /// (what `/v1/models` lists and a 404 offers).
    pub fn callable<'c>(&'c self, config: &'c Config) -> impl Iterator<Item = &'c str> + 'c {
        config
            .aliases()
            .enumerate()
            .filter(|(i, _)| self.allows_route(*i))
            .map(|(_, alias)| alias)
    }
}

/// Compiles the access of every key of one config; keys that share a list
/// (those of one tenant, mostly) share one compiled table.
pub struct Compiler<'a> {
    config: &'a Config,
    tenants: HashMap<&'a str, &'a [ModelPattern]>,
    compiled: HashMap<&'a [ModelPattern], Access>,
}

impl<'a> Compiler<'a> {
    pub fn new(config: &'a Config) -> Self {
        // As the limits do, a tenant named twice is its last entry.
        let tenants = config
            .tenants
            .iter()
            .filter_map(|t| Some((t.name.as_str(), t.models.as_deref()?)))
            .collect();
        Self {
            config,
            tenants,
            compiled: HashMap::new(),
        }
    }

    /// The key's own list, else its tenant's, else every route.
    pub fn for_key(&mut self, key: &'a ApiKey) -> Access {
        let list = key
            .models
            .as_deref()
            .or_else(|| self.tenants.get(key.tenant.as_str()).copied());
        match list {
            None => Access::all(),
            Some(list) => {
                let config = self.config;
                self.compiled
                    .entry(list)
                    .or_insert_with(|| Access::compile(list, config))
                    .clone()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let routes: String = ["fast", "smart", "claude-3-haiku", "claude-3-opus"]
            .iter()
            .map(|m| format!("[[routes]]\nmodel = \"{m}\"\ntargets = [{{ provider = \"p\", model = \"x\" }}]\n"))
            .collect();
        let text = format!(
            "[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n{routes}{text}"
        );
        crate::config::load_str(&text, "t.toml").unwrap()
    }

    fn allowed(c: &Config, access: &Access) -> Vec<String> {
        c.aliases()
            .filter(|a| access.allows(c.route_position(a), a))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_key_list_overrides_its_tenant_and_no_list_allows_all() {
        let c = config(
            "[[tenants]]\nname = \"acme\"\nmodels = [\"claude-*\"]\n\
             [[keys]]\nkey = \"k1\"\ntenant = \"acme\"\n\
             [[keys]]\nkey = \"k2\"\ntenant = \"acme\"\nmodels = [\"fast\"]\n\
             [[keys]]\nkey = \"k3\"\ntenant = \"other\"\n\
             [[keys]]\nkey = \"k4\"\ntenant = \"acme\"\nmodels = []\n",
        );
        let mut compiler = Compiler::new(&c);
        let access: Vec<Access> = c.keys.iter().map(|k| compiler.for_key(k)).collect();
        assert_eq!(allowed(&c, &access[0]), ["claude-3-haiku", "claude-3-opus"]);
        assert_eq!(allowed(&c, &access[1]), ["fast"]);
        assert!(!access[2].is_restricted());
        assert_eq!(allowed(&c, &access[2]).len(), 4);
        assert!(allowed(&c, &access[3]).is_empty());
        assert!(access[3].is_restricted());
        // Aliases that name no route are matched against the list.
        assert!(access[0].allows(None, "claude-4"));
        assert!(!access[0].allows(None, "gpt-9"));
        assert!(access[2].allows(None, "anything"));
        assert!(access[0].allows_route(2) && !access[0].allows_route(0));
    }

    #[test]
    fn keys_with_one_list_share_one_table() {
        let c = config(
            "[[tenants]]\nname = \"acme\"\nmodels = [\"fast\"]\n\
             [[keys]]\nkey = \"k1\"\ntenant = \"acme\"\n\
             [[keys]]\nkey = \"k2\"\ntenant = \"acme\"\n",
        );
        let mut compiler = Compiler::new(&c);
        let (a, b) = (compiler.for_key(&c.keys[0]), compiler.for_key(&c.keys[1]));
        assert!(Arc::ptr_eq(a.0.as_ref().unwrap(), b.0.as_ref().unwrap()));
    }
}
