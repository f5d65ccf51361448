//! TLS for the driver: the swappable server configuration (certificate reloads replace
//! it for new handshakes while open sessions keep theirs) and the bits of rustls'
//! sans-IO connection the driver reads for the envelope and the metrics.

use std::sync::{Arc, RwLock};

use rustls::{ProtocolVersion, ServerConfig, ServerConnection};

use super::edge::{TlsFailure, TlsVersion};

/// The current server configuration, shared by every listener that offers TLS. Each
/// handshake takes the configuration current at its start.
#[derive(Clone, Debug)]
pub struct TlsHandle(Arc<RwLock<Arc<ServerConfig>>>);

impl TlsHandle {
    pub fn new(config: Arc<ServerConfig>) -> TlsHandle {
        TlsHandle(Arc::new(RwLock::new(config)))
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc: the value is
        // still a whole configuration.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// From now on, handshakes use `config` (a reloaded certificate).
    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub(crate) fn accept(&self) -> Result<ServerConnection, rustls::Error> {
        ServerConnection::new(self.current())
    }
}

/// A record's header, and the most it may carry: 2^14 bytes of plaintext plus the 2,048
/// bytes of expansion TLS 1.2 allows (RFC 5246 section 6.2.3); rustls refuses a header
/// that claims as much or more.
const RECORD_HEADER: usize = 5;
const MAX_PAYLOAD: usize = (1 << 14) + 2048;

/// The length of the whole TLS record at the start of `input`, header included, or
/// `None` while it has not all arrived. A header that is not a TLS record's (content
/// type 20-24, version 3.x, a length below the maximum) is given back alone, so rustls
/// refuses it at once instead of the driver waiting for a length that means nothing.
pub(crate) fn record_len(input: &[u8]) -> Option<usize> {
    let len = declared_record_len(input)?;
    (input.len() >= len).then_some(len)
}

/// The length the record at the start of `input` declares, header included (just the
/// header's for one that is no TLS record's), once its header has arrived.
pub(crate) fn declared_record_len(input: &[u8]) -> Option<usize> {
    let header = input.get(..RECORD_HEADER)?;
    let payload = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if !(20..=24).contains(&header[0]) || header[1] != 3 || payload >= MAX_PAYLOAD {
        return Some(RECORD_HEADER);
    }
    Some(RECORD_HEADER + payload)
}

/// `TLSv1.3 TLS13_AES_256_GCM_SHA384`: what `smtp.tls` carries.
pub(crate) fn describe(conn: &ServerConnection) -> String {
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    let suite = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown");
    format!("{version} {suite}")
}

/// The version of a completed handshake (rustls offers 1.2 and 1.3 only).
pub(crate) fn version(conn: &ServerConnection) -> TlsVersion {
    match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_2) => TlsVersion::Tls12,
        _ => TlsVersion::Tls13,
    }
}

/// Why a handshake failed, as its metric says.
pub(crate) fn failure(e: &rustls::Error) -> TlsFailure {
    use rustls::Error;
    match e {
        Error::AlertReceived(_) => TlsFailure::Alert,
        Error::PeerIncompatible(_) | Error::NoCertificatesPresented => TlsFailure::Incompatible,
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. }
        | Error::DecryptError
        | Error::PeerMisbehaved(_) => TlsFailure::BadMessage,
        _ => TlsFailure::Other,
    }
}
