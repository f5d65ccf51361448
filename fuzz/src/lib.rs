//! The differential harness behind the `session_feed` fuzz target and the corpus replay
//! test: the same client stream fed to [`Session::feed`] whole and cut at chosen points
//! must give byte-identical replies and identical messages. A terminator missed or seen
//! early at a read boundary (the bug class behind SMTP smuggling) shows up as a
//! difference, not only as a panic.
//!
//! Input format (what the fuzzer mutates and what the corpus files hold):
//! `[flags] [k] [k cut positions, u16 little-endian] [client stream...]`.
//! `flags` bit 0 picks the bare-LF policy (0 = reject, 1 = normalize), bit 1 makes the
//! sink refuse every second message temporarily (451), bit 2 makes it refuse every third
//! as too large (552), bit 3 offers AUTH (RFC 4954, in plaintext as on a loopback
//! listener), bit 4 requires it before MAIL and bit 5 lets an authenticated session
//! relay anywhere. Credentials are judged by a stand-in verifier: alice/secret is
//! right, `busy` gets a temporary failure, `locked` is over its failure limit. `k` is
//! taken modulo 17; each cut position modulo the stream's length plus one.

use std::sync::Arc;

pub mod connection;

use smtpgw::sink::PublishError;
use smtpgw::smtp::auth::{AuthRequest, AuthVerdict};
use smtpgw::smtp::session::AuthPolicy;
use smtpgw::smtp::{BareLfPolicy, MessageId, Session, SessionConfig, SessionEvent, SessionPolicy};

/// The largest message the harness's sessions take; small, so the fuzzer reaches it.
pub const MAX_MESSAGE_SIZE: usize = 4096;

/// One completed message: (MAIL FROM, RCPT TOs, DSN parameters and the AUTH user,
/// body).
pub type Completed = (String, Vec<String>, Vec<String>, Vec<u8>);

/// Everything a client and the sink would see of one session.
#[derive(Debug, PartialEq, Eq)]
pub struct Transcript {
    /// Every byte the session wrote.
    pub replies: Vec<u8>,
    /// (MAIL FROM, RCPT TOs, DSN parameters, body) of every completed message, in
    /// order; the DSN ones as the record has them (RET, ENVID, then each recipient's
    /// NOTIFY and ORCPT).
    pub messages: Vec<Completed>,
    /// Whether the session ended (QUIT) before the input did.
    pub closed: bool,
    /// The session's events other than refusals (body started, ended, abandoned), in
    /// order: however the reads are cut, a reactor must see the same bodies. (Refusal
    /// events are left out: past a few per read they are counted, not kept.)
    pub steps: Vec<SessionEvent>,
}

/// Takes the session's events as a reactor does after every call, keeping the steps in
/// `steps` and checking that every body started ends or is abandoned exactly once
/// before the next starts (`open`: a body is under way).
fn poll(session: &mut Session, steps: &mut Vec<SessionEvent>, open: &mut bool) {
    while let Some(event) = session.poll_event() {
        match event {
            SessionEvent::Refused { .. } => continue,
            SessionEvent::BodyStarted => {
                assert!(!*open, "a body started while another was under way");
                *open = true;
            }
            SessionEvent::BodyEnded | SessionEvent::BodyAbandoned => {
                assert!(*open, "a body ended that never started");
                *open = false;
            }
            SessionEvent::StartTls => {}
        }
        steps.push(event);
    }
}

/// A decoded fuzz input.
#[derive(Debug, Clone)]
pub struct Case<'a> {
    pub flags: u8,
    pub cuts: Vec<usize>,
    pub stream: &'a [u8],
}

impl<'a> Case<'a> {
    /// Decodes `data`; `None` if it is too short to hold the header.
    pub fn decode(data: &'a [u8]) -> Option<Case<'a>> {
        let (&flags, rest) = data.split_first()?;
        let (&k, rest) = rest.split_first()?;
        let k = usize::from(k) % 17;
        let header = rest.get(..2 * k)?;
        let stream = &rest[2 * k..];
        let mut cuts: Vec<usize> = header
            .chunks_exact(2)
            .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
            .collect();
        cuts.sort_unstable();
        Some(Case {
            flags,
            cuts,
            stream,
        })
    }

    /// Encodes a case (for writing corpus files).
    pub fn encode(flags: u8, cuts: &[u16], stream: &[u8]) -> Vec<u8> {
        assert!(cuts.len() <= 16);
        let mut out = vec![flags, cuts.len() as u8];
        for c in cuts {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out.extend_from_slice(stream);
        out
    }

    /// Fails the differential check unless the run whole and the run cut agree.
    pub fn assert_agree<T: PartialEq + std::fmt::Debug>(&self, whole: &T, split: &T) {
        assert_eq!(
            whole,
            split,
            "whole and cut at {:?} differ for {:?}",
            self.cuts,
            String::from_utf8_lossy(self.stream)
        );
    }

    /// The stream cut at `cuts` (sorted, within bounds), in order, empty pieces kept.
    pub fn pieces(&self, cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut pieces = Vec::with_capacity(cuts.len() + 1);
        let mut from = 0;
        for &cut in cuts {
            pieces.push(&self.stream[from..cut]);
            from = cut;
        }
        pieces.push(&self.stream[from..]);
        pieces
    }
}

fn config(flags: u8) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "fuzz.test".into(),
        accept_domains: ["example.com"].into_iter().collect(),
        max_message_size: MAX_MESSAGE_SIZE,
        max_recipients: 4,
        bare_lf: if flags & 1 == 0 {
            BareLfPolicy::Reject
        } else {
            BareLfPolicy::Normalize
        },
        headroom: smtpgw::sink::record::RECEIVED_HEADROOM + "fuzz.test".len(),
    })
}

