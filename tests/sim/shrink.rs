//! Shrinking a failing run: delta debugging over its steps. A candidate with some steps
//! cut is run again from the same seed; it is kept if it still breaks the same
//! invariant. What is left is the shortest trace found within the time given, printed
//! step by step.

use std::time::Instant;

use crate::invariants::Violation;
use crate::run::{execute, Step};

/// The smallest subsequence of `steps` found that still breaks `kind`, and how it does.
pub fn shrink(
    seed: u64,
    mut steps: Vec<Step>,
    first: Violation,
    until: Instant,
) -> (Vec<Step>, Violation, usize) {
    let kind = first.kind;
    let mut found = first;
    let mut runs = 0;
    let fails = |cand: &[Step], runs: &mut usize| -> Option<(usize, Violation)> {
        *runs += 1;
        execute(seed, cand)
            .violation
            .filter(|(_, v)| v.kind == kind)
    };
    let mut n = 2;
    while steps.len() >= 2 && Instant::now() < until {
        let chunk = steps.len().div_ceil(n);
        let mut cut = None;
        for i in 0..n {
            let from = i * chunk;
            if from >= steps.len() {
                break;
            }
            let to = (from + chunk).min(steps.len());
            let cand: Vec<Step> = steps[..from].iter().chain(&steps[to..]).copied().collect();
            if let Some((at, v)) = fails(&cand, &mut runs) {
                cut = Some((cand, at, v));
                break;
            }
        }
        if let Some((cand, at, v)) = cut {
            // Steps after the one that broke the invariant never mattered.
            steps = cand;
            steps.truncate((at + 1).min(steps.len()));
            found = v;
            n = (n - 1).max(2);
            continue;
        }
        if n >= steps.len() {
            break;
        }
        n = (n * 2).min(steps.len());
    }
    (steps, found, runs)
}
