//! The record: what the Kafka sink publishes and the spool stores of each accepted
//! message (docs/record.md): the `Received:` trace line the gateway puts in front of
//! the message, the value that makes, and the headers that carry the envelope.
//!
//! The protocol core (`src/smtp/`) hands over a [`Message`] with room in front of its
//! body; [`SealedMessage::seal`] writes the trace line there, so the body is never
//! copied. The connection driver is given `seal` rather than importing it (the driver
//! sits below the sink layer).
//!
//! A record read back from the spool (forwarded or replayed) keeps the headers it was
//! stored with, which may be an older version's; [`Record`] is what publishing needs of
//! either kind, so the Kafka sink takes both without knowing the spool.

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::Bytes;
use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

use crate::smtp::address::{write_escaped, EscapeFor};
use crate::smtp::envelope::{Envelope, Message, MessageId};

/// The version of the record contract (docs/record.md) in every record's `smtp.schema`
/// header. Changes that a consumer of the previous version could misread bump it.
pub const RECORD_SCHEMA: &str = "1";

/// `n` in decimal, in `buf`: no allocation per message.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A record header's value written on the stack: long enough for an IPv4 address
/// with its port and for an RFC 3339 time with microseconds.
struct StackText {
    buf: [u8; 32],
    len: usize,
}

