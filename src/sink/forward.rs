//! Store-and-forward for `--sink kafka --spool-fallback`, its second half: the thread
//! that hands the messages the fallback sink ([`crate::sink::fallback`]) stored in the
//! spool to Kafka once it can take them.
//!
//! # The forwarder
//!
//! One thread reads the spool oldest first, from a durable cursor, and publishes each
//! record through the same Kafka sink with its original key, value, headers and
//! timestamp, so a forwarded record is identical to a direct publish. At most
//! `--forward-window` records (at most [`WINDOW_RECORDS`], and [`WINDOW_BYTES`] bytes)
//! are in flight; the producer's queue holds that much room beyond what live mail may
//! fill, so live traffic cannot crowd the forwarder out. The cursor moves
//! over the longest prefix the broker has acknowledged with `acks=all`, and is written
//! (two checksummed slots in `FORWARD`, `fdatasync`) before anything that depends on it:
//! a segment whose every record is acknowledged, and which the writer has left, is
//! deleted only after the cursor past it is durable.
//!
//! A crash between an acknowledgement and the cursor write forwards those records again
//! after the restart: consumers may see a duplicate, never a gap. The record key (the
//! message id) identifies duplicates. There are at most one window of them: before a
//! window's records are handed to Kafka, the cursor is made durable and then how far
//! the records reach is written to `FORWARD-SENT` (no `fdatasync`: a power loss can
//! only leave an older mark, which makes the count low, never high), and after a
//! restart the records up to that mark are counted as they are forwarded again
//! (`smtpgw_forward_redelivered_total`). Why one window: the window holds exactly the
//! records from the cursor to how far reading has gone, and the mark is written only
//! while the cursor on disk equals the one in memory (see [`Ledger`]); if the cursor
//! cannot be written, the records just read are put back and nothing is sent, so a
//! failed cursor write can never let the mark run a second window ahead of it. The
//! mark never moves back, so a watchdog restart (below) does not forget what the
//! abandoned window sent.
//!
//! The thread sleeps on channels: acknowledgements, the spool writer's commits, the
//! Kafka sink becoming ready, shutdown. Each wake-up pumps until nothing moves: the
//! acknowledged prefix is dropped from the window and the window refilled, again, so a
//! burst of acknowledgements that empties the window at once is followed by the next
//! records rather than by a sleep with nothing in flight to wake it (the stall of
//! issue 19: forwarding stopped after one window while live mail, going straight to
//! Kafka, made no spool commits). The clock paces retries after a failure, and a
//! watchdog: with work outstanding and no acknowledgement or send for
//! `2 × --publish-timeout + 15 s` (librdkafka answers every message within the publish
//! timeout, a retired producer within the timeout and its purge), the forwarder logs
//! it, counts it (`smtpgw_forward_restarts_total`) and starts again from the durable
//! cursor; what it sends again is counted as redelivered.
//!
//! Per-message control: the forwarder reads the spool's tombstone log
//! ([`crate::sink::spool::tombstone`]) again whenever it changed (an inotify watch on
//! the file wakes it; its length is checked before each read of records). A held or
//! deleted record is passed over (the cursor moves past it; a held one's segment is
//! not deleted); a released record it passed is read back from its position and sent
//! out of order, and a `forwarded` tombstone notes it once Kafka acknowledged it, so a
//! restart does not send it again (a crash before that note does: same key).
//!
//! A record the forwarder cannot publish for good (Kafka refuses it as too large) or
//! cannot read (a bad frame) is reported with its file and offset, and its segment is
//! never deleted, so nothing acknowledged leaves the disk without reaching Kafka.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use crate::sink::fallback::FallbackError;
use crate::sink::kafka::KafkaSink;
use crate::sink::spool::tombstone::{
    append_tombstone, ensure_tombstone_log, read_tombstones, tombstone_path, tombstones_len,
    Action, Tombstone, Tombstones,
};
use crate::sink::spool::writer::{list_segments, open_or_create, sync_dir};
use crate::sink::spool::{
    Position, ReadEvent, SpoolCommit, SpoolError, SpoolReader, SpoolRecord, SpoolSink,
};
use crate::sink::{ForwardStats, PublishError, PublishResult, Sink};

/// Records in flight to Kafka at once: enough to batch well. The bound of
/// `--forward-window`, which the configuration checks.
pub const WINDOW_RECORDS: usize = crate::config::MAX_FORWARD_WINDOW as usize;
/// Bytes of values in flight at once; this bounds the forwarder's memory.
pub const WINDOW_BYTES: usize = 32 << 20;
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);

const CURSOR_FILE: &str = "FORWARD";
const SENT_FILE: &str = "FORWARD-SENT";
const SENT_MAGIC: &[u8; 8] = b"SGWSNT01";
/// Added to twice the publish timeout before a forwarder with work outstanding and
/// no progress is restarted (see the module documentation).
const STALL_MARGIN: Duration = Duration::from_secs(15);
const CURSOR_MAGIC: &[u8; 8] = b"SGWFWD01";
/// Tags of released messages sent out of order start here, far above the window's.
const RELEASED_TAGS: u64 = 1 << 62;
const CURSOR_SLOT: u64 = 32;
crate::smtp::stats::labels! {
    /// Why a start-up found the cursor damaged (`smtpgw_forward_cursor_resets_total{reason}`).
    pub enum CursorReset {
        Empty => "empty",
        Truncated => "truncated",
        Unreadable => "unreadable",
    }
}

/// The forwarder's figures, shared with the metrics.
#[derive(Debug, Default)]
struct Counters {
    awaiting_records: AtomicI64,
    awaiting_bytes: AtomicI64,
    forwarded_records: AtomicU64,
    forwarded_bytes: AtomicU64,
    /// `received_at` of the oldest record not yet forwarded, in Unix microseconds; 0
    /// when there is none.
    oldest_micros: AtomicI64,
    /// Records forwarded that may have reached Kafka before (a restart, or the
    /// watchdog's restart of a stalled forwarder).
    redelivered_records: AtomicU64,
    restarts: AtomicU64,
}

/// The running forwarder, as the fallback sink ([`crate::sink::fallback`]) keeps it.
pub(crate) struct Forwarding {
    stop: Sender<()>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    /// Why this start found the forward cursor damaged, if it did.
    cursor_reset: Option<CursorReset>,
    /// Wakes the forwarder when the tombstone log changes; dropping it stops it.
    _tombstone_watch: Option<notify::RecommendedWatcher>,
}

