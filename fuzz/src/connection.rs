//! The differential harness behind the `connection_feed` fuzz target: the connection
//! driver (PROXY header, error budget, output cap, sink answers) fed a client stream
//! whole and cut at chosen points must write the same bytes, publish the same messages
//! (their `Received:` line included, which carries the PROXY header's address) and end
//! in the same state.
//!
//! Input format: the same as `session_feed`'s ([`crate::Case`]), except that the
//! stream's first byte is the length of its opening, which is always a read of its own:
//! a PROXY header arrives before the greeting, and the client's first command only after
//! it (bytes in the same read as the header are an early talker's, refused by design, so
//! cutting there would rightly change the outcome). Other flag bits:
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

/// The opening's length and the stream after that byte, and the case's cuts with the
/// opening's end among them. Cuts inside the opening are dropped: the fuzzer's opening
/// may run past the header into the first command, and a client whose command is in
/// the header's read is an early talker while one whose command comes in a later read
/// (after the greeting went out) is not, rightly. Cuts inside a header are covered by
/// the corpus replay, whose openings are exactly the headers.
fn opening(case: &crate::Case<'_>) -> Option<(usize, Vec<usize>)> {
    let (&len, rest) = case.stream.split_first()?;
    let header = usize::from(len).min(rest.len());
    let mut cuts: Vec<usize> = case
        .cuts
        .iter()
        .map(|c| c.saturating_sub(1).min(rest.len()))
        .filter(|&c| c >= header)
        .collect();
    cuts.push(header);
    cuts.sort_unstable();
    Some((header, cuts))
}

/// The case's stream after its opening-length byte, cut at the opening's end and
/// (`split`) at the case's points past it, and at `extra` points anywhere (for seeds,
/// whose opening is exactly the PROXY header).
pub fn case_pieces<'a>(case: &crate::Case<'a>, extra: &[usize], split: bool) -> Vec<&'a [u8]> {
    let Some((header, mut cuts)) = opening(case) else {
        return Vec::new();
    };
    if !split {
        cuts = vec![header];
    }
    cuts.extend(extra.iter().map(|&c| c.min(case.stream.len() - 1)));
    cuts.sort_unstable();
    let rest = &case.stream[1..];
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut from = 0;
    for cut in cuts {
        pieces.push(&rest[from..cut]);
        from = cut;
    }
    pieces.push(&rest[from..]);
    pieces
}

/// The differential check: the stream whole (but for its opening) and cut at the case's
/// points agree.
pub fn check_connection(data: &[u8]) {
    let Some(case) = crate::Case::decode(data) else {
        return;
    };
    if case.stream.is_empty() {
        return;
    }
    let whole = run_connection(case.flags, &case_pieces(&case, &[], false));
    let split = run_connection(case.flags, &case_pieces(&case, &[], true));
    assert_eq!(
        whole,
        split,
        "whole and cut at {:?} differ for {:?}",
        case.cuts,
        String::from_utf8_lossy(case.stream)
    );
}
