//! One simulated run: the plan (a list of steps the seed's RNG chose), the world it
//! acts on (the real `Host`, drivers and sessions; simulated clock, network, clients
//! and sink), the settling after each step (sink answers, budget waiters, deadlines,
//! every connection something happened to looked at, as a backend would), and the
//! finish: well-behaved clients and a prompt sink until every script ends, then a drain
//! and the stop at its deadline. A step that names something gone (a connection that
//! closed, a message already answered) does nothing, so any subset of a plan is a plan:
//! that is what shrinking cuts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use smtpgw::completion::{CompletionQueue, Ticket, Wake};
use smtpgw::conn::{Cidr, ConnectionSettings, Edge, ProxyMode, State};
use smtpgw::metrics::Metrics;
use smtpgw::net::host::{self, Host, STOP_WAIT};
use smtpgw::net::{Phase, ReactorParams, ReactorShared};
use smtpgw::reload::SessionConfigHandle;
use smtpgw::smtp::{BareLfPolicy, MessageId, SessionConfig};

use crate::clients::{Client, Expect, Kind, Settings, TlsPlan, KINDS};
use crate::clock::Clock;
use crate::invariants::{self, violation, Acks, Violation};
use crate::net::{pump, pump_uring, Drive, SimSock};
use crate::sim_support::Rng;
use crate::sink::{Outcome, SimSink, PUBLISH_TIMEOUTS};
use crate::tls::{self, Edges, HANDSHAKE_TIMEOUT};

pub const HOSTNAME: &str = "mx.sim.test";
const MAX_MESSAGE_SIZE: usize = 64 * 1024;
const IDLE: Duration = Duration::from_secs(60);
/// The driver's grace for a timeout's `421` (`conn::TIMEOUT_REPLY_GRACE`).
const TIMEOUT_REPLY_GRACE: Duration = Duration::from_secs(10);
const SESSION: Duration = Duration::from_secs(300);
const DRAIN_WINDOW: Duration = Duration::from_secs(10);
/// The latest a connection may end past its session limit: the linger after its last
/// reply and a second for the reply itself.
const END_SLACK: Duration = Duration::from_secs(3);
const MAX_CLIENTS: usize = 40;
const MAX_CONNECTIONS: usize = 32;
/// The longest a finished run's clients get to complete their scripts before the drain.
const FINISH: Duration = Duration::from_secs(30);

/// One thing the run does. Picks index the connections open at that moment (or the
/// messages the sink holds) modulo their number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Connect {
        kind: Kind,
        seed: u64,
    },
    Send {
        pick: u32,
        max: u32,
    },
    Read {
        pick: u32,
        max: u32,
    },
    Advance {
        ms: u32,
    },
    /// The clock jumps to the next deadline.
    Jump,
    Answer {
        pick: u32,
        outcome: Outcome,
    },
    SinkCrash {
        ms: u32,
    },
    SinkInline {
        on: bool,
    },
    Reset {
        pick: u32,
    },
    HalfClose {
        pick: u32,
    },
    /// SIGTERM: the drain begins; the stop follows at its deadline.
    Drain,
    /// SIGHUP: new connections get other session settings.
    Reload {
        variant: u8,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Connect { kind, seed } => {
                write!(f, "connect a {kind:?} client (script seed {seed})")
            }
            Step::Send { pick, max } => {
                write!(f, "open connection #{pick}: client sends up to {max} bytes")
            }
            Step::Read { pick, max } => {
                write!(f, "open connection #{pick}: client reads up to {max} bytes")
            }
            Step::Advance { ms } => write!(f, "{ms} ms pass"),
            Step::Jump => write!(f, "time jumps to the next deadline"),
            Step::Answer { pick, outcome } => {
                write!(f, "sink answers held message #{pick}: {outcome:?}")
            }
            Step::SinkCrash { ms } => write!(f, "sink crashes for {ms} ms"),
            Step::SinkInline { on } => write!(f, "sink answers Ok inside submit: {on}"),
            Step::Reset { pick } => write!(f, "open connection #{pick}: client resets"),
            Step::HalfClose { pick } => {
                write!(f, "open connection #{pick}: client shuts its write side")
            }
            Step::Drain => write!(f, "drain (SIGTERM)"),
            Step::Reload { variant } => {
                write!(f, "reload (SIGHUP): session settings variant {variant}")
            }
        }
    }
}

