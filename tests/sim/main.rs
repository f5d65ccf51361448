//! Deterministic simulation of the reactor core (issue 24, items 1-4, the network
//! side): the real `net::host::Host`, connection drivers and SMTP sessions, with the
//! clock, the network, the clients and the sink simulated and every choice drawn from
//! one seeded RNG, so a seed replays exactly. See README, "Simulation".
//!
//! - `SMTPGW_SIM_SEED=N`: replay seed N (print its trace hash, and the shrunk trace if
//!   it breaks an invariant);
//! - otherwise: the determinism check, the hunts for the reintroduced defects, then
//!   fresh seeds from the OS for `SMTPGW_SIM_SECONDS` (default 10; 0: none), each
//!   logged as `sim seed=N`; the counts at the end. `SMTPGW_SIM_BASE_SEED=B` draws the
//!   seeds from B instead of the OS, for a repeatable set (mutation testing).
//! - Arguments select parts: `determinism`, `defects`, `seeds` (default: all), as in
//!   `tests/sim_disk`. `scripts/test.sh` runs the first two in `cargo test` and
//!   `scripts/sim.sh` the third, so that each runs once.
//!
//! Exits non-zero on a violated invariant, a seed that replays differently, or a
//! reintroduced defect not found within its budget.

mod clients;
mod clock;
mod invariants;
mod net;
mod run;
mod shrink;
#[path = "../sim_support/mod.rs"]
mod sim_support;
mod sink;
mod tls;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use smtpgw::conn::reintroduced;

use run::{execute, plan, Counts};
use sim_support::{os_seed, Env, Parts, Seeds};

/// How long shrinking a failure may take.
const SHRINK_TIME: Duration = Duration::from_secs(60);
/// How long shrinking what a defect hunt found may take (it runs in every CI run).
const HUNT_SHRINK_TIME: Duration = Duration::from_secs(5);
/// How long each reintroduced defect may take to be found.
const DEFECT_BUDGET: Duration = Duration::from_secs(60);

/// Runs `seed`; on a violation prints it, shrinks it and prints the shortest trace.
/// `shrink`: how long to shrink a failure, if at all.
fn run_seed(seed: u64, counts: &mut Counts, shrink: Option<Duration>) -> Result<u64, String> {
    let steps = plan(seed);
    let result = execute(seed, &steps);
    counts.add(&result.counts);
    let Some((at, v)) = result.violation else {
        return Ok(result.trace);
    };
    let Some(shrink_time) = shrink else {
        return Err(v.to_string());
    };
    println!(
        "sim seed={seed}: VIOLATION after step {at} of {}: {v}",
        steps.len()
    );
    let cut: Vec<_> = steps[..(at + 1).min(steps.len())].to_vec();
    let (short, v, runs) = shrink::shrink(seed, cut, v, Instant::now() + shrink_time);
    println!(
        "shortest trace found ({} steps, {runs} runs to shrink; the whole run replays with SMTPGW_SIM_SEED={seed}):",
        short.len()
    );
    for (i, s) in short.iter().enumerate() {
        println!("  {i:4}  {s}");
    }
    println!("  then: well-behaved clients, a prompt sink, drain and stop");
    println!("  => {v}");
    Err(v.to_string())
}

fn report(title: &str, seeds: u64, c: &Counts, wall: Duration) {
    println!(
        "{title}: {seeds} seeds, {} sessions, {} messages to the sink, {} acknowledged with 250, {:.1} h of simulated time in {:.1} s",
        c.sessions,
        c.messages,
        c.acked,
        c.sim_time.as_secs_f64() / 3600.0,
        wall.as_secs_f64()
    );
    println!(
        "{title}: {} runs driven as the epoll backend drives the reactor core, {} as the io_uring one",
        c.epoll_runs, c.uring_runs
    );
    println!(
        "{title}: TLS begun {} times, {} messages acknowledged over TLS, {} of them authenticated",
        c.tls_begun, c.tls_acked, c.auth_acked
    );
    let faults: Vec<String> = c.faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{title}: faults injected: {}", faults.join(" "));
}

/// Two runs of one seed give one trace.
fn determinism(seed: u64) -> Result<(), String> {
    let mut c = Counts::default();
    let a = run_seed(seed, &mut c, None);
    let b = run_seed(seed, &mut c, None);
    match (a, b) {
        (Ok(x), Ok(y)) if x == y => {
            println!("sim determinism: seed={seed} twice, trace={x:016x} both times");
            Ok(())
        }
        (Ok(x), Ok(y)) => Err(format!(
            "seed {seed} replayed differently: trace {x:016x} then {y:016x}"
        )),
        (a, b) => Err(format!(
            "seed {seed} failed while checking determinism: {a:?} / {b:?}"
        )),
    }
}

