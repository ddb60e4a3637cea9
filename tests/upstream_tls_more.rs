//! Upstream TLS and egress as companies run them: a provider behind a
//! private CA (`ca_file`), one that requires a client certificate (mTLS),
//! HTTP/2 chosen by ALPN (seen by the server), the `tls_verify = false`
//! opt-out, and egress through an HTTP proxy (CONNECT for https, absolute
//! form for http) from the environment or a provider's own `proxy`, with
//! `NO_PROXY` honoured. The proxy is the test's own, and counts what goes
//! through it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// The test proxy records heads under a lock (a test, not the hot path).
#![allow(clippy::disallowed_types)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::serve::{free_port, Serve, BIN, TOKEN};
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A CA of the test's own, as a PEM file, that signs certificates.
struct Ca {
    pem: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca(dir: &Path, name: &str) -> Ca {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let pem = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&pem, cert.pem()).unwrap();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// A certificate for `names` signed by `ca` (self-signed without one), and
/// its key, as PEM files: (cert, key).
fn leaf(dir: &Path, name: &str, names: &[&str], ca: Option<&Ca>) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .unwrap();
    let cert = match ca {
        Some(ca) => params.signed_by(&key, &ca.issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    let files = (
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&files.0, cert.pem()).unwrap();
    std::fs::write(&files.1, key.serialize_pem()).unwrap();
    files
}

/// A TLS front on loopback for `backend`: ALPN h2 and http/1.1, client
/// certificates from `clients` required when given. Each handshake sends
/// `Ok(alpn)` or `Err(why)`.
async fn front(
    (cert, key): &(PathBuf, PathBuf),
    clients: Option<&Ca>,
    backend: SocketAddr,
) -> (SocketAddr, mpsc::UnboundedReceiver<Result<String, String>>) {
    let chain = vec![CertificateDer::from_pem_file(cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(&ca.pem).unwrap())
                .unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let mut tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let alpn = tls.get_ref().1.alpn_protocol().unwrap_or_default();
                let _ = tx.send(Ok(String::from_utf8_lossy(alpn).into_owned()));
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, rx)
}

/// The next handshake's outcome at the front.
async fn handshake(
    rx: &mut mpsc::UnboundedReceiver<Result<String, String>>,
) -> Result<String, String> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a handshake")
        .unwrap()
}

fn provider(name: &str, base_url: &str, extra: &str) -> String {
    format!(
        r#"
[[providers]]
name = "{name}"
kind = "openai-compatible"
base_url = "{base_url}"
{extra}
"#
    )
}

/// One worker thread: every request shares one upstream pool, so the
/// connection and tunnel counts below are exact (each worker has its own).
fn config(listen: &str, providers: &str, target: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"
worker_threads = 1
{providers}
[[routes]]
model = "fast"
targets = [{{ provider = "{target}", model = "m" }}]
retries = {{ max_attempts = 1 }}
"#
    )
}

