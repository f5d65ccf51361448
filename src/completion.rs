//! What comes back to a reactor from other threads: a sink's answer for a message, or
//! the AUTH verifier's for a connection's credentials. Each reactor has one
//! [`CompletionQueue`]; an answer is queued there with the connection's [`Ticket`] and
//! the reactor woken through its [`Wake`], so a burst of answers costs one wake-up.
//!
//! An answer a sink gives inside [`CompletionQueue::hand_off`], on the reactor's own
//! thread (the null sink always does; others when they refuse at once), is not queued:
//! the reactor takes it as `hand_off` returns, with no wake-up of itself and no extra
//! turn of its loop.
//!
//! It sits apart from `crate::sink` because the queue is the reactor's, not a sink's:
//! sinks reach it through [`crate::sink::Completion`], the AUTH verifier through
//! [`auth_completion`], and the watchdog (`crate::liveness`) wakes reactors with the same
//! [`Wake`]; the reactor side (`crate::net`, `crate::notify`) needs no sink for it.
//! `crate::sink` re-exports these types, so their old paths still work.

use std::cell::RefCell;
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
        let Some(result) = self.catch(ticket, result) else {
            return;
        };
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

    /// Runs `submit`, which gives the message of `ticket` to a sink, and returns what it
    /// returned with the answer if the sink gave it before returning, on this thread:
    /// that answer is neither queued nor woken for, since the caller (the reactor whose
    /// queue this is) takes it at once. Answers given on other threads, or for other
    /// tickets, are queued as always.
    pub(crate) fn hand_off<R>(
        &self,
        ticket: Ticket,
        submit: impl FnOnce() -> R,
    ) -> (R, Option<Answer>) {
        let outer = CAUGHT.with(|c| {
            c.replace(Some(Caught {
                queue: self,
                ticket,
                answer: None,
            }))
        });
        // Put back on the way out, even if the sink panics, so that a later push on
        // this thread is not taken for this hand-off's.
        struct Restore(Option<Caught>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let outer = self.0.take();
                let _ = CAUGHT.try_with(|c| c.replace(outer));
            }
        }
        let _restore = Restore(outer);
        let r = submit();
        let answer = CAUGHT.with(|c| c.borrow_mut().as_mut().and_then(|h| h.answer.take()));
        (r, answer)
    }

    /// The answer back, unless it is the sink's for a hand-off of `ticket` to this
    /// queue under way on this thread: then it is kept for [`Self::hand_off`] to
    /// return.
    fn catch(&self, ticket: Ticket, answer: Answer) -> Option<Answer> {
        let mut answer = Some(answer);
        let _ = CAUGHT.try_with(|c| {
            if let Some(h) = c.borrow_mut().as_mut() {
                let mine = std::ptr::eq(h.queue, self) && h.ticket == ticket;
                if mine && h.answer.is_none() && matches!(answer, Some(Answer::Publish(..))) {
                    h.answer = answer.take();
                }
            }
        });
        answer
    }

    /// Moves every queued answer into `into` (which the caller reuses, so this does not
    /// allocate once warm).
    pub fn drain_into(&self, into: &mut Vec<(Ticket, Answer)>) {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut answers);
    }
}

/// The hand-off under way on this thread, if any: which queue and ticket it is for,
/// and the answer once the sink gave it.
struct Caught {
    queue: *const CompletionQueue,
    ticket: Ticket,
    answer: Option<Answer>,
}

thread_local! {
    static CAUGHT: RefCell<Option<Caught>> = const { RefCell::new(None) };
}

/// The way back from the AUTH verifier to the connection `ticket`: the same queue and
/// wake-up as a sink's answer.
pub fn auth_completion(
    queue: Arc<CompletionQueue>,
    ticket: Ticket,
) -> Box<dyn FnOnce(AuthVerdict) + Send> {
    Box::new(move |verdict| queue.push(ticket, Answer::Auth(verdict)))
}
