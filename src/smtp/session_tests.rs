//! Session tests: every command, reply and state transition, byte by byte.

use super::*;
use crate::smtp::envelope::MessageId;
use proptest::prelude::*;

fn config(bare_lf: BareLfPolicy) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        accept_domains: ["example.com", "[192.0.2.1]"].into_iter().collect(),
        max_message_size: 100,
        max_recipients: 3,
        bare_lf,
        headroom: crate::smtp::test_support::HEADROOM,
    })
}

/// What a client would see: every byte the session wrote, every message it completed.
#[derive(Debug, PartialEq)]
struct Transcript {
    replies: Vec<u8>,
    messages: Vec<(Vec<u8>, Vec<String>, Vec<u8>)>,
}

/// Feeds `input` in the given pieces, like a reactor would: it keeps unconsumed bytes,
/// stores each completed message at once (ids are a counter) and resumes feeding.
fn run_pieces<'a>(
    cfg: Arc<SessionConfig>,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> Transcript {
    let mut messages = Vec::new();
    let session = feed_pieces(cfg, pieces, |message| {
        messages.push((
            message.envelope.mail_from().as_bytes().to_vec(),
            message.envelope.rcpt_to().map(String::from).collect(),
            message.body().to_vec(),
        ));
    });
    Transcript {
        replies: session.output().to_vec(),
        messages,
    }
}

/// The reactor's loop of [`run_pieces`]: each completed message goes to `store`, then
/// is answered `250` with the next counter id.
fn feed_pieces<'a>(
    cfg: Arc<SessionConfig>,
    pieces: impl IntoIterator<Item = &'a [u8]>,
    mut store: impl FnMut(Message),
) -> Session {
    let mut session = Session::new(cfg, "192.0.2.7:4321".parse().unwrap());
    let mut buffer = Vec::new();
    let mut stored = 0u128;
    for piece in pieces {
        buffer.extend_from_slice(piece);
        loop {
            let n = session.feed(&buffer);
            buffer.drain(..n);
            let Some(message) = session.take_message() else {
                break;
            };
            store(message);
            stored += 1;
            session.publish_result(Ok(MessageId::from(stored)));
        }
        if session.is_closed() {
            break;
        }
    }
    session
}

/// A session with the reject policy, as a reactor would create it.
fn new_session() -> Session {
    Session::new(config(BareLfPolicy::Reject), "192.0.2.7:1".parse().unwrap())
}

fn run(input: &[u8]) -> Transcript {
    run_pieces(config(BareLfPolicy::Reject), [input])
}

/// The final line of each reply after the greeting, as `code` or `code x.y.z`.
fn codes(t: &Transcript) -> Vec<String> {
    String::from_utf8_lossy(&t.replies)
        .split("\r\n")
        .filter(|l| l.len() >= 4 && &l[3..4] == " ")
        .skip(1)
        .map(|l| {
            let mut words = l.split(' ');
            let code = words.next().unwrap_or_default();
            match words.next() {
                Some(e)
                    if e.split('.').count() == 3
                        && e.split('.').all(|n| n.parse::<u16>().is_ok()) =>
                {
                    format!("{code} {e}")
                }
                _ => code.to_string(),
            }
        })
        .collect()
}

/// `code` for replies without an enhanced code, `code x.y.z` for those with one.
fn replies(input: &str) -> Vec<String> {
    codes(&run(input.as_bytes()))
}

const HELLO: &str = "EHLO client.test\r\n";
const TXN: &str = "EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n";

#[test]
fn greeting_and_ehlo_advertise_only_what_works() {
    let t = run(b"EHLO client.test\r\n");
    let text = String::from_utf8(t.replies).unwrap();
    assert!(text.starts_with("220 mx.test ESMTP"));
    for ext in [
        "PIPELINING",
        "SIZE 100",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
    ] {
        assert!(
            text.contains(&format!("250-{ext}\r\n")) || text.contains(&format!("250 {ext}\r\n")),
            "{ext}"
        );
    }
    assert!(!text.contains("STARTTLS") && !text.contains("AUTH"));
}

