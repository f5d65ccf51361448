//! I/O backends: they move bytes between sockets and connection drivers, and nothing
//! else. Every protocol decision is the driver's (`crate::conn`) or the session's.
//!
//! This module holds what both backends share: the listeners (each with its edge
//! settings: PROXY, TLS), admission against `--max-connections`, handing messages to
//! the sink with their publish metrics, the clock that stamps messages, and the run
//! phase (running, draining, stopping), and [`host`], the sans-IO reactor core that
//! owns each reactor's connections. What every backend must do on real sockets is
//! `contract_tests`, run once per backend. How every reactor shows the systemd watchdog
//! that its loop still turns is [`crate::liveness`]; the per-address limiter the drivers
//! call is [`crate::limits`]; certificates are loaded by [`crate::certs`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use socket2::{Domain, Protocol, Socket, Type};

use crate::conn::{BodyBudget, ConnectionSettings, Edge};
use crate::metrics::Metrics;
use crate::reload::SessionConfigHandle;
use crate::sink::record::SealedMessage;
use crate::sink::{Completion, PublishError, PublishResult, Sink};
use crate::smtp::{reply, MessageId};

#[cfg(test)]
pub(crate) mod contract_tests;
pub mod epoll;
pub mod host;
pub mod probe;
pub mod uring;

pub use crate::config::IoBackend;

const LISTEN_BACKLOG: i32 = 1024;

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// SMTP, with STARTTLS when a certificate is configured (`--listen`).
    Smtp,
    /// TLS from the first byte, RFC 8314 (`--listen-tls`).
    ImplicitTls,
    /// SMTP behind a load balancer: the PROXY header first (`--proxy-listen`).
    ProxiedSmtp,
}

impl ListenerKind {
    pub fn flag(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "--listen",
            ListenerKind::ImplicitTls => "--listen-tls",
            ListenerKind::ProxiedSmtp => "--proxy-listen",
        }
    }
}

/// One listening address and the edge settings of its connections. A backend binds
/// every listener on every reactor and hands each accepted connection its listener's
/// `edge` (`Connection::new`'s last argument).
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub kind: ListenerKind,
    pub edge: Arc<Edge>,
}

/// Everything the reactors need to serve connections.
pub struct ReactorParams {
    /// The first is the `--listen` one.
    pub listeners: Vec<ListenerSpec>,
    pub reactors: usize,
    /// io_uring: pin each reactor thread to a CPU.
    pub pin_cpus: bool,
    /// New connections take their settings from it at accept (SIGHUP replaces them).
    pub session: Arc<SessionConfigHandle>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Arc<Metrics>,
    pub max_connections: usize,
    pub limits: ConnectionSettings,
    /// Across all reactors; each gets an equal share.
    pub max_body_memory: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{flag} {addr}: cannot listen: {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("{flag} {addr}: already in use by another process (refusing to share it through SO_REUSEPORT)")]
    InUse {
        flag: &'static str,
        addr: SocketAddr,
    },
    #[error("cannot start reactor thread: {0}")]
    Reactor(io::Error),
    #[error("--io-backend uring: io_uring is not usable here: {0}")]
    UringUnavailable(probe::Unavailable),
}

/// What the reactors should be doing; it only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Listeners closed; sessions finish what is in flight and then get `421`.
    Draining,
    /// The drain deadline passed: every remaining connection gets `421` and closes.
    Stop,
}

/// The id and time a message is sealed with; the one place the gateway reads the clock
/// for it.
pub fn stamp() -> (MessageId, DateTime<Utc>) {
    (ulid::Ulid::new(), Utc::now())
}

/// Read-only after start, except the connection count.
pub struct ReactorShared {
    pub session: Arc<SessionConfigHandle>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<ConnectionSettings>,
    /// Each reactor answers the watchdog's questions here (see [`crate::liveness`]).
    pub liveness: Arc<crate::liveness::Liveness>,
    max_connections: usize,
    budget_per_reactor: usize,
    too_many: Box<[u8]>,
    open: AtomicUsize,
    /// Told when the last open connection closes, so a drain waits without polling.
    none_open: tokio::sync::Notify,
}

