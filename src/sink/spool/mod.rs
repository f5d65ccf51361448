//! The embedded default sink: a durable local append-only log, the reader that
//! `smtpgw spool` and the Kafka fallback use to get messages back out of it, and
//! start-up recovery.
//!
//! - [`format`]: a record's frame and payload encoding, CRC-32C.
//! - [`writer`]: segments, group commit, limits, health.
//! - [`recovery`]: torn tail versus corruption at start-up.
//! - [`reader`]: reading in order from any position, skipping and reporting damage.
//!
//! A message is answered `Ok` only after its record has been written and `fdatasync`ed.
//! One writer thread does all the I/O and commits in groups: it takes whatever has
//! queued up while the previous `fdatasync` ran, writes it with one `write`, syncs once,
//! and then answers every message of the batch.
//!
//! # On-disk format (segment format 2)
//!
//! All integers are little-endian unless stated otherwise.
//!
//! A spool is a directory holding:
//!
//! - `LOCK`: empty; the running gateway holds an exclusive `flock` on it so that two
//!   gateways never write one spool. Readers and `spool prune` do not take it.
//! - Segment files `NNNNNNNNNNNNNNNNNNNN.seg`: the sequence number in 20 zero-padded
//!   decimal digits. Numbers increase; reading the segments in ascending order gives the
//!   records in the order they were written. Every start of the gateway begins a new
//!   segment, and the writer seals the one it writes (starts the next) once it has
//!   passed the segment size (64 MiB by default; it can exceed it by at most one
//!   batch), once its first record is older than the segment age (even when idle),
//!   and when a limit refused mail (so a prune can make room). The writer only ever
//!   appends to the highest-numbered segment: every other segment is closed for good.
//! - `TOMBSTONES`: the per-message hold/release/delete log (see [`tombstone`]); the
//!   segments are never rewritten for it.
//! - `quarantine/`: bytes recovery took out of a segment (a torn tail), kept for an
//!   operator to inspect; nothing reads them.
//!
//! A segment starts with a 64-byte header, followed by records back to back:
//!
//! ```text
//! offset  size  field
//! 0       8     magic         `SMTPGWS2`
//! 16      16    commit mark   end u64 | CRC-32C of the 8 end bytes u32 | `CMIT`
//! 40      16    commit mark   the same again (a second copy)
//!               (bytes 8..16, 32..40, 56..64 are zero)
//! ```
//!
//! The commit mark names the end of the last group commit that was `fdatasync`ed and
//! answered: every byte before `end` was acknowledged. It is rewritten in place after
//! each batch's sync and made durable by the next batch's (see [`format`] for why that
//! costs no `fdatasync` and still never names bytes that were not synced). Format 1
//! segments (magic `SMTPGWS1`, records from offset 8, no marks) are still read.
//!
//! Each record:
//!
//! ```text
//! offset  size  field
//! 0       4     payload_len   u32, length of payload in bytes
//! 4       4     crc           u32, CRC-32C (Castagnoli) of the 4 payload_len bytes
//!                             followed by the payload bytes
//! 8       n     payload
//! ```
//!
//! The payload:
//!
//! ```text
//! size  field
//! 1     version        u8, 1
//! 16    id             the message's ULID as a big-endian u128
//! 8     received_at    i64, Unix time in microseconds (UTC)
//! 4     body_offset    u32, where the client's bytes start within `value`
//! 2     header_count   u16
//!       header_count times:
//! 2       name_len     u16
//!         name         name_len bytes, UTF-8 (e.g. `smtp.rcpt_to`)
//! 4       value_len    u32
//!         value        value_len bytes
//! rest  value          the `Received:` trace line followed by the message exactly as
//!                      received (dot-unstuffed); runs to the end of the payload
//! ```
//!
//! The headers are exactly those of the Kafka record (`SealedMessage::for_each_header`),
//! in the same order: `smtp.id`, `smtp.verb`, `smtp.mail_from`, `smtp.rcpt_to` once per
//! recipient, `smtp.helo`, `smtp.client_addr`, `smtp.received_at`, `smtp.mail_params`,
//! `smtp.tls`, `smtp.schema`, `smtp.node`, `smtp.session`, `smtp.dsn_ret`,
//! `smtp.dsn_envid`, `smtp.rcpt_notify` and `smtp.rcpt_orcpt` once per recipient, and
//! `smtp.auth` (docs/record.md). So every record has the same 13 bytes at payload offset 31 (`07 00`
//! `smtp.id` `1a 00 00 00`): after damage, a reader resynchronises by searching for
//! them and accepting the first candidate whose length and CRC-32C hold (a false match
//! must also pass a 32-bit checksum).
//!
//! # Crashes and corruption
//!
//! A crash can leave the newest segment with a torn tail: a short record, an impossible
//! length or a CRC mismatch, with no valid record after it, past the commit mark. None
//! of those records was ever answered `Ok`, because a batch is answered only after its
//! `fdatasync` and the mark never names bytes before that. On start-up the gateway
//! copies such a tail to `quarantine/`, truncates the segment there (deleting it if a
//! crash cut even its header short), then starts a new segment.
//!
//! Bad bytes before the commit mark (the last acknowledged record included, and bytes
//! missing from a file shorter than its mark), bad bytes followed by a valid record, a
//! damaged copy of the mark, and bad bytes anywhere in an older segment are corruption:
//! nothing is cut or deleted, the range is logged at `error` (file, offset, length) and
//! counted in `smtpgw_spool_corrupt_records_total`, and readers report it and carry on
//! with the next valid record. (In a format 1 segment, which has no mark, a damaged
//! last record still looks like a torn tail.) A newest segment whose
//! magic is damaged and which holds no valid record at all is refused at start-up (it
//! may not be ours); move it aside to start. Older segments are verified by a
//! background thread after start-up, which logs what is damaged.
//!
//! # Reading, for tools and the Kafka fallback
//!
//! [`SpoolReader`] reads records in write order without taking the lock:
//!
//! - [`SpoolReader::open`] from the oldest record, [`SpoolReader::open_from`] from a
//!   [`Position`] (segment number, byte offset), and [`SpoolReader::until`] to stop at
//!   a position such as [`SpoolSink::durable_end`] (so a reader never sees a record
//!   that was written but not yet synced).
//! - [`SpoolReader::next_event`] yields [`ReadEvent`]s: `Record`, `Corrupt(range)` (the
//!   reader goes on after it), `TornTail(range)` (only at the end of the newest segment)
//!   and `SegmentEnd { segment, closed }`; `closed` means a later segment existed when
//!   the reader was opened, so the gateway will never add to it (a forwarder may delete
//!   it once everything in it is acknowledged, with
//!   [`SpoolSink::remove_closed_segment`], which refuses the open one and syncs the
//!   directory). In-process, [`SpoolSink::writing_segment`] names the one segment
//!   still open.
//! - As an `Iterator` it yields `Ok(record)` and `Err(SpoolError::Corrupt)` for damage,
//!   continuing after it; any other error ends the iteration.
//! - A [`SpoolRecord`] carries what a direct Kafka publish sends: key
//!   [`SpoolRecord::key`] (the id), [`SpoolRecord::value`], `headers` in order, and
//!   `received_at` (the record timestamp, in milliseconds). [`SpoolRecord::next_position`]
//!   is the cursor to save once the record is acknowledged.
//! - [`SpoolSink::wait_durable_beyond`] blocks (no polling) until the writer has
//!   synced past a position, or a timeout.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::Sender;

