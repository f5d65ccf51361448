//! Formats log lines, text or JSON, with the same field names in both.
//!
//! Text: `2026-12-07T04:35:31.123456Z  INFO smtpgw::message: message session=7 id=...`,
//! a value quoted only when it holds a space, `"` or `=`. JSON:
//! `{"timestamp":"...","level":"INFO","target":"...","fields":{"message":"...",...}}`
//! with strings as JSON strings and numbers as numbers. Client text goes through the
//! project's escaper ([`write_escaped`]) in both, so the two carry the same value and no
//! client can forge a line or a field.

use std::hash::BuildHasher;
use std::io::Write;
use std::net::SocketAddr;

use tracing::Level;

use super::event::{ClosedLine, MessageLine, RefusalLine, TraceLine, Value};
use crate::smtp::address::{write_escaped, EscapeFor};

/// A field's name, written before its value: ` name=` in text, `,"name":` in JSON.
trait Name: Copy {
    fn put(self, out: &mut Vec<u8>, json: bool);
}

impl Name for &str {
    #[inline(always)]
    fn put(self, out: &mut Vec<u8>, json: bool) {
        if json {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(self.as_bytes());
            out.extend_from_slice(b"\":");
        } else {
            out.push(b' ');
            out.extend_from_slice(self.as_bytes());
            out.push(b'=');
        }
    }
}

/// A name known when compiling, spelled out for both formats by [`key!`]: one copy of
/// a constant instead of three appends (a transaction line has fourteen fields).
#[derive(Clone, Copy)]
struct Key {
    text: &'static str,
    json: &'static str,
}

impl Name for Key {
    #[inline(always)]
    fn put(self, out: &mut Vec<u8>, json: bool) {
        if json {
            out.extend_from_slice(self.json.as_bytes());
        } else {
            out.extend_from_slice(self.text.as_bytes());
        }
    }
}

macro_rules! key {
    ($name:literal) => {
        Key {
            text: concat!(" ", $name, "="),
            json: concat!(",\"", $name, "\":"),
        }
    };
}

/// How lines are written (`--log-format`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How recipients appear on the transaction line (`--log-recipients`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogRecipients {
    /// Each address as given.
    #[default]
    Full,
    /// Only their number.
    Count,
    /// A keyed hash of each (the key is random per process): the same address gives the
    /// same hash within a run, and cannot be read back.
    Hash,
}

/// Writes one line at a time into a batch buffer.
pub struct Formatter {
    pub json: bool,
    /// `<N>` priority prefixes for journald (`JOURNAL_STREAM` set).
    pub journal: bool,
    pub recipients: LogRecipients,
    pub hash_key: std::collections::hash_map::RandomState,
    /// The timestamp's text up to the second, and which second it is.
    second: (i64, String),
    /// The start of the last line begun (everything up to its fields) and what it was
    /// made from: the lines of a batch share their timestamp, so consecutive lines of
    /// one kind start with the same bytes.
    prefix: Vec<u8>,
    prefix_of: Option<(chrono::DateTime<chrono::Utc>, Level)>,
    prefix_target: String,
    prefix_message: String,
    /// The static target and message `prefix` was last made from ([`Self::begin_static`]).
    prefix_static: Option<(&'static str, &'static str)>,
    scratch: Vec<u8>,
    /// Transaction lines' fixed parts as formatted last, by session (direct-mapped on
    /// its low bits: sessions are numbered in order, so the connections open at once
    /// rarely share a slot, and one that does only costs a formatting).
    fixed: Vec<Fixed>,
}

/// A session's ` client=… helo=… tls=…[ auth=…]`, formatted, and which version of
/// that session's fixed part it is ([`MessageLine::fixed`]).
#[derive(Default)]
struct Fixed {
    session: u64,
    version: u32,
    text: Vec<u8>,
}

/// Slots of [`Formatter::fixed`], a power of two.
const FIXED_SLOTS: usize = 1024;

impl Formatter {
    pub fn new(json: bool, journal: bool, recipients: LogRecipients) -> Formatter {
        Formatter {
            json,
            journal,
            recipients,
            hash_key: Default::default(),
            second: (i64::MIN, String::new()),
            prefix: Vec::with_capacity(128),
            prefix_of: None,
            prefix_target: String::new(),
            prefix_message: String::new(),
            prefix_static: None,
            scratch: Vec::with_capacity(256),
            fixed: Vec::new(),
        }
    }

