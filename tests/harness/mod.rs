//! The one way integration tests start the built gateway and hold it to account, and
//! the one rule for a missing prerequisite.
//!
//! A gateway started here listens on port 0 (SMTP and metrics; both addresses are read
//! back from its log), runs on the I/O backend named by `SMTPGW_TEST_IO_BACKENDS`, gets
//! only the environment the test passes in (no `SMTPGW_*` of the caller leaks through),
//! and must end well: stopped with SIGTERM it exits 0, and its stderr never says
//! "panicked" (a panic in a connection's task is caught by the runtime and would
//! otherwise go unnoticed). A test that stops it itself gets the same checks; one that
//! kills it with SIGKILL on purpose says so with [`Gateway::kill9`]. Dropping a gateway
//! that is still running stops and checks it, failing the test if it does not end well.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a gateway may take to log that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a gateway may take to exit after SIGTERM (drain included).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Under `CI=true` a missing prerequisite fails the test; elsewhere the test says it
/// skips and returns. Use as `if !harness::prerequisite(ok, "what") { return; }`.
pub fn prerequisite(present: bool, what: &str) -> bool {
    if present {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(!ci, "prerequisite missing under CI=true: {what}");
    eprintln!("SKIPPED: prerequisite missing: {what}");
    false
}

/// The I/O backend every gateway of this test run uses: `SMTPGW_TEST_IO_BACKENDS`, one
/// entry per `cargo test` run (scripts/test.sh runs once per entry), default "epoll".
pub fn io_backend() -> String {
    let list = std::env::var("SMTPGW_TEST_IO_BACKENDS").unwrap_or_else(|_| "epoll".into());
    let backends: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .collect();
    match backends.as_slice() {
        [one] => (*one).to_owned(),
        [] => "epoll".to_owned(),
        _ => panic!(
            "SMTPGW_TEST_IO_BACKENDS={list}: a cargo test run takes one backend; \
             scripts/test.sh runs the Rust tests once per entry"
        ),
    }
}

/// `--io-backend NAME` once the binary has the flag. Before that only "epoll" exists,
/// and asking for another backend fails rather than silently testing epoll.
pub fn backend_args() -> Vec<String> {
    static HAS_FLAG: OnceLock<bool> = OnceLock::new();
    let has_flag = *HAS_FLAG.get_or_init(|| {
        let help = Command::new(binary())
            .arg("--help")
            .env_clear()
            .output()
            .expect("smtpgw --help runs");
        String::from_utf8_lossy(&help.stdout).contains("--io-backend")
    });
    let backend = io_backend();
    if has_flag {
        vec!["--io-backend".into(), backend]
    } else {
        assert_eq!(
            backend, "epoll",
            "this smtpgw has no --io-backend flag: only epoll can be tested"
        );
        Vec::new()
    }
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_smtpgw")
}

/// The environment a gateway or tool process gets: the caller's, less every `SMTPGW_*`
/// and `RUST_LOG` (they would change its flags), plus `env`.
pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SMTPGW_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes (for state the test can
/// only observe from outside the process).
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

/// A running gateway process.
pub struct Gateway {
    pub child: Child,
    /// The SMTP listener's address, as the gateway logged it.
    pub addr: String,
    /// The metrics endpoint's address, as the gateway logged it.
    pub metrics: String,
    /// The I/O backend the `listening` line names.
    pub backend: String,
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    /// Set once the exit has been checked (or deliberately not: SIGKILL).
    done: bool,
    /// Things that must outlive the process (its spool directory), dropped after it.
    keep: Vec<Box<dyn std::any::Any>>,
}

impl Gateway {
    /// `smtpgw --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 [--io-backend B] ARGS`
    /// with `env` added to a clean environment; waits until it logs both addresses.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut all = vec!["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
        let backend = backend_args();
        all.extend(backend.iter().map(String::as_str));
        all.extend_from_slice(args);
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "SMTPGW_LOG") {
            // The addresses are logged at info.
            env.push(("SMTPGW_LOG", "info"));
        }
        let mut child = command(&all, &env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let pipe = child.stderr.take().expect("stderr is piped");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        // Drains stderr for the process's whole life, so it never blocks on a full pipe.
        let reader = {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("gw: {line}");
                    {
                        let mut all = stderr.lock().unwrap_or_else(|e| e.into_inner());
                        all.push_str(&line);
                        all.push('\n');
                    }
                    let _ = tx.send(line);
                }
            })
        };
        let mut gw = Gateway {
            child,
            addr: String::new(),
            metrics: String::new(),
            backend: String::new(),
            stderr,
            reader: Some(reader),
            done: false,
            keep: Vec::new(),
        };
        let field = |line: &str, key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while gw.addr.is_empty() || gw.metrics.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("listening") && gw.addr.is_empty() {
                        gw.addr = field(&line, "addr=").unwrap_or_default();
                        gw.backend = field(&line, "backend=").unwrap_or_default();
                    }
                    if gw.metrics.is_empty() {
                        gw.metrics = field(&line, "metrics_addr=").unwrap_or_default();
                    }
                }
                Err(_) => {
                    let status = gw.child.try_wait().ok().flatten();
                    gw.done = true;
                    let _ = gw.child.kill();
                    let _ = gw.child.wait();
                    panic!(
                        "gateway did not log both addresses within {START_TIMEOUT:?} \
                         (exit {status:?}); stderr:\n{}",
                        gw.stderr()
                    );
                }
            }
        }
        gw
    }

    /// Keeps `thing` (a temporary directory, say) alive until the process has ended.
    pub fn keep(mut self, thing: impl std::any::Any) -> Gateway {
        self.keep.push(Box::new(thing));
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits (bounded) until a line of stderr contains `needle`; returns that line.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let find = || {
            self.stderr()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_owned)
        };
        assert!(
            wait_until(START_TIMEOUT, || find().is_some()),
            "gateway never logged {needle:?}; stderr:\n{}",
            self.stderr()
        );
        find().unwrap_or_default()
    }

    /// Sends `signal` (e.g. "TERM") while the child is unreaped, so the PID is ours.
    pub fn signal(&mut self, signal: &str) {
        if self.child.try_wait().expect("try_wait").is_none() {
            let status = Command::new("kill")
                .args([&format!("-{signal}"), &self.pid().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill -{signal} {}", self.pid());
        }
    }

    /// Waits for the process to exit (after a signal the test sent) and checks that it
    /// ended well: exit 0 and no panic in its stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                self.done = true;
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "gateway did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.done = true;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let stderr = self.stderr();
        assert!(
            status.success(),
            "gateway exited with {status}; stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "gateway panicked; stderr:\n{stderr}"
        );
        status
    }

    /// SIGTERM, then the checks of [`Gateway::wait_exit`].
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(STOP_TIMEOUT)
    }

    /// SIGKILL on purpose (a crash test): no exit status to check, but a panic logged
    /// before the kill still fails the test.
    pub fn kill9(&mut self) {
        self.done = true;
        self.child.kill().expect("SIGKILL the gateway");
        self.child.wait().expect("reaped");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let stderr = self.stderr();
        assert!(
            !stderr.contains("panicked"),
            "gateway panicked before SIGKILL; stderr:\n{stderr}"
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if std::thread::panicking() {
            // The test has failed already; just do not leave the process behind.
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        }
        self.stop();
    }
}

/// Runs the binary to completion (a tool subcommand, or a start-up that must fail),
/// killed if it outlives `timeout`.
pub fn run(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> std::process::Output {
    let child = command(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("smtpgw runs");
    let pid = child.id().to_string();
    let (tx, rx) = mpsc::channel();
    // Collects both pipes while the process runs, however much it writes.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            // Still unreaped (the waiting thread has not returned), so the PID is ours.
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("smtpgw {args:?} did not finish within {timeout:?}");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "smtpgw {args:?} panicked:\n{stderr}"
    );
    out
}

/// A path as a `&str` for argument lists.
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}
