//! Logging: the gateway's lines to stderr as text or JSON, with a filter SIGHUP can
//! replace.
//!
//! Every line goes through one writer thread ([`writer`]): a reactor hands over the
//! fields of a transaction, refusal or connection-end line ([`event`]) and returns; a
//! `tracing` event from elsewhere is turned into fields by [`QueueLayer`] on its own
//! thread. The writer formats ([`format`]) and writes in batches. Under systemd
//! (`JOURNAL_STREAM` set) each line starts with its `<N>` priority.
//!
//! A log line must never take the process down. stderr is often a pipe to a log shipper
//! or journald; when its reader goes away, writes fail with EPIPE (SIGPIPE is ignored:
//! Rust's runtime sets it so before `main`, and the gateway never resets it) or EIO. The
//! writer here drops such lines, and tracing-subscriber's own fallback of reporting
//! write errors with `eprintln!` (which panics when stderr is gone) is switched off.

pub mod event;
pub mod format;
mod writer;

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use event::{
    Batch, ClosedLine, EndedBy, Event, MessageLine, PendingLine, RefusalLine, TARGET_MESSAGE,
    TARGET_REFUSAL, TARGET_SESSION,
};
pub use format::{LogFormat, LogRecipients};

/// The filter used when neither the configuration nor `RUST_LOG` sets one: the
/// transaction line per message, a line per refusal and per connection end are on.
pub const DEFAULT_FILTER: &str = "info";

static QUEUE: OnceLock<writer::Queue> = OnceLock::new();
/// `--log-recipients`, as the reactors need it (whether to copy the addresses).
static RECIPIENTS: AtomicU8 = AtomicU8::new(0);

/// Lines a reactor gathers before it hands them over as one batch (it hands over what
/// it has sooner, whenever it is about to wait: [`flush_this_thread`])...
const LOCAL_BATCH: usize = 64;
/// ...or bytes of encoded transaction lines (a line with many recipients is long).
const LOCAL_BYTES: usize = 32 * 1024;

/// A reactor thread's lines not yet handed over; `None` on other threads, which hand
/// each line over at once.
struct Local(Batch);

impl Drop for Local {
    /// A reactor thread that ends hands over what it still holds.
    fn drop(&mut self) {
        if let (Some(q), true) = (QUEUE.get(), self.0.lines > 0) {
            q.submit(Event::Batch(std::mem::take(&mut self.0)));
        }
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

fn new_batch() -> Batch {
    Batch {
        bytes: Vec::with_capacity(LOCAL_BYTES / 2),
        events: Vec::with_capacity(LOCAL_BATCH),
        lines: 0,
    }
}

/// Makes this thread (a reactor) gather its lines and hand them to the writer in
/// batches: one queue operation (and at most one wake-up of the writer) for many lines
/// instead of one each. The thread must call [`flush_this_thread`] before it waits.
pub fn batch_this_thread() {
    let _ = LOCAL.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.get_or_insert_with(|| Local(new_batch()));
        }
    });
}

/// Hands this thread's gathered lines to the writer; a reactor calls it before it
/// waits for events, and at least every [`crate::metrics`] flush.
pub fn flush_this_thread() {
    let _ = LOCAL.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            if let Some(local) = l.as_mut() {
                hand_over(local);
            }
        }
    });
}

/// Emptied batches the writer gives back, so that a batch is never freed on a thread
/// other than the one that allocated it (glibc then consolidates its heap, which showed
/// as the writer's largest cost after formatting).
static SPARE_BATCHES: OnceLock<SpareBatches> = OnceLock::new();

type SpareBatches = (
    crossbeam_channel::Sender<Batch>,
    crossbeam_channel::Receiver<Batch>,
);

fn spare_batches() -> &'static SpareBatches {
    SPARE_BATCHES.get_or_init(|| crossbeam_channel::bounded(256))
}

/// The writer is done with a batch's lines: the emptied batch goes back for reuse
/// (unless it grew far past the usual size).
fn recycle_batch(mut batch: Batch) {
    if batch.bytes.capacity() <= 4 * LOCAL_BYTES && batch.events.capacity() <= 4 * LOCAL_BATCH {
        batch.bytes.clear();
        batch.events.clear();
        batch.lines = 0;
        let _ = spare_batches().0.try_send(batch);
    }
}

fn hand_over(local: &mut Local) {
    if local.0.lines == 0 {
        return;
    }
    let fresh = spare_batches().1.try_recv().unwrap_or_else(|_| new_batch());
    let batch = std::mem::replace(&mut local.0, fresh);
    if let Some(q) = QUEUE.get() {
        q.submit(Event::Batch(batch));
    }
}

/// Hands a line's fields to the writer thread (on a reactor, into its next batch);
/// dropped (and counted) when the writer's queue is full, and dropped silently before
/// [`init`] (unit tests, tools).
pub fn submit(event: Event) {
    let Some(q) = QUEUE.get() else {
        return;
    };
    let mut event = Some(event);
    let _ = LOCAL.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            if let Some(local) = l.as_mut() {
                if let Some(e) = event.take() {
                    local.0.bytes.push(event::TAG_EVENT);
                    local.0.events.push(e);
                    local.0.lines += 1;
                }
                if local.0.lines >= LOCAL_BATCH {
                    hand_over(local);
                }
            }
        }
    });
    if let Some(e) = event {
        q.submit(e);
    }
}

