//! The built binary as an operator runs it: `smtpgw spool replay` against librdkafka's
//! mock cluster (twice: identical records; no broker: a non-zero exit naming every id
//! left unpublished), and configuration precedence (flag over environment over file)
//! seen where a client sees it, in the SIZE of the EHLO reply. Environment values go to
//! the child process as a map; this multi-threaded test binary never changes its own.

mod kafka_support;
mod spool_support;

use kafka_support::harness;

use std::time::Duration;

use harness::{path_str, run, Gateway};
use kafka_support::{consume, record_of, Client, Record};
use rdkafka::mocking::MockCluster;
use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::spool::SpoolSink;
use smtpgw::sink::Sink;
use spool_support::publish;

const TOPIC: &str = "mail.replayed";
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);

/// A spool holding three messages written by the real sink.
fn spool_of_three(dir: &std::path::Path) -> Vec<SealedMessage> {
    let sent = spool_support::replay_sample();
    let spool = SpoolSink::open(dir).expect("spool");
    for msg in &sent {
        assert_eq!(publish(&spool, msg.clone()), Ok(msg.id));
    }
    spool.shutdown();
    sent
}

fn replay(spool: &std::path::Path, brokers: &str) -> std::process::Output {
    run(
        &[
            "spool",
            "replay",
            "--spool-dir",
            path_str(spool),
            "--to-kafka",
            "--kafka-brokers",
            brokers,
            "--kafka-topic",
            TOPIC,
        ],
        &[],
        TOOL_TIMEOUT,
    )
}

#[test]
fn spool_replay_twice_publishes_identical_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sent = spool_of_three(tmp.path());
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();

    for round in 0..2 {
        let out = replay(tmp.path(), &brokers);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "round {round}: {}\n{stderr}",
            out.status
        );
        assert!(
            stderr.contains(&format!("published 3 messages to {TOPIC}; 0 failed")),
            "round {round}: {stderr}"
        );
    }
    let got = consume(&brokers, TOPIC, 2 * sent.len(), WAIT, WAIT);
    let want: Vec<Record> = sent.iter().map(record_of).collect();
    assert_eq!(got.len(), 2 * sent.len());
    assert_eq!(&got[..sent.len()], &want[..], "first replay");
    assert_eq!(
        &got[sent.len()..],
        &want[..],
        "second replay: the same records"
    );
}

/// librdkafka's default `message.max.bytes` (1 MB) would refuse this record on the
/// client side: the replay sizes the producer by the spool's largest record.
#[test]
fn spool_replay_publishes_a_record_larger_than_librdkafkas_default() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let big = spool_support::message("x@example.com", &["y@example.com"], &vec![b'a'; 3 << 20]);
    let spool = SpoolSink::open(tmp.path()).expect("spool");
    assert_eq!(publish(&spool, big.clone()), Ok(big.id));
    spool.shutdown();
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();

    let out = replay(tmp.path(), &brokers);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    assert!(
        stderr.contains(&format!("published 1 messages to {TOPIC}; 0 failed")),
        "{stderr}"
    );
    let got = consume(&brokers, TOPIC, 1, WAIT, WAIT);
    assert_eq!(got, vec![record_of(&big)]);
}

#[test]
fn spool_replay_without_a_broker_fails_naming_every_id() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sent = spool_of_three(tmp.path());
    // A listener that never speaks Kafka: held for the whole test, so the port cannot
    // be anyone else's, and the replay's connections go nowhere.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();

    let out = replay(tmp.path(), &addr);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0 without a broker:\n{stderr}");
    assert!(stderr.contains("--kafka-brokers"), "{stderr}");
    for msg in &sent {
        assert!(
            stderr.contains(&msg.id.to_string()),
            "{} is not named:\n{stderr}",
            msg.id
        );
    }
    drop(silent);
}

/// The SIZE a fresh gateway advertises with the given flags and environment.
fn advertised_size(args: &[&str], env: &[(&str, &str)]) -> String {
    let spool = tempfile::tempdir().expect("tempdir");
    let mut all = vec!["--accept-domain", "example.com", "--spool-dir"];
    all.push(path_str(spool.path()));
    all.extend_from_slice(args);
    let mut gw = Gateway::start(&all, env).keep(spool);
    let mut c = Client::connect(&gw.addr);
    let ehlo = c.cmd("EHLO client.test");
    c.cmd("QUIT");
    gw.stop();
    ehlo.lines()
        .find_map(|l| l.get(4..).and_then(|l| l.strip_prefix("SIZE ")))
        .unwrap_or_else(|| panic!("no SIZE in {ehlo:?}"))
        .to_owned()
}

