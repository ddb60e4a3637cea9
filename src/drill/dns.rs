//! The drill's own DNS: a UDP responder on loopback that answers A queries
//! for `*.drill.test` with 127.0.0.1 (TTL 1 s), and that a scenario can
//! break (SERVFAIL for every query), as the cluster DNS broke in December
//! 2024. The drill makes it detour's resolver (`dns::install_shared`), so the
//! mocks are reached by name through the same cache, stale window included,
//! that serves real providers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;

/// The domain the drill's DNS answers for.
pub const DOMAIN: &str = "drill.test";
/// The TTL of every answer, in seconds: short, so a failure is felt soon.
const TTL: u32 = 1;

/// A running responder; stops when dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    failing: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start() -> std::io::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = socket.local_addr()?;
        let failing = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let (f, q) = (Arc::clone(&failing), Arc::clone(&queries));
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                q.fetch_add(1, Ordering::Relaxed);
                let query = buf.get(..n).unwrap_or_default();
                if let Some(reply) = answer(query, f.load(Ordering::Relaxed)) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Ok(Self {
            addr,
            failing,
            queries,
            task,
        })
    }

    /// Every query answered SERVFAIL (`true`) or answered again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one query (RFC 1035 §4.1), or `None` for a packet that is
/// not one.
fn answer(query: &[u8], failing: bool) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    // The question: labels up to the root, then QTYPE and QCLASS.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let question = query.get(12..at + 4)?;
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let name = labels.join(".");
    let ours = name.ends_with(&format!(".{DOMAIN}"));
    let rcode = match (failing, ours) {
        (true, _) => 2,
        (false, false) => 3,
        // Ours: an address for A, an empty answer for anything else.
        (false, true) => 0,
    };
    let with_a = rcode == 0 && qtype == 1;
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(header.get(0..2)?); // id
                                                // QR, opcode 0, AA, RD copied; RA; rcode.
    reply.push(0x84 | (header.get(2)? & 0x01));
    reply.push(0x80 | rcode);
    reply.extend_from_slice(&[0, 1, 0, u8::from(with_a), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if with_a {
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]); // name → question, A, IN
        reply.extend_from_slice(&TTL.to_be_bytes());
        reply.extend_from_slice(&[0, 4, 127, 0, 0, 1]);
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(u8::try_from(label.len()).unwrap_or(0));
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    #[test]
    fn answers_its_names_and_fails_on_demand() {
        let a = answer(&query("p0.drill.test", 1), false).unwrap_or_default();
        assert_eq!(a[3] & 0x0f, 0);
        assert_eq!(&a[a.len() - 4..], &[127, 0, 0, 1]);
        let other = answer(&query("example.com", 1), false).unwrap_or_default();
        assert_eq!(other[3] & 0x0f, 3, "NXDOMAIN for other names");
        let failed = answer(&query("p0.drill.test", 1), true).unwrap_or_default();
        assert_eq!(failed[3] & 0x0f, 2, "SERVFAIL while failing");
        assert!(answer(&[1, 2, 3], false).is_none());
    }
}
