//! TEMPORARY: stand-ins for the `src/conn/` driver and the shared `net` helpers being
//! written on main, with their final names and signatures, so the ring mechanics can
//! be built and exercised before the merge. Deleted when the real ones land.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use socket2::{Domain, Protocol, Socket, Type};

use crate::metrics::{Metrics, ReactorMetrics};
use crate::sink::{PublishResult, Sink};
use crate::smtp::envelope::{MessageId, SealedMessage};
use crate::smtp::{reply, Session, SessionConfig};

pub use crate::net::epoll::NetError;

pub struct ReactorParams {
    pub listen: SocketAddr,
    pub reactors: usize,
    pub session: Arc<SessionConfig>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Arc<Metrics>,
    pub max_connections: usize,
    pub limits: Limits,
    pub max_body_memory: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Stop,
}

pub fn stamp() -> (MessageId, DateTime<Utc>) {
    (ulid::Ulid::new(), Utc::now())
}

#[derive(Clone)]
pub struct Limits {
    pub idle_timeout: Duration,
}

#[derive(Clone)]
pub struct BodyBudget;

pub struct Shared {
    pub session: Arc<SessionConfig>,
    pub sink: Arc<dyn Sink>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<Limits>,
    max_connections: usize,
    too_many: Box<[u8]>,
    open: AtomicUsize,
}

impl Shared {
    pub fn new(p: &ReactorParams) -> Arc<Shared> {
        Arc::new(Shared {
            too_many: reply::too_many_connections(&p.session.hostname)
                .into_bytes()
                .into_boxed_slice(),
            session: p.session.clone(),
            sink: p.sink.clone(),
            metrics: p.metrics.clone(),
            limits: Arc::new(p.limits.clone()),
            max_connections: p.max_connections,
            open: AtomicUsize::new(0),
        })
    }
    pub fn new_budget(&self) -> BodyBudget {
        BodyBudget
    }
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
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
    pub fn too_many_reply(&self) -> &[u8] {
        &self.too_many
    }
    pub fn submit(&self, sealed: SealedMessage, done: Completion) -> InFlight {
        let _ = &self.sink;
        done.complete(Ok(sealed.id));
        InFlight(0)
    }
    pub fn answered(&self, _flight: InFlight, _result: &PublishResult) {}
}

pub struct Admitted(Arc<Shared>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.metrics.connections_active.dec();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub struct InFlight(i64);

pub fn bind_listeners(
    listen: SocketAddr,
    reactors: usize,
) -> Result<Vec<std::net::TcpListener>, NetError> {
    let bind = |addr: SocketAddr| -> io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    let first = bind(listen).map_err(|source| NetError::Bind {
        addr: listen,
        source,
    })?;
    let addr = first.local_addr().map_err(|source| NetError::Bind {
        addr: listen,
        source,
    })?;
    let mut v = vec![first];
    for _ in 1..reactors.max(1) {
        v.push(bind(addr).map_err(|source| NetError::Bind { addr, source })?);
    }
    Ok(v)
}

pub fn accept_exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENFILE | libc::EMFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub slot: u32,
    pub generation: u32,
}

pub trait Wake: Send + Sync + 'static {
    fn wake(&self);
}

pub struct CompletionQueue {
    answers: Mutex<Vec<(Ticket, PublishResult)>>,
    waker: Box<dyn Wake>,
}

impl CompletionQueue {
    pub fn new(waker: Box<dyn Wake>) -> Arc<CompletionQueue> {
        Arc::new(CompletionQueue {
            answers: Mutex::new(Vec::with_capacity(256)),
            waker,
        })
    }
    fn push(&self, ticket: Ticket, result: PublishResult) {
        let was_empty = {
            let mut a = self.answers.lock().unwrap_or_else(|e| e.into_inner());
            a.push((ticket, result));
            a.len() == 1
        };
        if was_empty {
            self.waker.wake();
        }
    }
    pub fn drain_into(&self, into: &mut Vec<(Ticket, PublishResult)>) {
        let mut a = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut a);
    }
}

pub struct Completion(Arc<CompletionQueue>, Ticket);