    fn begin<'a>(
        &'a mut self,
        out: &'a mut Vec<u8>,
        now: chrono::DateTime<chrono::Utc>,
        level: Level,
        target: &str,
        message: &str,
    ) -> Line<'a> {
        self.prepare(now, level, target, message);
        self.prefix_static = None;
        self.line(out)
    }

    /// [`Self::begin`] for the gateway's own lines, whose target and message text are
    /// static: the same two strings as the last line's are recognised by address,
    /// without comparing their bytes (two `memcmp` calls a line).
    fn begin_static<'a>(
        &'a mut self,
        out: &'a mut Vec<u8>,
        now: chrono::DateTime<chrono::Utc>,
        level: Level,
        target: &'static str,
        message: &'static str,
    ) -> Line<'a> {
        self.prepare_static(now, level, target, message);
        self.line(out)
    }

    /// The start of [`Self::begin_static`]: `prefix` made right for the line.
    #[inline(always)]
    fn prepare_static(
        &mut self,
        now: chrono::DateTime<chrono::Utc>,
        level: Level,
        target: &'static str,
        message: &'static str,
    ) {
        let same = self.prefix_of == Some((now, level))
            && self
                .prefix_static
                .is_some_and(|(t, m)| std::ptr::eq(t, target) && std::ptr::eq(m, message));
        if !same {
            self.prepare(now, level, target, message);
            self.prefix_static = Some((target, message));
        }
    }

    /// Makes `prefix` the start of a line of this instant, level, target and message.
    fn prepare(
        &mut self,
        now: chrono::DateTime<chrono::Utc>,
        level: Level,
        target: &str,
        message: &str,
    ) {
        // Same instant, level, target and message text: the same bytes.
        let of = Some((now, level));
        if self.prefix_of != of || self.prefix_target != target || self.prefix_message != message {
            let mut prefix = std::mem::take(&mut self.prefix);
            prefix.clear();
            self.write_prefix(&mut prefix, now, level, target, message);
            self.prefix = prefix;
            self.prefix_of = of;
            self.prefix_target.clear();
            self.prefix_target.push_str(target);
            self.prefix_message.clear();
            self.prefix_message.push_str(message);
        }
    }

    fn line<'a>(&'a mut self, out: &'a mut Vec<u8>) -> Line<'a> {
        out.extend_from_slice(&self.prefix);
        Line {
            out,
            json: self.json,
            scratch: &mut self.scratch,
        }
    }

    fn write_prefix(
        &mut self,
        out: &mut Vec<u8>,
        now: chrono::DateTime<chrono::Utc>,
        level: Level,
        target: &str,
        message: &str,
    ) {
        if self.journal {
            let prio = match level {
                Level::ERROR => b"<3>",
                Level::WARN => b"<4>",
                Level::INFO => b"<6>",
                _ => b"<7>",
            };
            out.extend_from_slice(prio);
        }
        let secs = now.timestamp();
        if self.second.0 != secs {
            self.second = (secs, now.format("%Y-%m-%dT%H:%M:%S").to_string());
        }
        let micros = u64::from(now.timestamp_subsec_micros().min(999_999));
        // Six digits, zero-padded: 1_000_000 + micros without its leading 1.
        let frac = itoa_buf(1_000_000 + micros);
        let frac = &frac.as_slice()[1..];
        let level_text = match level {
            Level::ERROR => "ERROR",
            Level::WARN => "WARN",
            Level::INFO => "INFO",
            Level::DEBUG => "DEBUG",
            Level::TRACE => "TRACE",
        };
        if self.json {
            out.extend_from_slice(b"{\"timestamp\":\"");
            out.extend_from_slice(self.second.1.as_bytes());
            out.push(b'.');
            out.extend_from_slice(frac);
            out.extend_from_slice(b"Z\",\"level\":\"");
            out.extend_from_slice(level_text.as_bytes());
            out.extend_from_slice(b"\",\"target\":");
            json_str(out, target.as_bytes());
            out.extend_from_slice(b",\"fields\":{\"message\":");
            json_str(out, message.as_bytes());
        } else {
            out.extend_from_slice(self.second.1.as_bytes());
            out.push(b'.');
            out.extend_from_slice(frac);
            out.extend_from_slice(b"Z ");
            for _ in level_text.len()..5 {
                out.push(b' ');
            }
            out.extend_from_slice(level_text.as_bytes());
            out.push(b' ');
            out.extend_from_slice(target.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(message.as_bytes());
        }
    }

    pub fn message(
        &mut self,
        out: &mut Vec<u8>,
        now: chrono::DateTime<chrono::Utc>,
        m: &MessageLine<'_>,
    ) {
        let level = if m.code == 250 {
            Level::INFO
        } else {
            Level::WARN
        };
        if self.fixed.is_empty() {
            self.fixed.resize_with(FIXED_SLOTS, Fixed::default);
        }
        let slot = m.session as usize & (FIXED_SLOTS - 1);
        self.prepare_static(now, level, super::TARGET_MESSAGE, "message");
        out.extend_from_slice(&self.prefix);
        // The formatter's fields borrowed apart: the cached fixed part is read and
        // written in its slot, not moved out and back.
        let fixed = &mut self.fixed[slot];
        let key = &self.hash_key;
        let mut l = Line {
            out,
            json: self.json,
            scratch: &mut self.scratch,
        };
        l.num(key!("session"), m.session);
        l.ulid(key!("id"), &m.id);
        if m.fixed != 0 && fixed.version == m.fixed && fixed.session == m.session {
            l.out.extend_from_slice(&fixed.text);
        } else {
            let at = l.out.len();
            l.addr(key!("client"), m.client());
            l.client_text(key!("helo"), m.helo);
            l.plain_bytes(key!("tls"), m.tls);
            if let Some(user) = m.auth {
                l.client_text(key!("auth"), user);
            }
            fixed.text.clear();
            fixed.text.extend_from_slice(&l.out[at..]);
            (fixed.session, fixed.version) = (m.session, m.fixed);
        }
        l.client_text(key!("from"), m.from);
        match self.recipients {
            LogRecipients::Full => match m.only_rcpt() {
                Some(rcpt) => l.one_item_list(key!("rcpts"), rcpt),
                None => l.client_list(key!("rcpts"), m.rcpts(), None),
            },
            LogRecipients::Hash => l.client_list(
                key!("rcpts"),
                m.rcpts(),
                Some(&|b: &[u8]| format!("{:016x}", key.hash_one(b)).into_bytes()),
            ),
            LogRecipients::Count => {}
        }
        l.num(key!("nrcpt"), u64::from(m.rcpt_count));
        l.num(key!("size"), m.size);
        if let Some(id) = m.message_id {
            l.client_text(key!("message_id"), id);
        }
        l.num(key!("code"), u64::from(m.code));
        l.num(key!("ms"), m.ms);
        l.plain_bytes(key!("sink"), m.sink);
        // Never negative for a delivered record (librdkafka's "unknown" offset, -1001,
        // is only seen before delivery); a negative one is left out rather than shown.
        if let Some((Ok(partition), Ok(offset))) =
            m.kafka.map(|(p, o)| (u64::try_from(p), u64::try_from(o)))
        {
            l.num(key!("partition"), partition);
            l.num(key!("offset"), offset);
        }
        if let Some(e) = m.error {
            l.client_text(key!("error"), e);
        }
        l.end();
    }

    pub fn refusal(
        &mut self,
        out: &mut Vec<u8>,
        now: chrono::DateTime<chrono::Utc>,
        r: &RefusalLine,
    ) {
        let mut l = self.begin_static(out, now, Level::WARN, super::TARGET_REFUSAL, "refused");
        l.num(key!("session"), r.session);
        l.addr(key!("client"), r.client);
        if !r.verb.is_empty() {
            l.plain(key!("command"), r.verb);
        }
        if let Some(a) = &r.address {
            l.client_text(key!("address"), a.as_bytes());
        }
        if let Some(u) = &r.user {
            l.client_text(key!("user"), u.as_bytes());
        }
        l.num(key!("code"), u64::from(r.refusal.code()));
        if !r.refusal.enhanced().is_empty() {
            l.plain(key!("enhanced"), r.refusal.enhanced());
        }
        l.plain(key!("reason"), r.refusal.as_str());
        if let Some(d) = &r.detail {
            l.client_text(key!("detail"), d.as_bytes());
        }
        l.end();
    }

    /// The line that says how many refusals of `reason` from `ip` were not logged.
    pub fn suppressed(
        &mut self,
        out: &mut Vec<u8>,
        now: chrono::DateTime<chrono::Utc>,
        reason: &str,
        ip: std::net::IpAddr,
        count: u64,
    ) {
        let mut l = self.begin_static(
            out,
            now,
            Level::WARN,
            super::TARGET_REFUSAL,
            "refusals suppressed",
        );
        l.display(key!("client_ip"), &ip);
        l.plain(key!("reason"), reason);
        l.num(key!("suppressed"), count);
        l.end();
    }

    pub fn closed(
        &mut self,
        out: &mut Vec<u8>,
        now: chrono::DateTime<chrono::Utc>,
        c: &ClosedLine,
    ) {
        let mut l = self.begin_static(
            out,
            now,
            Level::INFO,
            super::TARGET_SESSION,
            "connection closed",
        );
        l.num(key!("session"), c.session);
        l.addr(key!("client"), c.client);
        l.num(key!("ms"), c.ms);
        l.num(key!("accepted"), c.accepted);
        l.num(key!("refused"), c.refused);
        l.num(key!("bytes_in"), c.bytes_in);
        l.num(key!("bytes_out"), c.bytes_out);
        l.plain(key!("ended"), c.ended.as_str());
        l.end();
    }

    pub fn trace(&mut self, out: &mut Vec<u8>, now: chrono::DateTime<chrono::Utc>, t: &TraceLine) {
        let mut l = self.begin(out, now, t.level, t.target, &t.message);
        for (name, value) in &t.fields {
            match value {
                Value::Str(s) => l.client_text(*name, s.as_bytes()),
                Value::U64(n) => l.num(*name, *n),
                Value::I64(n) => l.display_num(*name, n),
                Value::F64(n) if n.is_finite() => l.display_num(*name, n),
                Value::F64(n) => l.display(*name, n),
                Value::Bool(b) => l.display_num(*name, b),
            }
        }
        l.end();
    }
}

