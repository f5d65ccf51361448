//! The epoll backend: `--reactors` OS threads, each with its own tokio `current_thread`
//! runtime and its own SO_REUSEPORT listener, so nothing on the hot path is shared
//! between reactors except the global connection count.
//!
//! A connection is one local task that moves bytes between its socket and its
//! [`Connection`] driver and does nothing else: it reads while the driver wants input
//! (into the reactor's one receive buffer, so an idle connection holds none), writes
//! what the driver has to say, hands the driver's messages to the sink (and its AUTH
//! credentials to the verifier), and wakes the driver at its deadlines. Sink answers and
//! AUTH verdicts arrive on the reactor's [`CompletionQueue`] with a ticket; a dispatcher
//! task routes each to its connection.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::LocalSet;
use tracing::{debug, info, warn};

use super::{
    accept_exhausted, bind_all, stamp, Admitted, InFlight, NetError, Phase, ReactorParams, Shared,
    ACCEPT_BACKOFF,
};
use crate::conn::{BodyBudget, Connection, Edge, State};
use crate::liveness::Liveness;
use crate::metrics::{ReactorMetrics, FLUSH_INTERVAL};
use crate::sink::{
    auth_completion, Answer, Completion, CompletionQueue, PublishResult, StoredIn, Ticket, Wake,
};
use crate::smtp::auth::AuthVerdict;

/// The reactor's receive buffer: every read of every connection of a reactor lands here
/// and is handed to the driver at once, which keeps only what it cannot consume yet.
const READ_BUF: usize = 64 * 1024;
/// After the drain deadline, how long a reactor waits for its connections to write
/// their final `421` before its runtime (and every task) is dropped.
const STOP_WAIT: Duration = Duration::from_secs(1);