impl ReactorShared {
    pub fn new(p: &ReactorParams) -> Arc<ReactorShared> {
        let reactors = p.reactors.max(1);
        Arc::new(ReactorShared {
            too_many: reply::too_many_connections(&p.session.hostname)
                .into_bytes()
                .into_boxed_slice(),
            session: p.session.clone(),
            sink: p.sink.clone(),
            metrics: p.metrics.clone(),
            limits: Arc::new(p.limits.clone()),
            liveness: Arc::new(crate::liveness::Liveness::new(reactors)),
            max_connections: p.max_connections,
            // Each reactor frees what its own connections hold, so each gets a share
            // rather than all contending on one count. One message must always fit.
            budget_per_reactor: (p.max_body_memory / reactors).max(
                p.session
                    .max_message_size_cap
                    .saturating_add(p.session.max_message_size_cap / 8),
            ),
            open: AtomicUsize::new(0),
            none_open: tokio::sync::Notify::new(),
        })
    }

    /// A reactor's body memory budget, which also pauses bodies while the sink is over
    /// its in-flight limit (`Sink::over_inflight_limit`).
    pub fn new_budget(&self) -> BodyBudget {
        let sink = self.sink.clone();
        BodyBudget::with_sink_limit(
            self.budget_per_reactor,
            Some(Arc::new(move || sink.over_inflight_limit())),
        )
    }

    /// Connections open right now, across all reactors.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open (at once if none is).
    pub async fn all_closed(&self) {
        // A notification that raced the check is kept as Notify's permit, so the
        // loop at worst looks once more; none is ever missed.
        while self.open_connections() > 0 {
            self.none_open.notified().await;
        }
    }

    /// Takes a slot of `--max-connections`, or says why not: the caller then sends
    /// [`Shared::too_many_reply`] and closes.
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.connections_rejected_max.inc();
            self.metrics.count_reply(421);
            return None;
        }
        self.metrics.connections_accepted.inc();
        self.metrics.connections_active.inc();
        Some(Admitted(self.clone()))
    }

    /// `421 4.3.2 ... Too many connections`: sent instead of a greeting.
    pub fn too_many_reply(&self) -> &[u8] {
        &self.too_many
    }

    /// Hands a message to the sink; the answer comes back through `done`.
    pub fn submit(&self, sealed: SealedMessage, done: Completion) -> PublishGauge {
        let bytes = i64::try_from(sealed.value.len()).unwrap_or(i64::MAX);
        self.metrics.publish_inflight_messages.inc();
        self.metrics.publish_inflight_bytes.add(bytes);
        self.sink.submit(sealed, done);
        PublishGauge(bytes)
    }

    /// The sink answered the message `flight` stands for.
    pub fn answered(&self, flight: PublishGauge, result: &PublishResult) {
        let m = &self.metrics;
        m.publish_inflight_messages.dec();
        m.publish_inflight_bytes.sub(flight.0);
        match result {
            Ok(_) => {}
            Err(PublishError::Temporary(_) | PublishError::StorageFull) => {
                m.publish_failures_temporary.inc()
            }
            Err(PublishError::TooLarge) => m.publish_failures_too_large.inc(),
        }
    }
}

/// One slot of `--max-connections`, held for as long as the connection exists
/// (including when a task is dropped by a panic or by the runtime shutting down).
pub struct Admitted(Arc<ReactorShared>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.metrics.connections_active.dec();
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_open.notify_one();
        }
    }
}

/// A message with the sink: its bytes, for the in-flight gauge.
#[derive(Debug)]
pub struct PublishGauge(i64);

/// Binds one SO_REUSEPORT listener per reactor. The first one picks the port when
/// `listen` has port 0. Refuses an address some other socket already holds: with
/// SO_REUSEPORT alone, a second gateway (with another spool) could bind the same
/// address and silently take half the connections.
pub fn bind_listeners(
    flag: &'static str,
    listen: SocketAddr,
    reactors: usize,
) -> Result<Vec<std::net::TcpListener>, NetError> {
    let bind_err = |addr, source| NetError::Bind { flag, addr, source };
    // A socket without SO_REUSEPORT cannot share the address with anyone: binding it
    // fails if anything else holds the address, and it reserves the port for us.
    let guard = Socket::new(
        Domain::for_address(listen),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(|e| bind_err(listen, e))?;
    guard
        .set_reuse_address(true)
        .map_err(|e| bind_err(listen, e))?;
    match guard.bind(&listen.into()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            return Err(NetError::InUse { flag, addr: listen })
        }
        Err(e) => return Err(bind_err(listen, e)),
    }
    let addr = guard
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(listen);
    // The guard is released just before our own listeners bind; a process that takes
    // the address in that instant makes our bind fail rather than share it, because
    // the first of ours does not set SO_REUSEPORT until the port is ours.
    drop(guard);
    let mut listeners = Vec::with_capacity(reactors);
    for _ in 0..reactors.max(1) {
        listeners.push(bind_one(addr).map_err(|e| bind_err(addr, e))?);
    }
    Ok(listeners)
}

