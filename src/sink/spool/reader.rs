//! Reading a spool back: segment files read with positioned reads through one buffer,
//! frames checked (length, CRC-32C) before they are believed, and resynchronisation
//! past damaged bytes, so one bad record never hides the records after it.
//!
//! Readers take no lock: a live gateway may be appending to the newest segment. Each
//! segment's commit marks and then its length are taken when the reader opens it (in
//! that order, so the marks never name bytes past the length); bytes appended later
//! are left for the next reader.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{
    checksum_ok, decode_commit_marks, decode_payload, encode_commit_marks, frame_header, Origin,
    Position, SpoolRecord, COMMIT_MARK_AT, COMMIT_MARK_LEN, FRAME_HEADER_LEN, MIN_PAYLOAD_LEN,
    RESYNC_NEEDLE, RESYNC_NEEDLE_AT, SEGMENT_HEADER_LEN, SEGMENT_MAGIC, SEGMENT_MAGIC_V1,
};
use super::writer::list_segments;
use super::{io_error, SpoolError};

const READ_BUFFER_BYTES: usize = 256 << 10;
/// A buffer grown for one large record is given back once it is this much larger than
/// the normal read size.
const RETAINED_READ_BYTES: usize = 16 << 20;

/// Bytes of a segment that are not a valid record: damage, or (at the end of the
/// newest segment) a write a crash cut short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptRange {
    pub path: Arc<Path>,
    /// The segment's sequence number.
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    pub reason: &'static str,
}

impl std::fmt::Display for CorruptRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} offset {} length {}: {}",
            self.path.display(),
            self.offset,
            self.len,
            self.reason
        )
    }
}

impl CorruptRange {
    pub fn into_error(self) -> SpoolError {
        SpoolError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.offset,
            len: self.len,
            reason: self.reason,
        }
    }
}

/// What [`SpoolReader::next_event`] found next, in spool order.
#[derive(Debug)]
pub enum ReadEvent {
    Record(SpoolRecord),
    /// Bytes that are not a record; reading goes on after them.
    Corrupt(CorruptRange),
    /// Bytes at the end of the newest segment (as listed when the reader opened) that
    /// are not a record, are not followed by one, and lie past the segment's commit
    /// mark: a write still in progress, or one a crash cut short; never answered `250`.
    /// (In a format 1 segment, which has no commit mark, the disk damaging the last
    /// record looks the same.)
    TornTail(CorruptRange),
    /// The reader has passed the end of a segment. `closed` is true when a later
    /// segment existed when the reader was opened (and no `until` stopped inside this
    /// one): the gateway never writes to such a segment again, so every record it will
    /// ever hold has been read.
    SegmentEnd {
        segment: u64,
        closed: bool,
    },
}

