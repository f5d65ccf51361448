//! Store-and-forward (`--sink kafka --spool-fallback`) against a real broker of the
//! test's own (tansu, which keeps nothing across a restart, so each test starts the
//! gateway while no broker runs and brings one up later):
//!
//! - a 10 s outage under load: every message gets `250` (none `451`); once the broker
//!   is up the forwarder drains the backlog, and every acknowledged message is in the
//!   topic, byte for byte, with the headers a direct publish gives it; forwarded
//!   segments are deleted;
//! - SIGKILL of the gateway in the middle of forwarding: a new gateway on the same spool
//!   forwards the rest; nothing acknowledged is missing; duplicates are at most one
//!   window and no more than `smtpgw_forward_redelivered_total` counts;
//! - a backlog of many windows drains with no new mail to wake the forwarder (the
//!   stall of issue 19, made certain with a window of one record);
//! - `spool replay --after-cursor` run again and again publishes each message once;
//! - `spool hold | delete` while the forwarder waits for the broker: those messages
//!   never reach the topic; `spool release` sends a held one once the forwarder has
//!   passed it, with no new mail to wake it.

mod broker_support;
mod kafka_support;
mod spool_support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use broker_support::{body, tansu_binary, wait, Gw, Load, Reply, Tansu};
use kafka_support::{consume, Record};

const SESSIONS: usize = 8;

/// One scenario at a time: they share two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fallback_gateway(broker: &Tansu, topic: &str, spool: &Path) -> Gw {
    fallback_gateway_with(broker, topic, spool, &[])
}

fn fallback_gateway_with(broker: &Tansu, topic: &str, spool: &Path, extra: &[&str]) -> Gw {
    let mut args = vec![
        "--reactors",
        "2",
        "--spool-fallback",
        "--spool-dir",
        spool.to_str().expect("utf-8 path"),
        "--publish-timeout",
        "5s",
    ];
    args.extend_from_slice(extra);
    Gw::start(&broker.addr(), topic, &args)
}

/// The default `--forward-window`: the most records one restart may send twice.
const WINDOW: f64 = 2000.0;

/// Every record, by key, with how often it appeared.
fn read_topic(broker: &Tansu, topic: &str) -> (HashMap<Vec<u8>, Record>, usize) {
    let records = consume(
        &broker.addr(),
        topic,
        usize::MAX,
        Duration::from_secs(5),
        Duration::from_secs(180),
    );
    let total = records.len();
    let mut by_key = HashMap::new();
    for r in records {
        by_key.insert(r.key.clone(), r);
    }
    (by_key, total)
}

/// The record a direct publish gives the message with this reply: key = id, value =
/// one `Received:` line naming the id followed by exactly the bytes sent, and the
/// headers in order.
fn check_record(reply: &Reply, record: &Record) {
    let id = reply.id.as_deref().expect("a 250");
    let (s, n) = reply
        .tag
        .strip_prefix("load ")
        .and_then(|t| t.split_once('/'))
        .and_then(|(s, n)| Some((s.parse().ok()?, n.parse().ok()?)))
        .expect("tag");
    let sent = body(s, n);
    assert!(
        record.value.ends_with(&sent),
        "{id}: value does not end with the message sent"
    );
    let trace = &record.value[..record.value.len() - sent.len()];
    assert!(trace.starts_with(b"Received: "), "{id}: no Received line");
    assert!(
        trace.windows(id.len()).any(|w| w == id.as_bytes()),
        "{id}: the Received line does not name the id"
    );
    assert!(trace.ends_with(b"\r\n"), "{id}: trace line not ended");
    let names: Vec<&str> = record.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "smtp.id",
            "smtp.verb",
            "smtp.mail_from",
            "smtp.rcpt_to",
            "smtp.rcpt_to",
            "smtp.helo",
            "smtp.client_addr",
            "smtp.received_at",
            "smtp.mail_params",
            "smtp.tls",
            "smtp.schema",
            "smtp.node",
            "smtp.session",
            "smtp.dsn_ret",
            "smtp.dsn_envid",
            "smtp.rcpt_notify",
            "smtp.rcpt_notify",
            "smtp.rcpt_orcpt",
            "smtp.rcpt_orcpt",
            "smtp.auth"
        ],
        "{id}: headers"
    );
    let header = |i: usize| record.headers[i].1.as_slice();
    assert_eq!(header(0), id.as_bytes());
    assert_eq!(header(1), b"MAIL");
    assert_eq!(header(2), b"a@sender.test");
    assert_eq!(header(3), b"x@example.com");
    assert_eq!(header(4), b"y@example.com");
    assert_eq!(header(5), b"load.test");
    assert_eq!(header(10), b"1");
    assert_eq!(header(11), b"mx.test");
    assert!(
        std::str::from_utf8(header(12)).is_ok_and(|s| s.parse::<u64>().is_ok_and(|n| n > 0)),
        "{id}: smtp.session"
    );
}

