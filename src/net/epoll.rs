//! The epoll fallback backend: `--reactors` OS threads, each with its own tokio
//! `current_thread` runtime and its own SO_REUSEPORT listener, so that nothing on the
//! hot path is shared between reactors except the global connection count.
//!
//! A connection is one task that owns its [`Session`], a bounded receive buffer and the
//! channel its sink answers on. It only moves bytes; every protocol decision is the
//! session's.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::Utc;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn};
use ulid::Ulid;

use crate::metrics::{Metrics, ReactorMetrics, FLUSH_INTERVAL};
use crate::sink::{Completion, PublishError, PublishResult, Sink};
use crate::smtp::{reply, Session, SessionConfig};

/// Receive buffer per connection. Commands are at most 512 octets and DATA is consumed
/// as it arrives, so this only bounds how much pipelined input one read can bring.
const READ_BUF: usize = 64 * 1024;
const LISTEN_BACKLOG: i32 = 1024;
/// After our last reply, how long we keep reading and discarding so that closing with
/// unread client bytes does not turn into a RST that destroys the reply in flight.
const LINGER: Duration = Duration::from_secs(2);
/// While the sink is over its in-flight limit, how often a paused session looks again.
/// Only sessions in a message body pause, so this is not on the command path.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(10);
/// At the drain timeout, how long connections get to write their final `421`.
const STOP_GRACE: Duration = Duration::from_millis(500);

thread_local! {
    /// This reactor's metric counts. Every task of a reactor runs on its one thread, so
    /// counting here is plain arithmetic; the flush task publishes it.
    static LOCAL_METRICS: RefCell<Option<ReactorMetrics>> = const { RefCell::new(None) };
}

/// Runs `f` on this reactor's metric counts (nothing on a thread without them).
fn with_metrics(f: impl FnOnce(&mut ReactorMetrics)) {
    let _ = LOCAL_METRICS.try_with(|cell| {
        if let Ok(mut local) = cell.try_borrow_mut() {
            if let Some(m) = local.as_mut() {
                f(m);
            }
        }
    });
}

/// What the reactors should be doing; it only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Listeners closed; sessions finish what is in flight and then get `421`.
    Draining,
    /// Drop every remaining connection and end the reactor threads.
    Stop,
}

/// Everything the reactors need to serve connections.
pub struct ReactorParams {
    pub listen: SocketAddr,
    pub reactors: usize,
    pub session: Arc<SessionConfig>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Arc<Metrics>,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub max_session_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("--listen {addr}: cannot listen: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start reactor thread: {0}")]
    Reactor(io::Error),
}

/// Read-only after start, except the connection count.
struct Shared {
    session: Arc<SessionConfig>,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
    max_connections: usize,
    idle_timeout: Duration,
    max_session_time: Duration,
    too_many: Box<[u8]>,
    open: AtomicUsize,
}

/// Holds one slot of `--max-connections` for as long as the connection exists,
/// including when its task is dropped by a panic or by the runtime shutting down.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The running reactors.
pub struct Reactors {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    threads: Vec<JoinHandle<()>>,
}

