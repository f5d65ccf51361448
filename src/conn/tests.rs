//! The driver, byte by byte and second by second: no sockets, time is an argument.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::smtp::{BareLfPolicy, SessionConfig};

pub(super) fn session_config() -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        accept_domains: ["example.com"].into_iter().collect(),
        max_message_size: 1 << 20,
        max_recipients: 100,
        bare_lf: BareLfPolicy::Reject,
        headroom: crate::smtp::test_support::HEADROOM,
    })
}

fn limits() -> ConnectionSettings {
    ConnectionSettings {
        idle_timeout: Duration::from_secs(60),
        max_session_time: Duration::from_secs(3600),
        min_data_rate: Some(MinDataRate {
            bytes_per_second: 1024,
            window: Duration::from_secs(30),
        }),
        output_cap: ConnectionSettings::DEFAULT_OUTPUT_CAP,
        sink: "test",
    }
}

fn open(t0: Instant, limits: ConnectionSettings, budget: &BodyBudget) -> Connection {
    Connection::new(
        t0,
        session_config(),
        Arc::new(limits),
        budget.clone(),
        "192.0.2.1:4000".parse().unwrap(),
        Arc::new(Edge::default()),
    )
}

/// What the driver hands to the sink layer, as these tests keep it: the id it was
/// stamped with and the message. `Connection::poll_message` takes the sealing function
/// because the driver sits below the sink layer; these tests stay below it too, and the
/// record the sink makes of a message (`sink::record`) is tested there.
#[derive(Debug)]
pub(super) struct Handed {
    pub id: MessageId,
    pub message: Message,
}

/// The sealing function these tests give the driver: keeps the id and the message.
pub(super) fn hand(message: Message, id: MessageId, _: DateTime<Utc>, _: &str) -> Handed {
    Handed { id, message }
}

pub(super) fn fixed_stamp() -> (MessageId, DateTime<Utc>) {
    (
        MessageId::from_parts(1, 2),
        DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
    )
}

/// Writes everything out and answers every message with `Ok`; returns the text.
fn drain_output(conn: &mut Connection, now: Instant, out: &mut Vec<u8>) {
    loop {
        if conn.wants_write() {
            let n = conn.pending_output().len();
            out.extend_from_slice(conn.pending_output());
            conn.output_written(now, n);
        }
        if let Some(m) = conn.poll_message(now, &mut fixed_stamp, hand) {
            conn.handle_publish(now, Ok(m.id));
            continue;
        }
        if !conn.wants_write() {
            return;
        }
    }
}

/// Feeds `input` in the given pieces, writing out and answering as a backend would.
fn run_split(input: &[u8], cuts: &[usize]) -> (Vec<u8>, State) {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let mut out = Vec::new();
    let mut last = 0;
    let mut points: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    points.push(input.len());
    points.sort_unstable();
    for p in points {
        drain_output(&mut conn, t0, &mut out);
        conn.handle_input(t0, &input[last..p]);
        last = p;
    }
    drain_output(&mut conn, t0, &mut out);
    (out, conn.state())
}

const SESSION: &[u8] = b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\n\
DATA\r\nSubject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nMAIL FROM:<a@b.example>\r\n\
RCPT TO:<y@example.com>\r\nBDAT 5\r\nhelloBDAT 3 LAST\r\nabcNOOP\r\nQUIT\r\n";

#[test]
fn whole_session_is_answered_and_closes() {
    let (out, state) = run_split(SESSION, &[]);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("220 mx.test ESMTP"), "{text}");
    assert_eq!(
        text.matches("250 2.0.0 Ok: queued as ").count(),
        2,
        "{text}"
    );
    assert!(
        text.ends_with("221 2.0.0 mx.test closing connection\r\n"),
        "{text}"
    );
    assert_eq!(state, State::ShutdownWrite);
}

#[test]
fn every_single_split_gives_the_same_replies() {
    let (whole, _) = run_split(SESSION, &[]);
    for cut in 0..=SESSION.len() {
        let (split, _) = run_split(SESSION, &[cut]);
        assert_eq!(split, whole, "split at {cut}");
    }
}

