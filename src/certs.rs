//! Loading the TLS certificate and key (PEM) into a rustls server configuration, at
//! start-up and on reload. The handshakes themselves run in the connection driver.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::conn::TlsHandle;

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
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let cert_err = |msg: String| TlsConfigError::Cert {
        path: cert.to_owned(),
        msg,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(describe(&e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(describe(&e)))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsConfigError::Key {
        path: key.to_owned(),
        msg: describe(&e),
    })?;
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

/// Re-reads the certificate and key into `handle`: new handshakes use them, sessions
/// already encrypted keep theirs. On an error the old certificate stays in use. This is
/// what a SIGHUP handler calls.
pub fn reload(handle: &TlsHandle, cert: &Path, key: &Path) -> Result<(), TlsConfigError> {
    handle.replace(load(cert, key)?);
    Ok(())
}

fn describe(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => "no PEM item of the expected kind in the file".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}