/// Turns a list item into what is logged (the keyed hash of a recipient).
type MapItem<'a> = dyn Fn(&[u8]) -> Vec<u8> + 'a;

/// One line being written.
struct Line<'a> {
    out: &'a mut Vec<u8>,
    json: bool,
    scratch: &'a mut Vec<u8>,
}

impl Line<'_> {
    #[inline(always)]
    fn key(&mut self, name: impl Name) {
        name.put(self.out, self.json);
    }

    #[inline(always)]
    fn num(&mut self, name: impl Name, n: u64) {
        self.key(name);
        push_decimal(self.out, n);
    }

    /// A number or boolean (unquoted in both formats).
    fn display_num(&mut self, name: impl Name, v: &dyn std::fmt::Display) {
        self.key(name);
        let _ = write!(self.out, "{v}");
    }

    /// Our own text, known to need no escaping (labels, versions, ids).
    #[inline(always)]
    fn plain(&mut self, name: impl Name, v: &str) {
        self.plain_bytes(name, v.as_bytes());
    }

    #[inline(always)]
    fn plain_bytes(&mut self, name: impl Name, v: &[u8]) {
        self.key(name);
        if self.json {
            json_str(self.out, v);
        } else {
            text_value(self.out, v);
        }
    }

    fn display(&mut self, name: impl Name, v: &dyn std::fmt::Display) {
        self.scratch.clear();
        let _ = write!(self.scratch, "{v}");
        self.key(name);
        if self.json {
            json_str(self.out, self.scratch);
        } else {
            text_value(self.out, self.scratch);
        }
    }

    #[inline(always)]
    fn addr(&mut self, name: impl Name, a: SocketAddr) {
        let SocketAddr::V4(v4) = a else {
            return self.display(name, &a);
        };
        // The common case without the formatting machinery: digits, dots and a colon,
        // which need no quoting in either format, put together on the stack (each
        // octet a fixed-size copy from a table) and appended at once: five numbers
        // appended one by one cost four times as much.
        self.key(name);
        let mut buf = [0u8; 24];
        let mut at = 0;
        if self.json {
            buf[0] = b'"';
            at = 1;
        }
        for octet in v4.ip().octets() {
            let (text, len) = OCTETS[usize::from(octet)];
            buf[at..at + 4].copy_from_slice(&text);
            at += usize::from(len);
        }
        // The last octet's dot becomes the colon.
        buf[at - 1] = b':';
        let port = v4.port();
        let digits = match port {
            0..=9 => 1,
            10..=99 => 2,
            100..=999 => 3,
            1000..=9999 => 4,
            _ => 5,
        };
        let mut rest = u32::from(port);
        let mut end = at + digits;
        while rest >= 10 {
            let i = (rest % 100) as usize * 2;
            buf[end - 2..end].copy_from_slice(&DIGIT_PAIRS[i..i + 2]);
            end -= 2;
            rest /= 100;
        }
        if end > at {
            buf[at] = b'0' + rest as u8;
        }
        at += digits;
        if self.json {
            buf[at] = b'"';
            at += 1;
        }
        self.out.extend_from_slice(&buf[..at]);
    }

    /// Client text: escaped first, then quoted as the format needs.
    #[inline(always)]
    fn client_text(&mut self, name: impl Name, v: &[u8]) {
        self.key(name);
        let class = classify(v);
        // Plain printable ASCII is what the escaper leaves as it is: skip the copy.
        if class & ESCAPE != 0 {
            self.scratch.clear();
            let _ = write_escaped(self.scratch, v, EscapeFor::TerminalField);
            if self.json {
                json_str(self.out, self.scratch);
            } else {
                text_value(self.out, self.scratch);
            }
        } else if self.json {
            json_str_classified(self.out, v, class);
        } else {
            text_value_classified(self.out, v, class);
        }
    }

    /// The message id, without the formatting machinery.
    #[inline(always)]
    fn ulid(&mut self, name: impl Name, id: &crate::smtp::MessageId) {
        self.key(name);
        // Crockford base32, which needs no quoting or escaping: the fixed-size copy is
        // a few stores, where a `&str` would be a call to `memcpy`.
        let buf = ulid_text(id.0);
        if self.json {
            self.out.push(b'"');
            self.out.extend_from_slice(&buf);
            self.out.push(b'"');
        } else {
            self.out.extend_from_slice(&buf);
        }
    }

    /// A list of one item, as [`Self::client_list`] writes it, without its copy through
    /// the scratch buffer when the item needs no escaping (a message has one recipient
    /// more often than not).
    #[inline(always)]
    fn one_item_list(&mut self, name: impl Name, item: &[u8]) {
        let class = classify(item);
        if class & (ESCAPE | COMMA) != 0 {
            return self.client_list(name, std::iter::once(item), None);
        }
        self.key(name);
        if self.json {
            self.out.push(b'[');
            json_str_classified(self.out, item, class);
            self.out.push(b']');
        } else {
            text_value_classified(self.out, item, class);
        }
    }

    /// A list: a JSON array of strings, or comma-separated text.
    fn client_list<'v>(
        &mut self,
        name: impl Name,
        items: impl Iterator<Item = &'v [u8]>,
        map: Option<&MapItem<'_>>,
    ) {
        self.scratch.clear();
        let mut first = true;
        let mut list_class = 0;
        if self.json {
            self.scratch.push(b'[');
        }
        for item in items {
            let mapped;
            let item = match &map {
                Some(map) => {
                    mapped = map(item);
                    &mapped[..]
                }
                None => item,
            };
            if !first {
                self.scratch.push(b',');
            }
            first = false;
            let mut class = classify(item);
            let escaped_copy;
            let escaped = if class & ESCAPE != 0 {
                let mut e = Vec::with_capacity(item.len() + 8);
                let _ = write_escaped(&mut e, item, EscapeFor::TerminalField);
                escaped_copy = e;
                class = classify(&escaped_copy);
                &escaped_copy[..]
            } else {
                item
            };
            // What the whole list needs: the separators and `\u{2c}` add no quoting.
            list_class |= class;
            if self.json {
                json_str_classified(self.scratch, escaped, class);
            } else if class & COMMA == 0 {
                self.scratch.extend_from_slice(escaped);
            } else {
                // A comma inside an address (a quoted local part) is escaped so the
                // list splits back the same way.
                for &b in escaped {
                    if b == b',' {
                        self.scratch.extend_from_slice(b"\\u{2c}");
                    } else {
                        self.scratch.push(b);
                    }
                }
            }
        }
        self.key(name);
        if self.json {
            self.scratch.push(b']');
            self.out.extend_from_slice(self.scratch);
        } else {
            text_value_classified(self.out, self.scratch, list_class);
        }
    }

    fn end(self) {
        if self.json {
            self.out.extend_from_slice(b"}}\n");
        } else {
            self.out.push(b'\n');
        }
    }
}

