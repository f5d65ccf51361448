//! The spool sink against real files: durability answers, crash recovery, locking,
//! concurrency, rotation and shutdown.

mod harness;
mod spool_support;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::spool::{read_all, SpoolError, SpoolOptions, SpoolRecord, SpoolSink};
use smtpgw::sink::{PublishError, Sink};
use spool_support::{headers_of, mark_acknowledged_up_to, message, publish, submit};
use tempfile::TempDir;
use ulid::Ulid;

fn records(dir: &Path) -> Vec<SpoolRecord> {
    read_all(dir)
        .expect("spool opens for reading")
        .collect::<Result<_, _>>()
        .expect("every record reads back")
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

fn assert_same(record: &SpoolRecord, msg: &SealedMessage) {
    assert_eq!(record.id, msg.id);
    assert_eq!(record.received_at, msg.received_at);
    assert_eq!(record.headers, headers_of(msg));
    assert_eq!(record.value(), &msg.value[..]);
    assert_eq!(record.body(), msg.body());
    assert_eq!(record.body_offset(), msg.body_offset);
}

#[test]
fn round_trip_keeps_repeated_recipients_and_binary_bodies() {
    let tmp = TempDir::new().unwrap();
    let sink = SpoolSink::open(tmp.path()).unwrap();

    let mut binary: Vec<u8> = (0..=255u8).collect();
    binary.extend_from_slice(b"\r\n.\r\n\0\r\nlast line without newline\xff");
    let sent = vec![
        message(
            "alice@example.com",
            &["bob@example.com", "carol@example.com", "bob@example.com"],
            &binary,
        ),
        message(
            "",
            &["postmaster"],
            b"Subject: bounce\r\n\r\nnull sender\r\n",
        ),
        message("u@example.com", &["v@example.com"], b""),
    ];
    for msg in &sent {
        assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
    }
    sink.shutdown();

    let got = records(tmp.path());
    assert_eq!(got.len(), sent.len());
    for (record, msg) in got.iter().zip(&sent) {
        assert_same(record, msg);
    }
    let first = &got[0];
    assert_eq!(first.mail_from(), b"alice@example.com");
    assert_eq!(first.rcpt_count(), 3);
    assert_eq!(
        first.headers_named("smtp.rcpt_to").collect::<Vec<_>>(),
        vec![
            &b"bob@example.com"[..],
            b"carol@example.com",
            b"bob@example.com"
        ]
    );
    assert_eq!(
        first.header("smtp.id"),
        Some(sent[0].id.to_string().as_bytes())
    );
    assert_eq!(first.header("smtp.nonexistent"), None);
    assert_eq!(got[1].mail_from(), b"");
}

/// Writes three messages in one run and returns the spool's only segment, its bytes
/// and where the last record starts. The bytes' commit marks name the end of the
/// second record, as if a crash came after the third was written and before it was
/// acknowledged: the third is a torn tail if damaged. (Damage to acknowledged records
/// is in tests/spool_recovery.rs.)
fn spool_with_three(tmp: &TempDir) -> (Vec<SealedMessage>, Vec<u8>, usize) {
    let sink = SpoolSink::open(tmp.path()).unwrap();
    let sent: Vec<SealedMessage> = (0..3)
        .map(|i| {
            message(
                "a@example.com",
                &["b@example.com"],
                format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes(),
            )
        })
        .collect();
    for msg in &sent {
        assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
    }
    drop(sink);
    let segs = segments(tmp.path());
    assert_eq!(segs.len(), 1);
    let mut bytes = fs::read(&segs[0]).unwrap();
    let last = records(tmp.path())[2].offset as usize;
    mark_acknowledged_up_to(&mut bytes, last as u64);
    (sent, bytes, last)
}

/// A spool holding `segment` as its only (so newest) segment.
fn spool_with_segment(segment: &[u8]) -> (TempDir, PathBuf) {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("00000000000000000000.seg");
    fs::write(&path, segment).unwrap();
    (tmp, path)
}

fn ids(records: &[SpoolRecord]) -> Vec<Ulid> {
    records.iter().map(|r| r.id).collect()
}

/// The reader stops before the torn record; reopening cuts it off for good and the
/// spool goes on accepting mail after the surviving records.
fn check_torn_tail_recovers(segment: &[u8], last: usize, survivors: &[Ulid], what: &str) {
    let (tmp, path) = spool_with_segment(segment);
    assert_eq!(ids(&records(tmp.path())), survivors, "reader, {what}");

    let sink = SpoolSink::open(tmp.path()).unwrap_or_else(|e| panic!("open, {what}: {e}"));
    drop(sink);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        last as u64,
        "truncated length, {what}"
    );
    assert_eq!(
        ids(&records(tmp.path())),
        survivors,
        "after recovery, {what}"
    );
}

