//! Helpers shared by the Kafka tests: a sink on a given cluster, an independent
//! consumer that reads a partition with `assign()`, and bounded waits.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use smtpgw::sink::kafka::{KafkaOptions, KafkaSink};

/// The one Rust gateway harness; the tests that include kafka_support reach it here.
#[path = "../harness/mod.rs"]
pub mod harness;

/// One record as a consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The record the gateway writes for `msg`: key = id, value, headers in order.
pub fn record_of(msg: &smtpgw::sink::record::SealedMessage) -> Record {
    let mut headers = Vec::new();
    msg.for_each_header(|name, value| headers.push((name.to_owned(), value.to_vec())));
    Record {
        key: msg.id.to_string().into_bytes(),
        value: msg.value.to_vec(),
        headers,
    }
}

pub fn options(brokers: &str, topic: &str, publish_timeout: Duration) -> KafkaOptions {
    let settings = smtpgw::config::KafkaSettings {
        kafka_brokers: Some(brokers.to_owned()),
        kafka_topic: smtpgw::config::KafkaTopic(topic.to_owned()),
        publish_timeout: smtpgw::config::Dur(publish_timeout),
        ..Default::default()
    };
    let mut options = KafkaOptions::new(settings, 100);
    options.startup_timeout = Duration::from_secs(2);
    options
}

pub use harness::wait_until;

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
    consume_partitions(brokers, topic, want, idle, timeout)
        .into_iter()
        .map(|(_, record)| record)
        .collect()
}

/// As [`consume`], with the partition each record came from.
pub fn consume_partitions(
    brokers: &str,
    topic: &str,
    want: usize,
    idle: Duration,
    timeout: Duration,
) -> Vec<(i32, Record)> {
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
                out.push((
                    m.partition(),
                    Record {
                        key: m.key().unwrap_or_default().to_vec(),
                        value: m.payload().unwrap_or_default().to_vec(),
                        headers,
                    },
                ));
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

pub use harness::Gateway;

/// A loopback port that was free a moment ago. Racy (another process may take it
/// before it is used): only for a server that cannot bind port 0 and report it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts the built gateway (tests/harness) with `--sink kafka` and `extra` flags.
pub fn start_gateway(brokers: &str, topic: &str, extra: &[&str]) -> Gateway {
    let mut args = vec![
        "--hostname",
        "mx.test",
        "--accept-domain",
        "example.com",
        "--sink",
        "kafka",
        "--kafka-brokers",
        brokers,
        "--kafka-topic",
        topic,
    ];
    args.extend_from_slice(extra);
    Gateway::start(&args, &[])
}

pub struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        Client::try_connect(addr).expect("connect and greeting")
    }

    pub fn try_connect(addr: &str) -> io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_nodelay(true)?;
        let mut c = Client {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let greeting = c.try_reply()?;
        if !greeting.starts_with("220 ") {
            return Err(io::Error::other(format!("greeting {greeting:?}")));
        }
        Ok(c)
    }

    /// One reply, all its lines joined.
    pub fn reply(&mut self) -> String {
        self.try_reply().expect("a reply")
    }

    pub fn try_reply(&mut self) -> io::Result<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed; got {all:?}"),
                ));
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(all);
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> String {
        self.try_cmd(line).expect("a reply")
    }

    pub fn try_cmd(&mut self, line: &str) -> io::Result<String> {
        // One write per command: with Nagle's algorithm a split write waits for the
        // server's delayed ACK.
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.try_reply()
    }

    /// A whole transaction; the reply to the end of DATA.
    pub fn send(&mut self, body_stuffed: &[u8]) -> String {
        self.try_send(body_stuffed).expect("a transaction")
    }

    pub fn try_send(&mut self, body_stuffed: &[u8]) -> io::Result<String> {
        for (cmd, want) in [
            ("MAIL FROM:<a@sender.test>", "250 "),
            ("RCPT TO:<x@example.com>", "250 "),
            ("RCPT TO:<y@example.com>", "250 "),
            ("DATA", "354 "),
        ] {
            let reply = self.try_cmd(cmd)?;
            if !reply.starts_with(want) {
                return Err(io::Error::other(format!("{cmd}: {reply:?}")));
            }
        }
        let mut data = Vec::with_capacity(body_stuffed.len() + 3);
        data.extend_from_slice(body_stuffed);
        data.extend_from_slice(b".\r\n");
        self.w.write_all(&data)?;
        self.try_reply()
    }
}

pub fn queued_id(reply: &str) -> String {
    reply
        .trim_end()
        .rsplit(' ')
        .next()
        .expect("an id")
        .to_owned()
}

/// A body of exactly `n` octets (n >= 2) in lines of at most 80 octets.
pub fn lines_of(n: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(n);
    while n - body.len() > 81 {
        body.extend_from_slice(&[b's'; 78]);
        body.extend_from_slice(b"\r\n");
    }
    body.resize(n - 2, b't');
    body.extend_from_slice(b"\r\n");
    assert_eq!(body.len(), n);
    body
}
