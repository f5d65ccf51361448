//! The SMTP state machine (API skeleton; the implementation lands next).

use std::net::SocketAddr;
use std::sync::Arc;

use super::data::BareLfPolicy;
use super::envelope::Message;
use crate::sink::PublishResult;

/// Per-listener settings every session of that listener shares.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Our name: the greeting, EHLO reply and `Received:` lines use it.
    pub hostname: String,
    /// Recipient domains we take mail for, lower-case. Everything else gets `550 5.7.1`.
    pub accept_domains: Vec<String>,
    /// Largest message body in octets, after dot-unstuffing. Advertised as SIZE.
    pub max_message_size: usize,
    /// More recipients than this get `452 4.5.3`.
    pub max_recipients: usize,
    pub bare_lf: BareLfPolicy,
}

/// One SMTP conversation, from greeting to close.
///
/// The caller owns the socket: it hands received bytes to [`Session::feed`], writes out
/// [`Session::output`], and when [`Session::take_message`] yields a message, stores it
/// and reports back with [`Session::publish_result`]. Until then the session consumes no
/// further input, which keeps pipelined replies in order (RFC 2920).
pub struct Session {
    _config: Arc<SessionConfig>,
    out: Vec<u8>,
}

impl Session {
    /// A new session; its `220` greeting is already in the output.
    pub fn new(config: Arc<SessionConfig>, client_addr: SocketAddr) -> Self {
        let _ = client_addr;
        Session {
            _config: config,
            out: Vec::new(),
        }
    }

    /// Processes as much of `input` as it can and returns how many bytes it consumed.
    /// The caller keeps the rest (an incomplete line) and offers it again with more bytes
    /// appended. Stops early while a message awaits its publish result or once closed.
    pub fn feed(&mut self, input: &[u8]) -> usize {
        let _ = input;
        unimplemented!()
    }

    /// The message just completed, if any. The session then awaits [`Self::publish_result`].
    pub fn take_message(&mut self) -> Option<Message> {
        unimplemented!()
    }

    /// The sink's answer for the message taken last: `250 2.0.0 Ok: queued as <id>`,
    /// `451 4.3.0` or `552 5.3.4`.
    pub fn publish_result(&mut self, result: PublishResult) {
        let _ = result;
        unimplemented!()
    }

    /// Replies not yet written to the client.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// The caller wrote the first `n` bytes of [`Self::output`].
    pub fn advance_output(&mut self, n: usize) {
        self.out.drain(..n);
    }

    /// After QUIT, a timeout or a shutdown reply: write the output, then close.
    pub fn is_closed(&self) -> bool {
        unimplemented!()
    }

    /// A message is with the sink and the session waits for its answer.
    pub fn is_awaiting_publish(&self) -> bool {
        unimplemented!()
    }

    /// Between commands: no DATA or BDAT body under way, no message with the sink.
    /// (The caller also knows whether it holds a partial command line.)
    pub fn is_between_commands(&self) -> bool {
        unimplemented!()
    }

    /// The client was silent too long: `421 4.4.2`, then close.
    pub fn timed_out(&mut self) {
        unimplemented!()
    }

    /// The server is draining: from now on every command gets `421 4.3.2` and the
    /// session closes. A message already with the sink still gets its answer.
    pub fn begin_drain(&mut self) {
        unimplemented!()
    }

    /// Drain reached a session between commands: `421 4.3.2` now, then close.
    pub fn shut_down_now(&mut self) {
        unimplemented!()
    }
}
