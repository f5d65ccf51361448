//! The one thread that formats and writes log lines.
//!
//! Reactors hand it [`Event`]s through a bounded queue and never wait: a full queue drops
//! the line and counts it (`smtpgw_log_lines_dropped_total`). Woken by the first line, the
//! writer lingers a moment so a busy gateway's lines arrive in batches, formats the batch
//! and writes it to stderr with one `write`. Refusal floods are summarised here, off the
//! reactors: per reason and client address at most one line a second, then one line with
//! the count of those not written.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::event::{Event, MessageLine, TAG_EVENT};
use super::format::Formatter;

/// Lines queued at most; past it lines are dropped. About 4 MiB of fields when full.
pub const QUEUE_LINES: usize = 16 * 1024;
/// After the first line of a batch, how long the writer waits for more before writing:
/// each wake-up costs a futex wake on the reactor that sent the line and a context
/// switch or two, so on a busy gateway fewer, larger batches are cheaper.
const LINGER: Duration = Duration::from_millis(10);
/// With at least this many lines already queued the writer does not linger.
const NO_LINGER_LINES: usize = 2048;
/// A batch is written once it is this large, whatever is still queued.
const BATCH_BYTES: usize = 512 * 1024;
/// Refusals per reason and client address written at most once per this period.
const FLOOD_PERIOD: Duration = Duration::from_secs(1);
/// Failed AUTH lines per client address written per period before they too are counted
/// instead: each names its user (an audit trail), and `--max-auth-failures-per-ip`
/// keeps an ordinary client far below this, but it does not apply to trusted networks
/// or when set to 0, and a log must not be floodable from anywhere.
const AUDIT_BURST: u32 = 20;
/// Addresses the flood table remembers at most; past it, it starts over.
const FLOOD_TABLE: usize = 16 * 1024;

pub struct Queue {
    tx: Sender<Event>,
    /// Lines in the queue (a reactor's batch is one entry of many lines).
    queued: Arc<AtomicUsize>,
    dropped: AtomicU64,
}

