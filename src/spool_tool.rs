//! The `smtpgw spool` subcommands: list, print, export (mbox or eml, optionally after
//! a cursor), check, prune, hold/release/delete (tombstones, see
//! [`crate::sink::spool::tombstone`]), stat a spool, and replay it to Kafka (the
//! `replay` module, through the Kafka sink's publish path). The forwarder's progress
//! comes from [`read_forward_progress`], which owns the cursor's layout.
//!
//! They read without taking the spool's lock, so they work next to a running gateway;
//! they see what was written before they opened each segment.
//!
//! # Damage
//!
//! Every corrupt range met is reported on the error stream as
//! `corrupt: FILE offset N length L: REASON`, and reading goes on after it; the caller
//! (`main`) exits non-zero when anything was skipped unless `--skip-corrupt` was given.
//! `export` (and `replay`) without `--skip-corrupt` stop at the first corrupt range
//! and write (publish) nothing. A torn tail of the newest segment (a write in progress
//! or one a crash cut short, never acknowledged) is mentioned as a note and is not
//! counted as corruption.
//!
//! # Client text on a terminal
//!
//! `ls` escapes control characters, line separators, invalid UTF-8 and bidirectional
//! overrides in what the client sent (`\xNN`, `\u{NNNN}`, see [`escape`]); `cat` escapes
//! the same characters (keeping line breaks and tabs, see [`escape_for_terminal`]) when
//! its output is a terminal and writes the bytes exactly otherwise.
//!
//! # Prune and a running gateway
//!
//! `prune` deletes only whole segments that are not the highest-numbered one, and only
//! when every record in them is older than the cut-off and none of their bytes is
//! damaged. It takes no lock: the gateway appends only to the highest-numbered segment
//! (a new one at every start and rotation), so every other segment is closed for good,
//! and start-up recovery touches only the highest-numbered segment as well.
//!
//! # mbox export (mboxrd)
//!
//! [`export_mbox`] writes, for each message in spool order:
//!
//! 1. a separator line `From SENDER DATE\n`, where SENDER is the envelope sender as
//!    received (`MAILER-DAEMON` for the null reverse path `<>`) and DATE is the time of
//!    receipt in UTC in `asctime` form, e.g. `Mon Nov 23 09:52:59 2026` (day of month
//!    padded with a space: `Mon Nov  3 ...`);
//! 2. the envelope as header lines the export adds, each ending in
//!    `(added by smtpgw spool export)` and then the line ending of the message's first
//!    line (CRLF or LF): `X-Envelope-From: <SENDER>` (`<>` for the null reverse path),
//!    then `X-Envelope-To: <RCPT>` once per recipient in the order given, so a Bcc
//!    recipient, which only the envelope holds, survives the export;
//! 3. the stored value (the `Received:` line followed by the message), with every line
//!    that matches `^>*From ` given one more leading `>`; a line is what follows the
//!    start of the value or a `\n`. All other bytes are written verbatim, CRLF included;
//! 4. `\n` if the value does not already end with `\n`;
//! 5. one empty line, `\n`.
//!
//! To invert: split at lines starting with `From ` (no message line can, after
//! quoting), drop the separator line and the leading lines that end with the export's
//! mark (step 2), drop the final `\n` of each message (step 5), and remove one `>` from
//! every line matching `^>+From `. This gives back the value exactly, except that a
//! value which did not end in `\n` gains one (step 4). Mail
//! received through DATA always ends in CRLF, so for it the round trip is exact.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use ulid::Ulid;

pub use crate::config::ExportFormat;
use crate::sink::forward::{read_forward_progress, ForwardProgress};
/// What the binary's spool commands use of the spool and of Kafka directly.
pub use crate::sink::kafka::KafkaOptions;
use crate::sink::spool::reader::{open_segment, Opened};
use crate::sink::spool::tombstone::{append_tombstone, Tombstone, Tombstones};
pub use crate::sink::spool::tombstone::{read_tombstones, Action};
use crate::sink::spool::writer::{list_segments, sync_dir};
use crate::sink::spool::{io_error, CorruptRange, Position, SpoolRecord};
pub use crate::sink::spool::{ReadEvent, SpoolError, SpoolReader};
use crate::smtp::address::{escaped, write_escaped, EscapeFor};

mod replay;
pub use replay::{replay_records, ReplayError};
#[cfg(any(test, feature = "testing"))]
pub use replay::{replay_spool, ReplayReport};

/// What a tool met that was not a record, reported on `err` as it was met.
pub struct Damage<'a> {
    err: &'a mut dyn Write,
    pub ranges: Vec<CorruptRange>,
    pub torn_tail: Option<CorruptRange>,
}

