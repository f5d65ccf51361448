//! The connection driver: everything a connection decides beyond the SMTP state machine,
//! shared by both I/O backends.
//!
//! Like quinn-proto's `Connection`, a [`Connection`] never touches a socket, a clock or a
//! thread: the backend hands it received bytes and the current time, writes out what it
//! asks to be written, forwards the messages it yields to a sink and reports the answers
//! back. Time is an input: [`Connection::poll_timeout`] says when the driver next wants
//! to be woken and [`Connection::handle_timeout`] is that wake-up.
//!
//! What lives here rather than in a backend:
//! - the receive-side buffer (only for input not consumed yet: an idle connection holds
//!   none), and when to stop reading: a message with the sink, replies the client does
//!   not read (the output cap), the reactor's body memory budget;
//! - deadlines: idle, session time, the minimum data rate of a body, a client that stops
//!   reading our replies, and the linger after the last reply;
//! - the drain policy, message timing and the counts the metrics publish;
//! - the edge ([`edge`]): the PROXY protocol header before the greeting ([`proxy`]), TLS
//!   through rustls' sans-IO API, STARTTLS or implicit ([`tls`]), the greeting delay and
//!   early-talker check, and the per-address limits once the real address is known.
//!
//! Input flows header → TLS records → plaintext → session; output flows session →
//! TLS records → the backend. A backend never sees which of them is in use.

pub mod edge;
pub mod proxy;
pub mod tls;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use rustls::ServerConnection;

use crate::auth::AuthResult;
use crate::logging::{self, ClosedLine, EndedBy, PendingLine, RefusalLine};
use crate::smtp::auth::{AuthRequest, AuthVerdict};
use crate::smtp::envelope::Message;
use crate::smtp::{Gate, Refusal, SessionConfig, SessionEvent, SessionPolicy, SessionStats};
use crate::smtp::{MessageId, PublishError, PublishResult, Session, StoredIn};

#[cfg(any(test, feature = "testing"))]
pub use edge::TlsVersion;
pub use edge::{
    Cidr, Edge, EdgeAuth, EdgeStats, LimitRefusal, PeerLimits, PeerSlot, ProxyMode, Rejected,
    TlsFailure,
};
pub use tls::TlsHandle;

/// After the last reply and a shut-down write side, how long input is still read and
/// discarded, so that closing with unread client bytes does not turn into a RST that
/// destroys the reply in flight.
const LINGER: Duration = Duration::from_secs(2);
/// At the drain deadline, how long a connection gets to write its final `421`.
const STOP_GRACE: Duration = Duration::from_millis(500);
/// How long a timeout's `421` gets to be written: a client that does not take 50 bytes
/// in that time is not reading, and waiting a whole idle timeout more for it would
/// double the time such a client holds its connection.
const TIMEOUT_REPLY_GRACE: Duration = Duration::from_secs(10);
/// Unconsumed input the driver keeps at most. A backend reads only while
/// [`Connection::wants_read`] says so, a batch at a time, so this is only reached by a
/// backend bug or bytes that were already in flight when reading stopped; past it the
/// connection is dropped rather than the buffer grown.
const MAX_PENDING_INPUT: usize = 256 * 1024;
/// How long a PROXY header may take to arrive (a balancer sends it at once).
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a client may send before its TLS handshake is done: records handed to
/// rustls and a partial one held here together. A ClientHello is a few hundred bytes
/// to 2 KB (6 KB with very many extensions). rustls grows its buffer by doubling, so
/// 8 KiB of input costs at most about 12 KiB of buffers, which with the rustls
/// connection itself keeps a half-open TLS connection within 16 KiB of a plaintext
/// one; a client that sends more is failed instead of buffered.
pub const MAX_HANDSHAKE_INPUT: usize = 8 * 1024;
/// The most a backend should read at once between commands (see
/// [`Connection::read_size_hint`]).
const COMMAND_READ: usize = 16 * 1024;

#[cfg(feature = "testing")]
/// Defects this project fixed, back behind switches the simulator (`tests/sim`) turns on
/// to show that it finds them. Off unless a test sets them; absent from a build without
/// the `testing` feature.
pub mod reintroduced {
    use std::sync::atomic::AtomicBool;

    /// Input is processed whatever the output cap says, so a client that pipelines and
    /// never reads grows our output without bound.
    pub static IGNORE_OUTPUT_CAP: AtomicBool = AtomicBool::new(false);
    /// `handle_budget_freed` does nothing: a body paused on the budget whose client has
    /// sent everything stalls (the defect 2d62cfb fixed).
    pub static NO_RESUME_ON_BUDGET: AtomicBool = AtomicBool::new(false);
    /// Commands pipelined behind STARTTLS are kept, not discarded, and run once the
    /// handshake is done as if they had come over TLS (CVE-2011-0411, the plaintext
    /// injection RFC 3207 section 4.2 forbids).
    pub static KEEP_PIPELINED_AFTER_STARTTLS: AtomicBool = AtomicBool::new(false);
    /// No handshake deadline: a client that stops mid-handshake holds its connection
    /// until the idle timeout instead of `--tls-handshake-timeout`.
    pub static NO_HANDSHAKE_DEADLINE: AtomicBool = AtomicBool::new(false);
}

/// Whether the reintroduced defect `switch` is on (never without `testing`).
#[cfg(feature = "testing")]
fn defect(switch: &std::sync::atomic::AtomicBool) -> bool {
    switch.load(Ordering::Relaxed)
}

/// The transaction line's `sink` for a message the Kafka sink stored in its fallback
/// spool.
pub const SINK_FALLBACK: &str = "spool-fallback";

/// Session ids: one per connection, in every log line of that connection and in every
/// record it publishes (`smtp.session`).
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A new session id (also for a connection a backend refuses before it has a driver).
pub fn next_session_id() -> u64 {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// A refusal before a connection has a driver (`--max-connections` at accept): its
/// line, and the caller counts it.
pub fn log_refused_at_accept(peer: SocketAddr) {
    if logging::refusal_lines() {
        logging::submit(logging::Event::Refusal(RefusalLine {
            session: next_session_id(),
            client: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            refusal: Refusal::MaxConnections,
            verb: "",
            address: None,
            detail: None,
            user: None,
        }));
    }
}

/// The minimum average rate a message body must arrive at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinDataRate {
    pub bytes_per_second: u64,
    /// Measured over windows this long; the first window is the grace period.
    pub window: Duration,
}

/// Per-listener connection settings.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// Closes with `421 4.4.2` after this long without progress from the client; a
    /// client that does not read our replies gets as long before it is dropped.
    pub idle_timeout: Duration,
    /// Closes with `421 4.4.2` this long after the connection opened, whatever it does.
    pub max_session_time: Duration,
    pub min_data_rate: Option<MinDataRate>,
    /// While more reply bytes than this are unwritten, no further input is processed, so
    /// a client that pipelines and never reads cannot grow our memory.
    pub output_cap: usize,
    /// The sink's name, for the per-message log line.
    pub sink: &'static str,
}

impl ConnectionSettings {
    pub const DEFAULT_OUTPUT_CAP: usize = 8 * 1024;
}

/// One reactor's allowance for message bodies: bytes of bodies being received plus
/// bytes handed to the sink and not answered yet. Each reactor has its own, so charging
/// it is an uncontended atomic, and the reactor that frees bytes (by an answer or a
/// closed connection) is the one whose paused connections can use them.
///
/// It also carries the sink's in-flight limit (`--max-inflight-messages/-bytes`), so
/// that a slow sink pauses bodies through the same pause and wake-up as spent memory.
#[derive(Clone)]
pub struct BodyBudget(Arc<BudgetInner>);

/// True while the sink holds more unanswered messages than it was configured for
/// (`Sink::over_inflight_limit`); called whenever a body could be read.
pub type SinkLimit = Arc<dyn Fn() -> bool + Send + Sync>;

