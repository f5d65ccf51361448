//! What a reactor hands the log writer: the fields of a line, copied out of the
//! connection, never a formatted line. Formatting happens on the writer thread.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::Level;

use crate::smtp::{MessageId, Refusal};

/// Targets, so a filter such as `info,smtpgw::message=warn` can pick lines by kind.
pub const TARGET_MESSAGE: &str = "smtpgw::message";
pub const TARGET_REFUSAL: &str = "smtpgw::refusal";
pub const TARGET_SESSION: &str = "smtpgw::session";

/// One line's worth of fields.
pub enum Event {
    Refusal(RefusalLine),
    Closed(ClosedLine),
    /// A `tracing` event from anywhere else in the gateway.
    Trace(TraceLine),
    /// A reactor's lines since its last hand-over ([`super::flush_this_thread`]).
    Batch(Batch),
    /// Write everything before this, then signal the sender (at exit).
    Flush(crossbeam_channel::Sender<()>),
}

/// A reactor's lines in the order it logged them: transaction lines encoded in `bytes`
/// ([`PendingLine`]), each other line a [`TAG_EVENT`] byte there standing for the next
/// of `events`. The batch goes to the writer whole (one queue operation for many lines)
/// and comes back emptied for reuse, so its buffers never move between threads' heaps.
#[derive(Default)]
pub struct Batch {
    pub(super) bytes: Vec<u8>,
    pub(super) events: Vec<Event>,
    /// Lines in the batch, as the queue counts them (and the dropped-lines counter).
    pub(super) lines: usize,
}

/// In a [`Batch`]'s bytes: the next line is the next of its events...
pub(super) const TAG_EVENT: u8 = 1;
/// ...or a transaction line encoded by [`PendingLine`].
const TAG_MESSAGE: u8 = 2;

/// The fixed part of an encoded transaction line: the tag, the length of what follows
/// the first five bytes, then the fields of fixed size at fixed offsets, then the
/// lengths of the texts that follow (in the order of [`Text`]).
const HEADER: usize = AT_LENGTHS + 4 * TEXTS;
const AT_SESSION: usize = 5;
const AT_ID: usize = 13;
const AT_FAMILY: usize = 29;
const AT_IP: usize = 30;
const AT_PORT: usize = 46;
const AT_SCOPE: usize = 48;
const AT_SIZE: usize = 52;
const AT_RCPT_COUNT: usize = 60;
const AT_CODE: usize = 64;
const AT_FLAGS: usize = 66;
const AT_MS: usize = 67;
const AT_PARTITION: usize = 75;
const AT_OFFSET: usize = 79;
const AT_FIXED: usize = 87;
const AT_LENGTHS: usize = 91;

/// The texts after the header, in order; each is absent (length 0) unless its flag
/// says otherwise.
#[derive(Clone, Copy)]
enum Text {
    Tls,
    Helo,
    Auth,
    From,
    MessageId,
    Rcpts,
    Sink,
    Error,
}
const TEXTS: usize = 8;

impl Text {
    const fn at(self) -> usize {
        AT_LENGTHS + 4 * self as usize
    }
}
/// [`AT_FLAGS`] bits: which optional fields follow.
const HAS_AUTH: u8 = 1;
const HAS_MESSAGE_ID: u8 = 2;
const HAS_RCPTS: u8 = 4;
const HAS_KAFKA: u8 = 8;
const HAS_ERROR: u8 = 16;

/// A message's transaction line in the making, encoded into a buffer the connection
/// keeps for all its messages (one in flight at a time): [`Self::begin`] when the
/// message goes to the sink (the envelope goes with it), [`Self::finish`] when the sink
/// answers. The finished line is copied into the reactor's [`Batch`] in one piece
/// ([`super::submit_message`]); the writer formats it from there ([`MessageLine`]).
///
/// After the fixed [`HEADER`], which holds their lengths: the TLS version, the HELO,
/// the user if authenticated, the sender, the Message-ID if any, the recipients if
/// listed (each with its length, four bytes little-endian), the sink and the error if
/// any. So a line is a handful of copies to encode and a handful of slices to read.
///
/// The client, TLS version, HELO and user (the line's fixed part) are the same for
/// most of a connection's messages: the line carries a version of them that changes
/// whenever they do ([`MessageLine::fixed`]), so the writer formats them once per
/// version and copies that text for the connection's other lines.
#[derive(Default)]
pub struct PendingLine {
    buf: Vec<u8>,
    /// The fixed part's version; 0 before the first line.
    fixed: u32,
    /// What the fixed part was made from.
    last_client: Option<SocketAddr>,
    last_tls: Option<&'static str>,
    last_helo: Option<Arc<str>>,
    last_auth: Option<Arc<str>>,
}