#[test]
fn byte_by_byte_gives_the_same_replies() {
    let (whole, _) = run_split(SESSION, &[]);
    let cuts: Vec<usize> = (0..SESSION.len()).collect();
    assert_eq!(run_split(SESSION, &cuts).0, whole);
}

proptest! {
    #[test]
    fn any_splits_give_the_same_replies(cuts in proptest::collection::vec(0..SESSION.len(), 0..12)) {
        let (whole, _) = run_split(SESSION, &[]);
        prop_assert_eq!(run_split(SESSION, &cuts).0, whole);
    }
}

#[test]
fn a_client_that_never_reads_stops_being_read() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let flood = b"HELP\r\n".repeat(10_000);
    let mut offered = 0;
    while conn.wants_read() && offered < flood.len() {
        let end = (offered + 4096).min(flood.len());
        conn.handle_input(t0, &flood[offered..end]);
        offered = end;
    }
    assert!(!conn.wants_read());
    // Replies stop at the cap (plus the one reply that crossed it).
    assert!(conn.pending_output().len() < ConnectionSettings::DEFAULT_OUTPUT_CAP + 1024);
    assert!(offered < 16 * 1024, "kept reading: {offered}");
    // It is dropped once it has not read for the idle timeout.
    let later = t0 + Duration::from_secs(61);
    assert!(conn.poll_timeout().unwrap() <= later);
    conn.handle_timeout(later);
    assert_eq!(conn.state(), State::Done);
    assert_eq!(conn.ending(), Some(Ending::WriteStalled));
}

#[test]
fn output_drained_resumes_buffered_commands() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let mut input = b"HELP\r\n".repeat(2_000);
    input.extend_from_slice(b"QUIT\r\n");
    conn.handle_input(t0, &input);
    let mut out = Vec::new();
    drain_output(&mut conn, t0, &mut out);
    let text = String::from_utf8(out).unwrap();
    let help_ends = text.lines().filter(|l| l.starts_with("214 ")).count();
    assert_eq!(help_ends, 2_000);
    assert!(text.ends_with("221 2.0.0 mx.test closing connection\r\n"));
}

#[test]
fn idle_timeout_says_421_then_lingers_then_done() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let mut out = Vec::new();
    drain_output(&mut conn, t0, &mut out);
    assert_eq!(conn.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    conn.handle_timeout(t0 + Duration::from_secs(59));
    assert_eq!(conn.state(), State::Open);
    let t1 = t0 + Duration::from_secs(60);
    conn.handle_timeout(t1);
    let mut stats = Counts::default();
    conn.take_stats(&mut stats);
    assert_eq!(stats.replies_421, 1, "the idle 421 is counted");
    assert!(conn
        .pending_output()
        .starts_with(b"421 4.4.2 mx.test Timeout"));
    drain_output(&mut conn, t1, &mut out);
    assert_eq!(conn.state(), State::ShutdownWrite);
    conn.write_shut(t1);
    assert_eq!(conn.state(), State::Open);
    assert!(conn.wants_read());
    conn.handle_input(t1, b"late bytes are discarded\r\n");
    assert!(!conn.wants_write());
    conn.handle_timeout(t1 + LINGER);
    assert_eq!(conn.ending(), Some(Ending::Closed));
}

#[test]
fn a_timeout_421_that_is_not_taken_ends_the_connection_after_a_short_grace() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let mut out = Vec::new();
    drain_output(&mut conn, t0, &mut out);
    // As io_uring's linked sends do, the greeting counted as written when its send was
    // queued; the client never read it, so the 421 of the idle timeout cannot go out.
    let t1 = t0 + Duration::from_secs(60);
    conn.handle_timeout(t1);
    assert!(conn.pending_output().starts_with(b"421 4.4.2"));
    assert_eq!(conn.poll_timeout(), Some(t1 + Duration::from_secs(10)));
    conn.handle_timeout(t1 + Duration::from_secs(10));
    assert_eq!(conn.ending(), Some(Ending::WriteStalled));
}

