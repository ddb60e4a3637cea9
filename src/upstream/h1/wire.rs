//! The HTTP/1.1 wire format of detour's own provider client ([`super`]),
//! without I/O: the request's head written, the answer's head read
//! (`httparse`), and the answer body's framing (a length, chunks, or until
//! the connection closes) taken off the read buffer.
//!
//! An answer's head keeps only the headers detour reads ([`KEPT`]); the
//! rest (a provider's request ids, rate-limit counters, cookies) is parsed
//! past and never copied. The framing follows RFC 9112 §6.3: a
//! `transfer-encoding` (only `chunked`: detour asks for no other) overrides
//! `content-length` (and the connection is closed after such an answer),
//! several different lengths are an error, and an answer with neither runs
//! until the connection closes.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

/// The largest answer head read; a provider's is a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header lines an answer head may have (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (with its extensions), and the most bytes of
/// trailers after the last chunk.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// The answer headers detour reads (`upstream`, `proxy`, `cache`): the body's
/// type and encoding, the cache policy passed on to clients, and how long a
/// throttled provider asks to wait. A header read anywhere from a provider's
/// answer must be listed here, or the plain-http path never sees it.
pub const KEPT: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CACHE_CONTROL,
    header::RETRY_AFTER,
];

/// What is wrong with what a provider sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the answer's head is not HTTP/1.1 ({0})")]
    Head(httparse::Error),
    #[error("the answer's head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the answer's status {0} is not a valid status")]
    Status(u16),
    #[error("the answer switched protocols, which detour never asks for")]
    Upgrade,
    #[error("the answer's transfer-encoding is not `chunked` alone (detour asks for no other)")]
    TransferCoding,
    #[error("the answer's content-length is not one number")]
    ContentLength,
    #[error("a chunk's size line is invalid")]
    ChunkSize,
    #[error("a chunk does not end with CRLF")]
    ChunkEnd,
    #[error("the answer's trailers are larger than {MAX_TRAILERS} bytes")]
    Trailers,
}

/// Writes a POST request's head: `target` (path and query), `host`, the
/// given headers (any framing header among them is left out: the length is
/// the body's), and the body's length.
pub fn request_head(
    target: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    body_len: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + target.len() + headers.len() * 48);
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    let host = headers.get(header::HOST).unwrap_or(host);
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if matches!(
            *name,
            header::HOST | header::CONTENT_LENGTH | header::TRANSFER_ENCODING
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// An answer's head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    /// The [`KEPT`] headers.
    pub headers: HeaderMap,
    /// How its body ends, as the state that reads it.
    pub body: Remaining,
    /// Whether the connection can take another request once the body ended.
    pub reusable: bool,
    /// How many bytes of the buffer the head took.
    pub len: usize,
}

/// Parses the answer head at the start of `buf`: `None` while it is
/// incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, WireError> {
    // Left uninitialized: httparse writes the lines it parses, and setting
    // all hundred slots first would write 3.2 KB per answer.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut answer,
        buf,
        &mut slots,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(WireError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(WireError::Head(e)),
    };
    if len > MAX_HEAD_BYTES {
        return Err(WireError::HeadTooLarge);
    }
    let code = answer.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| WireError::Status(code))?;
    let mut headers = HeaderMap::new();
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = answer.version != Some(1);
    for h in answer.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = content_length(h.value)?;
            if length.is_some_and(|l| l != n) {
                return Err(WireError::ContentLength);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // detour sends no `te`, so a provider may apply only `chunked`,
            // once (RFC 9112 §7.4); any other coding would reach the client
            // undecoded.
            for coding in h.value.split(|&b| b == b',') {
                if chunked || !coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(WireError::TransferCoding);
                }
                chunked = true;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && answer.version == Some(0) {
                    close = false;
                }
            }
        } else if let Some(kept) = KEPT
            .iter()
            .find(|k| name.eq_ignore_ascii_case(k.as_str().as_bytes()))
        {
            if let Ok(value) = HeaderValue::from_bytes(h.value) {
                headers.append(kept.clone(), value);
            }
        }
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(WireError::Upgrade);
    }
    let body = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Remaining::Done
    } else {
        match (chunked, length) {
            (true, _) => Remaining::Chunked(Chunked::Size),
            (false, Some(0)) => Remaining::Done,
            (false, Some(n)) => Remaining::Length(n),
            (false, None) => Remaining::UntilClose,
        }
    };
    // Both framings at once is how requests are smuggled, and chunks in
    // HTTP/1.0 are faulty framing (RFC 9112 §6.1): never reuse.
    if chunked && (length.is_some() || answer.version == Some(0)) || body == Remaining::UntilClose {
        close = true;
    }
    Ok(Some(Head {
        status,
        headers,
        body,
        reusable: !close,
        len,
    }))
}

