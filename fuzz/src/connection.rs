//! The differential harness behind the `connection_feed` fuzz target: the connection
//! driver (PROXY header, error budget, output cap, sink answers) fed a client stream
//! whole and cut at chosen points must write the same bytes, publish the same messages
//! (their `Received:` line included, which carries the PROXY header's address) and end
//! in the same state.
//!
//! Input format: the same as `session_feed`'s ([`crate::Case`]), with the end of a
//! PROXY header at the stream's start always a read boundary in both runs: a client
//! speaks only once it has the greeting, which comes after the header; bytes in the
//! header's own read are an early talker's (`554`), rightly, so a cut there would
//! change the outcome. Cuts inside the header are made like any other. Flag bits:
//! bits 0-1 pick the PROXY mode (off, v1, v2, either), bit 2 turns on an error budget of
//! 3, bit 3 makes the sink refuse every second message temporarily, bit 4 requires TLS
//! for MAIL (there is no certificate, so MAIL gets `530`), bit 5 trusts no PROXY source
//! (a header is then refused with nothing sent).

use std::sync::Arc;
use std::time::{Duration, Instant};

use smtpgw::conn::{BodyBudget, Cidr, Connection, Edge, Limits, ProxyMode, State};
use smtpgw::sink::PublishError;
use smtpgw::smtp::{BareLfPolicy, MessageId, SessionConfig};

use crate::MAX_MESSAGE_SIZE;

/// Everything a client and the sink would see of one connection.
#[derive(Debug, PartialEq, Eq)]
pub struct ConnectionTranscript {
    pub written: Vec<u8>,
    /// The whole stored value (`Received:` line and message) of every accepted message.
    pub published: Vec<Vec<u8>>,
    pub state: State,
}

fn edge(flags: u8) -> Edge {
    Edge {
        proxy: match flags & 3 {
            0 => ProxyMode::Off,
            1 => ProxyMode::V1,
            2 => ProxyMode::V2,
            _ => ProxyMode::Any,
        },
        proxy_trusted: if flags & 32 == 0 {
            vec![Cidr::parse("127.0.0.0/8").expect("literal")]
        } else {
            Vec::new()
        },
        error_budget: (flags & 4 != 0).then_some(3),
        require_tls: flags & 16 != 0,
        ..Edge::default()
    }
}

/// Feeds `pieces` as a backend would: after every read, writes out everything pending
/// and answers every message at once; then the end of the stream.
pub fn run_connection(flags: u8, pieces: &[&[u8]]) -> ConnectionTranscript {
    let now = Instant::now();
    let session = Arc::new(SessionConfig {
        hostname: "fuzz.test".into(),
        accept_domains: vec!["example.com".into()],
        max_message_size: MAX_MESSAGE_SIZE,
        max_recipients: 4,
        bare_lf: BareLfPolicy::Reject,
    });
    let limits = Arc::new(Limits {
        idle_timeout: Duration::from_secs(60),
        max_session_time: Duration::from_secs(3600),
        min_data_rate: None,
        // Small, so the fuzzer reaches the cap that stops input behind unread output.
        output_cap: 512,
        sink: "fuzz",
    });
    let mut conn = Connection::new(
        now,
        session,
        limits,
        BodyBudget::new(1 << 20),
        "127.0.0.1:40000".parse().expect("literal"),
        Arc::new(edge(flags)),
    );
    let mut written = Vec::new();
    let mut published = Vec::new();
    let mut taken = 0u64;
    let mut settle = |conn: &mut Connection, written: &mut Vec<u8>| loop {
        let mut progressed = false;
        if conn.wants_write() {
            let n = conn.pending_output().len();
            written.extend_from_slice(conn.pending_output());
            conn.output_written(now, n);
            progressed = true;
        }
        let mut stamp = || {
            taken += 1;
            (
                MessageId::from(u128::from(taken)),
                chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("literal"),
            )
        };
        if let Some(message) = conn.poll_message(now, &mut stamp) {
            let result = if flags & 8 != 0 && taken.is_multiple_of(2) {
                Err(PublishError::Temporary("fuzz: sink down".into()))
            } else {
                published.push(message.value.to_vec());
                Ok(message.id)
            };
            conn.handle_publish(now, result);
            progressed = true;
        }
        if !progressed {
            return;
        }
    };
    for piece in pieces {
        settle(&mut conn, &mut written);
        if conn.state() != State::Open {
            break;
        }
        conn.handle_input(now, piece);
    }
    settle(&mut conn, &mut written);
    if conn.state() == State::Open {
        conn.handle_eof(now);
        settle(&mut conn, &mut written);
    }
    ConnectionTranscript {
        written,
        published,
        state: conn.state(),
    }
}

/// How long the PROXY header at the start of `stream` is, by the specification (v1: up
/// to the first CRLF of a line starting `PROXY `, at most 107 bytes; v2: the 16-byte
/// preamble and the length it gives), or 0 if the stream does not start with one.
/// Written from the spec, not the driver's parser, so the two cannot agree by mistake.
pub fn proxy_header_len(stream: &[u8]) -> usize {
    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    if stream.starts_with(b"PROXY ") {
        let line = &stream[..stream.len().min(107)];
        return line
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(0, |at| at + 2);
    }
    if stream.starts_with(V2_SIGNATURE) && stream.len() >= 16 {
        let len = 16 + usize::from(u16::from_be_bytes([stream[14], stream[15]]));
        return if len <= stream.len() { len } else { 0 };
    }
    0
}

/// The case's stream cut at the end of its PROXY header (if any) and, with `split`, at
/// the case's points; plus `extra` points.
pub fn case_pieces<'a>(case: &crate::Case<'a>, extra: &[usize], split: bool) -> Vec<&'a [u8]> {
    let stream = case.stream;
    let mut cuts = vec![proxy_header_len(stream)];
    if split {
        cuts.extend(&case.cuts);
    }
    cuts.extend(extra.iter().map(|&c| c.min(stream.len())));
    cuts.sort_unstable();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut from = 0;
    for cut in cuts {
        pieces.push(&stream[from..cut]);
        from = cut;
    }
    pieces.push(&stream[from..]);
    pieces
}

/// The differential check: the stream whole (but for the end of its PROXY header) and
/// cut at the case's points agree.
pub fn check_connection(data: &[u8]) {
    let Some(case) = crate::Case::decode(data) else {
        return;
    };
    let whole = run_connection(case.flags, &case_pieces(&case, &[], false));
    let split = run_connection(case.flags, &case_pieces(&case, &[], true));
    case.assert_agree(&whole, &split);
}
