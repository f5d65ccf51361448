//! The invariants the run holds the gateway to, at every step and at the end: replies
//! in command order with a code the command allows; every `250` for a message backed by
//! exactly one record the sink stored, byte-exact with what the client sent (its body,
//! and its envelope: the reverse path and the recipients the session accepted), no
//! message stored twice (checked by the sink, per client and message), and no id
//! acknowledged twice; output per connection and the body budget within their bounds;
//! no byte written after a connection's write side was shut; every connection ended
//! within its deadlines; no idle timeout for a client that waits on the gateway; after
//! a drain, every connection closed by the drain deadline and every message answered.
//! With TLS and AUTH: a record says whether its session was over TLS and which user it
//! authenticated as; a wrong password never gets `235`; a handshake is over or its
//! connection closed by the handshake timeout; the gateway's records always parse for
//! a client that follows the protocol.

use std::collections::BTreeSet;
use std::fmt;

use crate::clients::{Client, Expect, Reply, MAIL_FROM};
use crate::sink::{Outcome, SimSink};

/// A broken invariant: which, and what the run saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

pub fn violation(kind: &'static str, detail: impl Into<String>) -> Violation {
    Violation {
        kind,
        detail: detail.into(),
    }
}

/// Room past the output cap: the reply of the command that crossed it.
pub const OUTPUT_SLACK: usize = 4096;

/// Whether `code` may answer `expect` (421 may answer anything; it ends the session).
fn allowed(expect: Expect, code: u16) -> bool {
    if code == 421 {
        return true;
    }
    match expect {
        Expect::Greeting => code == 220,
        Expect::Ehlo | Expect::Noop => code == 250,
        Expect::Mail => matches!(code, 250 | 451 | 452),
        Expect::Rcpt { good: true, .. } => matches!(code, 250 | 452 | 503),
        Expect::Rcpt { good: false, .. } => matches!(code, 550 | 452 | 503),
        Expect::Data => matches!(code, 354 | 503 | 554),
        Expect::MessageEnd { .. } => matches!(code, 250 | 451 | 452 | 503 | 550 | 552 | 554),
        Expect::BdatChunk => matches!(code, 250 | 451 | 452 | 503 | 550 | 552 | 554),
        Expect::Quit => code == 221,
        Expect::Junk => matches!(code, 500..=502),
        Expect::StartTls => code == 220,
        Expect::AuthChallenge => code == 334,
        Expect::Auth { good: true } => matches!(code, 235 | 454),
        Expect::Auth { good: false } => matches!(code, 535 | 454),
        Expect::AuthMalformed => code == 501,
        Expect::AuthNeedsTls => code == 538,
        Expect::MailNeedsTls => code == 530,
    }
}

/// The ids acknowledged with `250` so far.
#[derive(Default)]
pub struct Acks {
    ids: BTreeSet<u128>,
    pub count: u64,
}

