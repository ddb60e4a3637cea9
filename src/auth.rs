//! Gateway API keys: who is calling, and from where.
//!
//! Keys are held only as SHA-256 digests; a presented key is hashed and looked
//! up. The key comes from `Authorization: Bearer <key>` or, when no Bearer
//! authorization is sent, `x-api-key`. The client's address, for per-IP
//! limits, is the TCP peer's, or the one a trusted proxy forwarded
//! ([`client_ip`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::access::{Access, Compiler};
use crate::config::{Config, Tier, TrustedProxies};

/// The caller a request was authenticated as. Cheap to clone: the tenant
/// name and the access table are shared.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's digest (`None` when running open).
    pub key_digest: Option<[u8; 32]>,
    pub tenant: Arc<str>,
    pub tier: Tier,
    /// The models this key may call (`models` of the key or its tenant).
    pub access: Access,
}

/// The configured keys, by the SHA-256 digest of each.
///
/// Kept compact, as a config may hold 100,000 keys: per key, its digest and
/// an [`Entry`] (16 bytes); the caller is put together on each lookup
/// (clones of two `Arc`s, as cloning a stored `Caller` costs).
///
/// The map's hasher is foldhash, not SipHash: its keys are SHA-256 digests,
/// uniform whatever the client sends, and the table holds only the
/// operator's keys, so no client can build colliding entries; a lookup of
/// any presented key probes the same short runs a digest of the
/// operator's would.
#[derive(Debug)]
pub struct KeyTable {
    by_hash: HashMap<[u8; 32], Entry, foldhash::fast::RandomState>,
    /// The tenant names, each once.
    tenants: Vec<Arc<str>>,
    /// The caller of every request when running open.
    open: Option<Caller>,
}

/// One key's caller, without its digest (the map's key).
#[derive(Debug)]
struct Entry {
    /// The models this key may call (shared by the keys with the same list).
    access: Access,
    /// Index into [`KeyTable::tenants`].
    tenant: u32,
    tier: Tier,
}

impl KeyTable {
    /// The keys of `config`, each with its model access compiled against
    /// the config's routes.
    pub fn new(config: &Config) -> Self {
        let mut access = Compiler::new(config);
        let mut names: HashMap<&str, u32> = HashMap::new();
        let mut tenants: Vec<Arc<str>> = Vec::new();
        let mut by_hash = HashMap::with_capacity_and_hasher(config.keys.len(), Default::default());
        for k in &config.keys {
            let tenant = *names.entry(k.tenant.as_str()).or_insert_with(|| {
                tenants.push(Arc::from(k.tenant.as_str()));
                u32::try_from(tenants.len() - 1).unwrap_or(u32::MAX)
            });
            let entry = Entry {
                access: access.for_key(k),
                tenant,
                tier: k.tier,
            };
            by_hash.insert(k.sha256, entry);
        }
        tenants.shrink_to_fit();
        let open = config.server.open_access.then(|| Caller {
            key_digest: None,
            tenant: Arc::from("anonymous"),
            tier: Tier::Standard,
            access: Access::all(),
        });
        Self {
            by_hash,
            tenants,
            open,
        }
    }

    /// The caller for these request headers, or `None` if they are not allowed in.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Caller> {
        if let Some(open) = &self.open {
            return Some(open.clone());
        }
        let key = presented_key(headers)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let entry = self.by_hash.get(&digest)?;
        Some(Caller {
            key_digest: Some(digest),
            tenant: Arc::clone(self.tenants.get(entry.tenant as usize)?),
            tier: entry.tier,
            access: entry.access.clone(),
        })
    }
}

// Built once: a name given as `&str` is parsed on every lookup.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The gateway key the request presents: a Bearer `Authorization`, else
/// `x-api-key`. An `Authorization` of another scheme (a proxy's Basic
/// credentials) carries no gateway key and does not hide `x-api-key`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    bearer.or_else(|| headers.get(X_API_KEY)?.to_str().ok().map(str::trim))
}

/// The client's address for per-IP limits. From a peer in `trusted`, the
/// right-most `x-forwarded-for` address that is not itself trusted (each
/// proxy appends the address it received from, so everything left of the
/// first untrusted one was written by the client and proves nothing); if
/// every address is trusted, the left-most. From any other peer, or when the
/// header is missing or an entry on that walk does not parse, the peer.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let mut last = None;
    // Several header lines are one list, in order.
    for line in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(line) = line.to_str() else {
            return peer;
        };
        for entry in line.rsplit(',') {
            let Some(ip) = forwarded_ip(entry) else {
                return peer;
            };
            if !trusted.contains(ip) {
                return ip;
            }
            last = Some(ip);
        }
    }
    last.unwrap_or(peer)
}