/// One segment file, read with `pread` through a buffer that serves both sequential
/// reading and the resynchronisation scan.
pub(crate) struct SegmentFile {
    file: File,
    pub path: Arc<Path>,
    pub seq: u64,
    /// The length when opened (or the reader's limit, if smaller).
    pub len: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

pub(crate) enum FrameAt {
    /// A frame whose length and checksum hold; the payload length.
    Valid(u32),
    End,
    Bad(&'static str),
}

impl SegmentFile {
    /// `None` when the file is gone (a cleanup removed it after it was listed). Also
    /// returns the segment's header (up to [`SEGMENT_HEADER_LEN`] bytes), read before
    /// the length is taken.
    pub fn open(
        path: &Path,
        seq: u64,
        limit: Option<u64>,
    ) -> Result<Option<(Self, Vec<u8>)>, SpoolError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("open segment", path)(e)),
        };
        let mut header = vec![0u8; SEGMENT_HEADER_LEN as usize];
        let mut got = 0;
        while got < header.len() {
            match file.read_at(&mut header[got..], got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error("read segment", path)(e)),
            }
        }
        header.truncate(got);
        let len = file
            .metadata()
            .map_err(io_error("read segment", path))?
            .len();
        let len = limit.map_or(len, |l| l.min(len));
        Ok(Some((Self::from_file(file, path, seq, len), header)))
    }

    pub fn from_file(file: File, path: &Path, seq: u64, len: u64) -> Self {
        SegmentFile {
            file,
            path: Arc::from(path),
            seq,
            len,
            buf: Vec::new(),
            buf_start: 0,
        }
    }

    /// Up to `n` bytes at `off`; fewer only where the file ends (or shrank).
    pub fn read_at(&mut self, off: u64, n: usize) -> io::Result<&[u8]> {
        let buffered_end = self.buf_start + self.buf.len() as u64;
        if off >= self.buf_start && off + n as u64 <= buffered_end {
            let s = (off - self.buf_start) as usize;
            return Ok(&self.buf[s..s + n]);
        }
        let available = usize::try_from(self.len.saturating_sub(off)).unwrap_or(usize::MAX);
        let want = n.max(READ_BUFFER_BYTES).min(available);
        if self.buf.capacity() > RETAINED_READ_BYTES && want <= READ_BUFFER_BYTES {
            self.buf = Vec::new();
        }
        self.buf.resize(want, 0);
        let mut got = 0;
        while got < want {
            match self.file.read_at(&mut self.buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.clear();
                    return Err(e);
                }
            }
        }
        self.buf.truncate(got);
        self.buf_start = off;
        Ok(&self.buf[..got.min(n)])
    }

    /// Checks the frame at `off` without decoding it.
    pub fn frame_at(&mut self, off: u64) -> io::Result<FrameAt> {
        let remaining = self.len.saturating_sub(off);
        if remaining == 0 {
            return Ok(FrameAt::End);
        }
        if remaining < FRAME_HEADER_LEN as u64 {
            return Ok(FrameAt::Bad("short record header"));
        }
        let Ok(head) = <[u8; FRAME_HEADER_LEN]>::try_from(self.read_at(off, FRAME_HEADER_LEN)?)
        else {
            // The file shrank under us: a live writer undid a failed batch.
            return Ok(FrameAt::Bad("file ended early"));
        };
        let (payload_len, _) = frame_header(&head);
        if (payload_len as usize) < MIN_PAYLOAD_LEN {
            return Ok(FrameAt::Bad("record length too small"));
        }
        if u64::from(payload_len) > remaining - FRAME_HEADER_LEN as u64 {
            return Ok(FrameAt::Bad("record runs past the end of the file"));
        }
        let payload = self.read_at(off + FRAME_HEADER_LEN as u64, payload_len as usize)?;
        if payload.len() != payload_len as usize {
            return Ok(FrameAt::Bad("file ended early"));
        }
        if !checksum_ok(&head, payload) {
            return Ok(FrameAt::Bad("checksum mismatch"));
        }
        Ok(FrameAt::Valid(payload_len))
    }

    /// The offset of the first valid frame at or after `from`, if any: the fixed bytes
    /// every record carries are searched for (SIMD), and each candidate's length and
    /// checksum must hold.
    pub fn find_frame(&mut self, from: u64) -> io::Result<Option<u64>> {
        let finder = memchr::memmem::Finder::new(RESYNC_NEEDLE);
        let mut at = from + RESYNC_NEEDLE_AT as u64;
        while at + RESYNC_NEEDLE.len() as u64 <= self.len {
            let want = usize::try_from(self.len - at)
                .unwrap_or(usize::MAX)
                .min(READ_BUFFER_BYTES);
            let chunk = self.read_at(at, want)?;
            let got = chunk.len();
            let hits: Vec<u64> = finder.find_iter(chunk).map(|h| at + h as u64).collect();
            for hit in hits {
                let candidate = hit - RESYNC_NEEDLE_AT as u64;
                if let FrameAt::Valid(_) = self.frame_at(candidate)? {
                    return Ok(Some(candidate));
                }
            }
            if got < want || got < RESYNC_NEEDLE.len() {
                break;
            }
            // Overlap by the needle's length less one, so no match spans two chunks.
            at += (got - (RESYNC_NEEDLE.len() - 1)) as u64;
        }
        Ok(None)
    }
}

/// What one step through a segment found.
pub(crate) enum Step {
    Record(SpoolRecord),
    Corrupt(CorruptRange),
    Torn(CorruptRange),
    End,
}

