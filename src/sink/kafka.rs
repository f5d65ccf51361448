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
//! | too large for the topic, within our SIZE       | `Temporary("kafka topic max.message.bytes below --max-message-size")`, never the fallback |
//! | no broker reachable (fail fast, see below)     | `Temporary("kafka unavailable")` |
//! | producer queue full                            | `Temporary("kafka queue full")` |
//! | not acknowledged within `--publish-timeout`    | `Temporary("kafka publish timed out")` |
//! | producer hit a fatal error                     | `Temporary("kafka producer failed")` |
//! | any other delivery error                       | `Temporary("kafka publish failed")` |
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
//! or the fallback at once) and wakes the supervisor, which replaces the producer
//! exactly as after a fatal error. A message timing out counts too when nothing at all
//! was acknowledged for a whole publish timeout (one slow message among good ones is a
//! slow broker, and a new producer would not help), and then the producer is replaced
//! only once a broker answers metadata (until then it is an outage). Replacements
//! in one failure streak back off (1 s doubling to 30 s) so a cluster that refuses
//! every new producer is not flooded with them. One warning per streak (repeated at
//! most every 10 s, with the count) and one line at recovery, the first
//! acknowledgement after it.
//!
//! # Fallback
//!
//! Built with [`KafkaSink::with_fallback`], the sink keeps each session's message (a
//! reference, not a copy) until its delivery report; a temporary failure (unavailable,
//! queue full, timeout, stuck producer, purge) hands it to the fallback sink, the local
//! spool of `--spool-fallback`, whose answer the session gets. A size refusal is still
//! `552`. See [`crate::sink::forward`].
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
//!   `451`, not the fallback spool: the forwarder could not publish them either.
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
//! flusher thread, which calls `rd_kafka_flush` (bounded by [`FLUSH_WAIT`]): while a
//! flush runs, librdkafka sends at once, ignoring `linger.ms`. A flush that times out
//! with more than [`FLUSH_LOAD`] messages in flight at once during one flush means
//! load: the flusher then holds off for [`FLUSH_HOLDOFF`], so under
//! load batching is as before. (Flushing on every idle message alone was not enough:
//! a closed-loop load empties the queue with each acknowledged batch, and the
//! unbatched windows fed themselves: 15-19k msgs/s.)
//!
//! # Replay
//!
//! [`replay_spool`] publishes a spool's records through the same path, with their
//! original keys, headers and timestamps, for `smtpgw spool replay --to-kafka`.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rdkafka::admin::{AdminClient, AdminOptions, ConfigResource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientContext;

use crate::config::PartitionKey;
use crate::sink::{
    join_handle_logged, join_logged, Completion, PublishError, PublishResult, Sink, SinkStats,
};
use crate::smtp::command::MAX_COMMAND_LINE;
use crate::smtp::envelope::{MessageId, SealedMessage};

/// The longest one low-load flush waits for the messages in flight (see "Latency at low
/// load"); at low load it ends sooner, when they are acknowledged.
const FLUSH_WAIT: Duration = Duration::from_millis(2);
/// After a flush during which more than [`FLUSH_LOAD`] messages were in flight at once
/// (so the load is not low after all), no flush for this long: batching under load stays undisturbed but for one
/// short window per holdoff. (100 ms still cost about a quarter of the pipelined
/// throughput and quadrupled its p99: the windows come right after each holdoff.)
const FLUSH_HOLDOFF: Duration = Duration::from_millis(1000);
/// Messages in flight at once during one flush above which the load is not low: a
/// lock-step client has one at most per connection. (Counting arrivals instead was
/// wrong on a busy machine: the flusher, woken late, saw a new lock-step message in
/// flight each time it looked and flushed on to its timeout.)
const FLUSH_LOAD: usize = 4;

/// librdkafka's default `message.max.bytes`, used when the user does not set it.
/// librdkafka's queue holds this many times `--max-inflight-messages/-bytes` before a
/// message gets `451 kafka queue full` (see the producer settings).
const HARD_QUEUE_FACTOR: u64 = 4;
pub const DEFAULT_PRODUCER_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// How long start-up waits for the cluster's metadata and the topic's configuration.
/// A gateway with no reachable broker still starts (and answers `451`) after this.
const STARTUP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor asks the cluster for metadata while no broker is known up.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Short, because a metadata request makes librdkafka retry a dead broker every 50 ms
/// for as long as it waits. A slow handshake still completes in the background, and
/// the next probe finds the connection up.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// After a purge, delivery reports come back at once; this only bounds a bug.
const AFTER_PURGE_FLUSH: Duration = Duration::from_secs(5);

const UNAVAILABLE: &str = "kafka unavailable";
const QUEUE_FULL: &str = "kafka queue full";
const TIMED_OUT: &str = "kafka publish timed out";
const PRODUCER_FAILED: &str = "kafka producer failed";
const ABORTED: &str = "kafka publish aborted";
const UNKNOWN_TOPIC: &str = "kafka topic unknown";
const FAILED: &str = "kafka publish failed";
const SHUT_DOWN: &str = "kafka sink is shut down";
/// A session's message within the advertised SIZE that the topic cannot hold: its limit
/// fell below `--max-message-size` at runtime. The operator's to fix, so not a bounce.
const TOPIC_TOO_SMALL: &str = "kafka topic max.message.bytes below --max-message-size";

/// Everything the Kafka sink is configured with: its settings group (brokers, topic,
/// `--kafka-config`, publish timeout, in-flight limits) and what the gateway adds.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    pub settings: crate::config::Kafka,
    /// The session's recipient limit: it bounds how many headers a record carries.
    pub max_recipients: usize,
    /// Bounds the start-up metadata and size probes.
    pub startup_timeout: Duration,
    /// Messages and bytes the store-and-forward thread may have in flight (its window);
    /// librdkafka's queue is made that much larger than live traffic can fill, so the
    /// forwarder is never refused with `QueueFull` behind live mail.
    pub forward_reserve: (usize, usize),
    /// The largest record value a session can produce (`--max-message-size` plus the
    /// `Received:` line). The producer's `message.max.bytes` is set to fit it (unless
    /// `--kafka-config` sets it), and a topic whose `max.message.bytes` cannot hold it
    /// makes the sink refuse to start. `None`: librdkafka's default, no check.
    pub max_value: Option<usize>,
    /// `--max-message-size auto`: a topic smaller than [`KafkaOptions::max_value`]
    /// lowers the size limit (with a warning) instead of stopping the start-up.
    pub fit_topic: bool,
}

impl KafkaOptions {
    pub fn new(settings: crate::config::Kafka, max_recipients: usize) -> Self {
        KafkaOptions {
            settings,
            max_recipients,
            startup_timeout: STARTUP_PROBE_TIMEOUT,
            forward_reserve: (0, 0),
            max_value: None,
            fit_topic: false,
        }
    }

    fn topic(&self) -> &str {
        &self.settings.kafka_topic.0
    }

    fn publish_timeout(&self) -> Duration {
        self.settings.publish_timeout.0
    }

