"""sd_notify: what the gateway tells systemd through NOTIFY_SOCKET, checked on a unix
datagram socket the test listens on (as systemd does for Type=notify).

READY=1 only once the SMTP port accepts (checked by connecting the moment READY=1
arrives, to the address its STATUS= names), WATCHDOG=1 every half WATCHDOG_USEC and only
for this process, RELOADING=1 then READY=1 around a SIGHUP, STOPPING=1 when a SIGTERM
starts the drain, before the process exits; READY=1 never when a listener cannot bind.
"""

from __future__ import annotations

import re
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import io_backend_args, run_binary, wait_for

STATUS_ADDR = re.compile(r"^STATUS=accepting on (\S+) ", re.M)


class NotifySocket:
    """A bound AF_UNIX datagram socket collecting every message sent to it. When the
    first READY=1 arrives, the reader connects to the address its STATUS= names at once
    and keeps the first line it got (the greeting, or the error)."""

    def __init__(self):
        # A short directory: a unix socket path must fit in 108 bytes.
        self._dir = tempfile.TemporaryDirectory(prefix="smtpgw-notify-")
        self.path = str(Path(self._dir.name) / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.greeting_at_ready: str | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            if "READY=1" in text.splitlines() and self.greeting_at_ready is None:
                self.greeting_at_ready = self._greet(text)
            self.messages.append((time.monotonic(), text))

    @staticmethod
    def _greet(text: str) -> str:
        match = STATUS_ADDR.search(text)
        if not match:
            return f"no address in READY message {text!r}"
        host, _, port = match.group(1).rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5) as conn:
                return conn.makefile("rb").readline().decode("utf-8", "replace")
        except OSError as error:
            return f"connect to {match.group(1)} failed: {error}"

    def states(self) -> list[str]:
        """Every KEY=VALUE line received, in order."""
        return [line for _, text in list(self.messages) for line in text.splitlines() if line]

    def count(self, state: str) -> int:
        return self.states().count(state)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        self.sock.close()
        self._dir.cleanup()


@pytest.fixture
def notify_socket():
    listener = NotifySocket()
    yield listener
    listener.close()


def test_ready_watchdog_reload_and_stopping(start_gateway, notify_socket):
    gateway = start_gateway(env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"})
    wait_for("READY=1", lambda: notify_socket.count("READY=1") >= 1, timeout=10)
    first = notify_socket.messages[0][1].splitlines()
    assert first[0] == "READY=1", f"the first message must be READY=1: {notify_socket.states()}"
    assert notify_socket.greeting_at_ready is not None
    assert notify_socket.greeting_at_ready.startswith("220 "), (
        f"READY=1 arrived before the SMTP port accepted: {notify_socket.greeting_at_ready!r}"
    )
    status = next(line for line in first if line.startswith("STATUS="))
    assert f"accepting on {gateway.addr} ({gateway.backend} backend" in status, status

    # Pings every 200 ms: a few within seconds, and only after READY.
    wait_for("three WATCHDOG=1 pings", lambda: notify_socket.count("WATCHDOG=1") >= 3, timeout=10)
    # Still pinging while serving mail.
    with gateway.session() as wire:
        wire.expect("NOOP", "250")
        pings = notify_socket.count("WATCHDOG=1")
        wait_for("pings during a session", lambda: notify_socket.count("WATCHDOG=1") > pings, timeout=10)

    # A reload: RELOADING=1 (with the monotonic time systemd 253+ asks for), then READY=1.
    gateway.send_signal(signal.SIGHUP)
    wait_for("READY=1 after the reload", lambda: notify_socket.count("READY=1") >= 2, timeout=10)
    states = [s for s in notify_socket.states() if s != "WATCHDOG=1"]
    reloading = states.index("RELOADING=1")
    assert states[reloading + 1].startswith("MONOTONIC_USEC="), states
    assert "READY=1" in states[reloading:], states

    assert gateway.stop() == 0
    # Sent before the exit, but the reader thread may not have taken it off the socket yet.
    wait_for("STOPPING=1", lambda: notify_socket.count("STOPPING=1") >= 1, timeout=5)
    states = notify_socket.states()
    after_stop = states[states.index("STOPPING=1") :]
    assert "READY=1" not in after_stop, states
    assert states.count("STOPPING=1") == 1, states
    assert "sd_notify to NOTIFY_SOCKET failed" not in gateway.stderr


@pytest.mark.parametrize(
    "watchdog_env",
    [{}, {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}],
    ids=["no-watchdog-usec", "watchdog-for-another-pid"],
)
def test_no_watchdog_pings_unless_asked_for_this_process(start_gateway, notify_socket, watchdog_env):
    gateway = start_gateway(env={"NOTIFY_SOCKET": notify_socket.path, **watchdog_env})
    wait_for("READY=1", lambda: notify_socket.count("READY=1") >= 1, timeout=10)
    # With a 200 ms interval a wrongly started watchdog pings ~15 times in 1.5 s.
    time.sleep(1.5)
    assert notify_socket.count("WATCHDOG=1") == 0, notify_socket.states()
    assert gateway.stop() == 0
    wait_for("STOPPING=1", lambda: notify_socket.count("STOPPING=1") >= 1, timeout=5)
    assert notify_socket.count("STOPPING=1") == 1


def test_no_ready_when_a_listener_cannot_bind(io_backend, notify_socket):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_binary(
            *("--listen", f"127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:0"),
            *("--accept-domain", "example.com", "--sink", "null"),
            *io_backend_args(io_backend),
            env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000"},
            timeout=30,
        )
    assert result.returncode == 1, result.stderr.decode(errors="replace")
    assert f"--listen 127.0.0.1:{port}" in result.stderr.decode(errors="replace")
    time.sleep(0.2)  # whatever was sent is in the socket by now; give the reader a turn
    states = notify_socket.states()
    assert "READY=1" not in states and "WATCHDOG=1" not in states, states


def test_notify_socket_nobody_listens_on_is_not_fatal(start_gateway, tmp_path):
    gateway = start_gateway(env={"NOTIFY_SOCKET": str(tmp_path / "nobody.sock"), "WATCHDOG_USEC": "200000"})
    wait_for("the failed sd_notify logged", lambda: "sd_notify to NOTIFY_SOCKET failed" in gateway.stderr, timeout=10)
    with gateway.smtplib() as client:
        code, _ = client.noop()
        assert code == 250
    assert gateway.stop() == 0