#[test]
fn a_trickled_command_line_does_not_hold_the_connection() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let mut out = Vec::new();
    drain_output(&mut conn, t0, &mut out);
    // One byte every 50 s: each arrives within the idle timeout, none completes a line.
    for (i, b) in b"NOOP".iter().enumerate() {
        let t = t0 + Duration::from_secs(50 * i as u64);
        if conn.poll_timeout().is_some_and(|d| d <= t) {
            conn.handle_timeout(t);
            drain_output(&mut conn, t, &mut out);
        }
        conn.handle_input(t, &[*b]);
    }
    drain_output(&mut conn, t0 + Duration::from_secs(200), &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("421 4.4.2"), "{text}");
}

#[test]
fn a_trickled_body_is_closed_by_the_data_rate() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let mut out = Vec::new();
    conn.handle_input(
        t0,
        b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n",
    );
    drain_output(&mut conn, t0, &mut out);
    // 10 bytes every 10 s: never idle, far below 1 KiB/s; closed at the first window.
    let mut t = t0;
    while conn.state() == State::Open {
        t += Duration::from_secs(10);
        assert!(t <= t0 + Duration::from_secs(40), "still open");
        if conn.poll_timeout().is_some_and(|d| d <= t) {
            conn.handle_timeout(t);
        }
        conn.handle_input(t, b"slowslow\r\n");
        drain_output(&mut conn, t, &mut out);
    }
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.ends_with("421 4.4.2 mx.test Data rate too low, closing connection\r\n"),
        "{text}"
    );
}

#[test]
fn a_fast_body_is_not_closed_by_the_data_rate() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let mut out = Vec::new();
    conn.handle_input(
        t0,
        b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n",
    );
    let line = [b'x'; 2046];
    let mut t = t0;
    for _ in 0..40 {
        t += Duration::from_secs(1);
        if conn.poll_timeout().is_some_and(|d| d <= t) {
            conn.handle_timeout(t);
        }
        conn.handle_input(t, &line);
        conn.handle_input(t, b"\r\n");
        drain_output(&mut conn, t, &mut out);
    }
    conn.handle_input(t, b".\r\n");
    drain_output(&mut conn, t, &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains("421"), "{text}");
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
}

#[test]
fn drain_closes_idle_sessions_now_and_busy_ones_after_their_message() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut idle = open(t0, limits(), &budget);
    let mut busy = open(t0, limits(), &budget);
    let (mut idle_out, mut busy_out) = (Vec::new(), Vec::new());
    drain_output(&mut idle, t0, &mut idle_out);
    busy.handle_input(
        t0,
        b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhi\r\n",
    );
    drain_output(&mut busy, t0, &mut busy_out);
    idle.begin_drain(t0);
    busy.begin_drain(t0);
    drain_output(&mut idle, t0, &mut idle_out);
    assert!(String::from_utf8_lossy(&idle_out)
        .ends_with("421 4.3.2 mx.test Service shutting down, closing connection\r\n"));
    assert_eq!(idle.state(), State::ShutdownWrite);
    // The busy one finishes its message and gets its 250, then 421 without waiting for
    // another command.
    busy.handle_input(t0, b".\r\n");
    drain_output(&mut busy, t0, &mut busy_out);
    let text = String::from_utf8(busy_out).unwrap();
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    assert!(
        text.ends_with("421 4.3.2 mx.test Service shutting down, closing connection\r\n"),
        "{text}"
    );
}

#[test]
fn stop_says_421_and_gives_a_short_grace() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    conn.handle_input(
        t0,
        b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhalf",
    );
    conn.stop(t0);
    assert!(String::from_utf8_lossy(conn.pending_output())
        .ends_with("421 4.3.2 mx.test Service shutting down, closing connection\r\n"));
    // The client never reads: done at the grace.
    conn.handle_timeout(t0 + STOP_GRACE);
    assert_eq!(conn.ending(), Some(Ending::Stopped));
}

