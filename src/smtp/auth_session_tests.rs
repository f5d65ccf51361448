//! AUTH (RFC 4954) in the session, byte by byte: every reply of the protocol table,
//! for every split of the reads, with a stand-in verifier answering as the reactor would.

use super::*;
use crate::smtp::envelope::MessageId;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

fn config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        accept_domains: ["example.com"].into_iter().collect(),
        max_message_size: 1000,
        max_recipients: 3,
        bare_lf: BareLfPolicy::Reject,
        headroom: crate::smtp::test_support::HEADROOM,
    })
}

const OFFERED: AuthPolicy = AuthPolicy {
    plaintext: false,
    required: false,
    relay: false,
};

/// The stand-in verifier: alice/secret is right; "busy" gets a temporary failure,
/// "locked" is over its failure limit; anything else is wrong.
fn verify(r: &AuthRequest) -> AuthVerdict {
    match (&*r.user, &r.password[..]) {
        ("alice", b"secret") => AuthVerdict::Accepted,
        ("busy", _) => AuthVerdict::Temporary,
        ("locked", _) => AuthVerdict::Locked,
        _ => AuthVerdict::Rejected,
    }
}

struct Run {
    replies: String,
    /// Record headers of each message.
    /// The envelope of each message, which the record is made from (`sink::record`).
    envelopes: Vec<Envelope>,
    events: Vec<SessionEvent>,
    closed: bool,
}

/// Feeds `pieces` like a reactor: keeps unconsumed bytes, verifies credentials and
/// stores messages at once, and resumes feeding.
fn run_auth<'a>(
    policy: Option<AuthPolicy>,
    tls: bool,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> Run {
    let policy = SessionPolicy {
        auth: policy,
        ..SessionPolicy::default()
    };
    let mut s = Session::without_greeting(config(), policy, "192.0.2.7:4321".parse().unwrap());
    if tls {
        s.tls_started(Arc::from("TLSv1.3 TLS13_AES_128_GCM_SHA256"));
    }
    s.greet();
    let mut buffer = Vec::new();
    let mut envelopes = Vec::new();
    let mut events = Vec::new();
    let mut stored = 0u128;
    for piece in pieces {
        buffer.extend_from_slice(piece);
        loop {
            let n = s.feed(&buffer);
            buffer.drain(..n);
            while let Some(e) = s.poll_event() {
                events.push(e);
            }
            if let Some(request) = s.take_auth_request() {
                assert!(s.is_awaiting_auth());
                // Nothing is consumed while the verifier works.
                assert_eq!(s.feed(&buffer), 0);
                s.auth_result(verify(&request));
                continue;
            }
            let Some(message) = s.take_message() else {
                break;
            };
            stored += 1;
            envelopes.push(message.envelope);
            s.publish_result(Ok(MessageId::from(stored)));
        }
        if s.is_closed() {
            break;
        }
    }
    while let Some(e) = s.poll_event() {
        events.push(e);
    }
    Run {
        replies: String::from_utf8_lossy(s.output()).into_owned(),
        envelopes,
        events,
        closed: s.is_closed(),
    }
}

fn b64(s: &[u8]) -> String {
    STANDARD.encode(s)
}

/// The final reply lines after the greeting, as `code` or `code x.y.z`, `334` alone.
fn finals(replies: &str) -> Vec<String> {
    replies
        .split("\r\n")
        .filter(|l| l.len() >= 4 && &l[3..4] == " ")
        .skip(1)
        .map(|l| {
            let mut w = l.split(' ');
            let code = w.next().unwrap_or_default();
            match w.next() {
                Some(e)
                    if e.split('.').count() == 3
                        && e.chars().all(|c| c == '.' || c.is_ascii_digit()) =>
                {
                    format!("{code} {e}")
                }
                _ => code.to_string(),
            }
        })
        .collect()
}

/// One row: name, input after EHLO, policy, TLS, the final replies after EHLO's 250.
type Row = (
    &'static str,
    String,
    Option<AuthPolicy>,
    bool,
    Vec<&'static str>,
);