impl StackText {
    fn new() -> Self {
        StackText {
            buf: [0; 32],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// `n` in decimal, zero-padded to at least `width` digits.
    fn push_digits(&mut self, n: u32, width: usize) {
        let mut digits = [0u8; 20];
        let text = decimal(u64::from(n), &mut digits);
        for _ in text.len()..width {
            self.push(b'0');
        }
        for &d in text {
            self.push(d);
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `smtp.client_addr` as `SocketAddr`'s `Display` writes it. IPv4 (the common case)
/// without `core::fmt` and a `String` per message (callgrind: about 1.7k of the 15k
/// instructions a Kafka record costs the reactor); IPv6 through `Display`.
fn client_addr_text(addr: SocketAddr, text: &mut StackText) -> Cow<'_, [u8]> {
    let SocketAddr::V4(v4) = addr else {
        return Cow::Owned(addr.to_string().into_bytes());
    };
    for (i, octet) in v4.ip().octets().into_iter().enumerate() {
        if i > 0 {
            text.push(b'.');
        }
        text.push_digits(u32::from(octet), 1);
    }
    text.push(b':');
    text.push_digits(u32::from(v4.port()), 1);
    Cow::Borrowed(text.as_bytes())
}

/// `smtp.received_at` as `to_rfc3339_opts(SecondsFormat::Micros, true)` writes it
/// (`2026-12-07T05:30:00.123456Z`), without chrono's formatter and a `String` per
/// message. Years outside 0-9999 and leap seconds, which chrono writes its own way,
/// go through chrono.
fn received_at_text<'a>(at: &DateTime<Utc>, text: &'a mut StackText) -> Cow<'a, [u8]> {
    let nanos = at.nanosecond();
    let year = at.year();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        let chrono = at.to_rfc3339_opts(SecondsFormat::Micros, true);
        return Cow::Owned(chrono.into_bytes());
    }
    text.push_digits(year.unsigned_abs(), 4);
    for (sep, n) in [
        (b'-', at.month()),
        (b'-', at.day()),
        (b'T', at.hour()),
        (b':', at.minute()),
        (b':', at.second()),
    ] {
        text.push(sep);
        text.push_digits(n, 2);
    }
    text.push(b'.');
    text.push_digits(nanos / 1000, 6);
    text.push(b'Z');
    Cow::Borrowed(text.as_bytes())
}

/// Stack space for formatting a `Received:` line; see [`RECEIVED_HEADROOM`].
const RECEIVED_STACK: usize = 2048;

/// The longest `Received:` line [`received_line`] writes, apart from the hostname.
/// HELO arguments and paths are bounded by the command-line limit. Sessions leave this
/// much and the hostname in front of each body (`SessionConfig::headroom`).
pub const RECEIVED_HEADROOM: usize = 1200;

/// The RFC 5321 section 4.4 trace line. `for <rcpt>` names the recipient only when there
/// is exactly one, so a copy never shows its other recipients.
pub fn received_line(
    env: &Envelope,
    id: MessageId,
    received_at: DateTime<Utc>,
    hostname: &str,
) -> String {
    let mut line = Vec::with_capacity(256);
    // Writing into a Vec cannot fail.
    let _ = write_received_line(&mut line, env, id, received_at, hostname);
    String::from_utf8_lossy(&line).into_owned()
}

fn write_received_line(
    out: &mut impl std::io::Write,
    env: &Envelope,
    id: MessageId,
    received_at: DateTime<Utc>,
    hostname: &str,
) -> std::io::Result<()> {
    // RFC 3848 (and RFC 6531 for UTF8SMTP): S for TLS, A for an authenticated sender.
    let protocol = match (
        env.smtputf8,
        env.esmtp,
        env.tls.is_some(),
        env.auth.is_some(),
    ) {
        (true, _, false, false) => "UTF8SMTP",
        (true, _, true, false) => "UTF8SMTPS",
        (true, _, false, true) => "UTF8SMTPA",
        (true, _, true, true) => "UTF8SMTPSA",
        (false, true, false, false) => "ESMTP",
        (false, true, true, false) => "ESMTPS",
        (false, true, false, true) => "ESMTPA",
        (false, true, true, true) => "ESMTPSA",
        (false, false, _, _) => "SMTP",
    };
    // Client text is validated where it is parsed (HELO argument, addresses) and
    // escaped here as well, so no byte a client chose can break the line's structure.
    out.write_all(b"Received: from ")?;
    write_escaped(out, env.helo.as_bytes(), EscapeFor::TraceLine)?;
    write!(
        out,
        " ([{}])\r\n\tby {} (smtpgw) with {} id {}",
        env.client_addr.ip(),
        hostname,
        protocol,
        id
    )?;
    if env.rcpt_count() == 1 {
        if let Some(rcpt) = env.rcpt_to().next() {
            out.write_all(b"\r\n\tfor <")?;
            write_escaped(out, rcpt.as_bytes(), EscapeFor::TraceLine)?;
            out.write_all(b">")?;
        }
    }
    // RFC 5322 date-time, as chrono's to_rfc2822 writes it; by hand because chrono's
    // formatters allocate a String per call.
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    write!(
        out,
        ";\r\n\t{}, {} {} {} {:02}:{:02}:{:02} +0000\r\n",
        DAYS[received_at.weekday().num_days_from_monday() as usize],
        received_at.day(),
        MONTHS[received_at.month0() as usize],
        received_at.year(),
        received_at.hour(),
        received_at.minute(),
        received_at.second()
    )
}

/// The record headers [`SealedMessage::for_each_header`] writes, in its order (the
/// `smtp.rcpt_*` ones once per recipient).
pub const RECORD_HEADERS: [&str; 17] = [
    "smtp.id",
    "smtp.verb",
    "smtp.mail_from",
    "smtp.rcpt_to",
    "smtp.helo",
    "smtp.client_addr",
    "smtp.received_at",
    "smtp.mail_params",
    "smtp.tls",
    "smtp.schema",
    "smtp.node",
    "smtp.session",
    "smtp.dsn_ret",
    "smtp.dsn_envid",
    "smtp.rcpt_notify",
    "smtp.rcpt_orcpt",
    "smtp.auth",
];

/// How many of [`RECORD_HEADERS`] come once per recipient (`smtp.rcpt_to`,
/// `smtp.rcpt_notify`, `smtp.rcpt_orcpt`); the rest come once per record.
const PER_RECIPIENT_HEADERS: usize = 3;

/// A message with its id and trace line: what a sink stores.
#[derive(Clone, Debug)]
pub struct SealedMessage {
    pub id: MessageId,
    pub received_at: DateTime<Utc>,
    pub envelope: Envelope,
    /// The `Received:` line followed by the message: the Kafka record's value.
    pub value: Bytes,
    /// Where the client's own bytes start in `value`.
    pub body_offset: usize,
}

impl SealedMessage {
    /// Gives the message its identity and trace line, ready for a sink.
    pub fn seal(
        message: Message,
        id: MessageId,
        received_at: DateTime<Utc>,
        hostname: &str,
    ) -> SealedMessage {
        // The line is formatted on the stack and copied into the headroom, so sealing
        // allocates nothing but the shared handle `freeze` needs.
        let mut stack = [0u8; RECEIVED_STACK];
        let mut cursor = std::io::Cursor::new(&mut stack[..]);
        let line: Cow<'_, [u8]> =
            match write_received_line(&mut cursor, &message.envelope, id, received_at, hostname) {
                Ok(()) => {
                    let len = cursor.position() as usize;
                    Cow::Borrowed(&stack[..len])
                }
                // Only with a hostname far longer than any DNS name; correct, not copy-free.
                Err(_) => Cow::Owned(
                    received_line(&message.envelope, id, received_at, hostname).into_bytes(),
                ),
            };
        let (envelope, value) = message.prepend(&line);
        SealedMessage {
            id,
            received_at,
            envelope,
            body_offset: line.len(),
            value,
        }
    }