async fn ask(addr: SocketAddr) -> (u16, String) {
    let r = client()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn a_private_ca_is_trusted_with_ca_file_over_http2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "private");
    let server = leaf(dir.path(), "server", &["localhost"], Some(&ca));
    let upstream = mock().await;
    let (addr, mut handshakes) = front(&server, None, upstream.addr()).await;
    let base = format!("https://localhost:{}/v1", addr.port());

    // Without `ca_file`, nothing vouches for the certificate.
    let gw = gateway(&config(
        "127.0.0.1:0",
        &provider("internal", &base, ""),
        "internal",
    ))
    .await;
    let (status, body) = ask(gw.addr).await;
    assert_eq!(status, 502, "{body}");
    assert!(handshake(&mut handshakes).await.is_err());
    assert_eq!(upstream.stats().requests, 0);

    let extra = format!("ca_file = \"{}\"", path(&ca.pem));
    let gw = gateway(&config(
        "127.0.0.1:0",
        &provider("internal", &base, &extra),
        "internal",
    ))
    .await;
    let (status, body) = ask(gw.addr).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"choices\""), "{body}");
    assert_eq!(
        handshake(&mut handshakes).await.unwrap(),
        "h2",
        "HTTP/2, chosen by ALPN, as the server saw it"
    );
    assert_eq!(upstream.stats().requests, 1);

    let admin_base = admin(&gw, "t0ken").await;
    let view: Value = client()
        .get(format!("{admin_base}/admin/config"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let p = &view["providers"][0];
    assert_eq!(p["ca_file"], path(&ca.pem));
    assert_eq!(p["tls_verify"], true);
}

/// `ca_file` adds roots: the default ones (here the system's store, from
/// `SSL_CERT_FILE`) still vouch for a provider with a `ca_file` of another CA.
#[tokio::test]
async fn ca_file_adds_to_the_default_roots_and_does_not_replace_them() {
    let dir = tempfile::tempdir().unwrap();
    let system = ca(dir.path(), "system");
    let other = ca(dir.path(), "other");
    let server = leaf(dir.path(), "server", &["localhost"], Some(&system));
    let upstream = mock().await;
    let (addr, mut handshakes) = front(&server, None, upstream.addr()).await;
    let listen = free_port();
    let file = dir.path().join("detour.toml");
    let extra = format!("ca_file = \"{}\"", path(&other.pem));
    let base = format!("https://localhost:{}/v1", addr.port());
    std::fs::write(
        &file,
        config(&listen.to_string(), &provider("p", &base, &extra), "p"),
    )
    .unwrap();
    let serve = Serve::start_with_env(&file, &[], &[("SSL_CERT_FILE", &path(&system.pem))]);
    serve.wait_ready(listen).await;
    let (status, body) = ask(listen).await;
    assert_eq!(status, 200, "{body}\n{}", serve.log());
    assert_eq!(handshake(&mut handshakes).await.unwrap(), "h2");
    drop(serve);
    // And without the system's trust, the other CA alone does not vouch.
    let serve = Serve::start(&file, &[]);
    serve.wait_ready(listen).await;
    assert_eq!(ask(listen).await.0, 502);
    assert!(handshake(&mut handshakes).await.is_err());
}

#[tokio::test]
async fn a_server_that_requires_a_client_certificate_gets_it_from_client_cert() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca(dir.path(), "server");
    let client_ca = ca(dir.path(), "clients");
    let server = leaf(dir.path(), "server", &["localhost"], Some(&server_ca));
    let (cert, key) = leaf(dir.path(), "detour", &["detour.internal"], Some(&client_ca));
    // A certificate from another CA: the server refuses it.
    let stranger_ca = ca(dir.path(), "stranger");
    let (other_cert, other_key) = leaf(dir.path(), "other", &["x"], Some(&stranger_ca));
    let upstream = mock().await;
    let (addr, mut handshakes) = front(&server, Some(&client_ca), upstream.addr()).await;
    let base = format!("https://localhost:{}/v1", addr.port());
    let trust = format!("ca_file = \"{}\"\n", path(&server_ca.pem));

    let without = gateway(&config(
        "127.0.0.1:0",
        &provider("mtls", &base, &trust),
        "mtls",
    ))
    .await;
    let (status, body) = ask(without.addr).await;
    assert_eq!(status, 502, "{body}");
    let refused = handshake(&mut handshakes).await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    assert_eq!(upstream.stats().requests, 0);

    let wrong = format!(
        "{trust}client_cert = \"{}\"\nclient_key = \"{}\"",
        path(&other_cert),
        path(&other_key)
    );
    let gw = gateway(&config(
        "127.0.0.1:0",
        &provider("mtls", &base, &wrong),
        "mtls",
    ))
    .await;
    let (status, body) = ask(gw.addr).await;
    assert_eq!(status, 502, "{body}");
    // TLS 1.3: the client learns of the refusal after its handshake ended.
    let _ = tokio::time::timeout(Duration::from_secs(2), handshakes.recv()).await;
    assert_eq!(upstream.stats().requests, 0);

    let with = format!(
        "{trust}client_cert = \"{}\"\nclient_key = \"{}\"",
        path(&cert),
        path(&key)
    );
    let gw = gateway(&config(
        "127.0.0.1:0",
        &provider("mtls", &base, &with),
        "mtls",
    ))
    .await;
    let (status, body) = ask(gw.addr).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(handshake(&mut handshakes).await.unwrap(), "h2");
    assert_eq!(upstream.stats().requests, 1);
}