#[test]
fn eof_after_quit_writes_the_reply_then_ends_without_linger() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    conn.handle_input(t0, b"NOOP\r\n");
    conn.handle_eof(t0);
    assert!(conn.wants_write());
    let n = conn.pending_output().len();
    conn.output_written(t0, n);
    assert_eq!(conn.state(), State::ShutdownWrite);
    conn.write_shut(t0);
    assert_eq!(conn.ending(), Some(Ending::Eof));
}

#[test]
fn budget_follows_bodies_and_answers() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(10_000);
    let mut a = open(t0, limits(), &budget);
    let mut b = open(t0, limits(), &budget);
    let mut out = Vec::new();
    let start = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n";
    a.handle_input(t0, start);
    drain_output(&mut b, t0, &mut out);
    let line = [b'y'; 998];
    for _ in 0..10 {
        a.handle_input(t0, &line);
        a.handle_input(t0, b"\r\n");
    }
    assert_eq!(budget.used(), 10_000);
    assert!(budget.exhausted());
    // A new transaction elsewhere is refused while the budget is spent.
    b.handle_input(t0, b"EHLO c\r\nMAIL FROM:<a@b>\r\n");
    let text = String::from_utf8_lossy(b.pending_output()).into_owned();
    assert!(
        text.ends_with("451 4.3.1 Insufficient system resources, try again later\r\n"),
        "{text}"
    );
    // The message goes to the sink: still charged until the answer.
    a.handle_input(t0, b".\r\n");
    let msg = a.poll_message(t0, &mut fixed_stamp, hand).expect("message");
    assert_eq!(budget.used(), 10_000);
    a.handle_publish(t0, Ok(msg.id));
    assert_eq!(budget.used(), 0);
    // A body abandoned by RSET... and one cut by a closed connection give theirs back.
    a.handle_input(
        t0,
        b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nBDAT 100\r\n",
    );
    a.handle_input(t0, &[b'z'; 100]);
    assert_eq!(budget.used(), 100);
    a.handle_input(t0, b"RSET\r\n");
    assert_eq!(budget.used(), 0);
    a.handle_input(
        t0,
        b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\npartial\r\n",
    );
    assert!(budget.used() > 0);
    drop(a);
    assert_eq!(budget.used(), 0);
}

#[test]
fn paused_body_is_not_read_and_resumes_when_budget_returns() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(2_000);
    let (mut a, mut b, id) = paused_pair(t0, &budget);
    assert!(!b.wants_read());
    b.handle_input(t0, b"more\r\n.\r\n");
    assert!(
        b.poll_message(t0, &mut fixed_stamp, hand).is_none(),
        "read while paused"
    );
    a.handle_publish(t0, Ok(id));
    assert!(!budget.exhausted());
    assert!(b.wants_read());
    b.output_written(t0, 0);
    b.handle_input(t0, b"");
    assert!(!b.paused_for_budget());
}

/// Two connections on a budget of 2,000 bytes: `a` has a message with the sink, so `b`'s
/// body (600 bytes in) is paused until `a` is answered.
fn paused_pair(t0: Instant, budget: &BodyBudget) -> (Connection, Connection, MessageId) {
    let mut a = open(t0, limits(), budget);
    let mut b = open(t0, limits(), budget);
    let start = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n";
    a.handle_input(t0, start);
    b.handle_input(t0, start);
    // Partial bodies alone never pause each other: that could deadlock.
    a.handle_input(t0, &[b'a'; 1_500]);
    b.handle_input(t0, &[b'b'; 600]);
    assert!(budget.exhausted());
    assert!(!b.paused_for_budget());
    // Once a message is with the sink, whose answer frees its bytes, bodies wait.
    a.handle_input(t0, b"\r\n.\r\n");
    let m = a.poll_message(t0, &mut fixed_stamp, hand).expect("message");
    assert!(b.paused_for_budget());
    for conn in [&mut a, &mut b] {
        let n = conn.pending_output().len();
        conn.output_written(t0, n);
    }
    (a, b, m.id)
}