fn table() -> Vec<Row> {
    let good = b64(b"\0alice\0secret");
    let wrong = b64(b"\0alice\0wrong");
    let unknown = b64(b"\0mallory\0secret");
    let required = AuthPolicy {
        required: true,
        ..OFFERED
    };
    let plaintext = AuthPolicy {
        plaintext: true,
        ..OFFERED
    };
    vec![
        (
            "plain initial",
            format!("AUTH PLAIN {good}\r\n"),
            Some(OFFERED),
            true,
            vec!["235 2.7.0"],
        ),
        (
            "plain lower case",
            format!("auth plain {good}\r\n"),
            Some(OFFERED),
            true,
            vec!["235 2.7.0"],
        ),
        (
            "plain wrong password",
            format!("AUTH PLAIN {wrong}\r\n"),
            Some(OFFERED),
            true,
            vec!["535 5.7.8"],
        ),
        (
            "plain unknown user",
            format!("AUTH PLAIN {unknown}\r\n"),
            Some(OFFERED),
            true,
            vec!["535 5.7.8"],
        ),
        (
            "plain challenge",
            format!("AUTH PLAIN\r\n{good}\r\n"),
            Some(OFFERED),
            true,
            vec!["334", "235 2.7.0"],
        ),
        (
            "plain authzid of another",
            format!("AUTH PLAIN {}\r\n", b64(b"bob\0alice\0secret")),
            Some(OFFERED),
            true,
            vec!["535 5.7.8"],
        ),
        (
            "plain authzid of self",
            format!("AUTH PLAIN {}\r\n", b64(b"alice\0alice\0secret")),
            Some(OFFERED),
            true,
            vec!["235 2.7.0"],
        ),
        (
            "login",
            format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64(b"alice"), b64(b"secret")),
            Some(OFFERED),
            true,
            vec!["334", "334", "235 2.7.0"],
        ),
        (
            "login initial",
            format!("AUTH LOGIN {}\r\n{}\r\n", b64(b"alice"), b64(b"secret")),
            Some(OFFERED),
            true,
            vec!["334", "235 2.7.0"],
        ),
        (
            "login wrong",
            format!("AUTH LOGIN {}\r\n{}\r\n", b64(b"alice"), b64(b"nope")),
            Some(OFFERED),
            true,
            vec!["334", "535 5.7.8"],
        ),
        (
            "cancel plain",
            "AUTH PLAIN\r\n*\r\n".into(),
            Some(OFFERED),
            true,
            vec!["334", "501 5.7.0"],
        ),
        (
            "cancel login password",
            format!("AUTH LOGIN {}\r\n*\r\n", b64(b"alice")),
            Some(OFFERED),
            true,
            vec!["334", "501 5.7.0"],
        ),
        (
            "initial cancel",
            "AUTH PLAIN *\r\n".into(),
            Some(OFFERED),
            true,
            vec!["501 5.7.0"],
        ),
        (
            "bad base64 initial",
            "AUTH PLAIN AGFsaWNl!!\r\n".into(),
            Some(OFFERED),
            true,
            vec!["501 5.5.2"],
        ),
        (
            "bad base64 response",
            "AUTH LOGIN\r\nnot base64\r\n".into(),
            Some(OFFERED),
            true,
            vec!["334", "501 5.5.2"],
        ),
        (
            "plain without NULs",
            format!("AUTH PLAIN {}\r\n", b64(b"alicesecret")),
            Some(OFFERED),
            true,
            vec!["501 5.5.2"],
        ),
        (
            "empty initial",
            "AUTH PLAIN =\r\n".into(),
            Some(OFFERED),
            true,
            vec!["501 5.5.2"],
        ),
        (
            "after failure the session goes on",
            format!("AUTH PLAIN {wrong}\r\nAUTH PLAIN {good}\r\n"),
            Some(OFFERED),
            true,
            vec!["535 5.7.8", "235 2.7.0"],
        ),
        (
            "twice",
            format!("AUTH PLAIN {good}\r\nAUTH PLAIN {good}\r\n"),
            Some(OFFERED),
            true,
            vec!["235 2.7.0", "503 5.5.1"],
        ),
        (
            "in a transaction",
            format!("MAIL FROM:<a@x.test>\r\nAUTH PLAIN {good}\r\n"),
            Some(OFFERED),
            true,
            vec!["250 2.1.0", "503 5.5.1"],
        ),
        (
            "unknown mechanism",
            "AUTH CRAM-MD5\r\n".into(),
            Some(OFFERED),
            true,
            vec!["504 5.5.4"],
        ),
        (
            "no mechanism",
            "AUTH\r\n".into(),
            Some(OFFERED),
            true,
            vec!["501 5.5.4"],
        ),
        (
            "before TLS",
            format!("AUTH PLAIN {good}\r\n"),
            Some(OFFERED),
            false,
            vec!["538 5.7.11"],
        ),
        (
            "plaintext allowed",
            format!("AUTH PLAIN {good}\r\n"),
            Some(plaintext),
            false,
            vec!["235 2.7.0"],
        ),
        (
            "not offered",
            format!("AUTH PLAIN {good}\r\n"),
            None,
            true,
            vec!["502 5.5.1"],
        ),
        (
            "required",
            format!("MAIL FROM:<a@x.test>\r\nAUTH PLAIN {good}\r\nMAIL FROM:<a@x.test>\r\n"),
            Some(required),
            true,
            vec!["530 5.7.0", "235 2.7.0", "250 2.1.0"],
        ),
        (
            "temporary",
            format!("AUTH PLAIN {}\r\nNOOP\r\n", b64(b"\0busy\0pw")),
            Some(OFFERED),
            true,
            vec!["454 4.7.0", "250 2.0.0"],
        ),
        (
            "locked",
            format!("AUTH PLAIN {}\r\nNOOP\r\n", b64(b"\0locked\0pw")),
            Some(OFFERED),
            true,
            vec!["421 4.7.0"],
        ),
        (
            "pipelined after AUTH waits for the verdict",
            format!(
                "AUTH PLAIN {good}\r\nMAIL FROM:<a@x.test> AUTH=<>\r\nRCPT TO:<b@example.com>\r\n"
            ),
            Some(OFFERED),
            true,
            vec!["235 2.7.0", "250 2.1.0", "250 2.1.5"],
        ),
        (
            "MAIL AUTH=xtext",
            "MAIL FROM:<a@x.test> AUTH=a+40x.test\r\n".into(),
            Some(OFFERED),
            true,
            vec!["250 2.1.0"],
        ),
        (
            "MAIL AUTH= malformed",
            "MAIL FROM:<a@x.test> AUTH=a+4\r\n".into(),
            Some(OFFERED),
            true,
            vec!["501 5.5.4"],
        ),
        (
            "MAIL AUTH twice",
            "MAIL FROM:<a@x.test> AUTH=<> AUTH=<>\r\n".into(),
            Some(OFFERED),
            true,
            vec!["501 5.5.4"],
        ),
    ]
}

