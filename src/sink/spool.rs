//! The embedded default sink: a durable local append-only log, and the reader that
//! `smtpgw spool` uses to get messages back out of it.
//!
//! A message is answered `Ok` only after its record has been written and `fdatasync`ed.
//! One writer thread does all the I/O and commits in groups: it takes whatever has
//! queued up while the previous `fdatasync` ran, writes it with one `write`, syncs once,
//! and then answers every message of the batch.
//!
//! # On-disk format (version 1)
//!
//! All integers are little-endian unless stated otherwise.
//!
//! A spool is a directory holding:
//!
//! - `LOCK`: empty; the running gateway holds an exclusive `flock` on it so that two
//!   gateways never write one spool. Readers do not take it.
//! - Segment files `NNNNNNNNNNNNNNNNNNNN.seg`: the sequence number in 20 zero-padded
//!   decimal digits. Numbers increase; reading the segments in ascending order gives the
//!   records in the order they were written. Every start of the gateway begins a new
//!   segment, and a segment is closed once it has passed the segment size (64 MiB by
//!   default; a segment can exceed it by at most one batch).
//!
//! A segment starts with the 8-byte magic `SMTPGWS1`, followed by records back to back:
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
//! `smtp.tls`.
//!
//! # Crashes
//!
//! A crash can leave the newest segment with a torn tail: a short record, an impossible
//! length or a CRC mismatch. None of those records was ever answered `Ok`, because a
//! batch is answered only after its `fdatasync`. On start-up the gateway truncates the
//! newest segment at its last valid record (and deletes it if a crash cut even its
//! magic short), then starts a new segment. A reader stops quietly at a torn tail of
//! the newest segment (a live gateway may be in the middle of writing it) but reports
//! any bad record in an older segment as corruption, naming the file and offset.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, Sender};
use ulid::Ulid;

use crate::sink::{Completion, PublishError, Sink};
use crate::smtp::envelope::{MessageId, SealedMessage};

/// The first bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"SMTPGWS1";
/// The payload version this code writes and reads.
pub const RECORD_VERSION: u8 = 1;
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

const LOCK_FILE: &str = "LOCK";
const SEGMENT_SUFFIX: &str = ".seg";
const SEGMENT_DIGITS: usize = 20;
const FRAME_HEADER_LEN: usize = 8;
/// version + id + received_at + body_offset + header_count.
const MIN_PAYLOAD_LEN: usize = 1 + 16 + 8 + 4 + 2;

/// A batch stops growing at whichever comes first; the bytes cap keeps one group commit
/// from holding many large messages (and their clients) hostage to one slow write.
const MAX_BATCH_MESSAGES: usize = 1024;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// After an unusually large batch, give the memory back rather than keep it for good.
const RETAINED_BUFFER_BYTES: usize = 4 * MAX_BATCH_BYTES;
const READ_BUFFER_BYTES: usize = 256 << 10;

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
    #[error("{} is not a spool segment (bad magic)", path.display())]
    BadMagic { path: PathBuf },
    #[error("corrupt spool record in {} at offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
    #[error("{id:?} is not a message id (expected a 26-character ULID); spool {}", dir.display())]
    BadId { id: String, dir: PathBuf },
    #[error("no message {id} in spool {}", dir.display())]
    NotFound { id: String, dir: PathBuf },
    #[error("cannot write output: {0}")]
    Output(io::Error),
    #[error("cannot start the spool writer thread: {0}")]
    Thread(io::Error),
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
    /// Told after every durable batch where the spool now ends (store-and-forward).
    pub commits: Option<Sender<SpoolCommit>>,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_size: DEFAULT_SEGMENT_SIZE,
            commits: None,
        }
    }
}

/// Sent after a batch is durable: `segment` (its sequence number) is the segment the
/// writer appends to, durable up to `len` bytes; every lower-numbered segment is
/// closed for good. `records` and `bytes` are what the batch added; `first_id` is its
/// first message's id (whose ULID time is about when that message arrived).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolCommit {
    pub segment: u64,
    pub len: u64,
    pub records: usize,
    pub bytes: u64,
    pub first_id: Option<MessageId>,
}

type Request = (SealedMessage, Completion);

