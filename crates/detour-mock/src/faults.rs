//! The fault model: what can go wrong, and the seeded per-request decision.
//!
//! Every traffic request draws one number `r` in `[0, 1)` from an RNG seeded with
//! `mix(seed, seq)`, where `seq` is the request's arrival number (0, 1, 2, ... since
//! start or the last reset). The rates partition `[0, 1)` in a fixed order:
//! `reset_rate`, then `hang_rate`, then `rate_limit_rate`, then `error_rate`; whatever is
//! left is served normally. So a run is deterministic given the seed and the request
//! order, the faults are mutually exclusive, and a rate of 1 always fires. If the rates
//! add up to more than 1, the later ones in that order are cut short.
//!
//! Deriving one RNG per request, instead of sharing one RNG behind a lock, keeps the hot
//! path lock-free and makes the decision for request `n` independent of how many random
//! numbers earlier requests consumed.

use serde::{Deserialize, Serialize};

use super::gen::mix;

/// Scriptable faults. `Faults::default()` injects nothing.
///
/// The JSON form is what `GET`/`PUT /_mock/faults` speak; unknown keys are rejected and
/// missing keys take their default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of requests (0..=1) answered with `error_status` and an error body.
    pub error_rate: f64,
    /// Status for `error_rate` faults (400..=599). Default 500.
    pub error_status: u16,
    /// Share of requests (0..=1) answered with 429, `retry-after` and `x-ratelimit-*`.
    pub rate_limit_rate: f64,
    /// Value of `retry-after` on rate-limit faults. Default 1.
    pub retry_after_secs: u64,
    /// Share of requests (0..=1) whose TCP connection is reset (RST) with no response.
    pub reset_rate: f64,
    /// Share of requests (0..=1) that are never answered, until the client goes away.
    pub hang_rate: f64,
    /// Delay before the response headers, on every request.
    pub latency_ms: u64,
    /// Streams: delay between the headers and the first event. Non-streamed responses:
    /// added to `latency_ms`.
    pub ttfb_ms: u64,
    /// Streams stop abruptly after this many `data:` events: no `[DONE]`, and the
    /// connection is aborted mid-body.
    pub cut_after_chunks: Option<usize>,
    /// Overrides `MockOptions::chunks` (content pieces per streamed choice).
    pub chunks: Option<usize>,
    /// Overrides `MockOptions::chunk_gap` (pause between consecutive stream events).
    pub chunk_gap_ms: Option<u64>,
    /// Streams (every LLM flavor) answer 200, send the opening event(s) and this many
    /// content chunks, then the provider's mid-stream error event, and end the body
    /// cleanly (no finish, no terminator). 0 = the error right after the opening event
    /// (Gemini, which has none: as the very first event). If the answer has fewer
    /// chunks, the error replaces the finish.
    pub stream_error_after_chunks: Option<usize>,
    /// OpenAI and Anthropic: `x-should-retry: true|false` on the replies of
    /// `error_rate` and `rate_limit_rate` faults (the Stainless SDKs obey it over the
    /// status). Unset: no header.
    pub should_retry: Option<bool>,
    /// Every 200 JSON body is cut in half (invalid JSON, same headers). Streams are
    /// not affected. Meant for the status page, works on every flavor.
    pub malformed: bool,
    /// The `retry-after` header's text, sent exactly as given (`"1e20"`, `"-1"`, `"NaN"`,
    /// an HTTP date...), on `rate_limit_rate` faults (instead of `retry_after_secs`) and
    /// on `error_rate` faults (which otherwise send none). Gemini's `RetryInfo` in the
    /// body is not affected.
    pub retry_after: Option<String>,
    /// Streams: after this many events (0 = before any), one `data:` event that never
    /// ends: 64 KiB of payload every `chunk_gap_ms` (at least 2 ms) and never a blank
    /// line, until the client goes away. The rest of the answer never comes.
    pub endless_event_after: Option<usize>,
    /// Every 2xx body (JSON or stream) is sent gzip-compressed with
    /// `content-encoding: gzip`, whatever the request's `accept-encoding` asked for.
    /// Not combined with `endless_event_after`, whose endless bytes are sent plain.
    pub gzip: bool,
    /// Every request that would be served is answered 200 with an HTML page
    /// (`text/html`), as a proxy or captive portal in front of the provider does.
    pub html_200: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 500,
            rate_limit_rate: 0.0,
            retry_after_secs: 1,
            reset_rate: 0.0,
            hang_rate: 0.0,
            latency_ms: 0,
            ttfb_ms: 0,
            cut_after_chunks: None,
            chunks: None,
            chunk_gap_ms: None,
            stream_error_after_chunks: None,
            should_retry: None,
            malformed: false,
            retry_after: None,
            endless_event_after: None,
            gzip: false,
            html_200: false,
        }
    }
}

