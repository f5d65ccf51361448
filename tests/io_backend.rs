//! Choosing the I/O backend, against the built binary: `--io-backend auto` uses
//! io_uring here, and falls back to epoll (one log line saying why, the
//! `smtpgw_io_backend_info` gauge saying which) when io_uring is refused for real: the
//! gateway runs under a seccomp filter that makes `io_uring_setup` fail with EPERM,
//! installed by the `seccomp_exec` example. `--io-backend uring` then fails at start-up
//! with one line. Mail is served either way.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `seccomp_exec` example, built by `cargo test` next to the test binaries.
fn seccomp_exec() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_smtpgw"));
    let path = bin
        .parent()
        .expect("target dir")
        .join("examples/seccomp_exec");
    if !path.exists() {
        // `cargo test --test io_backend` alone does not build examples.
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--example", "seccomp_exec"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the seccomp_exec example failed");
    }
    path
}

struct Gw {
    child: Child,
    smtp: String,
    metrics: String,
    log: Vec<String>,
    _spool: tempfile::TempDir,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(under_seccomp: bool) -> Command {
    if under_seccomp {
        let mut c = Command::new(seccomp_exec());
        c.arg(env!("CARGO_BIN_EXE_smtpgw"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_smtpgw"))
    }
}

fn start(under_seccomp: bool, backend: &str) -> Gw {
    let spool = tempfile::tempdir().expect("tempdir");
    let mut child = command(under_seccomp)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--hostname", "mx.test", "--accept-domain", "example.com"])
        .args(["--io-backend", backend, "--spool-dir"])
        .arg(spool.path())
        .env("SMTPGW_LOG", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gateway starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
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
    let (mut smtp, mut metrics, mut log) = (None, None, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while smtp.is_none() || metrics.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            panic!("gateway did not log both addresses in time: {log:?}");
        };
        if line.contains("listening") {
            smtp = smtp.or(field(&line, "addr="));
        }
        metrics = metrics.or(field(&line, "metrics_addr="));
        log.push(line);
    }
    Gw {
        child,
        smtp: smtp.unwrap_or_default(),
        metrics: metrics.unwrap_or_default(),
        log,
        _spool: spool,
    }
}

fn backend_gauge(gw: &Gw) -> Vec<String> {
    let mut s = TcpStream::connect(&gw.metrics).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    raw.lines()
        .filter(|l| l.starts_with("smtpgw_io_backend_info{"))
        .map(str::to_owned)
        .collect()
}

/// One message through the gateway; its final reply.
fn send_mail(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n\
          Subject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n",
    )
    .unwrap();
    let mut all = String::new();
    let _ = s.read_to_string(&mut all);
    all
}

#[test]
fn auto_uses_io_uring_where_the_kernel_allows_it() {
    let gw = start(false, "auto");
    let listening = gw
        .log
        .iter()
        .find(|l| l.contains("listening"))
        .expect("listening line");
    assert!(listening.contains("backend=uring"), "{listening}");
    assert_eq!(
        backend_gauge(&gw),
        vec![r#"smtpgw_io_backend_info{backend="uring"} 1"#.to_owned()]
    );
    let text = send_mail(&gw.smtp);
    assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}");
}

#[test]
fn auto_falls_back_to_epoll_under_a_seccomp_filter() {
    let gw = start(true, "auto");
    let why: Vec<&String> = gw.log.iter().filter(|l| l.contains("io_uring")).collect();
    assert_eq!(why.len(), 1, "one line says why: {:?}", gw.log);
    assert!(why[0].contains("EPERM"), "{}", why[0]);
    assert!(why[0].contains("epoll"), "{}", why[0]);
    let listening = gw
        .log
        .iter()
        .find(|l| l.contains("listening"))
        .expect("listening line");
    assert!(listening.contains("backend=epoll"), "{listening}");
    assert_eq!(
        backend_gauge(&gw),
        vec![r#"smtpgw_io_backend_info{backend="epoll"} 1"#.to_owned()]
    );
    let text = send_mail(&gw.smtp);
    assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}");
}

#[test]
fn uring_fails_at_start_up_with_one_line_when_refused() {
    let spool = tempfile::tempdir().expect("tempdir");
    let out = command(true)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--hostname", "mx.test", "--accept-domain", "example.com"])
        .args(["--io-backend", "uring", "--spool-dir"])
        .arg(spool.path())
        .env("SMTPGW_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: --io-backend uring: "),
        "{stderr}"
    );
    assert!(lines[0].contains("EPERM"), "{stderr}");
}
