#!/usr/bin/env bash
# loadtest/limit_cost.sh: what the per-address limits cost per message, in instructions.
#
# Usage: loadtest/limit_cost.sh [--connections N] [--messages N] [--gateway-bin PATH] [--no-build]
#
# Wall-clock throughput on a shared 2-core machine varies by 10% from run to run, so a
# 2% cost cannot be seen in msgs/s. Instruction counts can: valgrind's callgrind counts
# every instruction the gateway executes, the same for the same work whatever else the
# machine does. The script runs the gateway (epoll backend: valgrind does not know
# io_uring's syscalls; null sink, so the limiter's share is the largest it can be) under
# callgrind twice with the same load, 1 KiB messages pipelined over 100 connections
# (default) from the load client:
#   limits on:  --trusted-cidr 192.0.2.0/24 (loopback is no longer exempt), every limit
#               enabled with a ceiling the load never reaches (per IP, per prefix,
#               connection rate, message rate), so every check runs and none refuses;
#   limits off: the default, loopback trusted, the exempt path.
# Counting starts once the gateway listens. It prints, for each, the instructions per
# accepted message, and for "limits on" the inclusive instructions of the limiter's own
# functions (admit, the per-message checks, the slot's release) as a share of all the
# gateway executed. The share is exact (the same work counts the same); the on/off
# ratio of totals also moves with how the client's writes happened to batch into reads.
# Root is not needed. Everything listens on 127.0.0.1 only, every step is bounded by
# `timeout`, and the exit trap stops the processes this script started, by PID.
# -h, --help prints this and builds nothing.
set -euo pipefail

CONNS=100
MSGS=100
GATEWAY_BIN=""
BUILD=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --connections) CONNS="${2:?}"; shift ;;
        --messages) MSGS="${2:?}"; shift ;;
        --gateway-bin) GATEWAY_BIN="$(realpath -m "${2:?}")"; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "limit_cost.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[[ "$CONNS" =~ ^[1-9][0-9]*$ && "$MSGS" =~ ^[1-9][0-9]*$ ]] ||
    { echo "limit_cost.sh: --connections and --messages take positive counts" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "limit_cost.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [[ $BUILD -eq 1 ]]; then
    timeout 1800 cargo build --release --workspace --bins -q
fi
GW_BIN="${GATEWAY_BIN:-$ROOT/target/release/smtpgw}"
LT_BIN="$ROOT/target/release/smtpgw-loadtest"
WORK="$(mktemp -d /tmp/smtpgw-limit-cost.XXXXXX)"
GW_PID=""
cleanup() {
    [[ -n "$GW_PID" ]] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null
    [[ -n "${KEEP_WORK:-}" ]] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# One run under callgrind; prints "total_ir accepted limiter_ir".
measure() { # label [gateway flags...]
    local label=$1 addr="" i out="$WORK/callgrind.$1" log="$WORK/gw.$1.log"
    shift
    # Instrumentation starts once the gateway listens (callgrind_control -i on), so
    # start-up is not in the totals; what is counted is serving the load, and shutdown.
    # Not under `timeout`: callgrind_control needs valgrind's own PID. The load client's
    # timeout and the bounded wait below bound the run instead.
    NO_COLOR=1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$GW_BIN" --io-backend epoll --reactors 1 --sink null --listen 127.0.0.1:0 \
        --metrics-listen 127.0.0.1:0 --accept-domain example.com "$@" 2>"$log" &
    GW_PID=$!
    for i in $(seq 600); do
        addr=$(grep -oP 'listening addr=\K\S+' "$log" | head -1 || true)
        [[ -n "$addr" ]] && break
        kill -0 "$GW_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$addr" ]] || { cat "$log" >&2; echo "limit_cost.sh: the gateway did not start" >&2; exit 1; }
    addr=${addr//\"/}
    timeout 60 callgrind_control -i on "$GW_PID" >/dev/null ||
        { echo "limit_cost.sh: callgrind_control could not start counting" >&2; exit 1; }
    timeout 600 "$LT_BIN" --target "$addr" --connections "$CONNS" --messages-per-connection "$MSGS" \
        --size 1k --pipelining --timeout 120 --json "$WORK/client.$label.json" >"$WORK/client.$label.out" 2>&1 ||
        { cat "$WORK/client.$label.out" >&2; exit 1; }
    kill -TERM "$GW_PID"
    for i in $(seq 1200); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" || true
    GW_PID=""
    python3 - "$out" "$WORK/client.$label.json" <<'PY'
import json, re, subprocess, sys
out, client = sys.argv[1], sys.argv[2]
accepted = json.load(open(client))["accepted"]
ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--show-percs=no", out],
                     capture_output=True, text=True, check=True).stdout
total = None
found = {}
# The limiter's entry points, each inclusive of what it calls and counted once (the
# line naming the function in src/limits.rs; inlined pieces have lines of their own):
# admission, the two per-message checks and the release of a connection's slot.
entry = re.compile(r"src/limits\.rs:(<smtpgw::limits::PeerLimiter as [\w:]+>::admit"
                   r"|<smtpgw::limits::Slot as [\w:]+>::message_(allowed|sent)"
                   r"|core::ptr::drop_in_place<smtpgw::limits::Slot>)")
for line in ann.splitlines():
    m = re.match(r"\s*([\d,]+)\s+(.*)$", line)
    if not m:
        continue
    ir, what = int(m.group(1).replace(",", "")), m.group(2)
    if "PROGRAM TOTALS" in what:
        total = ir
    elif m := entry.search(what):
        # The same function can be listed under its absolute and its relative source
        # path (inlined parts); the largest figure is the whole function.
        found[m.group(1)] = max(found.get(m.group(1), 0), ir)
limiter = sum(found.values())
print(total, accepted, limiter)
PY
}

echo "callgrind: $CONNS connections x $MSGS messages of 1 KiB, pipelined, null sink, epoll, 1 reactor" >&2
read -r on_total on_accepted on_limiter < <(measure on --trusted-cidr 192.0.2.0/24 \
    --max-connections-per-ip 100000 --max-connections-per-prefix 100000 \
    --max-connection-rate-per-ip 1000000 --max-message-rate-per-ip 100000000)
read -r off_total off_accepted _ < <(measure off)
python3 - "$on_total" "$on_accepted" "$on_limiter" "$off_total" "$off_accepted" <<'PY'
import sys
on_total, on_acc, on_lim, off_total, off_acc = map(int, sys.argv[1:])
per_on, per_off = on_total / on_acc, off_total / off_acc
print(f"date: {__import__('datetime').datetime.utcnow():%Y-%m-%d}")
print(f"limits on:  {on_acc} messages accepted, {per_on:,.0f} instructions per message (whole run)")
print(f"limits off: {off_acc} messages accepted, {per_off:,.0f} instructions per message (whole run)")
print(f"on/off: {(per_on / per_off - 1) * 100:+.2f}% instructions per message (includes how reads"
      f" happened to batch, which varies by a few % from run to run)")
print(f"the limiter's own functions: {on_lim / on_acc:,.1f} instructions per message,"
      f" {on_lim / on_total * 100:.3f}% of the gateway's instructions while serving")
PY
