//! The Kafka sink: publishes every accepted message to one topic with librdkafka and
//! answers the session only once the broker has acknowledged it with `acks=all`.
//!
//! It owns the producer (one [`ThreadedProducer`] shared by every reactor), the
//! mapping from delivery reports to [`crate::sink::PublishResult`]s, the readiness flag, the
//! in-flight counters used for backpressure, the replacement of a producer that hit a
//! fatal error, and the start-up size probe.
//!
//! # Record
//!
//! key = the message id (ULID, 26 characters), value = [`SealedMessage::value`] (the
//! `Received:` line followed by the message as received), headers exactly as
//! [`SealedMessage::for_each_header`] yields them (`smtp.rcpt_to` once per recipient),
//! timestamp = time of receipt. Partitioning is librdkafka's default (by key).
//!
//! # Answers
//!
//! | what happened                                  | answer                         |
//! |------------------------------------------------|--------------------------------|
//! | broker acknowledged (acks=all, idempotent)     | `Ok(id)` → `250`               |
//! | librdkafka refused it as too large             | `TooLarge` → `552 5.3.4`       |
//! | broker refused it as too large, over our SIZE  | `TooLarge` → `552 5.3.4`       |
//! | too large for the topic, within our SIZE       | `Temporary("kafka topic max.message.bytes below --max-message-size")`, never handed back |
//! | no broker reachable (fail fast, see below)     | `Temporary("kafka unavailable")` |
//! | no room in the producer's queue                | waits in the sink (see below)  |
//! | not acknowledged within `--publish-timeout`    | `Temporary("kafka publish timed out")` |
//! | no room within `--publish-timeout`             | `Temporary("kafka publish timed out")` |
//! | forwarder's record, producer queue full        | `Temporary("kafka queue full")` |
//! | producer hit a fatal error                     | `Temporary("kafka producer failed")` |
//! | any other delivery error                       | `Temporary("kafka publish failed")` |
//!
//! # Waiting for room
//!
//! librdkafka's queue takes a session's record only while the sink's gate has room:
//! librdkafka then holds at most `--max-inflight-messages` session records and
//! `--max-inflight-bytes` of their values (a larger record goes in alone). The reactors
//! stop reading bodies at the same counts, so what finds the gate full is the bodies
//! they were finishing; it waits in the sink, in the order it came, its body still
//! charged to the reactors' budget and to the in-flight counts. Each delivery report
//! of a session record frees its place and, when records wait, wakes the hand-over
//! thread, which sends the oldest ones while there is room (an event, no timer);
//! a record that has waited its whole `--publish-timeout` gets the timed-out answer
//! instead (`451`, or the fallback spool). Once sent, librdkafka's own timeout (the
//! same `--publish-timeout`) runs from the hand-over, so a record that waited is
//! answered within twice the timeout at worst. A record waiting while the sink
//! becomes unavailable gets `Temporary("kafka unavailable")` at its turn, as a new one
//! would; shutdown answers what still waits with `Temporary("kafka sink is shut down")`
//! before it drains the producer. See the `room` module.
//!
//! The forwarder's records (`Answer::Forward`) do not wait: they are already durable
//! and their client has its `250`, their window has room reserved in librdkafka's
//! queue (so a refusal does not happen as the queue is sized), and waiting would put
//! them in line ahead of live sessions. A refusal is answered at once and the forwarder
//! sends the record again after its backoff. `spool replay` publishes as a session
//! does, so its records wait instead of failing with `kafka queue full`.
//!
//! # Readiness and failing fast
//!
//! The sink is healthy once a broker has answered: a metadata request at start-up or
//! from the supervisor thread, or any successful delivery. It becomes unhealthy when
//! librdkafka reports that all brokers are down, that authentication failed, or that
//! the producer hit a fatal error. While unhealthy, `submit` answers at
//! once with `Temporary("kafka unavailable")` instead of queueing the message: a
//! client would otherwise be held for the whole publish timeout (30 s by default) only
//! to get the same `451`, and its connection and buffered message would count against
//! the gateway's limits all that time. The supervisor probes the cluster once a second
//! while unhealthy, so the sink takes mail again about a second after a broker is back;
//! the probe is independent of message traffic, so failing fast cannot keep the sink
//! from noticing the recovery. Messages already queued when the brokers go away are not
//! failed early: librdkafka keeps retrying them until their publish timeout.
//!
//! # Fatal errors and stuck producers
//!
//! An idempotent producer can hit a fatal error (for example `PRODUCER_FENCED` or a
//! sequence desynchronisation) after which it accepts nothing. Every error callback
//! wakes the supervisor, which asks the client for `rd_kafka_fatal_error` (it also
//! checks once a second); on a fatal error it builds a new producer, swaps it in and
//! retires the old one on a thread of its own: it waits (bounded by the publish
//! timeout) for in-flight requests to be answered, purges the rest and serves their
//! delivery reports, so every message it held gets its answer (`Temporary` unless the
//! broker did acknowledge it). Shutdown drains the current producer the same way.
//!
//! A producer can also be stuck without librdkafka calling it fatal: after a broker
//! stall, a broker may fence it (`PRODUCER_FENCED`, `INVALID_PRODUCER_EPOCH`,
//! `UNKNOWN_PRODUCER_ID` on every produce request) while answering metadata, and
//! librdkafka fails each message with that error for good. The delivery reports are
//! the event: the first such failure marks the sink unhealthy (`/readyz` 503, `451`
//! or the handback at once) and wakes the supervisor, which replaces the producer
//! exactly as after a fatal error. A message timing out counts too when nothing at all
//! was acknowledged for a whole publish timeout (one slow message among good ones is a
//! slow broker, and a new producer would not help), and then the producer is replaced
//! only once a broker answers metadata (until then it is an outage). Replacements
//! in one failure streak back off (1 s doubling to 30 s) so a cluster that refuses
//! every new producer is not flooded with them. One warning per streak (repeated at
//! most every 10 s, with the count) and one line at recovery, the first
//! acknowledgement after it.
//!
//! # Handback
//!
//! Built with [`KafkaSink::with_handback`], the sink keeps each session's message (a
//! reference, not a copy) until its delivery report; a temporary failure (unavailable,
//! timeout, no room within the timeout, stuck producer, purge) hands it back to the
//! [`Handback`], whose answer the session gets: the fallback sink of `--spool-fallback`
//! ([`crate::sink::fallback`]) wraps this one and stores it there. A size refusal is
//! still `552`.
//!
//! # Size
//!
//! At start-up the sink reads the topic's `max.message.bytes` (admin client, bounded
//! wait), or the broker's `message.max.bytes` where the topic lists none (Apache Kafka
//! reports the inherited value as the topic's; tansu lists only settings given at the
//! topic's creation, and nothing for its broker), and the producer's
//! `message.max.bytes`; the smaller one, less the record overhead (see
//! [`record_overhead`]), is [`KafkaSink::max_record_value`].
//!
//! A topic's limit can change while the gateway runs, so the limit reader thread reads
//! it again each time the sink becomes ready after not being ready (a broker back after
//! an outage, or first seen after a start without one), after a producer replacement,
//! and after a broker refused as too large a message within the advertised size:
//! - with `--max-message-size auto` the advertised value follows it, up and down (up
//!   to what the producer was sized for), said at `warn`; the server re-derives the
//!   SIZE of new sessions ([`Sink::watch_size`]);
//! - without, the value stays (the operator chose it, and SIZE changing under senders
//!   would bounce mail they sized for it): a topic below what `--max-message-size`
//!   needs is logged at `error` with both settings and the fix, and session messages
//!   the topic cannot hold get `451` until a reading finds it large enough again.
//!   `451`, not the handback: forwarded later, they would not fit either.
//!
//! # Latency at low load
//!
//! `linger.ms=1` lets librdkafka batch under load, but its broker thread waits in
//! whole milliseconds, so a lone message waited 1-1.5 ms for its batch to close
//! (lock-step clients got about 650 msgs/s). `linger.ms=0` answers a lone message in
//! about 0.3 ms, but under load the broker thread then spins in `poll(0)` while
//! batches wait for an in-flight slot (78% of the gateway's CPU; pipelined throughput
//! fell from 43k to 13-17k msgs/s). So the gateway keeps `linger.ms=1` and, when a
//! message arrives with nothing else in flight (low load by definition), wakes the
//! flusher thread, which calls `rd_kafka_flush` (bounded by [`FLUSH_WAIT`](supervisor::FLUSH_WAIT)): while a
//! flush runs, librdkafka sends at once, ignoring `linger.ms`. A flush that times out
//! with more than [`FLUSH_LOAD`](supervisor::FLUSH_LOAD) messages in flight at once during one flush means
//! load: the flusher then holds off for [`FLUSH_HOLDOFF`](supervisor::FLUSH_HOLDOFF), so under
//! load batching is as before. (Flushing on every idle message alone was not enough:
//! a closed-loop load empties the queue with each acknowledged batch, and the
//! unbatched windows fed themselves: 15-19k msgs/s.)
//!
//! # Stored records
//!
//! [`KafkaSink::publish_stored`] publishes a record stored earlier through the same
//! path, with its original key, headers and timestamp: `smtpgw spool replay --to-kafka`
//! (`crate::spool_tool::replay`) and, tagged, the forwarder (`crate::sink::forward`).
//!
//! # Files
//!
//! This file holds the sink itself (its shared state, start-up and `submit`); the rest
//! is split by concern: `options` (settings, librdkafka configuration, record-size
//! arithmetic), `delivery` (delivery reports and the answers they make), `room`
//! (records waiting for room in librdkafka's queue), `supervisor`
//! (probing, producer replacement, the low-load flusher, draining) and `size` (the
//! topic's limit).

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, ThreadedProducer};