impl<'a> Damage<'a> {
    pub fn new(err: &'a mut dyn Write) -> Damage<'a> {
        Damage {
            err,
            ranges: Vec::new(),
            torn_tail: None,
        }
    }

    fn corrupt(&mut self, range: CorruptRange) {
        let _ = writeln!(self.err, "corrupt: {range}");
        self.ranges.push(range);
    }

    fn torn(&mut self, range: CorruptRange) {
        let _ = writeln!(
            self.err,
            "note: torn tail, not counted as corruption (a write in progress or cut short \
             by a crash, never acknowledged): {range}"
        );
        self.torn_tail = Some(range);
    }

    /// Bytes in corrupt ranges.
    pub fn corrupt_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// What to do with the next record.
enum Flow {
    Continue,
    Stop,
}

/// Walks the spool, reporting damage into `damage`; with `strict`, the first corrupt
/// range ends the walk as an error.
fn walk(
    reader: &mut SpoolReader,
    damage: &mut Damage,
    strict: bool,
    mut f: impl FnMut(SpoolRecord) -> Result<Flow, SpoolError>,
) -> Result<(), SpoolError> {
    while let Some(event) = reader.next_event() {
        match event? {
            ReadEvent::Record(record) => {
                if let Flow::Stop = f(record)? {
                    return Ok(());
                }
            }
            ReadEvent::Corrupt(range) => {
                damage.corrupt(range.clone());
                if strict {
                    return Err(range.into_error());
                }
            }
            ReadEvent::TornTail(range) => damage.torn(range),
            ReadEvent::SegmentEnd { .. } => {}
        }
    }
    Ok(())
}

/// Client text as one field of a tool's output line: printable UTF-8 as is; controls
/// (line breaks included), invalid bytes and bidirectional overrides escaped, and `\`
/// doubled so escapes are unambiguous.
pub fn escape(bytes: &[u8]) -> String {
    escaped(bytes, EscapeFor::TerminalField)
}

/// One line per message, oldest first:
/// `ID  RECEIVED_AT  BODY_BYTES  <MAIL_FROM>  N rcpt`. The id comes first so that
/// scripts can take the first field. Errors on the first corrupt range, after listing
/// everything; see [`ls_reporting`] to carry on.
pub fn ls(dir: &Path, out: &mut dyn Write) -> Result<(), SpoolError> {
    let mut sink = io::sink();
    let damage = ls_reporting(dir, out, &mut sink)?;
    match damage.ranges.into_iter().next() {
        Some(range) => Err(range.into_error()),
        None => Ok(()),
    }
}

/// What `spool ls` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LsOptions {
    /// `--long`: state, client and every recipient too.
    pub long: bool,
    /// `--pending`: only what the forwarder has not forwarded yet.
    pub pending: bool,
}

/// A message's state for `ls --long` and `stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MessageState {
    /// The forwarder (`--spool-fallback`) has not published it yet.
    Pending,
    /// Kafka acknowledged it (the forward cursor is past it).
    Forwarded,
    /// Kept from forwarding, replay and export (`spool hold`).
    Held,
    /// `spool delete`d: never forwarded, replayed or exported again.
    Deleted,
    /// In a spool without a forwarder (`--sink spool`): stored, nothing sends it.
    Stored,
}

impl MessageState {
    pub const ALL: [MessageState; 5] = [
        MessageState::Pending,
        MessageState::Forwarded,
        MessageState::Held,
        MessageState::Deleted,
        MessageState::Stored,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MessageState::Pending => "pending",
            MessageState::Forwarded => "forwarded",
            MessageState::Held => "held",
            MessageState::Deleted => "deleted",
            MessageState::Stored => "stored",
        }
    }
}

/// What the tools know about the spool beside its records: the tombstones and the
/// forwarder's progress.
pub struct SpoolView {
    pub tombstones: Tombstones,
    pub forward: Option<ForwardProgress>,
}

impl SpoolView {
    pub fn open(dir: &Path) -> Result<SpoolView, SpoolError> {
        Ok(SpoolView {
            tombstones: read_tombstones(dir)?,
            forward: read_forward_progress(dir)?,
        })
    }

    pub fn state(&self, record: &SpoolRecord) -> MessageState {
        let tomb = self.tombstones.state(&record.id);
        match tomb {
            Some(t) if t.deleted => return MessageState::Deleted,
            Some(t) if t.held => return MessageState::Held,
            _ => {}
        }
        let Some(forward) = self.forward else {
            return MessageState::Stored;
        };
        match tomb {
            Some(t) if t.forwarded || (t.released && t.sent_before_hold) => MessageState::Forwarded,
            Some(t) if t.awaits_forwarding() => MessageState::Pending,
            _ if forward.forwarded(record) => MessageState::Forwarded,
            _ => MessageState::Pending,
        }
    }
}

/// [`ls`], reporting damage on `err` and returning it instead of failing.
pub fn ls_reporting<'e>(
    dir: &Path,
    out: &mut dyn Write,
    err: &'e mut dyn Write,
) -> Result<Damage<'e>, SpoolError> {
    ls_with(dir, LsOptions::default(), out, err)
}

/// [`ls_reporting`] with `--long` / `--pending`. The long line is
/// `ID  RECEIVED_AT  BODY_BYTES  STATE  CLIENT  <MAIL_FROM>  <RCPT>,<RCPT>...`.
pub fn ls_with<'e>(
    dir: &Path,
    options: LsOptions,
    out: &mut dyn Write,
    err: &'e mut dyn Write,
) -> Result<Damage<'e>, SpoolError> {
    let mut out = BufWriter::new(out);
    let mut damage = Damage::new(err);
    let mut reader = SpoolReader::open(dir)?;
    let view = if options.long || options.pending {
        Some(SpoolView::open(dir)?)
    } else {
        None
    };
    if options.pending && view.as_ref().is_some_and(|v| v.forward.is_none()) {
        let _ = writeln!(
            damage.err,
            "note: no forwarder on this spool (no FORWARD cursor: not a --spool-fallback \
             spool), so nothing is pending; `spool ls --long` shows every message as stored"
        );
    }
    walk(&mut reader, &mut damage, false, |record| {
        let state = view.as_ref().map(|v| v.state(&record));
        if options.pending && state != Some(MessageState::Pending) {
            return Ok(Flow::Continue);
        }
        let received = record
            .received_at
            .to_rfc3339_opts(SecondsFormat::Micros, true);
        // Client text on a terminal: nothing in it may move the cursor, recolour the
        // screen or reorder what is shown.
        let line = match state.filter(|_| options.long) {
            Some(state) => {
                let rcpts: Vec<String> = record
                    .headers_named("smtp.rcpt_to")
                    .map(|r| format!("<{}>", escape(r)))
                    .collect();
                writeln!(
                    out,
                    "{}  {received}  {}  {}  {}  <{}>  {}",
                    record.id,
                    record.body().len(),
                    state.name(),
                    escape(record.header("smtp.client_addr").unwrap_or_default()),
                    escape(record.mail_from()),
                    rcpts.join(",")
                )
            }
            None => writeln!(
                out,
                "{}  {received}  {}  <{}>  {} rcpt",
                record.id,
                record.body().len(),
                escape(record.mail_from()),
                record.rcpt_count()
            ),
        };
        line.map_err(SpoolError::Output)?;
        Ok(Flow::Continue)
    })?;
    out.flush().map_err(SpoolError::Output)?;
    Ok(damage)
}