#[test]
fn protocol_table_for_every_split_of_reads() {
    for (name, script, policy, tls, want) in table() {
        let input = format!("EHLO client.test\r\n{script}");
        let input = input.as_bytes();
        let whole = run_auth(policy, tls, [input]);
        let mut got = finals(&whole.replies);
        assert_eq!(got.remove(0), "250", "{name}: EHLO");
        assert_eq!(got, want, "{name}: {}", whole.replies);
        for cut in 0..=input.len() {
            let split = run_auth(policy, tls, [&input[..cut], &input[cut..]]);
            assert_eq!(split.replies, whole.replies, "{name}: split at {cut}");
        }
        let bytes = run_auth(policy, tls, input.chunks(1));
        assert_eq!(bytes.replies, whole.replies, "{name}: byte by byte");
    }
}

#[test]
fn ehlo_offers_auth_only_where_it_can_be_used() {
    let offers = |policy, tls| {
        run_auth(policy, tls, [&b"EHLO c.test\r\n"[..]])
            .replies
            .contains("\r\n250-AUTH PLAIN LOGIN\r\n")
    };
    assert!(offers(Some(OFFERED), true));
    assert!(!offers(Some(OFFERED), false));
    assert!(!offers(None, true));
    let plaintext = AuthPolicy {
        plaintext: true,
        ..OFFERED
    };
    assert!(offers(Some(plaintext), false));
}

