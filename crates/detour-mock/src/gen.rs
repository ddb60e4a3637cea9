//! Deterministic building blocks for mock content: seed mixing, a stable hash over
//! JSON, ids, filler words, splitting text into stream pieces, and base64.
//!
//! Everything here is pure and stable across runs and Rust versions (no `DefaultHasher`),
//! so a seed reproduces the same bytes everywhere.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// splitmix64's finaliser (Steele, Lea, Flood 2014): a cheap bijective scrambler.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Combines two values into one well-scrambled seed.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    splitmix64(a ^ splitmix64(b))
}

/// 64-bit FNV-1a: stable, tiny, good enough to key mock content.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }

    /// Hashes a JSON value by structure, so formatting and whitespace do not matter.
    pub(crate) fn write_json(&mut self, v: &Value) {
        match v {
            Value::Null => self.write(b"n"),
            Value::Bool(b) => self.write(if *b { b"t" } else { b"f" }),
            Value::Number(n) => {
                self.write(b"#");
                if let Some(i) = n.as_i64() {
                    self.write(&i.to_le_bytes());
                } else if let Some(u) = n.as_u64() {
                    self.write(&u.to_le_bytes());
                } else if let Some(f) = n.as_f64() {
                    self.write(&f.to_bits().to_le_bytes());
                }
            }
            Value::String(s) => {
                self.write(b"s");
                self.write(s.as_bytes());
                self.write(b"\0");
            }
            Value::Array(items) => {
                self.write(b"[");
                for item in items {
                    self.write_json(item);
                }
                self.write(b"]");
            }
            Value::Object(map) => {
                self.write(b"{");
                for (k, item) in map {
                    self.write(k.as_bytes());
                    self.write(b":");
                    self.write_json(item);
                }
                self.write(b"}");
            }
        }
    }
}

const ALNUM: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// `len` random letters and digits, like the tails of OpenAI ids.
pub(crate) fn alnum(rng: &mut fastrand::Rng, len: usize) -> String {
    (0..len)
        .map(|_| char::from(ALNUM[rng.usize(..ALNUM.len())]))
        .collect()
}

/// 32 lowercase hex digits derived from `seed` and `seq` (for `x-request-id`).
pub(crate) fn hex_id(seed: u64, seq: u64) -> String {
    let a = mix(seed ^ 0x5eed_0001, seq);
    let b = mix(a, seq);
    format!("{a:016x}{b:016x}")
}

const WORDS: [&str; 48] = [
    "the",
    "quick",
    "answer",
    "is",
    "that",
    "mock",
    "providers",
    "never",
    "sleep",
    "on",
    "the",
    "job",
    "streams",
    "arrive",
    "in",
    "tidy",
    "pieces",
    "and",
    "every",
    "token",
    "counts",
    "as",
    "one",
    "small",
    "step",
    "toward",
    "a",
    "reliable",
    "gateway",
    "with",
    "clear",
    "failover",
    "rules",
    "tested",
    "under",
    "load",
    "while",
    "latency",
    "stays",
    "low",
    "for",
    "each",
    "request",
    "we",
    "route",
    "around",
    "outages",
    "today",
];

/// Appends `count` filler words, each preceded by a space.
pub(crate) fn push_words(out: &mut String, rng: &mut fastrand::Rng, count: usize) {
    for _ in 0..count {
        out.push(' ');
        out.push_str(WORDS[rng.usize(..WORDS.len())]);
    }
}

/// Splits `s` into `n` pieces of nearly equal length in characters (fewer if `s` is
/// shorter than `n`). The split points ignore word and JSON token boundaries on purpose,
/// as real streams do.
pub(crate) fn split_pieces(s: &str, n: usize) -> Vec<&str> {
    let mut starts: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
    let total = starts.len();
    starts.push(s.len());
    if total == 0 {
        return vec![s];
    }
    let n = n.clamp(1, total);
    (0..n)
        .map(|k| &s[starts[k * total / n]..starts[(k + 1) * total / n]])
        .collect()
}

