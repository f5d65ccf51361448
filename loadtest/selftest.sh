#!/usr/bin/env bash
# loadtest/selftest.sh: checks that smtpgw-loadtest counts right.
#
# Starts smtpgw with the spool sink on loopback, drives it with the load client in
# several modes (lock-step, pipelining, BDAT, a size mix, several recipients, and a run
# whose recipients are all refused), stops the gateway, and requires that the number of
# messages the client reports as accepted (final 250) equals the number of records
# `smtpgw spool ls` finds, and that the refused run stored nothing and counted every
# refusal. About 10 s once built. Exit 0 and "selftest: 1 passed, 0 failed" on success.
#
# Usage: loadtest/selftest.sh [--no-build] [--gateway-bin PATH]
#   --no-build          use target/release/{smtpgw,smtpgw-loadtest} as they are
#   --gateway-bin PATH  check against this smtpgw binary (only the load client is built)
#   -h, --help          this text (builds nothing)
# Needs no root: everything runs as the caller on 127.0.0.1 with ephemeral ports and a
# temporary spool. Building (unless --no-build) takes minutes on a cold target/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUILD=1
GW_BIN="$ROOT/target/release/smtpgw"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --gateway-bin) GW_BIN="$(realpath -m "${2:?--gateway-bin needs a path}")"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "selftest.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
LT_BIN="$ROOT/target/release/smtpgw-loadtest"
if [[ $BUILD -eq 1 ]]; then
    if [[ "$GW_BIN" == "$ROOT/target/release/smtpgw" ]]; then
        timeout 1200 cargo build --release --workspace --bins -q
    else
        timeout 1200 cargo build --release -p smtpgw-loadtest -q
    fi
fi
[[ -x "$GW_BIN" ]] || { echo "selftest.sh: no gateway binary at $GW_BIN" >&2; exit 2; }

WORK="$(mktemp -d /tmp/smtpgw-selftest.XXXXXX)"
GW_PID=""
cleanup() {
    if [[ -n "$GW_PID" ]]; then
        kill "$GW_PID" 2>/dev/null || true
        wait "$GW_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    echo "selftest: FAIL: $*" >&2
    echo "selftest: 0 passed, 1 failed"
    exit 1
}

# --error-budget 0: the refused run sends 40 refused commands per connection on purpose
# (it checks the client's refusal counts); the edge's default budget of 20 would cut
# those sessions short with 421, which is the gateway working, not the client failing.
NO_COLOR=1 "$GW_BIN" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --sink spool --spool-dir "$WORK/spool" \
    --accept-domain example.com --error-budget 0 2>"$WORK/gateway.log" &
GW_PID=$!
ADDR=""
for _ in $(seq 100); do
    ADDR=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/gateway.log" | grep -oP 'listening addr=\K\S+' | head -1 || true)
    [[ -n "$ADDR" ]] && break
    kill -0 "$GW_PID" 2>/dev/null || { cat "$WORK/gateway.log" >&2; fail "smtpgw exited at start"; }
    sleep 0.1
done
[[ -n "$ADDR" ]] || fail "smtpgw never logged 'listening addr='"

accepted_total=0
run() { # label expect(accept|refuse) loadtest-args...
    local label=$1 expect=$2
    shift 2
    local json="$WORK/$label.json"
    timeout 60 "$LT_BIN" --target "$ADDR" --timeout 20 --json "$json" "$@" >"$WORK/$label.out" 2>&1 \
        || { cat "$WORK/$label.out" >&2; fail "$label: loadtest failed"; }
    local fields
    fields=$(python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
print(d["accepted"], d["rejected"], d["protocol_errors"], d["timeouts"], d["connect_errors"], d["replies"].get("250", 0))' "$json")
    local accepted rejected proto timeouts connect r250
    read -r accepted rejected proto timeouts connect r250 <<<"$fields"
    [[ $proto -eq 0 && $timeouts -eq 0 && $connect -eq 0 ]] \
        || { cat "$WORK/$label.out" >&2; fail "$label: protocol $proto, timeouts $timeouts, connect $connect"; }
    if [[ $expect == accept ]]; then
        [[ $rejected -eq 0 && $accepted -gt 0 ]] || fail "$label: accepted $accepted, rejected $rejected"
    else
        [[ $accepted -eq 0 && $rejected -gt 0 ]] || fail "$label: accepted $accepted, rejected $rejected"
    fi
    echo "selftest: $label: accepted $accepted, rejected $rejected, 250 replies $r250"
    accepted_total=$((accepted_total + accepted))
}

run lockstep accept --connections 4 --messages-per-connection 50 --size 1k
run pipelining accept --connections 20 --messages-per-connection 50 --size 10k --pipelining
run chunking accept --connections 5 --messages-per-connection 40 --size 1k --pipelining --chunking --recipients 3
run mix accept --connections 8 --duration 2 --size 1k:70,10k:25,100k:4,1m:1 --pipelining
run open-loop accept --connections 10 --duration 2 --rate 500 --size 1k
run refused refuse --connections 2 --messages-per-connection 20 --size 1k --domain elsewhere.example --pipelining

# Stop the gateway (graceful drain) so the spool is complete and closed, then count.
kill -TERM "$GW_PID"
timeout 40 tail --pid="$GW_PID" -f /dev/null || fail "smtpgw did not exit after SIGTERM"
wait "$GW_PID" 2>/dev/null || true
GW_PID=""
stored=$("$GW_BIN" spool ls --spool-dir "$WORK/spool" | wc -l)
echo "selftest: loadtest accepted $accepted_total messages, spool holds $stored"
[[ $stored -eq $accepted_total ]] || fail "accepted $accepted_total != spool records $stored"
echo "selftest: 1 passed, 0 failed"