use crate::sink::record::SealedMessage;
use crate::sink::{Completion, PublishError, Sink, SpoolStats};

pub mod format;
pub mod reader;
// Open to `tests/sim_disk`, which runs them on a simulated disk.
#[cfg(feature = "testing")]
pub mod recovery;
#[cfg(not(feature = "testing"))]
mod recovery;
pub mod tombstone;
#[cfg(feature = "testing")]
pub mod writer;
#[cfg(not(feature = "testing"))]
pub(crate) mod writer;

pub use format::{Position, SpoolRecord};

/// Defects this project fixed in the spool, put back behind switches (all off unless a
/// test turns one on) so that `tests/sim_disk` can show it finds each.
#[cfg(feature = "testing")]
pub mod defects {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The first recovery (ef97575): the newest segment is cut at its first bad
    /// record, and the acknowledged records after a damaged one go with it.
    pub static TRUNCATE_AT_CORRUPTION: AtomicBool = AtomicBool::new(false);
    /// Before the commit marks (3fdba89): a damaged last record of the newest segment
    /// is taken for a torn tail and cut, though it was acknowledged.
    pub static IGNORE_COMMIT_MARKS: AtomicBool = AtomicBool::new(false);

    pub(crate) fn on(switch: &AtomicBool) -> bool {
        switch.load(Ordering::Relaxed)
    }
}
#[cfg(any(test, feature = "testing"))]
pub use format::{RECORD_VERSION, SEGMENT_MAGIC};
#[cfg(any(test, feature = "testing"))]
pub use reader::read_all;
pub use reader::{CorruptRange, ReadEvent, SpoolReader};
use writer::{DiskLimits, Health, Request, Writer, WriterShared};

pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// The OS error is part of each message rather than a chained `source`, so that a log
/// line (`%e`) and an error chain (`{e:#}`) both show it exactly once.
#[derive(thiserror::Error, Debug)]
pub enum SpoolError {
    #[error("cannot {op} {}: {error}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("spool directory {} is in use by another process (another smtpgw running on it?)", dir.display())]
    Locked { dir: PathBuf },
    #[error("{} is not a spool segment (bad magic, no valid record in it); move it out of the spool directory if it is not one", path.display())]
    BadMagic { path: PathBuf },
    #[error("corrupt spool data in {} at offset {offset}, length {len}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        len: u64,
        reason: &'static str,
    },
    #[error("{id:?} is not a message id (expected a 26-character ULID); spool {}", dir.display())]
    BadId { id: String, dir: PathBuf },
    #[error("no message {id} in spool {}", dir.display())]
    NotFound { id: String, dir: PathBuf },
    #[error("cannot write output: {0}")]
    Output(io::Error),
    #[error("{} exists; give --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("--before {0:?}: not a message id (ULID) or an RFC 3339 time")]
    BadCutoff(String),
    #[error("spool segment {seq} is still being written; only closed segments can be removed")]
    SegmentOpen { seq: u64 },
    #[error("cannot start the spool writer thread: {0}")]
    Thread(io::Error),
    #[error("message {id}: {why}")]
    State { id: String, why: String },
    #[error("cursor file {}: {why}; fix or remove it (removing it starts from the oldest message)", path.display())]
    BadCursor { path: PathBuf, why: String },
}

impl SpoolError {
    /// The file system (or the user's quota) is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, SpoolError::Io { error, .. }
            if matches!(error.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

pub(crate) fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl Fn(io::Error) -> SpoolError + Copy + 'a {
    move |error| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        error,
    }
}

/// Tuning for [`SpoolSink::open_with`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SpoolOptions {
    /// A segment is closed, and the next batch goes to a new one, once it has reached
    /// this many bytes.
    pub segment_size: u64,
    /// A segment holding records is closed once its first record is this old, even
    /// when no more mail comes (so `spool prune` can take it); `None`: never by age.
    pub segment_age: Option<Duration>,
    /// Messages that would take the segments' total size past this get `452 4.3.1`.
    pub max_bytes: Option<u64>,
    /// Messages that would leave less free space than this on the spool's file system
    /// get `452 4.3.1`; 0 turns the check off.
    pub min_free_bytes: u64,
    /// Told after every durable batch (the Kafka fallback's forwarder).
    pub commits: Option<Sender<SpoolCommit>>,
    /// When the file system has no room for a first segment, open anyway, unhealthy,
    /// and keep trying to start one (the Kafka fallback: Kafka alone can take mail);
    /// otherwise that is an error.
    pub start_when_full: bool,
}

/// Sent after a batch is durable: the spool's new durable end, and what the batch added
/// (`first_id`: its first message's id, whose ULID time is about when it arrived).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolCommit {
    pub durable: Position,
    pub records: usize,
    pub bytes: u64,
    pub first_id: Option<crate::smtp::envelope::MessageId>,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_size: DEFAULT_SEGMENT_SIZE,
            segment_age: None,
            max_bytes: None,
            min_free_bytes: 0,
            commits: None,
            start_when_full: false,
        }
    }
}

