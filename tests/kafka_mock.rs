//! The Kafka sink against librdkafka's mock cluster: real Kafka protocol over
//! loopback, with brokers that can be taken down and requests that can be failed.

mod kafka_support;
mod spool_support;

use std::time::Duration;

use kafka_support::{
    consume, consume_partitions, healthy_sink, options, record_of, wait_until, Record,
};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use smtpgw::sink::kafka::KafkaSink;
use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::{PublishError, PublishResult, Sink};
use spool_support::{message, publish, submit};

const TOPIC: &str = "smtp.inbound";
const WAIT: Duration = Duration::from_secs(20);

fn cluster() -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("create topic");
    cluster
}

fn is_temporary(result: &PublishResult) -> bool {
    matches!(result, Err(PublishError::Temporary(_)))
}

#[test]
fn round_trip_keeps_key_value_and_headers_in_order() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let sink = healthy_sink(&options(&brokers, TOPIC, Duration::from_secs(10)));

    let mut binary: Vec<u8> = (0..=255u8).collect();
    binary.extend_from_slice(b"\r\n.\r\n\0\r\n..dot\r\nlast line without newline\xff");
    let sent = vec![
        message(
            "alice@example.com",
            &["bob@example.com", "carol@example.com", "bob@example.com"],
            &binary,
        ),
        message(
            "",
            &["postmaster"],
            b"Subject: bounce\r\n\r\nnull sender\r\n",
        ),
        message("u@example.com", &["v@example.com"], b""),
        message(
            "big@example.com",
            &["v@example.com"],
            &vec![b'x'; 512 << 10],
        ),
    ];
    for msg in &sent {
        assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
    }
    assert_eq!(sink.inflight(), (0, 0));
    sink.shutdown();

    let got = consume(&brokers, TOPIC, sent.len(), WAIT, WAIT);
    let want: Vec<Record> = sent.iter().map(record_of).collect();
    assert_eq!(got.len(), want.len());
    for (got, want) in got.iter().zip(&want) {
        assert_eq!(got.key, want.key);
        assert!(
            got.value == want.value,
            "value differs for {:?}",
            String::from_utf8_lossy(&want.key)
        );
        assert_eq!(got.headers, want.headers);
    }
    let rcpts: Vec<&[u8]> = got[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "smtp.rcpt_to")
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(
        rcpts,
        vec![
            &b"bob@example.com"[..],
            &b"carol@example.com"[..],
            &b"bob@example.com"[..]
        ]
    );
}

#[test]
fn broker_down_answers_temporary_and_recovers_when_it_is_back() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let sink = healthy_sink(&options(&brokers, TOPIC, Duration::from_secs(3)));
    let before = message("a@example.com", &["b@example.com"], b"before\r\n");
    assert_eq!(publish(&sink, before.clone()), Ok(before.id));

    cluster.broker_down(1).expect("broker down");
    // A message submitted while the producer has not yet noticed still gets an
    // answer: 451 once its publish timeout passes, never 250.
    let during = message("a@example.com", &["b@example.com"], b"during\r\n");
    let answer = publish(&sink, during.clone());
    assert!(is_temporary(&answer), "got {answer:?}");
    assert!(
        wait_until(WAIT, || !sink.is_healthy()),
        "sink still ready with its only broker down"
    );
    // Unhealthy: refused at once rather than held for the publish timeout.
    let refused = message("a@example.com", &["b@example.com"], b"refused\r\n");
    assert_eq!(
        publish(&sink, refused),
        Err(PublishError::Temporary("kafka unavailable".into()))
    );

    cluster.broker_up(1).expect("broker up");
    assert!(
        wait_until(WAIT, || sink.is_healthy()),
        "sink never recovered"
    );
    let after = message("a@example.com", &["b@example.com"], b"after\r\n");
    assert_eq!(publish(&sink, after.clone()), Ok(after.id));
    sink.shutdown();

    let got = consume(&brokers, TOPIC, usize::MAX, Duration::from_secs(2), WAIT);
    let keys: Vec<Vec<u8>> = got.iter().map(|r| r.key.clone()).collect();
    assert!(keys.contains(&before.id.to_string().into_bytes()));
    assert!(keys.contains(&after.id.to_string().into_bytes()));
    assert_eq!(
        keys.iter()
            .filter(|k| **k == after.id.to_string().into_bytes())
            .count(),
        1,
        "a 250 means exactly one record"
    );
}

