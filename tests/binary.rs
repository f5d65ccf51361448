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
use smtpgw::sink::spool::SpoolSink;
use smtpgw::sink::Sink;
use smtpgw::smtp::envelope::SealedMessage;
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
