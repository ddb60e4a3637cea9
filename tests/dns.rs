//! detour's resolver against a real DNS server on loopback, which each test
//! starts and then breaks: answers are cached for their TTL, the last good
//! addresses outlive a failing DNS for the stale window and no longer, and a
//! gateway keeps serving a provider known by name after its DNS breaks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use detour::dns::{CachingResolver, DnsError, Options};
use tokio::net::UdpSocket;
use tokio::time::{sleep, Instant};

const NAME: &str = "llm.test";
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The TTL of the server's answers, in seconds.
const TTL: u32 = 1;
/// Waits out the TTL of an answer given just before.
const PAST_TTL: Duration = Duration::from_millis(1100);

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// A records for `llm.test`, NXDOMAIN for other names.
    Healthy = 0,
    ServFail = 1,
    NxDomain = 2,
    /// Reads queries and never answers.
    Silent = 3,
}

/// A UDP DNS server on loopback, just enough for A lookups of one name.
struct DnsServer {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    queries: Arc<AtomicUsize>,
}

impl DnsServer {
    async fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Healthy as u8));
        let queries = Arc::new(AtomicUsize::new(0));
        let (m, q) = (Arc::clone(&mode), Arc::clone(&queries));
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                q.fetch_add(1, Ordering::SeqCst);
                let mode = match m.load(Ordering::SeqCst) {
                    0 => Mode::Healthy,
                    1 => Mode::ServFail,
                    2 => Mode::NxDomain,
                    _ => Mode::Silent,
                };
                if let Some(reply) = answer(&buf[..n], mode) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Self {
            addr,
            mode,
            queries,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

/// The reply to one query (RFC 1035 §4.1), or `None` to stay silent.
fn answer(query: &[u8], mode: Mode) -> Option<Vec<u8>> {
    if mode == Mode::Silent || query.len() < 12 {
        return None;
    }
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
    let qtype = u16::from_be_bytes([query[at], query[at + 1]]);
    let known = labels.join(".") == NAME;

    let rcode = match mode {
        Mode::ServFail => 2,
        Mode::NxDomain => 3,
        _ if !known => 3,
        _ => 0,
    };
    let with_a = rcode == 0 && qtype == 1;
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(&query[0..2]); // id
                                           // QR, opcode 0, AA, RD copied; RA; rcode.
    reply.push(0x84 | (query[2] & 0x01));
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

/// Options for fast tests: a short failure recheck, the rest as given.
fn opts(tweak: impl FnOnce(&mut Options)) -> Options {
    let mut o = Options {
        failure_recheck: Duration::from_millis(300),
        refresh_wait: Duration::from_millis(300),
        query_timeout: Some(Duration::from_secs(1)),
        ..Options::default()
    };
    tweak(&mut o);
    o
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl() {
    let dns = DnsServer::start().await;
    let r = CachingResolver::with_servers(&[dns.addr], opts(|_| {})).unwrap();

    for _ in 0..5 {
        assert_eq!(&*r.lookup(NAME).await.unwrap(), &[LOCAL]);
    }
    assert_eq!(dns.queries(), 1, "one query within the TTL");
    // Through reqwest's trait, case and root dot ignored: still the cache.
    let via_trait = reqwest::dns::Resolve::resolve(&r, "LLM.test".parse().unwrap())
        .await
        .unwrap()
        .collect::<Vec<_>>();
    assert_eq!(via_trait, vec![SocketAddr::new(LOCAL, 0)]);
    r.lookup("llm.test.").await.unwrap();
    assert_eq!(dns.queries(), 1);

    sleep(PAST_TTL).await;
    assert_eq!(&*r.lookup(NAME).await.unwrap(), &[LOCAL]);
    assert_eq!(dns.queries(), 2, "asked again after the TTL");
    assert_eq!(r.stale_uses(), 0);
}

#[tokio::test]
async fn ip_literals_and_localhost_never_ask_the_dns() {
    let dns = DnsServer::start().await;
    let r = CachingResolver::with_servers(&[dns.addr], opts(|_| {})).unwrap();
    assert_eq!(&*r.lookup("127.0.0.1").await.unwrap(), &[LOCAL]);
    assert_eq!(r.lookup("localhost").await.unwrap()[0], LOCAL);
    assert_eq!(dns.queries(), 0);
}

/// Resolves `llm.test`, breaks the server as `mode` says, waits out the TTL
/// and resolves again: the last good address, counted as a stale use.
async fn serves_stale_when(mode: Mode) {
    let dns = DnsServer::start().await;
    let r = CachingResolver::with_servers(&[dns.addr], opts(|_| {})).unwrap();
    r.lookup(NAME).await.unwrap();

    dns.set(mode);
    sleep(PAST_TTL).await;
    let before = dns.queries();
    let started = Instant::now();
    assert_eq!(&*r.lookup(NAME).await.unwrap(), &[LOCAL], "{mode:?}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{mode:?}: waited {:?}, more than refresh_wait allows",
        started.elapsed()
    );
    assert!(dns.queries() > before, "{mode:?}: the DNS was asked");
    assert_eq!(r.stale_uses(), 1, "{mode:?}");

    // Within the failure recheck period (or while a silent server's query
    // is still out): stale at once, the DNS left alone.
    let asked = dns.queries();
    let started = Instant::now();
    assert_eq!(&*r.lookup(NAME).await.unwrap(), &[LOCAL]);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{mode:?}: waited {:?} again",
        started.elapsed()
    );
    assert_eq!(r.stale_uses(), 2);
    if mode != Mode::Silent {
        // (A silent server may still be receiving the first lookup's retries.)
        assert_eq!(
            dns.queries(),
            asked,
            "{mode:?}: no query within the recheck period"
        );
    }
}

#[tokio::test]
async fn a_servfail_dns_gets_the_last_good_addresses() {
    serves_stale_when(Mode::ServFail).await;
}

#[tokio::test]
async fn a_silent_dns_gets_the_last_good_addresses_within_refresh_wait() {
    serves_stale_when(Mode::Silent).await;
}

#[tokio::test]
async fn a_sudden_nxdomain_for_a_known_name_gets_the_last_good_addresses() {
    serves_stale_when(Mode::NxDomain).await;
}

#[tokio::test]
async fn a_recovered_dns_gives_fresh_answers_after_the_recheck_period() {
    let dns = DnsServer::start().await;
    let r = CachingResolver::with_servers(&[dns.addr], opts(|_| {})).unwrap();
    r.lookup(NAME).await.unwrap();
    dns.set(Mode::ServFail);
    sleep(PAST_TTL).await;
    r.lookup(NAME).await.unwrap();
    assert_eq!(r.stale_uses(), 1);

    dns.set(Mode::Healthy);
    sleep(r.options().failure_recheck).await;
    let asked = dns.queries();
    assert_eq!(&*r.lookup(NAME).await.unwrap(), &[LOCAL]);
    assert_eq!(dns.queries(), asked + 1, "asked again");
    assert_eq!(r.stale_uses(), 1, "a fresh answer, not a stale one");
}

#[tokio::test]
async fn beyond_the_stale_window_resolution_fails_clearly() {
    let dns = DnsServer::start().await;
    let window = Duration::from_millis(200);
    let r = CachingResolver::with_servers(&[dns.addr], opts(|o| o.stale_window = window)).unwrap();
    r.lookup(NAME).await.unwrap();

    dns.set(Mode::ServFail);
    sleep(PAST_TTL + window + Duration::from_millis(100)).await;
    let err = r.lookup(NAME).await.unwrap_err();
    assert!(
        matches!(&err, DnsError::StaleExpired { name, window: w, .. } if name == NAME && *w == window),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("`llm.test`") && text.contains("stale window"),
        "{text}"
    );
    assert_eq!(r.stale_uses(), 0);
    // Within the recheck period the same error comes back without a query.
    let asked = dns.queries();
    assert!(matches!(
        r.lookup(NAME).await,
        Err(DnsError::StaleExpired { .. })
    ));
    assert_eq!(dns.queries(), asked);
}

#[tokio::test]
async fn a_name_that_never_resolved_fails_at_once() {
    let dns = DnsServer::start().await;
    let r = CachingResolver::with_servers(&[dns.addr], opts(|_| {})).unwrap();
    let err = r.lookup("other.test").await.unwrap_err();
    assert!(
        matches!(&err, DnsError::NotFound { name, .. } if name == "other.test"),
        "{err:?}"
    );

    dns.set(Mode::ServFail);
    let err = r.lookup(NAME).await.unwrap_err();
    assert!(
        matches!(&err, DnsError::Failed { name, .. } if name == NAME),
        "{err:?}"
    );
    assert_eq!(r.stale_uses(), 0);
}

#[tokio::test]
async fn a_gateway_keeps_serving_a_named_provider_after_its_dns_breaks() {
    let dns = DnsServer::start().await;
    // This test binary's provider clients use this resolver; no other test
    // here builds one.
    detour::dns::install_shared(CachingResolver::with_servers(&[dns.addr], opts(|_| {})).unwrap())
        .unwrap();
    let mock = common::mock().await;
    let config = common::one_route(mock.addr(), "", "").replace(
        &format!("http://{}/v1", mock.addr()),
        &format!("http://{NAME}:{}/v1", mock.addr().port()),
    );
    assert!(config.contains("http://llm.test:"), "{config}");
    let client = common::client();
    let chat = |gw: &detour::server::Running| {
        client
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&common::chat(false))
            .send()
    };

    let gw = common::gateway(&config).await;
    assert_eq!(chat(&gw).await.unwrap().status(), 200);
    assert_eq!(dns.queries(), 1);

    dns.set(Mode::ServFail);
    sleep(PAST_TTL).await;
    // The running gateway, and a new one whose clients must open new
    // connections, hence resolve the name while its DNS fails.
    assert_eq!(chat(&gw).await.unwrap().status(), 200);
    let fresh = common::gateway(&config).await;
    assert_eq!(chat(&fresh).await.unwrap().status(), 200);
    assert!(dns.queries() > 1, "the broken DNS was asked");
    assert!(detour::dns::shared().stale_uses() >= 1);
}