/// The spool sink. See the module documentation for the format and the guarantees.
pub struct SpoolSink {
    dir: PathBuf,
    /// `None` once shut down. Submitters share the read side; `shutdown` takes the
    /// sender away under the write lock, so no submission can slip into the channel
    /// after the writer has seen it close and leave its completion unanswered.
    tx: RwLock<Option<Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Held for the sink's whole life: the `flock` goes with the file handle.
    _lock: File,
}

impl SpoolSink {
    /// Opens (creating it if needed) the spool in `dir`, repairs a torn tail left by a
    /// crash, and starts a new segment and the writer thread.
    pub fn open(dir: &Path) -> Result<SpoolSink, SpoolError> {
        Self::open_with(dir, SpoolOptions::default())
    }

    pub fn open_with(dir: &Path, options: SpoolOptions) -> Result<SpoolSink, SpoolError> {
        create_dir_durably(dir)?;
        let lock = lock_dir(dir)?;

        let segments = list_segments(dir)?;
        if let Some((_, newest)) = segments.last() {
            recover_segment(dir, newest)?;
        }
        let seq = segments.last().map_or(0, |(seq, _)| seq + 1);
        let segment = create_segment(dir, seq)?;
        tracing::info!(dir = %dir.display(), segment = %segment.path.display(), "spool open");

        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = Writer {
            dir: dir.to_path_buf(),
            segment_size: options.segment_size.max(1),
            next_seq: seq + 1,
            segment: Some(segment),
            rotate_due: false,
            buf: Vec::with_capacity(64 << 10),
            batch: Vec::with_capacity(64),
            commits: options.commits,
        };
        let handle = std::thread::Builder::new()
            .name("smtpgw-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(SpoolError::Thread)?;

        Ok(SpoolSink {
            dir: dir.to_path_buf(),
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
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
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!(dir = %self.dir.display(), "spool writer thread panicked");
            }
        }
    }

    fn name(&self) -> &'static str {
        "spool"
    }
}

impl Drop for SpoolSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The segment being appended to.
struct Segment {
    seq: u64,
    file: File,
    path: PathBuf,
    /// Bytes known to be durable: everything up to the end of the last synced batch.
    len: u64,
}

impl Segment {
    /// Appends and syncs; on failure puts the file back the way it was, as far as the
    /// file system lets us, so that the failed batch never reads as messages.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let result = self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(undo) = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_all())
                {
                    tracing::error!(
                        segment = %self.path.display(),
                        error = %undo,
                        "cannot truncate segment after a failed write; its tail may be torn"
                    );
                }
                Err(e)
            }
        }
    }
}

