//! The drill's clients: open-loop load at a fixed rate per stream, each
//! request timed and classified as an OpenAI SDK user would see it.
//!
//! Open loop (a request every `1/rate` seconds whatever the answers do), so a
//! slow gateway cannot slow the load down and hide its own latency
//! (coordinated omission). Every fourth request streams, and a stream counts
//! as answered only if it ends with `data: [DONE]` and carries no error
//! event. A request unanswered after the client timeout is an error, as it is
//! for a user who gives up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::Tier;

/// Requests sent by this process, numbering the prompts.
static SENT: AtomicU64 = AtomicU64::new(0);

/// One source of requests: a route, as a tier, at a rate.
#[derive(Debug, Clone)]
pub struct Stream {
    pub route: usize,
    pub alias: String,
    pub tier: Option<Tier>,
    pub key: Option<String>,
    /// Requests per second.
    pub rate: f64,
    /// When it starts and stops, from the scenario's epoch.
    pub from: Duration,
    pub until: Duration,
}

/// How one request ended, for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A whole answer.
    Ok,
    /// Refused by detour's own limits or admission (429/503 before any
    /// attempt): shedding, not a failure of the route.
    Limited,
    /// Anything else: an error status, a broken stream, a timeout.
    Error,
}

/// One request, timed from the scenario's epoch.
#[derive(Debug, Clone)]
pub struct Sample {
    pub route: usize,
    pub tier: Option<Tier>,
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
    /// `x-detour-provider` of an answer.
    pub provider: Option<String>,
}

impl Sample {
    pub fn latency(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }
}

/// The HTTP client of the drill: no proxy from the environment (loopback).
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
}

/// Runs `streams` against the gateway at `base` and returns every request's
/// sample once the last one ended (each at most `timeout`).
pub async fn drive(
    client: &reqwest::Client,
    base: &str,
    streams: &[Stream],
    epoch: Instant,
    timeout: Duration,
) -> Vec<Sample> {
    let url = format!("{base}/v1/chat/completions");
    let mut senders = JoinSet::new();
    for s in streams {
        let (client, url, s) = (client.clone(), url.clone(), s.clone());
        senders.spawn(async move { one_stream(client, url, s, epoch, timeout).await });
    }
    let mut samples = Vec::new();
    while let Some(done) = senders.join_next().await {
        if let Ok(mut some) = done {
            samples.append(&mut some);
        }
    }
    samples.sort_by_key(|s| s.start);
    samples
}

async fn one_stream(
    client: reqwest::Client,
    url: String,
    s: Stream,
    epoch: Instant,
    timeout: Duration,
) -> Vec<Sample> {
    let mut requests = JoinSet::new();
    if s.rate > 0.0 {
        let gap = Duration::from_secs_f64(1.0 / s.rate);
        let mut next = epoch + s.from;
        let mut n = 0u64;
        while next < epoch + s.until {
            tokio::time::sleep_until(next).await;
            let stream = n % 4 == 3;
            let (client, url, s2) = (client.clone(), url.clone(), s.clone());
            // Timed from when it was due, not from when it got a thread.
            let start = next.saturating_duration_since(epoch);
            requests.spawn(async move {
                let (outcome, provider) =
                    match tokio::time::timeout(timeout, call(&client, &url, &s2, stream)).await {
                        Ok(answer) => answer,
                        Err(_) => (Outcome::Error, None),
                    };
                Sample {
                    route: s2.route,
                    tier: s2.tier,
                    start,
                    end: epoch.elapsed(),
                    outcome,
                    provider,
                }
            });
            n += 1;
            next += gap;
        }
    }
    let mut samples = Vec::new();
    while let Some(done) = requests.join_next().await {
        if let Ok(sample) = done {
            samples.push(sample);
        }
    }
    samples
}

async fn call(
    client: &reqwest::Client,
    url: &str,
    s: &Stream,
    stream: bool,
) -> (Outcome, Option<String>) {
    // Every prompt its own, as users' are: a route's response cache must
    // not answer the drill's requests from one stored answer.
    let n = SENT.fetch_add(1, Ordering::Relaxed);
    let body = serde_json::json!({
        "model": s.alias,
        "messages": [{"role": "user", "content": format!("drill request {n}: say hello")}],
        "stream": stream,
    });
    let mut req = client.post(url).json(&body);
    if let Some(key) = &s.key {
        req = req.bearer_auth(key);
    }
    let Ok(resp) = req.send().await else {
        return (Outcome::Error, None);
    };
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let provider = header("x-detour-provider");
    let attempted = header("x-detour-attempts").is_some();
    let Ok(bytes) = resp.bytes().await else {
        return (Outcome::Error, provider);
    };
    let outcome = match status {
        200 if !stream => Outcome::Ok,
        200 if whole_stream(&bytes) => Outcome::Ok,
        429 | 503 if !attempted => Outcome::Limited,
        _ => Outcome::Error,
    };
    (outcome, provider)
}

/// An OpenAI stream that ended with `[DONE]` and carried no error event.
fn whole_stream(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    text.trim_end().ends_with("data: [DONE]") && !text.contains("data: {\"error\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_counts_only_when_whole() {
        assert!(whole_stream(b"data: {\"id\":1}\n\ndata: [DONE]\n\n"));
        assert!(!whole_stream(b"data: {\"id\":1}\n\n"));
        assert!(!whole_stream(
            b"data: {\"id\":1}\n\ndata: {\"error\":{}}\n\ndata: [DONE]\n\n"
        ));
    }
}
