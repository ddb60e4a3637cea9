//! An [`Entry`] as bytes, for a backend outside the process (Redis): a
//! compact, self-describing, versioned layout that carries the entry's
//! owner (tenant and request hash) inside the value, so
//! [`Cache`](super::Cache) checks every entry read back whatever key it was
//! read under.
//!
//! Layout (integers big-endian; strings UTF-8, length-prefixed):
//!
//! | field | bytes |
//! |---|---|
//! | magic and version `dtc1` | 4 |
//! | format (`0` openai, `1` anthropic) | 1 |
//! | flags (bit 0: stream, bit 1: a content type follows) | 1 |
//! | status | 2 |
//! | stored_at, ms since the Unix epoch | 8 |
//! | ttl, ms | 8 |
//! | request_hash | 32 |
//! | tenant, content_type (if flagged), provider, model | u16 length + bytes each |
//! | body | u32 length + bytes |
//!
//! Decoding is strict: a wrong magic, an unknown format or flag bit, a
//! length past the end, invalid UTF-8 or bytes left over is an error (the
//! backend's caller treats it as a miss). Nothing is allocated beyond the
//! value's own size.

use std::time::{Duration, UNIX_EPOCH};

use bytes::{BufMut, Bytes};

use super::{Entry, Key};
use crate::protocol::chat::ClientFormat;

const MAGIC: &[u8; 4] = b"dtc1";
const STREAM: u8 = 0b01;
const HAS_CONTENT_TYPE: u8 = 0b10;
/// Bytes of the fixed part, before the strings.
const FIXED: usize = 4 + 1 + 1 + 2 + 8 + 8 + 32;

/// Why a value is not an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a detour cache entry (or of another version)")]
    Magic,
    #[error("the value ends inside a field")]
    Truncated,
    #[error("unknown client format {0}")]
    Format(u8),
    #[error("unknown flags {0:#04x}")]
    Flags(u8),
    #[error("a text field is not UTF-8")]
    Utf8,
    #[error("bytes after the body")]
    Trailing,
}

/// Why an entry cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a text field is longer than 65535 bytes")]
    FieldTooLong,
    #[error("the body is longer than 4 GiB")]
    BodyTooLong,
}

/// The bytes of `e`.
pub fn encode(e: &Entry) -> Result<Vec<u8>, EncodeError> {
    let texts = [
        Some(e.tenant.as_str()),
        e.content_type.as_deref(),
        Some(e.provider.as_str()),
        Some(e.model.as_str()),
    ];
    let text_len: usize = texts.iter().flatten().map(|t| 2 + t.len()).sum();
    let mut out = Vec::with_capacity(FIXED + text_len + 4 + e.body.len());
    out.put_slice(MAGIC);
    out.put_u8(match e.format {
        ClientFormat::OpenAi => 0,
        ClientFormat::Anthropic => 1,
        ClientFormat::Responses => 2,
    });
    let mut flags = 0;
    if e.stream {
        flags |= STREAM;
    }
    if e.content_type.is_some() {
        flags |= HAS_CONTENT_TYPE;
    }
    out.put_u8(flags);
    out.put_u16(e.status);
    out.put_u64(millis(
        e.stored_at.duration_since(UNIX_EPOCH).unwrap_or_default(),
    ));
    out.put_u64(millis(e.ttl));
    out.put_slice(e.request_hash.as_bytes());
    for t in texts.into_iter().flatten() {
        let len = u16::try_from(t.len()).map_err(|_| EncodeError::FieldTooLong)?;
        out.put_u16(len);
        out.put_slice(t.as_bytes());
    }
    let len = u32::try_from(e.body.len()).map_err(|_| EncodeError::BodyTooLong)?;
    out.put_u32(len);
    out.put_slice(&e.body);
    Ok(out)
}