struct Writer {
    dir: PathBuf,
    segment_size: u64,
    next_seq: u64,
    /// `None` after a failed write until a new segment could be created.
    segment: Option<Segment>,
    rotate_due: bool,
    /// The encoded batch, reused from one batch to the next.
    buf: Vec<u8>,
    batch: Vec<(MessageId, Completion)>,
    commits: Option<Sender<SpoolCommit>>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Request>) {
        // `recv` fails only once every sender is gone and the queue is empty, so
        // everything submitted before shutdown is answered.
        while let Ok(first) = rx.recv() {
            self.encode(first);
            while self.batch.len() < MAX_BATCH_MESSAGES && self.buf.len() < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(request) => self.encode(request),
                    Err(_) => break,
                }
            }
            self.commit();
        }
    }

    fn encode(&mut self, (msg, done): Request) {
        match encode_record(&mut self.buf, &msg) {
            Ok(()) => self.batch.push((msg.id, done)),
            Err(TooLarge) => done.complete(Err(PublishError::TooLarge)),
        }
    }

    fn commit(&mut self) {
        if !self.batch.is_empty() {
            self.ensure_segment();
            let result = match self.segment.as_mut() {
                Some(segment) => segment.append(&self.buf).map_err(|e| (e, true)),
                None => Err((io::Error::other("no writable segment"), false)),
            };
            match result {
                Ok(()) => {
                    if let (Some(tx), Some(segment)) = (&self.commits, &self.segment) {
                        let _ = tx.send(SpoolCommit {
                            segment: segment.seq,
                            len: segment.len,
                            records: self.batch.len(),
                            bytes: self.buf.len() as u64,
                            first_id: self.batch.first().map(|(id, _)| *id),
                        });
                    }
                    for (id, done) in self.batch.drain(..) {
                        done.complete(Ok(id));
                    }
                    if self
                        .segment
                        .as_ref()
                        .is_some_and(|s| s.len >= self.segment_size)
                    {
                        self.rotate_due = true;
                    }
                }
                Err((error, wrote)) => {
                    tracing::error!(
                        dir = %self.dir.display(),
                        error = %error,
                        messages = self.batch.len(),
                        "spool write failed; answering the batch with a temporary failure"
                    );
                    for (_, done) in self.batch.drain(..) {
                        done.complete(Err(PublishError::Temporary("spool write failed".into())));
                    }
                    // After a failed fsync the kernel may have dropped the dirty pages
                    // and report the next fsync as clean: never trust this file again.
                    if wrote {
                        self.segment = None;
                    }
                }
            }
        }
        self.buf.clear();
        if self.buf.capacity() > RETAINED_BUFFER_BYTES {
            self.buf = Vec::with_capacity(MAX_BATCH_BYTES);
        }
    }

    /// Starts a new segment if the last write failed or the current one is full. A full
    /// segment that cannot be replaced is still good to append to.
    fn ensure_segment(&mut self) {
        if self.segment.is_some() && !self.rotate_due {
            return;
        }
        let seq = self.next_seq;
        // A failed attempt may leave its file behind; never try that name again.
        self.next_seq += 1;
        match create_segment(&self.dir, seq) {
            Ok(segment) => {
                tracing::debug!(segment = %segment.path.display(), "new spool segment");
                self.segment = Some(segment);
                self.rotate_due = false;
            }
            Err(error) => tracing::error!(%error, "cannot start a new spool segment"),
        }
    }
}

/// A message whose record would not fit the format's length fields.
#[derive(Debug, PartialEq, Eq)]
struct TooLarge;

/// Appends one framed record to `buf`; on failure `buf` is left as it was.
fn encode_record(buf: &mut Vec<u8>, msg: &SealedMessage) -> Result<(), TooLarge> {
    let start = buf.len();
    let result = encode_record_at(buf, start, msg);
    if result.is_err() {
        buf.truncate(start);
    }
    result
}

fn encode_record_at(buf: &mut Vec<u8>, start: usize, msg: &SealedMessage) -> Result<(), TooLarge> {
    buf.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    buf.push(RECORD_VERSION);
    buf.extend_from_slice(&msg.id.to_bytes());
    buf.extend_from_slice(&msg.received_at.timestamp_micros().to_le_bytes());
    let body_offset = u32::try_from(msg.body_offset).map_err(|_| TooLarge)?;
    buf.extend_from_slice(&body_offset.to_le_bytes());

    let count_at = buf.len();
    buf.extend_from_slice(&[0; 2]);
    let mut count: usize = 0;
    let mut fits = true;
    msg.for_each_header(|name, value| {
        match (u16::try_from(name.len()), u32::try_from(value.len())) {
            (Ok(name_len), Ok(value_len)) => {
                buf.extend_from_slice(&name_len.to_le_bytes());
                buf.extend_from_slice(name.as_bytes());
                buf.extend_from_slice(&value_len.to_le_bytes());
                buf.extend_from_slice(value);
            }
            _ => fits = false,
        }
        count += 1;
    });
    let count = u16::try_from(count).map_err(|_| TooLarge)?;
    if !fits {
        return Err(TooLarge);
    }
    buf[count_at..count_at + 2].copy_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&msg.value);

    let payload_len = buf.len() - start - FRAME_HEADER_LEN;
    let payload_len = u32::try_from(payload_len).map_err(|_| TooLarge)?;
    let len_bytes = payload_len.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), &buf[start + FRAME_HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&len_bytes);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))
}