#[test]
fn torn_tail_at_every_length_is_cut_and_never_read() {
    let tmp = TempDir::new().unwrap();
    let (sent, bytes, last) = spool_with_three(&tmp);
    let survivors = [sent[0].id, sent[1].id];
    for cut in last..bytes.len() {
        check_torn_tail_recovers(
            &bytes[..cut],
            last,
            &survivors,
            &format!("cut at {cut} of {}", bytes.len()),
        );
    }
}

#[test]
fn flipped_byte_in_last_record_is_cut_and_never_read() {
    let tmp = TempDir::new().unwrap();
    let (sent, bytes, last) = spool_with_three(&tmp);
    let survivors = [sent[0].id, sent[1].id];
    for at in last..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x5a;
        check_torn_tail_recovers(&damaged, last, &survivors, &format!("byte {at} flipped"));
    }
}

#[test]
fn recovery_keeps_accepting_after_the_surviving_records() {
    let tmp = TempDir::new().unwrap();
    let (sent, bytes, last) = spool_with_three(&tmp);
    let (spool, _) = spool_with_segment(&bytes[..bytes.len() - 3]);

    let sink = SpoolSink::open(spool.path()).unwrap();
    let later = message("x@example.com", &["y@example.com"], b"after the crash\r\n");
    assert_eq!(publish(&sink, later.clone()), Ok(later.id));
    drop(sink);

    assert_eq!(
        ids(&records(spool.path())),
        vec![sent[0].id, sent[1].id, later.id]
    );
    let segs = segments(spool.path());
    assert_eq!(segs.len(), 2, "a new run writes a new segment");
    assert_eq!(fs::metadata(&segs[0]).unwrap().len(), last as u64);
}

#[test]
fn unfinished_segment_header_is_removed_at_open() {
    let tmp = TempDir::new().unwrap();
    let (sent, _, _) = spool_with_three(&tmp);
    let unfinished = tmp.path().join("00000000000000000001.seg");
    fs::write(&unfinished, b"SMTP").unwrap();
    assert_eq!(records(tmp.path()).len(), 3, "reader skips it while newest");

    drop(SpoolSink::open(tmp.path()).unwrap());
    assert!(!unfinished.exists());
    assert_eq!(
        ids(&records(tmp.path())),
        sent.iter().map(|m| m.id).collect::<Vec<_>>()
    );
}

#[test]
fn bad_record_in_an_older_segment_is_corruption() {
    let tmp = TempDir::new().unwrap();
    let (sent, bytes, last) = spool_with_three(&tmp);
    let (spool, path) = spool_with_segment(&bytes[..bytes.len() - 1]);
    fs::write(spool.path().join("00000000000000000001.seg"), b"SMTPGWS1").unwrap();

    let mut reader = read_all(spool.path()).unwrap();
    assert_eq!(reader.next().unwrap().unwrap().id, sent[0].id);
    assert_eq!(reader.next().unwrap().unwrap().id, sent[1].id);
    let err = reader.next().unwrap().unwrap_err();
    assert!(matches!(err, SpoolError::Corrupt { offset, .. } if offset == last as u64));
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains(&format!("offset {last}")), "{text}");
    assert!(reader.next().is_none(), "no reading past corruption");
}

#[test]
fn foreign_file_with_segment_name_is_refused() {
    let (tmp, path) = spool_with_segment(b"not a spool segment at all");
    let err = SpoolSink::open(tmp.path()).err().expect("open must fail");
    assert!(matches!(err, SpoolError::BadMagic { .. }));
    assert!(err.to_string().contains(&path.display().to_string()));
    assert!(read_all(tmp.path()).unwrap().next().unwrap().is_err());
}

