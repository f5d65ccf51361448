//! The epoll backend: `--reactors` OS threads, each with its own tokio `current_thread`
//! runtime and its own SO_REUSEPORT listener, so nothing on the hot path is shared
//! between reactors except the global connection count.
//!
//! The connections, their drivers and everything about them that is not I/O belong to
//! the reactor's [`Host`]. A connection is one local task that moves bytes between its
//! socket and its [`Connection`] driver as [`host::next`] says and does nothing else:
//! it reads while the driver wants input (into the reactor's one receive buffer, so an
//! idle connection holds none), writes what the driver has to say, has the host hand
//! off the driver's messages and AUTH credentials, and wakes the driver at its
//! deadlines. Sink answers and AUTH verdicts arrive on the reactor's
//! [`CompletionQueue`] with a ticket; a dispatcher task has the host route them, and
//! the host wakes each connection it changed through the `Notify` kept beside it. An
//! answer the sink gives inside the hand-off (the null sink's) never takes that way: the
//! connection's own task has it when the hand-off returns and writes it at once.

use std::cell::RefCell;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::LocalSet;
use tracing::{debug, info, warn};

use super::host::{self, Host, STOP_WAIT};
use super::{
    accept_exhausted, bind_all, NetError, Phase, ReactorParams, ReactorShared, ACCEPT_BACKOFF,
};
use crate::completion::{CompletionQueue, Ticket, Wake};
use crate::conn::{Connection, Edge};
use crate::metrics::{ReactorMetrics, FLUSH_INTERVAL};

/// The reactor's receive buffer: every read of every connection of a reactor lands here
/// and is handed to the driver at once, which keeps only what it cannot consume yet.
const READ_BUF: usize = 64 * 1024;

thread_local! {
    static READ_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_BUF].into_boxed_slice());
}

/// The running reactors.
pub struct Reactors {
    local_addr: SocketAddr,
    pub(super) shared: Arc<ReactorShared>,
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
        let shared = ReactorShared::new(&p);
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

/// One reactor's state, shared by its tasks on its one thread. The connections, their
/// answers, the budget and the phase are the [`Host`]'s; each connection's task is
/// woken through the `Notify` it keeps there whenever the host changed its driver.
struct Reactor {
    host: RefCell<Host<Rc<Notify>>>,
    answers_ready: Arc<Notify>,
    /// Wake-ups of closed connections, reused so a connection costs no allocation here.
    spare: RefCell<Vec<Rc<Notify>>>,
    all_closed: Notify,
}

impl Reactor {
    fn new(shared: Arc<ReactorShared>, metrics: ReactorMetrics) -> Rc<Reactor> {
        let answers_ready = Arc::new(Notify::new());
        let queue = CompletionQueue::new(Box::new(NotifyWake(answers_ready.clone())));
        Rc::new(Reactor {
            host: RefCell::new(Host::new(shared, queue, metrics)),
            answers_ready,
            spare: RefCell::new(Vec::new()),
            all_closed: Notify::new(),
        })
    }

    fn shared(&self) -> Arc<ReactorShared> {
        self.host.borrow().shared().clone()
    }

    /// Routes every queued sink answer to its connection.
    async fn dispatch(self: Rc<Self>) {
        loop {
            self.answers_ready.notified().await;
            let mut host = self.host.borrow_mut();
            host.take_answers(Instant::now(), |_, wake| wake.notify_one());
            host.wake_budget_waiters(|_, wake| wake.notify_one());
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
    tokio::task::spawn_local(answer_liveness(reactor.shared(), index, asked));
    for (listener, edge) in listeners {
        tokio::task::spawn_local(accept(listener, edge, reactor.clone(), phase.clone()));
    }
    loop {
        let current = *phase.borrow_and_update();
        // Every connection follows, and its task is woken to act on it.
        reactor
            .host
            .borrow_mut()
            .set_phase(Instant::now(), current, |_, wake| wake.notify_one());
        if current == Phase::Stop {
            break;
        }
        if phase.changed().await.is_err() {
            // The phase can no longer move: as good as stopped.
            reactor
                .host
                .borrow_mut()
                .set_phase(Instant::now(), Phase::Stop, |_, wake| wake.notify_one());
            break;
        }
    }
    // Connections write their last 421 within their grace.
    if !reactor.host.borrow().is_empty() {
        let _ = tokio::time::timeout(STOP_WAIT, reactor.all_closed.notified()).await;
    }
    reactor.host.borrow_mut().flush_metrics();
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
                Ok((stream, peer)) => admit(&reactor, stream, peer, &edge),
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
        let mut host = reactor.host.borrow_mut();
        host.set_busy(busy);
        host.flush_metrics();
        // A reactor too busy to park still hands its lines over this often.
        crate::logging::flush_this_thread();
    }
}

/// Answers the watchdog's questions: a task of this reactor's runtime, so it runs only
/// while the reactor's loop turns (a task that never yields starves it, as it would
/// every connection).
async fn answer_liveness(shared: Arc<ReactorShared>, index: usize, asked: Arc<Notify>) {
    loop {
        asked.notified().await;
        shared.liveness.answer(index);
    }
}

fn admit(reactor: &Rc<Reactor>, stream: TcpStream, peer: SocketAddr, edge: &Arc<Edge>) {
    let host = reactor.host.borrow();
    let Some(admitted) = host.admit() else {
        let _ = SockRef::from(&stream).send(host.too_many_reply());
        crate::conn::log_refused_at_accept(peer);
        return;
    };
    drop(host);
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, error = %e, "set TCP_NODELAY failed");
    }
    let wake = reactor
        .spare
        .borrow_mut()
        .pop()
        .unwrap_or_else(|| Rc::new(Notify::new()));
    let opened =
        reactor
            .host
            .borrow_mut()
            .open(Instant::now(), peer, edge.clone(), admitted, wake.clone());
    match opened {
        Some(ticket) => {
            tokio::task::spawn_local(serve(reactor.clone(), stream, peer, ticket, wake));
        }
        // Refused by the edge: nothing to say, the socket closes here.
        None => reactor.spare.borrow_mut().push(wake),
    }
}