/// Creates the spool directory so that its existence, like a segment's, survives a
/// crash before the first `250`.
fn create_dir_durably(dir: &Path) -> Result<(), SpoolError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io_error("create spool directory", dir))?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(SpoolError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_error("lock", &path)(e)),
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!(
        "{seq:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_DIGITS
    ))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment files of `dir`, oldest first. Other files (the lock, an export's
/// temporary file) are not ours to judge and are skipped.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("read spool directory", dir))? {
        let entry = entry.map_err(io_error("read spool directory", dir))?;
        let name = entry.file_name();
        if let Some(seq) = name.to_str().and_then(parse_segment_name) {
            segments.push((seq, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(segments)
}

fn create_segment(dir: &Path, seq: u64) -> Result<Segment, SpoolError> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(io_error("create segment", &path))?;
    let durable = file
        .write_all(SEGMENT_MAGIC)
        .and_then(|()| file.sync_all())
        .map_err(io_error("write segment", &path))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = durable {
        drop(file);
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(Segment {
        seq,
        file,
        path,
        len: SEGMENT_MAGIC.len() as u64,
    })
}

/// How a segment begins.
enum SegmentStart {
    Magic,
    /// Empty, or a prefix of the magic: a crash while the segment was being created.
    Unfinished,
}

fn read_segment_start(
    file: &mut impl Read,
    len: u64,
    path: &Path,
) -> Result<SegmentStart, SpoolError> {
    let mut magic = [0u8; SEGMENT_MAGIC.len()];
    let have = len.min(magic.len() as u64) as usize;
    file.read_exact(&mut magic[..have])
        .map_err(io_error("read segment", path))?;
    if have == magic.len() && magic == *SEGMENT_MAGIC {
        Ok(SegmentStart::Magic)
    } else if have < magic.len() && SEGMENT_MAGIC.starts_with(&magic[..have]) {
        Ok(SegmentStart::Unfinished)
    } else {
        Err(SpoolError::BadMagic {
            path: path.to_path_buf(),
        })
    }
}

/// Cuts a torn tail off the newest segment, so that new segments never follow a bad
/// record and a reader can treat one in an older segment as corruption.
fn recover_segment(dir: &Path, path: &Path) -> Result<(), SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error("open segment", path))?;
    let len = file
        .metadata()
        .map_err(io_error("read segment", path))?
        .len();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, &file);
    if let SegmentStart::Unfinished = read_segment_start(&mut reader, len, path)? {
        drop(reader);
        drop(file);
        fs::remove_file(path).map_err(io_error("remove unfinished segment", path))?;
        sync_dir(dir)?;
        tracing::warn!(segment = %path.display(), bytes = len, "removed a segment whose creation a crash cut short");
        return Ok(());
    }

    let mut frames = FrameReader::new(reader, SEGMENT_MAGIC.len() as u64, len);
    let mut payload = Vec::new();
    let torn = loop {
        match frames
            .next(&mut payload)
            .map_err(io_error("read segment", path))?
        {
            Frame::Record { .. } => continue,
            Frame::End => break None,
            Frame::Torn { offset, reason } => break Some((offset, reason)),
        }
    };
    drop(frames);
    if let Some((valid_end, reason)) = torn {
        file.set_len(valid_end)
            .and_then(|()| file.sync_all())
            .map_err(io_error("truncate torn segment", path))?;
        tracing::warn!(
            segment = %path.display(),
            offset = valid_end,
            bytes_dropped = len - valid_end,
            reason,
            "truncated the torn tail a crash left in the spool"
        );
    }
    Ok(())
}

enum Frame {
    /// A record with a valid frame and checksum; its payload is in the caller's buffer.
    Record { offset: u64 },
    /// Clean end of the segment.
    End,
    /// The bytes from `offset` on are not a valid record.
    Torn { offset: u64, reason: &'static str },
}

/// Reads framed records from a segment whose length was `len` when it was opened;
/// bytes appended later are left for the next reader.
struct FrameReader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> FrameReader<R> {
    fn new(inner: R, pos: u64, len: u64) -> Self {
        FrameReader { inner, pos, len }
    }

