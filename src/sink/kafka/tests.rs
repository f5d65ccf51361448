//! Unit tests of the Kafka sink's size arithmetic, configuration and limit reading.

use rdkafka::admin::ConfigResource;

use super::options::LIBRDKAFKA_MAX_MESSAGE_BYTES;
use super::size::{limit_of, next_limits};
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
    let mut options = KafkaOptions::new(crate::config::KafkaSettings::default(), 100);
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
    let mut options = KafkaOptions::new(crate::config::KafkaSettings::default(), 100);
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
    let settings = crate::config::KafkaSettings {
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

#[test]
fn the_options_are_the_configurations_kafka_group_not_a_copy_of_its_fields() {
    let settings = crate::config::KafkaSettings {
        max_inflight_messages: 7,
        ..crate::config::KafkaSettings::default()
    };
    let o = KafkaOptions::new(settings.clone(), 100);
    assert_eq!(o.settings, settings);
    assert_eq!(o.max_recipients, 100);
}
