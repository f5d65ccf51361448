//! A reactor backend against real sockets on loopback: written for epoll and also
//! compiled into the io_uring backend (`super` is whichever includes it).

use std::io::{Read, Write};
use std::net::TcpStream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::conn::Limits;
use crate::metrics::Metrics;
use crate::net::ReactorParams;
use crate::sink::null::NullSink;
use crate::sink::{Completion, Sink};
use crate::smtp::{BareLfPolicy, SessionConfig};

fn start(max_connections: usize, idle: Duration) -> Reactors {
    start_with(max_connections, idle, Arc::new(NullSink::new()))
}

/// A plain SMTP listener on a free loopback port, no edge settings.
pub(super) fn one_listener() -> Vec<crate::net::ListenerSpec> {
    vec![crate::net::ListenerSpec {
        addr: "127.0.0.1:0".parse().unwrap(),
        kind: crate::net::ListenerKind::Smtp,
        edge: Arc::new(crate::conn::Edge::default()),
    }]
}

fn start_with(max_connections: usize, idle: Duration, sink: Arc<dyn Sink>) -> Reactors {
    start_budget(max_connections, idle, sink, 1 << 30)
}

fn start_budget(
    max_connections: usize,
    idle: Duration,
    sink: Arc<dyn Sink>,
    max_body_memory: usize,
) -> Reactors {
    Reactors::start(ReactorParams {
        listeners: one_listener(),
        reactors: 2,
        pin_cpus: true,
        session: Arc::new(
            SessionConfig {
                hostname: "mx.test".into(),
                accept_domains: ["example.com"].into_iter().collect(),
                max_message_size: 1 << 20,
                max_recipients: 100,
                bare_lf: BareLfPolicy::Reject,
            }
            .into(),
        ),
        sink,
        metrics: Arc::new(Metrics::new().expect("metrics registry")),
        max_connections,
        limits: Limits {
            idle_timeout: idle,
            max_session_time: Duration::from_secs(60),
            min_data_rate: None,
            output_cap: Limits::DEFAULT_OUTPUT_CAP,
            sink: "test",
        },
        max_body_memory,
    })
    .expect("reactors start")
}

pub(super) fn connect(r: &Reactors) -> TcpStream {
    let s = TcpStream::connect(r.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads until the peer closes; the text of everything it sent.
pub(super) fn read_to_close(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    String::from_utf8_lossy(&all).into_owned()
}

pub(super) fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

pub(super) fn wait_for_no_connections(r: &Reactors) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.open_connections() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(r.open_connections(), 0);
}

#[test]
fn pipelined_session_then_drain() {
    let r = start(100, Duration::from_secs(60));
    assert_ne!(r.local_addr().port(), 0);
    let mut s = connect(&r);
    s.write_all(
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhi\r\n.\r\n\
          NOOP\r\nQUIT\r\n",
    )
    .unwrap();
    let text = read_to_close(&mut s);
    drop(s);
    assert!(text.starts_with("220 "), "{text}");
    assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}");
    assert!(
        text.ends_with("221 2.0.0 mx.test closing connection\r\n"),
        "{text}"
    );

    let mut idle = connect(&r);
    assert!(read_line(&mut idle).starts_with("220 "));
    r.set_phase(Phase::Draining);
    let text = read_to_close(&mut idle);
    assert!(text.starts_with("421 4.3.2 "), "{text}");
    drop(idle);
    wait_for_no_connections(&r);
    r.stop();
}

#[test]
fn connection_limit_and_idle_timeout() {
    let r = start(1, Duration::from_millis(300));
    let mut first = connect(&r);
    assert!(read_line(&mut first).starts_with("220 "));
    let mut second = connect(&r);
    assert_eq!(
        read_to_close(&mut second),
        "421 4.3.2 mx.test Too many connections, try again later\r\n"
    );
    drop(second);
    let text = read_to_close(&mut first);
    assert!(text.starts_with("421 4.4.2 "), "{text}");
    drop(first);
    wait_for_no_connections(&r);
    let mut third = connect(&r);
    assert!(read_line(&mut third).starts_with("220 "));
    r.stop();
}

/// A sink that holds every message until the test releases them.
#[derive(Default)]
struct Held(
    std::sync::Mutex<Vec<(crate::smtp::MessageId, Completion)>>,
    AtomicBool,
);

impl Sink for Held {
    fn submit(&self, msg: crate::smtp::SealedMessage, done: Completion) {
        if self.1.load(Ordering::Acquire) {
            return done.complete(Ok(msg.id));
        }
        self.0.lock().unwrap().push((msg.id, done));
    }
    fn shutdown(&self) {}
    fn name(&self) -> &'static str {
        "held"
    }
}

impl Held {
    fn release(&self) {
        self.1.store(true, Ordering::Release);
        for (id, done) in self.0.lock().unwrap().drain(..) {
            done.complete(Ok(id));
        }
    }
}

