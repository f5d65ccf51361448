"""Fixtures that run the real smtpgw binary on 127.0.0.1 for the end-to-end suite.

`start_gateway(*args)` starts `smtpgw --listen 127.0.0.1:0 --accept-domain example.com
--sink spool --spool-dir <tmp> *args`, waits (bounded) for its `listening addr=` log line
and returns a `Gateway`. Every process a test starts is stopped by its PID when the test
ends (SIGTERM, then SIGKILL), and its stderr is attached to the report of a failed test.

Every gateway must end well, or its test fails at teardown: stopped with SIGTERM it exits
0, and no process of it ever wrote "panicked" to stderr (a panic in a connection's task
is caught by the runtime, so only its stderr tells). A test that kills one on purpose
uses `kill9()`, which exempts that process's exit status, not its stderr.

The I/O backends under test come from one place, `SMTPGW_TEST_IO_BACKENDS` (comma
separated, default "epoll"): `start_gateway` is parametrized over them.

Under `CI=true` a skipped test is a failure: a missing prerequisite must never pass as
"ok".

The binary is `$SMTPGW_BIN`, or `target/release/smtpgw` in the repository.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import mboxrd
from smtpwire import IO_TIMEOUT, ULID, Wire, open_session

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening addr=(\S+)")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
TOOL_TIMEOUT = 60.0
IO_BACKENDS = [b.strip() for b in os.environ.get("SMTPGW_TEST_IO_BACKENDS", "epoll").split(",") if b.strip()]
CI = os.environ.get("CI", "") not in ("", "0", "false")


def wait_for(what: str, check, timeout: float = 30.0, interval: float = 0.05):
    """Polls `check()` until it returns something truthy and returns that; fails the test
    after `timeout` seconds. For state a test can only observe from outside the process."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def gateway_binary() -> Path:
    return Path(os.environ.get("SMTPGW_BIN") or REPO / "target" / "release" / "smtpgw")


