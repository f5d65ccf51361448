"""Connection lifecycle: idle timeout, session time cap, connection limit, graceful drain."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import wait_for
from smtpwire import IO_TIMEOUT, assert_reply, data_payload, make_message, queued_id


def next_reply(wire, command: str, wait: float = 1.0):
    """The server's next reply: one it sends on its own within `wait` seconds (a 421 on
    shutdown, say), or else its answer to `command`."""
    wire.sock.settimeout(wait)
    try:
        return wire.reply()
    except socket.timeout:
        pass
    finally:
        wire.sock.settimeout(IO_TIMEOUT)
    wire.send(command + "\r\n")
    return wire.reply()


def assert_closes_with(wire, spec: str, what: str) -> None:
    assert_reply(next_reply(wire, "NOOP"), spec, what)
    assert wire.closed_by_server(), f"{what}: connection left open after the reply"


# --- idle timeout and session cap ---------------------------------------------------


def start_data(wire) -> None:
    wire.envelope()
    wire.expect("DATA", "354")
    wire.send(b"Subject: unfinished\r\n\r\nhalf a bo")


def start_bdat(wire) -> None:
    wire.envelope()
    wire.send(b"BDAT 100 LAST\r\nSubject: unfinished\r\n")


IDLE_PLACES = {
    "before-ehlo": lambda wire: None,
    "between-commands": lambda wire: wire.hello(),
    "mid-data": lambda wire: (wire.hello(), start_data(wire)),
    "mid-bdat": lambda wire: (wire.hello(), start_bdat(wire)),
    "mid-command-line": lambda wire: (wire.hello(), wire.send(b"MAIL FROM:<a@b")),
}


@pytest.mark.parametrize("where", IDLE_PLACES)
def test_idle_timeout_replies_421_and_closes(start_gateway, where):
    gateway = start_gateway("--idle-timeout", "1")
    with gateway.wire() as wire:
        assert_reply(wire.reply(), "220", "greeting")
        IDLE_PLACES[where](wire)
        started = time.monotonic()
        assert_reply(wire.reply(), "421 4.4.2", "idle client")
        waited = time.monotonic() - started
        assert wire.closed_by_server()
    assert 0.5 <= waited <= 5, f"timed out after {waited:.1f}s with --idle-timeout 1"
    assert gateway.spool_ids() == []


def test_activity_keeps_a_session_alive(start_gateway):
    # A NOOP every 0.5 s for 5 s against a 3 s idle timeout: a scheduling delay of
    # 2.5 s on a busy machine still does not make the client look idle.
    gateway = start_gateway("--idle-timeout", "3")
    with gateway.session() as wire:
        for _ in range(10):
            time.sleep(0.5)
            wire.expect("NOOP", "250 2.0.0")
        wire.deliver(make_message("kept-alive"))


def noop_every_200ms(wire, until: float):
    while time.monotonic() < until:
        reply = wire.cmd("NOOP")
        if reply.code != 250:
            return reply
        time.sleep(0.2)
    return reply


def drip_body_bytes(wire, until: float):
    """A slow-loris DATA: one byte every 200 ms, never idle, never finished."""
    wire.envelope()
    wire.expect("DATA", "354")
    wire.sock.settimeout(0.2)
    try:
        while time.monotonic() < until:
            wire.send(b"x")
            try:
                return wire.reply()
            except socket.timeout:
                pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        wire.sock.settimeout(IO_TIMEOUT)
    return wire.reply()


@pytest.mark.parametrize("client", [noop_every_200ms, drip_body_bytes], ids=["noop-loop", "slow-data"])
def test_session_time_is_capped_even_for_busy_clients(start_gateway, client):
    gateway = start_gateway("--max-session-time", "2", "--idle-timeout", "30")
    with gateway.session() as wire:
        started = time.monotonic()
        reply = client(wire, started + 8)
        assert_reply(reply, "421", "session over --max-session-time")
        assert wire.closed_by_server()
    assert time.monotonic() - started < 6
    assert gateway.spool_ids() == []


# --- connection limit ---------------------------------------------------------------


def test_connection_over_the_limit_gets_421(start_gateway):
    gateway = start_gateway("--max-connections", "3")
    held = [gateway.session() for _ in range(3)]
    try:
        with gateway.wire() as extra:
            assert_reply(extra.reply(), "421", "connection over --max-connections")
            assert extra.closed_by_server()
        held.pop().expect("QUIT", "221 2.0.0")
        deadline = time.monotonic() + 5
        while True:  # the freed slot is usable once the server has seen the close
            with gateway.wire() as again:
                if again.reply().code == 220:
                    again.hello()
                    break
            assert time.monotonic() < deadline, "no slot freed after a client quit"
            time.sleep(0.1)
    finally:
        for wire in held:
            wire.close()


# --- graceful shutdown --------------------------------------------------------------


def refuses_new_connections(gateway) -> bool:
    """A connection attempt during drain is refused, closed, or told 421."""
    try:
        wire = gateway.wire()
    except ConnectionRefusedError:
        return True
    with wire:
        wire.sock.settimeout(3)
        try:
            return wire.reply().code == 421
        except (EOFError, ConnectionResetError):
            return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_gateway_exits_0_on_signal(gateway, sig):
    started = time.monotonic()
    assert gateway.stop(sig) == 0
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_sigterm_drains_sessions_and_finishes_messages_in_flight(start_gateway):
    drain_timeout = 5
    gateway = start_gateway("--drain-timeout", str(drain_timeout))
    message = make_message("drained", b"d" * 70 + b"\r\n" * 100)
    payload = data_payload(message)
    with gateway.session() as idle, gateway.session() as busy:
        busy.envelope()
        busy.expect("DATA", "354")
        busy.send(payload[:2000])  # mid-DATA since the 354, whenever the server reads it

        gateway.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for("/readyz 503 (draining)", lambda: gateway.http_get("/readyz")[0] == 503, timeout=5)
        assert_closes_with(idle, "421 4.3.2", "idle session during drain")
        busy.send(payload[2000:])
        message_id = queued_id(busy.reply())  # the message under way still gets its 250
        assert_closes_with(busy, "421 4.3.2", "session after its message, during drain")
        assert refuses_new_connections(gateway), "new connection served during drain"

    code = gateway.wait(drain_timeout + 5)
    assert code == 0, f"exit code {code} after SIGTERM"
    assert time.monotonic() - signalled <= drain_timeout + 2
    assert gateway.spool_ids() == [message_id]
    assert gateway.cat(message_id, body=True) == message


@pytest.mark.timeout(60)
def test_drain_timeout_bounds_shutdown_with_a_stuck_client(start_gateway):
    gateway = start_gateway("--drain-timeout", "2")
    with gateway.session() as stuck:
        start_data(stuck)
        gateway.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The client is mid-DATA and says nothing more; at the drain timeout the
        # gateway tells it why the connection ends instead of just dropping it.
        stuck.sock.settimeout(2 + 3)
        assert_reply(stuck.reply(), "421 4.3.2", "at the drain timeout")
        assert stuck.closed_by_server(), "connection left open after the 421"
        code = gateway.wait(10)
    assert code == 0
    assert time.monotonic() - signalled <= 2 + 2
    assert gateway.spool_ids() == []


def reactor_cpus(pid: int) -> dict[str, str]:
    """Each reactor thread's allowed CPUs (`Cpus_allowed_list`), by thread id (names are
    cut to 15 bytes, so `smtpgw-reactor-0` and `-1` read the same)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        if name.startswith(("smtpgw-uring-", "smtpgw-reactor-")):
            status = (task / "status").read_text()
            out[task.name] = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M).group(1)
    return out


