#!/usr/bin/env bash
# loadtest/run.sh: the whole-gateway benchmark, reproducible on a fresh machine.
#
# Builds release binaries, starts smtpgw on loopback (and, with --compare smtp-sink,
# Postfix's do-nothing smtp-sink on its own port), measures the raw loopback TCP ceiling
# with iperf3, then runs the same matrix of cells against every server with the same
# client (smtpgw-loadtest). Per cell: msgs/s, MB/s, p50/p99/p999 latency, server CPU
# (utime+stime from /proc/PID/stat) per message, and peak RSS. Results go to
# results/<date>/<quick|full>-<sink>/ as JSON; the table and gateway/peer ratios are printed.
#
# Usage: loadtest/run.sh [--quick] [--compare smtp-sink|postfix|smtp-sink,postfix]
#                        [--sink null|spool|kafka] [--kafka] [--duration SECONDS] [--out DIR]
#                        [--plots] [--gateway-bin PATH] [--io-backend auto|uring|epoll|both]
# --quick: 6 cells of 3 s each (about a minute); without it the full matrix (4 sizes x
#   1/10/100/1000 connections x pipelining off/on) of 5 s cells. --duration sets the
#   seconds per cell either way. CELLS="1k 100 1;1k 1000 1" (size conns pipelining;...)
#   replaces the matrix.
# --io-backend both runs two gateways side by side, `smtpgw` on io_uring and
#   `smtpgw-epoll` on epoll, through the same cells (servers alternate within a cell), so
#   the ratio rows compare the backends; one backend: that gateway only (default auto).
# --sink kafka (or --kafka) publishes through a loopback tansu broker started by
# scripts/kafka-broker.sh (reused if one runs already) and, after the run, reads the
# topic back and fails unless its new records equal the 250 replies the client counted.
# tansu keeps every record in memory, so the kafka matrix stops at 10k messages.
# --plots draws throughput.png and p99.png with matplotlib, installed from PyPI into a
# venv under target/plot-venv the first time.
# --gateway-bin PATH measures that smtpgw binary (e.g. a release build from elsewhere);
#   only the load client is built.
# Root: only to install what is missing, with apt-get: iperf3 (the loopback ceiling) and,
# for --compare, postfix (smtp-sink, the peer). With those installed, run it as anyone.
# To measure a deployed node from another host, run smtpgw-loadtest yourself with
# --allow-remote-target (this script only starts and measures local servers).
# Env:   GATEWAY_ARGS  extra smtpgw flags;  CLIENT_THREADS  loadtest worker threads (1)
#        CELLS  the cells to run instead of the matrix
# -h, --help prints this and builds nothing.
#
# Everything listens on 127.0.0.1 only, every step is bounded by `timeout`, and the exit
# trap stops exactly the processes this script started, by PID.
set -euo pipefail

QUICK=0
PLOTS=0
IO_BACKEND=auto
COMPARE=""
SINK=null
DURATION=""
OUT=""
GATEWAY_BIN=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --compare) COMPARE="${2:?--compare needs smtp-sink, postfix or smtp-sink,postfix}"; shift ;;
        --sink) SINK="${2:?--sink needs null, spool or kafka}"; shift ;;
        --kafka) SINK=kafka ;;
        --duration) DURATION="${2:?}"; shift ;;
        --out) OUT="${2:?}"; shift ;;
        --plots) PLOTS=1 ;;
        --io-backend) IO_BACKEND="${2:?--io-backend needs auto, uring, epoll or both}"; shift ;;
        --gateway-bin) GATEWAY_BIN="$(realpath -m "${2:?--gateway-bin needs a path}")"; shift ;;
        -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
case "$COMPARE" in ""|smtp-sink|postfix|smtp-sink,postfix|postfix,smtp-sink) ;;
    *) echo "run.sh: --compare takes smtp-sink, postfix or smtp-sink,postfix" >&2; exit 2 ;; esac
wants() { [[ ",$COMPARE," == *",$1,"* ]]; }
case "$SINK" in null|spool|kafka) ;; *) echo "run.sh: --sink must be null, spool or kafka" >&2; exit 2 ;; esac
case "$IO_BACKEND" in auto|uring|epoll|both) ;; *) echo "run.sh: --io-backend must be auto, uring, epoll or both" >&2; exit 2 ;; esac
if [[ "$IO_BACKEND" == both && "$SINK" == kafka ]]; then
    echo "run.sh: --io-backend both cannot be combined with --sink kafka (one topic, one record count)" >&2; exit 2
