//! The control API under `/_mock/`, served on the same listener as the traffic and
//! never counted as traffic.
//!
//! | request | effect | answer |
//! |---|---|---|
//! | `GET /_mock/faults` | | current [`Faults`] |
//! | `PUT /_mock/faults` | replace the faults (missing keys take defaults) | the new faults, or 400 |
//! | `DELETE /_mock/faults` | clear the faults | the (default) faults |
//! | `GET /_mock/stats` | | [`Stats`](super::Stats) |
//! | `GET /_mock/requests` | | the last 100 [`RecordedRequest`](super::RecordedRequest)s, oldest first |
//! | `POST /_mock/reset` | clear faults, stats, recorded requests, page status; arrival numbers restart | `{"reset":true}` |
//! | `GET /_mock/status` | statuspage flavor only | the effective [`PageStatus`] |
//! | `PUT /_mock/status` | statuspage flavor only: replace the page status | the effective status, or 400 |
//! | `DELETE /_mock/status` | statuspage flavor only: all operational, no incident | the effective status |
//!
//! Errors use the OpenAI error shape `{"error":{"message","type","param","code"}}`
//! whatever the flavor.

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::body::{read_body, Reply};
use super::faults::Faults;
use super::openai;
use super::shared::Shared;
use super::statuspage::PageStatus;
use super::Flavor;

pub(crate) const PREFIX: &str = "/_mock/";

const ENDPOINTS: [&str; 5] = [
    "/_mock/faults",
    "/_mock/stats",
    "/_mock/requests",
    "/_mock/reset",
    "/_mock/status",
];

pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let read = |body| async move {
        read_body(body)
            .await
            .map_err(|(status, message)| openai::status_error(status, &message))
    };
    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/_mock/faults") => json(&*shared.faults.load_full()),
        (&Method::PUT, "/_mock/faults") => {
            let body = match read(body).await {
                Ok(body) => body,
                Err(reply) => return reply,
            };
            match parse_faults(&body) {
                Ok(faults) => {
                    let reply = json(&faults);
                    shared.faults.store(Arc::new(faults));
                    reply
                }
                Err(message) => bad_request(&message),
            }
        }
        (&Method::DELETE, "/_mock/faults") => {
            shared.faults.store(Arc::new(Faults::default()));
            json(&Faults::default())
        }
        (&Method::GET, "/_mock/stats") => json(&shared.counters.snapshot()),
        (&Method::GET, "/_mock/requests") => json(&shared.recorder.snapshot()),
        (&Method::POST, "/_mock/reset") => {
            shared.reset();
            json(&serde_json::json!({"reset": true}))
        }
        (_, "/_mock/status") if shared.flavor != Flavor::Statuspage => openai::error(
            StatusCode::NOT_FOUND,
            &format!(
                "mock control: /_mock/status exists only with --flavor statuspage (this mock is {})",
                shared.flavor
            ),
            "invalid_request_error",
            None,
            None,
        ),
        (&Method::GET, "/_mock/status") => json(&shared.page.load().status),
        (&Method::PUT, "/_mock/status") => {
            let body = match read(body).await {
                Ok(body) => body,
                Err(reply) => return reply,
            };
            match parse::<PageStatus>(&body, "status") {
                Ok(status) => {
                    shared.set_status(&status);
                    json(&shared.page.load().status)
                }
                Err(message) => bad_request(&message),
            }
        }
        (&Method::DELETE, "/_mock/status") => {
            shared.set_status(&PageStatus::default());
            json(&shared.page.load().status)
        }
        (method, path) if ENDPOINTS.contains(&path) => openai::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("mock control: {method} is not allowed on {path}"),
            "invalid_request_error",
            None,
            None,
        ),
        (method, path) => openai::error(
            StatusCode::NOT_FOUND,
            &format!(
                "mock control: no endpoint {method} {path}; try {}",
                ENDPOINTS.join(", ")
            ),
            "invalid_request_error",
            None,
            None,
        ),
    }
}

fn bad_request(message: &str) -> Reply {
    openai::error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
        None,
    )
}

/// Parses a control body; the message names the offending key path.
fn parse<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            format!("invalid {what} JSON: {}", e.inner())
        } else {
            format!("invalid {what} JSON at `{path}`: {}", e.inner())
        }
    })
}

/// Parses and validates a `PUT /_mock/faults` body; the message says what is wrong.
pub(crate) fn parse_faults(body: &[u8]) -> Result<Faults, String> {
    let faults: Faults = parse(body, "faults")?;
    faults
        .validate()
        .map_err(|e| format!("invalid faults: {e}"))?;
    Ok(faults)
}

fn json(value: &impl Serialize) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => Reply::json(StatusCode::OK, body),
        Err(e) => openai::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("mock control: could not serialise the answer: {e}"),
            "server_error",
            None,
            None,
        ),
    }
}
