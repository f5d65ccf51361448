//! Helpers shared by the Kafka tests: a sink on a given cluster, an independent
//! consumer that reads a partition with `assign()`, and bounded waits.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use smtpgw::sink::kafka::{KafkaOptions, KafkaSink};

/// One record as a consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

pub fn options(brokers: &str, topic: &str, publish_timeout: Duration) -> KafkaOptions {
    let mut options = KafkaOptions::new(brokers);
    options.topic = topic.to_owned();
    options.publish_timeout = publish_timeout;
    options.startup_timeout = Duration::from_secs(2);
    options
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn healthy_sink(options: &KafkaOptions) -> KafkaSink {
    init_logs();
    let sink = KafkaSink::new(options).expect("sink starts");
    assert!(
        wait_until(Duration::from_secs(20), || smtpgw::sink::Sink::is_healthy(
            &sink
        )),
        "the sink never saw a broker"
    );
    sink
}

/// Reads every partition of `topic` from the beginning until `idle` passes with no new
/// record (or `want` records have arrived), within `timeout` overall. Counting by
/// reading, not by watermarks: some brokers report wrong end offsets.
pub fn consume(
    brokers: &str,
    topic: &str,
    want: usize,
    idle: Duration,
    timeout: Duration,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "smtpgw-test")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .expect("consumer");
    // Every partition of the topic, from the beginning.
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(1, |t| t.partitions().len().max(1));
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .expect("partition offset");
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut last = Instant::now();
    let mut out = Vec::new();
    while Instant::now() < deadline && out.len() < want {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
                last = Instant::now();
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None if out.len() >= want || last.elapsed() > idle && want == usize::MAX => break,
            None => {}
        }
    }
    out
}

/// Logs to the test's captured output (shown for failing tests); `RUST_LOG` filters.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
