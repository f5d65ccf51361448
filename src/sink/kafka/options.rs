//! The Kafka sink's options: what it is configured with, the librdkafka client
//! configuration built from them, and the record-size arithmetic (how large a value a
//! producer or topic limit holds, and the reverse).

use std::time::Duration;

use rdkafka::config::ClientConfig;

use super::delivery::STATISTICS_INTERVAL_MS;
use super::KafkaSinkError;
use crate::smtp::command::MAX_COMMAND_LINE;

/// librdkafka's default `message.max.bytes`, used when the user does not set it.
pub const DEFAULT_PRODUCER_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// librdkafka's queue holds this many times what the sink lets into it: the sink's
/// gate (`--max-inflight-messages/-bytes`, see "Waiting for room") plus the forwarder's
/// window, and as much again for delivered batches librdkafka still counts (see the
/// producer settings). Twice is the least that never refuses what the gate let in.
const QUEUE_FACTOR: u64 = 2;

/// How long start-up waits for the cluster's metadata and the topic's configuration.
/// A gateway with no reachable broker still starts (and answers `451`) after this.
const STARTUP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the Kafka sink is configured with: its settings group (brokers, topic,
/// `--kafka-config`, publish timeout, in-flight limits) and what the gateway adds.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    pub settings: crate::config::KafkaSettings,
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
    pub fn new(settings: crate::config::KafkaSettings, max_recipients: usize) -> Self {
        KafkaOptions {
            settings,
            max_recipients,
            startup_timeout: STARTUP_PROBE_TIMEOUT,
            forward_reserve: (0, 0),
            max_value: None,
            fit_topic: false,
        }
    }

    pub(super) fn topic(&self) -> &str {
        &self.settings.kafka_topic.0
    }

    pub(super) fn publish_timeout(&self) -> Duration {
        self.settings.publish_timeout.0
    }

    /// The waiting room's gate: how many session records and value bytes librdkafka
    /// may hold at once, `--max-inflight-messages` and `--max-inflight-bytes`. The
    /// reactors stop reading bodies at the same counts (which also hold the waiting
    /// records), so what waits is the bodies they were finishing.
    pub(super) fn gate(&self) -> (usize, usize) {
        let limits = &self.settings;
        (
            usize::try_from(limits.max_inflight_messages).unwrap_or(usize::MAX),
            usize::try_from(limits.max_inflight_bytes.0).unwrap_or(usize::MAX),
        )
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
        let (gate_messages, gate_bytes) = self.gate();
        // A record larger than the gate's bytes goes in alone (see `room`).
        let gate_bytes = gate_bytes.max(self.producer_message_max_bytes());
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
            // librdkafka frees a delivered batch's places in its queue only once the
            // batch's last delivery report has run, while the sink's gate frees each
            // record's place in its report: at any moment librdkafka may count, beside
            // what the gate holds, a batch the gate no longer does, at most as much again.
            // Twice the gate (and the forwarder's window) therefore never refuses a
            // record the gate let in: what finds no room waits in the sink instead.
            .set(
                "queue.buffering.max.messages",
                (gate_messages as u64)
                    .saturating_add(reserve_messages as u64)
                    .saturating_mul(QUEUE_FACTOR)
                    .clamp(1, 10_000_000)
                    .to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                ((gate_bytes as u64)
                    .saturating_add(reserve_bytes as u64)
                    .saturating_mul(QUEUE_FACTOR)
                    .div_ceil(1024))
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
    pub(super) fn producer_message_max_bytes(&self) -> usize {
        self.user_message_max_bytes().unwrap_or_else(|| {
            self.max_value
                .map_or(DEFAULT_PRODUCER_MESSAGE_MAX_BYTES, |v| {
                    limit_for_value(v, self.max_recipients)
                })
        })
    }
}

/// librdkafka's largest `message.max.bytes`.
pub(super) const LIBRDKAFKA_MAX_MESSAGE_BYTES: usize = 1_000_000_000;

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

/// Bytes a record adds to its value on the wire, counted generously so that a value of
/// [`KafkaSink::max_record_value`](super::KafkaSink::max_record_value) bytes is never refused for size:
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
/// scales with the value ([`KafkaSink::max_record_value`](super::KafkaSink::max_record_value)).
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
