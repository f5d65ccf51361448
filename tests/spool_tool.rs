//! `smtpgw spool ls | cat | export` against spools written by the real sink.

mod spool_support;

use std::fs;
use std::path::Path;

use chrono::DateTime;
use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::spool::{SpoolError, SpoolSink};
use smtpgw::spool_tool::{cat, export_mbox, ls};
use spool_support::{message, message_at, publish};
use tempfile::TempDir;

fn spool_of(dir: &Path, messages: &[SealedMessage]) {
    let sink = SpoolSink::open(dir).unwrap();
    for msg in messages {
        assert_eq!(publish(&sink, msg.clone()), Ok(msg.id));
    }
}

#[test]
fn ls_prints_one_line_per_message_id_first() {
    let tmp = TempDir::new().unwrap();
    let at = DateTime::from_timestamp_micros(1_795_428_779_123_456).unwrap();
    let sent = [
        message_at(
            at,
            "a@example.com",
            &["b@example.com", "c@example.com"],
            b"0123456789",
        ),
        message_at(at, "", &["postmaster"], b""),
    ];
    spool_of(tmp.path(), &sent);

    let mut out = Vec::new();
    ls(tmp.path(), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!(
                "{}  2026-11-23T10:12:59.123456Z  10  <a@example.com>  2 rcpt",
                sent[0].id
            ),
            format!("{}  2026-11-23T10:12:59.123456Z  0  <>  1 rcpt", sent[1].id),
        ]
    );
    for (line, msg) in lines.iter().zip(&sent) {
        assert_eq!(line.split_whitespace().next(), Some(&*msg.id.to_string()));
    }
}

#[test]
fn ls_of_missing_dir_names_it() {
    let tmp = TempDir::new().unwrap();
    let missing = tmp.path().join("nope");
    let err = ls(&missing, &mut Vec::new()).unwrap_err();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn cat_writes_the_value_or_only_the_body() {
    let tmp = TempDir::new().unwrap();
    let sent = [
        message("a@example.com", &["b@example.com"], b"first\r\n"),
        message("a@example.com", &["b@example.com"], b"\0second\xff\r\n"),
    ];
    spool_of(tmp.path(), &sent);

    let mut value = Vec::new();
    cat(tmp.path(), &sent[1].id.to_string(), false, &mut value).unwrap();
    assert_eq!(value, &sent[1].value[..]);
    assert!(value.starts_with(b"Received: "));

    let mut body = Vec::new();
    let lower = sent[1].id.to_string().to_lowercase();
    cat(tmp.path(), &lower, true, &mut body).unwrap();
    assert_eq!(body, b"\0second\xff\r\n");
}

#[test]
fn cat_with_unknown_or_malformed_id_names_id_and_dir() {
    let tmp = TempDir::new().unwrap();
    spool_of(
        tmp.path(),
        &[message("a@example.com", &["b@example.com"], b"x\r\n")],
    );
    let dir = tmp.path().display().to_string();

    let unknown = ulid::Ulid::new().to_string();
    let err = cat(tmp.path(), &unknown, false, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, SpoolError::NotFound { .. }));
    let text = err.to_string();
    assert!(text.contains(&unknown) && text.contains(&dir), "{text}");

    let err = cat(tmp.path(), "not-an-id", false, &mut Vec::new()).unwrap_err();
    assert!(matches!(err, SpoolError::BadId { .. }));
    let text = err.to_string();
    assert!(text.contains("not-an-id") && text.contains(&dir), "{text}");
}

/// An mboxrd reader, written from the framing documented in `spool_tool`, to show the
/// export can be inverted. Returns (separator line, message) pairs.
fn read_mboxrd(mbox: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut messages: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for line in mbox.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b"From ") {
            messages.push((line.to_vec(), Vec::new()));
            continue;
        }
        let (_, body) = messages.last_mut().expect("mbox starts with a separator");
        let quotes = line.iter().take_while(|&&b| b == b'>').count();
        if quotes > 0 && line[quotes..].starts_with(b"From ") {
            body.extend_from_slice(&line[1..]);
        } else {
            body.extend_from_slice(line);
        }
    }
    for (_, body) in &mut messages {
        assert_eq!(
            body.pop(),
            Some(b'\n'),
            "each message ends with a blank line"
        );
    }
    messages
}

