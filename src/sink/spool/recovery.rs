//! Start-up recovery of the newest segment, and the background check of the older
//! ones.
//!
//! The rule: a bad frame is a crash's torn tail only if nothing valid follows it in
//! the newest segment and it lies past the segment's commit mark. Such a tail was never
//! answered `250` (a batch is answered only after its `fdatasync`, and the mark names
//! only answered batches); its bytes are still copied to `quarantine/` before they are
//! cut off. Anything else is corruption: the file is kept as it is, the range is
//! logged at `error`, counted, and readers skip it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::reader::{open_segment, CorruptRange, Opened, SegmentFile, Step};
use super::writer::{create_dir_durably, sync_dir, QUARANTINE_DIR};
use super::{io_error, SpoolError};

/// Repairs the newest segment (`seq` at `path`) before a new one is started after it;
/// returns how many corrupt ranges it kept (and logged).
pub fn recover_newest(dir: &Path, seq: u64, path: &Path) -> Result<u64, SpoolError> {
    let (mut cursor, damaged) = match open_segment(path, seq, true, 0, None)? {
        Opened::Cursor { cursor, damaged } => (cursor, damaged),
        Opened::Empty => {
            // A crash while the segment was being created: no record can be in it.
            match fs::remove_file(path) {
                Ok(()) => sync_dir(dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(io_error("remove unfinished segment", path)(e)),
            }
            tracing::warn!(segment = %path.display(), "removed a segment whose creation a crash cut short");
            return Ok(0);
        }
        // Nothing in it is ours: refuse rather than guess.
        Opened::Unreadable(_) => {
            return Err(SpoolError::BadMagic {
                path: path.to_path_buf(),
            })
        }
    };
    let mut corrupt = 0u64;
    for range in &damaged {
        corrupt += 1;
        log_corrupt(range);
    }
    let mut records = 0u64;
    let torn = loop {
        match cursor.step().map_err(io_error("read segment", path))? {
            Step::Record(_) => records += 1,
            #[cfg(feature = "testing")]
            Step::Corrupt(range) if super::defects::on(&super::defects::TRUNCATE_AT_CORRUPTION) => {
                let len = cursor.file.len - range.offset;
                break Some(super::reader::CorruptRange { len, ..range });
            }
            Step::Corrupt(range) => {
                corrupt += 1;
                log_corrupt(&range)
            }
            Step::Torn(range) => break Some(range),
            Step::End => break None,
        }
    };
    drop(cursor);
    if let Some(range) = torn {
        let cut = quarantine_tail(dir, path, &range).and_then(|saved| {
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|file| {
                    file.set_len(range.offset)?;
                    file.sync_all()
                })
                .map_err(io_error("truncate torn segment", path))
                .map(|()| saved)
        });
        match cut {
            Ok(saved) => {
                tracing::warn!(
                    segment = %path.display(),
                    offset = range.offset,
                    bytes_dropped = range.len,
                    reason = range.reason,
                    saved = %saved.display(),
                    records_kept = records,
                    "truncated the torn tail a crash left in the spool (past the commit mark, \
                     never acknowledged; its bytes are saved)"
                );
            }
            // Without a copy the tail stays: readers will report it as corruption,
            // which is better than losing a record the disk damaged.
            Err(error) => {
                corrupt += 1;
                tracing::error!(
                    segment = %path.display(),
                    offset = range.offset,
                    len = range.len,
                    %error,
                    "cannot save the torn tail to quarantine and cut it; leaving it in place"
                )
            }
        }
    }
    Ok(corrupt)
}

fn log_corrupt(range: &CorruptRange) {
    tracing::error!(
        segment = %range.path.display(),
        offset = range.offset,
        len = range.len,
        reason = range.reason,
        "corrupt spool data; the file is kept and readers skip the range"
    );
}

/// Copies the bytes of `range` to `quarantine/NAME.OFFSET.torn`, durably.
fn quarantine_tail(dir: &Path, path: &Path, range: &CorruptRange) -> Result<PathBuf, SpoolError> {
    let qdir = dir.join(QUARANTINE_DIR);
    create_dir_durably(&qdir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let target = qdir.join(format!("{name}.{}.torn", range.offset));
    let (mut segment, _) = SegmentFile::open(path, range.segment, None)?
        .ok_or_else(|| io_error("read segment", path)(std::io::ErrorKind::NotFound.into()))?;
    let bytes = segment
        .read_at(
            range.offset,
            usize::try_from(range.len).unwrap_or(usize::MAX),
        )
        .map_err(io_error("read segment", path))?
        .to_vec();
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&target)
        .map_err(io_error("create", &target))?;
    out.write_all(&bytes)
        .and_then(|()| out.sync_all())
        .map_err(io_error("write", &target))?;
    sync_dir(&qdir)?;
    Ok(target)
}

/// Reads every segment below `below` once and logs what is damaged, so a start-up
/// says so without waiting for the whole spool to be read; `found` ranges were already
/// logged by [`recover_newest`]. Returns how many corrupt ranges it found (beyond
/// `found`).
pub(crate) fn verify_older(dir: &Path, below: u64, found: u64) -> u64 {
    let segments = match super::writer::list_segments(dir) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot list the spool to verify it");
            return 0;
        }
    };
    // The newest segment counts: recovery read it.
    let (mut checked, mut damaged) = (1u64, found);
    for (seq, path) in segments.into_iter().filter(|(seq, _)| *seq < below) {
        checked += 1;
        match open_segment(&path, seq, false, 0, None) {
            Ok(Opened::Cursor {
                mut cursor,
                damaged: head,
            }) => {
                for range in head {
                    damaged += 1;
                    log_corrupt(&range);
                }
                loop {
                    match cursor.step() {
                        Ok(Step::Record(_)) => {}
                        Ok(Step::Corrupt(range) | Step::Torn(range)) => {
                            damaged += 1;
                            log_corrupt(&range);
                        }
                        Ok(Step::End) => break,
                        Err(error) => {
                            tracing::warn!(segment = %path.display(), %error, "cannot verify spool segment");
                            break;
                        }
                    }
                }
            }
            Ok(Opened::Empty) => {}
            Ok(Opened::Unreadable(range)) => {
                damaged += 1;
                log_corrupt(&range);
            }
            Err(error) => tracing::warn!(%error, "cannot verify spool segment"),
        }
    }
    if damaged > 0 {
        tracing::error!(
            dir = %dir.display(),
            segments = checked,
            corrupt_ranges = damaged,
            "spool holds corrupt data; `smtpgw spool check` lists it"
        );
    } else {
        tracing::info!(dir = %dir.display(), segments = checked, "spool verified");
    }
    damaged - found
}