/// What `spool hold | release | delete` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Marked {
    /// A tombstone was appended.
    Done,
    /// The message was in that state already; nothing was written.
    Already,
}

/// Appends a hold, release or delete tombstone for message `id` (see
/// [`crate::sink::spool::tombstone`]). The message must be in the spool: an unknown
/// or malformed id is [`SpoolError::NotFound`] / [`SpoolError::BadId`] (the command
/// exits 2); releasing a message that is not held, or holding or releasing a deleted
/// one, is [`SpoolError::State`]. Safe next to a running gateway: the forwarder reads
/// the log before it reads more records.
pub fn mark(dir: &Path, id: &str, action: Action) -> Result<Marked, SpoolError> {
    let wanted = Ulid::from_string(id).map_err(|_| SpoolError::BadId {
        id: id.to_owned(),
        dir: dir.to_path_buf(),
    })?;
    let mut reader = SpoolReader::open(dir)?;
    let mut found = None;
    let mut sink = io::sink();
    let mut damage = Damage::new(&mut sink);
    walk(&mut reader, &mut damage, false, |record| {
        if record.id == wanted {
            found = Some(record);
            return Ok(Flow::Stop);
        }
        Ok(Flow::Continue)
    })?;
    let Some(record) = found else {
        return Err(SpoolError::NotFound {
            id: id.to_owned(),
            dir: dir.to_path_buf(),
        });
    };
    let view = SpoolView::open(dir)?;
    let state = view.tombstones.state(&wanted).copied();
    let conflict = |why: &str| SpoolError::State {
        id: wanted.to_string(),
        why: why.to_owned(),
    };
    let deleted = state.is_some_and(|s| s.deleted);
    let held = state.is_some_and(|s| s.held);
    match action {
        Action::Hold if deleted => return Err(conflict("it is deleted")),
        Action::Hold if held => return Ok(Marked::Already),
        Action::Release if deleted => return Err(conflict("it is deleted")),
        Action::Release if !held => return Err(conflict("it is not held")),
        Action::Delete if deleted => return Ok(Marked::Already),
        Action::Forwarded => return Err(conflict("only the forwarder marks messages forwarded")),
        _ => {}
    }
    let sent = view.forward.is_some_and(|f| f.handed_over(&record));
    append_tombstone(
        dir,
        &Tombstone {
            action,
            id: wanted,
            position: record.position(),
            at: Utc::now(),
            sent: action == Action::Hold && sent,
        },
    )?;
    Ok(Marked::Done)
}

/// The age buckets of `spool stat`: upper bounds in seconds (the last is open).
const AGE_BUCKETS: [(u64, &str); 5] = [
    (60, "< 1 min"),
    (3600, "< 1 h"),
    (86_400, "< 1 day"),
    (7 * 86_400, "< 7 days"),
    (u64::MAX, ">= 7 days"),
];

/// What `spool stat` counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// (messages, bytes on disk) per state, in [`MessageState::ALL`] order.
    pub by_state: [(u64, u64); 5],
    /// (messages, bytes on disk) per age bucket.
    pub by_age: [(u64, u64); 5],
    /// The oldest message not yet forwarded (pending), or without a forwarder the
    /// oldest stored one: id and time of receipt.
    pub oldest_pending: Option<(Ulid, DateTime<Utc>)>,
    /// The forwarder's durable cursor, if the spool has a forwarder.
    pub forward_cursor: Option<Position>,
}

/// Counts the spool's messages by state and by age at `now` and prints a summary (a
/// `postqueue -p`-like view): per state and per age bucket the messages and their bytes
/// on disk, the oldest pending message, and the forwarder's lag (the age of that
/// message: how far behind the forwarder is). Damage is reported on `err` and counted
/// in the returned [`Damage`].
pub fn stat<'e>(
    dir: &Path,
    now: DateTime<Utc>,
    out: &mut dyn Write,
    err: &'e mut dyn Write,
) -> Result<Damage<'e>, SpoolError> {
    let (stat, damage) = stat_of(dir, now, err)?;
    let mut out = BufWriter::new(out);
    let w = &mut out;
    let has_forwarder = stat.forward_cursor.is_some();
    let mut lines = String::new();
    lines.push_str(&format!(
        "{:<12}{:>12}{:>16}\n",
        "state", "messages", "bytes"
    ));
    let (mut total, mut total_bytes) = (0, 0);
    for (state, (n, bytes)) in MessageState::ALL.iter().zip(stat.by_state) {
        let shown = match state {
            MessageState::Stored => !has_forwarder,
            MessageState::Pending | MessageState::Forwarded => has_forwarder,
            _ => true,
        };
        if shown {
            lines.push_str(&format!("{:<12}{n:>12}{bytes:>16}\n", state.name()));
        }
        total += n;
        total_bytes += bytes;
    }
    lines.push_str(&format!("{:<12}{total:>12}{total_bytes:>16}\n", "total"));
    lines.push_str(&format!(
        "\n{:<12}{:>12}{:>16}\n",
        "age", "messages", "bytes"
    ));
    for ((_, name), (n, bytes)) in AGE_BUCKETS.iter().zip(stat.by_age) {
        lines.push_str(&format!("{name:<12}{n:>12}{bytes:>16}\n"));
    }
    lines.push('\n');
    let age = |at: DateTime<Utc>| {
        let secs = (now - at).num_seconds().max(0) as u64;
        humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
    };
    let waiting = if has_forwarder { "pending" } else { "stored" };
    match stat.oldest_pending {
        Some((id, at)) => lines.push_str(&format!(
            "oldest {waiting}: {id} received {} ({} ago)\n",
            at.to_rfc3339_opts(SecondsFormat::Secs, true),
            age(at)
        )),
        None => lines.push_str(&format!("oldest {waiting}: none\n")),
    }
    match stat.forward_cursor {
        Some(cursor) => lines.push_str(&format!(
            "forwarder: cursor {cursor}; {} pending ({} bytes); lag {}\n",
            stat.by_state[0].0,
            stat.by_state[0].1,
            stat.oldest_pending
                .map_or_else(|| "0s".to_owned(), |(_, at)| age(at)),
        )),
        None => lines.push_str(
            "forwarder: none (no FORWARD cursor: this spool is not a --spool-fallback)\n",
        ),
    }
    w.write_all(lines.as_bytes())
        .and_then(|()| w.flush())
        .map_err(SpoolError::Output)?;
    Ok(damage)
}

