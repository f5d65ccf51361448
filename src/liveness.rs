//! Reactor liveness for the systemd watchdog: a question every reactor must answer
//! from its own event loop.
//!
//! The watchdog thread ([`crate::notify`]) asks ([`Liveness::ask`]: a new number, and a
//! wake-up for every reactor through the same wake the sink uses for its answers), and
//! each reactor, whenever its loop runs, copies the number into its own answer slot
//! ([`Liveness::answer`]). A reactor that is stuck (a blocked thread, a loop that never
//! returns to its event wait) never answers, and the watchdog stops pinging systemd.
//! Nothing polls: reactors are woken once per watchdog period, and only when systemd
//! asked for a watchdog; the answer costs a reactor one relaxed load per loop turn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::completion::Wake;

pub struct Liveness {
    asked: AtomicU64,
    answers: Box<[AtomicU64]>,
    /// One per reactor, set by the backend once its reactors exist.
    wakers: OnceLock<Box<[Box<dyn Wake>]>>,
}

impl Liveness {
    pub fn new(reactors: usize) -> Liveness {
        Liveness {
            asked: AtomicU64::new(0),
            answers: (0..reactors.max(1)).map(|_| AtomicU64::new(0)).collect(),
            wakers: OnceLock::new(),
        }
    }

    /// How the backend wakes each reactor (index order). Set once; later calls are
    /// ignored.
    pub fn set_wakers(&self, wakers: Vec<Box<dyn Wake>>) {
        let _ = self.wakers.set(wakers.into_boxed_slice());
    }

    /// Reactor `index` is running its loop: it answers the latest question.
    #[inline]
    pub fn answer(&self, index: usize) {
        let asked = self.asked.load(Ordering::Acquire);
        if let Some(slot) = self.answers.get(index) {
            // Written once per question, so reactors do not bounce a cache line.
            if slot.load(Ordering::Relaxed) != asked {
                slot.store(asked, Ordering::Release);
            }
        }
    }

    /// The reactors that have not answered the latest question (empty: all have).
    pub fn silent(&self) -> Vec<usize> {
        let asked = self.asked.load(Ordering::Acquire);
        self.answers
            .iter()
            .enumerate()
            .filter(|(_, a)| a.load(Ordering::Acquire) != asked)
            .map(|(i, _)| i)
            .collect()
    }

    /// Asks a new question and wakes every reactor to answer it.
    pub fn ask(&self) {
        self.asked.fetch_add(1, Ordering::AcqRel);
        if let Some(wakers) = self.wakers.get() {
            for w in wakers.iter() {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    struct Count(Arc<AtomicUsize>);
    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_reactor_that_does_not_answer_is_named_until_it_does() {
        let l = Liveness::new(3);
        let woken = Arc::new(AtomicUsize::new(0));
        l.set_wakers(
            (0..3)
                .map(|_| Box::new(Count(woken.clone())) as Box<dyn Wake>)
                .collect(),
        );
        l.ask();
        assert_eq!(woken.load(Ordering::Relaxed), 3, "every reactor is woken");
        assert_eq!(l.silent(), vec![0, 1, 2]);
        l.answer(0);
        l.answer(2);
        assert_eq!(l.silent(), vec![1]);
        // An answer to an old question does not count for a new one.
        l.ask();
        assert_eq!(l.silent(), vec![0, 1, 2]);
        for i in 0..3 {
            l.answer(i);
        }
        assert!(l.silent().is_empty());
        // Out-of-range indexes are ignored rather than panicking.
        l.answer(7);
    }
}