/// Fresh seeds with `switch` on until one breaks an invariant of `kind`.
fn hunt(name: &str, switch: &AtomicBool, kind: &str) -> Result<(), String> {
    switch.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut fresh = Seeds::from_os();
    let mut seeds = 0;
    let mut found = None;
    while started.elapsed() < DEFECT_BUDGET {
        let seed = fresh.next();
        seeds += 1;
        let mut c = Counts::default();
        if let Err(v) = run_seed(seed, &mut c, None) {
            found = Some((seed, v, started.elapsed()));
            break;
        }
    }
    let result = match found {
        Some((seed, v, took)) if v.starts_with(kind) => {
            println!(
                "sim finds reintroduced defect {name}: seed={seed} after {seeds} seeds, {:.2} s: {v}",
                took.as_secs_f64()
            );
            // What a failure looks like: the seed and its shortest trace.
            let _ = run_seed(seed, &mut Counts::default(), Some(HUNT_SHRINK_TIME));
            Ok(())
        }
        Some((seed, v, _)) => Err(format!(
            "defect {name}: seed {seed} broke another invariant: {v}"
        )),
        None => Err(format!(
            "defect {name} not found in {seeds} seeds ({} s)",
            DEFECT_BUDGET.as_secs()
        )),
    };
    switch.store(false, Ordering::Relaxed);
    result
}

fn main() -> ExitCode {
    let started = Instant::now();
    let parts = Parts::from_args();
    // Replaying a seed a defect hunt reported: the same switch on.
    let switches = [
        ("output", &reintroduced::IGNORE_OUTPUT_CAP),
        ("budget", &reintroduced::NO_RESUME_ON_BUDGET),
        ("starttls", &reintroduced::KEEP_PIPELINED_AFTER_STARTTLS),
        ("handshake", &reintroduced::NO_HANDSHAKE_DEADLINE),
    ];
    let mut env = Env::read_or_exit(10, &switches);
    if let Some(seed) = env.seed {
        let mut c = Counts::default();
        let r = run_seed(seed, &mut c, Some(SHRINK_TIME));
        report("sim replay", 1, &c, started.elapsed());
        return match r {
            Ok(trace) => {
                println!("sim seed={seed}: ok, trace={trace:016x}");
                ExitCode::SUCCESS
            }
            Err(_) => ExitCode::FAILURE,
        };
    }
    let mut failures = Vec::new();
    if parts.wants("determinism") {
        if let Err(e) = determinism(1).and_then(|()| determinism(os_seed())) {
            failures.push(e);
        }
    }
    let defects: [(&str, &AtomicBool, &str); 4] = [
        (
            "never-reading client's unbounded output",
            &reintroduced::IGNORE_OUTPUT_CAP,
            "output bound",
        ),
        (
            "body paused on the budget never resumed",
            &reintroduced::NO_RESUME_ON_BUDGET,
            "stall",
        ),
        (
            "commands pipelined behind STARTTLS run over TLS (CVE-2011-0411)",
            &reintroduced::KEEP_PIPELINED_AFTER_STARTTLS,
            "reply order",
        ),
        (
            "a stalled handshake held until the idle timeout",
            &reintroduced::NO_HANDSHAKE_DEADLINE,
            "handshake deadline",
        ),
    ];
    for (name, switch, kind) in defects.into_iter().filter(|_| parts.wants("defects")) {
        if let Err(e) = hunt(name, switch, kind) {
            failures.push(e);
        }
    }
    if parts.wants("seeds") && !env.budget.is_zero() {
        let budget_start = Instant::now();
        let mut counts = Counts::default();
        let mut seeds = 0;
        while budget_start.elapsed() < env.budget {
            let seed = env.seeds.next();
            println!("sim seed={seed}");
            seeds += 1;
            if run_seed(seed, &mut counts, Some(SHRINK_TIME)).is_err() {
                failures.push(format!("seed {seed} broke an invariant (above)"));
                break;
            }
        }
        report("sim", seeds, &counts, budget_start.elapsed());
    }
    println!(
        "sim: wall time in all {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            println!("sim FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}
