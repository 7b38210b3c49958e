//! TLS to PostgreSQL, with rustls (ring provider), as libpq's `sslmode`:
//!
//! - `disable`: no TLS (tokio-postgres never asks for it).
//! - `prefer`: TLS when the server offers it, else plain text; the
//!   certificate is not checked (libpq does not check it either).
//! - `require`: TLS or no connection; the certificate is not checked, but
//!   the handshake is (the server proves it holds the certificate's key).
//! - `verify-full`: TLS or no connection; the chain is checked against the
//!   CA file `pg_sslrootcert` (required) and the certificate must name the
//!   host connected to (`pg_host`, a DNS name or an IP address).
//!
//! One connector type serves every mode: tokio-postgres's own `SslMode`
//! (set in `connect_config`) decides whether TLS is attempted and whether
//! plain text is acceptable.

use crate::PgError;
use pgcache_core::{Settings, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// The connector handed to the pool and to the listener.
pub type TlsConnector = tokio_postgres_rustls::MakeRustlsConnect;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder(
    provider: Arc<CryptoProvider>,
) -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
}

/// The connector for these settings. For `verify-full` this reads the CA
/// file; a missing or unusable one is a configuration error that names
/// `pg_sslrootcert`.
pub fn connector(s: &Settings) -> Result<TlsConnector, PgError> {
    let provider = provider();
    let config = match s.pg_sslmode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder(provider.clone())
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        SslMode::VerifyFull => {
            let roots = root_store(&s.pg_sslrootcert)?;
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| {
                        PgError::Config(format!(
                            "pg_sslrootcert '{}' cannot be used: {e}",
                            s.pg_sslrootcert
                        ))
                    })?;
            builder(provider)
                .with_webpki_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(TlsConnector::new(config))
}

/// The CA certificates of a PEM file.
fn root_store(path: &str) -> Result<RootCertStore, PgError> {
    if path.is_empty() {
        return Err(PgError::Config(
            "pg_sslmode verify-full needs pg_sslrootcert, the CA certificate file to check the \
             server's certificate against"
                .into(),
        ));
    }
    let unusable = |why: String| PgError::Config(format!("pg_sslrootcert '{path}' {why}"));
    let pem = std::fs::read(path).map_err(|e| unusable(format!("cannot be read: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| unusable(format!("is not a valid PEM certificate file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| unusable(format!("holds an unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(unusable("holds no PEM certificate".into()));
    }
    Ok(roots)
}

/// `prefer` and `require`: any certificate is accepted (as libpq does
/// without a CA), but the handshake signatures are still verified, so the
/// session is encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SslMode, rootcert: &str) -> Settings {
        Settings {
            pg_sslmode: mode,
            pg_sslrootcert: rootcert.into(),
            ..Settings::default()
        }
    }

    fn config_error(s: &Settings) -> String {
        match connector(s) {
            Err(PgError::Config(m)) => m,
            Err(e) => panic!("expected a configuration error, got {e}"),
            Ok(_) => panic!("expected a configuration error"),
        }
    }

    #[test]
    fn modes_without_a_ca_need_no_file() {
        for mode in [SslMode::Disable, SslMode::Prefer, SslMode::Require] {
            assert!(connector(&settings(mode, "")).is_ok());
            // A CA file is not read outside verify-full.
            assert!(connector(&settings(mode, "/nonexistent/ca.pem")).is_ok());
        }
    }

    #[test]
    fn verify_full_needs_a_readable_ca_file() {
        let m = config_error(&settings(SslMode::VerifyFull, ""));
        assert!(
            m.contains("pg_sslrootcert") && m.contains("verify-full"),
            "{m}"
        );

        let m = config_error(&settings(SslMode::VerifyFull, "/nonexistent/ca.pem"));
        assert!(
            m.contains("pg_sslrootcert") && m.contains("/nonexistent/ca.pem"),
            "{m}"
        );
        assert!(m.contains("cannot be read"), "{m}");

        let dir = std::env::temp_dir().join(format!("pgcache-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let m = config_error(&settings(SslMode::VerifyFull, empty.to_str().unwrap()));
        assert!(
            m.contains("pg_sslrootcert") && m.contains("no PEM certificate"),
            "{m}"
        );

        let bad = dir.join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let m = config_error(&settings(SslMode::VerifyFull, bad.to_str().unwrap()));
        assert!(m.contains("pg_sslrootcert"), "{m}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
