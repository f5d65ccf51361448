//! Producer liveness against a real broker: the test's own tansu is paused with
//! SIGSTOP for 8 s while 8 sessions send through the built gateway, then resumed.
//! tansu fences the idempotent producer after such a stall (every produce request gets
//! `PRODUCER_FENCED`, which librdkafka does not raise as fatal), so `250`s can only
//! come back if the gateway replaces its producer. Checked: `250`s resume within 5 s
//! of the resume and then every message gets one, nothing acknowledged is missing from
//! the topic (counted by reading it), `/readyz` is 503 while the sink is stuck, and the
//! log has one warning per failure streak and one recovery line.
//!
//! Two runs: a publish timeout shorter than the stall (nothing is acknowledged in time
//! while the broker is paused, so the sink is not ready during the stall, and the
//! producer is replaced as soon as the broker answers again, before tansu can fence
//! it), and one longer (clients wait; tansu 0.6 let this producer go on here, and if a
//! broker fences it, the replacement must show in the log). The fenced path itself is
//! forced with the mock cluster in `tests/kafka_liveness.rs`.

mod broker_support;
mod kafka_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use broker_support::{tansu_binary, wait, Gw, Load, Tansu};
use kafka_support::consume;

const STALL: Duration = Duration::from_secs(8);
const AFTER: Duration = Duration::from_secs(12);
const SESSIONS: usize = 8;

/// One stall at a time: they measure recovery, and share two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn stall(publish_timeout: &str, expect_stuck: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bin) = tansu_binary() else {
        return;
    };
    let topic = "smtp.stall";
    let mut broker = Tansu::on_free_port(bin);
    broker.start(topic);
    let gw = Gw::start(
        &broker.addr(),
        topic,
        &["--reactors", "2", "--publish-timeout", publish_timeout],
    );
    assert!(
        wait(Duration::from_secs(20), || gw.readyz() == 200),
        "gateway never ready"
    );

    let load = Load::start(&gw.smtp, SESSIONS);
    assert!(
        wait(Duration::from_secs(30), || load.count(250) >= 500),
        "no load before the stall"
    );
    let before = load.count(250);

    broker.pause();
    let paused_at = Instant::now();
    let mut ready = Vec::new();
    while paused_at.elapsed() < STALL {
        ready.push((Instant::now(), gw.readyz()));
        std::thread::sleep(Duration::from_millis(25));
    }
    broker.resume();
    let resumed_at = Instant::now();
    while resumed_at.elapsed() < AFTER {
        ready.push((Instant::now(), gw.readyz()));
        std::thread::sleep(Duration::from_millis(25));
    }
    let replies = load.stop();

    // Recovery: the first 250 after the last refusal that followed the resume.
    let after_resume: Vec<_> = replies.iter().filter(|r| r.at >= resumed_at).collect();
    let last_refusal = after_resume
        .iter()
        .filter(|r| r.code != 250)
        .map(|r| r.at)
        .max();
    let recovered_at = after_resume
        .iter()
        .filter(|r| r.code == 250 && last_refusal.is_none_or(|t| r.at > t))
        .map(|r| r.at)
        .min()
        .expect("no 250 after the resume: the sink stayed stuck");
    let recovery = recovered_at - resumed_at;
    let refused = replies.iter().filter(|r| r.code != 250).count();
    let acked: Vec<&str> = replies.iter().filter_map(|r| r.id.as_deref()).collect();
    let steady = after_resume.iter().filter(|r| r.at > recovered_at).count();
    let not_ready: Vec<Instant> = ready
        .iter()
        .filter(|(_, status)| *status != 200)
        .map(|(at, _)| *at)
        .collect();
    eprintln!(
        "publish timeout {publish_timeout}: {} replies ({} x 250 before the stall, {} x 250 in all, {refused} refused); \
         250s steady {recovery:?} after the resume ({steady} replies after that); /readyz not 200 in {} of {} samples",
        replies.len(),
        before,
        acked.len(),
        not_ready.len(),
        ready.len()
    );
    assert!(
        recovery <= Duration::from_secs(5),
        "250s resumed only {recovery:?} after the broker did"
    );
    assert!(steady >= 100, "too few messages after recovery ({steady})");
    assert_eq!(
        ready.last().map(|(_, s)| *s),
        Some(200),
        "/readyz not 200 after recovery"
    );
    let warnings = gw.log_lines("kafka produce requests failing");
    if expect_stuck || refused > 0 {
        assert!(
            not_ready
                .iter()
                .any(|t| *t >= paused_at && *t <= recovered_at),
            "/readyz never said 503 while the sink was stuck"
        );
        // One warning per streak (repeated at most every 10 s) and one recovery line.
        assert!(
            !warnings.is_empty() && warnings.len() <= 4,
            "expected a few streak warnings, got {}",
            warnings.len()
        );
        assert!(warnings[0].contains("failures="), "{}", warnings[0]);
        assert!(
            !gw.log_lines("new kafka producer in place").is_empty(),
            "the producer was not replaced"
        );
        assert!(
            !gw.log_lines("kafka sink recovered").is_empty(),
            "no recovery line"
        );
    } else {
        assert!(warnings.is_empty(), "streak warnings without a refusal");
    }

    let keys: HashSet<Vec<u8>> = consume(
        &broker.addr(),
        topic,
        usize::MAX,
        Duration::from_secs(5),
        Duration::from_secs(120),
    )
    .into_iter()
    .map(|r| r.key)
    .collect();
    let missing: Vec<&&str> = acked
        .iter()
        .filter(|id| !keys.contains(id.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages missing from the topic, e.g. {:?}",
        missing.len(),
        acked.len(),
        missing.first()
    );
    eprintln!(
        "all {} acknowledged messages are in the topic ({} records read)",
        acked.len(),
        keys.len()
    );
}

#[test]
fn a_stall_longer_than_the_publish_timeout_replaces_the_producer() {
    stall("3s", true);
}

#[test]
fn a_stall_shorter_than_the_publish_timeout_loses_nothing() {
    stall("30s", false);
}
