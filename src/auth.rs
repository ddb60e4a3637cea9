//! Gateway API keys: who is calling.
//!
//! Keys are held only as SHA-256 digests; a presented key is hashed and looked
//! up. The key comes from `Authorization: Bearer <key>` or, when no Bearer
//! authorization is sent, `x-api-key`.

use std::collections::HashMap;

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::{ApiKey, Tier};

/// The caller a request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's digest (`None` when running open).
    pub key_digest: Option<[u8; 32]>,
    pub tenant: String,
    pub tier: Tier,
}

impl Caller {
    fn anonymous() -> Self {
        Self {
            key_digest: None,
            tenant: "anonymous".to_owned(),
            tier: Tier::Standard,
        }
    }
}

#[derive(Debug)]
pub struct KeyTable {
    by_hash: HashMap<[u8; 32], Caller>,
    open_access: bool,
}

impl KeyTable {
    pub fn new(keys: &[ApiKey], open_access: bool) -> Self {
        let by_hash = keys
            .iter()
            .map(|k| {
                let caller = Caller {
                    key_digest: Some(k.sha256),
                    tenant: k.tenant.clone(),
                    tier: k.tier,
                };
                (k.sha256, caller)
            })
            .collect();
        Self {
            by_hash,
            open_access,
        }
    }

    /// The caller for these request headers, or `None` if they are not allowed in.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Caller> {
        if self.open_access {
            return Some(Caller::anonymous());
        }
        let key = presented_key(headers)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.by_hash.get(&digest).cloned()
    }
}

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
    bearer.or_else(|| headers.get("x-api-key")?.to_str().ok().map(str::trim))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> KeyTable {
        let key = ApiKey {
            name: "k".into(),
            sha256: Sha256::digest(b"dk-good").into(),
            tenant: "acme".into(),
            tier: Tier::Critical,
            rpm: None,
            tpm: None,
            max_concurrent: None,
            max_streams: None,
        };
        KeyTable::new(&[key], false)
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
            t.authenticate(&headers("authorization", "Bearer dk-good"))
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
        let t = KeyTable::new(&[], true);
        assert!(t.authenticate(&HeaderMap::new()).is_some());
    }
}
