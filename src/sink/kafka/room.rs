//! The Kafka sink's waiting room: a session's record that finds no room in the
//! producer's queue waits here, in order, and is handed to librdkafka as soon as a
//! delivery report frees a place, or answered like a timed-out message once its
//! `--publish-timeout` has run out (see "Waiting for room" in the module above).
//!
//! It owns the gate in front of librdkafka's queue (how many session records and bytes
//! librdkafka holds, at most `--max-inflight-messages` and `--max-inflight-bytes`), the
//! queue of waiting records, and the thread that hands them over.
//!
//! The gate is the sink's own count, not librdkafka's `QueueFull`: librdkafka frees a
//! delivered batch's places only once the batch's last delivery report has returned
//! (rust-rdkafka destroys the event then), so a delivery report cannot say that its own
//! place is free; a waiter it woke could find the queue still full and sleep until its
//! deadline. The gate's count drops inside each report, before the report wakes the
//! hand-over, and librdkafka's queue is sized so that it never refuses what the gate let
//! in (see `KafkaOptions::client_config`).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::OwnedHeaders;

use super::delivery::{classify, PendingDelivery};
use super::{send_record, Inner, KafkaShared, SHUT_DOWN, TIMED_OUT, UNAVAILABLE};
use crate::sink::PublishError;

/// A record waiting for a place in librdkafka's queue, with what sending it takes.
pub(super) struct Waiting {
    pending: Box<PendingDelivery>,
    timestamp_ms: i64,
    headers: Option<OwnedHeaders>,
    value: Bytes,
    partition: Option<i32>,
    /// When its publish timeout runs out; set when it first waits.
    deadline: Instant,
}

impl Waiting {
    pub(super) fn new(
        pending: Box<PendingDelivery>,
        timestamp_ms: i64,
        headers: Option<OwnedHeaders>,
        value: Bytes,
        partition: Option<i32>,
    ) -> Self {
        Waiting {
            pending,
            timestamp_ms,
            headers,
            value,
            partition,
            deadline: Instant::now(),
        }
    }

    /// Answers a record that never reached librdkafka. The in-flight count drops
    /// first: a reactor looks at it again when the answer arrives.
    pub(super) fn fail(self, shared: &KafkaShared, why: &'static str) {
        shared.sub_inflight(self.pending.bytes);
        self.pending.answer.answer(
            shared,
            Err(PublishError::Temporary(Cow::Borrowed(why))),
            None,
        );
    }
}

/// What the hand-over does next with the oldest waiting record.
pub(super) enum Next {
    /// Its publish timeout ran out: answer it.
    Expired(Waiting),
    /// It has its place in librdkafka's queue: send it.
    Admitted(Waiting),
    /// Nothing to do until a delivery report (or a new record) wakes the hand-over, or
    /// until this deadline, the oldest record's.
    Wait(Option<Instant>),
}

/// The gate and the waiting records. See the module documentation.
pub(super) struct Room {
    max_messages: usize,
    max_bytes: usize,
    timeout: Duration,
    /// Session records (and their value bytes) librdkafka holds: sent, no delivery
    /// report yet.
    queued_messages: AtomicUsize,
    queued_bytes: AtomicUsize,
    queue: Mutex<VecDeque<Waiting>>,
    /// The queue's length and bytes, read without its lock (by every delivery report
    /// and every publish, and by the metrics).
    waiting_messages: AtomicUsize,
    waiting_bytes: AtomicUsize,
    /// Wakes the hand-over; one pending wake is enough.
    wake: Sender<()>,
    /// Whether librdkafka has refused a record the gate let in (see [`hand_over`]).
    warned: AtomicBool,
}

impl Room {
    /// A gate of `max_messages` records and `max_bytes` value bytes (a record larger
    /// than that goes in alone); records wait at most `timeout`. The receiver is the
    /// hand-over's.
    pub(super) fn new(
        max_messages: usize,
        max_bytes: usize,
        timeout: Duration,
    ) -> (Room, Receiver<()>) {
        let (wake, wakes) = crossbeam_channel::bounded(1);
        let room = Room {
            max_messages: max_messages.max(1),
            max_bytes,
            timeout,
            queued_messages: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            waiting_messages: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
            wake,
            warned: AtomicBool::new(false),
        };
        (room, wakes)
    }

    /// Takes a place for a new record of `bytes`, unless records already wait (they
    /// go first) or the gate is full.
    pub(super) fn try_enter(&self, bytes: usize) -> bool {
        self.waiting_messages.load(Ordering::SeqCst) == 0 && self.admit(bytes)
    }

    fn admit(&self, bytes: usize) -> bool {
        let messages = self.queued_messages.fetch_add(1, Ordering::SeqCst);
        let queued = self.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        if messages == 0
            || (messages < self.max_messages && queued.saturating_add(bytes) <= self.max_bytes)
        {
            return true;
        }
        // Over: undo. A record refused meanwhile by this passing excess waits, and its
        // waiting wakes the hand-over, which tries again.
        self.leave(bytes);
        false
    }

