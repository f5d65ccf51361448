//! The writer thread and the files it owns: segment creation and rotation, group
//! commit (one `write` and one `fdatasync` per batch), the size and free-space limits
//! checked before a batch is written, the commit marks, and the health the sink
//! reports.
//!
//! The writer reaches the file system, and the clock, only through [`SpoolFs`], so
//! that `tests/sim_disk` can run this same code on a simulated disk that tears writes,
//! fails `fdatasync`, syncs slowly and crashes, under a simulated clock. Production uses [`StdFs`], a zero-sized type the compiler inlines away.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::format::{
    encode_commit_marks, encode_record, Position, TooLarge, COMMIT_MARK_AT, SEGMENT_HEADER_LEN,
};
use super::{io_error, SpoolError};
use crate::sink::record::SealedMessage;
use crate::sink::{Completion, PublishError};
use crate::smtp::envelope::MessageId;

pub const LOCK_FILE: &str = "LOCK";
pub const QUARANTINE_DIR: &str = "quarantine";
const SEGMENT_SUFFIX: &str = ".seg";
const SEGMENT_DIGITS: usize = 20;

/// A batch stops growing at whichever comes first; the bytes cap keeps one group commit
/// from holding many large messages (and their clients) hostage to one slow write.
const MAX_BATCH_MESSAGES: usize = 1024;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// After an unusually large batch, give the memory back rather than keep it for good.
const RETAINED_BUFFER_BYTES: usize = 4 * MAX_BATCH_BYTES;
/// How long the writer waits for the next batch before it syncs the commit marks of
/// the last one on their own; under load the next batch's `fdatasync` carries them.
const MARK_SYNC_DELAY: Duration = Duration::from_millis(100);

pub type Request = (SealedMessage, Completion);

/// The file operations the spool's durability rests on, as the writer uses them:
/// [`StdFs`] in production; a simulated disk in `tests/sim_disk`.
pub trait SpoolFs {
    type File;
    /// Creates `path`, which must not exist, for writing.
    fn create_new(&self, path: &Path) -> io::Result<Self::File>;
    fn write_all_at(&self, file: &Self::File, bytes: &[u8], offset: u64) -> io::Result<()>;
    fn sync_data(&self, file: &Self::File) -> io::Result<()>;
    fn sync_all(&self, file: &Self::File) -> io::Result<()>;
    fn set_len(&self, file: &Self::File, len: u64) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the creation and removal of the files in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Bytes available to the writer on the file system holding `dir`, if known.
    fn free_bytes(&self, dir: &Path) -> Option<u64>;
    /// Total bytes of the segment files in `dir`, if they can be listed.
    fn segment_bytes(&self, dir: &Path) -> Option<u64>;
    /// The time now. Read after the operations it follows (a batch's `fdatasync`
    /// above all, which can take longer than [`MARK_SYNC_DELAY`]), so that the marks'
    /// own sync, a segment's age and a failure episode count from when they ended.
    fn now(&self) -> Instant;
}

/// The real file system, through `std::fs`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdFs;

impl SpoolFs for StdFs {
    type File = File;

    #[inline]
    fn create_new(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().write(true).create_new(true).open(path)
    }

    #[inline]
    fn write_all_at(&self, file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(bytes, offset)
    }

    #[inline]
    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    #[inline]
    fn sync_all(&self, file: &File) -> io::Result<()> {
        file.sync_all()
    }

    #[inline]
    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }

    #[inline]
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    #[inline]
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir).and_then(|d| d.sync_all())
    }

    #[inline]
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    #[inline]
    fn free_bytes(&self, dir: &Path) -> Option<u64> {
        free_bytes(dir)
    }

    #[inline]
    fn segment_bytes(&self, dir: &Path) -> Option<u64> {
        measure(dir).ok().map(|(bytes, _)| bytes)
    }

    #[inline]
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// How soon a spool that started without room for a segment tries again, doubling up
/// to [`MAX_SEGMENT_RETRY`].
const FIRST_SEGMENT_RETRY: Duration = Duration::from_secs(1);
const MAX_SEGMENT_RETRY: Duration = Duration::from_secs(8);