/// Rough token count: one token per four bytes, at least one.
pub(crate) fn tokens_for(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

/// The mock's answer text: a greeting naming the model (or a sentence quoting a tool
/// result) followed by 16 filler words drawn from `rng`.
pub(crate) fn answer_text(
    model: &str,
    tool_result: Option<&str>,
    rng: &mut fastrand::Rng,
) -> String {
    let mut text = match tool_result {
        Some(result) => format!("Mock model {model} received the tool result: {result}."),
        None => format!("Hello from mock model {model}."),
    };
    push_words(&mut text, rng, 16);
    text.push('.');
    text
}

/// Cuts `text` to at most `limit` tokens' worth of bytes (see [`tokens_for`]), at a
/// character boundary. True if it was cut.
pub(crate) fn truncate_to_tokens(text: &mut String, limit: u64) -> bool {
    let max_bytes = usize::try_from(limit.max(1).saturating_mul(4)).unwrap_or(usize::MAX);
    if text.len() <= max_bytes {
        return false;
    }
    let mut cut = max_bytes;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    true
}

/// Cuts `text` before the earliest occurrence of any non-empty stop sequence and
/// returns the sequence that matched.
pub(crate) fn cut_at_stop<'a>(
    text: &mut String,
    stops: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let earliest = stops
        .into_iter()
        .filter(|stop| !stop.is_empty())
        .filter_map(|stop| text.find(stop).map(|at| (at, stop)))
        .min_by_key(|(at, _)| *at);
    let (at, stop) = earliest?;
    text.truncate(at);
    Some(stop)
}

/// A JSON object with a placeholder for each required property of a JSON Schema (or
/// Gemini's OpenAPI-subset `Schema`, whose type names are upper case): the first
/// `enum` value if any, else string → `"mock"`, number/integer → 1, boolean → true,
/// anything else → null.
pub(crate) fn mock_args(parameters: Option<&Value>) -> Value {
    let properties = parameters.and_then(|p| p.get("properties"));
    let required = parameters
        .and_then(|p| p.get("required"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut args = Map::new();
    for name in required.iter().filter_map(Value::as_str) {
        let schema = properties.and_then(|p| p.get(name));
        args.insert(name.to_owned(), mock_value(schema));
    }
    Value::Object(args)
}

fn mock_value(schema: Option<&Value>) -> Value {
    let Some(schema) = schema else {
        return Value::Null;
    };
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| !k.eq_ignore_ascii_case("null"))
            .unwrap_or("null"),
        _ => "null",
    };
    match kind.to_ascii_lowercase().as_str() {
        "string" => Value::from("mock"),
        "number" | "integer" => Value::from(1),
        "boolean" => Value::Bool(true),
        _ => Value::Null,
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) use detour_protocol::timefmt::rfc3339;

/// Standard base64 (RFC 4648 §4) with padding.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |n: u32| char::from(ALPHABET[(n & 63) as usize]);
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(sym(n >> 18));
        out.push(sym(n >> 12));
        out.push(if chunk.len() > 1 { sym(n >> 6) } else { '=' });
        out.push(if chunk.len() > 2 { sym(n) } else { '=' });
    }
    out
}

/// The text of an OpenAI message `content` (or a tool output): a string, or
/// the `text` of its parts.
pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn split_pieces_covers_the_text() {
        for (text, n) in [("hello world", 3), ("ab", 5), ("", 4), ("héllo→", 2)] {
            let pieces = split_pieces(text, n);
            assert_eq!(pieces.concat(), text);
            assert!(pieces.len() <= n.max(1));
        }
        assert_eq!(split_pieces("abcdefgh", 4), ["ab", "cd", "ef", "gh"]);
    }

    #[test]
    fn rfc3339_formats_utc() {
        let at = |secs| UNIX_EPOCH + std::time::Duration::from_secs(secs);
        assert_eq!(rfc3339(at(0), false), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(1_700_000_000), false), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(at(951_782_400), true), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(at(4_102_444_799), false), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn stops_and_truncation() {
        let mut text = "hello mock world".to_owned();
        assert_eq!(cut_at_stop(&mut text, ["world", "", "mock"]), Some("mock"));
        assert_eq!(text, "hello ");
        assert_eq!(cut_at_stop(&mut text, ["zzz"]), None);
        let mut text = "abcdefghij".to_owned();
        assert!(truncate_to_tokens(&mut text, 2));
        assert_eq!(text, "abcdefgh");
        assert!(!truncate_to_tokens(&mut text, 2));
    }

    #[test]
    fn json_hash_ignores_formatting() {
        let a: Value = serde_json::from_str(r#"{"a": [1, "x"]}"#).unwrap_or_default();
        let b: Value = serde_json::from_str(r#"{"a":[1,"x"]}"#).unwrap_or_default();
        let (mut ha, mut hb) = (Fnv::new(), Fnv::new());
        ha.write_json(&a);
        hb.write_json(&b);
        assert_eq!(ha.finish(), hb.finish());
    }
}
