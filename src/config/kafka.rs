//! The Kafka sink's settings, and the rule for which `--kafka-config` keys are the
//! gateway's own (so that the configuration imports no sink).

use super::*;

settings_group! {
    // The Kafka sink's settings, shared by the server and `spool replay`; the sink
    // builds its producer from this group.
    #[command(next_help_heading = "Kafka")]
    pub struct KafkaSettings {
        /// Kafka bootstrap servers, host:port[,host:port...] (required with --sink kafka
        /// and by spool replay).
        #[arg(long, value_name = "LIST")]
        pub kafka_brokers: Option<String>,
        /// Topic for accepted messages.
        #[arg(long, value_name = "TOPIC", default_value = "smtp.inbound")]
        pub kafka_topic: KafkaTopic,
        /// librdkafka setting KEY=VALUE, e.g. security.protocol=SSL; repeatable, or
        /// several separated by ';' (as SMTPGW_KAFKA_CONFIG takes them).
        #[arg(long, value_name = "KEY=VALUE", value_delimiter = ';')]
        #[serde(deserialize_with = "one_or_many")]
        pub kafka_config: Vec<KafkaSetting>,
        /// A message Kafka has not acknowledged by then gets 451.
        #[arg(long, value_name = "DUR", default_value = "30s")]
        pub publish_timeout: Dur,
        /// Unacknowledged messages above which reactors stop reading message bodies.
        #[arg(long, value_name = "N", default_value = "10000")]
        pub max_inflight_messages: u64,
        /// Unacknowledged bytes above which reactors stop reading message bodies.
        #[arg(long, value_name = "BYTES", default_value = "256M")]
        pub max_inflight_bytes: ByteSize,
        /// What picks a record's partition: the message id, or the sender's or first
        /// recipient's domain (CRC-32C of the lower-cased domain modulo the partition
        /// count; see docs/record.md). The key stays the message id.
        #[arg(long, value_enum, default_value = "id")]
        pub kafka_partition_key: PartitionKey,
    }
}

impl KafkaSettings {
    /// The checks the value types cannot make alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(b) = &self.kafka_brokers {
            if b.trim().is_empty() {
                return Err(invalid("--kafka-brokers", "must not be empty"));
            }
        }
        let d = self.publish_timeout.0;
        if d < Duration::from_millis(1) || d > MAX_PUBLISH_TIMEOUT {
            return Err(invalid(
                "--publish-timeout",
                format!("must be between 1ms and 24d (got {})", self.publish_timeout),
            ));
        }
        at_least_one("--max-inflight-messages", self.max_inflight_messages)?;
        at_least_one("--max-inflight-bytes", self.max_inflight_bytes.0)?;
        Ok(())
    }

    /// The brokers, trimmed; empty when none are set (validation requires them with
    /// `--sink kafka`).
    pub fn brokers(&self) -> &str {
        self.kafka_brokers.as_deref().map_or("", str::trim)
    }
}

/// The most records the forwarder keeps in flight to Kafka (`--forward-window`).
pub const MAX_FORWARD_WINDOW: u64 = 2000;

/// Settings librdkafka must not take from `--kafka-config`, because the durability
/// promise or the sink's own flags depend on them.
pub(super) const RESERVED_KEYS: &[(&str, &str)] = &[
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
pub fn reserved_kafka_config(key: &str) -> Option<&'static str> {
    // librdkafka hands a name the global configuration does not know to the default
    // topic configuration, which strips a `topic.` prefix: `topic.acks=1` is `acks=1`
    // and `topic.message.timeout.ms` overrides `--publish-timeout`.
    let bare = key.strip_prefix("topic.").unwrap_or(key);
    RESERVED_KEYS
        .iter()
        .find(|(k, _)| *k == key || *k == bare)
        .map(|(_, why)| *why)
}