#[test]
fn full_transaction_and_a_second_one_in_the_same_session() {
    let input = format!(
        "{TXN}DATA\r\nSubject: hi\r\n\r\n..dot\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"
    );
    let t = run(input.as_bytes());
    assert_eq!(
        codes(&t),
        [
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert_eq!(t.messages.len(), 2);
    assert_eq!(t.messages[0].0, b"a@x.test");
    assert_eq!(t.messages[0].1, vec!["b@example.com".to_string()]);
    assert_eq!(t.messages[0].2, b"Subject: hi\r\n\r\n.dot\r\n");
    assert_eq!(t.messages[1].0, b"");
    assert_eq!(t.messages[1].1, vec!["Postmaster".to_string()]);
    let text = String::from_utf8(t.replies).unwrap();
    assert!(text.contains(&format!("queued as {}", MessageId::from(1u128))));
}

/// (commands before, command, expected final reply). The table covers every reply the
/// core can give to a command, and each row also checks the state was kept afterwards.
/// (what came before, the command, its reply's code and enhanced code).
fn reply_cases() -> Vec<(String, String, &'static str)> {
    let long_local = format!("{}@example.com", "l".repeat(65));
    let dsn = dsn_cases()
        .into_iter()
        .map(|(before, command, code, _)| (before, command, code));
    let mut cases = vec![
        ("".into(), "HELO client.test".into(), "250"),
        ("".into(), "HELO".into(), "501 5.5.4"),
        ("".into(), "EHLO".into(), "501 5.5.4"),
        ("".into(), "HELO bad\u{1}name".into(), "501 5.5.4"),
        ("".into(), "MAIL FROM:<a@x.test>".into(), "503 5.5.1"),
        (HELLO.into(), "MAIL FROM:<a@x.test>".into(), "250 2.1.0"),
        (HELLO.into(), "MAIL FROM:<>".into(), "250 2.1.0"),
        (HELLO.into(), "MAIL FROM:a@x.test".into(), "501 5.1.7"),
        (HELLO.into(), "MAIL TO:<a@x.test>".into(), "501 5.5.4"),
        (
            HELLO.into(),
            format!("MAIL FROM:<{long_local}>"),
            "553 5.1.7",
        ),
        (
            HELLO.into(),
            "MAIL FROM:<a@x.test> SIZE=100".into(),
            "250 2.1.0",
        ),
        (
            HELLO.into(),
            "MAIL FROM:<a@x.test> SIZE=101".into(),
            "552 5.3.4",
        ),
        (
            HELLO.into(),
            "MAIL FROM:<a@x.test> SIZE=x".into(),
            "501 5.5.4",
        ),
        (
            HELLO.into(),
            "MAIL FROM:<a@x.test> SIZE=1 SIZE=1".into(),
            "501 5.5.4",
        ),
        (
            HELLO.into(),
            "MAIL FROM:<a@x.test> BODY=8BITMIME".into(),
            "250 2.1.0",
        ),
        (
            HELLO.into(),
            "MAIL FROM:<a@x.test> BODY=BINARYMIME".into(),
            "555 5.5.4",
        ),
        (
            "HELO c\r\n".into(),
            "MAIL FROM:<a@x.test> SIZE=1".into(),
            "555 5.5.4",
        ),
        (HELLO.into(), "MAIL FROM:<ü@x.test>".into(), "553 5.6.7"),
        (
            HELLO.into(),
            "MAIL FROM:<ü@x.test> SMTPUTF8".into(),
            "250 2.1.0",
        ),
        (HELLO.into(), "SEND FROM:<a@x.test>".into(), "250 2.1.0"),
        (HELLO.into(), "SOML FROM:<a@x.test>".into(), "250 2.1.0"),
        (HELLO.into(), "SAML FROM:<a@x.test>".into(), "250 2.1.0"),
        (TXN.into(), "MAIL FROM:<a@x.test>".into(), "503 5.5.1"),
        (HELLO.into(), "RCPT TO:<b@example.com>".into(), "503 5.5.1"),
        (TXN.into(), "RCPT TO:<c@EXAMPLE.COM>".into(), "250 2.1.5"),
        (TXN.into(), "RCPT TO:<c@[192.0.2.1]>".into(), "250 2.1.5"),
        (TXN.into(), "RCPT TO:<c@elsewhere.test>".into(), "550 5.7.1"),
        (TXN.into(), "RCPT TO:<postmaster>".into(), "250 2.1.5"),
        (TXN.into(), "RCPT TO:<>".into(), "501 5.1.3"),
        (TXN.into(), "RCPT TO:c@example.com".into(), "501 5.1.3"),
        (TXN.into(), format!("RCPT TO:<{long_local}>"), "553 5.1.3"),
        (
            TXN.into(),
            "RCPT TO:<c@example.com> XNOTIFY=NEVER".into(),
            "555 5.5.4",
        ),
        (
            "HELO c\r\nMAIL FROM:<a@x.test>\r\n".into(),
            "RCPT TO:<c@example.com> NOTIFY=NEVER".into(),
            "555 5.5.4",
        ),
        (TXN.into(), "RCPT TO:<ü@example.com>".into(), "553 5.6.7"),
        (
            "EHLO c\r\nMAIL FROM:<a@x.test> SMTPUTF8\r\n".into(),
            "RCPT TO:<ü@example.com>".into(),
            "250 2.1.5",
        ),
        (
            format!("{TXN}RCPT TO:<c@example.com>\r\nRCPT TO:<d@example.com>\r\n"),
            "RCPT TO:<e@example.com>".into(),
            "452 4.5.3",
        ),
        (HELLO.into(), "DATA".into(), "503 5.5.1"),
        (
            format!("{HELLO}MAIL FROM:<>\r\n"),
            "DATA".into(),
            "554 5.5.1",
        ),
        (TXN.into(), "DATA x".into(), "501 5.5.4"),
        (TXN.into(), "RSET".into(), "250 2.0.0"),
        (TXN.into(), "RSET x".into(), "501 5.5.4"),
        ("".into(), "NOOP".into(), "250 2.0.0"),
        ("".into(), "NOOP with args".into(), "250 2.0.0"),
        ("".into(), "VRFY someone".into(), "252 2.5.2"),
        ("".into(), "VRFY".into(), "501 5.5.4"),
        ("".into(), "EXPN list".into(), "502 5.5.1"),
        ("".into(), "HELP".into(), "214 2.0.0"),
        ("".into(), "HELP mail".into(), "214 2.0.0"),
        ("".into(), "HELP nothing".into(), "504 5.5.4"),
        ("".into(), "TURN".into(), "502 5.5.1"),
        ("".into(), "STARTTLS".into(), "502 5.5.1"),
        ("".into(), "AUTH PLAIN".into(), "502 5.5.1"),
        ("".into(), "XYZZY".into(), "500 5.5.2"),
        ("".into(), "".into(), "500 5.5.2"),
        ("".into(), "BDAT 0".into(), "503 5.5.1"),
        (
            "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\n".into(),
            "BDAT 0".into(),
            "503 5.5.1",
        ),
        (
            format!("{HELLO}MAIL FROM:<>\r\n"),
            "BDAT 0".into(),
            "554 5.5.1",
        ),
        // The refused chunk is still read: 101 octets plus the CRLF the row appends.
        (
            TXN.into(),
            format!("BDAT 103\r\n{}", "z".repeat(101)),
            "552 5.3.4",
        ),
        (TXN.into(), "BDAT x".into(), "501 5.5.4"),
        ("".into(), "QUIT".into(), "221 2.0.0"),
        ("".into(), "QUIT now".into(), "501 5.5.4"),
    ];
    cases.extend(dsn);
    cases
}

#[test]
fn every_reply() {
    let cases = reply_cases();
    for (before, command, expected) in cases {
        // A NOOP afterwards shows the session is still there, except after QUIT.
        let input = format!("{before}{command}\r\nNOOP\r\n");
        let got = replies(&input);
        let n = got.len();
        let closes = command == "QUIT";
        let (reply, after) = if closes {
            (&got[n - 1], None)
        } else {
            (&got[n - 2], Some(&got[n - 1]))
        };
        assert_eq!(
            reply, expected,
            "after {before:?}, {command:?} gave {got:?}"
        );
        if let Some(after) = after {
            assert_eq!(after, "250 2.0.0", "session survives {command:?}");
        }
    }
}

/// Every 4xx/5xx is reported as exactly one typed refusal whose code and enhanced code
/// are the reply's, and nothing else is.
#[test]
fn every_refusal_is_one_event_agreeing_with_the_wire() {
    for (before, command, expected) in reply_cases() {
        let mut session = new_session();
        let mut buffer = before.into_bytes();
        let n = session.feed(&buffer);
        buffer.drain(..n);
        while session.poll_event().is_some() {}
        let mark = session.output().len();
        buffer.extend_from_slice(format!("{command}\r\n").as_bytes());
        let n = session.feed(&buffer);
        buffer.drain(..n);
        let events: Vec<_> = std::iter::from_fn(|| session.poll_event()).collect();
        let refusals: Vec<Refusal> = events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Refused { refusal, .. } => Some(*refusal),
                _ => None,
            })
            .collect();
        let refused = expected.starts_with('4') || expected.starts_with('5');
        assert_eq!(
            refusals.len(),
            usize::from(refused),
            "{command:?}: {events:?}"
        );
        if let Some(r) = refusals.first() {
            assert_eq!(
                format!("{} {}", r.code(), r.enhanced()),
                expected,
                "{command:?}"
            );
            let written = String::from_utf8_lossy(&session.output()[mark..]).into_owned();
            assert!(written.starts_with(expected), "{command:?}: {written:?}");
            if let Some(SessionEvent::Refused { address, verb, .. }) = events.first() {
                let mail_or_rcpt = command.starts_with("MAIL") || command.starts_with("RCPT");
                assert_eq!(
                    address.is_some(),
                    mail_or_rcpt && *verb != "OTHER",
                    "{command:?}"
                );
            }
        }
    }
}

#[test]
fn errors_keep_the_transaction() {
    let got = replies(&format!(
        "{TXN}RCPT TO:<nope@elsewhere.test>\r\nMAIL FROM:<x@y.test>\r\nBOGUS\r\nRCPT TO:<c@example.com>\r\nDATA\r\nhi\r\n.\r\n"
    ));
    assert_eq!(
        &got[3..],
        [
            "550 5.7.1",
            "503 5.5.1",
            "500 5.5.2",
            "250 2.1.5",
            "354",
            "250 2.0.0"
        ]
    );
}

#[test]
fn ehlo_and_rset_end_the_transaction() {
    assert_eq!(
        replies(&format!("{TXN}RSET\r\nDATA\r\n")).last().unwrap(),
        "503 5.5.1"
    );
    assert_eq!(
        replies(&format!("{TXN}EHLO again\r\nDATA\r\n"))
            .last()
            .unwrap(),
        "503 5.5.1"
    );
}

#[test]
fn command_line_length_limit() {
    // 510 octets plus CRLF is the longest line allowed.
    let ok = format!("NOOP {}\r\n", "x".repeat(505));
    assert_eq!(ok.len(), 512);
    assert_eq!(replies(&ok), ["250 2.0.0"]);
    let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(506));
    assert_eq!(replies(&long), ["500 5.5.6", "250 2.0.0"]);
    // A huge line is dropped as it arrives, whatever the reads look like.
    let huge = format!("{}\r\nNOOP\r\n", "y".repeat(100_000));
    let whole = run(huge.as_bytes());
    let pieces: Vec<&[u8]> = huge.as_bytes().chunks(700).collect();
    assert_eq!(run_pieces(config(BareLfPolicy::Reject), pieces), whole);
    assert_eq!(codes(&whole), ["500 5.5.6", "250 2.0.0"]);
}