    /// The producer configuration: the gateway's settings, then the user's.
    pub fn client_config(&self) -> Result<ClientConfig, KafkaSinkError> {
        let extra = &self.settings.kafka_config;
        for setting in extra {
            if let Some(why) = crate::config::reserved_kafka_config(&setting.key) {
                return Err(KafkaSinkError::ReservedConfig {
                    key: setting.key.clone(),
                    why,
                });
            }
        }
        let timeout_ms = self.publish_timeout().as_millis().max(1);
        let (reserve_messages, reserve_bytes) = self.forward_reserve;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.settings.brokers())
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .set("linger.ms", "1")
            .set("message.timeout.ms", timeout_ms.to_string())
            // The sink refuses mail while disconnected, so reconnect promptly rather
            // than after librdkafka's default backoff of up to 10 s.
            .set("reconnect.backoff.max.ms", "1000")
            // Queue depth and broker round trips for the metrics; `--kafka-config
            // statistics.interval.ms=0` turns them off.
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
            // librdkafka's own queue is the hard limit behind the soft in-flight limit
            // the reactors honour; sessions already past DATA can still add to it, and
            // it counts a batch of delivered messages until the last of the batch's
            // delivery reports has run, while the sink's count (and so the reactors'
            // pause) drops with each report: reactors resuming in that window saw
            // `queue full` at twice the limit under CPU load. Memory is bounded by the
            // body budget (a message at the sink stays charged to it until answered),
            // so this cap is only the backstop. The forwarder's window comes on top, so
            // live mail cannot crowd it out.
            .set(
                "queue.buffering.max.messages",
                self.settings
                    .max_inflight_messages
                    .saturating_mul(HARD_QUEUE_FACTOR)
                    .saturating_add(reserve_messages as u64)
                    .clamp(1, 10_000_000)
                    .to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                (self
                    .settings
                    .max_inflight_bytes
                    .0
                    .saturating_mul(HARD_QUEUE_FACTOR)
                    .saturating_add(reserve_bytes as u64)
                    / 1024)
                    .clamp(1, i32::MAX as u64)
                    .to_string(),
            );
        if self.user_message_max_bytes().is_none() {
            config.set(
                "message.max.bytes",
                self.producer_message_max_bytes().to_string(),
            );
        }
        for setting in extra {
            config.set(&setting.key, &setting.value);
        }
        Ok(config)
    }

    fn user_message_max_bytes(&self) -> Option<usize> {
        self.settings
            .kafka_config
            .iter()
            .rev()
            .find(|s| s.key == "message.max.bytes")
            .and_then(|s| s.value.parse().ok())
    }

    /// The producer's `message.max.bytes`: the user's, else what a value of
    /// [`KafkaOptions::max_value`] needs, else librdkafka's default.
    fn producer_message_max_bytes(&self) -> usize {
        self.user_message_max_bytes().unwrap_or_else(|| {
            self.max_value
                .map_or(DEFAULT_PRODUCER_MESSAGE_MAX_BYTES, |v| {
                    limit_for_value(v, self.max_recipients)
                })
        })
    }
}

/// librdkafka's largest `message.max.bytes`.
const LIBRDKAFKA_MAX_MESSAGE_BYTES: usize = 1_000_000_000;

/// The largest value a record may carry under a `message.max.bytes` (or a topic's
/// `max.message.bytes`) of `limit`: less the record overhead and lz4's worst-case
/// growth of incompressible data (1/255 plus 16 bytes).
pub fn value_limit(limit: usize, max_recipients: usize) -> usize {
    limit
        .saturating_sub(record_overhead(max_recipients))
        .saturating_sub(limit / 255 + 16)
}

/// The smallest `message.max.bytes` under which a value of `value` bytes fits
/// ([`value_limit`] inverted), at most librdkafka's maximum.
pub fn limit_for_value(value: usize, max_recipients: usize) -> usize {
    let need = value
        .saturating_add(record_overhead(max_recipients))
        .saturating_add(16);
    // limit - limit/255 >= need holds for limit = need + need/254 + 1.
    need.saturating_add(need / 254 + 1)
        .min(LIBRDKAFKA_MAX_MESSAGE_BYTES)
}

/// A topic that cannot hold the largest message `--max-message-size` allows stops the
/// start-up: advertising a SIZE and then bouncing what fits it with `552` is worse.
/// With `--max-message-size auto` ([`KafkaOptions::fit_topic`]) it is said at `warn`
/// instead, and the size limit follows the topic's (see `reload::session_config_for`).
fn check_topic_limit(
    topic_max: Option<usize>,
    options: &KafkaOptions,
) -> Result<(), KafkaSinkError> {
    if let (Some(topic_max), Some(value)) = (topic_max, options.max_value) {
        if value_limit(topic_max, options.max_recipients) < value {
            let too_small = KafkaSinkError::TopicTooSmall {
                topic: options.topic().to_owned(),
                topic_max,
                needed: limit_for_value(value, options.max_recipients),
            };
            if !options.fit_topic {
                return Err(too_small);
            }
            tracing::warn!(
                topic = %options.topic(),
                topic_max_message_bytes = topic_max,
                max_record_value = value_limit(topic_max, options.max_recipients),
                "--max-message-size auto: advertising what the kafka topic holds ({too_small})"
            );
        }
    }
    Ok(())
}

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

/// Bytes a record adds to its value on the wire, counted generously so that a value of
/// [`KafkaSink::max_record_value`] bytes is never refused for size:
///
/// - record batch header: 61 bytes (one record per batch at worst);
/// - record framing: length, attributes, timestamp and offset deltas, key and value
///   lengths, header count: at most 6 varints of 5 bytes and 1 byte;
/// - key: the 26-character ULID;
/// - headers: 14 fixed ones (`smtp.auth` the last) plus `smtp.rcpt_to`, `smtp.rcpt_notify` and
///   `smtp.rcpt_orcpt` per recipient, each at most two 5-byte varints, a name of at most
///   17 bytes and a value of at most one command line (512 octets; every header value
///   comes from one SMTP command or is shorter; ORCPT is at most 500 characters and
///   NOTIFY at most 21).
///
/// lz4's worst-case expansion of incompressible data is added separately, since it
/// scales with the value ([`KafkaSink::max_record_value`]).
pub fn record_overhead(max_recipients: usize) -> usize {
    const BATCH_HEADER: usize = 61;
    const RECORD_FRAMING: usize = 6 * 5 + 1;
    const KEY: usize = 26;
    const PER_HEADER: usize = 2 * 5 + 17 + MAX_COMMAND_LINE;
    const NOTIFY_HEADER: usize = 2 * 5 + 17 + 21;
    BATCH_HEADER
        + RECORD_FRAMING
        + KEY
        + (14 + 2 * max_recipients) * PER_HEADER
        + max_recipients * NOTIFY_HEADER
}

/// What the delivery callback needs to answer one message.
struct InFlight {
    answer: Answer,
    id: MessageId,
    bytes: usize,
}

/// Who waits for a delivery report.
// The session variant holds the sealed message (which grew with the edge's record
// headers); the whole `InFlight` is already boxed once per message as the delivery
// opaque, so boxing the variant too would only add a second allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Answer {
    /// A session: `Ok` is its `250`. With a fallback sink, the message is kept until
    /// the broker answers so that a temporary failure can still be stored there.
    Session {
        done: Completion,
        keep: Option<SealedMessage>,
    },
    /// The store-and-forward thread, which tags its records with a sequence number
    /// and never falls back (the record is already in the spool).
    Forward {
        seq: u64,
        tx: Sender<(u64, PublishResult)>,
    },
}