/// Splits an exported message into the header lines the export added (marked) and the
/// stored value.
fn added_lines(exported: &[u8]) -> (Vec<String>, Vec<u8>) {
    let mut added = Vec::new();
    let mut rest = exported;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(&rest[..=end]).into_owned();
        let Some(field) = line
            .trim_end()
            .strip_suffix(" (added by smtpgw spool export)")
        else {
            break;
        };
        added.push(field.to_owned());
        rest = &rest[end + 1..];
    }
    (added, rest.to_vec())
}

#[test]
fn export_quotes_from_lines_and_round_trips() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let at = DateTime::from_timestamp_micros(1_795_428_779_000_000).unwrap();
    let early = DateTime::from_timestamp_micros(1_793_696_579_000_000).unwrap();
    let sent = [
        message_at(
            at,
            "a@example.com",
            &["b@example.com"],
            b"From: a@example.com\r\n\r\nFrom here\r\n>From there\r\n>>From everywhere\r\n\
              From\r\n>From\r\nnot From start\r\n From indented\r\n",
        ),
        message_at(
            early,
            "",
            &["b@example.com"],
            b"Subject: no final newline\n\nFrom me\n>From you",
        ),
        message_at(at, "c@example.com", &["d@example.com"], b""),
        message_at(
            at,
            "c@example.com",
            &["d@example.com"],
            b"\r\n\r\nFrom \r\n",
        ),
    ];
    spool_of(&spool, &sent);

    let mbox = tmp.path().join("out.mbox");
    assert_eq!(export_mbox(&spool, &mbox).unwrap(), sent.len());
    let bytes = fs::read(&mbox).unwrap();
    assert!(
        bytes.windows(15).any(|w| w == b"\r\n>>>From every"),
        "quoted once more"
    );

    let got = read_mboxrd(&bytes);
    assert_eq!(got.len(), sent.len());
    assert_eq!(got[0].0, b"From a@example.com Mon Nov 23 10:12:59 2026\n");
    assert_eq!(got[1].0, b"From MAILER-DAEMON Tue Nov  3 09:02:59 2026\n");
    for ((_, body), msg) in got.iter().zip(&sent) {
        let mut expected = msg.value.to_vec();
        if !expected.ends_with(b"\n") {
            expected.push(b'\n');
        }
        let (added, value) = added_lines(body);
        assert_eq!(value, expected);
        assert_eq!(added.len(), 2, "{added:?}");
    }
    assert_eq!(
        added_lines(&got[1].1).0,
        ["X-Envelope-From: <>", "X-Envelope-To: <b@example.com>"]
    );
    assert!(
        got[0]
            .1
            .starts_with(b"X-Envelope-From: <a@example.com> (added by smtpgw spool export)\r\n"),
        "CRLF mail gets CRLF header lines"
    );
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temporary file left: {leftovers:?}");
}

#[test]
fn failed_export_leaves_no_file() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    spool_of(
        &spool,
        &[message("a@example.com", &["b@example.com"], b"x\r\n")],
    );
    // A bad record in an older segment is corruption, which export must not paper over.
    let seg = spool.join("00000000000000000000.seg");
    let mut bytes = fs::read(&seg).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&seg, bytes).unwrap();
    fs::write(spool.join("00000000000000000001.seg"), b"SMTPGWS1").unwrap();

    let mbox = tmp.path().join("out.mbox");
    let err = export_mbox(&spool, &mbox).unwrap_err();
    assert!(matches!(err, SpoolError::Corrupt { .. }), "{err}");
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("spool")]);
}

/// A message to a visible and a Bcc recipient: the Bcc recipient is only in the
/// envelope, and the export keeps it, so export-then-prune loses nothing.
#[test]
fn export_keeps_the_envelope_so_a_bcc_recipient_is_recoverable() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let sent = message(
        "sender@example.com",
        &["visible@example.com", "hidden@example.net"],
        b"From: sender@example.com\r\nTo: visible@example.com\r\nSubject: hi\r\n\r\nbody\r\n",
    );
    assert!(
        !sent.value.windows(6).any(|w| w == b"hidden"),
        "only the envelope has it"
    );
    spool_of(&spool, std::slice::from_ref(&sent));
    let mbox = tmp.path().join("out.mbox");
    assert_eq!(export_mbox(&spool, &mbox).unwrap(), 1);
    let got = read_mboxrd(&fs::read(&mbox).unwrap());
    let (added, value) = added_lines(&got[0].1);
    assert_eq!(
        added,
        [
            "X-Envelope-From: <sender@example.com>",
            "X-Envelope-To: <visible@example.com>",
            "X-Envelope-To: <hidden@example.net>",
        ]
    );
    assert_eq!(value, &sent.value[..]);
}