fn seg_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("spool dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .count()
}

#[test]
fn a_ten_second_outage_under_load_gets_no_451_and_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = tansu_binary() else {
        return;
    };
    let topic = "smtp.forward";
    let spool = tempfile::tempdir().expect("tempdir");
    let mut broker = Tansu::on_free_port(bin);
    let gw = fallback_gateway(&broker, topic, spool.path());
    assert!(
        wait(Duration::from_secs(10), || gw.readyz() == 200),
        "with the spool to fall back on, the gateway is ready without a broker"
    );

    let load = Load::start(&gw.smtp, SESSIONS);
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let during = load.count(250);
    let backlog = gw.metric("smtpgw_forward_awaiting_records");
    let oldest = gw.metric("smtpgw_forward_oldest_age_seconds");
    // Issue 18 item 9: the fallback in use is visible, and its start is one line.
    let active_during = gw.metric("smtpgw_sink_fallback_active");
    broker.start(topic);
    let back = Instant::now();
    // Load goes on while the forwarder drains; new mail goes straight to Kafka.
    let drained_live = wait(Duration::from_secs(60), || {
        gw.metric("smtpgw_forward_awaiting_records") == 0.0
    });
    let drain = back.elapsed();
    std::thread::sleep(Duration::from_secs(5).saturating_sub(drain));
    let replies = load.stop();
    let acked: Vec<&Reply> = replies.iter().filter(|r| r.code == 250).collect();
    let refused: Vec<u16> = replies
        .iter()
        .filter(|r| r.code != 250)
        .map(|r| r.code)
        .collect();

    let drained = wait(Duration::from_secs(120), || {
        gw.metric("smtpgw_forward_awaiting_records") == 0.0
    });
    let m = gw.scrape();
    eprintln!(
        "outage {:?}: {during} x 250 during it (backlog gauge {backlog}, oldest {oldest:.1}s), {} x 250 in all, {} refused; \
         backlog drained {drain:?} after the broker came back, under load (forwarded {} records, {} bytes; oldest age now {}s)",
        back - outage,
        acked.len(),
        refused.len(),
        m.get("smtpgw_forwarded_records_total").copied().unwrap_or(f64::NAN),
        m.get("smtpgw_forwarded_bytes_total").copied().unwrap_or(f64::NAN),
        m.get("smtpgw_forward_oldest_age_seconds").copied().unwrap_or(f64::NAN),
    );
    assert!(
        refused.is_empty(),
        "refusals during the outage: {refused:?}"
    );
    assert_eq!(
        active_during, 1.0,
        "smtpgw_sink_fallback_active during the outage"
    );
    assert_eq!(
        gw.metric("smtpgw_sink_fallback_active"),
        0.0,
        "live mail went to Kafka again after the outage"
    );
    // A line when mail starts going to the fallback and one when it stops (a message
    // Kafka fails while it drains may start another run: as many stops as starts).
    let starts = gw.log_lines("mail goes to the fallback spool").len();
    let stops = gw.log_lines("mail goes to Kafka again").len();
    assert!(
        starts >= 1 && stops == starts,
        "{starts} start and {stops} stop lines"
    );
    let batches = gw.log_lines("forwarded spooled messages to kafka");
    assert!(
        !batches.is_empty()
            && batches
                .iter()
                .all(|l| l.contains("first=") && l.contains("lag_ms=")),
        "the forwarder's progress lines: {batches:?}"
    );
    assert!(
        during >= 100,
        "too little load during the outage ({during})"
    );
    assert!(
        drained_live && drained,
        "the forwarder did not drain the backlog"
    );
    assert!(
        backlog >= during as f64 * 0.5,
        "backlog gauge {backlog} for {during} spooled"
    );
    assert!(
        oldest >= 5.0,
        "oldest unforwarded age {oldest}s after a 10 s outage"
    );
    assert!(m["smtpgw_forwarded_records_total"] >= during as f64);
    assert_eq!(m["smtpgw_forward_oldest_age_seconds"], 0.0);

    let (records, total) = read_topic(&broker, topic);
    let mut missing = 0;
    for reply in &acked {
        match records.get(reply.id.as_deref().unwrap_or_default().as_bytes()) {
            Some(record) => check_record(reply, record),
            None => missing += 1,
        }
    }
    eprintln!(
        "{} records in the topic for {} acknowledged messages ({} duplicates)",
        total,
        acked.len(),
        total - records.len()
    );
    assert_eq!(missing, 0, "acknowledged messages missing from the topic");
    // Forwarded segments are gone; the one being written stays.
    assert!(
        wait(Duration::from_secs(10), || seg_files(spool.path()) == 1),
        "forwarded segments left behind: {}",
        seg_files(spool.path())
    );
}

