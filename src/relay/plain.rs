//! A body relayed chunk by chunk (non-streamed JSON in the client's own
//! format): nothing is framed or parsed on the way, but a copy of a small
//! body is kept (as cheap `Bytes` handles) to read its usage once it ends.

use bytes::Bytes;

use crate::protocol::openai::{usage_of, Usage};

/// Bodies up to this size are kept to read usage from once they end.
pub const USAGE_SCAN_LIMIT: usize = 256 * 1024;

/// The chunks of a plain body, while it is small enough to scan.
#[derive(Default)]
pub struct UsageScan {
    kept: Vec<Bytes>,
    len: usize,
}

impl UsageScan {
    /// Notes one chunk as it is relayed.
    pub fn push(&mut self, data: &Bytes) {
        self.len = self.len.saturating_add(data.len());
        if self.len <= USAGE_SCAN_LIMIT {
            self.kept.push(data.clone());
        } else {
            self.kept.clear();
        }
    }

    /// The body's usage, or `None` when the body outgrew the scan (then
    /// nothing is known and nothing should be recorded).
    pub fn usage(&self) -> Option<Option<Usage>> {
        if self.len > USAGE_SCAN_LIMIT {
            return None;
        }
        Some(match self.kept.as_slice() {
            [one] => usage_of(one),
            many => usage_of(&many.concat()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str =
        r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;

    #[test]
    fn usage_is_read_across_chunks() {
        let mut scan = UsageScan::default();
        let (a, b) = BODY.split_at(30);
        scan.push(&Bytes::copy_from_slice(a.as_bytes()));
        scan.push(&Bytes::copy_from_slice(b.as_bytes()));
        assert_eq!(scan.usage().flatten().map(|u| u.total_tokens), Some(5));
    }

    #[test]
    fn a_body_without_usage_reports_none() {
        let mut scan = UsageScan::default();
        scan.push(&Bytes::from_static(b"{}"));
        assert_eq!(scan.usage(), Some(None));
    }

    #[test]
    fn a_body_over_the_limit_is_not_scanned() {
        let mut scan = UsageScan::default();
        scan.push(&Bytes::from(vec![b' '; USAGE_SCAN_LIMIT]));
        scan.push(&Bytes::from_static(BODY.as_bytes()));
        assert_eq!(scan.usage(), None);
        assert!(scan.kept.is_empty(), "nothing is held once over the limit");
    }
}