/// Walks one segment's frames from a position.
pub(crate) struct SegmentCursor {
    pub file: SegmentFile,
    pub pos: u64,
    /// Bad bytes with nothing valid after them are a torn tail here (if they lie past
    /// `acked`), corruption anywhere else.
    pub newest: bool,
    /// The segment's commit mark: every byte before it was acknowledged, so bad bytes
    /// there are corruption, and bytes missing there (a shortened file) too. 0 when
    /// unknown (format 1, or both marks damaged).
    pub acked: u64,
}

impl SegmentCursor {
    fn range(&self, offset: u64, len: u64, reason: &'static str) -> CorruptRange {
        CorruptRange {
            path: Arc::clone(&self.file.path),
            segment: self.file.seq,
            offset,
            len,
            reason,
        }
    }

    /// Where to look for the next frame after a bad one at `pos`. Past the commit mark
    /// the bad frame is most likely a torn write whose header is whole: a valid frame
    /// inside the length it claims would be one a client put in its body, so the search
    /// starts after it. (Before the mark the bytes were acknowledged and the header
    /// itself may be what the disk damaged: every offset is a candidate.)
    fn resync_from(&mut self, pos: u64) -> io::Result<u64> {
        if self.acked == 0 || pos < self.acked {
            return Ok(pos + 1);
        }
        let claimed =
            match <[u8; FRAME_HEADER_LEN]>::try_from(self.file.read_at(pos, FRAME_HEADER_LEN)?) {
                Ok(head) => frame_header(&head).0,
                Err(_) => return Ok(pos + 1),
            };
        if (claimed as usize) < MIN_PAYLOAD_LEN {
            return Ok(pos + 1);
        }
        Ok(pos + FRAME_HEADER_LEN as u64 + u64::from(claimed))
    }

    pub fn step(&mut self) -> io::Result<Step> {
        let pos = self.pos;
        match self.file.frame_at(pos)? {
            FrameAt::End if pos < self.acked => {
                self.pos = self.acked;
                Ok(Step::Corrupt(self.range(
                    pos,
                    self.acked - pos,
                    "acknowledged bytes missing: the file is shorter than its commit mark",
                )))
            }
            FrameAt::End => Ok(Step::End),
            FrameAt::Valid(payload_len) => {
                let frame_len = FRAME_HEADER_LEN as u64 + u64::from(payload_len);
                let payload = self
                    .file
                    .read_at(pos + FRAME_HEADER_LEN as u64, payload_len as usize)?
                    .to_vec();
                self.pos += frame_len;
                let origin = Origin {
                    segment: Arc::clone(&self.file.path),
                    seq: self.file.seq,
                    offset: pos,
                };
                Ok(match decode_payload(payload, origin) {
                    Ok(record) => Step::Record(record),
                    // The checksum holds, so the frame's bounds are right: skip just it.
                    Err(reason) => Step::Corrupt(self.range(pos, frame_len, reason)),
                })
            }
            FrameAt::Bad(reason) => {
                let from = self.resync_from(pos)?;
                match self.file.find_frame(from)? {
                    // The mark is the end of a batch, so a frame starts there: the search
                    // does not cross it (past it, it would skip to frames a torn write
                    // left in a body; see `resync_from`).
                    Some(next) if pos < self.acked && next > self.acked => {
                        self.pos = self.acked;
                        Ok(Step::Corrupt(self.range(pos, self.acked - pos, reason)))
                    }
                    Some(next) => {
                        self.pos = next;
                        Ok(Step::Corrupt(self.range(pos, next - pos, reason)))
                    }
                    // Up to the commit mark (even past the end of a shortened file) the bytes
                    // were acknowledged: corruption, whatever follows.
                    None if pos < self.acked => {
                        self.pos = self.acked;
                        Ok(Step::Corrupt(self.range(pos, self.acked - pos, reason)))
                    }
                    None => {
                        let len = self.file.len;
                        self.pos = len;
                        let range = self.range(pos, len - pos, reason);
                        Ok(if self.newest {
                            Step::Torn(range)
                        } else {
                            Step::Corrupt(range)
                        })
                    }
                }
            }
        }
    }
}

