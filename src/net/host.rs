//! The reactor core both I/O backends share, without any I/O: what quinn-proto's
//! `Endpoint` is to quinn. A [`Host`] is one reactor's bookkeeping: it owns the
//! connection drivers by `{slot, generation}` (the [`Ticket`] sinks answer to), routes
//! sink answers and AUTH verdicts to them, keeps the one in-flight record of each
//! message handed to the sink (kept after its connection closed, until the answer
//! settles the gauge), follows the run phase, holds the reactor's body budget and the
//! connections waiting on it, admits connections against `--max-connections`, and
//! collects the drivers' counts for the metrics.
//!
//! A backend keeps what belongs to its syscalls in `B` (a socket, a wake-up, its
//! pending operations) next to each driver, turns socket events into driver calls and
//! asks the host to hand off what the driver produced. Whenever the host changed a
//! driver on its own (an answer, a phase change, freed budget) it tells the backend
//! which connection to look at again through a callback, so each backend keeps its own
//! way of scheduling that look (a task's `Notify`, a dirty list). Time is an input:
//! every call that may move a driver takes `now`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use super::{stamp, Admitted, Phase, PublishGauge, ReactorShared};
use crate::completion::{auth_completion, Answer, CompletionQueue, Ticket};
use crate::conn::{BodyBudget, Connection, Edge, State};
use crate::metrics::ReactorMetrics;
use crate::sink::record::SealedMessage;
use crate::sink::Completion;

/// Where a message's id and time come from (see [`Host::set_stamp`]).
#[cfg(any(test, feature = "testing"))]
pub type Stamp = fn() -> (crate::smtp::MessageId, chrono::DateTime<chrono::Utc>);

/// Generations wrap within 24 bits: the io_uring backend packs slot and generation of
/// a connection into each operation's 64-bit `user_data` next to an opcode byte.
pub const GEN_MASK: u32 = 0x00FF_FFFF;

/// After the drain deadline, how long a reactor gives its connections to write their
/// final `421` before it drops what is left.
pub const STOP_WAIT: Duration = Duration::from_secs(1);

/// A connection the host owns: its driver and what the backend keeps beside it.
pub struct Entry<B> {
    pub driver: Connection,
    pub io: B,
    /// Budget was freed while this connection waited on it: the backend's next look at
    /// it ([`Host::begin`]) lets the driver try again, right before its message goes to
    /// the sink, so each woken connection sees what the ones before it submitted.
    budget_wake: bool,
    /// Declared last: the `--max-connections` slot goes back after the driver and the
    /// backend's parts are gone.
    _admitted: Admitted,
}

/// A connection's place. Free once both the connection and its message with the sink
/// (if any) are gone; its generation then moves on, so late answers for it are dropped.
struct Slot<B> {
    gen: u32,
    conn: Option<Entry<B>>,
    /// The message this slot has with the sink, for the in-flight gauge; kept after
    /// the connection closed until the sink answers.
    flight: Option<PublishGauge>,
}

/// One reactor's connections and everything about them that is not I/O.
pub struct Host<B> {
    shared: Arc<ReactorShared>,
    queue: Arc<CompletionQueue>,
    slots: Vec<Slot<B>>,
    free: Vec<u32>,
    live: usize,
    /// Reused for every batch of answers taken from `queue`.
    answers: Vec<(Ticket, Answer)>,
    budget: BodyBudget,
    /// Connections paused because the body budget (or the sink's in-flight limit) is
    /// used up; looked at again once this reactor frees some or has a message answered.
    budget_waiters: Vec<Ticket>,
    budget_freed: bool,
    phase: Phase,
    metrics: ReactorMetrics,
    metrics_dirty: bool,
    /// The id and time each message is sealed with: [`super::stamp`], except in a
    /// simulation, which needs them to follow from its seed (the shipped build calls
    /// `stamp` directly).
    #[cfg(any(test, feature = "testing"))]
    stamp: Stamp,
}

