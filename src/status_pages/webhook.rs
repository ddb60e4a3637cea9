//! Status pages that push: `POST /admin/status-webhook/<provider>` on the
//! admin listener takes Statuspage's and incident.io's webhooks, so an
//! incident steers traffic within a second of being posted instead of at
//! the next poll. Polling stays the reconciler: a push says what changed for
//! some components, the next poll reads them all again.
//!
//! Authentication, by the provider's `status_webhook_secret` (never the
//! admin token):
//!
//! - incident.io signs (Svix): `webhook-id`, `webhook-timestamp` and
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
//!   keyed by the secret (a `whsec_` secret's base64 part decoded, as Svix
//!   does). The timestamp must be within [`TOLERANCE`] of now (replays).
//! - Statuspage signs nothing: the webhook URL carries the secret,
//!   `?secret=…`, compared in constant time. It is the only thing that URL
//!   accepts: the admin token is never read from a URL.
//!
//! Payloads:
//!
//! | sender | body | what it says |
//! |---|---|---|
//! | Statuspage | `{"page": {"status_indicator"}, "component_update": {"new_status"}, "component": {"id", "name", "status"}}` | one component's new status; the page's indicator |
//! | Statuspage | `{"page": {…}, "incident": {"status", "impact", "components": [{"id", "name", "status"}], "incident_updates": [{"affected_components": [{"code", "name", "new_status"}]}]}}` | the incident's components' statuses |
//! | incident.io | `{"event_type": "…", "<event_type>": {"name", "status", "current_worst_impact", "affected_components" / "component_impacts": [{"id" / "component_id", "name", "status" / "current_status" / "component_status"}]}}` | the incident's components' statuses; all operational once it is `resolved` |

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::HeaderMap;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{component_state, statuspage::indicator_state, watched, Reading};
use crate::config::Secret;
use crate::health::PageState;

/// How far a signed push's timestamp may be from now.
pub const TOLERANCE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Unreadable(String),
}

/// Checks that a push comes from the page: a valid Svix signature when its
/// headers are present, else `?secret=` in `query`.
pub fn authenticate(
    secret: &Secret,
    headers: &HeaderMap,
    query: Option<&str>,
    body: &[u8],
    now: SystemTime,
) -> Result<(), WebhookError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(signatures) = header("webhook-signature") {
        let (Some(id), Some(timestamp)) = (header("webhook-id"), header("webhook-timestamp"))
        else {
            return Err(WebhookError::Unauthorized(
                "a signed push needs webhook-id and webhook-timestamp",
            ));
        };
        let sent = timestamp
            .trim()
            .parse::<u64>()
            .map_err(|_| WebhookError::Unauthorized("webhook-timestamp is not a number"))?;
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(sent);
        let skew = now
            .duration_since(sent)
            .or_else(|_| sent.duration_since(now))
            .unwrap_or(Duration::MAX);
        if skew > TOLERANCE {
            return Err(WebhookError::Unauthorized(
                "webhook-timestamp is too far from now",
            ));
        }
        return verify_signature(secret, id, timestamp.trim(), body, signatures);
    }
    let presented = query
        .into_iter()
        .flat_map(|q| url::form_urlencoded::parse(q.as_bytes()))
        .find(|(name, _)| name == "secret")
        .map(|(_, value)| value.into_owned())
        .ok_or(WebhookError::Unauthorized(
            "missing the webhook secret (?secret=, or a signature)",
        ))?;
    // Digests of equal length, compared in constant time.
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(secret.expose().as_bytes());
    if bool::from(a.ct_eq(&b)) {
        Ok(())
    } else {
        Err(WebhookError::Unauthorized("wrong webhook secret"))
    }
}

/// The HMAC key of a secret: a Svix `whsec_` secret's base64 part, decoded;
/// any other secret's bytes.
fn signing_key(secret: &Secret) -> Vec<u8> {
    let text = secret.expose();
    text.strip_prefix("whsec_")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

/// `signatures`: space-separated `v1,<base64>`; one valid is enough.
fn verify_signature(
    secret: &Secret,
    id: &str,
    timestamp: &str,
    body: &[u8],
    signatures: &str,
) -> Result<(), WebhookError> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &signing_key(secret));
    let mut signed = Vec::with_capacity(id.len() + timestamp.len() + body.len() + 2);
    signed.extend_from_slice(id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    let valid = signatures
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .any(|tag| ring::hmac::verify(&key, &signed, &tag).is_ok());
    if valid {
        Ok(())
    } else {
        Err(WebhookError::Unauthorized("bad webhook-signature"))
    }
}