thread_local! {
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

/// The running reactors.
pub struct Reactors {
    local_addr: SocketAddr,
    pub(super) shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    threads: Vec<JoinHandle<()>>,
}

impl Reactors {
    /// Binds every listener and starts the reactor threads. All binding happens here, on
    /// the caller's thread, so a bad `--listen` fails before anything runs.
    pub fn start(p: ReactorParams) -> Result<Reactors, NetError> {
        let reactors = p.reactors.max(1);
        let (addrs, listeners) = bind_all(&p, reactors)?;
        let local_addr = addrs[0];
        let shared = Shared::new(&p);
        let (phase, _) = watch::channel(Phase::Running);

        let mut threads = Vec::with_capacity(reactors);
        let mut liveness_wakers: Vec<Box<dyn Wake>> = Vec::with_capacity(reactors);
        for (i, std_listeners) in listeners.into_iter().enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                // The reactor's log lines go to the writer before it sleeps.
                .on_thread_park(crate::logging::flush_this_thread)
                .build()
                .map_err(NetError::Reactor)?;
            // Registers the sockets with this reactor's own I/O driver.
            let mut listener = Vec::with_capacity(std_listeners.len());
            for ((std_listener, edge), (spec, addr)) in std_listeners
                .into_iter()
                .zip(p.listeners.iter().zip(&addrs))
            {
                let _guard = rt.enter();
                let l = TcpListener::from_std(std_listener).map_err(|source| NetError::Bind {
                    flag: spec.kind.flag(),
                    addr: *addr,
                    source,
                })?;
                listener.push((l, edge));
            }
            let shared = shared.clone();
            let phase_rx = phase.subscribe();
            let metrics = shared.metrics.reactor(i);
            let asked = Arc::new(Notify::new());
            liveness_wakers.push(Box::new(NotifyWake(asked.clone())));
            let handle = std::thread::Builder::new()
                .name(format!("smtpgw-reactor-{i}"))
                .spawn(move || {
                    crate::logging::batch_this_thread();
                    let local = LocalSet::new();
                    let reactor = Reactor::new(shared, metrics);
                    rt.block_on(local.run_until(run(listener, reactor, phase_rx, (i, asked))));
                    // Dropping the runtime drops whatever connections are left.
                    drop(local);
                    drop(rt);
                    crate::logging::flush_this_thread();
                })
                .map_err(NetError::Reactor)?;
            threads.push(handle);
        }
        shared.liveness.set_wakers(liveness_wakers);
        // Ready before the line that says so: tests and scripts act on it at once.
        shared.metrics.set_io_backend("epoll");
        shared.metrics.set_listening();
        for (spec, addr) in p.listeners.iter().zip(&addrs) {
            info!(addr = %addr, kind = ?spec.kind, reactors, backend = %"epoll", "listening");
        }
        Ok(Reactors {
            local_addr,
            shared,
            phase,
            threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections open right now, across all reactors.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections()
    }

    pub fn liveness(&self) -> Arc<Liveness> {
        self.shared.liveness.clone()
    }

    /// Moves every reactor to `phase` (it only ever moves forward).
    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_if_modified(|p| {
            let forward = phase > *p;
            if forward {
                *p = phase;
            }
            forward
        });
    }

    /// Every remaining connection gets its `421`; waits for the reactor threads to end.
    pub fn stop(self) {
        self.set_phase(Phase::Stop);
        for t in self.threads {
            if t.join().is_err() {
                warn!("a reactor thread panicked");
            }
        }
    }
}

/// Wakes the reactor's dispatcher when a sink queues an answer.
struct NotifyWake(Arc<Notify>);

impl Wake for NotifyWake {
    fn wake(&self) {
        self.0.notify_one();
    }
}

/// One connection slot: its generation, and the answer it waits for.
struct SlotEntry {
    generation: u32,
    live: bool,
    notify: Rc<Notify>,
    answer: Option<(PublishResult, StoredIn)>,
    /// The AUTH verifier's answer it waits for.
    auth: Option<AuthVerdict>,
    /// The message this slot has with the sink, for the in-flight gauge; kept after
    /// the connection closed until the sink answers.
    flight: Option<InFlight>,
}

/// One reactor's state, shared by its tasks on its one thread.
struct Reactor {
    shared: Arc<Shared>,
    queue: Arc<CompletionQueue>,
    answers_ready: Arc<Notify>,
    slots: RefCell<Vec<SlotEntry>>,
    free: RefCell<Vec<u32>>,
    budget: BodyBudget,
    /// Notified whenever this reactor frees body budget, for connections paused on it.
    budget_freed: Notify,
    metrics: RefCell<ReactorMetrics>,
    live: Cell<usize>,
    all_closed: Notify,
}

impl Reactor {
    fn new(shared: Arc<Shared>, metrics: ReactorMetrics) -> Rc<Reactor> {
        let answers_ready = Arc::new(Notify::new());
        Rc::new(Reactor {
            queue: CompletionQueue::new(Box::new(NotifyWake(answers_ready.clone()))),
            answers_ready,
            budget: shared.new_budget(),
            shared,
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            budget_freed: Notify::new(),
            metrics: RefCell::new(metrics),
            live: Cell::new(0),
            all_closed: Notify::new(),
        })
    }

    fn open_slot(&self) -> (Ticket, Rc<Notify>) {
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push(SlotEntry {
                    generation: 0,
                    live: false,
                    notify: Rc::new(Notify::new()),
                    answer: None,
                    auth: None,
                    flight: None,
                });
                (slots.len() - 1) as u32
            }
        };
        let entry = &mut slots[slot as usize];
        entry.generation = entry.generation.wrapping_add(1);
        entry.live = true;
        entry.answer = None;
        entry.auth = None;
        (
            Ticket {
                slot,
                generation: entry.generation,
            },
            entry.notify.clone(),
        )
    }

    /// The connection is gone. A slot whose message is still with the sink stays taken
    /// until the answer arrives, so the in-flight gauge stays right.
    fn close_slot(&self, ticket: Ticket) {
        let mut slots = self.slots.borrow_mut();
        let entry = &mut slots[ticket.slot as usize];
        entry.live = false;
        entry.answer = None;
        entry.auth = None;
        if entry.flight.is_none() {
            self.free.borrow_mut().push(ticket.slot);
        }
    }

    fn take_auth(&self, ticket: Ticket) -> Option<AuthVerdict> {
        self.slots.borrow_mut()[ticket.slot as usize].auth.take()
    }

    fn take_answer(&self, ticket: Ticket) -> Option<((PublishResult, StoredIn), Option<InFlight>)> {
        let mut slots = self.slots.borrow_mut();
        let entry = &mut slots[ticket.slot as usize];
        let answer = entry.answer.take()?;
        Some((answer, entry.flight.take()))
    }

    /// Routes every queued sink answer to its connection.
    async fn dispatch(self: Rc<Self>) {
        let mut batch = Vec::with_capacity(256);
        loop {
            self.answers_ready.notified().await;
            self.queue.drain_into(&mut batch);
            {
                let mut slots = self.slots.borrow_mut();
                for (ticket, answer) in batch.drain(..) {
                    let Some(entry) = slots.get_mut(ticket.slot as usize) else {
                        continue;
                    };
                    if entry.generation != ticket.generation {
                        continue;
                    }
                    let (result, stored_in) = match answer {
                        Answer::Publish(result, stored_in) => (result, stored_in),
                        Answer::Auth(verdict) => {
                            if entry.live {
                                entry.auth = Some(verdict);
                                entry.notify.notify_one();
                            }
                            continue;
                        }
                    };
                    if entry.live {
                        entry.answer = Some((result, stored_in));
                        entry.notify.notify_one();
                    } else if let Some(flight) = entry.flight.take() {
                        // The connection closed while its message was with the sink.
                        self.shared.answered(flight, &result);
                        self.free.borrow_mut().push(ticket.slot);
                    }
                }
            }
            self.budget_freed.notify_waiters();
        }
    }
}