#[test]
fn a_body_paused_on_the_budget_is_not_idle_nor_slow() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(2_000);
    let (mut a, mut b, id) = paused_pair(t0, &budget);
    // The pause outlasts the idle timeout (60 s) and several data-rate windows (30 s):
    // the gateway is the one not reading, so neither ends the session.
    while let Some(at) = b.poll_timeout() {
        if at > t0 + Duration::from_secs(200) {
            break;
        }
        b.handle_timeout(at);
        let paused_for = at - t0;
        assert_eq!(
            b.state(),
            State::Open,
            "ended while paused, at {paused_for:?}"
        );
        assert!(!b.wants_write(), "answered while paused, at {paused_for:?}");
    }
    let resumed = t0 + Duration::from_secs(200);
    a.handle_publish(resumed, Ok(id));
    b.handle_budget_freed(resumed);
    assert!(b.wants_read());
    // From the resume on the client has its whole idle timeout and a fresh rate window
    // (the last window of the pause began at 180 s).
    for (after, input) in [(10, 0), (29, 31 * 1024), (30, 0), (59, 0)] {
        let at = resumed + Duration::from_secs(after);
        b.handle_input(at, &vec![b'b'; input]);
        b.handle_timeout(at);
    }
    assert!(
        !b.wants_write(),
        "a client that sent 31 KiB in 30 s was cut"
    );
    b.handle_input(resumed + Duration::from_secs(59), b"\r\n.\r\n");
    assert!(b.poll_message(resumed, &mut fixed_stamp, hand).is_some());
}

/// The budget is shared: a pause can end before the backend's wake-up look at `b`. Until
/// `b` is told (`handle_budget_freed`), its clocks still stand.
#[test]
fn a_pause_that_ended_before_the_wake_up_is_not_idleness() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(2_000);
    let (mut a, mut b, id) = paused_pair(t0, &budget);
    b.handle_input(t0, b"\r\n.\r\n");
    let answered = t0 + Duration::from_secs(90);
    a.handle_publish(answered, Ok(id));
    assert!(!b.paused_for_budget());
    if let Some(at) = b.poll_timeout().filter(|&at| at <= answered) {
        b.handle_timeout(at.max(answered));
    }
    assert!(!b.wants_write(), "timed out before its wake-up");
    b.handle_budget_freed(answered);
    assert!(b.poll_message(answered, &mut fixed_stamp, hand).is_some());
}

/// What `take_stats` hands over, for the assertions above.
#[derive(Default)]
struct Counts {
    replies_421: u64,
    data: Vec<Duration>,
}

impl Observer for Counts {
    fn absorb(&mut self, stats: &mut SessionStats) {
        self.replies_421 += stats.reply(421);
        *stats = SessionStats::default();
    }
    fn observe_data(&mut self, took: Duration) {
        self.data.push(took);
    }
    fn observe_publish(&mut self, _: Duration) {}
    fn observe_message_size(&mut self, _: usize) {}
    fn absorb_edge(&mut self, _: &mut EdgeStats) {}
}

#[test]
fn body_time_runs_from_data_to_the_final_dot() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    conn.handle_input(
        t0,
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n",
    );
    conn.handle_input(t0 + Duration::from_secs(2), b"hi\r\n.\r\n");
    let mut counts = Counts::default();
    conn.take_stats(&mut counts);
    assert_eq!(counts.data, vec![Duration::from_secs(2)]);
}

/// The driver times bodies from the session's events in order: a body refused and the
/// next one started in the same read each get their own time (counter diffs folded
/// them into one sample and lost the second body's), and an abandoned body none.
#[test]
fn bodies_ending_and_starting_in_one_read_are_each_timed() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    let txn = "MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\n";
    // Refused for a bare LF, then a BDAT body abandoned by RSET, then a DATA body
    // that ends two reads later.
    let first =
        format!("EHLO c\r\n{txn}DATA\r\na\nb\r\n.\r\n{txn}BDAT 2\r\nabRSET\r\n{txn}DATA\r\nhi");
    conn.handle_input(t0, first.as_bytes());
    conn.handle_input(t0 + Duration::from_secs(1), b"\r\nmore");
    conn.handle_input(t0 + Duration::from_secs(3), b"\r\n.\r\n");
    assert!(conn.poll_message(t0, &mut fixed_stamp, hand).is_some());
    let mut counts = Counts::default();
    conn.take_stats(&mut counts);
    assert_eq!(counts.data, vec![Duration::ZERO, Duration::from_secs(3)]);
}

