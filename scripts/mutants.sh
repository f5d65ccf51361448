#!/usr/bin/env bash
# Mutation testing of the protocol core with cargo-mutants: every mutant of the named
# files must be caught by the library's unit and property tests (`cargo test --lib`).
# Not in CI: about an hour on 2 cores for src/smtp/.
#
#   scripts/mutants.sh                          # src/smtp/ (+ src/conn/, spool recovery)
#   scripts/mutants.sh src/smtp/data.rs ...     # just these files
#
# It mutates the work tree in place (cargo-mutants puts each file back after its
# mutant), so the warm release build in target/ is reused: in a copy of the tree
# (even with --copy-target) cargo rebuilds every dependency, librdkafka included.
# One mutant at a time; per mutant only the library's test target is rebuilt (--lib),
# incrementally and at opt-level 0 for smtpgw alone (its dependencies stay the warm
# release build): about 8 s a mutant instead of about a minute. Refuses to start with
# uncommitted changes under src/; do not build in this tree meanwhile. Extra
# cargo-mutants options go after the files' `--`, e.g. `scripts/mutants.sh -- --iterate`.
# Results go to mutants.out/ (caught.txt, missed.txt, unviable.txt, timeout.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo-mutants >/dev/null 2>&1; then
    nice cargo install --locked cargo-mutants
fi

files=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    files+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift
if [ "${#files[@]}" -eq 0 ]; then
    files=(src/smtp/*.rs)
    # The connection driver and the spool's recovery, where they exist.
    for more in src/conn/*.rs src/sink/spool/recovery.rs; do
        [ -e "$more" ] && files+=("$more")
    done
fi
if ! git diff --quiet -- src proptest-regressions; then
    echo "mutants.sh: uncommitted changes under src/ or proptest-regressions/; commit or stash them first" >&2
    exit 1
fi
# A mutant that fails a proptest makes proptest record the failing case; those are the
# mutant's, not the code's.
trap 'git checkout --quiet -- proptest-regressions' EXIT
file_args=()
for f in "${files[@]}"; do
    case "$f" in
    *_tests.rs | */tests.rs) ;; # test code: nothing to mutate
    *) file_args+=(--file "$f") ;;
    esac
done

# A mutant that makes a test loop forever is a "timeout" (caught, differently): the
# limit is a multiple of the unmutated test time.
CARGO_INCREMENTAL=1 nice -n 5 cargo mutants --in-place --package smtpgw \
    --profile release --cargo-arg=--lib \
    --cargo-arg=--config=profile.release.package.smtpgw.opt-level=0 \
    --timeout-multiplier 3 "${file_args[@]}" "$@"
