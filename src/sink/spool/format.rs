//! The on-disk encoding of one record: the frame (length + CRC-32C) and the payload
//! (version, id, time, headers, value), the segment header with its commit marks, and
//! the checks a reader makes before it believes a frame. The layout is documented in
//! the parent module.
//!
//! # Why the commit mark is where it is, and what it costs
//!
//! A CRC cannot tell a record a crash tore from an acknowledged record the disk
//! damaged: both are bad bytes at the end of the newest segment. The spool must know
//! what was acknowledged, and that knowledge must survive damage to the tail itself
//! (the last 4 KiB zeroed, the file shortened), so it cannot live only in the tail.
//! Hence the mark lives in the segment header and names the acknowledged end.
//!
//! The writer, per batch: `pwrite` the records at the end, `fdatasync`, answer the
//! batch, then `pwrite` the mark (the new end) into the header without a sync. The
//! next batch's `fdatasync` writes the dirty header page along with that batch's
//! records: no extra `fdatasync` per batch, one extra 40-byte `pwrite`. When no batch
//! follows within 100 ms, at rotation and at shutdown, the writer syncs the mark on
//! its own (an idle writer has time for it).
//!
//! - The mark never names bytes that were not synced: it is written only after the
//!   `fdatasync` of the bytes it names returned. So bad bytes past the mark are a
//!   batch that was never answered (a torn tail: quarantined and cut), and bad bytes
//!   before it were answered (corruption: kept, reported).
//! - The mark may lag: a power loss after a batch was answered and before the next
//!   `fdatasync` (or the idle sync) can leave the previous end on disk. Then that last
//!   batch is read as before (its records are valid and kept); only if the disk also
//!   damaged it in that window would its damage be taken for a torn tail (and still
//!   saved to `quarantine/`). A process crash loses nothing: the page cache keeps it.
//! - The mark is a frame boundary, and resynchronisation after a bad frame never
//!   crosses it; past it, the search starts after the length the bad frame claims.
//!   A client's body may hold a valid frame: a write torn inside such a record must
//!   not turn it into a message (`tests/sim_disk` found that it did). Inside
//!   acknowledged bytes the disk may have damaged the length itself, so every offset
//!   is still a candidate there, and damage to a record can still expose a frame its
//!   body holds. So can power loss and damage in one window: past a lagging mark the
//!   claimed length may be the damage and land in a later body. Frames a client
//!   cannot forge (a per-segment nonce under each frame's CRC) would close both.
//! - The mark is two copies with a CRC each, rewritten by one 40-byte `pwrite`
//!   inside one 512-byte sector: a single damaged byte leaves one copy good (and the
//!   damage is reported), a torn sector write leaves the old or the new copies.
//!   Damage to both copies loses the distinction for that segment: it is reported,
//!   and the segment is read with the format 1 rule.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use ulid::Ulid;

use crate::sink::record::{Record, SealedMessage};

/// The first bytes of every segment file this code writes (segment format 2).
pub const SEGMENT_MAGIC: &[u8; 8] = b"SMTPGWS2";
/// The first bytes of a format 1 segment (no commit marks), still read.
pub const SEGMENT_MAGIC_V1: &[u8; 8] = b"SMTPGWS1";
/// Where the first record of a format 2 segment starts: after the magic and the two
/// commit marks.
pub const SEGMENT_HEADER_LEN: u64 = 64;
/// Where the two copies of the commit mark sit in a format 2 segment, and their size.
pub const COMMIT_MARK_AT: [u64; 2] = [16, 40];
pub const COMMIT_MARK_LEN: usize = 16;
/// The bytes from the first mark's start to the second's end: what one `pwrite`
/// rewrites after each group commit.
pub const COMMIT_MARKS_SPAN: usize =
    (COMMIT_MARK_AT[1] - COMMIT_MARK_AT[0]) as usize + COMMIT_MARK_LEN;
