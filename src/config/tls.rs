//! A provider's TLS and egress settings: `ca_file`, `client_cert` /
//! `client_key`, `tls_verify` and `proxy`, and the reading of the PEM files
//! they name (at load, so that `detour check` and a reload see a missing or
//! broken file, never the first request).

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use url::Url;

/// How detour's TLS to one provider differs from the default: the bundled
/// and system roots, certificates verified, no client certificate.
#[derive(Debug)]
pub struct ProviderTls {
    /// `ca_file`: roots trusted for this provider on top of the default ones.
    pub ca: Option<CaFile>,
    /// `client_cert` + `client_key`: the certificate detour presents (mTLS).
    pub identity: Option<ClientIdentity>,
    /// `tls_verify`: `false` accepts any certificate (an explicit opt-out,
    /// warned about at every load).
    pub verify: bool,
}

impl Default for ProviderTls {
    fn default() -> Self {
        Self {
            ca: None,
            identity: None,
            verify: true,
        }
    }
}

impl ProviderTls {
    /// Whether the shared default TLS config serves this provider.
    pub fn is_default(&self) -> bool {
        self.ca.is_none() && self.identity.is_none() && self.verify
    }
}

/// The certificates of a `ca_file`.
#[derive(Debug)]
pub struct CaFile {
    pub path: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
}

/// A client certificate chain and its private key, read from PEM files.
pub struct ClientIdentity {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Which proxy a provider's connections go through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProxySetting {
    /// No `proxy` key: `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and
    /// `NO_PROXY` (or their lowercase forms) from the environment.
    #[default]
    Environment,
    /// `proxy = ""`: always direct, whatever the environment says.
    Direct,
    /// `proxy = "http://user:pass@host:port"`, for this provider whatever
    /// the environment says (`NO_PROXY` included).
    Url(ProxyUrl),
}

impl ProxySetting {
    /// As operators are shown it: credentials masked.
    pub fn masked(&self) -> String {
        match self {
            Self::Environment => "(environment)".to_owned(),
            Self::Direct => String::new(),
            Self::Url(u) => u.masked(),
        }
    }
}

/// A proxy URL; it may carry a password, so it prints masked.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl(Url);

impl ProxyUrl {
    /// The URL with its credentials, for the connector only.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    pub fn masked(&self) -> String {
        super::masked_url(&self.0)
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({})", self.masked())
    }
}

impl ProxySetting {
    /// A `proxy` value: `""` is none; otherwise an `http://` URL with a
    /// host, a port or not, and nothing after it. (A proxy spoken to over
    /// TLS, or SOCKS, is not supported: said so here rather than ignored.)
    pub fn parse(text: &str) -> Result<Self, String> {
        proxy_setting(text)
    }
}

fn proxy_setting(text: &str) -> Result<ProxySetting, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(ProxySetting::Direct);
    }
    let url = Url::parse(text).map_err(|e| format!("not a valid URL: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "`{}` proxies are not supported; use an http:// proxy (HTTP CONNECT)",
            url.scheme()
        ));
    }
    if url.host().is_none() {
        return Err("the proxy URL needs a host".to_owned());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("a proxy URL is `http://[user:password@]host:port`, with no path".to_owned());
    }
    Ok(ProxySetting::Url(ProxyUrl(url)))
}

/// A file named in the config: an absolute path. A relative one is refused
/// rather than resolved: the same text is also loaded from the
/// last-known-good copy (in the state directory) and by other replicas
/// (a rollout's stable text), where it would name another file.
pub fn absolute(path: &str) -> Result<PathBuf, String> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(format!(
            "`{}` must be an absolute path (the config is also loaded from its \
             last-known-good copy and by other replicas, where a relative path \
             would name another file)",
            path.display()
        ));
    }
    Ok(path.to_owned())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))
}

/// The certificates of a PEM file: at least one, each usable as a root.
pub fn ca_file(path: PathBuf) -> Result<CaFile, String> {
    let certs = certificates(&path)?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|e| {
            format!(
                "certificate {} of `{}` cannot be a trusted root: {e}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok(CaFile { path, certs })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}` is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "`{}` holds no certificate (PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// A client certificate chain and its key, checked to belong together.
pub fn client_identity(cert_file: PathBuf, key_file: PathBuf) -> Result<ClientIdentity, String> {
    let chain = certificates(&cert_file)?;
    let pem = read(&key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "`{}` holds no private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            key_file.display()
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
        |e| {
            format!(
                "the key in `{}` does not go with the certificate in `{}`: {e}",
                key_file.display(),
                cert_file.display()
            )
        },
    )?;
    Ok(ClientIdentity {
        cert_file,
        key_file,
        chain,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_values() {
        assert_eq!(proxy_setting("").unwrap(), ProxySetting::Direct);
        let ProxySetting::Url(u) = proxy_setting("http://u:secret@proxy.internal:3128").unwrap()
        else {
            panic!("a URL");
        };
        assert_eq!(u.expose().password(), Some("secret"));
        assert!(!format!("{u:?}").contains("secret"));
        assert!(!u.masked().contains("secret"));
        for bad in [
            "https://proxy:443",
            "socks5://proxy:1080",
            "http://proxy:3128/path",
            "proxy:3128",
        ] {
            assert!(proxy_setting(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_absolute() {
        assert_eq!(
            absolute("/etc/detour/ca.pem").unwrap(),
            PathBuf::from("/etc/detour/ca.pem")
        );
        assert!(absolute("ca.pem").unwrap_err().contains("absolute"));
        assert!(absolute("./certs/ca.pem").is_err());
    }
}
