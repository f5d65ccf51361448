"""Drill c: SIGTERM under load. Messages in flight finish with `250`, new commands get
`421`, `/readyz` answers 503 during the drain, the process exits 0 before the drain
deadline, and every `250` is in the spool. The sd_notify `STOPPING=1` check is a test
of its own (it lands with the deploy work).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from drill import IO_TIMEOUT, Load, SmtpConn, account, acked, new_message, not_ready, ready, report, spool_records
from e2e_conftest import wait_for
from smtpwire import QUEUED, data_payload

DRAIN_TIMEOUT = 8
IN_FLIGHT = 4


def open_mid_data(gateway) -> tuple[SmtpConn, bytes]:
    """A session in the middle of a message's DATA: the first half of it sent."""
    conn = SmtpConn((gateway.host, gateway.port))
    for command, want in ((None, 220), ("EHLO inflight.test", 250), ("MAIL FROM:<a@client.test>", 250), ("RCPT TO:<x@example.com>", 250), ("DATA", 354)):
        code, text = conn.reply() if command is None else conn.cmd(command)
        assert code == want, f"{command}: {text}"
    _, message = new_message("inflight", 4000)
    payload = data_payload(message)
    conn.send(payload[: len(payload) // 2])
    return conn, message


def next_reply(conn: SmtpConn, command: str, wait: float = 1.0) -> tuple[int, str]:
    """A reply the server sends on its own within `wait` (a 421 at drain), else its
    answer to `command`."""
    conn.sock.settimeout(wait)
    try:
        return conn.reply()
    except socket.timeout:
        pass
    finally:
        conn.sock.settimeout(IO_TIMEOUT)
    return conn.cmd(command)


def refused_or_421(gateway) -> bool:
    try:
        conn = SmtpConn((gateway.host, gateway.port), timeout=3)
    except OSError:
        return True
    try:
        return conn.reply()[0] == 421
    except (OSError, EOFError):
        return True
    finally:
        conn.close()


@pytest.mark.timeout(90)
def test_c_sigterm_under_load_drains_cleanly(start_gateway, io_backend, tmp_path):
    gateway = start_gateway("--reactors", "2", "--drain-timeout", str(DRAIN_TIMEOUT))
    wait_for("/readyz 200", lambda: ready(gateway), timeout=20)
    load = Load(lambda: [(gateway.host, gateway.port)], workers=6, pace=0.02).start()
    time.sleep(2.0)
    in_flight = [open_mid_data(gateway) for _ in range(IN_FLIGHT)]

    gateway.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for("/readyz 503 (draining)", lambda: not_ready(gateway), timeout=5, interval=0.02)
    readyz_503_after = time.monotonic() - signalled
    # The messages under way still get their 250, then the next command its 421.
    finished: list[tuple[str, bytes]] = []
    after: list[int] = []
    for conn, message in in_flight:
        payload = data_payload(message)
        conn.send(payload[len(payload) // 2 :])
        code, text = conn.reply()
        assert code == 250, f"a message in flight at SIGTERM got {text!r}"
        finished.append((QUEUED.search(text).group(1), message))
        after.append(next_reply(conn, "MAIL FROM:<late@client.test>")[0])
        conn.close()
    assert after == [421] * IN_FLIGHT, f"commands after the drain began got {after}"
    assert refused_or_421(gateway), "a new connection was served during the drain"
    attempts = load.stop()

    code = gateway.wait(DRAIN_TIMEOUT + 5)
    exited_after = time.monotonic() - signalled
    assert code == 0, f"exit code {code} after SIGTERM"
    assert exited_after <= DRAIN_TIMEOUT + 2, f"exited {exited_after:.1f}s after SIGTERM, drain timeout {DRAIN_TIMEOUT}s"

    records = spool_records(gateway, tmp_path / "export.mbox")
    counts = account(attempts, records)
    load_421 = sum(1 for a in attempts if a.code == 421 and a.ended >= signalled)
    # A message whose DATA was under way (354 given) finishes with 250 even when the
    # drain began during it; anything else is refused with 421 (or at the door).
    broken = [a for a in attempts if a.stage == "dot" and a.code != 250]
    report(
        f"c sigterm [{io_backend}]",
        counts,
        in_flight_250=len(finished),
        load_421=load_421,
        readyz_503_after_s=readyz_503_after,
        exit_after_s=exited_after,
    )
    assert not broken, f"transactions cut during the drain: {[(a.stage, a.code, a.reply) for a in broken[:5]]}"
    assert all(a.code in (250, 421, None) for a in attempts), {a.code for a in attempts}
    assert counts.lost == 0, f"acknowledged but missing or altered: {counts.lost_ids[:10]}"
    for message_id, message in finished:
        assert any(value.endswith(message) for value in records.get(message_id, [])), message_id
    assert acked(attempts), "the load got no 250 before the signal"


@pytest.mark.timeout(60)
def test_c_sigterm_sends_sd_notify_stopping_when_the_drain_begins(start_gateway):
    """systemd's notify protocol: a datagram `STOPPING=1` on $NOTIFY_SOCKET as the drain
    begins (while a message is still in flight), before the process exits."""
    with contextlib.ExitStack() as stack:
        # A short path: sun_path holds 108 bytes.
        sock_dir = Path(tempfile.mkdtemp(prefix="smtpgw-notify-", dir="/tmp"))
        stack.callback(shutil.rmtree, sock_dir, ignore_errors=True)
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        path = sock_dir / "notify"
        listener.bind(str(path))
        gateway = start_gateway("--drain-timeout", str(DRAIN_TIMEOUT), env={"NOTIFY_SOCKET": str(path)})
        conn, message = open_mid_data(gateway)
        gateway.send_signal(signal.SIGTERM)
        # However the test ends: the session closes, then the drain ends by itself (a
        # second signal would not be a clean exit).
        stack.callback(lambda: gateway.running() and gateway.wait(DRAIN_TIMEOUT + 5))
        stack.callback(conn.close)
        listener.settimeout(5)
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while not any(b"STOPPING=1" in datagram.split(b"\n") for datagram in got):
            assert time.monotonic() < deadline, f"no STOPPING=1 within 5 s of SIGTERM; got {got}"
            try:
                got.append(listener.recv(4096))
            except socket.timeout:
                continue
        assert gateway.running(), "STOPPING=1 must come when the drain begins, not at exit"
        payload = data_payload(message)
        conn.send(payload[len(payload) // 2 :])
        assert conn.reply()[0] == 250
        conn.close()
        assert gateway.wait(DRAIN_TIMEOUT + 5) == 0
