//! The simulated clock: a fixed `Instant` read once at start plus an offset that only
//! the simulation moves, by small steps or by jumping to the next deadline. Nothing in
//! the simulated path reads the wall clock.

use std::time::{Duration, Instant};

pub struct Clock {
    base: Instant,
    offset: Duration,
}

impl Clock {
    pub fn new(base: Instant) -> Clock {
        Clock {
            base,
            offset: Duration::ZERO,
        }
    }

    pub fn now(&self) -> Instant {
        self.base + self.offset
    }

    /// Time since the run began (what traces and deadlines are written in).
    pub fn elapsed(&self) -> Duration {
        self.offset
    }

    pub fn at(&self, offset: Duration) -> Instant {
        self.base + offset
    }

    /// `Instant` to run time.
    pub fn offset_of(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.base)
    }

    pub fn advance(&mut self, by: Duration) {
        self.offset += by;
    }

    /// Moves to `t` if it is later than now.
    pub fn jump_to(&mut self, t: Instant) {
        let o = self.offset_of(t);
        if o > self.offset {
            self.offset = o;
        }
    }
}
