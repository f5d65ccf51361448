//! TLS for the load client: the client configuration (the server's certificate is
//! verified against a CA file, never skipped) and the stream type that carries either
//! plaintext or TLS, so one session loop drives both.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{bail, Context as _, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How a session gets to TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plaintext only.
    None,
    /// EHLO, STARTTLS, handshake, EHLO again (RFC 3207).
    Starttls,
    /// Handshake first, greeting inside it (RFC 8314).
    Implicit,
}

/// What every connection needs to open TLS.
pub struct Client {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl Client {
    /// Trusts only the certificates in `ca` (PEM). Without `resume`, every session does a
    /// full handshake, which is what a handshake rate should measure: a fleet of MTAs
    /// mostly meets a gateway node for the first time.
    pub fn new(
        ca: &Path,
        server_name: Option<&str>,
        target: SocketAddr,
        resume: bool,
    ) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("--tls-ca {}", ca.display()))?;
        for cert in certs {
            let cert = cert.with_context(|| format!("--tls-ca {}", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("--tls-ca {}: unusable certificate", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("--tls-ca {}: no CERTIFICATE in the file", ca.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let server_name = match server_name {
            Some(name) => ServerName::try_from(name.to_owned())
                .with_context(|| format!("--tls-server-name {name:?}"))?,
            None => ServerName::IpAddress(target.ip().into()),
        };
        Ok(Client {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<Stream> {
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// A connection's byte stream, before or after TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
