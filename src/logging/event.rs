//! What a reactor hands the log writer: the fields of a line, copied out of the
//! connection, never a formatted line. Formatting happens on the writer thread.

use std::net::SocketAddr;

use tracing::Level;

use crate::smtp::{MessageId, Refusal};

/// Targets, so a filter such as `info,smtpgw::message=warn` can pick lines by kind.
pub const TARGET_MESSAGE: &str = "smtpgw::message";
pub const TARGET_REFUSAL: &str = "smtpgw::refusal";
pub const TARGET_SESSION: &str = "smtpgw::session";

/// One line's worth of fields.
pub enum Event {
    Message(MessageLine),
    Refusal(RefusalLine),
    Closed(ClosedLine),
    /// A `tracing` event from anywhere else in the gateway.
    Trace(TraceLine),
    /// A reactor's lines since its last hand-over ([`super::flush_this_thread`]), and
    /// an empty list the writer fills with their text buffers for the reactors to reuse.
    Batch(Vec<Event>, Vec<Vec<u8>>),
    /// Write everything before this, then signal the sender (at exit).
    Flush(crossbeam_channel::Sender<()>),
}

/// A message's transaction line: from its hand-off to the sink to the sink's answer.
/// The client's text (HELO, sender, Message-ID, recipients) is in one buffer, so the
/// line costs the reactor at most one allocation, and none once the writer has handed
/// buffers back ([`take_text`]).
pub struct MessageLine {
    pub session: u64,
    pub id: MessageId,
    pub client: SocketAddr,
    pub tls: Option<&'static str>,
    /// helo, from and message-id back to back (their ends in `ends`), then each
    /// recipient ended by NUL (no address can carry a NUL).
    text: Vec<u8>,
    ends: [u32; 3],
    pub has_message_id: bool,
    pub rcpt_count: usize,
    pub size: usize,
    pub code: u16,
    pub ms: u64,
    pub sink: &'static str,
    /// The partition and offset the Kafka record got.
    pub kafka: Option<(i32, i64)>,
    pub error: Option<String>,
    /// The user the session authenticated as (SMTP AUTH), if it did.
    pub auth: Option<std::sync::Arc<str>>,
}

/// Text buffers the writer has finished with, for the reactors to fill again: a line
/// then costs a reactor no allocation, and no buffer is freed on a thread other than
/// the one that allocated it (which glibc's allocator makes slow on both sides).
static SPARE_TEXT: std::sync::OnceLock<Spare> = std::sync::OnceLock::new();
/// Buffers kept for reuse at most, and the largest kept.
const SPARE_BUFFERS: usize = 4096;
const SPARE_CAPACITY: usize = 4096;

type Spare = (
    crossbeam_channel::Sender<Vec<u8>>,
    crossbeam_channel::Receiver<Vec<u8>>,
);

fn spare() -> &'static Spare {
    SPARE_TEXT.get_or_init(|| crossbeam_channel::bounded(SPARE_BUFFERS))
}

/// An empty buffer with room for `need` bytes, reused when the writer gave one back:
/// on a reactor from the buffers its batches brought back, elsewhere from the pool.
fn take_text(need: usize) -> Vec<u8> {
    if let Some(mut v) = super::local_text() {
        v.reserve(need);
        return v;
    }
    match spare().1.try_recv() {
        Ok(mut v) => {
            v.reserve(need);
            v
        }
        Err(_) => Vec::with_capacity(need.max(256)),
    }
}

impl Drop for MessageLine {
    /// The writer drops a line once it is formatted: its buffer goes back for reuse.
    fn drop(&mut self) {
        let mut text = std::mem::take(&mut self.text);
        if text.capacity() > 0 && text.capacity() <= SPARE_CAPACITY {
            text.clear();
            let _ = spare().0.try_send(text);
        }
    }
}

impl MessageLine {
    #[allow(clippy::too_many_arguments)]
    pub fn new<'a>(
        session: u64,
        id: MessageId,
        client: SocketAddr,
        tls: Option<&'static str>,
        helo: &str,
        from: &str,
        message_id: Option<&[u8]>,
        rcpts: impl ExactSizeIterator<Item = &'a str>,
        size: usize,
        sink: &'static str,
        with_rcpts: bool,
    ) -> MessageLine {
        let rcpt_count = rcpts.len();
        let mut text = take_text(
            helo.len() + from.len() + message_id.map_or(0, <[u8]>::len) + 32 * rcpt_count,
        );
        text.extend_from_slice(helo.as_bytes());
        let helo_end = text.len() as u32;
        text.extend_from_slice(from.as_bytes());
        let from_end = text.len() as u32;
        if let Some(m) = message_id {
            text.extend_from_slice(m);
        }
        let mid_end = text.len() as u32;
        if with_rcpts {
            for r in rcpts {
                text.extend_from_slice(r.as_bytes());
                text.push(0);
            }
        }
        MessageLine {
            session,
            id,
            client,
            tls,
            text,
            ends: [helo_end, from_end, mid_end],
            has_message_id: message_id.is_some(),
            rcpt_count,
            size,
            code: 0,
            ms: 0,
            sink,
            kafka: None,
            error: None,
            auth: None,
        }
    }

    /// The text buffer, emptied, for reuse (the writer, once the line is formatted).
    pub(super) fn take_text_buffer(&mut self) -> Vec<u8> {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        text
    }

    fn part(&self, n: usize) -> &[u8] {
        let start = if n == 0 { 0 } else { self.ends[n - 1] as usize };
        self.text
            .get(start..self.ends[n] as usize)
            .unwrap_or_default()
    }

    pub fn helo(&self) -> &[u8] {
        self.part(0)
    }

    pub fn from(&self) -> &[u8] {
        self.part(1)
    }

    pub fn message_id(&self) -> Option<&[u8]> {
        self.has_message_id.then(|| self.part(2))
    }

    /// The recipient, when there is exactly one and it was copied.
    pub fn only_rcpt(&self) -> Option<&[u8]> {
        if self.rcpt_count != 1 {
            return None;
        }
        let rest = self.text.get(self.ends[2] as usize..).unwrap_or_default();
        rest.strip_suffix(b"\0").filter(|r| !r.is_empty())
    }

    /// The recipients, when they were copied (not with `--log-recipients count`).
    pub fn rcpts(&self) -> impl Iterator<Item = &[u8]> {
        let rest = self.text.get(self.ends[2] as usize..).unwrap_or_default();
        let mut parts = rest.split(|&b| b == 0);
        // The buffer ends with a NUL, which leaves one empty piece at the end.
        std::iter::from_fn(move || parts.next().filter(|p| !p.is_empty()))
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