#[test]
fn challenges_are_the_rfc_ones() {
    let r = run_auth(
        Some(OFFERED),
        true,
        [format!(
            "EHLO c\r\nAUTH LOGIN\r\n{}\r\n*\r\nAUTH PLAIN\r\n*\r\n",
            b64(b"alice")
        )
        .as_bytes()],
    );
    assert!(r
        .replies
        .contains("\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n501 5.7.0 "));
    assert!(r.replies.contains("\r\n334 \r\n501 5.7.0 "));
}

#[test]
fn failures_are_events_naming_the_user() {
    let r = run_auth(
        Some(OFFERED),
        true,
        [format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nAUTH LOGIN {}\r\n{}\r\n",
            b64(b"\0mallory\0x"),
            b64(b"eve"),
            b64(b"y")
        )
        .as_bytes()],
    );
    let got: Vec<_> = r
        .events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Refused {
                refusal,
                verb,
                user,
                ..
            } => Some((*refusal, *verb, user.as_deref().map(String::from))),
            _ => None,
        })
        .collect();
    assert_eq!(
        got,
        [
            (Refusal::AuthFailed, "AUTH", Some("mallory".to_string())),
            (Refusal::AuthFailed, "AUTH", Some("eve".to_string()))
        ]
    );
    // Events carry the user name only: nothing else the client sent.
    assert!(r.events.iter().all(|e| match e {
        SessionEvent::Refused {
            address, detail, ..
        } => address.is_none() && detail.is_none(),
        _ => false,
    }));
}

#[test]
fn a_locked_user_closes_the_session() {
    let r = run_auth(
        Some(OFFERED),
        true,
        [format!("EHLO c\r\nAUTH PLAIN {}\r\n", b64(b"\0locked\0pw")).as_bytes()],
    );
    assert!(r.closed);
    assert!(r
        .replies
        .ends_with("421 4.7.0 mx.test Too many authentication failures, try again later\r\n"));
}

#[test]
fn response_lines_longer_than_rfc_4954_allows_end_the_exchange() {
    let long = "A".repeat(command::MAX_AUTH_LINE);
    let r = run_auth(
        Some(OFFERED),
        true,
        [format!("EHLO c\r\nAUTH PLAIN\r\n{long}\r\nNOOP\r\n").as_bytes()],
    );
    assert_eq!(finals(&r.replies)[1..], ["334", "500 5.5.6", "250 2.0.0"]);
    // Just under the limit, it is a response (and not base64 of a PLAIN message).
    let fits = "A".repeat(command::MAX_AUTH_LINE - 2);
    let r = run_auth(
        Some(OFFERED),
        true,
        [format!("EHLO c\r\nAUTH PLAIN\r\n{fits}\r\n").as_bytes()],
    );
    assert_eq!(finals(&r.replies)[1..], ["334", "501 5.5.2"]);
}

