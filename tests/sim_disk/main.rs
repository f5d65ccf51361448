//! Deterministic simulation of the spool under a failing disk: the real writer
//! (batching, one write and one `fdatasync` per batch, commit marks, rotation, the size
//! and free-space limits, failure episodes) on a simulated file system and clock, and
//! the real recovery and reader after every simulated crash, all driven by one seeded
//! RNG (issue 24, the spool's part).
//!
//! - `SMTPGW_SIM_SEED=N`: replay one seed (and shrink it if it fails); with
//!   `SMTPGW_SIM_DEFECT=truncate-at-corruption` or `ignore-commit-marks`, with that
//!   reintroduced defect on, as a hunt found it.
//! - `SMTPGW_SIM_SECONDS=S` (default 60): fresh seeds from the OS for S seconds
//!   (`SMTPGW_SIM_BASE_SEED=B`: drawn from B instead, a repeatable set); 0 runs none.
//!   The environment is read as `tests/sim` reads it (`tests/sim_support`).
//! - Arguments select parts: `determinism`, `defects`, `seeds` (default: all).
//!
//! A violated invariant prints the seed and the shortest step list found that still
//! violates it, and the run fails.

mod disk;
mod sim;
#[path = "../sim_support/mod.rs"]
mod sim_support;
#[path = "../spool_support/mod.rs"]
mod spool_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use smtpgw::sink::spool::defects;

use sim::{generate, run, Config, Step, Violation};
use sim_support::{Env, Parts, Seeds};

/// What kind of violation `what` describes: its fixed words, without the ids, offsets,
/// counts and dumped values a message's template fills in.
fn kind(what: &str) -> Vec<&str> {
    what.split_whitespace()
        .map(|w| w.trim_end_matches([',', ':', ';', '.']))
        .filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        .collect()
}

/// Cuts steps while the run still fails the same way (the same kind of violation, as
/// `tests/sim` does): halves, then smaller chunks, down to single steps, within `budget`.
fn shrink(config: &Config, steps: &[Step], budget: Duration) -> (Vec<Step>, Violation) {
    let started = Instant::now();
    let mut best = steps.to_vec();
    let mut violation = run(config, &best).expect_err("shrink starts from a failing run");
    let first = violation.what.clone();
    let wanted = kind(&first);
    let mut chunk = best.len() / 2;
    while chunk >= 1 && started.elapsed() < budget {
        let mut i = 0;
        let mut cut_any = false;
        while i < best.len() && started.elapsed() < budget {
            let end = (i + chunk).min(best.len());
            let mut candidate = best[..i].to_vec();
            candidate.extend_from_slice(&best[end..]);
            match run(config, &candidate) {
                Err(v) if kind(&v.what) == wanted => {
                    best = candidate;
                    violation = v;
                    cut_any = true;
                }
                // Passing, or failing another way: that cut is not this bug's.
                Ok(_) | Err(_) => i += chunk,
            }
        }
        if !cut_any {
            chunk /= 2;
        }
    }
    (best, violation)
}

fn report(seed: u64, config: &Config, steps: &[Step], shrink_budget: Duration) {
    let (short, violation) = shrink(config, steps, shrink_budget);
    eprintln!(
        "sim_disk VIOLATION seed={seed}: {} (step {} of {}; shrunk to {} steps)",
        violation.what,
        violation.step,
        steps.len(),
        short.len()
    );
    eprintln!("  config: {config:?}");
    for (i, step) in short.iter().enumerate() {
        eprintln!("  {i:4} {step:?}");
    }
    eprintln!("  replay: SMTPGW_SIM_SEED={seed} cargo test --release --test sim_disk -- seeds");
}

#[derive(Default)]
struct Totals {
    seeds: u64,
    generations: u64,
    acked: u64,
    recovered: u64,
    resurrected: u64,
    phantoms: u64,
    steps: u64,
    faults: BTreeMap<&'static str, u64>,
}

/// Runs `seeds` (or fresh ones until `budget` is spent); the first violation, with
/// its seed, if any.
fn explore(
    fixed: Option<u64>,
    seeds: &mut Seeds,
    budget: Duration,
    totals: &mut Totals,
    log: bool,
) -> Option<(u64, Config, Vec<Step>, Violation)> {
    let started = Instant::now();
    loop {
        let seed = fixed.unwrap_or_else(|| seeds.next());
        if log {
            println!("sim_disk seed={seed}");
        }
        let (config, steps) = generate(seed);
        totals.seeds += 1;
        totals.steps += steps.len() as u64;
        match run(&config, &steps) {
            Ok(summary) => {
                totals.generations += summary.generations;
                totals.acked += summary.acked;
                totals.recovered += summary.recovered_records;
                totals.resurrected += summary.resurrected;
                totals.phantoms += summary.phantoms;
                for (kind, n) in summary.faults {
                    *totals.faults.entry(kind).or_default() += n;
                }
            }
            Err(violation) => return Some((seed, config, steps, violation)),
        }
        if fixed.is_some() || started.elapsed() >= budget {
            return None;
        }
    }
}