/// The counting of [`stat`], without the printing.
pub fn stat_of<'e>(
    dir: &Path,
    now: DateTime<Utc>,
    err: &'e mut dyn Write,
) -> Result<(Stat, Damage<'e>), SpoolError> {
    let mut damage = Damage::new(err);
    let mut reader = SpoolReader::open(dir)?;
    let view = SpoolView::open(dir)?;
    let mut stat = Stat {
        forward_cursor: view.forward.map(|f| f.cursor),
        ..Stat::default()
    };
    walk(&mut reader, &mut damage, false, |record| {
        let state = view.state(&record);
        let index = MessageState::ALL
            .iter()
            .position(|s| *s == state)
            .unwrap_or_default();
        stat.by_state[index].0 += 1;
        stat.by_state[index].1 += record.frame_len;
        let age = (now - record.received_at).num_seconds().max(0) as u64;
        let bucket = AGE_BUCKETS
            .iter()
            .position(|(limit, _)| age < *limit)
            .unwrap_or(AGE_BUCKETS.len() - 1);
        stat.by_age[bucket].0 += 1;
        stat.by_age[bucket].1 += record.frame_len;
        if matches!(state, MessageState::Pending | MessageState::Stored)
            && stat
                .oldest_pending
                .is_none_or(|(_, at)| record.received_at < at)
        {
            stat.oldest_pending = Some((record.id, record.received_at));
        }
        Ok(Flow::Continue)
    })?;
    Ok((stat, damage))
}

/// What `spool cat` prints of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The `Received:` line and the message.
    Value,
    /// The client's bytes only.
    Body,
    /// The record headers, `name: value` per line.
    Headers,
}

/// Writes one message: its stored value (the `Received:` line and the message exactly
/// as received), or with `body_only` just the client's bytes.
pub fn cat(dir: &Path, id: &str, body_only: bool, out: &mut dyn Write) -> Result<(), SpoolError> {
    let mut sink = io::sink();
    let part = if body_only { Part::Body } else { Part::Value };
    cat_part_reporting(dir, id, part, false, out, &mut sink).map(drop)
}

/// Writes one part of one message.
pub fn cat_part(dir: &Path, id: &str, part: Part, out: &mut dyn Write) -> Result<(), SpoolError> {
    let mut sink = io::sink();
    cat_part_reporting(dir, id, part, false, out, &mut sink).map(drop)
}

/// [`cat`], reporting damage met before the message on `err`; with `escaped`, client
/// text is escaped for a terminal.
pub fn cat_reporting<'e>(
    dir: &Path,
    id: &str,
    body_only: bool,
    escaped: bool,
    out: &mut dyn Write,
    err: &'e mut dyn Write,
) -> Result<Damage<'e>, SpoolError> {
    let part = if body_only { Part::Body } else { Part::Value };
    cat_part_reporting(dir, id, part, escaped, out, err)
}

/// [`cat_part`], reporting damage met before the message on `err`; with `escaped`,
/// client text (headers included) is escaped for a terminal.
pub fn cat_part_reporting<'e>(
    dir: &Path,
    id: &str,
    part: Part,
    escaped: bool,
    out: &mut dyn Write,
    err: &'e mut dyn Write,
) -> Result<Damage<'e>, SpoolError> {
    let wanted = Ulid::from_string(id).map_err(|_| SpoolError::BadId {
        id: id.to_owned(),
        dir: dir.to_path_buf(),
    })?;
    let mut damage = Damage::new(err);
    let mut reader = SpoolReader::open(dir)?;
    let mut found = false;
    walk(&mut reader, &mut damage, false, |record| {
        if record.id != wanted {
            return Ok(Flow::Continue);
        }
        found = true;
        let headers;
        let bytes = match part {
            Part::Body => record.body(),
            Part::Value => record.value(),
            Part::Headers => {
                // Every stored header in stored order, so headers a later version adds
                // (schema 1's node, session and DSN ones) show without a change here.
                let mut text = Vec::new();
                for (name, value) in &record.headers {
                    text.extend_from_slice(name.as_bytes());
                    text.extend_from_slice(b": ");
                    text.extend_from_slice(value);
                    text.push(b'\n');
                }
                headers = text;
                &headers[..]
            }
        };
        let written = if escaped {
            out.write_all(&escape_for_terminal(bytes))
        } else {
            out.write_all(bytes)
        };
        written
            .and_then(|()| out.flush())
            .map_err(SpoolError::Output)?;
        Ok(Flow::Stop)
    })?;
    if !found {
        return Err(SpoolError::NotFound {
            id: id.to_owned(),
            dir: dir.to_path_buf(),
        });
    }
    Ok(damage)
}