/// Checks one reply `client` just parsed.
pub fn reply(
    client: &Client,
    r: &Reply,
    sink: &SimSink,
    acks: &mut Acks,
    early_talker_edge: bool,
) -> Result<(), Violation> {
    let who = format!("client {} ({:?})", client.id, client.kind);
    let Some(expect) = r.expect else {
        if r.code == 421 {
            return Ok(());
        }
        return Err(violation(
            "reply order",
            format!(
                "{who}: a reply with no command outstanding: {:?}",
                r.text.trim_end()
            ),
        ));
    };
    if expect == (Expect::Auth { good: false }) && r.code == 235 {
        return Err(violation(
            "auth",
            format!("{who}: a wrong password answered {:?}", r.text.trim_end()),
        ));
    }
    let greeting_refused = expect == Expect::Greeting && early_talker_edge && r.code == 554;
    if !allowed(expect, r.code) && !greeting_refused {
        return Err(violation(
            "reply order",
            format!("{who}: {expect:?} answered {:?}", r.text.trim_end()),
        ));
    }
    let Expect::MessageEnd { msg } = expect else {
        return Ok(());
    };
    let m = &client.script.msgs[msg as usize];
    let tag = (client.id, msg);
    if r.code != 250 {
        if r.code != 421 && sink.stored(tag) {
            return Err(violation(
                "record",
                format!(
                    "{who}: message {msg} stored but answered {:?}",
                    r.text.trim_end()
                ),
            ));
        }
        return Ok(());
    }
    if m.refused {
        return Err(violation(
            "record",
            format!(
                "{who}: message {msg} must be refused but got {:?}",
                r.text.trim_end()
            ),
        ));
    }
    let id = r
        .text
        .split("queued as ")
        .nth(1)
        .and_then(|t| ulid::Ulid::from_string(t.trim_end()).ok())
        .map(u128::from)
        .ok_or_else(|| violation("record", format!("{who}: 250 without an id: {:?}", r.text)))?;
    if !acks.ids.insert(id) {
        return Err(violation(
            "record",
            format!("{who}: id {id:x} acknowledged twice"),
        ));
    }
    acks.count += 1;
    sink.with_record(id, |rec| {
        let Some(rec) = rec else {
            return Err(violation("record", format!("{who}: 250 for id {id:x}, which the sink never stored")));
        };
        if rec.outcome != Outcome::Ok {
            return Err(violation(
                "record",
                format!("{who}: 250 for id {id:x}, which the sink answered {:?}", rec.outcome),
            ));
        }
        if rec.tag != Some(tag) {
            return Err(violation(
                "record",
                format!("{who}: 250 for message {msg} names the record of {:?}", rec.tag),
            ));
        }
        let sent: Vec<&[u8]> = client
            .envelopes
            .get(msg as usize)
            .and_then(Option::as_ref)
            .map(|v| v.iter().map(|r| r.as_bytes()).collect())
            .unwrap_or_default();
        let stored: Vec<&[u8]> = rec.rcpt_to.iter().map(Vec::as_slice).collect();
        if rec.mail_from != MAIL_FROM.as_bytes() || stored != sent {
            return Err(violation(
                "record",
                format!(
                    "{who}: message {msg}: stored envelope from {:?} to {:?}, the session accepted from {MAIL_FROM:?} to {:?}",
                    rec.mail_from.escape_ascii().to_string(),
                    stored.iter().map(|r| r.escape_ascii().to_string()).collect::<Vec<_>>(),
                    sent.iter().map(|r| r.escape_ascii().to_string()).collect::<Vec<_>>(),
                ),
            ));
        }
        // The record says how the message came: over TLS (`smtp.tls` names the version
        // and suite, else `false`) and as which AUTH user (`smtp.auth`, else empty).
        let tls_ok = if client.tls_on() {
            rec.tls.starts_with(b"TLSv1.")
        } else {
            rec.tls == b"false"
        };
        let user = client.authenticated.as_deref().unwrap_or("");
        if !tls_ok || rec.auth != user.as_bytes() {
            return Err(violation(
                "record",
                format!(
                    "{who}: message {msg}: record says smtp.tls {:?} and smtp.auth {:?}; the session was {} and authenticated as {user:?}",
                    rec.tls.escape_ascii().to_string(),
                    rec.auth.escape_ascii().to_string(),
                    if client.tls_on() { "over TLS" } else { "in plaintext" },
                ),
            ));
        }
        if rec.body != m.stored_body {
            let at = rec
                .body
                .iter()
                .zip(&m.stored_body)
                .position(|(a, b)| a != b)
                .unwrap_or(rec.body.len().min(m.stored_body.len()));
            let around = |b: &[u8]| {
                let from = at.saturating_sub(12);
                b[from..(at + 12).min(b.len())].escape_ascii().to_string()
            };
            return Err(violation(
                "record",
                format!(
                    "{who}: message {msg}: stored body differs from what was sent at byte {at} of {} stored, {} expected: stored \"{}\", sent \"{}\"",
                    rec.body.len(),
                    m.stored_body.len(),
                    around(&rec.body),
                    around(&m.stored_body),
                ),
            ));
        }
        Ok(())
    })
}
