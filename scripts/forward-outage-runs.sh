#!/usr/bin/env bash
# Runs the store-and-forward outage test (tests/kafka_forward.rs,
# a_ten_second_outage_under_load_gets_no_451_and_loses_nothing) N times in a row and
# reports, per run, whether it passed and how long the forwarder took to drain a 10 s
# outage's backlog while the load went on. Not part of CI: it takes about a minute a run.
#
#   scripts/forward-outage-runs.sh [N=20]     (SMTPGW_TEST_IO_BACKENDS picks the backend)
#
# Needs tansu (scripts/kafka-broker.sh installs it into .venv-kafka). Each run's full
# output is kept in $OUT (default: a new temporary directory).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N=${1:-20}
OUT=${OUT:-$(mktemp -d /tmp/forward-outage.XXXXXX)}
TEST=a_ten_second_outage_under_load_gets_no_451_and_loses_nothing
backend=${SMTPGW_TEST_IO_BACKENDS:-epoll}
cargo test --release --test kafka_forward --no-run 2>/dev/null
pass=0
echo "backend=$backend runs=$N logs=$OUT ($(date -u +%FT%TZ))"
for i in $(seq 1 "$N"); do
    log="$OUT/run-$i.log"
    if SMTPGW_TEST_IO_BACKENDS=$backend cargo test --release --test kafka_forward "$TEST" \
        -- --exact --nocapture >"$log" 2>&1; then
        verdict=pass
        pass=$((pass + 1))
    else
        verdict=FAIL
    fi
    # The test's own summary line: spooled during the outage, drain time, forwarded.
    line=$(grep -m1 '^outage ' "$log" || true)
    spooled=$(sed -nE 's/.*: ([0-9]+) x 250 during it.*/\1/p' <<<"$line")
    drain=$(sed -nE 's/.*backlog drained ([^ ]+) after the broker.*/\1/p' <<<"$line")
    total=$(sed -nE 's/.*, ([0-9]+) x 250 in all.*/\1/p' <<<"$line")
    dups=$(grep -m1 'records in the topic for' "$log" | sed -nE 's/.*\(([0-9]+) duplicates\).*/\1/p' || true)
    printf 'run %2d: %s  spooled during outage %s  drained in %s under load  250s in all %s  duplicates %s\n' \
        "$i" "$verdict" "${spooled:-?}" "${drain:-?}" "${total:-?}" "${dups:-?}"
done
echo "$pass of $N passed"
[ "$pass" -eq "$N" ]