#[test]
fn reads_are_modest_between_commands_and_bulk_in_a_body() {
    let t0 = Instant::now();
    let budget = BodyBudget::new(1 << 30);
    let mut conn = open(t0, limits(), &budget);
    assert_eq!(conn.read_size_hint(), COMMAND_READ);
    conn.handle_input(
        t0,
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n",
    );
    assert_eq!(conn.read_size_hint(), usize::MAX);
}

/// Over the sink's in-flight limit, a body stops being read while this reactor has a
/// message with the sink; commands elsewhere are still answered (nothing is refused);
/// the answer to that message lets the body go on.
#[test]
fn sink_over_its_inflight_limit_pauses_bodies_not_commands() {
    use std::sync::atomic::AtomicBool;
    let t0 = Instant::now();
    let over = Arc::new(AtomicBool::new(false));
    let flag = over.clone();
    let budget =
        BodyBudget::with_sink_limit(1 << 30, Some(Arc::new(move || flag.load(Ordering::SeqCst))));
    let mut a = open(t0, limits(), &budget);
    let mut b = open(t0, limits(), &budget);
    let mut c = open(t0, limits(), &budget);
    let mut d = open(t0, limits(), &budget);
    let start = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n";
    // Over the limit with nothing of this reactor at the sink: no answer would wake
    // a pause, so bodies go on.
    over.store(true, Ordering::SeqCst);
    a.handle_input(t0, start);
    a.handle_input(t0, b"first\r\n.\r\n");
    let first = a
        .poll_message(t0, &mut fixed_stamp, hand)
        .expect("first message");
    b.handle_input(t0, start);
    assert!(
        b.paused_for_budget(),
        "a message is with the sink over its limit"
    );
    assert!(!b.wants_read());
    b.handle_input(t0, b"second\r\n.\r\n");
    assert!(
        b.poll_message(t0, &mut fixed_stamp, hand).is_none(),
        "body read while paused"
    );
    // A BDAT chunk waits the same way.
    d.handle_input(
        t0,
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nBDAT 7 LAST\r\n",
    );
    assert!(d.paused_for_budget());
    d.handle_input(t0, b"chunk\r\n");
    assert!(
        d.poll_message(t0, &mut fixed_stamp, hand).is_none(),
        "chunk read while paused"
    );
    // Commands are answered, with no refusal: only bodies wait.
    let mut out = Vec::new();
    drain_output(&mut c, t0, &mut out);
    c.handle_input(
        t0,
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nNOOP\r\n",
    );
    drain_output(&mut c, t0, &mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.ends_with("250 2.0.0 Ok\r\n"), "{text}");
    assert!(!text.contains("451") && !text.contains("452"), "{text}");
    // The sink answers and is back under its limit: the paused body goes on.
    over.store(false, Ordering::SeqCst);
    a.handle_publish(t0, Ok(first.id));
    assert!(!b.paused_for_budget());
    b.handle_budget_freed(t0);
    let second = b
        .poll_message(t0, &mut fixed_stamp, hand)
        .expect("second message");
    assert!(second.message.body().ends_with(b"second\r\n"));
    d.handle_budget_freed(t0);
    let chunked = d
        .poll_message(t0, &mut fixed_stamp, hand)
        .expect("BDAT message");
    assert!(chunked.message.body().ends_with(b"chunk\r\n"));
    b.handle_publish(t0, Ok(second.id));
    d.handle_publish(t0, Ok(chunked.id));
    assert_eq!(budget.used(), 0);
}
