//! `hold`: opens many connections, brings each to one stage of a session and keeps it
//! there, so run.sh can read the server's RSS per connection in that state.
//!
//! Stages: `greeting` (connected and greeted, nothing sent), `data` (EHLO, MAIL, RCPT,
//! DATA answered with 354, then half of a 1 KiB message and no end), `no-read` (greeted,
//! then `HELP\r\n` written in chunks of `--write-chunk` bytes, never reading a reply,
//! until the socket stops taking bytes for `--stall` seconds). Once every connection has
//! reached its stage (or failed) one line `ready connections=N failed=F ...` goes to
//! stdout; the connections are then held until `--hold` seconds have passed (or the
//! process is killed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::timeout;

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Stage {
    Greeting,
    Data,
    NoRead,
}

#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// Server, HOST:PORT; must be loopback.
    #[arg(long)]
    target: String,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    #[arg(long, value_enum)]
    stage: Stage,
    /// no-read: bytes per write (6 = one `HELP\r\n` per write).
    #[arg(long, default_value_t = 6)]
    write_chunk: usize,
    /// no-read: the socket counts as full once a write has waited this long (seconds).
    #[arg(long, default_value_t = 2.0)]
    stall: f64,
    /// Seconds to keep the connections open after `ready`.
    #[arg(long, default_value_t = 120.0)]
    hold: f64,
    /// Connections being set up at once (the server's accept backlog is finite).
    #[arg(long, default_value_t = 256)]
    parallel: usize,
}

/// Half of the 1 KiB message the load client sends: headers and part of the body.
fn half_message() -> Vec<u8> {
    let mut m =
        b"From: <hold@example.com>\r\nTo: <user@example.com>\r\nSubject: held mid-DATA\r\n\r\n"
            .to_vec();
    while m.len() < 512 {
        m.extend_from_slice(b"the quick brown fox jumps over the lazy dog 0123456789\r\n");
    }
    m
}

/// Reads until a reply's last line (`NNN ` or `NNN\r\n`) and returns its code.
async fn reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<u16> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = buf.drain(..end + 2).collect();
            if line.len() < 5 || !line[..3].iter().all(u8::is_ascii_digit) {
                bail!("malformed reply {:?}", String::from_utf8_lossy(&line));
            }
            if line[3] != b'-' {
                let code = std::str::from_utf8(&line[..3])?.parse()?;
                return Ok(code);
            }
            continue;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn expect(s: &mut TcpStream, buf: &mut Vec<u8>, want: u16, step: &str) -> Result<()> {
    let code = reply(s, buf).await?;
    if code != want {
        bail!("{step}: expected {want}, got {code}");
    }
    Ok(())
}

/// Brings one connection to `stage`; returns it with the bytes it wrote there.
async fn setup(target: SocketAddr, a: &HoldArgs) -> Result<(TcpStream, u64)> {
    let mut s = TcpStream::connect(target).await?;
    let mut buf = Vec::new();
    expect(&mut s, &mut buf, 220, "greeting").await?;
    match a.stage {
        Stage::Greeting => Ok((s, 0)),
        Stage::Data => {
            s.write_all(b"EHLO hold.example\r\n").await?;
            expect(&mut s, &mut buf, 250, "EHLO").await?;
            s.write_all(b"MAIL FROM:<hold@example.com>\r\n").await?;
            expect(&mut s, &mut buf, 250, "MAIL").await?;
            s.write_all(b"RCPT TO:<user@example.com>\r\n").await?;
            expect(&mut s, &mut buf, 250, "RCPT").await?;
            s.write_all(b"DATA\r\n").await?;
            expect(&mut s, &mut buf, 354, "DATA").await?;
            let body = half_message();
            s.write_all(&body).await?;
            Ok((s, body.len() as u64))
        }
        Stage::NoRead => {
            let chunk: Vec<u8> = b"HELP\r\n"
                .iter()
                .copied()
                .cycle()
                .take(a.write_chunk.max(6) / 6 * 6)
                .collect();
            let stall = Duration::from_secs_f64(a.stall);
            let mut written = 0u64;
            // Bounded: at most 256 MiB and 30 s of writing per connection whatever the
            // server does (6-byte writes fill megabytes of socket buffers slowly).
            let end = tokio::time::Instant::now() + Duration::from_secs(30);
            while written < 256 << 20 && tokio::time::Instant::now() < end {
                match timeout(stall, s.write(&chunk)).await {
                    Ok(Ok(n)) => written += n as u64,
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => break,
                }
            }
            Ok((s, written))
        }
    }
}

pub fn run(a: HoldArgs) -> Result<()> {
    let target = crate::check_target(&a.target, false)?;
    crate::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let a = Arc::new(a);
    rt.block_on(async move {
        let gate = Arc::new(Semaphore::new(a.parallel.max(1)));
        let bytes = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..a.connections)
            .map(|_| {
                let (a, gate, bytes) = (a.clone(), gate.clone(), bytes.clone());
                tokio::spawn(async move {
                    let permit = gate.acquire_owned().await;
                    let r = timeout(Duration::from_secs(90), setup(target, &a)).await;
                    drop(permit);
                    match r {
                        Ok(Ok((s, n))) => {
                            bytes.fetch_add(n, Ordering::Relaxed);
                            Ok(s)
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("set-up timed out after 90 s".to_string()),
                    }
                })
            })
            .collect();
        let mut held = Vec::with_capacity(a.connections);
        let mut failed = 0usize;
        let mut first_error = None;
        for t in tasks {
            match t.await {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        println!(
            "ready connections={} failed={} bytes_written={} first_error={:?}",
            held.len(),
            failed,
            bytes.load(Ordering::Relaxed),
            first_error.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
        drop(held);
        Ok(())
    })
}