/// A text's length as stored (client text is bounded far below 4 GiB by the line and
/// header limits; anything longer would be cut).
#[inline(always)]
fn clamp(v: &[u8]) -> &[u8] {
    &v[..v.len().min(u32::MAX as usize)]
}

#[inline(always)]
fn put_len(head: &mut [u8], text: Text, len: usize) {
    let at = text.at();
    head[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
}

impl PendingLine {
    /// Encodes the fields known when the message goes to the sink.
    #[allow(clippy::too_many_arguments)]
    pub fn begin<'a>(
        &mut self,
        session: u64,
        id: MessageId,
        client: SocketAddr,
        tls: Option<&'static str>,
        helo: &Arc<str>,
        auth: Option<&Arc<str>>,
        from: &str,
        message_id: Option<&[u8]>,
        rcpts: impl ExactSizeIterator<Item = &'a str>,
        size: usize,
        with_rcpts: bool,
    ) {
        let (tls_given, helo_given, auth_given) = (tls, helo, auth);
        let tls = clamp(tls.unwrap_or("none").as_bytes());
        let helo = clamp(helo.as_bytes());
        let auth = auth.map(|a| clamp(a.as_bytes()));
        let from = clamp(from.as_bytes());
        let message_id = message_id.map(clamp);
        // The header is written in place: the buffer's first bytes, zeroed.
        let buf = &mut self.buf;
        buf.clear();
        buf.resize(HEADER, 0);
        let Some(head) = buf.first_chunk_mut::<HEADER>() else {
            return;
        };
        head[0] = TAG_MESSAGE;
        head[AT_SESSION..AT_SESSION + 8].copy_from_slice(&session.to_le_bytes());
        head[AT_ID..AT_ID + 16].copy_from_slice(&id.0.to_le_bytes());
        match client {
            SocketAddr::V4(a) => {
                head[AT_FAMILY] = 4;
                head[AT_IP..AT_IP + 4].copy_from_slice(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                head[AT_FAMILY] = 6;
                head[AT_IP..AT_IP + 16].copy_from_slice(&a.ip().octets());
                head[AT_SCOPE..AT_SCOPE + 4].copy_from_slice(&a.scope_id().to_le_bytes());
            }
        }
        head[AT_PORT..AT_PORT + 2].copy_from_slice(&client.port().to_le_bytes());
        head[AT_SIZE..AT_SIZE + 8].copy_from_slice(&(size as u64).to_le_bytes());
        let rcpt_count = u32::try_from(rcpts.len()).unwrap_or(u32::MAX);
        head[AT_RCPT_COUNT..AT_RCPT_COUNT + 4].copy_from_slice(&rcpt_count.to_le_bytes());
        let mut flags = 0;
        if auth.is_some() {
            flags |= HAS_AUTH;
        }
        if message_id.is_some() {
            flags |= HAS_MESSAGE_ID;
        }
        if with_rcpts {
            flags |= HAS_RCPTS;
        }
        head[AT_FLAGS] = flags;
        put_len(head, Text::Tls, tls.len());
        put_len(head, Text::Helo, helo.len());
        put_len(head, Text::Auth, auth.map_or(0, <[u8]>::len));
        put_len(head, Text::From, from.len());
        put_len(head, Text::MessageId, message_id.map_or(0, <[u8]>::len));
        // The same client, TLS version and the very same HELO and user texts (shared
        // with the session, held here so that their memory is not reused for others)
        // as the last line's: the same fixed part. Anything else, even the same words
        // sent again, counts as a change: a new version only costs the writer one
        // formatting, where comparing the texts cost more than that per message.
        let same = self.fixed != 0
            && self.last_client == Some(client)
            && self.last_tls.map(str::as_ptr) == tls_given.map(str::as_ptr)
            && self.last_tls.map(str::len) == tls_given.map(str::len)
            && self
                .last_helo
                .as_ref()
                .is_some_and(|h| Arc::ptr_eq(h, helo_given))
            && match (&self.last_auth, auth_given) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
        if !same {
            self.fixed = self.fixed.wrapping_add(1).max(1);
            self.last_client = Some(client);
            self.last_tls = tls_given;
            self.last_helo = Some(helo_given.clone());
            self.last_auth = auth_given.cloned();
        }
        head[AT_FIXED..AT_FIXED + 4].copy_from_slice(&self.fixed.to_le_bytes());
        buf.extend_from_slice(tls);
        buf.extend_from_slice(helo);
        buf.extend_from_slice(auth.unwrap_or_default());
        buf.extend_from_slice(from);
        buf.extend_from_slice(message_id.unwrap_or_default());
        if with_rcpts {
            // Each recipient with its length (four bytes, little-endian).
            let at = buf.len();
            for r in rcpts {
                let r = clamp(r.as_bytes());
                buf.extend_from_slice(&(r.len() as u32).to_le_bytes());
                buf.extend_from_slice(r);
            }
            let n = buf.len() - at;
            put_len(buf, Text::Rcpts, n);
        }
    }

    /// Adds the sink's answer; the line is then complete (empty if [`Self::begin`] was
    /// not called), and stays so until the next `begin`.
    pub fn finish(
        &mut self,
        code: u16,
        ms: u64,
        sink: &str,
        kafka: Option<(i32, i64)>,
        error: Option<&dyn std::fmt::Display>,
    ) -> &[u8] {
        let buf = &mut self.buf;
        if buf.len() < HEADER {
            buf.clear();
            return buf;
        }
        buf[AT_CODE..AT_CODE + 2].copy_from_slice(&code.to_le_bytes());
        buf[AT_MS..AT_MS + 8].copy_from_slice(&ms.to_le_bytes());
        if let Some((partition, offset)) = kafka {
            buf[AT_FLAGS] |= HAS_KAFKA;
            buf[AT_PARTITION..AT_PARTITION + 4].copy_from_slice(&partition.to_le_bytes());
            buf[AT_OFFSET..AT_OFFSET + 8].copy_from_slice(&offset.to_le_bytes());
        }
        let sink = clamp(sink.as_bytes());
        put_len(buf, Text::Sink, sink.len());
        buf.extend_from_slice(sink);
        if let Some(e) = error {
            use std::io::Write;
            buf[AT_FLAGS] |= HAS_ERROR;
            let at = buf.len();
            let _ = write!(buf, "{e}");
            let n = (buf.len() - at).min(u32::MAX as usize);
            put_len(buf, Text::Error, n);
        }
        let n = u32::try_from(buf.len() - 5).unwrap_or(u32::MAX);
        buf[1..5].copy_from_slice(&n.to_le_bytes());
        buf
    }
}

/// Reads an encoded line's variable part.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    #[inline(always)]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (v, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(v)
    }

    #[inline(always)]
    fn text(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        self.take(n as usize)
    }
}