impl Answer {
    /// Answers without the fallback spool: for a failure that storing the message
    /// locally cannot cure (the topic is too small for it), the sender retrying later is.
    fn refuse(self, result: PublishResult) {
        match self {
            Answer::Session { done, .. } => done.complete(result),
            Answer::Forward { seq, tx } => {
                let _ = tx.send((seq, result));
            }
        }
    }

    /// `at`: the partition and offset of a delivered record.
    fn answer(self, shared: &Shared, result: PublishResult, at: Option<(i32, i64)>) {
        match self {
            Answer::Session { done, keep } => match (result, keep, &shared.fallback) {
                (Err(PublishError::Temporary(why)), Some(msg), Some(fallback)) => {
                    tracing::debug!(id = %msg.id, %why, "kafka failed the message; storing it in the fallback spool");
                    shared.stored_in_fallback(&why);
                    fallback.submit(msg, done.into_fallback());
                }
                (result, _, fallback) => {
                    if result.is_ok() && fallback.is_some() {
                        shared.stored_in_kafka();
                    }
                    match at {
                        Some((partition, offset)) => done.at_kafka(partition, offset),
                        None => done,
                    }
                    .complete(result)
                }
            },
            Answer::Forward { seq, tx } => {
                let _ = tx.send((seq, result));
            }
        }
    }
}

enum Notice {
    /// A producer reported an error: is the current one failed for good?
    Check,
    /// The current producer's requests keep failing (see [`Liveness`]).
    Stuck,
    Stop,
}

/// How a failed delivery bears on whether the producer itself still works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Liveness {
    /// The broker answered, but refuses this producer's state (fenced, bad epoch,
    /// unknown producer id, sequence out of order): librdkafka surfaces these only
    /// when it cannot recover by itself, so only a new producer gets out of it.
    Rejected,
    /// Nothing acknowledged the message within the publish timeout. If a broker
    /// answers metadata meanwhile, the producer is stuck; if none does, it is an
    /// outage, and the producer is replaced once a broker answers again.
    NoAck,
}

fn liveness(error: &KafkaError) -> Option<Liveness> {
    match error.rdkafka_error_code()? {
        RDKafkaErrorCode::ProducerFenced
        | RDKafkaErrorCode::InvalidProducerEpoch
        | RDKafkaErrorCode::UnknownProducerId
        | RDKafkaErrorCode::OutOfOrderSequenceNumber
        | RDKafkaErrorCode::InvalidProducerIdMapping
        | RDKafkaErrorCode::Fatal => Some(Liveness::Rejected),
        RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::RequestTimedOut => {
            Some(Liveness::NoAck)
        }
        _ => None,
    }
}

/// A run of liveness failures of the current producer with no delivery in between.
#[derive(Debug, Default)]
struct Streak {
    started: Option<Instant>,
    failures: u64,
    last_warning: Option<Instant>,
    /// What the supervisor should act on; cleared when it replaces the producer.
    suspect: Option<Liveness>,
    replacements: u32,
    /// No replacement before this, so a cluster that rejects every new producer
    /// does not make the gateway build one after another.
    next_replacement: Option<Instant>,
}

/// A streak's warning is repeated at most this often, with the count so far.
const STREAK_WARNING_INTERVAL: Duration = Duration::from_secs(10);
const FIRST_REPLACEMENT_BACKOFF: Duration = Duration::from_secs(1);
const MAX_REPLACEMENT_BACKOFF: Duration = Duration::from_secs(30);

/// State shared by the sink, its supervisor and every producer's callbacks.
struct Shared {
    /// Store-and-forward: whether the latest session message went to the fallback
    /// spool, and how many went there since it began (for the lines that say when
    /// mail starts and stops going there).
    fallback_active: AtomicBool,
    fallback_stored: AtomicU64,
    healthy: AtomicBool,
    closed: AtomicBool,
    /// Which producer is current; callbacks of a retired one must not flip health.
    generation: AtomicU64,
    inflight_messages: AtomicUsize,
    /// The most messages in flight at once since the flusher last looked: it tells
    /// load by how many were in flight together during one of its flushes.
    peak_inflight: AtomicUsize,
    inflight_bytes: AtomicUsize,
    notices: Sender<Notice>,
    /// The current producer's latest librdkafka statistics.
    stats: Mutex<Option<SinkStats>>,
    /// Set while a [`Streak`] runs, so a delivery checks the mutex only then.
    streak_active: AtomicBool,
    streak: Mutex<Streak>,
    /// Where a session's message goes when Kafka fails it temporarily.
    fallback: Option<Arc<dyn Sink>>,
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

impl Shared {
    /// A session message goes to the fallback spool: the first of a run says so.
    fn stored_in_fallback(&self, why: &str) {
        self.fallback_stored.fetch_add(1, Ordering::Relaxed);
        if !self.fallback_active.load(Ordering::Relaxed)
            && !self.fallback_active.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                why,
                "store-and-forward: Kafka could not take a message; mail goes to the fallback spool (250 after fdatasync) until it can"
            );
        }
    }

    /// Kafka acknowledged a session message: a run of fallback storage ends here.
    fn stored_in_kafka(&self) {
        // A plain load keeps the common case free of a read-modify-write.
        if self.fallback_active.load(Ordering::Relaxed)
            && self.fallback_active.swap(false, Ordering::AcqRel)
        {
            let stored = self.fallback_stored.swap(0, Ordering::AcqRel);
            tracing::info!(
                stored,
                "store-and-forward: mail goes to Kafka again; the messages stored in the fallback spool meanwhile are being forwarded"
            );
        }
    }

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
            } else if self.fallback.is_some() {
                tracing::warn!(
                    why,
                    "kafka sink not ready: storing messages in the fallback spool until a broker is back"
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

/// The producer's callbacks. One per producer, tagged with its generation.
struct GatewayContext {
    shared: Arc<Shared>,
    generation: u64,
}

impl ClientContext for GatewayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    // rdkafka calls this twice for each error event on a producer (once while polling
    // the queue, once in the producer's poll), so everything here is idempotent. A
    // fatal error arrives with the code of its cause (e.g. OUT_OF_ORDER_SEQUENCE_NUMBER),
    // not as `Fatal`, so the supervisor checks the client itself after any error.
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.keep_stats(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.shared
                    .set_healthy(self.generation, false, "all brokers down")
            }
            Some(RDKafkaErrorCode::Authentication) => {
                self.shared
                    .set_healthy(self.generation, false, "authentication failed")
            }
            _ => tracing::debug!(target: "librdkafka", %error, reason, "kafka client error"),
        }
        let _ = self.shared.notices.send(Notice::Check);
    }
}

/// How often librdkafka reports its statistics: cheap, and fresh enough for a scrape.
const STATISTICS_INTERVAL_MS: &str = "1000";

impl GatewayContext {
    fn keep_stats(&self, statistics: &rdkafka::Statistics) {
        if self.generation != self.shared.generation.load(Ordering::Acquire) {
            return;
        }
        let mut broker_rtt: Vec<(String, f64)> = statistics
            .brokers
            .values()
            // Negative ids are bootstrap and coordinator pseudo-brokers.
            .filter(|b| b.nodeid >= 0)
            .filter_map(|b| Some((b.name.clone(), b.rtt.as_ref()?.avg as f64 / 1e6)))
            .collect();
        broker_rtt.sort_by(|a, b| a.0.cmp(&b.0));
        let stats = SinkStats {
            queue_messages: statistics.msg_cnt,
            queue_bytes: statistics.msg_size,
            broker_rtt,
            ..SinkStats::default()
        };
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(stats);
    }
}