impl Forwarding {
    /// Starts the forwarder over the spool in `dir`, which `spool` writes and whose
    /// commits arrive on `commits`; it begins with whatever earlier runs left
    /// unforwarded. At most `window` records (1..=[`WINDOW_RECORDS`]) are in flight.
    pub(crate) fn start(
        dir: &Path,
        kafka: &Arc<KafkaSink>,
        spool: &Arc<SpoolSink>,
        commits: Receiver<SpoolCommit>,
        window: usize,
        publish_timeout: Duration,
    ) -> Result<Forwarding, FallbackError> {
        let (ready_tx, ready) = crossbeam_channel::unbounded();
        kafka.notify_ready(ready_tx);

        let (ledger, cursor_reset) = Ledger::open(dir)?;
        // `spool hold | release | delete` append to the tombstone log: a change wakes
        // the forwarder (inotify on that one file), so a release is sent at once even
        // when nothing else moves.
        let (tombstones_tx, tombstones_changed) = crossbeam_channel::bounded(1);
        let watch = ensure_tombstone_log(dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                use notify::Watcher;
                let mut watcher =
                    notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                        if event.is_ok_and(|e| !e.kind.is_access()) {
                            let _ = tombstones_tx.try_send(());
                        }
                    })
                    .map_err(|e| e.to_string())?;
                watcher
                    .watch(&tombstone_path(dir), notify::RecursiveMode::NonRecursive)
                    .map_err(|e| e.to_string())?;
                Ok(watcher)
            });
        let tombstone_watch = match watch {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, "cannot watch the spool's tombstone log; a hold, release or delete takes effect at the forwarder's next wake-up");
                None
            }
        };
        let cursor = ledger.saved;
        let stall_after = publish_timeout * 2 + STALL_MARGIN;
        let (acks_tx, acks) = crossbeam_channel::unbounded();
        let (stop, stop_rx) = crossbeam_channel::bounded(1);
        let counters = Arc::new(Counters::default());
        let forwarder = Forwarder {
            dir: dir.to_path_buf(),
            kafka: Arc::clone(kafka),
            spool: Arc::clone(spool),
            cursor,
            redeliver_until: ledger.sent,
            ledger,
            reader: None,
            read_pos: cursor,
            counted_until: Position::default(),
            window: VecDeque::new(),
            window_bytes: 0,
            forwarded_log: ForwardedLog::default(),
            tombstones: Tombstones::default(),
            tombstones_seen: None,
            released: std::collections::HashMap::new(),
            released_lost: HashSet::new(),
            next_released_tag: RELEASED_TAGS,
            next_tag: 0,
            retry_at: None,
            backoff: FIRST_RETRY,
            keep: HashSet::new(),
            to_delete: Vec::new(),
            counters: Arc::clone(&counters),
            window_records: window,
            last_activity: Instant::now(),
            outstanding_since: None,
            stall_after,
            acks,
            acks_tx,
            commits,
            ready,
            tombstones_changed,
            stop: stop_rx,
            stopping: false,
            last_error: None,
        };
        let handle = std::thread::Builder::new()
            .name("smtpgw-forward".into())
            .spawn(move || forwarder.run())
            .map_err(FallbackError::Thread)?;
        Ok(Forwarding {
            stop,
            thread: Mutex::new(Some(handle)),
            counters,
            cursor_reset,
            _tombstone_watch: tombstone_watch,
        })
    }

    /// Stops taking new records; what is in flight is still answered.
    pub(crate) fn stop(&self) {
        let _ = self.stop.try_send(());
    }

    /// Waits for the thread to end (after [`Forwarding::stop`]).
    pub(crate) fn join(&self) {
        crate::sink::join_logged(&self.thread, "forwarder");
    }

    /// What the forwarder reports for the metrics.
    pub(crate) fn stats(&self, fallback_active: bool) -> ForwardStats {
        let c = &self.counters;
        let oldest = c.oldest_micros.load(Ordering::Relaxed);
        let now = chrono::Utc::now().timestamp_micros();
        ForwardStats {
            awaiting_records: c.awaiting_records.load(Ordering::Relaxed).max(0) as u64,
            awaiting_bytes: c.awaiting_bytes.load(Ordering::Relaxed).max(0) as u64,
            forwarded_records: c.forwarded_records.load(Ordering::Relaxed),
            forwarded_bytes: c.forwarded_bytes.load(Ordering::Relaxed),
            cursor_reset: self.cursor_reset,
            oldest_age_seconds: if oldest == 0 {
                0.0
            } else {
                (now - oldest).max(0) as f64 / 1e6
            },
            redelivered_records: c.redelivered_records.load(Ordering::Relaxed),
            restarts: c.restarts.load(Ordering::Relaxed),
            fallback_active,
        }
    }
}

/// The cursor on disk: two 32-byte slots written alternately, each `magic, segment,
/// offset, counter, crc32c`, so a torn write leaves the other slot valid. With no
/// valid slot the forwarder starts at the beginning of the spool (duplicates, no loss).
struct CursorFile {
    file: File,
    path: PathBuf,
    counter: u32,
    /// Not on disk yet: there was no room for it at start (see `first_save`).
    unwritten: bool,
}

impl CursorFile {
    fn open(dir: &Path) -> Result<CursorFile, SpoolError> {
        let path = dir.join(CURSOR_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|error| SpoolError::Io {
                op: "open forward cursor",
                path: path.clone(),
                error,
            })?;
        let mut cursor = CursorFile {
            file,
            path,
            counter: 0,
            unwritten: false,
        };
        if !existed {
            // A valid cursor from the start, so an empty or short file is always damage
            // (reported by `load`), never a cursor that was not written yet. On a full
            // file system it is written with the first forwarded record instead.
            if let Err(error) = cursor.save(Position::default()) {
                // No room (the spool cannot hold a record either then; its warning says
                // so). No file rather than an empty one, which a later start would
                // report as damage: `save` creates it with the first cursor.
                tracing::info!(file = %cursor.path.display(), %error, "cannot write the first forward cursor yet");
                let _ = std::fs::remove_file(&cursor.path);
                cursor.unwritten = true;
            }
            sync_dir(dir)?;
        }
        if let Some((_, counter)) = cursor.read() {
            cursor.counter = counter;
        }
        Ok(cursor)
    }