#[test]
fn bare_lf_terminates_command_lines() {
    assert_eq!(replies("EHLO c\nNOOP\n"), ["250", "250 2.0.0"]);
}

#[test]
fn oversize_message_is_read_to_its_end_and_the_session_goes_on() {
    let body = "x".repeat(200);
    let t = run(format!("{TXN}DATA\r\n{body}\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nok\r\n.\r\n").as_bytes());
    assert_eq!(
        &codes(&t)[3..],
        [
            "354",
            "552 5.3.4",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0"
        ]
    );
    assert_eq!(t.messages.len(), 1);
    assert_eq!(t.messages[0].2, b"ok\r\n");
}

#[test]
fn message_of_exactly_the_limit_is_accepted() {
    // "." + 97 octets + CRLF = 100 = max_message_size once the stuffing dot is gone.
    let exact = format!(".{}\r\n", "x".repeat(97));
    let t = run(format!("{TXN}DATA\r\n.{exact}.\r\n").as_bytes());
    assert_eq!(codes(&t).last().unwrap(), "250 2.0.0");
    assert_eq!(t.messages[0].2.len(), 100);
    let over = run(format!("{TXN}DATA\r\n{}\r\n.\r\n", "x".repeat(99)).as_bytes());
    assert_eq!(codes(&over).last().unwrap(), "552 5.3.4");
}

#[test]
fn smuggling_is_refused_and_never_splits_a_message() {
    for seq in [
        "\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r", "\r\n.\rX",
    ] {
        let input = format!("{TXN}DATA\r\na{seq}MAIL FROM:<e@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n");
        let t = run(input.as_bytes());
        assert_eq!(
            &codes(&t)[3..],
            ["354", "550 5.6.0", "250 2.0.0"],
            "{seq:?}"
        );
        assert!(t.messages.is_empty(), "{seq:?}");
        let normalized = run_pieces(config(BareLfPolicy::Normalize), [input.as_bytes()]);
        assert_eq!(
            &codes(&normalized)[3..],
            ["354", "250 2.0.0", "250 2.0.0"],
            "{seq:?}"
        );
        assert_eq!(
            normalized.messages.len(),
            1,
            "{seq:?}: one message, not two"
        );
    }
}

#[test]
fn bdat_chunks_are_raw_and_concatenated() {
    // No dot-unstuffing, no terminator: a chunk's octets are the message's.
    let t = run(format!("{TXN}BDAT 6\r\n.\r\n\r\nxBDAT 3 LAST\r\nend").as_bytes());
    assert_eq!(&codes(&t)[3..], ["250 2.0.0", "250 2.0.0"]);
    assert!(String::from_utf8_lossy(&t.replies).contains("250 2.0.0 6 octets received"));
    assert_eq!(t.messages[0].2, b".\r\n\r\nxend");
    assert_eq!(
        replies(&format!("{TXN}BDAT 1\r\nxDATA\r\n"))
            .last()
            .unwrap(),
        "503 5.5.1"
    );
    assert_eq!(
        replies(&format!("{TXN}BDAT 1\r\nxRCPT TO:<c@example.com>\r\n"))
            .last()
            .unwrap(),
        "503 5.5.1"
    );
    assert_eq!(
        run(format!("{TXN}BDAT 0 LAST\r\n").as_bytes()).messages[0].2,
        b""
    );
}

#[test]
fn rset_or_helo_between_bdat_chunks_ends_the_message() {
    for reset in ["RSET", "HELO again.test", "EHLO again.test"] {
        let helo_code = if reset == "RSET" { "250 2.0.0" } else { "250" };
        let input = format!(
            "{TXN}BDAT 3\r\nabc{reset}\r\nBDAT 3 LAST\r\nxyz\
             MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nok\r\n.\r\n"
        );
        let t = run(input.as_bytes());
        assert_eq!(
            &codes(&t)[3..],
            [
                "250 2.0.0",
                helo_code,
                // No transaction any more (and after HELO no CHUNKING either): the
                // chunk is refused and its bytes are skipped, never run as commands.
                "503 5.5.1",
                "250 2.1.0",
                "250 2.1.5",
                "354",
                "250 2.0.0"
            ],
            "{reset}"
        );
        assert_eq!(t.messages.len(), 1, "{reset}");
        assert_eq!(
            t.messages[0].2, b"ok\r\n",
            "{reset}: nothing of the first chunk"
        );
        let pieces: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        assert_eq!(
            run_pieces(config(BareLfPolicy::Reject), pieces),
            t,
            "{reset}"
        );
    }
}

#[test]
fn bdat_chunk_carrying_a_dot_line_and_commands_is_one_message() {
    // What would end a DATA body and start a second transaction is only content in a
    // BDAT chunk: one message holding those bytes, no reply of its own.
    let payload =
        "Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<e@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n";
    for policy in [BareLfPolicy::Reject, BareLfPolicy::Normalize] {
        let input = format!("{TXN}BDAT {} LAST\r\n{payload}NOOP\r\n", payload.len());
        let t = run_pieces(config(policy), [input.as_bytes()]);
        assert_eq!(
            &codes(&t)[3..],
            ["250 2.0.0", "250 2.0.0"],
            "{policy:?}: the chunk's reply, then NOOP"
        );
        assert_eq!(t.messages.len(), 1, "{policy:?}");
        assert_eq!(t.messages[0].2, payload.as_bytes(), "{policy:?}");
        assert_eq!(t.messages[0].1, ["b@example.com"], "{policy:?}");
    }
}

