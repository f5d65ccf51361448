//! Damaged spools: one flipped byte in every part of a record, in the newest and in an
//! older segment, through start-up recovery, the reader, `spool check` and the other
//! tools (the library and the built binary); a torn tail saved to `quarantine/`; the
//! size limit. The full-disk run on a real small file system is in tests/spool_disk.rs.

mod kafka_support;
mod spool_gateway;
mod spool_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kafka_support::Client;
use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::spool::format::SEGMENT_HEADER_LEN;
use smtpgw::sink::spool::{
    CorruptRange, ReadEvent, SpoolError, SpoolOptions, SpoolReader, SpoolRecord, SpoolSink,
};
use smtpgw::sink::{PublishError, Sink};
use smtpgw::spool_tool;
use spool_gateway::Gateway;
use spool_support::{mark_acknowledged_up_to, message, publish};
use tempfile::TempDir;
use ulid::Ulid;

/// A child process holds copies of every descriptor between `fork` and `exec`, a
/// spool's `LOCK` among them, so a sink opened while another test spawns `smtpgw`
/// could find its spool "in use". Tests that open sinks share this lock; the test that
/// spawns processes takes it alone.
static FORKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn opens_sinks() -> std::sync::RwLockReadGuard<'static, ()> {
    FORKS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

/// Every record and every damaged range, in order.
fn read(dir: &Path) -> (Vec<SpoolRecord>, Vec<CorruptRange>) {
    let mut reader = SpoolReader::open(dir).expect("spool opens for reading");
    let (mut records, mut corrupt) = (Vec::new(), Vec::new());
    while let Some(event) = reader.next_event() {
        match event.expect("no I/O error") {
            ReadEvent::Record(r) => records.push(r),
            ReadEvent::Corrupt(range) => corrupt.push(range),
            ReadEvent::TornTail(range) => panic!("unexpected torn tail {range}"),
            ReadEvent::SegmentEnd { .. } => {}
        }
    }
    (records, corrupt)
}

fn ids(records: &[SpoolRecord]) -> Vec<Ulid> {
    records.iter().map(|r| r.id).collect()
}

/// One run of the gateway's sink that stores `n` messages (acknowledged) in a fresh
/// segment.
fn run_storing(dir: &Path, n: usize, tag: &str) -> Vec<SealedMessage> {
    let sink = SpoolSink::open(dir).unwrap();
    let sent: Vec<SealedMessage> = (0..n)
        .map(|i| {
            message(
                "a@example.com",
                &["b@example.com"],
                format!("Subject: {tag} {i}\r\n\r\n{}\r\n", "body ".repeat(i * 7)).as_bytes(),
            )
        })
        .collect();
    for msg in &sent {
        assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
    }
    sent
}

/// Where in a record a byte is flipped.
#[derive(Clone, Copy, Debug)]
enum Class {
    /// The frame's length, low byte (a plausible wrong length).
    LengthLow,
    /// The frame's length, high byte (runs past the end of the file).
    LengthHigh,
    Crc,
    /// The payload's version byte.
    Version,
    /// The id, inside the payload header.
    Header,
    /// The first header's name: the bytes resynchronisation looks for.
    HeaderName,
    /// The message itself.
    Body,
}

const CLASSES: [Class; 7] = [
    Class::LengthLow,
    Class::LengthHigh,
    Class::Crc,
    Class::Version,
    Class::Header,
    Class::HeaderName,
    Class::Body,
];

fn byte_of(class: Class, record: &SpoolRecord) -> u64 {
    let at = record.offset;
    at + match class {
        Class::LengthLow => 0,
        Class::LengthHigh => 3,
        Class::Crc => 5,
        Class::Version => 8,
        Class::Header => 8 + 1 + 7,
        Class::HeaderName => 8 + 31 + 4,
        Class::Body => record.frame_len - 3,
    }
}

fn flip(path: &Path, at: u64) -> Vec<u8> {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= 0xa5;
    fs::write(path, &bytes).unwrap();
    bytes
}

/// A spool with 20 acknowledged records in segment 0, and (when `older`) 3 more in
/// segment 1, so that segment 0 is not the newest. Returns every sent message in
/// order and the victim: the 10th record of segment 0.
fn damaged_spool(older: bool, class: Class) -> (TempDir, Vec<SealedMessage>, SpoolRecord) {
    let tmp = TempDir::new().unwrap();
    let mut sent = run_storing(tmp.path(), 20, "first");
    if older {
        // A second run writes segment 1, so segment 0 is no longer the newest.
        sent.extend(run_storing(tmp.path(), 3, "second"));
    }
    assert_eq!(segments(tmp.path()).len(), 1 + usize::from(older));
    let (records, corrupt) = read(tmp.path());
    assert!(corrupt.is_empty());
    assert_eq!(ids(&records), sent.iter().map(|m| m.id).collect::<Vec<_>>());
    let victim = records[9].clone();
    flip(&victim.segment, byte_of(class, &victim));
    (tmp, sent, victim)
}