    fn read(&self) -> Option<(Position, u32)> {
        let mut best: Option<(Position, u32)> = None;
        for slot in 0..2 {
            let mut buf = [0u8; CURSOR_SLOT as usize];
            if self
                .file
                .read_exact_at(&mut buf, slot * CURSOR_SLOT)
                .is_err()
            {
                continue;
            }
            let Some(found) = decode_cursor(&buf) else {
                continue;
            };
            if best.is_none_or(|(_, c)| found.1.wrapping_sub(c) as i32 > 0) {
                best = Some(found);
            }
        }
        best
    }

    /// Where forwarding resumes, and why it starts over when the file is damaged (one
    /// [`CursorReset`], logged at `error` here and counted in the
    /// metrics): empty, truncated (shorter than its two slots; a slot that survives is
    /// still used) or unreadable (neither slot valid, or the file cannot be read).
    fn load(&self) -> (Position, Option<CursorReset>) {
        if self.unwritten {
            return (Position::default(), None);
        }
        let len = self.file.metadata().ok().map(|meta| meta.len());
        let found = self.read().map(|(position, _)| position);
        let reason = match (len, found) {
            (Some(len), Some(position)) if len >= 2 * CURSOR_SLOT => return (position, None),
            (Some(0), _) => CursorReset::Empty,
            (Some(len), _) if len < 2 * CURSOR_SLOT => CursorReset::Truncated,
            _ => CursorReset::Unreadable,
        };
        let position = found.unwrap_or_default();
        tracing::error!(
            file = %self.path.display(),
            reason = reason.as_str(),
            segment = position.segment,
            offset = position.offset,
            "forward cursor {}; forwarding again from there: every record still in \
             the spool after it is published again (consumers will see duplicates, same keys)",
            reason.as_str()
        );
        (position, Some(reason))
    }

    fn save(&mut self, position: Position) -> io::Result<()> {
        if self.unwritten {
            return self.first_save(position);
        }
        let counter = self.counter.wrapping_add(1);
        let buf = encode_cursor(position, counter);
        self.file
            .write_all_at(&buf, u64::from(counter % 2) * CURSOR_SLOT)?;
        self.file.sync_data()?;
        self.counter = counter;
        Ok(())
    }

    /// Creates the file that could not be written at start, with its first cursor; on
    /// failure it is removed again, so no empty file is left to look like damage.
    fn first_save(&mut self, position: Position) -> io::Result<()> {
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)?;
        self.unwritten = false;
        let saved = self.save(position).and_then(|()| {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            sync_dir(dir).map_err(io::Error::other)
        });
        if saved.is_err() {
            let _ = std::fs::remove_file(&self.path);
            self.unwritten = true;
        }
        saved
    }
}

/// How far the forwarder of the spool in `dir` has come, as its files say: the
/// durable cursor (every record before it was acknowledged by Kafka) and the sent mark
/// (records before it may have been handed to Kafka). `None` when the spool has no
/// forwarder (no `FORWARD` file). A cursor with no valid slot reads as the start of
/// the spool, as the forwarder itself would take it (it forwards everything again).
/// For the tools (`spool ls`, `prune`, `stat`, `hold`), which must not duplicate the
/// layout.
pub fn read_forward_progress(dir: &Path) -> Result<Option<ForwardProgress>, SpoolError> {
    let path = dir.join(CURSOR_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(SpoolError::Io {
                op: "read forward cursor",
                path,
                error,
            })
        }
    };
    let cursor = CursorFile {
        file,
        path,
        counter: 0,
        unwritten: false,
    }
    .read()
    .map(|(position, _)| position)
    .unwrap_or_default();
    let sent = SentMark {
        file: File::open(dir.join(SENT_FILE)).ok(),
    }
    .load()
    .unwrap_or_default();
    Ok(Some(ForwardProgress {
        cursor,
        sent: sent.max(cursor),
    }))
}

/// See [`read_forward_progress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardProgress {
    pub cursor: Position,
    pub sent: Position,
}

impl ForwardProgress {
    /// Whether Kafka acknowledged this record (the durable cursor is past it).
    pub fn forwarded(&self, record: &SpoolRecord) -> bool {
        record.next_position() <= self.cursor
    }

    /// Whether the forwarder may have handed this record to Kafka already.
    pub fn handed_over(&self, record: &SpoolRecord) -> bool {
        record.next_position() <= self.sent
    }
}

