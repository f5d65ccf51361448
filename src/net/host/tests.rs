//! The reactor core without sockets or clocks: drivers are fed bytes directly, sink
//! answers are completed by the test, time is an input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::completion::Wake;
use crate::metrics::Metrics;
use crate::net::contract_tests::params;
use crate::sink::record::SealedMessage;
use crate::sink::{Completion, Sink};

/// Keeps every message with its completion for the test to answer; says it is over its
/// in-flight limit while `over` is set.
#[derive(Default)]
struct Held {
    taken: Mutex<Vec<(SealedMessage, Completion)>>,
    over: AtomicBool,
}

impl Held {
    fn answer_all(&self) -> usize {
        let taken = std::mem::take(&mut *self.taken.lock().unwrap());
        let n = taken.len();
        for (msg, done) in taken {
            done.complete(Ok(msg.id));
        }
        n
    }
}

impl Sink for Held {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        self.taken.lock().unwrap().push((msg, done));
    }
    fn shutdown(&self) {}
    fn name(&self) -> &'static str {
        "held"
    }
    fn over_inflight_limit(&self) -> bool {
        self.over.load(Ordering::SeqCst)
    }
}

struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

struct Fixture {
    host: Host<u32>,
    sink: Arc<Held>,
    metrics: Arc<Metrics>,
    t0: Instant,
}

fn fixture(max_connections: usize) -> Fixture {
    let sink = Arc::new(Held::default());
    let metrics = Arc::new(Metrics::new().expect("metrics registry"));
    let mut p = params(sink.clone(), max_connections, Duration::from_secs(60));
    p.metrics = metrics.clone();
    let shared = ReactorShared::new(&p);
    let queue = CompletionQueue::new(Box::new(NoWake));
    let host = Host::new(shared, queue, metrics.reactor(0));
    Fixture {
        host,
        sink,
        metrics,
        t0: Instant::now(),
    }
}

impl Fixture {
    fn open(&mut self, io: u32) -> Ticket {
        let admitted = self.host.admit().expect("admitted");
        let peer = "127.0.0.1:4000".parse().unwrap();
        let t = self
            .host
            .open(self.t0, peer, Arc::new(Edge::default()), admitted, io)
            .expect("opened");
        self.output(t);
        t
    }

    fn feed(&mut self, t: Ticket, at: Duration, bytes: &[u8]) {
        let now = self.t0 + at;
        self.host.get(t).unwrap().driver.handle_input(now, bytes);
        self.host.hand_off(now, t);
        self.host.end(t);
    }

    /// Everything the driver has to say, as if the socket took it all.
    fn output(&mut self, t: Ticket) -> String {
        let d = &mut self.host.get(t).unwrap().driver;
        let text = String::from_utf8_lossy(d.pending_output()).into_owned();
        let n = d.pending_output().len();
        d.output_written(self.t0, n);
        text
    }

    fn take_answers(&mut self, at: Duration) -> Vec<(Ticket, u32)> {
        let mut touched = Vec::new();
        self.host
            .take_answers(self.t0 + at, |t, io| touched.push((t, *io)));
        touched
    }

    fn inflight(&self) -> i64 {
        self.metrics.publish_inflight_messages.get()
    }
}

const TRANSACTION: &[u8] =
    b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhello\r\n.\r\n";

#[test]
fn a_sink_answer_reaches_its_connection_and_settles_the_one_flight_record() {
    let mut f = fixture(10);
    let t = f.open(7);
    // The backends end a drain when the host is empty.
    assert_eq!((f.host.len(), f.host.is_empty()), (1, false));
    f.feed(t, Duration::from_millis(1), TRANSACTION);
    assert_eq!(f.sink.taken.lock().unwrap().len(), 1);
    assert_eq!(f.inflight(), 1);
    let n = next(&f.host.get(t).unwrap().driver);
    assert!(n.read.is_none(), "nothing more is read before the answer");
    assert!(n.keep_posted_read, "but a read already posted may stay");

    assert_eq!(f.sink.answer_all(), 1);
    assert_eq!(f.take_answers(Duration::from_millis(2)), vec![(t, 7)]);
    assert_eq!(f.inflight(), 0);
    let text = f.output(t);
    assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}");
    let n = next(&f.host.get(t).unwrap().driver);
    assert!(n.read.is_some() && !n.keep_posted_read);
    // Nothing more queued: no connection is touched again.
    assert!(f.take_answers(Duration::from_millis(3)).is_empty());
}