impl ProducerContext for GatewayContext {
    type DeliveryOpaque = Box<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, inflight: Box<InFlight>) {
        self.shared.sub_inflight(inflight.bytes);
        let InFlight { answer, id, bytes } = *inflight;
        match result {
            Ok(record) => {
                self.shared.delivered(self.generation);
                let at = (
                    rdkafka::Message::partition(record),
                    rdkafka::Message::offset(record),
                );
                answer.answer(&self.shared, Ok(id), Some(at));
            }
            Err((error, _)) => {
                tracing::debug!(%id, %error, "kafka delivery failed");
                if error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
                    && matches!(answer, Answer::Session { .. })
                    && bytes <= self.shared.max_record_value.load(Ordering::Relaxed)
                {
                    // The session took it within the SIZE we advertised, so the topic's
                    // limit dropped since it was read: the operator's to fix, not the
                    // sender's. 451 (no fallback: the spool could not forward it either),
                    // and read the limit again (SIZE follows it with `auto`).
                    let _ = self.shared.reread.try_send(());
                    answer.refuse(Err(PublishError::Temporary(Cow::Borrowed(TOPIC_TOO_SMALL))));
                    return;
                }
                if let Some(kind) = liveness(error) {
                    self.shared.liveness_failure(self.generation, kind, error);
                }
                answer.answer(&self.shared, Err(classify(error)), None);
            }
        }
    }
}

/// The answer for a message librdkafka refused or could not deliver. Only a size
/// refusal is permanent; everything else is the gateway's trouble, so `451`.
fn classify(error: &KafkaError) -> PublishError {
    let reason = match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => return PublishError::TooLarge,
        Some(RDKafkaErrorCode::QueueFull) => QUEUE_FULL,
        Some(RDKafkaErrorCode::MessageTimedOut) | Some(RDKafkaErrorCode::RequestTimedOut) => {
            TIMED_OUT
        }
        Some(RDKafkaErrorCode::Fatal)
        | Some(RDKafkaErrorCode::ProducerFenced)
        | Some(RDKafkaErrorCode::InvalidProducerEpoch)
        | Some(RDKafkaErrorCode::OutOfOrderSequenceNumber) => PRODUCER_FAILED,
        Some(RDKafkaErrorCode::PurgeQueue) | Some(RDKafkaErrorCode::PurgeInflight) => ABORTED,
        Some(RDKafkaErrorCode::UnknownTopic) | Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
            UNKNOWN_TOPIC
        }
        Some(RDKafkaErrorCode::AllBrokersDown)
        | Some(RDKafkaErrorCode::BrokerTransportFailure)
        | Some(RDKafkaErrorCode::Authentication) => UNAVAILABLE,
        _ => FAILED,
    };
    PublishError::Temporary(Cow::Borrowed(reason))
}

type GatewayProducer = ThreadedProducer<GatewayContext>;

struct Inner {
    shared: Arc<Shared>,
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
    shared: &Arc<Shared>,
    generation: u64,
) -> Result<GatewayProducer, KafkaSinkError> {
    let context = GatewayContext {
        shared: Arc::clone(shared),
        generation,
    };
    ThreadedProducer::from_config_and_context(config, context).map_err(KafkaSinkError::Producer)
}

impl KafkaSink {
    /// Creates the producer, probes the cluster (bounded by `startup_timeout`) and
    /// starts the supervisor. No reachable broker is not an error: the sink starts
    /// unhealthy and becomes ready when a broker answers.
    pub fn new(options: &KafkaOptions) -> Result<KafkaSink, KafkaSinkError> {
        Self::with_fallback(options, None)
    }

    /// As [`KafkaSink::new`]; a session's message that Kafka cannot take now (sink
    /// unavailable, queue full, temporary delivery failure, publish timeout) is handed
    /// to `fallback`, whose answer the session gets instead of `451`.
    pub fn with_fallback(
        options: &KafkaOptions,
        fallback: Option<Arc<dyn Sink>>,
    ) -> Result<KafkaSink, KafkaSinkError> {
        let config = options.client_config()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (reread, rereads) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            fallback_active: AtomicBool::new(false),
            fallback_stored: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            inflight_messages: AtomicUsize::new(0),
            peak_inflight: AtomicUsize::new(0),
            inflight_bytes: AtomicUsize::new(0),
            notices: tx,
            stats: Mutex::new(None),
            streak_active: AtomicBool::new(false),
            streak: Mutex::new(Streak::default()),
            fallback,
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
        Ok(KafkaSink {
            inner,
            supervisor: Mutex::new(Some(supervisor)),
            flusher: Mutex::new(Some(flusher)),
            limits: Mutex::new(Some(limits)),
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

    /// Messages and bytes handed to librdkafka and not yet answered.
    pub fn inflight(&self) -> (usize, usize) {
        let shared = &self.inner.shared;
        (
            shared.inflight_messages.load(Ordering::Relaxed),
            shared.inflight_bytes.load(Ordering::Relaxed),
        )
    }

    /// How many times the producer has been replaced after a fatal error.
    pub fn producer_generation(&self) -> u64 {
        self.inner.shared.generation.load(Ordering::Acquire)
    }
}

/// Asks the cluster for the topic's metadata; an answer proves a broker is up. Notes
/// the topic's partition count for `--kafka-partition-key`.
fn probe(producer: &GatewayProducer, topic: &str, timeout: Duration, shared: &Shared) -> bool {
    match producer.client().fetch_metadata(Some(topic), timeout) {
        Ok(metadata) => {
            if let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) {
                if let Some(error) = t.error() {
                    tracing::warn!(topic, error = ?RDKafkaErrorCode::from(error), "kafka topic not usable; messages will get 451");
                } else {
                    shared
                        .partitions
                        .store(t.partitions().len(), Ordering::Relaxed);
                }
            }
            true
        }
        Err(error) => {
            tracing::debug!(%error, "kafka probe failed");
            false
        }
    }
}

/// The cluster's limit for records to `topic`: the topic's `max.message.bytes`, else
/// the broker's `message.max.bytes` (what a topic without its own inherits); `None` if
/// the cluster does not say in time.
fn read_topic_limit(config: &ClientConfig, topic: &str, timeout: Duration) -> Option<usize> {
    // The admin API answers with a future. Run it on a runtime of its own on a thread
    // of its own, so that creating the sink from inside a tokio runtime cannot panic
    // with a nested `block_on`.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("smtpgw-kafka-admin".into())
            .spawn_scoped(scope, || describe_limit(config, topic, timeout))
            .map_err(|error| tracing::warn!(%error, "cannot start the kafka admin thread"))
            .ok()?
            .join()
            .ok()?
    })
}

/// A size setting's value in a described resource.
fn config_size(resource: &ConfigResource, name: &str) -> Option<usize> {
    resource
        .get(name)
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.trim().parse::<usize>().ok())
}

/// The topic's `max.message.bytes` if it has one, else (asking only then) the
/// broker's `message.max.bytes`. Apache Kafka reports the inherited value as the
/// topic's; brokers that list only explicit topic settings (tansu) need the second.
fn limit_of(
    topic: Option<&ConfigResource>,
    broker: impl FnOnce() -> Option<ConfigResource>,
) -> Option<usize> {
    topic
        .and_then(|t| config_size(t, "max.message.bytes"))
        .or_else(|| config_size(&broker()?, "message.max.bytes"))
}

