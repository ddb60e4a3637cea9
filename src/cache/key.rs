//! The cache key: which requests are "the same request".
//!
//! A key is SHA-256 over, in order and each length-prefixed (so no two field
//! lists hash alike): a version tag, the tenant, the client format, the
//! endpoint, the `stream` flag, and the normalised body.
//!
//! Normalisation (pure, no I/O):
//! - the body is parsed as JSON and written back canonically: object keys
//!   sorted, no whitespace, strings re-escaped by one writer (so `"\u0041"`
//!   and `"A"` are the same string, as they are to the provider);
//! - top-level fields that do not change the answer are dropped:
//!   [`IGNORED_FIELDS`] (`user`, `metadata`: who asked, not what was asked);
//! - everything else stays, `stream` and `stream_options` included: a stream
//!   is replayed as the bytes of a stream, and `include_usage` changes them;
//! - numbers are kept as parsed. `1` and `1.0` stay different keys (a miss,
//!   never a wrong hit); a body with a number too large for an `f64` to hold
//!   exactly (|x| ≥ 2^53, non-integer text) is not cached at all, since two
//!   different numbers could parse to the same value.
//!
//! Erring towards a miss is the rule: two requests share a key only if the
//! provider cannot tell them apart.

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::protocol::chat::{ClientFormat, Endpoint};

/// Top-level request fields left out of the key.
pub const IGNORED_FIELDS: &[&str] = &["user", "metadata"];

/// Bumped when the key's recipe changes, so old shared entries cannot match.
const VERSION: &[u8] = b"detour-cache-key-v1";

/// Largest magnitude an `f64` holds every integer of.
const EXACT_F64: f64 = 9_007_199_254_740_992.0; // 2^53

/// A request's identity in the cache: SHA-256 of tenant, format, endpoint,
/// stream flag and normalised body. The same value is the entry's
/// `request_hash`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; 32]);

impl Key {
    /// The key of a request, or `None` when its body cannot be normalised
    /// (not JSON, or a number that may not survive parsing): such a request
    /// is not cached.
    pub fn of(
        tenant: &str,
        format: ClientFormat,
        endpoint: Endpoint,
        stream: bool,
        body: &[u8],
    ) -> Option<Self> {
        let canonical = normalise(body)?;
        let mut h = Sha256::new();
        for field in [
            VERSION,
            tenant.as_bytes(),
            format.as_str().as_bytes(),
            endpoint.as_str().as_bytes(),
            if stream { b"stream" } else { b"whole" },
            &canonical,
        ] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field);
        }
        Some(Self(h.finalize().into()))
    }

    /// A key from its digest (backends that read keys back).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell keys apart in logs and test output.
        write!(f, "Key(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// The canonical form of a JSON request body, without [`IGNORED_FIELDS`];
/// `None` if it cannot be normalised.
pub fn normalise(body: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    if let Value::Object(map) = &mut value {
        for field in IGNORED_FIELDS {
            map.remove(*field);
        }
    }
    let mut out = Vec::with_capacity(body.len());
    write_canonical(&value, &mut out)?;
    Some(out)
}

/// Writes `v` with sorted object keys and no whitespace. Sorting here, not
/// relying on the map's order, keeps the key stable whatever features of
/// `serde_json` another crate turns on.
fn write_canonical(v: &Value, out: &mut Vec<u8>) -> Option<()> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            if n.as_u64().is_none() && n.as_i64().is_none() {
                let f = n.as_f64()?;
                if !f.is_finite() || f.abs() >= EXACT_F64 {
                    return None;
                }
            }
            out.extend_from_slice(n.to_string().as_bytes());
        }
        Value::String(s) => serde_json::to_writer(&mut *out, s).ok()?,
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).ok()?;
                out.push(b':');
                write_canonical(item, out)?;
            }
            out.push(b'}');
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(body: &str) -> Option<String> {
        normalise(body.as_bytes()).map(|b| String::from_utf8(b).unwrap())
    }

    fn key(tenant: &str, body: &str) -> Option<Key> {
        Key::of(
            tenant,
            ClientFormat::OpenAi,
            Endpoint::ChatCompletions,
            false,
            body.as_bytes(),
        )
    }

    #[test]
    fn order_whitespace_and_escapes_do_not_matter() {
        assert_eq!(
            canonical(r#" { "b": [1, {"y": 2, "x": "\u0041"}], "a": null } "#).unwrap(),
            r#"{"a":null,"b":[1,{"x":"A","y":2}]}"#
        );
        assert_eq!(
            key("t", r#"{"model":"m","messages":[]}"#),
            key("t", r#"{"messages": [], "model": "m"}"#)
        );
    }

    #[test]
    fn who_asked_is_not_part_of_what_was_asked() {
        assert_eq!(
            key(
                "t",
                r#"{"model":"m","user":"u-1","metadata":{"user_id":"x"}}"#
            ),
            key("t", r#"{"model":"m"}"#)
        );
        // Only at the top level: a message's fields are the prompt.
        assert_ne!(
            key(
                "t",
                r#"{"model":"m","messages":[{"role":"user","user":"a"}]}"#
            ),
            key("t", r#"{"model":"m","messages":[{"role":"user"}]}"#)
        );
    }

    #[test]
    fn anything_that_changes_the_answer_changes_the_key() {
        let base = r#"{"model":"m","temperature":0.2}"#;
        for other in [
            r#"{"model":"n","temperature":0.2}"#,
            r#"{"model":"m","temperature":0.3}"#,
            r#"{"model":"m","temperature":0.2,"stream":true}"#,
            r#"{"model":"m","temperature":0.2,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"m","temperature":0.2,"n":2}"#,
        ] {
            assert_ne!(key("t", base), key("t", other), "{other}");
        }
        assert_ne!(key("t", base), key("u", base), "the tenant is in the key");
        let b = base.as_bytes();
        let of = |format, endpoint, stream| Key::of("t", format, endpoint, stream, b);
        let plain = of(ClientFormat::OpenAi, Endpoint::ChatCompletions, false);
        assert_ne!(
            plain,
            of(ClientFormat::Anthropic, Endpoint::ChatCompletions, false)
        );
        assert_ne!(plain, of(ClientFormat::OpenAi, Endpoint::Embeddings, false));
        assert_ne!(
            plain,
            of(ClientFormat::OpenAi, Endpoint::ChatCompletions, true)
        );
    }

    #[test]
    fn numbers_that_may_not_survive_parsing_are_not_cached() {
        assert!(canonical(r#"{"seed": 18446744073709551616}"#).is_none());
        assert!(canonical(r#"{"seed": 1e300}"#).is_none());
        assert!(canonical(r#"{"seed": 18446744073709551615}"#).is_some());
        assert!(canonical(r#"{"seed": -9223372036854775808}"#).is_some());
        assert!(canonical(r#"{"t": 0.7}"#).is_some());
        assert_ne!(canonical(r#"{"t": 1}"#), canonical(r#"{"t": 1.0}"#));
        assert!(canonical("not json").is_none());
    }

    #[test]
    fn keys_print_as_hex() {
        let k = Key::from_bytes([0xab; 32]);
        assert_eq!(k.to_string(), "ab".repeat(32));
        assert_eq!(format!("{k:?}"), "Key(abababababab…)");
    }
}
