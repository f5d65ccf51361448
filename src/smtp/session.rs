//! The SMTP state machine: one conversation from greeting to close.
//!
//! Like rustls' `Connection`, a [`Session`] never does I/O. The caller feeds it received
//! bytes, writes out whatever it put in [`Session::output`], hands completed messages
//! to a sink and reports the sink's answer back. The session answers a message's final
//! dot (or `BDAT ... LAST`) only through [`Session::publish_result`], and consumes no
//! further input while it waits, so pipelined replies stay in order (RFC 2920) and a
//! client that gets `250` can trust that its message is stored.

use std::collections::VecDeque;
use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use memchr::memchr;

use super::address::{self, AcceptDomains, AddressError, Domain, ForwardPath, ReversePath};
use super::auth::{self, AuthRequest, AuthVerdict, Mechanism, ResponseError};
use super::command::{self, Command, CommandError, Params, PathKind, SyntaxOf};
use super::data::{BareLfPolicy, BodyOutcome, DataReader, HeaderLines};
use super::dsn::{self, DsnError, Notify, Ret};
use super::envelope::{self, Envelope, Message, PublishError, PublishResult};
use super::refusal::Refusal;
use super::reply;
use super::stats::{LimitClose, RejectReason, SessionStats, Verb};

/// What happened in a session, taken with [`Session::poll_event`], oldest first: what
/// the caller's log says (refusals) and what the caller keeps in step with the session
/// (body timing and memory, the STARTTLS hand-over). The caller learns these from events,
/// never by comparing counters or reading reply bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// A reply or close for a reason of the gateway's own.
    Refused {
        refusal: Refusal,
        /// The command's verb (a [`Verb`]'s label), or "" outside a command.
        verb: &'static str,
        /// For MAIL and RCPT, the address as the client gave it (already checked to carry
        /// no control characters; the log escapes it anyway).
        address: Option<Box<str>>,
        /// A sink's reason for a temporary failure.
        detail: Option<Box<str>>,
        /// For AUTH, the user name the client gave.
        user: Option<Box<str>>,
    },
    /// A DATA body or a message's first BDAT chunk began (`354`, or the first chunk's
    /// command was read).
    BodyStarted,
    /// The body began last reached its end: the final dot, the last chunk, or a later
    /// chunk over the size limit. A first chunk refused before any body began is neither
    /// started nor ended.
    BodyEnded,
    /// The body began last ended without an outcome: RSET, HELO/EHLO or STARTTLS between
    /// BDAT chunks, or the session closed in the middle of a body. Every
    /// [`SessionEvent::BodyStarted`] is followed by exactly one `BodyEnded` or
    /// `BodyAbandoned`.
    BodyAbandoned,
    /// STARTTLS was accepted and its `220` written: whatever the client sent after the
    /// command is to be discarded unread, and the TLS handshake starts once the `220` is
    /// out ([`Session::tls_started`] ends the wait).
    StartTls,
}

/// Refusal events kept at most between two polls; more are dropped (their counts are in
/// [`SessionStats::refusals`] all the same). Room for them is taken once, at the first
/// event, so a session that refuses never allocates per refusal, and a caller that never
/// polls (a bench) cannot grow it.
const MAX_EVENTS: usize = 16;
/// Body and STARTTLS events kept at most between two polls. Unlike refusals they are
/// never dropped (the caller's body budget and timing follow them), so at this many the
/// session takes no further command until they are polled, as at the output limit.
const MAX_STEPS: usize = 16;
/// The most step events one command can bring before the check above runs again: a
/// body abandoned, one started and ended (`BDAT 0 LAST`), or STARTTLS.
const STEPS_PER_COMMAND: usize = 3;
/// Room for the addresses and details of the events kept; one that does not fit is left
/// out of its event.
const EVENT_TEXT: usize = 1024;

/// An event as kept: a refusal's text is a range of `Session::event_text`.
enum Kept {
    Refused {
        refusal: Refusal,
        verb: &'static str,
        address: Option<(u16, u16)>,
        detail: Option<(u16, u16)>,
        user: Option<(u16, u16)>,
    },
    Step(Step),
}

/// The events that carry no text and are never dropped.
#[derive(Clone, Copy)]
enum Step {
    BodyStarted,
    BodyEnded,
    BodyAbandoned,
    StartTls,
}

/// What a listener allows, fixed for a session's life: the caller gives it once, when
/// it creates the session ([`Session::without_greeting`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionPolicy {
    /// STARTTLS is offered (a certificate is configured and the connection did not
    /// start in TLS); otherwise it gets `502`.
    pub starttls: bool,
    /// MAIL over plaintext gets `530 5.7.0` (`--require-tls`).
    pub tls_required: bool,
    /// This many commands refused with `5xx` (or another refusal that
    /// [`Refusal::spends_error_budget`]) end the session with `421 4.7.0`.
    pub error_budget: Option<u32>,
    /// How AUTH is offered; `None` does not offer it (`502`).
    pub auth: Option<AuthPolicy>,
    /// [`Session::feed`] takes no further command while this many bytes of replies are
    /// unwritten, so a client that pipelines and never reads cannot make the output
    /// grow without bound.
    pub output_limit: usize,
}

impl Default for SessionPolicy {
    /// Nothing offered beyond the core, no budget, no output limit.
    fn default() -> Self {
        SessionPolicy {
            starttls: false,
            tls_required: false,
            error_budget: None,
            auth: None,
            output_limit: usize::MAX,
        }
    }
}

/// Limits that change while a session runs (per-address and per-user rates, the
/// reactor's memory). The session asks at the moment a command meets one, through the
/// caller's [`Session::feed_with`], rather than being told before every read.
pub trait Gate {
    /// MAIL may open a transaction: the client's address is under its message rate.
    fn message_allowed(&mut self) -> bool;
    /// MAIL may open a transaction for the authenticated `user` (its message rate).
    fn user_message_allowed(&mut self, user: &str) -> bool;
    /// AUTH may be tried: the client's address is under its AUTH failure limit.
    fn auth_allowed(&mut self) -> bool;
    /// A new transaction may hold a body: the gateway's body memory is not spent.
    fn body_memory_available(&mut self) -> bool;
}

#[cfg(any(test, feature = "testing"))]
/// No limit that changes: what [`Session::feed`] asks.
pub struct Unlimited;

#[cfg(any(test, feature = "testing"))]
impl Gate for Unlimited {
    fn message_allowed(&mut self) -> bool {
        true
    }
    fn user_message_allowed(&mut self, _user: &str) -> bool {
        true
    }
    fn auth_allowed(&mut self) -> bool {
        true
    }
    fn body_memory_available(&mut self) -> bool {
        true
    }
}

/// Per-listener settings every session of that listener shares.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Our name: the greeting, EHLO reply and `Received:` lines use it.
    pub hostname: String,
    /// Recipient domains we take mail for, each in the form
    /// [`address::normalize_accept_domain`] returns (A-labels in lower case, or a
    /// canonical address literal). Everything else gets `550 5.7.1`.
    pub accept_domains: AcceptDomains,
    /// Largest message body in octets, after dot-unstuffing. Advertised as SIZE.
    pub max_message_size: usize,
    /// More recipients than this get `452 4.5.3`.
    pub max_recipients: usize,
    pub bare_lf: BareLfPolicy,
    /// Room left in front of each body for the trace line the sink layer puts there
    /// (`sink::record::RECEIVED_HEADROOM` plus the hostname), so sealing copies no body.
    pub headroom: usize,
}