struct BudgetInner {
    limit: usize,
    used: AtomicUsize,
    /// The part of `used` that is with the sink: it comes back when the sink answers.
    at_sink: AtomicUsize,
    /// Messages of this reactor with the sink. An answer to one of them is sure to
    /// come (a publish times out) and wakes this reactor's paused connections, so a
    /// pause on the sink's limit holds only while there is one.
    messages_at_sink: AtomicUsize,
    sink_limit: Option<SinkLimit>,
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget")
            .field("limit", &self.0.limit)
            .field("used", &self.used())
            .field("at_sink", &self.0.at_sink.load(Ordering::Relaxed))
            .field(
                "messages_at_sink",
                &self.0.messages_at_sink.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl BodyBudget {
    #[cfg(any(test, feature = "testing"))]
    pub fn new(limit: usize) -> BodyBudget {
        BodyBudget::with_sink_limit(limit, None)
    }

    /// A budget whose bodies also pause while `sink_limit` says the sink is over its
    /// in-flight limit.
    pub fn with_sink_limit(limit: usize, sink_limit: Option<SinkLimit>) -> BodyBudget {
        BodyBudget(Arc::new(BudgetInner {
            limit: limit.max(1),
            used: AtomicUsize::new(0),
            at_sink: AtomicUsize::new(0),
            messages_at_sink: AtomicUsize::new(0),
            sink_limit,
        }))
    }

    /// Bytes charged right now.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// At or over the limit: bodies stop being read and new transactions are refused.
    pub fn exhausted(&self) -> bool {
        self.used() >= self.0.limit
    }

    /// Bodies being received stop being read: while the budget is spent, or while the
    /// sink is over its in-flight limit. Only while some of this reactor's messages are
    /// with the sink: its answer is sure to come (a publish times out) and wakes the
    /// paused connections, so the pause ends; when partial bodies alone hold the budget,
    /// pausing them would deadlock, so they go on (new transactions are still refused
    /// while the budget is spent, which bounds them). The sink's limit refuses nothing:
    /// commands are answered, only bodies wait.
    fn pauses_bodies(&self) -> bool {
        let inner = &*self.0;
        if inner.messages_at_sink.load(Ordering::Relaxed) == 0 {
            return false;
        }
        (self.exhausted() && inner.at_sink.load(Ordering::Relaxed) > 0)
            || inner.sink_limit.as_ref().is_some_and(|over| over())
    }

    fn charge(&self, n: usize) {
        self.0.used.fetch_add(n, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        self.0.used.fetch_sub(n, Ordering::Relaxed);
    }

    fn handed_to_sink(&self, n: usize) {
        self.0.messages_at_sink.fetch_add(1, Ordering::Relaxed);
        self.0.at_sink.fetch_add(n, Ordering::Relaxed);
    }

    fn answered_by_sink(&self, n: usize) {
        self.0.messages_at_sink.fetch_sub(1, Ordering::Relaxed);
        self.0.at_sink.fetch_sub(n, Ordering::Relaxed);
        self.release(n);
    }
}

/// What the backend should do with the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Reading and writing as [`Connection::wants_read`] and
    /// [`Connection::wants_write`] say.
    Open,
    /// The conversation is over: once the output is written, shut down the write side
    /// and call [`Connection::write_shut`].
    ShutdownWrite,
    /// Close the socket. Output still pending is best-effort.
    Done,
}

/// Why a connection ended, for the backend's debug log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// QUIT, or a reply that closes (timeout, drain, data rate), then the linger.
    Closed,
    /// The client closed its side.
    Eof,
    /// The client did not read our replies for the idle timeout.
    WriteStalled,
    /// The client sent more than the driver keeps while it was not reading.
    Overrun,
    /// The drain deadline passed.
    Stopped,
    /// The backend saw an I/O error.
    Failed,
    /// Closed unanswered: a missing, malformed or untrusted PROXY header.
    Refused,
}

/// Where a connection's counts go: the reactor's metrics.
pub trait Observer {
    fn absorb(&mut self, stats: &mut SessionStats);
    /// From the read that brought DATA (or the first BDAT) to the end of the body.
    fn observe_data(&mut self, took: Duration);
    /// From handing the message to the sink to its answer.
    fn observe_publish(&mut self, took: Duration);
    /// Body size of a stored message.
    fn observe_message_size(&mut self, bytes: usize);
    /// PROXY, TLS and limit counts.
    fn absorb_edge(&mut self, stats: &mut EdgeStats);
}

/// What carries the session's bytes.
enum Front {
    Plain,
    /// STARTTLS was accepted: its `220` is being written in plaintext, and whatever the
    /// client sends meanwhile is discarded (it was sent before the client could have
    /// seen the `220`: an injection, CVE-2011-0411).
    StartTls,
    Tls(Box<ServerConnection>),
}

/// Samples taken between two [`Connection::take_stats`]; a few at most, since a
/// connection publishes one message at a time.
#[derive(Default)]
struct Samples {
    data: [Duration; 4],
    data_len: usize,
    publish: Option<Duration>,
    stored_size: Option<usize>,
}

/// The message a connection has with the sink, and what its log line will say.
struct PendingPublish {
    since: Instant,
    charged: usize,
    body_len: usize,
    /// From DATA (or the first BDAT) on.
    body_since: Instant,
    /// Whether the transaction line is on for this message (its fields are in
    /// [`Connection::line`]).
    line: bool,
}

/// What the connection-end line reports.
struct Record {
    session: u64,
    opened: Instant,
    /// The last time the backend called in: a connection's end has no clock of its own.
    seen: Instant,
    bytes_in: u64,
    bytes_out: u64,
    accepted: u64,
    refused: u64,
    ended: Option<EndedBy>,
    tls: Option<&'static str>,
}

enum Life {
    Open,
    /// The session is over; waiting for the output to be written.
    Closing,
    /// Write side shut down; reading and discarding until EOF or the deadline.
    Lingering {
        until: Instant,
    },
    Done(Ending),
}

/// One client connection: the SMTP session plus everything around it.
pub struct Connection {
    session: Session,
    limits: Arc<ConnectionSettings>,
    budget: BodyBudget,
    peer: SocketAddr,
    life: Life,
    /// Input not consumed yet: a partial command line, or bytes that arrived while the
    /// session could not take them. Empty (and unallocated) for an idle connection.
    pending: Vec<u8>,
    hard_deadline: Instant,
    /// Last time the client made progress: a command consumed, body bytes taken.
    idle_deadline: Instant,
    /// Set while output is pending: the client must read some of it by then.
    write_deadline: Option<Instant>,
    /// The drain deadline passed: the final `421` gets this long.
    stop_deadline: Option<Instant>,
    draining: bool,
    /// The client closed its side; once the output is written the connection is done.
    eof: bool,
    /// Body bytes of the session charged to the budget.
    charged: usize,
    in_flight: Option<PendingPublish>,
    /// The transaction line of the message in flight, encoded (the buffer serves all
    /// the connection's messages).
    line: PendingLine,
    body_started: Option<Instant>,
    /// When the current body began (kept for the log line after the body timing ends).
    body_since: Option<Instant>,
    /// Minimum data rate: the current window's start and the bytes taken in it.
    rate_window: Option<(Instant, u64)>,
    /// The body was seen paused on the budget and the driver has not been told the
    /// pause ended (`handle_budget_freed`, a sink answer): the budget is shared, so
    /// it can end before this connection's wake-up look, and until then the client's
    /// clocks still stand.
    held_by_budget: bool,
    samples: Samples,
    edge: Arc<Edge>,
    /// A PROXY header is expected before anything else; its bytes so far (only when it
    /// arrived in pieces).
    proxy_wait: bool,
    header: Vec<u8>,
    front: Front,
    /// TLS records to write (with TLS, the session's output moves here at once).
    wire_out: Vec<u8>,
    /// TLS records received and not handed to rustls yet: a partial record, or records
    /// behind plaintext the session has not taken (see [`Self::tls_input`]).
    tls_in: Vec<u8>,
    /// A TLS handshake completed.
    tls_done: bool,
    /// While a handshake is under way: when it must be done by.
    handshake_deadline: Option<Instant>,
    /// Bytes of TLS records handed to rustls before the handshake completed.
    handshake_bytes: usize,
    /// The session accepted STARTTLS (its event): what the client pipelined after the
    /// command is discarded and the handshake follows the `220`.
    starttls_accepted: bool,
    /// The greeting (or the refusal in its place) was written.
    greeted: bool,
    /// With a greeting delay, not before then.
    greet_at: Instant,
    /// A per-address limit refused the connection: said in place of the greeting.
    refusal: Option<LimitRefusal>,
    slot: Option<Box<dyn PeerSlot>>,
    edge_stats: EdgeStats,
    record: Record,
    /// Our name, for the records' `smtp.node` (one allocation per connection, none per
    /// message).
    node: Arc<str>,
}

impl Connection {
    /// A new connection on a listener with `edge` settings. Without PROXY, TLS or a
    /// greeting delay the `220` greeting is already in the output.
    pub fn new(
        now: Instant,
        session: Arc<SessionConfig>,
        limits: Arc<ConnectionSettings>,
        budget: BodyBudget,
        peer: SocketAddr,
        edge: Arc<Edge>,
    ) -> Connection {
        let hard_deadline = now
            .checked_add(limits.max_session_time)
            .unwrap_or_else(|| now + Duration::from_secs(366 * 24 * 3600));
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let node = Arc::from(session.hostname.as_str());
        // The listener's policy, given once: nothing about it changes while the
        // connection runs (a PROXY header's effect on AUTH is the session's own rule).
        let policy = SessionPolicy {
            starttls: edge.tls.is_some() && !edge.implicit_tls,
            tls_required: edge.require_tls,
            error_budget: edge.error_budget,
            auth: edge.auth.as_ref().map(|a| a.policy),
            output_limit: limits.output_cap,
        };
        #[cfg(feature = "testing")]
        let policy = SessionPolicy {
            output_limit: if defect(&reintroduced::IGNORE_OUTPUT_CAP) {
                usize::MAX
            } else {
                policy.output_limit
            },
            ..policy
        };
        let session = Session::without_greeting(session, policy, peer);
        let mut conn = Connection {
            session,
            // The client's idle time starts with the greeting (see `maybe_greet`).
            idle_deadline: now + edge.greeting_delay + limits.idle_timeout,
            limits,
            budget,
            peer,
            life: Life::Open,
            pending: Vec::new(),
            hard_deadline,
            write_deadline: None,
            stop_deadline: None,
            draining: false,
            eof: false,
            charged: 0,
            in_flight: None,
            line: PendingLine::default(),
            body_started: None,
            body_since: None,
            rate_window: None,
            held_by_budget: false,
            samples: Samples::default(),
            proxy_wait: false,
            header: Vec::new(),
            front: Front::Plain,
            wire_out: Vec::new(),
            tls_in: Vec::new(),
            tls_done: false,
            handshake_deadline: None,
            handshake_bytes: 0,
            starttls_accepted: false,
            greeted: false,
            greet_at: now + edge.greeting_delay,
            refusal: None,
            slot: None,
            edge_stats: EdgeStats::default(),
            edge,
            record: Record {
                session: next_session_id(),
                opened: now,
                seen: now,
                bytes_in: 0,
                bytes_out: 0,
                accepted: 0,
                refused: 0,
                ended: None,
                tls: None,
            },
            node,
        };
        conn.start(now);
        conn.after_output_change(now);
        conn
    }

