//! Where accepted messages go, and how the answer finds its way back to the session.
//!
//! A reactor submits a sealed message together with a [`Completion`]; the sink answers
//! exactly once, from whatever thread it likes, when the message is durable or has
//! failed. Only then does the session say `250` (or `451`).

use std::borrow::Cow;

use tokio::sync::mpsc::UnboundedSender;

use crate::smtp::envelope::{MessageId, SealedMessage};

pub mod forward;
pub mod kafka;
pub mod null;
pub mod spool;

/// Why a sink could not store a message. Both are the gateway's trouble or a limit,
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

/// The way back from a sink to the one connection that waits for its answer.
///
/// The channel belongs to the connection and is reused for all its messages, so a
/// message costs no allocation here.
#[derive(Debug)]
pub struct Completion(UnboundedSender<PublishResult>);

impl Completion {
    pub fn new(tx: UnboundedSender<PublishResult>) -> Self {
        Completion(tx)
    }

    /// Delivers the answer. A connection that has gone away no longer listens; its
    /// client got no 250 and will send the message again, which is the SMTP contract.
    pub fn complete(self, result: PublishResult) {
        let _ = self.0.send(result);
    }
}

/// What a sink's client library reports about itself (librdkafka's statistics), for
/// the metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SinkStats {
    /// Messages waiting in the client's queue or in flight to a broker.
    pub queue_messages: u64,
    /// Their size in bytes.
    pub queue_bytes: u64,
    /// Average request round trip per broker (`host:port/id`), in seconds.
    pub broker_rtt: Vec<(String, f64)>,
    /// Store-and-forward (`--spool-fallback`) figures, when that is on.
    pub forward: Option<ForwardStats>,
}

/// What the store-and-forward thread reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardStats {
    /// Spooled records not yet acknowledged by Kafka, and their size on disk.
    pub awaiting_records: u64,
    pub awaiting_bytes: u64,
    /// Records (and value bytes) forwarded since start-up.
    pub forwarded_records: u64,
    pub forwarded_bytes: u64,
    /// Age of the oldest record not yet forwarded; 0 when none waits.
    pub oldest_age_seconds: f64,
}

/// The state of a local spool (the spool sink's, or a Kafka sink's fallback), for the
/// metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpoolStats {
    /// Total size of the segment files.
    pub bytes: u64,
    pub segments: u64,
    /// When the oldest stored record was received; `None` when the spool is empty.
    pub oldest_received_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Bytes available on the spool's file system, if the OS says.
    pub free_bytes: Option<u64>,
}

/// A destination for accepted messages.
pub trait Sink: Send + Sync + 'static {
    /// Takes ownership of a message; answers through `done` exactly once.
    fn submit(&self, msg: SealedMessage, done: Completion);

    /// Blocks until everything submitted so far has been answered, then stops the
    /// sink's threads. Later submissions are answered with a temporary failure.
    fn shutdown(&self);

    /// For logs and metrics: `spool`, `null`, `kafka`.
    fn name(&self) -> &'static str;

    /// Whether the sink can take messages now (for `/readyz`). A sink that says no
    /// still answers every submission, with a temporary failure.
    fn is_healthy(&self) -> bool {
        true
    }

    /// Like [`Sink::is_healthy`], with the reason when not (for `/readyz`); an empty
    /// reason when the sink gives none.
    fn health(&self) -> Result<(), Cow<'static, str>> {
        if self.is_healthy() {
            Ok(())
        } else {
            Err(Cow::Borrowed(""))
        }
    }

    /// True while the sink holds more unanswered messages (or bytes) than it was
    /// configured for. Reactors then stop reading from sessions in DATA, so a slow
    /// sink pushes back on clients through TCP instead of growing memory.
    fn over_inflight_limit(&self) -> bool {
        false
    }

    /// The largest `SealedMessage::value` (the `Received:` line included) the sink can
    /// store, if it has a limit. The server advertises SIZE no larger than this less
    /// the trace line's room.
    fn max_message_value(&self) -> Option<usize> {
        None
    }

    /// The client library's latest statistics, if it keeps any.
    fn stats(&self) -> Option<SinkStats> {
        None
    }

    /// The local spool's size and age, if the sink writes one.
    fn spool_stats(&self) -> Option<SpoolStats> {
        None
    }
}
