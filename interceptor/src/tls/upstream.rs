//! TLS to upstreams: how a route's target is verified, and the rustls client configuration for
//! it. Verification is on unless a route turns it off by name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::TlsError;

/// How a route's upstream speaks TLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// The name sent as SNI and verified against the certificate; `None` uses the endpoint's
    /// host, which for a pod IP rarely matches.
    pub server_name: Option<Arc<str>>,
    /// What the upstream's certificate is checked against.
    pub trust: Trust,
}

/// What an upstream certificate is checked against.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Trust {
    /// The Mozilla root program (webpki-roots), built in so a scratch image needs no CA bundle.
    #[default]
    PublicRoots,
    /// Only these CA certificates (a private PKI, as inside a cluster).
    Roots(Arc<[CertificateDer<'static>]>),
    /// Nothing: any certificate is accepted. Only for a route that asks for it by name.
    InsecureSkipVerify,
}

impl Trust {
    /// Trusts only the CA certificates in the PEM file at `path`.
    pub fn from_ca_file(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let certs = super::parse_certs(&pem, path)?;
        // Checked here, where the error can name the file, rather than when a client is built.
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots
                .add(cert.clone())
                .map_err(|e| TlsError::NoCertificate {
                    path: path.to_owned(),
                    detail: Some(format!("not a usable CA certificate: {e}")),
                })?;
        }
        Ok(Self::Roots(certs.into()))
    }
}

/// The client configuration for `tls`. (ALPN is left to the connector, which offers what the
/// route's protocol needs.)
pub fn client_config(tls: &UpstreamTls) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let config = match &tls.trust {
        Trust::PublicRoots => builder
            .with_root_certificates(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
            .with_no_client_auth(),
        Trust::Roots(certs) => {
            // Every certificate was checked by `Trust::from_ca_file`.
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(certs.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// Accepts any certificate, but still checks the handshake signatures so the session keys are
/// the peer's.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