    pub fn body(&self) -> &[u8] {
        &self.value[self.body_offset..]
    }

    /// The record headers of docs/record.md (version [`RECORD_SCHEMA`]), in order;
    /// `smtp.rcpt_to` once per recipient. Kafka and the spool both store exactly these.
    pub fn for_each_header(&self, mut f: impl FnMut(&'static str, &[u8])) {
        let env = &self.envelope;
        let mut id = [0u8; ulid::ULID_LEN];
        f("smtp.id", self.id.array_to_str(&mut id).as_bytes());
        f("smtp.verb", env.verb.as_str().as_bytes());
        f("smtp.mail_from", env.mail_from().as_bytes());
        for rcpt in env.rcpt_to() {
            f("smtp.rcpt_to", rcpt.as_bytes());
        }
        f("smtp.helo", env.helo.as_bytes());
        f(
            "smtp.client_addr",
            &client_addr_text(env.client_addr, &mut StackText::new()),
        );
        f(
            "smtp.received_at",
            &received_at_text(&self.received_at, &mut StackText::new()),
        );
        f("smtp.mail_params", env.mail_params().as_bytes());
        // `false`, or the version and cipher suite the session negotiated.
        f(
            "smtp.tls",
            env.tls.as_deref().map_or(&b"false"[..], str::as_bytes),
        );
        // From version 1 on; after the older ones so that nothing moves for a reader
        // that went by position.
        f("smtp.schema", RECORD_SCHEMA.as_bytes());
        f(
            "smtp.node",
            env.node.as_deref().unwrap_or_default().as_bytes(),
        );
        let mut digits = [0u8; 20];
        f("smtp.session", decimal(env.session, &mut digits));
        // DSN (RFC 3461), added to version 1 after its first headers: MAIL's RET and
        // ENVID, then NOTIFY and ORCPT once per `smtp.rcpt_to`, in its order, empty when
        // the client gave none, so that a consumer can zip them with the recipients.
        f(
            "smtp.dsn_ret",
            env.dsn_ret.map_or(&b""[..], |r| r.as_str().as_bytes()),
        );
        f("smtp.dsn_envid", env.dsn_envid().as_bytes());
        for notify in env.rcpt_notify() {
            f("smtp.rcpt_notify", notify.as_str().as_bytes());
        }
        for orcpt in env.rcpt_orcpt() {
            f("smtp.rcpt_orcpt", orcpt.as_bytes());
        }
        // RFC 4954: the user the session authenticated as; empty when it did not.
        f(
            "smtp.auth",
            env.auth.as_deref().map_or(&b""[..], str::as_bytes),
        );
    }
}

/// What the Kafka sink publishes of a record: a session's [`SealedMessage`], or a
/// spool's record read back (`sink::spool::SpoolRecord`), published exactly as stored.
pub trait Record {
    /// The key.
    fn id(&self) -> MessageId;
    /// The record's timestamp.
    fn received_at(&self) -> DateTime<Utc>;
    /// The `Received:` line followed by the message.
    fn value(&self) -> &[u8];
    /// How many headers [`Record::for_each_header`] yields, to size their list.
    fn header_count(&self) -> usize;
    /// The headers, in order (`smtp.rcpt_to` once per recipient).
    fn for_each_header(&self, f: impl FnMut(&str, &[u8]));
    /// `smtp.mail_from` and the first `smtp.rcpt_to`, which `--kafka-partition-key` may
    /// partition by; empty when absent.
    fn mail_from(&self) -> &[u8];
    fn first_rcpt(&self) -> &[u8];
}

impl Record for SealedMessage {
    fn id(&self) -> MessageId {
        self.id
    }