#[test]
fn produce_errors_answer_temporary_never_ok_or_permanent() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let sink = healthy_sink(&options(&brokers, TOPIC, Duration::from_secs(3)));

    // A permanent broker error fails the message at once.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
    );
    let denied = message("a@example.com", &["b@example.com"], b"denied\r\n");
    let answer = publish(&sink, denied.clone());
    assert!(is_temporary(&answer), "got {answer:?}");

    // Retriable errors that outlast the publish timeout: 451, not 250.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 200],
    );
    let slow = message("a@example.com", &["b@example.com"], b"slow\r\n");
    let answer = publish(&sink, slow.clone());
    assert!(is_temporary(&answer), "got {answer:?}");
    cluster.clear_request_errors(RDKafkaApiKey::Produce);

    // A few retriable errors are retried by librdkafka and the message gets through.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 2],
    );
    let retried = message("a@example.com", &["b@example.com"], b"retried\r\n");
    assert_eq!(publish(&sink, retried.clone()), Ok(retried.id));

    // The broker says too large for a message within the size the sink advertises:
    // the topic's limit fell since it was read, which is the operator's to fix, so a
    // temporary answer (451), not a bounce. (Over the advertised size librdkafka
    // refuses it itself: 552, see too_large_for_the_producer_is_refused_permanently.)
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let big = message("a@example.com", &["b@example.com"], b"too large\r\n");
    assert!(big.value.len() <= sink.max_record_value());
    assert_eq!(
        publish(&sink, big),
        Err(PublishError::Temporary(
            "kafka topic max.message.bytes below --max-message-size".into()
        ))
    );
    sink.shutdown();

    let got = consume(&brokers, TOPIC, usize::MAX, Duration::from_secs(2), WAIT);
    let keys: Vec<Vec<u8>> = got.iter().map(|r| r.key.clone()).collect();
    assert!(!keys.contains(&denied.id.to_string().into_bytes()));
    assert_eq!(
        keys.iter()
            .filter(|k| **k == retried.id.to_string().into_bytes())
            .count(),
        1
    );
}

#[test]
fn fatal_error_gets_451_and_a_new_producer_carries_on() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let sink = healthy_sink(&options(&brokers, TOPIC, Duration::from_secs(5)));
    assert_eq!(sink.producer_generation(), 0);

    // The broker rejecting the head-of-line batch as out of sequence means producer
    // and broker disagree about what was written: librdkafka raises a fatal error.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let victim = message("a@example.com", &["b@example.com"], b"victim\r\n");
    let answer = publish(&sink, victim.clone());
    assert!(is_temporary(&answer), "got {answer:?}");

    assert!(
        wait_until(WAIT, || sink.producer_generation() == 1
            && sink.is_healthy()),
        "no new producer after the fatal error"
    );
    let next = message("a@example.com", &["b@example.com"], b"next\r\n");
    assert_eq!(publish(&sink, next.clone()), Ok(next.id));
    sink.shutdown();

    let got = consume(&brokers, TOPIC, usize::MAX, Duration::from_secs(2), WAIT);
    let keys: Vec<Vec<u8>> = got.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, vec![next.id.to_string().into_bytes()]);
}

#[test]
fn too_large_for_the_producer_is_refused_permanently() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let mut opts = options(&brokers, TOPIC, Duration::from_secs(5));
    opts.settings.kafka_config = vec!["message.max.bytes=200000".parse().unwrap()];
    let sink = healthy_sink(&opts);
    // The advertised limit leaves room for the record's overhead.
    assert!(sink.max_record_value() < 200_000 - 50_000);
    assert_eq!(sink.max_message_value(), Some(sink.max_record_value()));

    let fits = message(
        "a@example.com",
        &["b@example.com"],
        &vec![b'a'; sink.max_record_value() - 1000],
    );
    assert_eq!(publish(&sink, fits.clone()), Ok(fits.id));
    let huge = message("a@example.com", &["b@example.com"], &vec![b'a'; 300_000]);
    assert_eq!(publish(&sink, huge), Err(PublishError::TooLarge));
}

#[test]
fn reserved_settings_are_refused_with_the_flag_named() {
    // Past the config's own check, as a library user could build it.
    let mut opts = options("127.0.0.1:1", TOPIC, Duration::from_secs(5));
    opts.settings.kafka_config = vec![smtpgw::config::KafkaSetting {
        key: "acks".into(),
        value: "1".into(),
    }];
    let err = KafkaSink::new(&opts).expect_err("acks=1 breaks the durability promise");
    assert!(err.to_string().contains("--kafka-config acks"), "{err}");
}

