//! Where accepted messages go, and how the answer finds its way back to the session.
//!
//! A reactor submits a sealed message together with a [`Completion`]; the sink answers
//! exactly once, from whatever thread it likes, when the message is durable or has
//! failed. The answer goes to the reactor's [`CompletionQueue`] with the connection's
//! [`Ticket`] and wakes the reactor; only then does the session say `250` (or `451`).

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::mpsc::UnboundedSender;

use record::SealedMessage;

pub mod fallback;
pub mod forward;
pub mod kafka;
pub mod null;
pub mod record;
pub mod spool;

#[cfg(any(test, feature = "testing"))]
pub use crate::completion::{auth_completion, Wake};
pub use crate::completion::{Answer, CompletionQueue, Ticket};
pub use crate::smtp::envelope::{PublishError, PublishResult, StoredIn};

/// The way back from a sink to the one connection that waits for its answer.
#[derive(Debug)]
pub struct Completion(Route, StoredIn);

enum Route {
    /// A reactor's connection: the answer goes to its reactor's queue.
    Ticket(Arc<CompletionQueue>, Ticket),
    /// A caller that waits on a channel of its own (tools and tests).
    Channel(UnboundedSender<PublishResult>),
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Ticket(_, t) => f.debug_tuple("Ticket").field(t).finish(),
            Route::Channel(_) => f.write_str("Channel"),
        }
    }
}

impl Completion {
    /// For a caller that waits for the answer on a channel (tools, tests).
    pub fn new(tx: UnboundedSender<PublishResult>) -> Self {
        Completion(Route::Channel(tx), StoredIn::Sink)
    }

    /// For a reactor: the answer is queued for `ticket` and the reactor woken.
    pub fn ticket(queue: Arc<CompletionQueue>, ticket: Ticket) -> Self {
        Completion(Route::Ticket(queue, ticket), StoredIn::Sink)
    }

    /// The same way back, for a message handed on to the fallback spool: its answer
    /// says it was stored there.
    pub fn into_fallback(self) -> Self {
        Completion(self.0, StoredIn::Fallback)
    }

    /// The same way back, saying where the broker put the record.
    pub fn at_kafka(self, partition: i32, offset: i64) -> Self {
        Completion(self.0, StoredIn::Kafka { partition, offset })
    }

    /// Delivers the answer. A connection that has gone away no longer listens; its
    /// client got no 250 and will send the message again, which is the SMTP contract.
    pub fn complete(self, result: PublishResult) {
        match self.0 {
            Route::Ticket(queue, ticket) => queue.push(ticket, Answer::Publish(result, self.1)),
            Route::Channel(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// Takes the thread out of `slot` (so a second shutdown finds nothing to join) and
/// joins it; a panic is logged with `what` rather than passed on, since shutdown must
/// go on to drain the rest of the sink whatever one of its threads did.
pub(crate) fn join_logged(slot: &Mutex<Option<JoinHandle<()>>>, what: &str) {
    let handle = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(handle) = handle {
        join_handle_logged(handle, what);
    }
}

/// [`join_logged`] for a handle already taken.
pub(crate) fn join_handle_logged(handle: JoinHandle<()>, what: &str) {
    if handle.join().is_err() {
        tracing::error!("{what} thread panicked");
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
    /// Messages (and value bytes) waiting in the sink for room in the client's queue.
    pub waiting_messages: u64,
    pub waiting_bytes: u64,
    /// Average request round trip per broker (`host:port/id`), in seconds.
    pub broker_rtt: Vec<(String, f64)>,
    /// Store-and-forward (`--spool-fallback`) figures, when that is on.
    pub forward: Option<ForwardStats>,
    /// The cluster's limit for the topic at its last reading (Kafka sink), if known.
    pub topic_max_message_bytes: Option<u64>,
    /// The topic fell below what `--max-message-size` needs (no `auto`): messages
    /// too large for it get 451.
    pub topic_too_small: bool,
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
    /// Records forwarded since start-up that had been handed to Kafka before (by the
    /// run before a restart, or before the watchdog restarted a stalled forwarder):
    /// possible duplicates in the topic.
    pub redelivered_records: u64,
    /// Times the watchdog restarted a stalled forwarder.
    pub restarts: u64,
    /// Session messages go to the fallback spool now (Kafka could not take the latest).
    pub fallback_active: bool,
    /// Why this start found the forward cursor damaged, if it did.
    pub cursor_reset: Option<forward::CursorReset>,
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
    /// Corrupt ranges found since start-up (recovery of the newest segment and the
    /// verification of the older ones), each logged at `error`.
    pub corrupt_ranges: u64,
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
    /// configured for. Reactors then stop reading from sessions in DATA/BDAT, so a slow
    /// sink pushes back on clients through TCP instead of growing memory (commands are
    /// still answered). A reactor looks again when one of its messages is answered, so
    /// the count must drop before the answer is sent. Asked whenever a body could be
    /// read: keep it cheap.
    fn over_inflight_limit(&self) -> bool {
        false
    }

    /// The largest `SealedMessage::value` (the `Received:` line included) the sink can
    /// store, if it has a limit. The server advertises SIZE no larger than this less
    /// the trace line's room.
    fn max_message_value(&self) -> Option<usize> {
        None
    }

    /// Calls `on_change` (from a thread of the sink's) each time
    /// [`Sink::max_message_value`] changes while running: the Kafka sink with
    /// `--max-message-size auto` when the topic's limit changed.
    fn watch_size(&self, on_change: Box<dyn Fn() + Send + Sync>) {
        drop(on_change);
    }

    /// The client library's latest statistics, if it keeps any.
    fn stats(&self) -> Option<SinkStats> {
        None
    }

    /// The local spool's size and age, if the sink writes one.
    fn spool_stats(&self) -> Option<SpoolStats> {
        None
    }

    /// Why the sink, though healthy, runs without a part of itself (`/readyz` says so
    /// beside its 200): the Kafka sink's spool fallback that cannot store.
    fn degraded(&self) -> Option<String> {
        None
    }
}