#[test]
fn a_slot_whose_message_is_with_the_sink_outlives_its_connection() {
    let mut f = fixture(10);
    let t = f.open(1);
    f.feed(t, Duration::from_millis(1), TRANSACTION);
    let (_, io) = f.host.close(t).expect("was open");
    assert_eq!(io, 1);
    assert!(f.host.is_empty());
    assert_eq!(f.host.len(), 0);
    assert_eq!(
        f.metrics.connections_active.get(),
        0,
        "admission given back"
    );
    assert!(f.host.get(t).is_none());

    // The slot is still taken by the message: the next connection gets another one.
    let u = f.open(2);
    assert_ne!(u.slot, t.slot);

    // The late answer touches no connection but settles the gauge and frees the slot,
    // which comes back under a new generation.
    f.sink.answer_all();
    assert!(f.take_answers(Duration::from_millis(2)).is_empty());
    assert_eq!(f.inflight(), 0);
    let v = f.open(3);
    assert_eq!(v.slot, t.slot);
    assert_ne!(v.generation, t.generation);

    // An answer for the old generation is dropped, not given to its successor.
    f.feed(v, Duration::from_millis(3), TRANSACTION);
    let stale = f.sink.taken.lock().unwrap().pop().unwrap();
    Completion::ticket(f.host.queue.clone(), t).complete(Ok(stale.0.id));
    assert!(f.take_answers(Duration::from_millis(4)).is_empty());
    assert!(f.host.get(v).unwrap().driver.awaiting_publish());
    assert_eq!(
        f.inflight(),
        1,
        "the successor's message is still in flight"
    );
}

#[test]
fn admission_stops_at_max_connections_and_counts_the_refusal() {
    let mut f = fixture(1);
    let t = f.open(1);
    assert!(f.host.admit().is_none());
    assert_eq!(f.metrics.connections_rejected_max.get(), 1);
    let reply = String::from_utf8_lossy(f.host.too_many_reply()).into_owned();
    assert!(reply.starts_with("421 4.3.2 mx.test"), "{reply}");
    f.host.close(t);
    assert!(f.host.admit().is_some(), "the slot was given back");
}

#[test]
fn the_phase_reaches_open_connections_once_and_new_ones_at_open() {
    let mut f = fixture(10);
    let t = f.open(1);
    let mut touched = Vec::new();
    assert!(f
        .host
        .set_phase(f.t0, Phase::Draining, |t, io| touched.push((t, *io))));
    assert_eq!(touched, vec![(t, 1)]);
    // Only forward, and only once.
    assert!(!f
        .host
        .set_phase(f.t0, Phase::Draining, |_, _| panic!("touched")));
    assert!(!f
        .host
        .set_phase(f.t0, Phase::Running, |_, _| panic!("touched")));
    // Idle and draining: the driver says 421 and winds down.
    let text = f.output(t);
    assert!(text.contains("421 4.3.2"), "{text}");

    assert!(f.host.set_phase(f.t0, Phase::Stop, |_, _| {}));
    let peer = "127.0.0.1:4001".parse().unwrap();
    let admitted = f.host.admit().unwrap();
    let u = f
        .host
        .open(f.t0, peer, Arc::new(Edge::default()), admitted, 2)
        .unwrap();
    let text = f.output(u);
    assert!(
        text.contains("421 4.3.2"),
        "a connection opened while stopping: {text}"
    );
}

#[test]
fn a_connection_paused_on_the_sink_limit_is_woken_by_an_answer() {
    let mut f = fixture(10);
    let busy = f.open(1);
    f.feed(busy, Duration::from_millis(1), TRANSACTION);
    // The sink is over its limit: the second connection's body is not consumed.
    f.sink.over.store(true, Ordering::SeqCst);
    let paused = f.open(2);
    f.feed(
        paused,
        Duration::from_millis(2),
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n",
    );
    f.output(paused);
    f.feed(paused, Duration::from_millis(3), b"body\r\n.\r\n");
    assert!(f.host.get(paused).unwrap().driver.paused_for_budget());
    assert_eq!(
        f.sink.taken.lock().unwrap().len(),
        1,
        "only the first message"
    );

    // Nothing was freed yet: no waiter is woken.
    f.host
        .wake_budget_waiters(|_, _| panic!("woken for nothing"));

    // The first message is answered and the sink falls under its limit.
    f.sink.over.store(false, Ordering::SeqCst);
    f.sink.answer_all();
    assert_eq!(f.take_answers(Duration::from_millis(4)), vec![(busy, 1)]);
    let mut woken = Vec::new();
    f.host.wake_budget_waiters(|t, io| woken.push((t, *io)));
    assert_eq!(woken, vec![(paused, 2)]);

    // The backend's next look at it resumes the body, and its message goes out.
    let now = f.t0 + Duration::from_millis(5);
    f.host.begin(now, paused);
    f.host.hand_off(now, paused);
    assert_eq!(f.sink.taken.lock().unwrap().len(), 1, "the second message");
    assert!(!f.host.get(paused).unwrap().driver.paused_for_budget());
}