/// `export --since ID` writes only what was stored after ID: two incremental runs
/// together hold every message exactly once; an id the spool lacks writes nothing.
#[test]
fn export_since_an_id_is_incremental() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let batch = |tag: &str, n: usize| -> Vec<SealedMessage> {
        (0..n)
            .map(|i| {
                message(
                    "a@example.com",
                    &["b@example.com"],
                    format!("{tag} {i}\r\n").as_bytes(),
                )
            })
            .collect()
    };
    let first = batch("first", 3);
    spool_of(&spool, &first);
    let one = tmp.path().join("1.mbox");
    let (n, _) =
        smtpgw::spool_tool::export_mbox_since(&spool, &one, false, false, None, &mut Vec::new())
            .unwrap();
    assert_eq!(n, 3);
    let later = batch("later", 2);
    spool_of(&spool, &later);
    let last = first[2].id.to_string();
    let two = tmp.path().join("2.mbox");
    let (n, _) = smtpgw::spool_tool::export_mbox_since(
        &spool,
        &two,
        false,
        false,
        Some(&last),
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(n, 2);
    let values = |path: &Path| -> Vec<Vec<u8>> {
        read_mboxrd(&fs::read(path).unwrap())
            .into_iter()
            .map(|(_, body)| added_lines(&body).1)
            .collect()
    };
    let mut all = values(&one);
    all.extend(values(&two));
    let sent: Vec<Vec<u8>> = first
        .iter()
        .chain(&later)
        .map(|m| m.value.to_vec())
        .collect();
    assert_eq!(all, sent, "each message exactly once, in order");

    let three = tmp.path().join("3.mbox");
    let missing = ulid::Ulid::new().to_string();
    let err = smtpgw::spool_tool::export_mbox_since(
        &spool,
        &three,
        false,
        false,
        Some(&missing),
        &mut Vec::new(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, SpoolError::NotFound { .. }), "{err}");
    assert!(!three.exists(), "nothing written for an unknown id");

    // The binary: the flag, and a one-line error naming the id.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtpgw"))
        .args([
            "spool",
            "export",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--mbox",
        ])
        .arg(tmp.path().join("4.mbox"))
        .args(["--since", &missing])
        .env_remove("SMTPGW_SPOOL_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&missing));
}

fn smtpgw_bin() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_smtpgw"));
    cmd.env_remove("SMTPGW_SPOOL_DIR");
    cmd
}

/// `--format eml`: one `.eml` per message holding the stored value exactly, and a JSON
/// envelope with every record header as stored (the Bcc recipient included), through
/// the binary.
#[test]
fn eml_export_writes_the_value_and_the_whole_envelope() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let sent = [
        message(
            "sender@example.com",
            &["visible@example.com", "hidden@example.net"],
            b"From: sender@example.com\r\nTo: visible@example.com\r\n\r\nbody\r\n",
        ),
        message("", &["postmaster"], b"\xff\0binary\r\n"),
    ];
    spool_of(&spool, &sent);
    let out_dir = tmp.path().join("eml");
    let out = smtpgw_bin()
        .args(["spool", "export", "--spool-dir"])
        .arg(&spool)
        .args(["--format", "eml"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut names: Vec<String> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = sent
        .iter()
        .flat_map(|m| [format!("{}.eml", m.id), format!("{}.json", m.id)])
        .collect();
    want.sort();
    assert_eq!(names, want, "no temporary file left");
    for msg in &sent {
        let eml = fs::read(out_dir.join(format!("{}.eml", msg.id))).unwrap();
        assert_eq!(eml, &msg.value[..]);
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(out_dir.join(format!("{}.json", msg.id))).unwrap())
                .unwrap();
        assert_eq!(json["id"], msg.id.to_string());
        assert_eq!(json["body_offset"], msg.body_offset);
        let headers: Vec<(String, Vec<u8>)> = json["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                let value = h["value"].as_str().unwrap().as_bytes().to_vec();
                (h["name"].as_str().unwrap().to_owned(), value)
            })
            .collect();
        assert_eq!(
            headers,
            spool_support::headers_of(msg),
            "every header, in order"
        );
    }
    let first: serde_json::Value =
        serde_json::from_slice(&fs::read(out_dir.join(format!("{}.json", sent[0].id))).unwrap())
            .unwrap();
    assert_eq!(first["mail_from"], "sender@example.com");
    assert_eq!(
        first["rcpt_to"],
        serde_json::json!(["visible@example.com", "hidden@example.net"]),
        "the Bcc recipient survives the export"
    );
}

