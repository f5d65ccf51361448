#!/usr/bin/env bash
# loadtest/log_cost.sh: what the transaction line costs per message, in instructions,
# per thread of the gateway.
#
# Usage: loadtest/log_cost.sh [--connections N] [--messages N] [--gateway-bin PATH]
#                             [--levels "warn info"] [--no-build]
#
# Timed figures on a shared 2-core machine move by a third from round to round; the
# instructions a thread executes do not. The script runs the gateway (epoll backend:
# valgrind does not know io_uring's syscalls; one reactor; null sink) under callgrind
# with --separate-threads=yes once per log level (default `warn`, where no transaction
# or connection-end line is written, then the default `info`), the gateway's stderr to a
# file as loadtest/run.sh has it. Each run gets a warm-up of 2,000 messages that is not
# counted (buffers, pools and the log writer's batches reach their steady size), then
# callgrind counts N connections x M messages of 1 KiB, pipelined (default 100 x 200,
# so 20,000 messages), from a one-thread load client. For each level it prints the
# instructions per accepted message of each thread (the reactor, the `smtpgw-log`
# writer, the rest together) and, for the reactor, the inclusive instructions per
# message of the logging functions it calls (the hand-over, the Message-ID look-up).
# Root is not needed. Everything listens on 127.0.0.1 only, every step is bounded by
# `timeout`, and the exit trap stops the processes this script started, by PID.
# -h, --help prints this and builds nothing.
set -euo pipefail

CONNS=100
MSGS=200
WARM_CONNS=100
WARM_MSGS=20
LEVELS="warn info"
GATEWAY_BIN=""
BUILD=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --connections) CONNS="${2:?}"; shift ;;
        --messages) MSGS="${2:?}"; shift ;;
        --levels) LEVELS="${2:?}"; shift ;;
        --gateway-bin) GATEWAY_BIN="$(realpath -m "${2:?}")"; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "log_cost.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[[ "$CONNS" =~ ^[1-9][0-9]*$ && "$MSGS" =~ ^[1-9][0-9]*$ ]] ||
    { echo "log_cost.sh: --connections and --messages take positive counts" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "log_cost.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [[ $BUILD -eq 1 ]]; then
    timeout 1800 cargo build --release --workspace --bins -q
fi
GW_BIN="${GATEWAY_BIN:-$ROOT/target/release/smtpgw}"
LT_BIN="$ROOT/target/release/smtpgw-loadtest"
WORK="$(mktemp -d /tmp/smtpgw-log-cost.XXXXXX)"
GW_PID=""
cleanup() {
    [[ -n "$GW_PID" ]] && kill "$GW_PID" 2>/dev/null && wait "$GW_PID" 2>/dev/null
    [[ -n "${KEEP_WORK:-}" ]] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

load() { # addr conns msgs json
    timeout 600 "$LT_BIN" --target "$1" --connections "$2" --messages-per-connection "$3" \
        --size 1k --pipelining --threads 1 --timeout 120 --json "$4" >"$4.out" 2>&1 ||
        { cat "$4.out" >&2; exit 1; }
}

# One run under callgrind at log level $1; prints its table rows.
measure() { # level
    local level=$1 addr="" i out="$WORK/callgrind.$1" log="$WORK/gw.$1.log"
    # Not under `timeout`: callgrind_control needs valgrind's own PID. The load client's
    # timeout and the bounded wait below bound the run instead.
    NO_COLOR=1 valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no \
        --callgrind-out-file="$out" \
        "$GW_BIN" --io-backend epoll --reactors 1 --sink null --listen 127.0.0.1:0 \
        --metrics-listen 127.0.0.1:0 --accept-domain example.com \
        --log-level "$level,smtpgw::net=info" 2>"$log" &
    GW_PID=$!
    for i in $(seq 600); do
        addr=$(grep -oP 'listening addr=\K\S+' "$log" | head -1 || true)
        [[ -n "$addr" ]] && break
        kill -0 "$GW_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$addr" ]] || { cat "$log" >&2; echo "log_cost.sh: the gateway did not start" >&2; exit 1; }
    addr=${addr//\"/}
    load "$addr" "$WARM_CONNS" "$WARM_MSGS" "$WORK/warm.$level.json"
    timeout 60 callgrind_control -i on "$GW_PID" >/dev/null ||
        { echo "log_cost.sh: callgrind_control could not start counting" >&2; exit 1; }
    load "$addr" "$CONNS" "$MSGS" "$WORK/client.$level.json"
    # The writer lingers before it formats a batch: its last lines are counted too.
    sleep 1
    timeout 60 callgrind_control -i off "$GW_PID" >/dev/null || true
    kill -TERM "$GW_PID"
    for i in $(seq 1200); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" || true
    GW_PID=""
    python3 - "$level" "$out" "$WORK/client.$level.json" "$log" <<'PY'
import glob, json, re, subprocess, sys
level, out, client, log = sys.argv[1:]
accepted = json.load(open(client))["accepted"]
lines = sum(1 for l in open(log, errors="replace") if "smtpgw::message" in l)
threads = {}
reactor_fns = {}
# The reactor's logging work, inclusive of what it calls, each counted once (the line
# naming the function; inlined pieces have lines of their own, so the largest figure).
fn = re.compile(r"(smtpgw::logging::(\w+::)*(submit\w*|begin|finish|hand_over|flush_this_thread|new)"
                r"|smtpgw::smtp::envelope::Message::message_id)\b")
for f in sorted(glob.glob(out + "-*")):
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                          "--show-percs=no", f], capture_output=True, text=True, check=True).stdout
    total = 0
    fns = {}
    for line in ann.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(.*)$", line)
        if not m:
            continue
        ir, what = int(m.group(1).replace(",", "")), m.group(2)
        if "PROGRAM TOTALS" in what:
            total = ir
        elif m := fn.search(what):
            fns[m.group(1)] = max(fns.get(m.group(1), 0), ir)
    if "logging::writer::Writer::run" in ann:
        name = "smtpgw-log"
    elif "net::epoll" in ann and total > 0 and "Connection" in ann:
        name = "reactor"
        reactor_fns = fns
    else:
        name = "other"
    threads[name] = threads.get(name, 0) + total
print(f"level {level}: {accepted} messages counted, {lines} transaction lines in the whole run"
      " (warm-up included)")
for name in ("reactor", "smtpgw-log", "other"):
    print(f"  {level:5} {name:11} {threads.get(name, 0) / accepted:10,.0f} instructions per message")
print(f"  {level:5} {'all':11} {sum(threads.values()) / accepted:10,.0f} instructions per message")
for name, ir in sorted(reactor_fns.items(), key=lambda kv: -kv[1]):
    print(f"  {level:5} reactor: {name} {ir / accepted:,.0f} per message (inclusive)")
PY
}

echo "callgrind $(date -u '+%Y-%m-%d %H:%M UTC'): $CONNS connections x $MSGS messages of 1 KiB," \
    "pipelined, after a warm-up of $WARM_CONNS x $WARM_MSGS; null sink, epoll, 1 reactor" >&2
for level in $LEVELS; do
    measure "$level"
done