/// The spool sink. See the module documentation for the format and the guarantees.
pub struct SpoolSink {
    dir: PathBuf,
    /// `None` once shut down. Submitters share the read side; `shutdown` takes the
    /// sender away under the write lock, so no submission can slip into the channel
    /// after the writer has seen it close and leave its completion unanswered.
    tx: RwLock<Option<Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<WriterShared>,
    /// The oldest segment and its first record's time, so a scrape reads it once.
    oldest: Mutex<Option<(u64, DateTime<Utc>)>>,
    /// Held for the sink's whole life: the `flock` goes with the file handle.
    _lock: File,
}

impl SpoolSink {
    #[cfg(any(test, feature = "testing"))]
    /// Opens (creating it if needed) the spool in `dir`, repairs a torn tail left by a
    /// crash, and starts a new segment and the writer thread.
    pub fn open(dir: &Path) -> Result<SpoolSink, SpoolError> {
        Self::open_with(dir, SpoolOptions::default())
    }

    pub fn open_with(dir: &Path, options: SpoolOptions) -> Result<SpoolSink, SpoolError> {
        writer::create_dir_durably(dir)?;
        let lock = writer::lock_dir(dir)?;

        let segments = writer::list_segments(dir)?;
        let newest_corrupt = match segments.last() {
            Some((seq, newest)) => recovery::recover_newest(dir, *seq, newest)?,
            None => 0,
        };
        let seq = segments.last().map_or(0, |(seq, _)| seq + 1);
        let (segment, health) = match writer::create_segment(&writer::StdFs, dir, seq) {
            Ok(segment) => {
                tracing::info!(dir = %dir.display(), segment = seq, "spool open");
                (Some(segment), Health::Ok)
            }
            Err(error) if options.start_when_full && error.is_no_space() => {
                let why = format!("no space to start a spool segment: {error}");
                (None, Health::Failed(why))
            }
            Err(error) => return Err(error),
        };

        let shared = Arc::new(WriterShared {
            dir: dir.to_path_buf(),
            limits: DiskLimits {
                max_bytes: options.max_bytes,
                min_free_bytes: options.min_free_bytes,
            },
            health: Mutex::new(health),
            durable: Mutex::new(Position::default()),
            durable_changed: Condvar::new(),
            writing: AtomicU64::new(seq),
            corrupt: AtomicU64::new(newest_corrupt),
            commits: options.commits,
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = Writer::new(
            writer::StdFs,
            Arc::clone(&shared),
            options.segment_size,
            options.segment_age,
            segment,
            seq,
        );
        let handle = std::thread::Builder::new()
            .name("smtpgw-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(SpoolError::Thread)?;
        if seq > 1 || newest_corrupt > 0 {
            let verify_dir = dir.to_path_buf();
            let verified = Arc::clone(&shared);
            // Reading a large spool takes a while; mail is accepted meanwhile. The
            // newest segment before this start was read by recovery already.
            if let Err(error) = std::thread::Builder::new()
                .name("smtpgw-spool-verify".into())
                .spawn(move || {
                    let older = recovery::verify_older(&verify_dir, seq - 1, newest_corrupt);
                    verified.corrupt.fetch_add(older, Ordering::Relaxed);
                })
            {
                tracing::warn!(%error, "cannot start the spool verification thread");
            }
        }

        Ok(SpoolSink {
            dir: dir.to_path_buf(),
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            shared,
            oldest: Mutex::new(None),
            _lock: lock,
        })
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The end of the last synced batch: every record before it is durable.
    pub fn durable_end(&self) -> Position {
        *self
            .shared
            .durable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(any(test, feature = "testing"))]
    /// Blocks until the durable end is past `pos` or `timeout` has passed; returns the
    /// durable end.
    pub fn wait_durable_beyond(&self, pos: Position, timeout: Duration) -> Position {
        let guard = self
            .shared
            .durable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = self
            .shared
            .durable_changed
            .wait_timeout_while(guard, timeout, |end| *end <= pos)
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }

    /// The segment the writer appends to; every lower-numbered segment is closed.
    pub fn writing_segment(&self) -> u64 {
        self.shared.writing.load(Ordering::Acquire)
    }

    /// Deletes closed segment `seq` once everything in it has been handled (e.g.
    /// forwarded to Kafka), and syncs the directory. Refuses the segment being written
    /// (or a later one); `Ok(false)` if it was already gone.
    pub fn remove_closed_segment(&self, seq: u64) -> Result<bool, SpoolError> {
        if seq >= self.writing_segment() {
            return Err(SpoolError::SegmentOpen { seq });
        }
        let path = writer::segment_path(&self.dir, seq);
        match std::fs::remove_file(&path) {
            Ok(()) => writer::sync_dir(&self.dir).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("remove segment", &path)(e)),
        }
    }

    fn oldest_received_at(&self, oldest_seq: u64) -> Option<DateTime<Utc>> {
        let mut cache = self.oldest.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seq, at)) = *cache {
            if seq == oldest_seq {
                return Some(at);
            }
        }
        let mut reader = SpoolReader::open(&self.dir).ok()?;
        while let Some(event) = reader.next_event() {
            match event {
                Ok(ReadEvent::Record(record)) => {
                    *cache = Some((record.seq, record.received_at));
                    return Some(record.received_at);
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

impl Sink for SpoolSink {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        let tx = self.tx.read().unwrap_or_else(PoisonError::into_inner);
        let refused = match tx.as_ref() {
            Some(tx) => match tx.send((msg, done)) {
                Ok(()) => None,
                // Only if the writer thread is gone, which it never is while `tx` lives
                // unless it panicked; the client must still get an answer.
                Err(crossbeam_channel::SendError((_, done))) => Some(done),
            },
            None => Some(done),
        };
        if let Some(done) = refused {
            done.complete(Err(PublishError::Temporary("spool is shut down".into())));
        }
    }

    fn shutdown(&self) {
        let tx = self
            .tx
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Dropping the last sender lets the writer drain the queue and then stop.
        drop(tx);
        crate::sink::join_logged(
            &self.writer,
            &format!("spool writer ({})", self.dir.display()),
        );
    }

    fn name(&self) -> &'static str {
        "spool"
    }

    fn is_healthy(&self) -> bool {
        self.health().is_ok()
    }

    /// Unhealthy from a failed write or sync until the next good batch, and while a
    /// limit leaves no room for one more byte (checked live, so freeing space or
    /// pruning makes it ready again without a message having to fail first).
    fn health(&self) -> Result<(), Cow<'static, str>> {
        let state = self
            .shared
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let needed = match state {
            Health::Failed(why) => return Err(why.into()),
            Health::Full(needed) => needed.max(1),
            Health::Ok => 1,
        };
        match self.shared.over_limit(needed) {
            Some(why) => Err(why.into()),
            None => Ok(()),
        }
    }

    fn spool_stats(&self) -> Option<SpoolStats> {
        let segments = writer::list_segments(&self.dir).ok()?;
        let mut bytes = 0;
        for (_, path) in &segments {
            bytes += std::fs::metadata(path).map_or(0, |m| m.len());
        }
        let oldest_received_at = match segments.first() {
            Some((seq, _)) => self.oldest_received_at(*seq),
            None => None,
        };
        Some(SpoolStats {
            bytes,
            segments: segments.len() as u64,
            oldest_received_at,
            free_bytes: writer::free_bytes(&self.dir),
            corrupt_ranges: self.shared.corrupt.load(Ordering::Relaxed),
        })
    }
}

impl Drop for SpoolSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::format::{decode_payload, encode_record, Origin};
    use super::reader::{SegmentCursor, SegmentFile, Step};
    use super::*;
    use crate::smtp::envelope::{Envelope, Verb};
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::io::Write;
    use ulid::Ulid;

    fn sealed(rcpts: &[&str], body: &[u8]) -> SealedMessage {
        let mut envelope = Envelope::new(
            Verb::Soml,
            Arc::from("helo.example"),
            false,
            "[2001:db8::1]:25".parse().unwrap(),
            "from@example.com",
            "",
        );
        for rcpt in rcpts {
            envelope.push_rcpt(rcpt);
        }
        let mut value = b"Received: x\r\n".to_vec();
        value.extend_from_slice(body);
        SealedMessage {
            id: Ulid::new(),
            received_at: DateTime::from_timestamp_micros(1_795_428_779_123_456).unwrap(),
            envelope,
            value: Bytes::from(value),
            body_offset: 13,
        }
    }

    /// Walks `bytes` as a segment body (frames from offset 0) and collects what a
    /// reader sees.
    fn walk(bytes: &[u8], newest: bool) -> Vec<Result<SpoolRecord, (u64, u64, bool)>> {
        walk_acked(bytes, newest, 0)
    }

    /// [`walk`] with a commit mark at `acked`.
    fn walk_acked(
        bytes: &[u8],
        newest: bool,
        acked: u64,
    ) -> Vec<Result<SpoolRecord, (u64, u64, bool)>> {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(bytes).unwrap();
        let file = SegmentFile::from_file(tmp, Path::new("t"), 0, bytes.len() as u64);
        let mut cursor = SegmentCursor {
            file,
            pos: 0,
            newest,
            acked,
        };
        let mut out = Vec::new();
        loop {
            match cursor.step().unwrap() {
                Step::Record(r) => out.push(Ok(r)),
                Step::Corrupt(r) => out.push(Err((r.offset, r.len, false))),
                Step::Torn(r) => out.push(Err((r.offset, r.len, true))),
                Step::End => return out,
            }
        }
    }

    fn decode_frames(segment_body: &[u8]) -> Vec<SpoolRecord> {
        walk(segment_body, false)
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("bad frame {e:?}")))
            .collect()
    }