    fn start(&mut self, now: Instant) {
        if self.edge.implicit_tls {
            match self.edge.tls.as_ref().map(TlsHandle::accept) {
                Some(Ok(tls)) => self.front = Front::Tls(Box::new(tls)),
                _ => {
                    self.edge_stats.tls_failures[TlsFailure::Other] += 1;
                    self.life = Life::Done(Ending::Failed);
                    return;
                }
            }
        }
        if self.edge.proxy != ProxyMode::Off {
            let ip = self.peer.ip();
            if !self.edge.proxy_trusted.iter().any(|c| c.contains(ip)) {
                self.edge_stats.refused[Rejected::ProxyUntrusted] += 1;
                self.refused(Refusal::ProxyUntrusted, None);
                self.life = Life::Done(Ending::Refused);
                return;
            }
            self.proxy_wait = true;
            self.idle_deadline = now + self.limits.idle_timeout.min(PROXY_HEADER_TIMEOUT);
            return;
        }
        self.handshake_begins(now);
        self.peer_known(now);
        self.maybe_greet(now);
    }

    /// A TLS handshake can begin (implicit TLS once any PROXY header is read, STARTTLS
    /// once its `220` is written): its deadline starts.
    fn handshake_begins(&mut self, now: Instant) {
        if matches!(self.front, Front::Tls(_)) && !self.tls_done {
            self.handshake_deadline = self.edge.tls_handshake_timeout.map(|t| now + t);
            #[cfg(feature = "testing")]
            if defect(&reintroduced::NO_HANDSHAKE_DEADLINE) {
                self.handshake_deadline = None;
            }
        }
    }

    /// The client's real address is known: the per-address limits count it.
    fn peer_known(&mut self, now: Instant) {
        let Some(peers) = &self.edge.peers else {
            return;
        };
        match peers.admit(now, self.peer.ip()) {
            Ok(slot) => self.slot = Some(slot),
            Err(why) => {
                self.edge_stats.refuse(why);
                self.refusal = Some(why);
            }
        }
    }

    /// Writes the greeting (or the refusal in its place) once nothing holds it back.
    fn maybe_greet(&mut self, now: Instant) {
        if self.greeted
            || self.proxy_wait
            || !matches!(self.life, Life::Open)
            || self.session.is_closed()
            || (self.edge.implicit_tls && !self.tls_done)
        {
            return;
        }
        if let Some(why) = self.refusal.take() {
            self.greeted = true;
            self.session
                .refuse_over_limit(why.refusal(), why.reply_text());
            return;
        }
        if now >= self.greet_at {
            self.greeted = true;
            self.idle_deadline = now + self.limits.idle_timeout;
            self.session.greet();
        }
    }

    /// The client spoke before the greeting: `554 5.5.0` and close.
    fn early_talk(&mut self) {
        self.greeted = true;
        self.refusal = None;
        self.pending = Vec::new();
        self.edge_stats.refused[Rejected::EarlyTalker] += 1;
        self.session.early_talker();
    }

    /// The client's address: the socket's, or after a PROXY header the one it named.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Bytes received from the client. The driver takes them all and keeps what the
    /// session cannot consume yet; a backend reads only while [`Self::wants_read`].
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        match self.life {
            Life::Open => {}
            // The conversation is over: whatever the client still sends is discarded.
            Life::Closing | Life::Lingering { .. } | Life::Done(_) => return,
        }
        if data.is_empty() {
            return;
        }
        self.seen(now);
        self.record.bytes_in += data.len() as u64;
        if self.proxy_wait {
            self.proxy_input(now, data);
        } else {
            self.wire_input(now, data);
        }
        self.after_output_change(now);
    }

    /// Input while the PROXY header is expected. Every byte after the header goes on
    /// to the wire, however the reads cut the header and what follows it.
    fn proxy_input(&mut self, now: Instant, data: &[u8]) {
        // Bytes of the header buffered from earlier reads (they held no whole header).
        let before = self.header.len();
        if before > 0 {
            // One byte more than a header can take, so an endless one is seen as such.
            let room = proxy::MAX_HEADER.saturating_sub(before);
            self.header
                .extend_from_slice(&data[..data.len().min(room + 1)]);
        }
        let header = std::mem::take(&mut self.header);
        let input = if before > 0 { &header[..] } else { data };
        match proxy::parse(self.edge.proxy, input) {
            proxy::Parsed::Incomplete => {
                self.header = header;
                if before == 0 {
                    self.header.extend_from_slice(data);
                }
            }
            proxy::Parsed::Invalid => self.proxy_invalid(),
            proxy::Parsed::Header { len, source } => {
                // The buffered bytes held no whole header, so this one ends in `data`:
                // what follows it is all of `data` from there, not only the part copied
                // into the buffer. (A parser that found a header inside bytes it had
                // called incomplete would be a bug; refusing beats dropping bytes.)
                let Some(rest) = len.checked_sub(before).and_then(|at| data.get(at..)) else {
                    return self.proxy_invalid();
                };
                self.edge_stats.proxy_headers += 1;
                self.proxy_wait = false;
                if let Some(source) = source {
                    self.peer = SocketAddr::new(source.ip().to_canonical(), source.port());
                }
                self.session.proxied(source.map(|_| self.peer));
                self.idle_deadline = now + self.limits.idle_timeout;
                self.handshake_begins(now);
                self.peer_known(now);
                // What followed the header in the same read: a TLS ClientHello on an
                // implicit-TLS listener, else a client talking before the greeting.
                if !rest.is_empty() {
                    self.wire_input(now, rest);
                }
                self.maybe_greet(now);
            }
        }
    }

