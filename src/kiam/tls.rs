//! The client side of mutual TLS (the agent's, in server-backed mode): certificate, key and CA from PEM files, and a fingerprint of
//! the files so that a change (rotation) is noticed and the connections are rebuilt.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
#[error("cannot read {key} {path}: {source}")]
pub struct Error {
    key: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

/// What identifies the files' current content cheaply: their sizes and modification times.
pub type Fingerprint = Vec<(u64, Option<SystemTime>)>;

/// The fingerprint of `paths`: their sizes and modification times (a missing file counts as
/// empty), so a rotation that rewrites any of them changes it.
pub fn fingerprint(paths: &[&Path]) -> Fingerprint {
    paths
        .iter()
        .map(|path| {
            std::fs::metadata(path)
                .map(|meta| (meta.len(), meta.modified().ok()))
                .unwrap_or((0, None))
        })
        .collect()
}

pub struct Files<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub ca: &'a Path,
}

impl Files<'_> {
    fn all(&self) -> [(&'static str, &Path); 3] {
        [
            ("kiam.cert", self.cert),
            ("kiam.key", self.key),
            ("kiam.ca", self.ca),
        ]
    }

    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.all().map(|(_, path)| path))
    }

    /// The TLS settings for connections to `server_name`, which the server's certificate must
    /// name.
    pub fn load(&self, server_name: &str) -> Result<ClientTlsConfig, Error> {
        let read = |(key, path): (&'static str, &Path)| {
            std::fs::read(path).map_err(|source| Error {
                key,
                path: path.to_owned(),
                source,
            })
        };
        let [cert, key, ca] = self.all().map(read);
        Ok(ClientTlsConfig::new()
            .domain_name(server_name)
            .ca_certificate(Certificate::from_pem(ca?))
            .identity(Identity::from_pem(cert?, key?)))
    }
}