    fn next(&mut self, payload: &mut Vec<u8>) -> io::Result<Frame> {
        let offset = self.pos;
        let remaining = self.len.saturating_sub(offset);
        let torn = |reason| Ok(Frame::Torn { offset, reason });
        if remaining == 0 {
            return Ok(Frame::End);
        }
        if remaining < FRAME_HEADER_LEN as u64 {
            return torn("short record header");
        }
        let mut head = [0u8; FRAME_HEADER_LEN];
        match self.inner.read_exact(&mut head) {
            Ok(()) => {}
            // The file shrank under us: a live writer undid a failed batch.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return torn("file ended early"),
            Err(e) => return Err(e),
        }
        let [l0, l1, l2, l3, c0, c1, c2, c3] = head;
        let payload_len = u32::from_le_bytes([l0, l1, l2, l3]);
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        if (payload_len as usize) < MIN_PAYLOAD_LEN {
            return torn("record length too small");
        }
        if u64::from(payload_len) > remaining - FRAME_HEADER_LEN as u64 {
            return torn("record runs past the end of the file");
        }
        payload.clear();
        payload.reserve(payload_len as usize);
        (&mut self.inner)
            .take(u64::from(payload_len))
            .read_to_end(payload)?;
        if payload.len() != payload_len as usize {
            return torn("file ended early");
        }
        let actual = crc32c::crc32c_append(crc32c::crc32c(&head[..4]), payload);
        if actual != crc {
            return torn("checksum mismatch");
        }
        self.pos += FRAME_HEADER_LEN as u64 + u64::from(payload_len);
        Ok(Frame::Record { offset })
    }
}

/// One message read back from the spool.
#[derive(Clone, Debug)]
pub struct SpoolRecord {
    pub id: Ulid,
    pub received_at: DateTime<Utc>,
    /// The record headers in stored order; `smtp.rcpt_to` repeats once per recipient.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The segment file and the offset of the record's frame in it.
    pub segment: Arc<Path>,
    pub offset: u64,
    payload: Vec<u8>,
    value_start: usize,
    body_offset: usize,
}

impl SpoolRecord {
    /// The `Received:` line followed by the message: exactly `SealedMessage::value`.
    pub fn value(&self) -> &[u8] {
        &self.payload[self.value_start..]
    }

    /// The client's bytes, without the gateway's `Received:` line.
    pub fn body(&self) -> &[u8] {
        &self.value()[self.body_offset..]
    }

    pub fn body_offset(&self) -> usize {
        self.body_offset
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every header with this name, in stored order (e.g. all `smtp.rcpt_to`).
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The envelope sender; empty for the null reverse path `<>`.
    pub fn mail_from(&self) -> &[u8] {
        self.header("smtp.mail_from").unwrap_or_default()
    }

    pub fn rcpt_count(&self) -> usize {
        self.headers_named("smtp.rcpt_to").count()
    }
}

/// Parses a payload whose checksum has been verified, so any failure here is a format
/// error, not a torn write.
fn decode_payload(
    payload: Vec<u8>,
    segment: Arc<Path>,
    offset: u64,
) -> Result<SpoolRecord, &'static str> {
    let mut c = PayloadCursor {
        buf: &payload,
        pos: 0,
    };
    if c.array::<1>()? != [RECORD_VERSION] {
        return Err("unknown record version");
    }
    let id = Ulid::from_bytes(c.array::<16>()?);
    let received_at = DateTime::from_timestamp_micros(i64::from_le_bytes(c.array::<8>()?))
        .ok_or("received_at out of range")?;
    let body_offset = u32::from_le_bytes(c.array::<4>()?) as usize;
    let header_count = u16::from_le_bytes(c.array::<2>()?);
    let mut headers = Vec::with_capacity(usize::from(header_count));
    for _ in 0..header_count {
        let name_len = u16::from_le_bytes(c.array::<2>()?);
        let name = c.take(usize::from(name_len))?;
        let name = std::str::from_utf8(name).map_err(|_| "header name is not UTF-8")?;
        let value_len = u32::from_le_bytes(c.array::<4>()?);
        let value = c.take(value_len as usize)?;
        headers.push((name.to_owned(), value.to_vec()));
    }
    let value_start = c.pos;
    if body_offset > payload.len() - value_start {
        return Err("body offset past the end of the value");
    }
    Ok(SpoolRecord {
        id,
        received_at,
        headers,
        segment,
        offset,
        payload,
        value_start,
        body_offset,
    })
}

struct PayloadCursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> PayloadCursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or("field runs past the end of the record")?;
        let field = &self.buf[self.pos..end];
        self.pos = end;
        Ok(field)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        self.take(N)?
            .try_into()
            .map_err(|_| "field runs past the end of the record")
    }
}

