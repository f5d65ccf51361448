//! The `smtpgw spool` subcommands: list, print, export, check and prune a spool (and
//! the record source for `replay`).
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

use crate::sink::spool::reader::{open_segment, Opened};
use crate::sink::spool::writer::{list_segments, sync_dir};
use crate::sink::spool::{io_error, CorruptRange, ReadEvent, SpoolError, SpoolReader, SpoolRecord};
use crate::smtp::address::{escaped, write_escaped, EscapeFor};

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

/// [`ls`], reporting damage on `err` and returning it instead of failing.
pub fn ls_reporting<'e>(
    dir: &Path,
    out: &mut dyn Write,
    err: &'e mut dyn Write,
) -> Result<Damage<'e>, SpoolError> {
    let mut out = BufWriter::new(out);
    let mut damage = Damage::new(err);
    let mut reader = SpoolReader::open(dir)?;
    walk(&mut reader, &mut damage, false, |record| {
        writeln!(
            out,
            "{}  {}  {}  <{}>  {} rcpt",
            record.id,
            record
                .received_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
            record.body().len(),
            // Client text on a terminal: nothing in it may move the cursor, recolour
            // the screen or reorder what is shown.
            escape(record.mail_from()),
            record.rcpt_count()
        )
        .map_err(SpoolError::Output)?;
        Ok(Flow::Continue)
    })?;
    out.flush().map_err(SpoolError::Output)?;
    Ok(damage)
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
    let since = since
        .map(|id| {
            Ulid::from_string(id).map_err(|_| SpoolError::BadId {
                id: id.to_owned(),
                dir: dir.to_path_buf(),
            })
        })
        .transpose()?;
    if !force && fs::symlink_metadata(mbox).is_ok() {
        return Err(SpoolError::Exists {
            path: mbox.to_path_buf(),
        });
    }
    // Open the spool before creating anything, so a wrong directory leaves no file.
    let mut reader = SpoolReader::open(dir)?;
    let tmp = temp_path_for(mbox);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_error("create", &tmp))?;
    let mut damage = Damage::new(err);
    let result = write_mbox(
        &mut reader,
        &mut damage,
        skip_corrupt,
        since.map(|id| (id, dir)),
        file,
        &tmp,
    )
    .and_then(|count| {
        let placed = if force {
            fs::rename(&tmp, mbox)
        } else {
            // Never replaces a file that appeared meanwhile.
            fs::hard_link(&tmp, mbox).and_then(|()| fs::remove_file(&tmp))
        };
        match placed {
            Ok(()) => Ok(count),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(SpoolError::Exists {
                path: mbox.to_path_buf(),
            }),
            Err(e) => Err(io_error("move export to", mbox)(e)),
        }
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|count| (count, damage))
}

fn temp_path_for(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    target.with_file_name(name)
}

fn write_mbox(
    reader: &mut SpoolReader,
    damage: &mut Damage,
    skip_corrupt: bool,
    since: Option<(Ulid, &Path)>,
    file: File,
    tmp: &Path,
) -> Result<usize, SpoolError> {
    let write_error = io_error("write", tmp);
    let mut out = BufWriter::with_capacity(256 << 10, file);
    let mut count = 0;
    let mut started = since.is_none();
    walk(reader, damage, !skip_corrupt, |record| {
        if !started {
            started = since.is_some_and(|(id, _)| record.id == id);
            return Ok(Flow::Continue);
        }
        write_mbox_message(&mut out, &record).map_err(write_error)?;
        count += 1;
        Ok(Flow::Continue)
    })?;
    if let Some((id, dir)) = since.filter(|_| !started) {
        return Err(SpoolError::NotFound {
            id: id.to_string(),
            dir: dir.to_path_buf(),
        });
    }
    let file = out.into_inner().map_err(|e| write_error(e.into_error()))?;
    file.sync_all().map_err(write_error)?;
    Ok(count)
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
    summary.corrupt_ranges = damage.ranges.len() as u64;
    summary.corrupt_bytes = damage.corrupt_bytes();
    summary.torn_tail_bytes = damage.torn_tail.as_ref().map_or(0, |r| r.len);
    writeln!(
        out,
        "{} records, {} bytes in {} segments; {} corrupt ranges ({} bytes){}",
        summary.records,
        summary.record_bytes,
        summary.segments,
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
}

/// The spool's Kafka forward cursor file (`--spool-fallback`); its layout is owned by
/// `sink::forward`: two 32-byte slots, each `SGWFWD01`, segment u64, offset u64,
/// counter u32, CRC-32C of the first 28 bytes.
const FORWARD_CURSOR_FILE: &str = "FORWARD";

/// Segments below the returned number have been forwarded entirely; `None` when the
/// spool has no forwarder (no cursor file). An unreadable cursor forwards everything
/// again, so then nothing counts as forwarded.
fn forwarded_below(dir: &Path) -> Result<Option<u64>, SpoolError> {
    let path = dir.join(FORWARD_CURSOR_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read forward cursor", &path)(e)),
    };
    let best = bytes
        .chunks_exact(32)
        .take(2)
        .filter(|slot| {
            &slot[..8] == b"SGWFWD01" && slot[28..] == crc32c::crc32c(&slot[..28]).to_le_bytes()
        })
        .map(|slot| {
            let field = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&slot[at..at + 8]);
                u64::from_le_bytes(b)
            };
            let counter = u32::from_le_bytes([slot[24], slot[25], slot[26], slot[27]]);
            (counter, field(8))
        })
        .reduce(|a, b| {
            if b.0.wrapping_sub(a.0) as i32 > 0 {
                b
            } else {
                a
            }
        });
    Ok(Some(best.map_or(0, |(_, segment)| segment)))
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
                        }
                        Step::Corrupt(range) | Step::Torn(range) => {
                            damage.corrupt(range);
                            damaged = true;
                        }
                        Step::End => break,
                    }
                    if !all_older {
                        break;
                    }
                }
            }
        }
        if damaged {
            report.kept_corrupt += 1;
        }
        if damaged || !all_older {
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