/// The stand-in verifier (see the module comment).
pub fn verify(r: &AuthRequest) -> AuthVerdict {
    match (&*r.user, &r.password[..]) {
        ("alice", b"secret") => AuthVerdict::Accepted,
        ("busy", _) => AuthVerdict::Temporary,
        ("locked", _) => AuthVerdict::Locked,
        _ => AuthVerdict::Rejected,
    }
}

fn auth_policy(flags: u8) -> Option<AuthPolicy> {
    (flags & 8 != 0).then_some(AuthPolicy {
        plaintext: true,
        required: flags & 16 != 0,
        relay: flags & 32 != 0,
    })
}

/// Feeds `pieces` as a reactor would: it keeps the unconsumed bytes, answers each
/// completed message at once (per `flags`) and writes out all output after every read.
/// Checks what a reactor relies on along the way.
pub fn run(flags: u8, pieces: &[&[u8]]) -> Transcript {
    let policy = SessionPolicy {
        auth: auth_policy(flags),
        ..SessionPolicy::default()
    };
    let mut session = Session::without_greeting(
        config(flags),
        policy,
        "192.0.2.1:25".parse().expect("literal"),
    );
    session.greet();
    let mut buffer = Vec::new();
    let mut replies = Vec::new();
    let mut messages = Vec::new();
    let mut taken = 0u32;
    let mut steps = Vec::new();
    let mut open = false;
    for piece in pieces {
        buffer.extend_from_slice(piece);
        loop {
            let consumed = session.feed(&buffer);
            assert!(consumed <= buffer.len());
            buffer.drain(..consumed);
            poll(&mut session, &mut steps, &mut open);
            if let Some(request) = session.take_auth_request() {
                assert_eq!(session.feed(b"NOOP\r\n"), 0, "no input while verifying");
                session.auth_result(verify(&request));
                poll(&mut session, &mut steps, &mut open);
                continue;
            }
            let Some(message) = session.take_message() else {
                // The session may have stopped for its events to be polled (they were).
                if consumed == 0 || buffer.is_empty() || session.is_closed() {
                    break;
                }
                continue;
            };
            assert!(message.body().len() <= MAX_MESSAGE_SIZE);
            assert_eq!(session.feed(b"NOOP\r\n"), 0, "no input while publishing");
            taken += 1;
            let result = if flags & 2 != 0 && taken.is_multiple_of(2) {
                Err(PublishError::Temporary("fuzz: sink down".into()))
            } else if flags & 4 != 0 && taken.is_multiple_of(3) {
                Err(PublishError::TooLarge)
            } else {
                let env = &message.envelope;
                let mut dsn = vec![
                    env.dsn_ret.map_or("", |r| r.as_str()).to_owned(),
                    env.dsn_envid().to_owned(),
                ];
                assert_eq!(env.rcpt_notify().len(), env.rcpt_count());
                assert_eq!(env.rcpt_orcpt().len(), env.rcpt_count());
                for (notify, orcpt) in env.rcpt_notify().zip(env.rcpt_orcpt()) {
                    dsn.push(format!("{} {orcpt}", notify.as_str()));
                }
                if let Some(user) = &env.auth {
                    dsn.push(format!("auth={user}"));
                }
                messages.push((
                    env.mail_from().to_owned(),
                    env.rcpt_to().map(str::to_owned).collect(),
                    dsn,
                    message.body().to_vec(),
                ));
                Ok(MessageId::from(u128::from(taken)))
            };
            session.publish_result(result);
            poll(&mut session, &mut steps, &mut open);
        }
        // A reactor's buffer only ever holds a partial command line (an AUTH line or
        // SASL response, RFC 4954's 12288 octets, is the longest).
        assert!(
            buffer.len() < smtpgw::smtp::command::MAX_AUTH_LINE
                || session.is_closed()
                || session.is_awaiting_publish()
        );
        replies.extend_from_slice(session.output());
        let out = session.output().len();
        session.advance_output(out);
        if session.is_closed() {
            break;
        }
    }
    Transcript {
        replies,
        messages,
        closed: session.is_closed(),
        steps,
    }
}

/// The differential check: the stream whole and cut at the case's points agree.
pub fn check(data: &[u8]) {
    let Some(case) = Case::decode(data) else {
        return;
    };
    let whole = run(case.flags, &[case.stream]);
    let split = run(case.flags, &case.pieces(&case.cuts));
    case.assert_agree(&whole, &split);
}

/// The seed corpus of a fuzz target (`fuzz/corpus/<target>`), sorted by file name, for
/// the replay tests.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("dir entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("seed"))
        })
        .collect();
    seeds.sort();
    seeds
}