#[test]
fn refused_bdat_chunk_is_consumed() {
    // The chunk's bytes look like commands; they must not be run as such.
    let got = replies("EHLO c\r\nBDAT 6\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(got, ["250", "503 5.5.1", "250 2.0.0"]);
    // Over the limit across chunks: the transaction is aborted.
    let got = replies(&format!(
        "{TXN}BDAT 60\r\n{}BDAT 60 LAST\r\n{}DATA\r\n",
        "a".repeat(60),
        "b".repeat(60)
    ));
    assert_eq!(&got[3..], ["250 2.0.0", "552 5.3.4", "503 5.5.1"]);
}

#[test]
fn pipelined_input_waits_while_a_message_is_published() {
    let mut session = new_session();
    let input = format!("{TXN}DATA\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n");
    let n = session.feed(input.as_bytes());
    let rest = &input.as_bytes()[n..];
    assert_eq!(
        rest, b"NOOP\r\nQUIT\r\n",
        "nothing after the final dot is consumed yet"
    );
    assert!(session.is_awaiting_publish());
    assert_eq!(session.feed(rest), 0);
    let message = session.take_message().unwrap();
    assert_eq!(message.body(), b"hi\r\n");
    session.publish_result(Err(PublishError::Temporary("sink down".into())));
    assert_eq!(session.feed(rest), rest.len());
    let text = String::from_utf8(session.output().to_vec()).unwrap();
    assert!(
        text.contains("\r\n451 4.3.0 sink down, try again later\r\n250 2.0.0 Ok\r\n221 2.0.0"),
        "{text}"
    );
    assert!(session.is_closed());
}

#[test]
fn sink_refusing_size_gives_552() {
    let mut session = new_session();
    session.feed(format!("{TXN}DATA\r\nhi\r\n.\r\n").as_bytes());
    assert!(session.take_message().is_some());
    session.publish_result(Err(PublishError::TooLarge));
    assert!(String::from_utf8_lossy(session.output())
        .ends_with("552 5.3.4 Message too large for the message store\r\n"));
}

#[test]
fn timeout_and_drain() {
    let mut session = new_session();
    session.timed_out(Refusal::IdleTimeout);
    assert!(session.is_closed());
    assert!(String::from_utf8_lossy(session.output())
        .ends_with("421 4.4.2 mx.test Timeout, closing connection\r\n"));

    let mut session = new_session();
    session.feed(format!("{TXN}DATA\r\nhal").as_bytes());
    session.begin_drain();
    assert!(
        !session.is_between_commands(),
        "mid-DATA: let the message finish"
    );
    let n = session.feed(b"f\r\n.\r\nNOOP\r\n");
    assert!(session.take_message().is_some());
    session.publish_result(Ok(MessageId::from(9u128)));
    session.feed(&b"f\r\n.\r\nNOOP\r\n"[n..]);
    let text = String::from_utf8_lossy(session.output()).to_string();
    assert!(
        text.contains("queued as")
            && text.ends_with("421 4.3.2 mx.test Service shutting down, closing connection\r\n"),
        "{text}"
    );
    assert!(session.is_closed());
}

/// A valid session built from random parts, for the split property.
fn session_input() -> impl Strategy<Value = Vec<u8>> {
    let body = prop::collection::vec(
        prop::sample::select(vec![
            "line\r\n",
            ".stuffed\r\n",
            "..\r\n",
            "\r\n",
            "x",
            ".",
            "\r",
            "\n",
            "é",
        ]),
        0..12,
    )
    .prop_map(|parts| parts.concat());
    let transaction = (body, 0usize..4).prop_map(|(body, kind)| match kind {
        0 => format!("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n{body}\r\n.\r\n"),
        1 => format!(
            "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nBDAT {} LAST\r\n{body}",
            body.len()
        ),
        2 => format!(
            "MAIL FROM:<a@x.test> RET=HDRS ENVID=a+2Bb\r\n\
             RCPT TO:<b@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40example.com\r\n\
             RCPT TO:<c@example.com> NOTIFY=NEVER,DELAY\r\nDATA\r\n{body}\r\n.\r\n"
        ),
        _ => "RSET\r\nNOOP\r\nVRFY x\r\nBOGUS\r\n".to_string(),
    });
    prop::collection::vec(transaction, 1..4)
        .prop_map(|txns| format!("EHLO c.test\r\n{}QUIT\r\n", txns.concat()).into_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any split of a session into reads gives byte-identical replies and messages.
    #[test]
    fn any_split_gives_the_same_transcript(input in session_input(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        for policy in [BareLfPolicy::Reject, BareLfPolicy::Normalize] {
            let whole = run_pieces(config(policy), [input.as_slice()]);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            points.sort_unstable();
            points.dedup();
            let mut pieces = Vec::new();
            let mut start = 0;
            for p in points {
                pieces.push(&input[start..p]);
                start = p;
            }
            pieces.push(&input[start..]);
            prop_assert_eq!(&run_pieces(config(policy), pieces), &whole);
            prop_assert_eq!(&run_pieces(config(policy), input.chunks(1)), &whole);
        }
    }

    /// Random bytes never panic and never get more replies than they have lines.
    #[test]
    fn random_bytes_are_harmless(input in prop::collection::vec(any::<u8>(), 0..2048), step in 1usize..64) {
        let t = run_pieces(config(BareLfPolicy::Reject), input.chunks(step));
        let lines = input.iter().filter(|&&b| b == b'\n').count();
        let final_replies = String::from_utf8_lossy(&t.replies)
            .split("\r\n")
            .filter(|l| l.len() >= 4 && &l[3..4] == " ")
            .count();
        prop_assert!(final_replies <= lines + 1, "{} replies for {} lines", final_replies, lines);
    }

    /// Random bytes after a valid opening, mixing commands and bodies.
    #[test]
    fn random_commands_are_harmless(words in prop::collection::vec(prop::sample::select(vec![
        "EHLO a\r\n", "MAIL FROM:<a@b>\r\n", "RCPT TO:<b@example.com>\r\n", "DATA\r\n", "BDAT 3\r\n",
        "BDAT 2 LAST\r\n", ".\r\n", "\r\n.\r\n", "x", "\n", "\r", "RSET\r\n", "QUIT\r\n", "BDAT 1000\r\n",
    ]), 0..40)) {
        let input = words.concat();
        let whole = run(input.as_bytes());
        prop_assert_eq!(&run_pieces(config(BareLfPolicy::Reject), input.as_bytes().chunks(1)), &whole);
    }
}

/// Feeds all of `input`, answering messages with `answers` in turn; returns the counts.
fn stats_of(cfg: Arc<SessionConfig>, input: &[u8], answers: &[PublishResult]) -> SessionStats {
    let mut session = Session::new(cfg, "192.0.2.7:1".parse().unwrap());
    let mut total = SessionStats::default();
    let mut answers = answers.iter().cloned();
    let mut rest = input;
    loop {
        let n = session.feed(rest);
        rest = &rest[n..];
        total.absorb(session.stats_mut());
        if session.take_message().is_some() {
            session.publish_result(answers.next().expect("an answer per message"));
            total.absorb(session.stats_mut());
            continue;
        }
        if n == 0 || rest.is_empty() || session.is_closed() {
            break;
        }
    }
    total
}

#[test]
fn stats_count_commands_replies_and_messages() {
    let s = stats_of(
        config(BareLfPolicy::Reject),
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nRCPT TO:<x@other.test>\r\n\
          DATA\r\nhi\r\n.\r\nXYZZY\r\nSTARTTLS\r\nMAIL FROM:<bad\r\nSEND FROM:<a@b>\r\nRSET\r\n\
          NOOP\r\nVRFY x\r\nHELP\r\nQUIT\r\n",
        &[Ok(MessageId::from(1))],
    );
    let verbs = [
        ("EHLO", 1),
        ("MAIL", 1),
        ("RCPT", 2),
        ("DATA", 1),
        ("SEND", 1),
        ("RSET", 1),
        ("NOOP", 1),
        ("VRFY", 1),
        ("HELP", 1),
        ("QUIT", 1),
        // STARTTLS has its own label now that it is a command (502 without a certificate).
        ("STARTTLS", 1),
        ("OTHER", 2),
        ("HELO", 0),
        ("BDAT", 0),
    ];
    for (verb, n) in verbs {
        assert_eq!(s.command(verb), n, "{verb}");
    }
    // 250: EHLO, MAIL, RCPT, queued, SEND, RSET, NOOP.
    let replies = [
        (220, 1),
        (250, 7),
        (550, 1),
        (354, 1),
        (500, 1),
        (502, 1),
        (501, 1),
        (252, 1),
        (214, 1),
        (221, 1),
    ];
    for (code, n) in replies {
        assert_eq!(s.reply(code), n, "{code}");
    }
    assert_eq!(s.replies.total(), 16);
    assert_eq!(s.replies_unlisted, 0);
    assert_eq!(s.messages_accepted, 1);
    assert_eq!(s.messages_rejected.total(), 0);
}

#[test]
fn stats_count_rejections_and_smuggling() {
    let txn = |body: &str| format!("MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n{body}");
    let input = format!(
        "EHLO c\r\n{}{}{}{}{}BDAT 200 LAST\r\n",
        txn("a\nb\r\n.\r\n"),
        txn(&format!("{}\r\n.\r\n", "x".repeat(150))),
        txn("ok\r\n.\r\n"),
        txn("ok\r\n.\r\n"),
        "MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\n",
    );
    let mut input = input.into_bytes();
    input.extend_from_slice(&[b'z'; 200]);
    let s = stats_of(
        config(BareLfPolicy::Reject),
        &input,
        &[
            Err(PublishError::Temporary("down".into())),
            Err(PublishError::TooLarge),
        ],
    );
    let rejected: Vec<(RejectReason, u64)> = s.messages_rejected.iter().collect();
    assert_eq!(
        rejected,
        [
            (RejectReason::TooLarge, 2),
            (RejectReason::BareLineEnding, 1),
            (RejectReason::SinkTemporary, 1),
            (RejectReason::SinkTooLarge, 1),
        ]
    );
    assert_eq!(s.smuggling_attempts, 1);
    assert_eq!(s.messages_accepted, 0);
    assert_eq!(s.reply(451), 1);
    assert_eq!(s.reply(552), 3);
    assert_eq!(s.command("BDAT"), 1);

    // Normalised bare line endings still count as attempts.
    let s = stats_of(
        config(BareLfPolicy::Normalize),
        txn("a\nb\r\n.\r\n").as_bytes(),
        &[Ok(MessageId::from(1))],
    );
    assert_eq!(s.smuggling_attempts, 0, "no EHLO: MAIL refused, no body");
    let s = stats_of(
        config(BareLfPolicy::Normalize),
        format!("HELO c\r\n{}", txn("a\nb\r\n.\r\n")).as_bytes(),
        &[Ok(MessageId::from(1))],
    );
    assert_eq!((s.smuggling_attempts, s.messages_accepted), (1, 1));
}

#[test]
fn stats_count_drain_and_timeout_replies() {
    let mut session = new_session();
    session.feed(b"HELO c\r\n");
    session.begin_drain();
    session.feed(b"NOOP\r\n");
    let s = session.stats_mut().clone();
    assert_eq!((s.reply(220), s.reply(250), s.reply(421)), (1, 1, 1));
    assert_eq!(s.command("NOOP"), 1);
    let mut session = new_session();
    session.timed_out(Refusal::IdleTimeout);
    assert_eq!(session.stats_mut().reply(421), 1);
    let mut session = new_session();
    session.shut_down_now();
    assert_eq!(session.stats_mut().reply(421), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    /// Whatever the input, the replies counted are exactly the final reply lines sent,
    /// and every one of them has a listed code.
    #[test]
    fn replies_counted_match_the_output(input in session_input()) {
        let mut session = Session::new(config(BareLfPolicy::Reject), "192.0.2.7:1".parse().unwrap());
        let mut rest = &input[..];
        let mut answered = 0u128;
        loop {
            let n = session.feed(rest);
            rest = &rest[n..];
            if session.take_message().is_some() {
                answered += 1;
                session.publish_result(Ok(MessageId::from(answered)));
                continue;
            }
            if n == 0 || rest.is_empty() || session.is_closed() {
                break;
            }
        }
        let finals = session
            .output()
            .split(|&b| b == b'\n')
            .filter(|l| l.len() > 3 && l[3] == b' ')
            .count() as u64;
        let s = session.stats_mut();
        prop_assert_eq!(s.replies.total(), finals);
        prop_assert_eq!(s.replies_unlisted, 0);
        prop_assert_eq!(s.messages_accepted as u128, answered);
    }
}

#[test]
fn ehlo_lists_every_implemented_command_beyond_the_required_ones() {
    let text = String::from_utf8(run(b"EHLO client.test\r\n").replies).unwrap();
    for keyword in ["HELP", "SEND", "SOML", "SAML"] {
        assert!(
            text.contains(&format!("250-{keyword}\r\n"))
                || text.contains(&format!("250 {keyword}\r\n")),
            "{keyword} missing from {text}"
        );
    }
    let help = String::from_utf8(run(b"HELP\r\n").replies).unwrap();
    assert!(
        !help.contains("EXPN"),
        "HELP lists EXPN, which answers 502: {help}"
    );
    for command in ["SEND", "SOML", "SAML", "VRFY", "BDAT"] {
        assert!(help.contains(command), "{command} missing from {help}");
    }
}

fn idn_config() -> Arc<SessionConfig> {
    let accept = ["bücher.example", "[IPv6:2001:db8::1]", "Plain.Example"]
        .iter()
        .map(|d| address::normalize_accept_domain(d).unwrap())
        .collect();
    Arc::new(SessionConfig {
        accept_domains: accept,
        ..(*config(BareLfPolicy::Reject)).clone()
    })
}

#[test]
fn accept_domains_match_u_labels_a_labels_and_literals() {
    let cfg = idn_config();
    assert_eq!(
        cfg.accept_domains,
        AcceptDomains::new([
            "xn--bcher-kva.example",
            "[IPv6:2001:db8::1]",
            "plain.example"
        ])
    );
    let rcpt = |mail: &str, to: &str| {
        let input = format!("EHLO c\r\nMAIL FROM:<a@x.test>{mail}\r\nRCPT TO:<{to}>\r\n");
        codes(&run_pieces(cfg.clone(), [input.as_bytes()]))
            .pop()
            .unwrap()
    };
    for to in [
        "u@xn--bcher-kva.example",
        "u@XN--BCHER-KVA.EXAMPLE",
        "u@plain.EXAMPLE",
        "u@[IPv6:2001:DB8:0::1]",
        "u@[ipv6:2001:db8::0001]",
    ] {
        assert_eq!(rcpt("", to), "250 2.1.5", "{to}");
    }
    for to in ["u@bücher.example", "u@BÜCHER.example", "ü@Bücher.Example"] {
        assert_eq!(rcpt(" SMTPUTF8", to), "250 2.1.5", "{to}");
    }
    for to in [
        "u@xn--bcher-kva.example.org",
        "u@[IPv6:2001:db8::2]",
        "u@[192.0.2.1]",
        "u@xn--bcher-kvb.example",
    ] {
        assert_eq!(rcpt("", to), "550 5.7.1", "{to}");
    }
}

#[test]
fn helo_argument_must_be_a_domain_or_an_address_literal() {
    for good in [
        "client.test",
        "DESKTOP-AB_12",
        "[127.0.0.1]",
        "[IPv6:::1]",
        "192.0.2.9",
        "xn--bcher-kva.example",
    ] {
        for verb in ["HELO", "EHLO"] {
            assert_eq!(
                replies(&format!("{verb} {good}\r\n")),
                ["250"],
                "{verb} {good}"
            );
        }
    }
    for bad in [
        "evil;x(foo)",
        "[127.0.0.1])",
        "a\u{202e}b.example",
        "line\u{2028}sep",
        "bücher.example",
        "a..b",
        "a,b",
        "x\"y",
        "[300.1.1.1]",
        "a\u{85}b",
        "(comment)",
    ] {
        for verb in ["HELO", "EHLO"] {
            assert_eq!(
                replies(&format!("{verb} {bad}\r\nNOOP\r\n")),
                ["501 5.5.4", "250 2.0.0"],
                "{verb} {bad:?}"
            );
        }
    }
}

#[test]
fn addresses_with_line_separators_c1_controls_or_bidi_overrides_are_refused() {
    for hostile in [
        "\u{2028}", "\u{2029}", "\u{85}", "\u{9b}", "\u{202e}", "\u{2066}", "\u{200f}",
    ] {
        let quoted = format!("\"a{hostile}b\"@example.com");
        let dot = format!("a{hostile}b@example.com");
        for addr in [&quoted, &dot] {
            let mail = format!("EHLO c\r\nMAIL FROM:<{addr}> SMTPUTF8\r\n");
            assert_eq!(replies(&mail).pop().unwrap(), "501 5.1.7", "{addr:?}");
            let rcpt = format!("EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<{addr}>\r\n");
            assert_eq!(replies(&rcpt).pop().unwrap(), "501 5.1.3", "{addr:?}");
        }
    }
    // Ordinary UTF-8 is still fine.
    let ok = "EHLO c\r\nMAIL FROM:<\"ü x\"@b.test> SMTPUTF8\r\nRCPT TO:<用户@example.com>\r\n";
    assert_eq!(replies(ok)[1..], ["250 2.1.0", "250 2.1.5"]);
}

#[test]
fn bdat_content_is_under_the_bare_lf_policy() {
    let bdat = |chunks: &[&str]| {
        let mut input = String::from(TXN);
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { " LAST" } else { "" };
            input.push_str(&format!("BDAT {}{last}\r\n{chunk}", chunk.len()));
        }
        input
    };
    let smuggle = bdat(&["a\n.\nMAIL FROM:<evil@x.test>\r\n"]);
    let t = run_pieces(config(BareLfPolicy::Reject), [smuggle.as_bytes()]);
    assert_eq!(codes(&t).pop().unwrap(), "550 5.6.0");
    assert!(t.messages.is_empty());
    for chunks in [
        &["a\rb\r\n"][..],
        &["ok\r\n", "x\n"],
        &["trailing CR at the very end\r"],
        &["a\r", "b"],
    ] {
        let t = run_pieces(config(BareLfPolicy::Reject), [bdat(chunks).as_bytes()]);
        assert_eq!(codes(&t).pop().unwrap(), "550 5.6.0", "{chunks:?}");
    }
    // A CRLF split across chunks is not bare.
    let t = run(bdat(&["a\r", "\nb\r\n"]).as_bytes());
    assert_eq!(t.messages[0].2, b"a\r\nb\r\n");

    let t = run_pieces(config(BareLfPolicy::Normalize), [smuggle.as_bytes()]);
    assert_eq!(codes(&t).pop().unwrap(), "250 2.0.0");
    assert_eq!(t.messages[0].2, b"a\r\n.\r\nMAIL FROM:<evil@x.test>\r\n");
    let s = stats_of(config(BareLfPolicy::Reject), smuggle.as_bytes(), &[]);
    assert_eq!(
        (
            s.smuggling_attempts,
            s.messages_rejected[RejectReason::BareLineEnding]
        ),
        (1, 1)
    );
}

/// Feeds `pieces` like a reactor that polls after every call: keeps unconsumed bytes,
/// answers each message `250` at once, and feeds again while the session takes input.
/// Returns every event in order, refusals as their reason only.
fn events_of<'a>(policy: SessionPolicy, pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Ev> {
    let mut session = Session::without_greeting(
        config(BareLfPolicy::Reject),
        policy,
        "192.0.2.7:1".parse().unwrap(),
    );
    session.greet();
    let mut events = Vec::new();
    let mut buffer = Vec::new();
    let mut stored = 0u128;
    let poll = |session: &mut Session, events: &mut Vec<Ev>| {
        while let Some(e) = session.poll_event() {
            events.push(Ev::from(e));
        }
    };
    for piece in pieces {
        buffer.extend_from_slice(piece);
        loop {
            let n = session.feed(&buffer);
            buffer.drain(..n);
            poll(&mut session, &mut events);
            if session.take_message().is_some() {
                stored += 1;
                session.publish_result(Ok(MessageId::from(stored)));
                poll(&mut session, &mut events);
                continue;
            }
            if n == 0 || buffer.is_empty() || session.is_closed() {
                break;
            }
        }
        // STARTTLS: what followed the command is discarded (the rest of the input is
        // plaintext, never TLS records), and the handshake completes.
        if session.is_starting_tls() {
            session.tls_started(Arc::from("TLSv1.3 x"));
            break;
        }
    }
    events
}

/// An event as the tests compare it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    Refused(Refusal),
    Started,
    Ended,
    Abandoned,
    StartTls,
}

impl From<SessionEvent> for Ev {
    fn from(e: SessionEvent) -> Ev {
        match e {
            SessionEvent::Refused { refusal, .. } => Ev::Refused(refusal),
            SessionEvent::BodyStarted => Ev::Started,
            SessionEvent::BodyEnded => Ev::Ended,
            SessionEvent::BodyAbandoned => Ev::Abandoned,
            SessionEvent::StartTls => Ev::StartTls,
        }
    }
}

/// Every body started is followed by exactly one end or abandonment before the next
/// starts.
fn assert_bodies_pair(events: &[Ev], what: &str) {
    let mut open = false;
    for e in events {
        match e {
            Ev::Started => {
                assert!(!open, "{what}: started twice: {events:?}");
                open = true;
            }
            Ev::Ended | Ev::Abandoned => {
                assert!(open, "{what}: ended without a start: {events:?}");
                open = false;
            }
            Ev::Refused(_) | Ev::StartTls => {}
        }
    }
}

/// The body and STARTTLS events, in order, for each way a body can start and end; the
/// same for the input whole, cut at every position, and byte by byte.
#[test]
fn body_events_come_in_order_however_the_reads_are_cut() {
    use Ev::*;
    let starttls = SessionPolicy {
        starttls: true,
        ..SessionPolicy::default()
    };
    let plain = SessionPolicy::default();
    let big = "z".repeat(200);
    let cases: Vec<(SessionPolicy, String, Vec<Ev>)> = vec![
        (
            plain,
            format!("{TXN}DATA\r\nhi\r\n.\r\n"),
            vec![Started, Ended],
        ),
        (
            plain,
            format!("{TXN}DATA\r\n{big}\r\n.\r\nNOOP\r\n"),
            vec![Started, Ended, Refused(Refusal::TooLarge)],
        ),
        (
            plain,
            format!("{TXN}BDAT 2\r\nabBDAT 3 LAST\r\ncde"),
            vec![Started, Ended],
        ),
        (plain, format!("{TXN}BDAT 0 LAST\r\n"), vec![Started, Ended]),
        // A first chunk refused for its size: no body ever started.
        (
            plain,
            format!("{TXN}BDAT 200 LAST\r\n{big}"),
            vec![Refused(Refusal::TooLarge)],
        ),
        // A later chunk over the limit ends the body it is part of.
        (
            plain,
            format!(
                "{TXN}BDAT 60\r\n{}BDAT 60\r\n{}",
                "a".repeat(60),
                "b".repeat(60)
            ),
            vec![Started, Ended, Refused(Refusal::TooLarge)],
        ),
        // RSET, HELO, EHLO and STARTTLS between chunks abandon the body.
        (
            plain,
            format!("{TXN}BDAT 2\r\nabRSET\r\n"),
            vec![Started, Abandoned],
        ),
        (
            plain,
            format!("{TXN}BDAT 2\r\nabHELO c\r\n"),
            vec![Started, Abandoned],
        ),
        (
            plain,
            format!("{TXN}BDAT 2\r\nabEHLO c\r\n"),
            vec![Started, Abandoned],
        ),
        (
            starttls,
            format!("{TXN}BDAT 2\r\nabSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n"),
            vec![Started, Abandoned, StartTls],
        ),
        // Pipelined after STARTTLS: discarded, never executed.
        (
            starttls,
            format!("{HELLO}STARTTLS\r\nMAIL FROM:<a@x.test>\r\n"),
            vec![StartTls],
        ),
        (
            plain,
            format!("{HELLO}STARTTLS\r\n"),
            vec![Refused(Refusal::NotImplemented)],
        ),
        // Two bodies refused and a third stored, all in one read when whole.
        (
            plain,
            format!(
                "{TXN}DATA\r\na\nb\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n\
                 BDAT 3 LAST\r\na\rbMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n\
                 DATA\r\nok\r\n.\r\nQUIT\r\n"
            ),
            vec![
                Started,
                Ended,
                Refused(Refusal::BareLineEnding),
                Started,
                Ended,
                Refused(Refusal::BareLineEnding),
                Started,
                Ended,
            ],
        ),
    ];
    for (policy, input, want) in cases {
        let bytes = input.as_bytes();
        let whole = events_of(policy, [bytes]);
        assert_eq!(whole, want, "{input:?}");
        assert_bodies_pair(&whole, &input);
        assert_eq!(
            events_of(policy, bytes.chunks(1)),
            want,
            "{input:?} byte by byte"
        );
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(events_of(policy, [a, b]), want, "{input:?} cut at {cut}");
        }
    }
}

