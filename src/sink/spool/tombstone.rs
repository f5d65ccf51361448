//! Per-message control: the `TOMBSTONES` log that `smtpgw spool hold | release |
//! delete` append to, and the state of each message it implies, which `ls`, `export`,
//! `replay`, `prune` and the Kafka forwarder honour.
//!
//! # Why a log of its own
//!
//! Segments stay exactly as the writer left them: the running gateway's writer owns
//! the newest segment (it writes at offsets it keeps in memory and rewrites the
//! segment's commit marks), so another process appending there would race it, and a
//! closed segment is never written again (prune and recovery rely on that). A
//! tombstone is therefore a small record in a separate append-only file in the spool
//! directory; the segment format is unchanged (old segments read as before), and a
//! spool without the file simply has no tombstones.
//!
//! # Format
//!
//! `TOMBSTONES` starts with the 8-byte magic `SMTPGWT1`, followed by fixed-size
//! 48-byte records (integers little-endian):
//!
//! ```text
//! offset  size  field
//! 0       1     version   u8, 2 (record version 1 is a message in a segment)
//! 1       1     action    1 hold, 2 release, 3 delete, 4 forwarded
//! 2       1     flags     bit 0: the message had been handed to Kafka (forward cursor
//!                         or sent mark past it) when it was held
//! 3       1     zero
//! 4       16    id        the message's ULID, big-endian
//! 20      8     segment   u64, where the message's record is
//! 28      8     offset    u64
//! 36      8     at        i64, Unix time in microseconds when the action was taken
//! 44      4     crc       CRC-32C of bytes 0..44
//! ```
//!
//! Appends take an exclusive `flock` on the file, write one record with one `write`
//! (`O_APPEND`) and `fdatasync` before the command reports success. A fixed size makes
//! damage local: a record whose CRC, version or action is wrong is reported by `spool
//! check` (exit 1) and ignored by everything else (the message keeps the state the
//! other records give it); bytes after the last whole record are an append a crash
//! cut short (never reported as done): `spool check` notes them and the next append
//! cuts them off.
//!
//! # States
//!
//! Records apply in file order: `hold` makes a message held, `release` makes a held
//! message pending again, `delete` is final (it cannot be undone; the bytes stay in
//! the segment until `prune` removes the whole segment), and `forwarded` is written by
//! the forwarder when it has published a released message (so a restart does not
//! publish it again).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use ulid::Ulid;

use super::format::Position;
use super::reader::CorruptRange;
use super::{io_error, SpoolError};

/// The file in the spool directory.
pub const TOMBSTONE_FILE: &str = "TOMBSTONES";
const MAGIC: &[u8; 8] = b"SMTPGWT1";
const RECORD_LEN: usize = 48;
const VERSION: u8 = 2;
const FLAG_SENT: u8 = 1;
/// A tombstone log larger than this is refused (about 22 million actions).
const MAX_LEN: u64 = 1 << 30;

/// What an operator (or the forwarder) did to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Hold,
    Release,
    Delete,
    /// The forwarder published a released message.
    Forwarded,
}

impl Action {
    fn code(self) -> u8 {
        match self {
            Action::Hold => 1,
            Action::Release => 2,
            Action::Delete => 3,
            Action::Forwarded => 4,
        }
    }

    fn from_code(code: u8) -> Option<Action> {
        Some(match code {
            1 => Action::Hold,
            2 => Action::Release,
            3 => Action::Delete,
            4 => Action::Forwarded,
            _ => return None,
        })
    }
}

/// One record of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tombstone {
    pub action: Action,
    pub id: Ulid,
    /// Where the message's record is.
    pub position: Position,
    pub at: DateTime<Utc>,
    /// With `Hold`: the forwarder had already handed the message to Kafka.
    pub sent: bool,
}