/// The user a session authenticated as reaches the envelope, and with it the record
/// (`sink::record` writes it as `smtp.auth` and RFC 3848's protocol names).
#[test]
fn the_authenticated_identity_is_recorded() {
    let good = b64(b"\0alice\0secret");
    let msg = "MAIL FROM:<a@x.test> AUTH=<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nx\r\n.\r\n";
    let r = run_auth(
        Some(OFFERED),
        true,
        [format!("EHLO c\r\n{msg}AUTH PLAIN {good}\r\n{msg}").as_bytes()],
    );
    assert_eq!(r.envelopes.len(), 2);
    let tls = Some("TLSv1.3 TLS13_AES_128_GCM_SHA256");
    assert_eq!(r.envelopes[0].auth.as_deref(), None);
    assert_eq!(r.envelopes[0].tls.as_deref(), tls);
    assert_eq!(r.envelopes[1].auth.as_deref(), Some("alice"));
    assert_eq!(r.envelopes[1].tls.as_deref(), tls);
    assert_eq!(r.envelopes[1].mail_params(), "AUTH=<>");
    // Over plaintext (allowed on loopback).
    let plaintext = AuthPolicy {
        plaintext: true,
        ..OFFERED
    };
    let r = run_auth(
        Some(plaintext),
        false,
        [format!("EHLO c\r\nAUTH PLAIN {good}\r\n{msg}").as_bytes()],
    );
    assert_eq!(r.envelopes.len(), 1);
    assert_eq!(r.envelopes[0].auth.as_deref(), Some("alice"));
    assert_eq!(r.envelopes[0].tls.as_deref(), None);
}

#[test]
fn auth_relay_lets_only_authenticated_sessions_send_anywhere() {
    let good = b64(b"\0alice\0secret");
    let relay = AuthPolicy {
        relay: true,
        ..OFFERED
    };
    let rcpt =
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\nRCPT TO:<b@example.com>\r\nRSET\r\n";
    let codes = |policy, script: String| {
        finals(&run_auth(Some(policy), true, [script.as_bytes()]).replies)[1..].to_vec()
    };
    // Unauthenticated: only --accept-domain.
    assert_eq!(
        codes(relay, format!("EHLO c\r\n{rcpt}")),
        ["250 2.1.0", "550 5.7.1", "250 2.1.5", "250 2.0.0"]
    );
    // Authenticated with --auth-relay: anywhere.
    assert_eq!(
        codes(relay, format!("EHLO c\r\nAUTH PLAIN {good}\r\n{rcpt}")),
        [
            "235 2.7.0",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.0.0"
        ]
    );
    // Authenticated without it: still only --accept-domain.
    assert_eq!(
        codes(OFFERED, format!("EHLO c\r\nAUTH PLAIN {good}\r\n{rcpt}")),
        [
            "235 2.7.0",
            "250 2.1.0",
            "550 5.7.1",
            "250 2.1.5",
            "250 2.0.0"
        ]
    );
}

#[test]
fn starttls_forgets_the_authentication() {
    let good = b64(b"\0alice\0secret");
    let plaintext = AuthPolicy {
        plaintext: true,
        ..OFFERED
    };
    let policy = SessionPolicy {
        starttls: true,
        auth: Some(plaintext),
        ..SessionPolicy::default()
    };
    let mut s = Session::without_greeting(config(), policy, "192.0.2.7:1".parse().unwrap());
    s.greet();
    let input = format!("EHLO c\r\nAUTH PLAIN {good}\r\n");
    assert_eq!(s.feed(input.as_bytes()), input.len());
    let request = s.take_auth_request().unwrap();
    s.auth_result(verify(&request));
    assert_eq!(s.authenticated().map(|u| &**u), Some("alice"));
    while s.poll_event().is_some() {}
    s.feed(b"STARTTLS\r\n");
    assert!(s.is_starting_tls());
    assert_eq!(s.poll_event(), Some(SessionEvent::StartTls));
    s.tls_started(Arc::from("TLSv1.3 x"));
    assert_eq!(s.authenticated(), None);
}

/// An encrypted, greeted session offering AUTH with `auth`.
fn offering(auth: Option<AuthPolicy>) -> Session {
    let policy = SessionPolicy {
        auth,
        ..SessionPolicy::default()
    };
    let mut s = Session::without_greeting(config(), policy, "192.0.2.7:1".parse().unwrap());
    s.tls_started(Arc::from("TLSv1.3 x"));
    s.greet();
    s
}

