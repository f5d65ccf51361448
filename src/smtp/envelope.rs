//! The envelope of one mail transaction and the message it carries, from the moment
//! the session completes it to the moment a sink stores it.
//!
//! Envelope strings live in one arena per transaction so that MAIL and RCPT copy their
//! addresses without an allocation per command.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use std::borrow::Cow;

use bytes::{Buf, Bytes, BytesMut};

use super::address::{write_escaped, EscapeFor};
use super::dsn::{Notify, Ret};
use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

/// A message's identity: a ULID, sortable by arrival time. It is the Kafka key, the
/// spool record's key, and what `250 ... queued as <id>` names.
pub type MessageId = ulid::Ulid;

/// Why a sink could not store a message. It lives in the core because the session maps
/// each case to its reply; the sinks only produce it. Both are the gateway's trouble or a limit,
/// never the client's fault, so neither becomes a permanent refusal except `TooLarge`.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// Try again later: `451 4.3.0`.
    #[error("{0}")]
    Temporary(Cow<'static, str>),
    /// The sink will never take a message this large: `552 5.3.4`.
    #[error("message too large for the sink")]
    TooLarge,
    /// The sink's storage is at its limit (size cap or free-space floor): `452 4.3.1`.
    #[error("insufficient storage")]
    StorageFull,
}

pub type PublishResult = Result<MessageId, PublishError>;

/// Where a sink stored a message it answered for: its own store, the Kafka topic's
/// partition and offset, or (the Kafka sink's store-and-forward) the fallback spool. The
/// transaction line names it (`partition=` `offset=`, `sink=spool-fallback`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StoredIn {
    #[default]
    Sink,
    Kafka {
        partition: i32,
        offset: i64,
    },
    Fallback,
}

/// The command that opened the transaction (RFC 821 keeps SEND, SOML and SAML).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Mail,
    Send,
    Soml,
    Saml,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Mail => "MAIL",
            Verb::Send => "SEND",
            Verb::Soml => "SOML",
            Verb::Saml => "SAML",
        }
    }
}

/// Who sent what to whom: everything about a transaction except its body.
#[derive(Clone, Debug)]
pub struct Envelope {
    pub verb: Verb,
    /// The HELO/EHLO argument, shared by every transaction of the session.
    pub helo: Arc<str>,
    /// The session greeted with EHLO (ESMTP) rather than HELO.
    pub esmtp: bool,
    pub client_addr: SocketAddr,
    /// The client asked for SMTPUTF8 in MAIL.
    pub smtputf8: bool,
    /// The session's TLS version and cipher suite, e.g. `TLSv1.3 TLS13_AES_256_GCM_SHA384`;
    /// `None` over plaintext.
    pub tls: Option<Arc<str>>,
    /// The gateway that took the message (`--hostname`) and its session (connection)
    /// id there, as the logs give it; set by the connection driver before sealing.
    pub node: Option<Arc<str>>,
    pub session: u64,
    /// RFC 3461 `RET` from MAIL, if given.
    pub dsn_ret: Option<Ret>,
    /// The user the session authenticated as (RFC 4954), if it did.
    pub auth: Option<Arc<str>>,
    text: String,
    mail_from: Range<usize>,
    mail_params: Range<usize>,
    /// RFC 3461 `ENVID` from MAIL, as sent (xtext); empty if not given.
    dsn_envid: Range<usize>,
    rcpt_to: Vec<Rcpt>,
}

/// One recipient: its address and its RFC 3461 parameters, all in the arena.
#[derive(Clone, Debug)]
struct Rcpt {
    address: Range<usize>,
    notify: Notify,
    /// `ORCPT` as sent (`addr-type;xtext`); empty if not given.
    orcpt: Range<usize>,
}

impl Envelope {
    pub fn new(
        verb: Verb,
        helo: Arc<str>,
        esmtp: bool,
        client_addr: SocketAddr,
        mail_from: &str,
        mail_params: &str,
    ) -> Self {
        let mut text = String::with_capacity(512);
        text.push_str(mail_from);
        text.push_str(mail_params);
        let from_end = mail_from.len();
        Envelope {
            verb,
            helo,
            esmtp,
            client_addr,
            smtputf8: false,
            tls: None,
            node: None,
            session: 0,
            dsn_ret: None,
            auth: None,
            text,
            mail_from: 0..from_end,
            mail_params: from_end..from_end + mail_params.len(),
            dsn_envid: 0..0,
            rcpt_to: Vec::with_capacity(4),
        }
    }

    /// MAIL's DSN parameters (RFC 3461), `envid` as sent (xtext).
    pub fn set_dsn(&mut self, ret: Option<Ret>, envid: Option<&str>) {
        self.dsn_ret = ret;
        self.dsn_envid = self.push_text(envid.unwrap_or_default());
    }

    pub fn push_rcpt(&mut self, rcpt: &str) {
        self.push_rcpt_dsn(rcpt, Notify::default(), None);
    }