#[test]
fn unreachable_cluster_starts_unhealthy_and_fails_fast() {
    // A port nothing listens on: bind, learn the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut opts = options(&format!("127.0.0.1:{port}"), TOPIC, Duration::from_secs(30));
    opts.startup_timeout = Duration::from_millis(500);
    let sink = KafkaSink::new(&opts).expect("starts without a broker");
    assert!(!sink.is_healthy());
    let msg = message("a@example.com", &["b@example.com"], b"x\r\n");
    assert_eq!(
        publish(&sink, msg),
        Err(PublishError::Temporary("kafka unavailable".into()))
    );
}

fn numbered(n: usize) -> Vec<SealedMessage> {
    (0..n)
        .map(|i| {
            message(
                "a@example.com",
                &["b@example.com"],
                format!("m{i}\r\n").as_bytes(),
            )
        })
        .collect()
}

const TIMED_OUT: &str = "kafka publish timed out";

/// A slow broker (every request takes 500 ms) and ten records against an in-flight
/// limit of 2, so librdkafka's queue (twice the limit) cannot hold them all: the
/// records it has no room for wait in the sink and are handed over as delivery reports
/// free room, in order, so every one gets `250` within the publish timeout and the
/// topic holds them in the order they came.
#[test]
fn slow_broker_records_wait_for_room_and_all_get_250_in_order() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let mut opts = options(&brokers, TOPIC, Duration::from_secs(20));
    opts.settings.max_inflight_messages = 2;
    let sink = healthy_sink(&opts);
    cluster
        .broker_round_trip_time(1, Duration::from_millis(500))
        .expect("rtt");

    assert!(!sink.over_inflight_limit());
    let msgs = numbered(10);
    let answers: Vec<_> = msgs.iter().map(|m| submit(&sink, m.clone())).collect();
    assert!(sink.over_inflight_limit());
    let (waiting, _) = sink.waiting();
    assert!(waiting > 0, "nothing waits for room");
    assert!(sink.inflight().0 >= waiting);
    assert_eq!(
        sink.stats().map(|s| s.waiting_messages),
        Some(waiting as u64)
    );
    let results: Vec<PublishResult> = answers
        .into_iter()
        .map(|mut rx| rx.blocking_recv().expect("answered"))
        .collect();
    let want: Vec<PublishResult> = msgs.iter().map(|m| Ok(m.id)).collect();
    assert_eq!(results, want);
    assert!(!sink.over_inflight_limit());
    assert_eq!(sink.inflight(), (0, 0));
    assert_eq!(sink.waiting(), (0, 0));
    sink.shutdown();

    cluster
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("rtt");
    let got = consume(&brokers, TOPIC, msgs.len(), WAIT, WAIT);
    let keys: Vec<Vec<u8>> = got.iter().map(|r| r.key.clone()).collect();
    let sent: Vec<Vec<u8>> = msgs.iter().map(|m| m.id.to_string().into_bytes()).collect();
    assert_eq!(keys, sent, "the topic holds them once each, in order");
}

/// One record at a time (limit 1) to a broker that takes 700 ms a request, eight
/// records, a publish timeout of 2 s: the first ones get `250`, and those still
/// waiting for room when their timeout runs out get the timed-out `451` then, not
/// later; never `kafka queue full`, every `250` is a record, in order, and a `451`
/// is none.
#[test]
fn records_without_room_within_the_publish_timeout_get_the_timed_out_451() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let timeout = Duration::from_secs(2);
    let mut opts = options(&brokers, TOPIC, timeout);
    opts.settings.max_inflight_messages = 1;
    let sink = healthy_sink(&opts);
    cluster
        .broker_round_trip_time(1, Duration::from_millis(700))
        .expect("rtt");

    let msgs = numbered(8);
    let started = std::time::Instant::now();
    let answers: Vec<_> = msgs.iter().map(|m| submit(&sink, m.clone())).collect();
    let mut results = Vec::new();
    for mut rx in answers {
        results.push(rx.blocking_recv().expect("answered"));
    }
    let took = started.elapsed();
    // Oldest first: the first gets through, the last cannot.
    assert_eq!(results[0], Ok(msgs[0].id), "{results:?}");
    assert_eq!(
        results[msgs.len() - 1],
        Err(PublishError::Temporary(TIMED_OUT.into()))
    );
    let mut acked = Vec::new();
    for (msg, result) in msgs.iter().zip(&results) {
        match result {
            Ok(id) => {
                assert_eq!(*id, msg.id);
                acked.push(msg.id.to_string().into_bytes());
            }
            Err(e) => assert_eq!(*e, PublishError::Temporary(TIMED_OUT.into())),
        }
    }
    // The last waited its whole timeout and no more (a record handed over just before
    // its deadline has librdkafka's timeout on top, at worst).
    assert!(took >= timeout, "answered after {took:?}");
    assert!(took < 2 * timeout + Duration::from_secs(3), "{took:?}");
    assert_eq!(sink.inflight(), (0, 0));
    sink.shutdown();

    cluster
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("rtt");
    let got = consume(&brokers, TOPIC, usize::MAX, Duration::from_secs(2), WAIT);
    let keys: Vec<Vec<u8>> = got.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, acked, "every 250 a record, in order; no 451 one");
}