impl Queue {
    pub fn new(formatter: Formatter) -> io::Result<Queue> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
        let queued = Arc::new(AtomicUsize::new(0));
        let mut writer = Writer::new(formatter, queued.clone());
        std::thread::Builder::new()
            .name("smtpgw-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(Queue {
            tx,
            queued,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues `event` (a line, or a batch of them), or drops and counts its lines when
    /// the queue is full. Never blocks.
    pub fn submit(&self, event: Event) {
        let lines = match &event {
            Event::Batch(b) => b.lines,
            _ => 1,
        };
        if self.queued.fetch_add(lines, Ordering::Relaxed) + lines > QUEUE_LINES {
            self.queued.fetch_sub(lines, Ordering::Relaxed);
            self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
            return;
        }
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(lines, Ordering::Relaxed);
                self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (at most `limit`) until every line queued before is written.
    pub fn flush(&self, limit: Duration) {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if self.tx.send_timeout(Event::Flush(done_tx), limit).is_ok() {
            let _ = done_rx.recv_timeout(limit);
        }
    }
}

struct Flood {
    since: Instant,
    /// Lines written in this period.
    written: u32,
    suppressed: u64,
}

struct Writer {
    fmt: Formatter,
    out: Vec<u8>,
    flood: HashMap<(&'static str, IpAddr), Flood>,
    queued: Arc<AtomicUsize>,
}

impl Writer {
    fn new(fmt: Formatter, queued: Arc<AtomicUsize>) -> Writer {
        Writer {
            fmt,
            out: Vec::with_capacity(BATCH_BYTES + 4096),
            flood: HashMap::new(),
            queued,
        }
    }

    fn run(&mut self, rx: Receiver<Event>) {
        loop {
            // With suppressed refusals pending, wake in time to write their count.
            let first = match self.next_summary() {
                Some(at) => match rx.recv_deadline(at) {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return self.last_write(),
                },
                None => match rx.recv() {
                    Ok(e) => Some(e),
                    Err(_) => return self.last_write(),
                },
            };
            let mut flushed = Vec::new();
            if let Some(e) = first {
                let backlog = self.queued.load(Ordering::Relaxed);
                if (!rx.is_empty() || !matches!(e, Event::Flush(_))) && backlog < NO_LINGER_LINES {
                    std::thread::sleep(LINGER);
                }
                // One clock read per batch: every line of it is stamped when the batch
                // was formatted (within LINGER of its event). A clock read per line was
                // a sixth of this thread's time on a VM.
                let now = chrono::Utc::now();
                self.handle(e, now, &mut flushed);
                while self.out.len() < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(e) => self.handle(e, now, &mut flushed),
                        Err(_) => break,
                    }
                }
            }
            self.summaries(false);
            self.write();
            for done in flushed {
                let _ = done.send(());
            }
        }
    }

    fn handle(
        &mut self,
        e: Event,
        now: chrono::DateTime<chrono::Utc>,
        flushed: &mut Vec<Sender<()>>,
    ) {
        let lines = match &e {
            Event::Batch(b) => b.lines,
            _ => 1,
        };
        self.queued.fetch_sub(lines, Ordering::Relaxed);
        self.line(e, now, flushed);
    }

    fn line(
        &mut self,
        e: Event,
        now: chrono::DateTime<chrono::Utc>,
        flushed: &mut Vec<Sender<()>>,
    ) {
        match e {
            Event::Batch(mut batch) => {
                let mut events = batch.events.drain(..);
                let mut rest = &batch.bytes[..];
                while let Some((&tag, after)) = rest.split_first() {
                    if tag == TAG_EVENT {
                        rest = after;
                        if let Some(e) = events.next() {
                            self.line(e, now, flushed);
                        }
                    } else {
                        let Some((m, after)) = MessageLine::decode(rest) else {
                            break;
                        };
                        rest = after;
                        self.fmt.message(&mut self.out, now, &m);
                    }
                }
                drop(events);
                super::recycle_batch(batch);
            }
            Event::Refusal(r) => {
                // Failed AUTH lines name their user (an audit trail), so a burst of
                // them is written before the flood rule counts the rest.
                let burst = if r.refusal == crate::smtp::Refusal::AuthFailed {
                    AUDIT_BURST
                } else {
                    1
                };
                if self.admit(r.refusal.as_str(), r.client.ip(), burst) {
                    self.fmt.refusal(&mut self.out, now, &r);
                }
            }
            Event::Closed(c) => self.fmt.closed(&mut self.out, now, &c),
            Event::Trace(t) => self.fmt.trace(&mut self.out, now, &t),
            Event::Flush(done) => {
                self.summaries(true);
                flushed.push(done);
            }
        }
    }

    /// The queue is gone (the process is ending): the counts still pending are written
    /// with the last lines, not lost.
    fn last_write(&mut self) {
        self.summaries(true);
        self.write();
    }

    /// Whether a refusal of `reason` from `ip` is written (the first `burst` of a
    /// period), or counted as suppressed.
    fn admit(&mut self, reason: &'static str, ip: IpAddr, burst: u32) -> bool {
        let now = Instant::now();
        if self.flood.len() >= FLOOD_TABLE {
            self.summaries(true);
            self.flood.clear();
        }
        match self.flood.get_mut(&(reason, ip)) {
            Some(f) if now < f.since + FLOOD_PERIOD => {
                if f.written < burst {
                    f.written += 1;
                    return true;
                }
                f.suppressed += 1;
                return false;
            }
            // A new period: the last one's count first.
            Some(_) => self.summary(reason, ip),
            None => {}
        }
        let fresh = Flood {
            since: now,
            written: 1,
            suppressed: 0,
        };
        self.flood.insert((reason, ip), fresh);
        true
    }

    fn summary(&mut self, reason: &'static str, ip: IpAddr) {
        if let Some(f) = self.flood.get_mut(&(reason, ip)) {
            if f.suppressed > 0 {
                let n = std::mem::take(&mut f.suppressed);
                self.fmt
                    .suppressed(&mut self.out, chrono::Utc::now(), reason, ip, n);
            }
        }
    }

    /// Writes the counts of periods that are over (all of them with `all`), and forgets
    /// addresses quiet for a whole period.
    fn summaries(&mut self, all: bool) {
        let now = Instant::now();
        let due: Vec<(&'static str, IpAddr)> = self
            .flood
            .iter()
            .filter(|(_, f)| all || now >= f.since + FLOOD_PERIOD)
            .map(|(k, _)| *k)
            .collect();
        for (reason, ip) in due {
            self.summary(reason, ip);
            if self
                .flood
                .get(&(reason, ip))
                .is_some_and(|f| now >= f.since + FLOOD_PERIOD)
            {
                self.flood.remove(&(reason, ip));
            }
        }
    }

    /// When the next summary is due: the end of the earliest period with suppressed lines.
    fn next_summary(&self) -> Option<Instant> {
        self.flood
            .values()
            .filter(|f| f.suppressed > 0)
            .map(|f| f.since + FLOOD_PERIOD)
            .min()
    }

    /// One write for the whole batch; a failed write loses the batch, never the process.
    fn write(&mut self) {
        if !self.out.is_empty() {
            let _ = io::stderr().lock().write_all(&self.out);
            self.out.clear();
            if self.out.capacity() > 4 * BATCH_BYTES {
                self.out.shrink_to(BATCH_BYTES + 4096);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::{LogRecipients, RefusalLine};
    use crate::smtp::Refusal;

    fn writer() -> Writer {
        Writer::new(
            Formatter::new(false, false, LogRecipients::Count),
            Arc::new(AtomicUsize::new(0)),
        )
    }

    fn refusal(refusal: Refusal, client: &str) -> Event {
        Event::Refusal(RefusalLine {
            session: 7,
            client: client.parse().expect("address"),
            refusal,
            verb: "AUTH",
            address: None,
            detail: None,
            user: Some("alice".into()),
        })
    }

    fn feed(w: &mut Writer, n: usize, what: Refusal, client: &str) {
        let now = chrono::Utc::now();
        for _ in 0..n {
            w.line(refusal(what, client), now, &mut Vec::new());
        }
    }

    fn lines_with(w: &Writer, needle: &str) -> usize {
        String::from_utf8_lossy(&w.out)
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    #[test]
    fn failed_auth_lines_are_written_in_a_burst_then_counted() {
        let mut w = writer();
        feed(&mut w, 1000, Refusal::AuthFailed, "127.0.0.1:4000");
        assert_eq!(lines_with(&w, "reason=auth_failed"), AUDIT_BURST as usize);
        assert_eq!(lines_with(&w, "refusals suppressed"), 0);
        w.summaries(true);
        let text = String::from_utf8_lossy(&w.out).into_owned();
        let summary = text
            .lines()
            .find(|l| l.contains("refusals suppressed"))
            .unwrap_or_else(|| panic!("no summary in {text}"));
        assert!(summary.contains("suppressed=980"), "{summary}");
    }

    #[test]
    fn other_refusals_are_written_once_a_period_per_address() {
        let mut w = writer();
        feed(&mut w, 50, Refusal::RelayDenied, "127.0.0.1:4000");
        feed(&mut w, 50, Refusal::RelayDenied, "127.0.0.2:4000");
        assert_eq!(lines_with(&w, "reason=relay_denied"), 2);
    }

    #[test]
    fn pending_counts_are_written_when_the_queue_closes() {
        let mut w = writer();
        feed(&mut w, 5, Refusal::RelayDenied, "127.0.0.1:4000");
        assert_eq!(w.flood.values().map(|f| f.suppressed).sum::<u64>(), 4);
        let (tx, rx) = crossbeam_channel::unbounded();
        drop(tx);
        // Every sender is gone: run() writes what it has (to stderr) and returns; the
        // count of the 4 suppressed lines went with it.
        w.run(rx);
        assert_eq!(w.flood.values().map(|f| f.suppressed).sum::<u64>(), 0);
    }
}
