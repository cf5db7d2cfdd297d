//! DICOM over TLS (PS3.15 Annex B, the BCP 195 profile: TLS 1.2 and 1.3
//! with rustls's strong suites only). With `client_ca_file`, every sender
//! presents a certificate that CA issued; the fingerprint of the one
//! presented is kept for the association's gate, which binds it to the
//! calling AE title's institution (`tls_certificate_sha256`).

use std::sync::{Arc, OnceLock};

use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::DicomTlsConfig;

pub use crate::tls::TlsError;
use crate::tls::{
    certificates, identity, private_key, provider, server_builder, without_resumption,
};

/// What every TLS association's configuration is made of, read, parsed
/// and checked once.
pub struct TlsMaterial {
    provider: Arc<rustls::crypto::CryptoProvider>,
    identity: Arc<rustls::sign::SingleCertAndKey>,
    /// Verifies client certificates against the configured CA.
    clients: Option<Arc<dyn ClientCertVerifier>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("client_auth", &self.clients.is_some())
            .finish()
    }
}

impl TlsMaterial {
    pub fn load(cfg: &DicomTlsConfig) -> Result<Self, TlsError> {
        let provider = provider();
        let chain = certificates("server.tls.certificate_file", &cfg.certificate_file)?;
        let key = private_key("server.tls.private_key_file", &cfg.private_key_file)?;
        let identity = identity(chain, key, &provider, "server.tls.private_key_file")?;
        let clients = match &cfg.client_ca_file {
            None => None,
            Some(file) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates("server.tls.client_ca_file", file)? {
                    roots.add(cert).map_err(|e| TlsError {
                        key: "server.tls.client_ca_file",
                        reason: e.to_string(),
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError {
                    key: "server.tls.client_ca_file",
                    reason: e.to_string(),
                })?;
                Some(verifier)
            }
        };
        Ok(Self {
            provider,
            identity,
            clients,
        })
    }

    /// One connection's configuration (the verifier is the connection's
    /// own); the fingerprint of the client certificate it verifies is set
    /// in `seen`.
    pub fn server_config(
        &self,
        seen: Arc<OnceLock<String>>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let builder = server_builder(self.provider.clone())?;
        let builder = match &self.clients {
            Some(inner) => builder.with_client_cert_verifier(Arc::new(Recording {
                inner: inner.clone(),
                seen,
            })),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.identity.clone());
        without_resumption(&mut config);
        Ok(Arc::new(config))
    }
}

/// The SHA-256 fingerprint of a certificate, lower-case hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// The CA's verifier, remembering the certificate it accepted.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn ClientCertVerifier>,
    seen: Arc<OnceLock<String>>,
}

impl ClientCertVerifier for Recording {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let _ = self.seen.set(fingerprint(end_entity));
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
}