fn determinism(seeds: &mut Seeds) -> bool {
    let mut ok = true;
    for _ in 0..3 {
        let seed = seeds.next();
        let (config, steps) = generate(seed);
        let a = run(&config, &steps)
            .map(|s| s.trace_hash)
            .map_err(|v| v.what);
        let b = run(&config, &steps)
            .map(|s| s.trace_hash)
            .map_err(|v| v.what);
        println!("sim_disk determinism seed={seed}: {a:x?} {b:x?}");
        if a != b {
            eprintln!("sim_disk: seed {seed} gave two different traces");
            ok = false;
        }
    }
    ok
}

/// Turns one reintroduced defect on and runs fresh seeds until the simulator reports
/// the violation it causes (`expect` is in its text); fails if it does not within
/// `budget`.
fn hunt(
    name: &str,
    switch: &AtomicBool,
    expect: &str,
    seeds: &mut Seeds,
    budget: Duration,
) -> bool {
    switch.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut totals = Totals::default();
    let mut found = None;
    let mut other = 0u64;
    while found.is_none() && started.elapsed() < budget {
        if let Some((seed, _, _, violation)) =
            explore(None, seeds, Duration::ZERO, &mut totals, false)
        {
            if violation.what.contains(expect) {
                found = Some((seed, violation));
            } else {
                other += 1;
            }
        }
    }
    switch.store(false, Ordering::Relaxed);
    let Some((seed, violation)) = found else {
        eprintln!(
            "sim_disk defect {name}: NOT found in {} seeds ({:.0}s; {other} other violations)",
            totals.seeds,
            budget.as_secs_f64()
        );
        return false;
    };
    println!(
        "sim_disk defect {name}: found by seed={seed} after {} seeds in {:.2}s \
         ({other} seeds before it broke another invariant; replay: SMTPGW_SIM_DEFECT={name} \
         SMTPGW_SIM_SEED={seed}): {}",
        totals.seeds,
        started.elapsed().as_secs_f64(),
        violation.what
    );
    // The same seed passes with the defect off: it found the defect, not something else.
    let (config, steps) = generate(seed);
    match run(&config, &steps) {
        Ok(_) => true,
        Err(v) => {
            eprintln!(
                "sim_disk defect {name}: seed {seed} also fails without it: {}",
                v.what
            );
            false
        }
    }
}

fn main() {
    let parts = Parts::from_args();
    let switches = [
        ("truncate-at-corruption", &defects::TRUNCATE_AT_CORRUPTION),
        ("ignore-commit-marks", &defects::IGNORE_COMMIT_MARKS),
    ];
    let mut env = Env::read_or_exit(60, &switches);
    let fixed = env.seed;
    // With a defect on, only the seeds run: the hunts turn the switches off.
    let alone = fixed.is_none() && env.defect.is_none();
    let mut failed = false;

    if parts.wants("determinism") && alone && !determinism(&mut env.seeds) {
        failed = true;
    }
    if parts.wants("defects") && alone {
        // Each hunt stops at its first find (a few seconds at most so far).
        let budget = Duration::from_secs(60);
        failed |= !hunt(
            "truncate-at-corruption",
            &defects::TRUNCATE_AT_CORRUPTION,
            "is gone after recovery",
            &mut env.seeds,
            budget,
        );
        failed |= !hunt(
            "ignore-commit-marks",
            &defects::IGNORE_COMMIT_MARKS,
            "dropped without a corruption report",
            &mut env.seeds,
            budget,
        );
    }
    if parts.wants("seeds") && (fixed.is_some() || !env.budget.is_zero()) {
        let started = Instant::now();
        let mut totals = Totals::default();
        if let Some((seed, config, steps, _)) =
            explore(fixed, &mut env.seeds, env.budget, &mut totals, true)
        {
            report(seed, &config, &steps, Duration::from_secs(60));
            failed = true;
        }
        println!(
            "sim_disk: {} seeds, {} steps, {} writer generations (crashes and restarts), \
             {} messages acknowledged, {} records read back after recovery, {} 451s a crash \
             made durable, {} embedded records read out of damaged ones, faults injected {:?}, {:.1}s",
            totals.seeds,
            totals.steps,
            totals.generations,
            totals.acked,
            totals.recovered,
            totals.resurrected,
            totals.phantoms,
            totals.faults,
            started.elapsed().as_secs_f64()
        );
    }
    if failed {
        std::process::exit(1);
    }
}