/// `--after-cursor`: two runs with new mail in between emit each message once, a run
/// with nothing new writes nothing and leaves the cursor; a damaged cursor file is an
/// error naming it, never a silent restart from the beginning.
#[test]
fn export_after_a_cursor_emits_each_message_once() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let cursor = tmp.path().join("export.cursor");
    let batch = |tag: &str, n: usize| -> Vec<SealedMessage> {
        (0..n)
            .map(|i| {
                message(
                    "a@example.com",
                    &["b@example.com"],
                    format!("{tag} {i}\r\n").as_bytes(),
                )
            })
            .collect()
    };
    let run = |out: &Path, format: &str| {
        let out = smtpgw_bin()
            .args(["spool", "export", "--spool-dir"])
            .arg(&spool)
            .args(["--format", format])
            .arg(out)
            .arg("--after-cursor")
            .arg(&cursor)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let first = batch("first", 3);
    spool_of(&spool, &first);
    let stderr = run(&tmp.path().join("1.mbox"), "mbox");
    assert!(stderr.contains("exported 3 messages"), "{stderr}");
    let saved = fs::read_to_string(&cursor).unwrap();
    assert!(
        saved.starts_with("smtpgw-spool-cursor 1 ")
            && saved.ends_with(&format!(" {}\n", first[2].id)),
        "{saved}"
    );

    let later = batch("later", 2);
    spool_of(&spool, &later);
    let stderr = run(&tmp.path().join("2.mbox"), "mbox");
    assert!(stderr.contains("exported 2 messages"), "{stderr}");
    let values = |path: &Path| -> Vec<Vec<u8>> {
        read_mboxrd(&fs::read(path).unwrap())
            .into_iter()
            .map(|(_, body)| added_lines(&body).1)
            .collect()
    };
    let mut all = values(&tmp.path().join("1.mbox"));
    all.extend(values(&tmp.path().join("2.mbox")));
    let sent: Vec<Vec<u8>> = first
        .iter()
        .chain(&later)
        .map(|m| m.value.to_vec())
        .collect();
    assert_eq!(all, sent, "each message exactly once, in order");

    // Nothing new: nothing written, the cursor stays.
    let before = fs::read(&cursor).unwrap();
    let eml = tmp.path().join("eml");
    let stderr = run(&eml, "eml");
    assert!(stderr.contains("exported 0 messages"), "{stderr}");
    assert_eq!(fs::read_dir(&eml).unwrap().count(), 0);
    assert_eq!(fs::read(&cursor).unwrap(), before);
    // The same cursor drives an eml export of what comes next.
    let third = batch("third", 1);
    spool_of(&spool, &third);
    run(&eml, "eml");
    assert_eq!(
        fs::read(eml.join(format!("{}.eml", third[0].id))).unwrap(),
        &third[0].value[..]
    );
    assert_eq!(fs::read_dir(&eml).unwrap().count(), 2);

    fs::write(&cursor, b"smtpgw-spool-cursor 1 garbage\n").unwrap();
    let out = smtpgw_bin()
        .args(["spool", "export", "--spool-dir"])
        .arg(&spool)
        .arg(tmp.path().join("3.mbox"))
        .arg("--after-cursor")
        .arg(&cursor)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&cursor.display().to_string()), "{stderr}");
    assert!(!tmp.path().join("3.mbox").exists());
}