use crate::config::PartitionKey;
use crate::sink::record::{Record, SealedMessage};
use crate::sink::{
    join_handle_logged, join_logged, Completion, PublishError, PublishResult, Sink, SinkStats,
};
use crate::smtp::envelope::MessageId;

mod delivery;
mod options;
mod room;
mod size;
mod supervisor;
#[cfg(test)]
mod tests;

pub use delivery::domain_partition;
pub(crate) use delivery::Answer;
pub use options::{limit_for_value, value_limit, KafkaOptions};
#[cfg(any(test, feature = "testing"))]
pub use options::{record_overhead, DEFAULT_PRODUCER_MESSAGE_MAX_BYTES};

use delivery::{classify, owned_headers, GatewayContext, Liveness, PendingDelivery};
use room::{hand_over, Room, Waiting};
use size::{check_topic_limit, follow_topic_limit, read_topic_limit};
use supervisor::{
    drain, flush_when_idle, probe, supervise, Notice, Streak, STREAK_WARNING_INTERVAL,
};

const UNAVAILABLE: &str = "kafka unavailable";
const QUEUE_FULL: &str = "kafka queue full";
const TIMED_OUT: &str = "kafka publish timed out";
const PRODUCER_FAILED: &str = "kafka producer failed";
const ABORTED: &str = "kafka publish aborted";
const UNKNOWN_TOPIC: &str = "kafka topic unknown";
pub(crate) const FAILED: &str = "kafka publish failed";
const SHUT_DOWN: &str = "kafka sink is shut down";
/// A session's message within the advertised SIZE that the topic cannot hold: its limit
/// fell below `--max-message-size` at runtime. The operator's to fix, so not a bounce.
const TOPIC_TOO_SMALL: &str = "kafka topic max.message.bytes below --max-message-size";