impl SessionConfig {
    fn accepts(&self, domain: Domain<'_>) -> bool {
        self.accept_domains.accepts(domain)
    }
}

/// Without a SIZE hint, a body buffer starts this large and grows by doubling.
const INITIAL_BODY_CAPACITY: usize = 16 * 1024;
/// The longest HELO/EHLO argument we keep (a domain name's limit).
const MAX_HELO: usize = 255;

enum Phase {
    /// Reading command lines.
    Command,
    /// Reading a DATA body.
    Data {
        reader: DataReader,
        body: BytesMut,
    },
    /// Reading a BDAT chunk.
    Bdat(Chunk),
    /// A message is with the sink; no input is consumed until its answer arrives.
    AwaitingPublish,
    /// AUTH sent a `334` challenge: the next line is the client's SASL response.
    AuthResponse(AuthStep),
    /// Credentials are with the verifier; no input is consumed until
    /// [`Session::auth_result`].
    AwaitingAuth,
    /// `220 Ready to start TLS` was sent: no further input is consumed as SMTP until
    /// [`Session::tls_started`]; the caller discards whatever followed the command.
    StartTls,
    Closed,
}

/// Which response an AUTH exchange waits for.
enum AuthStep {
    Plain,
    LoginUser,
    LoginPassword(Box<str>),
}

/// How a listener offers AUTH (RFC 4954), part of the [`SessionPolicy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthPolicy {
    /// AUTH may be used before TLS (`--auth-allow-plaintext`, loopback listeners only).
    pub plaintext: bool,
    /// MAIL before a successful AUTH gets `530 5.7.0` (`--require-auth`).
    pub required: bool,
    /// An authenticated session may send to any recipient domain (`--auth-relay`).
    pub relay: bool,
}

/// What the session knows about TLS: offered by the policy, active once the caller says
/// so ([`Session::tls_started`]).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tls {
    /// No certificate: STARTTLS is not offered and gets `502`.
    Unavailable,
    /// STARTTLS is offered.
    Available,
    /// Encrypted: the version and cipher suite, for the envelope.
    Active(Arc<str>),
}

struct Chunk {
    size: u64,
    remaining: u64,
    last: bool,
    /// When set, the chunk is read and dropped, then this is the reply (RFC 3030 has the
    /// server consume a refused chunk so the byte stream stays in step).
    refusal: Option<(Refusal, &'static [u8])>,
}

/// What HELO/EHLO established; it survives transactions.
struct Greeting {
    helo: Arc<str>,
    esmtp: bool,
}

struct Transaction {
    envelope: Envelope,
    size_hint: Option<u64>,
    /// BDAT chunks received so far (DATA bodies live in `Phase::Data`), read by the
    /// same scanner as DATA so the bare CR/LF policy holds for both.
    bdat: Option<BdatBody>,
    bdat_size: u64,
}

struct BdatBody {
    reader: DataReader,
    body: BytesMut,
}

/// One SMTP conversation, from greeting to close.
///
/// The caller owns the socket: it hands received bytes to [`Session::feed`], writes out
/// [`Session::output`], and when [`Session::take_message`] yields a message, stores it
/// and reports back with [`Session::publish_result`]. Until then the session consumes no
/// further input, which keeps pipelined replies in order (RFC 2920).
pub struct Session {
    config: Arc<SessionConfig>,
    client_addr: SocketAddr,
    out: Vec<u8>,
    phase: Phase,
    greeting: Option<Greeting>,
    txn: Option<Transaction>,
    completed: Option<Message>,
    /// Inside a command line longer than the limit: drop bytes up to its LF.
    discarding_line: bool,
    draining: bool,
    policy: SessionPolicy,
    tls: Tls,
    /// Commands that spent the error budget so far.
    errors: u32,
    /// The refusal of the command being handled, if it was refused: whether it spends
    /// the error budget is the refusal's to say ([`Refusal::spends_error_budget`]).
    refused: Option<Refusal>,
    /// `None`: AUTH is not offered (`502`). The policy's, except that a PROXY header
    /// naming a client that is not loopback withdraws plaintext AUTH
    /// ([`Session::proxied`]).
    auth: Option<AuthPolicy>,
    /// The user a successful AUTH named.
    authenticated: Option<Arc<str>>,
    /// Credentials for the caller to verify ([`Session::take_auth_request`]).
    auth_request: Option<AuthRequest>,
    /// The user whose credentials are being verified.
    auth_user: Option<Box<str>>,
    stats: SessionStats,
    /// The verb of the command being handled, for refusal events.
    verb: &'static str,
    events: VecDeque<Kept>,
    /// Refusal events in `events` (bounded by [`MAX_EVENTS`]).
    kept_refusals: usize,
    /// Step events in `events` (bounded by [`MAX_STEPS`]).
    steps: usize,
    event_text: String,
    /// QUIT was answered.
    quit: bool,
}

impl Session {
    #[cfg(any(test, feature = "testing"))]
    /// A new session under the default policy (nothing beyond the core offered, no
    /// limits); its `220` greeting is already in the output.
    pub fn new(config: Arc<SessionConfig>, client_addr: SocketAddr) -> Self {
        let mut session = Session::without_greeting(config, SessionPolicy::default(), client_addr);
        session.greet();
        session
    }

    /// A new session under `policy` whose greeting the caller sends later with
    /// [`Self::greet`]: after a PROXY header, a TLS handshake or a greeting delay.
    pub fn without_greeting(
        config: Arc<SessionConfig>,
        policy: SessionPolicy,
        client_addr: SocketAddr,
    ) -> Self {
        Session {
            config,
            client_addr,
            out: Vec::with_capacity(512),
            phase: Phase::Command,
            greeting: None,
            txn: None,
            completed: None,
            discarding_line: false,
            draining: false,
            policy,
            tls: if policy.starttls {
                Tls::Available
            } else {
                Tls::Unavailable
            },
            errors: 0,
            refused: None,
            auth: policy.auth,
            authenticated: None,
            auth_request: None,
            auth_user: None,
            stats: SessionStats::default(),
            verb: "",
            events: VecDeque::new(),
            kept_refusals: 0,
            steps: 0,
            event_text: String::new(),
            quit: false,
        }
    }

    /// Writes the `220` greeting.
    pub fn greet(&mut self) {
        let replied_from = self.out.len();
        reply::greeting(&mut self.out, &self.config.hostname);
        self.stats.count_replies(&self.out[replied_from..]);
    }

    /// A PROXY header arrived: `source` is the client it names (`None`: it named none,
    /// the connection is the balancer's own). `--auth-allow-plaintext` is for clients
    /// on this host; behind a balancer the real client decides, and one that is not
    /// loopback (or that the header does not name) would send its credentials across
    /// the network in the clear, so it gets AUTH only after STARTTLS.
    pub fn proxied(&mut self, source: Option<SocketAddr>) {
        if let Some(addr) = source {
            self.client_addr = addr;
        }
        let loopback = source.is_some_and(|a| a.ip().to_canonical().is_loopback());
        if let Some(auth) = &mut self.auth {
            if !loopback {
                auth.plaintext = false;
            }
        }
    }

    #[cfg(any(test, feature = "testing"))]
    /// The user a successful AUTH named, if any.
    pub fn authenticated(&self) -> Option<&Arc<str>> {
        self.authenticated.as_ref()
    }

    /// Credentials the client gave, to be verified off the reactor; the session then
    /// waits for [`Self::auth_result`] and consumes no input.
    pub fn take_auth_request(&mut self) -> Option<AuthRequest> {
        self.auth_request.take()
    }