/// [`classify`] bits: the escaper would change the byte (anything but printable ASCII,
/// and `\`)...
const ESCAPE: u8 = 1;
/// ...the text format must quote a value holding it (space, `"`, `=`, controls)...
const QUOTE: u8 = 2;
/// ...a JSON string must escape it (`"`, `\`, controls)...
const JSON: u8 = 4;
/// ...it is a comma (escaped inside an item of a text list).
const COMMA: u8 = 8;

/// What each byte asks of a value, so one pass over it decides all four.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let mut c = 0;
        if b < 0x20 || b >= 0x7f || b == b'\\' as usize {
            c |= ESCAPE;
        }
        if b <= b' ' as usize || b == b'"' as usize || b == b'=' as usize || b == 0x7f {
            c |= QUOTE;
        }
        if b < 0x20 || b == b'"' as usize || b == b'\\' as usize || b == 0x7f {
            c |= JSON;
        }
        if b == b',' as usize {
            c |= COMMA;
        }
        t[b] = c;
        b += 1;
    }
    t
};

/// The union of the [`CLASS`] bits of `v`'s bytes.
fn classify(v: &[u8]) -> u8 {
    v.iter().fold(0, |acc, &b| acc | CLASS[usize::from(b)])
}

/// Crockford's base32, the ULID's alphabet.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Two base32 characters for each 10 bits.
static ULID_PAIRS: [[u8; 2]; 1024] = {
    let mut t = [[0u8; 2]; 1024];
    let mut i = 0;
    while i < 1024 {
        t[i] = [ALPHABET[i >> 5], ALPHABET[i & 31]];
        i += 1;
    }
    t
};