#[test]
fn sigkill_while_forwarding_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = tansu_binary() else {
        return;
    };
    let topic = "smtp.forward.kill";
    let spool = tempfile::tempdir().expect("tempdir");
    let mut broker = Tansu::on_free_port(bin);
    let mut first = fallback_gateway(&broker, topic, spool.path());
    let load = Load::start(&first.smtp, SESSIONS);
    std::thread::sleep(Duration::from_secs(8));
    let replies = load.stop();
    let acked: Vec<&Reply> = replies.iter().filter(|r| r.code == 250).collect();
    assert_eq!(acked.len(), replies.len(), "every message gets 250");
    assert!(acked.len() >= 1000, "too little backlog ({})", acked.len());

    broker.start(topic);
    // Kill as soon as forwarding has begun and before it has finished.
    let mut at_kill = (0.0, f64::NAN);
    assert!(
        wait(Duration::from_secs(60), || {
            let m = first.scrape();
            at_kill = (
                m.get("smtpgw_forwarded_records_total")
                    .copied()
                    .unwrap_or(0.0),
                m.get("smtpgw_forward_awaiting_records")
                    .copied()
                    .unwrap_or(f64::NAN),
            );
            at_kill.0 > 0.0
        }),
        "forwarding never began"
    );
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    eprintln!(
        "killed with {} forwarded and {} awaiting of {} acknowledged",
        at_kill.0,
        at_kill.1,
        acked.len()
    );
    assert!(
        at_kill.1 > 0.0,
        "the backlog was already drained at the kill"
    );

    let second = fallback_gateway(&broker, topic, spool.path());
    let drained = wait(Duration::from_secs(120), || {
        second.metric("smtpgw_forward_awaiting_records") == 0.0
            && second.metric("smtpgw_forwarded_records_total") > 0.0
    });
    if !drained {
        let m = second.scrape();
        let show: Vec<_> = m
            .iter()
            .filter(|(k, _)| k.contains("forward") || k.contains("sink_up") || k.contains("spool_"))
            .collect();
        panic!(
            "the restarted gateway did not forward the rest: {show:?}; segments {}",
            seg_files(spool.path())
        );
    }
    let (records, total) = read_topic(&broker, topic);
    let missing: Vec<&str> = acked
        .iter()
        .filter_map(|r| r.id.as_deref())
        .filter(|id| !records.contains_key(id.as_bytes()))
        .collect();
    let duplicates = (total - records.len()) as f64;
    let redelivered = second.metric("smtpgw_forward_redelivered_total");
    eprintln!(
        "after the restart: {} records in the topic for {} acknowledged messages: {duplicates} duplicates, {redelivered} counted as redelivered",
        total,
        acked.len(),
    );
    assert!(
        duplicates <= redelivered && redelivered <= WINDOW,
        "duplicates {duplicates}, redelivered counter {redelivered}, window {WINDOW}"
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged messages missing, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    for reply in &acked {
        check_record(
            reply,
            &records[reply.id.as_deref().unwrap_or_default().as_bytes()],
        );
    }

    // A clean stop of a fallback gateway: the forwarder, the Kafka sink and the spool
    // all stop, and the process exits 0.
    let mut second = second;
    assert!(broker_support::send_signal(
        second.child.id() as i32,
        libc::SIGTERM
    ));
    let exited = wait(Duration::from_secs(60), || {
        matches!(second.child.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "the gateway did not stop after SIGTERM");
    let status = second.child.wait().expect("status");
    assert!(status.success(), "exit status {status}");
}

/// A byte flipped on disk in the middle of the backlog: the damaged record cannot be
/// forwarded, everything else is, and the segment holding the damage stays on disk for
/// `smtpgw spool` instead of being deleted with the forwarded ones.
#[test]
fn a_damaged_record_is_skipped_and_its_segment_kept() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = tansu_binary() else {
        return;
    };
    let topic = "smtp.forward.damage";
    let spool = tempfile::tempdir().expect("tempdir");
    let mut broker = Tansu::on_free_port(bin);
    let mut first = fallback_gateway(&broker, topic, spool.path());
    let load = Load::start(&first.smtp, 2);
    assert!(wait(Duration::from_secs(30), || load.count(250) >= 200));
    let replies = load.stop();
    let acked: Vec<&Reply> = replies.iter().filter(|r| r.code == 250).collect();
    assert_eq!(acked.len(), replies.len(), "every message gets 250");
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");

    // Flip one byte in the middle of the segment's records.
    let segment = spool.path().join(format!("{:020}.seg", 0));
    let mut bytes = std::fs::read(&segment).expect("segment");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&segment, &bytes).expect("write back");

    broker.start(topic);
    let second = fallback_gateway(&broker, topic, spool.path());
    assert!(
        wait(Duration::from_secs(60), || second
            .metric("smtpgw_forward_awaiting_records")
            == 0.0
            && second.metric("smtpgw_forwarded_records_total") > 0.0),
        "the backlog was not forwarded"
    );
    let (records, _) = read_topic(&broker, topic);
    let missing = acked
        .iter()
        .filter(|r| !records.contains_key(r.id.as_deref().unwrap_or_default().as_bytes()))
        .count();
    eprintln!(
        "{} acknowledged, {missing} not forwarded after one flipped byte",
        acked.len()
    );
    assert!(
        (1..=2).contains(&missing),
        "one flipped byte should cost about one record, {missing} missing"
    );
    assert!(
        segment.exists(),
        "the segment with the damaged record was deleted"
    );
    assert!(
        broker_support::wait(Duration::from_secs(10), || !second
            .log_lines("not forwarded, and the segment stays on disk")
            .is_empty()),
        "the damage was not reported"
    );
}