#[test]
fn a_verdict_for_a_closed_connection_does_not_reach_its_slot_successor() {
    let mut f = fixture(10);
    let t = f.open(5);
    f.host.close(t);
    let u = f.open(6);
    assert_eq!(u.slot, t.slot, "the slot was free at once");
    auth_completion(f.host.queue.clone(), t)(crate::smtp::auth::AuthVerdict::Rejected);
    assert!(f.take_answers(Duration::from_millis(1)).is_empty());
}

#[test]
fn next_says_read_write_shut_down_and_close_in_turn() {
    let mut f = fixture(10);
    let t = f.open(1);
    let n = next(&f.host.get(t).unwrap().driver);
    assert!(n.read.is_some() && !n.write && !n.shutdown_write && !n.close);
    assert!(!n.keep_posted_read);
    assert_eq!(
        n.deadline,
        Some(f.t0 + Duration::from_secs(60)),
        "the idle timeout"
    );

    f.feed(t, Duration::from_millis(1), b"QUIT\r\n");
    let n = next(&f.host.get(t).unwrap().driver);
    assert!(n.write, "the 221 waits");
    assert!(!n.shutdown_write, "not before the 221 is out");
    assert!(f.output(t).starts_with("221 "));
    let n = next(&f.host.get(t).unwrap().driver);
    assert!(n.shutdown_write && !n.write && !n.close);

    let d = &mut f.host.get(t).unwrap().driver;
    d.write_shut(f.t0 + Duration::from_millis(2));
    let n = next(d);
    assert!(!n.shutdown_write);
    assert!(
        n.read.is_some(),
        "lingers, reading what the client still sends"
    );
    d.handle_eof(f.t0 + Duration::from_millis(3));
    let n = next(d);
    assert!(n.close && n.read.is_none());
    // Not reading and no message with the sink: no read stays posted.
    assert!(!n.keep_posted_read);
}

/// Counts the reactor's wake-ups.
#[derive(Clone, Default)]
struct CountWake(Arc<std::sync::atomic::AtomicUsize>);

