//! What comes back to a reactor from other threads: a sink's answer for a message, or
//! the AUTH verifier's for a connection's credentials. Each reactor has one
//! [`CompletionQueue`]; an answer is queued there with the connection's [`Ticket`] and
//! the reactor woken through its [`Wake`], so a burst of answers costs one wake-up.
//!
//! It sits apart from `crate::sink` because the queue is the reactor's, not a sink's:
//! sinks reach it through [`crate::sink::Completion`], the AUTH verifier through
//! [`auth_completion`], and the watchdog (`crate::liveness`) wakes reactors with the same
//! [`Wake`]; the reactor side (`crate::net`, `crate::notify`) needs no sink for it.
//! `crate::sink` re-exports these types, so their old paths still work.

use std::sync::{Arc, Mutex};

use crate::smtp::auth::AuthVerdict;
use crate::smtp::envelope::{PublishResult, StoredIn};

/// Which connection of a reactor waits for an answer. The generation tells a late
/// answer for a connection that has since closed (and whose slot was reused) from the
/// answer its new occupant waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub slot: u32,
    pub generation: u32,
}

/// How a reactor is woken when an answer is queued for it: an eventfd write for
/// io_uring, a `Notify` for the epoll backend.
pub trait Wake: Send + Sync + 'static {
    fn wake(&self);
}

/// What comes back to a connection from another thread: a sink's answer for its
/// message, or the AUTH verifier's for its credentials (`crate::auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// With where the message went (the transaction line's `sink=`).
    Publish(PublishResult, StoredIn),
    Auth(AuthVerdict),
}

/// One reactor's inbox of sink (and AUTH verifier) answers. Sinks push from their own
/// threads; the reactor takes the whole batch at once, so a burst of answers costs it
/// one wake-up.
pub struct CompletionQueue {
    answers: Mutex<Vec<(Ticket, Answer)>>,
    waker: Box<dyn Wake>,
}

impl CompletionQueue {
    pub fn new(waker: Box<dyn Wake>) -> Arc<CompletionQueue> {
        Arc::new(CompletionQueue {
            answers: Mutex::new(Vec::with_capacity(256)),
            waker,
        })
    }

    pub(crate) fn push(&self, ticket: Ticket, result: Answer) {
        let was_empty = {
            let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
            answers.push((ticket, result));
            answers.len() == 1
        };
        // The reactor takes every queued answer when it wakes, so only the push that
        // makes the queue non-empty needs to wake it.
        if was_empty {
            self.waker.wake();
        }
    }

    /// Moves every queued answer into `into` (which the caller reuses, so this does not
    /// allocate once warm).
    pub fn drain_into(&self, into: &mut Vec<(Ticket, Answer)>) {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut answers);
    }
}

/// The way back from the AUTH verifier to the connection `ticket`: the same queue and
/// wake-up as a sink's answer.
pub fn auth_completion(
    queue: Arc<CompletionQueue>,
    ticket: Ticket,
) -> Box<dyn FnOnce(AuthVerdict) + Send> {
    Box::new(move |verdict| queue.push(ticket, Answer::Auth(verdict)))
}