/// The stall of issue 19: when every record of the window was acknowledged before the
/// forwarder looked, it dropped them from the window and went to sleep with nothing
/// in flight, waking only on new spooled mail, which never comes once Kafka takes live
/// mail again. A window of one record makes that happen at the first acknowledgement;
/// with no load after the outage, only the forwarder's own pumping drains the rest.
#[test]
fn a_backlog_of_many_windows_drains_with_no_new_mail() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = tansu_binary() else {
        return;
    };
    let topic = "smtp.forward.window";
    let spool = tempfile::tempdir().expect("tempdir");
    let mut broker = Tansu::on_free_port(bin);
    let gw = fallback_gateway_with(&broker, topic, spool.path(), &["--forward-window", "1"]);
    let load = Load::start(&gw.smtp, 2);
    assert!(wait(Duration::from_secs(30), || load.count(250) >= 300));
    let replies = load.stop();
    let acked: Vec<&Reply> = replies.iter().filter(|r| r.code == 250).collect();
    assert_eq!(acked.len(), replies.len(), "every message gets 250");

    broker.start(topic);
    let drained = wait(Duration::from_secs(60), || {
        gw.metric("smtpgw_forward_awaiting_records") == 0.0
    });
    let forwarded = gw.metric("smtpgw_forwarded_records_total");
    assert!(
        drained,
        "the backlog of {} did not drain one record at a time: {forwarded} forwarded",
        acked.len()
    );
    assert_eq!(forwarded, acked.len() as f64);
    assert_eq!(gw.metric("smtpgw_forward_redelivered_total"), 0.0);
    assert_eq!(gw.metric("smtpgw_forward_restarts_total"), 0.0);
    let (records, _) = read_topic(&broker, topic);
    for reply in &acked {
        let record = records
            .get(reply.id.as_deref().unwrap_or_default().as_bytes())
            .expect("every acknowledged message is in the topic");
        check_record(reply, record);
    }
}

