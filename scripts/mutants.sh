#!/usr/bin/env bash
# Mutation testing with cargo-mutants: every mutant of the named files must be caught
# by the tests that cover that file. Not in CI: hours on 2 cores for all of it.
#
#   scripts/mutants.sh                          # src/smtp/, src/conn/, the spool, host.rs
#   scripts/mutants.sh src/smtp/data.rs ...     # just these files
#   scripts/mutants.sh --list src/conn/mod.rs   # which test targets, and the mutants
#
# Which tests cover a file is the table in `targets_for` below: the library's unit and
# property tests (`--lib`) always, plus the integration targets that drive that code.
# `--lib` alone is not enough for the spool: it missed all 32 mutants of recovery.rs,
# whose tests are in tests/spool_recovery.rs and tests/spool_sink.rs. Files with the
# same targets go to one cargo-mutants run; each run's results go to
# mutants.out/<targets>/mutants.out/ (caught.txt, missed.txt, unviable.txt,
# timeout.txt, outcomes.json).
#
# It mutates the work tree in place (cargo-mutants puts each file back after its
# mutant), so the warm release build in target/ is reused: in a copy of the tree
# (even with --copy-target) cargo rebuilds every dependency, librdkafka included.
# One mutant at a time; per mutant only smtpgw's own targets are rebuilt (the library,
# the named test targets and the binary the integration tests spawn), incrementally
# and at opt-level 0 for smtpgw alone (its dependencies stay the warm release build):
# about 8 s a mutant with --lib only; with the spool's targets about 20 s a caught
# mutant and a minute a missed one (2026-12-07, README "Testing").
# Refuses to start with uncommitted changes under src/ or tests/; do not build in this
# tree meanwhile. Extra cargo-mutants options go after the files' `--`, e.g.
# `scripts/mutants.sh src/sink/spool/format.rs -- --iterate`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# An integration test target, if this tree has it (the simulator lands in steps).
test_targets=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "smtpgw":
        print("\n".join(t["name"] for t in p["targets"] if "test" in t["kind"]))')
has_test() {
    grep -qx "$1" <<<"$test_targets"
}

# The test targets that cover FILE, as cargo arguments on one line.
targets_for() {
    local t=(--lib)
    case "$1" in
    src/sink/spool/*)
        # Recovery, the reader and the writer through the sink and the spool tools,
        # the built binary's tools, a real full file system, and the simulated disk.
        t+=(--test spool_recovery --test spool_sink --test spool_disk --test spool_tool)
        has_test sim_disk && t+=(--test sim_disk)
        ;;
    src/conn/* | src/net/host.rs)
        # The driver and the reactor core: the whole-gateway simulator, where it exists.
        has_test sim && t+=(--test sim)
        ;;
    esac
    echo "${t[*]}"
}

# Unit tests that cannot reach FILE, skipped to save time (`--skip` is a substring
# of the test's path, e.g. `conn::` for `conn::edge_tests::...`): only the modules
# under sink:: and spool_tool:: open a spool.
skips_for() {
    case "$1" in
    src/sink/spool/*)
        local m
        for m in auth certs completion config conn files limits liveness logging metrics \
            net notify reload server smtp; do
            printf -- '--skip %s:: ' "$m"
        done
        ;;
    esac
}

list=
if [ "${1:-}" = "--list" ]; then
    list=1
    shift
fi
files=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    files+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
if [ "${#files[@]}" -eq 0 ]; then
    files=(src/smtp/*.rs src/conn/*.rs src/sink/spool/{recovery,format,reader,writer}.rs
        src/net/host.rs)
fi

if ! command -v cargo-mutants >/dev/null 2>&1; then
    nice cargo install --locked cargo-mutants
fi
if [ -z "$list" ] && ! git diff --quiet -- src tests proptest-regressions; then
    echo "mutants.sh: uncommitted changes under src/, tests/ or proptest-regressions/; commit or stash them first" >&2
    exit 1
fi
# A mutant that fails a proptest makes proptest record the failing case; those are the
# mutant's, not the code's.
[ -z "$list" ] && trap 'git checkout --quiet -- proptest-regressions tests/*.proptest-regressions || true' EXIT

# Group the files by their test targets, in the order given.
groups=()
declare -A group_files=() group_skips=()
for f in "${files[@]}"; do
    case "$f" in
    *_tests.rs | */tests.rs) continue ;; # test code: nothing to mutate
    esac
    targets=$(targets_for "$f")
    if [ -z "${group_files[$targets]+set}" ]; then
        groups+=("$targets")
        group_files[$targets]=
        group_skips[$targets]=$(skips_for "$f")
    fi
    group_files[$targets]+=" --file $f"
done

# A mutant that makes a test loop forever is a "timeout" (caught, differently): the
# limit is a multiple of the unmutated test time, unless given (`-- --baseline=skip
# --timeout 300` saves the baseline run when resuming).
timeout_args=(--timeout-multiplier 3)
for a in "$@"; do
    case "$a" in --timeout | --timeout=*) timeout_args=() ;; esac
done
# The simulator draws its fresh seeds from one base seed, so every mutant meets the same
# seeds (a mutant caught by luck would count as caught), for a budget per mutant.
export SMTPGW_SIM_BASE_SEED="${SMTPGW_SIM_BASE_SEED:-24}"
export SMTPGW_SIM_SECONDS="${SMTPGW_SIM_SECONDS:-10}"
status=0
for targets in "${groups[@]}"; do
    # shellcheck disable=SC2206,SC2086 # word splitting wanted: space-free paths and flags
    file_args=(${group_files[$targets]})
    cargo_args=()
    for a in $targets; do
        cargo_args+=("--cargo-arg=$a")
    done
    name=$(echo "$targets" | sed 's/--test //g; s/--//g; s/ /+/g')
    echo "== ${file_args[*]//--file /}: cargo test $targets -- ${group_skips[$targets]}" >&2
    if [ -n "$list" ]; then
        cargo mutants --list "${file_args[@]}" "$@"
        continue
    fi
    mkdir -p "mutants.out/$name"
    CARGO_INCREMENTAL=1 nice -n 19 cargo mutants --in-place --package smtpgw \
        --profile release "${cargo_args[@]}" \
        --cargo-arg=--config=profile.release.package.smtpgw.opt-level=0 \
        "${timeout_args[@]}" --output "mutants.out/$name" "${file_args[@]}" "$@" \
        -- ${group_skips[$targets]} ||
        status=$? # 2: missed mutants, 3: timeouts; go on with the next group
done
exit "$status"