impl Wake for CountWake {
    fn wake(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A host over `sink` whose queue counts its wake-ups.
fn counting_host(sink: Arc<dyn Sink>) -> (Host<u32>, CountWake, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().expect("metrics registry"));
    let mut p = params(sink, 10, Duration::from_secs(60));
    p.metrics = metrics.clone();
    let wake = CountWake::default();
    let queue = CompletionQueue::new(Box::new(wake.clone()));
    let host = Host::new(ReactorShared::new(&p), queue, metrics.reactor(0));
    (host, wake, metrics)
}

#[test]
fn an_answer_given_inside_the_hand_off_is_taken_there_without_a_wake_up() {
    let (mut host, wake, metrics) = counting_host(Arc::new(crate::sink::null::NullSink::new()));
    let t0 = Instant::now();
    let admitted = host.admit().unwrap();
    let peer = "127.0.0.1:4000".parse().unwrap();
    let t = host
        .open(t0, peer, Arc::new(Edge::default()), admitted, 1)
        .unwrap();
    // Two messages in one read: the first one's answer lets the driver go on to the
    // second, which is handed off (and answered) in the same call.
    let two = [
        TRANSACTION,
        b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nagain\r\n.\r\n",
    ]
    .concat();
    host.get(t).unwrap().driver.handle_input(t0, &two);
    host.hand_off(t0, t);
    assert_eq!(wake.0.load(Ordering::SeqCst), 0, "the reactor woke itself");
    let d = &host.get(t).unwrap().driver;
    assert!(!d.awaiting_publish());
    let text = String::from_utf8_lossy(d.pending_output()).into_owned();
    assert_eq!(
        text.matches("250 2.0.0 Ok: queued as ").count(),
        2,
        "{text}"
    );
    assert_eq!(metrics.publish_inflight_messages.get(), 0);
    // Nothing was queued for a later turn.
    host.take_answers(t0, |_, _| panic!("touched again"));
    let n = next(&host.get(t).unwrap().driver);
    assert!(n.write && n.read.is_some());
}

#[test]
fn an_answer_given_after_the_hand_off_still_wakes_the_reactor() {
    let sink = Arc::new(Held::default());
    let (mut host, wake, _) = counting_host(sink.clone());
    let t0 = Instant::now();
    let admitted = host.admit().unwrap();
    let peer = "127.0.0.1:4000".parse().unwrap();
    let t = host
        .open(t0, peer, Arc::new(Edge::default()), admitted, 1)
        .unwrap();
    host.get(t).unwrap().driver.handle_input(t0, TRANSACTION);
    host.hand_off(t0, t);
    // As the spool writer does: from another thread, once the hand-off is over.
    std::thread::scope(|s| {
        s.spawn(|| sink.answer_all());
    });
    assert_eq!(wake.0.load(Ordering::SeqCst), 1);
    let mut touched = Vec::new();
    host.take_answers(t0, |t, io| touched.push((t, *io)));
    assert_eq!(touched, vec![(t, 1)]);
}

/// A slot's generation moves on at every reuse, differs from every earlier one and
/// stays within `GEN_MASK` (the io_uring backend packs it into 24 bits of each
/// operation's `user_data`), wrapping to 0: an answer for any earlier connection in
/// the slot, not only the last, is dropped.
#[test]
fn a_reused_slot_never_repeats_a_generation_and_wraps_within_the_mask() {
    let mut f = fixture(10);
    let mut earlier: Vec<Ticket> = Vec::new();
    let mut t = f.open(1);
    for _ in 0..4 {
        earlier.push(t);
        f.host.close(t);
        t = f.open(1);
        assert_eq!(t.slot, earlier[0].slot, "the slot was free at once");
        assert!(t.generation <= GEN_MASK, "{:#x}", t.generation);
        assert!(
            earlier.iter().all(|e| e.generation != t.generation),
            "{:#x} again after {earlier:?}",
            t.generation
        );
    }
    // A verdict for the connection two generations back is dropped.
    auth_completion(f.host.queue.clone(), earlier[earlier.len() - 2])(
        crate::smtp::auth::AuthVerdict::Rejected,
    );
    assert!(f.take_answers(Duration::from_millis(1)).is_empty());

    // At the top of the mask the next generation is 0.
    f.host.slots[t.slot as usize].gen = GEN_MASK;
    let top = Ticket {
        slot: t.slot,
        generation: GEN_MASK,
    };
    f.host.close(top).expect("open under the top generation");
    let wrapped = f.open(1);
    assert_eq!((wrapped.slot, wrapped.generation), (t.slot, 0));
}

/// The backend's busy time reaches `smtpgw_reactor_busy_seconds_total` through the
/// host, by the difference from what it last said (a smaller total moves nothing).
#[test]
fn busy_time_reaches_the_reactors_counter() {
    let mut f = fixture(10);
    let busy = |f: &Fixture| {
        let text = String::from_utf8(f.metrics.render(&*f.sink)).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("smtpgw_reactor_busy_seconds_total{reactor=\"0\"} "))
            .map(str::to_owned);
        line.expect("the reactor's series")
    };
    f.host.set_busy(Duration::from_millis(250));
    f.host.set_busy(Duration::from_millis(1500));
    f.host.set_busy(Duration::from_millis(1000));
    assert_eq!(
        busy(&f),
        "smtpgw_reactor_busy_seconds_total{reactor=\"0\"} 1.5"
    );
}

/// The drivers' counts wait in the host until the backend flushes them (once per
/// interval, or at exit), then reach the registry, once.
#[test]
fn counts_reach_the_registry_when_flushed_and_once() {
    let mut f = fixture(10);
    let mails = |f: &Fixture| {
        let text = String::from_utf8(f.metrics.render(&*f.sink)).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("smtpgw_commands_total{verb=\"MAIL\"} "))
            .map(str::to_owned)
    };
    assert!(!f.host.metrics_dirty());
    let t = f.open(1);
    f.feed(t, Duration::from_millis(1), TRANSACTION);
    assert!(f.host.metrics_dirty());
    assert!(
        matches!(mails(&f).as_deref(), None | Some("0")),
        "not before the flush"
    );
    f.host.flush_metrics();
    assert!(!f.host.metrics_dirty());
    assert_eq!(mails(&f).as_deref(), Some("1"));
    f.host.flush_metrics();
    assert_eq!(mails(&f).as_deref(), Some("1"), "counted once");
}

/// At reactor exit every connection goes, its admission with it, and the host is
/// empty.
#[test]
fn clear_drops_every_connection() {
    let mut f = fixture(10);
    let t = f.open(1);
    let u = f.open(2);
    f.host.clear();
    assert!(f.host.get(t).is_none() && f.host.get(u).is_none());
    assert_eq!((f.host.len(), f.host.is_empty()), (0, true));
    assert_eq!(
        f.metrics.connections_active.get(),
        0,
        "admissions given back"
    );
}