#[test]
fn second_open_of_a_locked_spool_fails() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("spool");
    let first = SpoolSink::open(&dir).unwrap();
    let err = SpoolSink::open(&dir).err().expect("second open must fail");
    assert!(matches!(err, SpoolError::Locked { .. }));
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
    drop(first);
    drop(SpoolSink::open(&dir).expect("lock released with the sink"));
}

#[test]
fn concurrent_submitters_all_get_ok_and_read_back_exactly() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 250;
    let tmp = TempDir::new().unwrap();
    let sink = Arc::new(SpoolSink::open(tmp.path()).unwrap());

    let sent: Vec<SealedMessage> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let sink = Arc::clone(&sink);
                scope.spawn(move || {
                    let msgs: Vec<SealedMessage> = (0..PER_THREAD)
                        .map(|i| {
                            let body: Vec<u8> =
                                (0..(i * 37 % 3000)).map(|b| (b * 31 + t) as u8).collect();
                            message(
                                &format!("t{t}@example.com"),
                                &["a@example.com", "b@example.com"],
                                &body,
                            )
                        })
                        .collect();
                    let answers: Vec<_> = msgs.iter().map(|m| submit(&*sink, m.clone())).collect();
                    for (mut rx, msg) in answers.into_iter().zip(&msgs) {
                        assert_eq!(rx.blocking_recv(), Some(Ok(msg.id)));
                    }
                    msgs
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("submitter thread"))
            .collect()
    });
    sink.shutdown();

    let got = records(tmp.path());
    assert_eq!(got.len(), THREADS * PER_THREAD);
    let by_id: HashMap<Ulid, &SpoolRecord> = got.iter().map(|r| (r.id, r)).collect();
    assert_eq!(by_id.len(), got.len(), "no record twice");
    for msg in &sent {
        assert_same(by_id[&msg.id], msg);
    }
}

#[test]
fn segments_rotate_and_read_back_in_order() {
    let tmp = TempDir::new().unwrap();
    let mut options = SpoolOptions::default();
    options.segment_size = 2048;
    let sink = SpoolSink::open_with(tmp.path(), options).unwrap();
    let sent: Vec<SealedMessage> = (0..40)
        .map(|i| message("a@example.com", &["b@example.com"], &vec![b'x'; i * 50]))
        .collect();
    for msg in &sent {
        assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
    }
    drop(sink);

    let segs = segments(tmp.path());
    assert!(segs.len() >= 10, "only {} segments", segs.len());
    let got = records(tmp.path());
    assert_eq!(got.len(), sent.len());
    for (record, msg) in got.iter().zip(&sent) {
        assert_same(record, msg);
    }
    for seg in &segs[..segs.len() - 1] {
        assert!(fs::metadata(seg).unwrap().len() >= 2048, "rotated early");
    }
}

#[test]
fn reopening_appends_after_earlier_runs() {
    let tmp = TempDir::new().unwrap();
    let mut sent = Vec::new();
    for run in 0..3 {
        let sink = SpoolSink::open(tmp.path()).unwrap();
        for _ in 0..2 {
            let msg = message(
                "a@example.com",
                &[&format!("run{run}@example.com")],
                b"hi\r\n",
            );
            assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
            sent.push(msg.id);
        }
    }
    assert_eq!(segments(tmp.path()).len(), 3);
    assert_eq!(ids(&records(tmp.path())), sent);
}

#[test]
fn shutdown_answers_everything_queued_then_refuses() {
    let tmp = TempDir::new().unwrap();
    let sink = Arc::new(SpoolSink::open(tmp.path()).unwrap());
    let sent: Vec<SealedMessage> = (0..3000)
        .map(|i| {
            message(
                "a@example.com",
                &["b@example.com"],
                format!("{i}\r\n").as_bytes(),
            )
        })
        .collect();
    let answers: Vec<_> = sent.iter().map(|m| submit(&*sink, m.clone())).collect();

    let stopper = Arc::clone(&sink);
    std::thread::spawn(move || stopper.shutdown())
        .join()
        .unwrap();
    for (mut rx, msg) in answers.into_iter().zip(&sent) {
        assert_eq!(
            rx.try_recv(),
            Ok(Ok(msg.id)),
            "answered before shutdown returned"
        );
    }

    let late = message("a@example.com", &["b@example.com"], b"too late\r\n");
    assert!(matches!(
        publish(&*sink, late),
        Err(PublishError::Temporary(_))
    ));
    sink.shutdown(); // a second call is harmless
    assert_eq!(records(tmp.path()).len(), sent.len());
}

