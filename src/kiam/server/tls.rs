//! The server side of mutual TLS for `iamlet server`: its certificate and key, and the CA that
//! every client certificate must chain to. A client without a certificate, or with one from
//! another CA, is refused in the handshake. The files are re-read when they change (cert-manager
//! rotates them in place), and new connections use the new ones; connections already open keep
//! theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use super::Config;
use crate::kiam::tls::{Fingerprint, fingerprint};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{key}: cannot read {path}")]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {path} holds no usable PEM {what}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Option<rustls::pki_types::pem::Error>,
    },
    #[error("server.ca: {path} is not a usable CA certificate")]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("server.ca: cannot verify clients against {path}")]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("server.cert/server.key: {cert} and {key} do not make a usable certificate")]
    Certificate {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// Accepts mutual-TLS connections with the current certificate files.
pub struct Acceptor {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    current: RwLock<(Fingerprint, TlsAcceptor)>,
}

impl Acceptor {
    /// Reads the files now: a missing or bad file is a start-up error naming its key.
    pub fn load(config: &Config) -> Result<Acceptor, Error> {
        let (cert, key, ca) = (config.cert.clone(), config.key.clone(), config.ca.clone());
        let seen = fingerprint(&[&cert, &key, &ca]);
        let acceptor = build(&cert, &key, &ca)?;
        Ok(Acceptor {
            cert,
            key,
            ca,
            current: RwLock::new((seen, acceptor)),
        })
    }

    /// The acceptor for a new connection.
    pub fn current(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .clone()
    }

    /// Re-reads the files if they changed since they were last read. `Ok(true)` when new ones
    /// are in use; on an error (a rotation half written) the old ones stay in use, and the next
    /// call tries again.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let seen = fingerprint(&[&self.cert, &self.key, &self.ca]);
        if self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            == seen
        {
            return Ok(false);
        }
        let acceptor = build(&self.cert, &self.key, &self.ca)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = (seen, acceptor);
        Ok(true)
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn build(cert: &Path, key: &Path, ca: &Path) -> Result<TlsAcceptor, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let no_pem = |key: &'static str, path: &Path, what, source| Error::Pem {
        key,
        path: path.to_owned(),
        what,
        source,
    };

    let chain = CertificateDer::pem_slice_iter(&read("server.cert", cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| no_pem("server.cert", cert, "certificate", Some(err)))?;
    if chain.is_empty() {
        return Err(no_pem("server.cert", cert, "certificate", None));
    }
    let private_key = PrivateKeyDer::from_pem_slice(&read("server.key", key)?)
        .map_err(|err| no_pem("server.key", key, "private key", Some(err)))?;

    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_slice_iter(&read("server.ca", ca)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| no_pem("server.ca", ca, "certificate", Some(err)))?;
    if cas.is_empty() {
        return Err(no_pem("server.ca", ca, "certificate", None));
    }
    for certificate in cas {
        roots.add(certificate).map_err(|source| Error::Ca {
            path: ca.to_owned(),
            source,
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|source| Error::Verifier {
            path: ca.to_owned(),
            source,
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, private_key)
        })
        .map_err(|source| Error::Certificate {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