    fn received_at(&self) -> DateTime<Utc> {
        self.received_at
    }

    fn value(&self) -> &[u8] {
        &self.value
    }

    fn header_count(&self) -> usize {
        RECORD_HEADERS.len() - PER_RECIPIENT_HEADERS
            + PER_RECIPIENT_HEADERS * self.envelope.rcpt_count()
    }

    fn for_each_header(&self, f: impl FnMut(&str, &[u8])) {
        SealedMessage::for_each_header(self, f)
    }

    fn mail_from(&self) -> &[u8] {
        self.envelope.mail_from().as_bytes()
    }

    fn first_rcpt(&self) -> &[u8] {
        self.envelope
            .rcpt_to()
            .next()
            .map_or(&[][..], str::as_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::{
        client_addr_text, decimal, received_at_text, received_line, Record, SealedMessage,
        StackText, RECEIVED_HEADROOM, RECORD_HEADERS,
    };
    use crate::smtp::address::is_hostile_char;
    use crate::smtp::envelope::{Envelope, Message, MessageId, Verb};
    use crate::smtp::{BareLfPolicy, Session, SessionConfig};
    use chrono::{DateTime, SecondsFormat, TimeZone, Timelike, Utc};
    use std::net::SocketAddr;
    use std::sync::Arc;

    const TXN: &str = "EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n";

    /// The messages a session completes from `input`, fed as one read, each answered
    /// `250` as the reactor would once its record is stored.
    fn messages(input: &str) -> Vec<Message> {
        let config = Arc::new(SessionConfig {
            hostname: "mx.test".into(),
            accept_domains: ["example.com"].into_iter().collect(),
            max_message_size: 100,
            max_recipients: 3,
            bare_lf: BareLfPolicy::Reject,
            headroom: RECEIVED_HEADROOM + "mx.test".len(),
        });
        let mut session = Session::new(config, "192.0.2.7:1".parse().unwrap());
        let mut rest = input.as_bytes();
        let mut out = Vec::new();
        loop {
            rest = &rest[session.feed(rest)..];
            let Some(message) = session.take_message() else {
                return out;
            };
            out.push(message);
            session.publish_result(Ok(MessageId::from(out.len() as u128)));
        }
    }

    fn seal(message: Message) -> SealedMessage {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        SealedMessage::seal(message, MessageId::from(7u128), at, "mx.test")
    }

    fn headers(sealed: &SealedMessage) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        sealed.for_each_header(|k, v| headers.push((k, String::from_utf8_lossy(v).into_owned())));
        headers
    }

    fn named<'h>(headers: &'h [(&str, String)], name: &str) -> Vec<&'h str> {
        headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The Kafka sink sizes each record's header list by `header_count`; librdkafka
    /// grows an undersized one on every record.
    #[test]
    fn header_count_is_what_for_each_header_yields() {
        for rcpts in 1..=3 {
            let mut input = String::from("EHLO c.test\r\nMAIL FROM:<a@x.test>\r\n");
            for r in 0..rcpts {
                input.push_str(&format!("RCPT TO:<r{r}@example.com>\r\n"));
            }
            input.push_str("DATA\r\nx\r\n.\r\n");
            let message = messages(&input).pop().expect("a message");
            let sealed = seal(message);
            let mut yielded = 0;
            Record::for_each_header(&sealed, |_, _| yielded += 1);
            assert_eq!(sealed.header_count(), yielded, "{rcpts} recipients");
        }
    }