/// Needs a small file system of its own, because a write error is only real when the
/// disk really fills up: `SMTPGW_TEST_SMALL_FS=DIR` names an empty directory on one of
/// a few MiB (as root: `mount -t tmpfs -o size=3m tmpfs DIR`; scripts/test.sh does).
/// Skipped without it, failed under `CI=true`.
#[test]
fn full_disk_answers_temporary_and_recovers_when_space_returns() {
    let fs_dir = std::env::var_os("SMTPGW_TEST_SMALL_FS");
    if !harness::prerequisite(
        fs_dir.is_some(),
        "SMTPGW_TEST_SMALL_FS=DIR on a small tmpfs (scripts/test.sh mounts one)",
    ) {
        return;
    }
    let fs_dir = fs_dir.expect("checked above");
    let fs_dir = PathBuf::from(fs_dir);
    let spool = fs_dir.join("spool");
    let ballast = fs_dir.join("ballast");
    fs::write(&ballast, vec![0u8; 256 << 10]).unwrap();

    let sink = SpoolSink::open(&spool).unwrap();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for i in 0..2000 {
        let msg = message(
            "a@example.com",
            &["b@example.com"],
            &vec![b'a' + (i % 26) as u8; 8000],
        );
        match publish(&sink, msg.clone()) {
            Ok(id) => {
                assert_eq!(id, msg.id);
                accepted.push(msg);
            }
            Err(PublishError::Temporary(_)) => {
                refused.push(msg.id);
                if refused.len() == 5 {
                    break;
                }
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused.len(), 5, "the file system never filled up");

    fs::remove_file(&ballast).unwrap();
    let after = message("a@example.com", &["b@example.com"], b"space is back\r\n");
    assert_eq!(publish(&sink, after.clone()), Ok(after.id));
    accepted.push(after);
    drop(sink);

    let got = records(&spool);
    assert_eq!(
        ids(&got),
        accepted.iter().map(|m| m.id).collect::<Vec<_>>(),
        "exactly the accepted messages, none of the refused"
    );
    for (record, msg) in got.iter().zip(&accepted) {
        assert_same(record, msg);
    }
    assert!(
        segments(&spool).len() >= 2,
        "a failed segment is never written again"
    );
    fs::remove_dir_all(&spool).unwrap();
}

/// A format 1 segment (magic `SMTPGWS1`, records right after it, no commit marks) as
/// an earlier version wrote it: read, and at start-up its bad last record is still a
/// torn tail (format 1 cannot tell), and the next segment is format 2.
#[test]
fn format_1_segments_are_still_read() {
    use smtpgw::sink::spool::format::{SEGMENT_HEADER_LEN, SEGMENT_MAGIC, SEGMENT_MAGIC_V1};
    let tmp = TempDir::new().unwrap();
    let (sent, v2, last) = spool_with_three(&tmp);
    let header = SEGMENT_HEADER_LEN as usize;
    let mut v1 = SEGMENT_MAGIC_V1.to_vec();
    v1.extend_from_slice(&v2[header..]);
    let (spool, path) = spool_with_segment(&v1);
    assert_eq!(
        ids(&records(spool.path())),
        sent.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    let last_v1 = last - header + SEGMENT_MAGIC_V1.len();
    let mut damaged = v1.clone();
    damaged[last_v1 + 20] ^= 0x5a;
    fs::write(&path, &damaged).unwrap();
    check_torn_tail_recovers(&damaged, last_v1, &[sent[0].id, sent[1].id], "format 1");
    let (spool, _) = spool_with_segment(&v1);
    drop(SpoolSink::open(spool.path()).unwrap());
    let segs = segments(spool.path());
    assert_eq!(
        fs::read(&segs[0]).unwrap(),
        v1,
        "an old segment is left as it is"
    );
    assert!(fs::read(&segs[1]).unwrap().starts_with(SEGMENT_MAGIC));
}
