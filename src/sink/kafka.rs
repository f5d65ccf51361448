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
//! | broker or librdkafka refused it as too large   | `TooLarge` → `552 5.3.4`       |
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
//! # Fatal errors
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
//! # Size
//!
//! At start-up the sink reads the topic's `max.message.bytes` (admin client, bounded
//! wait) and the producer's `message.max.bytes`; the smaller one, less the record
//! overhead (see [`record_overhead`]), is [`KafkaSink::max_record_value`].
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
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientContext;

use crate::sink::{Completion, PublishError, Sink, SinkStats};
use crate::smtp::command::MAX_COMMAND_LINE;
use crate::smtp::envelope::{MessageId, SealedMessage};

pub const DEFAULT_TOPIC: &str = "smtp.inbound";
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_INFLIGHT_MESSAGES: usize = 10_000;
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 256 << 20;
/// librdkafka's default `message.max.bytes`, used when the user does not set it.
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

/// Settings librdkafka must not take from `--kafka-config`, because the durability
/// promise or the sink's own flags depend on them.
const RESERVED_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "use --kafka-brokers"),
    ("metadata.broker.list", "use --kafka-brokers"),
    ("acks", "the gateway always uses acks=all"),
    ("request.required.acks", "the gateway always uses acks=all"),
    (
        "enable.idempotence",
        "the gateway always uses the idempotent producer",
    ),
    ("message.timeout.ms", "use --publish-timeout"),
    ("delivery.timeout.ms", "use --publish-timeout"),
    ("transactional.id", "the gateway does not use transactions"),
];

/// Why `--kafka-config KEY=...` is refused, if it is.
pub fn reserved_config(key: &str) -> Option<&'static str> {
    RESERVED_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, why)| *why)
}

const UNAVAILABLE: &str = "kafka unavailable";
const QUEUE_FULL: &str = "kafka queue full";
const TIMED_OUT: &str = "kafka publish timed out";
const PRODUCER_FAILED: &str = "kafka producer failed";
const ABORTED: &str = "kafka publish aborted";
const UNKNOWN_TOPIC: &str = "kafka topic unknown";
const FAILED: &str = "kafka publish failed";
const SHUT_DOWN: &str = "kafka sink is shut down";

/// Everything the Kafka sink is configured with.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    pub topic: String,
    /// `message.timeout.ms`: a message not acknowledged by then gets `451`.
    pub publish_timeout: Duration,
    /// Passed to librdkafka after the gateway's own settings (TLS, SASL, tuning).
    pub extra: Vec<(String, String)>,
    /// Above either limit [`Sink::over_inflight_limit`] says so.
    pub max_inflight_messages: usize,
    pub max_inflight_bytes: usize,
    /// The session's recipient limit: it bounds how many headers a record carries.
    pub max_recipients: usize,
    /// Bounds the start-up metadata and size probes.
    pub startup_timeout: Duration,
}

impl KafkaOptions {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaOptions {
            brokers: brokers.into(),
            topic: DEFAULT_TOPIC.to_owned(),
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            extra: Vec::new(),
            max_inflight_messages: DEFAULT_MAX_INFLIGHT_MESSAGES,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            max_recipients: 100,
            startup_timeout: STARTUP_PROBE_TIMEOUT,
        }
    }

    /// The producer configuration: the gateway's settings, then the user's.
    pub fn client_config(&self) -> Result<ClientConfig, KafkaSinkError> {
        for (key, _) in &self.extra {
            if let Some(why) = reserved_config(key) {
                return Err(KafkaSinkError::ReservedConfig {
                    key: key.clone(),
                    why,
                });
            }
        }
        let timeout_ms = self.publish_timeout.as_millis().max(1);
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
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
            // the reactors honour; sessions already past DATA can still add to it.
            .set(
                "queue.buffering.max.messages",
                self.max_inflight_messages
                    .saturating_mul(2)
                    .clamp(1, 10_000_000)
                    .to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                (self.max_inflight_bytes.saturating_mul(2) / 1024)
                    .clamp(1, i32::MAX as usize)
                    .to_string(),
            );
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        Ok(config)
    }

    fn producer_message_max_bytes(&self) -> usize {
        self.extra
            .iter()
            .rev()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(DEFAULT_PRODUCER_MESSAGE_MAX_BYTES)
    }
}

