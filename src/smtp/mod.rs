//! The sans-IO SMTP protocol core: bytes in, replies and completed messages out.
//!
//! Nothing in here touches a socket, a clock or a thread, so the same code serves the
//! io_uring and epoll reactors, the unit and property tests, the fuzzers and the benches.

pub mod address;
pub mod auth;
pub mod command;
pub mod data;
pub mod dsn;
pub mod envelope;
pub mod headers;
pub mod refusal;
pub mod reply;
pub mod session;
pub mod stats;

#[cfg(any(test, feature = "testing"))]
pub use address::AcceptDomains;
pub use data::BareLfPolicy;
#[cfg(any(test, feature = "testing"))]
pub use envelope::{Envelope, Message};
pub use envelope::{MessageId, PublishError, PublishResult, StoredIn};
pub use refusal::Refusal;
#[cfg(any(test, feature = "testing"))]
pub use session::Unlimited;
pub use session::{Gate, Session, SessionConfig, SessionEvent, SessionPolicy};
pub use stats::SessionStats;

/// What the protocol core's tests and the connection driver's share, so that neither
/// names the sink layer's record (`sink::record`), which sits above both (its tests use
/// these too).
#[cfg(test)]
pub(crate) mod test_support {
    /// Room left in front of each body: what production leaves for the sink layer's
    /// `Received:` line (`sink::record::RECEIVED_HEADROOM`, 1,200 bytes, plus the
    /// hostname, `mx.test` here), so that bodies are laid out as they are in production.
    /// What is written there is the record's concern and is tested with it.
    pub const HEADROOM: usize = 1200 + "mx.test".len();

    /// A session with DSN parameters (RFC 3461) on MAIL and on some of its RCPTs, then a
    /// transaction without any: the session's tests check the envelopes it gives for
    /// every split of its reads, the record's (`sink::record`) the headers made of them.
    pub const DSN_SESSION: &str = "EHLO c.test\r\n\
        MAIL FROM:<a@x.test> RET=HDRS ENVID=abc+2Bdef\r\n\
        RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40x.example\r\n\
        RCPT TO:<c@example.com>\r\n\
        RCPT TO:<d@example.com> NOTIFY=never\r\n\
        DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n\
        MAIL FROM:<>\r\nRCPT TO:<e@example.com>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n";
}