/// Reads every record of a spool, oldest first, without taking the lock: a live
/// gateway may be appending while it reads. Records written after a segment was opened
/// for reading are not seen.
pub struct SpoolReader {
    segments: Vec<PathBuf>,
    next_segment: usize,
    current: Option<OpenSegment>,
    /// After an error the iteration ends; a reader never skips over corruption.
    failed: bool,
}

struct OpenSegment {
    path: Arc<Path>,
    newest: bool,
    frames: FrameReader<BufReader<File>>,
}

/// Opens the spool in `dir` for reading.
pub fn read_all(dir: &Path) -> Result<SpoolReader, SpoolError> {
    SpoolReader::open(dir)
}

impl SpoolReader {
    pub fn open(dir: &Path) -> Result<SpoolReader, SpoolError> {
        let segments = list_segments(dir)?
            .into_iter()
            .map(|(_, path)| path)
            .collect();
        Ok(SpoolReader {
            segments,
            next_segment: 0,
            current: None,
            failed: false,
        })
    }

    /// Opens the next segment; `None` when there is none left.
    fn open_next(&mut self) -> Option<Result<Option<OpenSegment>, SpoolError>> {
        let path = self.segments.get(self.next_segment)?;
        self.next_segment += 1;
        let newest = self.next_segment == self.segments.len();
        Some(open_segment_for_read(path, newest))
    }

    fn next_record(&mut self) -> Option<Result<SpoolRecord, SpoolError>> {
        loop {
            let segment = match self.current.as_mut() {
                Some(segment) => segment,
                None => match self.open_next()? {
                    Ok(Some(segment)) => self.current.insert(segment),
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                },
            };
            let mut payload = Vec::new();
            let frame = match segment.frames.next(&mut payload) {
                Ok(frame) => frame,
                Err(e) => return Some(Err(io_error("read segment", &segment.path)(e))),
            };
            match frame {
                Frame::Record { offset } => {
                    let path = Arc::clone(&segment.path);
                    return Some(decode_payload(payload, path, offset).map_err(|reason| {
                        SpoolError::Corrupt {
                            path: segment.path.to_path_buf(),
                            offset,
                            reason,
                        }
                    }));
                }
                Frame::End => self.current = None,
                Frame::Torn { .. } if segment.newest => {
                    self.current = None;
                }
                Frame::Torn { offset, reason } => {
                    return Some(Err(SpoolError::Corrupt {
                        path: segment.path.to_path_buf(),
                        offset,
                        reason,
                    }))
                }
            }
        }
    }
}

/// `Ok(None)` for a segment that holds nothing yet.
fn open_segment_for_read(path: &Path, newest: bool) -> Result<Option<OpenSegment>, SpoolError> {
    let file = match File::open(path) {
        Ok(file) => file,
        // Removed between listing and opening: the gateway cleaned up an unfinished
        // segment at start-up. It held no messages.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("open segment", path)(e)),
    };
    let len = file
        .metadata()
        .map_err(io_error("read segment", path))?
        .len();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
    match read_segment_start(&mut reader, len, path)? {
        SegmentStart::Magic => Ok(Some(OpenSegment {
            path: Arc::from(path),
            newest,
            frames: FrameReader::new(reader, SEGMENT_MAGIC.len() as u64, len),
        })),
        SegmentStart::Unfinished if newest || len == 0 => Ok(None),
        SegmentStart::Unfinished => Err(SpoolError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "segment header cut short",
        }),
    }
}

impl Iterator for SpoolReader {
    type Item = Result<SpoolRecord, SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.next_record();
        if matches!(item, Some(Err(_)) | None) {
            self.failed = true;
            self.current = None;
        }
        item
    }
}

/// Reads the records of one segment from a given offset up to a given length, for the
/// store-and-forward thread, which knows how far the writer has made the file durable.
pub(crate) struct SegmentTail {
    path: Arc<Path>,
    frames: FrameReader<BufReader<File>>,
}