fn encode(t: &Tombstone) -> [u8; RECORD_LEN] {
    let mut buf = [0u8; RECORD_LEN];
    buf[0] = VERSION;
    buf[1] = t.action.code();
    buf[2] = if t.sent { FLAG_SENT } else { 0 };
    buf[4..20].copy_from_slice(&t.id.to_bytes());
    buf[20..28].copy_from_slice(&t.position.segment.to_le_bytes());
    buf[28..36].copy_from_slice(&t.position.offset.to_le_bytes());
    buf[36..44].copy_from_slice(&t.at.timestamp_micros().to_le_bytes());
    let crc = crc32c::crc32c(&buf[..44]);
    buf[44..].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn decode(buf: &[u8]) -> Result<Tombstone, &'static str> {
    let field = |at: usize| -> [u8; 8] { buf[at..at + 8].try_into().unwrap_or_default() };
    if buf.len() != RECORD_LEN {
        return Err("short tombstone");
    }
    let crc = u32::from_le_bytes(buf[44..48].try_into().unwrap_or_default());
    if crc != crc32c::crc32c(&buf[..44]) {
        return Err("tombstone checksum mismatch");
    }
    if buf[0] != VERSION {
        return Err("unknown tombstone version");
    }
    if buf[2] & !FLAG_SENT != 0 || buf[3] != 0 {
        return Err("unknown tombstone flags");
    }
    let action = Action::from_code(buf[1]).ok_or("unknown tombstone action")?;
    let id = Ulid::from_bytes(buf[4..20].try_into().unwrap_or_default());
    let at = DateTime::from_timestamp_micros(i64::from_le_bytes(field(36)))
        .ok_or("tombstone time out of range")?;
    Ok(Tombstone {
        action,
        id,
        position: Position {
            segment: u64::from_le_bytes(field(20)),
            offset: u64::from_le_bytes(field(28)),
        },
        at,
        sent: buf[2] & FLAG_SENT != 0,
    })
}

/// What the log says about one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageState {
    pub held: bool,
    pub deleted: bool,
    /// Held once and released since.
    pub released: bool,
    /// Handed to Kafka before it was held (releasing it does not send it again).
    pub sent_before_hold: bool,
    /// The forwarder published it after a release.
    pub forwarded: bool,
    pub position: Position,
}

impl MessageState {
    /// Kept from forwarding, replay and export.
    pub fn skipped(&self) -> bool {
        self.held || self.deleted
    }

    /// A released message the forwarder passed while it was held and has not
    /// published since: it is sent out of order.
    pub fn awaits_forwarding(&self) -> bool {
        self.released && !self.deleted && !self.sent_before_hold && !self.forwarded
    }
}

/// The whole log, read.
#[derive(Debug, Default)]
pub struct Tombstones {
    pub states: HashMap<Ulid, MessageState>,
    /// Damaged records (and a damaged magic), reported by `spool check`.
    pub damaged: Vec<CorruptRange>,
    /// Bytes after the last whole record: an append a crash cut short.
    pub torn_tail: Option<CorruptRange>,
    /// Whole records read (damaged ones included).
    pub records: u64,
    /// The file's length when read; 0 when there is none.
    pub len: u64,
}

impl Tombstones {
    pub fn state(&self, id: &Ulid) -> Option<&MessageState> {
        self.states.get(id)
    }

    /// Whether forwarding, replay and export leave this message out.
    pub fn skips(&self, id: &Ulid) -> bool {
        self.state(id).is_some_and(MessageState::skipped)
    }

    fn apply(&mut self, t: Tombstone) {
        let state = self.states.entry(t.id).or_insert(MessageState {
            held: false,
            deleted: false,
            released: false,
            sent_before_hold: false,
            forwarded: false,
            position: t.position,
        });
        match t.action {
            Action::Hold => {
                if !state.held {
                    state.sent_before_hold = t.sent;
                }
                state.held = true;
                state.forwarded = false;
            }
            Action::Release => {
                if state.held {
                    state.held = false;
                    state.released = true;
                }
            }
            Action::Delete => state.deleted = true,
            Action::Forwarded => state.forwarded = true,
        }
    }
}