/// Every reactor's listeners: one per [`ListenerSpec`], each with its edge settings.
pub type ReactorListeners = Vec<(std::net::TcpListener, Arc<Edge>)>;

/// Binds every listener of `p` once per reactor (see [`bind_listeners`]); returns the
/// addresses bound (port 0 resolved), in the order of `p.listeners`, and each reactor's
/// listeners.
pub fn bind_all(
    p: &ReactorParams,
    reactors: usize,
) -> Result<(Vec<SocketAddr>, Vec<ReactorListeners>), NetError> {
    let mut addrs = Vec::with_capacity(p.listeners.len());
    let mut per_reactor: Vec<ReactorListeners> = (0..reactors.max(1)).map(|_| Vec::new()).collect();
    for spec in &p.listeners {
        let flag = spec.kind.flag();
        let bound = bind_listeners(flag, spec.addr, reactors)?;
        let addr = bound[0].local_addr().map_err(|source| NetError::Bind {
            flag,
            addr: spec.addr,
            source,
        })?;
        addrs.push(addr);
        for (i, l) in bound.into_iter().enumerate() {
            per_reactor[i].push((l, spec.edge.clone()));
        }
    }
    Ok((addrs, per_reactor))
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Accept errors that mean "out of descriptors or memory": accepting again at once
/// would spin, so the reactor backs off and says so.
pub fn accept_exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENFILE | libc::EMFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// How long a reactor waits after an exhausted accept before trying again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The running reactors, whichever the backend.
pub enum Reactors {
    Epoll(epoll::Reactors),
    Uring(uring::Reactors),
}

impl Reactors {
    /// Starts the reactors of the backend `choice` resolves to: `auto` probes io_uring
    /// and falls back to epoll with one log line saying why; `uring` fails instead.
    /// The chosen backend is shown by `smtpgw_io_backend_info` and the `listening` line,
    /// both set by the backend once it is ready.
    pub fn start(choice: IoBackend, p: ReactorParams) -> Result<Reactors, NetError> {
        let reactors = match choice {
            IoBackend::Epoll => Reactors::Epoll(epoll::Reactors::start(p)?),
            IoBackend::Uring => match probe::io_uring() {
                Ok(_) => Reactors::Uring(uring::Reactors::start(p)?),
                Err(why) => return Err(NetError::UringUnavailable(why)),
            },
            IoBackend::Auto => match probe::io_uring() {
                Ok(_) => Reactors::Uring(uring::Reactors::start(p)?),
                Err(why) => {
                    tracing::warn!("io_uring unavailable ({why}); using the epoll backend");
                    Reactors::Epoll(epoll::Reactors::start(p)?)
                }
            },
        };
        Ok(reactors)
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Reactors::Epoll(_) => "epoll",
            Reactors::Uring(_) => "uring",
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        match self {
            Reactors::Epoll(r) => r.local_addr(),
            Reactors::Uring(r) => r.local_addr(),
        }
    }

    pub fn open_connections(&self) -> usize {
        self.shared().open_connections()
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        self.shared().all_closed().await
    }

    fn shared(&self) -> &ReactorShared {
        match self {
            Reactors::Epoll(r) => &r.shared,
            Reactors::Uring(r) => &r.shared,
        }
    }

    /// Where the reactors answer the watchdog (see [`liveness`]).
    pub fn liveness(&self) -> Arc<crate::liveness::Liveness> {
        self.shared().liveness.clone()
    }

    /// Closes the listeners and asks every session to wind down.
    pub fn begin_drain(&self) {
        match self {
            Reactors::Epoll(r) => r.set_phase(Phase::Draining),
            Reactors::Uring(r) => r.set_phase(Phase::Draining),
        }
    }

    /// Every remaining connection gets its `421`; waits for the reactor threads to end.
    pub fn stop(self) {
        match self {
            Reactors::Epoll(r) => r.stop(),
            Reactors::Uring(r) => r.stop(),
        }
    }
}
