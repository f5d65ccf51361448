//! What the two simulation targets (`tests/sim`, the reactor core; `tests/sim_disk`, the
//! spool) share: their one seeded RNG, where fresh seeds come from, and the environment
//! and arguments that choose what a run does. Each target's `main` includes it with
//! `#[path]`, as the spool tests include `tests/spool_support`.
//!
//! - `SMTPGW_SIM_SEED=N`: replay seed N (a value that does not parse is an error, not a
//!   run of fresh seeds);
//! - `SMTPGW_SIM_SECONDS=S`: how long to run fresh seeds (whole seconds; the target
//!   gives the default);
//! - `SMTPGW_SIM_BASE_SEED=B`: draw the fresh seeds from B instead of the OS, a
//!   repeatable set (mutation testing);
//! - `SMTPGW_SIM_DEFECT=NAME`: a reintroduced defect on, to replay a seed a hunt reported;
//! - arguments `determinism`, `defects`, `seeds`: only those parts (default: all).

#![allow(dead_code)]

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The simulators' one RNG, fastrand's (wyrand): seeded explicitly, the same sequence on
/// every machine, so a seed replays.
pub type Rng = fastrand::Rng;

/// The draws the spool's simulation makes besides fastrand's own.
pub trait Draw {
    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64;
    /// True with probability `1 / n`.
    fn one_in(&mut self, n: u64) -> bool;
}

impl Draw for Rng {
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.u64(..n)
        }
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// A seed from the OS: where fresh seeds start when no base seed is given.
pub fn os_seed() -> u64 {
    let mut b = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        // Not deterministic, and need not be: only where the fresh seeds start.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// Fresh seeds, drawn from one RNG seeded with the base seed.
pub struct Seeds(Rng);

impl Seeds {
    pub fn new(base: u64) -> Seeds {
        Seeds(Rng::with_seed(base))
    }

    /// From the OS, whatever the environment says (the defect hunts: a new set each run).
    pub fn from_os() -> Seeds {
        Seeds::new(os_seed())
    }

    pub fn next(&mut self) -> u64 {
        self.0.u64(..)
    }
}

/// The parts of a run a target has: `determinism`, `defects` (the hunts), `seeds`.
const PARTS: [&str; 3] = ["determinism", "defects", "seeds"];

/// Which parts of a run the arguments ask for: all when none is named. Only the parts'
/// names count: whatever else cargo passes on to every test target (`--skip conn::`
/// from `scripts/mutants.sh`, `--nocapture`) must not turn a run into one of nothing.
pub struct Parts {
    named: Vec<String>,
}

impl Parts {
    pub fn from_args() -> Parts {
        Parts {
            named: std::env::args()
                .skip(1)
                .filter(|a| PARTS.contains(&a.as_str()))
                .collect(),
        }
    }

    pub fn wants(&self, part: &str) -> bool {
        self.named.is_empty() || self.named.iter().any(|a| a == part)
    }
}

/// What the environment asks of a run.
pub struct Env {
    /// `SMTPGW_SIM_SEED`: the one seed to replay.
    pub seed: Option<u64>,
    /// `SMTPGW_SIM_SECONDS`: how long to run fresh seeds.
    pub budget: Duration,
    /// `SMTPGW_SIM_DEFECT`: the reintroduced defect switched on, by name.
    pub defect: Option<String>,
    /// Where the fresh seeds come from: `SMTPGW_SIM_BASE_SEED`, or the OS.
    pub seeds: Seeds,
}

impl Env {
    /// Reads the environment; `default_seconds` when `SMTPGW_SIM_SECONDS` is not set.
    /// `defects` are the names `SMTPGW_SIM_DEFECT` may give and their switches: the
    /// named one is turned on. A value that does not parse, or an unknown defect, is an
    /// error that says which.
    pub fn read(default_seconds: u64, defects: &[(&str, &AtomicBool)]) -> Result<Env, String> {
        let seed = number("SMTPGW_SIM_SEED")?;
        let seconds = number("SMTPGW_SIM_SECONDS")?.unwrap_or(default_seconds);
        let base = number("SMTPGW_SIM_BASE_SEED")?;
        let defect = match std::env::var("SMTPGW_SIM_DEFECT") {
            Ok(name) => {
                let Some((_, switch)) = defects.iter().find(|(n, _)| *n == name) else {
                    let known: Vec<&str> = defects.iter().map(|(n, _)| *n).collect();
                    return Err(format!(
                        "SMTPGW_SIM_DEFECT: unknown defect {name:?} ({})",
                        known.join(", ")
                    ));
                };
                switch.store(true, Ordering::Relaxed);
                Some(name)
            }
            Err(_) => None,
        };
        Ok(Env {
            seed,
            budget: Duration::from_secs(seconds),
            defect,
            seeds: Seeds::new(base.unwrap_or_else(os_seed)),
        })
    }

    /// [`Env::read`], or the process ends with its error and exit code 2 (a mistake in
    /// the call, not a failed simulation).
    pub fn read_or_exit(default_seconds: u64, defects: &[(&str, &AtomicBool)]) -> Env {
        Env::read(default_seconds, defects).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        })
    }
}

/// `name`'s value as a whole number, if it is set.
fn number(name: &str) -> Result<Option<u64>, String> {
    match std::env::var(name) {
        Ok(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}: not a whole number: {s:?}")),
        Err(_) => Ok(None),
    }
}