/// One `x-forwarded-for` entry: an address, or an address with a port
/// (`1.2.3.4:5678`, `[::1]:5678`), which some proxies write.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> KeyTable {
        let text = "[[keys]]\nkey = \"dk-good\"\ntenant = \"acme\"\ntier = \"critical\"\n";
        KeyTable::new(&crate::config::load_str(text, "t.toml").unwrap())
    }

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, http::HeaderValue::from_static(value));
        h
    }

    #[test]
    fn bearer_and_x_api_key() {
        let t = table();
        assert_eq!(
            &*t.authenticate(&headers("authorization", "Bearer dk-good"))
                .unwrap()
                .tenant,
            "acme"
        );
        assert!(t
            .authenticate(&headers("authorization", "bearer dk-good"))
            .is_some());
        assert!(t.authenticate(&headers("x-api-key", "dk-good")).is_some());
        assert!(t
            .authenticate(&headers("authorization", "Bearer dk-bad"))
            .is_none());
        assert!(t
            .authenticate(&headers("authorization", "Basic dk-good"))
            .is_none());
        assert!(t.authenticate(&HeaderMap::new()).is_none());
    }

    #[test]
    fn a_basic_authorization_does_not_hide_x_api_key() {
        let t = table();
        let mut h = headers("authorization", "Basic dXNlcjpwYXNz");
        h.insert("x-api-key", http::HeaderValue::from_static("dk-good"));
        assert!(t.authenticate(&h).is_some());
        // A Bearer key is the key presented, right or wrong.
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer dk-bad"),
        );
        assert!(t.authenticate(&h).is_none());
    }

    #[test]
    fn open_access_lets_everyone_in() {
        let t = KeyTable::new(&crate::config::load_str("", "t.toml").unwrap());
        assert!(t.authenticate(&HeaderMap::new()).is_some());
    }

    #[test]
    fn the_forwarded_client_is_believed_from_trusted_peers_only() {
        let trusted = TrustedProxies::new(
            ["10.0.0.0/8", "127.0.0.1"]
                .iter()
                .map(|t| TrustedProxies::parse_entry(t).unwrap())
                .collect(),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", http::HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let proxy = ip("10.0.0.2");
        #[rustfmt::skip]
        let table: &[(&str, &[&str], &str)] = &[
            // From an untrusted peer the header is ignored.
            ("203.0.113.9", &["198.51.100.1"], "203.0.113.9"),
            ("10.0.0.2", &[], "10.0.0.2"),
            ("10.0.0.2", &["198.51.100.1"], "198.51.100.1"),
            // The client's own claims are left of what proxies appended.
            ("10.0.0.2", &["6.6.6.6, 198.51.100.1, 10.1.1.1"], "198.51.100.1"),
            ("10.0.0.2", &["6.6.6.6", "198.51.100.1, 10.1.1.1"], "198.51.100.1"),
            // Every hop trusted: the left-most.
            ("10.0.0.2", &["10.3.3.3, 127.0.0.1"], "10.3.3.3"),
            // Malformed on the walk: the peer.
            ("10.0.0.2", &["198.51.100.1, unknown"], "10.0.0.2"),
            ("10.0.0.2", &[""], "10.0.0.2"),
            // ...but not left of the client's address.
            ("10.0.0.2", &["garbage, 198.51.100.1"], "198.51.100.1"),
            ("10.0.0.2", &["198.51.100.1:4711"], "198.51.100.1"),
            ("10.0.0.2", &["[2001:db8::1]:4711"], "2001:db8::1"),
            ("10.0.0.2", &["::ffff:198.51.100.1"], "198.51.100.1"),
            ("127.0.0.1", &["198.51.100.1"], "198.51.100.1"),
        ];
        for (peer, values, want) in table {
            assert_eq!(
                client_ip(ip(peer), &xff(values), &trusted),
                ip(want),
                "{peer} {values:?}"
            );
        }
        let mut bad = HeaderMap::new();
        bad.insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"198.51.100.1\xff").unwrap(),
        );
        assert_eq!(client_ip(proxy, &bad, &trusted), proxy);
        assert_eq!(
            client_ip(proxy, &xff(&["198.51.100.1"]), &TrustedProxies::default()),
            proxy,
            "nothing trusted: the peer"
        );
    }
}