#[derive(thiserror::Error, Debug)]
pub enum KafkaSinkError {
    #[error(
        "--max-message-size: kafka topic {topic} takes records of at most max.message.bytes={topic_max}, \
         and messages of --max-message-size need {needed}: raise the topic's max.message.bytes to {needed} \
         (kafka-configs --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes={needed}) \
         or lower --max-message-size"
    )]
    TopicTooSmall {
        topic: String,
        topic_max: usize,
        needed: usize,
    },
    #[error("--kafka-config {key}: not allowed, {why}")]
    ReservedConfig { key: String, why: &'static str },
    #[error("cannot create the Kafka producer (check --kafka-brokers and --kafka-config): {0}")]
    Producer(#[source] KafkaError),
    #[error("cannot start the Kafka sink's thread: {0}")]
    Thread(#[source] io::Error),
}

/// Who takes a session's message that Kafka cannot take now, instead of the session
/// getting `451`: the fallback sink ([`crate::sink::fallback`]), which wraps this one.
/// The Kafka sink knows no more of it than this.
pub(crate) trait Handback: Send + Sync {
    /// Kafka failed `msg` for now (`why`); `done` is the session's way back.
    fn take(&self, msg: SealedMessage, why: Cow<'static, str>, done: Completion);
    /// Kafka acknowledged a session's message.
    fn delivered(&self);
    /// Where handed-back messages go, for the sink's log lines (`the fallback spool`).
    fn place(&self) -> &'static str;
}

/// State shared by the sink, its supervisor and every producer's callbacks.
struct KafkaShared {
    healthy: AtomicBool,
    closed: AtomicBool,
    /// Which producer is current; callbacks of a retired one must not flip health.
    generation: AtomicU64,
    inflight_messages: AtomicUsize,
    /// The most messages in flight at once since the flusher last looked: it tells
    /// load by how many were in flight together during one of its flushes.
    peak_inflight: AtomicUsize,
    inflight_bytes: AtomicUsize,
    /// Session records waiting for a place in librdkafka's queue, and the gate that
    /// gives the places (see "Waiting for room"). Counted in `inflight_*` too.
    room: Room,
    notices: Sender<Notice>,
    /// The current producer's latest librdkafka statistics.
    stats: Mutex<Option<SinkStats>>,
    /// Set while a [`Streak`] runs, so a delivery checks the mutex only then.
    streak_active: AtomicBool,
    streak: Mutex<Streak>,
    /// Where a session's message goes when Kafka fails it temporarily.
    handback: Option<Arc<dyn Handback>>,
    /// Told each time the sink becomes ready (the forwarder waits for it).
    ready_watch: Mutex<Vec<Sender<()>>>,
    /// The topic's partition count from the last metadata answer; 0 while unknown
    /// (records are then partitioned by key).
    partitions: AtomicUsize,
    /// When the last acknowledgement (of any producer) came, in ms since `epoch`.
    epoch: Instant,
    last_ack_ms: AtomicU64,
    publish_timeout: Duration,
    /// The largest value a session may send ([`KafkaSink::max_record_value`]). With
    /// `--max-message-size auto` it follows the topic's limit each time it is read.
    max_record_value: AtomicUsize,
    /// The cluster's limit for the topic at its last reading; 0 while unknown.
    topic_max: AtomicUsize,
    /// Without `auto`: the largest value the topic holds, when that fell below what
    /// `--max-message-size` needs (session messages over it get 451); else `usize::MAX`.
    topic_value_limit: AtomicUsize,
    /// Wakes the limit reader (see "Size"); one pending wake is enough.
    reread: Sender<()>,
    /// Told each time `max_record_value` changes (the server re-derives SIZE).
    size_watch: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl KafkaShared {
    fn set_healthy(&self, generation: u64, healthy: bool, why: &str) {
        if generation != self.generation.load(Ordering::Acquire) {
            return;
        }
        // Every delivery calls this; a plain load keeps the common case free of a
        // contended read-modify-write.
        if self.healthy.load(Ordering::Acquire) != healthy
            && self.healthy.swap(healthy, Ordering::AcqRel) != healthy
        {
            if healthy {
                tracing::info!(why, "kafka sink ready");
                // A broker is back (or first seen): its topic may have changed meanwhile.
                let _ = self.reread.try_send(());
                for tx in self
                    .ready_watch
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                {
                    let _ = tx.send(());
                }
            } else if let Some(handback) = &self.handback {
                tracing::warn!(
                    why,
                    "kafka sink not ready: storing messages in {} until a broker is back",
                    handback.place()
                );
            } else {
                tracing::warn!(
                    why,
                    "kafka sink not ready: answering 451 until a broker is back"
                );
            }
        }
    }

    /// A delivery of the current producer failed in a way that says the producer may
    /// be stuck: count it, say so (once per streak, then rate-limited), refuse mail
    /// until the supervisor has a working producer, and wake the supervisor.
    fn liveness_failure(&self, generation: u64, kind: Liveness, error: &KafkaError) {
        if generation != self.generation.load(Ordering::Acquire)
            || self.closed.load(Ordering::Acquire)
        {
            return;
        }
        let now = Instant::now();
        // One message timing out while others get through is a slow broker, not a
        // stuck producer: only a whole publish timeout without any acknowledgement is.
        if kind == Liveness::NoAck {
            let since_ack = self.epoch.elapsed().saturating_sub(Duration::from_millis(
                self.last_ack_ms.load(Ordering::Relaxed),
            ));
            if since_ack < self.publish_timeout {
                return;
            }
        }
        let mut streak = self.streak.lock().unwrap_or_else(PoisonError::into_inner);
        let started = *streak.started.get_or_insert(now);
        streak.failures += 1;
        self.streak_active.store(true, Ordering::Release);
        if streak
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= STREAK_WARNING_INTERVAL)
        {
            streak.last_warning = Some(now);
            tracing::warn!(
                %error,
                failures = streak.failures,
                for_ms = now.duration_since(started).as_millis() as u64,
                generation,
                "kafka produce requests failing; replacing the producer"
            );
        }
        // A rejection outranks a timeout: the broker is known to answer.
        if streak.suspect != Some(Liveness::Rejected) {
            streak.suspect = Some(kind);
        }
        drop(streak);
        // A rejected producer fails whatever it is given: stop giving it mail now. A
        // timeout is judged by the supervisor, which first asks whether a broker
        // answers at all.
        if kind == Liveness::Rejected {
            self.set_healthy(generation, false, "the broker rejects the kafka producer");
        }
        let _ = self.notices.send(Notice::Stuck);
    }

    /// A delivery succeeded: a running streak is over.
    fn delivered(&self, generation: u64) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ack_ms.store(ms, Ordering::Relaxed);
        self.set_healthy(generation, true, "message delivered");
        if !self.streak_active.load(Ordering::Acquire)
            || generation != self.generation.load(Ordering::Acquire)
        {
            return;
        }
        let mut streak = self.streak.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.streak_active.swap(false, Ordering::AcqRel) {
            return;
        }
        let ended = std::mem::take(&mut *streak);
        drop(streak);
        tracing::info!(
            failures = ended.failures,
            for_ms = ended.started.map_or(0, |t| t.elapsed().as_millis() as u64),
            replacements = ended.replacements,
            generation,
            "kafka sink recovered: messages acknowledged again"
        );
    }

    /// True when nothing else was in flight: the load is low.
    fn add_inflight(&self, bytes: usize) -> bool {
        self.inflight_bytes.fetch_add(bytes, Ordering::Relaxed);
        let now = self.inflight_messages.fetch_add(1, Ordering::Relaxed) + 1;
        // A plain load first: the peak rarely grows, so the shared line stays shared.
        if now > self.peak_inflight.load(Ordering::Relaxed) {
            self.peak_inflight.fetch_max(now, Ordering::Relaxed);
        }
        now == 1
    }

    fn sub_inflight(&self, bytes: usize) {
        self.inflight_messages.fetch_sub(1, Ordering::Relaxed);
        self.inflight_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

type GatewayProducer = ThreadedProducer<GatewayContext>;

struct Inner {
    shared: Arc<KafkaShared>,
    config: ClientConfig,
    /// The topic, timeout and in-flight limits come from here.
    options: KafkaOptions,
    /// `None` once shut down. Submitters hold the read lock across `send`, so once
    /// `shutdown` has taken the producer under the write lock nothing more enters it.
    producer: RwLock<Option<Arc<GatewayProducer>>>,
    /// Threads draining retired producers; shutdown waits for them.
    retiring: Mutex<Vec<JoinHandle<()>>>,
    /// Wakes the flusher (see "Latency at low load"); one pending wake is enough.
    kick: Sender<()>,
}

/// The Kafka sink. See the module documentation.
pub struct KafkaSink {
    inner: Arc<Inner>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    limits: Mutex<Option<JoinHandle<()>>>,
    /// The waiting room's hand-over thread.
    room: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.inner.options.topic())
            .field("healthy", &self.is_healthy())
            .field("max_record_value", &self.max_record_value())
            .finish_non_exhaustive()
    }
}

fn new_producer(
    config: &ClientConfig,
    shared: &Arc<KafkaShared>,
    generation: u64,
) -> Result<GatewayProducer, KafkaSinkError> {
    let context = GatewayContext {
        shared: Arc::clone(shared),
        generation,
    };
    ThreadedProducer::from_config_and_context(config, context).map_err(KafkaSinkError::Producer)
}

/// A record's value: a session's own bytes (shared, so waiting for room copies
/// nothing), or a spooled record's, copied only if it has to wait.
pub(crate) enum Payload<'a> {
    Shared(Bytes),
    Borrowed(&'a [u8]),
}

impl Payload<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Shared(b) => b,
            Payload::Borrowed(b) => b,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Payload::Shared(b) => b,
            Payload::Borrowed(b) => Bytes::copy_from_slice(b),
        }
    }
}