/// A stored message made safe for a terminal: line breaks and tabs stay, every other
/// control, line-separator or bidi character (and any byte that is not UTF-8) becomes a
/// visible escape, so `spool cat` cannot drive the terminal a reader looks at.
pub fn escape_for_terminal(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let _ = write_escaped(&mut out, bytes, EscapeFor::TerminalText);
    out
}

/// Writes every message of the spool to `mbox` as mboxrd (framing in the module
/// documentation) and returns how many. The file appears complete or not at all: it is
/// written under a temporary name next to `mbox` and moved into place. Refuses an
/// existing `mbox` and any corrupt range.
pub fn export_mbox(dir: &Path, mbox: &Path) -> Result<usize, SpoolError> {
    let mut sink = io::sink();
    export_mbox_reporting(dir, mbox, false, false, &mut sink).map(|(n, _)| n)
}

/// [`export_mbox`]; `force` replaces an existing file, `skip_corrupt` carries on past
/// corrupt ranges (reported on `err`) instead of writing nothing.
pub fn export_mbox_reporting<'e>(
    dir: &Path,
    mbox: &Path,
    force: bool,
    skip_corrupt: bool,
    err: &'e mut dyn Write,
) -> Result<(usize, Damage<'e>), SpoolError> {
    export_mbox_since(dir, mbox, force, skip_corrupt, None, err)
}

/// [`export_mbox_reporting`] of only the messages stored after message `since` (in
/// spool order): run again with the last id a run wrote, an export picks up where it
/// left off. An id the spool does not hold (pruned, or a typo) is an error and writes
/// nothing, rather than everything again.
pub fn export_mbox_since<'e>(
    dir: &Path,
    mbox: &Path,
    force: bool,
    skip_corrupt: bool,
    since: Option<&str>,
    err: &'e mut dyn Write,
) -> Result<(usize, Damage<'e>), SpoolError> {
    let options = ExportOptions {
        force,
        skip_corrupt,
        since,
        after_cursor: None,
    };
    export(dir, ExportFormat::Mbox, mbox, &options, err).map(|(r, d)| (r.count, d))
}

/// How `spool export` chooses and writes what it exports.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExportOptions<'a> {
    /// Replace an existing mbox file (an eml export always replaces `ID.*` files: a
    /// rerun after a crash writes the same bytes again).
    pub force: bool,
    pub skip_corrupt: bool,
    /// Only the messages stored after this id.
    pub since: Option<&'a str>,
    /// Only the messages after the position in this cursor file (all if it does not
    /// exist); once the output is durable, the cursor is moved past what was read.
    pub after_cursor: Option<&'a Path>,
}

/// What `spool export` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Messages written.
    pub count: usize,
    /// Messages left out because they are held or deleted.
    pub skipped: usize,
    /// Where the next incremental run starts (the cursor now on disk), if a cursor was
    /// given and anything was read.
    pub cursor: Option<Position>,
}

/// Exports the spool in `format` to `out` (a file for mbox, a directory for eml).
/// Refuses any corrupt range unless `skip_corrupt`. Nothing counts as exported until
/// the output is durable: the mbox file is synced and placed whole, eml files are
/// synced, and only then is the cursor moved (see [`save_cursor`]).
pub fn export<'e>(
    dir: &Path,
    format: ExportFormat,
    out: &Path,
    options: &ExportOptions,
    err: &'e mut dyn Write,
) -> Result<(ExportReport, Damage<'e>), SpoolError> {
    let since = options
        .since
        .map(|id| {
            Ulid::from_string(id).map_err(|_| SpoolError::BadId {
                id: id.to_owned(),
                dir: dir.to_path_buf(),
            })
        })
        .transpose()?;
    let start = match options.after_cursor {
        Some(path) => load_cursor(path)?,
        None => None,
    };
    if format == ExportFormat::Mbox && !options.force && fs::symlink_metadata(out).is_ok() {
        return Err(SpoolError::Exists {
            path: out.to_path_buf(),
        });
    }
    // Open the spool before creating anything, so a wrong directory leaves no file.
    let mut reader = match start {
        // A cursor must never be saved past records a failed batch may still undo.
        Some(position) => SpoolReader::open_from(dir, position)?.acknowledged_only(),
        None if options.after_cursor.is_some() => SpoolReader::open(dir)?.acknowledged_only(),
        None => SpoolReader::open(dir)?,
    };
    let mut damage = Damage::new(err);
    let mut sink: Box<dyn ExportSink> = match format {
        ExportFormat::Mbox => Box::new(MboxSink::create(out, options.force)?),
        ExportFormat::Eml => Box::new(EmlSink::create(out)?),
    };
    let tombstones = read_tombstones(dir)?;
    let mut count = 0;
    let mut skipped = 0;
    let mut last = None;
    let mut started = since.is_none();
    let walked = walk(&mut reader, &mut damage, !options.skip_corrupt, |record| {
        last = Some((record.next_position(), record.id));
        if !started {
            started = since.is_some_and(|id| record.id == id);
            return Ok(Flow::Continue);
        }
        if tombstones.skips(&record.id) {
            skipped += 1;
            return Ok(Flow::Continue);
        }
        sink.write(&record)?;
        count += 1;
        Ok(Flow::Continue)
    })
    .and_then(|()| match since.filter(|_| !started) {
        Some(id) => Err(SpoolError::NotFound {
            id: id.to_string(),
            dir: dir.to_path_buf(),
        }),
        None => Ok(()),
    });
    if let Err(e) = walked {
        sink.abandon();
        return Err(e);
    }
    sink.finish()?;
    let mut report = ExportReport {
        count,
        skipped,
        cursor: None,
    };
    if let (Some(path), Some((position, id))) = (options.after_cursor, last) {
        save_cursor(path, position, id)?;
        report.cursor = Some(position);
    }
    Ok((report, damage))
}

