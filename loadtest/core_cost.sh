#!/usr/bin/env bash
# loadtest/core_cost.sh: what the gateway's core costs per message, in instructions and
# in syscalls, on each I/O backend; counts, not timings, so a shared machine does not
# blur them.
#
# Usage: loadtest/core_cost.sh [--backend epoll|uring|both] [--reactors N] [--messages N]
#                              [--gateway-bin PATH] [--no-build] [--no-callgrind]
#
# Two cells, each against a fresh gateway (null sink, --reactors 1 by default, logs at
# their default level):
#   lock-step: Postfix's smtp-source, 10 persistent sessions (-d -s 10), N messages of
#              1 KiB (default 2000): MAIL, RCPT, DATA and the body each wait for their
#              reply, so a message is 4 round trips;
#   pipelined: smtpgw-loadtest, 100 connections x N/100 messages of 1 KiB, pipelined.
# For each cell and backend it prints
#   syscalls per message: `perf stat` of the syscall tracepoints of every gateway thread
#              while the client runs (all syscalls, and io_uring_enter, write,
#              epoll_wait and read/recv/send families by name);
#   instructions per message (epoll only: valgrind 3.19 does not run the io_uring
#              backend's waits): the same cell under valgrind's callgrind, counting
#              from the moment the gateway listens until it has stopped (all threads).
# Valgrind slows the gateway some 50x, which changes how requests batch in the
# pipelined cell: compare instruction counts of one cell between builds, not between
# cells. Root (or perf_event_paranoid <= 1) is needed for the tracepoints. Everything
# listens on 127.0.0.1 only; each step is bounded by `timeout`, and the exit trap stops
# the processes this script started, by PID.
# -h, --help prints this and builds nothing.
set -euo pipefail

BACKENDS="both"
REACTORS=1
MSGS=2000
GATEWAY_BIN=""
BUILD=1
CALLGRIND=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --backend) BACKENDS="${2:?}"; shift ;;
        --reactors) REACTORS="${2:?}"; shift ;;
        --messages) MSGS="${2:?}"; shift ;;
        --gateway-bin) GATEWAY_BIN="$(realpath -m "${2:?}")"; shift ;;
        --no-build) BUILD=0 ;;
        --no-callgrind) CALLGRIND=0 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "core_cost.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[[ "$MSGS" =~ ^[1-9][0-9]*00$ ]] || { echo "core_cost.sh: --messages takes a multiple of 100" >&2; exit 2; }
[[ "$REACTORS" =~ ^[1-9][0-9]*$ ]] || { echo "core_cost.sh: --reactors takes a count" >&2; exit 2; }
case "$BACKENDS" in
    both) BACKENDS="epoll uring" ;;
    epoll|uring) ;;
    *) echo "core_cost.sh: --backend is epoll, uring or both" >&2; exit 2 ;;
esac
for tool in perf smtp-source; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] ||
        { echo "core_cost.sh: needs $tool" >&2; exit 2; }
