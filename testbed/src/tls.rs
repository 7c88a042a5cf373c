//! Certificates for TLS tests, made in the test (`rcgen`): a CA, a server certificate for
//! `localhost`/`127.0.0.1` signed by it, a client certificate (CN `postgres`) signed by it, and a
//! second, unrelated CA (the "wrong CA").

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// PEM files in a folder of their own (removed when dropped).
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("testbed-pki-").tempdir()?;
        let write = |name: &str, text: String| -> Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let (ca, ca_key) = authority("sensor pipeline test CA")?;
        let (other, _) = authority("some other CA")?;

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
        server
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = server.signed_by(&server_key, &ca, &ca_key)?;

        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, "postgres");
        let client = client.signed_by(&client_key, &ca, &ca_key)?;

        Ok(Self {
            ca: write("ca.pem", ca.pem())?,
            other_ca: write("other-ca.pem", other.pem())?,
            server_cert: write("server.pem", server.pem())?,
            server_key: write("server.key", server_key.serialize_pem())?,
            client_cert: write("client.pem", client.pem())?,
            client_key: write("client.key", client_key.serialize_pem())?,
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn authority(name: &str) -> Result<(rcgen::Certificate, KeyPair)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ok((params.self_signed(&key)?, key))
}
