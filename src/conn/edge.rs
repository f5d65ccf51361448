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

    fn index(self) -> usize {
        match self {
            LimitRefusal::ConnectionsPerIp => REFUSED_PER_IP,
            LimitRefusal::ConnectionsPerPrefix => REFUSED_PER_PREFIX,
            LimitRefusal::ConnectionRate => REFUSED_CONNECTION_RATE,
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

/// `smtpgw_connections_refused_total{reason}` label values, indexed by the
/// `REFUSED_*` constants.
pub const REFUSED_REASONS: [&str; 6] = [
    "per_ip",
    "per_prefix",
    "connection_rate",
    "early_talker",
    "proxy_invalid",
    "proxy_untrusted",
];
pub const REFUSED_PER_IP: usize = 0;
pub const REFUSED_PER_PREFIX: usize = 1;
pub const REFUSED_CONNECTION_RATE: usize = 2;
pub const REFUSED_EARLY_TALKER: usize = 3;
pub const REFUSED_PROXY_INVALID: usize = 4;
pub const REFUSED_PROXY_UNTRUSTED: usize = 5;

/// `smtpgw_tls_handshakes_total{version}` label values.
pub const TLS_VERSIONS: [&str; 2] = ["TLSv1.2", "TLSv1.3"];
/// `smtpgw_tls_handshake_failures_total{reason}` label values.
pub const TLS_FAILURES: [&str; 6] = [
    "alert_received",
    "incompatible",
    "bad_message",
    "other",
    "eof",
    "timeout",
];
pub const TLS_FAIL_ALERT: usize = 0;
pub const TLS_FAIL_INCOMPATIBLE: usize = 1;
pub const TLS_FAIL_BAD_MESSAGE: usize = 2;
pub const TLS_FAIL_OTHER: usize = 3;
pub const TLS_FAIL_EOF: usize = 4;
pub const TLS_FAIL_TIMEOUT: usize = 5;

/// What the driver counted about the edge since the caller last took it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeStats {
    pub refused: [u64; REFUSED_REASONS.len()],
    pub tls_handshakes: [u64; TLS_VERSIONS.len()],
    pub tls_failures: [u64; TLS_FAILURES.len()],
    /// `smtpgw_auth_total{result}`, indexed like [`crate::auth::RESULTS`].
    pub auth: [u64; crate::auth::RESULTS.len()],
    /// Plaintext bytes pipelined after STARTTLS and discarded unread (CVE-2011-0411).
    pub starttls_discarded_bytes: u64,
    /// PROXY headers accepted.
    pub proxy_headers: u64,
    /// Refusals the driver decided (the session counts its own in [`SessionStats`]).
    ///
    /// [`SessionStats`]: crate::smtp::SessionStats
    pub refusals: crate::smtp::refusal::RefusalCounts,
}

impl EdgeStats {
    pub(crate) fn refuse(&mut self, why: LimitRefusal) {
        self.refused[why.index()] += 1;
    }

    /// Adds `other` to `self` and zeroes `other`.
    pub fn absorb(&mut self, other: &mut EdgeStats) {
        fn add<const N: usize>(to: &mut [u64; N], from: &mut [u64; N]) {
            for (t, f) in to.iter_mut().zip(from.iter_mut()) {
                *t += std::mem::take(f);
            }
        }
        add(&mut self.refused, &mut other.refused);
        add(&mut self.tls_handshakes, &mut other.tls_handshakes);
        add(&mut self.tls_failures, &mut other.tls_failures);
        add(&mut self.auth, &mut other.auth);
        self.refusals.absorb(&mut other.refusals);
        self.starttls_discarded_bytes += std::mem::take(&mut other.starttls_discarded_bytes);
        self.proxy_headers += std::mem::take(&mut other.proxy_headers);
    }
}
