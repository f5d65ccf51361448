#!/usr/bin/env bash
# The project's test command: format, lint, build, unit tests, then the end-to-end suite
# that drives the built binary with real SMTP clients (Python smtplib, swaks, raw sockets).
#
#   scripts/test.sh                # everything
#   scripts/test.sh -k smuggling   # extra arguments go to pytest
#
# Setup is idempotent: swaks and prometheus/promtool are installed only when missing, and the Python venv in .venv
# is refreshed only when tests/e2e/requirements.txt changed since the last install.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS
section() {
    printf '\n==== %s  (+%ds) ====\n' "$*" "$((SECONDS - started))"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

section "setup: swaks (with TLS: Net::SSLeay, IO::Socket::SSL) and openssl"
if command -v swaks >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 \
    && perl -MNet::SSLeay -MIO::Socket::SSL -e 1 2>/dev/null; then
    echo "swaks present: $(command -v swaks)"
else
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        swaks libnet-ssleay-perl libio-socket-ssl-perl openssl
fi

section "setup: prometheus and promtool"
# The Debian package would also start a system Prometheus on :9090; the tests run their
# own on a free loopback port, so a service the install started is stopped and disabled.
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus present: $(command -v prometheus)"
else
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        as_root systemctl disable --now prometheus
    elif command -v service >/dev/null 2>&1; then
        as_root service prometheus stop >/dev/null 2>&1 || true
    fi
fi

section "setup: python venv (.venv)"
venv=.venv
requirements=tests/e2e/requirements.txt
stamp=$venv/.requirements.sha256
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
    echo "$wanted" >"$stamp"
    echo "installed $requirements"
else
    echo "up to date with $requirements"
fi

section "setup: Kafka-protocol test broker (tansu on loopback)"
# The Kafka tests (tests/kafka_e2e.rs, tests/e2e/test_kafka.py) run against it; the
# mock-cluster tests need nothing. A broker given in SMTPGW_TEST_KAFKA is used as is.
if [ -z "${SMTPGW_TEST_KAFKA:-}" ]; then
    broker_env=$(scripts/kafka-broker.sh start)
    export "${broker_env?}"
    trap 'scripts/kafka-broker.sh stop >/dev/null 2>&1 || true' EXIT
fi
echo "SMTPGW_TEST_KAFKA=$SMTPGW_TEST_KAFKA"

section "alert rules: promtool check rules, promtool test rules"
(cd dashboards && promtool check rules alerts.yml && promtool test rules alerts_test.yml)

section "dashboards: checked-in JSON equals a fresh generation"
"$venv/bin/python" dashboards/generate.py --check

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy (workspace)"
cargo clippy --workspace --all-targets --release -- -D warnings

section "cargo build --release (gateway and load client)"
cargo build --release --workspace --bins

section "cargo test --release"
cargo test --release --workspace

section "load client self-test (250 count == spool records)"
loadtest/selftest.sh --no-build

section "end-to-end tests (pytest tests/e2e)"
target_dir=${CARGO_TARGET_DIR:-target}
export SMTPGW_BIN=${SMTPGW_BIN:-$(realpath "$target_dir")/release/smtpgw}
"$venv/bin/python" -m pytest -q tests/e2e "$@"

section "the edge (TLS, PROXY, limits) on each I/O backend"
# The run above uses the binary's default backend (auto: io_uring where the kernel
# allows it); the edge lives in the shared driver, and this proves it on both.
SMTPGW_TEST_IO_BACKENDS=epoll,uring "$venv/bin/python" -m pytest -q \
    tests/e2e/test_tls.py tests/e2e/test_proxy.py tests/e2e/test_limits.py "$@"

section "all tests passed"