#[inline(always)]
fn le<const N: usize>(h: &[u8; HEADER], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&h[at..at + N]);
    a
}

/// A transaction line's fields, read on the writer thread from the bytes
/// [`PendingLine`] encoded.
pub struct MessageLine<'a> {
    pub session: u64,
    /// The version of the fixed part (client, TLS, HELO, user) within the session:
    /// two lines of one session with the same version have the same fixed part.
    pub fixed: u32,
    pub id: MessageId,
    /// The header, for the client address ([`Self::client`]): read only when the
    /// fixed part is formatted, not for every line.
    head: &'a [u8; HEADER],
    pub tls: &'a [u8],
    pub helo: &'a [u8],
    /// The user the session authenticated as (SMTP AUTH), if it did.
    pub auth: Option<&'a [u8]>,
    pub from: &'a [u8],
    pub message_id: Option<&'a [u8]>,
    /// Each with its length, when they were copied (not with `--log-recipients count`).
    rcpts: Option<&'a [u8]>,
    pub rcpt_count: u32,
    pub size: u64,
    pub code: u16,
    pub ms: u64,
    pub sink: &'a [u8],
    /// The partition and offset the Kafka record got.
    pub kafka: Option<(i32, i64)>,
    pub error: Option<&'a [u8]>,
}