/// How a segment file begins.
pub(crate) enum Opened {
    /// Records follow from `cursor.pos`; `damaged` covers a bad magic that valid
    /// records follow, and a damaged commit mark.
    Cursor {
        cursor: SegmentCursor,
        damaged: Vec<CorruptRange>,
    },
    /// Empty, a prefix of the header in the newest segment (a crash while it was being
    /// created), or gone.
    Empty,
    /// Nothing in it is a record: a cut-short header in an older segment, or a file
    /// that is not a segment at all.
    Unreadable(CorruptRange),
}

pub(crate) fn open_segment(
    path: &Path,
    seq: u64,
    newest: bool,
    start: u64,
    limit: Option<u64>,
) -> Result<Opened, SpoolError> {
    let Some((mut file, head)) = SegmentFile::open(path, seq, limit)? else {
        return Ok(Opened::Empty);
    };
    let file_len = file.len;
    let range = |offset, len, reason| CorruptRange {
        path: Arc::from(path),
        segment: seq,
        offset,
        len,
        reason,
    };
    let fresh = fresh_header();
    let short = head.len() < SEGMENT_MAGIC.len()
        && (SEGMENT_MAGIC.starts_with(&head) || SEGMENT_MAGIC_V1.starts_with(&head));
    // A format 2 header is written and synced whole before any record: a prefix of it
    // is a creation a crash cut short.
    let short = short || (head.len() < fresh.len() && fresh.starts_with(&head));
    if short {
        return Ok(if newest || head.is_empty() {
            Opened::Empty
        } else {
            Opened::Unreadable(range(0, file_len, "segment header cut short"))
        });
    }
    let magic = head.get(..SEGMENT_MAGIC.len());
    let v1 = magic == Some(&SEGMENT_MAGIC_V1[..]);
    let mut damaged = Vec::new();
    let mut marks = decode_commit_marks(&head);
    if newest && marks.end.is_some() && marks.damaged.is_some() {
        // A live writer rewrites both copies with one `pwrite`, which a concurrent
        // read may see half done: look again before calling it damage. A mark read
        // now may name bytes written after the length was taken.
        let again = file
            .read_at(0, SEGMENT_HEADER_LEN as usize)
            .map_err(io_error("read segment", path))?;
        let reread = decode_commit_marks(again);
        if reread.damaged.is_none() {
            marks = reread;
            marks.end = marks.end.map(|end| end.min(file_len));
        }
    }
    let mut acked = marks.end.unwrap_or(0);
    #[cfg(feature = "testing")]
    if super::defects::on(&super::defects::IGNORE_COMMIT_MARKS) {
        acked = 0;
    }
    if let Some(limit) = limit {
        acked = acked.min(limit);
    }
    if !v1 {
        // Bytes the format keeps zero: damage there costs nothing but is still damage.
        let padding = [
            SEGMENT_MAGIC.len() as u64..COMMIT_MARK_AT[0],
            COMMIT_MARK_AT[0] + COMMIT_MARK_LEN as u64..COMMIT_MARK_AT[1],
            COMMIT_MARK_AT[1] + COMMIT_MARK_LEN as u64..SEGMENT_HEADER_LEN,
        ];
        for gap in padding {
            let bytes = head.get(gap.start as usize..gap.end as usize);
            if bytes.is_some_and(|b| b.iter().any(|&b| b != 0)) {
                damaged.push(range(
                    gap.start,
                    gap.end - gap.start,
                    "damaged segment header (bytes that must be zero are not)",
                ));
            }
        }
        match marks.damaged {
            Some(i) => damaged.push(range(
                COMMIT_MARK_AT[i],
                COMMIT_MARK_LEN as u64,
                "damaged commit mark (the other copy holds)",
            )),
            None if marks.end.is_none() => damaged.push(range(
                COMMIT_MARK_AT[0],
                COMMIT_MARK_AT[1] + COMMIT_MARK_LEN as u64 - COMMIT_MARK_AT[0],
                "both commit marks damaged: a damaged last record cannot be told from a torn tail",
            )),
            None => {}
        }
    }
    let data_start = if v1 {
        SEGMENT_MAGIC_V1.len() as u64
    } else {
        SEGMENT_HEADER_LEN
    };
    let pos = start.max(data_start).min(file.len.max(data_start));
    if magic == Some(&SEGMENT_MAGIC[..]) || v1 {
        // Damage to the marks is reported once, by a reader starting at the beginning.
        if start > data_start {
            damaged.clear();
        }
        return Ok(Opened::Cursor {
            cursor: SegmentCursor {
                file,
                pos,
                newest,
                acked,
            },
            damaged,
        });
    }
    match file
        .find_frame(SEGMENT_MAGIC.len() as u64)
        .map_err(io_error("read segment", path))?
    {
        Some(first) => {
            let reported = start < first;
            let mut ranges = vec![range(0, first, "bad segment magic")];
            // Inside the range just reported.
            damaged.retain(|r| r.offset >= first);
            ranges.append(&mut damaged);
            if !reported {
                ranges.clear();
            }
            Ok(Opened::Cursor {
                cursor: SegmentCursor {
                    file,
                    pos: pos.max(first),
                    newest,
                    acked,
                },
                damaged: ranges,
            })
        }
        None => Ok(Opened::Unreadable(range(
            0,
            file_len,
            "not a spool segment (bad magic, no records)",
        ))),
    }
}

