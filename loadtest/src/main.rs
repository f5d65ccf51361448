//! smtpgw-loadtest: drives any SMTP server on loopback and reports throughput, latency
//! percentiles (HDR histogram) and every error.
//!
//! Closed loop by default (each connection sends its next message when the previous one
//! is answered); `--rate` makes it open loop, with latency measured from each message's
//! intended send time so a stalling server cannot hide its queue (no coordinated
//! omission). Only loopback targets are accepted: this tool generates real load.

mod conn;
mod floor;
mod hold;
mod message;
mod reply;
mod tls;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use tokio::sync::{Barrier, OnceCell};
use tokio::time::Instant;

use crate::conn::{Plan, Stats};
use crate::message::Mix;

/// `smtpgw-loadtest floor ...` and `smtpgw-loadtest hold ...`: the helpers run.sh needs
/// besides the load client. Chosen by the first argument, so every existing load-client
/// command line keeps its meaning.
#[derive(Parser, Debug)]
#[command(name = "smtpgw-loadtest", version)]
struct Helper {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// A canned-reply server, the cheapest thing a client can load: the floor that every
    /// gateway figure is divided by.
    Floor {
        /// Address to listen on (loopback only); port 0 picks one, printed on stderr as
        /// `listening addr=...`.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// The syscall pattern: the epoll or the io_uring gateway backend's.
        #[arg(long, value_enum)]
        mode: floor::Mode,
        /// Serving loops, each on its own thread with its own SO_REUSEPORT listener on
        /// the same port (the kernel spreads connections over them), as the gateway runs
        /// one reactor per CPU: compare a gateway with the floor of as many loops.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: u16,
    },
    /// Open many connections, bring each to a stage of a session and hold them there
    /// (for measuring the server's memory per connection).
    Hold(hold::HoldArgs),
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "SMTP load generator (loopback targets unless --allow-remote-target)",
    after_help = "Helpers: `smtpgw-loadtest floor --help` (canned-reply floor server), \
                  `smtpgw-loadtest hold --help` (hold many connections at one stage)"
)]
struct Args {
    /// Server to load, HOST:PORT; must be loopback (127.0.0.0/8 or ::1) unless
    /// --allow-remote-target is given.
    #[arg(long)]
    target: String,
    /// Allow a target that is not loopback, e.g. a deployed node measured from another
    /// host. Only point it at servers you own: this generates real load.
    #[arg(long)]
    allow_remote_target: bool,
    /// Concurrent connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Messages each connection sends (default 100 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    messages_per_connection: Option<u64>,
    /// Run for this many seconds instead of a message count (e.g. 10 or 2.5).
    #[arg(long)]
    duration: Option<f64>,
    /// Message size (`1k`, `100k`, `1m`, octets) or a weighted mix `1k:70,10k:25,100k:4,1m:1`.
    #[arg(long, default_value = "1k")]
    size: String,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Domain of the recipient addresses (`userN@DOMAIN`).
    #[arg(long, default_value = "example.com")]
    domain: String,
    /// Send MAIL, RCPT and DATA (or BDAT) in one write when the server offers PIPELINING.
    #[arg(long)]
    pipelining: bool,
    /// Send bodies with BDAT ... LAST when the server offers CHUNKING.
    #[arg(long)]
    chunking: bool,
    /// Open loop: total messages per second across all connections.
    #[arg(long)]
    rate: Option<f64>,
    /// Greet with HELO instead of EHLO (servers without ESMTP; disables extensions).
    #[arg(long)]
    helo: bool,
    /// Seconds to wait for any one reply or write before counting a timeout.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Runtime worker threads (default: number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit non-zero when any error (non-2xx final reply, protocol, connect, timeout) occurs.
    #[arg(long)]
    strict: bool,
    /// TLS: `starttls` (EHLO, STARTTLS, handshake, EHLO) or `implicit` (handshake first,
    /// as on the gateway's --listen-tls port). Needs --tls-ca.
    #[arg(long, value_enum, default_value_t = tls::Mode::None)]
    tls: tls::Mode,
    /// PEM file of the CA (or the self-signed certificate) the server's certificate must
    /// chain to; the certificate is always verified.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Name to verify the server's certificate against [default: the target's IP address].
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Resume TLS sessions across reconnects (default: a full handshake every session).
    #[arg(long)]
    tls_resume: bool,
    /// QUIT and reconnect after this many messages (with --tls, one handshake each):
    /// `--messages-per-session 1` measures sessions (handshakes) per second.
    #[arg(long, value_name = "N")]
    messages_per_session: Option<u64>,
}