fn tool(spool: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = smtpgw_bin()
        .arg("spool")
        .arg(args[0])
        .arg("--spool-dir")
        .arg(spool)
        .args(&args[1..])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `hold`, `release`, `delete` through the binary: `ls --long` shows the state, export
/// leaves held and deleted messages out, prune keeps a segment holding a held message,
/// an unknown or malformed id exits 2 and writes nothing, a release of a message that
/// is not held exits 1.
#[test]
fn hold_release_and_delete_are_honoured_by_ls_export_and_prune() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let old = message_at(
        DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap(),
        "a@example.com",
        &["b@example.com", "bcc@example.net"],
        b"held\r\n",
    );
    spool_of(&spool, std::slice::from_ref(&old));
    let sent = [
        message("a@example.com", &["c@example.com"], b"kept\r\n"),
        message("a@example.com", &["d@example.com"], b"deleted\r\n"),
    ];
    spool_of(&spool, &sent);
    let (held, kept, deleted) = (
        old.id.to_string(),
        sent[0].id.to_string(),
        sent[1].id.to_string(),
    );

    assert_eq!(tool(&spool, &["hold", &held]).0, Some(0));
    let (code, _, err) = tool(&spool, &["hold", &held]);
    assert_eq!(code, Some(0));
    assert!(err.contains("already held"), "{err}");
    assert_eq!(tool(&spool, &["delete", &deleted]).0, Some(0));
    let missing = ulid::Ulid::new().to_string();
    for bad in [missing.as_str(), "not-an-id"] {
        let (code, _, err) = tool(&spool, &["hold", bad]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(bad), "{err}");
    }
    let (code, _, err) = tool(&spool, &["release", &kept]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not held"), "{err}");
    let (code, _, err) = tool(&spool, &["release", &deleted]);
    assert_eq!(code, Some(1), "{err}");

    let (code, out, _) = tool(&spool, &["ls", "--long"]);
    assert_eq!(code, Some(0));
    let states: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split("  ").collect();
            (f[0].to_owned(), f[3].to_owned())
        })
        .collect();
    assert_eq!(
        states,
        [
            (held.clone(), "held".to_owned()),
            (kept.clone(), "stored".to_owned()),
            (deleted.clone(), "deleted".to_owned())
        ]
    );
    assert!(
        out.lines()
            .next()
            .unwrap()
            .ends_with("<b@example.com>,<bcc@example.net>"),
        "{out}"
    );

    let eml = tmp.path().join("eml");
    let (code, _, err) = tool(
        &spool,
        &["export", "--format", "eml", eml.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("exported 1 messages") && err.contains("left out 2"),
        "{err}"
    );
    assert!(eml.join(format!("{kept}.eml")).exists());

    // The held message is alone in the older, closed segment: prune keeps it.
    let (code, _, err) = tool(&spool, &["prune", "--before", "2100-01-01T00:00:00Z"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("deleted 0 segments") && err.contains("held"),
        "{err}"
    );
    assert_eq!(tool(&spool, &["release", &held]).0, Some(0));
    let (_, out, _) = tool(&spool, &["ls", "--long"]);
    assert!(out.lines().next().unwrap().contains("  stored  "), "{out}");
    let (code, _, err) = tool(&spool, &["prune", "--before", "2100-01-01T00:00:00Z"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("deleted 1 segments"), "{err}");
}

/// A damaged tombstone is reported by `spool check` (exit 1) and ignored by the rest
/// (the message keeps the state the other tombstones give it); half a record at the
/// end (an append a crash cut short) is a note, not corruption.
#[test]
fn a_damaged_tombstone_is_reported_by_check_and_never_crashes() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let sent = [
        message("a@example.com", &["b@example.com"], b"one\r\n"),
        message("a@example.com", &["b@example.com"], b"two\r\n"),
    ];
    spool_of(&spool, &sent);
    assert_eq!(tool(&spool, &["hold", &sent[0].id.to_string()]).0, Some(0));
    assert_eq!(tool(&spool, &["hold", &sent[1].id.to_string()]).0, Some(0));
    let path = spool.join("TOMBSTONES");
    let mut bytes = fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 8 + 2 * 48);
    let (code, out, _) = tool(&spool, &["check"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("2 tombstones; 0 corrupt"), "{out}");

    bytes[8 + 48 + 20] ^= 0x01; // the second hold's position
    bytes.extend_from_slice(&[2, 1, 0, 0, 7]);
    fs::write(&path, &bytes).unwrap();
    let (code, _, err) = tool(&spool, &["check"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("TOMBSTONES offset 56 length 48: tombstone checksum mismatch"),
        "{err}"
    );
    assert!(err.contains("note: tombstone append cut short"), "{err}");
    let (code, out, _) = tool(&spool, &["ls", "--long"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("  held  ") && lines[1].contains("  stored  "),
        "{out}"
    );
    // Holding again repairs it: the cut-short append is cut off, the new one counts.
    assert_eq!(tool(&spool, &["hold", &sent[1].id.to_string()]).0, Some(0));
    let (_, out, _) = tool(&spool, &["ls", "--long"]);
    assert!(out.lines().nth(1).unwrap().contains("  held  "), "{out}");
    let (code, _, err) = tool(&spool, &["check"]);
    assert_eq!(code, Some(1), "the damaged record is still reported: {err}");
    assert!(!err.contains("cut short"), "{err}");

    // Garbage instead of a log: reported, and nothing crashes.
    fs::write(&path, b"not a tombstone log at all, just text\n").unwrap();
    let (code, _, err) = tool(&spool, &["check"]);
    assert_eq!(code, Some(1), "{err}");
    for cmd in ["ls", "stat"] {
        let (code, _, err) = tool(&spool, &[cmd]);
        assert_eq!(code, Some(0), "{cmd}: {err}");
    }
}

/// `spool stat`: counts and bytes by state and age, the oldest stored message; with no
/// forwarder it says so.
#[test]
fn stat_counts_by_state_and_age() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let now = chrono::Utc::now();
    let sent = [
        message_at(
            now - chrono::Duration::days(10),
            "a@example.com",
            &["b@example.com"],
            b"old\r\n",
        ),
        message_at(
            now - chrono::Duration::hours(2),
            "a@example.com",
            &["b@example.com"],
            b"hours\r\n",
        ),
        message_at(now, "a@example.com", &["b@example.com"], b"new\r\n"),
    ];
    spool_of(&spool, &sent);
    assert_eq!(tool(&spool, &["hold", &sent[1].id.to_string()]).0, Some(0));
    let (stat, _) = smtpgw::spool_tool::stat_of(&spool, now, &mut Vec::new()).unwrap();
    let held = smtpgw::spool_tool::MessageState::ALL
        .iter()
        .position(|s| *s == smtpgw::spool_tool::MessageState::Held)
        .unwrap();
    assert_eq!(stat.by_state[held].0, 1);
    assert_eq!(stat.by_state.iter().map(|s| s.0).sum::<u64>(), 3);
    assert_eq!(stat.by_age.map(|b| b.0), [1, 0, 1, 0, 1]);
    assert_eq!(stat.oldest_pending.map(|(id, _)| id), Some(sent[0].id));
    assert_eq!(stat.forward_cursor, None);

    let (code, out, err) = tool(&spool, &["stat"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("held"), "{out}");
    assert!(
        out.contains(&format!("oldest stored: {}", sent[0].id)),
        "{out}"
    );
    assert!(out.contains("forwarder: none"), "{out}");
}

/// The cursor moves only once the output is durable: an export that fails (its mbox
/// exists, its eml directory is a file) leaves the cursor as it was, and the next
/// run that succeeds exports what the failed ones did not.
#[test]
fn a_failed_export_leaves_the_cursor_where_it_was() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let cursor = tmp.path().join("cursor");
    let sent = [
        message("a@example.com", &["b@example.com"], b"one\r\n"),
        message("a@example.com", &["b@example.com"], b"two\r\n"),
    ];
    spool_of(&spool, &sent[..1]);
    let c = cursor.to_str().unwrap();
    let first = tmp.path().join("1.mbox");
    let (code, _, err) = tool(
        &spool,
        &["export", first.to_str().unwrap(), "--after-cursor", c],
    );
    assert_eq!(code, Some(0), "{err}");
    let saved = fs::read(&cursor).unwrap();
    spool_of(&spool, &sent[1..]);

    // The mbox exists already (no --force), and a file stands where the eml
    // directory should be.
    let (code, _, err) = tool(
        &spool,
        &["export", first.to_str().unwrap(), "--after-cursor", c],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("exists"), "{err}");
    let blocked = tmp.path().join("blocked");
    fs::write(&blocked, b"").unwrap();
    let (code, _, err) = tool(
        &spool,
        &[
            "export",
            "--format",
            "eml",
            blocked.to_str().unwrap(),
            "--after-cursor",
            c,
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(fs::read(&cursor).unwrap(), saved, "the cursor did not move");

    let eml = tmp.path().join("eml");
    let (code, _, err) = tool(
        &spool,
        &[
            "export",
            "--format",
            "eml",
            eml.to_str().unwrap(),
            "--after-cursor",
            c,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("exported 1 messages"), "{err}");
    assert!(eml.join(format!("{}.eml", sent[1].id)).exists());
    let (_, out, err) = tool(&spool, &["ls", "--pending"]);
    assert!(out.is_empty() && err.contains("no forwarder"), "{err}");
}

/// With a cursor, export stops the newest segment at its commit mark: a record written
/// but not yet answered (its batch may still fail and be cut off, and other records
/// written in its place) is left for the next run, so the cursor never points past it.
#[test]
fn an_incremental_export_stops_at_the_commit_mark() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let sent = [
        message("a@example.com", &["b@example.com"], b"answered\r\n"),
        message("a@example.com", &["b@example.com"], b"in flight\r\n"),
    ];
    spool_of(&spool, &sent);
    let segment = fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let whole = fs::read(&segment).unwrap();
    let first_end = smtpgw::sink::spool::read_all(&spool)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .next_position()
        .offset;
    let mut bytes = whole.clone();
    spool_support::mark_acknowledged_up_to(&mut bytes, first_end);
    fs::write(&segment, &bytes).unwrap();

    let cursor = tmp.path().join("cursor");
    let c = cursor.to_str().unwrap();
    let one = tmp.path().join("1");
    let (code, _, err) = tool(
        &spool,
        &[
            "export",
            "--format",
            "eml",
            one.to_str().unwrap(),
            "--after-cursor",
            c,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("exported 1 messages"), "{err}");
    assert!(one.join(format!("{}.eml", sent[0].id)).exists());
    assert!(fs::read_to_string(&cursor)
        .unwrap()
        .contains(&format!(":{first_end} ")));
    // Without a cursor everything written is exported, as before.
    let all = tmp.path().join("all.mbox");
    let (_, _, err) = tool(&spool, &["export", all.to_str().unwrap()]);
    assert!(err.contains("exported 2 messages"), "{err}");

    // Answered now: the next run takes it.
    fs::write(&segment, &whole).unwrap();
    let two = tmp.path().join("2");
    let (code, _, err) = tool(
        &spool,
        &[
            "export",
            "--format",
            "eml",
            two.to_str().unwrap(),
            "--after-cursor",
            c,
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("exported 1 messages"), "{err}");
    assert!(two.join(format!("{}.eml", sent[1].id)).exists());
}

/// `prune --before-cursor FILE`: the retention loop with a cursor deletes exactly the
/// closed segments the incremental export has handed on, never one it has not read,
/// however old.
#[test]
fn prune_before_a_cursor_deletes_only_what_was_exported() {
    let tmp = TempDir::new().unwrap();
    let spool = tmp.path().join("spool");
    let cursor = tmp.path().join("cursor");
    let c = cursor.to_str().unwrap();
    let old = |body: &[u8]| {
        message_at(
            DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap(),
            "a@example.com",
            &["b@example.com"],
            body,
        )
    };
    let (code, _, err) = tool(&spool, &["prune", "--before-cursor", c]);
    assert_eq!(code, Some(1), "no cursor yet: {err}");
    assert!(err.contains(c), "{err}");

    spool_of(&spool, &[old(b"exported\r\n")]);
    let one = tmp.path().join("1.mbox");
    let (code, _, err) = tool(
        &spool,
        &["export", one.to_str().unwrap(), "--after-cursor", c],
    );
    assert_eq!(code, Some(0), "{err}");
    // Two more segments after the export: the first is closed and old, but unexported.
    spool_of(&spool, &[old(b"not exported\r\n")]);
    spool_of(&spool, &[old(b"newest\r\n")]);
    let (code, _, err) = tool(&spool, &["prune", "--before-cursor", c]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("deleted 1 segments"), "{err}");
    let (_, out, _) = tool(&spool, &["ls"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    // A time cut-off would have taken the unexported one as well.
    let (_, _, err) = tool(
        &spool,
        &["prune", "--before", "2100-01-01T00:00:00Z", "--dry-run"],
    );
    assert!(err.contains("would delete 1 segments"), "{err}");
}