/// A `content-length` value: digits, or the same digits repeated in a list.
fn content_length(value: &[u8]) -> Result<u64, WireError> {
    let mut out = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(WireError::ContentLength);
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if out.is_some_and(|o| o != n) {
            return Err(WireError::ContentLength);
        }
        out = Some(n);
    }
    out.ok_or(WireError::ContentLength)
}

/// An answer body's bytes left to take off the read buffer: how it ends
/// (RFC 9112 §6.3), and how far it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remaining {
    /// This many bytes (`content-length`).
    Length(u64),
    /// Up to the last chunk (`transfer-encoding: chunked`).
    Chunked(Chunked),
    /// Whatever comes until the provider closes the connection.
    UntilClose,
    /// Nothing (all taken, or none for 1xx, 204, 304 and a zero length).
    Done,
}

impl Remaining {
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Done)
    }

    /// The next piece of the body that `buf` holds, if any (`None`: more
    /// must be read, or the body is done).
    pub fn take(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
        match self {
            Self::Done => Ok(None),
            Self::UntilClose => Ok((!buf.is_empty()).then(|| buf.split().freeze())),
            Self::Length(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
                *left -= n as u64;
                if *left == 0 {
                    *self = Self::Done;
                }
                Ok(Some(buf.split_to(n).freeze()))
            }
            Self::Chunked(chunked) => {
                let taken = chunked.take(buf);
                if matches!(chunked, Chunked::Done) {
                    *self = Self::Done;
                }
                taken
            }
        }
    }

    /// The body's exact length left, when it is known.
    pub fn exact(&self) -> Option<u64> {
        match self {
            Self::Length(n) => Some(*n),
            Self::Done => Some(0),
            _ => None,
        }
    }
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes of it left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; this many
    /// bytes of them read so far.
    Trailers(usize),
    Done,
}

impl Chunked {
    fn take(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
        loop {
            match *self {
                Self::Done => return Ok(None),
                Self::Size => {
                    let Some((len, end)) = line(buf, MAX_CHUNK_LINE, WireError::ChunkSize)? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&buf[..len])?;
                    buf.advance(end);
                    *self = match size {
                        0 => Self::Trailers(0),
                        n => Self::Data(n),
                    };
                }
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    *self = match left - n as u64 {
                        0 => Self::DataEnd,
                        left => Self::Data(left),
                    };
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                Self::DataEnd => match buf.first() {
                    None => return Ok(None),
                    Some(b'\n') => {
                        buf.advance(1);
                        *self = Self::Size;
                    }
                    Some(b'\r') => match buf.get(1) {
                        None => return Ok(None),
                        Some(b'\n') => {
                            buf.advance(2);
                            *self = Self::Size;
                        }
                        Some(_) => return Err(WireError::ChunkEnd),
                    },
                    Some(_) => return Err(WireError::ChunkEnd),
                },
                Self::Trailers(read) => {
                    let room = MAX_TRAILERS.saturating_sub(read);
                    let Some((len, end)) = line(buf, room, WireError::Trailers)? else {
                        return Ok(None);
                    };
                    buf.advance(end);
                    *self = match len {
                        0 => Self::Done,
                        _ => Self::Trailers(read + end),
                    };
                }
            }
        }
    }
}

