//! The built gateway's metrics endpoint, scraped over loopback: counters move by exactly
//! what a scripted session did, the HTTP endpoints answer as documented, `/readyz`
//! follows draining and the Kafka broker's availability (librdkafka's mock cluster),
//! librdkafka's statistics show up as gauges,
//! and `promtool check metrics` (when installed) finds nothing to lint.

mod kafka_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kafka_support::Client;
use rdkafka::mocking::MockCluster;

/// A gateway process with both of its addresses; killed by PID when dropped.
struct Gw {
    child: Child,
    smtp: String,
    metrics: String,
    /// The I/O backend the `listening` line names.
    backend: String,
    _spool: tempfile::TempDir,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the gateway on port 0 for SMTP and metrics and learns both ports from its log.
fn start(extra: &[&str]) -> Gw {
    let spool = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_smtpgw"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--hostname", "mx.test", "--accept-domain", "example.com"])
        .args(["--spool-dir"])
        .arg(spool.path())
        .args(extra)
        .env("SMTPGW_LOG", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gateway starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    // Keeps draining stderr for the process's life so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("gw: {line}");
            let _ = tx.send(line);
        }
    });
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
    };
    let (mut smtp, mut metrics, mut backend) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while smtp.is_none() || metrics.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            panic!("gateway did not log both addresses in time");
        };
        if line.contains("listening") {
            smtp = smtp.or(field(&line, "addr="));
            backend = backend.or(field(&line, "backend="));
        }
        metrics = metrics.or(field(&line, "metrics_addr="));
    }
    Gw {
        child,
        smtp: smtp.unwrap_or_default(),
        metrics: metrics.unwrap_or_default(),
        backend: backend.unwrap_or_default(),
        _spool: spool,
    }
}

/// One HTTP/1.1 request; the status code and body.
fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// The scrape as `series -> value`, e.g. `smtpgw_replies_total{code="250"}`.
fn scrape(gw: &Gw) -> HashMap<String, f64> {
    let (status, body) = http(&gw.metrics, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} missing from the scrape"))
}

fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ok()
}