/// With the body budget spent by a message the sink holds, another session's body is
/// not read and a new MAIL gets 451 4.3.1; once the sink answers, both go on.
#[test]
fn body_budget_stops_reading_bodies_and_refuses_new_transactions() {
    let sink = Arc::new(Held::default());
    // One reactor so both connections share one budget; the floor is one message of
    // the largest size (1 MiB here) plus an eighth.
    let r = Reactors::start(ReactorParams {
        listeners: one_listener(),
        reactors: 1,
        pin_cpus: true,
        session: Arc::new(
            SessionConfig {
                hostname: "mx.test".into(),
                accept_domains: ["example.com"].into_iter().collect(),
                max_message_size: 1 << 20,
                max_recipients: 100,
                bare_lf: BareLfPolicy::Reject,
            }
            .into(),
        ),
        sink: sink.clone(),
        metrics: Arc::new(Metrics::new().expect("metrics registry")),
        max_connections: 100,
        limits: Limits {
            idle_timeout: Duration::from_secs(60),
            max_session_time: Duration::from_secs(60),
            min_data_rate: None,
            output_cap: Limits::DEFAULT_OUTPUT_CAP,
            sink: "test",
        },
        max_body_memory: 1,
    })
    .expect("reactors start");
    let start = b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n";
    let body = |len: usize| {
        let mut body = Vec::with_capacity(len + len / 998 * 2 + 5);
        while body.len() < len {
            body.extend_from_slice(&[b'x'; 998]);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b".\r\n");
        body
    };
    let session = |s: &mut TcpStream| {
        assert!(read_line(s).starts_with("220 "));
        s.write_all(start).unwrap();
        for code in ["250 ", "250 ", "250 ", "354 "] {
            let line = read_line(s);
            assert!(line.starts_with(code), "{line}");
        }
    };
    // The budget is one largest message plus an eighth (1 MiB + 128 KiB): the first
    // message, held by the sink, takes most of it.
    let mut first = connect(&r);
    session(&mut first);
    first.write_all(&body((1 << 20) - 8192)).unwrap();
    // The second body fills the rest and is then no longer read.
    let mut second = connect(&r);
    session(&mut second);
    // Written from a thread: the gateway stops reading it, so the write may block.
    let mut second_writer = second.try_clone().unwrap();
    let second_body = body(400 << 10);
    let writer = std::thread::spawn(move || second_writer.write_all(&second_body).is_ok());
    let mut third = connect(&r);
    assert!(read_line(&mut third).starts_with("220 "));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        third.write_all(b"MAIL FROM:<a@b>\r\n").unwrap();
        let line = read_line(&mut third);
        if line == "451 4.3.1 Insufficient system resources, try again later\r\n" {
            break;
        }
        // HELO first, then a MAIL that may still slip in before the budget is spent.
        assert!(
            line.starts_with("503 ") || line.starts_with("250 "),
            "{line}"
        );
        if line.starts_with("503 ") {
            third.write_all(b"HELO c\r\n").unwrap();
            assert!(read_line(&mut third).starts_with("250 "));
        } else {
            third.write_all(b"RSET\r\n").unwrap();
            assert!(read_line(&mut third).starts_with("250 "));
        }
        assert!(std::time::Instant::now() < deadline, "never refused");
    }
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        second.read(&mut b).is_err(),
        "second body answered while over budget"
    );
    // The sink answers: the budget comes back and everything goes on.
    sink.release();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(read_line(&mut first).starts_with("250 2.0.0 Ok: queued as "));
    assert!(read_line(&mut second).starts_with("250 2.0.0 Ok: queued as "));
    assert!(writer.join().unwrap());
    third.write_all(b"MAIL FROM:<a@b>\r\n").unwrap();
    assert!(read_line(&mut third).starts_with("250 "));
    drop((first, second, third));
    wait_for_no_connections(&r);
    r.stop();
}

/// A client that pipelines commands and never reads our replies: the output cap stops
/// the session, so the gateway's memory stays bounded, and the write deadline drops it.
#[test]
fn never_reading_client_is_bounded_and_dropped() {
    let r = start(100, Duration::from_millis(500));
    let mut s = connect(&r);
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let line = b"HELP\r\n".repeat(1000);
    let mut sent = 0usize;
    // The gateway stops reading once its replies back up, so our writes block (and
    // time out) long before we have sent much.
    while sent < 64 << 20 {
        match s.write(&line) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 64 << 20, "the gateway kept reading: {sent} bytes");
    wait_for_no_connections(&r);
    r.stop();
}

/// Idle reactors answer the watchdog's question (woken by it, not by a timer), and
/// reactors whose loops have ended never do: the watchdog pings only for live loops.
#[test]
fn reactors_answer_the_watchdog_only_while_their_loops_run() {
    let r = start(10, Duration::from_secs(60));
    let liveness = r.liveness();
    for round in 0..3 {
        liveness.ask();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !liveness.silent().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: reactors {:?} never answered",
                liveness.silent()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    r.stop();
    liveness.ask();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        liveness.silent(),
        vec![0, 1],
        "stopped reactors must not answer"
    );
}
