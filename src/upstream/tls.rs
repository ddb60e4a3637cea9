//! The TLS client configs of providers' clients.
//!
//! One config is shared by every provider that sets no TLS option (the
//! bundled roots and the operating system's store, parsed once: a parsed
//! root store is about 400 KiB, and 200 providers each holding their own
//! held 80 MiB). A provider with `ca_file`, `client_cert` / `client_key` or
//! `tls_verify = false` gets a config of its own, built from the shared
//! verifier, so its extra roots cost what they weigh, not another copy of
//! the system's.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::BuildError;
use crate::config::ProviderTls;

struct Shared {
    crypto: Arc<CryptoProvider>,
    /// The bundled and system roots.
    verifier: Arc<WebPkiServerVerifier>,
    config: Arc<ClientConfig>,
}

/// The TLS client config every provider's client shares: the bundled roots
/// and the operating system's store (`SSL_CERT_FILE` / `SSL_CERT_DIR` when
/// set: an internal CA), parsed once, not once per provider; certificates
/// always verified. ALPN (h2, then http/1.1) is set by the connector, which
/// refuses a config that has it already.
fn shared() -> Result<&'static Shared, BuildError> {
    static TLS: OnceLock<Result<Shared, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(
            added,
            "upstream TLS: the operating system's trusted certificates"
        );
        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&crypto))
                .build()
                .map_err(|e| e.to_string())?;
        let config = ClientConfig::builder_with_provider(Arc::clone(&crypto))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<dyn ServerCertVerifier>)
            .with_no_client_auth();
        Ok(Shared {
            crypto,
            verifier,
            config: Arc::new(config),
        })
    })
    .as_ref()
    .map_err(|e| BuildError::Tls(e.clone()))
}

/// The TLS client config for a provider with `tls`: the shared one unless
/// it sets an option.
pub fn client_config(tls: &ProviderTls) -> Result<ClientConfig, BuildError> {
    let shared = shared()?;
    if tls.is_default() {
        return Ok(ClientConfig::clone(&shared.config));
    }
    let verifier: Arc<dyn ServerCertVerifier> = match (&tls.ca, tls.verify) {
        (_, false) => Arc::new(Unverified(Arc::clone(&shared.crypto))),
        (None, true) => Arc::clone(&shared.verifier) as Arc<dyn ServerCertVerifier>,
        (Some(ca), true) => {
            let mut roots = RootCertStore::empty();
            for cert in &ca.certs {
                roots
                    .add(cert.clone())
                    .map_err(|e| BuildError::Tls(format!("{}: {e}", ca.path.display())))?;
            }
            let extra = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::clone(&shared.crypto),
            )
            .build()
            .map_err(|e| BuildError::Tls(format!("{}: {e}", ca.path.display())))?;
            Arc::new(EitherRoots {
                default: Arc::clone(&shared.verifier),
                extra,
            })
        }
    };
    let builder = ClientConfig::builder_with_provider(Arc::clone(&shared.crypto))
        .with_safe_default_protocol_versions()
        .map_err(|e| BuildError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match &tls.identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| BuildError::Tls(format!("client certificate: {e}"))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The default roots, and a provider's `ca_file` on top of them: a chain is
/// trusted when it leads to either (a path ends at one trust anchor, so this
/// is the union of the two stores without a copy of the larger one).
#[derive(Debug)]
struct EitherRoots {
    default: Arc<WebPkiServerVerifier>,
    extra: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for EitherRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .extra
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(v) => Ok(v),
            // The provider's own CA is the likelier one; its error is the
            // one to report unless the default roots vouch for the chain.
            Err(e) => self
                .default
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .map_err(|_| e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.default.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.default.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.default.supported_verify_schemes()
    }
}

/// `tls_verify = false`: any certificate for any name is accepted (the
/// handshake's signatures are still checked, which proves only that the
/// server holds the key of the certificate it sent).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