pub fn tombstone_path(dir: &Path) -> PathBuf {
    dir.join(TOMBSTONE_FILE)
}

/// Reads the log of the spool in `dir`; no file is an empty log. Damage is collected,
/// never an error: only a file that cannot be read at all is one.
pub fn read_tombstones(dir: &Path) -> Result<Tombstones, SpoolError> {
    let path = tombstone_path(dir);
    let bytes = match crate::files::read_regular_file(&path, MAX_LEN) {
        Ok(bytes) => bytes,
        Err(crate::files::FileError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Tombstones::default())
        }
        Err(e) => {
            return Err(SpoolError::Io {
                op: "read tombstones",
                path,
                error: io::Error::other(e.to_string()),
            })
        }
    };
    Ok(parse(&path, &bytes))
}

fn parse(path: &Path, bytes: &[u8]) -> Tombstones {
    let shared: Arc<Path> = Arc::from(path);
    let range = |offset: usize, len: usize, reason| CorruptRange {
        path: Arc::clone(&shared),
        segment: u64::MAX,
        offset: offset as u64,
        len: len as u64,
        reason,
    };
    let mut log = Tombstones {
        len: bytes.len() as u64,
        ..Tombstones::default()
    };
    if bytes.len() < MAGIC.len() {
        if !MAGIC.starts_with(bytes) {
            log.damaged
                .push(range(0, bytes.len(), "bad tombstone file magic"));
        } else if !bytes.is_empty() {
            log.torn_tail = Some(range(0, bytes.len(), "tombstone file header cut short"));
        }
        return log;
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        // The records are still fixed-size and checksummed: read them.
        log.damaged
            .push(range(0, MAGIC.len(), "bad tombstone file magic"));
    }
    let records = &bytes[MAGIC.len()..];
    let whole = records.len() / RECORD_LEN * RECORD_LEN;
    for (i, chunk) in records[..whole].chunks_exact(RECORD_LEN).enumerate() {
        log.records += 1;
        match decode(chunk) {
            Ok(t) => log.apply(t),
            Err(reason) => {
                log.damaged
                    .push(range(MAGIC.len() + i * RECORD_LEN, RECORD_LEN, reason))
            }
        }
    }
    if whole < records.len() {
        log.torn_tail = Some(range(
            MAGIC.len() + whole,
            records.len() - whole,
            "a tombstone append cut short (never reported as done)",
        ));
    }
    log
}

/// Appends one tombstone durably: exclusive `flock`, the magic if the file is new, a
/// partial record a crash left cut off, one `write`, `fdatasync`.
pub fn append_tombstone(dir: &Path, tombstone: &Tombstone) -> Result<(), SpoolError> {
    let path = tombstone_path(dir);
    let err = io_error("append to", &path);
    let existed = path.exists();
    // O_NONBLOCK: a FIFO put in its place must not block the open.
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(err)?;
    if !file.metadata().map_err(err)?.is_file() {
        return Err(err(io::Error::other("not a regular file")));
    }
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| err(io::Error::from(e)))?;
    let len = file.metadata().map_err(err)?.len();
    if len == 0 {
        (&file).write_all(MAGIC).map_err(err)?;
    } else if len > MAGIC.len() as u64 {
        let partial = (len - MAGIC.len() as u64) % RECORD_LEN as u64;
        if partial > 0 {
            tracing::warn!(file = %path.display(), bytes = partial, "cutting off a tombstone append a crash left unfinished");
            file.set_len(len - partial).map_err(err)?;
        }
    }
    (&file).write_all(&encode(tombstone)).map_err(err)?;
    file.sync_data().map_err(err)?;
    drop(file);
    if !existed {
        super::writer::sync_dir(dir)?;
    }
    Ok(())
}

