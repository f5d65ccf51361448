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
    /// Write everything before this, then signal the sender (at exit).
    Flush(crossbeam_channel::Sender<()>),
}

/// A message's transaction line: from its hand-off to the sink to the sink's answer.
/// The client's text (HELO, sender, recipients, Message-ID) is in one buffer, so the
/// line costs the reactor a single allocation.
pub struct MessageLine {
    pub session: u64,
    pub id: MessageId,
    pub client: SocketAddr,
    pub tls: Option<&'static str>,
    /// helo, from, message-id, then each recipient, each ended by NUL (no address can
    /// carry a NUL; a Message-ID's NULs are cut off when it is copied).
    text: Vec<u8>,
    pub has_message_id: bool,
    pub rcpt_count: usize,
    pub size: usize,
    pub code: u16,
    pub ms: u64,
    pub sink: &'static str,
    pub error: Option<String>,
    /// The user the session authenticated as (SMTP AUTH), if it did.
    pub auth: Option<std::sync::Arc<str>>,
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
        let mut text = Vec::with_capacity(
            helo.len() + from.len() + message_id.map_or(0, <[u8]>::len) + 8 + 32 * rcpt_count,
        );
        text.extend_from_slice(helo.as_bytes());
        text.push(0);
        text.extend_from_slice(from.as_bytes());
        text.push(0);
        if let Some(m) = message_id {
            text.extend(m.iter().copied().filter(|&b| b != 0));
        }
        text.push(0);
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
            has_message_id: message_id.is_some(),
            rcpt_count,
            size,
            code: 0,
            ms: 0,
            sink,
            error: None,
            auth: None,
        }
    }

    fn part(&self, n: usize) -> &[u8] {
        self.text.split(|&b| b == 0).nth(n).unwrap_or_default()
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

    /// The recipients, when they were copied (not with `--log-recipients count`).
    pub fn rcpts(&self) -> impl Iterator<Item = &[u8]> {
        let mut parts = self.text.split(|&b| b == 0).skip(3);
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