#[derive(Serialize)]
struct Latency {
    count: u64,
    mean: f64,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

#[derive(Serialize)]
struct Report {
    target: String,
    connections: usize,
    messages_per_connection: Option<u64>,
    duration_s: Option<f64>,
    size: String,
    recipients: usize,
    pipelining: bool,
    chunking: bool,
    helo: bool,
    rate: Option<f64>,
    tls: tls::Mode,
    messages_per_session: Option<u64>,
    elapsed_s: f64,
    /// Sessions opened (greeted, EHLO answered, TLS handshake done), the first of each
    /// connection included.
    sessions: u64,
    /// Sessions opened per second while measuring (the first ones, opened before the
    /// clock starts, excluded): with --tls, full handshakes per second.
    sessions_per_s: f64,
    /// Messages whose final reply was 250 (the number a sink must have stored).
    accepted: u64,
    /// Messages refused with 4xx/5xx somewhere in the transaction.
    rejected: u64,
    msgs_per_s: f64,
    /// Message octets accepted per second, in 10^6 octets.
    mb_per_s: f64,
    latency_us: Latency,
    /// Open loop only: lateness of each message's first write against its intended time.
    send_lag_us: Option<Latency>,
    /// Every reply received, by code (greetings, EHLO, every command, QUIT).
    replies: std::collections::BTreeMap<u16, u64>,
    /// Replies with a 4xx or 5xx code.
    non_2xx_replies: u64,
    protocol_errors: u64,
    connect_errors: u64,
    timeouts: u64,
    /// Connections where PIPELINING/CHUNKING was asked for but not offered.
    extension_fallbacks: u64,
    first_error: Option<String>,
    client_cpu_s: f64,
    client_cpu_us_per_msg: f64,
}

/// Refuses anything that is not a loopback address unless `allow_remote` (the operator
/// said so explicitly): this tool must never load a host by accident.
fn check_target(spec: &str, allow_remote: bool) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = spec
        .to_socket_addrs()
        .with_context(|| format!("--target {spec:?}: expected HOST:PORT"))?
        .collect();
    let loopback = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    match addrs.first() {
        None => bail!("--target {spec:?} resolves to nothing"),
        Some(_) if !allow_remote && addrs.iter().any(|a| !loopback(a.ip())) => {
            bail!(
                "--target {spec:?} is not loopback (only 127.0.0.0/8 and ::1 are allowed; \
                 add --allow-remote-target to load a server you own on another host)"
            )
        }
        Some(a) => Ok(*a),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: thousands of connections need
/// thousands of descriptors, and the default soft limit is often 1024.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() -> std::process::ExitCode {
    // One line on stderr, whatever RUST_BACKTRACE says: these are user-facing errors.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smtpgw-loadtest: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let first = std::env::args_os().nth(1);
    if first.as_ref().is_some_and(|a| a == "floor" || a == "hold") {
        return match Helper::parse().command {
            Command::Floor {
                listen,
                mode,
                threads,
            } => floor::run(&listen, mode, threads.into()),
            Command::Hold(h) => hold::run(h),
        };
    }
    let args = Args::parse();
    let target = check_target(&args.target, args.allow_remote_target)?;
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.recipients == 0 {
        bail!("--recipients must be at least 1");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of messages per second");
    }
    if args.duration.is_some_and(|d| !(d > 0.0 && d <= 86_400.0)) {
        bail!("--duration must be between 0 and 86400 seconds");
    }
    if args.messages_per_session == Some(0) {
        bail!("--messages-per-session must be at least 1");
    }
    if args.tls == tls::Mode::Starttls && args.helo {
        bail!("--tls starttls needs EHLO (STARTTLS is an ESMTP extension): drop --helo");
    }
    let tls_client = match (args.tls, &args.tls_ca) {
        (tls::Mode::None, None) => None,
        (tls::Mode::None, Some(_)) => bail!("--tls-ca needs --tls starttls or --tls implicit"),
        (_, None) => bail!("--tls {:?} needs --tls-ca FILE", args.tls),
        (_, Some(ca)) => Some(tls::Client::new(
            ca,
            args.tls_server_name.as_deref(),
            target,
            args.tls_resume,
        )?),
    };
    let sizes = message::parse_sizes(&args.size)?;
    let messages = match (args.messages_per_connection, args.duration) {
        (Some(m), _) => Some(m),
        (None, None) => Some(100),
        (None, Some(_)) => None,
    };
    let plan = Arc::new(Plan {
        target,
        mix: Mix::new(&sizes, args.recipients, &args.domain),
        helo: args.helo,
        pipelining: args.pipelining,
        chunking: args.chunking,
        messages,
        interval: args
            .rate
            .map(|r| Duration::from_secs_f64(args.connections as f64 / r)),
        timeout: Duration::from_secs_f64(args.timeout),
        connections: args.connections,
        tls: args.tls,
        tls_client,
        messages_per_session: args.messages_per_session,
    });
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = args.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = rt.enable_all().build()?;
    let (stats, elapsed, cpu) = rt.block_on(async {
        let ready = Arc::new(Barrier::new(args.connections + 1));
        let start = Arc::new(OnceCell::new());
        let deadline = args.duration.map(Duration::from_secs_f64);
        let tasks: Vec<_> = (0..args.connections)
            .map(|i| {
                tokio::spawn(conn::run(
                    plan.clone(),
                    i,
                    ready.clone(),
                    start.clone(),
                    deadline,
                ))
            })
            .collect();
        // Timing starts once every connection is greeted, so connection set-up does
        // not count against the messages.
        ready.wait().await;
        let cpu0 = cpu_seconds();
        let t0 = *start.get_or_init(|| async { Instant::now() }).await;
        let mut total = Stats::new();
        for t in tasks {
            match t.await {
                Ok(s) => total.merge(&s),
                Err(e) => {
                    total.protocol_errors += 1;
                    total
                        .first_error
                        .get_or_insert_with(|| format!("task: {e}"));
                }
            }
        }
        (total, t0.elapsed(), cpu_seconds() - cpu0)
    });
    let report = report(&args, stats, elapsed.as_secs_f64(), cpu);
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let errors = report.rejected + report.protocol_errors + report.connect_errors + report.timeouts;
    if args.strict && errors > 0 {
        bail!("{errors} errors (strict mode)");
    }
    Ok(())
}

fn latency(h: &hdrhistogram::Histogram<u64>) -> Latency {
    Latency {
        count: h.len(),
        mean: h.mean(),
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

fn report(args: &Args, s: Stats, elapsed: f64, cpu: f64) -> Report {
    let replies: std::collections::BTreeMap<u16, u64> = s
        .replies
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(code, &n)| (code as u16, n))
        .collect();
    let non_2xx = replies
        .iter()
        .filter(|(&c, _)| c >= 400)
        .map(|(_, &n)| n)
        .sum();
    let attempted = (s.accepted + s.rejected).max(1);
    Report {
        target: args.target.clone(),
        connections: args.connections,
        messages_per_connection: args.messages_per_connection,
        duration_s: args.duration,
        size: args.size.clone(),
        recipients: args.recipients,
        pipelining: args.pipelining,
        chunking: args.chunking,
        helo: args.helo,
        rate: args.rate,
        tls: args.tls,
        messages_per_session: args.messages_per_session,
        elapsed_s: elapsed,
        sessions: s.sessions,
        sessions_per_s: s.sessions.saturating_sub(args.connections as u64) as f64
            / elapsed.max(1e-9),
        accepted: s.accepted,
        rejected: s.rejected,
        msgs_per_s: s.accepted as f64 / elapsed.max(1e-9),
        mb_per_s: s.bytes_accepted as f64 / 1e6 / elapsed.max(1e-9),
        latency_us: latency(&s.latency),
        send_lag_us: args.rate.map(|_| latency(&s.send_lag)),
        replies,
        non_2xx_replies: non_2xx,
        protocol_errors: s.protocol_errors,
        connect_errors: s.connect_errors,
        timeouts: s.timeouts,
        extension_fallbacks: s.fallbacks,
        first_error: s.first_error,
        client_cpu_s: cpu,
        client_cpu_us_per_msg: cpu * 1e6 / attempted as f64,
    }
}

fn print_table(r: &Report) {
    let mode = match r.rate {
        Some(rate) => format!("open loop {rate} msgs/s"),
        None => "closed loop".into(),
    };
    println!(
        "target {}  connections {}  size {}  recipients {}  pipelining {}  chunking {}  {}{}{}",
        r.target,
        r.connections,
        r.size,
        r.recipients,
        if r.pipelining { "on" } else { "off" },
        if r.chunking { "on" } else { "off" },
        mode,
        if r.helo { "  HELO" } else { "" },
        match r.tls {
            tls::Mode::None => "",
            tls::Mode::Starttls => "  STARTTLS",
            tls::Mode::Implicit => "  implicit TLS",
        },
    );
    println!(
        "{:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10}",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "max µs",
        "accepted",
        "rejected",
        "proto",
        "timeout",
        "cli µs/msg"
    );
    println!(
        "{:>10.0} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10.1}",
        r.msgs_per_s,
        r.mb_per_s,
        r.latency_us.p50,
        r.latency_us.p99,
        r.latency_us.p999,
        r.latency_us.max,
        r.accepted,
        r.rejected,
        r.protocol_errors,
        r.timeouts,
        r.client_cpu_us_per_msg,
    );
    let codes: Vec<String> = r.replies.iter().map(|(c, n)| format!("{c}:{n}")).collect();
    println!(
        "replies {}  non-2xx {}  connect errors {}  extension fallbacks {}  elapsed {:.2} s",
        codes.join(" "),
        r.non_2xx_replies,
        r.connect_errors,
        r.extension_fallbacks,
        r.elapsed_s
    );
    if r.messages_per_session.is_some() || r.tls != tls::Mode::None {
        println!(
            "tls {:?}  sessions {}  new sessions/s {:.1}",
            r.tls, r.sessions, r.sessions_per_s
        );
    }
    if let Some(lag) = &r.send_lag_us {
        println!(
            "open-loop send lag µs (client's own lateness, included in latency): p50 {} p99 {} max {}",
            lag.p50, lag.p99, lag.max
        );
    }
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback() {
        let loopback_target = |spec| check_target(spec, false);
        assert!(loopback_target("127.0.0.1:25").is_ok());
        assert!(loopback_target("127.3.2.1:25").is_ok());
        assert!(loopback_target("[::1]:25").is_ok());
        assert!(loopback_target("10.0.0.1:25").is_err());
        assert!(loopback_target("192.168.1.1:25").is_err());
        assert!(loopback_target("[::ffff:10.0.0.1]:25").is_err());
        assert!(loopback_target("8.8.8.8:25").is_err());
        assert!(loopback_target("nonsense").is_err());
        // Only with the explicit flag (resolving the address makes no connection).
        assert!(check_target("10.0.0.1:25", true).is_ok());
        assert!(check_target("[2001:db8::1]:25", true).is_ok());
        assert!(check_target("nonsense", true).is_err());
    }
}