/// The steps seed `seed` chooses.
pub fn plan(seed: u64) -> Vec<Step> {
    let mut rng = Rng::with_seed(seed);
    let n = rng.usize(100..1_500);
    let mut clients = 0;
    let mut steps = Vec::with_capacity(n);
    for i in 0..n {
        let step = match rng.u32(..1000) {
            0..=59 if clients < MAX_CLIENTS => {
                clients += 1;
                let kind = match rng.u8(..28) {
                    0..=2 => Kind::Mta,
                    3..=5 => Kind::Pipelining,
                    6..=8 => Kind::Bdat,
                    9..=10 => Kind::Proxied,
                    i => KINDS[(i as usize - 11) % KINDS.len()],
                };
                Step::Connect {
                    kind,
                    seed: rng.u64(..),
                }
            }
            0..=399 => Step::Send {
                pick: rng.u32(..),
                max: if rng.bool() {
                    rng.u32(1..64)
                } else {
                    rng.u32(1..70_000)
                },
            },
            400..=639 => Step::Read {
                pick: rng.u32(..),
                max: rng.u32(1..20_000),
            },
            640..=749 => Step::Advance {
                ms: if rng.u8(..8) == 0 {
                    rng.u32(1..5_000)
                } else {
                    rng.u32(1..200)
                },
            },
            750..=759 => Step::Jump,
            760..=939 => Step::Answer {
                pick: rng.u32(..),
                outcome: match rng.u8(..20) {
                    0..=1 => Outcome::Temporary,
                    2 => Outcome::StorageFull,
                    3 => Outcome::TooLarge,
                    _ => Outcome::Ok,
                },
            },
            940..=943 => Step::SinkCrash {
                ms: rng.u32(1..8_000),
            },
            944..=951 => Step::SinkInline { on: rng.bool() },
            952..=956 => Step::Reset { pick: rng.u32(..) },
            957..=961 => Step::HalfClose { pick: rng.u32(..) },
            // Late in the run, so that most runs have something to drain.
            962..=964 if i > n / 2 => Step::Drain,
            _ => Step::Reload {
                variant: rng.u8(..4),
            },
        };
        steps.push(step);
    }
    steps
}

fn session_config(variant: u8) -> SessionConfig {
    SessionConfig {
        hostname: HOSTNAME.into(),
        accept_domains: ["example.com"].into_iter().collect(),
        max_message_size: MAX_MESSAGE_SIZE,
        max_recipients: if variant & 1 == 0 { 100 } else { 2 },
        bare_lf: if variant & 2 == 0 {
            BareLfPolicy::Reject
        } else {
            BareLfPolicy::Normalize
        },
        headroom: smtpgw::sink::record::RECEIVED_HEADROOM + HOSTNAME.len(),
    }
}