/// Creates an empty log (just the magic) if there is none, so that the forwarder can
/// watch the file for appends.
pub fn ensure_tombstone_log(dir: &Path) -> Result<(), SpoolError> {
    let path = tombstone_path(dir);
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(mut file) => {
            // Under the lock an append takes, so a tool appending at the same moment
            // does not write its magic too.
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
                .map_err(|e| io_error("lock", &path)(io::Error::from(e)))?;
            if file.metadata().map_err(io_error("read", &path))?.len() == 0 {
                file.write_all(MAGIC)
                    .and_then(|()| file.sync_data())
                    .map_err(io_error("write", &path))?;
            }
            drop(file);
            super::writer::sync_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("create", &path)(e)),
    }
}

/// The log's length, to see cheaply whether it changed (0 when there is none).
pub fn tombstones_len(dir: &Path) -> u64 {
    // A `stat`, not an open: nothing put in the file's place can block it.
    std::fs::metadata(tombstone_path(dir)).map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stone(action: Action, id: Ulid) -> Tombstone {
        Tombstone {
            action,
            id,
            position: Position {
                segment: 3,
                offset: 64,
            },
            at: DateTime::from_timestamp_micros(1_795_428_779_123_456).unwrap_or_default(),
            sent: false,
        }
    }

    #[test]
    fn records_round_trip_and_every_flipped_byte_is_caught() {
        let t = stone(Action::Hold, Ulid::new());
        let buf = encode(&t);
        assert_eq!(decode(&buf), Ok(t));
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf;
                bad[i] ^= 1 << bit;
                assert!(decode(&bad).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    proptest::proptest! {
        /// Any bytes at all: parsing never panics, and every byte after the magic is
        /// a whole record (valid or reported) or the cut-short tail.
        #[test]
        fn any_bytes_parse_without_panic(
            mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            magic in proptest::bool::ANY,
        ) {
            if magic && bytes.len() >= MAGIC.len() {
                bytes[..MAGIC.len()].copy_from_slice(MAGIC);
            }
            let log = parse(Path::new("TOMBSTONES"), &bytes);
            if bytes.len() >= MAGIC.len() {
                let records = (bytes.len() - MAGIC.len()) / RECORD_LEN;
                proptest::prop_assert_eq!(log.records as usize, records);
                let tail = log.torn_tail.as_ref().map_or(0, |r| r.len as usize);
                proptest::prop_assert_eq!(MAGIC.len() + records * RECORD_LEN + tail, bytes.len());
            }
        }
    }

    #[test]
    fn states_follow_the_log_and_damage_is_local() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = (Ulid::new(), Ulid::new(), Ulid::new());
        for t in [
            stone(Action::Hold, a),
            stone(Action::Hold, b),
            stone(Action::Release, b),
            stone(Action::Delete, c),
        ] {
            append_tombstone(dir.path(), &t).expect("append");
        }
        let log = read_tombstones(dir.path()).expect("read");
        assert!(log.skips(&a) && !log.skips(&b) && log.skips(&c));
        assert!(log.state(&b).is_some_and(|s| s.awaits_forwarding()));
        assert!(log.damaged.is_empty() && log.torn_tail.is_none());

        // A flipped byte in b's hold: reported; b's release alone does nothing, so b is
        // not held and not released; a and c keep their state.
        let path = tombstone_path(dir.path());
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[MAGIC.len() + RECORD_LEN + 10] ^= 0x20;
        // And half a record at the end.
        bytes.extend_from_slice(&[2, 1, 0]);
        std::fs::write(&path, &bytes).expect("write");
        let log = read_tombstones(dir.path()).expect("read");
        assert_eq!(log.damaged.len(), 1);
        assert_eq!(log.damaged[0].offset, (MAGIC.len() + RECORD_LEN) as u64);
        assert!(log.torn_tail.is_some());
        assert!(log.skips(&a) && !log.skips(&b) && log.skips(&c));
        assert!(!log.state(&b).is_some_and(|s| s.awaits_forwarding()));

        // The next append cuts the partial record off.
        append_tombstone(dir.path(), &stone(Action::Release, a)).expect("append");
        let log = read_tombstones(dir.path()).expect("read");
        assert!(log.torn_tail.is_none() && !log.skips(&a));
        assert_eq!(log.records, 5);
    }
}