impl<B> Host<B> {
    /// `queue` is where this reactor's sinks and AUTH verifier answer.
    pub fn new(
        shared: Arc<ReactorShared>,
        queue: Arc<CompletionQueue>,
        metrics: ReactorMetrics,
    ) -> Self {
        Host {
            budget: shared.new_budget(),
            shared,
            queue,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            answers: Vec::with_capacity(256),
            budget_waiters: Vec::new(),
            budget_freed: false,
            phase: Phase::Running,
            metrics,
            metrics_dirty: false,
            #[cfg(any(test, feature = "testing"))]
            stamp,
        }
    }

    #[cfg(any(test, feature = "testing"))]
    /// Seals messages with `stamp`'s ids and times instead of the clock's (the
    /// deterministic simulation, `tests/sim`).
    pub fn set_stamp(&mut self, stamp: Stamp) {
        self.stamp = stamp;
    }

    #[cfg(any(test, feature = "testing"))]
    /// This reactor's body budget, for tests that hold it to its bound.
    pub fn budget(&self) -> &BodyBudget {
        &self.budget
    }

    pub fn shared(&self) -> &Arc<ReactorShared> {
        &self.shared
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    #[cfg(any(test, feature = "testing"))]
    /// Connections open on this reactor.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Takes a slot of `--max-connections` for a connection just accepted. `None`: the
    /// backend sends [`Host::too_many_reply`] (one non-blocking send into the fresh
    /// socket's empty buffer; if it does not fit the client just sees the close),
    /// closes, and calls [`crate::conn::log_refused_at_accept`].
    pub fn admit(&self) -> Option<Admitted> {
        self.shared.admit()
    }

    /// `421 4.3.2 ... Too many connections`, sent instead of a greeting.
    pub fn too_many_reply(&self) -> &[u8] {
        self.shared.too_many_reply()
    }

    /// Starts the driver of an admitted connection, in the phase the reactor is in.
    /// `None`: the edge refused it at once (a PROXY header required from a source not
    /// trusted) and it has nothing to send; the backend closes the socket.
    pub fn open(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        edge: Arc<Edge>,
        admitted: Admitted,
        io: B,
    ) -> Option<Ticket> {
        let mut driver = Connection::new(
            now,
            self.shared.session.current(),
            self.shared.limits.clone(),
            self.budget.clone(),
            peer,
            edge,
        );
        if driver.state() == State::Done {
            driver.take_stats(&mut self.metrics);
            self.metrics_dirty = true;
            debug!(%peer, "connection refused by the edge");
            return None;
        }
        follow(&mut driver, now, self.phase);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    conn: None,
                    flight: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.conn = Some(Entry {
            driver,
            io,
            budget_wake: false,
            _admitted: admitted,
        });
        self.live += 1;
        Some(Ticket {
            slot,
            generation: s.gen,
        })
    }

    /// The connection `t` stands for, if it is still open.
    pub fn get(&mut self, t: Ticket) -> Option<&mut Entry<B>> {
        let s = self.slots.get_mut(t.slot as usize)?;
        if s.gen != t.generation {
            return None;
        }
        s.conn.as_mut()
    }

    /// The ticket of the connection open in `slot`, if any.
    pub fn ticket(&self, slot: u32) -> Option<Ticket> {
        let s = self.slots.get(slot as usize)?;
        s.conn.as_ref().map(|_| Ticket {
            slot,
            generation: s.gen,
        })
    }

    /// Call first whenever the backend looks at a connection: budget freed since it
    /// paused is offered to its driver now.
    pub fn begin(&mut self, now: Instant, t: Ticket) {
        if let Some(e) = self.get(t) {
            if std::mem::take(&mut e.budget_wake) {
                e.driver.handle_budget_freed(now);
            }
        }
    }

    /// Hands the credentials the connection took, if any, to the AUTH verifier, and
    /// the message it completed, if any, to the sink; both answer on the queue. A sink
    /// that answers inside its `submit` (the null sink) is answered here and now: the
    /// driver has its reply when this returns, and goes on with the input it held
    /// meanwhile, so the next message it completes is handed off in the same call.
    pub fn hand_off(&mut self, now: Instant, t: Ticket) {
        let queue = &self.queue;
        #[cfg(any(test, feature = "testing"))]
        let mut stamp = self.stamp;
        let Some(s) = self.slots.get_mut(t.slot as usize) else {
            return;
        };
        let Some(e) = s.conn.as_mut().filter(|_| s.gen == t.generation) else {
            return;
        };
        if let Some((request, verifier)) = e.driver.poll_auth() {
            // Off the reactor; a full queue answers at once, through the same queue.
            verifier.submit(request, auth_completion(queue.clone(), t));
        }
        while let Some(sealed) = e.driver.poll_message(now, &mut stamp, SealedMessage::seal) {
            let done = Completion::ticket(queue.clone(), t);
            let (flight, answer) = queue.hand_off(t, || self.shared.submit(sealed, done));
            let Some(Answer::Publish(result, stored_in)) = answer else {
                s.flight = Some(flight);
                return;
            };
            self.shared.answered(flight, &result);
            e.driver.handle_answer(now, result, stored_in);
            // Answered bodies no longer count against the budget.
            self.budget_freed = true;
        }
    }

    /// Sink answers and AUTH verdicts that arrived since the last call, matched to
    /// their connections by slot and generation; `touched` hears of every connection
    /// whose driver got one. An answer for a connection that has closed settles the
    /// in-flight gauge and frees the slot; one for an older generation is dropped.
    pub fn take_answers(&mut self, now: Instant, mut touched: impl FnMut(Ticket, &mut B)) {
        self.queue.drain_into(&mut self.answers);
        if self.answers.is_empty() {
            return;
        }
        let mut answers = std::mem::take(&mut self.answers);
        for (ticket, answer) in answers.drain(..) {
            let Some(s) = self.slots.get_mut(ticket.slot as usize) else {
                continue;
            };
            if s.gen != ticket.generation {
                continue;
            }
            let (result, stored_in) = match answer {
                Answer::Publish(result, stored_in) => (result, stored_in),
                Answer::Auth(verdict) => {
                    // A connection gone meanwhile has nothing to hear (and no flight).
                    if let Some(e) = s.conn.as_mut() {
                        e.driver.handle_auth(now, verdict);
                        touched(ticket, &mut e.io);
                    }
                    continue;
                }
            };
            if let Some(flight) = s.flight.take() {
                self.shared.answered(flight, &result);
            }
            match s.conn.as_mut() {
                Some(e) => {
                    e.driver.handle_answer(now, result, stored_in);
                    touched(ticket, &mut e.io);
                }
                None => self.release(ticket.slot),
            }
        }
        self.answers = answers;
        // Answered bodies no longer count against the budget.
        self.budget_freed = true;
    }

    /// Call last whenever the backend looks at a connection: its driver's counts go to
    /// the reactor's metrics, and a connection paused on the budget waits for it.
    pub fn end(&mut self, t: Ticket) {
        let Some(e) = self
            .slots
            .get_mut(t.slot as usize)
            .filter(|s| s.gen == t.generation)
            .and_then(|s| s.conn.as_mut())
        else {
            return;
        };
        let paused = e.driver.paused_for_budget();
        e.driver.take_stats(&mut self.metrics);
        self.metrics_dirty = true;
        if paused {
            self.budget_waiters.push(t);
        }
    }

    /// Connections paused on the body budget or the sink's in-flight limit get another
    /// look (`touched`) once some budget was freed or a message answered.
    pub fn wake_budget_waiters(&mut self, mut touched: impl FnMut(Ticket, &mut B)) {
        if !std::mem::take(&mut self.budget_freed) {
            return;
        }
        let mut waiters = std::mem::take(&mut self.budget_waiters);
        for &t in &waiters {
            // A connection registers each time it is looked at while paused: wake it
            // once.
            if let Some(e) = self.get(t).filter(|e| !e.budget_wake) {
                e.budget_wake = true;
                touched(t, &mut e.io);
            }
        }
        waiters.clear();
        self.budget_waiters = waiters;
    }

    /// Moves this reactor to `phase` (only ever forward) and every driver with it;
    /// `touched` hears of each. False if the phase did not move.
    pub fn set_phase(
        &mut self,
        now: Instant,
        phase: Phase,
        mut touched: impl FnMut(Ticket, &mut B),
    ) -> bool {
        if phase <= self.phase {
            return false;
        }
        self.phase = phase;
        for (slot, s) in self.slots.iter_mut().enumerate() {
            if let Some(e) = s.conn.as_mut() {
                follow(&mut e.driver, now, phase);
                let t = Ticket {
                    slot: slot as u32,
                    generation: s.gen,
                };
                touched(t, &mut e.io);
            }
        }
        true
    }

    /// The connection is done: its driver's last counts go to the metrics, its
    /// `--max-connections` slot is given back and its body budget freed. Returns the
    /// driver (for the closing log line) and the backend's parts. A slot whose message
    /// is still with the sink stays taken until the answer arrives.
    pub fn close(&mut self, t: Ticket) -> Option<(Connection, B)> {
        let s = self.slots.get_mut(t.slot as usize)?;
        if s.gen != t.generation {
            return None;
        }
        let Entry { mut driver, io, .. } = s.conn.take()?;
        driver.take_stats(&mut self.metrics);
        self.metrics_dirty = true;
        self.live -= 1;
        self.release(t.slot);
        self.budget_freed = true;
        Some((driver, io))
    }

    /// Frees a slot whose connection and message are both gone.
    fn release(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if s.conn.is_none() && s.flight.is_none() {
            s.gen = s.gen.wrapping_add(1) & GEN_MASK;
            self.free.push(slot);
        }
    }

    /// Whether some count waits to be published.
    pub fn metrics_dirty(&self) -> bool {
        self.metrics_dirty
    }

    /// How long this reactor's loop has been busy in all, as the backend measures it.
    pub fn set_busy(&mut self, busy: Duration) {
        self.metrics.set_busy(busy);
    }

    /// Publishes this reactor's counts.
    pub fn flush_metrics(&mut self) {
        self.metrics.flush();
        self.metrics_dirty = false;
    }

    /// Drops every connection (at reactor exit, once the kernel holds nothing of
    /// theirs).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            if s.conn.take().is_some() {
                self.live -= 1;
            }
        }
    }
}