/// A ULID's text, as [`ulid::Ulid::array_to_str`] writes it: 26 characters of five bits
/// each, the first of the top three. Two 60-bit halves of `u64` shifts instead of 26
/// shifts of the whole `u128` (each several instructions), each half ten bits (two
/// characters from [`ULID_PAIRS`]) at a time: a quarter of the shifts and loads.
#[inline]
fn ulid_text(id: u128) -> [u8; ulid::ULID_LEN] {
    const LOW60: u64 = (1 << 60) - 1;
    let low = id as u64 & LOW60;
    let mid = (id >> 60) as u64 & LOW60;
    let top = (id >> 120) as u8;
    let mut buf = [0u8; ulid::ULID_LEN];
    buf[..2].copy_from_slice(&ULID_PAIRS[usize::from(top)]);
    for i in 0..6 {
        let at = 12 - 2 * i;
        buf[at..at + 2].copy_from_slice(&ULID_PAIRS[(mid >> (10 * i)) as usize & 1023]);
        buf[at + 12..at + 14].copy_from_slice(&ULID_PAIRS[(low >> (10 * i)) as usize & 1023]);
    }
    buf
}

/// Each octet's digits and a dot, and how many of those four bytes it is.
static OCTETS: [([u8; 4], u8); 256] = {
    let mut t = [([0u8; 4], 0u8); 256];
    let mut n = 0;
    while n < 256 {
        let (h, d, u) = (
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        );
        t[n] = if n >= 100 {
            ([h, d, u, b'.'], 4)
        } else if n >= 10 {
            ([d, u, b'.', 0], 3)
        } else {
            ([u, b'.', 0, 0], 2)
        };
        n += 1;
    }
    t
};

/// "00", "01", ... "99": two digits per division.
static DIGIT_PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// Appends `n` in decimal. A line has ten or so numbers, nearly all under 10^8: those
/// are written a digit pair at a time with pushes the compiler inlines, where copying a
/// variable-length digit buffer called `memcpy` for every number. (Eight bytes put
/// together on the stack and copied at once measured slower.)
#[inline(always)]
fn push_decimal(out: &mut Vec<u8>, n: u64) {
    if n < 10_000 {
        push_upto4(out, n);
    } else if n < 100_000_000 {
        let (hi, lo) = (n / 10_000, n % 10_000);
        push_upto4(out, hi);
        push_pair(out, lo / 100);
        push_pair(out, lo % 100);
    } else {
        out.extend_from_slice(itoa_buf(n).as_slice());
    }
}

/// `n` < 10,000 without leading zeros.
#[inline(always)]
fn push_upto4(out: &mut Vec<u8>, n: u64) {
    if n < 10 {
        out.push(b'0' + n as u8);
    } else if n < 100 {
        push_pair(out, n);
    } else {
        let (hi, lo) = (n / 100, n % 100);
        if hi < 10 {
            out.push(b'0' + hi as u8);
        } else {
            push_pair(out, hi);
        }
        push_pair(out, lo);
    }
}

/// `n` < 100 as two digits.
#[inline(always)]
fn push_pair(out: &mut Vec<u8>, n: u64) {
    let i = (n % 100) as usize * 2;
    out.extend_from_slice(&[DIGIT_PAIRS[i], DIGIT_PAIRS[i + 1]]);
}

/// Decimal digits of `n` without the formatting machinery.
fn itoa_buf(mut n: u64) -> SmallDigits {
    let mut d = SmallDigits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    d
}

struct SmallDigits {
    buf: [u8; 20],
    start: usize,
}