/// What a refused send gives back: the error, the headers and the pending delivery.
type Refused = (KafkaError, Option<OwnedHeaders>, Box<PendingDelivery>);

/// Hands one record to `producer` (librdkafka copies the value); its delivery report
/// goes to `pending`.
fn send_record(
    producer: &GatewayProducer,
    topic: &str,
    timestamp_ms: i64,
    headers: Option<OwnedHeaders>,
    value: &[u8],
    partition: Option<i32>,
    pending: Box<PendingDelivery>,
) -> Result<(), Refused> {
    let mut key = [0u8; ulid::ULID_LEN];
    let key = pending.id.array_to_str(&mut key);
    let mut record = BaseRecord::with_opaque_to(topic, pending)
        .key(key.as_bytes())
        .payload(value)
        .timestamp(timestamp_ms);
    if let Some(headers) = headers {
        record = record.headers(headers);
    }
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    producer
        .send(record)
        .map_err(|(error, record)| (error, record.headers, record.delivery_opaque))
}

impl KafkaSink {
    /// Creates the producer, probes the cluster (bounded by `startup_timeout`) and
    /// starts the supervisor. No reachable broker is not an error: the sink starts
    /// unhealthy and becomes ready when a broker answers.
    pub fn new(options: &KafkaOptions) -> Result<KafkaSink, KafkaSinkError> {
        Self::with_handback(options, None)
    }