/// The header a new format 2 segment starts with: magic, then commit marks naming the
/// empty segment.
pub(crate) fn fresh_header() -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..SEGMENT_MAGIC.len()].copy_from_slice(SEGMENT_MAGIC);
    let at = COMMIT_MARK_AT[0] as usize;
    let marks = encode_commit_marks(SEGMENT_HEADER_LEN);
    header[at..at + marks.len()].copy_from_slice(&marks);
    header
}

/// Reads the records of a spool in the order they were written, from the start or
/// from a [`Position`], reporting damaged bytes and carrying on after them. See the
/// parent module for the reader contract.
pub struct SpoolReader {
    segments: Vec<(u64, PathBuf)>,
    /// The highest segment number listed when the reader was opened: the only segment
    /// the gateway may still append to.
    highest: Option<u64>,
    next_segment: usize,
    current: Option<(SegmentCursor, bool)>,
    start: Option<Position>,
    until: Option<Position>,
    pending: VecDeque<ReadEvent>,
    torn_tail: Option<CorruptRange>,
    /// Stop the newest segment at its commit mark (see [`SpoolReader::acknowledged_only`]).
    acknowledged_only: bool,
    /// After an I/O error the iteration ends.
    failed: bool,
}

#[cfg(any(test, feature = "testing"))]
/// Opens the spool in `dir` for reading from its oldest record.
pub fn read_all(dir: &Path) -> Result<SpoolReader, SpoolError> {
    SpoolReader::open(dir)
}

impl SpoolReader {
    pub fn open(dir: &Path) -> Result<SpoolReader, SpoolError> {
        let segments = list_segments(dir)?;
        Ok(SpoolReader {
            highest: segments.last().map(|(seq, _)| *seq),
            segments,
            next_segment: 0,
            current: None,
            start: None,
            until: None,
            pending: VecDeque::new(),
            torn_tail: None,
            acknowledged_only: false,
            failed: false,
        })
    }

    /// Reads from `from` on: records of segment `from.segment` at or after
    /// `from.offset`, then every later segment. A position inside a record (never one
    /// a record handed out) resynchronises to the next valid frame and reports the
    /// bytes skipped as corruption.
    pub fn open_from(dir: &Path, from: Position) -> Result<SpoolReader, SpoolError> {
        let mut reader = Self::open(dir)?;
        reader.segments.retain(|(seq, _)| *seq >= from.segment);
        reader.start = Some(from);
        Ok(reader)
    }

    /// Reads nothing at or after `until` (e.g. the sink's durable end, so that a
    /// forwarder never sees a record that was written but not yet synced).
    pub fn until(mut self, until: Position) -> SpoolReader {
        self.segments.retain(|(seq, _)| *seq <= until.segment);
        self.until = Some(until);
        self
    }