/// The reading a push gives for the watched `components` (the whole page
/// when none is): `None` when it says nothing about them.
pub fn read(body: &[u8], components: &[String]) -> Result<Option<Reading>, WebhookError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| WebhookError::Unreadable(format!("the push is not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(WebhookError::Unreadable(
            "the push is not a JSON object".into(),
        ));
    };
    if object.contains_key("component_update") || object.contains_key("incident") {
        return Ok(statuspage(&value, components));
    }
    if let Some(event) = object.get("event_type").and_then(Value::as_str) {
        // incident.io: the event's object under its own name (or the one
        // other object in the envelope).
        let inner = object.get(event).filter(|v| v.is_object()).or_else(|| {
            object
                .iter()
                .find(|(k, v)| k.as_str() != "event_type" && v.is_object())
                .map(|(_, v)| v)
        });
        let Some(incident) = inner else {
            return Err(WebhookError::Unreadable(format!(
                "an incident.io `{event}` push without its object"
            )));
        };
        return Ok(incident_io(incident, components));
    }
    Err(WebhookError::Unreadable(
        "neither a Statuspage (`component_update`, `incident`) nor an incident.io (`event_type`) push"
            .into(),
    ))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The components a push lists: (name, id, status).
fn listed<'a>(list: Option<&'a Value>, status_keys: &[&str]) -> Vec<(&'a str, &'a str, &'a str)> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            let id = ["id", "component_id", "code"]
                .iter()
                .map(|k| text(c, k))
                .find(|s| !s.is_empty())
                .unwrap_or_default();
            let status = status_keys
                .iter()
                .map(|k| text(c, k))
                .find(|s| !s.is_empty())
                .unwrap_or_default();
            (text(c, "name"), id, status)
        })
        .collect()
}

/// The watched components among `listed`, with their states.
fn matched(components: &[String], listed: &[(&str, &str, &str)]) -> Vec<(String, PageState)> {
    listed
        .iter()
        .filter_map(|(name, id, status)| {
            watched(components, &[name, id]).map(|w| (w.clone(), component_state(status)))
        })
        .collect()
}

