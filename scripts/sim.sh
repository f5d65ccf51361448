#!/usr/bin/env bash
# The deterministic simulation (issue 24): tests/sim drives the real reactor core, drivers
# and sessions through a simulated network, clock and sink; tests/sim_disk (when present)
# the spool writer and recovery through a simulated file system. Both take their seeds
# and budget from the environment: SMTPGW_SIM_SEED=N replays one seed,
# SMTPGW_SIM_SECONDS=S runs fresh seeds (each logged as `sim seed=N`) for S seconds.
#
#   scripts/sim.sh                  # the CI budget: 120 s of fresh seeds in all
#                                   # (SMTPGW_SIM_SECONDS, whole seconds), split between targets
#   scripts/sim.sh --seed N         # replay seed N of tests/sim
#   scripts/sim.sh --seed N --only sim_disk   # a seed of the other target
#   scripts/sim.sh --hours H        # fresh seeds for H hours per target (before a release)
#
# Fresh seeds only (each target's part `seeds`): the determinism checks and the defect
# hunts (each up to 60 s, stopping at its first find) are the targets' other parts, run
# by `cargo test` (scripts/test.sh: with SMTPGW_SIM_SECONDS=0, those alone), so that a
# CI run does each once. A seed means a different run in each target, so --seed
# replays in one: tests/sim unless --only.
#
# It builds with the flags of scripts/test.sh's `cargo test --release --workspace`, so
# after that run nothing is rebuilt.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    sed -n '8,18p' "$0" >&2
    exit 2
}

seed=""
hours=""
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --seed) [ $# -ge 2 ] || usage; seed=$2; shift 2 ;;
        --hours) [ $# -ge 2 ] || usage; hours=$2; shift 2 ;;
        --only) [ $# -ge 2 ] || usage; only=$2; shift 2 ;;
        *) usage ;;
    esac
done

targets=(sim)
if [ -d tests/sim_disk ]; then
    targets+=(sim_disk)
else
    echo "tests/sim_disk not present: only the network simulation runs"
fi
if [ -n "$only" ]; then
    targets=("$only")
fi

if [ -n "$seed" ]; then
    t=${only:-sim}
    echo "==== $t: replaying seed $seed"
    SMTPGW_SIM_SEED=$seed cargo test --release --workspace --test "$t"
    exit 0
fi

seconds=${SMTPGW_SIM_SECONDS:-120}
case "$seconds" in
    '' | *[!0-9]*)
        echo "SMTPGW_SIM_SECONDS must be a whole number of seconds, not '$seconds'" >&2
        exit 2
        ;;
esac

if [ -n "$hours" ]; then
    per=$(awk -v h="$hours" 'BEGIN { printf "%d", h * 3600 }')
else
    per=$(( seconds / ${#targets[@]} ))
fi
for t in "${targets[@]}"; do
    echo "==== $t: fresh seeds for $per s"
    SMTPGW_SIM_SECONDS=$per cargo test --release --workspace --test "$t" -- seeds
done