/// Shutdown with records in librdkafka and records waiting for room (limit 1, a
/// broker that takes 10 s a request): it answers every one before it returns, the
/// waiting ones at once, and bounded by the publish timeout for the rest.
#[test]
fn shutdown_answers_everything_it_holds() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    // The publish timeout bounds the flush; the broker is too slow for it.
    let timeout = Duration::from_secs(5);
    let mut opts = options(&brokers, TOPIC, timeout);
    opts.settings.max_inflight_messages = 1;
    let sink = healthy_sink(&opts);
    cluster
        .broker_round_trip_time(1, Duration::from_secs(10))
        .expect("rtt");
    let answers: Vec<_> = numbered(5).into_iter().map(|m| submit(&sink, m)).collect();
    assert_eq!(sink.waiting().0, 4);
    let started = std::time::Instant::now();
    sink.shutdown();
    assert!(started.elapsed() < timeout + Duration::from_secs(5));
    let answers: Vec<PublishResult> = answers
        .into_iter()
        .map(|mut rx| rx.try_recv().expect("answered before shutdown returned"))
        .collect();
    assert!(is_temporary(&answers[0]), "got {:?}", answers[0]);
    for answer in &answers[1..] {
        assert_eq!(
            *answer,
            Err(PublishError::Temporary("kafka sink is shut down".into()))
        );
    }
    assert_eq!(sink.inflight(), (0, 0));
    assert_eq!(sink.waiting(), (0, 0));
    let late = message("a@example.com", &["b@example.com"], b"late\r\n");
    assert!(is_temporary(&publish(&sink, late)));
}

#[test]
fn spool_replay_publishes_every_record_with_its_own_key() {
    use smtpgw::sink::spool::SpoolSink;
    use smtpgw::spool_tool::replay_spool;

    let tmp = tempfile::TempDir::new().expect("tempdir");
    let sent = spool_support::replay_sample();
    {
        let spool = SpoolSink::open(tmp.path()).expect("spool");
        for msg in &sent {
            assert_eq!(publish(&spool, msg.clone()), Ok(msg.id));
        }
        spool.shutdown();
    }

    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let opts = options(&brokers, TOPIC, Duration::from_secs(10));
    for _ in 0..2 {
        let report = replay_spool(tmp.path(), &opts).expect("replay");
        assert_eq!(report.published, sent.len() as u64);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
    }

    // Replaying twice gives each message twice, under the same key, identical: what
    // consumers deduplicate on.
    let got = consume(&brokers, TOPIC, 2 * sent.len(), WAIT, WAIT);
    assert_eq!(got.len(), 2 * sent.len());
    let want: Vec<Record> = sent.iter().map(record_of).collect();
    assert_eq!(&got[..sent.len()], &want[..]);
    assert_eq!(&got[sent.len()..], &want[..]);
}