    /// As [`KafkaSink::new`]; a session's message that Kafka cannot take now (sink
    /// unavailable, temporary delivery failure, publish timeout, no room in time) is
    /// handed back to `handback`, whose answer the session gets instead of `451`.
    pub(crate) fn with_handback(
        options: &KafkaOptions,
        handback: Option<Arc<dyn Handback>>,
    ) -> Result<KafkaSink, KafkaSinkError> {
        let config = options.client_config()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (reread, rereads) = crossbeam_channel::bounded(1);
        let (gate_messages, gate_bytes) = options.gate();
        let (room, room_wakes) = Room::new(gate_messages, gate_bytes, options.publish_timeout());
        let shared = Arc::new(KafkaShared {
            healthy: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            inflight_messages: AtomicUsize::new(0),
            peak_inflight: AtomicUsize::new(0),
            inflight_bytes: AtomicUsize::new(0),
            room,
            notices: tx,
            stats: Mutex::new(None),
            streak_active: AtomicBool::new(false),
            streak: Mutex::new(Streak::default()),
            handback,
            ready_watch: Mutex::new(Vec::new()),
            partitions: AtomicUsize::new(0),
            epoch: Instant::now(),
            last_ack_ms: AtomicU64::new(0),
            publish_timeout: options.publish_timeout(),
            max_record_value: AtomicUsize::new(0),
            topic_max: AtomicUsize::new(0),
            topic_value_limit: AtomicUsize::new(usize::MAX),
            reread,
            size_watch: Mutex::new(Vec::new()),
        });
        let producer = Arc::new(new_producer(&config, &shared, 0)?);

        let reachable = probe(&producer, options.topic(), options.startup_timeout, &shared);
        if reachable {
            shared.set_healthy(0, true, "broker answered");
        }
        // Without a broker, describing the topic would only wait out the same timeout
        // again; SIZE then follows the producer's limit, and a broker that still
        // refuses a record as too large gets it answered with 552.
        let topic_max = if reachable {
            read_topic_limit(&config, options.topic(), options.startup_timeout)
        } else {
            tracing::warn!(
                brokers = %options.settings.brokers(),
                "no kafka broker answered at start-up; not ready until one does"
            );
            None
        };
        let producer_max = options.producer_message_max_bytes();
        check_topic_limit(topic_max, options)?;
        let limit = topic_max.map_or(producer_max, |t| t.min(producer_max));
        let max_record_value = value_limit(limit, options.max_recipients);
        tracing::info!(
            topic = %options.topic(),
            topic_max_message_bytes = ?topic_max,
            producer_message_max_bytes = producer_max,
            max_record_value,
            "kafka size limit"
        );
        if max_record_value < 64 << 10 {
            tracing::warn!(
                max_record_value,
                "kafka accepts very small records; raise the topic's max.message.bytes"
            );
        }
        shared
            .max_record_value
            .store(max_record_value, Ordering::Release);
        shared
            .topic_max
            .store(topic_max.unwrap_or(0), Ordering::Release);
        // The start-up probe's own wake: the limit was just read.
        while rereads.try_recv().is_ok() {}

        let (kick, kicks) = crossbeam_channel::bounded(1);
        let inner = Arc::new(Inner {
            shared,
            config,
            options: options.clone(),
            producer: RwLock::new(Some(producer)),
            retiring: Mutex::new(Vec::new()),
            kick,
        });
        let flusher = {
            let inner = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("smtpgw-kflush".into())
                .spawn(move || flush_when_idle(&inner, &kicks))
                .map_err(KafkaSinkError::Thread)?
        };
        let supervisor = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("smtpgw-kafka".into())
                .spawn(move || supervise(&inner, &rx))
                .map_err(KafkaSinkError::Thread)?
        };
        let limits = {
            let (shared, config, options) = (
                Arc::clone(&inner.shared),
                inner.config.clone(),
                options.clone(),
            );
            std::thread::Builder::new()
                .name("smtpgw-klimit".into())
                .spawn(move || follow_topic_limit(&shared, &config, &options, &rereads))
                .map_err(KafkaSinkError::Thread)?
        };
        let room = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("smtpgw-kroom".into())
                .spawn(move || hand_over(&inner, &room_wakes))
                .map_err(KafkaSinkError::Thread)?
        };
        Ok(KafkaSink {
            inner,
            supervisor: Mutex::new(Some(supervisor)),
            flusher: Mutex::new(Some(flusher)),
            limits: Mutex::new(Some(limits)),
            room: Mutex::new(Some(room)),
        })
    }

    /// The largest [`SealedMessage::value`] (trace line included) that Kafka accepts;
    /// with `--max-message-size auto` it follows the topic's limit as re-read.
    pub fn max_record_value(&self) -> usize {
        self.inner.shared.max_record_value.load(Ordering::Acquire)
    }

    /// The cluster's limit for the topic (its `max.message.bytes`, else the broker's
    /// `message.max.bytes`) at the last reading, if it said.
    pub fn topic_max_message_bytes(&self) -> Option<usize> {
        Some(self.inner.shared.topic_max.load(Ordering::Acquire)).filter(|&n| n > 0)
    }

    /// Without `auto`: the largest value the topic holds when it fell below what
    /// `--max-message-size` needs (larger session messages get 451), else `None`.
    pub fn topic_shortfall(&self) -> Option<usize> {
        Some(self.inner.shared.topic_value_limit.load(Ordering::Acquire))
            .filter(|&n| n != usize::MAX)
    }

    /// Messages and bytes the sink holds unanswered: handed to librdkafka, or waiting
    /// for room in its queue.
    pub fn inflight(&self) -> (usize, usize) {
        let shared = &self.inner.shared;
        (
            shared.inflight_messages.load(Ordering::Relaxed),
            shared.inflight_bytes.load(Ordering::Relaxed),
        )
    }

    /// Messages and bytes waiting for room in librdkafka's queue (see "Waiting for
    /// room"); part of [`KafkaSink::inflight`].
    pub fn waiting(&self) -> (usize, usize) {
        self.inner.shared.room.waiting()
    }

    #[cfg(any(test, feature = "testing"))]
    /// How many times the producer has been replaced after a fatal error.
    pub fn producer_generation(&self) -> u64 {
        self.inner.shared.generation.load(Ordering::Acquire)
    }
}