#[test]
fn counters_move_by_exactly_what_a_session_did() {
    let gw = start(&["--reactors", "2"]);
    let mut c = Client::connect(&gw.smtp);
    assert!(c.cmd("EHLO client.test").starts_with("250-"));
    assert!(c.cmd("MAIL FROM:<a@sender.test>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<x@example.com>").starts_with("250 "));
    assert!(c.cmd("RCPT TO:<y@elsewhere.test>").starts_with("550 "));
    assert!(c.cmd("DATA").starts_with("354 "));
    assert!(c
        .cmd("Subject: hi\r\n\r\nhello\r\n.")
        .starts_with("250 2.0.0 Ok: queued as "));
    assert!(c.cmd("XYZZY").starts_with("500 "));
    assert!(c.cmd("QUIT").starts_with("221 "));
    drop(c);

    std::thread::sleep(Duration::from_millis(150));
    let mut m = scrape(&gw);
    assert!(
        wait_until(Duration::from_secs(5), || {
            m = scrape(&gw);
            value(&m, "smtpgw_connections_active") == 0.0
        }),
        "connection still counted as active"
    );
    let expect = [
        ("smtpgw_connections_accepted_total", 1.0),
        ("smtpgw_connections_active", 0.0),
        (
            "smtpgw_connections_rejected_total{reason=\"max_connections\"}",
            0.0,
        ),
        ("smtpgw_messages_accepted_total", 1.0),
        ("smtpgw_messages_rejected_total{reason=\"too_large\"}", 0.0),
        ("smtpgw_replies_total{code=\"220\"}", 1.0),
        // EHLO, MAIL, RCPT and the queued reply.
        ("smtpgw_replies_total{code=\"250\"}", 4.0),
        ("smtpgw_replies_total{code=\"354\"}", 1.0),
        ("smtpgw_replies_total{code=\"550\"}", 1.0),
        ("smtpgw_replies_total{code=\"500\"}", 1.0),
        ("smtpgw_replies_total{code=\"221\"}", 1.0),
        ("smtpgw_replies_total{code=\"451\"}", 0.0),
        ("smtpgw_commands_total{verb=\"EHLO\"}", 1.0),
        ("smtpgw_commands_total{verb=\"MAIL\"}", 1.0),
        ("smtpgw_commands_total{verb=\"RCPT\"}", 2.0),
        ("smtpgw_commands_total{verb=\"DATA\"}", 1.0),
        ("smtpgw_commands_total{verb=\"QUIT\"}", 1.0),
        ("smtpgw_commands_total{verb=\"OTHER\"}", 1.0),
        ("smtpgw_commands_total{verb=\"HELO\"}", 0.0),
        ("smtpgw_message_size_bytes_count", 1.0),
        ("smtpgw_data_duration_seconds_count", 1.0),
        ("smtpgw_publish_duration_seconds_count", 1.0),
        ("smtpgw_publish_inflight_messages", 0.0),
        ("smtpgw_publish_inflight_bytes", 0.0),
        ("smtpgw_publish_failures_total{reason=\"temporary\"}", 0.0),
        ("smtpgw_smuggling_attempts_total", 0.0),
        ("smtpgw_sink_up", 1.0),
        ("smtpgw_draining", 0.0),
        (
            &format!("smtpgw_io_backend_info{{backend=\"{}\"}}", gw.backend),
            1.0,
        ),
        (
            &format!(
                "smtpgw_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
    ];
    for (series, want) in expect {
        assert_eq!(value(&m, series), want, "{series}");
    }
    // "Subject: hi\r\n\r\nhello\r\n" is 22 octets.
    assert_eq!(value(&m, "smtpgw_message_size_bytes_sum"), 22.0);
    assert!(m.contains_key("smtpgw_reactor_busy_seconds_total{reactor=\"0\"}"));
    assert!(m.contains_key("smtpgw_reactor_busy_seconds_total{reactor=\"1\"}"));
}

#[test]
fn endpoints_and_readiness_during_drain() {
    let mut gw = start(&["--drain-timeout", "10s"]);
    assert_eq!(http(&gw.metrics, "GET", "/healthz"), (200, "ok\n".into()));
    assert_eq!(http(&gw.metrics, "GET", "/readyz").0, 200);
    assert_eq!(http(&gw.metrics, "GET", "/nope").0, 404);
    assert_eq!(http(&gw.metrics, "POST", "/metrics").0, 405);
    assert_eq!(http(&gw.metrics, "DELETE", "/readyz").0, 405);

    // A session in the middle of a message keeps the drain going.
    let mut c = Client::connect(&gw.smtp);
    c.cmd("HELO client.test");
    c.cmd("MAIL FROM:<a@sender.test>");
    c.cmd("RCPT TO:<x@example.com>");
    assert!(c.cmd("DATA").starts_with("354 "));
    let pid = gw.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()));
    assert!(
        wait_until(Duration::from_secs(5), || http(
            &gw.metrics,
            "GET",
            "/readyz"
        )
        .0 == 503),
        "readyz stayed 200 while draining"
    );
    let (status, body) = http(&gw.metrics, "GET", "/readyz");
    assert_eq!((status, body.as_str()), (503, "not ready: draining\n"));
    assert_eq!(value(&scrape(&gw), "smtpgw_draining"), 1.0);
    assert_eq!(http(&gw.metrics, "GET", "/healthz").0, 200);

    // Finishing the message ends the drain and the process.
    assert!(c.cmd("hi\r\n.").starts_with("250 "));
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = gw.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit after the drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn readyz_follows_the_kafka_broker() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("mail.in", 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    let gw = start(&[
        "--sink",
        "kafka",
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        "mail.in",
        "--publish-timeout",
        "3s",
    ]);
    let ready = |gw: &Gw| http(&gw.metrics, "GET", "/readyz").0;
    assert!(
        wait_until(Duration::from_secs(30), || ready(&gw) == 200),
        "never ready with the broker up"
    );
    assert_eq!(value(&scrape(&gw), "smtpgw_sink_up"), 1.0);
    // librdkafka's statistics arrive every second: queue depth and per-broker RTT.
    assert!(
        wait_until(Duration::from_secs(10), || scrape(&gw)
            .keys()
            .any(|k| k.starts_with(
                "smtpgw_kafka_broker_rtt_seconds{broker=\"127.0.0.1:"
            ))),
        "no broker RTT from librdkafka's statistics"
    );
    assert_eq!(value(&scrape(&gw), "smtpgw_kafka_queue_messages"), 0.0);

    cluster.broker_down(1).expect("broker down");
    assert!(
        wait_until(Duration::from_secs(30), || ready(&gw) == 503),
        "still ready with the broker down"
    );
    let (_, body) = http(&gw.metrics, "GET", "/readyz");
    assert_eq!(body, "not ready: sink kafka unhealthy\n");
    assert_eq!(value(&scrape(&gw), "smtpgw_sink_up"), 0.0);

    cluster.broker_up(1).expect("broker up");
    assert!(
        wait_until(Duration::from_secs(30), || ready(&gw) == 200),
        "not ready again after the broker came back"
    );
    assert_eq!(value(&scrape(&gw), "smtpgw_sink_up"), 1.0);
}

/// `promtool check metrics` on a scrape of a gateway that has served mail (accepted,
/// refused and failed replies). Skips, saying so, where promtool is not installed.
#[test]
fn promtool_finds_no_lint_problems() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("SKIPPED: promtool not installed (Debian package `prometheus`)");
        return;
    }
    let gw = start(&[]);
    let mut c = Client::connect(&gw.smtp);
    c.cmd("EHLO client.test");
    assert!(c.send(b"Subject: x\r\n\r\nbody\r\n").starts_with("250 "));
    c.cmd("RCPT TO:<x@example.com>");
    c.cmd("BOGUS");
    c.cmd("QUIT");
    drop(c);
    std::thread::sleep(Duration::from_millis(150));
    let (status, body) = http(&gw.metrics, "GET", "/metrics");
    assert_eq!(status, 200);
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write scrape");
    let out = p.wait_with_output().expect("promtool finishes");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn refused_connections_are_counted_with_their_421() {
    let gw = start(&["--max-connections", "1", "--reactors", "1"]);
    let held = Client::connect(&gw.smtp);
    let mut refused = TcpStream::connect(&gw.smtp).expect("connect");
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    let _ = refused.read_to_string(&mut text);
    assert!(text.starts_with("421 4.3.2 "), "{text}");
    drop(held);
    std::thread::sleep(Duration::from_millis(150));
    let m = scrape(&gw);
    assert_eq!(
        value(
            &m,
            "smtpgw_connections_rejected_total{reason=\"max_connections\"}"
        ),
        1.0
    );
    assert_eq!(value(&m, "smtpgw_connections_accepted_total"), 1.0);
    assert_eq!(value(&m, "smtpgw_replies_total{code=\"421\"}"), 1.0);
    assert_eq!(value(&m, "smtpgw_replies_total{code=\"220\"}"), 1.0);
}