/// One reactor: accept until draining, then keep running the connections until they
/// are done or stopped.
async fn run(
    listeners: Vec<(TcpListener, Arc<Edge>)>,
    reactor: Rc<Reactor>,
    mut phase: watch::Receiver<Phase>,
    (index, asked): (usize, Arc<Notify>),
) {
    tokio::task::spawn_local(reactor.clone().dispatch());
    tokio::task::spawn_local(flush_metrics(reactor.clone()));
    tokio::task::spawn_local(answer_liveness(reactor.shared.clone(), index, asked));
    for (listener, edge) in listeners {
        tokio::task::spawn_local(accept(listener, edge, reactor.clone(), phase.clone()));
    }
    while *phase.borrow_and_update() != Phase::Stop {
        if phase.changed().await.is_err() {
            break;
        }
    }
    // Connections see Stop too and write their last 421 within their grace.
    if reactor.live.get() > 0 {
        let _ = tokio::time::timeout(STOP_WAIT, reactor.all_closed.notified()).await;
    }
    reactor.metrics.borrow_mut().flush();
}

/// Accepts on one listener until draining; dropping it then closes it.
async fn accept(
    listener: TcpListener,
    edge: Arc<Edge>,
    reactor: Rc<Reactor>,
    mut phase: watch::Receiver<Phase>,
) {
    while *phase.borrow_and_update() == Phase::Running {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admit(&reactor, stream, peer, &edge, &phase),
                Err(e) if accept_exhausted(&e) => {
                    warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                Err(e) => debug!(error = %e, "accept failed"),
            },
        }
    }
}

/// Publishes this reactor's counts every [`FLUSH_INTERVAL`], with the runtime's own
/// measure of how long it was busy.
async fn flush_metrics(reactor: Rc<Reactor>) {
    let handle = tokio::runtime::Handle::current();
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let busy = handle.metrics().worker_total_busy_duration(0);
        let mut m = reactor.metrics.borrow_mut();
        m.set_busy(busy);
        m.flush();
        // A reactor too busy to park still hands its lines over this often.
        crate::logging::flush_this_thread();
    }
}

/// Answers the watchdog's questions: a task of this reactor's runtime, so it runs only
/// while the reactor's loop turns (a task that never yields starves it, as it would
/// every connection).
async fn answer_liveness(shared: Arc<Shared>, index: usize, asked: Arc<Notify>) {
    loop {
        asked.notified().await;
        shared.liveness.answer(index);
    }
}

fn admit(
    reactor: &Rc<Reactor>,
    stream: TcpStream,
    peer: SocketAddr,
    edge: &Arc<Edge>,
    phase: &watch::Receiver<Phase>,
) {
    let Some(admitted) = reactor.shared.admit() else {
        // A fresh socket's send buffer is empty, so this one non-blocking send fits; if
        // it does not, the client just sees the connection close.
        let _ = SockRef::from(&stream).send(reactor.shared.too_many_reply());
        crate::conn::log_refused_at_accept(peer);
        return;
    };
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, error = %e, "set TCP_NODELAY failed");
    }
    reactor.live.set(reactor.live.get() + 1);
    tokio::task::spawn_local(serve(
        reactor.clone(),
        stream,
        peer,
        edge.clone(),
        admitted,
        phase.clone(),
    ));
}

async fn serve(
    reactor: Rc<Reactor>,
    mut stream: TcpStream,
    peer: SocketAddr,
    edge: Arc<Edge>,
    admitted: Admitted,
    mut phase: watch::Receiver<Phase>,
) {
    let (ticket, answered) = reactor.open_slot();
    let shared = &reactor.shared;
    let mut conn = Connection::new(
        Instant::now(),
        shared.session.current(),
        shared.limits.clone(),
        reactor.budget.clone(),
        peer,
        edge,
    );
    debug!(%peer, "connection opened");
    converse(
        &reactor,
        &mut stream,
        &mut conn,
        ticket,
        &answered,
        &mut phase,
    )
    .await;
    // After a PROXY header, the client is the address it named.
    debug!(client = %conn.peer(), %peer, ending = ?conn.ending(), "connection closed");
    conn.take_stats(&mut *reactor.metrics.borrow_mut());
    // A closed connection shows up at once, not only at the next tick.
    reactor.metrics.borrow_mut().flush();
    reactor.close_slot(ticket);
    drop(conn);
    drop(admitted);
    reactor.budget_freed.notify_waiters();
    reactor.live.set(reactor.live.get() - 1);
    if reactor.live.get() == 0 {
        reactor.all_closed.notify_waiters();
    }
}

