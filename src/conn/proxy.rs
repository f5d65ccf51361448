//! The PROXY protocol header (HAProxy's v1 text and v2 binary forms) that a load
//! balancer puts in front of the client's bytes, parsed with the `ppp` crate.
//!
//! The driver reads the header before anything else and sends the greeting only after
//! it; a missing, malformed or unexpected header closes the connection unanswered.

use std::net::SocketAddr;

use ppp::v1;
use ppp::v2;
use ppp::PartialResult;

use super::edge::ProxyMode;

/// The longest header we wait for. A v1 header is at most 107 bytes; a v2 header's TLVs
/// (which we ignore) could make it up to 64 KiB, but no balancer sends more than a few
/// hundred bytes, and a client that is not a balancer must not make us buffer more.
pub const MAX_HEADER: usize = 4096;

/// What the bytes so far say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole header yet.
    Incomplete,
    /// A header of `len` bytes. `source` is the client's address, or `None` for a LOCAL
    /// (v2) or UNKNOWN (v1) header: the balancer's own connection (a health check), which
    /// keeps the socket's address.
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    /// Not a header this listener accepts; the connection is closed unanswered.
    Invalid,
}

/// A v1 header is at most this long, CRLF included.
const V1_MAX: usize = 107;

/// Parses the start of a connection's input under `mode` (which is not `Off`).
pub fn parse(mode: ProxyMode, input: &[u8]) -> Parsed {
    match (mode, input.first()) {
        (ProxyMode::Off, _) => Parsed::Invalid,
        (_, None) => Parsed::Incomplete,
        (ProxyMode::V1, _) => parse_v1(input),
        (ProxyMode::V2, _) => parse_v2(input),
        // The v2 signature starts with CR; a v1 header with `P`.
        (ProxyMode::Any, Some(b'\r')) => parse_v2(input),
        (ProxyMode::Any, Some(_)) => parse_v1(input),
    }
}

/// The text form. The whole line is awaited before parsing (the specification has the
/// receiver wait for the CRLF), so an address cut by a segment boundary is not mistaken
/// for a malformed one.
fn parse_v1(input: &[u8]) -> Parsed {
    let window = &input[..input.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        let prefix = &input[..input.len().min(6)];
        return if input.len() >= V1_MAX || !b"PROXY ".starts_with(prefix) {
            Parsed::Invalid
        } else {
            Parsed::Incomplete
        };
    };
    match v1::Header::try_from(&input[..cr + 2]) {
        Ok(h) => Parsed::Header {
            len: h.header.len(),
            source: match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            },
        },
        Err(_) => Parsed::Invalid,
    }
}

/// The binary form. TLVs are skipped (they are inside the header's length).
fn parse_v2(input: &[u8]) -> Parsed {
    let result = v2::Header::try_from(input);
    if result.is_incomplete() {
        return if input.len() >= MAX_HEADER {
            Parsed::Invalid
        } else {
            Parsed::Incomplete
        };
    }
    let Ok(h) = result else {
        return Parsed::Invalid;
    };
    let len = h.header.len();
    if len > MAX_HEADER {
        return Parsed::Invalid;
    }
    let source = match (h.command, h.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        // AF_UNSPEC or a UNIX socket on the balancer's side: no client address to use,
        // so the socket's address stays, as for LOCAL.
        (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
    };
    Parsed::Header { len, source }
}