async fn serve(
    reactor: Rc<Reactor>,
    mut stream: TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
    wake: Rc<Notify>,
) {
    debug!(%peer, "connection opened");
    converse(&reactor, &mut stream, ticket, &wake).await;
    let mut host = reactor.host.borrow_mut();
    if let Some((conn, wake)) = host.close(ticket) {
        // After a PROXY header, the client is the address it named.
        debug!(client = %conn.peer(), %peer, ending = ?conn.ending(), "connection closed");
        // A permit left from its last wake-up costs the next user one spurious look.
        reactor.spare.borrow_mut().push(wake);
    }
    // A closed connection shows up at once, not only at the next tick.
    host.flush_metrics();
    host.wake_budget_waiters(|_, wake| wake.notify_one());
    if host.is_empty() {
        reactor.all_closed.notify_waiters();
    }
}

/// Moves bytes and events between the socket and the driver until the driver is done.
async fn converse(reactor: &Reactor, stream: &mut TcpStream, ticket: Ticket, wake: &Notify) {
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        let (want_read, want_write, deadline) = {
            let mut host = reactor.host.borrow_mut();
            let now = Instant::now();
            host.begin(now, ticket);
            // Before writing: a sink that answers at once (the null sink) has its reply
            // go out in this write, with no wake-up and no further turn.
            host.hand_off(now, ticket);
            let Some(e) = host.get(ticket) else { return };
            write_out(stream, &mut e.driver);
            // Writing lets a driver paused at its output cap go on with the input it
            // holds, which may complete another message: hand that off too, or nothing
            // would wake this task for it (its answer, if immediate, leaves output to
            // write, so the task then waits for writability, which is at hand).
            host.hand_off(now, ticket);
            host.wake_budget_waiters(|_, wake| wake.notify_one());
            let Some(e) = host.get(ticket) else { return };
            let next = host::next(&e.driver);
            if next.close {
                return;
            }
            if next.shutdown_write {
                let _ = SockRef::from(&*stream).shutdown(Shutdown::Write);
                e.driver.write_shut(Instant::now());
                continue;
            }
            host.end(ticket);
            (next.read.is_some(), next.write, next.deadline)
        };
        if deadline != armed {
            if let Some(d) = deadline {
                sleep.as_mut().reset(tokio::time::Instant::from_std(d));
            }
            armed = deadline;
        }
        tokio::select! {
            biased;
            // The host changed the driver: an answer, a verdict, the phase, budget.
            () = wake.notified() => {}
            ready = stream.readable(), if want_read => {
                let mut host = reactor.host.borrow_mut();
                let Some(e) = host.get(ticket) else { return };
                match ready {
                    Ok(()) => read_in(stream, &mut e.driver),
                    Err(_) => e.driver.handle_io_error(),
                }
            }
            ready = stream.writable(), if want_write => {
                if ready.is_err() {
                    let mut host = reactor.host.borrow_mut();
                    let Some(e) = host.get(ticket) else { return };
                    e.driver.handle_io_error();
                }
            }
            () = &mut sleep, if armed.is_some() => {
                armed = None;
                let mut host = reactor.host.borrow_mut();
                let Some(e) = host.get(ticket) else { return };
                e.driver.handle_timeout(Instant::now());
            }
        }
    }
}

/// One read into the reactor's buffer, handed to the driver at once. A read that
/// fills less than it asked for has emptied the socket: it tells tokio so (as a read
/// that would block does), and the task waits for the next readiness event instead of
/// trying another read that would find nothing, one syscall per lock-step round trip.
/// New bytes (or the client's FIN) arriving after it raise a new event, as epoll is
/// edge-triggered; a FIN already seen stays in tokio's readiness.
fn read_in(stream: &TcpStream, conn: &mut Connection) {
    READ_BUFFER.with(|buf| {
        let mut buf = buf.borrow_mut();
        let len = conn.read_size_hint().min(buf.len());
        let mut drained = 0;
        let read = stream.try_io(Interest::READABLE, || {
            let n = (&*SockRef::from(stream)).read(&mut buf[..len])?;
            if n > 0 && n < len {
                drained = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match read {
            Ok(0) => conn.handle_eof(Instant::now()),
            Ok(n) => conn.handle_input(Instant::now(), &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if drained > 0 {
                    conn.handle_input(Instant::now(), &buf[..drained]);
                }
            }
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
