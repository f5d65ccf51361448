//! The envelope of one mail transaction and the message it carries, from the moment
//! the session completes it to the moment the sink layer makes a record of it (the
//! record's layout, trace line and headers, is `sink::record`'s).
//!
//! Envelope strings live in one arena per transaction so that MAIL and RCPT copy their
//! addresses without an allocation per command.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use std::borrow::Cow;

use bytes::{Buf, Bytes, BytesMut};

use super::dsn::{Notify, Ret};

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
/// Its buffer starts with `headroom` unused bytes (`SessionConfig::headroom`) so that
/// [`Message::prepend`] can put the `Received:` trace line in front of the body without
/// copying the body.
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

    /// The body with `line` in front of it (the sink layer's trace line), written into
    /// the headroom when it fits so that the body is not copied; the value of a record
    /// (`sink::record`).
    pub fn prepend(mut self, line: &[u8]) -> (Envelope, Bytes) {
        let value = if line.len() <= self.headroom {
            let start = self.headroom - line.len();
            self.buf[start..self.headroom].copy_from_slice(line);
            self.buf.advance(start);
            self.buf.freeze()
        } else {
            let mut v = BytesMut::with_capacity(line.len() + self.buf.len() - self.headroom);
            v.extend_from_slice(line);
            v.extend_from_slice(self.body());
            v.freeze()
        };
        (self.envelope, value)
    }
}