impl Reactors {
    /// Binds every listener and starts the reactor threads. All binding happens here, on
    /// the caller's thread, so a bad `--listen` fails before anything runs.
    pub fn start(p: ReactorParams) -> Result<Reactors, NetError> {
        let reactors = p.reactors.max(1);
        let bind_err = |addr, source| NetError::Bind { addr, source };
        // Port 0: the first listener picks the port, the others join it.
        let first = bind(p.listen).map_err(|e| bind_err(p.listen, e))?;
        let local_addr = first.local_addr().map_err(|e| bind_err(p.listen, e))?;
        let mut listeners = vec![first];
        for _ in 1..reactors {
            listeners.push(bind(local_addr).map_err(|e| bind_err(local_addr, e))?);
        }

        let shared = Arc::new(Shared {
            too_many: reply::too_many_connections(&p.session.hostname)
                .into_bytes()
                .into_boxed_slice(),
            session: p.session,
            sink: p.sink,
            metrics: p.metrics,
            max_connections: p.max_connections,
            idle_timeout: p.idle_timeout,
            max_session_time: p.max_session_time,
            open: AtomicUsize::new(0),
        });
        let (phase, _) = watch::channel(Phase::Running);

        let mut threads = Vec::with_capacity(reactors);
        for (i, std_listener) in listeners.into_iter().enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(NetError::Reactor)?;
            // Registers the socket with this reactor's own I/O driver.
            let listener = {
                let _guard = rt.enter();
                TcpListener::from_std(std_listener).map_err(|e| bind_err(local_addr, e))?
            };
            let shared = shared.clone();
            let phase_rx = phase.subscribe();
            let local_metrics = shared.metrics.reactor(i);
            let handle = std::thread::Builder::new()
                .name(format!("smtpgw-reactor-{i}"))
                .spawn(move || {
                    LOCAL_METRICS.with(|cell| *cell.borrow_mut() = Some(local_metrics));
                    rt.block_on(reactor(listener, shared, phase_rx));
                    // Dropping the runtime drops whatever connections are left.
                    drop(rt);
                })
                .map_err(NetError::Reactor)?;
            threads.push(handle);
        }
        info!(addr = %local_addr, reactors, backend = %"epoll", "listening");
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
        self.shared.open.load(Ordering::Acquire)
    }

    /// Closes the listeners and asks every session to wind down.
    pub fn begin_drain(&self) {
        self.phase.send_replace(Phase::Draining);
    }

    /// Drops every remaining connection and waits for the reactor threads to end.
    pub fn stop(self) {
        self.phase.send_replace(Phase::Stop);
        for t in self.threads {
            if t.join().is_err() {
                warn!("a reactor thread panicked");
            }
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// One reactor: accept until draining, then keep running the connections until stopped.
async fn reactor(listener: TcpListener, shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    // Ends with the runtime.
    tokio::spawn(flush_metrics());
    while *phase.borrow_and_update() == Phase::Running {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admit(stream, peer, &shared, &phase),
                Err(e) => accept_failed(e).await,
            },
        }
    }
    drop(listener);
    while *phase.borrow_and_update() != Phase::Stop {
        if phase.changed().await.is_err() {
            break;
        }
    }
    // Connections see Stop too and send their last 421; give them a moment to do so
    // before the runtime, and with it every task, is dropped.
    let grace = Instant::now() + STOP_GRACE;
    while shared.open.load(Ordering::Acquire) > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The flush task dies with the runtime; publish what was counted since its last tick.
    with_metrics(ReactorMetrics::flush);
}

/// Publishes this reactor's counts every [`FLUSH_INTERVAL`], with the runtime's own
/// measure of how long it was busy.
async fn flush_metrics() {
    let handle = tokio::runtime::Handle::current();
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let busy = handle.metrics().worker_total_busy_duration(0);
        with_metrics(|m| {
            m.set_busy(busy);
            m.flush();
        });
    }
}

async fn accept_failed(e: io::Error) {
    // Out of descriptors or memory: accepting again at once would spin, and the
    // operator needs to hear about it.
    let exhausted = matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12));
    if exhausted {
        warn!(error = %e, "accept failed; backing off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        debug!(error = %e, "accept failed");
    }
}

fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    phase: &watch::Receiver<Phase>,
) {
    let before = shared.open.fetch_add(1, Ordering::AcqRel);
    let slot = Slot(shared.clone());
    if before >= shared.max_connections {
        // A fresh socket's send buffer is empty, so this one non-blocking send fits; if
        // it does not, the client just sees the connection close.
        let _ = SockRef::from(&stream).send(&shared.too_many);
        shared.metrics.connections_rejected_max.inc();
        shared.metrics.count_reply(421);
        debug!(%peer, open = before, "refused: too many connections");
        return;
    }
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, error = %e, "set TCP_NODELAY failed");
    }
    shared.metrics.connections_accepted.inc();
    tokio::spawn(serve(stream, peer, slot, phase.clone()));
}

/// Why a connection ended without a graceful close; for debug logs.
enum Gone {
    Eof,
    Io(io::Error),
    WriteTimeout,
    Stuck,
    /// The drain timeout ran out; a `421` was sent if the socket took it.
    Stopped,
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    mut phase: watch::Receiver<Phase>,
) {
    let shared = &*slot.0;
    let _active = Active::new(&shared.metrics);
    debug!(%peer, "connection opened");
    let mut buf = vec![0u8; READ_BUF].into_boxed_slice();
    let result = converse(&mut stream, peer, shared, &mut phase, &mut buf).await;
    match result {
        Ok(()) => {
            linger_close(&mut stream, &mut buf).await;
            debug!(%peer, "connection closed");
        }
        Err(Gone::Eof) => debug!(%peer, "client closed the connection"),
        Err(Gone::Io(e)) => debug!(%peer, error = %e, "connection failed"),
        Err(Gone::WriteTimeout) => debug!(%peer, "client stopped reading; dropped"),
        Err(Gone::Stuck) => debug!(%peer, "receive buffer full and nothing consumable; dropped"),
        Err(Gone::Stopped) => debug!(%peer, "closed at the drain timeout"),
    }
    // A closed connection shows up at once, not only at the next tick.
    with_metrics(ReactorMetrics::flush);
}