#[test]
fn spool_replay_without_a_broker_says_so() {
    use smtpgw::sink::spool::SpoolSink;
    use smtpgw::spool_tool::{replay_spool, ReplayError};

    let tmp = tempfile::TempDir::new().expect("tempdir");
    SpoolSink::open(tmp.path()).expect("spool").shutdown();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut opts = options(&format!("127.0.0.1:{port}"), TOPIC, Duration::from_secs(1));
    opts.startup_timeout = Duration::from_millis(200);
    match replay_spool(tmp.path(), &opts) {
        Err(ReplayError::Unreachable { .. }) => {}
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[test]
fn leader_change_never_loses_or_refuses_permanently() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 3).expect("create topic");
    cluster
        .partition_leader(TOPIC, 0, Some(1))
        .expect("leader 1");
    let brokers = cluster.bootstrap_servers();
    let sink = healthy_sink(&options(&brokers, TOPIC, Duration::from_secs(10)));
    let first = message("a@example.com", &["b@example.com"], b"first\r\n");
    assert_eq!(publish(&sink, first.clone()), Ok(first.id));

    let mut acked = vec![first.id];
    for (i, leader) in [2, 3, 1, 2].into_iter().enumerate() {
        cluster
            .partition_leader(TOPIC, 0, Some(leader))
            .expect("move leader");
        let msg = message(
            "a@example.com",
            &["b@example.com"],
            format!("after move {i}\r\n").as_bytes(),
        );
        match publish(&sink, msg.clone()) {
            Ok(id) => acked.push(id),
            Err(PublishError::Temporary(_)) => {}
            Err(e) => panic!("a leader change is never permanent: {e:?}"),
        }
    }
    sink.shutdown();

    let got = consume(&brokers, TOPIC, usize::MAX, Duration::from_secs(2), WAIT);
    for id in &acked {
        let key = id.to_string().into_bytes();
        assert_eq!(
            got.iter().filter(|r| r.key == key).count(),
            1,
            "{id} got 250 so it is in the topic exactly once"
        );
    }
}

#[test]
fn sink_starts_inside_a_tokio_runtime() {
    // The start-up size probe runs a future; it must not nest a runtime in the caller's.
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sink =
        rt.block_on(async { KafkaSink::new(&options(&brokers, TOPIC, Duration::from_secs(5))) });
    let sink = sink.expect("sink starts");
    assert!(wait_until(WAIT, || sink.is_healthy()));
    let msg = message("a@example.com", &["b@example.com"], b"x\r\n");
    assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
}

/// `--kafka-partition-key`: by sender or first recipient domain, every message of one
/// domain (whatever its case) lands in the partition docs/record.md says,
/// CRC-32C(lower-cased domain) mod partitions, with the key still the message id; by id
/// (the default) one domain's mail spreads over the partitions.
#[test]
fn the_partition_key_puts_each_domain_in_its_documented_partition() {
    use smtpgw::config::PartitionKey;
    use smtpgw::sink::kafka::domain_partition;
    const PARTITIONS: usize = 4;
    let domains = [
        "a.test",
        "B.test",
        "c.example",
        "d.example",
        "e.org",
        "b.TEST",
    ];
    for (mode, topic) in [
        (PartitionKey::SenderDomain, "by.sender"),
        (PartitionKey::RecipientDomain, "by.rcpt"),
        (PartitionKey::Id, "by.id"),
    ] {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic(topic, PARTITIONS as i32, 1)
            .expect("create topic");
        let brokers = cluster.bootstrap_servers();
        let mut opts = options(&brokers, topic, Duration::from_secs(10));
        opts.settings.kafka_partition_key = mode;
        let sink = healthy_sink(&opts);
        let mut sent = Vec::new();
        for n in 0..8 {
            for d in domains {
                let from = format!("s{n}@{d}");
                let to = format!("r{n}@{d}");
                let msg = message(&from, &[&to, "other@z.test"], b"x");
                assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
                sent.push((msg.id.to_string().into_bytes(), d));
            }
        }
        sink.shutdown();
        let got = consume_partitions(&brokers, topic, sent.len(), WAIT, WAIT);
        assert_eq!(got.len(), sent.len(), "{mode:?}");
        let mut spread = std::collections::HashSet::new();
        for (key, domain) in &sent {
            let (partition, record) = got
                .iter()
                .find(|(_, r)| &r.key == key)
                .expect("every message in the topic, keyed by its id");
            assert_eq!(&record.key, key);
            if mode == PartitionKey::Id {
                if domain.eq_ignore_ascii_case("b.test") {
                    spread.insert(*partition);
                }
            } else {
                let want = domain_partition(format!("x@{domain}").as_bytes(), PARTITIONS)
                    .expect("a partition");
                assert_eq!(*partition, want, "{mode:?}: {domain}");
            }
        }
        if mode == PartitionKey::Id {
            assert!(
                spread.len() > 1,
                "by id, 16 messages of one domain in one partition"
            );
        }
    }
    // Lower case, after the last '@', and every domain of the test is not all in one.
    assert_eq!(
        domain_partition(b"x@B.TEST", 4),
        domain_partition(b"\"a@b\"@b.test", 4)
    );
    assert_eq!(domain_partition(b"x@b.test", 0), None);
    let parts: std::collections::HashSet<_> = domains
        .iter()
        .filter_map(|d| domain_partition(d.as_bytes(), PARTITIONS))
        .collect();
    assert!(
        parts.len() > 1,
        "the test's domains all hash to one partition"
    );
}
