//! Producer liveness against librdkafka's mock cluster, where produce requests can be
//! failed on demand: a producer the broker keeps rejecting (fenced, bad epoch) while
//! it answers metadata is replaced like one with a fatal error, the sink is not ready
//! meanwhile, and it takes mail again once a new producer gets through; a producer
//! whose messages are not acknowledged within the publish timeout while the broker
//! answers is replaced too.

mod kafka_support;
mod spool_support;

use std::time::Duration;

use kafka_support::{consume, healthy_sink, options, wait_until};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use smtpgw::sink::{PublishError, Sink};
use spool_support::{message, publish, submit};

const TOPIC: &str = "smtp.inbound";
const WAIT: Duration = Duration::from_secs(20);

fn cluster() -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("create topic");
    cluster
}

fn rejected_producer_is_replaced(error: RDKafkaRespErr) {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let sink = healthy_sink(&options(&brokers, TOPIC, Duration::from_secs(10)));
    assert_eq!(sink.producer_generation(), 0);

    // Produce requests are rejected: the broker answers, but not for this producer.
    cluster.request_errors(RDKafkaApiKey::Produce, &[error; 10_000]);
    let victim = message("a@example.com", &["b@example.com"], b"victim\r\n");
    let answer = publish(&sink, victim);
    assert!(
        matches!(answer, Err(PublishError::Temporary(_))),
        "got {answer:?}"
    );
    // Not ready while stuck, and replaced.
    assert!(!sink.is_healthy(), "ready right after a rejection");
    assert!(
        wait_until(WAIT, || sink.producer_generation() >= 1),
        "the rejected producer was not replaced"
    );
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    // The new producer gets through (or a later one: the backoff spaces them) and the
    // sink is ready.
    let mut next = None;
    assert!(
        wait_until(Duration::from_secs(40), || {
            let msg = message("a@example.com", &["b@example.com"], b"next\r\n");
            match publish(&sink, msg.clone()) {
                Ok(id) => {
                    next = Some(id);
                    true
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(200));
                    false
                }
            }
        }),
        "no message got through after the broker stopped rejecting"
    );
    assert!(sink.is_healthy());
    let generation = sink.producer_generation();
    // The sink stays with the producer that works.
    let more: Vec<_> = (0..20)
        .map(|i| {
            let msg = message(
                "a@example.com",
                &["b@example.com"],
                format!("{i}\r\n").as_bytes(),
            );
            (msg.id, submit(&sink, msg))
        })
        .collect();
    for (id, mut rx) in more {
        assert_eq!(rx.blocking_recv().expect("answered"), Ok(id));
    }
    assert_eq!(sink.producer_generation(), generation);
    sink.shutdown();

    let keys: Vec<Vec<u8>> = consume(&brokers, TOPIC, usize::MAX, Duration::from_secs(2), WAIT)
        .into_iter()
        .map(|r| r.key)
        .collect();
    let next = next.expect("a delivered id");
    assert!(keys.contains(&next.to_string().into_bytes()));
    assert_eq!(keys.len(), 21, "exactly the acknowledged messages");
}

#[test]
fn a_fenced_producer_is_replaced() {
    rejected_producer_is_replaced(RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED);
}

#[test]
fn a_producer_with_an_invalid_epoch_is_replaced() {
    rejected_producer_is_replaced(RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH);
}

#[test]
fn a_producer_nothing_acknowledges_in_time_is_replaced_while_the_broker_answers() {
    let cluster = cluster();
    let brokers = cluster.bootstrap_servers();
    let sink = healthy_sink(&options(&brokers, TOPIC, Duration::from_secs(2)));
    // Retriable errors for longer than the publish timeout: librdkafka retries until
    // the message times out.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 400],
    );
    let slow = message("a@example.com", &["b@example.com"], b"slow\r\n");
    let answer = publish(&sink, slow);
    assert!(
        matches!(answer, Err(PublishError::Temporary(_))),
        "got {answer:?}"
    );
    assert!(
        wait_until(WAIT, || sink.producer_generation() == 1),
        "no new producer after a publish timeout with the broker answering"
    );
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    assert!(wait_until(WAIT, || sink.is_healthy()));
    let next = message("a@example.com", &["b@example.com"], b"next\r\n");
    assert_eq!(publish(&sink, next.clone()), Ok(next.id));
    sink.shutdown();
}