/// Where `spool export` puts messages.
trait ExportSink {
    fn write(&mut self, record: &SpoolRecord) -> Result<(), SpoolError>;
    /// Makes everything written durable and visible.
    fn finish(self: Box<Self>) -> Result<(), SpoolError>;
    /// Leaves as little as possible behind after a failure.
    fn abandon(self: Box<Self>);
}

/// An mbox written under a temporary name and placed whole.
struct MboxSink {
    out: BufWriter<File>,
    tmp: PathBuf,
    target: PathBuf,
    force: bool,
}

impl MboxSink {
    fn create(target: &Path, force: bool) -> Result<MboxSink, SpoolError> {
        let tmp = temp_path_for(target);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        Ok(MboxSink {
            out: BufWriter::with_capacity(256 << 10, file),
            tmp,
            target: target.to_path_buf(),
            force,
        })
    }
}

impl ExportSink for MboxSink {
    fn write(&mut self, record: &SpoolRecord) -> Result<(), SpoolError> {
        write_mbox_message(&mut self.out, record).map_err(io_error("write", &self.tmp))
    }

    fn finish(self: Box<Self>) -> Result<(), SpoolError> {
        let MboxSink {
            out,
            tmp,
            target,
            force,
        } = *self;
        let write_error = io_error("write", &tmp);
        let placed = out
            .into_inner()
            .map_err(|e| write_error(e.into_error()))
            .and_then(|file| file.sync_all().map_err(write_error))
            .and_then(|()| {
                let placed = if force {
                    fs::rename(&tmp, &target)
                } else {
                    // Never replaces a file that appeared meanwhile.
                    fs::hard_link(&tmp, &target).and_then(|()| fs::remove_file(&tmp))
                };
                placed.map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        SpoolError::Exists {
                            path: target.clone(),
                        }
                    } else {
                        io_error("move export to", &target)(e)
                    }
                })
            })
            .and_then(|()| sync_dir(parent_of(&target)));
        if placed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        placed
    }

    fn abandon(self: Box<Self>) {
        let _ = fs::remove_file(&self.tmp);
    }
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A directory of `ID.eml` and `ID.json` files.
struct EmlSink {
    dir: PathBuf,
}

impl EmlSink {
    fn create(dir: &Path) -> Result<EmlSink, SpoolError> {
        fs::create_dir_all(dir).map_err(io_error("create export directory", dir))?;
        Ok(EmlSink {
            dir: dir.to_path_buf(),
        })
    }
}

impl ExportSink for EmlSink {
    fn write(&mut self, record: &SpoolRecord) -> Result<(), SpoolError> {
        write_eml_message(&self.dir, record)
    }

    fn finish(self: Box<Self>) -> Result<(), SpoolError> {
        // One sync of the file system the directory is on, rather than two `fsync`s
        // per message: nothing counts as exported (the cursor does not move) before it
        // returns, and `syncfs` reports a write-back error since the directory was
        // opened.
        let dir = File::open(&self.dir).map_err(io_error("open export directory", &self.dir))?;
        rustix::fs::syncfs(&dir)
            .map_err(|e| io_error("sync export directory", &self.dir)(io::Error::from(e)))
    }

    fn abandon(self: Box<Self>) {}
}

/// Writes `ID.eml`, the stored value (the `Received:` line, then the message exactly
/// as received), and `ID.json`, the envelope: `id`, `received_at` (RFC 3339, UTC,
/// microseconds), `timestamp_ms` (the Kafka record's timestamp), `eml` (the file
/// name), `body_offset` (where the client's bytes start in the `.eml`), `mail_from`,
/// `rcpt_to` (a list, in RCPT order; a Bcc recipient is only here) and `headers`:
/// every record header in stored order, repeats kept, as `{"name": N, "value": V}`,
/// exactly as the Kafka record has them (docs/record.md). A value that is not UTF-8
/// is written as `{"hex": "..."}`. Each file is written under a temporary name and
/// renamed, so a file named `ID.*` is never half written.
pub fn write_eml_message(dir: &Path, record: &SpoolRecord) -> Result<(), SpoolError> {
    let id = record.id.to_string();
    let text = |bytes: &[u8]| match std::str::from_utf8(bytes) {
        Ok(s) => serde_json::Value::from(s),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            serde_json::json!({ "hex": hex })
        }
    };
    let headers: Vec<serde_json::Value> = record
        .headers
        .iter()
        .map(|(name, value)| serde_json::json!({ "name": name, "value": text(value) }))
        .collect();
    let envelope = serde_json::json!({
        "id": id,
        "received_at": record.received_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        "timestamp_ms": record.received_at.timestamp_millis(),
        "eml": format!("{id}.eml"),
        "body_offset": record.body_offset(),
        "mail_from": text(record.mail_from()),
        "rcpt_to": record.headers_named("smtp.rcpt_to").map(text).collect::<Vec<_>>(),
        "headers": headers,
    });
    let mut json = serde_json::to_vec_pretty(&envelope).unwrap_or_default();
    json.push(b'\n');
    place_file(dir, &format!("{id}.eml"), record.value())?;
    place_file(dir, &format!("{id}.json"), &json)
}

fn place_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
    let target = dir.join(name);
    let tmp = temp_path_for(&target);
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| fs::rename(&tmp, &target));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("write", &target)(e));
    }
    Ok(())
}

fn temp_path_for(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    target.with_file_name(name)
}

/// The first words of a cursor file, naming its format.
const CURSOR_TAG: &str = "smtpgw-spool-cursor 1";

