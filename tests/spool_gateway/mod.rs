//! A gateway process for the spool tests, started on port 0 for SMTP and metrics, and
//! the HTTP helpers to ask its metrics endpoint.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A gateway process on port 0 for SMTP and metrics; killed by PID when dropped.
pub struct Gateway {
    child: std::process::Child,
    pub smtp: String,
    pub metrics: String,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    pub fn start(spool: &Path, extra: &[&str]) -> Gateway {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_smtpgw"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--hostname", "mx.test", "--accept-domain", "example.com"])
            .arg("--spool-dir")
            .arg(spool)
            .args(extra)
            .env("SMTPGW_LOG", "info")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("gw: {line}");
                let _ = tx.send(line);
            }
        });
        let mut gw = Gateway {
            child,
            smtp: String::new(),
            metrics: String::new(),
            lines: rx,
            seen: Vec::new(),
        };
        let field = |line: &str, key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while gw.smtp.is_empty() || gw.metrics.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = gw
                .lines
                .recv_timeout(left)
                .expect("gateway logs both addresses");
            gw.seen.push(line.clone());
            if line.contains("listening") {
                if let Some(a) = field(&line, "addr=") {
                    gw.smtp = a;
                }
            }
            if let Some(a) = field(&line, "metrics_addr=") {
                gw.metrics = a;
            }
        }
        gw
    }

    pub fn wait_for_log(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("gateway never logged {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }
}

/// One HTTP/1.1 GET; the status code and body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
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

/// The value of one series in a scrape, e.g. `smtpgw_sink_up`.
pub fn metric(addr: &str, series: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from the scrape"))
}
