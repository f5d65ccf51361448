//! Differential: the two I/O backends must be indistinguishable to a client. The same
//! proptest-generated sessions (valid and invalid commands, DATA with dot-stuffing and
//! bare line ends, BDAT, oversized bodies, junk; written in random pieces; ended by
//! QUIT or by the client closing its side mid-way) go to an epoll and an io_uring
//! gateway in this process; the reply streams must be byte-identical (the queued-as
//! ids masked) and the sinks must have stored identical messages.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use smtpgw::conn::{ConnectionSettings, Edge};
use smtpgw::metrics::Metrics;
use smtpgw::net::{IoBackend, ListenerKind, ListenerSpec, ReactorParams, Reactors};
use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::{Completion, Sink};
use smtpgw::smtp::{BareLfPolicy, SessionConfig};

/// What a sink stored: sender, recipients, body.
type Stored = (String, Vec<String>, Vec<u8>);

#[derive(Default)]
struct Recording(Mutex<Vec<Stored>>);

impl Sink for Recording {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        let stored = (
            msg.envelope.mail_from().to_owned(),
            msg.envelope.rcpt_to().map(str::to_owned).collect(),
            msg.body().to_vec(),
        );
        self.0.lock().unwrap().push(stored);
        done.complete(Ok(msg.id));
    }
    fn shutdown(&self) {}
    fn name(&self) -> &'static str {
        "recording"
    }
}

fn start(backend: IoBackend, sink: Arc<Recording>) -> Reactors {
    Reactors::start(
        backend,
        ReactorParams {
            listeners: vec![ListenerSpec {
                addr: "127.0.0.1:0".parse().unwrap(),
                kind: ListenerKind::Smtp,
                edge: Arc::new(Edge::default()),
            }],
            reactors: 2,
            pin_cpus: true,
            session: Arc::new(
                SessionConfig {
                    hostname: "mx.test".into(),
                    accept_domains: ["example.com"].into_iter().collect(),
                    max_message_size: 2048,
                    max_recipients: 3,
                    bare_lf: BareLfPolicy::Reject,
                    headroom: smtpgw::sink::record::RECEIVED_HEADROOM + "mx.test".len(),
                }
                .into(),
            ),
            sink,
            metrics: Arc::new(Metrics::new().expect("metrics")),
            max_connections: 100,
            limits: ConnectionSettings {
                idle_timeout: Duration::from_secs(30),
                max_session_time: Duration::from_secs(60),
                min_data_rate: None,
                output_cap: ConnectionSettings::DEFAULT_OUTPUT_CAP,
                sink: "recording",
            },
            max_body_memory: 1 << 30,
        },
    )
    .expect("reactors start")
}

/// One step of a client script.
#[derive(Clone, Debug)]
enum Step {
    Ehlo,
    Helo,
    Mail { size: Option<u32> },
    Rcpt { good: bool },
    Data(Vec<Vec<u8>>),
    Bdat { chunk: Vec<u8>, last: bool },
    Noop,
    Rset,
    Junk(Vec<u8>),
}

fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-zA-Z0-9 :]{0,60}".prop_map(|s| s.into_bytes()),
        1 => Just(b".".to_vec()),
        1 => Just(b"..dot".to_vec()),
        1 => Just(b"a\nb".to_vec()),
        1 => Just(b"x\r.".to_vec()),
        1 => Just(vec![b'y'; 900]),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => Just(Step::Ehlo),
        1 => Just(Step::Helo),
        3 => proptest::option::of(0u32..4000).prop_map(|size| Step::Mail { size }),
        3 => any::<bool>().prop_map(|good| Step::Rcpt { good }),
        3 => proptest::collection::vec(line(), 0..6).prop_map(Step::Data),
        1 => (proptest::collection::vec(any::<u8>(), 0..300), any::<bool>())
            .prop_map(|(chunk, last)| Step::Bdat { chunk, last }),
        1 => Just(Step::Noop),
        1 => Just(Step::Rset),
        1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Step::Junk),
    ]
}

