//! The built `smtpgw --sink kafka` against librdkafka's mock cluster, driven by a
//! plain SMTP client over loopback: 250 only with the record in the topic, 451 while
//! the broker is down, 250 again once it is back, SIZE within what Kafka accepts.

mod kafka_support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kafka_support::{consume, wait_until};
use rdkafka::mocking::MockCluster;

const TOPIC: &str = "mail.in";

/// The gateway process; killed by its PID if a test fails before stopping it.
struct Gateway {
    child: Child,
    addr: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn start_gateway(brokers: &str) -> Gateway {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_smtpgw"))
        .args([
            "--listen",
            &addr,
            "--hostname",
            "mx.test",
            "--accept-domain",
            "example.com",
            "--reactors",
            "1",
            "--sink",
            "kafka",
            "--kafka-brokers",
            brokers,
            "--kafka-topic",
            TOPIC,
            "--kafka-config",
            "message.max.bytes=300000",
            "--publish-timeout",
            "3s",
            "--drain-timeout",
            "5s",
        ])
        .env("SMTPGW_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("gateway starts");
    let gw = Gateway { child, addr };
    assert!(
        wait_until(Duration::from_secs(30), || TcpStream::connect(&gw.addr)
            .is_ok()),
        "gateway never listened"
    );
    gw
}

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(addr: &str) -> Client {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut c = Client {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: s,
        };
        assert!(c.reply().starts_with("220 "));
        c
    }

    /// One reply, all its lines joined.
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("reply line");
            assert!(!line.is_empty(), "connection closed; got {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        self.w.write_all(line.as_bytes()).expect("send");
        self.w.write_all(b"\r\n").expect("send");
        self.reply()
    }

    /// A whole transaction; the reply to the end of DATA.
    fn send(&mut self, body_stuffed: &[u8]) -> String {
        assert!(self.cmd("MAIL FROM:<a@sender.test>").starts_with("250 "));
        assert!(self.cmd("RCPT TO:<x@example.com>").starts_with("250 "));
        assert!(self.cmd("RCPT TO:<y@example.com>").starts_with("250 "));
        assert!(self.cmd("DATA").starts_with("354 "));
        self.w.write_all(body_stuffed).expect("body");
        self.w.write_all(b".\r\n").expect("end");
        self.reply()
    }
}

fn queued_id(reply: &str) -> String {
    reply
        .trim_end()
        .rsplit(' ')
        .next()
        .expect("an id")
        .to_owned()
}

#[test]
fn gateway_publishes_then_answers_451_while_the_broker_is_down() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    let gw = start_gateway(&brokers);

    let mut c = Client::connect(&gw.addr);
    let ehlo = c.cmd("EHLO client.test");
    let size: usize = ehlo
        .lines()
        .find_map(|l| l.strip_prefix("250-SIZE ").or(l.strip_prefix("250 SIZE ")))
        .expect("SIZE advertised")
        .trim()
        .parse()
        .expect("SIZE number");
    // message.max.bytes=300000 less the record overhead and the Received: line.
    assert!(size < 300_000 - 50_000, "SIZE {size}");
    assert!(size > 100_000, "SIZE {size}");

    // The gateway only takes mail once its sink has seen a broker.
    let mut reply = c.send(b"Subject: hi\r\n\r\n..dot\r\n\xe9t\xe9\r\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reply.starts_with("451 ") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        reply = c.send(b"Subject: hi\r\n\r\n..dot\r\n\xe9t\xe9\r\n");
    }
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = queued_id(&reply);

    let too_big = vec![b'z'; size + 10];
    let mut big = too_big.clone();
    big.extend_from_slice(b"\r\n");
    assert!(c.send(&big).starts_with("552 "), "over SIZE is refused");

    cluster.broker_down(1).expect("down");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reply = c.send(b"during\r\n");
    while reply.starts_with("250 ") && Instant::now() < deadline {
        reply = c.send(b"during\r\n");
    }
    assert!(reply.starts_with("451 4.3.0 "), "{reply}");
    // The session goes on after a 451.
    assert!(c.cmd("NOOP").starts_with("250 "));

    cluster.broker_up(1).expect("up");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reply = c.send(b"after\r\n");
    while reply.starts_with("451 ") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        reply = c.send(b"after\r\n");
    }
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let after_id = queued_id(&reply);
    assert!(c.cmd("QUIT").starts_with("221 "));

    // SIGTERM drains (flushes the producer) and exits 0.
    let mut gw = gw;
    let status = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = gw.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");

    let records = consume(
        &brokers,
        TOPIC,
        usize::MAX,
        Duration::from_secs(2),
        Duration::from_secs(20),
    );
    let first = records
        .iter()
        .find(|r| r.key == id.as_bytes())
        .expect("the first 250'd message is in the topic");
    assert!(first.value.starts_with(b"Received: from client.test"));
    assert!(
        first
            .value
            .ends_with(b"Subject: hi\r\n\r\n.dot\r\n\xe9t\xe9\r\n"),
        "dot-unstuffed, 8-bit intact"
    );
    let rcpts: Vec<&[u8]> = first
        .headers
        .iter()
        .filter(|(k, _)| k == "smtp.rcpt_to")
        .map(|(_, v)| v.as_slice())
        .collect();
    assert_eq!(rcpts, vec![&b"x@example.com"[..], &b"y@example.com"[..]]);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.key == after_id.as_bytes())
            .count(),
        1
    );
}