    /// A recipient with its DSN parameters (RFC 3461), `orcpt` as sent.
    pub fn push_rcpt_dsn(&mut self, rcpt: &str, notify: Notify, orcpt: Option<&str>) {
        let address = self.push_text(rcpt);
        let orcpt = self.push_text(orcpt.unwrap_or_default());
        self.rcpt_to.push(Rcpt {
            address,
            notify,
            orcpt,
        });
    }

    fn push_text(&mut self, s: &str) -> Range<usize> {
        let start = self.text.len();
        self.text.push_str(s);
        start..self.text.len()
    }

    /// The reverse path without angle brackets; empty for the null path `<>`.
    pub fn mail_from(&self) -> &str {
        &self.text[self.mail_from.clone()]
    }

    /// MAIL parameters as the client sent them, e.g. `SIZE=1234 BODY=8BITMIME`.
    pub fn mail_params(&self) -> &str {
        &self.text[self.mail_params.clone()]
    }

    pub fn rcpt_to(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.rcpt_to.iter().map(|r| &self.text[r.address.clone()])
    }

    /// Each recipient's `NOTIFY`, in [`Self::rcpt_to`]'s order ([`Notify::default`] when
    /// not given).
    pub fn rcpt_notify(&self) -> impl ExactSizeIterator<Item = Notify> + '_ {
        self.rcpt_to.iter().map(|r| r.notify)
    }

    /// Each recipient's `ORCPT` as sent, in [`Self::rcpt_to`]'s order; empty when not
    /// given.
    pub fn rcpt_orcpt(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.rcpt_to.iter().map(|r| &self.text[r.orcpt.clone()])
    }

    /// MAIL's `ENVID` as sent (xtext); empty when not given.
    pub fn dsn_envid(&self) -> &str {
        &self.text[self.dsn_envid.clone()]
    }

    pub fn rcpt_count(&self) -> usize {
        self.rcpt_to.len()
    }
}

/// A message the session has received completely but that nobody has stored yet.
///
/// Its buffer starts with `headroom` unused bytes so that [`Message::seal`] can put the
/// `Received:` trace line in front of the body without copying the body.
#[derive(Debug)]
pub struct Message {
    pub envelope: Envelope,
    buf: BytesMut,
    headroom: usize,
    /// Where a `Message-ID:` field can be, as the body reader saw the header.
    header_lines: Option<super::data::HeaderLines>,
}

impl Message {
    pub(crate) fn new(envelope: Envelope, buf: BytesMut, headroom: usize) -> Self {
        debug_assert!(buf.len() >= headroom);
        Message {
            envelope,
            buf,
            headroom,
            header_lines: None,
        }
    }

    /// Keeps what the body reader noted about the header section, for
    /// [`Self::message_id`].
    pub(crate) fn with_header_lines(mut self, lines: super::data::HeaderLines) -> Self {
        self.header_lines = Some(lines);
        self
    }

    /// The value of the first `Message-ID:` field ([`super::headers::message_id`]).
    pub fn message_id(&self) -> Option<&[u8]> {
        match self
            .header_lines
            .as_ref()
            .and_then(|l| l.starts(self.headroom))
        {
            Some(starts) => super::headers::message_id_among(self.body(), starts),
            None => super::headers::message_id(self.body()),
        }
    }

    /// The message exactly as received: dot-unstuffed DATA, or BDAT chunks concatenated.
    pub fn body(&self) -> &[u8] {
        &self.buf[self.headroom..]
    }

    /// Gives the message its identity and trace line, ready for a sink.
    pub fn seal(
        mut self,
        id: MessageId,
        received_at: DateTime<Utc>,
        hostname: &str,
    ) -> SealedMessage {
        // The line is formatted on the stack and copied into the headroom, so sealing
        // allocates nothing but the shared handle `freeze` needs.
        let mut stack = [0u8; RECEIVED_STACK];
        let mut cursor = std::io::Cursor::new(&mut stack[..]);
        let line: Cow<'_, [u8]> =
            match write_received_line(&mut cursor, &self.envelope, id, received_at, hostname) {
                Ok(()) => {
                    let len = cursor.position() as usize;
                    Cow::Borrowed(&stack[..len])
                }
                // Only with a hostname far longer than any DNS name; correct, not copy-free.
                Err(_) => Cow::Owned(
                    received_line(&self.envelope, id, received_at, hostname).into_bytes(),
                ),
            };
        let value = if line.len() <= self.headroom {
            let start = self.headroom - line.len();
            self.buf[start..self.headroom].copy_from_slice(&line);
            self.buf.advance(start);
            self.buf.freeze()
        } else {
            let mut v = BytesMut::with_capacity(line.len() + self.buf.len() - self.headroom);
            v.extend_from_slice(&line);
            v.extend_from_slice(self.body());
            v.freeze()
        };
        SealedMessage {
            id,
            received_at,
            envelope: self.envelope,
            body_offset: line.len(),
            value,
        }
    }
}

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
/// HELO arguments and paths are bounded by the command-line limit.
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

#[cfg(any(test, feature = "testing"))]
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

#[cfg(test)]
mod record_tests {
    use super::{client_addr_text, decimal, received_at_text, StackText};
    use chrono::{DateTime, SecondsFormat, TimeZone, Timelike, Utc};
    use std::net::SocketAddr;

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