    /// Credentials are being verified.
    pub fn is_awaiting_auth(&self) -> bool {
        matches!(self.phase, Phase::AwaitingAuth)
    }

    /// The verifier's answer for the credentials taken last.
    pub fn auth_result(&mut self, verdict: AuthVerdict) {
        if !matches!(self.phase, Phase::AwaitingAuth) {
            debug_assert!(false, "auth_result without credentials in flight");
            return;
        }
        self.phase = Phase::Command;
        self.auth_request = None;
        let user = self.auth_user.take();
        let replied_from = self.out.len();
        self.verb = "AUTH";
        self.refused = None;
        match verdict {
            AuthVerdict::Accepted => {
                self.authenticated = user.map(Arc::from);
                self.reply(reply::AUTH_OK);
            }
            AuthVerdict::Rejected => {
                self.event_user(Refusal::AuthFailed, user.as_deref());
                self.reply(reply::AUTH_FAILED);
            }
            AuthVerdict::Temporary => {
                self.event_user(Refusal::AuthTemporary, user.as_deref());
                self.reply(reply::AUTH_TEMPORARY);
            }
            AuthVerdict::Locked => self.limit_close(
                Refusal::AuthFailures,
                "Too many authentication failures",
                user.as_deref(),
            ),
        }
        self.count_error();
        self.stats.count_replies(&self.out[replied_from..]);
    }

    /// STARTTLS was accepted and its `220` written: the caller now runs the handshake
    /// and discards input until it completes.
    pub fn is_starting_tls(&self) -> bool {
        matches!(self.phase, Phase::StartTls)
    }

    /// The TLS handshake completed (after STARTTLS, or on an implicit-TLS listener before
    /// the greeting). RFC 3207 section 4.2: the session starts over, forgetting HELO and
    /// any transaction, and EHLO no longer offers STARTTLS.
    pub fn tls_started(&mut self, description: Arc<str>) {
        self.tls = Tls::Active(description);
        self.greeting = None;
        self.txn = None;
        self.authenticated = None;
        if matches!(self.phase, Phase::StartTls) {
            self.phase = Phase::Command;
        }
    }

    #[cfg(any(test, feature = "testing"))]
    /// Encrypted: TLS is active.
    pub fn tls_active(&self) -> bool {
        matches!(self.tls, Tls::Active(_))
    }

    /// A per-address limit refused the connection: `421 4.7.0 <what>`, then close.
    pub fn refuse_over_limit(&mut self, why: Refusal, what: &str) {
        let replied_from = self.out.len();
        self.over_limit(why, what);
        self.stats.count_replies(&self.out[replied_from..]);
    }

    /// `421 4.7.0` and close, the reply uncounted: for callers inside `feed`, which
    /// counts.
    fn over_limit(&mut self, why: Refusal, what: &str) {
        self.limit_close(why, what, None);
    }

    /// `421 4.7.0` and close, counted in `smtpgw_session_limit_closes_total` by `why`;
    /// `user` names the AUTH user the limit is about.
    fn limit_close(&mut self, why: Refusal, what: &str, user: Option<&str>) {
        if let Some(close) = LimitClose::of(why) {
            self.stats.limit_closes[close] += 1;
        }
        self.event_user(why, user);
        reply::policy_limit(&mut self.out, &self.config.hostname, what);
        self.close();
    }

    /// The client sent data before the greeting: `554 5.5.0`, then close.
    pub fn early_talker(&mut self) {
        self.close_with(Refusal::EarlyTalker, reply::early_talker);
    }

    /// The client said QUIT (and got its `221`).
    pub fn quit_received(&self) -> bool {
        self.quit
    }

    /// What happened since the last call, oldest first. A caller polls after each call
    /// that feeds or answers the session: while 16 (`MAX_STEPS`) body or STARTTLS events
    /// wait, the session takes no further command.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        let kept = self.events.pop_front()?;
        let event = match kept {
            Kept::Refused {
                refusal,
                verb,
                address,
                detail,
                user,
            } => {
                self.kept_refusals -= 1;
                let text = |r: Option<(u16, u16)>| {
                    r.and_then(|(a, b)| self.event_text.get(usize::from(a)..usize::from(b)))
                        .map(Box::from)
                };
                SessionEvent::Refused {
                    refusal,
                    verb,
                    address: text(address),
                    detail: text(detail),
                    user: text(user),
                }
            }
            Kept::Step(step) => {
                self.steps -= 1;
                match step {
                    Step::BodyStarted => SessionEvent::BodyStarted,
                    Step::BodyEnded => SessionEvent::BodyEnded,
                    Step::BodyAbandoned => SessionEvent::BodyAbandoned,
                    Step::StartTls => SessionEvent::StartTls,
                }
            }
        };
        if self.events.is_empty() {
            self.event_text.clear();
        }
        Some(event)
    }

    /// Queues a body or STARTTLS event. Room for them is reserved with the refusals',
    /// once; the check before each command keeps them within it.
    fn step(&mut self, step: Step) {
        self.reserve_events();
        self.steps += 1;
        self.events.push_back(Kept::Step(step));
    }

    fn reserve_events(&mut self) {
        if self.events.capacity() == 0 {
            self.events
                .reserve_exact(MAX_EVENTS + MAX_STEPS + STEPS_PER_COMMAND);
        }
    }

    fn event(&mut self, refusal: Refusal, address: Option<&str>, detail: Option<&str>) {
        self.event_with(refusal, address, detail, None);
    }

    /// A refusal of AUTH, naming the user when the client gave one.
    fn event_user(&mut self, refusal: Refusal, user: Option<&str>) {
        self.event_with(refusal, None, None, user);
    }

    fn event_with(
        &mut self,
        refusal: Refusal,
        address: Option<&str>,
        detail: Option<&str>,
        user: Option<&str>,
    ) {
        self.stats.refusals[refusal] += 1;
        self.refused = Some(refusal);
        self.reserve_events();
        if self.kept_refusals >= MAX_EVENTS {
            return;
        }
        let mut text = |t: Option<&str>| {
            let t = t?;
            if self.event_text.capacity() == 0 {
                self.event_text.reserve_exact(EVENT_TEXT);
            }
            let start = self.event_text.len();
            if start + t.len() > EVENT_TEXT {
                return None;
            }
            self.event_text.push_str(t);
            // Both fit in u16: the buffer holds at most EVENT_TEXT bytes.
            Some((start as u16, self.event_text.len() as u16))
        };
        let address = text(address);
        let detail = text(detail);
        let user = text(user);
        self.kept_refusals += 1;
        self.events.push_back(Kept::Refused {
            refusal,
            verb: self.verb,
            address,
            detail,
            user,
        });
    }

    /// A refusal with a fixed reply.
    fn refuse(&mut self, refusal: Refusal, text: &'static [u8]) {
        self.event(refusal, None, None);
        self.reply(text);
    }

    /// A refusal of MAIL or RCPT, naming the address.
    fn refuse_address(&mut self, refusal: Refusal, text: &'static [u8], address: &str) {
        self.event(refusal, Some(address), None);
        self.reply(text);
    }

    #[cfg(any(test, feature = "testing"))]
    /// Processes as much of `input` as it can and returns how many bytes it consumed.
    /// The caller keeps the rest (an incomplete line) and offers it again with more bytes
    /// appended. Stops early while a message awaits its publish result, once closed, at
    /// the output limit, or while 16 (`MAX_STEPS`) events wait to be polled. No limit that
    /// changes applies ([`Unlimited`]); see [`Self::feed_with`].
    pub fn feed(&mut self, input: &[u8]) -> usize {
        self.feed_with(input, &mut Unlimited)
    }