#[derive(thiserror::Error, Debug)]
pub enum KafkaSinkError {
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
/// - headers: 8 fixed ones plus one `smtp.rcpt_to` per recipient, each at most two
///   5-byte varints, a name of at most 16 bytes and a value of at most one command line
///   (512 octets; every header value comes from one SMTP command or is shorter).
///
/// lz4's worst-case expansion of incompressible data is added separately, since it
/// scales with the value ([`KafkaSink::max_record_value`]).
pub fn record_overhead(max_recipients: usize) -> usize {
    const BATCH_HEADER: usize = 61;
    const RECORD_FRAMING: usize = 6 * 5 + 1;
    const KEY: usize = 26;
    const PER_HEADER: usize = 2 * 5 + 16 + MAX_COMMAND_LINE;
    BATCH_HEADER + RECORD_FRAMING + KEY + (8 + max_recipients) * PER_HEADER
}

/// What the delivery callback needs to answer one message.
struct InFlight {
    done: Completion,
    id: MessageId,
    bytes: usize,
}

enum Notice {
    /// A producer reported an error: is the current one failed for good?
    Check,
    Stop,
}

/// State shared by the sink, its supervisor and every producer's callbacks.
struct Shared {
    healthy: AtomicBool,
    closed: AtomicBool,
    /// Which producer is current; callbacks of a retired one must not flip health.
    generation: AtomicU64,
    inflight_messages: AtomicUsize,
    inflight_bytes: AtomicUsize,
    notices: Sender<Notice>,
    /// The current producer's latest librdkafka statistics.
    stats: Mutex<Option<SinkStats>>,
}

impl Shared {
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
            } else {
                tracing::warn!(
                    why,
                    "kafka sink not ready: answering 451 until a broker is back"
                );
            }
        }
    }

    fn add_inflight(&self, bytes: usize) {
        self.inflight_messages.fetch_add(1, Ordering::Relaxed);
        self.inflight_bytes.fetch_add(bytes, Ordering::Relaxed);
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
        let InFlight { done, id, .. } = *inflight;
        match result {
            Ok(_) => {
                self.shared
                    .set_healthy(self.generation, true, "message delivered");
                done.complete(Ok(id));
            }
            Err((error, _)) => {
                tracing::debug!(%id, %error, "kafka delivery failed");
                done.complete(Err(classify(error)));
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
    topic: String,
    publish_timeout: Duration,
    max_inflight_messages: usize,
    max_inflight_bytes: usize,
    /// `None` once shut down. Submitters hold the read lock across `send`, so once
    /// `shutdown` has taken the producer under the write lock nothing more enters it.
    producer: RwLock<Option<Arc<GatewayProducer>>>,
    /// Threads draining retired producers; shutdown waits for them.
    retiring: Mutex<Vec<JoinHandle<()>>>,
}

/// The Kafka sink. See the module documentation.
pub struct KafkaSink {
    inner: Arc<Inner>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    max_record_value: usize,
    topic_max_message_bytes: Option<usize>,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.inner.topic)
            .field("healthy", &self.is_healthy())
            .field("max_record_value", &self.max_record_value)
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
        let config = options.client_config()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            inflight_messages: AtomicUsize::new(0),
            inflight_bytes: AtomicUsize::new(0),
            notices: tx,
            stats: Mutex::new(None),
        });
        let producer = Arc::new(new_producer(&config, &shared, 0)?);

        let reachable = probe(
            &producer,
            &shared,
            &options.topic,
            0,
            options.startup_timeout,
        );
        // Without a broker, describing the topic would only wait out the same timeout
        // again; SIZE then follows the producer's limit, and a broker that still
        // refuses a record as too large gets it answered with 552.
        let topic_max = if reachable {
            topic_max_message_bytes(&config, &options.topic, options.startup_timeout)
        } else {
            tracing::warn!(
                brokers = %options.brokers,
                "no kafka broker answered at start-up; not ready until one does"
            );
            None
        };
        let producer_max = options.producer_message_max_bytes();
        let limit = topic_max.map_or(producer_max, |t| t.min(producer_max));
        // lz4 can grow incompressible data by 1/255 plus 16 bytes.
        let max_record_value = limit
            .saturating_sub(record_overhead(options.max_recipients))
            .saturating_sub(limit / 255 + 16);
        tracing::info!(
            topic = %options.topic,
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

        let inner = Arc::new(Inner {
            shared,
            config,
            topic: options.topic.clone(),
            publish_timeout: options.publish_timeout,
            max_inflight_messages: options.max_inflight_messages,
            max_inflight_bytes: options.max_inflight_bytes,
            producer: RwLock::new(Some(producer)),
            retiring: Mutex::new(Vec::new()),
        });
        let supervisor = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("smtpgw-kafka".into())
                .spawn(move || supervise(&inner, &rx))
                .map_err(KafkaSinkError::Thread)?
        };
        Ok(KafkaSink {
            inner,
            supervisor: Mutex::new(Some(supervisor)),
            max_record_value,
            topic_max_message_bytes: topic_max,
        })
    }

    /// The largest [`SealedMessage::value`] (trace line included) that Kafka accepts.
    pub fn max_record_value(&self) -> usize {
        self.max_record_value
    }

    /// The topic's `max.message.bytes`, if the cluster told us at start-up.
    pub fn topic_max_message_bytes(&self) -> Option<usize> {
        self.topic_max_message_bytes
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

/// Asks the cluster for the topic's metadata; an answer proves a broker is up.
fn probe(
    producer: &GatewayProducer,
    shared: &Shared,
    topic: &str,
    generation: u64,
    timeout: Duration,
) -> bool {
    match producer.client().fetch_metadata(Some(topic), timeout) {
        Ok(metadata) => {
            if let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) {
                if let Some(error) = t.error() {
                    tracing::warn!(topic, error = ?RDKafkaErrorCode::from(error), "kafka topic not usable; messages will get 451");
                }
            }
            shared.set_healthy(generation, true, "broker answered");
            true
        }
        Err(error) => {
            tracing::debug!(%error, "kafka probe failed");
            false
        }
    }
}