/// Issue 20 item 9: an emptied, truncated or unreadable forward cursor used to restart
/// forwarding from the beginning of the spool silently (empty) or with a log line only
/// (bad CRC). Each is now an `error` line naming the reason and a count in
/// `smtpgw_forward_cursor_resets_total{reason}`; an intact cursor is neither. Needs no
/// broker: the cursor is read at start, whether Kafka answers or not.
#[test]
fn a_damaged_forward_cursor_is_logged_at_error_and_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nobody = format!("127.0.0.1:{}", kafka_support::free_port());
    type Damage = fn(&std::fs::File);
    let damages: [(&str, Damage); 3] = [
        ("empty", |f| f.set_len(0).expect("truncate")),
        ("truncated", |f| f.set_len(40).expect("truncate")),
        ("unreadable", |f| {
            use std::os::unix::fs::FileExt;
            // One flipped byte in each slot: neither checks out.
            for at in [4u64, 40] {
                let mut byte = [0u8];
                f.read_exact_at(&mut byte, at).expect("read");
                f.write_all_at(&[byte[0] ^ 0x5a], at).expect("write");
            }
        }),
    ];
    for (reason, damage) in damages {
        let spool = tempfile::tempdir().expect("tempdir");
        let series = format!("smtpgw_forward_cursor_resets_total{{reason=\"{reason}\"}}");
        // A new spool writes a valid cursor: nothing to report, then or at a restart.
        for _ in 0..2 {
            let gw = broker_support::fallback_on_one_reactor(
                &nobody,
                "smtp.forward.cursor",
                spool.path(),
                &[],
            );
            assert_eq!(gw.metric(&series), 0.0, "{reason}: a fresh cursor counted");
            assert!(gw.log_lines("forward cursor").is_empty(), "{reason}");
        }
        let cursor = spool.path().join("FORWARD");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cursor)
            .expect("cursor file");
        damage(&file);
        drop(file);
        let gw = broker_support::fallback_on_one_reactor(
            &nobody,
            "smtp.forward.cursor",
            spool.path(),
            &[],
        );
        // Lines reach the log a few tens of milliseconds after their event.
        let needle = format!("forward cursor {reason}");
        broker_support::wait(Duration::from_secs(10), || {
            !gw.log_lines(&needle).is_empty()
        });
        let lines = gw.log_lines(&needle);
        assert_eq!(lines.len(), 1, "{reason}: {lines:?}");
        assert!(lines[0].contains("ERROR"), "{reason}: {}", lines[0]);
        assert!(lines[0].contains("published again"), "{}", lines[0]);
        assert_eq!(gw.metric(&series), 1.0, "{reason}");
        for other in smtpgw::sink::forward::CursorReset::ALL.map(|r| r.as_str()) {
            if other != reason {
                let series = format!("smtpgw_forward_cursor_resets_total{{reason=\"{other}\"}}");
                assert_eq!(gw.metric(&series), 0.0, "{reason} counted as {other}");
            }
        }
    }
}

/// `spool replay --after-cursor FILE`: three runs with new mail between the first two
/// publish each message exactly once (the third publishes nothing and leaves the
/// cursor as it was).
#[test]
fn incremental_replay_publishes_each_message_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = tansu_binary() else {
        return;
    };
    let topic = "smtp.replay.incremental";
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let cursor = tmp.path().join("replay.cursor");
    let mut broker = Tansu::on_free_port(bin);
    broker.start(topic);
    let store = |n: usize| -> Vec<smtpgw::sink::record::SealedMessage> {
        let sink = smtpgw::sink::spool::SpoolSink::open(&spool).expect("spool");
        let sent: Vec<_> = (0..n)
            .map(|i| {
                spool_support::message(
                    "a@example.com",
                    &["b@example.com"],
                    format!("m {i}\r\n").as_bytes(),
                )
            })
            .collect();
        for msg in &sent {
            assert_eq!(spool_support::publish(&sink, msg.clone()), Ok(msg.id));
        }
        smtpgw::sink::Sink::shutdown(&sink);
        sent
    };
    let replay = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtpgw"))
            .args(["spool", "replay", "--to-kafka", "--spool-dir"])
            .arg(&spool)
            .args(["--kafka-brokers", &broker.addr(), "--kafka-topic", topic])
            .arg("--after-cursor")
            .arg(&cursor)
            .env_remove("SMTPGW_SPOOL_DIR")
            .output()
            .expect("replay runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let mut sent = store(3);
    let stderr = replay();
    assert!(stderr.contains("published 3 messages"), "{stderr}");
    sent.extend(store(2));
    let stderr = replay();
    assert!(stderr.contains("published 2 messages"), "{stderr}");
    let before = std::fs::read(&cursor).expect("cursor");
    let stderr = replay();
    assert!(stderr.contains("published 0 messages"), "{stderr}");
    assert_eq!(std::fs::read(&cursor).expect("cursor"), before);

    let (records, total) = read_topic(&broker, topic);
    assert_eq!(total, sent.len(), "each message once");
    for msg in &sent {
        let record = records
            .get(msg.id.to_string().as_bytes())
            .expect("every message published");
        assert_eq!(record.value, &msg.value[..]);
    }
}