/// Reads an export/replay cursor: `None` if the file does not exist (start at the
/// oldest message). The file is one line, `smtpgw-spool-cursor 1 SEGMENT:OFFSET ID`:
/// the position right after the last message handled (segment number and byte offset,
/// which stay valid when the segments before it are pruned) and that message's id
/// (for people). Anything else is an error naming the file, never a silent restart.
pub fn load_cursor(path: &Path) -> Result<Option<Position>, SpoolError> {
    let bad = |why: &str| SpoolError::BadCursor {
        path: path.to_path_buf(),
        why: why.to_owned(),
    };
    let text = match crate::files::read_regular_file(path, 4096) {
        Ok(bytes) => bytes,
        Err(crate::files::FileError::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(bad(&e.to_string())),
    };
    let text = std::str::from_utf8(&text).map_err(|_| bad("not UTF-8"))?;
    let rest = text
        .strip_suffix('\n')
        .and_then(|line| line.strip_prefix(CURSOR_TAG))
        .and_then(|rest| rest.strip_prefix(' '))
        .ok_or_else(|| {
            bad(&format!(
                "not a cursor (expected one line `{CURSOR_TAG} SEGMENT:OFFSET ID`)"
            ))
        })?;
    let mut fields = rest.split(' ');
    let (Some(position), Some(id), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(bad("expected `SEGMENT:OFFSET ID` after the tag"));
    };
    Ulid::from_string(id).map_err(|_| bad("the id is not a ULID"))?;
    let (segment, offset) = position
        .split_once(':')
        .and_then(|(s, o)| Some((s.parse().ok()?, o.parse().ok()?)))
        .ok_or_else(|| bad("the position is not SEGMENT:OFFSET"))?;
    Ok(Some(Position { segment, offset }))
}

/// Replaces the cursor at `path` atomically: written to a temporary file next to it,
/// `fsync`ed, renamed over it, and the directory `fsync`ed. A crash leaves the old
/// cursor or the new one, so a rerun repeats at most the last run's messages and never
/// skips one. Call only once the output it stands for is durable.
pub fn save_cursor(path: &Path, position: Position, last: Ulid) -> Result<(), SpoolError> {
    let tmp = temp_path_for(path);
    let line = format!("{CURSOR_TAG} {position} {last}\n");
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("write cursor", path)(e));
    }
    sync_dir(parent_of(path))
}

fn write_mbox_message(out: &mut impl Write, record: &SpoolRecord) -> io::Result<()> {
    let sender = match record.mail_from() {
        b"" => &b"MAILER-DAEMON"[..],
        sender => sender,
    };
    out.write_all(b"From ")?;
    out.write_all(sender)?;
    writeln!(
        out,
        " {}",
        record.received_at.format("%a %b %e %H:%M:%S %Y")
    )?;

    let value = record.value();
    // The envelope is not in the message (a Bcc recipient is only there): header
    // lines marked as the export's, ending like the message's own lines.
    let eol: &[u8] = match value.iter().position(|&b| b == b'\n') {
        Some(at) if at > 0 && value[at - 1] == b'\r' => b"\r\n",
        _ => b"\n",
    };
    let mut added = |name: &[u8], address: &[u8]| -> io::Result<()> {
        out.write_all(name)?;
        out.write_all(b": <")?;
        out.write_all(address)?;
        out.write_all(b"> ")?;
        out.write_all(EXPORT_MARK)?;
        out.write_all(eol)
    };
    added(b"X-Envelope-From", record.mail_from())?;
    for rcpt in record.headers_named("smtp.rcpt_to") {
        added(b"X-Envelope-To", rcpt)?;
    }
    for line in value.split_inclusive(|&b| b == b'\n') {
        if is_from_line(line) {
            out.write_all(b">")?;
        }
        out.write_all(line)?;
    }
    if !value.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.write_all(b"\n")
}

/// Ends every header line the mbox export adds, so a reader can tell them from the
/// message's own.
pub const EXPORT_MARK: &[u8] = b"(added by smtpgw spool export)";

/// `^>*From `: the lines an mboxrd reader would unquote, or take for a separator.
fn is_from_line(line: &[u8]) -> bool {
    let quotes = line.iter().take_while(|&&b| b == b'>').count();
    line[quotes..].starts_with(b"From ")
}

/// What `spool check` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CheckSummary {
    pub segments: u64,
    pub records: u64,
    /// Bytes of valid records, frames included.
    pub record_bytes: u64,
    pub corrupt_ranges: u64,
    pub corrupt_bytes: u64,
    pub torn_tail_bytes: u64,
    /// Records in the tombstone log (damaged ones included).
    pub tombstones: u64,
    /// The longest record value (`Received:` line and message) and the most recipients
    /// of one record: what `spool replay` sizes the producer's `message.max.bytes` by.
    pub largest_value: u64,
    pub most_recipients: u64,
}

/// Verifies every record (frame, checksum, payload) and writes a summary to `out`;
/// each corrupt range goes to `err`.
pub fn check(
    dir: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<CheckSummary, SpoolError> {
    let mut damage = Damage::new(err);
    let mut reader = SpoolReader::open(dir)?;
    let mut summary = CheckSummary::default();
    while let Some(event) = reader.next_event() {
        match event? {
            ReadEvent::Record(record) => {
                summary.records += 1;
                summary.record_bytes += record.frame_len;
                summary.largest_value = summary.largest_value.max(record.value().len() as u64);
                let recipients = record
                    .headers
                    .iter()
                    .filter(|(name, _)| name == "smtp.rcpt_to")
                    .count() as u64;
                summary.most_recipients = summary.most_recipients.max(recipients);
            }
            ReadEvent::Corrupt(range) => damage.corrupt(range),
            ReadEvent::TornTail(range) => damage.torn(range),
            ReadEvent::SegmentEnd { .. } => summary.segments += 1,
        }
    }
    let tombstones = read_tombstones(dir)?;
    summary.tombstones = tombstones.records;
    for range in tombstones.damaged {
        damage.corrupt(range);
    }
    if let Some(range) = tombstones.torn_tail {
        let _ = writeln!(
            damage.err,
            "note: tombstone append cut short, not counted as corruption (never reported \
             as done; the next hold, release or delete cuts it off): {range}"
        );
    }
    summary.corrupt_ranges = damage.ranges.len() as u64;
    summary.corrupt_bytes = damage.corrupt_bytes();
    summary.torn_tail_bytes = damage.torn_tail.as_ref().map_or(0, |r| r.len);
    writeln!(
        out,
        "{} records, {} bytes in {} segments, {} tombstones; {} corrupt ranges ({} bytes){}",
        summary.records,
        summary.record_bytes,
        summary.segments,
        summary.tombstones,
        summary.corrupt_ranges,
        summary.corrupt_bytes,
        if summary.torn_tail_bytes > 0 {
            format!("; torn tail of {} bytes", summary.torn_tail_bytes)
        } else {
            String::new()
        }
    )
    .and_then(|()| out.flush())
    .map_err(SpoolError::Output)?;
    Ok(summary)
}

/// The `--before` of `spool prune`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cutoff {
    /// Records whose id sorts before this one.
    Id(Ulid),
    /// Records received before this time.
    Time(DateTime<Utc>),
    /// Records that end at or before this position (an export or replay cursor):
    /// what an incremental run has handed on, in spool order.
    Position(Position),
}