/// A gate with the limits a test sets, noting whom it was asked about.
#[derive(Default)]
struct Limited {
    user_over: bool,
    auth_over: bool,
    users_asked: Vec<String>,
}

impl Gate for Limited {
    fn message_allowed(&mut self) -> bool {
        true
    }
    fn user_message_allowed(&mut self, user: &str) -> bool {
        self.users_asked.push(user.into());
        !self.user_over
    }
    fn auth_allowed(&mut self) -> bool {
        !self.auth_over
    }
    fn body_memory_available(&mut self) -> bool {
        true
    }
}

#[test]
fn user_message_rate_closes_only_authenticated_sessions() {
    let good = b64(b"\0alice\0secret");
    let mut s = offering(Some(OFFERED));
    let mut over = Limited {
        user_over: true,
        ..Limited::default()
    };
    s.feed_with(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRSET\r\n", &mut over);
    let input = format!("AUTH PLAIN {good}\r\n");
    s.feed_with(input.as_bytes(), &mut over);
    let request = s.take_auth_request().unwrap();
    s.auth_result(verify(&request));
    s.feed_with(b"MAIL FROM:<a@x.test>\r\n", &mut over);
    assert_eq!(over.users_asked, ["alice"]);
    let text = String::from_utf8_lossy(s.output()).into_owned();
    assert!(text.ends_with("235 2.7.0 Authentication successful\r\n421 4.7.0 mx.test Too many messages for your user, try again later\r\n"), "{text}");
    assert!(s.is_closed());
}

/// Every close for too many AUTH failures counts in
/// `smtpgw_session_limit_closes_total{reason="auth_failures"}` like the other limits:
/// a user locked by the verifier, an address already over its limit, and an address
/// that goes over it with this failure (the driver's `refuse_over_limit`).
#[test]
fn auth_failure_closes_count_as_limit_closes() {
    // An encrypted session offering AUTH that has sent `AUTH PLAIN` as `user`.
    let after_auth = |user: &[u8], over: bool| {
        let mut s = offering(Some(OFFERED));
        let mut gate = Limited {
            auth_over: over,
            ..Limited::default()
        };
        let response = b64(&[b"\0", user, b"\0pw"].concat());
        s.feed_with(
            format!("EHLO c\r\nAUTH PLAIN {response}\r\n").as_bytes(),
            &mut gate,
        );
        s
    };
    let closes = |s: &mut Session| s.stats_mut().limit_closes[LimitClose::AuthFailures];

    let mut s = after_auth(b"locked", false);
    let request = s.take_auth_request().unwrap();
    s.auth_result(verify(&request));
    assert!(s.is_closed());
    assert_eq!(closes(&mut s), 1);

    let mut s = after_auth(b"bob", true);
    assert!(s.take_auth_request().is_none());
    assert!(s.is_closed());
    assert_eq!(closes(&mut s), 1);

    let mut s = after_auth(b"bob", false);
    let request = s.take_auth_request().unwrap();
    s.auth_result(verify(&request));
    s.refuse_over_limit(Refusal::AuthFailures, "Too many authentication failures");
    assert!(s.is_closed());
    assert_eq!(closes(&mut s), 1);
    assert_eq!(LimitClose::AuthFailures.as_str(), "auth_failures");
}

/// HELP lists AUTH where EHLO offers it, and explains it as a topic; elsewhere neither.
#[test]
fn help_mentions_auth_only_where_it_is_offered() {
    for (policy, tls, offered) in [
        (Some(OFFERED), true, true),
        (Some(OFFERED), false, false),
        (None, true, false),
    ] {
        let r = run_auth(policy, tls, [&b"HELP\r\nHELP AUTH\r\n"[..]]);
        let commands = r
            .replies
            .lines()
            .filter(|l| l.contains("Commands:") || l.contains("VRFY"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(commands.contains(" AUTH"), offered, "{:?}", r.replies);
        assert_eq!(
            r.replies.contains("214 2.0.0 AUTH PLAIN|LOGIN"),
            offered,
            "{}",
            r.replies
        );
    }
}