done
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
[[ $CALLGRIND -eq 0 ]] || command -v valgrind >/dev/null ||
    { echo "core_cost.sh: needs valgrind (or --no-callgrind)" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [[ $BUILD -eq 1 ]]; then
    timeout 1800 cargo build --release --workspace --bins -q
fi
GW_BIN="${GATEWAY_BIN:-$ROOT/target/release/smtpgw}"
LT_BIN="$ROOT/target/release/smtpgw-loadtest"
WORK="$(mktemp -d /tmp/smtpgw-core-cost.XXXXXX)"
GW_PID=""
AUX_PID=""
cleanup() {
    [[ -n "$AUX_PID" ]] && kill "$AUX_PID" 2>/dev/null && wait "$AUX_PID" 2>/dev/null
    [[ -n "$GW_PID" ]] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null
    [[ -n "${KEEP_WORK:-}" ]] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts the gateway (optionally under a wrapper) and sets GW_PID and ADDR.
start_gateway() { # backend log [wrapper...]
    local backend=$1 log=$2 i
    shift 2
    NO_COLOR=1 "$@" "$GW_BIN" --io-backend "$backend" --reactors "$REACTORS" --sink null \
        --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --accept-domain example.com 2>"$log" &
    GW_PID=$!
    ADDR=""
    for i in $(seq 600); do
        ADDR=$(grep -oP 'listening addr=\K\S+' "$log" | head -1 || true)
        [[ -n "$ADDR" ]] && break
        kill -0 "$GW_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$ADDR" ]] || { cat "$log" >&2; echo "core_cost.sh: the gateway did not start" >&2; exit 1; }
    ADDR=${ADDR//\"/}
}

stop_gateway() {
    local i
    kill -TERM "$GW_PID"
    for i in $(seq 1200); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" || true
    GW_PID=""
}

# The load of one cell against ADDR; fails unless every message was accepted.
client() { # cell
    case "$1" in
        lock-step)
            timeout 600 "$SMTP_SOURCE" -d -s 10 -m "$MSGS" -l 1024 -M loadtest.example \
                -f sender@example.com -t user@example.com "$ADDR" >"$WORK/client.out" 2>&1 ||
                { cat "$WORK/client.out" >&2; exit 1; } ;;
        pipelined)
            timeout 600 "$LT_BIN" --target "$ADDR" --connections 100 \
                --messages-per-connection $((MSGS / 100)) --size 1k --pipelining --timeout 120 \
                --json "$WORK/client.json" >"$WORK/client.out" 2>&1 ||
                { cat "$WORK/client.out" >&2; exit 1; }
            python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["accepted"]; sys.exit(a != int(sys.argv[2]))' \
                "$WORK/client.json" "$MSGS" || { echo "core_cost.sh: not every message accepted" >&2; exit 1; } ;;
    esac
}

EVENTS=raw_syscalls:sys_enter
for s in io_uring_enter write read recvfrom sendto epoll_wait epoll_pwait futex; do
    EVENTS+=",syscalls:sys_enter_$s"
done

# Syscalls of every gateway thread while the client runs; prints "name=count ...".
syscalls() { # backend cell
    start_gateway "$1" "$WORK/gw.log"
    perf stat -x, -e "$EVENTS" -p "$GW_PID" -o "$WORK/perf.txt" &
    AUX_PID=$!
    sleep 0.5
    client "$2"
    kill -INT "$AUX_PID"
    wait "$AUX_PID" || true
    AUX_PID=""
    stop_gateway
    python3 - "$WORK/perf.txt" "$MSGS" <<'PY'
import sys
counts = {}
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        name = f[2].split(":")[-1].replace("sys_enter_", "")
        counts["all" if name == "sys_enter" else name] = int(float(f[0]))
msgs = int(sys.argv[2])
print(" ".join(f"{k}={v / msgs:.2f}" for k, v in counts.items() if v))
PY
}

# Instructions of the whole gateway from listening to exit, per message.
instructions() { # backend cell
    local out="$WORK/callgrind.out"
    start_gateway "$1" "$WORK/gw.log" valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$out"
    timeout 60 callgrind_control -i on "$GW_PID" >/dev/null ||
        { echo "core_cost.sh: callgrind_control could not start counting" >&2; exit 1; }
    client "$2"
    stop_gateway
    python3 - "$out" "$MSGS" <<'PY'
import sys
total = None
for line in open(sys.argv[1]):
    if line.startswith(("summary:", "totals:")):
        total = int(line.split()[1])
print(f"{total / int(sys.argv[2]):,.0f}")
PY
}

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); gateway $GW_BIN; --reactors $REACTORS; $MSGS messages of 1 KiB per cell"
for backend in $BACKENDS; do
    for cell in lock-step pipelined; do
        echo "$backend $cell: syscalls per message: $(syscalls "$backend" "$cell")"
        if [[ $CALLGRIND -eq 1 && $backend == epoll ]]; then
            echo "$backend $cell: instructions per message: $(instructions "$backend" "$cell")"
        fi
    done
done