impl Completion {
    pub fn ticket(queue: Arc<CompletionQueue>, ticket: Ticket) -> Self {
        Completion(queue, ticket)
    }
    pub fn complete(self, result: PublishResult) {
        self.0.push(self.1, result)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Open,
    ShutdownWrite,
    Done,
}

pub struct Connection {
    session: Session,
    input: Vec<u8>,
    idle: Duration,
    deadline: Instant,
    linger: bool,
    done: bool,
    eof: bool,
    awaiting: bool,
}

impl Connection {
    pub fn new(
        now: Instant,
        session: Arc<SessionConfig>,
        limits: Arc<Limits>,
        _budget: BodyBudget,
        peer: SocketAddr,
    ) -> Self {
        Connection {
            session: Session::new(session, peer),
            input: Vec::new(),
            idle: limits.idle_timeout,
            deadline: now + limits.idle_timeout,
            linger: false,
            done: false,
            eof: false,
            awaiting: false,
        }
    }
    fn run(&mut self) {
        let n = self.session.feed(&self.input);
        self.input.drain(..n);
    }
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        if self.linger || self.done || self.session.is_closed() {
            return;
        }
        self.deadline = now + self.idle;
        self.input.extend_from_slice(data);
        self.run();
    }
    pub fn handle_eof(&mut self, _now: Instant) {
        self.eof = true;
        if self.linger || self.session.output().is_empty() {
            self.done = true;
        }
    }
    pub fn handle_io_error(&mut self) {
        self.done = true;
    }
    pub fn wants_read(&self) -> bool {
        if self.done {
            return false;
        }
        self.linger
            || (!self.awaiting
                && !self.session.is_awaiting_publish()
                && !self.session.is_closed()
                && self.session.output().len() < 4096)
    }
    pub fn wants_write(&self) -> bool {
        !self.done && !self.session.output().is_empty()
    }
    pub fn pending_output(&self) -> &[u8] {
        self.session.output()
    }
    pub fn output_written(&mut self, _now: Instant, n: usize) {
        self.session.advance_output(n);
        if self.eof && self.session.output().is_empty() {
            self.done = true;
        }
        if !self.input.is_empty() {
            self.run();
        }
    }
    pub fn poll_message(
        &mut self,
        _now: Instant,
        stamp: &mut impl FnMut() -> (MessageId, DateTime<Utc>),
    ) -> Option<SealedMessage> {
        let m = self.session.take_message()?;
        let (id, at) = stamp();
        self.awaiting = true;
        Some(m.seal(id, at, "mx.test"))
    }
    pub fn awaiting_publish(&self) -> bool {
        self.awaiting
    }
    pub fn handle_publish(&mut self, now: Instant, outcome: PublishResult) {
        self.awaiting = false;
        self.session.publish_result(outcome);
        self.deadline = now + self.idle;
        self.run();
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.done).then_some(self.deadline)
    }
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.deadline || self.done {
            return;
        }
        if self.linger || self.session.is_closed() {
            self.done = true;
        } else {
            self.session.timed_out();
            self.deadline = now + Duration::from_secs(2);
        }
    }
    pub fn begin_drain(&mut self, _now: Instant) {
        self.session.begin_drain();
        if self.input.is_empty() && self.session.is_between_commands() && !self.awaiting {
            self.session.shut_down_now();
        }
    }
    pub fn stop(&mut self, now: Instant) {
        if !self.session.is_closed() {
            self.session.shut_down_now();
        }
        self.deadline = now + Duration::from_millis(500);
    }
    pub fn state(&self) -> State {
        if self.done {
            State::Done
        } else if self.session.is_closed() && !self.linger {
            State::ShutdownWrite
        } else {
            State::Open
        }
    }
    pub fn write_shut(&mut self, now: Instant) {
        self.linger = true;
        self.deadline = now + Duration::from_secs(2);
    }
    pub fn paused_for_budget(&self) -> bool {
        false
    }
    pub fn take_stats(&mut self, m: &mut ReactorMetrics) {
        m.absorb(self.session.stats_mut());
    }
}