    /// [`Self::feed`], asking `gate` about the limits that change while the session
    /// runs when a command meets one.
    pub fn feed_with(&mut self, input: &[u8], gate: &mut dyn Gate) -> usize {
        // Replies are counted from what was written, so every path that replies is
        // counted without each one having to remember to.
        let replied_from = self.out.len();
        let consumed = self.feed_commands(input, gate);
        self.stats.count_replies(&self.out[replied_from..]);
        consumed
    }

    /// No further command while the client does not read its replies or the caller
    /// does not poll its events.
    fn command_blocked(&self) -> bool {
        self.out.len() >= self.policy.output_limit || self.steps >= MAX_STEPS
    }

    fn feed_commands(&mut self, input: &[u8], gate: &mut dyn Gate) -> usize {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match &mut self.phase {
                Phase::Closed | Phase::AwaitingPublish | Phase::AwaitingAuth | Phase::StartTls => {
                    return pos
                }
                Phase::AuthResponse(_) => {
                    if self.command_blocked() {
                        return pos;
                    }
                    let Some(lf) = memchr(b'\n', rest) else {
                        if self.discarding_line || rest.len() >= command::MAX_AUTH_LINE {
                            self.discarding_line = true;
                            return input.len();
                        }
                        return pos;
                    };
                    pos += lf + 1;
                    self.refused = None;
                    if mem::take(&mut self.discarding_line) || lf + 1 > command::MAX_AUTH_LINE {
                        // The exchange is over (RFC 4954 has no way to go on after it).
                        self.phase = Phase::Command;
                        self.refuse(Refusal::LineTooLong, reply::LINE_TOO_LONG);
                    } else {
                        let line = &rest[..lf];
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        self.auth_response(line);
                    }
                    self.count_error();
                }
                Phase::Command => {
                    if self.command_blocked() {
                        return pos;
                    }
                    let Some(lf) = memchr(b'\n', rest) else {
                        // A line that cannot end within the limit is dropped as it
                        // arrives, so the caller's buffer stays bounded.
                        if self.discarding_line || rest.len() >= command::line_limit(rest) {
                            self.discarding_line = true;
                            return input.len();
                        }
                        return pos;
                    };
                    pos += lf + 1;
                    if mem::take(&mut self.discarding_line) || lf + 1 > command::line_limit(rest) {
                        self.stats.commands[Verb::Other] += 1;
                        self.verb = Verb::Other.as_str();
                        self.refuse(Refusal::LineTooLong, reply::LINE_TOO_LONG);
                        continue;
                    }
                    let line = &rest[..lf];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    self.refused = None;
                    self.command(line, gate);
                    self.count_error();
                }
                Phase::Data { reader, body } => {
                    let (consumed, done) = reader.feed(rest, body);
                    pos += consumed;
                    if !done {
                        return pos;
                    }
                    self.finish_data();
                }
                Phase::Bdat(chunk) => {
                    let take = chunk.remaining.min(rest.len() as u64);
                    // `take` fits in usize: it is at most `rest.len()`.
                    let bytes = &rest[..take as usize];
                    chunk.remaining -= take;
                    pos += bytes.len();
                    if chunk.refusal.is_none() {
                        if let Some(b) = self.txn.as_mut().and_then(|t| t.bdat.as_mut()) {
                            b.reader.feed(bytes, &mut b.body);
                        }
                    }
                    if chunk.remaining > 0 {
                        return pos;
                    }
                    self.finish_chunk();
                }
            }
        }
    }

    /// The message just completed, if any. The session then awaits [`Self::publish_result`].
    pub fn take_message(&mut self) -> Option<Message> {
        self.completed.take()
    }

    /// The sink's answer for the message taken last: `250 2.0.0 Ok: queued as <id>`,
    /// `451 4.3.0`, `452 4.3.1` or `552 5.3.4`.
    pub fn publish_result(&mut self, result: PublishResult) {
        if !matches!(self.phase, Phase::AwaitingPublish) {
            debug_assert!(false, "publish_result without a message in flight");
            return;
        }
        let replied_from = self.out.len();
        match result {
            Ok(id) => {
                self.stats.messages_accepted += 1;
                reply::queued(&mut self.out, id)
            }
            Err(PublishError::Temporary(reason)) => {
                self.stats.messages_rejected[RejectReason::SinkTemporary] += 1;
                self.event(Refusal::SinkTemporary, None, Some(&reason));
                reply::temporary_failure(&mut self.out, &reason)
            }
            Err(PublishError::TooLarge) => {
                self.stats.messages_rejected[RejectReason::SinkTooLarge] += 1;
                self.refuse(Refusal::SinkTooLarge, reply::SINK_TOO_BIG)
            }
            Err(PublishError::StorageFull) => {
                self.stats.messages_rejected[RejectReason::SinkTemporary] += 1;
                self.refuse(Refusal::StorageFull, reply::STORAGE_FULL)
            }
        }
        self.stats.count_replies(&self.out[replied_from..]);
        self.phase = Phase::Command;
    }

    /// Counts since the last call, for the caller to add to its totals (and so reset).
    pub fn stats_mut(&mut self) -> &mut SessionStats {
        &mut self.stats
    }

    /// Our name, as the greeting and trace lines give it.
    pub fn hostname(&self) -> &str {
        &self.config.hostname
    }

    /// Replies not yet written to the client.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// The caller wrote the first `n` bytes of [`Self::output`].
    pub fn advance_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// After QUIT, a timeout or a shutdown reply: write the output, then close.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// A message is with the sink and the session waits for its answer.
    pub fn is_awaiting_publish(&self) -> bool {
        matches!(self.phase, Phase::AwaitingPublish)
    }

    /// Between commands: no DATA or BDAT body under way, no message with the sink.
    /// (The caller also knows whether it holds a partial command line.)
    pub fn is_between_commands(&self) -> bool {
        matches!(self.phase, Phase::Command) && !self.discarding_line
    }

    /// The client was silent too long (`IdleTimeout`) or its session lasted too long
    /// (`SessionTimeout`): `421 4.4.2`, then close.
    pub fn timed_out(&mut self, why: Refusal) {
        self.close_with(why, reply::timeout);
    }

    /// The client sent its message body too slowly: `421 4.4.2`, then close.
    pub fn too_slow(&mut self) {
        self.close_with(Refusal::DataRate, reply::too_slow);
    }

    /// Spends the error budget on the command just handled if its refusal says so
    /// ([`Refusal::spends_error_budget`]); a command that closed the session spends
    /// nothing more.
    fn count_error(&mut self) {
        let refused = self.refused.take();
        let Some(budget) = self.policy.error_budget else {
            return;
        };
        if !refused.is_some_and(Refusal::spends_error_budget) || self.is_closed() {
            return;
        }
        self.errors += 1;
        if self.errors >= budget {
            self.over_limit(Refusal::ErrorBudget, "Too many errors in this session");
        }
    }

    fn close_with(&mut self, why: Refusal, write: fn(&mut Vec<u8>, &str)) {
        self.event(why, None, None);
        let replied_from = self.out.len();
        write(&mut self.out, &self.config.hostname);
        self.stats.count_replies(&self.out[replied_from..]);
        self.close();
    }

    /// Octets of message body this session holds: the DATA body or BDAT chunks read so
    /// far, or the completed message not yet taken. The caller charges them against
    /// its memory budget.
    pub fn body_len(&self) -> usize {
        let headroom = self.config.headroom;
        let buffered = match &self.phase {
            Phase::Data { body, .. } => body.len(),
            _ => self
                .txn
                .as_ref()
                .and_then(|t| t.bdat.as_ref())
                .map_or(0, |b| b.body.len()),
        };
        let completed = self.completed.as_ref().map_or(0, |m| m.body().len());
        buffered.saturating_sub(headroom) + completed
    }

    /// Inside a message body: reading DATA, a BDAT chunk, or between BDAT chunks.
    pub fn in_body(&self) -> bool {
        match self.phase {
            Phase::Data { .. } | Phase::Bdat(_) => true,
            Phase::Command => self.txn.as_ref().is_some_and(|t| t.bdat.is_some()),
            Phase::AwaitingPublish
            | Phase::AuthResponse(_)
            | Phase::AwaitingAuth
            | Phase::StartTls
            | Phase::Closed => false,
        }
    }

    /// The server is draining: from now on every command gets `421 4.3.2` and the
    /// session closes. A message already with the sink still gets its answer.
    pub fn begin_drain(&mut self) {
        self.draining = true;
    }

    /// Drain reached a session between commands: `421 4.3.2` now, then close.
    pub fn shut_down_now(&mut self) {
        let replied_from = self.out.len();
        self.shut_down();
        self.stats.count_replies(&self.out[replied_from..]);
    }

    /// `421 4.3.2` and close, uncounted: for callers inside `feed`, which counts.
    fn shut_down(&mut self) {
        self.event(Refusal::ShuttingDown, None, None);
        reply::shutting_down(&mut self.out, &self.config.hostname);
        self.close();
    }

    fn close(&mut self) {
        if matches!(self.phase, Phase::Data { .. }) {
            self.step(Step::BodyAbandoned);
        }
        self.phase = Phase::Closed;
        self.abort_transaction();
        self.completed = None;
    }

    /// Drops the transaction. A BDAT body under way ends without an outcome, and is
    /// counted so, so the caller never times it as if it had ended.
    fn abort_transaction(&mut self) {
        if self.txn.take().is_some_and(|t| t.bdat.is_some()) {
            self.step(Step::BodyAbandoned);
        }
    }

    fn reply(&mut self, text: &[u8]) {
        self.out.extend_from_slice(text);
    }

    fn command(&mut self, line: &[u8], gate: &mut dyn Gate) {
        let parsed = command::parse(line);
        let verb = verb_of(&parsed);
        self.stats.commands[verb] += 1;
        self.verb = verb.as_str();
        if self.draining {
            return self.shut_down();
        }
        let command = match parsed {
            Ok(command) => command,
            Err(error) => {
                let (refusal, text) = command_error_reply(error);
                return self.refuse(refusal, text);
            }
        };
        match command {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail { verb, from, params } => self.mail(verb, from, params, gate),
            Command::Rcpt { to, params } => self.rcpt(to, params),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.abort_transaction();
                self.reply(reply::OK);
            }
            Command::Noop => self.reply(reply::OK),
            Command::Quit => {
                reply::bye(&mut self.out, &self.config.hostname);
                self.quit = true;
                self.close();
            }
            Command::Vrfy(_) => self.reply(reply::VRFY),
            Command::Expn(_) => self.refuse(Refusal::NotImplemented, reply::EXPN),
            Command::Help(topic) => self.help(topic),
            Command::Turn => self.refuse(Refusal::NotImplemented, reply::TURN),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial, gate),
            Command::NotImplemented => self.refuse(Refusal::NotImplemented, reply::NOT_IMPLEMENTED),
        }
    }

    /// AUTH may be used now: it is offered, and TLS is on or plaintext is allowed.
    fn auth_usable(&self) -> bool {
        self.auth
            .is_some_and(|a| a.plaintext || matches!(self.tls, Tls::Active(_)))
    }

    fn auth(&mut self, mechanism: &[u8], initial: Option<&[u8]>, gate: &mut dyn Gate) {
        if self.auth.is_none() {
            return self.refuse(Refusal::NotImplemented, reply::NOT_IMPLEMENTED);
        }
        if !self.greeting.as_ref().is_some_and(|g| g.esmtp) {
            return self.refuse(Refusal::BadSequence, reply::NEED_HELO);
        }
        if self.authenticated.is_some() {
            return self.refuse(Refusal::BadSequence, reply::AUTH_TWICE);
        }
        if self.txn.is_some() {
            return self.refuse(Refusal::BadSequence, reply::AUTH_IN_TRANSACTION);
        }
        if !self.auth_usable() {
            return self.refuse(Refusal::AuthNeedsTls, reply::AUTH_NEEDS_TLS);
        }
        if !gate.auth_allowed() {
            return self.over_limit(Refusal::AuthFailures, "Too many authentication failures");
        }
        let Some(mechanism) = Mechanism::parse(mechanism) else {
            return self.refuse(Refusal::AuthMechanism, reply::AUTH_MECHANISM);
        };
        match (mechanism, initial) {
            (Mechanism::Plain, None) => {
                self.phase = Phase::AuthResponse(AuthStep::Plain);
                self.reply(auth::CHALLENGE_EMPTY);
            }
            (Mechanism::Login, None) => {
                self.phase = Phase::AuthResponse(AuthStep::LoginUser);
                self.reply(auth::CHALLENGE_USERNAME);
            }
            (Mechanism::Plain, Some(initial)) => self.auth_step(AuthStep::Plain, initial),
            (Mechanism::Login, Some(initial)) => self.auth_step(AuthStep::LoginUser, initial),
        }
    }

    /// A response line while an AUTH exchange waits for one.
    fn auth_response(&mut self, line: &[u8]) {
        let Phase::AuthResponse(step) = mem::replace(&mut self.phase, Phase::Command) else {
            return;
        };
        self.verb = "AUTH";
        self.auth_step(step, line);
    }

    fn auth_step(&mut self, step: AuthStep, response: &[u8]) {
        let decoded = match auth::decode_response(response) {
            Ok(d) => d,
            Err(ResponseError::Cancelled) => {
                return self.refuse(Refusal::AuthCancelled, reply::AUTH_CANCELLED)
            }
            Err(ResponseError::Malformed) => {
                return self.refuse(Refusal::AuthMalformed, reply::AUTH_MALFORMED)
            }
        };
        let request = match step {
            AuthStep::Plain => match auth::parse_plain(&decoded) {
                Ok(r) => r,
                Err(_) => return self.refuse(Refusal::AuthMalformed, reply::AUTH_MALFORMED),
            },
            AuthStep::LoginUser => {
                let Some(user) = auth::valid_user(&decoded) else {
                    return self.refuse(Refusal::AuthMalformed, reply::AUTH_MALFORMED);
                };
                self.phase = Phase::AuthResponse(AuthStep::LoginPassword(user.into()));
                return self.reply(auth::CHALLENGE_PASSWORD);
            }
            AuthStep::LoginPassword(user) => {
                if decoded.is_empty() || decoded.len() > auth::MAX_PASSWORD {
                    self.event_user(Refusal::AuthMalformed, Some(&user));
                    return self.reply(reply::AUTH_MALFORMED);
                }
                AuthRequest {
                    user,
                    password: decoded,
                    mechanism: Mechanism::Login,
                }
            }
        };
        self.auth_user = Some(request.user.clone());
        self.auth_request = Some(request);
        self.phase = Phase::AwaitingAuth;
    }

    fn starttls(&mut self) {
        match self.tls {
            Tls::Unavailable => self.refuse(Refusal::NotImplemented, reply::NOT_IMPLEMENTED),
            Tls::Active(_) => self.refuse(Refusal::BadSequence, reply::TLS_ALREADY_ACTIVE),
            Tls::Available => {
                self.reply(reply::READY_FOR_TLS);
                // RFC 3207 section 4.2: the session starts over after the handshake; a
                // BDAT body under way ends here without an outcome.
                self.abort_transaction();
                self.phase = Phase::StartTls;
                self.step(Step::StartTls);
            }
        }
    }

    fn hello(&mut self, name: &[u8], esmtp: bool) {
        // RFC 5321 allows one argument; some clients add more words, which we ignore.
        let name = name.split(|&b| b == b' ').next().unwrap_or_default();
        // The argument goes into every Received: line of the session: only a domain or
        // an address literal is taken (501 otherwise), never text that could change
        // the line's structure.
        let Some(name) = std::str::from_utf8(name)
            .ok()
            .filter(|n| n.len() <= MAX_HELO && address::is_valid_helo(n))
        else {
            return self.refuse(Refusal::Syntax, reply::BAD_HELO);
        };
        let helo = match self.greeting.take() {
            Some(g) if &*g.helo == name => g.helo,
            _ => Arc::from(name),
        };
        self.greeting = Some(Greeting { helo, esmtp });
        // HELO/EHLO also reset any transaction (RFC 5321 section 4.1.4).
        self.abort_transaction();
        if esmtp {
            let auth = self.auth_usable();
            reply::ehlo(
                &mut self.out,
                &self.config.hostname,
                self.config.max_message_size,
                self.tls == Tls::Available,
                auth,
            );
        } else {
            reply::helo(&mut self.out, &self.config.hostname);
        }
    }

    fn mail(
        &mut self,
        verb: envelope::Verb,
        from: ReversePath<'_>,
        params: Params<'_>,
        gate: &mut dyn Gate,
    ) {
        let address = match from {
            ReversePath::Null => "",
            ReversePath::Mailbox(m) => m.text,
        };
        let Some(greeting) = &self.greeting else {
            return self.refuse_address(Refusal::BadSequence, reply::NEED_HELO, address);
        };
        if self.txn.is_some() {
            return self.refuse_address(Refusal::BadSequence, reply::NESTED_MAIL, address);
        }
        if self.policy.tls_required && !matches!(self.tls, Tls::Active(_)) {
            return self.refuse_address(Refusal::TlsRequired, reply::TLS_REQUIRED, address);
        }
        if self.auth.is_some_and(|a| a.required) && self.authenticated.is_none() {
            return self.refuse_address(Refusal::AuthRequired, reply::AUTH_REQUIRED, address);
        }
        if let Some(user) = &self.authenticated {
            if !gate.user_message_allowed(user) {
                return self.over_limit(Refusal::MessageRate, "Too many messages for your user");
            }
        }
        if !gate.message_allowed() {
            return self.over_limit(Refusal::MessageRate, "Too many messages from your address");
        }
        if !gate.body_memory_available() {
            return self.refuse_address(Refusal::BodyMemory, reply::LOW_MEMORY, address);
        }
        if !params.is_empty() && !greeting.esmtp {
            return self.refuse_address(
                Refusal::UnsupportedParameter,
                reply::PARAMS_NEED_EHLO,
                address,
            );
        }
        let mail_params = match MailParams::parse(params) {
            Ok(p) => p,
            Err((refusal, text)) => return self.refuse_address(refusal, text, address),
        };
        if mail_params
            .size
            .is_some_and(|size| size > self.config.max_message_size as u64)
        {
            // A message refused for its size, only earlier than its body.
            self.stats.messages_rejected[RejectReason::TooLarge] += 1;
            return self.refuse_address(Refusal::TooLarge, reply::MESSAGE_TOO_BIG, address);
        }
        let from = match from {
            ReversePath::Null => "",
            ReversePath::Mailbox(m) if !m.is_ascii() && !mail_params.smtputf8 => {
                return self.refuse_address(Refusal::NeedsSmtpUtf8, reply::NEEDS_SMTPUTF8, address)
            }
            ReversePath::Mailbox(m) => m.text,
        };
        // Accepted parameters are ASCII keywords and values, so this never falls back.
        let params_text = std::str::from_utf8(params.as_bytes()).unwrap_or_default();
        let mut envelope = Envelope::new(
            verb,
            greeting.helo.clone(),
            greeting.esmtp,
            self.client_addr,
            from,
            params_text,
        );
        envelope.smtputf8 = mail_params.smtputf8;
        envelope.set_dsn(mail_params.ret, mail_params.envid);
        envelope.auth = self.authenticated.clone();
        if let Tls::Active(description) = &self.tls {
            envelope.tls = Some(description.clone());
        }
        self.txn = Some(Transaction {
            envelope,
            size_hint: mail_params.size,
            bdat: None,
            bdat_size: 0,
        });
        self.reply(reply::MAIL_OK);
    }

    fn rcpt(&mut self, to: ForwardPath<'_>, params: Params<'_>) {
        let address = match to {
            ForwardPath::Null => "",
            ForwardPath::Postmaster => "Postmaster",
            ForwardPath::Mailbox(m) => m.text,
        };
        // `--auth-relay`: an authenticated sender may send anywhere.
        let relays = self.authenticated.is_some() && self.auth.is_some_and(|a| a.relay);
        let Some(txn) = &mut self.txn else {
            return self.refuse_address(Refusal::BadSequence, reply::NEED_MAIL, address);
        };
        if txn.bdat.is_some() {
            return self.refuse_address(Refusal::BadSequence, reply::RCPT_AFTER_BDAT, address);
        }
        if !params.is_empty() && !txn.envelope.esmtp {
            return self.refuse_address(
                Refusal::UnsupportedParameter,
                reply::PARAMS_NEED_EHLO,
                address,
            );
        }
        let rcpt_params = match RcptParams::parse(params) {
            Ok(p) => p,
            Err((refusal, text)) => return self.refuse_address(refusal, text, address),
        };
        let rcpt = match to {
            ForwardPath::Null => {
                return self.refuse_address(Refusal::BadRecipient, reply::NULL_RECIPIENT, address)
            }
            ForwardPath::Postmaster => "Postmaster",
            ForwardPath::Mailbox(m) if !m.is_ascii() && !txn.envelope.smtputf8 => {
                return self.refuse_address(Refusal::NeedsSmtpUtf8, reply::NEEDS_SMTPUTF8, address)
            }
            ForwardPath::Mailbox(m) if !self.config.accepts(m.domain) && !relays => {
                return self.refuse_address(Refusal::RelayDenied, reply::RELAY_DENIED, address)
            }
            ForwardPath::Mailbox(m) => m.text,
        };
        if txn.envelope.rcpt_count() >= self.config.max_recipients {
            // Spends the error budget like a 5xx (see `Refusal::spends_error_budget`).
            return self.refuse_address(
                Refusal::TooManyRecipients,
                reply::TOO_MANY_RECIPIENTS,
                address,
            );
        }
        txn.envelope
            .push_rcpt_dsn(rcpt, rcpt_params.notify, rcpt_params.orcpt);
        self.reply(reply::RCPT_OK);
    }

    fn data(&mut self) {
        let Some(txn) = &self.txn else {
            return self.refuse(Refusal::BadSequence, reply::NEED_MAIL);
        };
        if txn.bdat.is_some() {
            return self.refuse(Refusal::BadSequence, reply::DATA_AFTER_BDAT);
        }
        if txn.envelope.rcpt_count() == 0 {
            return self.refuse(Refusal::NoValidRecipients, reply::NO_VALID_RECIPIENTS);
        }
        let body = self.new_body(txn.size_hint);
        let reader = DataReader::new(self.config.max_message_size, self.config.bare_lf);
        self.phase = Phase::Data { reader, body };
        self.step(Step::BodyStarted);
        self.reply(reply::START_DATA);
    }

    fn finish_data(&mut self) {
        let Phase::Data { reader, body } = mem::replace(&mut self.phase, Phase::Command) else {
            return;
        };
        // After the final dot the transaction is over, whatever the outcome.
        let Some(txn) = self.txn.take() else {
            self.step(Step::BodyAbandoned);
            return;
        };
        self.end_body(&reader, txn.envelope, body);
    }

    /// A DATA body after its final dot or a BDAT message after its last chunk: the
    /// same outcomes, counts and replies for both.
    fn end_body(&mut self, reader: &DataReader, envelope: Envelope, body: BytesMut) {
        self.step(Step::BodyEnded);
        if reader.saw_bare_line_ending() {
            self.stats.smuggling_attempts += 1;
        }
        match reader.outcome() {
            BodyOutcome::Complete => self.complete(envelope, body, reader.header_lines()),
            BodyOutcome::TooLarge => {
                self.stats.messages_rejected[RejectReason::TooLarge] += 1;
                self.refuse(Refusal::TooLarge, reply::MESSAGE_TOO_BIG)
            }
            BodyOutcome::BareLineEnding => {
                self.stats.messages_rejected[RejectReason::BareLineEnding] += 1;
                self.refuse(Refusal::BareLineEnding, reply::BARE_LINE_ENDING)
            }
        }
    }

    fn bdat(&mut self, size: u64, last: bool) {
        let max = self.config.max_message_size as u64;
        let refusal = match (&self.greeting, &self.txn) {
            (None, _) => Some((Refusal::BadSequence, reply::NEED_HELO)),
            (Some(g), _) if !g.esmtp => Some((Refusal::BadSequence, reply::BDAT_NEEDS_EHLO)),
            (_, None) => Some((Refusal::BadSequence, reply::NEED_MAIL)),
            (_, Some(t)) if t.envelope.rcpt_count() == 0 => {
                Some((Refusal::NoValidRecipients, reply::NO_VALID_RECIPIENTS))
            }
            (_, Some(t)) if t.bdat_size.saturating_add(size) > max => {
                Some((Refusal::TooLarge, reply::MESSAGE_TOO_BIG))
            }
            _ => None,
        };
        if refusal.is_none() {
            let first = self.txn.as_ref().is_some_and(|t| t.bdat.is_none());
            if first {
                let hint = self.txn.as_ref().and_then(|t| t.size_hint).unwrap_or(size);
                let body = self.new_body(Some(hint));
                let reader = DataReader::chunked(max as usize, self.config.bare_lf);
                if let Some(txn) = self.txn.as_mut() {
                    txn.bdat = Some(BdatBody { reader, body });
                    self.step(Step::BodyStarted);
                }
            }
            if let Some(txn) = self.txn.as_mut() {
                txn.bdat_size += size;
            }
        }
        self.phase = Phase::Bdat(Chunk {
            size,
            remaining: size,
            last,
            refusal,
        });
        if size == 0 {
            self.finish_chunk();
        }
    }

    fn finish_chunk(&mut self) {
        let Phase::Bdat(chunk) = mem::replace(&mut self.phase, Phase::Command) else {
            return;
        };
        match chunk.refusal {
            Some((refusal, text)) => {
                if refusal == Refusal::TooLarge {
                    // RFC 3030 section 2: after an error the transaction is aborted. A
                    // body ends here only if an earlier chunk had started it.
                    if self.txn.take().is_some_and(|t| t.bdat.is_some()) {
                        self.step(Step::BodyEnded);
                    }
                    self.stats.messages_rejected[RejectReason::TooLarge] += 1;
                }
                self.refuse(refusal, text);
            }
            None if chunk.last => {
                let Some(Transaction {
                    envelope,
                    bdat:
                        Some(BdatBody {
                            mut reader,
                            mut body,
                        }),
                    ..
                }) = self.txn.take()
                else {
                    return;
                };
                reader.finish(&mut body);
                self.end_body(&reader, envelope, body);
            }
            None => reply::chunk_received(&mut self.out, chunk.size),
        }
    }

    fn complete(&mut self, envelope: Envelope, body: BytesMut, header: HeaderLines) {
        let message = Message::new(envelope, body, self.config.headroom);
        self.completed = Some(message.with_header_lines(header));
        self.phase = Phase::AwaitingPublish;
    }

    /// One allocation per message: the body with headroom for the trace line, sized by
    /// the client's SIZE hint when it gave one (bounded by our limit).
    fn new_body(&self, size_hint: Option<u64>) -> BytesMut {
        let headroom = self.config.headroom;
        let expected = size_hint
            .map_or(INITIAL_BODY_CAPACITY as u64, |s| s.saturating_add(2))
            .min(self.config.max_message_size as u64) as usize;
        let mut body = BytesMut::with_capacity(headroom + expected);
        body.resize(headroom, 0);
        body
    }

    fn help(&mut self, topic: &[u8]) {
        let auth = self.auth_usable();
        if topic.is_empty() {
            self.reply(if auth { reply::HELP_AUTH } else { reply::HELP });
        } else if auth && topic.eq_ignore_ascii_case(b"AUTH") {
            self.reply(reply::HELP_TOPIC_AUTH);
        } else if let Some(text) = help_topic(topic) {
            self.reply(text);
        } else {
            self.refuse(Refusal::UnknownHelpTopic, reply::HELP_UNKNOWN_TOPIC);
        }
    }
}

