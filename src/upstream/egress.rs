//! Egress through an HTTP proxy: which proxy a provider's requests take
//! (decided once, when its client is built), and the connector that takes
//! them there.
//!
//! The proxy comes from the provider's `proxy` (a URL, or `""` for none),
//! else from the environment as curl reads it (`HTTPS_PROXY`, `HTTP_PROXY`,
//! `ALL_PROXY`, `NO_PROXY`, and their lowercase forms), through hyper-util's
//! [`Matcher`]; as in Go's HTTP client, the environment's proxy is never
//! used for a loopback destination (`localhost`, `127.0.0.0/8`, `::1`: a
//! model server beside detour is not behind the egress proxy), while a
//! provider's own `proxy` applies whatever the host. A provider whose base URL the rules leave direct gets the
//! plain client, unchanged: a proxy costs nothing to those that do not use
//! it.
//!
//! `https` targets go through an HTTP `CONNECT` tunnel (hyper-util's
//! [`Tunnel`]), TLS and ALPN end to end with the provider. Plain `http`
//! targets are sent to the proxy in absolute form (`POST http://host/path`),
//! as curl does and as `HTTP_PROXY` means: proxies commonly allow `CONNECT`
//! to port 443 only, and an internal plain-HTTP server on another port would
//! be refused through a tunnel.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;

use super::BuildError;
use crate::config::ProxySetting;
use crate::dns::ForConnector;

type Http = HttpConnector<ForConnector>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxy a provider's requests to `dst` take, if any.
#[derive(Debug)]
pub struct Route {
    /// `http://host:port/` of the proxy, without credentials.
    pub proxy: Uri,
    /// `Basic ...` from the proxy URL's credentials (marked sensitive).
    pub auth: Option<HeaderValue>,
}

/// The environment's proxy rules, read once per process.
fn environment() -> &'static Matcher {
    static ENV: OnceLock<Matcher> = OnceLock::new();
    ENV.get_or_init(Matcher::from_env)
}

/// Which proxy requests to `dst` (a provider's base URL) go through.
pub fn route(setting: &ProxySetting, dst: &Uri) -> Result<Option<Route>, BuildError> {
    let own;
    let matcher = match setting {
        ProxySetting::Direct => return Ok(None),
        ProxySetting::Environment if dst.host().is_some_and(loopback) => return Ok(None),
        ProxySetting::Environment => environment(),
        ProxySetting::Url(url) => {
            own = Matcher::builder().all(url.expose().as_str()).build();
            &own
        }
    };
    let Some(intercept) = matcher.intercept(dst) else {
        return Ok(None);
    };
    let proxy = intercept.uri().clone();
    if proxy.scheme_str() != Some("http") {
        return Err(BuildError::Proxy(format!(
            "`{}` proxies are not supported (the proxy for {}); use an http:// proxy",
            proxy.scheme_str().unwrap_or_default(),
            dst.host().unwrap_or_default()
        )));
    }
    Ok(Some(Route {
        proxy,
        auth: intercept.basic_auth().cloned(),
    }))
}

/// `localhost` (and its subdomains) or a loopback address.
fn loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// Connects through the proxy of a [`Route`]: a tunnel for `https`
/// destinations, the proxy itself (marked proxied, so the request goes in
/// absolute form) for `http` ones.
#[derive(Clone)]
pub struct Egress {
    http: Http,
    proxy: Uri,
    tunnel: Tunnel<Http>,
}

impl Egress {
    pub fn new(http: Http, route: &Route) -> Self {
        let mut tunnel = Tunnel::new(route.proxy.clone(), http.clone());
        if let Some(auth) = &route.auth {
            tunnel = tunnel.with_auth(auth.clone());
        }
        Self {
            http,
            proxy: route.proxy.clone(),
            tunnel,
        }
    }
}

impl Service<Uri> for Egress {
    type Response = Proxied;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Proxied, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Both are ready together: the tunnel's readiness is its connector's.
        self.tunnel.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        if dst.scheme() == Some(&http::uri::Scheme::HTTPS) {
            let tunnel = self.tunnel.call(dst);
            Box::pin(async move {
                Ok(Proxied {
                    io: tunnel.await?,
                    absolute_form: false,
                })
            })
        } else {
            let connecting = self.http.call(self.proxy.clone());
            Box::pin(async move {
                Ok(Proxied {
                    io: connecting.await?,
                    absolute_form: true,
                })
            })
        }
    }
}

/// A connection through a proxy: a tunnel, or the proxy itself.
pub struct Proxied {
    io: TokioIo<TcpStream>,
    absolute_form: bool,
}

impl Connection for Proxied {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.absolute_form)
    }
}

impl Read for Proxied {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Proxied {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn a_providers_own_proxy_takes_every_scheme_and_keeps_its_credentials_apart() {
        let setting = ProxySetting::parse("http://user:p%40ss@proxy.internal:3128").unwrap();
        for dst in ["https://api.example/v1", "http://10.0.0.7:8000/v1"] {
            let route = route(&setting, &uri(dst)).unwrap().unwrap();
            assert_eq!(route.proxy, uri("http://proxy.internal:3128/"));
            // base64("user:p@ss")
            assert_eq!(route.auth.unwrap(), "Basic dXNlcjpwQHNz");
        }
        // Also to a loopback destination: the provider asked for it.
        assert!(route(&setting, &uri("http://127.0.0.1:8000/v1"))
            .unwrap()
            .is_some());
        let direct = ProxySetting::parse("").unwrap();
        assert!(route(&direct, &uri("https://api.example/v1"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST.",
            "vllm.localhost",
            "127.0.0.1",
            "127.8.9.1",
            "[::1]",
        ] {
            assert!(loopback(host), "{host}");
        }
        for host in ["localhost.example", "10.0.0.1", "[::2]", "api.openai.com"] {
            assert!(!loopback(host), "{host}");
        }
    }
}