/// Why the sink is not ready, as `/readyz` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// The last batch could not be written or synced; cleared by the next good batch.
    Failed(String),
    /// The last batch hit a limit with a record of this many bytes; ready again once
    /// such a record would fit, or after the next good batch.
    Full(u64),
}

/// What the writer thread and the sink's callers share.
pub struct WriterShared {
    pub dir: PathBuf,
    pub limits: DiskLimits,
    pub health: Mutex<Health>,
    /// The end of the last synced batch: everything before it is durable.
    pub durable: Mutex<Position>,
    pub durable_changed: Condvar,
    /// The segment the writer appends to; every lower-numbered one is closed.
    pub writing: AtomicU64,
    /// Corrupt ranges found since start-up, for `smtpgw_spool_corrupt_records_total`.
    pub corrupt: AtomicU64,
    /// Told after every durable batch (the Kafka fallback's forwarder waits on it).
    pub commits: Option<crossbeam_channel::Sender<super::SpoolCommit>>,
}

impl WriterShared {
    /// Everything before `position` is durable now.
    fn set_durable(&self, position: Position) {
        *self.durable.lock().unwrap_or_else(PoisonError::into_inner) = position;
    }

    fn set_health(&self, health: Health) {
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = health;
    }

    /// Why a message of `bytes` cannot be stored now, if a limit says so.
    pub fn over_limit(&self, bytes: u64) -> Option<String> {
        let limits = &self.limits;
        if let Some(max) = limits.max_bytes {
            let used = measure(&self.dir).map_or(0, |(bytes, _)| bytes);
            if used.saturating_add(bytes) > max {
                return Some(format!(
                    "spool full: {used} bytes stored, --spool-max-bytes {max}"
                ));
            }
        }
        if limits.min_free_bytes > 0 {
            if let Some(free) = free_bytes(&self.dir) {
                if free.saturating_sub(bytes) < limits.min_free_bytes {
                    return Some(format!(
                        "spool file system nearly full: {free} bytes free, \
                         --spool-min-free-bytes {}",
                        limits.min_free_bytes
                    ));
                }
            }
        }
        None
    }
}

/// Limits checked before each batch is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskLimits {
    pub max_bytes: Option<u64>,
    pub min_free_bytes: u64,
}

/// Bytes available to an unprivileged writer on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Total bytes and number of the segment files in `dir`.
pub fn measure(dir: &Path) -> Result<(u64, usize), SpoolError> {
    let segments = list_segments(dir)?;
    let mut bytes = 0;
    for (_, path) in &segments {
        match fs::metadata(path) {
            Ok(m) => bytes += m.len(),
            // Pruned between listing and looking.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("read segment", path)(e)),
        }
    }
    Ok((bytes, segments.len()))
}

/// The segment being appended to.
pub struct Segment<F = File> {
    file: F,
    path: PathBuf,
    seq: u64,
    /// Bytes known to be durable: everything up to the end of the last synced batch.
    len: u64,
    /// The commit marks name `len` but have not been synced yet.
    marks_dirty: bool,
}