    fn leave(&self, bytes: usize) {
        self.queued_messages.fetch_sub(1, Ordering::SeqCst);
        self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// A record that held a place has its delivery report (or was refused): the place
    /// is free, so the oldest waiting record may go. Called by every delivery report
    /// of a session record: two atomic subtractions and a load when nothing waits.
    pub(super) fn release(&self, bytes: usize) {
        self.leave(bytes);
        if self.waiting_messages.load(Ordering::SeqCst) > 0 {
            let _ = self.wake.try_send(());
        }
    }

    /// Queues a record at the back; its publish timeout starts now.
    pub(super) fn wait(&self, mut record: Waiting) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the lock, so the queue's deadlines never decrease: the oldest is first.
        record.deadline = Instant::now() + self.timeout;
        self.count_in(&record);
        queue.push_back(record);
        drop(queue);
        let _ = self.wake.try_send(());
    }

    /// Puts back at the front an admitted record librdkafka refused after all (it is
    /// still counted as waiting); no wake: the next delivery report or the record's
    /// deadline is what can change anything.
    fn give_back(&self, record: Waiting) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.push_front(record);
    }

    /// An admitted record has been sent, or answered: it no longer waits. Until then
    /// it counts as waiting, so that a new record does not overtake it.
    fn handed(&self, bytes: usize) {
        self.waiting_messages.fetch_sub(1, Ordering::SeqCst);
        self.waiting_bytes.fetch_sub(bytes, Ordering::SeqCst);
    }

    fn count_in(&self, record: &Waiting) {
        self.waiting_bytes
            .fetch_add(record.pending.bytes, Ordering::SeqCst);
        self.waiting_messages.fetch_add(1, Ordering::SeqCst);
    }

    /// The oldest waiting record's fate at `now`. An admitted one still counts as
    /// waiting until [`Room::handed`].
    pub(super) fn next(&self, now: Instant) -> Next {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(front) = queue.front() else {
            return Next::Wait(None);
        };
        let expired = front.deadline <= now;
        if !expired && !self.admit(front.pending.bytes) {
            return Next::Wait(Some(front.deadline));
        }
        let Some(record) = queue.pop_front() else {
            return Next::Wait(None);
        };
        if expired {
            self.handed(record.pending.bytes);
            Next::Expired(record)
        } else {
            Next::Admitted(record)
        }
    }

    /// Every waiting record, oldest first, for shutdown to answer.
    pub(super) fn take_all(&self) -> Vec<Waiting> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let all: Vec<Waiting> = queue.drain(..).collect();
        for record in &all {
            self.handed(record.pending.bytes);
        }
        all
    }

    /// Records and value bytes waiting now.
    pub(super) fn waiting(&self) -> (usize, usize) {
        (
            self.waiting_messages.load(Ordering::Relaxed),
            self.waiting_bytes.load(Ordering::Relaxed),
        )
    }

    /// librdkafka said `QueueFull` to a record the gate let in: its queue is sized so
    /// that this does not happen unless `--kafka-config` made it smaller. Said once.
    pub(super) fn refused_after_all(&self) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "librdkafka's queue is full below the sink's in-flight limits \
                 (queue.buffering.max.messages/kbytes set smaller than twice \
                 --max-inflight-messages/-bytes?); messages wait for room"
            );
        }
    }

    /// Wakes the hand-over (shutdown: it then sees the sink closed).
    pub(super) fn wake(&self) {
        let _ = self.wake.try_send(());
    }
}

/// The hand-over thread: sleeps on the room's wake (a delivery report that freed a
/// place while records wait, a record that started waiting, shutdown) or until the
/// oldest record's deadline, and then moves the queue on as far as it can.
pub(super) fn hand_over(inner: &Inner, wakes: &Receiver<()>) {
    let mut next: Option<Instant> = None;
    loop {
        let woken = match next {
            Some(deadline) => match wakes.recv_deadline(deadline) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => true,
                Err(RecvTimeoutError::Disconnected) => false,
            },
            None => wakes.recv().is_ok(),
        };
        if !woken || inner.shared.closed.load(Ordering::Acquire) {
            return;
        }
        next = pump(inner);
    }
}