#[test]
fn config_precedence_is_flag_then_environment_then_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("smtpgw.toml");
    std::fs::write(&file, "max-message-size = 1111\n").expect("config file");
    let config = ["--config", path_str(&file)];
    let env = [("SMTPGW_MAX_MESSAGE_SIZE", "2222")];

    assert_eq!(advertised_size(&config, &[]), "1111", "file");
    assert_eq!(advertised_size(&config, &env), "2222", "env over file");
    let flag = [&config[..], &["--max-message-size", "3333"]].concat();
    assert_eq!(advertised_size(&flag, &env), "3333", "flag over env");
    // The file named by the environment counts like --config.
    let via_env = [("SMTPGW_CONFIG", path_str(&file))];
    assert_eq!(advertised_size(&[], &via_env), "1111", "SMTPGW_CONFIG");
}

/// The EHLO SIZE and `smtpgw_max_message_size_bytes` of a fresh gateway, and its stderr.
fn size_and_gauge(args: &[&str]) -> (u64, u64, String) {
    use std::io::{Read, Write};
    let spool = tempfile::tempdir().expect("tempdir");
    let mut all = vec!["--accept-domain", "example.com", "--spool-dir"];
    all.push(path_str(spool.path()));
    all.extend_from_slice(args);
    let mut gw = Gateway::start(&all, &[]).keep(spool);
    let mut c = Client::connect(&gw.addr);
    let ehlo = c.cmd("EHLO client.test");
    c.cmd("QUIT");
    let size = ehlo
        .lines()
        .find_map(|l| l.get(4..).and_then(|l| l.strip_prefix("SIZE ")))
        .unwrap_or_else(|| panic!("no SIZE in {ehlo:?}"))
        .trim()
        .parse()
        .expect("SIZE number");
    let mut s = std::net::TcpStream::connect(&gw.metrics).expect("metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut scrape = String::new();
    s.read_to_string(&mut scrape).expect("scrape");
    let gauge = scrape
        .lines()
        .find_map(|l| l.strip_prefix("smtpgw_max_message_size_bytes "))
        .unwrap_or_else(|| panic!("no smtpgw_max_message_size_bytes in {scrape}"))
        .trim()
        .parse()
        .expect("gauge number");
    gw.stop();
    (size, gauge, gw.stderr())
}

/// `smtpgw_max_message_size_bytes` is the SIZE sessions advertise, whatever the mode;
/// `auto` is 10M lowered to what the sink holds, said at warn, where a set size the
/// producer cannot hold is lowered with the configured value named.
#[test]
fn max_message_size_gauge_and_auto_follow_what_the_sink_holds() {
    let (size, gauge, _) = size_and_gauge(&["--max-message-size", "1234"]);
    assert_eq!((size, gauge), (1234, 1234));
    let (size, gauge, _) = size_and_gauge(&["--max-message-size", "auto"]);
    assert_eq!((size, gauge), (10 << 20, 10 << 20), "auto with the spool");

    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    let kafka = |size: &'static str| {
        size_and_gauge(&[
            "--sink",
            "kafka",
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            TOPIC,
            "--kafka-config",
            "message.max.bytes=300000",
            "--max-message-size",
            size,
        ])
    };
    let (size, gauge, stderr) = kafka("auto");
    assert_eq!(size, gauge);
    assert!((100_000..300_000).contains(&size), "SIZE {size}");
    assert!(
        stderr.contains(&format!("--max-message-size auto: advertising SIZE {size}")),
        "{stderr}"
    );
    let (size, gauge, stderr) = kafka("2M");
    assert_eq!(size, gauge);
    assert!(
        stderr.contains("--max-message-size lowered to what the sink accepts"),
        "{stderr}"
    );
}

#[test]
fn accept_domains_from_the_environment_split_at_commas() {
    let spool = tempfile::tempdir().expect("tempdir");
    let env = [("SMTPGW_ACCEPT_DOMAIN", "e1.example,E2.example")];
    let mut gw = Gateway::start(&["--spool-dir", path_str(spool.path())], &env).keep(spool);
    let mut c = Client::connect(&gw.addr);
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<a@sender.test>").starts_with("250 "));
    for rcpt in ["x@e1.example", "x@e2.example", "x@E2.EXAMPLE"] {
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(reply.starts_with("250 "), "{rcpt}: {reply}");
    }
    let reply = c.cmd("RCPT TO:<x@example.com>");
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    c.cmd("QUIT");
    gw.stop();
}