/// A close in the middle of DATA or of a BDAT body abandons it, after whatever the
/// read brought.
#[test]
fn a_close_mid_body_abandons_it() {
    for input in [format!("{TXN}DATA\r\nhal"), format!("{TXN}BDAT 9\r\nhal")] {
        for close in [
            |s: &mut Session| s.timed_out(Refusal::IdleTimeout),
            |s: &mut Session| s.shut_down_now(),
            |s: &mut Session| s.too_slow(),
        ] {
            let mut session = new_session();
            session.feed(input.as_bytes());
            close(&mut session);
            let events: Vec<Ev> = std::iter::from_fn(|| session.poll_event())
                .map(Ev::from)
                .collect();
            // The close's refusal, then the body it abandons.
            assert!(
                matches!(events[..], [Ev::Started, Ev::Refused(_), Ev::Abandoned]),
                "{input}: {events:?}"
            );
        }
    }
}

/// A caller that does not poll stops the session at [`MAX_STEPS`] body events, never
/// loses one, and the session does not grow for them; polling lets it go on.
#[test]
fn unpolled_body_events_hold_commands_back_and_are_never_dropped() {
    let bodies = 3 * MAX_STEPS;
    let mut input = HELLO.to_string();
    for _ in 0..bodies {
        // Each refused for a bare LF: a body that starts and ends in the same read.
        input.push_str("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\na\nb\r\n.\r\n");
    }
    let mut session = new_session();
    let first = session.feed(input.as_bytes());
    assert!(first < input.len());
    let capacity = session.events.capacity();
    // Nothing more is taken until the events are polled.
    assert_eq!(session.feed(&input.as_bytes()[first..]), 0);
    let mut events: Vec<Ev> = Vec::new();
    let mut pos = first;
    loop {
        events.extend(std::iter::from_fn(|| session.poll_event()).map(Ev::from));
        if pos == input.len() {
            break;
        }
        let n = session.feed(&input.as_bytes()[pos..]);
        assert!(n > 0);
        pos += n;
    }
    assert_eq!(session.events.capacity(), capacity);
    let steps: Vec<Ev> = events
        .iter()
        .copied()
        .filter(|e| !matches!(e, Ev::Refused(_)))
        .collect();
    assert_eq!(steps.len(), 2 * bodies);
    assert_bodies_pair(&events, "pipelined");
    assert_eq!(
        session.stats_mut().messages_rejected[RejectReason::BareLineEnding],
        bodies as u64
    );
}