/// The topic's `max.message.bytes`, or `None` if the cluster does not say in time.
fn topic_max_message_bytes(config: &ClientConfig, topic: &str, timeout: Duration) -> Option<usize> {
    // The admin API answers with a future. Run it on a runtime of its own on a thread
    // of its own, so that creating the sink from inside a tokio runtime cannot panic
    // with a nested `block_on`.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("smtpgw-kafka-admin".into())
            .spawn_scoped(scope, || describe_max_message_bytes(config, topic, timeout))
            .map_err(|error| tracing::warn!(%error, "cannot start the kafka admin thread"))
            .ok()?
            .join()
            .ok()?
    })
}

fn describe_max_message_bytes(
    config: &ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Option<usize> {
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
    let resource = ResourceSpecifier::Topic(topic);
    let result = runtime.block_on(async {
        tokio::time::timeout(
            timeout + Duration::from_millis(500),
            admin.describe_configs([&resource], &opts),
        )
        .await
    });
    let found = match result {
        Ok(Ok(results)) => results.into_iter().find_map(|r| match r {
            Ok(resource) => resource
                .get("max.message.bytes")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse::<usize>().ok()),
            Err(code) => {
                tracing::warn!(topic, error = %code, "kafka cannot describe the topic");
                None
            }
        }),
        Ok(Err(error)) => {
            tracing::warn!(topic, %error, "kafka cannot describe the topic");
            None
        }
        Err(_) => {
            tracing::warn!(topic, "kafka did not describe the topic in time");
            None
        }
    };
    if found.is_none() {
        tracing::warn!(
            topic,
            "topic max.message.bytes unknown; using the producer's message.max.bytes only"
        );
    }
    found
}