#[tokio::test]
async fn tls_verify_false_reaches_a_self_signed_server_and_says_so_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = leaf(dir.path(), "self", &["localhost"], None);
    let upstream = mock().await;
    let (addr, mut handshakes) = front(&server, None, upstream.addr()).await;
    let base = format!("https://localhost:{}/v1", addr.port());

    let verified = gateway(&config("127.0.0.1:0", &provider("lab", &base, ""), "lab")).await;
    assert_eq!(ask(verified.addr).await.0, 502);
    assert!(handshake(&mut handshakes).await.is_err());

    let listen = free_port();
    let text = config(
        &listen.to_string(),
        &provider("lab", &base, "tls_verify = false"),
        "lab",
    );
    let file = dir.path().join("detour.toml");
    std::fs::write(&file, &text).unwrap();
    // `detour check`: valid, with the warning.
    let check = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{out}");
    assert!(
        out.contains("warning:") && out.contains("verification is OFF") && out.contains("`lab`"),
        "{out}"
    );
    // `detour serve`: the warning in the log, at start and on every reload.
    let serve = Serve::start(&file, &[]);
    serve.wait_ready(listen).await;
    let (status, body) = ask(listen).await;
    assert_eq!(status, 200, "{body}\n{}", serve.log());
    assert_eq!(handshake(&mut handshakes).await.unwrap(), "h2");
    let warnings = |log: &str| log.matches("verification is OFF").count();
    assert_eq!(warnings(&serve.log()), 1, "{}", serve.log());
    // A reload (SIGHUP) of a changed text warns again.
    std::fs::write(&file, format!("{text}\n# changed\n")).unwrap();
    let pid = serve.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while warnings(&serve.log()) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no warning on reload:\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tls_files_are_checked_at_load_naming_the_file_and_the_provider() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path(), "ok");
    let (cert, key) = leaf(dir.path(), "client", &["c"], Some(&ca));
    let (_, other_key) = leaf(dir.path(), "other", &["c"], Some(&ca));
    let missing = dir.path().join("missing.pem");
    let cases = [
        (
            format!("ca_file = \"{}\"", path(&missing)),
            vec!["providers[0].ca_file", "missing.pem", "`internal`"],
        ),
        (
            // A key is not a certificate.
            format!("ca_file = \"{}\"", path(&key)),
            vec!["providers[0].ca_file", "holds no certificate", "`internal`"],
        ),
        (
            format!("client_cert = \"{}\"", path(&cert)),
            vec![
                "providers[0].client_cert",
                "needs `client_key`",
                "`internal`",
            ],
        ),
        (
            format!(
                "client_cert = \"{}\"\nclient_key = \"{}\"",
                path(&cert),
                path(&other_key)
            ),
            vec!["providers[0].client_cert", "does not go with", "`internal`"],
        ),
        (
            "proxy = \"socks5://proxy:1080\"".to_owned(),
            vec!["providers[0].proxy", "not supported", "`internal`"],
        ),
    ];
    let file = dir.path().join("detour.toml");
    for (extra, words) in cases {
        let text = config(
            "127.0.0.1:0",
            &provider("internal", "https://internal.example/v1", &extra),
            "internal",
        );
        std::fs::write(&file, text).unwrap();
        let check = std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(2), "{extra}: {err}");
        for w in words {
            assert!(err.contains(w), "{extra}: `{w}` not in {err}");
        }
    }
    // A relative path is refused: the same text is also loaded elsewhere
    // (last-known-good, other replicas), where it would name another file.
    let text = config(
        "127.0.0.1:0",
        &provider(
            "internal",
            "https://internal.example/v1",
            "ca_file = \"ok-ca.pem\"",
        ),
        "internal",
    );
    std::fs::write(&file, text).unwrap();
    let check = std::process::Command::new(BIN)
        .current_dir(dir.path())
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    assert!(
        err.contains("absolute path") && err.contains("`internal`"),
        "{err}"
    );
}