    /// Reads the newest segment only up to its commit mark: records a running gateway
    /// has written but not yet answered are left for a later reader. Their batch may
    /// still fail, and the writer then cuts it off and writes other records there, so a
    /// cursor saved past them would point into the middle of a record. A segment
    /// without a usable mark (format 1, both copies damaged) is read to its end.
    pub fn acknowledged_only(mut self) -> SpoolReader {
        self.acknowledged_only = true;
        self
    }

    /// The torn tail of the newest segment, once the reader has passed it.
    pub fn torn_tail(&self) -> Option<&CorruptRange> {
        self.torn_tail.as_ref()
    }

    /// The next event; `None` at the end, and after an I/O error was returned.
    pub fn next_event(&mut self) -> Option<Result<ReadEvent, SpoolError>> {
        if let Some(event) = self.pending.pop_front() {
            return Some(Ok(event));
        }
        if self.failed {
            return None;
        }
        let result = self.advance();
        if let Some(Err(_)) = result {
            self.failed = true;
            self.current = None;
        }
        result
    }

    fn advance(&mut self) -> Option<Result<ReadEvent, SpoolError>> {
        loop {
            let Some((cursor, closed)) = self.current.as_mut() else {
                let (seq, path) = self.segments.get(self.next_segment)?.clone();
                self.next_segment += 1;
                let newest = self.highest == Some(seq);
                let start = match self.start {
                    Some(p) if p.segment == seq => p.offset,
                    _ => 0,
                };
                let limit = match self.until {
                    Some(u) if u.segment == seq => Some(u.offset),
                    _ => None,
                };
                // Read to its end only if no `until` stops inside it.
                let closed = self.highest.is_some_and(|h| seq < h) && limit.is_none();
                match open_segment(&path, seq, newest, start, limit) {
                    Ok(Opened::Cursor {
                        mut cursor,
                        damaged,
                    }) => {
                        if newest && self.acknowledged_only && cursor.acked > 0 {
                            cursor.file.len = cursor.file.len.min(cursor.acked);
                        }
                        self.current = Some((cursor, closed));
                        self.pending
                            .extend(damaged.into_iter().map(ReadEvent::Corrupt));
                        if let Some(event) = self.pending.pop_front() {
                            return Some(Ok(event));
                        }
                    }
                    Ok(Opened::Empty) => {
                        return Some(Ok(ReadEvent::SegmentEnd {
                            segment: seq,
                            closed,
                        }))
                    }
                    Ok(Opened::Unreadable(range)) => {
                        self.pending.push_back(ReadEvent::SegmentEnd {
                            segment: seq,
                            closed,
                        });
                        return Some(Ok(ReadEvent::Corrupt(range)));
                    }
                    Err(e) => return Some(Err(e)),
                }
                continue;
            };
            let step = match cursor.step() {
                Ok(step) => step,
                Err(e) => return Some(Err(io_error("read segment", &cursor.file.path)(e))),
            };
            return Some(Ok(match step {
                Step::Record(record) => ReadEvent::Record(record),
                Step::Corrupt(range) => ReadEvent::Corrupt(range),
                Step::Torn(range) => {
                    self.torn_tail = Some(range.clone());
                    ReadEvent::TornTail(range)
                }
                Step::End => {
                    let event = ReadEvent::SegmentEnd {
                        segment: cursor.file.seq,
                        closed: *closed,
                    };
                    self.current = None;
                    event
                }
            }));
        }
    }
}

/// Records in order; damaged bytes come as `Err(SpoolError::Corrupt)` items and the
/// iteration goes on after them. Any other error ends it. A torn tail of the newest
/// segment is not an item (see [`SpoolReader::torn_tail`]).
impl Iterator for SpoolReader {
    type Item = Result<SpoolRecord, SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            return match self.next_event()? {
                Ok(ReadEvent::Record(record)) => Some(Ok(record)),
                Ok(ReadEvent::Corrupt(range)) => Some(Err(range.into_error())),
                Ok(ReadEvent::TornTail(_) | ReadEvent::SegmentEnd { .. }) => continue,
                Err(e) => Some(Err(e)),
            };
        }
    }
}