impl KafkaSink {
    /// Hands one record to librdkafka; `answer` gets the delivery report, or an answer
    /// at once if the sink is unavailable or librdkafka refuses the record. A session's
    /// record that finds the gate full waits in the room (see "Waiting for room").
    pub(crate) fn publish(
        &self,
        id: MessageId,
        timestamp_ms: i64,
        headers: Option<OwnedHeaders>,
        value: Payload<'_>,
        partition: Option<i32>,
        answer: Answer,
    ) {
        let inner = &self.inner;
        let shared = &inner.shared;
        let gated = matches!(answer, Answer::Session { .. });
        if value.len() > shared.topic_value_limit.load(Ordering::Relaxed) && gated {
            // The topic fell below --max-message-size (see "Size"): real Kafka would
            // refuse it, tansu would take what consumers are not sized for.
            answer.refuse(Err(PublishError::Temporary(Cow::Borrowed(TOPIC_TOO_SMALL))));
            return;
        }
        if !shared.healthy.load(Ordering::Acquire) {
            answer.answer(
                shared,
                Err(PublishError::Temporary(Cow::Borrowed(UNAVAILABLE))),
                None,
            );
            return;
        }
        let slot = inner
            .producer
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(producer) = slot.as_ref() else {
            drop(slot);
            answer.answer(
                shared,
                Err(PublishError::Temporary(Cow::Borrowed(SHUT_DOWN))),
                None,
            );
            return;
        };
        let bytes = value.len();
        let pending = Box::new(PendingDelivery {
            answer,
            id,
            bytes,
            gated,
        });
        let idle = shared.add_inflight(bytes);
        if gated && !shared.room.try_enter(bytes) {
            // Still under the producer's read lock: shutdown takes the producer before
            // it answers what waits, so it finds this record there.
            shared.room.wait(Waiting::new(
                pending,
                timestamp_ms,
                headers,
                value.into_bytes(),
                partition,
            ));
            return;
        }
        let sent = send_record(
            producer,
            inner.options.topic(),
            timestamp_ms,
            headers,
            value.as_slice(),
            partition,
            pending,
        );
        if idle && sent.is_ok() {
            // Nothing else in flight: send now rather than after linger.ms.
            let _ = inner.kick.try_send(());
        }
        if let Err((error, headers, pending)) = sent {
            let full = error.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull);
            if gated && full {
                // Not for what the gate let in, as librdkafka's queue is sized; if
                // `--kafka-config` made it smaller, the record waits all the same.
                shared.room.refused_after_all();
                shared.room.release(bytes);
                shared.room.wait(Waiting::new(
                    pending,
                    timestamp_ms,
                    headers,
                    value.into_bytes(),
                    partition,
                ));
                return;
            }
            drop(slot);
            if gated {
                shared.room.release(bytes);
            }
            shared.sub_inflight(bytes);
            if !full {
                tracing::debug!(%id, %error, "kafka refused the message");
            }
            pending.answer.answer(shared, Err(classify(&error)), None);
        }
    }

    /// Publishes a record stored earlier (the forwarder's) exactly as [`Sink::submit`]
    /// published the message: same key, value, headers and timestamp. The result goes
    /// to `tx` tagged `seq`.
    pub(crate) fn forward(&self, record: &impl Record, seq: u64, tx: Sender<(u64, PublishResult)>) {
        self.publish_record(record, Answer::Forward { seq, tx });
    }

    /// Publishes `record` with its key, value, headers and timestamp; `done` gets the
    /// answer, never handed back.
    pub(crate) fn publish_stored(&self, record: &impl Record, done: Completion) {
        self.publish_record(record, Answer::Session { done, keep: None });
    }

    fn publish_record(&self, record: &impl Record, answer: Answer) {
        let (id, timestamp_ms, headers, partition) = self.head_of(record);
        self.publish(
            id,
            timestamp_ms,
            headers,
            Payload::Borrowed(record.value()),
            partition,
            answer,
        );
    }

    /// What the producer gets of `record` besides its value: key, timestamp, headers
    /// and the partition `--kafka-partition-key` picks.
    fn head_of(&self, record: &impl Record) -> (MessageId, i64, Option<OwnedHeaders>, Option<i32>) {
        let headers = owned_headers(record.header_count(), |add| {
            record.for_each_header(|name, value| add(name, value))
        });
        let partition = self.partition_for(record.mail_from(), || record.first_rcpt());
        (
            record.id(),
            record.received_at().timestamp_millis(),
            headers,
            partition,
        )
    }

    /// The partition `--kafka-partition-key` picks for a message from `sender` whose
    /// first recipient is `first_rcpt`; `None` to let librdkafka partition by key (by
    /// id, or while the partition count is unknown).
    fn partition_for<'a>(
        &self,
        sender: &'a [u8],
        first_rcpt: impl FnOnce() -> &'a [u8],
    ) -> Option<i32> {
        let address = match self.inner.options.settings.kafka_partition_key {
            PartitionKey::Id => return None,
            PartitionKey::SenderDomain => sender,
            PartitionKey::RecipientDomain => first_rcpt(),
        };
        let partitions = self.inner.shared.partitions.load(Ordering::Relaxed);
        domain_partition(address, partitions)
    }

    /// `tx` gets a message each time the sink becomes ready.
    pub(crate) fn notify_ready(&self, tx: Sender<()>) {
        self.inner
            .shared
            .ready_watch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
    }

    /// Whether the sink takes messages now; false while closed.
    fn ready(&self) -> bool {
        let shared = &self.inner.shared;
        shared.healthy.load(Ordering::Acquire) && !shared.closed.load(Ordering::Acquire)
    }
}

