//! The contract every I/O backend keeps, against real sockets on loopback: each test
//! is written once, takes the backend, and is instantiated once per backend by
//! [`contract!`] (`net::contract_tests::epoll::*`, `net::contract_tests::uring::*`).
//! The helpers are shared with the io_uring backend's own tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::conn::ConnectionSettings;
use crate::metrics::Metrics;
use crate::net::{IoBackend, ReactorParams, Reactors};
use crate::sink::null::NullSink;
use crate::sink::{Completion, Sink};
use crate::smtp::{BareLfPolicy, SessionConfig};

/// Every test below, once per backend.
macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod epoll {
            $(#[test]
            fn $test() {
                super::$test(crate::net::IoBackend::Epoll);
            })*
        }
        mod uring {
            $(#[test]
            fn $test() {
                super::$test(crate::net::IoBackend::Uring);
            })*
        }
    };
}

contract!(
    pipelined_session_then_drain,
    a_pipelined_blast_past_the_output_cap_gets_every_reply,
    connection_limit_and_idle_timeout,
    body_budget_stops_reading_bodies_and_refuses_new_transactions,
    never_reading_client_is_bounded_and_dropped,
    reactors_answer_the_watchdog_only_while_their_loops_run,
    slow_sink_over_its_inflight_limit_pauses_bodies,
    commands_sent_while_the_sink_holds_the_message_are_answered_after_it,
);

/// What the helpers need of running reactors, whichever the backend (the io_uring
/// tests hold its own `Reactors` to read its counters).
pub(crate) trait Served {
    fn local_addr(&self) -> SocketAddr;
    fn open_connections(&self) -> usize;
}

impl Served for Reactors {
    fn local_addr(&self) -> SocketAddr {
        Reactors::local_addr(self)
    }
    fn open_connections(&self) -> usize {
        Reactors::open_connections(self)
    }
}

impl Served for crate::net::uring::Reactors {
    fn local_addr(&self) -> SocketAddr {
        crate::net::uring::Reactors::local_addr(self)
    }
    fn open_connections(&self) -> usize {
        self.shared.open_connections()
    }
}

fn start(backend: IoBackend, max_connections: usize, idle: Duration) -> Reactors {
    start_with(backend, max_connections, idle, Arc::new(NullSink::new()))
}

/// A plain SMTP listener on a free loopback port, no edge settings.
pub(crate) fn one_listener() -> Vec<crate::net::ListenerSpec> {
    vec![crate::net::ListenerSpec {
        addr: "127.0.0.1:0".parse().unwrap(),
        kind: crate::net::ListenerKind::Smtp,
        edge: Arc::new(crate::conn::Edge::default()),
    }]
}

fn start_with(
    backend: IoBackend,
    max_connections: usize,
    idle: Duration,
    sink: Arc<dyn Sink>,
) -> Reactors {
    start_budget(backend, max_connections, idle, sink, 1 << 30)
}

fn start_budget(
    backend: IoBackend,
    max_connections: usize,
    idle: Duration,
    sink: Arc<dyn Sink>,
    max_body_memory: usize,
) -> Reactors {
    let mut p = params(sink, max_connections, idle);
    p.max_body_memory = max_body_memory;
    Reactors::start(backend, p).expect("reactors start")
}

/// Two reactors on one plain listener, `mx.test` accepting `example.com`, 1 MiB
/// messages, a session time of a minute and no body budget to speak of.
pub(crate) fn params(sink: Arc<dyn Sink>, max_connections: usize, idle: Duration) -> ReactorParams {
    ReactorParams {
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
                headroom: crate::sink::record::RECEIVED_HEADROOM + "mx.test".len(),
            }
            .into(),
        ),
        sink,
        metrics: Arc::new(Metrics::new().expect("metrics registry")),
        max_connections,
        limits: ConnectionSettings {
            idle_timeout: idle,
            max_session_time: Duration::from_secs(60),
            min_data_rate: None,
            output_cap: ConnectionSettings::DEFAULT_OUTPUT_CAP,
            sink: "test",
        },
        max_body_memory: 1 << 30,
    }
}