thread_local! {
    static STAMPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Ids and times that follow from the run, not from the clock or the OS's randomness.
fn sim_stamp() -> (MessageId, DateTime<Utc>) {
    let n = STAMPS.with(|s| {
        let n = s.get() + 1;
        s.set(n);
        n
    });
    let at = DateTime::from_timestamp(1_800_000_000 + n as i64, 0).unwrap_or_default();
    (MessageId::from(u128::from(n) << 16 | 0x5157), at)
}

struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

/// FNV-1a over everything the run did (steps, opens and closes, each reply's text, and
/// each record the sink kept: id, outcome and a hash of its envelope and body): two
/// runs of one seed must agree.
#[derive(Clone, Copy)]
pub struct TraceHash(pub u64, pub bool);

impl TraceHash {
    fn add(&mut self, text: &str) {
        if self.1 {
            println!("    trace: {text}");
        }
        self.bytes(text.as_bytes());
        self.bytes(b"\n");
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// What one run covered.
#[derive(Default, Clone)]
pub struct Counts {
    pub sessions: u64,
    pub messages: u64,
    pub acked: u64,
    /// TLS begun (STARTTLS's `220`, or an implicit-TLS connection), messages
    /// acknowledged over TLS, and those of them from an authenticated session.
    pub tls_begun: u64,
    pub tls_acked: u64,
    pub auth_acked: u64,
    /// Runs driven as the epoll backend drives `Host`, and as the io_uring one does.
    pub epoll_runs: u64,
    pub uring_runs: u64,
    pub sim_time: Duration,
    pub faults: BTreeMap<&'static str, u64>,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.sessions += o.sessions;
        self.messages += o.messages;
        self.acked += o.acked;
        self.tls_begun += o.tls_begun;
        self.tls_acked += o.tls_acked;
        self.auth_acked += o.auth_acked;
        self.epoll_runs += o.epoll_runs;
        self.uring_runs += o.uring_runs;
        self.sim_time += o.sim_time;
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_default() += v;
        }
    }
}

struct Live {
    ticket: Ticket,
    client: usize,
    opened: Duration,
}

pub struct RunResult {
    pub violation: Option<(usize, Violation)>,
    pub trace: u64,
    pub counts: Counts,
}

struct World {
    /// The backend whose way of driving `Host` the run imitates.
    drive: Drive,
    clock: Clock,
    host: Host<SimSock>,
    sink: Arc<SimSink>,
    session: Arc<SessionConfigHandle>,
    metrics: Arc<Metrics>,
    output_cap: usize,
    plain: Arc<Edge>,
    early: Arc<Edge>,
    proxied: Arc<Edge>,
    /// The listeners with a certificate (and AUTH), as the server builds them.
    tls_edges: Edges,
    clients: Vec<Client>,
    /// Per client: when its TLS handshake began, as the client saw it (the gateway's
    /// deadline started no later).
    handshake_from: Vec<Option<Duration>>,
    early_edge: Vec<bool>,
    /// Per client: when it last sent or read a byte, the gateway last wrote to it
    /// (which restarts the time a client that does not read gets), or it was last seen
    /// waiting on the gateway (its message with the sink, its body paused on the
    /// budget), which restarts its idle time when that wait ends.
    active: Vec<Duration>,
    live: BTreeMap<u32, Live>,
    dirty: BTreeSet<(u32, u32)>,
    stop_at: Option<Duration>,
    exit_at: Option<Duration>,
    acks: Acks,
    trace: TraceHash,
    counts: Counts,
    bad: Vec<Violation>,
    rng_windows: Rng,
}

impl World {
    fn new(seed: u64) -> World {
        STAMPS.with(|s| s.set(0));
        // Its own stream, so that the plan and the scripts stay what the seed made them.
        let drive = match Rng::with_seed(seed ^ 0x7572_696e_6721_2121).u8(..4) {
            0 | 1 => Drive::Epoll,
            2 => Drive::Uring { link_sends: false },
            _ => Drive::Uring { link_sends: true },
        };
        // Publish timeouts longer than the idle timeout in half the seeds.
        let timeouts = PUBLISH_TIMEOUTS.len();
        let long_waits = Rng::with_seed(seed ^ 0x5851_f42d_4c95_7f2d).usize(..timeouts);
        let sink = Arc::new(SimSink::new(PUBLISH_TIMEOUTS[long_waits]));
        let metrics = Arc::new(Metrics::new().expect("metrics registry"));
        let session = Arc::new(SessionConfigHandle::new(session_config(0)));
        let output_cap = ConnectionSettings::DEFAULT_OUTPUT_CAP;
        let params = ReactorParams {
            listeners: Vec::new(),
            reactors: 1,
            pin_cpus: false,
            session: session.clone(),
            sink: sink.clone(),
            metrics: metrics.clone(),
            max_connections: MAX_CONNECTIONS,
            limits: ConnectionSettings {
                idle_timeout: IDLE,
                max_session_time: SESSION,
                min_data_rate: None,
                output_cap,
                sink: "sim",
            },
            // Smallest there is: one message and an eighth; bodies pause often.
            max_body_memory: 0,
        };
        let shared = ReactorShared::new(&params);
        let queue = CompletionQueue::new(Box::new(NoWake));
        let mut host = Host::new(shared, queue, metrics.reactor(0));
        let tls_edges = tls::edges(&metrics);
        host.set_stamp(sim_stamp);
        let early = Edge {
            greeting_delay: Duration::from_secs(1),
            ..Edge::default()
        };
        let proxied = Edge {
            proxy: ProxyMode::V1,
            proxy_trusted: vec![Cidr::parse("127.0.0.0/8").expect("cidr")],
            ..Edge::default()
        };
        let mut counts = Counts::default();
        match drive {
            Drive::Epoll => counts.epoll_runs += 1,
            Drive::Uring { .. } => counts.uring_runs += 1,
        }
        let mut trace = TraceHash(
            0xcbf2_9ce4_8422_2325,
            std::env::var_os("SMTPGW_SIM_TRACE").is_some(),
        );
        trace.add(&format!("drive {drive:?}"));
        World {
            drive,
            clock: Clock::new(Instant::now()),
            host,
            sink,
            session,
            metrics,
            output_cap,
            plain: Arc::new(Edge::default()),
            early: Arc::new(early),
            proxied: Arc::new(proxied),
            tls_edges,
            clients: Vec::new(),
            handshake_from: Vec::new(),
            early_edge: Vec::new(),
            active: Vec::new(),
            live: BTreeMap::new(),
            dirty: BTreeSet::new(),
            stop_at: None,
            exit_at: None,
            acks: Acks::default(),
            trace,
            counts,
            bad: Vec::new(),
            rng_windows: Rng::with_seed(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    fn fault(&mut self, kind: &'static str) {
        *self.counts.faults.entry(kind).or_default() += 1;
    }

    fn pick(&self, pick: u32) -> Option<(Ticket, usize)> {
        if self.live.is_empty() {
            return None;
        }
        let l = self.live.values().nth(pick as usize % self.live.len())?;
        Some((l.ticket, l.client))
    }

    fn connect(&mut self, kind: Kind, seed: u64) {
        if self.host.phase() != Phase::Running {
            return;
        }
        let now = self.clock.now();
        let id = self.clients.len();
        let Some(admitted) = self.host.admit() else {
            self.fault("refused_max_connections");
            return;
        };
        let cfg = self.session.current();
        let settings = Settings {
            bare_lf: cfg.bare_lf,
            max_message_size: cfg.max_message_size,
        };
        let edge = match kind {
            Kind::EarlyTalker => self.early.clone(),
            Kind::Proxied => self.proxied.clone(),
            Kind::TlsRequired => self.tls_edges.required.clone(),
            Kind::ImplicitTls => self.tls_edges.implicit.clone(),
            k if k.tls() => self.tls_edges.starttls.clone(),
            _ => self.plain.clone(),
        };
        let window = self.rng_windows.usize(1..64 * 1024);
        let chunk = self.rng_windows.usize(1..70_000);
        let peer = SocketAddr::from(([127, 0, 0, 1], 10_000 + id as u16));
        let sock = SimSock::new(id, window, chunk);
        let client = Client::new(id as u32, kind, seed, settings);
        self.handshake_from
            .push(client.tls_began.then(|| self.clock.elapsed()));
        self.counts.tls_begun += u64::from(client.tls_began);
        match (kind, &client.script.tls) {
            (_, TlsPlan::Garbage(_)) => self.fault("tls_garbage"),
            (_, TlsPlan::Stall { .. }) => self.fault("tls_stalled_handshake"),
            (Kind::TlsInjector, _) => self.fault("starttls_injection"),
            _ => {}
        }
        self.clients.push(client);
        self.clients[id].tls_began = false;
        self.early_edge.push(kind == Kind::EarlyTalker);
        self.active.push(self.clock.elapsed());
        self.counts.sessions += 1;
        self.trace.add(&format!("open c{id} {kind:?}"));
        match self.host.open(now, peer, edge, admitted, sock) {
            Some(t) => {
                self.live.insert(
                    t.slot,
                    Live {
                        ticket: t,
                        client: id,
                        opened: self.clock.elapsed(),
                    },
                );
                self.dirty.insert((t.slot, t.generation));
            }
            None => self.trace.add(&format!("refused c{id}")),
        }
    }

    fn send(&mut self, pick: u32, max: usize) {
        if let Some((t, c)) = self.pick(pick) {
            self.send_to(t, c, max);
        }
    }

    fn send_to(&mut self, t: Ticket, c: usize, max: usize) {
        let client = &mut self.clients[c];
        let Some(e) = self.host.get(t) else { return };
        if e.io.peer_eof || e.io.reset {
            return;
        }
        let max = if client.script.trickle { 1 } else { max };
        let out = client.outgoing();
        let n = out.len().min(max);
        if n == 0 {
            return;
        }
        e.io.inbound.extend_from_slice(&out[..n]);
        client.sent(n);
        self.active[c] = self.clock.elapsed();
        self.trace.add(&format!("c{c} sent {n}"));
        if client.reset_pending {
            e.io.reset = true;
            self.counts
                .faults
                .entry("reset_mid_data")
                .and_modify(|v| *v += 1)
                .or_insert(1);
        }
        self.dirty.insert((t.slot, t.generation));
    }

    fn read(&mut self, pick: u32, max: usize) {
        if let Some((t, c)) = self.pick(pick) {
            self.read_from(t, c, max);
        }
    }

    fn read_from(&mut self, t: Ticket, c: usize, max: usize) {
        if !self.clients[c].script.reads {
            return;
        }
        let Some(e) = self.host.get(t) else { return };
        let n = e.io.to_client.len().min(max);
        if n == 0 {
            return;
        }
        let data: Vec<u8> = e.io.to_client.drain(..n).collect();
        self.active[c] = self.clock.elapsed();
        self.dirty.insert((t.slot, t.generation));
        self.client_gets(c, &data);
    }

    /// Bytes reach client `c`: its replies are checked in order.
    fn client_gets(&mut self, c: usize, data: &[u8]) {
        let replies = self.clients[c].received(data);
        let client = &mut self.clients[c];
        if std::mem::take(&mut client.tls_began) {
            self.handshake_from[c] = Some(self.clock.elapsed());
            self.counts.tls_begun += 1;
        }
        if let Some(e) = client.tls_error.take() {
            // A client that pipelined plaintext behind STARTTLS may have had it read as
            // its handshake: the gateway's alert is its due.
            let excused = client.script.injects && e.contains("received fatal alert");
            if !excused {
                self.bad.push(violation(
                    "tls",
                    format!(
                        "client {c} ({:?}): the gateway's TLS records fail: {e}",
                        client.kind
                    ),
                ));
            }
        }
        for r in replies {
            self.trace.add(&format!("c{c} {}", r.text.trim_end()));
            let client = &self.clients[c];
            if let Err(v) =
                invariants::reply(client, &r, &self.sink, &mut self.acks, self.early_edge[c])
            {
                self.bad.push(v);
            } else if r.code == 250 && matches!(r.expect, Some(Expect::MessageEnd { .. })) {
                self.counts.tls_acked += u64::from(client.tls_on());
                self.counts.auth_acked += u64::from(client.authenticated.is_some());
            }
        }
    }

    fn apply(&mut self, step: Step) {
        self.trace.add(&format!("{step:?}"));
        match step {
            Step::Connect { kind, seed } => self.connect(kind, seed),
            Step::Send { pick, max } => self.send(pick, max as usize),
            Step::Read { pick, max } => self.read(pick, max as usize),
            Step::Advance { ms } => {
                self.advance_to(self.clock.elapsed() + Duration::from_millis(u64::from(ms)))
            }
            Step::Jump => self.jump(),
            Step::Answer { pick, outcome } => {
                if self.sink.answer(pick as usize, outcome).is_some() && outcome != Outcome::Ok {
                    self.fault(match outcome {
                        Outcome::Temporary => "sink_temporary",
                        Outcome::StorageFull => "sink_storage_full",
                        _ => "sink_too_large",
                    });
                }
            }
            Step::SinkCrash { ms } => {
                self.fault("sink_crash");
                self.sink
                    .crash(self.clock.elapsed() + Duration::from_millis(u64::from(ms)));
            }
            Step::SinkInline { on } => self.sink.set_inline(on),
            Step::Reset { pick } => {
                if let Some((t, _)) = self.pick(pick) {
                    if let Some(e) = self.host.get(t) {
                        e.io.reset = true;
                        self.fault("reset");
                        self.dirty.insert((t.slot, t.generation));
                    }
                }
            }
            Step::HalfClose { pick } => {
                if let Some((t, _)) = self.pick(pick) {
                    if let Some(e) = self.host.get(t) {
                        if !e.io.peer_eof {
                            e.io.peer_eof = true;
                            self.fault("half_close");
                            self.dirty.insert((t.slot, t.generation));
                        }
                    }
                }
            }
            Step::Drain => self.drain(),
            Step::Reload { variant } => {
                self.fault("reload");
                self.session.set(session_config(variant));
            }
        }
        self.settle();
        self.eager_handshakes();
    }

    /// Most TLS clients are on a fast path to the gateway: their handshake records go
    /// both ways within the step that started them moving, so that their
    /// conversations get past the handshake timeout as often as a plaintext one gets
    /// past the greeting. (The others, and every client after its handshake, move only
    /// when the run's steps pick them.)
    fn eager_handshakes(&mut self) {
        for _ in 0..8 {
            if !self.bad.is_empty() {
                return;
            }
            let eager: Vec<(Ticket, usize)> = self
                .live
                .values()
                .filter(|l| self.clients[l.client].eager_handshake())
                .map(|l| (l.ticket, l.client))
                .collect();
            if eager.is_empty() {
                return;
            }
            let before = self.trace.0;
            for (t, c) in eager {
                self.read_from(t, c, usize::MAX);
                self.send_to(t, c, usize::MAX);
            }
            self.settle();
            if self.trace.0 == before {
                return;
            }
        }
    }

    fn drain(&mut self) {
        if self.host.phase() != Phase::Running {
            return;
        }
        self.fault("drain");
        let now = self.clock.now();
        let dirty = &mut self.dirty;
        self.host.set_phase(now, Phase::Draining, |t, _| {
            dirty.insert((t.slot, t.generation));
        });
        self.stop_at = Some(self.clock.elapsed() + DRAIN_WINDOW);
    }

    /// The next moment something is due: a driver's deadline, the sink's, the stop.
    fn next_due(&mut self) -> Option<Duration> {
        let mut due: Option<Duration> = None;
        let mut consider = |d: Duration| due = Some(due.map_or(d, |x: Duration| x.min(d)));
        for l in self.live.values() {
            if let Some(e) = self.host.get(l.ticket) {
                if let Some(d) = host::next(&e.driver).deadline {
                    consider(self.clock.offset_of(d));
                }
            }
        }
        if let Some(d) = self.sink.next_due() {
            consider(d);
        }
        if let Some(d) = self
            .stop_at
            .filter(|_| self.host.phase() == Phase::Draining)
        {
            consider(d);
        }
        if let Some(d) = self.exit_at {
            consider(d);
        }
        due
    }

    /// Time passes to `target`, each deadline on the way acted on at its moment.
    fn advance_to(&mut self, target: Duration) {
        for _ in 0..10_000 {
            let now = self.clock.elapsed();
            match self.next_due() {
                Some(d) if d > now && d <= target => {
                    self.clock.jump_to(self.clock.at(d));
                    self.settle();
                    if !self.bad.is_empty() {
                        return;
                    }
                }
                _ => break,
            }
        }
        self.clock.jump_to(self.clock.at(target));
    }

    fn jump(&mut self) {
        let now = self.clock.elapsed();
        match self.next_due() {
            Some(d) if d > now => self.clock.jump_to(self.clock.at(d)),
            Some(_) => {}
            None => self.clock.advance(Duration::from_secs(1)),
        }
    }

    /// Everything that follows from the last step, until nothing more does.
    fn settle(&mut self) {
        let mut timed_out = BTreeSet::new();
        for _ in 0..10_000 {
            let now = self.clock.now();
            let elapsed = self.clock.elapsed();
            self.sink.set_now(elapsed);
            let lost = self.sink.expire() as u64;
            if lost > 0 {
                *self.counts.faults.entry("sink_lost_answer").or_default() += lost;
            }
            if self.stop_at.is_some_and(|s| elapsed >= s) && self.host.phase() == Phase::Draining {
                let dirty = &mut self.dirty;
                self.host.set_phase(now, Phase::Stop, |t, _| {
                    dirty.insert((t.slot, t.generation));
                });
                self.exit_at = Some(elapsed + STOP_WAIT);
            }
            for l in self.live.values() {
                if let Some(e) = self.host.get(l.ticket) {
                    if e.driver.awaiting_publish() || e.driver.paused_for_budget() {
                        self.active[l.client] = elapsed;
                    }
                }
            }
            let dirty = &mut self.dirty;
            self.host.take_answers(now, |t, _| {
                dirty.insert((t.slot, t.generation));
            });
            self.host.wake_budget_waiters(|t, _| {
                dirty.insert((t.slot, t.generation));
            });
            for l in self.live.values() {
                let key = (l.ticket.slot, l.ticket.generation);
                if timed_out.contains(&key) {
                    continue;
                }
                let Some(e) = self.host.get(l.ticket) else {
                    continue;
                };
                if host::next(&e.driver).deadline.is_some_and(|d| d <= now) {
                    let client = &mut self.clients[l.client];
                    let waiting = client.waiting_on_server()
                        && e.io.inbound.is_empty()
                        && e.io.to_client.is_empty()
                        && !e.io.peer_eof
                        && !e.io.reset;
                    // A body the gateway stopped reading: the client is not idle.
                    let paused = e.driver.paused_for_budget();
                    let before = e.driver.pending_output().len();
                    e.driver.handle_timeout(now);
                    let said =
                        &e.driver.pending_output()[before.min(e.driver.pending_output().len())..];
                    let idle = said.windows(5).any(|w| w == b"4.4.2");
                    if paused && idle && elapsed < l.opened + SESSION {
                        self.bad.push(violation(
                            "idle timeout",
                            format!(
                                "client {} ({:?}) idle-timed-out while its body was paused on the budget",
                                l.client, client.kind
                            ),
                        ));
                    } else if waiting && idle && elapsed < l.opened + SESSION {
                        self.bad.push(violation(
                            "idle timeout",
                            format!(
                                "client {} ({:?}) idle-timed-out while it waited for a reply to {:?}, everything it sent read and everything said read",
                                l.client,
                                client.kind,
                                client.outstanding.front()
                            ),
                        ));
                    }
                    timed_out.insert(key);
                    self.dirty.insert(key);
                }
            }
            let Some((slot, generation)) = self.dirty.pop_first() else {
                break;
            };
            let t = Ticket { slot, generation };
            let mut paused = 0;
            let closed = match self.drive {
                Drive::Epoll => pump(
                    &mut self.host,
                    now,
                    t,
                    self.output_cap,
                    &mut self.bad,
                    &mut paused,
                ),
                Drive::Uring { link_sends } => pump_uring(
                    &mut self.host,
                    now,
                    t,
                    self.output_cap,
                    link_sends,
                    &mut self.bad,
                    &mut paused,
                ),
            };
            if paused > 0 {
                *self.counts.faults.entry("budget_pause").or_default() += paused;
            }
            if let Some(e) = self.host.get(t) {
                if std::mem::take(&mut e.io.wrote) {
                    self.active[e.io.client] = elapsed;
                }
                let paused_reads = std::mem::take(&mut e.io.read_while_paused);
                let linked = std::mem::take(&mut e.io.linked_sends);
                for (k, n) in [
                    ("uring_read_while_paused", paused_reads),
                    ("uring_linked_send", linked),
                ] {
                    if n > 0 {
                        *self.counts.faults.entry(k).or_default() += n;
                    }
                }
            }
            if let Some((driver, sock)) = closed {
                self.closed(t, driver, sock);
            }
            if !self.bad.is_empty() {
                return;
            }
        }
        self.check_bounds();
    }

    fn closed(&mut self, t: Ticket, driver: smtpgw::conn::Connection, sock: SimSock) {
        let c = sock.client;
        self.live.remove(&t.slot);
        self.trace.add(&format!(
            "close c{c} {:?} at {}ms",
            driver.ending(),
            self.clock.elapsed().as_millis()
        ));
        // What the kernel still held for the client reaches it, unless it reset.
        if !sock.reset && self.clients[c].script.reads && !sock.to_client.is_empty() {
            self.client_gets(c, &sock.to_client);
        }
    }

    fn check_bounds(&mut self) {
        let now = self.clock.elapsed();
        for l in self.live.values() {
            let Some(e) = self.host.get(l.ticket) else {
                continue;
            };
            let client = &mut self.clients[l.client];
            let waiting = !client.got_421
                && client
                    .outstanding
                    .front()
                    .is_some_and(|x| *x != Expect::Greeting)
                && client.waiting_on_server()
                && e.io.inbound.is_empty()
                && e.io.to_client.is_empty()
                && !e.io.peer_eof
                && !e.io.reset
                && !e.io.fin_sent;
            let d = &e.driver;
            if let Some(t0) = self.handshake_from[l.client] {
                if d.handshake_pending() && now > t0 + HANDSHAKE_TIMEOUT + END_SLACK {
                    self.bad.push(violation(
                        "handshake deadline",
                        format!(
                            "client {} ({:?}) still mid-handshake {} s after it began (--tls-handshake-timeout {} s); {} bytes unread by it, {} by us: {:?}",
                            l.client,
                            client.kind,
                            (now - t0).as_secs(),
                            HANDSHAKE_TIMEOUT.as_secs(),
                            e.io.to_client.len(),
                            e.io.inbound.len(),
                            host::next(d),
                        ),
                    ));
                }
            }
            let held_back = d.awaiting_publish() || d.paused_for_budget();
            if waiting && d.state() == State::Open && !held_back {
                self.bad.push(violation(
                    "stall",
                    format!(
                        "client {} ({:?}) waits for a reply to {:?} with everything it sent read and everything said read, and nothing holds the gateway back",
                        l.client,
                        client.kind,
                        client.outstanding.front()
                    ),
                ));
            }
        }
        for l in self.live.values() {
            // Silent that long, a client has been timed out: idle, or not reading its
            // replies, counted from its last byte, our last write or the end of a wait
            // on us.
            let quiet = self.active[l.client];
            // With linked sends (io_uring) a reply counts as written when its send is
            // queued, so a client that never reads is idle-timed-out rather than
            // write-stalled, and the `421` of that timeout then gets its grace to be
            // written (before that grace it waited a second idle timeout).
            let linked = matches!(self.drive, Drive::Uring { link_sends: true });
            let stall = if linked {
                TIMEOUT_REPLY_GRACE
            } else {
                Duration::ZERO
            };
            if now > quiet + IDLE + stall + self.sink.publish_timeout() + END_SLACK {
                let state = self.host.get(l.ticket).map(|e| {
                    format!(
                        "{} bytes unread by it, {} by us, eof {}, fin {}: {:?}, deadline in {:?}",
                        e.io.to_client.len(),
                        e.io.inbound.len(),
                        e.io.peer_eof,
                        e.io.fin_sent,
                        host::next(&e.driver),
                        host::next(&e.driver)
                            .deadline
                            .map(|d| self.clock.offset_of(d).saturating_sub(now))
                    )
                });
                self.bad.push(violation(
                    "deadline",
                    format!(
                        "client {} ({:?}) still open {} s after its last byte, our last write to it or its last wait on us (idle timeout {} s); {}",
                        l.client,
                        self.clients[l.client].kind,
                        (now - quiet).as_secs(),
                        IDLE.as_secs(),
                        state.unwrap_or_default()
                    ),
                ));
            }
            if now > l.opened + SESSION + END_SLACK {
                self.bad.push(violation(
                    "deadline",
                    format!(
                        "client {} still open {} s after it connected (session limit {} s)",
                        l.client,
                        (now - l.opened).as_secs(),
                        SESSION.as_secs()
                    ),
                ));
            }
        }
        if let Some(twice) = self.sink.answered_twice().first() {
            self.bad
                .push(violation("record", format!("id {twice:x} answered twice")));
        }
        if let Some((c, m)) = self.sink.stored_twice().first() {
            self.bad.push(violation(
                "record",
                format!("client {c}'s message {m} stored twice (two Ok records)"),
            ));
        }
        if self.exit_at.is_some_and(|x| now >= x) && !self.live.is_empty() {
            let mut open = Vec::new();
            for l in self.live.values() {
                if let Some(e) = self.host.get(l.ticket) {
                    open.push(format!(
                        "client {} ({:?}, {} bytes unread by it, {} by us): {:?}",
                        l.client,
                        self.clients[l.client].kind,
                        e.io.to_client.len(),
                        e.io.inbound.len(),
                        host::next(&e.driver)
                    ));
                }
            }
            self.bad.push(violation(
                "drain",
                format!(
                    "connections still open after the drain deadline and the stop wait: {}",
                    open.join("; ")
                ),
            ));
        }
    }

    /// Well-behaved clients and a prompt sink: every script runs to its end, then the
    /// drain and the stop; the end state is checked.
    fn finish(&mut self) {
        let until = self.clock.elapsed() + FINISH;
        let mut drained = false;
        for _ in 0..100_000 {
            if !self.bad.is_empty() {
                return;
            }
            if self.exit_at.is_some_and(|x| self.clock.elapsed() >= x) {
                break;
            }
            let scripts_done = self.live.values().all(|l| {
                self.clients[l.client].script_done() || !self.clients[l.client].script.reads
            });
            if !drained && (self.clock.elapsed() >= until || scripts_done || self.live.is_empty()) {
                drained = true;
                self.drain();
                self.settle();
                continue;
            }
            let before = self.trace.0;
            let picks: Vec<u32> = (0..self.live.len() as u32).collect();
            for p in picks {
                self.send(p, usize::MAX);
                self.read(p, usize::MAX);
            }
            // The sink answers in turn, one message per round, so bodies that arrive
            // meanwhile still meet a busy sink.
            self.settle();
            self.sink.answer(0, Outcome::Ok);
            self.settle();
            // A client with something to say has not stopped either (a TLS client
            // answering the handshake records it just read: no reply, no trace line).
            let mut writable = Vec::new();
            for l in self.live.values() {
                if let Some(e) = self.host.get(l.ticket) {
                    if !e.io.peer_eof && !e.io.reset {
                        writable.push(l.client);
                    }
                }
            }
            let to_say = writable
                .into_iter()
                .any(|c| !self.clients[c].outgoing().is_empty());
            let moved = self.trace.0 != before
                || to_say
                || self.live.values().any(|l| {
                    self.host.get(l.ticket).is_some_and(|e| {
                        !e.io.to_client.is_empty() && self.clients[l.client].script.reads
                    })
                });
            if !moved {
                self.jump();
                self.settle();
            }
        }
        if !self.bad.is_empty() {
            return;
        }
        if !self.live.is_empty() {
            self.bad.push(violation(
                "drain",
                format!(
                    "{} connections open when the reactor stopped",
                    self.live.len()
                ),
            ));
            return;
        }
        // A message whose publish timeout comes after the drain deadline may still be
        // with the sink when the reactor stops, as with a real sink slower than the
        // drain: its client got the stop's `421`, never a `250` (a `250` without an `Ok`
        // record is a violation of its own), and the gauge still counts it.
        let inflight = self.metrics.publish_inflight_messages.get();
        let held = self.sink.held();
        let late = self
            .stop_at
            .map_or(0, |stop| self.sink.held_due_after(stop));
        if held > late || inflight != held as i64 {
            self.bad.push(violation(
                "drain",
                format!(
                    "messages unanswered at the end: sink holds {held} ({late} of them due after the drain deadline), in-flight gauge {inflight}"
                ),
            ));
        }
        if self.host.budget().used() != 0 {
            self.bad.push(violation(
                "body budget",
                format!(
                    "{} bytes still charged with every connection closed",
                    self.host.budget().used()
                ),
            ));
        }
    }
}

/// Runs `steps`, then the finish; the first violation and the step it followed.
pub fn execute(seed: u64, steps: &[Step]) -> RunResult {
    let mut w = World::new(seed);
    let mut found = None;
    for (i, &s) in steps.iter().enumerate() {
        w.apply(s);
        if let Some(v) = w.bad.first() {
            found = Some((i, v.clone()));
            break;
        }
    }
    if found.is_none() {
        w.finish();
        if let Some(v) = w.bad.first() {
            found = Some((steps.len(), v.clone()));
        }
    }
    // What the sink was left with belongs to the trace too: each record's id, what
    // it was answered, and its stored bytes.
    let mut records = Vec::new();
    w.sink.for_each_record(|id, r| {
        let mut h = TraceHash(0xcbf2_9ce4_8422_2325, false);
        h.bytes(&r.body);
        h.bytes(&r.mail_from);
        for rcpt in &r.rcpt_to {
            h.bytes(rcpt);
        }
        h.bytes(&r.tls);
        h.bytes(&r.auth);
        records.push(format!(
            "record {id:x} {:?} {:?} {:016x}",
            r.tag, r.outcome, h.0
        ));
    });
    for r in records {
        w.trace.add(&r);
    }
    w.counts.messages = w.sink.submitted();
    w.counts.acked = w.acks.count;
    w.counts.sim_time = w.clock.elapsed();
    w.host.clear();
    RunResult {
        violation: found,
        trace: w.trace.0,
        counts: w.counts,
    }
}
