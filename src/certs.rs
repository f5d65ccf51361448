//! Loading the TLS certificate and key (PEM) into a rustls server configuration, at
//! start-up and on reload, what an operator needs to know of the loaded leaf (subject,
//! expiry), and watching the files so that a renewal is picked up without a signal. The
//! handshakes themselves run in the connection driver.

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

/// The oldest TLS version handshakes may use (`--tls-min-version`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
pub enum TlsMinVersion {
    #[default]
    #[value(name = "1.2")]
    #[serde(rename = "1.2")]
    Tls12,
    #[value(name = "1.3")]
    #[serde(rename = "1.3")]
    Tls13,
}

const BOTH_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS12, &rustls::version::TLS13];
const ONLY_TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// What the logs and `smtpgw_tls_certificate_expiry_timestamp_seconds` say of the
/// leaf certificate that handshakes present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    /// The subject as RFC 4514 text, e.g. `CN=mx.example.com`.
    pub subject: String,
    /// notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl LeafInfo {
    /// Whole days from `now` (Unix seconds) to expiry; negative once expired.
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }

    fn of(der: &CertificateDer<'_>) -> Result<LeafInfo, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("the leaf certificate is not valid X.509 ({e})"))?;
        Ok(LeafInfo {
            subject: cert.subject().to_string(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// A loaded certificate: what handshakes use, and what is known of its leaf.
#[derive(Clone, Debug)]
pub struct LoadedCert {
    pub config: Arc<ServerConfig>,
    pub leaf: LeafInfo,
}

/// A server configuration for TLS 1.2 (unless `min` is 1.3) and 1.3 with the
/// certificate chain in `cert` (leaf first) and the private key in `key`.
///
/// Nothing is handed to rustls before the whole file checks out: both files are read
/// through [`crate::files::read_regular_file`] (regular files of at most
/// [`crate::files::PEM_CAP`] bytes), every certificate of the chain must parse as
/// X.509 (an unparseable intermediate would otherwise be sent in every handshake and
/// fail each one on the client), and the key must match the leaf (rustls'
/// `CertifiedKey::keys_match`, inside `with_single_cert`).
pub fn load(cert: &Path, key: &Path, min: TlsMinVersion) -> Result<LoadedCert, TlsConfigError> {
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
    let leaf = LeafInfo::of(&chain[0]).map_err(cert_err)?;
    let key_pem = read_regular_file(key, PEM_CAP).map_err(|e| key_err(e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| key_err(describe(&e)))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(match min {
            TlsMinVersion::Tls12 => BOTH_VERSIONS,
            TlsMinVersion::Tls13 => ONLY_TLS13,
        })
        .map_err(|e| TlsConfigError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsConfigError::Mismatch(e.to_string()))?;
    // SMTP has no ALPN; session resumption stays on (rustls' default in-memory cache).
    config.ignore_client_order = true;
    Ok(LoadedCert {
        config: Arc::new(config),
        leaf,
    })
}

fn describe(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read: {io}"),
        Error::NoItemsFound => "no PEM item of the expected kind in the file".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// Watches the certificate and key files for a renewal: certbot replacing a file,
/// `cp` over it, or a Kubernetes Secret volume swapping its `..data` link. Each
/// directory that holds one of them is watched (inotify, through `notify`), since a
/// renewal often replaces the file or the link to it rather than writing into it;
/// `changed` is called on the watcher's thread for every event that may concern one
/// of the files, and the caller debounces (a renewal is several events). Dropping the
/// watcher stops it.
pub fn watch(
    files: &[&Path],
    changed: impl Fn() + Send + 'static,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::Watcher;
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let names: Vec<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(ToOwned::to_owned))
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let concerns_us = match &event {
            // An overflowed queue may have hidden the event that mattered.
            Err(_) => true,
            Ok(event) => {
                !event.kind.is_access()
                    && event.paths.iter().any(|p| {
                        p.file_name().is_some_and(|name| {
                            names.iter().any(|n| n == name)
                                || name.as_encoded_bytes().starts_with(b"..")
                        })
                    })
            }
        };
        if concerns_us {
            changed();
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}