    /// Not a header this listener accepts: closed unanswered.
    fn proxy_invalid(&mut self) {
        self.edge_stats.refused[Rejected::ProxyInvalid] += 1;
        self.refused(Refusal::ProxyInvalid, None);
        self.life = Life::Done(Ending::Refused);
    }

    /// Input past the PROXY header: TLS records or plaintext.
    fn wire_input(&mut self, now: Instant, data: &[u8]) {
        match self.front {
            Front::Plain => self.plain_input(now, data),
            Front::StartTls => self.edge_stats.starttls_discarded_bytes += data.len() as u64,
            Front::Tls(_) => self.tls_input(now, data),
        }
    }

    fn plain_input(&mut self, now: Instant, data: &[u8]) {
        if !self.greeted {
            return self.early_talk();
        }
        if self.pending.is_empty() {
            let consumed = self.feed(now, data);
            if consumed < data.len() {
                self.keep(&data[consumed..]);
            }
        } else {
            self.keep(data);
            self.process_pending(now);
        }
        self.check_starttls();
    }

    /// STARTTLS was accepted: whatever the client pipelined after it is discarded,
    /// never executed, and the handshake starts once the `220` is written.
    fn check_starttls(&mut self) {
        if matches!(self.front, Front::Plain) && std::mem::take(&mut self.starttls_accepted) {
            #[cfg(feature = "testing")]
            if defect(&reintroduced::KEEP_PIPELINED_AFTER_STARTTLS) {
                self.front = Front::StartTls;
                return;
            }
            self.edge_stats.starttls_discarded_bytes += self.pending.len() as u64;
            self.pending = Vec::new();
            self.front = Front::StartTls;
        }
    }

    /// TLS records. rustls gets one whole record at a time, and each record's plaintext
    /// goes to the session before the next record is decrypted; while the session cannot
    /// take input (a message with the sink, unread replies), further records wait here
    /// undecrypted. So whatever arrived intact is acted on, its reply
    /// (a final dot's `250`) encrypted and queued, before an alert that a later, bad
    /// record in the same read brings.
    fn tls_input(&mut self, now: Instant, data: &[u8]) {
        if self.tls_in.is_empty() {
            let used = self.decrypt(now, data);
            if used < data.len() && matches!(self.life, Life::Open) {
                if self.handshake_too_large(data.len() - used) {
                    return;
                }
                self.keep_records(&data[used..]);
            }
        } else {
            self.keep_records(data);
            self.resume_records(now);
            self.handshake_too_large(self.tls_in.len());
        }
    }

    /// Ciphertext not handed to rustls yet, bounded like plaintext input.
    fn keep_records(&mut self, data: &[u8]) {
        if self.tls_in.len() + data.len() > MAX_PENDING_INPUT {
            self.life = Life::Done(Ending::Overrun);
            self.tls_in = Vec::new();
            self.pending = Vec::new();
            return;
        }
        if !self.tls_done {
            // A partial handshake record: room for exactly the record as far as the
            // handshake's bound allows, so the buffer never doubles past what was sent.
            let held = self.tls_in.len() + data.len();
            let mut header = [0u8; 5];
            for (h, b) in header.iter_mut().zip(self.tls_in.iter().chain(data)) {
                *h = *b;
            }
            let room = MAX_HANDSHAKE_INPUT.saturating_sub(self.handshake_bytes);
            let want = tls::declared_record_len(&header)
                .unwrap_or(held)
                .clamp(held, room.max(held));
            self.tls_in.reserve_exact(want - self.tls_in.len());
        }
        self.tls_in.extend_from_slice(data);
    }

    /// Decrypts held records as far as the session can take their plaintext.
    fn resume_records(&mut self, now: Instant) {
        let held = std::mem::take(&mut self.tls_in);
        let used = self.decrypt(now, &held);
        if matches!(self.life, Life::Open) && used < held.len() {
            self.tls_in = held;
            self.tls_in.drain(..used);
        }
    }

    /// Hands whole records of `data` to rustls while the session can take what they
    /// bring; returns how many bytes it handed over (all of them if the connection
    /// failed: the rest is never read).
    fn decrypt(&mut self, now: Instant, data: &[u8]) -> usize {
        let mut pos = 0;
        while matches!(self.life, Life::Open) && self.takes_records() {
            let Some(len) = tls::record_len(&data[pos..]) else {
                break;
            };
            if !self.tls_done {
                self.handshake_bytes += len;
                if self.handshake_too_large(0) {
                    return data.len();
                }
            }
            // Replies so far are encrypted before anything this record brings.
            self.flush_tls();
            let record = &data[pos..pos + len];
            pos += len;
            self.decrypt_record(now, record);
        }
        if matches!(self.life, Life::Open) {
            pos
        } else {
            data.len()
        }
    }

    /// Whether a handshake, with `held` more bytes of it waiting, is over
    /// [`MAX_HANDSHAKE_INPUT`]; if so the connection is failed.
    fn handshake_too_large(&mut self, held: usize) -> bool {
        if self.tls_done || self.handshake_bytes + held <= MAX_HANDSHAKE_INPUT {
            return false;
        }
        if !matches!(self.life, Life::Open) {
            return true;
        }
        self.edge_stats.tls_failures[TlsFailure::BadMessage] += 1;
        self.life = Life::Done(Ending::Overrun);
        self.tls_in = Vec::new();
        self.pending = Vec::new();
        true
    }

    /// During the handshake every record is read; after it, only while the session
    /// takes input (plaintext it holds then is only a partial line waiting for more).
    fn takes_records(&self) -> bool {
        !self.tls_done || self.can_consume()
    }