/// The supervisor: replaces a producer after a fatal error and probes the cluster
/// while no broker is known to be up.
fn supervise(inner: &Arc<Inner>, notices: &Receiver<Notice>) {
    // Probes are paced by the clock, not by notices: every failed connection attempt
    // raises an error (and a notice), and probing on each would make librdkafka
    // reconnect to a dead broker many times a second.
    let mut last_probe: Option<Instant> = None;
    loop {
        match notices.recv_timeout(PROBE_INTERVAL) {
            Ok(Notice::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            // A notice from a retired producer needs no action; checking the current
            // one costs an atomic load.
            Ok(Notice::Check) | Err(RecvTimeoutError::Timeout) => {}
        }
        let shared = &inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let current = inner
            .producer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(producer) = current else {
            return;
        };
        let producer = if let Some((code, reason)) = producer.client().fatal_error() {
            drop(producer);
            shared.set_healthy(
                shared.generation.load(Ordering::Acquire),
                false,
                "fatal producer error",
            );
            tracing::error!(%code, reason, "kafka producer hit a fatal error");
            replace_producer(inner);
            // Probe the new producer now rather than a second later: until it has
            // seen a broker the sink refuses mail.
            last_probe = None;
            match inner
                .producer
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
            {
                Some(p) => p,
                None => return,
            }
        } else {
            producer
        };
        let due = last_probe.is_none_or(|t| t.elapsed() >= PROBE_INTERVAL);
        if due && !shared.healthy.load(Ordering::Acquire) {
            last_probe = Some(Instant::now());
            let generation = shared.generation.load(Ordering::Acquire);
            probe(&producer, shared, &inner.topic, generation, PROBE_TIMEOUT);
        }
    }
}

fn replace_producer(inner: &Arc<Inner>) {
    let shared = &inner.shared;
    let mut slot = inner
        .producer
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    let Some(old) = slot.as_ref() else {
        return; // shut down
    };
    if old.client().fatal_error().is_none() {
        return; // already replaced
    }
    let generation = shared.generation.load(Ordering::Acquire) + 1;
    let new = match new_producer(&inner.config, shared, generation) {
        Ok(new) => Arc::new(new),
        Err(error) => {
            // Keep the failed one; the supervisor tries again on its next round.
            tracing::error!(%error, "cannot replace the failed kafka producer");
            return;
        }
    };
    tracing::warn!(
        generation,
        "new kafka producer in place; the failed one's pending messages get 451"
    );
    shared.generation.store(generation, Ordering::Release);
    let old = slot.replace(new);
    drop(slot);
    if let Some(old) = old {
        let timeout = inner.publish_timeout;
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
    /// Hands one record to librdkafka; `done` is answered from its delivery report, or
    /// at once if the sink is unavailable or librdkafka refuses the record.
    fn publish(
        &self,
        id: MessageId,
        timestamp_ms: i64,
        headers: Option<OwnedHeaders>,
        value: &[u8],
        done: Completion,
    ) {
        let inner = &self.inner;
        let shared = &inner.shared;
        if !shared.healthy.load(Ordering::Acquire) {
            done.complete(Err(PublishError::Temporary(Cow::Borrowed(UNAVAILABLE))));
            return;
        }
        let slot = inner
            .producer
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(producer) = slot.as_ref() else {
            done.complete(Err(PublishError::Temporary(Cow::Borrowed(SHUT_DOWN))));
            return;
        };
        let mut key = [0u8; ulid::ULID_LEN];
        let key = id.array_to_str(&mut key);
        let bytes = value.len();
        let mut record =
            BaseRecord::with_opaque_to(&inner.topic, Box::new(InFlight { done, id, bytes }))
                .key(key.as_bytes())
                .payload(value)
                .timestamp(timestamp_ms);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        shared.add_inflight(bytes);
        if let Err((error, record)) = producer.send(record) {
            shared.sub_inflight(bytes);
            if !matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::QueueFull)
            ) {
                tracing::debug!(%id, %error, "kafka refused the message");
            }
            record.delivery_opaque.done.complete(Err(classify(&error)));
        }
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

impl Sink for KafkaSink {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        let headers = owned_headers(8 + msg.envelope.rcpt_count(), |add| {
            msg.for_each_header(|name, value| add(name, value))
        });
        self.publish(
            msg.id,
            msg.received_at.timestamp_millis(),
            headers,
            &msg.value,
            done,
        );
    }

    fn shutdown(&self) {
        let inner = &self.inner;
        inner.shared.closed.store(true, Ordering::Release);
        let _ = inner.shared.notices.send(Notice::Stop);
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = supervisor {
            if handle.join().is_err() {
                tracing::error!("kafka supervisor thread panicked");
            }
        }
        let producer = inner
            .producer
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(producer) = producer {
            drain(producer, inner.publish_timeout);
        }
        let retiring = std::mem::take(
            &mut *inner
                .retiring
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in retiring {
            if handle.join().is_err() {
                tracing::error!("kafka drain thread panicked");
            }
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
        let shared = &self.inner.shared;
        shared.healthy.load(Ordering::Acquire) && !shared.closed.load(Ordering::Acquire)
    }

    fn over_inflight_limit(&self) -> bool {
        let (messages, bytes) = self.inflight();
        messages >= self.inner.max_inflight_messages || bytes >= self.inner.max_inflight_bytes
    }

    fn max_message_value(&self) -> Option<usize> {
        Some(self.max_record_value)
    }

    fn stats(&self) -> Option<SinkStats> {
        self.inner
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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

    use crate::sink::PublishResult;

    let sink = KafkaSink::new(options)?;
    let deadline = Instant::now() + options.publish_timeout;
    while !sink.is_healthy() {
        if Instant::now() >= deadline {
            return Err(ReplayError::Unreachable {
                brokers: options.brokers.clone(),
                waited: options.publish_timeout,
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
        let headers = owned_headers(record.headers.len(), |add| {
            for (name, value) in &record.headers {
                add(name, value);
            }
        });
        sink.publish(
            record.id,
            record.received_at.timestamp_millis(),
            headers,
            record.value(),
            Completion::new(tx),
        );
        window.push_back((record.id, rx));
    }
    while let Some(pending) = window.pop_front() {
        settle(&mut report, pending);
    }
    sink.shutdown();
    Ok(report)
}