const COMMIT_MARK_TAG: &[u8; 4] = b"CMIT";
/// The payload version this code writes and reads.
pub const RECORD_VERSION: u8 = 1;
pub(crate) const FRAME_HEADER_LEN: usize = 8;
/// version + id + received_at + body_offset + header_count.
pub(crate) const MIN_PAYLOAD_LEN: usize = 1 + 16 + 8 + 4 + 2;

/// Bytes every record this code writes carries at payload offset 31: the first
/// header's name length and name (`smtp.id`, 7 bytes) and its value's length (a ULID's
/// 26 characters). Resynchronisation after corruption looks for them, then checks the
/// frame's length and CRC, instead of computing a CRC at every byte offset.
pub(crate) const RESYNC_NEEDLE: &[u8] = b"\x07\x00smtp.id\x1a\x00\x00\x00";
/// Where [`RESYNC_NEEDLE`] sits relative to the start of its frame.
pub(crate) const RESYNC_NEEDLE_AT: usize = FRAME_HEADER_LEN + 1 + 16 + 8 + 4 + 2;

/// The two commit marks saying that every byte before `end` is durable and was
/// acknowledged, as the bytes from [`COMMIT_MARK_AT`]`[0]` on. One mark is `end` (u64),
/// CRC-32C of those 8 bytes (u32) and the tag `CMIT`.
pub fn encode_commit_marks(end: u64) -> [u8; COMMIT_MARKS_SPAN] {
    let mut mark = [0u8; COMMIT_MARK_LEN];
    mark[..8].copy_from_slice(&end.to_le_bytes());
    mark[8..12].copy_from_slice(&crc32c::crc32c(&end.to_le_bytes()).to_le_bytes());
    mark[12..].copy_from_slice(COMMIT_MARK_TAG);
    let mut span = [0u8; COMMIT_MARKS_SPAN];
    span[..COMMIT_MARK_LEN].copy_from_slice(&mark);
    span[COMMIT_MARKS_SPAN - COMMIT_MARK_LEN..].copy_from_slice(&mark);
    span
}

/// What the commit marks of a format 2 segment header (its first
/// [`SEGMENT_HEADER_LEN`] bytes, or fewer if the file is shorter) say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CommitMarks {
    /// The acknowledged end: the larger of the valid marks; `None` if neither holds.
    pub end: Option<u64>,
    /// Which mark (0 or 1) is damaged, if exactly one.
    pub damaged: Option<usize>,
}

pub(crate) fn decode_commit_marks(header: &[u8]) -> CommitMarks {
    let valid = COMMIT_MARK_AT.map(|at| {
        let at = at as usize;
        let mark = header.get(at..at + COMMIT_MARK_LEN)?;
        let end = u64::from_le_bytes(mark[..8].try_into().ok()?);
        let crc = u32::from_le_bytes(mark[8..12].try_into().ok()?);
        (crc == crc32c::crc32c(&mark[..8])
            && &mark[12..] == COMMIT_MARK_TAG
            && end >= SEGMENT_HEADER_LEN)
            .then_some(end)
    });
    let damaged = match valid {
        [Some(_), None] => Some(1),
        [None, Some(_)] => Some(0),
        _ => None,
    };
    CommitMarks {
        end: valid.into_iter().flatten().max(),
        damaged,
    }
}