/// Answers the expired records and sends the admitted ones, oldest first, until the
/// oldest has to wait; returns its deadline.
fn pump(inner: &Inner) -> Option<Instant> {
    let shared = &inner.shared;
    let room = &shared.room;
    loop {
        let record = match room.next(Instant::now()) {
            Next::Wait(deadline) => return deadline,
            Next::Expired(record) => {
                tracing::debug!(id = %record.pending.id, "kafka: no room for the message within the publish timeout");
                record.fail(shared, TIMED_OUT);
                continue;
            }
            Next::Admitted(record) => record,
        };
        let bytes = record.pending.bytes;
        let slot = inner
            .producer
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(producer) = slot.as_ref() else {
            drop(slot);
            room.handed(bytes);
            room.release(bytes);
            record.fail(shared, SHUT_DOWN);
            continue;
        };
        // As for a record arriving now: with no broker, 451 (or the fallback) at once
        // rather than another wait in librdkafka's queue.
        if !shared.healthy.load(Ordering::Acquire) {
            drop(slot);
            room.handed(bytes);
            room.release(bytes);
            record.fail(shared, UNAVAILABLE);
            continue;
        }
        let Waiting {
            pending,
            timestamp_ms,
            headers,
            value,
            partition,
            deadline,
        } = record;
        let sent = send_record(
            producer,
            inner.options.topic(),
            timestamp_ms,
            headers,
            &value,
            partition,
            pending,
        );
        drop(slot);
        let Err((error, headers, pending)) = sent else {
            room.handed(bytes);
            continue;
        };
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
            // librdkafka's queue is sized to hold twice what the gate lets in, so this
            // means `--kafka-config` made it smaller. The record keeps its place in
            // line; a delivery report or its deadline moves it on.
            room.leave(bytes);
            room.refused_after_all();
            room.give_back(Waiting {
                pending,
                timestamp_ms,
                headers,
                value,
                partition,
                deadline,
            });
            return Some(deadline);
        }
        room.handed(bytes);
        room.release(bytes);
        tracing::debug!(id = %pending.id, %error, "kafka refused the message");
        shared.sub_inflight(bytes);
        pending.answer.answer(shared, Err(classify(&error)), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::kafka::Answer;

    fn record(bytes: usize) -> Waiting {
        let (tx, _) = crossbeam_channel::unbounded();
        let pending = Box::new(PendingDelivery {
            answer: Answer::Forward { seq: 0, tx },
            id: ulid::Ulid::new(),
            bytes,
            gated: true,
        });
        Waiting::new(pending, 0, None, Bytes::from(vec![b'x'; bytes]), None)
    }

    fn id_of(next: Next) -> Option<(&'static str, ulid::Ulid)> {
        match next {
            Next::Expired(r) => Some(("expired", r.pending.id)),
            Next::Admitted(r) => Some(("admitted", r.pending.id)),
            Next::Wait(_) => None,
        }
    }

    #[test]
    fn the_gate_holds_its_counts_and_a_larger_record_goes_in_alone() {
        let (room, _wakes) = Room::new(2, 100, Duration::from_secs(30));
        assert!(room.try_enter(40));
        assert!(room.try_enter(40));
        assert!(!room.try_enter(1), "two records is the limit");
        room.release(40);
        assert!(!room.try_enter(70), "40 + 70 bytes is over 100");
        assert!(room.try_enter(60));
        room.release(40);
        room.release(60);
        assert!(
            room.try_enter(500),
            "nothing queued: a large one goes alone"
        );
        assert!(!room.try_enter(1));
        room.release(500);
        assert_eq!(room.queued_messages.load(Ordering::SeqCst), 0);
        assert_eq!(room.queued_bytes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn waiting_records_go_first_in_order_and_expire_at_their_deadline() {
        let (room, wakes) = Room::new(1, usize::MAX, Duration::from_millis(50));
        assert!(room.try_enter(10));
        let (a, b) = (record(3), record(4));
        let (a_id, b_id) = (a.pending.id, b.pending.id);
        room.wait(a);
        room.wait(b);
        assert_eq!(room.waiting(), (2, 7));
        // Waiting records go first: a new one does not pass them, even with room.
        while wakes.try_recv().is_ok() {}
        let Next::Wait(Some(a_deadline)) = room.next(Instant::now()) else {
            panic!("the gate is full: the oldest waits");
        };
        room.release(10);
        assert!(
            wakes.try_recv().is_ok(),
            "a freed place wakes the hand-over"
        );
        assert!(!room.try_enter(1), "waiting records go first");
        assert_eq!(id_of(room.next(Instant::now())), Some(("admitted", a_id)));
        // Admitted but not yet sent: still in line, so nothing overtakes it.
        assert_eq!(room.waiting(), (2, 7));
        room.handed(3);
        let Next::Wait(Some(b_deadline)) = room.next(Instant::now()) else {
            panic!("one place, taken by the first");
        };
        assert!(b_deadline >= a_deadline);
        assert_eq!(id_of(room.next(b_deadline)), Some(("expired", b_id)));
        assert_eq!(room.waiting(), (0, 0));
        assert!(matches!(room.next(b_deadline), Next::Wait(None)));
    }

    #[test]
    fn take_all_empties_the_room_oldest_first() {
        let (room, _wakes) = Room::new(1, usize::MAX, Duration::from_secs(30));
        assert!(room.try_enter(1));
        let records = [record(1), record(2), record(3)];
        let ids: Vec<_> = records.iter().map(|r| r.pending.id).collect();
        for r in records {
            room.wait(r);
        }
        let taken: Vec<_> = room.take_all().iter().map(|r| r.pending.id).collect();
        assert_eq!(taken, ids);
        assert_eq!(room.waiting(), (0, 0));
        assert!(matches!(room.next(Instant::now()), Next::Wait(None)));
    }
}
