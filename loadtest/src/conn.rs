//! One client connection: greeting, EHLO/HELO (with `--tls`, STARTTLS or an implicit-TLS
//! handshake), then messages until its budget or the deadline, then QUIT; with
//! `--messages-per-session` it reconnects after that many messages. Every reply is read,
//! verified and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio::time::{timeout, Instant};

use crate::message::{Mix, Template, XorShift};
use crate::reply::{ProtocolError, ReplyReader};
use crate::tls::{self, Stream};

/// What the connection tasks share (read-only).
pub struct Plan {
    pub target: SocketAddr,
    pub mix: Mix,
    pub helo: bool,
    pub pipelining: bool,
    pub chunking: bool,
    pub messages: Option<u64>,
    /// Open loop: seconds between a connection's messages (connections / rate).
    pub interval: Option<Duration>,
    pub timeout: Duration,
    pub connections: usize,
    pub tls: tls::Mode,
    /// Set unless `tls` is `None`.
    pub tls_client: Option<tls::Client>,
    /// Close the session (QUIT) and open a new one after this many messages.
    pub messages_per_session: Option<u64>,
}

/// Counters of one connection, summed at the end.
pub struct Stats {
    /// Latency of accepted messages in microseconds, from the first command (or, open
    /// loop, from the intended send time) to the final reply.
    pub latency: Histogram<u64>,
    /// Open loop: how late each message's first write was against its intended time
    /// (tokio's timer wakes on 1 ms ticks, so up to ~1 ms of this is the client's own).
    pub send_lag: Histogram<u64>,
    pub accepted: u64,
    pub rejected: u64,
    pub bytes_accepted: u64,
    /// Every reply received, by code.
    pub replies: Vec<u64>,
    pub protocol_errors: u64,
    pub connect_errors: u64,
    pub timeouts: u64,
    /// Connections that asked for PIPELINING/CHUNKING and were not offered it.
    pub fallbacks: u64,
    /// Sessions that got through the greeting, EHLO and (with TLS) the handshake.
    pub sessions: u64,
    pub first_error: Option<String>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            // 1 µs to 1 hour, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds"),
            send_lag: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds"),
            accepted: 0,
            rejected: 0,
            bytes_accepted: 0,
            replies: vec![0; 600],
            protocol_errors: 0,
            connect_errors: 0,
            timeouts: 0,
            fallbacks: 0,
            sessions: 0,
            first_error: None,
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.send_lag.add(&other.send_lag);
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.bytes_accepted += other.bytes_accepted;
        for (a, b) in self.replies.iter_mut().zip(&other.replies) {
            *a += b;
        }
        self.protocol_errors += other.protocol_errors;
        self.connect_errors += other.connect_errors;
        self.timeouts += other.timeouts;
        self.fallbacks += other.fallbacks;
        self.sessions += other.sessions;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    fn error(&mut self, e: &ProtocolError) {
        if matches!(e, ProtocolError::Timeout(_)) {
            self.timeouts += 1;
        } else {
            self.protocol_errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

struct Conn {
    io: ReplyReader<Stream>,
    stats: Stats,
    timeout: Duration,
    /// What the server's EHLO offered.
    size: bool,
    /// When the next message's MAIL/RCPT/DATA went out together with this message's
    /// body (RFC 2920 section 3.1: content may be the first "command" of a group).
    next_sent_at: Option<Instant>,
    /// Reused for body + next envelope, so the pair costs one write and no allocation.
    scratch: Vec<u8>,
}

/// Bodies up to this size are copied next to the following envelope to save a write;
/// larger ones are written alone (the copy would cost more than the syscall).
const COALESCE_LIMIT: usize = 64 * 1024;

impl Conn {
    /// Reads one reply, counts it, and checks it against what `step` allows.
    async fn reply(&mut self, step: &'static str) -> Result<u16, ProtocolError> {
        let code = match timeout(self.timeout, self.io.read(|_| ())).await {
            Ok(r) => r?,
            Err(_) => return Err(ProtocolError::Timeout(step)),
        };
        self.stats.replies[usize::from(code)] += 1;
        Ok(code)
    }

    async fn write(&mut self, bytes: &[u8], step: &'static str) -> Result<(), ProtocolError> {
        let io = self.io.get_mut();
        // The flush matters for TLS only: rustls may still hold the record when the
        // socket was full, and nothing else would send it before we wait for a reply.
        let written = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        match timeout(self.timeout, written).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ProtocolError::Timeout(step)),
        }
    }

    fn new(stream: Stream, stats: Stats, timeout: Duration) -> Self {
        Conn {
            io: ReplyReader::new(stream),
            stats,
            timeout,
            size: false,
            next_sent_at: None,
            scratch: Vec::new(),
        }
    }

    async fn greeting(&mut self) -> Result<(), ProtocolError> {
        match self.reply("connect").await? {
            220 => Ok(()),
            code => Err(ProtocolError::Unexpected {
                step: "connect",
                code,
            }),
        }
    }

    /// EHLO (or HELO); returns (PIPELINING, CHUNKING, STARTTLS) as offered.
    async fn hello(&mut self, helo: bool) -> Result<(bool, bool, bool), ProtocolError> {
        let verb: &[u8] = if helo { b"HELO" } else { b"EHLO" };
        let mut line = verb.to_vec();
        line.extend_from_slice(b" loadtest.client.example\r\n");
        self.write(&line, "EHLO").await?;
        let (mut pipelining, mut chunking, mut size, mut starttls) = (false, false, false, false);
        let code = match timeout(
            self.timeout,
            self.io.read(|text| {
                let kw = text.split(|&b| b == b' ').next().unwrap_or_default();
                pipelining |= kw.eq_ignore_ascii_case(b"PIPELINING");
                chunking |= kw.eq_ignore_ascii_case(b"CHUNKING");
                size |= kw.eq_ignore_ascii_case(b"SIZE");
                starttls |= kw.eq_ignore_ascii_case(b"STARTTLS");
            }),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(ProtocolError::Timeout("EHLO")),
        };
        self.stats.replies[usize::from(code)] += 1;
        if code != 250 {
            return Err(ProtocolError::Unexpected { step: "EHLO", code });
        }
        self.size = size && !helo;
        Ok((pipelining && !helo, chunking && !helo, starttls && !helo))
    }

    async fn quit(&mut self) {
        if self.write(b"QUIT\r\n", "QUIT").await.is_ok() {
            match self.reply("QUIT").await {
                Ok(221) => {}
                Ok(code) => self
                    .stats
                    .error(&ProtocolError::Unexpected { step: "QUIT", code }),
                Err(e) => self.stats.error(&e),
            }
        }
    }

    /// One transaction. Ok(true): the final reply was 2xx. Ok(false): the server refused
    /// somewhere (counted by code); the session is back between transactions.
    ///
    /// `envelope_sent`: the MAIL/RCPT/DATA batch already went out with the previous body.
    /// `next`: pipelined DATA only; send that message's envelope right behind this body,
    /// and note when in `next_sent_at`.
    async fn message(
        &mut self,
        t: &Template,
        pipelining: bool,
        chunking: bool,
        envelope_sent: bool,
        next: Option<&Template>,
    ) -> Result<bool, ProtocolError> {
        let sz = usize::from(self.size);
        self.next_sent_at = None;
        let (mail_ok, rcpts_ok) = if pipelining {
            let batch = if chunking {
                &t.bdat_batch[sz]
            } else {
                &t.data_batch[sz]
            };
            if !envelope_sent {
                self.write(batch, "MAIL/RCPT batch").await?;
            }
            let mail_ok = self.envelope_reply("MAIL").await?;
            let mut rcpts_ok = 0;
            for _ in &t.rcpts {
                rcpts_ok += usize::from(self.envelope_reply("RCPT").await?);
            }
            (mail_ok, rcpts_ok)
        } else {
            self.write(&t.mail[sz], "MAIL").await?;
            if !self.envelope_reply("MAIL").await? {
                return Ok(false);
            }
            let mut rcpts_ok = 0;
            for r in &t.rcpts {
                self.write(r, "RCPT").await?;
                rcpts_ok += usize::from(self.envelope_reply("RCPT").await?);
            }
            if rcpts_ok == 0 {
                self.rset().await?;
                return Ok(false);
            }
            if chunking {
                self.write(&t.bdat_chunk, "BDAT").await?;
            } else {
                self.write(b"DATA\r\n", "DATA").await?;
            }
            (true, rcpts_ok)
        };
        let envelope_ok = mail_ok && rcpts_ok > 0;
        if chunking {
            // The chunk was sent in any case; its reply ends the transaction.
            let code = self.reply("BDAT LAST").await?;
            return self.final_reply(code, envelope_ok, "BDAT LAST");
        }
        let code = self.reply("DATA").await?;
        match code {
            354 => {
                match next {
                    Some(n) if t.data_body.len() <= COALESCE_LIMIT => {
                        let mut buf = std::mem::take(&mut self.scratch);
                        buf.clear();
                        buf.extend_from_slice(&t.data_body);
                        buf.extend_from_slice(&n.data_batch[sz]);
                        let at = Instant::now();
                        let written = self.write(&buf, "message body").await;
                        self.scratch = buf;
                        written?;
                        self.next_sent_at = Some(at);
                    }
                    Some(n) => {
                        self.write(&t.data_body, "message body").await?;
                        let at = Instant::now();
                        self.write(&n.data_batch[sz], "MAIL/RCPT batch").await?;
                        self.next_sent_at = Some(at);
                    }
                    None => self.write(&t.data_body, "message body").await?,
                }
                let code = self.reply("end of data").await?;
                self.final_reply(code, envelope_ok, "end of data")
            }
            200..=299 => Err(ProtocolError::Unexpected { step: "DATA", code }),
            _ => {
                // DATA refused; an open transaction (MAIL accepted) must be reset.
                if mail_ok {
                    self.rset().await?;
                }
                Ok(false)
            }
        }
    }

    /// MAIL or RCPT: 250/251 accepted, 4xx/5xx refused, anything else is a violation.
    async fn envelope_reply(&mut self, step: &'static str) -> Result<bool, ProtocolError> {
        match self.reply(step).await? {
            250 | 251 => Ok(true),
            // Refused: already counted by code in `reply`.
            400..=599 => Ok(false),
            code => Err(ProtocolError::Unexpected { step, code }),
        }
    }

    fn final_reply(
        &mut self,
        code: u16,
        envelope_ok: bool,
        step: &'static str,
    ) -> Result<bool, ProtocolError> {
        match code {
            250 if envelope_ok => Ok(true),
            // A 250 for a message without a valid envelope is a server bug.
            250 => Err(ProtocolError::Unexpected { step, code }),
            400..=599 => Ok(false),
            _ => Err(ProtocolError::Unexpected { step, code }),
        }
    }

    async fn rset(&mut self) -> Result<(), ProtocolError> {
        self.write(b"RSET\r\n", "RSET").await?;
        match self.reply("RSET").await? {
            250 => Ok(()),
            code => Err(ProtocolError::Unexpected { step: "RSET", code }),
        }
    }
}

/// A session ready for mail: connected, greeted, EHLO answered (with TLS, after the
/// handshake), and what the server offered: (PIPELINING, CHUNKING). On failure the
/// stats come back with the error counted.
async fn open(plan: &Plan, mut stats: Stats) -> Result<(Conn, bool, bool), Stats> {
    let tcp = match timeout(plan.timeout, TcpStream::connect(plan.target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.connect_errors += 1;
            stats.first_error.get_or_insert(format!("connect: {e}"));
            return Err(stats);
        }
        Err(_) => {
            stats.connect_errors += 1;
            stats.first_error.get_or_insert("connect: timed out".into());
            return Err(stats);
        }
    };
    let _ = tcp.set_nodelay(true);
    let stream = match (plan.tls, &plan.tls_client) {
        (tls::Mode::Implicit, Some(client)) => match handshake(plan, client, tcp).await {
            Ok(s) => s,
            Err(e) => {
                stats.error(&e);
                return Err(stats);
            }
        },
        _ => Stream::Plain(tcp),
    };
    let mut conn = Conn::new(stream, stats, plan.timeout);
    let opened = async {
        conn.greeting().await?;
        let offered = conn.hello(plan.helo).await?;
        if plan.tls != tls::Mode::Starttls {
            return Ok(offered);
        }
        if !offered.2 {
            return Err(ProtocolError::Tls(
                "the server does not offer STARTTLS".into(),
            ));
        }
        conn.write(b"STARTTLS\r\n", "STARTTLS").await?;
        match conn.reply("STARTTLS").await? {
            220 => Ok(offered),
            code => Err(ProtocolError::Unexpected {
                step: "STARTTLS",
                code,
            }),
        }
    }
    .await;
    let (pipelining, chunking, _) = match opened {
        Ok(o) => o,
        Err(e) => {
            conn.stats.error(&e);
            return Err(conn.stats);
        }
    };
    if plan.tls != tls::Mode::Starttls {
        conn.stats.sessions += 1;
        return Ok((conn, pipelining, chunking));
    }
    // RFC 3207 section 4.2: after the handshake the session starts over with EHLO.
    let Conn { io, mut stats, .. } = conn;
    let upgraded = match (io.into_inner(), &plan.tls_client) {
        (Ok(Stream::Plain(tcp)), Some(client)) => handshake(plan, client, tcp).await,
        (Ok(_), _) => Err(ProtocolError::Tls("STARTTLS without a TLS client".into())),
        (Err(e), _) => Err(e),
    };
    let stream = match upgraded {
        Ok(s) => s,
        Err(e) => {
            stats.error(&e);
            return Err(stats);
        }
    };
    let mut conn = Conn::new(stream, stats, plan.timeout);
    match conn.hello(plan.helo).await {
        Ok((pipelining, chunking, _)) => {
            conn.stats.sessions += 1;
            Ok((conn, pipelining, chunking))
        }
        Err(e) => {
            conn.stats.error(&e);
            Err(conn.stats)
        }
    }
}

async fn handshake(
    plan: &Plan,
    client: &tls::Client,
    tcp: TcpStream,
) -> Result<Stream, ProtocolError> {
    match timeout(plan.timeout, client.handshake(tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ProtocolError::Tls(format!("handshake: {e}"))),
        Err(_) => Err(ProtocolError::Timeout("TLS handshake")),
    }
}

/// Runs one connection to completion. Always waits on `ready` exactly once, so a
/// connection that fails to connect cannot hold up the others.
pub async fn run(
    plan: Arc<Plan>,
    index: usize,
    ready: Arc<Barrier>,
    start: Arc<tokio::sync::OnceCell<Instant>>,
    deadline: Option<Duration>,
) -> Stats {
    let first = open(&plan, Stats::new()).await;
    ready.wait().await;
    let (mut conn, offered_pipelining, offered_chunking) = match first {
        Ok(o) => o,
        Err(stats) => return stats,
    };
    if (plan.pipelining && !offered_pipelining) || (plan.chunking && !offered_chunking) {
        conn.stats.fallbacks += 1;
    }
    let (mut pipelining, mut chunking) = (
        plan.pipelining && offered_pipelining,
        plan.chunking && offered_chunking,
    );
    let start = *start.get_or_init(|| async { Instant::now() }).await;
    let end = deadline.map(|d| start + d);
    let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15 ^ index as u64);
    // Open loop: this connection's share of the rate, staggered so connections do not
    // all fire at once.
    let stagger = plan
        .interval
        .map(|i| i.mul_f64(index as f64 / plan.connections as f64));
    // Closed-loop pipelined DATA sends each envelope together with the previous body.
    let overlap = pipelining && !chunking && plan.interval.is_none();
    // A message whose envelope is already on the wire, and when it was written.
    let mut prefetched: Option<(Arc<Template>, Instant)> = None;
    let mut sent = 0u64;
    let mut in_session = 0u64;
    loop {
        let session_full = plan.messages_per_session.is_some_and(|n| in_session >= n);
        if session_full && prefetched.is_none() {
            if plan.messages.is_some_and(|m| sent >= m) || end.is_some_and(|e| Instant::now() >= e)
            {
                break;
            }
            conn.quit().await;
            let stats = std::mem::replace(&mut conn.stats, Stats::new());
            match open(&plan, stats).await {
                Ok((c, p, ch)) => {
                    conn = c;
                    (pipelining, chunking) = (plan.pipelining && p, plan.chunking && ch);
                }
                Err(stats) => return stats,
            }
            in_session = 0;
        }
        let (t, started, envelope_sent) = match prefetched.take() {
            Some((t, at)) => (t, at, true),
            None => {
                if plan.messages.is_some_and(|m| sent >= m) {
                    break;
                }
                let intended = match (plan.interval, stagger) {
                    (Some(i), Some(s)) => start + s + i.mul_f64(sent as f64),
                    _ => Instant::now(),
                };
                if end.is_some_and(|e| intended >= e) {
                    break;
                }
                // Only sleep when the time is really ahead: tokio's timer has 1 ms
                // granularity, so even a sleep to "now" would cost up to a millisecond.
                if plan.interval.is_some() {
                    if intended > Instant::now() {
                        tokio::time::sleep_until(intended).await;
                    }
                    let lag = intended.elapsed().as_micros() as u64;
                    let _ = conn.stats.send_lag.record(lag.max(1));
                }
                (plan.mix.pick(&mut rng).clone(), intended, false)
            }
        };
        sent += 1;
        in_session += 1;
        // The next envelope rides with this body only if the next message is in this
        // session.
        let next = (overlap
            && plan.messages.is_none_or(|m| sent < m)
            && plan.messages_per_session.is_none_or(|n| in_session < n)
            && end.is_none_or(|e| Instant::now() < e))
        .then(|| plan.mix.pick(&mut rng).clone());
        // Closed loop: the clock starts at the first write. Open loop: at the intended
        // time, so a server that falls behind is charged for the queue it causes.
        let outcome = conn
            .message(&t, pipelining, chunking, envelope_sent, next.as_deref())
            .await;
        if let (Some(n), Some(at)) = (next, conn.next_sent_at) {
            prefetched = Some((n, at));
        }
        match outcome {
            Ok(true) => {
                let us = started.elapsed().as_micros() as u64;
                let _ = conn.stats.latency.record(us.max(1));
                conn.stats.accepted += 1;
                conn.stats.bytes_accepted += t.size as u64;
            }
            Ok(false) => conn.stats.rejected += 1,
            Err(e) => {
                conn.stats.error(&e);
                return conn.stats;
            }
        }
    }
    conn.quit().await;
    conn.stats
}