/// An HTTP proxy of the test's own: `CONNECT host:port` tunnels and
/// absolute-form requests, every host being this machine's loopback (so
/// names only the proxy "resolves" work through it). Counts both, keeps
/// each connection's first head, and wants `proxy-authorization` when
/// given one.
struct Proxy {
    addr: SocketAddr,
    tunnels: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    async fn start(auth: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            tunnels: Arc::default(),
            forwarded: Arc::default(),
            heads: Arc::default(),
        };
        let (tunnels, forwarded, heads) = (
            Arc::clone(&proxy.tunnels),
            Arc::clone(&proxy.forwarded),
            Arc::clone(&proxy.heads),
        );
        let auth = auth.map(|a| format!("proxy-authorization: basic {}", base64(a)).to_lowercase());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (tunnels, forwarded, heads, auth) = (
                    Arc::clone(&tunnels),
                    Arc::clone(&forwarded),
                    Arc::clone(&heads),
                    auth.clone(),
                );
                tokio::spawn(async move {
                    let _ = Self::serve(conn, auth, tunnels, forwarded, heads).await;
                });
            }
        });
        proxy
    }

    async fn serve(
        mut conn: TcpStream,
        auth: Option<String>,
        tunnels: Arc<AtomicUsize>,
        forwarded: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await?;
            if n == 0 || buf.len() > 64 * 1024 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        heads.lock().unwrap().push(head.clone());
        if let Some(auth) = auth {
            if !head.to_lowercase().contains(&auth) {
                conn.write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n",
                )
                .await?;
                return Ok(());
            }
        }
        let mut words = head.split(' ');
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let port: u16 = match method {
            "CONNECT" => target.rsplit(':').next().unwrap_or("").parse().unwrap_or(0),
            _ => target
                .strip_prefix("http://")
                .and_then(|t| t.split('/').next())
                .and_then(|hp| hp.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
        };
        let mut up = TcpStream::connect(("127.0.0.1", port)).await?;
        if method == "CONNECT" {
            tunnels.fetch_add(1, Ordering::SeqCst);
            conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            up.write_all(&buf[end..]).await?;
        } else {
            forwarded.fetch_add(1, Ordering::SeqCst);
            up.write_all(&buf).await?;
        }
        tokio::io::copy_bidirectional(&mut conn, &mut up).await?;
        Ok(())
    }

    fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }

    fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn base64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A TLS provider at `https://internal.test:<port>` (a name only the
/// test's proxy knows), its CA in `ca.pem`.
async fn internal(dir: &Path) -> (String, PathBuf, detour::mock::MockServer) {
    let ca = ca(dir, "internal");
    let server = leaf(dir, "internal", &["internal.test", "localhost"], Some(&ca));
    let upstream = mock().await;
    let (addr, _handshakes) = front(&server, None, upstream.addr()).await;
    (format!("internal.test:{}", addr.port()), ca.pem, upstream)
}

#[tokio::test]
async fn https_proxy_from_the_environment_tunnels_and_no_proxy_bypasses_it() {
    let dir = tempfile::tempdir().unwrap();
    let (host, ca, upstream) = internal(dir.path()).await;
    let proxy = Proxy::start(Some("team:s3cret-proxy-pw")).await;
    let listen = free_port();
    let file = dir.path().join("detour.toml");
    let trust = format!("ca_file = \"{}\"", path(&ca));
    std::fs::write(
        &file,
        config(
            &listen.to_string(),
            &provider("internal", &format!("https://{host}/v1"), &trust),
            "internal",
        ),
    )
    .unwrap();
    let proxy_url = format!("http://team:s3cret-proxy-pw@{}", proxy.addr);

    // Through the proxy: one tunnel, authenticated, TLS end to end.
    let serve = Serve::start_with_env(&file, &[], &[("HTTPS_PROXY", &proxy_url)]);
    serve.wait_ready(listen).await;
    for _ in 0..3 {
        let (status, body) = ask(listen).await;
        assert_eq!(status, 200, "{body}\n{}", serve.log());
    }
    assert_eq!(proxy.tunnels(), 1, "one pooled connection, one tunnel");
    assert_eq!(upstream.stats().requests, 3);
    let head = &proxy.heads()[0];
    assert!(
        head.starts_with(&format!("CONNECT {host} HTTP/1.1\r\n")),
        "{head}"
    );
    assert!(!serve.log().contains("s3cret-proxy-pw"), "{}", serve.log());
    drop(serve);

    // The lowercase form, and NO_PROXY naming the host: direct, so the name
    // (which only the proxy knows) does not resolve, and nothing reached
    // the proxy.
    let serve = Serve::start_with_env(
        &file,
        &[],
        &[
            ("https_proxy", &proxy_url),
            ("NO_PROXY", "example.com, .test"),
        ],
    );
    serve.wait_ready(listen).await;
    let (status, body) = ask(listen).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(proxy.tunnels(), 1, "NO_PROXY: not through the proxy");
    drop(serve);

    // Without the credentials the proxy refuses the tunnel.
    let serve = Serve::start_with_env(
        &file,
        &[],
        &[("HTTPS_PROXY", &format!("http://{}", proxy.addr))],
    );
    serve.wait_ready(listen).await;
    let (status, body) = ask(listen).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(proxy.tunnels(), 1);
    assert_eq!(proxy.heads().len(), 2, "the refused CONNECT was seen");
    assert_eq!(upstream.stats().requests, 3);
}

#[tokio::test]
async fn a_providers_own_proxy_overrides_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (host, ca, upstream) = internal(dir.path()).await;
    let env_proxy = Proxy::start(None).await;
    let own_proxy = Proxy::start(Some("me:own-pw-123")).await;
    let plain = mock().await;
    let trust = format!("ca_file = \"{}\"", path(&ca));
    let providers = [
        provider(
            "via-own",
            &format!("https://{host}/v1"),
            &format!(
                "{trust}\nproxy = \"http://me:own-pw-123@{}\"",
                own_proxy.addr
            ),
        ),
        provider(
            "none",
            &format!("https://localhost:{}/v1", host.rsplit(':').next().unwrap()),
            &format!("{trust}\nproxy = \"\""),
        ),
        // A plain-http provider through its proxy: absolute form.
        provider(
            "plain",
            &format!("http://{}/v1", plain.addr()),
            &format!("proxy = \"http://me:own-pw-123@{}\"", own_proxy.addr),
        ),
    ]
    .concat();
    let listen = free_port();
    let admin_listen = free_port();
    let text = format!(
        r#"[server]
listen = "{listen}"
admin_listen = "{admin_listen}"
{providers}
[[routes]]
model = "fast"
targets = [{{ provider = "via-own", model = "m" }}]
retries = {{ max_attempts = 1 }}

[[routes]]
model = "direct"
targets = [{{ provider = "none", model = "m" }}]
retries = {{ max_attempts = 1 }}

[[routes]]
model = "plain"
targets = [{{ provider = "plain", model = "m" }}]
retries = {{ max_attempts = 1 }}
"#
    );
    let file = dir.path().join("detour.toml");
    std::fs::write(&file, text).unwrap();
    let env_url = format!("http://{}", env_proxy.addr);
    let serve = Serve::start_with_env(
        &file,
        &[],
        &[("HTTPS_PROXY", &env_url), ("HTTP_PROXY", &env_url)],
    );
    serve.wait_ready(listen).await;
    let call = |model: &'static str| async move {
        let r = client()
            .post(format!("http://{listen}/v1/chat/completions"))
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, body) = call("fast").await;
    assert_eq!(status, 200, "{body}\n{}", serve.log());
    assert_eq!((own_proxy.tunnels(), env_proxy.tunnels()), (1, 0));

    let (status, body) = call("direct").await;
    assert_eq!(status, 200, "{body}\n{}", serve.log());
    assert_eq!(
        (own_proxy.tunnels(), env_proxy.tunnels()),
        (1, 0),
        "proxy = \"\": direct"
    );
    assert_eq!(upstream.stats().requests, 2);

    let (status, body) = call("plain").await;
    assert_eq!(status, 200, "{body}\n{}", serve.log());
    assert_eq!(own_proxy.forwarded(), 1);
    assert_eq!(env_proxy.forwarded(), 0);
    let head = own_proxy
        .heads()
        .into_iter()
        .find(|h| h.starts_with("POST "))
        .unwrap();
    assert!(
        head.starts_with(&format!(
            "POST http://{}/v1/chat/completions HTTP/1.1\r\n",
            plain.addr()
        )),
        "absolute form: {head}"
    );
    assert_eq!(plain.stats().requests, 1);
    assert!(
        head.to_lowercase().contains(
            &format!("proxy-authorization: basic {}", base64("me:own-pw-123")).to_lowercase()
        ),
        "{head}"
    );
    // The proxy's credentials never reach the operator's eyes.
    let view = client()
        .get(format!("http://{admin_listen}/admin/config"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!view.contains("own-pw-123"), "{view}");
    assert!(
        view.contains(&format!("http://me:***@{}", own_proxy.addr)),
        "{view}"
    );
    assert!(!serve.log().contains("own-pw-123"), "{}", serve.log());
}
