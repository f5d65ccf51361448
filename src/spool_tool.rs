//! The `smtpgw spool` subcommands: list, print and export the messages of a spool.
//!
//! They read without taking the spool's lock, so they work next to a running gateway;
//! they see what was written before they opened each segment.
//!
//! # mbox export (mboxrd)
//!
//! [`export_mbox`] writes, for each message in spool order:
//!
//! 1. a separator line `From SENDER DATE\n`, where SENDER is the envelope sender as
//!    received (`MAILER-DAEMON` for the null reverse path `<>`) and DATE is the time of
//!    receipt in UTC in `asctime` form, e.g. `Mon Nov 23 09:52:59 2026` (day of month
//!    padded with a space: `Mon Nov  3 ...`);
//! 2. the stored value (the `Received:` line followed by the message), with every line
//!    that matches `^>*From ` given one more leading `>`; a line is what follows the
//!    start of the value or a `\n`. All other bytes are written verbatim, CRLF included;
//! 3. `\n` if the value does not already end with `\n`;
//! 4. one empty line, `\n`.
//!
//! To invert: split at lines starting with `From ` (no message line can, after
//! quoting), drop the separator line, drop the final `\n` of each message (step 4), and
//! remove one `>` from every line matching `^>+From `. This gives back the value
//! exactly, except that a value which did not end in `\n` gains one (step 3). Mail
//! received through DATA always ends in CRLF, so for it the round trip is exact.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::SecondsFormat;
use ulid::Ulid;

use crate::sink::spool::{io_error, read_all, SpoolError, SpoolRecord};
use crate::smtp::envelope::RECORD_HEADERS;

/// One line per message, oldest first:
/// `ID  RECEIVED_AT  BODY_BYTES  <MAIL_FROM>  N rcpt`. The id comes first so that
/// scripts can take the first field.
pub fn ls(dir: &Path, out: &mut dyn Write) -> Result<(), SpoolError> {
    let mut out = BufWriter::new(out);
    for record in read_all(dir)? {
        let record = record?;
        writeln!(
            out,
            "{}  {}  {}  <{}>  {} rcpt",
            record.id,
            record
                .received_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
            record.body().len(),
            String::from_utf8_lossy(record.mail_from()),
            record.rcpt_count()
        )
        .map_err(SpoolError::Output)?;
    }
    out.flush().map_err(SpoolError::Output)
}

/// Writes one message: its stored value (the `Received:` line and the message exactly
/// as received), or with `body_only` just the client's bytes.
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

pub fn cat(dir: &Path, id: &str, body_only: bool, out: &mut dyn Write) -> Result<(), SpoolError> {
    let part = if body_only { Part::Body } else { Part::Value };
    cat_part(dir, id, part, out)
}

/// Writes one part of one message.
pub fn cat_part(dir: &Path, id: &str, part: Part, out: &mut dyn Write) -> Result<(), SpoolError> {
    let wanted = Ulid::from_string(id).map_err(|_| SpoolError::BadId {
        id: id.to_owned(),
        dir: dir.to_path_buf(),
    })?;
    for record in read_all(dir)? {
        let record = record?;
        if record.id == wanted {
            let headers;
            let bytes = match part {
                Part::Body => record.body(),
                Part::Value => record.value(),
                Part::Headers => {
                    let mut text = Vec::new();
                    for name in RECORD_HEADERS {
                        for value in record.headers_named(name) {
                            text.extend_from_slice(name.as_bytes());
                            text.extend_from_slice(b": ");
                            text.extend_from_slice(value);
                            text.push(b'\n');
                        }
                    }
                    headers = text;
                    &headers[..]
                }
            };
            return out
                .write_all(bytes)
                .and_then(|()| out.flush())
                .map_err(SpoolError::Output);
        }
    }
    Err(SpoolError::NotFound {
        id: id.to_owned(),
        dir: dir.to_path_buf(),
    })
}

/// Writes every message of the spool to `mbox` as mboxrd (framing in the module
/// documentation) and returns how many. The file appears complete or not at all: it is
/// written under a temporary name next to `mbox` and renamed into place.
pub fn export_mbox(dir: &Path, mbox: &Path) -> Result<usize, SpoolError> {
    let tmp = temp_path_for(mbox);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_error("create", &tmp))?;
    let result = write_mbox(dir, file, &tmp).and_then(|count| {
        fs::rename(&tmp, mbox)
            .map(|()| count)
            .map_err(io_error("rename export to", mbox))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_path_for(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    target.with_file_name(name)
}

fn write_mbox(dir: &Path, file: File, tmp: &Path) -> Result<usize, SpoolError> {
    let write_error = io_error("write", tmp);
    let mut out = BufWriter::with_capacity(256 << 10, file);
    let mut count = 0;
    for record in read_all(dir)? {
        write_mbox_message(&mut out, &record?).map_err(write_error)?;
        count += 1;
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

/// `^>*From `: the lines an mboxrd reader would unquote, or take for a separator.
fn is_from_line(line: &[u8]) -> bool {
    let quotes = line.iter().take_while(|&&b| b == b'>').count();
    line[quotes..].starts_with(b"From ")
}
