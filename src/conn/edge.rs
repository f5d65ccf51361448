//! Per-listener edge settings (PROXY protocol, TLS, greeting delay, per-address limits)
//! and the counts the driver keeps about them.
//!
//! The per-address limiter itself lives in the shared net layer (it is shared by every
//! connection of every reactor); the driver only sees it through [`PeerLimits`], and
//! calls it once it knows the client's real address, which with PROXY protocol is only
//! after the header.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tls::TlsHandle;
use crate::smtp::stats::Counts;

/// Whether a listener expects a PROXY protocol header before anything else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyMode {
    #[default]
    Off,
    V1,
    V2,
    /// Either version.
    Any,
}

/// An address prefix such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not an address prefix (got {0:?}); e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32")]
pub struct CidrError(String);

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError(text.to_owned());
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 clients) match
    /// IPv4 prefixes.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        Cidr::parse(text)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `ip` with all but its first `prefix` bits cleared.
pub fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & m).into())
        }
    }
}

/// Why the per-address limiter refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitRefusal {
    /// `--max-connections-per-ip`
    ConnectionsPerIp,
    /// `--max-connections-per-prefix` (/24 for IPv4, /64 for IPv6)
    ConnectionsPerPrefix,
    /// `--max-connection-rate-per-ip`
    ConnectionRate,
}

impl LimitRefusal {
    /// The phrase of the `421 4.7.0` reply.
    pub fn reply_text(self) -> &'static str {
        match self {
            LimitRefusal::ConnectionsPerIp => "Too many connections from your address",
            LimitRefusal::ConnectionsPerPrefix => "Too many connections from your network",
            LimitRefusal::ConnectionRate => "Too many connections from your address per minute",
        }
    }

    /// The refusal it is, for the log line and `smtpgw_refusals_total`.
    pub fn refusal(self) -> crate::smtp::Refusal {
        match self {
            LimitRefusal::ConnectionsPerIp => crate::smtp::Refusal::PerIp,
            LimitRefusal::ConnectionsPerPrefix => crate::smtp::Refusal::PerPrefix,
            LimitRefusal::ConnectionRate => crate::smtp::Refusal::ConnectionRate,
        }
    }

    fn rejected(self) -> Rejected {
        match self {
            LimitRefusal::ConnectionsPerIp => Rejected::PerIp,
            LimitRefusal::ConnectionsPerPrefix => Rejected::PerPrefix,
            LimitRefusal::ConnectionRate => Rejected::ConnectionRate,
        }
    }
}

/// The shared per-address limiter, as the driver sees it. Time is an argument.
pub trait PeerLimits: Send + Sync {
    /// Counts a new connection from `ip`, or says which limit it is over. The slot is
    /// held for the connection's life; dropping it gives the connection back.
    fn admit(&self, now: Instant, ip: IpAddr) -> Result<Box<dyn PeerSlot>, LimitRefusal>;
}

/// One connection's hold on its address's counts.
pub trait PeerSlot: Send {
    /// Whether the address may start another message now (does not spend anything).
    fn message_allowed(&self, now: Instant) -> bool;
    /// The address completed a message.
    fn message_sent(&self, now: Instant);
    /// Whether the address may try AUTH again (`--max-auth-failures-per-ip`).
    fn auth_allowed(&self, _now: Instant) -> bool {
        true
    }
    /// The address failed AUTH once more.
    fn auth_failed(&self, _now: Instant) {}
}

/// How a listener offers AUTH, and who verifies.
#[derive(Clone)]
pub struct EdgeAuth {
    pub policy: crate::smtp::session::AuthPolicy,
    pub verifier: Arc<crate::auth::Verifier>,
}