/// The entry `value` holds. The body is a zero-copy slice of `value`.
pub fn decode(value: Bytes) -> Result<Entry, DecodeError> {
    let mut r = Reader { buf: &value, at: 0 };
    if r.take(4)? != MAGIC {
        return Err(DecodeError::Magic);
    }
    let format = match r.u8()? {
        0 => ClientFormat::OpenAi,
        1 => ClientFormat::Anthropic,
        2 => ClientFormat::Responses,
        n => return Err(DecodeError::Format(n)),
    };
    let flags = r.u8()?;
    if flags & !(STREAM | HAS_CONTENT_TYPE) != 0 {
        return Err(DecodeError::Flags(flags));
    }
    let status = u16::from_be_bytes(r.array()?);
    let stored_at = UNIX_EPOCH + Duration::from_millis(u64::from_be_bytes(r.array()?));
    let ttl = Duration::from_millis(u64::from_be_bytes(r.array()?));
    let request_hash = Key::from_bytes(r.array()?);
    let tenant = r.text()?;
    let content_type = if flags & HAS_CONTENT_TYPE != 0 {
        Some(r.text()?)
    } else {
        None
    };
    let provider = r.text()?;
    let model = r.text()?;
    let body_len = u32::from_be_bytes(r.array()?) as usize;
    let start = r.at;
    r.take(body_len)?;
    if r.at != value.len() {
        return Err(DecodeError::Trailing);
    }
    Ok(Entry {
        tenant,
        request_hash,
        format,
        stream: flags & STREAM != 0,
        status,
        content_type,
        provider,
        model,
        body: value.slice(start..start + body_len),
        stored_at,
        ttl,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let bytes = self.buf.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let len = u16::from_be_bytes(self.array()?) as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chat::Endpoint;

    fn entry(content_type: Option<&str>, stream: bool) -> Entry {
        let key = Key::of(
            "tenant-a",
            ClientFormat::Anthropic,
            Endpoint::Messages,
            stream,
            b"{\"a\":1}",
        )
        .unwrap();
        Entry {
            tenant: "tenant-a".into(),
            request_hash: key,
            format: ClientFormat::Anthropic,
            stream,
            status: 200,
            content_type: content_type.map(str::to_owned),
            provider: "prov".into(),
            model: "model-é".into(),
            body: Bytes::from_static(b"data: x\n\ndata: [DONE]\n\n"),
            stored_at: UNIX_EPOCH + Duration::from_millis(1_750_000_000_123),
            ttl: Duration::from_millis(90_500),
        }
    }

    fn same(a: &Entry, b: &Entry) -> bool {
        (
            &a.tenant,
            a.request_hash,
            a.format,
            a.stream,
            a.status,
            &a.content_type,
            &a.provider,
            &a.model,
            &a.body,
            a.stored_at,
            a.ttl,
        ) == (
            &b.tenant,
            b.request_hash,
            b.format,
            b.stream,
            b.status,
            &b.content_type,
            &b.provider,
            &b.model,
            &b.body,
            b.stored_at,
            b.ttl,
        )
    }

    #[test]
    fn every_field_survives_the_round_trip() {
        for (ct, stream) in [
            (Some("text/event-stream"), true),
            (None, false),
            (Some(""), false),
        ] {
            let e = entry(ct, stream);
            let bytes = encode(&e).unwrap();
            let back = decode(Bytes::from(bytes)).unwrap();
            assert!(same(&e, &back), "{e:?} != {back:?}");
        }
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_refused() {
        let bytes = encode(&entry(Some("application/json"), false)).unwrap();
        for n in 0..bytes.len() {
            assert!(
                decode(Bytes::copy_from_slice(&bytes[..n])).is_err(),
                "a value cut at {n} of {} decoded",
                bytes.len()
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(Bytes::from(longer)).err(),
            Some(DecodeError::Trailing)
        );
    }

    #[test]
    fn foreign_values_are_refused() {
        let good = encode(&entry(None, false)).unwrap();
        let mut magic = good.clone();
        magic[3] = b'2';
        assert_eq!(decode(Bytes::from(magic)).err(), Some(DecodeError::Magic));
        let mut format = good.clone();
        format[4] = 7;
        assert_eq!(
            decode(Bytes::from(format)).err(),
            Some(DecodeError::Format(7))
        );
        let mut flags = good.clone();
        flags[5] = 0x80;
        assert_eq!(
            decode(Bytes::from(flags)).err(),
            Some(DecodeError::Flags(0x80))
        );
        let mut utf8 = good;
        // The tenant's first byte.
        utf8[FIXED + 2] = 0xff;
        assert_eq!(decode(Bytes::from(utf8)).err(), Some(DecodeError::Utf8));
        assert_eq!(
            decode(Bytes::from_static(b"{\"json\":true}")).err(),
            Some(DecodeError::Magic)
        );
        // A body length far past the end allocates nothing and fails.
        let mut huge = encode(&entry(None, false)).unwrap();
        let body_len_at = huge.len() - 4 - entry(None, false).body.len();
        huge[body_len_at..body_len_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode(Bytes::from(huge)).err(),
            Some(DecodeError::Truncated)
        );
    }

    #[test]
    fn an_oversized_text_field_is_not_encoded() {
        let mut e = entry(None, false);
        e.model = "m".repeat(70_000);
        assert_eq!(encode(&e).err(), Some(EncodeError::FieldTooLong));
    }
}