/// What a backend does next with a connection's socket, as its driver says; the one
/// place both backends read the driver's wishes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Next {
    /// The driver is done: close the socket (once the kernel holds nothing of it).
    pub close: bool,
    /// Every reply is out and the driver closes: shut down the write side (FIN), then
    /// call `Connection::write_shut` and ask again. Reading goes on (the driver
    /// lingers) so unread client bytes do not turn the close into a reset.
    pub shutdown_write: bool,
    /// Read at most this many bytes when the socket has some; `None`: leave input in
    /// the socket, so TCP pushes back on the client.
    pub read: Option<usize>,
    /// Not reading, but a read already posted may stay posted: the driver waits only
    /// for the sink's answer, which usually comes within the reactor's turn, and a
    /// lock-step client sends nothing before it has its reply; cancelling and posting
    /// again for every message would cost a completion-based backend two operations
    /// each. Bytes that do arrive go to the driver (its pending-input cap leaves room
    /// for one read posted before the pause), and then the read is cancelled.
    pub keep_posted_read: bool,
    /// Replies wait to be written (`Connection::pending_output`).
    pub write: bool,
    /// When to call `Connection::handle_timeout`, if ever.
    pub deadline: Option<Instant>,
}

/// See [`Next`].
pub fn next(driver: &Connection) -> Next {
    let state = driver.state();
    let write = driver.wants_write();
    let read = driver.wants_read().then(|| driver.read_size_hint());
    Next {
        close: state == State::Done,
        shutdown_write: state == State::ShutdownWrite && !write,
        read,
        keep_posted_read: read.is_none() && driver.awaiting_publish(),
        write,
        deadline: driver.poll_timeout(),
    }
}

fn follow(driver: &mut Connection, now: Instant, phase: Phase) {
    match phase {
        Phase::Running => {}
        Phase::Draining => driver.begin_drain(now),
        Phase::Stop => driver.stop(now),
    }
}

#[cfg(test)]
mod tests;
