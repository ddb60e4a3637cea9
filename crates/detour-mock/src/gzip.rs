//! A gzip writer for the `gzip` fault, without a compression crate: one gzip member
//! (RFC 1952) whose deflate stream (RFC 1951 §3.2.4) is made of stored blocks. It
//! compresses nothing, but every gzip decoder reads it, and it can be cut at any
//! part: each part of the input becomes its own blocks, so a stream's events are
//! still sent one frame at a time.

use bytes::{BufMut, Bytes, BytesMut};

/// gzip header: magic, deflate, no flags, no mtime, no extra flags, unknown OS.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// Largest stored block.
const MAX_BLOCK: usize = 0xffff;

/// Encodes `parts` as one gzip member: the header goes with the first part, the
/// final block and the trailer are one more part at the end.
pub(crate) fn member(parts: &[Bytes]) -> Vec<Bytes> {
    let mut crc = Crc32::default();
    let mut len: u32 = 0;
    let mut out = Vec::with_capacity(parts.len() + 1);
    for (i, part) in parts.iter().enumerate() {
        let mut buf = BytesMut::with_capacity(part.len() + 16);
        if i == 0 {
            buf.put_slice(&HEADER);
        }
        for block in part.chunks(MAX_BLOCK) {
            stored_block(&mut buf, block, false);
        }
        crc.update(part);
        len = len.wrapping_add(part.len() as u32);
        out.push(buf.freeze());
    }
    let mut tail = BytesMut::with_capacity(HEADER.len() + 13);
    if parts.is_empty() {
        tail.put_slice(&HEADER);
    }
    stored_block(&mut tail, &[], true);
    tail.put_u32_le(crc.finish());
    tail.put_u32_le(len);
    out.push(tail.freeze());
    out
}

/// One whole body as gzip.
pub(crate) fn body(bytes: &Bytes) -> Bytes {
    let mut out = BytesMut::new();
    for part in member(std::slice::from_ref(bytes)) {
        out.put_slice(&part);
    }
    out.freeze()
}

/// A stored block starts on a byte boundary: BFINAL and BTYPE=00 fill the first
/// byte, then LEN and its complement.
fn stored_block(buf: &mut BytesMut, data: &[u8], last: bool) {
    buf.put_u8(u8::from(last));
    let len = data.len() as u16;
    buf.put_u16_le(len);
    buf.put_u16_le(!len);
    buf.put_slice(data);
}

/// CRC-32 (IEEE 802.3, reflected), bit by bit: mock bodies are small.
#[derive(Default)]
struct Crc32(u32);

impl Crc32 {
    fn update(&mut self, data: &[u8]) {
        let mut crc = !self.0;
        for byte in data {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        self.0 = !crc;
    }

    fn finish(&self) -> u32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_of_the_check_string() {
        let mut crc = Crc32::default();
        crc.update(b"123456789");
        assert_eq!(crc.finish(), 0xcbf4_3926);
    }

    #[test]
    fn a_member_is_header_blocks_and_trailer() {
        let out = body(&Bytes::from_static(b"hi"));
        assert_eq!(&out[..10], &HEADER);
        // Block "hi", the final empty block, CRC and size.
        assert_eq!(&out[10..17], &[0, 2, 0, 0xfd, 0xff, b'h', b'i']);
        assert_eq!(&out[17..22], &[1, 0, 0, 0xff, 0xff]);
        assert_eq!(&out[26..30], &2u32.to_le_bytes());
        assert_eq!(out.len(), 30);
    }
}