fn describe_limit(config: &ClientConfig, topic: &str, timeout: Duration) -> Option<usize> {
    let admin: AdminClient<DefaultClientContext> = match config.create() {
        Ok(admin) => admin,
        Err(error) => {
            tracing::warn!(%error, "cannot create the kafka admin client");
            return None;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            tracing::warn!(%error, "cannot start a runtime for the kafka admin client");
            return None;
        }
    };
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let describe = |resource: ResourceSpecifier<'_>| -> Option<ConfigResource> {
        let result = runtime.block_on(async {
            tokio::time::timeout(
                timeout + Duration::from_millis(500),
                admin.describe_configs([&resource], &opts),
            )
            .await
        });
        match result {
            Ok(Ok(results)) => results.into_iter().find_map(|r| {
                r.map_err(|code| {
                    tracing::warn!(?resource, error = %code, "kafka cannot describe the configuration")
                })
                .ok()
            }),
            Ok(Err(error)) => {
                tracing::warn!(?resource, %error, "kafka cannot describe the configuration");
                None
            }
            Err(_) => {
                tracing::warn!(?resource, "kafka did not describe the configuration in time");
                None
            }
        }
    };
    let described = describe(ResourceSpecifier::Topic(topic));
    let found = limit_of(described.as_ref(), || {
        // Any broker serves: message.max.bytes is a cluster-wide default.
        let metadata = admin.inner().fetch_metadata(Some(topic), timeout).ok()?;
        let id = metadata.brokers().first()?.id();
        describe(ResourceSpecifier::Broker(id))
    });
    if found.is_none() {
        tracing::warn!(
            topic,
            "neither the topic's max.message.bytes nor the broker's message.max.bytes is known; using the producer's message.max.bytes only"
        );
    }
    found
}

/// What the sink holds to after a reading of the topic's limit (`topic_max`), given
/// the value it advertises now: `(max_record_value, shortfall)`.
///
/// With `--max-message-size auto` (or no size to hold: a library caller) the advertised
/// value follows the topic, up to what the producer takes. Without it, the advertised
/// value stays (the operator set it, and SIZE changing under the senders would bounce
/// mail they already sized): a topic that fell below what `--max-message-size` needs is
/// the shortfall, the largest value that still fits.
fn next_limits(
    topic_max: usize,
    options: &KafkaOptions,
    advertised: usize,
) -> (usize, Option<usize>) {
    let fits = value_limit(
        topic_max.min(options.producer_message_max_bytes()),
        options.max_recipients,
    );
    match options.max_value {
        Some(needed) if !options.fit_topic => (advertised, (fits < needed).then_some(fits)),
        _ => (fits, None),
    }
}

/// The limit reader's thread: each wake (a broker seen again after an outage, a new
/// producer, a size refusal the sink did not expect) reads the topic's limit and
/// applies it. Ends once the sink is closed.
fn follow_topic_limit(
    shared: &Shared,
    config: &ClientConfig,
    options: &KafkaOptions,
    rereads: &Receiver<()>,
) {
    while rereads.recv().is_ok() {
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let read = read_topic_limit(config, options.topic(), options.startup_timeout);
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        match read {
            Some(topic_max) => shared.apply_topic_limit(topic_max, options),
            None => tracing::debug!("kafka topic limit not read; the last one stays"),
        }
    }
}

impl Shared {
    /// Applies a reading of the topic's limit (see [`next_limits`]), saying what changed.
    fn apply_topic_limit(&self, topic_max: usize, options: &KafkaOptions) {
        self.topic_max.store(topic_max, Ordering::Release);
        let advertised = self.max_record_value.load(Ordering::Acquire);
        let (value, shortfall) = next_limits(topic_max, options, advertised);
        let topic = options.topic();
        if value != advertised {
            self.max_record_value.store(value, Ordering::Release);
            tracing::warn!(
                topic,
                topic_max_message_bytes = topic_max,
                max_record_value = value,
                was = advertised,
                "--max-message-size auto: the kafka topic's limit changed; new sessions advertise the SIZE it holds"
            );
            for watch in self
                .size_watch
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
            {
                watch();
            }
        }
        let limit = shortfall.unwrap_or(usize::MAX);
        let before = self.topic_value_limit.swap(limit, Ordering::AcqRel);
        match (shortfall, options.max_value) {
            (Some(fits), Some(needed)) if before != limit => {
                let too_small = KafkaSinkError::TopicTooSmall {
                    topic: topic.to_owned(),
                    topic_max,
                    needed: limit_for_value(needed, options.max_recipients),
                };
                tracing::error!(
                    topic,
                    topic_max_message_bytes = topic_max,
                    max_record_value = fits,
                    "{too_small}; until then, messages over {fits} bytes get 451 (SIZE stays)"
                );
            }
            (None, _) if before != usize::MAX => tracing::info!(
                topic,
                topic_max_message_bytes = topic_max,
                "kafka topic holds --max-message-size again; no more 451 for size"
            ),
            _ => {}
        }
    }
}