/// What to do with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Serve,
    Reset,
    Hang,
    RateLimit,
    Error,
}

impl Faults {
    /// Checks the ranges the control API promises; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, rate) in [
            ("error_rate", self.error_rate),
            ("rate_limit_rate", self.rate_limit_rate),
            ("reset_rate", self.reset_rate),
            ("hang_rate", self.hang_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("`{key}` must be between 0 and 1, got {rate}"));
            }
        }
        if !(400..=599).contains(&self.error_status) {
            return Err(format!(
                "`error_status` must be between 400 and 599, got {}",
                self.error_status
            ));
        }
        if self.chunks == Some(0) {
            return Err("`chunks` must be at least 1".to_owned());
        }
        if let Some(text) = &self.retry_after {
            if http::HeaderValue::from_str(text).is_err() {
                return Err(format!(
                    "`retry_after` must be valid header text, got {text:?}"
                ));
            }
        }
        Ok(())
    }

    /// The decision for request number `seq` of a server seeded with `seed`.
    pub(crate) fn decide(&self, seed: u64, seq: u64) -> Decision {
        let ordered = [
            (self.reset_rate, Decision::Reset),
            (self.hang_rate, Decision::Hang),
            (self.rate_limit_rate, Decision::RateLimit),
            (self.error_rate, Decision::Error),
        ];
        let total: f64 = ordered.iter().map(|(rate, _)| positive(*rate)).sum();
        if total <= 0.0 {
            return Decision::Serve;
        }
        let r = fastrand::Rng::with_seed(mix(seed, seq)).f64();
        let mut edge = 0.0;
        for (rate, decision) in ordered {
            edge += positive(rate);
            if r < edge {
                return decision;
            }
        }
        Decision::Serve
    }
}

/// NaN and negative rates count as 0 here; `validate` rejects them at the API.
fn positive(rate: f64) -> f64 {
    if rate > 0.0 {
        rate
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_faults_always_serves() {
        let f = Faults::default();
        assert!((0..1000).all(|seq| f.decide(1, seq) == Decision::Serve));
    }

    #[test]
    fn rate_one_always_fires_and_order_wins() {
        let f = Faults {
            error_rate: 1.0,
            hang_rate: 1.0,
            ..Faults::default()
        };
        assert!((0..1000).all(|seq| f.decide(1, seq) == Decision::Hang));
    }

    #[test]
    fn rates_are_roughly_honoured() {
        let f = Faults {
            error_rate: 0.25,
            ..Faults::default()
        };
        let errors = (0..10_000)
            .filter(|&seq| f.decide(9, seq) == Decision::Error)
            .count();
        assert!((2_000..3_000).contains(&errors), "{errors}");
    }

    #[test]
    fn validate_names_the_key() {
        let f = Faults {
            hang_rate: 1.5,
            ..Faults::default()
        };
        assert!(f.validate().is_err_and(|e| e.contains("hang_rate")));
        assert!(Faults::default().validate().is_ok());
    }
}