    #[test]
    fn received_line_is_prepended_without_touching_the_body() {
        let message = messages(&format!("{TXN}DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"))
            .pop()
            .unwrap();
        let sealed = seal(message);
        assert_eq!(sealed.body(), b"Subject: x\r\n\r\nbody\r\n");
        let value = String::from_utf8(sealed.value.to_vec()).unwrap();
        assert!(
            value.starts_with(
                "Received: from client.test ([192.0.2.7])\r\n\tby mx.test (smtpgw) with ESMTP id "
            ),
            "{value}"
        );
        assert!(
            value.contains("\r\n\tfor <b@example.com>;\r\n\t"),
            "{value}"
        );
        let headers = headers(&sealed);
        let names: Vec<_> = headers.iter().map(|(k, _)| *k).collect();
        // With one recipient, every header once, in the documented order.
        assert_eq!(names, RECORD_HEADERS);
        assert_eq!(names[9..12], ["smtp.schema", "smtp.node", "smtp.session"]);
        assert_eq!(headers[9].1, "1");
        // The connection driver sets these; a bare session leaves them empty and 0.
        assert_eq!(headers[10].1, "");
        assert_eq!(headers[11].1, "0");
        assert_eq!(headers[6].1, "2027-01-15T08:00:00.000000Z");
    }

    #[test]
    fn received_date_matches_rfc2822() {
        let envelope = messages(&format!("{TXN}DATA\r\nx\r\n.\r\n"))
            .pop()
            .unwrap()
            .envelope;
        // Single- and double-digit days, every weekday, year boundaries, leap day.
        for secs in [
            0i64,
            951_782_400,
            1_709_164_800,
            1_800_000_000,
            1_735_689_599,
            4_102_444_800,
        ] {
            let at = DateTime::from_timestamp(secs, 0).unwrap();
            for day in 0..7 {
                let at = at + chrono::Duration::days(day);
                let line = received_line(&envelope, MessageId::from(1u128), at, "h");
                assert!(
                    line.ends_with(&format!(";\r\n\t{}\r\n", at.to_rfc2822())),
                    "{line}"
                );
            }
        }
    }

    #[test]
    fn trace_line_escapes_what_is_not_printable() {
        // The parsers refuse such text; the trace line does not rely on it.
        let mut env = Envelope::new(
            Verb::Mail,
            Arc::from("evil\r\nX-Injected: 1\u{202e}"),
            true,
            "192.0.2.7:1".parse().unwrap(),
            "a@b",
            "",
        );
        env.push_rcpt("\"x\u{85}\u{2028}y\"@example.com");
        let line = received_line(
            &env,
            MessageId::from(1u128),
            DateTime::from_timestamp(0, 0).unwrap(),
            "mx.test",
        );
        assert!(
            line.starts_with("Received: from evil\\u{d}\\u{a}X-Injected: 1\\u{202e} ([192.0.2.7])"),
            "{line}"
        );
        assert!(
            line.contains("for <\"x\\u{85}\\u{2028}y\"@example.com>;"),
            "{line}"
        );
        assert_eq!(line.matches("\r\n").count(), 4, "{line}");
        assert!(!line
            .chars()
            .any(|c| c != '\r' && c != '\n' && c != '\t' && is_hostile_char(c)));
    }

    /// RFC 3848's protocol names in the `Received:` line, `smtp.tls` and `smtp.auth`,
    /// from what the session (TLS, AUTH) put in the envelope.
    #[test]
    fn tls_and_the_authenticated_user_are_recorded() {
        let suite = "TLSv1.3 TLS13_AES_128_GCM_SHA256";
        for (tls, auth, protocol) in [
            (None, None, "ESMTP"),
            (Some(suite), None, "ESMTPS"),
            (None, Some("alice"), "ESMTPA"),
            (Some(suite), Some("alice"), "ESMTPSA"),
        ] {
            let mut message = messages(&format!("{TXN}DATA\r\nx\r\n.\r\n")).pop().unwrap();
            message.envelope.tls = tls.map(Arc::from);
            message.envelope.auth = auth.map(Arc::from);
            let sealed = seal(message);
            let value = String::from_utf8_lossy(&sealed.value);
            assert!(value.contains(&format!(" with {protocol} id ")), "{value}");
            let headers = headers(&sealed);
            assert_eq!(named(&headers, "smtp.tls"), [tls.unwrap_or("false")]);
            assert_eq!(named(&headers, "smtp.auth"), [auth.unwrap_or("")]);
        }
    }

