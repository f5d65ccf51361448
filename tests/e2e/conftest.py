"""Fixtures that run the real smtpgw binary on 127.0.0.1 for the end-to-end suite.

`start_gateway(*args)` starts `smtpgw --listen 127.0.0.1:0 --accept-domain example.com
--sink spool --spool-dir <tmp> *args`, waits (bounded) for its `listening addr=` log line
and returns a `Gateway`. Every process a test starts is stopped by its PID when the test
ends (SIGTERM, then SIGKILL), and its stderr is attached to the report of a failed test.

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
from pathlib import Path

import pytest

import mboxrd
from smtpwire import IO_TIMEOUT, ULID, Wire, open_session

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening addr=(\S+)")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
TOOL_TIMEOUT = 60.0


def gateway_binary() -> Path:
    return Path(os.environ.get("SMTPGW_BIN") or REPO / "target" / "release" / "smtpgw")


def gateway_env() -> dict[str, str]:
    """The caller's environment without SMTPGW_* settings, which would change the flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGW_") and k != "RUST_LOG"}
    env["RUST_BACKTRACE"] = "1"
    return env


def run_binary(*args: str, timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    """Runs the binary to completion (killed if it outlives `timeout`)."""
    return subprocess.run(
        [str(gateway_binary()), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        env=gateway_env(),
    )


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

    def __init__(self, spool_dir: Path, args: tuple[str, ...], sink: tuple[str, ...] | None = None):
        self.spool_dir = spool_dir
        self.args = args
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
                *self.sink,
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=gateway_env(),
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
        self.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Starts a new process with the same flags on the same spool."""
        if self.running():
            self.stop()
        self.start()

    def close(self) -> None:
        if not self.running():
            return
        try:
            self.stop()
        except AssertionError:
            pass

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


def io_backends() -> list[str]:
    """`SMTPGW_TEST_IO_BACKENDS=epoll,uring`: every test that starts gateways through
    `start_gateway` runs once per backend named (unset: once, with the binary's default)."""
    names = [b.strip() for b in os.environ.get("SMTPGW_TEST_IO_BACKENDS", "").split(",") if b.strip()]
    for name in names:
        assert name in ("epoll", "uring", "auto"), f"SMTPGW_TEST_IO_BACKENDS: unknown backend {name!r}"
    return names


def pytest_generate_tests(metafunc):
    backends = io_backends()
    if backends and "io_backend" in metafunc.fixturenames:
        metafunc.parametrize("io_backend", backends, ids=[f"io-{b}" for b in backends])


@pytest.fixture
def io_backend() -> str | None:
    """The backend `start_gateway` passes as `--io-backend` (None: the binary's default)."""
    return None


@pytest.fixture
def start_gateway(request, tmp_path, io_backend):
    """Factory: `start_gateway(*extra_flags, spool_dir=None, sink=None)` -> a running Gateway."""
    binary = gateway_binary()
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing: build it (cargo build --release) or set SMTPGW_BIN")
    started: list[Gateway] = []
    request.node.stash[GATEWAYS] = started

    def start(*args: str, spool_dir: Path | None = None, sink: tuple[str, ...] | None = None) -> Gateway:
        if io_backend and "--io-backend" not in args:
            args = ("--io-backend", io_backend, *args)
        gateway = Gateway(spool_dir or tmp_path / f"spool-{len(started)}", args, sink)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.close()


@pytest.fixture
def gateway(start_gateway) -> Gateway:
    """A gateway with default settings on a fresh spool."""
    return start_gateway()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for i, gateway in enumerate(item.stash.get(GATEWAYS, [])):
            report.sections.append((f"smtpgw #{i} stderr (pid {gateway.proc.pid})", gateway.all_stderr[-20000:]))