/// The error budget is spent by the refusal's type, not by the reply's first byte:
/// every 5xx refusal and `452 4.5.3`, never another 4xx.
#[test]
fn the_error_budget_follows_the_refusals_type() {
    for &r in Refusal::ALL {
        assert_eq!(
            r.spends_error_budget(),
            r.code() >= 500 || r == Refusal::TooManyRecipients,
            "{r:?}"
        );
    }
    let budget = SessionPolicy {
        error_budget: Some(2),
        ..SessionPolicy::default()
    };
    let open = |input: &str| {
        let mut s = Session::without_greeting(
            config(BareLfPolicy::Reject),
            budget,
            "192.0.2.7:1".parse().unwrap(),
        );
        s.greet();
        s.feed(input.as_bytes());
        !s.is_closed()
    };
    // Two 5xx refusals close; 4xx refusals (low memory aside, none here) and 2xx do not.
    assert!(!open("BOGUS\r\nBOGUS\r\n"));
    assert!(open("BOGUS\r\nNOOP\r\n"));
    // 252 and 214 are not refusals.
    assert!(open("VRFY x\r\nHELP\r\nVRFY y\r\n"));
    // A refused body does not spend it (it is no command's reply).
    assert!(open(&format!("{TXN}DATA\r\na\nb\r\n.\r\nBOGUS\r\n")));
}