impl SmallDigits {
    fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// A text value: as is when it is one plain token, else in double quotes with `"`
/// escaped (backslashes are already escaped by `write_escaped`).
fn text_value(out: &mut Vec<u8>, v: &[u8]) {
    text_value_classified(out, v, classify(v));
}

/// [`text_value`] of a value already [`classify`]d. Inlined for the common plain
/// token; the quoted form is out of line.
#[inline(always)]
fn text_value_classified(out: &mut Vec<u8>, v: &[u8], class: u8) {
    if !v.is_empty() && class & QUOTE == 0 {
        out.extend_from_slice(v);
    } else {
        text_quoted(out, v);
    }
}

#[cold]
fn text_quoted(out: &mut Vec<u8>, v: &[u8]) {
    out.push(b'"');
    for &b in v {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// A JSON string. `v` is UTF-8 (escaped client text or our own).
pub fn json_str(out: &mut Vec<u8>, v: &[u8]) {
    json_str_classified(out, v, classify(v));
}

/// [`json_str`] of a value already [`classify`]d.
fn json_str_classified(out: &mut Vec<u8>, v: &[u8], class: u8) {
    out.push(b'"');
    if class & JSON == 0 {
        out.extend_from_slice(v);
        out.push(b'"');
        return;
    }
    for &b in v {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => {
                let _ = write!(out, "\\u{:04x}", b);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::event::{EndedBy, PendingLine};
    use crate::smtp::Refusal;
    use std::sync::Arc;

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_796_000_000, 123_456_000).unwrap_or_default()
    }

    /// The test message's line, encoded as a reactor hands it over.
    fn message_bytes() -> Vec<u8> {
        let mut p = PendingLine::default();
        p.begin(
            7,
            ulid::Ulid::from_parts(1, 2),
            "192.0.2.1:4000".parse().unwrap_or_else(|_| unreachable!()),
            Some("TLSv1.3"),
            &Arc::from("mx.test"),
            None,
            "a\"b c@x.org",
            Some(b"<id@x> \x1b[31m"),
            ["r1@example.com", "r,2@example.com"].into_iter(),
            1024,
            true,
        );
        p.finish(250, 3, "spool", None, None).to_vec()
    }

    /// The line as the writer reads it back.
    fn decoded(bytes: &[u8]) -> MessageLine<'_> {
        let (m, rest) = MessageLine::decode(bytes).unwrap_or_else(|| panic!("not a line"));
        assert!(rest.is_empty());
        m
    }

    #[test]
    fn ulids_are_written_as_the_crate_writes_them() {
        let mut x: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        for id in [
            0,
            1,
            u128::MAX,
            1 << 125,
            (1 << 125) - 1,
            31 << 60,
            31 << 55,
        ] {
            assert_eq!(
                ulid_text(id),
                ulid::Ulid(id).to_string().as_bytes(),
                "{id:x}"
            );
        }
        for _ in 0..1000 {
            // xorshift: ids of every shape
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            assert_eq!(ulid_text(x), ulid::Ulid(x).to_string().as_bytes(), "{x:x}");
        }
    }

    #[test]
    fn ipv4_clients_are_written_as_display_writes_them() {
        let mut ports = vec![0u16, 1, 9, 10, 99, 100, 999, 1000, 9999, 10000, 25, 65535];
        ports.extend((0..200).map(|i| i * 331));
        for json in [false, true] {
            for (i, port) in ports.iter().enumerate() {
                let octet = |k: usize| ((i * 37 + k * 101) % 256) as u8;
                let a = SocketAddr::from(([octet(0), octet(1), octet(2), octet(3)], *port));
                let (mut scratch, mut out) = (Vec::new(), Vec::new());
                let mut l = Line {
                    out: &mut out,
                    json,
                    scratch: &mut scratch,
                };
                l.addr("client", a);
                let want = if json {
                    format!(",\"client\":\"{a}\"")
                } else {
                    format!(" client={a}")
                };
                assert_eq!(String::from_utf8(out).unwrap_or_default(), want);
            }
        }
    }

    #[test]
    fn decimals_match_display() {
        let mut values = vec![0, u64::MAX, u64::MAX - 1];
        let mut p = 1u64;
        while let Some(next) = p.checked_mul(10) {
            values.extend([p - 1, p, p + 1, p * 5 + 7]);
            p = next;
        }
        values.extend([p - 1, p, 255, 65_535, 12_345_678_901]);
        let mut out = b"x".to_vec();
        let mut want = String::from("x");
        for n in values {
            push_decimal(&mut out, n);
            out.push(b' ');
            want.push_str(&format!("{n} "));
        }
        assert_eq!(String::from_utf8(out).unwrap_or_default(), want);
    }

    #[test]
    fn a_lone_recipient_is_written_as_the_general_list_writes_it() {
        let items: [&[u8]; 7] = [
            b"a@b.example",
            b"r,2@x",
            b"\"q x\"@z",
            b"x=y@z",
            b"esc\x1b@z",
            b"back\\slash@z",
            b"",
        ];
        for json in [false, true] {
            for item in items {
                let (mut scratch, mut fast, mut general) = (Vec::new(), Vec::new(), Vec::new());
                let mut l = Line {
                    out: &mut fast,
                    json,
                    scratch: &mut scratch,
                };
                l.one_item_list("rcpts", item);
                let mut l = Line {
                    out: &mut general,
                    json,
                    scratch: &mut scratch,
                };
                l.client_list("rcpts", std::iter::once(item), None);
                assert_eq!(fast, general, "{json} {item:?}");
            }
        }
        // Only a copied, single recipient takes that path.
        let m = message_bytes();
        assert_eq!(decoded(&m).only_rcpt(), None);
        let one = |with_rcpts| {
            let mut p = PendingLine::default();
            p.begin(
                1,
                ulid::Ulid::from_parts(1, 2),
                "192.0.2.1:4000".parse().unwrap_or_else(|_| unreachable!()),
                None,
                &Arc::from("h"),
                None,
                "f@x",
                None,
                ["r@x"].into_iter(),
                1,
                with_rcpts,
            );
            p.finish(250, 0, "null", None, None).to_vec()
        };
        assert_eq!(decoded(&one(true)).only_rcpt(), Some(&b"r@x"[..]));
        assert_eq!(decoded(&one(false)).only_rcpt(), None);
    }

    #[test]
    fn each_kind_of_line_starts_with_its_own_prefix_whatever_came_before() {
        let mut f = Formatter::new(false, false, LogRecipients::Count);
        let trace = |message: &str| TraceLine {
            level: Level::INFO,
            target: "smtpgw::net",
            message: message.into(),
            fields: Vec::new(),
        };
        let mut out = Vec::new();
        f.message(&mut out, now(), &decoded(&message_bytes()));
        f.trace(&mut out, now(), &trace("listening"));
        f.message(&mut out, now(), &decoded(&message_bytes()));
        f.trace(&mut out, now(), &trace("stopping"));
        f.trace(&mut out, now(), &trace("listening"));
        f.message(&mut out, now(), &decoded(&message_bytes()));
        let text = String::from_utf8(out).unwrap_or_default();
        let starts: Vec<&str> = text
            .lines()
            .map(|l| l.split(" session=").next().unwrap_or(l))
            .collect();
        let m = "2026-11-30T00:53:20.123456Z  INFO smtpgw::message: message";
        let t = "2026-11-30T00:53:20.123456Z  INFO smtpgw::net: ";
        assert_eq!(
            starts,
            [
                m,
                &format!("{t}listening"),
                m,
                &format!("{t}stopping"),
                &format!("{t}listening"),
                m
            ],
            "{text}"
        );
    }

    #[test]
    fn json_values_are_plain_json() {
        let mut f = Formatter::new(true, false, LogRecipients::Full);
        let mut out = Vec::new();
        f.message(&mut out, now(), &decoded(&message_bytes()));
        let text = String::from_utf8(out).unwrap_or_default();
        assert!(text.ends_with("}}\n"), "{text}");
        assert!(text.contains(r#""helo":"mx.test""#), "{text}");
        assert!(text.contains(r#""client":"192.0.2.1:4000""#), "{text}");
        assert!(text.contains(r#""from":"a\"b c@x.org""#), "{text}");
        assert!(
            text.contains(r#""rcpts":["r1@example.com","r,2@example.com"]"#),
            "{text}"
        );
        assert!(text.contains(r#""code":250,"ms":3"#), "{text}");
        // The escape sequence from the client is made visible, not passed on.
        assert!(
            text.contains(r#""message_id":"<id@x> \\u{1b}[31m""#),
            "{text}"
        );
    }

    #[test]
    fn text_quotes_only_when_needed_and_journal_prefixes() {
        let mut f = Formatter::new(false, true, LogRecipients::Count);
        let mut out = Vec::new();
        f.message(&mut out, now(), &decoded(&message_bytes()));
        let line = String::from_utf8(out).unwrap_or_default();
        assert!(line.starts_with("<6>2026-"), "{line}");
        assert!(
            line.contains(" INFO smtpgw::message: message session=7 "),
            "{line}"
        );
        assert!(line.contains(r#" from="a\"b c@x.org" "#), "{line}");
        assert!(line.contains(" helo=mx.test tls=TLSv1.3 "), "{line}");
        assert!(!line.contains("rcpts="), "{line}");
        assert!(line.contains(" nrcpt=2 "), "{line}");
        let mut out = Vec::new();
        let r = RefusalLine {
            session: 1,
            client: "[::1]:25".parse().unwrap_or_else(|_| unreachable!()),
            refusal: Refusal::RelayDenied,
            verb: "RCPT",
            address: Some("x@elsewhere.test".into()),
            detail: None,
            user: None,
        };
        f.refusal(&mut out, now(), &r);
        let line = String::from_utf8(out).unwrap_or_default();
        assert!(line.starts_with("<4>"), "{line}");
        assert!(line.ends_with(
            "client=[::1]:25 command=RCPT address=x@elsewhere.test code=550 enhanced=5.7.1 reason=relay_denied\n"
        ), "{line}");
    }

    #[test]
    fn fields_come_back_whole_from_a_reused_buffer() {
        // The second line is encoded where the first, longer one was (a connection's
        // buffer serves all its messages).
        let mut p = PendingLine::default();
        p.begin(
            9,
            ulid::Ulid::from_parts(3, 4),
            "192.0.2.9:9".parse().unwrap_or_else(|_| unreachable!()),
            Some("TLSv1.2"),
            &Arc::from("a.long.helo.name.example"),
            Some(&Arc::from("user")),
            "sender@example.org",
            Some(b"<long-message-id@example.org>"),
            ["one@example.com", "two@example.com", "three@example.com"].into_iter(),
            4096,
            true,
        );
        p.finish(451, 9, "kafka", Some((1, 2)), Some(&"broken"));
        p.begin(
            1,
            ulid::Ulid::from_parts(1, 2),
            "192.0.2.1:4000".parse().unwrap_or_else(|_| unreachable!()),
            None,
            &Arc::from(""),
            None,
            "",
            Some(b"<a\0b@x>"),
            ["r@x"].into_iter(),
            1,
            true,
        );
        let bytes = p.finish(250, 0, "spool", None, None).to_vec();
        let m = decoded(&bytes);
        assert_eq!(m.helo, b"");
        assert_eq!(m.from, b"");
        assert_eq!((m.auth, m.kafka, m.error), (None, None, None));
        assert_eq!(m.message_id, Some(&b"<a\0b@x>"[..]));
        assert_eq!(m.rcpts().collect::<Vec<_>>(), vec![&b"r@x"[..]]);
        let mut f = Formatter::new(false, false, LogRecipients::Full);
        let mut out = Vec::new();
        f.message(&mut out, now(), &m);
        let line = String::from_utf8(out).unwrap_or_default();
        // An empty value is quoted, a NUL made visible.
        assert!(
            line.contains(r#" helo="" tls=none from="" rcpts=r@x "#),
            "{line}"
        );
        assert!(line.contains(r#" message_id=<a\u{0}b@x> "#), "{line}");
    }

    /// One message of a connection's: session 5, from `client`, with this TLS
    /// version, HELO and user (shared with the session, as a connection has them); the
    /// rest the same for all.
    fn connection_line(
        p: &mut PendingLine,
        client: &str,
        tls: Option<&'static str>,
        helo: &Arc<str>,
        auth: Option<&Arc<str>>,
    ) -> Vec<u8> {
        p.begin(
            5,
            ulid::Ulid::from_parts(1, 2),
            client.parse().unwrap_or_else(|_| unreachable!()),
            tls,
            helo,
            auth,
            "s@x.org",
            None,
            ["r@x.org"].into_iter(),
            10,
            true,
        );
        p.finish(250, 1, "null", None, None).to_vec()
    }

    #[test]
    fn the_fixed_part_gets_a_new_version_whenever_it_may_have_changed() {
        let mut p = PendingLine::default();
        let mut version = |client, tls, helo: &Arc<str>, auth: Option<&Arc<str>>| {
            decoded(&connection_line(&mut p, client, tls, helo, auth)).fixed
        };
        let a = "192.0.2.1:25";
        let (mx, mx2, user) = (Arc::from("mx"), Arc::from("mx2"), Arc::from("u"));
        let first = version(a, None, &mx, None);
        assert_ne!(first, 0);
        // The session's own texts again: the same version.
        assert_eq!(version(a, None, &mx, None), first);
        assert_eq!(version(a, None, &mx.clone(), None), first);
        let helo = version(a, None, &mx2, None);
        assert_ne!(helo, first);
        // The same words sent again (a new EHLO) count as a change.
        let again = version(a, None, &Arc::from("mx2"), None);
        assert_ne!(again, helo);
        let tls = version(a, Some("TLSv1.3"), &mx2, None);
        assert_ne!(tls, again);
        let auth = version(a, Some("TLSv1.3"), &mx2, Some(&user));
        assert_ne!(auth, tls);
        assert_eq!(version(a, Some("TLSv1.3"), &mx2, Some(&user)), auth);
        let client = version("192.0.2.1:26", Some("TLSv1.3"), &mx2, Some(&user));
        assert_ne!(client, auth);
        let no_auth = version("192.0.2.1:26", Some("TLSv1.3"), &mx2, None);
        assert_ne!(no_auth, client);
    }

    #[test]
    fn a_cached_fixed_part_is_what_formatting_it_writes() {
        let (mx, ab, user) = (Arc::from("mx"), Arc::from("a b"), Arc::from("u\\1"));
        for json in [false, true] {
            let mut p = PendingLine::default();
            let v6 = "[2001:db8::1]:25";
            let lines = [
                connection_line(&mut p, "192.0.2.1:25", None, &mx, None),
                connection_line(&mut p, "192.0.2.1:25", None, &mx, None),
                // Not seen by the writer (dropped): the next line must not pass for
                // the first one's version.
                connection_line(&mut p, "192.0.2.1:25", None, &ab, Some(&user)),
                connection_line(&mut p, "192.0.2.1:25", None, &ab, Some(&user)),
                connection_line(&mut p, v6, Some("TLSv1.3"), &ab, None),
                connection_line(&mut p, v6, Some("TLSv1.3"), &ab, None),
            ];
            let mut cached = Formatter::new(json, false, LogRecipients::Full);
            let mut fixed = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                if i == 2 {
                    continue;
                }
                let m = decoded(line);
                fixed.push(m.fixed);
                let mut out = Vec::new();
                cached.message(&mut out, now(), &m);
                // A formatter that has seen no other line formats the fixed part.
                let mut fresh = Vec::new();
                Formatter::new(json, false, LogRecipients::Full).message(&mut fresh, now(), &m);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&fresh),
                    "line {i}"
                );
            }
            // The second and the last line's fixed parts came from the cache; the
            // line after the dropped one shares its version, not the first line's.
            assert_eq!(fixed[0], fixed[1]);
            assert_ne!(fixed[1], fixed[2]);
            assert_ne!(fixed[2], fixed[3]);
            assert_eq!(fixed[3], fixed[4]);
        }
    }

    #[test]
    fn hashed_recipients_are_stable_and_unreadable() {
        let mut f = Formatter::new(false, false, LogRecipients::Hash);
        let mut a = Vec::new();
        let mut b = Vec::new();
        f.message(&mut a, now(), &decoded(&message_bytes()));
        f.message(&mut b, now(), &decoded(&message_bytes()));
        let a = String::from_utf8(a).unwrap_or_default();
        assert_eq!(a, String::from_utf8(b).unwrap_or_default());
        assert!(!a.contains("r1@example.com"), "{a}");
        assert!(a.contains(" rcpts="), "{a}");
        let mut out = Vec::new();
        f.closed(
            &mut out,
            now(),
            &ClosedLine {
                session: 3,
                client: "192.0.2.1:1".parse().unwrap_or_else(|_| unreachable!()),
                ms: 5,
                accepted: 1,
                refused: 0,
                bytes_in: 10,
                bytes_out: 20,
                ended: EndedBy::Quit,
            },
        );
        let line = String::from_utf8(out).unwrap_or_default();
        // The same instant as the lines before, another kind: its own start.
        assert!(
            line.starts_with(
                "2026-11-30T00:53:20.123456Z  INFO smtpgw::session: connection closed session=3 "
            ),
            "{line}"
        );
        assert!(line.ends_with("ms=5 accepted=1 refused=0 bytes_in=10 bytes_out=20 ended=quit\n"));
    }

    #[test]
    fn every_field_survives_the_encoding() {
        let client = std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap_or_else(|_| unreachable!()),
            25,
            0,
            3,
        );
        let mut p = PendingLine::default();
        p.begin(
            u64::MAX,
            ulid::Ulid::from_parts(5, 6),
            SocketAddr::V6(client),
            Some("TLSv1.3"),
            &Arc::from("h.example"),
            Some(&Arc::from("alice")),
            "f@x",
            None,
            ["a@x", "", "b@x"].into_iter(),
            123_456_789,
            true,
        );
        let mut batch = p
            .finish(
                552,
                77,
                "spool-fallback",
                Some((3, 1_234_567_890_123)),
                Some(&"too large"),
            )
            .to_vec();
        let first = batch.len();
        batch.extend_from_slice(&message_bytes());
        let (m, rest) = MessageLine::decode(&batch).unwrap_or_else(|| panic!("not a line"));
        assert_eq!((m.session, m.id), (u64::MAX, ulid::Ulid::from_parts(5, 6)));
        assert_eq!(m.client().to_string(), "[fe80::1%3]:25");
        assert_eq!(
            (m.tls, m.helo, m.from),
            (&b"TLSv1.3"[..], &b"h.example"[..], &b"f@x"[..])
        );
        assert_eq!((m.auth, m.message_id), (Some(&b"alice"[..]), None));
        assert_eq!(m.rcpt_count, 3);
        assert_eq!(m.rcpts().collect::<Vec<_>>(), [&b"a@x"[..], &b"b@x"[..]]);
        assert_eq!((m.size, m.code, m.ms), (123_456_789, 552, 77));
        assert_eq!(m.sink, b"spool-fallback");
        assert_eq!(m.kafka, Some((3, 1_234_567_890_123)));
        assert_eq!(m.error, Some(&b"too large"[..]));
        // The next line of the batch follows; a cut one is not read.
        assert_eq!(decoded(rest).session, 7);
        assert!(MessageLine::decode(&batch[..first - 1]).is_none());
        assert!(MessageLine::decode(&batch[first..batch.len() - 1]).is_none());
    }
}