    fn origin() -> Origin {
        Origin {
            segment: Arc::from(Path::new("t")),
            seq: 0,
            offset: 0,
        }
    }

    #[test]
    fn encoding_appends_records_that_decode_back() {
        let messages = [
            sealed(&["a@x", "b@x", "a@x"], b"\0\xff\r\n.\r\nbinary"),
            sealed(&[], b""),
        ];
        let mut buf = b"leading bytes stay".to_vec();
        for msg in &messages {
            encode_record(&mut buf, msg).unwrap();
        }
        assert!(buf.starts_with(b"leading bytes stay"));
        let decoded = decode_frames(&buf[18..]);
        assert_eq!(decoded.len(), 2);
        for (record, msg) in decoded.iter().zip(&messages) {
            let mut headers = Vec::new();
            msg.for_each_header(|n, v| headers.push((n.to_owned(), v.to_vec())));
            assert_eq!(record.id, msg.id);
            assert_eq!(record.received_at, msg.received_at);
            assert_eq!(record.headers, headers);
            assert_eq!(record.value(), &msg.value[..]);
            assert_eq!(record.body(), msg.body());
        }
        assert_eq!(decoded[0].rcpt_count(), 3);
        assert_eq!(decoded[1].rcpt_count(), 0);
    }

    #[test]
    fn layout_matches_the_documented_format() {
        let msg = sealed(&["r@x"], b"hi");
        let mut buf = Vec::new();
        encode_record(&mut buf, &msg).unwrap();
        let payload_len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
        assert_eq!(payload_len, buf.len() - 8);
        let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
        let mut covered = buf[0..4].to_vec();
        covered.extend_from_slice(&buf[8..]);
        assert_eq!(crc, crc32c::crc32c(&covered));
        let p = &buf[8..];
        assert_eq!(p[0], 1);
        assert_eq!(u128::from_be_bytes(p[1..17].try_into().unwrap()), msg.id.0);
        assert_eq!(
            i64::from_le_bytes(p[17..25].try_into().unwrap()),
            1_795_428_779_123_456
        );
        assert_eq!(u32::from_le_bytes(p[25..29].try_into().unwrap()), 13);
        // Twelve headers of schema 1 with one recipient, then the four DSN ones and
        // `smtp.auth`.
        assert_eq!(u16::from_le_bytes(p[29..31].try_into().unwrap()), 17);
        assert_eq!(u16::from_le_bytes(p[31..33].try_into().unwrap()), 7);
        assert_eq!(&p[33..40], b"smtp.id");
        assert!(p.ends_with(b"Received: x\r\nhi"));
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_payload(payload, origin());
        }