/// Issue 20 item 2: `452 4.5.3` for too many recipients spends the error budget like a
/// `5xx`, so a client that keeps being refused is closed with `421 4.7.0`.
#[test]
fn too_many_recipients_spend_the_error_budget() {
    let budget = SessionPolicy {
        error_budget: Some(5),
        ..SessionPolicy::default()
    };
    let mut session = Session::without_greeting(
        config(BareLfPolicy::Reject),
        budget,
        "192.0.2.7:1".parse().unwrap(),
    );
    session.greet();
    let mut input = b"EHLO c\r\nMAIL FROM:<a@x.test>\r\n".to_vec();
    // 3 accepted (the limit), then refused ones.
    for i in 0..20 {
        input.extend_from_slice(format!("RCPT TO:<r{i}@example.com>\r\n").as_bytes());
    }
    let n = session.feed(&input);
    assert!(
        session.is_closed(),
        "still open after {n} of {} bytes",
        input.len()
    );
    let replies = String::from_utf8_lossy(session.output()).into_owned();
    assert_eq!(replies.matches("250 2.1.5").count(), 3, "{replies}");
    // The fifth refusal spends the budget of 5: closed, the rest never answered.
    assert_eq!(replies.matches("452 4.5.3").count(), 5, "{replies}");
    let last = replies.lines().last().unwrap_or_default();
    assert!(last.starts_with("421 4.7.0 "), "{replies}");
    // Without a budget, the same client is only refused.
    let mut session = new_session();
    session.feed(&input);
    assert!(!session.is_closed());
}

/// The accept-domains are a set: a large list matches an ASCII, a U-label and a
/// literal recipient exactly as a short one does, and refuses what is not in it.
#[test]
fn ten_thousand_accept_domains_match_like_three() {
    let mut domains: Vec<String> = (0..10_000).map(|i| format!("d{i}.example")).collect();
    domains.push(address::normalize_accept_domain("bücher.example").unwrap());
    domains.push("[192.0.2.1]".into());
    let cfg = Arc::new(SessionConfig {
        accept_domains: domains.into_iter().collect(),
        ..(*config(BareLfPolicy::Reject)).clone()
    });
    assert_eq!(cfg.accept_domains.len(), 10_002);
    let rcpt = |to: &str| {
        let input = format!("EHLO c\r\nMAIL FROM:<a@x.test> SMTPUTF8\r\nRCPT TO:<{to}>\r\n");
        codes(&run_pieces(cfg.clone(), [input.as_bytes()]))
            .pop()
            .unwrap()
    };
    for to in [
        "u@d9999.example",
        "u@D0.EXAMPLE",
        "u@bücher.example",
        "u@BÜCHER.example",
        "u@ｂüｃｈｅｒ.example",
        "u@xn--bcher-kva.example",
        "u@[192.0.2.1]",
    ] {
        assert_eq!(rcpt(to), "250 2.1.5", "{to}");
    }
    for to in [
        "u@d10000.example",
        "u@example.com",
        "u@bucher.example",
        "u@[192.0.2.2]",
    ] {
        assert_eq!(rcpt(to), "550 5.7.1", "{to}");
    }
}

/// A caller that does not poll loses events past the few kept, never their counts, and
/// the session does not grow for them.
#[test]
fn refusals_are_counted_even_when_their_events_are_not_kept() {
    let mut session = new_session();
    let input = "BOGUS\r\n".repeat(100);
    let n = session.feed(input.as_bytes());
    assert_eq!(n, input.len());
    assert_eq!(session.stats_mut().refusals[Refusal::UnknownCommand], 100);
    let events = std::iter::from_fn(|| session.poll_event()).count();
    assert_eq!(events, MAX_EVENTS);
    session.feed(b"RCPT TO:<x@example.com>\r\n");
    match session.poll_event() {
        Some(SessionEvent::Refused {
            refusal: Refusal::BadSequence,
            verb: "RCPT",
            address: Some(a),
            detail: None,
            user: None,
        }) => assert_eq!(&*a, "x@example.com"),
        other => panic!("{other:?}"),
    }
}