pub(crate) fn connect(r: &impl Served) -> TcpStream {
    let s = TcpStream::connect(r.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads until the peer closes; the text of everything it sent.
pub(crate) fn read_to_close(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    String::from_utf8_lossy(&all).into_owned()
}

pub(crate) fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

pub(crate) fn wait_for_no_connections(r: &impl Served) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.open_connections() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(r.open_connections(), 0);
}

fn pipelined_session_then_drain(backend: IoBackend) {
    let r = start(backend, 100, Duration::from_secs(60));
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
    r.begin_drain();
    let text = read_to_close(&mut idle);
    assert!(text.starts_with("421 4.3.2 "), "{text}");
    drop(idle);
    wait_for_no_connections(&r);
    r.stop();
}

/// Thousands of pipelined transactions in one write, read as they come: the driver
/// pauses at its output cap with input in hand many times over, and each time the
/// write that drains it lets it go on, completing messages that must still reach the
/// sink (the null sink answers inside the hand-off, so no wake-up brings them there).
/// Epoll once stopped after 101 of 6,000 here.
fn a_pipelined_blast_past_the_output_cap_gets_every_reply(backend: IoBackend) {
    const MESSAGES: usize = 3000;
    let r = start(backend, 100, Duration::from_secs(60));
    let mut s = connect(&r);
    let one: &[u8] = b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nBDAT 10 LAST\r\n0123456789";
    let mut blast = b"EHLO c\r\n".to_vec();
    for _ in 0..MESSAGES {
        blast.extend_from_slice(one);
    }
    blast.extend_from_slice(b"QUIT\r\n");
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&blast));
    let text = read_to_close(&mut s);
    sender.join().unwrap().unwrap();
    assert_eq!(
        text.matches("250 2.0.0 Ok: queued as ").count(),
        MESSAGES,
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(text.ends_with("221 2.0.0 mx.test closing connection\r\n"));
    drop(s);
    wait_for_no_connections(&r);
    r.stop();
}