    /// DSN parameters become headers per recipient, in RCPT order, after schema 1's
    /// first twelve; a transaction without them still has one (empty) of each.
    #[test]
    fn dsn_parameters_are_headers_per_recipient_in_rcpt_order() {
        let records: Vec<_> = messages(crate::smtp::test_support::DSN_SESSION)
            .into_iter()
            .map(|m| headers(&seal(m)))
            .collect();
        assert_eq!(records.len(), 2);
        let first = &records[0];
        assert_eq!(
            named(first, "smtp.rcpt_to"),
            ["b@example.com", "c@example.com", "d@example.com"]
        );
        assert_eq!(
            named(first, "smtp.rcpt_notify"),
            ["SUCCESS,FAILURE", "", "NEVER"]
        );
        assert_eq!(
            named(first, "smtp.rcpt_orcpt"),
            ["rfc822;bob+40x.example", "", ""]
        );
        assert_eq!(named(first, "smtp.dsn_ret"), ["HDRS"]);
        assert_eq!(named(first, "smtp.dsn_envid"), ["abc+2Bdef"]);
        assert_eq!(
            named(first, "smtp.mail_params"),
            ["RET=HDRS ENVID=abc+2Bdef"]
        );
        let mut order: Vec<&str> = first.iter().map(|(k, _)| *k).collect();
        order.dedup();
        assert_eq!(order, RECORD_HEADERS);
        let second = &records[1];
        assert_eq!(named(second, "smtp.dsn_ret"), [""]);
        assert_eq!(named(second, "smtp.dsn_envid"), [""]);
        assert_eq!(named(second, "smtp.rcpt_notify"), [""]);
        assert_eq!(named(second, "smtp.rcpt_orcpt"), [""]);
    }

    #[test]
    fn client_addresses_are_written_as_display_writes_them() {
        for addr in [
            "0.0.0.0:0",
            "127.0.0.1:25",
            "192.0.2.10:2525",
            "255.255.255.255:65535",
            "10.1.20.100:40000",
            "[::1]:25",
            "[2001:db8::7]:65535",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut stack = StackText::new();
            let text = client_addr_text(addr, &mut stack);
            assert_eq!(&*text, addr.to_string().as_bytes(), "{addr}");
        }
    }

    #[test]
    fn receipt_times_are_written_as_chrono_writes_them() {
        let mut times: Vec<DateTime<Utc>> = vec![
            Utc.with_ymd_and_hms(2026, 12, 7, 5, 30, 0).unwrap(),
            Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2, 3, 4, 5, 6, 7).unwrap(),
        ];
        for nanos in [1, 999, 1_000, 123_456_789, 999_999_999] {
            times.push(times[0] + chrono::Duration::nanoseconds(nanos));
        }
        // A leap second, which chrono keeps in the nanoseconds.
        times.push(
            Utc.with_ymd_and_hms(2016, 12, 31, 23, 59, 59)
                .unwrap()
                .with_nanosecond(1_500_000_000)
                .unwrap(),
        );
        times.push(Utc::now());
        for at in times {
            let mut stack = StackText::new();
            let text = received_at_text(&at, &mut stack);
            let chrono = at.to_rfc3339_opts(SecondsFormat::Micros, true);
            assert_eq!(&*text, chrono.as_bytes(), "{chrono}");
        }
    }

    #[test]
    fn session_ids_are_written_in_decimal() {
        let mut buf = [0u8; 20];
        for n in [0u64, 7, 10, 1_234_567, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }
}
