//! The topic's size limit (see "Size" in the module above): reading the topic's
//! `max.message.bytes` or the broker's `message.max.bytes` with the admin client, the
//! start-up check against `--max-message-size`, and the limit reader thread that follows
//! the topic's limit while the gateway runs.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::Duration;

use crossbeam_channel::Receiver;
use rdkafka::admin::{AdminClient, AdminOptions, ConfigResource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use super::{limit_for_value, value_limit, KafkaOptions, KafkaShared, KafkaSinkError};

/// A topic that cannot hold the largest message `--max-message-size` allows stops the
/// start-up: advertising a SIZE and then bouncing what fits it with `552` is worse.
/// With `--max-message-size auto` ([`KafkaOptions::fit_topic`]) it is said at `warn`
/// instead, and the size limit follows the topic's (see `reload::session_config_for`).
pub(super) fn check_topic_limit(
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

/// The cluster's limit for records to `topic`: the topic's `max.message.bytes`, else
/// the broker's `message.max.bytes` (what a topic without its own inherits); `None` if
/// the cluster does not say in time.
pub(super) fn read_topic_limit(
    config: &ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Option<usize> {
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
pub(super) fn limit_of(
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
pub(super) fn next_limits(
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
pub(super) fn follow_topic_limit(
    shared: &KafkaShared,
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

impl KafkaShared {
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