impl Cutoff {
    pub fn parse(s: &str) -> Result<Cutoff, SpoolError> {
        if s.len() == 26 {
            if let Ok(id) = Ulid::from_string(s) {
                return Ok(Cutoff::Id(id));
            }
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| Cutoff::Time(t.with_timezone(&Utc)))
            .map_err(|_| SpoolError::BadCutoff(s.to_owned()))
    }

    fn holds_older(&self, record: &SpoolRecord) -> bool {
        match self {
            Cutoff::Id(id) => record.id < *id,
            Cutoff::Time(t) => record.received_at < *t,
            Cutoff::Position(p) => record.next_position() <= *p,
        }
    }
}

/// What `spool prune` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub deleted_segments: u64,
    pub deleted_records: u64,
    pub deleted_bytes: u64,
    pub kept_segments: u64,
    /// Segments kept because some of their bytes are damaged.
    pub kept_corrupt: u64,
    /// Segments kept because the Kafka forwarder (`--spool-fallback`) has not
    /// published all of their records yet.
    pub kept_unforwarded: u64,
    /// Segments kept because they hold a held message (`spool hold`), or a released
    /// one the forwarder has not published yet.
    pub kept_held: u64,
}

/// Segments below the returned number have been forwarded entirely; `None` when the
/// spool has no forwarder (no cursor file). An unreadable cursor forwards everything
/// again, so then nothing counts as forwarded.
fn forwarded_below(dir: &Path) -> Result<Option<u64>, SpoolError> {
    Ok(read_forward_progress(dir)?.map(|p| p.cursor.segment))
}

/// Deletes every whole closed segment whose records are all older than `before` and
/// whose bytes are all valid (see the module documentation for why this is safe next
/// to a running gateway). Each deletion is written to `out`; with `dry_run` nothing is
/// deleted. Damaged segments are reported on `err` and kept.
pub fn prune(
    dir: &Path,
    before: Cutoff,
    dry_run: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<PruneReport, SpoolError> {
    let segments = list_segments(dir)?;
    let mut report = PruneReport::default();
    // The highest-numbered segment is never pruned: the gateway may be writing it.
    let Some((_newest, closed)) = segments.split_last() else {
        return Ok(report);
    };
    let mut damage = Damage::new(err);
    let forwarded_below = forwarded_below(dir)?;
    let tombstones = read_tombstones(dir)?;
    let has_forwarder = forwarded_below.is_some();
    let mut deleted_any = false;
    for (seq, path) in closed {
        if forwarded_below.is_some_and(|below| *seq >= below) {
            // The Kafka forwarder has not published all of it yet.
            report.kept_segments += 1;
            report.kept_unforwarded += 1;
            continue;
        }
        let mut records = 0u64;
        let mut all_older = true;
        let mut damaged = false;
        let mut held = false;
        match open_segment(path, *seq, false, 0, None)? {
            Opened::Empty => {}
            Opened::Unreadable(range) => {
                damage.corrupt(range);
                damaged = true;
            }
            Opened::Cursor {
                mut cursor,
                damaged: head,
            } => {
                for range in head {
                    damage.corrupt(range);
                    damaged = true;
                }
                use crate::sink::spool::reader::Step;
                loop {
                    match cursor.step().map_err(io_error("read segment", path))? {
                        Step::Record(record) => {
                            records += 1;
                            all_older &= before.holds_older(&record);
                            held |= tombstones.state(&record.id).is_some_and(|s| {
                                s.held || (has_forwarder && s.awaits_forwarding())
                            });
                        }
                        Step::Corrupt(range) | Step::Torn(range) => {
                            damage.corrupt(range);
                            damaged = true;
                        }
                        Step::End => break,
                    }
                    if !all_older || held {
                        break;
                    }
                }
            }
        }
        if damaged {
            report.kept_corrupt += 1;
        }
        if held && !damaged && all_older {
            report.kept_held += 1;
        }
        if damaged || !all_older || held {
            report.kept_segments += 1;
            continue;
        }
        let bytes = fs::metadata(path).map_or(0, |m| m.len());
        if !dry_run {
            match fs::remove_file(path) {
                Ok(()) => deleted_any = true,
                // Gone already (another prune, or the Kafka forwarder).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("remove segment", path)(e)),
            }
        }
        writeln!(
            out,
            "{} {} ({records} records, {bytes} bytes)",
            if dry_run { "would delete" } else { "deleted" },
            path.display()
        )
        .map_err(SpoolError::Output)?;
        report.deleted_segments += 1;
        report.deleted_records += records;
        report.deleted_bytes += bytes;
    }
    if deleted_any {
        sync_dir(dir)?;
    }
    report.kept_segments += 1;
    Ok(report)
}