fn spool_tool(spool: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtpgw"))
        .arg("spool")
        .arg(args[0])
        .arg("--spool-dir")
        .arg(spool)
        .args(&args[1..])
        .env_remove("SMTPGW_SPOOL_DIR")
        .output()
        .expect("tool runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue 23 item 4, against the running gateway's forwarder: messages spooled while
/// the broker is down; one held, one deleted, one held and later released, all while
/// the forwarder is retrying. Once the broker is up everything else is forwarded and
/// the held and deleted ones are not; the release alone (no new mail) gets the
/// released one to the topic, once; the held one never arrives.
#[test]
fn hold_and_delete_while_the_forwarder_runs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = tansu_binary() else {
        return;
    };
    let topic = "smtp.forward.hold";
    let spool = tempfile::tempdir().expect("tempdir");
    let mut broker = Tansu::on_free_port(bin);
    let gw = fallback_gateway(&broker, topic, spool.path());
    let load = Load::start(&gw.smtp, 2);
    assert!(wait(Duration::from_secs(30), || load.count(250) >= 100));
    let replies = load.stop();
    let acked: Vec<String> = replies.iter().filter_map(|r| r.id.clone()).collect();
    assert_eq!(acked.len(), replies.len(), "every message gets 250");
    let (held, deleted, released) = (&acked[10], &acked[20], &acked[30]);
    for (cmd, id) in [("hold", held), ("delete", deleted), ("hold", released)] {
        let (ok, _, err) = spool_tool(spool.path(), &[cmd, id]);
        assert!(ok, "{cmd} {id}: {err}");
    }
    let (ok, out, _) = spool_tool(spool.path(), &["ls", "--pending"]);
    assert!(ok);
    assert_eq!(out.lines().count(), acked.len() - 3, "{out}");

    broker.start(topic);
    let others = (acked.len() - 3) as f64;
    assert!(
        wait(Duration::from_secs(60), || gw
            .metric("smtpgw_forward_awaiting_records")
            == 0.0
            && gw.metric("smtpgw_forwarded_records_total") >= others),
        "the backlog was not forwarded"
    );
    assert_eq!(gw.metric("smtpgw_forwarded_records_total"), others);
    let (ok, out, _) = spool_tool(spool.path(), &["ls", "--pending"]);
    assert!(ok && out.is_empty(), "nothing pending once drained: {out}");

    let (ok, _, err) = spool_tool(spool.path(), &["release", released]);
    assert!(ok, "{err}");
    assert!(
        wait(Duration::from_secs(30), || gw
            .metric("smtpgw_forwarded_records_total")
            == others + 1.0),
        "the released message was not forwarded"
    );
    let (records, total) = read_topic(&broker, topic);
    assert_eq!(total, acked.len() - 2, "each forwarded message once");
    for id in &acked {
        let there = records.contains_key(id.as_bytes());
        assert_eq!(
            there,
            id != held && id != deleted,
            "{id} in the topic: {there}"
        );
    }
    let (ok, out, _) = spool_tool(spool.path(), &["ls", "--long"]);
    assert!(ok);
    let state = |id: &str| {
        out.lines()
            .find(|l| l.starts_with(id))
            .map(|l| l.split("  ").nth(3).unwrap_or_default().to_owned())
    };
    assert_eq!(state(held).as_deref(), Some("held"), "{out}");
    assert_eq!(state(released).as_deref(), Some("forwarded"), "{out}");
    let (ok, out, _) = spool_tool(spool.path(), &["stat"]);
    assert!(ok);
    assert!(
        out.contains("forwarder: cursor") && out.contains("; 0 pending"),
        "{out}"
    );
}