impl Sink for KafkaSink {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        let (id, timestamp_ms, headers, partition) = self.head_of(&msg);
        // A reference-counted handle, not a copy of the bytes.
        let value = Payload::Shared(msg.value.clone());
        // Only a handback needs the message after librdkafka has copied it.
        let keep = self.inner.shared.handback.is_some().then_some(msg);
        self.publish(
            id,
            timestamp_ms,
            headers,
            value,
            partition,
            Answer::Session { done, keep },
        );
    }

    fn shutdown(&self) {
        let inner = &self.inner;
        inner.shared.closed.store(true, Ordering::Release);
        let _ = inner.shared.notices.send(Notice::Stop);
        // The flusher sees `closed` at its next wake: this one, or the one it has.
        let _ = inner.kick.try_send(());
        // The limit reader sees `closed` likewise (a reading under way ends first).
        let _ = inner.shared.reread.try_send(());
        // And the hand-over (a pass under way ends first).
        inner.shared.room.wake();
        join_logged(&self.flusher, "kafka flusher");
        join_logged(&self.supervisor, "kafka supervisor");
        join_logged(&self.limits, "kafka limit reader");
        join_logged(&self.room, "kafka hand-over");
        let producer = inner
            .producer
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Records start waiting only under the producer's read lock, and with the
        // producer gone none can: what waits now is all there will be. Answered before
        // the drain, which may wait out the publish timeout.
        for record in inner.shared.room.take_all() {
            record.fail(&inner.shared, SHUT_DOWN);
        }
        if let Some(producer) = producer {
            drain(producer, inner.options.publish_timeout());
        }
        let retiring = std::mem::take(
            &mut *inner
                .retiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in retiring {
            join_handle_logged(handle, "kafka drain");
        }
        let (messages, bytes) = self.inflight();
        if messages > 0 {
            tracing::error!(
                messages,
                bytes,
                "kafka messages left unanswered at shutdown"
            );
        }
    }

    fn name(&self) -> &'static str {
        "kafka"
    }

    fn is_healthy(&self) -> bool {
        self.ready()
    }

    fn over_inflight_limit(&self) -> bool {
        let (messages, bytes) = self.inflight();
        let limits = &self.inner.options.settings;
        messages as u64 >= limits.max_inflight_messages
            || bytes as u64 >= limits.max_inflight_bytes.0
    }

    fn max_message_value(&self) -> Option<usize> {
        Some(self.max_record_value())
    }

    fn watch_size(&self, on_change: Box<dyn Fn() + Send + Sync>) {
        self.inner
            .shared
            .size_watch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(on_change);
    }

    fn stats(&self) -> Option<SinkStats> {
        let mut stats = self
            .inner
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        stats.topic_max_message_bytes = self.topic_max_message_bytes().map(|n| n as u64);
        stats.topic_too_small = self.topic_shortfall().is_some();
        let (waiting_messages, waiting_bytes) = self.waiting();
        stats.waiting_messages = waiting_messages as u64;
        stats.waiting_bytes = waiting_bytes as u64;
        Some(stats)
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}