/// What [`SegmentTail::next`] found.
pub(crate) enum TailItem {
    /// A record and the offset just past it.
    Record(Box<SpoolRecord>, u64),
    /// Nothing more below the limit.
    End,
    /// A bad frame at `offset`: the rest of the segment is not readable from here.
    Bad { offset: u64, reason: &'static str },
}

impl SegmentTail {
    /// `Ok(None)` when the segment does not exist (removed or never created).
    pub(crate) fn open(path: &Path, offset: u64, limit: u64) -> Result<Option<Self>, SpoolError> {
        use std::io::{Seek, SeekFrom};
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("open segment", path)(e)),
        };
        let len = file
            .metadata()
            .map_err(io_error("read segment", path))?
            .len()
            .min(limit);
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let start = offset.max(SEGMENT_MAGIC.len() as u64);
        if offset < SEGMENT_MAGIC.len() as u64 {
            match read_segment_start(&mut reader, len, path)? {
                SegmentStart::Magic => {}
                SegmentStart::Unfinished => {
                    return Ok(Some(SegmentTail {
                        path: Arc::from(path),
                        frames: FrameReader::new(reader, start, start),
                    }))
                }
            }
        } else {
            reader
                .seek(SeekFrom::Start(start))
                .map_err(io_error("read segment", path))?;
        }
        Ok(Some(SegmentTail {
            path: Arc::from(path),
            frames: FrameReader::new(reader, start, len.max(start)),
        }))
    }

    pub(crate) fn next(&mut self) -> Result<TailItem, SpoolError> {
        let mut payload = Vec::new();
        let frame = self
            .frames
            .next(&mut payload)
            .map_err(io_error("read segment", &self.path))?;
        match frame {
            Frame::Record { offset } => {
                let end = self.frames.pos;
                match decode_payload(payload, Arc::clone(&self.path), offset) {
                    Ok(record) => Ok(TailItem::Record(Box::new(record), end)),
                    Err(reason) => Ok(TailItem::Bad { offset, reason }),
                }
            }
            Frame::End => Ok(TailItem::End),
            Frame::Torn { offset, reason } => Ok(TailItem::Bad { offset, reason }),
        }
    }
}

/// Removes a segment every record of which is elsewhere for good, durably.
pub(crate) fn remove_segment(dir: &Path, seq: u64) -> Result<(), SpoolError> {
    let path = segment_path(dir, seq);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove segment", &path)(e)),
    }
}

pub(crate) fn segment_file(dir: &Path, seq: u64) -> PathBuf {
    segment_path(dir, seq)
}

pub(crate) fn sync_spool_dir(dir: &Path) -> Result<(), SpoolError> {
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::envelope::{Envelope, Verb};
    use bytes::Bytes;
    use proptest::prelude::*;

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

    fn decode_frames(segment_body: &[u8]) -> Vec<SpoolRecord> {
        let mut frames = FrameReader::new(segment_body, 0, segment_body.len() as u64);
        let mut out = Vec::new();
        loop {
            let mut payload = Vec::new();
            match frames.next(&mut payload).unwrap() {
                Frame::Record { offset } => {
                    out.push(decode_payload(payload, Arc::from(Path::new("t")), offset).unwrap())
                }
                Frame::End => return out,
                Frame::Torn { offset, reason } => panic!("torn at {offset}: {reason}"),
            }
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
        assert_eq!(u16::from_le_bytes(p[29..31].try_into().unwrap()), 9);
        assert_eq!(u16::from_le_bytes(p[31..33].try_into().unwrap()), 7);
        assert_eq!(&p[33..40], b"smtp.id");
        assert!(p.ends_with(b"Received: x\r\nhi"));
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_payload(payload, Arc::from(Path::new("t")), 0);
        }

        #[test]
        fn arbitrary_segments_never_panic(segment in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut frames = FrameReader::new(&segment[..], 0, segment.len() as u64);
            let mut payload = Vec::new();
            for _ in 0..segment.len() + 1 {
                match frames.next(&mut payload) {
                    Ok(Frame::Record { offset }) => {
                        let _ = decode_payload(payload.clone(), Arc::from(Path::new("t")), offset);
                    }
                    Ok(_) | Err(_) => break,
                }
            }
        }
    }
}