fi
if [[ -n "$GATEWAY_BIN" && ! -x "$GATEWAY_BIN" ]]; then
    echo "run.sh: --gateway-bin $GATEWAY_BIN: not an executable file" >&2; exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DATE="$(date -u +%Y-%m-%d)"
MODE=full; [[ $QUICK -eq 1 ]] && MODE=quick
OUT="${OUT:-$ROOT/results/$DATE/$MODE-$SINK}"
CLIENT_THREADS="${CLIENT_THREADS:-1}"
if [[ -z "$DURATION" ]]; then
    if [[ $QUICK -eq 1 ]]; then DURATION=3; else DURATION=5; fi
fi

WORK="$(mktemp -d /tmp/smtpgw-run.XXXXXX)"
PIDS=()
PFX_PID=""
KAFKA_OWNED=0
cleanup() {
    local pid i
    if [[ -n "$PFX_PID" ]]; then
        # Our private Postfix: its master stops its own children; wait for it, it is
        # not our child.
        postfix -c "$WORK/postfix/etc" stop >/dev/null 2>&1 || true
        for i in $(seq 50); do kill -0 "$PFX_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # Only a broker this run started; one that was running before stays up.
    [[ $KAFKA_OWNED -eq 1 ]] && "$ROOT/scripts/kafka-broker.sh" stop >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() { # pid: it has been reaped, so the exit trap must not signal it again
    local keep=() p
    for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port: wait until something accepts on 127.0.0.1:port (10 s at most)
    local i
    for i in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

APT_UPDATED=0
apt_install() { # packages...
    if [[ $APT_UPDATED -eq 0 ]]; then
        timeout 300 apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "$@" >/dev/null
}

ensure_tools() {
    command -v iperf3 >/dev/null || { log "installing iperf3"; apt_install iperf3; }
    if [[ -n "$COMPARE" ]] && ! command -v smtp-sink >/dev/null; then
        log "installing postfix (for smtp-sink), unconfigured so no system MTA starts"
        local master_before=0
        pgrep -x master >/dev/null && master_before=1
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        apt_install postfix
        # If the package's own scripts started the system Postfix anyway, stop it again:
        # this script only wanted the smtp-sink binary.
        if [[ $master_before -eq 0 ]] && pgrep -x master >/dev/null; then
            postfix stop >/dev/null 2>&1 || true
        fi
    fi
}

# Server CPU in clock ticks (utime + stime of all its threads) and RSS in KiB.
# Postfix is a tree of processes under its master: count the master, its live children
# and (cutime+cstime) the children it has already reaped. smtpgw and smtp-sink have no
# children, so for them this is their own utime+stime and RSS.
children() { cat /proc/"$1"/task/*/children 2>/dev/null || true; }
cpu_ticks() {
    local total c
    total=$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat")
    for c in $(children "$1"); do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$c/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
rss_kib() {
    local total c
    total=$(awk '/^VmRSS/ { print $2 }' "/proc/$1/status")
    for c in $(children "$1"); do
        total=$((total + $(awk '/^VmRSS/ { print $2 }' "/proc/$c/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# Peak RSS sampler: writes the running maximum to a file every 100 ms until killed.
start_rss_sampler() { # pid file
    (
        peak=0
        while kill -0 "$1" 2>/dev/null; do
            r=$(rss_kib "$1" 2>/dev/null || echo 0)
            if [[ ${r:-0} -gt $peak ]]; then peak=$r; echo "$peak" >"$2"; fi
            sleep 0.1
        done
    ) &
    SAMPLER=$!
    PIDS+=("$SAMPLER")
}

GW_BIN="${GATEWAY_BIN:-$ROOT/target/release/smtpgw}"
LT_BIN="$ROOT/target/release/smtpgw-loadtest"

stop_gateway() { # [pid]
    local pid="${1:-$GW_PID}"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# The gateway(s) under test: "smtpgw" (and with --io-backend both, "smtpgw-epoll").
start_gateways() {
    if [[ "$IO_BACKEND" == both ]]; then
        start_gateway epoll
        EP_PID=$GW_PID EP_ADDR=$GW_ADDR
        start_gateway uring
        GATEWAYS=("smtpgw $GW_PID $GW_ADDR" "smtpgw-epoll $EP_PID $EP_ADDR")
    else
        start_gateway "$IO_BACKEND"
        GATEWAYS=("smtpgw $GW_PID $GW_ADDR")
    fi
}
stop_gateways() {
    stop_gateway "$GW_PID"
    [[ "$IO_BACKEND" == both ]] && stop_gateway "$EP_PID"
    return 0
}

start_gateway() { # [backend]: auto unless given
    local backend="${1:-auto}"
    local logf="$WORK/gateway.$backend.log"
    rm -rf "$WORK/spool.$backend"
    mkdir -p "$WORK/spool.$backend"
    # shellcheck disable=SC2086 # GATEWAY_ARGS is a list of flags
    NO_COLOR=1 "$GW_BIN" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --sink "$SINK" --spool-dir "$WORK/spool.$backend" \
        --accept-domain example.com --max-connections 5000 --io-backend "$backend" "${KAFKA_ARGS[@]}" \
        ${GATEWAY_ARGS:-} 2>"$logf" &
    GW_PID=$!
    PIDS+=("$GW_PID")
    local i addr=""
    for i in $(seq 100); do
        addr=$(sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -oP 'listening addr=\K\S+' | head -1 || true)
        [[ -n "$addr" ]] && break
        kill -0 "$GW_PID" 2>/dev/null || { cat "$logf" >&2; echo "run.sh: smtpgw exited" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$addr" ]] || { cat "$logf" >&2; echo "run.sh: smtpgw never said 'listening addr='" >&2; exit 1; }
    GW_ADDR="${addr//\"/}"
    log "smtpgw pid $GW_PID listening on $GW_ADDR (sink $SINK, io backend: $(grep -oP 'backend=\K\S+' "$logf" | head -1))"
}

KAFKA_ARGS=()
KAFKA_TOPIC=smtp.inbound
# Starts (or reuses) the loopback tansu broker and installs the consumer that
# count_kafka_records uses.
start_kafka() {
    "$ROOT/scripts/kafka-broker.sh" env >/dev/null 2>&1 || KAFKA_OWNED=1
    local env
    env=$(timeout 300 "$ROOT/scripts/kafka-broker.sh" start "$KAFKA_TOPIC")
    KAFKA_ADDR="${env#SMTPGW_TEST_KAFKA=}"
    KAFKA_PY="$ROOT/.venv-kafka/bin/python"
    if ! "$KAFKA_PY" -c 'import confluent_kafka' 2>/dev/null; then
        log "installing confluent-kafka into .venv-kafka"
        timeout 300 "$ROOT/.venv-kafka/bin/pip" install -q --disable-pip-version-check confluent-kafka==2.16.1
    fi
    KAFKA_ARGS=(--kafka-brokers "$KAFKA_ADDR" --kafka-topic "$KAFKA_TOPIC")
    log "kafka: tansu at $KAFKA_ADDR, topic $KAFKA_TOPIC"
}

# Records in the topic, counted by reading them all (tansu's end offsets are not to
# be trusted): assign() partition 0 from the beginning, stop after 3 s without one.
count_kafka_records() {
    timeout 600 "$KAFKA_PY" - "$KAFKA_ADDR" "$KAFKA_TOPIC" <<'PY'
import sys, time
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
broker, topic = sys.argv[1], sys.argv[2]
c = Consumer({"bootstrap.servers": broker, "group.id": "smtpgw-run", "enable.auto.commit": False})
c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
n, last = 0, time.monotonic()
while time.monotonic() - last < 3:
    batch = c.consume(10000, 0.5)
    for m in batch:
        if m.error() is None:
            n += 1
    if batch:
        last = time.monotonic()
c.close()
print(n)
PY
}

# Sum of 250 replies the client saw from smtpgw in this run: every cell and warm-up.
accepted_by_gateway() {
    python3 - "$OUT/cells" "$WORK" <<'PY'
import glob, json, os, sys
cells, work = sys.argv[1], sys.argv[2]
files = glob.glob(os.path.join(cells, "smtpgw_*.json"))
total = sum(json.load(open(f)).get("client", {}).get("accepted", 0) for f in files)
warm = os.path.join(work, "warmup.smtpgw.json")
if os.path.exists(warm):
    total += json.load(open(warm)).get("accepted", 0)
print(total)
PY
}

start_smtp_sink() {
    local port user=()
    port=$(free_port)
    [[ $(id -u) -eq 0 ]] && user=(-u nobody)
    # Backlog 4096 and -m 2000 (its default serves only 256 connections at once, the
    # rest wait in the accept queue) so the 1000-connection cells measure the same thing.
    smtp-sink "${user[@]}" -m 2000 "127.0.0.1:$port" 4096 2>"$WORK/smtp-sink.log" &
    PEER_PID=$!
    PIDS+=("$PEER_PID")
    wait_port "$port" || { echo "run.sh: smtp-sink did not start" >&2; exit 1; }
    PEER_ADDR="127.0.0.1:$port"
    log "smtp-sink pid $PEER_PID listening on $PEER_ADDR"
}

# A private Postfix that queues every message to disk (cleanup fsyncs the queue file
# before smtpd says 250) and then discards it: the durable peer for --sink spool. Its own
# config and queue directories under $WORK; the system Postfix is never touched.
start_postfix() {
    local d="$WORK/postfix" port
    port=$(free_port)
    mkdir -p "$d/etc" "$d/queue" "$d/data"
    chmod 755 "$WORK"
    chown postfix "$d/data"
    sed -E "s/^smtp +inet .*/127.0.0.1:$port inet n - n - - smtpd/" /etc/postfix/master.cf >"$d/etc/master.cf"
    cp /etc/postfix/dynamicmaps.cf "$d/etc/" 2>/dev/null || true
    cat >"$d/etc/main.cf" <<PFX
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = loadtest.localdomain
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = example.com
default_transport = discard
relay_transport = discard
local_transport = discard
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
default_process_limit = 1100
maillog_file = $d/maillog
maillog_file_prefixes = $d
biff = no
PFX
    # postfix(1) reports only to syslog unless stderr is a terminal; the maillog says why.
    postfix -c "$d/etc" start >/dev/null 2>&1 || { tail "$d/maillog" >&2; echo "run.sh: postfix did not start" >&2; exit 1; }
    wait_port "$port" || { tail "$d/maillog" >&2; echo "run.sh: postfix not listening" >&2; exit 1; }
    PFX_PID=$(tr -d ' ' <"$d/queue/pid/master.pid")
    PIDS+=("$PFX_PID")
    PFX_ADDR="127.0.0.1:$port"
    log "postfix master pid $PFX_PID listening on $PFX_ADDR (queue on disk, discard transport)"
}

measure_ceiling() {
    # One stream and four parallel streams: the multi-connection cells can use more of
    # loopback than a single stream does, so the ceiling is the better of the two.
    local streams port spid best=0 mbps
    for streams in 1 4; do
        port=$(free_port)
        iperf3 -s -1 -B 127.0.0.1 -p "$port" >/dev/null 2>&1 &
        spid=$!
        PIDS+=("$spid")
        # No probe connection: `iperf3 -s -1` would take it for its one test.
        sleep 0.5
        timeout 30 iperf3 -c 127.0.0.1 -p "$port" -t 3 -P "$streams" -J \
            >"$OUT/loopback_ceiling_P$streams.json" 2>/dev/null || true
        wait "$spid" 2>/dev/null || true
        forget_pid "$spid"
        mbps=$(python3 -c 'import json,sys
try:
    d=json.load(open(sys.argv[1])); print("%.1f" % (d["end"]["sum_received"]["bits_per_second"]/8e6))
except Exception: print("0")' "$OUT/loopback_ceiling_P$streams.json")
        log "raw loopback TCP (iperf3, $streams stream(s)): $mbps MB/s"
        best=$(python3 -c 'import sys; print(max(float(sys.argv[1]), float(sys.argv[2])))' "$best" "$mbps")
    done
    CEILING_MBPS=$best
}

# One cell against one server: the client's JSON plus the server's CPU and RSS.
run_cell() { # name pid addr size conns pipelining(0|1)
    local name=$1 pid=$2 addr=$3 size=$4 conns=$5 pipe=$6
    local file="$OUT/cells/${name}_${size}_c${conns}_p${pipe}.json"
    local flags=() peak="$WORK/peak.$name"
    [[ $pipe -eq 1 ]] && flags+=(--pipelining)
    echo 0 >"$peak"
    local cpu0 cpu1
    cpu0=$(cpu_ticks "$pid")
    start_rss_sampler "$pid" "$peak"
    timeout $((DURATION + 90)) "$LT_BIN" --target "$addr" --connections "$conns" \
        --duration "$DURATION" --size "$size" "${flags[@]}" --threads "$CLIENT_THREADS" \
        --timeout 30 --json "$file.client" >"$WORK/client.out" 2>&1 || true
    cpu1=$(cpu_ticks "$pid")
    kill "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
    forget_pid "$SAMPLER"
    python3 "$ROOT/loadtest/summarize.py" cell "$file" "$name" "$size" "$conns" "$pipe" \
        "$((cpu1 - cpu0))" "$(getconf CLK_TCK)" "$(cat "$peak")" "$WORK/client.out"
    rm -f "$file.client"
}

main() {
    ensure_tools
    if [[ -n "$GATEWAY_BIN" ]]; then
        log "building the load client; measuring $GATEWAY_BIN"
        timeout 1200 cargo build --release -p smtpgw-loadtest -q
    else
        log "building release binaries"
        timeout 1200 cargo build --release --workspace --bins -q
    fi
    mkdir -p "$OUT/cells"
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

    local sizes conns_list cells=()
    if [[ "$SINK" == kafka && $QUICK -eq 1 ]]; then
        cells=("1k 1 0" "1k 100 0" "1k 100 1" "10k 10 1")
    elif [[ "$SINK" == kafka ]]; then
        for sizes in 1k 10k; do
            for conns_list in 1 10 100; do
                cells+=("$sizes $conns_list 0" "$sizes $conns_list 1")
            done
        done
    elif [[ -n "${CELLS:-}" ]]; then
        IFS=';' read -r -a cells <<<"$CELLS"
    elif [[ $QUICK -eq 1 ]]; then
        # About a minute with --compare: the cells the targets are stated for.
        cells=("1k 1 0" "1k 100 0" "1k 100 1" "10k 10 1" "100k 10 1" "1m 10 0")
    else
        for sizes in 1k 10k 100k 1m; do
            for conns_list in 1 10 100 1000; do
                cells+=("$sizes $conns_list 0" "$sizes $conns_list 1")
            done
        done
    fi

    measure_ceiling
    local records_before=0
    if [[ "$SINK" == kafka ]]; then
        start_kafka
        records_before=$(count_kafka_records)
    fi
    start_gateways
    local peers=()
    if wants smtp-sink; then
        start_smtp_sink
        peers+=("smtp-sink $PEER_PID $PEER_ADDR")
    fi
    if wants postfix; then
        start_postfix
        peers+=("postfix $PFX_PID $PFX_ADDR")
    fi
    local s name pid addr servers=("${GATEWAYS[@]}" "${peers[@]}")
    for s in "${servers[@]}"; do
        read -r name pid addr <<<"$s"
        log "warming up $name"
        timeout 60 "$LT_BIN" --target "$addr" --connections 10 --duration 1 --size 10k \
            --threads "$CLIENT_THREADS" --json "$WORK/warmup.$name.json" >/dev/null 2>&1 || true
    done
    local c size conns pipe
    for c in "${cells[@]}"; do
        read -r size conns pipe <<<"$c"
        if [[ "$SINK" == spool ]]; then
            # A fresh gateway and spool per cell: the spool only grows, and a full
            # matrix would otherwise write tens of GB.
            stop_gateways
            start_gateways
        fi
        servers=("${GATEWAYS[@]}" "${peers[@]}")
        # Servers alternate within a cell, so slow drift in machine load hits both.
        for s in "${servers[@]}"; do
            read -r name pid addr <<<"$s"
            log "cell $size x $conns conns, pipelining $pipe: $name"
            run_cell "$name" "$pid" "$addr" "$size" "$conns" "$pipe"
        done
    done
    python3 "$ROOT/loadtest/summarize.py" summary "$OUT" "$CEILING_MBPS" "$SINK" \
        "$MODE" "$(uptime)"
    if [[ "$SINK" == kafka ]]; then
        # Drain first: SIGTERM flushes the producer, so every 250 is in the topic.
        stop_gateways
        local accepted records
        accepted=$(accepted_by_gateway)
        records=$(( $(count_kafka_records) - records_before ))
        echo "kafka: 250 replies $accepted, new records in $KAFKA_TOPIC $records" | tee "$OUT/kafka-check.txt"
        if [[ "$accepted" -ne "$records" ]]; then
            echo "run.sh: FAIL: the topic does not hold one record per 250" >&2
            exit 1
        fi
    fi
    if [[ $PLOTS -eq 1 ]]; then
        local venv="$ROOT/target/plot-venv"
        if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
            log "installing matplotlib into $venv"
            python3 -m venv "$venv"
            timeout 600 "$venv/bin/pip" install -q matplotlib
        fi
        "$venv/bin/python" "$ROOT/loadtest/plot.py" "$OUT"
    fi
}

main