/// The line at the start of `buf`: its length without the CRLF (or bare
/// LF), and with it. `None` until its end arrived; `too_long` once `max`
/// bytes came without one.
fn line(buf: &[u8], max: usize, too_long: WireError) -> Result<Option<(usize, usize)>, WireError> {
    let Some(lf) = memchr::memchr(b'\n', &buf[..buf.len().min(max + 2)]) else {
        return match buf.len() > max {
            true => Err(too_long),
            false => Ok(None),
        };
    };
    let len = match lf.checked_sub(1).map(|i| buf[i]) {
        Some(b'\r') => lf - 1,
        _ => lf,
    };
    Ok(Some((len, lf + 1)))
}

/// A chunk-size line's size: hex digits, then optional whitespace and
/// extensions (`;name=value`), which are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(WireError::ChunkSize);
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(WireError::ChunkSize);
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        size = size << 4 | u64::from(d);
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(text: &str) -> Result<Option<Head>, WireError> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |text: &str| {
            let h = head(text).unwrap().unwrap();
            (h.body, h.reusable)
        };
        use Remaining::{Done, Length, UntilClose};
        let chunks = Remaining::Chunked(Chunked::Size);
        for (text, expected) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n",
                (Length(12), true),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 12, 12\r\n\r\n",
                (Length(12), true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                (chunks, true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding:  Chunked \r\n\r\n",
                (chunks, true),
            ),
            (
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n",
                (chunks, false),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                (chunks, false),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", (UntilClose, false)),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
                (Done, true),
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", (Done, true)),
            (
                "HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 1\r\n\r\n",
                (Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                (Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                (Length(1), true),
            ),
        ] {
            assert_eq!(framing(text), expected, "{text:?}");
        }
    }

    #[test]
    fn bad_heads_are_errors_and_short_ones_wait() {
        assert!(head("HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
        assert!(head("").unwrap().is_none());
        for (text, expected) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                WireError::ContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
                WireError::ContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                WireError::ContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                WireError::ContentLength,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
                WireError::ContentLength,
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                WireError::Upgrade,
            ),
            ("HTTP/1.1 099 Odd\r\n\r\n", WireError::Status(99)),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", WireError::TransferCoding),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n", WireError::TransferCoding),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n", WireError::TransferCoding),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n", WireError::TransferCoding),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding:\r\n\r\n", WireError::TransferCoding),
        ] {
            assert_eq!(head(text).unwrap_err(), expected, "{text:?}");
        }
        assert!(matches!(
            head("HTTP/2 200\r\n\r\n"),
            Err(WireError::Head(_))
        ));
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(
            head(&many),
            Err(WireError::Head(httparse::Error::TooManyHeaders))
        ));
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&long).unwrap_err(), WireError::HeadTooLarge);
    }

    #[test]
    fn only_the_kept_headers_are_copied_and_the_head_length_is_known() {
        let text = "HTTP/1.1 200 OK\r\nx-request-id: r\r\nCONTENT-TYPE: text/event-stream\r\n\
                    content-encoding: gzip\r\ncontent-length: 0\r\n\r\nnext";
        let h = head(text).unwrap().unwrap();
        assert_eq!(h.headers.len(), 2);
        assert_eq!(h.headers[header::CONTENT_TYPE], "text/event-stream");
        assert_eq!(h.headers[header::CONTENT_ENCODING], "gzip");
        assert_eq!(&text[h.len..], "next");
    }

    #[test]
    fn the_request_head_carries_the_bodys_length_and_one_host() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        let out = request_head("/v1/x?y=1", &HeaderValue::from_static("h:1"), &headers, 70);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/x?y=1 HTTP/1.1\r\nhost: h:1\r\nauthorization: Bearer k\r\ncontent-length: 70\r\n\r\n"
        );
        headers.insert(header::HOST, HeaderValue::from_static("other"));
        let out = String::from_utf8(request_head(
            "/",
            &HeaderValue::from_static("h:1"),
            &headers,
            0,
        ))
        .unwrap();
        assert_eq!(out.matches("host:").count(), 1, "{out}");
        assert!(out.contains("host: other\r\n"), "{out}");
    }

    /// Decodes `wire` fed in pieces of the given sizes: the body, or the
    /// first error; `None` if it never ended.
    fn decode(wire: &[u8], cuts: &[usize]) -> Option<Result<Vec<u8>, WireError>> {
        let mut remaining = Remaining::Chunked(Chunked::Size);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut cuts = cuts.iter().cycle();
        loop {
            loop {
                match remaining.take(&mut buf) {
                    Ok(Some(data)) => out.extend_from_slice(&data),
                    Ok(None) => break,
                    Err(e) => return Some(Err(e)),
                }
            }
            if remaining.is_done() {
                return Some(Ok(out));
            }
            if fed == wire.len() {
                return None;
            }
            let n = (*cuts.next()?).clamp(1, wire.len() - fed);
            buf.extend_from_slice(&wire[fed..fed + n]);
            fed += n;
        }
    }

    fn chunked(chunks: &[Vec<u8>], extension: bool, bare_lf: bool) -> Vec<u8> {
        let eol = if bare_lf { "\n" } else { "\r\n" };
        let mut wire = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            let ext = if extension { ";name=\"v\"" } else { "" };
            wire.extend_from_slice(format!("{:X}{ext}{eol}", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(eol.as_bytes());
        }
        wire.extend_from_slice(format!("0{eol}t: 1{eol}{eol}").as_bytes());
        wire
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn chunks_decode_whole_however_the_reads_cut_them(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..12),
            cuts in prop::collection::vec(1usize..64, 1..8),
            extension: bool,
            bare_lf: bool,
        ) {
            let wire = chunked(&chunks, extension, bare_lf);
            prop_assert_eq!(decode(&wire, &cuts), Some(Ok(chunks.concat())));
        }

        #[test]
        fn a_mangled_chunked_body_never_panics_nor_gives_more_than_it_was_sent(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..50), 0..6),
            at in any::<prop::sample::Index>(),
            byte: u8,
            cuts in prop::collection::vec(1usize..16, 1..4),
        ) {
            let mut wire = chunked(&chunks, false, false);
            let i = at.index(wire.len());
            wire[i] = byte;
            if let Some(Ok(body)) = decode(&wire, &cuts) {
                prop_assert!(body.len() <= wire.len());
            }
        }
    }

    #[test]
    fn chunk_lines_and_ends_are_checked() {
        let cases: [(&[u8], WireError); 5] = [
            (b"zz\r\n", WireError::ChunkSize),
            (b"\r\n", WireError::ChunkSize),
            (b"11111111111111111\r\n", WireError::ChunkSize),
            (b"2 x\r\n", WireError::ChunkSize),
            (b"2\r\nabX", WireError::ChunkEnd),
        ];
        for (wire, expected) in cases {
            assert_eq!(decode(wire, &[64]), Some(Err(expected.clone())), "{wire:?}");
        }
        let endless = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert_eq!(decode(&endless, &[64]), Some(Err(WireError::ChunkSize)));
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(b"t: 1\r\n".repeat(MAX_TRAILERS / 6 + 10));
        assert_eq!(decode(&trailers, &[64]), Some(Err(WireError::Trailers)));
        // Whitespace before an extension is allowed; the size is hex.
        assert_eq!(
            decode(b"a ;x\r\n0123456789\r\n0\r\n\r\n", &[3]),
            Some(Ok(b"0123456789".to_vec()))
        );
    }

    #[test]
    fn a_length_is_taken_exactly_and_what_follows_stays() {
        let mut remaining = Remaining::Length(5);
        let mut buf = BytesMut::from(&b"abcdefg"[..]);
        assert_eq!(remaining.take(&mut buf).unwrap().unwrap(), "abcde");
        assert!(remaining.is_done());
        assert_eq!(&buf[..], b"fg");
        assert_eq!(remaining.take(&mut buf).unwrap(), None);
    }
}