fn render(steps: &[Step], quit: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for s in steps {
        match s {
            Step::Ehlo => out.extend_from_slice(b"EHLO client.test\r\n"),
            Step::Helo => out.extend_from_slice(b"HELO client.test\r\n"),
            Step::Mail { size: None } => out.extend_from_slice(b"MAIL FROM:<a@client.test>\r\n"),
            Step::Mail { size: Some(n) } => {
                out.extend_from_slice(format!("MAIL FROM:<a@client.test> SIZE={n}\r\n").as_bytes())
            }
            Step::Rcpt { good: true } => out.extend_from_slice(b"RCPT TO:<x@example.com>\r\n"),
            Step::Rcpt { good: false } => out.extend_from_slice(b"RCPT TO:<x@elsewhere.test>\r\n"),
            Step::Data(lines) => {
                out.extend_from_slice(b"DATA\r\n");
                for l in lines {
                    out.extend_from_slice(l);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b".\r\n");
            }
            Step::Bdat { chunk, last } => {
                let tail = if *last { " LAST" } else { "" };
                out.extend_from_slice(format!("BDAT {}{tail}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
            }
            Step::Noop => out.extend_from_slice(b"NOOP\r\n"),
            Step::Rset => out.extend_from_slice(b"RSET\r\n"),
            Step::Junk(b) => {
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    if quit {
        out.extend_from_slice(b"QUIT\r\n");
    }
    out
}

/// Plays `script` in pieces ending at `cuts`, then (without QUIT) closes the write
/// side; returns everything the server sent until it closed.
fn play(addr: SocketAddr, script: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = s.try_clone().unwrap();
    let collected = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = reader.read_to_end(&mut all);
        all
    });
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&script.len())) {
        let cut = cut.clamp(from, script.len());
        if cut > from {
            // The server may close first (QUIT in the middle, a 421): later writes fail.
            if s.write_all(&script[from..cut]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        from = cut;
    }
    let _ = s.shutdown(Shutdown::Write);
    collected.join().unwrap()
}

/// Queued-as ids differ by nature; everything else must not.
fn mask(replies: &[u8]) -> String {
    let text = String::from_utf8_lossy(replies).into_owned();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("queued as ") {
        let (head, tail) = rest.split_at(i + "queued as ".len());
        out.push_str(head);
        out.push_str("<ID>");
        rest = &tail[tail.len().min(26)..];
    }
    out.push_str(rest);
    out
}

#[test]
fn both_backends_answer_and_store_alike() {
    let epoll_sink = Arc::new(Recording::default());
    let uring_sink = Arc::new(Recording::default());
    let epoll = start(IoBackend::Epoll, epoll_sink.clone());
    let uring = start(IoBackend::Uring, uring_sink.clone());
    assert_eq!((epoll.backend(), uring.backend()), ("epoll", "uring"));

    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(step(), 1..14),
        any::<bool>(),
        proptest::collection::vec(0usize..4000, 0..8),
    );
    let result = runner.run(&strategy, |(steps, quit, mut cuts)| {
        cuts.sort_unstable();
        let script = render(&steps, quit);
        let a = play(epoll.local_addr(), &script, &cuts);
        let b = play(uring.local_addr(), &script, &cuts);
        let stored_a = std::mem::take(&mut *epoll_sink.0.lock().unwrap());
        let stored_b = std::mem::take(&mut *uring_sink.0.lock().unwrap());
        prop_assert!(a.starts_with(b"220 "), "{}", mask(&a));
        prop_assert_eq!(mask(&a), mask(&b));
        prop_assert_eq!(stored_a, stored_b);
        Ok(())
    });
    epoll.stop();
    uring.stop();
    if let Err(e) = result {
        panic!("{e}");
    }
}