@pytest.mark.parametrize("pinning", ["default", "off"])
def test_reactor_threads_are_pinned_unless_told_not_to(start_gateway, io_backend, pinning):
    """io_uring reactors each run on one CPU by default; `--no-cpu-pinning` leaves them
    the process's whole CPU set, as epoll reactors always have."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.fail("needs a machine with at least 2 CPUs to tell pinned from unpinned")
    extra = ("--no-cpu-pinning",) if pinning == "off" else ()
    gateway = start_gateway("--reactors", "2", *extra)
    # A reactor thread may still be starting when the listener is announced.
    def both():
        threads = reactor_cpus(gateway.proc.pid)
        return threads if len(threads) == 2 else None

    threads = wait_for("both reactor threads", both, timeout=10)
    everything = {str(c) for c in allowed}

    def cpus(spec: str) -> set[str]:
        result = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            result |= {str(c) for c in range(int(lo), int(hi or lo) + 1)}
        return result

    if io_backend == "uring" and pinning == "default":
        assert all(len(cpus(v)) == 1 for v in threads.values()), threads
        assert len({v for v in threads.values()}) == 2, f"both reactors on one CPU: {threads}"
        assert "pinned_to_cpus=true" in gateway.stderr
    else:
        assert all(cpus(v) == everything for v in threads.values()), threads