impl<'a> MessageLine<'a> {
    /// The line `bytes` starts with ([`TAG_MESSAGE`] and all), and what follows it;
    /// `None` if they do not start with a whole one. Inlined into the writer's loop: a
    /// call returned the fields (about 170 bytes) through memory and copied them again.
    #[inline(always)]
    pub(super) fn decode(bytes: &'a [u8]) -> Option<(MessageLine<'a>, &'a [u8])> {
        let h: &[u8; HEADER] = bytes.get(..HEADER)?.try_into().ok()?;
        if h[0] != TAG_MESSAGE {
            return None;
        }
        let len = u32::from_le_bytes(le(h, 1)) as usize;
        let line = bytes.get(HEADER..len.checked_add(5)?)?;
        let rest = bytes.get(len + 5..)?;
        let flags = h[AT_FLAGS];
        let mut r = Reader(line);
        let mut next = |text: Text| r.take(u32::from_le_bytes(le(h, text.at())) as usize);
        let tls = next(Text::Tls)?;
        let helo = next(Text::Helo)?;
        let auth = next(Text::Auth)?;
        let from = next(Text::From)?;
        let message_id = next(Text::MessageId)?;
        let rcpts = next(Text::Rcpts)?;
        let sink = next(Text::Sink)?;
        let error = next(Text::Error)?;
        let given = |flag: u8, v: &'a [u8]| (flags & flag != 0).then_some(v);
        let (auth, message_id) = (given(HAS_AUTH, auth), given(HAS_MESSAGE_ID, message_id));
        let (rcpts, error) = (given(HAS_RCPTS, rcpts), given(HAS_ERROR, error));
        let kafka = (flags & HAS_KAFKA != 0).then(|| {
            (
                i32::from_le_bytes(le(h, AT_PARTITION)),
                i64::from_le_bytes(le(h, AT_OFFSET)),
            )
        });
        let m = MessageLine {
            session: u64::from_le_bytes(le(h, AT_SESSION)),
            fixed: u32::from_le_bytes(le(h, AT_FIXED)),
            id: ulid::Ulid(u128::from_le_bytes(le(h, AT_ID))),
            head: h,
            tls,
            helo,
            auth,
            from,
            message_id,
            rcpts,
            rcpt_count: u32::from_le_bytes(le(h, AT_RCPT_COUNT)),
            size: u64::from_le_bytes(le(h, AT_SIZE)),
            code: u16::from_le_bytes(le(h, AT_CODE)),
            ms: u64::from_le_bytes(le(h, AT_MS)),
            sink,
            kafka,
            error,
        };
        Some((m, rest))
    }

    /// The client's address and port.
    pub fn client(&self) -> SocketAddr {
        let h = self.head;
        let port = u16::from_le_bytes(le(h, AT_PORT));
        if h[AT_FAMILY] == 4 {
            SocketAddr::from((le::<4>(h, AT_IP), port))
        } else {
            let ip = std::net::Ipv6Addr::from(le::<16>(h, AT_IP));
            let scope = u32::from_le_bytes(le(h, AT_SCOPE));
            SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, scope))
        }
    }

    /// The recipient, when there is exactly one and it was copied.
    pub fn only_rcpt(&self) -> Option<&'a [u8]> {
        if self.rcpt_count != 1 {
            return None;
        }
        let mut r = Reader(self.rcpts?);
        r.text().filter(|v| !v.is_empty())
    }

    /// The recipients, when they were copied (not with `--log-recipients count`).
    pub fn rcpts(&self) -> impl Iterator<Item = &'a [u8]> {
        let mut r = Reader(self.rcpts.unwrap_or_default());
        std::iter::from_fn(move || r.text()).filter(|v| !v.is_empty())
    }
}

/// A refusal: a `4xx`/`5xx` or a close for a reason of the gateway's own.
pub struct RefusalLine {
    pub session: u64,
    pub client: SocketAddr,
    pub refusal: Refusal,
    pub verb: &'static str,
    pub address: Option<Box<str>>,
    /// A sink's reason, or a TLS failure's kind.
    pub detail: Option<Box<str>>,
    /// For AUTH, the user name the client gave.
    pub user: Option<Box<str>>,
}

/// How a connection ended, for its last line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndedBy {
    Quit,
    ClientClosed,
    Timeout,
    Limit,
    Drain,
    Refused,
    Error,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Quit => "quit",
            EndedBy::ClientClosed => "client_closed",
            EndedBy::Timeout => "timeout",
            EndedBy::Limit => "limit",
            EndedBy::Drain => "drain",
            EndedBy::Refused => "refused",
            EndedBy::Error => "error",
        }
    }
}

/// A connection's last line.
pub struct ClosedLine {
    pub session: u64,
    pub client: SocketAddr,
    pub ms: u64,
    pub accepted: u64,
    pub refused: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub ended: EndedBy,
}

/// A value of a `tracing` event's field.
pub enum Value {
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
}

pub struct TraceLine {
    pub level: Level,
    pub target: &'static str,
    pub message: String,
    pub fields: Vec<(&'static str, Value)>,
}