fn connection_limit_and_idle_timeout(backend: IoBackend) {
    let r = start(backend, 1, Duration::from_millis(300));
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
    fn submit(&self, msg: crate::sink::record::SealedMessage, done: Completion) {
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

/// A client that sends its next commands while its message is with the sink: the
/// bytes reach a connection that reads nothing more until the answer (io_uring keeps
/// a posted receive for this, `Next::keep_posted_read`); they wait in the driver and
/// are answered, in order, after the `250`.
fn commands_sent_while_the_sink_holds_the_message_are_answered_after_it(backend: IoBackend) {
    let sink = Arc::new(Held::default());
    let r = start_with(backend, 10, Duration::from_secs(60), sink.clone());
    let mut s = connect(&r);
    assert!(read_line(&mut s).starts_with("220 "));
    s.write_all(b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
        .unwrap();
    for code in ["250 ", "250 ", "250 ", "354 "] {
        let line = read_line(&mut s);
        assert!(line.starts_with(code), "{line}");
    }
    s.write_all(b"hi\r\n.\r\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sink.0.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the sink never got it"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    s.write_all(b"NOOP\r\nQUIT\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(s.read(&mut b).is_err(), "answered before the sink did");
    sink.release();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let text = read_to_close(&mut s);
    assert!(text.starts_with("250 2.0.0 Ok: queued as "), "{text}");
    assert!(
        text.ends_with("\r\n250 2.0.0 Ok\r\n221 2.0.0 mx.test closing connection\r\n"),
        "{text}"
    );
    drop(s);
    wait_for_no_connections(&r);
    r.stop();
}

/// With the body budget spent by a message the sink holds, another session's body is
/// not read and a new MAIL gets 451 4.3.1; once the sink answers, both go on.
fn body_budget_stops_reading_bodies_and_refuses_new_transactions(backend: IoBackend) {
    let sink = Arc::new(Held::default());
    // One reactor so both connections share one budget; the floor is one message of
    // the largest size (1 MiB here) plus an eighth.
    let mut p = params(sink.clone(), 100, Duration::from_secs(60));
    p.reactors = 1;
    p.max_body_memory = 1;
    let r = Reactors::start(backend, p).expect("reactors start");
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
fn never_reading_client_is_bounded_and_dropped(backend: IoBackend) {
    let r = start(backend, 100, Duration::from_millis(500));
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
fn reactors_answer_the_watchdog_only_while_their_loops_run(backend: IoBackend) {
    let r = start(backend, 10, Duration::from_secs(60));
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

/// A sink that answers late, one message at a time, with an in-flight limit like the
/// Kafka sink's (`--max-inflight-messages`); it records the most it ever held.
struct Slow {
    limit: usize,
    queue: std::sync::Mutex<Option<std::sync::mpsc::Sender<(crate::smtp::MessageId, Completion)>>>,
    inflight: Arc<std::sync::atomic::AtomicUsize>,
    most: std::sync::atomic::AtomicUsize,
    taken: std::sync::Mutex<Vec<crate::smtp::MessageId>>,
}

impl Slow {
    /// Answers each message `delay` after the previous answer, from its own thread.
    fn new(limit: usize, delay: Duration) -> (Arc<Slow>, std::thread::JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel::<(crate::smtp::MessageId, Completion)>();
        let inflight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = inflight.clone();
        let answerer = std::thread::spawn(move || {
            for (id, done) in rx {
                std::thread::sleep(delay);
                // Down before the answer, as the Kafka sink does: the answer is what
                // wakes the paused bodies.
                count.fetch_sub(1, Ordering::SeqCst);
                done.complete(Ok(id));
            }
        });
        let sink = Arc::new(Slow {
            limit,
            queue: std::sync::Mutex::new(Some(tx)),
            inflight,
            most: Default::default(),
            taken: Default::default(),
        });
        (sink, answerer)
    }
}

impl Sink for Slow {
    fn submit(&self, msg: crate::sink::record::SealedMessage, done: Completion) {
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.taken.lock().unwrap().push(msg.id);
        match &*self.queue.lock().unwrap() {
            Some(tx) => tx.send((msg.id, done)).unwrap(),
            None => done.complete(Err(crate::sink::PublishError::Temporary("shut".into()))),
        }
    }
    fn shutdown(&self) {
        self.queue.lock().unwrap().take();
    }
    fn name(&self) -> &'static str {
        "slow"
    }
    fn over_inflight_limit(&self) -> bool {
        self.inflight.load(Ordering::SeqCst) >= self.limit
    }
}

/// A sink slower than its clients, with an in-flight limit: bodies stop being read
/// while it is over the limit (it never holds more than the limit plus the bodies the
/// reactors were finishing), commands are still answered, every message gets its
/// `250` (nothing is refused for the sink being slow) and each `250` is a message the
/// sink took.
fn slow_sink_over_its_inflight_limit_pauses_bodies(backend: IoBackend) {
    const LIMIT: usize = 3;
    const SESSIONS: usize = 10;
    const MESSAGES: usize = 4;
    let (sink, answerer) = Slow::new(LIMIT, Duration::from_millis(15));
    let r = start_with(backend, 100, Duration::from_secs(60), sink.clone());
    let addr = r.local_addr();
    // Bodies of a few reads each, so some are paused half-way.
    let mut body = Vec::new();
    while body.len() < 40 << 10 {
        body.extend_from_slice(&[b'b'; 998]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    let body = Arc::new(body);
    let clients: Vec<_> = (0..SESSIONS)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                assert!(read_line(&mut s).starts_with("220 "));
                s.write_all(b"HELO c\r\n").unwrap();
                assert!(read_line(&mut s).starts_with("250 "));
                let mut queued = Vec::new();
                for _ in 0..MESSAGES {
                    s.write_all(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
                        .unwrap();
                    for code in ["250 ", "250 ", "354 "] {
                        let line = read_line(&mut s);
                        assert!(line.starts_with(code), "{line}");
                    }
                    s.write_all(&body).unwrap();
                    let line = read_line(&mut s);
                    let id = line
                        .strip_prefix("250 2.0.0 Ok: queued as ")
                        .unwrap_or_else(|| panic!("{line}"))
                        .trim_end()
                        .to_owned();
                    queued.push(id);
                }
                s.write_all(b"QUIT\r\n").unwrap();
                queued
            })
        })
        .collect();
    // Meanwhile, commands outside a body are answered, and nothing is refused.
    let mut c = connect(&r);
    assert!(read_line(&mut c).starts_with("220 "));
    c.write_all(b"HELO c\r\n").unwrap();
    assert!(read_line(&mut c).starts_with("250 "));
    for _ in 0..20 {
        c.write_all(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nRSET\r\n")
            .unwrap();
        for _ in 0..3 {
            let line = read_line(&mut c);
            assert!(line.starts_with("250 "), "{line}");
        }
    }
    let mut queued: Vec<String> = clients
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    drop(c);
    wait_for_no_connections(&r);
    r.stop();
    sink.shutdown();
    answerer.join().unwrap();
    // Every 250 is a message the sink took, and the sink took nothing else.
    let mut taken: Vec<String> = sink
        .taken
        .lock()
        .unwrap()
        .iter()
        .map(|id| id.to_string())
        .collect();
    queued.sort();
    taken.sort();
    assert_eq!(queued.len(), SESSIONS * MESSAGES);
    assert_eq!(queued, taken);
    // Two reactors: each may finish a body it was reading when the other's message
    // took the sink to its limit.
    let most = sink.most.load(Ordering::SeqCst);
    eprintln!("most in flight: {most} (limit {LIMIT}, {SESSIONS} sessions)");
    assert!(
        most <= LIMIT + 2,
        "the sink held {most} messages, limit {LIMIT}"
    );
}