/// The MAIL parameters we implement (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8,
/// RFC 3461 RET and ENVID), borrowed from the command line.
#[derive(Default)]
struct MailParams<'a> {
    size: Option<u64>,
    body: bool,
    smtputf8: bool,
    ret: Option<Ret>,
    envid: Option<&'a str>,
    /// RFC 4954 section 5: `AUTH=<>` or the xtext of a mailbox. Kept in the
    /// recorded parameters; the identity recorded is the session's own AUTH.
    auth: bool,
}

/// A refused DSN parameter: `501 5.5.4` with the parameter's own text.
fn dsn_refusal(e: DsnError) -> (Refusal, &'static [u8]) {
    (Refusal::BadParameter, e.reply())
}

impl<'a> MailParams<'a> {
    fn parse(params: Params<'a>) -> Result<Self, (Refusal, &'static [u8])> {
        const BAD: (Refusal, &[u8]) = (Refusal::BadParameter, reply::BAD_PARAM);
        const DUPLICATE: (Refusal, &[u8]) = (Refusal::BadParameter, reply::DUPLICATE_PARAM);
        const UNSUPPORTED: (Refusal, &[u8]) =
            (Refusal::UnsupportedParameter, reply::UNKNOWN_MAIL_PARAM);
        let mut parsed = MailParams::default();
        for param in params.iter() {
            let (key, value) = param.map_err(|()| BAD)?;
            if key.eq_ignore_ascii_case(b"SIZE") {
                let size = value.and_then(command::parse_decimal).ok_or(BAD)?;
                if parsed.size.replace(size).is_some() {
                    return Err(DUPLICATE);
                }
            } else if key.eq_ignore_ascii_case(b"BODY") {
                let value = value.ok_or(BAD)?;
                if !(value.eq_ignore_ascii_case(b"7BIT") || value.eq_ignore_ascii_case(b"8BITMIME"))
                {
                    // BINARYMIME is not advertised.
                    return Err(UNSUPPORTED);
                }
                if mem::replace(&mut parsed.body, true) {
                    return Err(DUPLICATE);
                }
            } else if key.eq_ignore_ascii_case(b"SMTPUTF8") {
                if value.is_some() {
                    return Err(BAD);
                }
                if mem::replace(&mut parsed.smtputf8, true) {
                    return Err(DUPLICATE);
                }
            } else if key.eq_ignore_ascii_case(b"RET") {
                let ret = value.ok_or(DsnError::Ret).and_then(Ret::parse);
                if parsed.ret.replace(ret.map_err(dsn_refusal)?).is_some() {
                    return Err(DUPLICATE);
                }
            } else if key.eq_ignore_ascii_case(b"AUTH") {
                let value = value.ok_or(BAD)?;
                if value != b"<>" && dsn::decode_to_vec(value).is_err() {
                    return Err(BAD);
                }
                if mem::replace(&mut parsed.auth, true) {
                    return Err(DUPLICATE);
                }
            } else if key.eq_ignore_ascii_case(b"ENVID") {
                let envid = value.ok_or(DsnError::Envid).and_then(dsn::parse_envid);
                if parsed.envid.replace(envid.map_err(dsn_refusal)?).is_some() {
                    return Err(DUPLICATE);
                }
            } else {
                return Err(UNSUPPORTED);
            }
        }
        Ok(parsed)
    }
}

