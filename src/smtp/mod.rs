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
