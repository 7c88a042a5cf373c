//! TLS for every PostgreSQL connection, with libpq's URL parameters: `sslmode` (`disable`,
//! `prefer` — libpq's default —, `require`, `verify-ca`, `verify-full`), `sslrootcert` (PEM CA
//! file; the system's roots when absent), `sslcert`/`sslkey` (a client certificate, PEM).
//!
//! tokio-postgres parses only `disable`/`prefer`/`require` and no certificate parameters, so they
//! are taken out of the connection string ([`split_tls`], with the database settings) and turn
//! here ([`connector`]) into a rustls client
//! configuration (ring provider) for `tokio-postgres-rustls`. As in libpq, `prefer` and `require`
//! encrypt without checking the server's certificate — unless `sslrootcert` is given, which makes
//! them `verify-ca`; `verify-ca` checks the chain, `verify-full` the chain and the host name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
pub use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{split_tls, TlsMode, TlsParams};

/// The connection configuration of `url` and the TLS connector its parameters ask for.
pub fn connector(url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect), String> {
    let (rest, params) = split_tls(url)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    config.ssl_mode(match params.mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    Ok((config, MakeRustlsConnect::new(client_config(&params)?)))
}

fn client_config(params: &TlsParams) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let checked = matches!(params.mode, TlsMode::VerifyCa | TlsMode::VerifyFull)
        || params.root_cert.is_some();
    let verifier: Arc<dyn ServerCertVerifier> = if checked {
        let roots = Arc::new(roots(params.root_cert.as_deref())?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        if params.mode == TlsMode::VerifyFull {
            webpki
        } else {
            Arc::new(Lenient {
                chain: Some(webpki),
                provider,
            })
        }
    } else {
        Arc::new(Lenient {
            chain: None,
            provider,
        })
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&params.cert, &params.key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err("sslcert and sslkey go together: give both or neither".into()),
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no certificate in it", path.display()));
    }
    Ok(certs)
}

fn roots(file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match file {
        Some(path) => {
            for cert in read_certs(path, "sslrootcert")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no sslrootcert given and no system root certificates found".into());
            }
        }
    }
    Ok(roots)
}

/// The checks libpq leaves out below `verify-full`; the handshake's signature is checked always.
#[derive(Debug)]
struct Lenient {
    /// `verify-ca`: the chain must lead to a trusted root (the name is not checked). `None`:
    /// `prefer`/`require` without a root certificate — encrypted, the server's certificate not
    /// checked, only that it signed the handshake.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Lenient {
    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}