/// The RCPT parameters we implement (RFC 3461 NOTIFY and ORCPT), borrowed from the
/// command line.
#[derive(Default)]
struct RcptParams<'a> {
    notify: Notify,
    orcpt: Option<&'a str>,
}

impl<'a> RcptParams<'a> {
    fn parse(params: Params<'a>) -> Result<Self, (Refusal, &'static [u8])> {
        const DUPLICATE: (Refusal, &[u8]) = (Refusal::BadParameter, reply::DUPLICATE_RCPT_PARAM);
        let mut parsed = RcptParams::default();
        for param in params.iter() {
            let (key, value) = param.map_err(|()| (Refusal::BadParameter, reply::BAD_PARAM))?;
            if key.eq_ignore_ascii_case(b"NOTIFY") {
                let notify = value.ok_or(DsnError::Notify).and_then(Notify::parse);
                if mem::replace(&mut parsed.notify, notify.map_err(dsn_refusal)?).is_given() {
                    return Err(DUPLICATE);
                }
            } else if key.eq_ignore_ascii_case(b"ORCPT") {
                let orcpt = value.ok_or(DsnError::Orcpt).and_then(dsn::parse_orcpt);
                if parsed.orcpt.replace(orcpt.map_err(dsn_refusal)?).is_some() {
                    return Err(DUPLICATE);
                }
            } else {
                return Err((Refusal::UnsupportedParameter, reply::UNKNOWN_RCPT_PARAM));
            }
        }
        Ok(parsed)
    }
}

