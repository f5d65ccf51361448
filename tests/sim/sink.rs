//! The simulated sink: implements the crate's `Sink` and holds every message until a
//! step of the run answers it (in any order, `Ok`, `Temporary`, `StorageFull` or
//! `TooLarge`), its publish timeout answers it `Temporary` (a lost answer), or a crash
//! fails everything it holds and everything submitted until it restarts. It can also
//! answer inside `submit`, as the null sink does. Every message it answered is kept as
//! a record, for the invariants to compare with what the clients sent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use smtpgw::sink::record::SealedMessage;
use smtpgw::sink::{Completion, PublishError, PublishResult, Sink};

/// A held message no step answers is answered `Temporary` this long after it arrived,
/// as the Kafka sink's publish timeout does: a short one, or (in some seeds) one longer
/// than the idle timeout, which an operator may set, so that bodies stay paused on the
/// budget for longer than the idle timeout.
pub const PUBLISH_TIMEOUTS: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(90)];
/// `over_inflight_limit` while the sink holds this many.
pub const INFLIGHT_LIMIT: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    Temporary,
    StorageFull,
    TooLarge,
}

/// Which client's which message a body is: the `X-Sim-Tag` header every simulated
/// message starts with.
pub type Tag = (u32, u32);

/// A message the sink answered.
pub struct Record {
    pub tag: Option<Tag>,
    pub body: Vec<u8>,
    /// The record's `smtp.mail_from` and `smtp.rcpt_to` headers, as a sink stores them.
    pub mail_from: Vec<u8>,
    pub rcpt_to: Vec<Vec<u8>>,
    /// `smtp.tls` and `smtp.auth`.
    pub tls: Vec<u8>,
    pub auth: Vec<u8>,
    pub outcome: Outcome,
}

struct Held {
    id: u128,
    tag: Option<Tag>,
    body: Vec<u8>,
    mail_from: Vec<u8>,
    rcpt_to: Vec<Vec<u8>>,
    tls: Vec<u8>,
    auth: Vec<u8>,
    done: Completion,
    due: Duration,
}

#[derive(Default)]
struct State {
    now: Duration,
    held: Vec<Held>,
    crashed_until: Option<Duration>,
    inline_ok: bool,
    publish_timeout: Duration,
    /// By message id.
    records: BTreeMap<u128, Record>,
    answered_twice: Vec<u128>,
    /// The tags answered `Ok`, and those answered `Ok` a second time: a client sends
    /// each message once, so a second stored record of it is a duplicate, whatever id
    /// the gateway gave it.
    stored: BTreeSet<Tag>,
    stored_twice: Vec<Tag>,
    submitted: u64,
}

pub struct SimSink {
    state: Mutex<State>,
}

pub fn tag_of(body: &[u8]) -> Option<Tag> {
    let key = b"X-Sim-Tag: c";
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &body[at..];
    let end = rest.iter().position(|&b| b == b'\r' || b == b'\n')?;
    let text = std::str::from_utf8(&rest[..end]).ok()?;
    let (c, m) = text.split_once('m')?;
    Some((c.parse().ok()?, m.parse().ok()?))
}

fn result(outcome: Outcome, id: u128) -> PublishResult {
    match outcome {
        Outcome::Ok => Ok(id.into()),
        Outcome::Temporary => Err(PublishError::Temporary("simulated".into())),
        Outcome::StorageFull => Err(PublishError::StorageFull),
        Outcome::TooLarge => Err(PublishError::TooLarge),
    }
}

impl SimSink {
    pub fn new(publish_timeout: Duration) -> SimSink {
        SimSink {
            state: Mutex::new(State {
                publish_timeout,
                ..State::default()
            }),
        }
    }