def gateway_env() -> dict[str, str]:
    """The caller's environment without SMTPGW_* settings, which would change the flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGW_") and k != "RUST_LOG"}
    env["RUST_BACKTRACE"] = "1"
    return env


def run_binary(
    *args: str, timeout: float = TOOL_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs the binary to completion (killed if it outlives `timeout`), with `env` added
    to `gateway_env()`; a panic in its stderr fails the test."""
    result = subprocess.run(
        [str(gateway_binary()), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env=gateway_env() | (env or {}),
    )
    assert b"panicked" not in result.stderr, f"smtpgw {' '.join(args)} panicked:\n{result.stderr.decode(errors='replace')}"
    return result


_HAS_IO_BACKEND_FLAG: dict[str, bool] = {}


def io_backend_args(backend: str) -> tuple[str, ...]:
    """`--io-backend NAME` once the binary has the flag; before that only epoll exists,
    and asking for another backend fails rather than silently testing epoll."""
    binary = str(gateway_binary())
    if binary not in _HAS_IO_BACKEND_FLAG:
        help_text = subprocess.run([binary, "--help"], capture_output=True, timeout=TOOL_TIMEOUT, env=gateway_env())
        _HAS_IO_BACKEND_FLAG[binary] = b"--io-backend" in help_text.stdout
    if _HAS_IO_BACKEND_FLAG[binary]:
        return ("--io-backend", backend)
    assert backend == "epoll", f"{binary} has no --io-backend flag: only epoll can be tested, not {backend}"
    return ()


def listening_addr(line: str) -> str | None:
    """The address of a `listening addr=...` log line, in text or JSON log format."""
    if line.startswith("{"):
        fields = json.loads(line).get("fields", {})
        return fields.get("addr") if fields.get("message") == "listening" else None
    match = LISTENING.search(line)
    return match.group(1) if match else None


class Gateway:
    """A running smtpgw process and the spool it writes (or, with `sink`, whatever sink
    flags replace `--sink spool --spool-dir`)."""

    host = "127.0.0.1"

    def __init__(
        self,
        spool_dir: Path,
        args: tuple[str, ...],
        sink: tuple[str, ...] | None = None,
        backend: str = "epoll",
        env: dict[str, str] | None = None,
    ):
        self.spool_dir = spool_dir
        self.args = args
        self.backend = backend
        self.env = env or {}
        # (pid, exit code, killed on purpose) of every process that has ended.
        self.exits: list[tuple[int, int, bool]] = []
        self._killing = False
        self.sink = sink or ("--sink", "spool", "--spool-dir", str(spool_dir))
        self.log: list[str] = []  # stderr lines of the current process
        self.earlier_logs = ""  # stderr of the processes before a restart
        self.proc: subprocess.Popen | None = None
        self.metrics_addr: str | None = None
        self.addr = ""
        self.port = 0
        self.start()

    # --- process ------------------------------------------------------------------

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self.log:
            self.earlier_logs += self.stderr + "---- restarted ----\n"
            self.log = []
        self.proc = subprocess.Popen(
            [
                str(gateway_binary()),
                *("--listen", "127.0.0.1:0", "--accept-domain", "example.com"),
                # The metrics port is fixed by default; parallel gateways need their own.
                *("--metrics-listen", "127.0.0.1:0"),
                *io_backend_args(self.backend),
                *self.sink,
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=gateway_env() | self.env,
        )
        listening = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, args=(self.proc, listening, self.log), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not listening.wait(0.02):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.kill9()
                raise RuntimeError(
                    f"smtpgw did not log 'listening addr=' within {START_TIMEOUT}s "
                    f"(exit code {code}); stderr:\n{self.stderr}"
                )
        host, _, port = self.addr.rpartition(":")
        assert host == self.host, f"gateway listens on {self.addr}, not on loopback"
        self.port = int(port)

    def _read_stderr(self, proc: subprocess.Popen, listening: threading.Event, log: list[str]) -> None:
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            log.append(line)
            metrics = re.search(r"metrics_addr=(\S+)", line)
            if metrics:
                self.metrics_addr = metrics.group(1)
            addr = listening_addr(line)
            if addr and not listening.is_set():
                self.addr = addr
                listening.set()
        proc.stderr.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "".join(self.log)

    @property
    def all_stderr(self) -> str:
        return self.earlier_logs + self.stderr

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        # Only while our child is unreaped, so its PID cannot belong to anyone else.
        if self.running():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        if not self.exits or self.exits[-1][0] != self.proc.pid:
            self.exits.append((self.proc.pid, code, self._killing))
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Sends `sig` and returns the exit code; SIGKILLs and fails if it takes too long."""
        self.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"smtpgw did not exit within {timeout}s of signal {sig}")

    def kill9(self) -> None:
        """SIGKILL on purpose: this process's exit status is exempt from the teardown check."""
        self._killing = True
        try:
            self.send_signal(signal.SIGKILL)
            if self.proc is not None:
                self.wait(STOP_TIMEOUT)
        finally:
            self._killing = False

    def restart(self) -> None:
        """Starts a new process with the same flags on the same spool."""
        if self.running():
            self.stop()
        self.start()

    def close(self) -> list[str]:
        """Stops the process if it still runs; returns every way it or an earlier process
        of this gateway did not end well (empty when all is well)."""
        problems = []
        if self.running():
            try:
                self.stop()
            except AssertionError as error:
                problems.append(str(error))
        elif self.proc is not None:
            self.wait(STOP_TIMEOUT)  # records an exit the test did not wait for
        for pid, code, killed in self.exits:
            if code != 0 and not killed:
                problems.append(f"smtpgw pid {pid} exited with {code}, not 0")
        if "panicked" in self.all_stderr:
            problems.append("smtpgw panicked (see its stderr)")
        return problems

    # --- metrics endpoint ---------------------------------------------------------

    def http_get(self, path: str) -> tuple[int, str]:
        """GET `path` on the gateway's --metrics-listen address: (status, body)."""
        assert self.metrics_addr, "no metrics_addr= in the gateway's log"
        try:
            with urllib.request.urlopen(f"http://{self.metrics_addr}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metric(self, series: str) -> float:
        """The value of one series of /metrics, e.g. `smtpgw_connections_active`."""
        status, body = self.http_get("/metrics")
        assert status == 200, body
        for line in body.splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
        raise AssertionError(f"{series} is not in /metrics")

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits until the gateway holds no connection, so whatever its sessions did is
        done (and counted) before a test looks at the spool or the counters."""
        wait_for("no active connection", lambda: self.metric("smtpgw_connections_active") == 0, timeout)

    # --- clients ------------------------------------------------------------------

    def wire(self) -> Wire:
        return Wire(self.host, self.port)

    def session(self, helo: str = "client.test", ehlo: bool = True) -> Wire:
        """A connection past its greeting and EHLO (or HELO)."""
        return open_session(self.host, self.port, helo, ehlo)

    def smtplib(self) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, local_hostname="client.test", timeout=IO_TIMEOUT)

    # --- spool tools --------------------------------------------------------------

    def tool(self, *args: str) -> bytes:
        """`smtpgw spool ARGS --spool-dir DIR`; returns stdout, fails on a non-zero exit."""
        result = run_binary("spool", *args, "--spool-dir", str(self.spool_dir))
        assert result.returncode == 0, (
            f"smtpgw spool {' '.join(args)} exited {result.returncode}: {result.stderr.decode(errors='replace')}"
        )
        return result.stdout

    def spool_ls(self) -> list[str]:
        return self.tool("ls").decode("utf-8", "replace").splitlines()

    def spool_ids(self) -> list[str]:
        ids = [line.split()[0] for line in self.spool_ls() if line.strip()]
        assert all(ULID.fullmatch(i) for i in ids), f"spool ls ids are not ULIDs: {ids}"
        return ids

    def cat(self, message_id: str, body: bool = False) -> bytes:
        return self.tool("cat", *(["--body"] if body else []), message_id)

    def export(self, path: Path) -> list[mboxrd.MboxMessage]:
        self.tool("export", "--mbox", str(path))
        return mboxrd.parse(path.read_bytes())


GATEWAYS = pytest.StashKey[list]()


@pytest.fixture(params=IO_BACKENDS)
def io_backend(request) -> str:
    """The I/O backend of every gateway the test starts (SMTPGW_TEST_IO_BACKENDS)."""
    return request.param


@pytest.fixture
def start_gateway(request, tmp_path, io_backend):
    """Factory: `start_gateway(*extra_flags, spool_dir=None, sink=None, env=None)` -> a
    running Gateway. At teardown every gateway it started must have ended well."""
    binary = gateway_binary()
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing: build it (cargo build --release) or set SMTPGW_BIN")
    started: list[Gateway] = []
    request.node.stash[GATEWAYS] = started

    def start(
        *args: str,
        spool_dir: Path | None = None,
        sink: tuple[str, ...] | None = None,
        env: dict[str, str] | None = None,
    ) -> Gateway:
        gateway = Gateway(spool_dir or tmp_path / f"spool-{len(started)}", args, sink, io_backend, env)
        started.append(gateway)
        return gateway

    yield start
    problems = [f"gateway #{i}: {p}" for i, gateway in enumerate(started) for p in gateway.close()]
    if problems:
        pytest.fail("a gateway did not end well:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def gateway(start_gateway) -> Gateway:
    """A gateway with default settings on a fresh spool."""
    return start_gateway()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        # Under CI=true a skip is a failure: a missing prerequisite must not pass as ok.
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"
    if report.failed:
        for i, gateway in enumerate(item.stash.get(GATEWAYS, [])):
            report.sections.append((f"smtpgw #{i} stderr (pid {gateway.proc.pid})", gateway.all_stderr[-20000:]))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Under CI=true a module skipped as a whole (pytest.skip at import) fails too."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped under CI=true, which counts as a failure: {reason}"