fn encode_cursor(position: Position, counter: u32) -> [u8; CURSOR_SLOT as usize] {
    let mut buf = [0u8; CURSOR_SLOT as usize];
    buf[..8].copy_from_slice(CURSOR_MAGIC);
    buf[8..16].copy_from_slice(&position.segment.to_le_bytes());
    buf[16..24].copy_from_slice(&position.offset.to_le_bytes());
    buf[24..28].copy_from_slice(&counter.to_le_bytes());
    let crc = crc32c::crc32c(&buf[..28]);
    buf[28..].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn decode_cursor(buf: &[u8; CURSOR_SLOT as usize]) -> Option<(Position, u32)> {
    let field = |at: usize| -> [u8; 8] { buf[at..at + 8].try_into().unwrap_or_default() };
    if &buf[..8] != CURSOR_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(buf[28..].try_into().ok()?);
    if crc != crc32c::crc32c(&buf[..28]) {
        return None;
    }
    let position = Position {
        segment: u64::from_le_bytes(field(8)),
        offset: u64::from_le_bytes(field(16)),
    };
    Some((position, u32::from_le_bytes(buf[24..28].try_into().ok()?)))
}

/// How far the forwarder has handed records to Kafka: `FORWARD-SENT`, one 32-byte slot
/// `magic, segment, offset, crc32c`, rewritten before each window is sent and never
/// synced on its own (see the module documentation). It only counts duplicates; losing
/// it loses nothing but the count.
struct SentMark {
    file: Option<File>,
}

impl SentMark {
    fn open(dir: &Path) -> SentMark {
        let path = dir.join(SENT_FILE);
        let file = open_or_create(&path)
            .map_err(|error| {
                tracing::warn!(%error, file = %path.display(), "cannot open the forwarder's sent mark; redeliveries after a restart are not counted");
            })
            .ok();
        SentMark { file }
    }

    fn load(&self) -> Option<Position> {
        let mut buf = [0u8; CURSOR_SLOT as usize];
        self.file.as_ref()?.read_exact_at(&mut buf, 0).ok()?;
        decode_sent(&buf)
    }

    fn save(&mut self, position: Position) {
        let Some(file) = &self.file else {
            return;
        };
        if let Err(error) = file.write_all_at(&encode_sent(position), 0) {
            tracing::warn!(%error, "cannot write the forwarder's sent mark; redeliveries after a restart are not counted");
            self.file = None;
        }
    }
}

/// The forwarder's two files and the rule that ties them together: the sent mark is
/// written only while the cursor on disk is the cursor in memory. The window holds
/// exactly the records between the cursor and how far reading has gone, so the mark is
/// never more than one window ahead of the durable cursor, and after a crash what is
/// forwarded again and counted as redelivered (durable cursor to mark) is at most one
/// window, whatever failed before the crash.
struct Ledger {
    cursor_file: CursorFile,
    /// The cursor on disk.
    saved: Position,
    sent_mark: SentMark,
    /// The mark on disk (as far as we know: its writes are not synced); it only grows,
    /// so a watchdog restart that reads again from the cursor does not forget what the
    /// abandoned window sent.
    sent: Position,
}

impl Ledger {
    /// The ledger, and why the cursor on disk was found damaged, if it was.
    fn open(dir: &Path) -> Result<(Ledger, Option<CursorReset>), SpoolError> {
        let cursor_file = CursorFile::open(dir)?;
        let (saved, cursor_reset) = cursor_file.load();
        let sent_mark = SentMark::open(dir);
        let sent = sent_mark.load().unwrap_or_default();
        let ledger = Ledger {
            cursor_file,
            saved,
            sent_mark,
            sent,
        };
        Ok((ledger, cursor_reset))
    }

    /// Makes `cursor` durable if it moved. Whether the cursor on disk is `cursor`.
    fn save_cursor(&mut self, cursor: Position) -> bool {
        if cursor == self.saved {
            return true;
        }
        if let Err(error) = self.cursor_file.save(cursor) {
            tracing::error!(%error, file = %self.cursor_file.path.display(), "cannot write the forward cursor; nothing more is forwarded or deleted until it can be");
            return false;
        }
        self.saved = cursor;
        true
    }

    /// Before the records from `cursor` up to `until` go to Kafka: makes `cursor`
    /// durable, then notes `until` in the sent mark. `false` (and the mark untouched)
    /// if the cursor cannot be written: then nothing may be sent.
    fn mark_sent(&mut self, cursor: Position, until: Position) -> bool {
        if !self.save_cursor(cursor) {
            return false;
        }
        if until > self.sent {
            self.sent = until;
            self.sent_mark.save(until);
        }
        true
    }
}

fn encode_sent(position: Position) -> [u8; CURSOR_SLOT as usize] {
    let mut buf = [0u8; CURSOR_SLOT as usize];
    buf[..8].copy_from_slice(SENT_MAGIC);
    buf[8..16].copy_from_slice(&position.segment.to_le_bytes());
    buf[16..24].copy_from_slice(&position.offset.to_le_bytes());
    let crc = crc32c::crc32c(&buf[..24]);
    buf[24..28].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn decode_sent(buf: &[u8; CURSOR_SLOT as usize]) -> Option<Position> {
    if &buf[..8] != SENT_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(buf[24..28].try_into().ok()?);
    if crc != crc32c::crc32c(&buf[..24]) {
        return None;
    }
    Some(Position {
        segment: u64::from_le_bytes(buf[8..16].try_into().ok()?),
        offset: u64::from_le_bytes(buf[16..24].try_into().ok()?),
    })
}

/// The forwarder's progress line: what Kafka acknowledged since the last one, at most
/// one a second while a backlog drains, and one when it is drained.
struct ForwardedLog {
    count: u64,
    first: Option<ulid::Ulid>,
    last: Option<ulid::Ulid>,
    /// When the last one forwarded was received (its lag is taken when the line is
    /// written, not per record).
    last_received: Option<chrono::DateTime<chrono::Utc>>,
    written: Instant,
}

impl Default for ForwardedLog {
    fn default() -> Self {
        ForwardedLog {
            count: 0,
            first: None,
            last: None,
            last_received: None,
            written: Instant::now(),
        }
    }
}

impl ForwardedLog {
    fn add(&mut self, record: &SpoolRecord) {
        self.count += 1;
        self.first.get_or_insert(record.id);
        self.last = Some(record.id);
        self.last_received = Some(record.received_at);
    }

    fn write_if_due(&mut self, drained: bool) {
        if self.count == 0 || !(drained || self.written.elapsed() >= Duration::from_secs(1)) {
            return;
        }
        let (Some(first), Some(last)) = (self.first.take(), self.last.take()) else {
            return;
        };
        tracing::info!(
            count = self.count,
            %first,
            %last,
            lag_ms = self
                .last_received
                .map_or(0, |at| (chrono::Utc::now() - at).num_milliseconds().max(0)),
            drained,
            "forwarded spooled messages to kafka"
        );
        self.count = 0;
        self.written = Instant::now();
    }
}

/// One entry of the in-flight window, in spool order.
struct Slot {
    tag: u64,
    item: Item,
    state: State,
}

enum Item {
    Record(Box<SpoolRecord>),
    /// A held or deleted message: not sent; the cursor passes it.
    Skipped {
        next: Position,
        frame_len: u64,
    },
    /// Every record of a closed segment is before this point.
    SegmentEnd {
        segment: u64,
        next: Position,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Done,
    Failed,
}

struct Forwarder {
    dir: PathBuf,
    kafka: Arc<KafkaSink>,
    spool: Arc<SpoolSink>,
    /// Acknowledged up to here, in memory; on disk once [`Forwarder::persist`] ran.
    cursor: Position,
    /// The cursor and the sent mark on disk.
    ledger: Ledger,
    /// Reading up to the durable end it was opened with.
    reader: Option<(SpoolReader, Position)>,
    /// Everything before this has been read.
    read_pos: Position,
    /// The start-up count of the backlog went this far; commits up to here are in it.
    counted_until: Position,
    window: VecDeque<Slot>,
    window_bytes: usize,
    /// What was forwarded since the last `forwarded spooled messages` line.
    forwarded_log: ForwardedLog,
    /// `spool hold | release | delete`, read again whenever the log's length changes
    /// (checked before each read of records).
    tombstones: Tombstones,
    tombstones_seen: Option<u64>,
    /// Released messages the forwarder had passed while they were held, in flight out
    /// of order, by tag (from [`RELEASED_TAGS`] on).
    released: std::collections::HashMap<u64, Box<SpoolRecord>>,
    /// Released messages that cannot be sent (gone, or refused for good): not retried.
    released_lost: HashSet<ulid::Ulid>,
    next_released_tag: u64,
    next_tag: u64,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Segments that hold something not forwarded (unreadable or refused); never
    /// deleted by the forwarder.
    keep: HashSet<u64>,
    to_delete: Vec<u64>,
    counters: Arc<Counters>,
    /// `--forward-window`: records in flight at most.
    window_records: usize,
    /// Records before this were handed to Kafka before a restart: forwarding them
    /// again counts as a redelivery.
    redeliver_until: Position,
    /// The last acknowledgement received or record sent, and since when work has been
    /// outstanding: the watchdog's clock (see [`Forwarder::stall_deadline`]).
    last_activity: Instant,
    outstanding_since: Option<Instant>,
    stall_after: Duration,
    acks: Receiver<(u64, PublishResult)>,
    acks_tx: Sender<(u64, PublishResult)>,
    commits: Receiver<SpoolCommit>,
    ready: Receiver<()>,
    tombstones_changed: Receiver<()>,
    stop: Receiver<()>,
    stopping: bool,
    last_error: Option<Instant>,
}

impl Forwarder {
    fn run(mut self) {
        self.refresh_tombstones();
        self.count_backlog();
        // Handles of our own, so the select arms may borrow `self` mutably.
        let (acks, mut commits, mut ready, mut stop, mut tombstones) = (
            self.acks.clone(),
            self.commits.clone(),
            self.ready.clone(),
            self.stop.clone(),
            self.tombstones_changed.clone(),
        );
        loop {
            if self.retry_at.is_some_and(|t| Instant::now() >= t) {
                self.retry();
            }
            if self.stall_deadline().is_some_and(|t| Instant::now() >= t) {
                self.restart();
            }
            self.pump();
            if self.stopping && !self.window.iter().any(|s| s.state == State::Pending) {
                break;
            }
            let now = Instant::now();
            if self.outstanding() {
                self.outstanding_since.get_or_insert(now);
            } else {
                self.outstanding_since = None;
            }
            let timeout = [self.retry_at, self.stall_deadline()]
                .into_iter()
                .flatten()
                .min()
                .map(|t| t.saturating_duration_since(now));
            let never = crossbeam_channel::never();
            let timer = match timeout {
                Some(t) => crossbeam_channel::after(t),
                None => never,
            };
            select! {
                recv(acks) -> ack => if let Ok((tag, result)) = ack { self.on_ack(tag, result) },
                recv(commits) -> commit => match commit {
                    Ok(commit) => self.on_commit(commit),
                    // The spool's writer is gone: nothing more will be spooled.
                    Err(_) => {
                        commits = crossbeam_channel::never();
                        self.stopping = true;
                    }
                },
                recv(ready) -> notice => match notice {
                    // Kafka is back: retry now instead of at the end of the backoff.
                    Ok(()) => if self.retry_at.is_some() {
                        self.retry_at = Some(Instant::now());
                    },
                    Err(_) => ready = crossbeam_channel::never(),
                },
                recv(stop) -> _ => {
                    // Once is enough (and a dropped sender must not wake us again).
                    stop = crossbeam_channel::never();
                    self.stopping = true;
                }
                // Read at the next fill (in `pump`).
                recv(tombstones) -> changed => if changed.is_err() {
                    tombstones = crossbeam_channel::never();
                },
                recv(timer) -> _ => {}
            }
            // Take everything else that is waiting before acting on it, so one cursor
            // write covers a burst of acknowledgements.
            while let Ok((tag, result)) = acks.try_recv() {
                self.on_ack(tag, result);
            }
            while let Ok(commit) = commits.try_recv() {
                self.on_commit(commit);
            }
        }
        self.pop_done();
        self.persist();
        let left = self.counters.awaiting_records.load(Ordering::Relaxed);
        if left > 0 {
            tracing::info!(
                records = left,
                "forwarder stopped; the rest is forwarded at the next start"
            );
        }
    }

    /// Counts what earlier runs left unforwarded, for the metrics.
    fn count_backlog(&mut self) {
        let (mut records, mut bytes, mut oldest) = (0i64, 0i64, None);
        match list_segments(&self.dir) {
            Ok(segments) => {
                let below = segments
                    .iter()
                    .filter(|(seq, _)| *seq < self.cursor.segment)
                    .count();
                if below > 0 {
                    tracing::info!(
                        segments = below,
                        "spool segments before the forward cursor stay on disk (left by a crash, or holding records that could not be forwarded); see `smtpgw spool`"
                    );
                }
            }
            Err(error) => {
                tracing::error!(%error, "cannot list the spool to count the forward backlog");
                return;
            }
        }
        let end = self.spool.durable_end();
        self.counted_until = end;
        let Ok(reader) = SpoolReader::open_from(&self.dir, self.cursor) else {
            return;
        };
        let mut reader = reader.until(end);
        let mut sent_before = 0u64;
        while let Some(Ok(event)) = reader.next_event() {
            if let ReadEvent::Record(record) = event {
                // Held and deleted ones are counted too: passing them takes them off.
                if record.next_position() <= self.redeliver_until {
                    sent_before += 1;
                }
                records += 1;
                bytes += record.frame_len as i64;
                oldest.get_or_insert(record.received_at.timestamp_micros());
            }
        }
        self.counters
            .awaiting_records
            .fetch_add(records, Ordering::Relaxed);
        self.counters
            .awaiting_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        if let Some(oldest) = oldest {
            self.counters.oldest_micros.store(oldest, Ordering::Relaxed);
        }
        if records > 0 {
            tracing::info!(
                records,
                bytes,
                sent_before,
                "spooled messages from an earlier run await forwarding to kafka; the first sent_before of them were handed to kafka before the stop and may reach consumers twice (same key)"
            );
        }
    }

    fn on_commit(&mut self, commit: SpoolCommit) {
        // Batches that were durable before the start-up count are in it already.
        if commit.durable <= self.counted_until {
            return;
        }
        let c = &self.counters;
        c.awaiting_records
            .fetch_add(commit.records as i64, Ordering::Relaxed);
        c.awaiting_bytes
            .fetch_add(commit.bytes as i64, Ordering::Relaxed);
        // While Kafka is away nothing is read, so the oldest waiting record is the
        // first one spooled since nothing waited.
        if let Some(id) = commit.first_id {
            let micros = i64::try_from(id.timestamp_ms()).unwrap_or(i64::MAX) * 1000;
            let _ =
                c.oldest_micros
                    .compare_exchange(0, micros, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Until nothing moves: drops the acknowledged prefix of the window and refills
    /// it; then makes the cursor durable. Refilling after dropping (not only before)
    /// is what keeps a window that was acknowledged all at once from ending the
    /// forwarding until some unrelated wake-up.
    fn pump(&mut self) {
        loop {
            let popped = self.pop_done();
            let filled = self.fill();
            if !popped && !filled {
                break;
            }
        }
        self.persist();
        let drained = self.counters.awaiting_records.load(Ordering::Relaxed) <= 0;
        self.forwarded_log.write_if_due(drained);
    }

    /// Reads records into the window until it is full or the spool has no more, notes
    /// how far that reaches, then publishes them. Whether anything was added.
    fn fill(&mut self) -> bool {
        if self.stopping || self.retry_at.is_some() || !self.kafka.is_healthy() {
            return false;
        }
        self.refresh_tombstones();
        self.send_released();
        let first = self.window.len();
        let (from, bytes_before, tag_before) = (self.read_pos, self.window_bytes, self.next_tag);
        while self.window.len() < self.window_records && self.window_bytes < WINDOW_BYTES {
            let Some(item) = self.read_next() else {
                break;
            };
            let tag = self.next_tag;
            self.next_tag += 1;
            let state = match &item {
                Item::Record(record) => {
                    self.window_bytes += record.value().len();
                    State::Pending
                }
                Item::SegmentEnd { .. } | Item::Skipped { .. } => State::Done,
            };
            self.window.push_back(Slot { tag, item, state });
        }
        if self.window.len() == first {
            return false;
        }
        // The durable cursor first: then what a crash can send twice, from the cursor
        // on disk to the mark, is exactly this window. If the cursor cannot be written,
        // nothing is sent: the records go back unread and the next try comes after
        // the backoff.
        if !self.ledger.mark_sent(self.cursor, self.read_pos) {
            self.window.truncate(first);
            self.window_bytes = bytes_before;
            // Tags stay contiguous in the window: `on_ack` finds a slot by its tag.
            self.next_tag = tag_before;
            self.reader = None;
            self.read_pos = from;
            self.schedule_retry();
            return false;
        }
        self.delete_forwarded();
        for slot in self.window.range(first..) {
            if let Item::Record(record) = &slot.item {
                self.kafka
                    .forward(&**record, slot.tag, self.acks_tx.clone());
            }
        }
        self.last_activity = Instant::now();
        self.note_oldest();
        true
    }

    /// Whether the forwarder has work it should be making progress on: records
    /// awaiting an acknowledgement, or (Kafka ready, no retry pending, room in the
    /// window) durable records not yet read.
    fn outstanding(&self) -> bool {
        if self.stopping {
            return false;
        }
        if self.window.iter().any(|s| s.state == State::Pending) {
            return true;
        }
        self.retry_at.is_none()
            && self.window.len() < self.window_records
            && self.window_bytes < WINDOW_BYTES
            && self.kafka.is_healthy()
            && self.read_pos < self.spool.durable_end()
    }

    /// When the watchdog restarts the forwarder if nothing moves until then.
    fn stall_deadline(&self) -> Option<Instant> {
        let since = self.outstanding_since?;
        Some(since.max(self.last_activity) + self.stall_after)
    }

    /// Starts again from the durable cursor, as a new forwarder would: everything in
    /// the window is read and sent again (and counted as redelivered), and answers to
    /// the abandoned window's records are ignored (their tags are below the new ones).
    fn restart(&mut self) {
        tracing::warn!(
            stalled_for_s = self.stall_after.as_secs(),
            in_window = self.window.len(),
            "the forwarder made no progress with work outstanding; restarting it from its cursor (records in flight are forwarded again)"
        );
        self.counters.restarts.fetch_add(1, Ordering::Relaxed);
        self.redeliver_until = self.redeliver_until.max(self.read_pos);
        self.window.clear();
        self.window_bytes = 0;
        // Answers to released messages in flight are ignored too; they are sent again.
        self.released.clear();
        self.reader = None;
        self.read_pos = self.cursor;
        self.retry_at = None;
        self.backoff = FIRST_RETRY;
        self.last_activity = Instant::now();
        self.outstanding_since = None;
    }

    /// The next record (or closed segment's end) in spool order, if one is durable.
    fn read_next(&mut self) -> Option<Item> {
        loop {
            let (reader, until) = match &mut self.reader {
                Some((reader, until)) => (reader, *until),
                None => {
                    // Only what the writer has synced: a record is forwarded only
                    // once its sender could have had its 250.
                    let end = self.spool.durable_end();
                    if self.read_pos >= end {
                        return None;
                    }
                    match SpoolReader::open_from(&self.dir, self.read_pos) {
                        Ok(reader) => {
                            let (reader, until) = self.reader.insert((reader.until(end), end));
                            (reader, *until)
                        }
                        Err(error) => {
                            self.failed_io(&error);
                            return None;
                        }
                    }
                }
            };
            match reader.next_event() {
                Some(Ok(ReadEvent::Record(record))) => {
                    self.read_pos = record.next_position();
                    if let Some(state) = self.tombstones.state(&record.id).filter(|s| s.skipped()) {
                        tracing::info!(
                            id = %record.id,
                            state = if state.deleted { "deleted" } else { "held" },
                            "spooled message not forwarded (spool hold / delete)"
                        );
                        if state.held {
                            // Released later, it is read from here again.
                            self.keep.insert(record.seq);
                        }
                        return Some(Item::Skipped {
                            next: record.next_position(),
                            frame_len: record.frame_len,
                        });
                    }
                    return Some(Item::Record(Box::new(record)));
                }
                Some(Ok(ReadEvent::SegmentEnd {
                    segment,
                    closed: true,
                })) => {
                    let next = Position {
                        segment: segment + 1,
                        offset: 0,
                    };
                    self.read_pos = self.read_pos.max(next);
                    return Some(Item::SegmentEnd { segment, next });
                }
                // The writer's segment, read as far as it was durable.
                Some(Ok(ReadEvent::SegmentEnd { closed: false, .. })) => {}
                Some(Ok(ReadEvent::Corrupt(range) | ReadEvent::TornTail(range))) => {
                    // Below the durable end a torn tail is damage too.
                    tracing::error!(
                        %range,
                        "spool bytes unreadable: not forwarded, and the segment stays on disk; forwarding goes on after them"
                    );
                    self.keep.insert(range.segment);
                }
                Some(Err(error)) => {
                    self.reader = None;
                    self.failed_io(&error);
                    return None;
                }
                // Everything before `until` has been read; reopen if more is durable.
                None => {
                    self.reader = None;
                    self.read_pos = self.read_pos.max(until);
                }
            }
        }
    }

    fn failed_io(&mut self, error: &SpoolError) {
        if self
            .last_error
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_error = Some(Instant::now());
            tracing::error!(%error, "forwarder cannot read the spool; retrying");
        }
        self.schedule_retry();
    }

    fn schedule_retry(&mut self) {
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_RETRY);
        }
    }

    fn on_ack(&mut self, tag: u64, result: PublishResult) {
        self.last_activity = Instant::now();
        if tag >= RELEASED_TAGS {
            self.on_released_ack(tag, result);
            return;
        }
        let Some(front) = self.window.front().map(|s| s.tag) else {
            return;
        };
        let Some(slot) = tag
            .checked_sub(front)
            .and_then(|i| self.window.get_mut(i as usize))
        else {
            return;
        };
        match result {
            Ok(_) => {
                slot.state = State::Done;
                self.backoff = FIRST_RETRY;
            }
            Err(PublishError::TooLarge) => {
                slot.state = State::Done;
                if let Item::Record(record) = &slot.item {
                    tracing::error!(
                        id = %record.id,
                        segment = %record.segment.display(),
                        offset = record.offset,
                        "kafka refuses this spooled message as too large: not forwarded; its segment stays on disk"
                    );
                    self.keep.insert(record.seq);
                }
            }
            // Kafka never says StorageFull; treat it as temporary all the same.
            Err(why @ (PublishError::Temporary(_) | PublishError::StorageFull)) => {
                slot.state = State::Failed;
                if self.retry_at.is_none() {
                    tracing::debug!(%why, "forwarding failed; retrying");
                }
                self.schedule_retry();
            }
        }
    }

    /// Publishes the failed records again, in order.
    fn retry(&mut self) {
        if !self.kafka.is_healthy() || self.stopping {
            // Wait for the ready notice (or the next round of the backoff).
            self.retry_at = None;
            self.schedule_retry();
            return;
        }
        self.retry_at = None;
        self.last_activity = Instant::now();
        for slot in self.window.iter_mut() {
            if slot.state == State::Failed {
                if let Item::Record(record) = &slot.item {
                    slot.state = State::Pending;
                    self.kafka
                        .forward(&**record, slot.tag, self.acks_tx.clone());
                }
            }
        }
    }

    /// Moves the cursor (in memory) over the acknowledged prefix of the window.
    /// Whether anything moved.
    fn pop_done(&mut self) -> bool {
        let mut moved = false;
        while self.window.front().is_some_and(|s| s.state == State::Done) {
            let Some(slot) = self.window.pop_front() else {
                break;
            };
            moved = true;
            match slot.item {
                Item::Record(record) => {
                    self.window_bytes -= record.value().len();
                    self.cursor = record.next_position();
                    let c = &self.counters;
                    c.awaiting_records.fetch_sub(1, Ordering::Relaxed);
                    c.awaiting_bytes
                        .fetch_sub(record.frame_len as i64, Ordering::Relaxed);
                    c.forwarded_records.fetch_add(1, Ordering::Relaxed);
                    c.forwarded_bytes
                        .fetch_add(record.value().len() as u64, Ordering::Relaxed);
                    self.forwarded_log.add(&record);
                    if self.cursor <= self.redeliver_until {
                        c.redelivered_records.fetch_add(1, Ordering::Relaxed);
                    }
                    if self
                        .tombstones
                        .state(&record.id)
                        .is_some_and(|s| s.awaits_forwarding())
                    {
                        // Released before the forwarder reached it: say it is done, so
                        // a restart does not send it out of order as well.
                        self.note_forwarded(&record);
                    }
                }
                Item::Skipped { next, frame_len } => {
                    self.cursor = next;
                    let c = &self.counters;
                    c.awaiting_records.fetch_sub(1, Ordering::Relaxed);
                    c.awaiting_bytes
                        .fetch_sub(frame_len as i64, Ordering::Relaxed);
                }
                Item::SegmentEnd { segment, next } => {
                    self.cursor = next;
                    if !self.keep.remove(&segment) {
                        self.to_delete.push(segment);
                    }
                }
            }
        }
        if moved {
            self.note_oldest();
        }
        moved
    }

    /// Reads the tombstone log again if its length changed since the last look (one
    /// `fstat` per read of records: a `spool hold` is honoured from the next read on).
    fn refresh_tombstones(&mut self) {
        let len = tombstones_len(&self.dir);
        if self.tombstones_seen == Some(len) {
            return;
        }
        match read_tombstones(&self.dir) {
            Ok(log) => {
                for range in &log.damaged {
                    if self.tombstones_seen.is_none_or(|seen| range.offset >= seen) {
                        tracing::error!(%range, "damaged tombstone ignored (`smtpgw spool check` reports it); the message keeps the state the other tombstones give it");
                    }
                }
                self.tombstones = log;
                self.tombstones_seen = Some(len);
            }
            Err(error) => self.failed_io(&error),
        }
    }

    /// Sends the released messages the forwarder passed while they were held, out of
    /// order (each is marked `forwarded` in the log once Kafka has it).
    fn send_released(&mut self) {
        let due: Vec<(ulid::Ulid, Position)> = self
            .tombstones
            .states
            .iter()
            .filter(|(id, s)| {
                s.awaits_forwarding()
                    && s.position < self.read_pos
                    && !self.released_lost.contains(id)
                    && !self.released.values().any(|r| r.id == **id)
            })
            .map(|(id, s)| (*id, s.position))
            .collect();
        for (id, position) in due {
            let found = SpoolReader::open_from(&self.dir, position)
                .map(|mut reader| reader.find_map(|r| r.ok()).filter(|r| r.id == id));
            match found {
                Ok(Some(record)) => {
                    let tag = self.next_released_tag;
                    self.next_released_tag += 1;
                    self.kafka.forward(&record, tag, self.acks_tx.clone());
                    self.released.insert(tag, Box::new(record));
                    self.last_activity = Instant::now();
                }
                Ok(None) => {
                    tracing::error!(%id, segment = position.segment, offset = position.offset, "a released message is no longer in the spool (pruned?): not forwarded");
                    self.released_lost.insert(id);
                }
                Err(error) => {
                    self.failed_io(&error);
                    return;
                }
            }
        }
    }

    fn on_released_ack(&mut self, tag: u64, result: PublishResult) {
        let Some(record) = self.released.remove(&tag) else {
            return;
        };
        match result {
            Ok(_) => {
                let c = &self.counters;
                c.forwarded_records.fetch_add(1, Ordering::Relaxed);
                c.forwarded_bytes
                    .fetch_add(record.value().len() as u64, Ordering::Relaxed);
                self.forwarded_log.add(&record);
                self.note_forwarded(&record);
            }
            Err(PublishError::TooLarge) => {
                tracing::error!(id = %record.id, "kafka refuses this released message as too large: not forwarded");
                self.released_lost.insert(record.id);
            }
            // Sent again at the next fill.
            Err(PublishError::Temporary(_) | PublishError::StorageFull) => self.schedule_retry(),
        }
    }

    /// Notes in the tombstone log that a released message reached Kafka.
    fn note_forwarded(&mut self, record: &SpoolRecord) {
        let stone = Tombstone {
            action: Action::Forwarded,
            id: record.id,
            position: record.position(),
            at: chrono::Utc::now(),
            sent: false,
        };
        if let Err(error) = append_tombstone(&self.dir, &stone) {
            tracing::warn!(%error, id = %record.id, "cannot note a released message as forwarded; a restart forwards it again (same key)");
        }
        if let Some(state) = self.tombstones.states.get_mut(&record.id) {
            state.forwarded = true;
        }
    }

    /// Writes the cursor if it moved, then deletes the segments it has passed.
    fn persist(&mut self) {
        // Without a durable cursor nothing may be deleted; the next attempt comes with
        // the next acknowledgement or fill.
        if self.ledger.save_cursor(self.cursor) {
            self.delete_forwarded();
        }
    }

    /// Deletes the segments the durable cursor has passed.
    fn delete_forwarded(&mut self) {
        for segment in std::mem::take(&mut self.to_delete) {
            if let Err(error) = self.spool.remove_closed_segment(segment) {
                tracing::warn!(%error, "cannot remove a forwarded spool segment");
            }
        }
    }

    fn note_oldest(&self) {
        let oldest = self.window.iter().find_map(|s| match &s.item {
            Item::Record(record) => Some(record.received_at.timestamp_micros()),
            Item::SegmentEnd { .. } | Item::Skipped { .. } => None,
        });
        let awaiting = self.counters.awaiting_records.load(Ordering::Relaxed);
        match oldest {
            Some(t) => self.counters.oldest_micros.store(t, Ordering::Relaxed),
            // Nothing in flight: if records still wait (not read yet), keep the last
            // figure; it is at most as old as they are.
            None if awaiting <= 0 => self.counters.oldest_micros.store(0, Ordering::Relaxed),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_slots_round_trip_and_reject_damage() {
        let p = Position {
            segment: 7,
            offset: 123_456,
        };
        let buf = encode_cursor(p, 9);
        assert_eq!(decode_cursor(&buf), Some((p, 9)));
        for i in 0..buf.len() {
            let mut bad = buf;
            bad[i] ^= 0x40;
            assert_eq!(decode_cursor(&bad), None, "flipped byte {i}");
        }
    }

    /// The bound on redeliveries: the sent mark never moves while the cursor cannot be
    /// made durable (here its file is only readable), so after a crash the records
    /// between the cursor on disk and the mark are at most the one window sent after
    /// the last good cursor write. It also never moves back.
    #[test]
    fn the_sent_mark_waits_for_a_durable_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |offset| Position { segment: 0, offset };
        let mut ledger = Ledger::open(dir.path()).expect("open").0;
        assert_eq!(
            (ledger.saved, ledger.sent),
            (Position::default(), Position::default())
        );
        // First window: nothing acknowledged yet, records up to 100 sent.
        assert!(ledger.mark_sent(Position::default(), at(100)));
        // Acknowledged up to 100, the next window reaches 200.
        assert!(ledger.mark_sent(at(100), at(200)));
        let reopened = Ledger::open(dir.path()).expect("reopen").0;
        assert_eq!((reopened.saved, reopened.sent), (at(100), at(200)));

        // The cursor file can no longer be written: acknowledged up to 200, but the next
        // window must not be marked (nor sent).
        ledger.cursor_file.file = File::open(dir.path().join(CURSOR_FILE)).expect("read-only");
        assert!(!ledger.save_cursor(at(200)));
        assert!(!ledger.mark_sent(at(200), at(300)));
        let reopened = Ledger::open(dir.path()).expect("reopen").0;
        assert_eq!((reopened.saved, reopened.sent), (at(100), at(200)));

        // Writable again: the cursor goes to disk first, then the mark.
        ledger.cursor_file = CursorFile::open(dir.path()).expect("reopen cursor");
        assert!(ledger.mark_sent(at(200), at(300)));
        // A restart of the window from the cursor reads less far: the mark stays.
        assert!(ledger.mark_sent(at(200), at(250)));
        let reopened = Ledger::open(dir.path()).expect("reopen").0;
        assert_eq!((reopened.saved, reopened.sent), (at(200), at(300)));
    }

    #[test]
    fn the_newer_slot_wins_and_a_torn_one_falls_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut file = CursorFile::open(dir.path()).expect("open");
        assert_eq!(file.load(), (Position::default(), None));
        let a = Position {
            segment: 1,
            offset: 100,
        };
        let b = Position {
            segment: 2,
            offset: 8,
        };
        file.save(a).expect("save");
        file.save(b).expect("save");
        let reopened = CursorFile::open(dir.path()).expect("reopen");
        assert_eq!(reopened.load(), (b, None));
        // Tear the newer slot: the older one is still there.
        let slot = u64::from(reopened.counter % 2) * CURSOR_SLOT;
        reopened
            .file
            .write_all_at(&[0xff; 5], slot + 10)
            .expect("tear");
        // A torn slot is what the two slots are for: no reset to report.
        assert_eq!(
            CursorFile::open(dir.path()).expect("reopen").load(),
            (a, None)
        );
    }
}