/// The `smtpgw_commands_total` label of a parsed line: the verb, or `OTHER` for lines
/// that are unknown, not implemented or do not parse (their verb may be client junk).
fn verb_of(parsed: &Result<Command<'_>, CommandError>) -> Verb {
    let Ok(command) = parsed else {
        return Verb::Other;
    };
    match command {
        Command::Helo(_) => Verb::Helo,
        Command::Ehlo(_) => Verb::Ehlo,
        Command::Mail { verb, .. } => match verb {
            envelope::Verb::Mail => Verb::Mail,
            envelope::Verb::Send => Verb::Send,
            envelope::Verb::Soml => Verb::Soml,
            envelope::Verb::Saml => Verb::Saml,
        },
        Command::Rcpt { .. } => Verb::Rcpt,
        Command::Data => Verb::Data,
        Command::Bdat { .. } => Verb::Bdat,
        Command::Rset => Verb::Rset,
        Command::Noop => Verb::Noop,
        Command::Quit => Verb::Quit,
        Command::Vrfy(_) => Verb::Vrfy,
        Command::Expn(_) => Verb::Expn,
        Command::Help(_) => Verb::Help,
        Command::Turn => Verb::Turn,
        Command::StartTls => Verb::StartTls,
        Command::Auth { .. } => Verb::Auth,
        Command::NotImplemented => Verb::Other,
    }
}

