//! Loading the TLS certificate and key (PEM) into a rustls server configuration, at
//! start-up and on reload. The handshakes themselves run in the connection driver.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::files::{read_regular_file, PEM_CAP};

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("--tls-cert {path}: {msg}")]
    Cert { path: PathBuf, msg: String },
    #[error("--tls-key {path}: {msg}")]
    Key { path: PathBuf, msg: String },
    #[error("--tls-cert/--tls-key: {0}")]
    Mismatch(String),
}

/// A server configuration for TLS 1.2 and 1.3 with the certificate chain in `cert`
/// (leaf first) and the private key in `key`.
///
/// Nothing is handed to rustls before the whole file checks out: both files are read
/// through [`crate::files::read_regular_file`] (regular files of at most
/// [`crate::files::PEM_CAP`] bytes), every certificate of the chain must parse as
/// X.509 (an unparseable intermediate would otherwise be sent in every handshake and
/// fail each one on the client), and the key must match the leaf (rustls'
/// `CertifiedKey::keys_match`, inside `with_single_cert`).
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let cert_err = |msg: String| TlsConfigError::Cert {
        path: cert.to_owned(),
        msg,
    };
    let key_err = |msg: String| TlsConfigError::Key {
        path: key.to_owned(),
        msg,
    };
    let cert_pem = read_regular_file(cert, PEM_CAP).map_err(|e| cert_err(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(describe(&e)))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE in the file".into()));
    }
    for (i, der) in chain.iter().enumerate() {
        webpki::EndEntityCert::try_from(der).map_err(|e| {
            cert_err(format!(
                "certificate {} of {} in the chain is not valid X.509 ({e})",
                i + 1,
                chain.len()
            ))
        })?;
    }
    let key_pem = read_regular_file(key, PEM_CAP).map_err(|e| key_err(e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| key_err(describe(&e)))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| TlsConfigError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsConfigError::Mismatch(e.to_string()))?;
    // SMTP has no ALPN; session resumption stays on (rustls' default in-memory cache).
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

fn describe(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => "no PEM item of the expected kind in the file".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}