fn check_report(dir: &Path) -> (spool_tool::CheckSummary, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let summary = spool_tool::check(dir, &mut out, &mut err).unwrap();
    (
        summary,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn one_flipped_byte_costs_exactly_its_record_and_restart_keeps_the_rest() {
    let _forks = opens_sinks();
    for older in [false, true] {
        for class in CLASSES {
            let what = format!(
                "{class:?} in the {} segment",
                if older { "older" } else { "newest" }
            );
            let (tmp, sent, victim) = damaged_spool(older, class);
            let dir = tmp.path();
            let damaged_bytes = fs::read(&victim.segment).unwrap();
            let intact: Vec<Ulid> = sent
                .iter()
                .map(|m| m.id)
                .filter(|&id| id != victim.id)
                .collect();
            let exact = |corrupt: &[CorruptRange]| {
                assert_eq!(corrupt.len(), 1, "{what}: {corrupt:?}");
                assert_eq!(
                    (corrupt[0].offset, corrupt[0].len),
                    (victim.offset, victim.frame_len),
                    "{what}: the damaged range is exactly the record"
                );
                assert_eq!(&*corrupt[0].path, &*victim.segment, "{what}");
            };

            let (records, corrupt) = read(dir);
            assert_eq!(ids(&records), intact, "{what}: reader before restart");
            exact(&corrupt);

            // Restart: recovery keeps every byte of the damaged segment.
            let sink = SpoolSink::open(dir).unwrap_or_else(|e| panic!("{what}: restart: {e}"));
            let later = message("x@example.com", &["y@example.com"], b"after restart\r\n");
            assert_eq!(publish(&sink, later.clone()), Ok(later.id), "{what}");
            drop(sink);
            assert_eq!(
                fs::read(&victim.segment).unwrap(),
                damaged_bytes,
                "{what}: nothing cut or rewritten"
            );
            assert!(!dir.join("quarantine").exists(), "{what}: nothing was torn");

            let (records, corrupt) = read(dir);
            let mut expected = intact.clone();
            expected.push(later.id);
            assert_eq!(ids(&records), expected, "{what}: reader after restart");
            for (record, msg) in records
                .iter()
                .zip(sent.iter().filter(|m| m.id != victim.id))
            {
                assert_eq!(record.value(), &msg.value[..], "{what}");
            }
            exact(&corrupt);

            let (summary, out, err) = check_report(dir);
            assert_eq!(
                summary.records,
                20 + if older { 3 } else { 0 },
                "{what}: {out}"
            );
            assert_eq!(summary.corrupt_ranges, 1, "{what}");
            assert_eq!(summary.corrupt_bytes, victim.frame_len, "{what}");
            let named = format!(
                "corrupt: {} offset {} length {}:",
                victim.segment.display(),
                victim.offset,
                victim.frame_len
            );
            assert_eq!(
                err.lines().filter(|l| l.starts_with("corrupt: ")).count(),
                1,
                "{what}: {err}"
            );
            assert!(err.contains(&named), "{what}: {err}");
            assert!(out.contains("1 corrupt ranges"), "{what}: {out}");
        }
    }
}

#[test]
fn strict_tools_refuse_and_skipping_tools_say_what_they_skipped() {
    let _forks = opens_sinks();
    let (tmp, sent, victim) = damaged_spool(true, Class::Crc);
    let dir = tmp.path();

    // The old entry points fail on corruption rather than pass over it.
    let err = spool_tool::ls(dir, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(err, SpoolError::Corrupt { offset, .. } if offset == victim.offset),
        "{err}"
    );
    let mbox = tmp.path().join("out.mbox");
    let err = spool_tool::export_mbox(dir, &mbox).unwrap_err();
    assert!(matches!(err, SpoolError::Corrupt { .. }), "{err}");
    assert!(!mbox.exists());

    let mut out = Vec::new();
    let mut errs = Vec::new();
    let damage = spool_tool::ls_reporting(dir, &mut out, &mut errs).unwrap();
    assert_eq!(damage.ranges.len(), 1);
    assert_eq!(
        String::from_utf8(out).unwrap().lines().count(),
        sent.len() - 1
    );
    assert!(String::from_utf8_lossy(&errs).contains(&format!(
        "offset {} length {}",
        victim.offset, victim.frame_len
    )));

    // The record after the damage is still there for cat.
    let mut value = Vec::new();
    let mut errs = Vec::new();
    spool_tool::cat_reporting(
        dir,
        &sent[10].id.to_string(),
        false,
        false,
        &mut value,
        &mut errs,
    )
    .unwrap();
    assert_eq!(value, &sent[10].value[..]);

    let mut errs = Vec::new();
    let (n, damage) =
        spool_tool::export_mbox_reporting(dir, &mbox, false, true, &mut errs).unwrap();
    assert_eq!((n, damage.ranges.len()), (sent.len() - 1, 1));
    drop(damage);
    let err = spool_tool::export_mbox_reporting(dir, &mbox, false, true, &mut Vec::new())
        .err()
        .unwrap();
    assert!(matches!(err, SpoolError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    let before = fs::read(&mbox).unwrap();
    fs::write(&mbox, b"old").unwrap();
    spool_tool::export_mbox_reporting(dir, &mbox, true, true, &mut Vec::new()).unwrap();
    assert_eq!(
        fs::read(&mbox).unwrap(),
        before,
        "--force replaces the file"
    );
}

#[test]
fn torn_tail_is_saved_to_quarantine_before_it_is_cut() {
    let _forks = opens_sinks();
    let tmp = TempDir::new().unwrap();
    let sent = run_storing(tmp.path(), 5, "t");
    let segs = segments(tmp.path());
    let (records, _) = read(tmp.path());
    let last = records[4].clone();
    // The last batch was written but never acknowledged (its commit mark not
    // rewritten), and a flipped byte in it: nothing valid follows, so a torn tail.
    let mut full = fs::read(&segs[0]).unwrap();
    mark_acknowledged_up_to(&mut full, last.offset);
    fs::write(&segs[0], &full).unwrap();
    flip(&segs[0], last.offset + 20);
    let damaged = fs::read(&segs[0]).unwrap();
    let mut reader = SpoolReader::open(tmp.path()).unwrap();
    assert_eq!(
        reader.by_ref().map(|r| r.unwrap().id).collect::<Vec<_>>(),
        ids(&records[..4])
    );
    assert_eq!(
        reader.torn_tail().map(|r| (r.offset, r.len)),
        Some((last.offset, last.frame_len))
    );

    drop(SpoolSink::open(tmp.path()).unwrap());
    assert_eq!(fs::read(&segs[0]).unwrap(), &full[..last.offset as usize]);
    let saved = tmp
        .path()
        .join("quarantine")
        .join(format!("00000000000000000000.seg.{}.torn", last.offset));
    assert_eq!(fs::read(&saved).unwrap(), &damaged[last.offset as usize..]);
    assert_eq!(
        ids(&read(tmp.path()).0),
        sent[..4].iter().map(|m| m.id).collect::<Vec<_>>()
    );
    assert_eq!(check_report(tmp.path()).0.corrupt_ranges, 0);
}

#[test]
fn damaged_magic_with_records_after_it_is_reported_and_kept() {
    let _forks = opens_sinks();
    let tmp = TempDir::new().unwrap();
    let sent = run_storing(tmp.path(), 3, "m");
    let segs = segments(tmp.path());
    flip(&segs[0], 2);
    let (records, corrupt) = read(tmp.path());
    assert_eq!(ids(&records), sent.iter().map(|m| m.id).collect::<Vec<_>>());
    assert_eq!(corrupt.len(), 1);
    // The range runs to the first record: the header, magic and commit marks.
    assert_eq!((corrupt[0].offset, corrupt[0].len), (0, SEGMENT_HEADER_LEN));
}

#[test]
fn reader_resumes_from_a_position_and_reports_closed_segments() {
    let _forks = opens_sinks();
    let tmp = TempDir::new().unwrap();
    let first = run_storing(tmp.path(), 4, "a");
    let second = run_storing(tmp.path(), 2, "b");
    let (records, _) = read(tmp.path());
    let resume = records[1].next_position();
    let mut reader = SpoolReader::open_from(tmp.path(), resume).unwrap();
    let mut got = Vec::new();
    let mut ends = Vec::new();
    while let Some(event) = reader.next_event() {
        match event.unwrap() {
            ReadEvent::Record(r) => got.push(r.id),
            ReadEvent::SegmentEnd { segment, closed } => ends.push((segment, closed)),
            other => panic!("{other:?}"),
        }
    }
    let mut expected: Vec<Ulid> = first[2..].iter().map(|m| m.id).collect();
    expected.extend(second.iter().map(|m| m.id));
    assert_eq!(got, expected);
    // Every run starts a segment: 0 (first run, closed) and 1 (second run, newest).
    assert_eq!(ends, vec![(0, true), (1, false)]);

    // A live sink: the durable end moves with each batch, and a reader bounded by it
    // sees exactly what was acknowledged.
    let sink = SpoolSink::open(tmp.path()).unwrap();
    let start = sink.durable_end();
    assert_eq!(sink.writing_segment(), start.segment);
    let msg = message("a@example.com", &["b@example.com"], b"live\r\n");
    assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
    let end = sink.wait_durable_beyond(start, std::time::Duration::from_secs(5));
    assert!(matches!(
        sink.remove_closed_segment(start.segment),
        Err(SpoolError::SegmentOpen { .. })
    ));
    assert!(end > start);
    let tail: Vec<Ulid> = SpoolReader::open_from(tmp.path(), start)
        .unwrap()
        .until(end)
        .map(|r| r.unwrap().id)
        .collect();
    assert_eq!(tail, vec![msg.id]);
    assert!(sink.remove_closed_segment(0).unwrap());
    assert!(!sink.remove_closed_segment(0).unwrap(), "already gone");
    let mut rest: Vec<Ulid> = second.iter().map(|m| m.id).collect();
    rest.push(msg.id);
    assert_eq!(ids(&read(tmp.path()).0), rest);
}

#[test]
fn spool_max_bytes_answers_storage_full_and_unhealthy_with_the_reason() {
    let _forks = opens_sinks();
    let tmp = TempDir::new().unwrap();
    let mut options = SpoolOptions::default();
    options.max_bytes = Some(60_000);
    let sink = SpoolSink::open_with(tmp.path(), options).unwrap();
    assert_eq!(sink.health(), Ok(()));
    let mut accepted = Vec::new();
    let mut full = 0;
    for i in 0..20 {
        let msg = message("a@example.com", &["b@example.com"], &vec![b'a' + i; 10_000]);
        match publish(&sink, msg.clone()) {
            Ok(id) => accepted.push(id),
            Err(PublishError::StorageFull) => full += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!((4..=6).contains(&accepted.len()), "{}", accepted.len());
    assert_eq!(full, 20 - accepted.len());
    let huge = message("a@example.com", &["b@example.com"], &vec![b'h'; 70_000]);
    assert_eq!(
        publish(&sink, huge),
        Err(PublishError::TooLarge),
        "a message larger than the whole spool may be is refused for good"
    );
    let why = sink.health().expect_err("full is not ready");
    assert!(why.contains("--spool-max-bytes"), "{why}");
    let stats = sink.spool_stats().unwrap();
    assert!(stats.bytes <= 60_000 && stats.bytes > 40_000, "{stats:?}");
    assert!(stats.oldest_received_at.is_some());
    drop(sink);
    assert_eq!(ids(&read(tmp.path()).0), accepted);
}

#[test]
fn prune_deletes_only_closed_segments_that_are_entirely_older() {
    let _forks = opens_sinks();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    run_storing(dir, 3, "old");
    std::thread::sleep(std::time::Duration::from_millis(5));
    let cutoff = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let newer = run_storing(dir, 2, "new");
    // A live gateway: its (empty) newest segment is never pruned.
    let sink = SpoolSink::open(dir).unwrap();
    let segs = segments(dir);
    assert_eq!(segs.len(), 3, "0: old, 1: new, 2: live");

    let before = spool_tool::Cutoff::parse(&cutoff.to_rfc3339()).unwrap();
    let mut out = Vec::new();
    let report = spool_tool::prune(dir, before, true, &mut out, &mut Vec::new()).unwrap();
    assert_eq!(report.deleted_segments, 1);
    assert_eq!(segments(dir).len(), 3, "dry run deletes nothing");
    assert!(String::from_utf8_lossy(&out).starts_with("would delete "));

    let report = spool_tool::prune(dir, before, false, &mut out, &mut Vec::new()).unwrap();
    assert_eq!((report.deleted_segments, report.deleted_records), (1, 3));
    assert_eq!(segments(dir), vec![segs[1].clone(), segs[2].clone()]);
    assert_eq!(
        ids(&read(dir).0),
        newer.iter().map(|m| m.id).collect::<Vec<_>>()
    );

    // The live segment stays whatever the cut-off; the gateway keeps writing it.
    let msg = message("a@example.com", &["b@example.com"], b"live\r\n");
    assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
    let far = spool_tool::Cutoff::parse("2999-01-01T00:00:00Z").unwrap();
    spool_tool::prune(dir, far, false, &mut Vec::new(), &mut Vec::new()).unwrap();
    assert_eq!(segments(dir), vec![segs[2].clone()]);
    assert_eq!(ids(&read(dir).0), vec![msg.id]);

    // A ULID cut-off, and a damaged closed segment, which is kept.
    drop(sink);
    let more = run_storing(dir, 2, "more");
    let (records, _) = read(dir);
    assert_eq!(records[0].id, msg.id);
    flip(&records[0].segment, records[0].offset + 20);
    let by_id = spool_tool::Cutoff::parse(&Ulid::new().to_string()).unwrap();
    let mut err = Vec::new();
    let report = spool_tool::prune(dir, by_id, false, &mut Vec::new(), &mut err).unwrap();
    assert_eq!(report.kept_corrupt, 1);
    assert!(String::from_utf8_lossy(&err).contains("corrupt: "));
    assert!(segments(dir).contains(&records[0].segment.to_path_buf()));
    let _ = more;
    assert!(matches!(
        spool_tool::Cutoff::parse("yesterday"),
        Err(SpoolError::BadCutoff(_))
    ));
}

#[test]
fn escape_keeps_text_and_escapes_what_could_drive_a_terminal() {
    assert_eq!(
        spool_tool::escape(b"plain@example.com"),
        "plain@example.com"
    );
    assert_eq!(
        spool_tool::escape("jos\u{e9}@b\u{fc}cher.example".as_bytes()),
        "jos\u{e9}@b\u{fc}cher.example"
    );
    assert_eq!(
        spool_tool::escape(b"a\x1b[2Jb\r\n\x7f\\"),
        "a\\u{1b}[2Jb\\u{d}\\u{a}\\u{7f}\\\\"
    );
    assert_eq!(spool_tool::escape(b"\xff\xfe"), "\\xff\\xfe");
    assert_eq!(spool_tool::escape("x\u{202e}y".as_bytes()), "x\\u{202e}y");
}

// --- through the built binary --------------------------------------------------------

fn smtpgw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_smtpgw"))
        .args(args)
        .env_remove("SMTPGW_SPOOL_DIR")
        .output()
        .expect("smtpgw runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn binary_tools_name_the_damage_and_exit_nonzero_unless_told_to_skip() {
    let _alone = FORKS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The case first: the newest segment, as a killed gateway left it.
    binary_case(false, Class::Body);
    binary_case(true, Class::LengthHigh);
}

fn binary_case(older: bool, class: Class) {
    let (tmp, sent, victim) = damaged_spool(older, class);
    let dir = tmp.path().to_str().unwrap();
    let named = format!(
        "corrupt: {} offset {} length {}",
        victim.segment.display(),
        victim.offset,
        victim.frame_len
    );

    let check = smtpgw(&["spool", "check", "--spool-dir", dir]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check.stderr));
    assert!(
        text(&check.stderr).contains(&named),
        "{}",
        text(&check.stderr)
    );
    assert!(
        text(&check.stdout).starts_with(&format!("{} records, ", sent.len() - 1)),
        "{}",
        text(&check.stdout)
    );

    for skip in [false, true] {
        let mut args = vec!["spool", "ls", "--spool-dir", dir];
        if skip {
            args.push("--skip-corrupt");
        }
        let ls = smtpgw(&args);
        assert_eq!(
            ls.status.code(),
            Some(if skip { 0 } else { 1 }),
            "{}",
            text(&ls.stderr)
        );
        assert_eq!(text(&ls.stdout).lines().count(), sent.len() - 1);
        assert!(text(&ls.stderr).contains(&named), "{}", text(&ls.stderr));
    }

    let mbox = tmp.path().join("x.mbox");
    let mbox_arg = mbox.to_str().unwrap();
    let strict = smtpgw(&["spool", "export", "--spool-dir", dir, "--mbox", mbox_arg]);
    assert_eq!(strict.status.code(), Some(1));
    assert!(
        text(&strict.stderr).contains(&named),
        "{}",
        text(&strict.stderr)
    );
    assert!(!mbox.exists(), "nothing written without --skip-corrupt");
    let export_skipping = [
        "spool",
        "export",
        "--spool-dir",
        dir,
        "--mbox",
        mbox_arg,
        "--skip-corrupt",
    ];
    let skipping = smtpgw(&export_skipping);
    assert_eq!(
        skipping.status.code(),
        Some(0),
        "{}",
        text(&skipping.stderr)
    );
    assert!(text(&skipping.stderr).contains(&named));
    let again = smtpgw(&export_skipping);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );

    // The gateway starts on the damaged spool, says so, and takes mail.
    let mut gw = Gateway::start(tmp.path(), &[]);
    gw.wait_for_log("spool holds corrupt data");
    let mut c = Client::connect(&gw.smtp);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.send(b"Subject: after\r\n\r\nhi\r\n").starts_with("250 "));
    drop(c);
    drop(gw);
    let check = smtpgw(&["spool", "check", "--spool-dir", dir]);
    assert!(
        text(&check.stdout).starts_with(&format!("{} records, ", sent.len())),
        "{}",
        text(&check.stdout)
    );
}

// --- acknowledged records at the end of the newest segment -----------------------------

/// Damage to the end of the newest segment after every record in it was answered `250`.
#[derive(Clone, Copy, Debug)]
enum TailDamage {
    /// A byte of the last record's message.
    LastPayload,
    /// A byte of the last record's CRC.
    LastCrc,
    /// A byte in each of the last two records.
    LastTwo,
    /// The last 4 KiB zeroed.
    Zeroed4K,
    /// The file shortened by 10 bytes.
    Shortened10,
    /// A byte of the first copy of the commit mark.
    FirstMark,
    /// A byte of the second copy of the commit mark.
    SecondMark,
}

const TAIL_DAMAGE: [TailDamage; 7] = [
    TailDamage::LastPayload,
    TailDamage::LastCrc,
    TailDamage::LastTwo,
    TailDamage::Zeroed4K,
    TailDamage::Shortened10,
    TailDamage::FirstMark,
    TailDamage::SecondMark,
];

/// Applies `damage` to `path`; returns the byte ranges it touched.
fn damage_tail(path: &Path, records: &[SpoolRecord], damage: TailDamage) -> Vec<(u64, u64)> {
    use smtpgw::sink::spool::format::COMMIT_MARK_AT;
    let mut bytes = fs::read(path).unwrap();
    let len = bytes.len() as u64;
    let last = &records[records.len() - 1];
    let before = &records[records.len() - 2];
    let touched = match damage {
        TailDamage::LastPayload => vec![(last.offset + last.frame_len - 5, 1)],
        TailDamage::LastCrc => vec![(last.offset + 5, 1)],
        TailDamage::LastTwo => vec![
            (before.offset + before.frame_len - 5, 1),
            (last.offset + last.frame_len - 5, 1),
        ],
        TailDamage::Zeroed4K => vec![(len - 4096, 4096)],
        TailDamage::Shortened10 => vec![(len - 10, 10)],
        TailDamage::FirstMark => vec![(COMMIT_MARK_AT[0] + 3, 1)],
        TailDamage::SecondMark => vec![(COMMIT_MARK_AT[1] + 9, 1)],
    };
    match damage {
        TailDamage::Zeroed4K => bytes[(len - 4096) as usize..].fill(0),
        TailDamage::Shortened10 => bytes.truncate((len - 10) as usize),
        _ => {
            for &(at, _) in &touched {
                bytes[at as usize] ^= 0xa5;
            }
        }
    }
    fs::write(path, &bytes).unwrap();
    touched
}

/// Every record the damage did not touch reads back exactly; every one it touched is
/// inside a reported corrupt range; nothing is a torn tail (`read` panics on one).
fn assert_all_accounted(
    dir: &Path,
    acked: &[SpoolRecord],
    touched: &[(u64, u64)],
    what: &str,
) -> Vec<CorruptRange> {
    let (records, corrupt) = read(dir);
    assert!(!corrupt.is_empty(), "{what}: the damage is reported");
    let hit = |r: &SpoolRecord| {
        touched
            .iter()
            .any(|&(at, n)| at < r.offset + r.frame_len && r.offset < at + n)
    };
    let intact: Vec<&SpoolRecord> = acked.iter().filter(|r| !hit(r)).collect();
    let mut got = records.iter().filter(|r| r.seq == acked[0].seq);
    for want in &intact {
        let r = got
            .next()
            .unwrap_or_else(|| panic!("{what}: {} missing", want.id));
        assert_eq!((r.id, r.value()), (want.id, want.value()), "{what}");
    }
    assert!(got.next().is_none(), "{what}: nothing else read");
    for damaged in acked.iter().filter(|r| hit(r)) {
        assert!(
            corrupt.iter().any(|c| c.segment == damaged.seq
                && c.offset <= damaged.offset
                && damaged.offset < c.offset + c.len),
            "{what}: damaged record at {} is reported: {corrupt:?}",
            damaged.offset
        );
    }
    corrupt
}

/// The five hostile-audit cases and the commit mark itself, through a real
/// gateway: every message answered `250`, the gateway stopped, the end of the newest
/// segment damaged. Nothing acknowledged is taken for a torn tail: `spool check` exits
/// 1, `spool cat` of a damaged message fails, start-up keeps the bytes, logs the
/// damage at error, counts it, and takes mail.
#[test]
fn damage_to_the_last_acknowledged_records_is_corruption_not_a_torn_tail() {
    let _alone = FORKS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for damage in TAIL_DAMAGE {
        let what = format!("{damage:?}");
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path();
        let gw = Gateway::start(dir, &[]);
        let mut c = Client::connect(&gw.smtp);
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        let mut ids_sent = Vec::new();
        for i in 0..30 {
            let body = format!("Subject: m{i}\r\n\r\n{}\r\n", "x".repeat(300));
            let reply = c.send(body.as_bytes());
            assert!(reply.starts_with("250 "), "{what}: {reply}");
            ids_sent.push(kafka_support::queued_id(&reply));
        }
        drop(c);
        drop(gw);
        let (acked, corrupt) = read(dir);
        assert!(corrupt.is_empty());
        assert_eq!(
            acked.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(),
            ids_sent,
            "{what}"
        );
        let path = acked[0].segment.to_path_buf();
        let touched = damage_tail(&path, &acked, damage);
        let damaged_bytes = fs::read(&path).unwrap();
        assert_all_accounted(dir, &acked, &touched, &what);

        let d = dir.to_str().unwrap();
        let check = smtpgw(&["spool", "check", "--spool-dir", d]);
        assert_eq!(
            check.status.code(),
            Some(1),
            "{what}: {}",
            text(&check.stderr)
        );
        assert!(!text(&check.stderr).contains("torn tail"), "{what}");
        let victims: Vec<&SpoolRecord> = acked
            .iter()
            .filter(|r| {
                touched
                    .iter()
                    .any(|&(at, n)| at < r.offset + r.frame_len && r.offset < at + n)
            })
            .collect();
        for victim in &victims {
            let cat = smtpgw(&["spool", "cat", "--spool-dir", d, &victim.id.to_string()]);
            assert_ne!(
                cat.status.code(),
                Some(0),
                "{what}: cat of a damaged message"
            );
            assert!(cat.stdout.is_empty(), "{what}");
        }

        // Start-up: error, counted, bytes kept, mail taken.
        let mut gw = Gateway::start(dir, &[]);
        gw.wait_for_log("spool holds corrupt data");
        assert!(
            spool_gateway::metric(&gw.metrics, "smtpgw_spool_corrupt_records_total") >= 1.0,
            "{what}"
        );
        let mut c = Client::connect(&gw.smtp);
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        assert!(c.send(b"Subject: after\r\n\r\nhi\r\n").starts_with("250 "));
        drop(c);
        drop(gw);
        assert_eq!(
            fs::read(&path).unwrap(),
            damaged_bytes,
            "{what}: nothing cut"
        );
        assert!(!dir.join("quarantine").exists(), "{what}: nothing torn");
        assert_all_accounted(dir, &acked, &touched, &what);
    }
}

mod flipped_anywhere {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// One spool of acknowledged records (several group commits, one segment), built
    /// once: its directory, bytes and records.
    fn spool() -> &'static (TempDir, Vec<u8>, Vec<SpoolRecord>) {
        static SPOOL: OnceLock<(TempDir, Vec<u8>, Vec<SpoolRecord>)> = OnceLock::new();
        SPOOL.get_or_init(|| {
            let _forks = opens_sinks();
            let tmp = TempDir::new().unwrap();
            run_storing(tmp.path(), 12, "p");
            let (records, corrupt) = read(tmp.path());
            assert!(corrupt.is_empty());
            let bytes = fs::read(&records[0].segment).unwrap();
            (tmp, bytes, records)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// One byte flipped anywhere in a segment of acknowledged records (header,
        /// commit marks, frames, last record): every other record reads back exactly,
        /// the damaged one is reported, before and after a restart's recovery, and
        /// nothing is cut.
        #[test]
        fn one_flipped_byte_anywhere_is_reported_and_costs_at_most_its_record(
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let (_keep, bytes, acked) = spool();
            let at = at.index(bytes.len());
            let tmp = TempDir::new().unwrap();
            let name = acked[0].segment.file_name().unwrap();
            let path = tmp.path().join(name);
            let mut damaged = bytes.clone();
            damaged[at] ^= flip;
            fs::write(&path, &damaged).unwrap();
            let what = format!("byte {at} ^ {flip:#04x}");
            // Same segment name and offsets in another directory.
            let check = |dir: &Path| assert_all_accounted(dir, acked, &[(at as u64, 1)], &what);
            check(tmp.path());
            {
                let _forks = opens_sinks();
                drop(SpoolSink::open(tmp.path()).unwrap_or_else(|e| panic!("{what}: {e}")));
            }
            prop_assert_eq!(fs::read(&path).unwrap(), damaged, "{}: nothing cut", what);
            prop_assert!(!tmp.path().join("quarantine").exists(), "{}", what);
            check(tmp.path());
        }
    }
}

// --- rotation under a running gateway, and prune -------------------------------------

fn prune_all(dir: &Path) -> Output {
    let far = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    smtpgw(&[
        "spool",
        "prune",
        "--spool-dir",
        dir.to_str().unwrap(),
        "--before",
        &far,
    ])
}

fn listed(dir: &Path) -> Vec<String> {
    let ls = smtpgw(&["spool", "ls", "--spool-dir", dir.to_str().unwrap()]);
    assert_eq!(ls.status.code(), Some(0), "{}", text(&ls.stderr));
    text(&ls.stdout)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// The segment being written is sealed by age and by size while the gateway runs, so
/// `spool prune` deletes what it held without a restart, and mail keeps flowing.
#[test]
fn segments_seal_by_age_and_size_under_a_running_gateway_and_prune_takes_them() {
    let _alone = FORKS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for flags in [
        ["--spool-segment-age", "1s"],
        ["--spool-segment-size", "3K"],
    ] {
        let what = flags.join(" ");
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path();
        let mut gw = Gateway::start(dir, &flags);
        let mut c = Client::connect(&gw.smtp);
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        let mut first = Vec::new();
        for i in 0..4 {
            let reply = c.send(format!("Subject: {i}\r\n\r\n{}\r\n", "y".repeat(900)).as_bytes());
            assert!(reply.starts_with("250 "), "{what}: {reply}");
            first.push(kafka_support::queued_id(&reply));
        }
        gw.wait_for_log("spool segment sealed");
        let pruned = prune_all(dir);
        assert_eq!(
            pruned.status.code(),
            Some(0),
            "{what}: {}",
            text(&pruned.stderr)
        );
        assert!(
            text(&pruned.stderr).starts_with("deleted ")
                && !text(&pruned.stderr).starts_with("deleted 0 "),
            "{what}: {}",
            text(&pruned.stderr)
        );
        let left = listed(dir);
        assert!(
            first.iter().any(|id| !left.contains(id)),
            "{what}: a sealed segment's messages are gone: {left:?}"
        );
        let reply = c.send(b"Subject: later\r\n\r\nstill here\r\n");
        assert!(reply.starts_with("250 "), "{what}: {reply}");
        assert!(
            listed(dir).contains(&kafka_support::queued_id(&reply)),
            "{what}"
        );
        drop(c);
        drop(gw);
    }
}

/// The case: a full spool (`--spool-max-bytes`) answers 452; the gateway seals
/// the segment it was writing, so a prune makes room and mail is taken again without a
/// restart.
#[test]
fn a_full_spool_recovers_by_prune_without_a_restart() {
    let _alone = FORKS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let mut gw = Gateway::start(dir, &["--spool-max-bytes", "4K"]);
    let mut c = Client::connect(&gw.smtp);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let body = format!("Subject: fill\r\n\r\n{}\r\n", "z".repeat(700));
    let mut full = None;
    for _ in 0..20 {
        let reply = c.send(body.as_bytes());
        if reply.starts_with("452") {
            full = Some(reply);
            break;
        }
        assert!(reply.starts_with("250 "), "{reply}");
    }
    assert!(
        full.is_some_and(|r| r.starts_with("452 4.3.1")),
        "the spool filled up"
    );
    assert!(c.cmd("RSET").starts_with("250"));
    // The seal follows the 452 (the answers go out first).
    gw.wait_for_log("spool segment sealed");
    let pruned = prune_all(dir);
    assert_eq!(pruned.status.code(), Some(0), "{}", text(&pruned.stderr));
    assert!(
        !text(&pruned.stderr).starts_with("deleted 0 "),
        "{}",
        text(&pruned.stderr)
    );
    let reply = c.send(body.as_bytes());
    assert!(reply.starts_with("250 "), "room again after prune: {reply}");
    drop(c);
    drop(gw);
}

/// A Kafka forward cursor slot as `sink::forward` writes it.
fn forward_slot(segment: u64, offset: u64, counter: u32) -> Vec<u8> {
    let mut slot = b"SGWFWD01".to_vec();
    slot.extend_from_slice(&segment.to_le_bytes());
    slot.extend_from_slice(&offset.to_le_bytes());
    slot.extend_from_slice(&counter.to_le_bytes());
    let crc = crc32c::crc32c(&slot);
    slot.extend_from_slice(&crc.to_le_bytes());
    slot
}

/// `spool prune` never deletes what the Kafka forwarder has not published: segments
/// at or after its cursor are kept, and all of them when the cursor is unreadable.
#[test]
fn prune_keeps_what_the_forwarder_has_not_published() {
    let _forks = opens_sinks();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    for tag in ["a", "b", "c"] {
        run_storing(dir, 2, tag);
    }
    let segs = segments(dir);
    assert_eq!(segs.len(), 3);
    // The newer slot (counter 7) points into segment 1; the older one into segment 0.
    let mut cursor = forward_slot(0, 100, 6);
    cursor.extend(forward_slot(1, 80, 7));
    fs::write(dir.join("FORWARD"), &cursor).unwrap();
    let far = spool_tool::Cutoff::parse("2999-01-01T00:00:00Z").unwrap();
    let report = spool_tool::prune(dir, far, false, &mut Vec::new(), &mut Vec::new()).unwrap();
    assert_eq!((report.deleted_segments, report.kept_unforwarded), (1, 1));
    assert_eq!(segments(dir), segs[1..].to_vec());

    fs::write(
        dir.join("FORWARD"),
        b"not a cursor at all, not at all, not at all....",
    )
    .unwrap();
    let report = spool_tool::prune(dir, far, false, &mut Vec::new(), &mut Vec::new()).unwrap();
    assert_eq!((report.deleted_segments, report.kept_unforwarded), (0, 1));
    assert_eq!(segments(dir), segs[1..].to_vec());
}

/// Readers next to a writer in full flow (what `spool check` and `ls` do next to a
/// running gateway) never report damage: each takes the commit marks before the
/// length, and looks again at a mark a concurrent rewrite may have shown half done.
/// A batch being written past the mark is at most a torn tail.
#[test]
fn readers_next_to_a_busy_writer_never_report_damage() {
    let _forks = opens_sinks();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().to_path_buf();
    let sink = std::sync::Arc::new(SpoolSink::open(&dir).unwrap());
    let writing = {
        let sink = std::sync::Arc::clone(&sink);
        std::thread::spawn(move || {
            for i in 0..3000 {
                let msg = message(
                    "a@example.com",
                    &["b@example.com"],
                    format!("m{i}\r\n").as_bytes(),
                );
                assert_eq!(publish(&*sink, msg.clone()), Ok(msg.id));
            }
        })
    };
    let mut passes = 0;
    while !writing.is_finished() {
        let mut reader = SpoolReader::open(&dir).unwrap();
        while let Some(event) = reader.next_event() {
            if let ReadEvent::Corrupt(range) = event.unwrap() {
                panic!("a live reader reported damage: {range}");
            }
        }
        passes += 1;
    }
    writing.join().unwrap();
    assert!(passes > 0);
    drop(sink);
    let (records, corrupt) = read(&dir);
    assert_eq!((records.len(), corrupt.len()), (3000, 0));
}