fn command_error_reply(error: CommandError) -> (Refusal, &'static [u8]) {
    match error {
        CommandError::UnknownVerb => (Refusal::UnknownCommand, reply::UNKNOWN_COMMAND),
        CommandError::Syntax(of) => (
            Refusal::Syntax,
            match of {
                SyntaxOf::Helo => reply::SYNTAX_HELO,
                SyntaxOf::Ehlo => reply::SYNTAX_EHLO,
                SyntaxOf::Mail => reply::SYNTAX_MAIL,
                SyntaxOf::Rcpt => reply::SYNTAX_RCPT,
                SyntaxOf::Bdat => reply::SYNTAX_BDAT,
                SyntaxOf::Vrfy => reply::SYNTAX_VRFY,
                SyntaxOf::Auth => reply::SYNTAX_AUTH,
                SyntaxOf::NoArguments => reply::NO_ARGUMENTS,
            },
        ),
        CommandError::Address(kind, error) => {
            let too_long = matches!(
                error,
                AddressError::LocalPartTooLong
                    | AddressError::DomainTooLong
                    | AddressError::PathTooLong
            );
            match (kind, too_long) {
                (PathKind::Sender, false) => (Refusal::BadSender, reply::BAD_SENDER),
                (PathKind::Sender, true) => (Refusal::SenderTooLong, reply::SENDER_TOO_LONG),
                (PathKind::Recipient, false) => (Refusal::BadRecipient, reply::BAD_RECIPIENT),
                (PathKind::Recipient, true) => {
                    (Refusal::RecipientTooLong, reply::RECIPIENT_TOO_LONG)
                }
            }
        }
    }
}

fn help_topic(topic: &[u8]) -> Option<&'static [u8]> {
    const TOPICS: &[(&[u8], &[u8])] = &[
        (b"HELO", b"214 2.0.0 HELO <hostname>\r\n"),
        (b"EHLO", b"214 2.0.0 EHLO <hostname>\r\n"),
        (
            b"MAIL",
            b"214 2.0.0 MAIL FROM:<sender> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]\r\n",
        ),
        (b"RCPT", b"214 2.0.0 RCPT TO:<recipient>\r\n"),
        (
            b"DATA",
            b"214 2.0.0 DATA, then the message, ended by a line with a single dot\r\n",
        ),
        (
            b"BDAT",
            b"214 2.0.0 BDAT <size> [LAST], then exactly <size> octets\r\n",
        ),
        (
            b"RSET",
            b"214 2.0.0 RSET aborts the current transaction\r\n",
        ),
        (b"NOOP", b"214 2.0.0 NOOP does nothing\r\n"),
        (b"QUIT", b"214 2.0.0 QUIT closes the connection\r\n"),
        (
            b"VRFY",
            b"214 2.0.0 VRFY <address>: never verifies, answers 252\r\n",
        ),
        (b"EXPN", b"214 2.0.0 EXPN is not supported\r\n"),
        (b"HELP", b"214 2.0.0 HELP [command]\r\n"),
    ];
    TOPICS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(topic))
        .map(|&(_, text)| text)
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "auth_session_tests.rs"]
mod auth_tests;