    fn decrypt_record(&mut self, now: Instant, mut record: &[u8]) {
        let Front::Tls(tls) = &mut self.front else {
            return;
        };
        let mut processed = Ok(());
        while !record.is_empty() && processed.is_ok() {
            processed = match tls.read_tls(&mut record) {
                Ok(_) => tls.process_new_packets().map(|_| ()),
                Err(_) => Err(rustls::Error::General("read_tls".into())),
            };
        }
        if let Err(e) = processed {
            // The alert rustls queued for the client goes out before the close.
            let _ = tls.write_tls(&mut self.wire_out);
            if !self.tls_done {
                let failure = tls::failure(&e);
                self.edge_stats.tls_failures[failure] += 1;
                // The failure's kind and rustls' text (which names an alert).
                let detail = format!("{}: {e}", failure.as_str());
                self.refused(Refusal::TlsHandshake, Some(&detail));
            }
            self.pending = Vec::new();
            self.tls_in = Vec::new();
            self.life = Life::Closing;
            return;
        }
        let mut plain = false;
        let mut buf = [0u8; 4096];
        loop {
            match tls.reader().read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if self.pending.len() + n > MAX_PENDING_INPUT {
                        self.life = Life::Done(Ending::Overrun);
                        self.pending = Vec::new();
                        return;
                    }
                    self.pending.extend_from_slice(&buf[..n]);
                    plain = true;
                }
            }
        }
        if !self.tls_done && !tls.is_handshaking() {
            self.handshake_done(now);
        }
        if plain {
            if !self.greeted {
                return self.early_talk();
            }
            self.process_pending(now);
        }
    }

    fn handshake_done(&mut self, now: Instant) {
        let Front::Tls(tls) = &self.front else {
            return;
        };
        self.tls_done = true;
        self.handshake_deadline = None;
        let version = tls::version(tls);
        self.edge_stats.tls_handshakes[version] += 1;
        self.record.tls = Some(version.as_str());
        let description: Arc<str> = tls::describe(tls).into();
        self.session.tls_started(description);
        self.idle_deadline = now + self.limits.idle_timeout;
        self.maybe_greet(now);
    }

    /// Moves the session's replies into TLS records.
    fn flush_tls(&mut self) {
        let Front::Tls(tls) = &mut self.front else {
            return;
        };
        let out = self.session.output();
        if !out.is_empty() {
            let n = out.len();
            // rustls buffers plaintext without limit unless one is set; ours is bounded
            // by the output cap.
            let _ = tls.writer().write_all(out);
            self.session.advance_output(n);
        }
        while tls.wants_write() {
            match tls.write_tls(&mut self.wire_out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Bytes of output not written yet, plaintext and TLS records together.
    fn out_len(&self) -> usize {
        self.session.output().len() + self.wire_out.len()
    }

    /// The client closed its side: nothing more will arrive. What it sent is answered
    /// if the answer is already written out; the connection then ends.
    pub fn handle_eof(&mut self, now: Instant) {
        match self.life {
            Life::Lingering { .. } => self.life = Life::Done(Ending::Closed),
            Life::Done(_) => {}
            Life::Open | Life::Closing => {
                if matches!(self.front, Front::Tls(_)) && !self.tls_done {
                    self.edge_stats.tls_failures[TlsFailure::Eof] += 1;
                    self.refused(Refusal::TlsHandshake, Some("eof"));
                }
                self.seen(now);
                if self.out_len() == 0 {
                    self.life = Life::Done(Ending::Eof);
                } else {
                    // Write what is pending (a client may half-close after QUIT), then end
                    // without a linger: the client has nothing more to send.
                    self.life = Life::Closing;
                    self.pending = Vec::new();
                    self.tls_in = Vec::new();
                    self.eof = true;
                    self.after_output_change(now);
                }
            }
        }
    }

    /// Whether the backend should read from the socket now.
    pub fn wants_read(&self) -> bool {
        match self.life {
            Life::Open => self.can_consume() && self.pending.len() < MAX_PENDING_INPUT,
            Life::Lingering { .. } => true,
            Life::Closing | Life::Done(_) => false,
        }
    }

    /// How many bytes the backend should read at most now. Between commands a read
    /// brings commands whose replies may stop at the output cap, and whatever is left
    /// stays in the driver's buffer; a modest read keeps a client that pipelines and
    /// never reads cheap. A body is consumed as it arrives, so it may come in bulk.
    pub fn read_size_hint(&self) -> usize {
        if self.session.in_body() {
            usize::MAX
        } else {
            COMMAND_READ
        }
    }

    /// Whether there are replies to write.
    pub fn wants_write(&self) -> bool {
        !self.pending_output().is_empty() && !matches!(self.life, Life::Done(_))
    }

    /// Replies not yet written to the client (TLS records when TLS is on).
    pub fn pending_output(&self) -> &[u8] {
        match self.front {
            Front::Tls(_) => &self.wire_out,
            Front::Plain | Front::StartTls => self.session.output(),
        }
    }

    /// The backend wrote the first `n` bytes of [`Self::pending_output`]. Input that
    /// waited for the output to drain below the cap is processed now.
    pub fn output_written(&mut self, now: Instant, n: usize) {
        if n == 0 {
            return;
        }
        self.seen(now);
        self.record.bytes_out += n as u64;
        match self.front {
            Front::Tls(_) => {
                self.wire_out.drain(..n.min(self.wire_out.len()));
            }
            Front::Plain | Front::StartTls => self.session.advance_output(n),
        }
        self.write_deadline = None;
        if matches!(self.life, Life::Open) && self.has_input() {
            self.process_input(now);
        }
        self.after_output_change(now);
    }

    /// The message the session completed, sealed with `stamp`'s id and time and our
    /// hostname by `seal`, for the backend to hand to the sink. `seal` is the sink
    /// layer's (`sink::record::SealedMessage::seal`, the record's layout), given rather
    /// than imported because the driver sits below that layer. The driver then waits for
    /// [`Self::handle_publish`].
    pub fn poll_message<M>(
        &mut self,
        now: Instant,
        stamp: &mut impl FnMut() -> (MessageId, DateTime<Utc>),
        seal: impl FnOnce(Message, MessageId, DateTime<Utc>, &str) -> M,
    ) -> Option<M> {
        let mut message = self.session.take_message()?;
        if let Some(slot) = &self.slot {
            slot.message_sent(now);
        }
        if let (Some(auth), Some(user)) = (&self.edge.auth, &message.envelope.auth) {
            auth.verifier.message_sent(user, now);
        }
        let body_len = message.body().len();
        let (id, received_at) = stamp();
        message.envelope.node = Some(self.node.clone());
        message.envelope.session = self.record.session;
        let line = logging::message_lines();
        if line {
            let env = &message.envelope;
            self.line.begin(
                self.record.session,
                id,
                self.peer,
                self.record.tls,
                &env.helo,
                env.auth.as_ref(),
                env.mail_from(),
                message.message_id(),
                env.rcpt_to(),
                body_len,
                logging::recipients_listed(),
            );
        }
        let sealed = seal(message, id, received_at, self.session.hostname());
        // The body's charge stays until the sink answers: it is in memory until then.
        let charged = std::mem::take(&mut self.charged);
        self.budget.handed_to_sink(charged);
        self.in_flight = Some(PendingPublish {
            since: now,
            charged,
            body_len,
            body_since: self.body_since.take().unwrap_or(now),
            line,
        });
        Some(sealed)
    }

    /// Credentials the session took, for the backend to hand to the verifier (off the
    /// reactor) with a way back to [`Self::handle_auth`]. The session consumes no
    /// input until then.
    pub fn poll_auth(&mut self) -> Option<(AuthRequest, Arc<crate::auth::Verifier>)> {
        let verifier = self.edge.auth.as_ref()?.verifier.clone();
        let request = self.session.take_auth_request()?;
        Some((request, verifier))
    }

    #[cfg(any(test, feature = "testing"))]
    /// True while credentials are with the verifier.
    pub fn awaiting_auth(&self) -> bool {
        self.session.is_awaiting_auth()
    }

    /// The verifier's answer for the credentials taken last. A failure counts against
    /// the client's address; past `--max-auth-failures-per-ip` the session gets
    /// `421 4.7.0` and closes.
    pub fn handle_auth(&mut self, now: Instant, verdict: AuthVerdict) {
        if !matches!(self.life, Life::Open) || !self.session.is_awaiting_auth() {
            return;
        }
        self.seen(now);
        // `locked` is counted from the session's refusal (see `note_refusal`), which
        // also covers an address already over its limit when AUTH arrives.
        if verdict != AuthVerdict::Locked {
            self.edge_stats.auth[AuthResult::of(verdict)] += 1;
        }
        self.session.auth_result(verdict);
        if verdict == AuthVerdict::Rejected {
            if let Some(slot) = &self.slot {
                slot.auth_failed(now);
                if !slot.auth_allowed(now) {
                    self.session.refuse_over_limit(
                        Refusal::AuthFailures,
                        "Too many authentication failures",
                    );
                }
            }
        }
        self.take_events(now);
        self.resume_after_answer(now);
    }

    /// The verifier or the sink answered: waiting for it was the gateway's time, not
    /// the client's, and the input held meanwhile is taken up again.
    fn resume_after_answer(&mut self, now: Instant) {
        self.idle_deadline = now + self.limits.idle_timeout;
        self.held_by_budget = false;
        if self.has_input() {
            self.process_input(now);
        } else if self.draining {
            self.wind_down();
        }
        self.after_output_change(now);
    }

    #[cfg(any(test, feature = "testing"))]
    /// Body bytes of the session charged to the reactor's budget right now: a body
    /// paused on the budget must not charge more until it resumes.
    pub fn charged(&self) -> usize {
        self.charged
    }

    /// True while a message is with the sink.
    pub fn awaiting_publish(&self) -> bool {
        self.in_flight.is_some()
    }

    #[cfg(any(test, feature = "testing"))]
    /// The sink's answer for the message taken last, stored in the sink's own store.
    pub fn handle_publish(&mut self, now: Instant, result: PublishResult) {
        self.handle_answer(now, result, StoredIn::Sink);
    }

    /// The sink's answer for the message taken last, and where the sink stored it.
    pub fn handle_answer(&mut self, now: Instant, result: PublishResult, stored_in: StoredIn) {
        let Some(flight) = self.in_flight.take() else {
            debug_assert!(false, "handle_publish without a message in flight");
            return;
        };
        self.seen(now);
        self.budget.answered_by_sink(flight.charged);
        self.samples.publish = Some(now.saturating_duration_since(flight.since));
        self.log_transaction(now, &flight, &result, stored_in);
        if result.is_ok() {
            self.samples.stored_size = Some(flight.body_len);
            self.record.accepted += 1;
        }
        if matches!(self.life, Life::Done(_)) {
            return;
        }
        self.session.publish_result(result);
        self.resume_after_answer(now);
    }

    /// When the driver next needs [`Self::handle_timeout`], if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.life {
            Life::Done(_) => None,
            Life::Lingering { until } => Some(until),
            Life::Closing => {
                let closing = self.stop_deadline.or(self.write_deadline).unwrap_or(
                    // Closing with nothing pending moves on at once; this is only a bound.
                    self.hard_deadline,
                );
                let handshake = self.handshake_deadline.filter(|_| !self.tls_done);
                Some(handshake.map_or(closing, |h| h.min(closing)))
            }
            Life::Open => {
                let mut next = self.hard_deadline;
                if let Some(w) = self.write_deadline {
                    next = next.min(w);
                }
                if let Some(s) = self.stop_deadline {
                    next = next.min(s);
                }
                if let Some(h) = self.handshake_deadline.filter(|_| !self.tls_done) {
                    next = next.min(h);
                }
                // Waiting for the sink, the verifier or for the client to read is not
                // idleness.
                // Nor is a body paused on the reactor's budget: the gateway stopped
                // reading it.
                if self.in_flight.is_none()
                    && !self.session.is_awaiting_auth()
                    && self.out_len() == 0
                    && !self.clocks_held()
                {
                    next = next.min(self.idle_deadline);
                }
                // Held back only by the greeting delay (not by a header or a handshake,
                // which input moves on).
                let held = self.proxy_wait || (self.edge.implicit_tls && !self.tls_done);
                if !self.greeted && !held {
                    next = next.min(self.greet_at);
                }
                if let (Some(rate), Some((start, _))) =
                    (self.limits.min_data_rate, self.rate_window)
                {
                    next = next.min(start + rate.window);
                }
                Some(next)
            }
        }
    }

    /// Time has passed; acts on every deadline that has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.seen(now);
        match self.life {
            Life::Done(_) => return,
            Life::Lingering { until } => {
                if now >= until {
                    self.life = Life::Done(Ending::Closed);
                }
                return;
            }
            Life::Closing | Life::Open => {}
        }
        if self.stop_deadline.is_some_and(|d| now >= d) {
            self.life = Life::Done(Ending::Stopped);
            return;
        }
        if self.write_deadline.is_some_and(|d| now >= d) {
            self.life = Life::Done(Ending::WriteStalled);
            return;
        }
        if !self.tls_done && self.handshake_deadline.is_some_and(|d| now >= d) {
            // A silent or trickling handshake: nothing can be said to it, so it is
            // closed unanswered, also when a drain began closing it meanwhile.
            self.edge_stats.tls_failures[TlsFailure::Timeout] += 1;
            self.life = Life::Done(Ending::Closed);
            return;
        }
        if !matches!(self.life, Life::Open) {
            return;
        }
        let idle = self.in_flight.is_none()
            && self.out_len() == 0
            && !self.clocks_held()
            && now >= self.idle_deadline;
        if (idle || now >= self.hard_deadline) && (self.proxy_wait || !self.greeted) {
            // Nothing was said yet (no header, no handshake): close unanswered.
            if matches!(self.front, Front::Tls(_)) && !self.tls_done {
                self.edge_stats.tls_failures[TlsFailure::Timeout] += 1;
                self.refused(Refusal::TlsHandshake, Some("timeout"));
            } else if self.proxy_wait {
                self.refused(Refusal::ProxyInvalid, Some("timeout"));
            }
            self.record.ended.get_or_insert(EndedBy::Timeout);
            self.life = Life::Done(if self.proxy_wait {
                Ending::Refused
            } else {
                Ending::Closed
            });
            return;
        }
        self.maybe_greet(now);
        if now >= self.hard_deadline || idle {
            if matches!(self.front, Front::Tls(_)) && !self.tls_done {
                self.edge_stats.tls_failures[TlsFailure::Timeout] += 1;
                self.refused(Refusal::TlsHandshake, Some("timeout"));
            }
            self.session.timed_out(if now >= self.hard_deadline {
                Refusal::SessionTimeout
            } else {
                Refusal::IdleTimeout
            });
            self.grace_for_last_reply(now);
        } else if let (Some(rate), Some((start, bytes))) =
            (self.limits.min_data_rate, self.rate_window)
        {
            if now >= start + rate.window {
                let wanted = rate
                    .bytes_per_second
                    .saturating_mul(rate.window.as_secs().max(1));
                // A paused body (the gateway's doing) is not the client's slowness.
                if bytes < wanted && self.can_consume() && !self.held_by_budget {
                    self.session.too_slow();
                    self.grace_for_last_reply(now);
                } else {
                    self.rate_window = Some((now, 0));
                }
            }
        }
        self.after_output_change(now);
    }

    /// The session was closed by a timeout: its `421` gets [`TIMEOUT_REPLY_GRACE`].
    /// An idle timeout finds nothing unwritten as far as the driver knows, but with
    /// io_uring's linked sends a reply counts as written when its send is queued, so a
    /// client that never reads is idle-timed-out, and its `421` waits behind that send.
    fn grace_for_last_reply(&mut self, now: Instant) {
        let grace = now + TIMEOUT_REPLY_GRACE;
        self.write_deadline = Some(self.write_deadline.map_or(grace, |d| d.min(grace)));
    }

    /// The server is draining: a session idle between commands gets `421 4.3.2` now;
    /// one in the middle of something finishes it (its 250 still goes out) and gets
    /// `421` at its next command.
    pub fn begin_drain(&mut self, now: Instant) {
        if self.draining {
            return;
        }
        self.draining = true;
        self.session.begin_drain();
        if matches!(self.life, Life::Open) {
            self.wind_down();
        }
        self.after_output_change(now);
    }

    /// The drain deadline passed: `421 4.3.2` now (whatever the client had not finished
    /// got no 250), a short grace to write it, then done.
    pub fn stop(&mut self, now: Instant) {
        if matches!(self.life, Life::Done(_)) {
            return;
        }
        if !self.session.is_closed() {
            self.session.shut_down_now();
        }
        self.stop_deadline = Some(now + STOP_GRACE);
        if matches!(self.life, Life::Lingering { .. }) {
            self.life = Life::Done(Ending::Stopped);
        }
        self.after_output_change(now);
    }

    /// What the backend should do with the socket.
    pub fn state(&self) -> State {
        match self.life {
            Life::Open | Life::Lingering { .. } => State::Open,
            Life::Closing => State::ShutdownWrite,
            Life::Done(_) => State::Done,
        }
    }

    /// Why the connection ended, once [`State::Done`].
    pub fn ending(&self) -> Option<Ending> {
        match self.life {
            Life::Done(e) => Some(e),
            _ => None,
        }
    }

    /// The backend shut down the write side: linger, reading and discarding.
    pub fn write_shut(&mut self, now: Instant) {
        if matches!(self.life, Life::Closing) {
            self.life = if self.eof {
                Life::Done(Ending::Eof)
            } else if self.stop_deadline.is_some() {
                Life::Done(Ending::Stopped)
            } else {
                Life::Lingering {
                    until: now + LINGER,
                }
            };
        }
    }

    /// The backend saw an I/O error on the socket.
    pub fn handle_io_error(&mut self) {
        if !matches!(self.life, Life::Done(_)) {
            self.life = Life::Done(Ending::Failed);
        }
    }

    /// The reactor freed body budget or had a message answered (the sink may be back
    /// under its in-flight limit): input kept while this connection waited is processed
    /// now, since its client may have nothing more to send that would bring it through
    /// [`Self::handle_input`].
    pub fn handle_budget_freed(&mut self, now: Instant) {
        #[cfg(feature = "testing")]
        if defect(&reintroduced::NO_RESUME_ON_BUDGET) {
            return;
        }
        if !matches!(self.life, Life::Open) || !self.can_consume() {
            return;
        }
        if std::mem::take(&mut self.held_by_budget) || self.session.in_body() {
            // The client's clocks stood still while the gateway did not read: it gets
            // a whole idle timeout and a fresh data-rate window from now.
            self.idle_deadline = now + self.limits.idle_timeout;
            if self.rate_window.is_some() {
                self.rate_window = Some((now, 0));
            }
        }
        if self.has_input() {
            self.process_input(now);
            self.after_output_change(now);
        }
    }

    /// True while this connection's body waits for the reactor's budget or for the
    /// sink to fall under its in-flight limit; the backend looks again when its reactor
    /// frees budget or gets a sink answer.
    pub fn paused_for_budget(&self) -> bool {
        matches!(self.life, Life::Open)
            && self.body_held_by_budget()
            && !self.session.is_awaiting_publish()
    }

    #[cfg(feature = "testing")]
    /// A TLS handshake has begun and is not done (the simulator holds it to
    /// `--tls-handshake-timeout`).
    pub fn handshake_pending(&self) -> bool {
        matches!(self.front, Front::Tls(_)) && !self.tls_done
    }

    /// Hands everything counted since the last call to `to`.
    pub fn take_stats(&mut self, to: &mut impl Observer) {
        to.absorb(self.session.stats_mut());
        let s = &mut self.samples;
        for took in &s.data[..s.data_len] {
            to.observe_data(*took);
        }
        s.data_len = 0;
        if let Some(took) = s.publish.take() {
            to.observe_publish(took);
        }
        if let Some(size) = s.stored_size.take() {
            to.observe_message_size(size);
        }
        to.absorb_edge(&mut self.edge_stats);
    }

    /// The transaction line of a message the sink answered: its fields go to the log
    /// writer, which formats them (see [`crate::logging`]).
    fn log_transaction(
        &mut self,
        now: Instant,
        flight: &PendingPublish,
        result: &PublishResult,
        stored_in: StoredIn,
    ) {
        if !flight.line {
            return;
        }
        let (code, error) = match result {
            Ok(_) => (250u16, None),
            Err(e @ PublishError::Temporary(_)) => (451, Some(e)),
            Err(e @ PublishError::StorageFull) => (452, Some(e)),
            Err(e @ PublishError::TooLarge) => (552, Some(e)),
        };
        let ms = now.saturating_duration_since(flight.body_since).as_millis() as u64;
        let (sink, kafka) = match stored_in {
            // The fallback spool answered (Kafka had failed the message).
            StoredIn::Fallback => (SINK_FALLBACK, None),
            StoredIn::Kafka { partition, offset } => (self.limits.sink, Some((partition, offset))),
            StoredIn::Sink => (self.limits.sink, None),
        };
        let error = error.map(|e| e as &dyn std::fmt::Display);
        logging::submit_message(self.line.finish(code, ms, sink, kafka, error));
    }

    /// Notes the time of a call from the backend (for the connection-end line).
    fn seen(&mut self, now: Instant) {
        if now > self.record.seen {
            self.record.seen = now;
        }
    }

    /// A refusal the driver itself decided (the session reports its own as events,
    /// and counts them itself).
    fn refused(&mut self, refusal: Refusal, detail: Option<&str>) {
        self.edge_stats.refusals[refusal] += 1;
        self.note_refusal(refusal, "", None, detail.map(Box::from), None);
    }

    fn note_refusal(
        &mut self,
        refusal: Refusal,
        verb: &'static str,
        address: Option<Box<str>>,
        detail: Option<Box<str>>,
        user: Option<Box<str>>,
    ) {
        if refusal == Refusal::AuthFailures {
            self.edge_stats.auth[AuthResult::Locked] += 1;
        }
        let ended = match refusal {
            Refusal::IdleTimeout | Refusal::SessionTimeout | Refusal::DataRate => {
                Some(EndedBy::Timeout)
            }
            Refusal::PerIp
            | Refusal::PerPrefix
            | Refusal::ConnectionRate
            | Refusal::MessageRate
            | Refusal::ErrorBudget
            | Refusal::AuthFailures
            | Refusal::EarlyTalker => Some(EndedBy::Limit),
            Refusal::ShuttingDown => Some(EndedBy::Drain),
            Refusal::ProxyInvalid | Refusal::ProxyUntrusted | Refusal::TlsHandshake => {
                Some(EndedBy::Refused)
            }
            Refusal::TooLarge | Refusal::BareLineEnding => {
                self.record.refused += 1;
                None
            }
            Refusal::SinkTemporary | Refusal::StorageFull | Refusal::SinkTooLarge => {
                self.record.refused += 1;
                None
            }
            _ => None,
        };
        if let Some(e) = ended {
            self.record.ended.get_or_insert(e);
        }
        if logging::refusal_lines() {
            logging::submit(logging::Event::Refusal(RefusalLine {
                session: self.record.session,
                client: self.peer,
                refusal,
                verb,
                address,
                detail,
                user,
            }));
        }
    }

    /// Acts on what the session reported since the last call, in order: refusals go
    /// to the log, body events move the body timing, STARTTLS the front.
    fn take_events(&mut self, now: Instant) {
        while let Some(event) = self.session.poll_event() {
            match event {
                SessionEvent::Refused {
                    refusal,
                    verb,
                    address,
                    detail,
                    user,
                } => self.note_refusal(refusal, verb, address, detail, user),
                // A body "starts" at the read that brought its DATA or first BDAT.
                SessionEvent::BodyStarted => {
                    self.body_started = Some(now);
                    self.body_since = Some(now);
                    self.rate_window = None;
                }
                SessionEvent::BodyEnded => self.end_body(now),
                // RSET, HELO or EHLO in the middle of a body, or a close: no timing
                // sample, no rate window.
                SessionEvent::BodyAbandoned => {
                    self.body_started = None;
                    self.body_since = None;
                    self.rate_window = None;
                }
                SessionEvent::StartTls => self.starttls_accepted = true,
            }
        }
    }

    /// The connection-end line.
    fn log_end(&mut self) {
        if !logging::session_lines() {
            return;
        }
        if self.session.quit_received() {
            self.record.ended.get_or_insert(EndedBy::Quit);
        }
        let r = &self.record;
        let ended = r.ended.unwrap_or(match self.life {
            Life::Done(Ending::Eof | Ending::Closed) => EndedBy::ClientClosed,
            Life::Done(Ending::WriteStalled) => EndedBy::Timeout,
            Life::Done(Ending::Stopped) => EndedBy::Drain,
            Life::Done(Ending::Refused) => EndedBy::Refused,
            Life::Done(Ending::Overrun | Ending::Failed) => EndedBy::Error,
            // Dropped by the backend while still open: its reactor stopped.
            _ => EndedBy::Drain,
        });
        logging::submit(logging::Event::Closed(ClosedLine {
            session: r.session,
            client: self.peer,
            ms: r.seen.saturating_duration_since(r.opened).as_millis() as u64,
            accepted: r.accepted,
            refused: r.refused,
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            ended,
        }));
    }

    fn keep(&mut self, data: &[u8]) {
        if self.pending.len() + data.len() > MAX_PENDING_INPUT {
            self.life = Life::Done(Ending::Overrun);
            self.pending = Vec::new();
            return;
        }
        self.pending.extend_from_slice(data);
    }

    /// Whether the session may take input now.
    fn can_consume(&self) -> bool {
        let blocked = self.session.is_closed()
            || self.session.is_awaiting_publish()
            || self.session.is_awaiting_auth()
            // After STARTTLS the session takes nothing until the handshake is done, but
            // the handshake itself must be read.
            || (self.session.is_starting_tls() && !matches!(self.front, Front::Tls(_)))
            || self.over_output_cap()
            || self.body_held_by_budget();
        !blocked
    }

    /// The client's idle and data-rate clocks stand: its body is held back now, or was
    /// when last seen and the driver has not been told the pause ended.
    fn clocks_held(&self) -> bool {
        self.held_by_budget || self.body_held_by_budget()
    }

    /// A body the reactor's budget (or the sink's in-flight limit) holds back: the
    /// gateway, not the client, is the one waiting.
    fn body_held_by_budget(&self) -> bool {
        self.session.in_body() && self.budget.pauses_bodies()
    }

    /// Replies the client has not read fill the output cap: no more input is taken.
    fn over_output_cap(&self) -> bool {
        #[cfg(feature = "testing")]
        if defect(&reintroduced::IGNORE_OUTPUT_CAP) {
            return false;
        }
        self.out_len() >= self.limits.output_cap
    }

    /// Input received and not consumed: plaintext, or TLS records not decrypted yet.
    fn has_input(&self) -> bool {
        !self.pending.is_empty() || !self.tls_in.is_empty()
    }

    /// Goes on with held input once the session may take more: the plaintext first,
    /// then the TLS records behind it.
    fn process_input(&mut self, now: Instant) {
        if !self.pending.is_empty() {
            self.process_pending(now);
        }
        if !self.tls_in.is_empty() {
            self.resume_records(now);
        }
    }

    fn process_pending(&mut self, now: Instant) {
        let pending = std::mem::take(&mut self.pending);
        // (The session stops at the output cap by itself; see `feed`.)
        let consumed = self.feed(now, &pending);
        self.pending = pending;
        self.pending.drain(..consumed);
        if self.pending.is_empty() {
            // An idle connection holds no receive buffer.
            self.pending = Vec::new();
        }
        self.check_starttls();
    }

    /// Feeds the session while it can take input; returns how much it took.
    fn feed(&mut self, now: Instant, input: &[u8]) -> usize {
        let mut pos = 0;
        while pos < input.len() && self.can_consume() {
            let was_in_body = self.session.in_body();
            let mut gate = ConnGate {
                now,
                slot: self.slot.as_deref(),
                auth: self.edge.auth.as_ref(),
                budget: &self.budget,
            };
            let n = self.session.feed_with(&input[pos..], &mut gate);
            pos += n;
            // Taken after each feed: the session keeps only a few between polls, and
            // takes no further command while its body events wait.
            self.take_events(now);
            if n > 0 {
                self.idle_deadline = now + self.limits.idle_timeout;
            }
            self.track_body(now, was_in_body, n);
            if n == 0 {
                break;
            }
        }
        pos
    }

    /// Keeps the budget charge and the data-rate window in step with what the session
    /// holds and just consumed (the body events have moved the timing).
    fn track_body(&mut self, now: Instant, was_in_body: bool, consumed: usize) {
        let held = self.session.body_len();
        if held > self.charged {
            self.budget.charge(held - self.charged);
        } else {
            self.budget.release(self.charged - held);
        }
        self.charged = held;
        if self.session.in_body() {
            match &mut self.rate_window {
                Some((_, bytes)) if was_in_body => *bytes += consumed as u64,
                Some(_) => {}
                None => self.rate_window = Some((now, 0)),
            }
        }
    }

    fn end_body(&mut self, now: Instant) {
        if let Some(t) = self.body_started.take() {
            let s = &mut self.samples;
            if s.data_len < s.data.len() {
                s.data[s.data_len] = now.saturating_duration_since(t);
                s.data_len += 1;
            }
        }
        self.rate_window = None;
    }

    /// Draining: a session idle between commands, with no partial command buffered,
    /// gets its `421` now; any other finishes what it is doing first (the session
    /// answers its next command with `421`).
    fn wind_down(&mut self) {
        let idle = self.in_flight.is_none()
            && !self.has_input()
            && self.session.is_between_commands()
            && !self.session.is_closed();
        if idle {
            self.session.shut_down_now();
        }
    }

    /// Moves the lifecycle on after anything that may have changed the output or closed
    /// the session, and keeps the write deadline.
    fn after_output_change(&mut self, now: Instant) {
        self.take_events(now);
        if self.body_held_by_budget() {
            self.held_by_budget = true;
        }
        if matches!(self.life, Life::Open) && self.session.is_closed() {
            self.life = Life::Closing;
            self.pending = Vec::new();
            self.tls_in = Vec::new();
            self.flush_tls();
            if let Front::Tls(tls) = &mut self.front {
                if self.tls_done {
                    tls.send_close_notify();
                }
            }
        }
        self.flush_tls();
        if matches!(self.front, Front::StartTls) && self.session.output().is_empty() {
            // The `220` is written: from here on the client's bytes are TLS records.
            match self.edge.tls.as_ref().map(TlsHandle::accept) {
                Some(Ok(tls)) => {
                    self.front = Front::Tls(Box::new(tls));
                    self.handshake_begins(now);
                }
                _ => {
                    self.edge_stats.tls_failures[TlsFailure::Other] += 1;
                    self.life = Life::Done(Ending::Failed);
                }
            }
        }
        let has_output = self.out_len() > 0;
        if has_output && self.write_deadline.is_none() {
            // Writes get the same patience as reads, and never much past the session's
            // hard limit.
            let limit = self.hard_deadline.max(now + STOP_GRACE);
            self.write_deadline = Some((now + self.limits.idle_timeout).min(limit));
        } else if !has_output {
            self.write_deadline = None;
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Credentials still with the verifier: the client left before its verdict, which
        // is then never counted against its address. Counted here as a failure, or one
        // address could keep the verifier pool busy (AUTH, close, again) unlimited.
        if self.session.is_awaiting_auth() {
            if let Some(slot) = &self.slot {
                slot.auth_failed(self.record.seen);
            }
        }
        self.budget.release(self.charged);
        if let Some(flight) = &self.in_flight {
            self.budget.answered_by_sink(flight.charged);
        }
        let seen = self.record.seen;
        self.take_events(seen);
        self.log_end();
    }
}

/// The limits that change while a connection runs, answered when the session meets
/// one (MAIL, AUTH) rather than pushed into it before every read.
struct ConnGate<'a> {
    now: Instant,
    slot: Option<&'a dyn PeerSlot>,
    auth: Option<&'a EdgeAuth>,
    budget: &'a BodyBudget,
}

impl Gate for ConnGate<'_> {
    fn message_allowed(&mut self) -> bool {
        self.slot.is_none_or(|s| s.message_allowed(self.now))
    }
    fn user_message_allowed(&mut self, user: &str) -> bool {
        self.auth
            .is_none_or(|a| a.verifier.message_allowed(user, self.now))
    }
    fn auth_allowed(&mut self) -> bool {
        self.slot.is_none_or(|s| s.auth_allowed(self.now))
    }
    fn body_memory_available(&mut self) -> bool {
        !self.budget.exhausted()
    }
}

#[cfg(any(test, feature = "testing"))]
/// The temporary failure for a message whose answer can never come (the sink dropped it).
pub fn sink_dropped() -> PublishResult {
    Err(PublishError::Temporary("sink dropped the message".into()))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod edge_tests;
