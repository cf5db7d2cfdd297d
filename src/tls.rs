//! TLS material shared by the DICOM and HTTP listeners: PEM certificates and
//! keys, and the one crypto provider (aws-lc-rs) every configuration names
//! (rustls refuses to guess when more than one is compiled in).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsError {
    pub key: &'static str,
    pub reason: String,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificates of a PEM file (at least one), for configuration `key`.
pub fn certificates(
    key: &'static str,
    file: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError { key, reason };
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| bad(format!("{}: {e}", file.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("{}: {e}", file.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("{} holds no certificate", file.display())));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(key: &'static str, file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(file).map_err(|e| TlsError {
        key,
        reason: format!("{}: {e}", file.display()),
    })
}

/// A server configuration builder for TLS 1.3 and 1.2 only (BCP 195).
pub fn server_builder(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError {
            key: "tls",
            reason: e.to_string(),
        })
}

/// The server's certificate chain and key, read, parsed and matched once
/// (`key_name` is the configuration key of the private key file).
pub fn identity(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &rustls::crypto::CryptoProvider,
    key_name: &'static str,
) -> Result<Arc<rustls::sign::SingleCertAndKey>, TlsError> {
    let certified =
        rustls::sign::CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError {
            key: key_name,
            reason: format!("does not fit the certificate: {e}"),
        })?;
    Ok(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
}

/// No session resumption: a resumed session skips the client certificate
/// check that the DICOM gate relies on, and nothing here needs it.
pub fn without_resumption(config: &mut rustls::ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}