        #[test]
        fn arbitrary_segments_never_panic(segment in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = walk(&segment, true);
            let _ = walk(&segment, false);
        }

        /// Any single flipped byte in the middle record of three costs exactly that
        /// record: the reader reports its bytes and finds the next one.
        #[test]
        fn one_flipped_byte_costs_one_record(at in 0usize..10_000, flip in 1u8..=255) {
            let msgs: Vec<_> = (0..3).map(|i| sealed(&["r@x"], format!("body {i}").as_bytes())).collect();
            let mut buf = Vec::new();
            let mut ends = Vec::new();
            for m in &msgs {
                encode_record(&mut buf, m).unwrap();
                ends.push(buf.len());
            }
            let (start, end) = (ends[0], ends[1]);
            let at = start + at % (end - start);
            buf[at] ^= flip;
            let got = walk(&buf, true);
            prop_assert_eq!(got.len(), 3);
            prop_assert_eq!(got[0].as_ref().map(|r| r.id).ok(), Some(msgs[0].id));
            prop_assert_eq!(got[1].as_ref().err(), Some(&(start as u64, (end - start) as u64, false)));
            prop_assert_eq!(got[2].as_ref().map(|r| r.id).ok(), Some(msgs[2].id));
        }
    }

    /// A record whose body holds a whole encoded record, and where that inner record
    /// ends in the outer one's encoding.
    fn record_holding_a_record() -> (Vec<u8>, SealedMessage, usize) {
        let inner = sealed(&["victim@x"], b"not a message anyone sent");
        let mut body = b"before ".to_vec();
        encode_record(&mut body, &inner).unwrap();
        let inner_end_in_body = body.len();
        body.extend_from_slice(b" after, and more bytes after that");
        let outer = sealed(&["r@x"], &body);
        let mut frame = Vec::new();
        encode_record(&mut frame, &outer).unwrap();
        let at = memchr::memmem::find(&frame, &body).unwrap() + inner_end_in_body;
        (frame, inner, at)
    }

    /// Found by tests/sim_disk: a write torn inside a record whose body holds a valid
    /// frame made that frame a message of its own (any envelope a client liked).
    #[test]
    fn a_frame_inside_a_torn_record_past_the_mark_is_not_a_record() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &sealed(&["r@x"], b"acknowledged")).unwrap();
        let mark = buf.len() as u64;
        let (outer, _, inner_end) = record_holding_a_record();
        buf.extend_from_slice(&outer[..inner_end + 3]);
        let len = buf.len() as u64;
        for newest in [true, false] {
            let got = walk_acked(&buf, newest, mark);
            assert_eq!(got.len(), 2, "{got:?}");
            assert!(got[0].is_ok());
            assert_eq!(got[1].as_ref().err(), Some(&(mark, len - mark, newest)));
        }
    }

    /// Found by tests/sim_disk: resynchronising after damage before the mark went on
    /// past it, into the body of a torn record.
    #[test]
    fn resynchronisation_does_not_cross_the_commit_mark() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &sealed(&["r@x"], b"acknowledged, then damaged")).unwrap();
        let mark = buf.len() as u64;
        buf[20] ^= 0xff;
        let (outer, _, inner_end) = record_holding_a_record();
        buf.extend_from_slice(&outer[..inner_end + 3]);
        let len = buf.len() as u64;
        let got = walk_acked(&buf, true, mark);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_ref().err(), Some(&(0, mark, false)));
        assert_eq!(got[1].as_ref().err(), Some(&(mark, len - mark, true)));
    }

    #[test]
    fn bad_bytes_with_nothing_after_are_torn_only_in_the_newest() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &sealed(&["r@x"], b"one")).unwrap();
        let first = buf.len() as u64;
        buf.extend_from_slice(b"garbage garbage");
        let len = buf.len() as u64;
        let newest = walk(&buf, true);
        assert_eq!(newest[1].as_ref().err(), Some(&(first, len - first, true)));
        let older = walk(&buf, false);
        assert_eq!(older[1].as_ref().err(), Some(&(first, len - first, false)));
    }
}