/// Public only to the tests (`tests/sim_disk` frames the records it looks for), as the
/// writer and recovery modules are; the crate's API does not promise the encoder.
macro_rules! pub_for_tests {
    ($(#[$meta:meta])* $kind:ident $($rest:tt)*) => {
        $(#[$meta])*
        #[cfg(any(test, feature = "testing"))]
        pub $kind $($rest)*
        $(#[$meta])*
        #[cfg(not(any(test, feature = "testing")))]
        pub(crate) $kind $($rest)*
    };
}

pub_for_tests! {
    /// A message whose record would not fit the format's length fields.
    #[derive(Debug, PartialEq, Eq)]
    struct TooLarge;
}

pub_for_tests! {
    /// Appends one framed record to `buf`; on failure `buf` is left as it was.
    fn encode_record(buf: &mut Vec<u8>, msg: &SealedMessage) -> Result<(), TooLarge> {
        let start = buf.len();
        let result = encode_record_at(buf, start, msg);
        if result.is_err() {
            buf.truncate(start);
        }
        result
    }
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

/// The frame header's claim: payload length and checksum.
pub(crate) fn frame_header(head: &[u8; FRAME_HEADER_LEN]) -> (u32, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *head;
    (
        u32::from_le_bytes([l0, l1, l2, l3]),
        u32::from_le_bytes([c0, c1, c2, c3]),
    )
}

/// Whether `payload` is what the header's length and checksum describe.
pub(crate) fn checksum_ok(head: &[u8; FRAME_HEADER_LEN], payload: &[u8]) -> bool {
    let (_, crc) = frame_header(head);
    crc32c::crc32c_append(crc32c::crc32c(&head[..4]), payload) == crc
}

/// A position in a spool: a segment's sequence number and a byte offset in it. Frames
/// start at offsets of at least 8 (after the magic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// One message read back from the spool.
///
/// For Kafka, the record is exactly what a direct publish sends: key = `id` as its
/// 26-character string, value = [`SpoolRecord::value`], headers = `headers` in order
/// (repeated names kept), timestamp = `received_at` in milliseconds.
#[derive(Clone, Debug)]
pub struct SpoolRecord {
    pub id: Ulid,
    pub received_at: DateTime<Utc>,
    /// The record headers in stored order; `smtp.rcpt_to` repeats once per recipient.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The segment file and the offset of the record's frame in it.
    pub segment: Arc<Path>,
    pub offset: u64,
    /// The segment's sequence number (its file name).
    pub seq: u64,
    /// The frame's length on disk, header included.
    pub frame_len: u64,
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

    /// The Kafka key a direct publish uses: the id as its 26-character string.
    pub fn key(&self) -> String {
        self.id.to_string()
    }

    /// Where this record's frame starts.
    pub fn position(&self) -> Position {
        Position {
            segment: self.seq,
            offset: self.offset,
        }
    }

    /// Where the next record of the same segment would start: a cursor saved after
    /// this record was handled resumes here.
    pub fn next_position(&self) -> Position {
        Position {
            segment: self.seq,
            offset: self.offset + self.frame_len,
        }
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

/// Published as stored: the headers it was written with, whatever their version.
impl Record for SpoolRecord {
    fn id(&self) -> Ulid {
        self.id
    }

    fn received_at(&self) -> DateTime<Utc> {
        self.received_at
    }

    fn value(&self) -> &[u8] {
        SpoolRecord::value(self)
    }

    fn header_count(&self) -> usize {
        self.headers.len()
    }

    fn for_each_header(&self, mut f: impl FnMut(&str, &[u8])) {
        for (name, value) in &self.headers {
            f(name, value);
        }
    }

    fn mail_from(&self) -> &[u8] {
        SpoolRecord::mail_from(self)
    }

    fn first_rcpt(&self) -> &[u8] {
        self.header("smtp.rcpt_to").unwrap_or_default()
    }
}

/// Where a record was found, for [`decode_payload`].
pub(crate) struct Origin {
    pub segment: Arc<Path>,
    pub seq: u64,
    pub offset: u64,
}

/// Parses a payload whose checksum has been verified, so any failure here is a format
/// error, not a torn write.
pub(crate) fn decode_payload(payload: Vec<u8>, at: Origin) -> Result<SpoolRecord, &'static str> {
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
    let frame_len = (FRAME_HEADER_LEN + payload.len()) as u64;
    Ok(SpoolRecord {
        id,
        received_at,
        headers,
        segment: at.segment,
        offset: at.offset,
        seq: at.seq,
        frame_len,
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