/// Counts a connection in `smtpgw_connections_active` for as long as its task lives.
struct Active(prometheus::IntGauge);

impl Active {
    fn new(metrics: &Metrics) -> Self {
        metrics.connections_active.inc();
        Active(metrics.connections_active.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Hands the session's counts to this reactor and times message bodies: a body
/// "starts" at the read that brought its DATA/BDAT and ends when the session says so.
fn account(session: &mut Session, body_start: &mut Option<Instant>, read_at: Instant) {
    let stats = session.stats_mut();
    let (started, ended) = (stats.bodies_started, stats.bodies_ended);
    with_metrics(|m| {
        if started > 0 {
            *body_start = Some(read_at);
        }
        if ended > 0 {
            if let Some(t) = body_start.take() {
                m.observe_data(t.elapsed());
            }
        }
        m.absorb(stats);
    });
}

/// Runs the session until it is closed (`Ok`, output flushed) or the connection is gone.
async fn converse(
    stream: &mut TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    phase: &mut watch::Receiver<Phase>,
    buf: &mut [u8],
) -> Result<(), Gone> {
    let mut session = Session::new(shared.session.clone(), peer);
    // One channel per connection, reused for each of its messages.
    let (tx, mut rx) = mpsc::unbounded_channel::<PublishResult>();
    let opened = Instant::now();
    let hard_deadline = opened
        .checked_add(shared.max_session_time)
        .unwrap_or_else(|| opened + Duration::from_secs(366 * 24 * 3600));
    let mut idle_deadline = opened + shared.idle_timeout;
    let timer = tokio::time::sleep_until(idle_deadline.min(hard_deadline));
    tokio::pin!(timer);
    let mut armed = idle_deadline.min(hard_deadline);

    let mut draining = *phase.borrow_and_update() != Phase::Running;
    if draining {
        // Accepted just as the drain began: greeting, then 421.
        session.shut_down_now();
    }
    let (mut start, mut end) = (0usize, 0usize);
    let mut read_at = opened;
    let mut body_start = None;

    loop {
        // Everything buffered is processed before the next read, so a pipelined batch
        // gets its replies in one write.
        loop {
            let n = session.feed(&buf[start..end]);
            start += n;
            account(&mut session, &mut body_start, read_at);
            if let Some(msg) = session.take_message() {
                let deadline = write_deadline(shared, hard_deadline);
                flush(stream, &mut session, deadline).await?;
                let sealed = msg.seal(Ulid::new(), Utc::now(), &shared.session.hostname);
                let result = publish(shared, sealed, &tx, &mut rx).await;
                session.publish_result(result);
                account(&mut session, &mut body_start, read_at);
                if !draining && drain_requested(phase) {
                    draining = true;
                    wind_down(&mut session, start == end);
                }
                continue;
            }
            if n == 0 || start == end || session.is_closed() {
                break;
            }
        }
        if !draining && drain_requested(phase) {
            draining = true;
            wind_down(&mut session, start == end);
        }
        let deadline = write_deadline(shared, hard_deadline);
        flush(stream, &mut session, deadline).await?;
        if session.is_closed() {
            return Ok(());
        }

        if start == end {
            (start, end) = (0, 0);
        } else if end == buf.len() {
            if start == 0 {
                // The session takes at most a 512-octet line at a time, so a full
                // buffer it will not consume means it is stuck; don't spin on it.
                return Err(Gone::Stuck);
            }
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }

        // Backpressure: while the sink holds more than its in-flight limit, a session
        // in the middle of a message body is not read from, so the client's bytes wait
        // in the kernel (and then in the client) instead of in our memory. Sessions
        // between commands still run, so they can get their replies and QUIT. Waiting
        // is the gateway's doing, so it does not count as the client being idle.
        let paused = !session.is_between_commands() && shared.sink.over_inflight_limit();
        if paused {
            idle_deadline = Instant::now() + shared.idle_timeout;
        }
        let wake = idle_deadline.min(hard_deadline);
        if wake != armed {
            timer.as_mut().reset(wake);
            armed = wake;
        }
        tokio::select! {
            () = tokio::time::sleep(BACKPRESSURE_POLL), if paused => {}
            read = stream.read(&mut buf[end..]), if !paused => match read {
                Ok(0) => return Err(Gone::Eof),
                Ok(n) => {
                    end += n;
                    read_at = Instant::now();
                    idle_deadline = read_at + shared.idle_timeout;
                }
                Err(e) => return Err(Gone::Io(e)),
            },
            () = &mut timer => {
                if Instant::now() >= hard_deadline {
                    debug!(%peer, "session time limit reached");
                } else {
                    debug!(%peer, "idle timeout");
                }
                session.timed_out();
                // The hard deadline has passed by now; the 421 gets a short grace of its own.
                flush(stream, &mut session, Instant::now() + LINGER).await?;
                return Ok(());
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow_and_update() == Phase::Stop {
                    // The drain timeout ran out mid-conversation: say so rather than
                    // just vanish. Whatever this client had not finished got no 250.
                    session.shut_down_now();
                    flush(stream, &mut session, Instant::now() + STOP_GRACE).await?;
                    return Err(Gone::Stopped);
                }
                if !draining {
                    draining = true;
                    wind_down(&mut session, start == end);
                }
            }
        }
    }
}

/// Hands a message to the sink and waits for its answer, keeping the publish metrics.
async fn publish(
    shared: &Shared,
    sealed: crate::smtp::SealedMessage,
    tx: &mpsc::UnboundedSender<PublishResult>,
    rx: &mut mpsc::UnboundedReceiver<PublishResult>,
) -> PublishResult {
    let m = &shared.metrics;
    let bytes = i64::try_from(sealed.value.len()).unwrap_or(i64::MAX);
    let body_len = sealed.body().len();
    m.publish_inflight_messages.inc();
    m.publish_inflight_bytes.add(bytes);
    let submitted = Instant::now();
    shared.sink.submit(sealed, Completion::new(tx.clone()));
    // No reads while the sink works: a client that pipelines more simply fills its
    // socket buffer, which is the backpressure we want.
    let result = rx
        .recv()
        .await
        .unwrap_or_else(|| Err(PublishError::Temporary("sink dropped the message".into())));
    let took = submitted.elapsed();
    m.publish_inflight_messages.dec();
    m.publish_inflight_bytes.sub(bytes);
    match &result {
        Ok(_) => with_metrics(|l| {
            l.observe_publish(took);
            l.observe_message_size(body_len);
        }),
        Err(e) => {
            with_metrics(|l| l.observe_publish(took));
            match e {
                PublishError::Temporary(_) | PublishError::StorageFull => {
                    m.publish_failures_temporary.inc()
                }
                PublishError::TooLarge => m.publish_failures_too_large.inc(),
            }
        }
    }
    result
}

/// Has the server started draining since this connection last looked? Only an atomic
/// version check, cheap enough for every message.
fn drain_requested(phase: &mut watch::Receiver<Phase>) -> bool {
    match phase.has_changed() {
        Ok(false) => false,
        Ok(true) => {
            phase.mark_unchanged();
            true
        }
        Err(_) => true,
    }
}

/// A session idle between commands closes now; one in the middle of something finishes
/// it (its 250 still goes out) and gets `421` at its next command.
fn wind_down(session: &mut Session, no_partial_input: bool) {
    if no_partial_input && session.is_between_commands() {
        session.shut_down_now();
    } else {
        session.begin_drain();
    }
}

/// A client that stops reading must not pin a connection: writes get the same patience
/// as reads, and never past the session's hard limit.
fn write_deadline(shared: &Shared, hard_deadline: Instant) -> Instant {
    (Instant::now() + shared.idle_timeout).min(hard_deadline)
}

/// Writes all pending replies in one go.
async fn flush(
    stream: &mut TcpStream,
    session: &mut Session,
    deadline: Instant,
) -> Result<(), Gone> {
    let out = session.output();
    if out.is_empty() {
        return Ok(());
    }
    let len = out.len();
    match timeout_at(deadline, stream.write_all(out)).await {
        Ok(Ok(())) => {
            session.advance_output(len);
            Ok(())
        }
        Ok(Err(e)) => Err(Gone::Io(e)),
        Err(_) => Err(Gone::WriteTimeout),
    }
}

/// Sends FIN, then reads and discards until the client closes too (or briefly gives up),
/// so that the last reply arrives even if the client had pipelined more after QUIT.
async fn linger_close(stream: &mut TcpStream, buf: &mut [u8]) {
    let deadline = Instant::now() + LINGER;
    if timeout_at(deadline, stream.shutdown()).await.is_err() {
        return;
    }
    while let Ok(Ok(n)) = timeout_at(deadline, stream.read(buf)).await {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;
    use crate::sink::null::NullSink;
    use crate::smtp::BareLfPolicy;

    fn start(max_connections: usize, idle: Duration) -> Reactors {
        start_with(max_connections, idle, Arc::new(NullSink::new()))
    }

    fn start_with(max_connections: usize, idle: Duration, sink: Arc<dyn Sink>) -> Reactors {
        Reactors::start(ReactorParams {
            listen: "127.0.0.1:0".parse().unwrap(),
            reactors: 2,
            session: Arc::new(SessionConfig {
                hostname: "mx.test".into(),
                accept_domains: vec!["example.com".into()],
                max_message_size: 1 << 20,
                max_recipients: 100,
                bare_lf: BareLfPolicy::Reject,
            }),
            sink,
            metrics: Arc::new(Metrics::new().expect("metrics registry")),
            max_connections,
            idle_timeout: idle,
            max_session_time: Duration::from_secs(60),
        })
        .expect("reactors start")
    }

    fn connect(r: &Reactors) -> TcpStream {
        let s = TcpStream::connect(r.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Reads until the peer closes; the text of everything it sent.
    fn read_to_close(s: &mut TcpStream) -> String {
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    }

    fn read_line(s: &mut TcpStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
            line.push(b[0]);
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    fn wait_for_no_connections(r: &Reactors) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while r.open_connections() != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(r.open_connections(), 0);
    }

    #[test]
    fn pipelined_session_then_drain() {
        let r = start(100, Duration::from_secs(60));
        assert_ne!(r.local_addr().port(), 0);
        let mut s = connect(&r);
        s.write_all(
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhi\r\n.\r\n\
              NOOP\r\nQUIT\r\n",
        )
        .unwrap();
        let text = read_to_close(&mut s);
        drop(s);
        assert!(text.starts_with("220 "), "{text}");
        assert!(text.contains("250 2.0.0 Ok: queued as "), "{text}");
        assert!(
            text.ends_with("221 2.0.0 mx.test closing connection\r\n"),
            "{text}"
        );

        let mut idle = connect(&r);
        assert!(read_line(&mut idle).starts_with("220 "));
        r.begin_drain();
        let text = read_to_close(&mut idle);
        assert!(text.starts_with("421 4.3.2 "), "{text}");
        drop(idle);
        wait_for_no_connections(&r);
        r.stop();
    }

    #[test]
    fn connection_limit_and_idle_timeout() {
        let r = start(1, Duration::from_millis(300));
        let mut first = connect(&r);
        assert!(read_line(&mut first).starts_with("220 "));
        let mut second = connect(&r);
        assert_eq!(
            read_to_close(&mut second),
            "421 4.3.2 mx.test Too many connections, try again later\r\n"
        );
        drop(second);
        let text = read_to_close(&mut first);
        assert!(text.starts_with("421 4.4.2 "), "{text}");
        drop(first);
        wait_for_no_connections(&r);
        let mut third = connect(&r);
        assert!(read_line(&mut third).starts_with("220 "));
        r.stop();
    }

    /// A null sink whose in-flight limit the test switches.
    struct Throttled(std::sync::atomic::AtomicBool);

    impl Sink for Throttled {
        fn submit(&self, msg: crate::smtp::envelope::SealedMessage, done: Completion) {
            done.complete(Ok(msg.id));
        }
        fn shutdown(&self) {}
        fn name(&self) -> &'static str {
            "throttled"
        }
        fn over_inflight_limit(&self) -> bool {
            self.0.load(Ordering::Acquire)
        }
    }

    #[test]
    fn over_inflight_limit_stops_reading_bodies_but_not_commands() {
        let sink = Arc::new(Throttled(std::sync::atomic::AtomicBool::new(true)));
        let r = start_with(100, Duration::from_secs(60), sink.clone());
        let mut s = connect(&r);
        assert!(read_line(&mut s).starts_with("220 "));
        // Commands are still served while the sink is over its limit.
        s.write_all(b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
            .unwrap();
        assert!(read_line(&mut s).starts_with("250 "));
        assert!(read_line(&mut s).starts_with("250 "));
        assert!(read_line(&mut s).starts_with("250 "));
        assert!(read_line(&mut s).starts_with("354 "));
        // In the body: nothing is read, so the message cannot complete.
        s.write_all(b"hi\r\n.\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(
            s.read(&mut b).is_err(),
            "replied while the sink was over its limit"
        );
        // Below the limit again: the body is read and the message answered.
        sink.0.store(false, Ordering::Release);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(read_line(&mut s).starts_with("250 2.0.0 Ok: queued as "));
        drop(s);
        wait_for_no_connections(&r);
        r.stop();
    }
}
