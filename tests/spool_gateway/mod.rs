//! A gateway process for the spool tests, started on port 0 for SMTP and metrics, and
//! the HTTP helpers to ask its metrics endpoint.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

// The one Rust gateway harness (the spool tests include kafka_support, which holds it).
use crate::kafka_support::harness;

/// A gateway process on port 0 for SMTP and metrics (tests/harness): stopped with
/// SIGTERM when dropped, and the test fails unless it exits 0 without a panic.
pub struct Gateway {
    inner: harness::Gateway,
    pub smtp: String,
    pub metrics: String,
}

impl Gateway {
    pub fn start(spool: &Path, extra: &[&str]) -> Gateway {
        let mut args = vec!["--hostname", "mx.test", "--accept-domain", "example.com"];
        args.extend(["--spool-dir", harness::path_str(spool)]);
        args.extend_from_slice(extra);
        let inner = harness::Gateway::start(&args, &[]);
        Gateway {
            smtp: inner.addr.clone(),
            metrics: inner.metrics.clone(),
            inner,
        }
    }

    pub fn wait_for_log(&mut self, needle: &str) -> String {
        self.inner.wait_for_log(needle)
    }

    /// The lines the gateway logged so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.inner
            .stderr()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
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