/// Hands a finished transaction line ([`PendingLine::finish`]) to the writer: on a
/// reactor, one copy of its bytes into the reactor's batch. Dropped as [`submit`] says.
pub fn submit_message(line: &[u8]) {
    let Some(q) = QUEUE.get() else {
        return;
    };
    if line.is_empty() {
        return;
    }
    let batched = LOCAL
        .try_with(|l| {
            let Ok(mut l) = l.try_borrow_mut() else {
                return false;
            };
            let Some(local) = l.as_mut() else {
                return false;
            };
            local.0.bytes.extend_from_slice(line);
            local.0.lines += 1;
            if local.0.lines >= LOCAL_BATCH || local.0.bytes.len() >= LOCAL_BYTES {
                hand_over(local);
            }
            true
        })
        .unwrap_or(false);
    if !batched {
        q.submit(Event::Batch(Batch {
            bytes: line.to_vec(),
            events: Vec::new(),
            lines: 1,
        }));
    }
}

/// Lines dropped because the writer's queue was full.
pub fn lines_dropped() -> u64 {
    QUEUE.get().map_or(0, writer::Queue::dropped)
}

/// Which of the reactors' own lines the filter lets through ([`LINE_MESSAGE`] etc.),
/// decided when the filter is set rather than asked of `tracing` per message: the
/// filter's answer for these fixed targets and levels does not change in between, and
/// asking it cost a reactor more than the rest of the hand-over.
static LINES: AtomicU8 = AtomicU8::new(0);
const LINE_MESSAGE: u8 = 1;
const LINE_REFUSAL: u8 = 2;
const LINE_SESSION: u8 = 4;

/// Asks the installed filter which reactor lines are on; after [`init`] and each reload.
fn update_lines() {
    let mut lines = 0;
    if QUEUE.get().is_some() {
        if tracing::enabled!(target: "smtpgw::message", Level::INFO) {
            lines |= LINE_MESSAGE;
        }
        if tracing::enabled!(target: "smtpgw::refusal", Level::WARN) {
            lines |= LINE_REFUSAL;
        }
        if tracing::enabled!(target: "smtpgw::session", Level::INFO) {
            lines |= LINE_SESSION;
        }
    }
    LINES.store(lines, Ordering::Relaxed);
}

/// Whether the transaction line is on (the filter lets `smtpgw::message` at info
/// through); a reactor asks before copying the fields.
pub fn message_lines() -> bool {
    LINES.load(Ordering::Relaxed) & LINE_MESSAGE != 0
}

/// Whether refusal lines are on.
pub fn refusal_lines() -> bool {
    LINES.load(Ordering::Relaxed) & LINE_REFUSAL != 0
}

/// Whether connection-end lines are on.
pub fn session_lines() -> bool {
    LINES.load(Ordering::Relaxed) & LINE_SESSION != 0
}

/// Whether the transaction line carries the recipients themselves (full or hashed).
pub fn recipients_listed() -> bool {
    RECIPIENTS.load(Ordering::Relaxed) != 1
}

/// Writes every line queued so far (bounded wait); called before the process exits.
pub fn flush() {
    if let Some(q) = QUEUE.get() {
        q.flush(Duration::from_secs(2));
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
        self.0.reload(filter).map_err(|e| e.to_string())?;
        update_lines();
        Ok(())
    }
}

/// An `EnvFilter` from directives such as `info` or `info,smtpgw=debug`.
pub fn parse_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|e| format!("invalid log filter {directives:?}: {e}"))
}

/// Installs the global subscriber and starts the writer thread. `directives` were
/// validated with [`parse_filter`].
pub fn init(
    format: LogFormat,
    directives: &str,
    recipients: LogRecipients,
) -> Result<LogHandle, String> {
    let (filter, handle) = reload::Layer::new(parse_filter(directives)?);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty());
    let formatter = format::Formatter::new(format == LogFormat::Json, journal, recipients);
    let queue = writer::Queue::new(formatter)
        .map_err(|e| format!("cannot start the log writer thread: {e}"))?;
    RECIPIENTS.store(
        match recipients {
            LogRecipients::Full => 0,
            LogRecipients::Count => 1,
            LogRecipients::Hash => 2,
        },
        Ordering::Relaxed,
    );
    if QUEUE.set(queue).is_err() {
        return Err("cannot set up logging: already set up".into());
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(QueueLayer)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))?;
    update_lines();
    Ok(LogHandle(handle))
}

/// Turns `tracing` events into [`event::TraceLine`]s for the writer. Runs on the thread
/// that logs, which is never a reactor's hot path (reactors hand over their own lines).
struct QueueLayer;

impl<S: Subscriber> Layer<S> for QueueLayer {
    fn on_event(&self, ev: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = ev.metadata();
        let mut line = event::TraceLine {
            level: *meta.level(),
            target: meta.target(),
            message: String::new(),
            fields: Vec::new(),
        };
        ev.record(&mut Fields(&mut line));
        submit(Event::Trace(line));
    }
}

struct Fields<'a>(&'a mut event::TraceLine);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.message = value.to_owned();
        } else {
            self.0
                .fields
                .push((field.name(), event::Value::Str(value.to_owned())));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.fields.push((field.name(), event::Value::U64(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.fields.push((field.name(), event::Value::I64(value)));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.fields.push((field.name(), event::Value::F64(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0
            .fields
            .push((field.name(), event::Value::Bool(value)));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.0.message = text;
        } else {
            self.0.fields.push((field.name(), event::Value::Str(text)));
        }
    }
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
