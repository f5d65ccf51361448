//! Logging: tracing events to stderr as text or JSON, with a filter SIGHUP can replace.
//!
//! A log line must never take the process down. stderr is often a pipe to a log shipper
//! or journald; when its reader goes away, writes fail with EPIPE (SIGPIPE is ignored:
//! Rust's runtime sets it so before `main`, and the gateway never resets it) or EIO. The
//! writer here drops such lines, and tracing-subscriber's own fallback of reporting
//! write errors with `eprintln!` (which panics when stderr is gone) is switched off.

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::config::LogFormat;

/// The filter used when neither the configuration nor `RUST_LOG` sets one.
pub const DEFAULT_FILTER: &str = "info";

/// stderr for log lines: a failed write is a lost line, never an error or a panic.
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // write_all on the locked handle so a line is not interleaved with another
        // thread's; whatever fails, the caller is told the line went out.
        let _ = io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// Writes a line to stderr without ever panicking (unlike `eprintln!`).
pub fn eprint_line(line: std::fmt::Arguments) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(line);
    let _ = err.write_all(b"\n");
}

/// Changes the log filter of the running process (SIGHUP).
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Replaces the filter; the directives were checked by [`parse_filter`].
    pub fn set_filter(&self, directives: &str) -> Result<(), String> {
        let filter = parse_filter(directives)?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// An `EnvFilter` from directives such as `info` or `info,smtpgw=debug`.
pub fn parse_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|e| format!("invalid log filter {directives:?}: {e}"))
}

/// Installs the global subscriber. `directives` were validated with [`parse_filter`].
pub fn init(format: LogFormat, directives: &str) -> Result<LogHandle, String> {
    let (filter, handle) = reload::Layer::new(parse_filter(directives)?);
    let ansi = io::stderr().is_terminal();
    let base = tracing_subscriber::fmt::layer()
        .with_writer(|| Stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(base).try_init(),
        LogFormat::Json => registry.with(base.json()).try_init(),
    };
    installed.map_err(|e| format!("cannot set up logging: {e}"))?;
    Ok(LogHandle(handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked() {
        assert!(parse_filter("info,smtpgw=debug").is_ok());
        assert!(parse_filter("smtpgw=loud").is_err());
    }
}