/// DSN (RFC 3461) rows of the reply table: (before, command, code, the reply's text).
fn dsn_cases() -> Vec<(String, String, &'static str, &'static str)> {
    const MAIL: &str = "MAIL FROM:<a@x.test>";
    const RCPT: &str = "RCPT TO:<c@example.com>";
    let ok_mail = |p: &str| (HELLO.to_string(), format!("{MAIL} {p}"), "250 2.1.0", "Ok");
    let ok_rcpt = |p: &str| (TXN.to_string(), format!("{RCPT} {p}"), "250 2.1.5", "Ok");
    let bad_mail = |p: String, text| (HELLO.to_string(), format!("{MAIL} {p}"), "501 5.5.4", text);
    let bad_rcpt = |p: String, text| (TXN.to_string(), format!("{RCPT} {p}"), "501 5.5.4", text);
    let ret = "Malformed RET parameter";
    let envid = "Malformed ENVID parameter";
    let notify = "Malformed NOTIFY parameter";
    let orcpt = "Malformed ORCPT parameter";
    vec![
        ok_mail("RET=FULL"),
        ok_mail("ret=hdrs ENVID=abc+2Bdef SIZE=10"),
        ok_mail(&format!("ENVID={}", "e".repeat(100))),
        ok_rcpt("NOTIFY=NEVER"),
        ok_rcpt("NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;bob+40x.example"),
        ok_rcpt("orcpt=RFC822;c+40example.com notify=delay"),
        ok_rcpt(&format!("ORCPT=rfc822;{}", "o".repeat(493))),
        bad_mail("RET=BOTH".into(), ret),
        bad_mail("RET".into(), ret),
        bad_mail("RET=FULL RET=HDRS".into(), "Duplicate MAIL parameter"),
        bad_mail("ENVID".into(), envid),
        bad_mail(format!("ENVID={}", "e".repeat(101)), envid),
        bad_mail("ENVID=a+2b".into(), envid),
        bad_mail("ENVID=a+2".into(), envid),
        bad_mail("ENVID=a+0D+0Ab".into(), envid),
        bad_mail("ENVID=caf\u{e9}".into(), envid),
        bad_mail("ENVID=a ENVID=b".into(), "Duplicate MAIL parameter"),
        bad_rcpt("NOTIFY".into(), notify),
        bad_rcpt("NOTIFY=NEVER,SUCCESS".into(), notify),
        bad_rcpt("NOTIFY=SUCCESS,NEVER".into(), notify),
        bad_rcpt("NOTIFY=SUCCESS,SUCCESS".into(), notify),
        bad_rcpt("NOTIFY=SUCCESS,".into(), notify),
        bad_rcpt("NOTIFY=ALWAYS".into(), notify),
        bad_rcpt(
            "NOTIFY=NEVER NOTIFY=DELAY".into(),
            "Duplicate RCPT parameter",
        ),
        bad_rcpt("ORCPT".into(), orcpt),
        bad_rcpt("ORCPT=bob@x.example".into(), orcpt),
        bad_rcpt("ORCPT=;bob".into(), orcpt),
        bad_rcpt("ORCPT=rfc822;".into(), orcpt),
        bad_rcpt("ORCPT=rfc822;bob+4".into(), orcpt),
        bad_rcpt("ORCPT=rfc822;b\u{fc}b".into(), orcpt),
        bad_rcpt(format!("ORCPT=rfc822;{}", "o".repeat(494)), orcpt),
        bad_rcpt(
            "ORCPT=rfc822;a ORCPT=rfc822;b".into(),
            "Duplicate RCPT parameter",
        ),
        (
            TXN.to_string(),
            format!("{RCPT} NOTIFY=NEVER X=1"),
            "555 5.5.4",
            "Unsupported RCPT parameter",
        ),
    ]
}

/// Every DSN refusal says which parameter is wrong and how it should look.
#[test]
fn every_dsn_refusal_names_its_parameter() {
    for (before, command, code, text) in dsn_cases() {
        let t = run(format!("{before}{command}\r\n").as_bytes());
        let wire = String::from_utf8(t.replies).unwrap();
        let last = wire.trim_end().rsplit("\r\n").next().unwrap_or_default();
        assert!(
            last.starts_with(&format!("{code} {text}")),
            "{command:?}: {last:?}"
        );
    }
}

#[test]
fn ehlo_advertises_dsn() {
    let t = run(b"EHLO client.test\r\n");
    assert!(String::from_utf8(t.replies)
        .unwrap()
        .contains("\r\n250-DSN\r\n"));
}

/// A message's DSN parameters as its envelope holds them for the record (which
/// `sink::record` writes out and tests): MAIL's parameters, RET and ENVID, and per
/// recipient, in RCPT order, its address, NOTIFY and ORCPT.
#[derive(Debug, PartialEq)]
struct Dsn {
    mail_params: String,
    ret: String,
    envid: String,
    rcpt_to: Vec<String>,
    notify: Vec<String>,
    orcpt: Vec<String>,
}

/// Runs `pieces` and returns each message's [`Dsn`].
fn dsn_of<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Dsn> {
    let mut out = Vec::new();
    feed_pieces(config(BareLfPolicy::Reject), pieces, |message| {
        let env = &message.envelope;
        out.push(Dsn {
            mail_params: env.mail_params().to_string(),
            ret: env.dsn_ret.map_or("", |r| r.as_str()).to_string(),
            envid: env.dsn_envid().to_string(),
            rcpt_to: env.rcpt_to().map(String::from).collect(),
            notify: env.rcpt_notify().map(|n| n.as_str().to_string()).collect(),
            orcpt: env.rcpt_orcpt().map(String::from).collect(),
        });
    });
    out
}

/// DSN parameters reach the envelope, per recipient and in RCPT order, whatever the
/// reads: every split into two reads and one byte at a time give the same envelopes.
#[test]
fn dsn_parameters_reach_the_envelope_for_every_split_of_reads() {
    let input = crate::smtp::test_support::DSN_SESSION.as_bytes();
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let whole = dsn_of([input]);
    assert_eq!(
        whole,
        [
            Dsn {
                mail_params: "RET=HDRS ENVID=abc+2Bdef".into(),
                ret: "HDRS".into(),
                envid: "abc+2Bdef".into(),
                rcpt_to: strings(&["b@example.com", "c@example.com", "d@example.com"]),
                notify: strings(&["SUCCESS,FAILURE", "", "NEVER"]),
                orcpt: strings(&["rfc822;bob+40x.example", "", ""]),
            },
            // A transaction without DSN parameters still has one (empty) per recipient.
            Dsn {
                mail_params: "".into(),
                ret: "".into(),
                envid: "".into(),
                rcpt_to: strings(&["e@example.com"]),
                notify: strings(&[""]),
                orcpt: strings(&[""]),
            },
        ]
    );
    for cut in 0..=input.len() {
        assert_eq!(
            dsn_of([&input[..cut], &input[cut..]]),
            whole,
            "split at {cut}"
        );
    }
    assert_eq!(dsn_of(input.chunks(1)), whole);
}

/// RFC 3461 section 4: MAIL lines may be 100 octets longer, RCPT lines 500.
#[test]
fn dsn_lengthens_mail_and_rcpt_lines() {
    let pad = |line: &str, len: usize| format!("{line}{}", "x".repeat(len - line.len() - 2));
    let mail = pad("MAIL FROM:<a@x.test> ENVID=", 612);
    let rcpt = pad("RCPT TO:<c@example.com> ORCPT=rfc822;", 1012);
    assert_eq!(mail.len() + 2, 612);
    // The ENVID is over 100 characters, so the line is read and the parameter refused.
    assert_eq!(replies(&format!("{HELLO}{mail}\r\n")), ["250", "501 5.5.4"]);
    assert_eq!(
        replies(&format!("{HELLO}{mail}x\r\nNOOP\r\n")),
        ["250", "500 5.5.6", "250 2.0.0"]
    );
    // A 500-character ORCPT makes a RCPT line just over 1012 octets: refused as too long
    // when the line is, and as a malformed ORCPT when only the value is.
    assert_eq!(
        replies(&format!("{TXN}{rcpt}\r\n")),
        ["250", "250 2.1.0", "250 2.1.5", "501 5.5.4"]
    );
    assert_eq!(
        replies(&format!("{TXN}{rcpt}x\r\nNOOP\r\n")),
        ["250", "250 2.1.0", "250 2.1.5", "500 5.5.6", "250 2.0.0"]
    );
    let orcpt = format!("RCPT TO:<c@example.com> ORCPT=rfc822;{}", "o".repeat(493));
    assert!(orcpt.len() + 2 > 512);
    assert_eq!(
        replies(&format!("{TXN}{orcpt}\r\n")),
        ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5"]
    );
    // Other commands keep the 512-octet limit.
    assert_eq!(
        replies(&format!("NOOP {}\r\n", "x".repeat(506))),
        ["500 5.5.6"]
    );
}