fn statuspage(v: &Value, components: &[String]) -> Option<Reading> {
    let indicator = v
        .get("page")
        .and_then(|p| p.get("status_indicator"))
        .and_then(Value::as_str);
    if components.is_empty() {
        if let Some(i) = indicator {
            return Some(Reading::whole(indicator_state(i)));
        }
        // No indicator: an incident's own impact while it is unresolved.
        let incident = v.get("incident")?;
        let state = match text(incident, "status") {
            "resolved" | "postmortem" | "completed" => PageState::Operational,
            _ => indicator_state(text(incident, "impact")),
        };
        return Some(Reading::whole(state));
    }
    let mut parts = Vec::new();
    if let Some(component) = v.get("component") {
        let new_status = v
            .get("component_update")
            .map(|u| text(u, "new_status"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| text(component, "status"));
        let one = [(text(component, "name"), text(component, "id"), new_status)];
        parts.extend(matched(components, &one));
    }
    if let Some(incident) = v.get("incident") {
        let mut found = matched(components, &listed(incident.get("components"), &["status"]));
        if found.is_empty() {
            // The latest update's affected components (newest first).
            let latest = incident
                .get("incident_updates")
                .and_then(Value::as_array)
                .and_then(|u| u.first());
            found = matched(
                components,
                &listed(
                    latest.and_then(|u| u.get("affected_components")),
                    &["new_status"],
                ),
            );
        }
        parts.extend(found);
    }
    (!parts.is_empty()).then_some(Reading { parts })
}

fn incident_io(incident: &Value, components: &[String]) -> Option<Reading> {
    let status = ["status", "incident_status"]
        .iter()
        .map(|k| text(incident, k))
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    let resolved = status == "resolved";
    let status_keys = ["current_status", "status", "component_status"];
    let mut listed_components = Vec::new();
    for key in [
        "affected_components",
        "component_impacts",
        "component_statuses",
    ] {
        listed_components.extend(listed(incident.get(key), &status_keys));
    }
    if components.is_empty() {
        if resolved {
            return Some(Reading::whole(PageState::Operational));
        }
        let impact = incident
            .get("current_worst_impact")
            .and_then(Value::as_str)
            .map(component_state);
        let worst = listed_components
            .iter()
            .map(|(_, _, s)| component_state(s))
            .chain(impact)
            .max()
            .unwrap_or(PageState::Degraded);
        return Some(Reading::whole(worst));
    }
    let mut parts = matched(components, &listed_components);
    if resolved {
        for (_, state) in &mut parts {
            *state = PageState::Operational;
        }
    }
    (!parts.is_empty()).then_some(Reading { parts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_owned())
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/statuspages/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn sign(key: &[u8], id: &str, ts: &str, body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let msg = [id.as_bytes(), b".", ts.as_bytes(), b".", body].concat();
        let tag = ring::hmac::sign(&key, &msg);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
        )
    }

    fn signed(id: &str, ts: &str, signature: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", id.parse().unwrap());
        h.insert("webhook-timestamp", ts.parse().unwrap());
        h.insert("webhook-signature", signature.parse().unwrap());
        h
    }

    #[test]
    fn a_query_secret_must_match_exactly() {
        let s = secret("a-long-webhook-secret");
        let now = SystemTime::now();
        let none = HeaderMap::new();
        assert_eq!(
            authenticate(&s, &none, Some("secret=a-long-webhook-secret"), b"{}", now),
            Ok(())
        );
        assert_eq!(
            authenticate(
                &s,
                &none,
                Some("x=1&secret=a%2Dlong-webhook-secret"),
                b"{}",
                now
            ),
            Ok(()),
            "percent-encoded"
        );
        for q in [
            None,
            Some("secret=a-long-webhook-secre"),
            Some("token=a-long-webhook-secret"),
        ] {
            assert!(matches!(
                authenticate(&s, &none, q, b"{}", now),
                Err(WebhookError::Unauthorized(_))
            ));
        }
    }

    #[test]
    fn a_svix_signature_is_verified_with_the_decoded_whsec_key() {
        let key = b"0123456789abcdef0123456789abcdef";
        let s = secret(&format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        let body = br#"{"event_type":"x"}"#;
        let good = sign(key, "msg_1", "1750000000", body);
        assert_eq!(
            authenticate(&s, &signed("msg_1", "1750000000", &good), None, body, now),
            Ok(())
        );
        // Several signatures, one valid (a rotated key).
        let both = format!("v1,AAAA {good}");
        assert_eq!(
            authenticate(&s, &signed("msg_1", "1750000000", &both), None, body, now),
            Ok(())
        );
        // Another body, id or time, or a stale timestamp: refused.
        let refused = |h: HeaderMap, body: &[u8], now| {
            matches!(
                authenticate(&s, &h, None, body, now),
                Err(WebhookError::Unauthorized(_))
            )
        };
        assert!(refused(signed("msg_1", "1750000000", &good), b"{}", now));
        assert!(refused(signed("msg_2", "1750000000", &good), body, now));
        assert!(refused(
            signed("msg_1", "1750000000", &good),
            body,
            now + Duration::from_secs(600)
        ));
        // A signature never falls back to the query secret.
        let mut h = signed("msg_1", "1750000000", "v1,AAAA");
        h.remove("webhook-id");
        assert!(matches!(
            authenticate(&s, &h, Some("secret=x"), body, now),
            Err(WebhookError::Unauthorized(_))
        ));
    }

    #[test]
    fn statuspage_pushes_read_components_and_the_indicator() {
        let component = fixture("statuspage_webhook_component.json");
        assert_eq!(
            read(&component, &names(&["Claude API (api.anthropic.com)"])),
            Ok(Some(Reading {
                parts: vec![("Claude API (api.anthropic.com)".into(), PageState::Down)]
            }))
        );
        assert_eq!(read(&component, &names(&["Claude Code"])), Ok(None));
        assert_eq!(
            read(&component, &[]),
            Ok(Some(Reading::whole(PageState::Down)))
        );
        let incident = fixture("statuspage_webhook_incident.json");
        assert_eq!(
            read(&incident, &names(&["Claude Code"])).map(|r| r.map(|r| r.worst())),
            Ok(Some(PageState::Degraded))
        );
    }

    #[test]
    fn incident_io_pushes_read_components_and_resolution() {
        let body = fixture("incident_io_webhook.json");
        assert_eq!(
            read(&body, &names(&["Conversations"])).map(|r| r.map(|r| r.worst())),
            Ok(Some(PageState::Down))
        );
        assert_eq!(
            read(&body, &[]).map(|r| r.map(|r| r.worst())),
            Ok(Some(PageState::Down))
        );
        let resolved = String::from_utf8(body)
            .unwrap()
            .replace("\"investigating\"", "\"resolved\"");
        assert_eq!(
            read(resolved.as_bytes(), &names(&["Conversations"])).map(|r| r.map(|r| r.worst())),
            Ok(Some(PageState::Operational))
        );
    }

    #[test]
    fn other_bodies_are_unreadable() {
        for body in [
            &b"nope"[..],
            b"[]",
            b"{\"hello\": 1}",
            b"{\"event_type\": \"x\"}",
        ] {
            assert!(matches!(read(body, &[]), Err(WebhookError::Unreadable(_))));
        }
    }
}