    pub fn publish_timeout(&self) -> Duration {
        self.lock().publish_timeout
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_now(&self, now: Duration) {
        let mut s = self.lock();
        s.now = now;
        if s.crashed_until.is_some_and(|u| now >= u) {
            s.crashed_until = None;
        }
    }

    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// How many held messages time out only after `at` (run time).
    pub fn held_due_after(&self, at: Duration) -> usize {
        self.lock().held.iter().filter(|h| h.due > at).count()
    }

    /// Answers the held message `pick` (modulo how many are held).
    pub fn answer(&self, pick: usize, outcome: Outcome) -> Option<(u128, Outcome)> {
        let mut s = self.lock();
        if s.held.is_empty() {
            return None;
        }
        let i = pick % s.held.len();
        let h = s.held.remove(i);
        let id = h.id;
        settle(&mut s, h, outcome);
        Some((id, outcome))
    }

    /// Answers every held message whose publish timeout passed; returns how many.
    pub fn expire(&self) -> usize {
        let mut s = self.lock();
        let now = s.now;
        let mut n = 0;
        while let Some(i) = s.held.iter().position(|h| h.due <= now) {
            let h = s.held.remove(i);
            settle(&mut s, h, Outcome::Temporary);
            n += 1;
        }
        n
    }

    /// The sink fails: everything held fails now, and everything submitted until
    /// `until`.
    pub fn crash(&self, until: Duration) {
        let mut s = self.lock();
        s.crashed_until = Some(until);
        for h in std::mem::take(&mut s.held) {
            settle(&mut s, h, Outcome::Temporary);
        }
    }

    pub fn set_inline(&self, on: bool) {
        self.lock().inline_ok = on;
    }

    /// When the next held message times out (or the crash ends), as run time.
    pub fn next_due(&self) -> Option<Duration> {
        let s = self.lock();
        let due = s.held.iter().map(|h| h.due).min();
        match (due, s.crashed_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn with_record<T>(&self, id: u128, f: impl FnOnce(Option<&Record>) -> T) -> T {
        f(self.lock().records.get(&id))
    }

    /// Whether any message with `tag` was answered `Ok`.
    pub fn stored(&self, tag: Tag) -> bool {
        self.lock().stored.contains(&tag)
    }

    /// Every record, in id order.
    pub fn for_each_record(&self, mut f: impl FnMut(u128, &Record)) {
        for (id, r) in &self.lock().records {
            f(*id, r);
        }
    }

    pub fn answered_twice(&self) -> Vec<u128> {
        self.lock().answered_twice.clone()
    }

    /// The messages (client, message) answered `Ok` more than once.
    pub fn stored_twice(&self) -> Vec<Tag> {
        self.lock().stored_twice.clone()
    }

    pub fn submitted(&self) -> u64 {
        self.lock().submitted
    }
}

fn settle(s: &mut State, h: Held, outcome: Outcome) {
    if let Some(tag) = h.tag.filter(|_| outcome == Outcome::Ok) {
        if !s.stored.insert(tag) {
            s.stored_twice.push(tag);
        }
    }
    let record = Record {
        tag: h.tag,
        body: h.body,
        mail_from: h.mail_from,
        rcpt_to: h.rcpt_to,
        tls: h.tls,
        auth: h.auth,
        outcome,
    };
    if s.records.insert(h.id, record).is_some() {
        s.answered_twice.push(h.id);
    }
    h.done.complete(result(outcome, h.id));
}

impl Sink for SimSink {
    fn submit(&self, msg: SealedMessage, done: Completion) {
        let mut mail_from = Vec::new();
        let mut rcpt_to = Vec::new();
        let mut tls = Vec::new();
        let mut auth = Vec::new();
        msg.for_each_header(|name, value| match name {
            "smtp.mail_from" => mail_from = value.to_vec(),
            "smtp.rcpt_to" => rcpt_to.push(value.to_vec()),
            "smtp.tls" => tls = value.to_vec(),
            "smtp.auth" => auth = value.to_vec(),
            _ => {}
        });
        let mut s = self.lock();
        s.submitted += 1;
        let held = Held {
            id: u128::from(msg.id),
            tag: tag_of(msg.body()),
            body: msg.body().to_vec(),
            mail_from,
            rcpt_to,
            tls,
            auth,
            done,
            due: s.now + s.publish_timeout,
        };
        if s.crashed_until.is_some() {
            settle(&mut s, held, Outcome::Temporary);
        } else if s.inline_ok {
            settle(&mut s, held, Outcome::Ok);
        } else {
            s.held.push(held);
        }
    }

    fn shutdown(&self) {}

    fn name(&self) -> &'static str {
        "sim"
    }

    fn over_inflight_limit(&self) -> bool {
        self.lock().held.len() >= INFLIGHT_LIMIT
    }
}
