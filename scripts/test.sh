#!/usr/bin/env bash
# The project's test command: format, lint, build, unit tests, then the end-to-end suite
# that drives the built binary with real SMTP clients (Python smtplib, swaks, raw sockets).
#
#   scripts/test.sh                # everything
#   scripts/test.sh -k smuggling   # extra arguments go to pytest
#
# Setup is idempotent: swaks, postfix and prometheus/promtool are installed only when missing, and the Python venv in .venv
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

section "setup: postfix and the Cyrus SASL client plugins (test_auth.py relays through a private Postfix)"
# Unconfigured ("No configuration"), so no system MTA starts; the test runs its own
# instance with its own config, queue and log under its tmp dir. If the package's own
# scripts started a system Postfix anyway, it is stopped again.
if command -v postfix >/dev/null 2>&1 && ls /usr/lib/*/sasl2/libplain.so >/dev/null 2>&1; then
    echo "postfix present: $(command -v postfix)"
else
    master_before=0
    pgrep -x master >/dev/null 2>&1 && master_before=1
    echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        postfix libsasl2-modules
    if [ "$master_before" -eq 0 ] && pgrep -x master >/dev/null 2>&1; then
        as_root postfix stop >/dev/null 2>&1 || true
    fi
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

section "setup: systemd-analyze (Debian's systemd package) for the unit in deploy/systemd"
# `systemd-analyze verify` and `security --offline` load the unit into an offline
# manager: they work in a container without systemd as PID 1. Installing the package
# starts nothing here.
if command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd-analyze present: $(command -v systemd-analyze)"
else
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd
fi

section "setup: Docker's default seccomp profile (base of deploy/container/seccomp.json)"
# From Debian's golang-github-docker-docker-dev (moby's source), downloaded and unpacked
# into a cache, not installed; tests/e2e/test_deploy.py regenerates seccomp.json from it.
seccomp_cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/smtpgw-test/docker-seccomp
seccomp_base=usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json
if [ ! -f "$seccomp_cache/$seccomp_base" ]; then
    mkdir -p "$seccomp_cache"
    (cd "$seccomp_cache" && { apt-get download golang-github-docker-docker-dev 2>/dev/null \
        || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
             && apt-get download golang-github-docker-docker-dev; }; } \
        && dpkg-deb --fsys-tarfile golang-github-docker-docker-dev_*.deb | tar -x "./$seccomp_base" \
        && rm -f golang-github-docker-docker-dev_*.deb)
fi
export SMTPGW_TEST_DOCKER_SECCOMP=$seccomp_cache
echo "SMTPGW_TEST_DOCKER_SECCOMP=$SMTPGW_TEST_DOCKER_SECCOMP"

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

# Whatever this script starts or mounts is undone when it exits, however it exits.
cleanup_steps=()
cleanup() {
    local step
    for step in "${cleanup_steps[@]}"; do
        eval "$step" || true
    done
}
trap cleanup EXIT

section "setup: Kafka-protocol test broker (tansu on loopback)"
# The Kafka tests (tests/kafka_e2e.rs, tests/e2e/test_kafka.py) run against it; the
# mock-cluster tests need nothing. A broker given in SMTPGW_TEST_KAFKA is used as is.
if [ -z "${SMTPGW_TEST_KAFKA:-}" ]; then
    broker_env=$(scripts/kafka-broker.sh start)
    export "${broker_env?}"
    cleanup_steps+=('scripts/kafka-broker.sh stop >/dev/null 2>&1')
fi
echo "SMTPGW_TEST_KAFKA=$SMTPGW_TEST_KAFKA"

section "setup: a small file system for the disk-full test (tmpfs, 3 MiB)"
# tests/spool_sink.rs fills a file system for real; a write error is only real when the
# disk is really full. Under CI=true a test whose prerequisite is missing fails.
if [ -z "${SMTPGW_TEST_SMALL_FS:-}" ]; then
    small_fs=$(mktemp -d "${TMPDIR:-/tmp}/smtpgw-small-fs.XXXXXX")
    if as_root mount -t tmpfs -o size=3m,mode=1777 tmpfs "$small_fs"; then
        cleanup_steps+=("as_root umount '$small_fs' && rmdir '$small_fs'")
        export SMTPGW_TEST_SMALL_FS=$small_fs
    else
        rmdir "$small_fs"
        echo "cannot mount a tmpfs (needs root): the disk-full test will skip, or fail under CI=true" >&2
    fi
fi
echo "SMTPGW_TEST_SMALL_FS=${SMTPGW_TEST_SMALL_FS:-}"

section "setup: I/O backends under test"
# The one place that says which backends every started gateway runs on: pytest
# parametrizes its gateway fixture over the list, and the Rust harness takes one entry
# per `cargo test` run (the first with the whole workspace, the others with the test
# targets that start the binary).
export SMTPGW_TEST_IO_BACKENDS=${SMTPGW_TEST_IO_BACKENDS:-epoll,uring}
IFS=, read -r -a io_backends <<<"$SMTPGW_TEST_IO_BACKENDS"
echo "SMTPGW_TEST_IO_BACKENDS=$SMTPGW_TEST_IO_BACKENDS"

section "alert rules: promtool check rules, promtool test rules"
(cd dashboards && promtool check rules alerts.yml && promtool test rules alerts_test.yml)

section "dashboards: checked-in JSON equals a fresh generation"
"$venv/bin/python" dashboards/generate.py --check

section "module graph: no import cycle between the crate's modules"
python3 scripts/module-cycles.py

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy (workspace, the fuzz crate included)"
# fuzz/ is a workspace member: its target and harness are checked and linted here on
# stable, its seed corpus is replayed by `cargo test` (fuzz/tests/corpus.rs), and
# `cargo +nightly fuzz run session_feed` fuzzes it (not in CI).
cargo clippy --workspace --all-targets --release -- -D warnings

section "cargo clippy: the library and binary as shipped (without the testing feature)"
# The workspace build above enables `testing` (tests, benches and the fuzz crate open the
# crate's internal modules with it); an item only the tests use would be dead code in the
# shipped library, and only this check sees it.
cargo clippy --release -p smtpgw --lib --bins -- -D warnings

section "cargo build --release (gateway and load client)"
cargo build --release --workspace --bins

section "cargo test --release (I/O backend ${io_backends[0]})"
# The simulation targets (tests/sim, tests/sim_disk) run here with no budget of fresh
# seeds: their determinism checks and defect hunts only, which scripts/sim.sh below
# leaves out (it runs their fresh seeds alone).
SMTPGW_SIM_SECONDS=0 SMTPGW_TEST_IO_BACKENDS=${io_backends[0]} cargo test --release --workspace
for backend in "${io_backends[@]:1}"; do
    section "cargo test --release: the tests that start the binary, I/O backend $backend"
    # --workspace as above: the same feature unification, so nothing is rebuilt.
    SMTPGW_TEST_IO_BACKENDS=$backend cargo test --release --workspace \
        --test metrics --test kafka_gateway --test kafka_e2e --test kafka_forward --test kafka_limit --test binary \
        --test spool_sink --test spool_disk --test spool_recovery
done

section "deterministic simulation (scripts/sim.sh: ${SMTPGW_SIM_SECONDS:-120} s of fresh seeds)"
# Same build as the cargo test above. Every seed is logged; a failure prints its seed and
# the shortest trace found, and `scripts/sim.sh --seed N` replays it.
scripts/sim.sh

section "load client self-test (250 count == spool records)"
loadtest/selftest.sh --no-build

section "end-to-end tests (pytest tests/e2e)"
target_dir=${CARGO_TARGET_DIR:-target}
export SMTPGW_BIN=${SMTPGW_BIN:-$(realpath "$target_dir")/release/smtpgw}
# Extra arguments go to both pytest runs below; pytest exits 5 when they select no test,
# which is an error only when neither run selected one.
suite_failed() { [ "$1" -ne 0 ] && { [ "$1" -ne 5 ] || [ "$2" -eq 0 ]; }; }
e2e_status=0
"$venv/bin/python" -m pytest -q tests/e2e "$@" || e2e_status=$?
suite_failed "$e2e_status" "$#" && exit "$e2e_status"

section "failure drills (pytest tests/drills)"
# SIGKILL, broker outage, SIGTERM, disk full, idle crowd and connect flood, rolling
# restart (README, "Durability"); each prints one "DRILL ..." line of counts.
drills_status=0
"$venv/bin/python" -m pytest -q -s tests/drills "$@" || drills_status=$?
suite_failed "$drills_status" "$#" && exit "$drills_status"
if [ "$e2e_status" -eq 5 ] && [ "$drills_status" -eq 5 ]; then
    echo "no test selected by: $*" >&2
    exit 5
fi

section "all tests passed"
