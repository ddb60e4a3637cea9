//! What the mock saw: traffic counters and the last requests, both lock-free.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::faults::Decision;

/// Traffic counts since start or the last reset. Control API calls are not counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Every non-control request, whatever its outcome.
    pub requests: u64,
    /// Requests to `POST /v1/chat/completions`, faulted ones included.
    pub chat_completions: u64,
    /// Requests to `POST /v1/embeddings`, faulted ones included.
    pub embeddings: u64,
    /// Requests to `POST /v1/responses`, faulted ones included.
    #[serde(default)]
    pub responses: u64,
    /// Anthropic: requests to `POST /v1/messages`, faulted ones included.
    pub messages: u64,
    /// Gemini: requests to `:generateContent` and `:streamGenerateContent`.
    pub generate_content: u64,
    /// Status page: requests for one of the `/api/v2/*.json` documents.
    pub status_polls: u64,
    pub faults: FaultStats,
}

/// How many times each fault fired.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultStats {
    pub error: u64,
    pub rate_limit: u64,
    pub reset: u64,
    pub hang: u64,
    pub cut: u64,
    /// Streams ended by `stream_error_after_chunks`.
    pub stream_error: u64,
    /// JSON bodies broken by `malformed`.
    pub malformed: u64,
}

/// The endpoint classes that have their own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ChatCompletions,
    Responses,
    Embeddings,
    Messages,
    GenerateContent,
    StatusPoll,
    Other,
}

#[derive(Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    chat_completions: AtomicU64,
    embeddings: AtomicU64,
    responses: AtomicU64,
    messages: AtomicU64,
    generate_content: AtomicU64,
    status_polls: AtomicU64,
    error: AtomicU64,
    rate_limit: AtomicU64,
    reset: AtomicU64,
    hang: AtomicU64,
    cut: AtomicU64,
    stream_error: AtomicU64,
    malformed: AtomicU64,
}

impl Counters {
    /// Counts an arriving request and returns its arrival number (from 0).
    pub(crate) fn arrive(&self, endpoint: Endpoint) -> u64 {
        match endpoint {
            Endpoint::ChatCompletions => self.chat_completions.fetch_add(1, Relaxed),
            Endpoint::Embeddings => self.embeddings.fetch_add(1, Relaxed),
            Endpoint::Responses => self.responses.fetch_add(1, Relaxed),
            Endpoint::Messages => self.messages.fetch_add(1, Relaxed),
            Endpoint::GenerateContent => self.generate_content.fetch_add(1, Relaxed),
            Endpoint::StatusPoll => self.status_polls.fetch_add(1, Relaxed),
            Endpoint::Other => 0,
        };
        self.requests.fetch_add(1, Relaxed)
    }

    pub(crate) fn fault(&self, decision: Decision) {
        let counter = match decision {
            Decision::Serve => return,
            Decision::Error => &self.error,
            Decision::RateLimit => &self.rate_limit,
            Decision::Reset => &self.reset,
            Decision::Hang => &self.hang,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn cut(&self) {
        self.cut.fetch_add(1, Relaxed);
    }

    pub(crate) fn stream_error(&self) {
        self.stream_error.fetch_add(1, Relaxed);
    }

    pub(crate) fn malformed(&self) {
        self.malformed.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            requests: self.requests.load(Relaxed),
            chat_completions: self.chat_completions.load(Relaxed),
            embeddings: self.embeddings.load(Relaxed),
            responses: self.responses.load(Relaxed),
            messages: self.messages.load(Relaxed),
            generate_content: self.generate_content.load(Relaxed),
            status_polls: self.status_polls.load(Relaxed),
            faults: FaultStats {
                error: self.error.load(Relaxed),
                rate_limit: self.rate_limit.load(Relaxed),
                reset: self.reset.load(Relaxed),
                hang: self.hang.load(Relaxed),
                cut: self.cut.load(Relaxed),
                stream_error: self.stream_error.load(Relaxed),
                malformed: self.malformed.load(Relaxed),
            },
        }
    }

    pub(crate) fn clear(&self) {
        for counter in [
            &self.requests,
            &self.chat_completions,
            &self.embeddings,
            &self.responses,
            &self.messages,
            &self.generate_content,
            &self.status_polls,
            &self.error,
            &self.rate_limit,
            &self.reset,
            &self.hang,
            &self.cut,
            &self.stream_error,
            &self.malformed,
        ] {
            counter.store(0, Relaxed);
        }
    }
}

/// One request as received. `path` is the request target (path and query).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON, or `Null` if it is not JSON.
    pub body: Value,
}

/// How many requests `requests()` remembers.
pub const RECORDED_REQUESTS: usize = 100;

/// The raw request, kept cheap to store: conversion happens only when someone asks.
struct Raw {
    seq: u64,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// A ring of the last [`RECORDED_REQUESTS`] requests, slot = arrival number mod size.
pub(crate) struct Recorder {
    slots: Box<[ArcSwapOption<Raw>]>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Self {
            slots: (0..RECORDED_REQUESTS)
                .map(|_| ArcSwapOption::empty())
                .collect(),
        }
    }

    pub(crate) fn record(&self, seq: u64, parts: &http::request::Parts, body: &Bytes) {
        let raw = Raw {
            seq,
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        };
        let slot = (seq % RECORDED_REQUESTS as u64) as usize;
        if let Some(slot) = self.slots.get(slot) {
            slot.store(Some(Arc::new(raw)));
        }
    }

    /// Oldest first.
    pub(crate) fn snapshot(&self) -> Vec<RecordedRequest> {
        let mut raws: Vec<Arc<Raw>> = self.slots.iter().filter_map(|s| s.load_full()).collect();
        raws.sort_by_key(|r| r.seq);
        raws.iter()
            .map(|raw| RecordedRequest {
                method: raw.method.to_string(),
                path: raw
                    .uri
                    .path_and_query()
                    .map_or_else(|| raw.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
                headers: raw
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                        (name.as_str().to_owned(), value)
                    })
                    .collect(),
                body: serde_json::from_slice(&raw.body).unwrap_or(Value::Null),
            })
            .collect()
    }

    pub(crate) fn clear(&self) {
        for slot in self.slots.iter() {
            slot.store(None);
        }
    }
}