/// Everything about a listener's edge a connection needs; one per listener, shared by
/// its connections.
#[derive(Clone, Default)]
pub struct Edge {
    pub proxy: ProxyMode,
    /// Sources allowed to send a PROXY header; anyone else is closed on, unanswered.
    pub proxy_trusted: Vec<Cidr>,
    /// The certificate: STARTTLS is offered, or with `implicit_tls` the whole
    /// connection is TLS (RFC 8314).
    pub tls: Option<TlsHandle>,
    pub implicit_tls: bool,
    /// A TLS handshake not done this long after it began is closed unanswered; `None`
    /// leaves it to the idle timeout.
    pub tls_handshake_timeout: Option<Duration>,
    /// MAIL before TLS gets `530 5.7.0`.
    pub require_tls: bool,
    /// The greeting waits this long; a client that talks before it is an early talker.
    pub greeting_delay: Duration,
    /// Commands refused with `5xx` that end a session with `421 4.7.0`.
    pub error_budget: Option<u32>,
    pub peers: Option<Arc<dyn PeerLimits>>,
    /// `None`: AUTH is not offered (`502`).
    pub auth: Option<EdgeAuth>,
}

impl fmt::Debug for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Edge")
            .field("proxy", &self.proxy)
            .field("proxy_trusted", &self.proxy_trusted)
            .field("tls", &self.tls.is_some())
            .field("implicit_tls", &self.implicit_tls)
            .field("tls_handshake_timeout", &self.tls_handshake_timeout)
            .field("require_tls", &self.require_tls)
            .field("greeting_delay", &self.greeting_delay)
            .field("error_budget", &self.error_budget)
            .field("peers", &self.peers.is_some())
            .field("auth", &self.auth.as_ref().map(|a| a.policy))
            .finish()
    }
}

crate::smtp::stats::labels! {
    /// `smtpgw_connections_rejected_total{reason}` for the refusals the driver decides
    /// (`max_connections`, decided at accept, is counted by the backend).
    pub enum Rejected {
        PerIp => "per_ip",
        PerPrefix => "per_prefix",
        ConnectionRate => "connection_rate",
        EarlyTalker => "early_talker",
        ProxyInvalid => "proxy_invalid",
        ProxyUntrusted => "proxy_untrusted",
    }
}

crate::smtp::stats::labels! {
    /// `smtpgw_tls_handshakes_total{version}`.
    pub enum TlsVersion {
        Tls12 => "TLSv1.2",
        Tls13 => "TLSv1.3",
    }
}

crate::smtp::stats::labels! {
    /// `smtpgw_tls_handshake_failures_total{reason}`.
    pub enum TlsFailure {
        Alert => "alert_received",
        Incompatible => "incompatible",
        BadMessage => "bad_message",
        Other => "other",
        Eof => "eof",
        Timeout => "timeout",
    }
}

/// What the driver counted about the edge since the caller last took it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeStats {
    pub refused: Counts<Rejected>,
    pub tls_handshakes: Counts<TlsVersion>,
    pub tls_failures: Counts<TlsFailure>,
    pub auth: Counts<crate::auth::AuthResult>,
    /// Plaintext bytes pipelined after STARTTLS and discarded unread (CVE-2011-0411).
    pub starttls_discarded_bytes: u64,
    /// PROXY headers accepted.
    pub proxy_headers: u64,
    /// Refusals the driver decided (the session counts its own in [`SessionStats`]).
    ///
    /// [`SessionStats`]: crate::smtp::SessionStats
    pub refusals: Counts<crate::smtp::Refusal>,
}

impl EdgeStats {
    pub(crate) fn refuse(&mut self, why: LimitRefusal) {
        self.refused[why.rejected()] += 1;
    }

    /// Adds `other` to `self` and zeroes `other`.
    pub fn absorb(&mut self, other: &mut EdgeStats) {
        self.refused.absorb(&mut other.refused);
        self.tls_handshakes.absorb(&mut other.tls_handshakes);
        self.tls_failures.absorb(&mut other.tls_failures);
        self.auth.absorb(&mut other.auth);
        self.refusals.absorb(&mut other.refusals);
        self.starttls_discarded_bytes += std::mem::take(&mut other.starttls_discarded_bytes);
        self.proxy_headers += std::mem::take(&mut other.proxy_headers);
    }
}