/// The supervisor: replaces a producer after a fatal error or when it is stuck (see
/// [`Liveness`]), and probes the cluster while no broker is known to be up. It sleeps
/// on its channel: errors, stuck deliveries and shutdown wake it; the clock only paces
/// the probes and the replacement backoff.
fn supervise(inner: &Arc<Inner>, notices: &Receiver<Notice>) {
    // Probes are paced by the clock, not by notices: every failed connection attempt
    // raises an error (and a notice), and probing on each would make librdkafka
    // reconnect to a dead broker many times a second.
    let mut last_probe: Option<Instant> = None;
    loop {
        // Right after a replacement (no probe yet) a not-ready sink probes at once.
        let wait = if last_probe.is_none() && !inner.shared.healthy.load(Ordering::Acquire) {
            Duration::ZERO
        } else {
            PROBE_INTERVAL
        };
        match notices.recv_timeout(wait) {
            Ok(Notice::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            // A notice from a retired producer needs no action; checking the current
            // one costs an atomic load.
            Ok(Notice::Check | Notice::Stuck) | Err(RecvTimeoutError::Timeout) => {}
        }
        let shared = &inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(producer) = current_producer(inner) else {
            return;
        };
        let generation = shared.generation.load(Ordering::Acquire);
        let producer = if let Some((code, reason)) = producer.client().fatal_error() {
            drop(producer);
            shared.set_healthy(generation, false, "fatal producer error");
            tracing::error!(%code, reason, "kafka producer hit a fatal error");
            replace_producer(inner, generation, false);
            // Probe the new producer now rather than a second later: until it has
            // seen a broker the sink refuses mail.
            last_probe = None;
            match current_producer(inner) {
                Some(p) => p,
                None => return,
            }
        } else {
            producer
        };
        let suspect = {
            let streak = shared.streak.lock().unwrap_or_else(PoisonError::into_inner);
            match streak.suspect {
                Some(kind) if streak.next_replacement.is_none_or(|t| Instant::now() >= t) => {
                    Some(kind)
                }
                _ => None,
            }
        };
        let due = last_probe.is_none_or(|t| t.elapsed() >= PROBE_INTERVAL);
        match suspect {
            // The broker refused the producer: it answers, so replace at once, and
            // probe with the new producer right away: it takes mail once it has seen
            // a broker.
            Some(Liveness::Rejected) => {
                drop(producer);
                replace_producer(inner, generation, false);
                last_probe = Some(Instant::now());
                if let Some(new) = current_producer(inner) {
                    if probe(&new, inner.options.topic(), PROBE_TIMEOUT, shared) {
                        let generation = shared.generation.load(Ordering::Acquire);
                        shared.set_healthy(generation, true, "broker answered");
                    }
                }
            }
            // Nothing was acknowledged in time. If a broker answers, the producer is
            // stuck: replace it (the broker has just answered, so the new one takes
            // mail at once). If none does, this is an outage like any other: not
            // ready, and the producer is replaced once a broker answers again.
            Some(Liveness::NoAck) if due => {
                last_probe = Some(Instant::now());
                if probe(&producer, inner.options.topic(), PROBE_TIMEOUT, shared) {
                    drop(producer);
                    replace_producer(inner, generation, true);
                } else {
                    shared.set_healthy(
                        generation,
                        false,
                        "nothing acknowledged within the publish timeout and no broker answers",
                    );
                }
            }
            None if due && !shared.healthy.load(Ordering::Acquire) => {
                last_probe = Some(Instant::now());
                // A producer under suspicion stays out of service even though the
                // broker answers; its replacement is only waiting out its backoff.
                let suspected = shared
                    .streak
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .suspect
                    .is_some();
                if probe(&producer, inner.options.topic(), PROBE_TIMEOUT, shared) && !suspected {
                    shared.set_healthy(generation, true, "broker answered");
                }
            }
            _ => {}
        }
    }
}

/// The flusher thread: for each wake (a message that found nothing else in flight),
/// flushes the current producer for at most [`FLUSH_WAIT`], so librdkafka sends at once
/// instead of after `linger.ms`. It holds the sink weakly: it ends when the sink is
/// dropped (the channel closes) or shut down.
fn flush_when_idle(inner: &std::sync::Weak<Inner>, kicks: &Receiver<()>) {
    while kicks.recv().is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.shared.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(producer) = current_producer(&inner) else {
            return;
        };
        let shared = Arc::clone(&inner.shared);
        drop(inner);
        let wait_ms = FLUSH_WAIT.as_millis() as i32;
        shared.peak_inflight.store(
            shared.inflight_messages.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        // SAFETY: the pointer is the live producer's (held by `producer` for the whole
        // call); rd_kafka_flush may be called from any thread, and with delivery
        // reports as events (as rust-rdkafka sets them) it only waits for the count of
        // unacknowledged messages to reach zero; the polling thread still serves them.
        unsafe {
            rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), wait_ms);
        }
        drop(producer);
        let peak = shared.peak_inflight.load(Ordering::Relaxed);
        if peak > FLUSH_LOAD {
            tracing::debug!(peak, "kafka flusher: load; holding off");
            // Not low load: let linger.ms batch. A wake that came meanwhile is stale.
            std::thread::sleep(FLUSH_HOLDOFF);
            let _ = kicks.try_recv();
            // The wake just dropped may have been shutdown's: it sets `closed` before
            // it wakes, and joins this thread, which must not wait for another wake.
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

fn current_producer(inner: &Inner) -> Option<Arc<GatewayProducer>> {
    inner
        .producer
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Swaps in a new producer if `generation` is still the current one, and retires the
/// old one on a thread of its own, which answers everything it held. The sink is ready
/// at once if `broker_answered` (a probe just succeeded), else after the next probe.
fn replace_producer(inner: &Arc<Inner>, generation: u64, broker_answered: bool) {
    let shared = &inner.shared;
    let mut slot = inner
        .producer
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    if slot.is_none() {
        return; // shut down
    }
    if shared.generation.load(Ordering::Acquire) != generation {
        return; // already replaced
    }
    let next = generation + 1;
    let new = match new_producer(&inner.config, shared, next) {
        Ok(new) => Arc::new(new),
        Err(error) => {
            // Keep the failed one; the supervisor tries again on its next round.
            tracing::error!(%error, "cannot replace the failed kafka producer");
            return;
        }
    };
    {
        let mut streak = shared.streak.lock().unwrap_or_else(PoisonError::into_inner);
        streak.suspect = None;
        let backoff = FIRST_REPLACEMENT_BACKOFF
            .saturating_mul(1 << streak.replacements.min(5))
            .min(MAX_REPLACEMENT_BACKOFF);
        streak.replacements += 1;
        streak.next_replacement = Some(Instant::now() + backoff);
    }
    if !broker_answered {
        // Not ready until the new producer has seen a broker.
        shared.healthy.store(false, Ordering::Release);
    }
    shared.generation.store(next, Ordering::Release);
    if broker_answered {
        shared.set_healthy(next, true, "broker answered");
    }
    let answer = if shared.fallback.is_some() {
        "go to the fallback spool"
    } else {
        "get 451"
    };
    tracing::warn!(
        generation = next,
        "new kafka producer in place; the old one's unacknowledged messages {answer}"
    );
    let old = slot.replace(new);
    drop(slot);
    // A new producer is a new connection: read the topic's limit again with it.
    let _ = shared.reread.try_send(());
    if let Some(old) = old {
        let timeout = inner.options.publish_timeout();
        let spawned = std::thread::Builder::new()
            .name("smtpgw-kafka-retire".into())
            .spawn(move || drain(old, timeout));
        match spawned {
            Ok(handle) => inner
                .retiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(handle),
            Err(error) => {
                tracing::error!(%error, "cannot start a thread to drain the old producer")
            }
        }
    }
}

/// Waits for a producer's outstanding deliveries (bounded by `timeout`), fails what
/// is left, serves those delivery reports and drops the producer. Every message the
/// producer held has been answered when this returns.
fn drain(producer: Arc<GatewayProducer>, timeout: Duration) {
    if let Err(error) = producer.flush(timeout) {
        tracing::warn!(%error, pending = producer.in_flight_count(), "kafka flush incomplete; failing the rest with 451");
        producer.purge(PurgeConfig::default().queue().inflight());
        if let Err(error) = producer.flush(AFTER_PURGE_FLUSH) {
            tracing::error!(%error, pending = producer.in_flight_count(), "kafka delivery reports missing after purge");
        }
    }
    // Submitters release their clone right after `send`; wait for them so that the
    // producer (and its polling thread) is torn down here, not on a reactor thread.
    let deadline = Instant::now() + AFTER_PURGE_FLUSH;
    let mut producer = producer;
    loop {
        match Arc::try_unwrap(producer) {
            Ok(p) => {
                drop(p);
                return;
            }
            Err(p) if Instant::now() < deadline => {
                producer = p;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return,
        }
    }
}

impl KafkaSink {
    /// Hands one record to librdkafka; `answer` gets the delivery report, or an answer
    /// at once if the sink is unavailable or librdkafka refuses the record.
    pub(crate) fn publish(
        &self,
        id: MessageId,
        timestamp_ms: i64,
        headers: Option<OwnedHeaders>,
        value: &[u8],
        partition: Option<i32>,
        answer: Answer,
    ) {
        let inner = &self.inner;
        let shared = &inner.shared;
        if value.len() > shared.topic_value_limit.load(Ordering::Relaxed)
            && matches!(answer, Answer::Session { .. })
        {
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
        let mut key = [0u8; ulid::ULID_LEN];
        let key = id.array_to_str(&mut key);
        let bytes = value.len();
        let mut record = BaseRecord::with_opaque_to(
            inner.options.topic(),
            Box::new(InFlight { answer, id, bytes }),
        )
        .key(key.as_bytes())
        .payload(value)
        .timestamp(timestamp_ms);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        let idle = shared.add_inflight(bytes);
        let sent = producer.send(record);
        if idle && sent.is_ok() {
            // Nothing else in flight: send now rather than after linger.ms.
            let _ = inner.kick.try_send(());
        }
        if let Err((error, record)) = sent {
            drop(slot);
            shared.sub_inflight(bytes);
            if !matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::QueueFull)
            ) {
                tracing::debug!(%id, %error, "kafka refused the message");
            }
            record
                .delivery_opaque
                .answer
                .answer(shared, Err(classify(&error)), None);
        }
    }

    /// Publishes a spooled record exactly as [`Sink::submit`] published the message:
    /// same key, value, headers and timestamp. The result goes to `tx` tagged `seq`.
    pub(crate) fn forward(
        &self,
        record: &crate::sink::spool::SpoolRecord,
        seq: u64,
        tx: Sender<(u64, PublishResult)>,
    ) {
        self.publish_spooled(record, Answer::Forward { seq, tx });
    }

    /// Publishes a spooled record with its original key, value, headers and timestamp.
    fn publish_spooled(&self, record: &crate::sink::spool::SpoolRecord, answer: Answer) {
        let headers = owned_headers(record.headers.len(), |add| {
            for (name, value) in &record.headers {
                add(name, value);
            }
        });
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map_or(&[][..], |(_, v)| v.as_slice())
        };
        let partition = self.partition_for(header("smtp.mail_from"), || header("smtp.rcpt_to"));
        self.publish(
            record.id,
            record.received_at.timestamp_millis(),
            headers,
            record.value(),
            partition,
            answer,
        );
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
    /// Whether session messages go to the fallback spool now (the latest one did).
    pub fn fallback_active(&self) -> bool {
        self.inner.shared.fallback_active.load(Ordering::Relaxed)
    }

    fn ready(&self) -> bool {
        let shared = &self.inner.shared;
        shared.healthy.load(Ordering::Acquire) && !shared.closed.load(Ordering::Acquire)
    }
}

/// Builds librdkafka headers from name/value pairs, in order.
fn owned_headers(
    capacity: usize,
    pairs: impl FnOnce(&mut dyn FnMut(&str, &[u8])),
) -> Option<OwnedHeaders> {
    // `insert` consumes and returns the list, hence the Option dance.
    let mut headers = Some(OwnedHeaders::new_with_capacity(capacity));
    pairs(&mut |key, value| {
        headers = headers.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    });
    headers
}

/// CRC-32C of the address's domain (after its last `@`; the whole address without
/// one, empty for the null sender), lower-cased, modulo `partitions`. docs/record.md
/// states it so that consumers can compute it too.
pub fn domain_partition(address: &[u8], partitions: usize) -> Option<i32> {
    if partitions == 0 {
        return None;
    }
    let domain = address
        .iter()
        .rposition(|&b| b == b'@')
        .map_or(address, |at| &address[at + 1..]);
    let crc = domain.iter().fold(0u32, |crc, b| {
        crc32c::crc32c_append(crc, &[b.to_ascii_lowercase()])
    });
    i32::try_from(crc as usize % partitions).ok()
}

impl Sink for KafkaSink {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        let headers = owned_headers(11 + msg.envelope.rcpt_count(), |add| {
            msg.for_each_header(|name, value| add(name, value))
        });
        let (id, timestamp_ms) = (msg.id, msg.received_at.timestamp_millis());
        let env = &msg.envelope;
        let partition = self.partition_for(env.mail_from().as_bytes(), || {
            env.rcpt_to().next().map_or(&[][..], str::as_bytes)
        });
        // A reference-counted handle, not a copy of the bytes.
        let value = msg.value.clone();
        // Only a fallback needs the message after librdkafka has copied it.
        let keep = self.inner.shared.fallback.is_some().then_some(msg);
        self.publish(
            id,
            timestamp_ms,
            headers,
            &value,
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
        join_logged(&self.flusher, "kafka flusher");
        join_logged(&self.supervisor, "kafka supervisor");
        join_logged(&self.limits, "kafka limit reader");
        let producer = inner
            .producer
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
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
        Some(stats)
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Messages `spool replay` keeps in flight at once: enough to batch well, few enough
/// to bound memory by what librdkafka copies.
const REPLAY_WINDOW: usize = 1000;

#[derive(thiserror::Error, Debug)]
pub enum ReplayError {
    #[error(transparent)]
    Spool(#[from] crate::sink::spool::SpoolError),
    #[error(transparent)]
    Sink(#[from] KafkaSinkError),
    #[error("no Kafka broker answered at {brokers} within {waited:?}")]
    Unreachable { brokers: String, waited: Duration },
}

/// What `spool replay` did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub published: u64,
    /// Messages Kafka did not acknowledge, with why. Replaying again is safe.
    pub failed: Vec<(MessageId, PublishError)>,
}

/// Publishes every record of the spool in `dir`, oldest first, with the key, value,
/// headers and timestamp the gateway would have given it, so a message replayed twice
/// (or replayed after it reached Kafka live) has the same key and consumers can drop
/// the copy by `smtp.id`. Waits up to the publish timeout for a broker.
pub fn replay_spool(
    dir: &std::path::Path,
    options: &KafkaOptions,
) -> Result<ReplayReport, ReplayError> {
    // Open the spool first: a wrong directory should not wait for a broker.
    let mut records = crate::sink::spool::read_all(dir)?;
    let mut failed = None;
    let report = replay_records(
        std::iter::from_fn(|| match records.next()? {
            Ok(record) => Some(record),
            Err(e) => {
                failed = Some(e);
                None
            }
        }),
        options,
    )?;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(report),
    }
}

/// [`replay_spool`] for records the caller reads (`spool replay --skip-corrupt` skips
/// damaged ranges on the way).
pub fn replay_records(
    records: impl IntoIterator<Item = crate::sink::spool::SpoolRecord>,
    options: &KafkaOptions,
) -> Result<ReplayReport, ReplayError> {
    use std::collections::VecDeque;

    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    let sink = KafkaSink::new(options)?;
    let deadline = Instant::now() + options.publish_timeout();
    while !sink.is_healthy() {
        if Instant::now() >= deadline {
            return Err(ReplayError::Unreachable {
                brokers: options.settings.brokers().to_owned(),
                waited: options.publish_timeout(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut report = ReplayReport::default();
    let mut window: VecDeque<(MessageId, UnboundedReceiver<PublishResult>)> =
        VecDeque::with_capacity(REPLAY_WINDOW);
    let settle = |report: &mut ReplayReport,
                  (id, mut rx): (MessageId, UnboundedReceiver<PublishResult>)| {
        match rx.blocking_recv() {
            Some(Ok(_)) => report.published += 1,
            Some(Err(e)) => report.failed.push((id, e)),
            None => report
                .failed
                .push((id, PublishError::Temporary(Cow::Borrowed(FAILED)))),
        }
    };
    for record in records {
        while window.len() >= REPLAY_WINDOW {
            if let Some(pending) = window.pop_front() {
                settle(&mut report, pending);
            }
        }
        let (tx, rx) = unbounded_channel();
        sink.publish_spooled(
            &record,
            Answer::Session {
                done: Completion::new(tx),
                keep: None,
            },
        );
        window.push_back((record.id, rx));
    }
    while let Some(pending) = window.pop_front() {
        settle(&mut report, pending);
    }
    sink.shutdown();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_limit_for_a_value_is_the_least_that_holds_it() {
        for recipients in [1, 100, 1000] {
            for value in [1, 1000, 936_625, 10 << 20, 25 << 20, 100 << 20] {
                let limit = limit_for_value(value, recipients);
                assert!(
                    value_limit(limit, recipients) >= value,
                    "{value} in {limit}"
                );
                assert!(
                    value_limit(limit - 2, recipients) < value,
                    "{limit} is more than {value} needs"
                );
            }
        }
        assert_eq!(
            limit_for_value(usize::MAX, 100),
            LIBRDKAFKA_MAX_MESSAGE_BYTES
        );
    }

    #[test]
    fn a_topic_too_small_for_the_size_limit_is_refused_in_one_line() {
        let mut options = KafkaOptions::new(crate::config::Kafka::default(), 100);
        options.max_value = Some(10 << 20);
        let needed = limit_for_value(10 << 20, 100);
        assert!(
            check_topic_limit(None, &options).is_ok(),
            "unknown: no check"
        );
        assert!(check_topic_limit(Some(needed), &options).is_ok());
        let error = check_topic_limit(Some(1_048_588), &options)
            .expect_err("Apache Kafka's default topic limit holds no 10 MiB message")
            .to_string();
        assert_eq!(
            error,
            format!(
                "--max-message-size: kafka topic smtp.inbound takes records of at most max.message.bytes=1048588, \
                 and messages of --max-message-size need {needed}: raise the topic's max.message.bytes to {needed} \
                 (kafka-configs --alter --entity-type topics --entity-name smtp.inbound --add-config max.message.bytes={needed}) \
                 or lower --max-message-size"
            )
        );
        assert!(!error.contains('\n'));
        // --max-message-size auto: the same topic lowers the limit instead.
        options.fit_topic = true;
        assert!(check_topic_limit(Some(1_048_588), &options).is_ok());
        options.fit_topic = false;
        options.max_value = None;
        assert!(check_topic_limit(Some(1_048_588), &options).is_ok());
    }

    fn described(
        specifier: rdkafka::admin::OwnedResourceSpecifier,
        entries: &[(&str, &str)],
    ) -> ConfigResource {
        ConfigResource {
            specifier,
            entries: entries
                .iter()
                .map(|(name, value)| rdkafka::admin::ConfigEntry {
                    name: (*name).to_owned(),
                    value: Some((*value).to_owned()),
                    source: rdkafka::admin::ConfigSource::DynamicTopic,
                    is_read_only: false,
                    is_default: false,
                    is_sensitive: false,
                })
                .collect(),
        }
    }

    #[test]
    fn the_brokers_message_max_bytes_stands_in_for_a_topic_without_its_own() {
        use rdkafka::admin::OwnedResourceSpecifier::{Broker, Topic};
        let topic = |entries: &[(&str, &str)]| described(Topic("t".into()), entries);
        let broker = |entries: &[(&str, &str)]| Some(described(Broker(111), entries));
        // The topic's own setting wins, and the broker is not asked then.
        let own = topic(&[
            ("cleanup.policy", "delete"),
            ("max.message.bytes", "2000000"),
        ]);
        assert_eq!(
            limit_of(Some(&own), || panic!(
                "broker asked although the topic says"
            )),
            Some(2_000_000)
        );
        // tansu lists no entry for a topic created without one: the broker's default.
        let bare = topic(&[]);
        assert_eq!(
            limit_of(Some(&bare), || broker(&[("message.max.bytes", "3000000")])),
            Some(3_000_000)
        );
        // The topic could not be described at all: the broker's still counts.
        assert_eq!(
            limit_of(None, || broker(&[("message.max.bytes", "1048588")])),
            Some(1_048_588)
        );
        // Neither says (tansu's broker lists nothing), or says nonsense: unknown.
        assert_eq!(limit_of(Some(&bare), || broker(&[])), None);
        assert_eq!(limit_of(Some(&bare), || None), None);
        let junk = topic(&[("max.message.bytes", "lots")]);
        assert_eq!(
            limit_of(Some(&junk), || broker(&[("message.max.bytes", "500000")])),
            Some(500_000)
        );
        // The broker's name for it is not the topic's, and the other way round.
        assert_eq!(
            limit_of(Some(&topic(&[("message.max.bytes", "9")])), || broker(&[(
                "max.message.bytes",
                "9"
            )])),
            None
        );
    }

    #[test]
    fn a_changed_topic_limit_moves_size_with_auto_and_is_a_shortfall_without() {
        let mut options = KafkaOptions::new(crate::config::Kafka::default(), 100);
        let needed = 10 << 20;
        options.max_value = Some(needed);
        let fits = |topic: usize| value_limit(topic, 100);
        let big = limit_for_value(needed, 100) + 5_000_000;
        let advertised = fits(limit_for_value(needed, 100));

        // Without auto the advertised value stays; a topic too small is a shortfall
        // of exactly what it still holds, and one large enough again ends it.
        assert_eq!(
            next_limits(1_048_588, &options, advertised),
            (advertised, Some(fits(1_048_588)))
        );
        assert_eq!(next_limits(big, &options, advertised), (advertised, None));
        assert_eq!(
            next_limits(limit_for_value(needed, 100), &options, advertised),
            (advertised, None),
            "a topic that just holds --max-message-size is no shortfall"
        );

        // With auto the advertised value follows the topic both ways, up to what the
        // producer takes (sized for --max-message-size), and there is no shortfall.
        options.fit_topic = true;
        assert_eq!(
            next_limits(1_048_588, &options, advertised),
            (fits(1_048_588), None)
        );
        assert_eq!(
            next_limits(big, &options, fits(1_048_588)),
            (fits(options.producer_message_max_bytes()), None)
        );
        assert!(fits(options.producer_message_max_bytes()) >= needed);

        // A library caller with no size to hold follows the topic too.
        options.fit_topic = false;
        options.max_value = None;
        assert_eq!(
            next_limits(500_000, &options, advertised),
            (fits(500_000), None)
        );
    }

    #[test]
    fn message_max_bytes_follows_the_largest_value_unless_set() {
        let settings = crate::config::Kafka {
            kafka_brokers: Some("127.0.0.1:1".into()),
            ..Default::default()
        };
        let mut options = KafkaOptions::new(settings, 100);
        let get = |o: &KafkaOptions| {
            o.client_config()
                .expect("config")
                .get("message.max.bytes")
                .map(str::to_owned)
        };
        assert_eq!(
            get(&options),
            Some("1000000".into()),
            "librdkafka's default without a size"
        );
        options.max_value = Some(10 << 20);
        let limit = limit_for_value(10 << 20, 100);
        assert_eq!(get(&options), Some(limit.to_string()));
        assert!(limit > 10 << 20);
        options.settings.kafka_config = vec!["message.max.bytes=2000000".parse().expect("setting")];
        assert_eq!(get(&options), Some("2000000".into()));
        assert_eq!(options.producer_message_max_bytes(), 2_000_000);
    }
}