impl<F> Segment<F> {
    /// Appends and syncs; on failure puts the file back the way it was, as far as the
    /// file system lets us, so that the failed batch never reads as messages.
    ///
    /// After the sync, the commit marks are rewritten to name the new end, without a
    /// sync of their own: the next batch's `fdatasync` (or [`Segment::sync_marks`] when
    /// none comes) makes them durable. The format module explains why this order.
    fn append<S: SpoolFs<File = F>>(&mut self, fs: &S, bytes: &[u8]) -> io::Result<()> {
        let result = fs
            .write_all_at(&self.file, bytes, self.len)
            .and_then(|()| fs.sync_data(&self.file));
        match result {
            Ok(()) => {
                self.len += bytes.len() as u64;
                self.marks_dirty = false;
                if let Err(error) = fs.write_all_at(
                    &self.file,
                    &encode_commit_marks(self.len),
                    COMMIT_MARK_AT[0],
                ) {
                    // The batch is durable all the same; only a damaged last record
                    // of it would be taken for a torn tail.
                    tracing::warn!(segment = %self.path.display(), %error, "cannot write the spool's commit mark");
                } else {
                    self.marks_dirty = true;
                }
                Ok(())
            }
            Err(e) => {
                if let Err(undo) = fs
                    .set_len(&self.file, self.len)
                    .and_then(|()| fs.sync_all(&self.file))
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

    fn is_empty(&self) -> bool {
        self.len <= SEGMENT_HEADER_LEN
    }

    /// Makes the commit marks durable when no batch's `fdatasync` will.
    fn sync_marks<S: SpoolFs<File = F>>(&mut self, fs: &S) {
        if !self.marks_dirty {
            return;
        }
        match fs.sync_data(&self.file) {
            Ok(()) => self.marks_dirty = false,
            Err(error) => {
                tracing::warn!(segment = %self.path.display(), %error, "cannot sync the spool's commit mark")
            }
        }
    }
}

pub struct Writer<S: SpoolFs = StdFs> {
    fs: S,
    shared: std::sync::Arc<WriterShared>,
    segment_size: u64,
    segment_age: Option<Duration>,
    /// When the segment being written got its first record.
    first_record_at: Option<Instant>,
    /// When the commit marks of the last batch are synced on their own if no batch
    /// comes first.
    marks_due: Option<Instant>,
    next_seq: u64,
    /// `None` after a failed write until a new segment could be created.
    segment: Option<Segment<S::File>>,
    /// Started without a segment (no room): when to try again without waiting for a
    /// batch, and the back-off after that. `None` once one exists.
    retry: Option<(Instant, Duration)>,
    rotate_due: bool,
    /// The encoded batch, reused from one batch to the next.
    buf: Vec<u8>,
    /// Each message with where its record ends in `buf`.
    batch: Vec<(MessageId, Completion, usize)>,
    failures: FailureEpisode,
}

/// How often, at most, a failure episode (a full disk, say) writes a line while it goes
/// on: every batch fails in one, and under load that is hundreds a second.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The write failures since the last success: the first is logged at once, then at most
/// one line per [`FAILURE_LOG_INTERVAL`] with how many there were in between, and one
/// when writes succeed again.
#[derive(Default)]
struct FailureEpisode {
    started: Option<Instant>,
    last_logged: Option<Instant>,
    /// Failed batches and their messages since the last line.
    unlogged_batches: u64,
    unlogged_messages: u64,
    /// Messages answered with a temporary failure in the whole episode.
    messages: u64,
}

impl FailureEpisode {
    /// Counts a failed batch of `messages`; returns the batches and messages not logged
    /// since the last line when this one is to be logged, `None` when it is only counted.
    fn failed(&mut self, now: Instant, messages: usize) -> Option<(u64, u64)> {
        self.started.get_or_insert(now);
        self.messages += messages as u64;
        let due = self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= FAILURE_LOG_INTERVAL);
        if !due {
            self.unlogged_batches += 1;
            self.unlogged_messages += messages as u64;
            return None;
        }
        self.last_logged = Some(now);
        Some((
            std::mem::take(&mut self.unlogged_batches),
            std::mem::take(&mut self.unlogged_messages),
        ))
    }

    /// Ends the episode, if there was one: how long it lasted and how many messages
    /// were answered with a temporary failure in it.
    fn ended(&mut self, now: Instant) -> Option<(Duration, u64)> {
        let episode = std::mem::take(self);
        episode
            .started
            .map(|started| (now.duration_since(started), episode.messages))
    }
}

impl<S: SpoolFs> Writer<S> {
    /// A writer appending to `segment`, or, without one (the file system was full at
    /// start, see `SpoolOptions::start_when_full`), one that starts segment `seq` as
    /// soon as there is room: at the next batch, or when its retry comes.
    pub fn new(
        fs: S,
        shared: std::sync::Arc<WriterShared>,
        segment_size: u64,
        segment_age: Option<Duration>,
        segment: Option<Segment<S::File>>,
        seq: u64,
    ) -> Writer<S> {
        let seq = segment.as_ref().map_or(seq, |s| s.seq);
        let now = fs.now();
        shared.writing.store(seq, Ordering::Release);
        shared.set_durable(Position {
            segment: seq,
            offset: segment.as_ref().map_or(0, |s| s.len),
        });
        Writer {
            fs,
            shared,
            segment_size: segment_size.max(1),
            segment_age,
            first_record_at: None,
            marks_due: None,
            next_seq: if segment.is_some() { seq + 1 } else { seq },
            retry: segment
                .is_none()
                .then(|| (now + FIRST_SEGMENT_RETRY, FIRST_SEGMENT_RETRY)),
            segment,
            rotate_due: false,
            buf: Vec::with_capacity(64 << 10),
            batch: Vec::with_capacity(64),
            failures: FailureEpisode::default(),
        }
    }

    fn retry_first_segment(&mut self) {
        match create_segment(&self.fs, &self.shared.dir, self.next_seq) {
            Ok(segment) => {
                tracing::info!(
                    segment = %segment.path.display(),
                    "spool: room for a segment again; writes can succeed"
                );
                self.shared.writing.store(segment.seq, Ordering::Release);
                self.shared.set_durable(Position {
                    segment: segment.seq,
                    offset: segment.len,
                });
                self.next_seq = segment.seq + 1;
                self.segment = Some(segment);
                self.retry = None;
                self.shared.set_health(Health::Ok);
            }
            // `create_segment` removed what it had made; the same name is tried again.
            Err(_) => {
                let now = self.fs.now();
                self.retry = self.retry.map(|(_, wait)| {
                    let wait = (wait * 2).min(MAX_SEGMENT_RETRY);
                    (now + wait, wait)
                });
            }
        }
    }

    /// The writer thread: the loop below with the real clock. Each batch is what
    /// queued up while the previous one was written and synced.
    pub fn run(mut self, rx: Receiver<Request>) {
        // `recv` fails only once every sender is gone and the queue is empty, so
        // everything submitted before shutdown is answered.
        loop {
            let first = if let Some(due) = self.next_deadline() {
                match rx.recv_deadline(due) {
                    Ok(request) => request,
                    Err(RecvTimeoutError::Timeout) => {
                        self.on_deadline();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                }
            };
            self.submit(first);
            while !self.batch_is_full() {
                match rx.try_recv() {
                    Ok(request) => self.submit(request),
                    Err(_) => break,
                }
            }
            self.commit();
        }
        self.finish();
    }

    /// When [`Writer::on_deadline`] is due if no batch comes first: the commit marks'
    /// own sync, the segment's age, the retry of a first segment.
    pub fn next_deadline(&self) -> Option<Instant> {
        let age_due = self
            .first_record_at
            .zip(self.segment_age)
            .map(|(first, age)| first + age);
        let retry_due = self.retry.map(|(at, _)| at);
        [self.marks_due, age_due, retry_due]
            .into_iter()
            .flatten()
            .min()
    }

    /// The batch being gathered has reached its message or byte cap: commit it.
    pub fn batch_is_full(&self) -> bool {
        self.batch.len() >= MAX_BATCH_MESSAGES || self.buf.len() >= MAX_BATCH_BYTES
    }

    /// At shutdown, after the last batch: the commit marks must not wait for a batch
    /// that will never come.
    pub fn finish(&mut self) {
        if let Some(segment) = self.segment.as_mut() {
            segment.sync_marks(&self.fs);
        }
    }

    /// Nothing came before a deadline: sync the commit marks, seal an old segment, try
    /// again to start the first segment (room may have come back: nothing else says so).
    pub fn on_deadline(&mut self) {
        let now = self.fs.now();
        if self.retry.is_some_and(|(at, _)| at <= now) {
            self.retry_first_segment();
        }
        if self.marks_due.is_some_and(|due| due <= now) {
            self.marks_due = None;
            if let Some(segment) = self.segment.as_mut() {
                segment.sync_marks(&self.fs);
            }
        }
        if self.age_reached(now) {
            self.seal("--spool-segment-age");
        }
    }

    fn age_reached(&self, now: Instant) -> bool {
        self.first_record_at
            .zip(self.segment_age)
            .is_some_and(|(first, age)| now >= first + age)
    }

    /// Closes the segment being written (if it holds records) and starts the next, so
    /// that `spool prune` and the tools can take it while the gateway runs.
    fn seal(&mut self, why: &'static str) {
        let Some(segment) = self.segment.as_ref() else {
            return;
        };
        if segment.is_empty() {
            return;
        }
        let (seq, len) = (segment.seq, segment.len);
        self.rotate_due = true;
        match self.ensure_segment() {
            None => tracing::info!(
                segment = seq,
                bytes = len,
                reason = why,
                "spool segment sealed"
            ),
            // The next batch tries again, and so does the age deadline, one age from
            // now rather than at once.
            Some(error) => {
                let now = self.fs.now();
                if let Some((batches, messages)) = self.failures.failed(now, 0) {
                    tracing::error!(
                        %error,
                        failed_batches_since_last_line = batches,
                        failed_messages_since_last_line = messages,
                        "cannot start a new spool segment; the full one stays open"
                    );
                }
                self.first_record_at = Some(now);
            }
        }
    }

    /// Adds a message to the batch being gathered; one the format or the limits can
    /// never take is answered at once.
    pub fn submit(&mut self, (msg, done): Request) {
        let start = self.buf.len();
        match encode_record(&mut self.buf, &msg) {
            // A record that could not fit even an empty spool would get 452 for ever.
            Ok(())
                if self.shared.limits.max_bytes.is_some_and(|max| {
                    (self.buf.len() - start) as u64 + SEGMENT_HEADER_LEN > max
                }) =>
            {
                self.buf.truncate(start);
                done.complete(Err(PublishError::TooLarge));
            }
            Ok(()) => self.batch.push((msg.id, done, self.buf.len())),
            Err(TooLarge) => done.complete(Err(PublishError::TooLarge)),
        }
    }

    /// Refuses, with `452 4.3.1`, the messages at the end of the batch that would
    /// take the spool past a limit. Returns whether any was refused.
    fn enforce_limits(&mut self) -> bool {
        let limits = self.shared.limits;
        if limits.max_bytes.is_none() && limits.min_free_bytes == 0 {
            return false;
        }
        // Measured per batch, not tracked: a prune or the Kafka forwarder may have
        // deleted segments since the last one.
        let mut allowed = u64::MAX;
        let mut why = String::new();
        if let Some(max) = limits.max_bytes {
            let used = self.fs.segment_bytes(&self.shared.dir).unwrap_or(0);
            let room = max.saturating_sub(used);
            if room < allowed {
                allowed = room;
                why = format!("spool at --spool-max-bytes {max} ({used} bytes stored)");
            }
        }
        if limits.min_free_bytes > 0 {
            // An unknown free space is not a reason to refuse mail.
            if let Some(free) = self.fs.free_bytes(&self.shared.dir) {
                let room = free.saturating_sub(limits.min_free_bytes);
                if room < allowed {
                    allowed = room;
                    why = format!(
                        "spool file system has {free} bytes free, --spool-min-free-bytes {}",
                        limits.min_free_bytes
                    );
                }
            }
        }
        let keep = self
            .batch
            .iter()
            .take_while(|(_, _, end)| *end as u64 <= allowed)
            .count();
        if keep == self.batch.len() {
            return false;
        }
        let refused = self.batch.len() - keep;
        let was_full = matches!(
            *self
                .shared
                .health
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            Health::Full(_)
        );
        // Once per episode, not once per batch: a full disk under load would flood the log.
        if !was_full {
            tracing::warn!(
                dir = %self.shared.dir.display(),
                messages = refused,
                reason = %why,
                "spool limit reached; answering 452 4.3.1 until there is room"
            );
        }
        let cut = keep.checked_sub(1).map_or(0, |i| self.batch[i].2);
        // Before the answers go out, so `/readyz` already says why when a client
        // has its 452.
        self.shared
            .set_health(Health::Full((self.batch[keep].2 - cut) as u64));
        for (_, done, _) in self.batch.drain(keep..) {
            done.complete(Err(PublishError::StorageFull));
        }
        self.buf.truncate(cut);
        true
    }

    /// Writes and syncs the batch gathered since the last commit, then answers it.
    pub fn commit(&mut self) {
        let refused = self.enforce_limits();
        let mut seal = refused.then_some("spool limit reached");
        if !self.batch.is_empty() {
            let not_started = self.ensure_segment();
            let result = match self.segment.as_mut() {
                Some(segment) => segment.append(&self.fs, &self.buf).map_err(|e| (e, true)),
                // Why no segment could be started (a full disk, say) is what `/readyz`
                // and the log must say, not only that none is open.
                None => Err((
                    not_started
                        .map_or_else(|| io::Error::other("no writable segment"), io::Error::other),
                    false,
                )),
            };
            // After the write and its `fdatasync`, however long they took.
            let now = self.fs.now();
            match result {
                Ok(()) => {
                    if !refused {
                        let mut health = self
                            .shared
                            .health
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        let episode = self.failures.ended(now);
                        if *health != Health::Ok || episode.is_some() {
                            let (lasted, failed) = episode.unwrap_or_default();
                            tracing::info!(
                                dir = %self.shared.dir.display(),
                                failed_messages = failed,
                                failing_ms = lasted.as_millis() as u64,
                                "spool writes succeed again"
                            );
                            *health = Health::Ok;
                        }
                    }
                    if let Some(segment) = self.segment.as_ref() {
                        self.shared.set_durable(Position {
                            segment: segment.seq,
                            offset: segment.len,
                        });
                        self.shared.durable_changed.notify_all();
                        if let Some(tx) = &self.shared.commits {
                            let _ = tx.send(super::SpoolCommit {
                                durable: Position {
                                    segment: segment.seq,
                                    offset: segment.len,
                                },
                                records: self.batch.len(),
                                bytes: self.buf.len() as u64,
                                first_id: self.batch.first().map(|(id, _, _)| *id),
                            });
                        }
                        if self.first_record_at.is_none() {
                            self.first_record_at = Some(now);
                        }
                        if segment.marks_dirty {
                            self.marks_due = Some(now + MARK_SYNC_DELAY);
                        }
                        if segment.len >= self.segment_size {
                            seal = Some("--spool-segment-size");
                        } else if self.age_reached(now) {
                            seal = Some("--spool-segment-age");
                        }
                    }
                    for (id, done, _) in self.batch.drain(..) {
                        done.complete(Ok(id));
                    }
                }
                Err((error, wrote)) => {
                    if let Some((batches, messages)) = self.failures.failed(now, self.batch.len()) {
                        tracing::error!(
                            dir = %self.shared.dir.display(),
                            error = %error,
                            messages = self.batch.len(),
                            failed_batches_since_last_line = batches,
                            failed_messages_since_last_line = messages,
                            "spool write failed; answering with a temporary failure until writes succeed"
                        );
                    }
                    self.shared
                        .set_health(Health::Failed(format!("spool write failed: {error}")));
                    // After a failed fsync the kernel may have dropped the dirty pages
                    // and report the next fsync as clean: never trust this file again.
                    // Cleaned up before the answers go out, so a client that got its
                    // 451 never sees the empty file.
                    if wrote {
                        if let Some(segment) = self.segment.take() {
                            discard_if_empty(&self.fs, &self.shared.dir, segment);
                        }
                    }
                    for (_, done, _) in self.batch.drain(..) {
                        done.complete(Err(PublishError::Temporary("spool write failed".into())));
                    }
                }
            }
        }
        // After the answers went out. A full spool frees space only by `spool prune`
        // (or the forwarder), which never takes the segment being written: seal it,
        // or 452 would last until a restart.
        if let Some(why) = seal {
            self.seal(why);
        }
        self.buf.clear();
        if self.buf.capacity() > RETAINED_BUFFER_BYTES {
            self.buf = Vec::with_capacity(MAX_BATCH_BYTES);
        }
    }

    /// Starts a new segment if the last write failed or the current one is full. A full
    /// segment that cannot be replaced is still good to append to, as long as no file
    /// with a higher number exists: readers and `prune` rely on the writer appending
    /// only to the highest-numbered segment. Returns why a new segment could not be
    /// started, if it could not.
    fn ensure_segment(&mut self) -> Option<SpoolError> {
        if self.segment.is_some() && !self.rotate_due {
            return None;
        }
        let seq = self.next_seq;
        // A failed attempt may leave its file behind; never try that name again.
        self.next_seq += 1;
        match create_segment(&self.fs, &self.shared.dir, seq) {
            Ok(segment) => {
                tracing::debug!(segment = %segment.path.display(), "new spool segment");
                if let Some(mut old) = self.segment.take() {
                    // Its last commit mark must not wait for a batch that goes elsewhere.
                    old.sync_marks(&self.fs);
                    discard_if_empty(&self.fs, &self.shared.dir, old);
                }
                self.shared.writing.store(seq, Ordering::Release);
                self.segment = Some(segment);
                // A batch started the first segment: no retry is due any more.
                self.retry = None;
                self.rotate_due = false;
                self.first_record_at = None;
                self.marks_due = None;
                None
            }
            // Logged by the caller, with the batch it cost, once per episode.
            Err(error) => {
                if self.fs.exists(&segment_path(&self.shared.dir, seq)) {
                    self.segment = None;
                }
                Some(error)
            }
        }
    }
}

/// Removes a segment that holds no record (only its magic), so that failed writes
/// leave no empty files behind.
fn discard_if_empty<S: SpoolFs>(fs: &S, dir: &Path, segment: Segment<S::File>) {
    if !segment.is_empty() {
        return;
    }
    let Segment { file, path, .. } = segment;
    drop(file);
    let removed = fs
        .remove_file(&path)
        .map_err(io_error("remove empty segment", &path))
        .and_then(|()| fs.sync_dir(dir).map_err(io_error("sync directory", dir)));
    if let Err(error) = removed {
        tracing::warn!(%error, "cannot remove an empty spool segment");
    }
}

pub fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync directory", dir))
}

/// Creates a directory so that its existence, like a segment's, survives a crash.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<(), SpoolError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io_error("create spool directory", dir))?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// Opens `path` for reading and writing, creating it empty if it does not exist and
/// keeping its contents if it does.
pub(crate) fn open_or_create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

pub(crate) fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = open_or_create(&path).map_err(io_error("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(SpoolError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_error("lock", &path)(e)),
    }
}

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!(
        "{seq:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_DIGITS
    ))
}

pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment files of `dir`, oldest first. Other files (the lock, an export's
/// temporary file, the quarantine directory) are not ours to judge and are skipped.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
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

/// Creates segment `seq` with its header (magic, commit marks naming the empty
/// segment), durably (file and directory synced); on failure nothing is left behind,
/// as far as the file system lets us. Records are written at explicit offsets (not
/// `O_APPEND`, under which Linux's `pwrite` ignores the offset the marks need).
pub fn create_segment<S: SpoolFs>(
    fs: &S,
    dir: &Path,
    seq: u64,
) -> Result<Segment<S::File>, SpoolError> {
    let path = segment_path(dir, seq);
    let file = fs
        .create_new(&path)
        .map_err(io_error("create segment", &path))?;
    let header = super::reader::fresh_header();
    let durable = fs
        .write_all_at(&file, &header, 0)
        .and_then(|()| fs.sync_all(&file))
        .map_err(io_error("write segment", &path))
        .and_then(|()| fs.sync_dir(dir).map_err(io_error("sync directory", dir)));
    if let Err(e) = durable {
        drop(file);
        if fs.remove_file(&path).is_ok() {
            let _ = fs.sync_dir(dir);
        }
        return Err(e);
    }
    Ok(Segment {
        file,
        path,
        seq,
        len: SEGMENT_HEADER_LEN,
        marks_dirty: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_episode_logs_its_first_failure_then_one_line_per_interval() {
        let mut episode = FailureEpisode::default();
        let t0 = Instant::now();
        assert_eq!(episode.ended(t0), None, "no episode, no recovery line");
        assert_eq!(episode.failed(t0, 5), Some((0, 0)));
        for i in 1..=10 {
            assert_eq!(episode.failed(t0 + Duration::from_secs(i), 2), None);
        }
        let later = t0 + FAILURE_LOG_INTERVAL;
        assert_eq!(episode.failed(later, 1), Some((10, 20)));
        assert_eq!(episode.failed(later, 1), None);
        assert_eq!(
            episode.ended(later + Duration::from_secs(1)),
            Some((FAILURE_LOG_INTERVAL + Duration::from_secs(1), 27))
        );
        assert_eq!(episode.failed(later, 3), Some((0, 0)), "a new episode");
    }
}