/// Moves bytes and events between the socket and the driver until the driver is done.
async fn converse(
    reactor: &Reactor,
    stream: &mut TcpStream,
    conn: &mut Connection,
    ticket: Ticket,
    answered: &Notify,
    phase: &mut watch::Receiver<Phase>,
) {
    let shared = &reactor.shared;
    let mut seen = Phase::Running;
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        // Accepted just as a drain began, or the phase moved while we were busy.
        let current = *phase.borrow_and_update();
        if current > seen {
            seen = current;
            follow_phase(conn, seen);
        }
        write_out(stream, conn);
        if let Some((request, verifier)) = conn.poll_auth() {
            // Off the reactor; a full queue answers at once, through the same queue.
            verifier.submit(request, auth_completion(reactor.queue.clone(), ticket));
        }
        if let Some(sealed) = conn.poll_message(Instant::now(), &mut stamp) {
            let flight = shared.submit(sealed, Completion::ticket(reactor.queue.clone(), ticket));
            reactor.slots.borrow_mut()[ticket.slot as usize].flight = Some(flight);
        }
        match conn.state() {
            State::Done => return,
            State::ShutdownWrite if !conn.wants_write() => {
                let _ = SockRef::from(&*stream).shutdown(Shutdown::Write);
                conn.write_shut(Instant::now());
                continue;
            }
            _ => {}
        }
        conn.take_stats(&mut *reactor.metrics.borrow_mut());

        let deadline = conn.poll_timeout();
        if deadline != armed {
            if let Some(d) = deadline {
                sleep.as_mut().reset(tokio::time::Instant::from_std(d));
            }
            armed = deadline;
        }
        let (want_read, want_write) = (conn.wants_read(), conn.wants_write());
        let (awaiting, paused) = (
            conn.awaiting_publish() || conn.awaiting_auth(),
            conn.paused_for_budget(),
        );
        tokio::select! {
            biased;
            () = answered.notified(), if awaiting => {
                if let Some(verdict) = reactor.take_auth(ticket) {
                    conn.handle_auth(Instant::now(), verdict);
                }
                if let Some(((result, stored_in), flight)) = reactor.take_answer(ticket) {
                    if let Some(flight) = flight {
                        shared.answered(flight, &result);
                    }
                    conn.handle_answer(Instant::now(), result, stored_in);
                }
            }
            changed = phase.changed(), if seen != Phase::Stop => {
                if changed.is_err() {
                    seen = Phase::Stop;
                    follow_phase(conn, seen);
                }
            }
            ready = stream.readable(), if want_read => match ready {
                Ok(()) => read_in(stream, conn),
                Err(_) => conn.handle_io_error(),
            },
            ready = stream.writable(), if want_write => {
                if ready.is_err() {
                    conn.handle_io_error();
                }
            }
            () = reactor.budget_freed.notified(), if paused => {
                conn.handle_budget_freed(Instant::now());
            }
            () = &mut sleep, if armed.is_some() => {
                armed = None;
                conn.handle_timeout(Instant::now());
            }
        }
    }
}

fn follow_phase(conn: &mut Connection, phase: Phase) {
    let now = Instant::now();
    match phase {
        Phase::Running => {}
        Phase::Draining => conn.begin_drain(now),
        Phase::Stop => conn.stop(now),
    }
}

/// One read into the reactor's buffer, handed to the driver at once.
fn read_in(stream: &TcpStream, conn: &mut Connection) {
    READ_BUFFER.with(|buf| {
        let mut buf = buf.borrow_mut();
        let len = conn.read_size_hint().min(buf.len());
        match stream.try_read(&mut buf[..len]) {
            Ok(0) => conn.handle_eof(Instant::now()),
            Ok(n) => conn.handle_input(Instant::now(), &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => conn.handle_io_error(),
        }
    });
}

/// Writes as much of the driver's output as the socket takes now, in one call per
/// batch of replies.
fn write_out(stream: &TcpStream, conn: &mut Connection) {
    while conn.wants_write() {
        match stream.try_write(conn.pending_output()) {
            Ok(0) => return,
            Ok(n) => conn.output_written(Instant::now(), n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                conn.handle_io_error();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
