"""Hostile crowds against the connection driver's limits, through the real binary.

Silent clients are closed at the idle timeout, trickling bodies by the minimum data
rate, clients that never read stay bounded, and a connect/close flood leaks neither
descriptors nor memory, while normal clients in the same test get every message
through. Bounded in count and time; loopback only.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time

from smtpwire import make_message

SILENT = 1000
TRICKLERS = 1000
NORMAL = 50
MESSAGES_EACH = 20


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def poll(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def normal_client(host: str, port: int, n: int, token: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    ok = 0
    try:
        assert (await read_reply(reader)).startswith(b"220")
        writer.write(b"EHLO normal.test\r\n")
        assert (await read_reply(reader)).startswith(b"250")
        for i in range(n):
            writer.write(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
            for code in (b"250", b"250", b"354"):
                assert (await read_reply(reader)).startswith(code)
            writer.write(make_message(f"{token}-{i}").replace(b"\r\n.", b"\r\n..") + b".\r\n")
            if (await read_reply(reader)).startswith(b"250 2.0.0 Ok: queued as"):
                ok += 1
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
    finally:
        writer.close()
    return ok


async def silent_client(host: str, port: int) -> bytes:
    """Connects, reads the greeting, says nothing; returns what the server said last."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        greeting = await read_reply(reader)
        assert greeting.startswith(b"220"), greeting
        return await read_reply(reader)
    finally:
        writer.close()


async def trickler(host: str, port: int, stop: asyncio.Event) -> bytes:
    """Starts a message, then sends a few bytes a second, each well within the idle
    timeout; returns the reply that ended it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert (await read_reply(reader)).startswith(b"220")
        writer.write(b"EHLO slow.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
        for code in (b"250", b"250", b"250", b"354"):
            assert (await read_reply(reader)).startswith(code)
        pending = asyncio.ensure_future(read_reply(reader))
        while not stop.is_set():
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            if done:
                return pending.result()
            writer.write(b"x\r\n")
        pending.cancel()
        return b""
    finally:
        writer.close()


def test_silent_and_trickling_crowds_are_closed_while_normal_clients_go_on(start_gateway):
    raise_nofile(8192)
    gw = start_gateway("--idle-timeout", "3s", "--min-data-rate", "1K/3s", "--max-connections", "5000")
    host, port = gw.host, gw.port

    async def scenario():
        stop = asyncio.Event()
        silent = [asyncio.ensure_future(silent_client(host, port)) for _ in range(SILENT)]
        slow = [asyncio.ensure_future(trickler(host, port, stop)) for _ in range(TRICKLERS)]
        normal = await asyncio.wait_for(
            asyncio.gather(*(normal_client(host, port, MESSAGES_EACH, f"n{i}") for i in range(NORMAL))),
            timeout=60,
        )
        silent_ends = await asyncio.wait_for(asyncio.gather(*silent, return_exceptions=True), timeout=30)
        slow_ends = await asyncio.wait_for(asyncio.gather(*slow, return_exceptions=True), timeout=30)
        stop.set()
        return normal, silent_ends, slow_ends

    normal, silent_ends, slow_ends = asyncio.run(scenario())
    assert normal == [MESSAGES_EACH] * NORMAL
    timeouts = [e for e in silent_ends if isinstance(e, bytes) and e.startswith(b"421 4.4.2") and b"Timeout" in e]
    assert len(timeouts) == SILENT, [e for e in silent_ends if e not in timeouts][:5]
    too_slow = [e for e in slow_ends if isinstance(e, bytes) and b"Data rate too low" in e]
    assert len(too_slow) == TRICKLERS, [e for e in slow_ends if e not in too_slow][:5]
    poll(lambda: open_fds(gw.pid) < 100, 10, "the gateway to close every connection")


def test_clients_that_never_read_stay_bounded(start_gateway):
    gw = start_gateway()
    pid = gw.pid
    payload = b"HELP\r\n" * 4096

    def connect(n: int) -> list:
        new = []
        for _ in range(n):
            s = socket.create_connection((gw.host, gw.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            new.append(s)
        return new

    def send_until_pushed_back(socks: list, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            progressed = False
            for s in socks:
                try:
                    progressed = s.send(payload) > 0 or progressed
                except BlockingIOError:
                    pass
            if not progressed:
                time.sleep(0.05)

    # What one more never-reading client costs, measured as the growth from 40 to 80 of
    # them: the process's one-time costs (the first connection of each reactor, the log
    # writer's buffers, allocator arenas) are paid by the first 40 and cancel out.
    socks = []
    try:
        socks += connect(40)
        send_until_pushed_back(socks, 3)
        at_40 = proc_status(pid, "VmRSS")
        socks += connect(40)
        send_until_pushed_back(socks, 3)
        per_client_kib = (proc_status(pid, "VmRSS") - at_40) / 40
        print(f"RSS per never-reading client: {per_client_kib:.1f} KiB")
        # Each connection may hold its output cap, its pending input and what arrived
        # while it was paused; the kernel buffers the rest (and pushes back on the client).
        assert per_client_kib <= 64, f"RSS grew {per_client_kib:.1f} KiB per never-reading client"
    finally:
        for s in socks:
            s.close()


def test_connect_close_flood_leaks_no_descriptors_or_memory(start_gateway):
    gw = start_gateway()
    pid = gw.pid

    def flood(n: int) -> None:
        for i in range(n):
            s = socket.create_connection((gw.host, gw.port))
            if i % 2:
                s.recv(64)
            s.close()

    flood(2000)  # warm up: allocator pools, the reactors' slot tables
    poll(lambda: open_fds(pid) < 100, 10, "connections to close")
    fds, rss = open_fds(pid), proc_status(pid, "VmRSS")
    flood(5000)
    poll(lambda: open_fds(pid) <= fds, 10, f"descriptors to return to {fds}")
    assert proc_status(pid, "VmRSS") - rss < 2048, "RSS grew by more than 2 MiB over 5,000 connections"
