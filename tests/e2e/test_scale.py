"""10,000 concurrent sessions through the real binary, on each I/O backend: all connect
first, then every one sends a message at once; each gets its 250 and 221, and the
gateway ends with the descriptors it started with. Loopback only, bounded in time."""

from __future__ import annotations

import asyncio
import resource

import pytest

from test_stress import open_fds, poll, raise_nofile

SESSIONS = 10_000


async def crowd(host: str, port: int) -> list[bytes]:
    gate = asyncio.Event()
    connected = 0

    async def session() -> bytes:
        nonlocal connected
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        try:
            greeting = await reader.readline()
            connected += 1
            if connected == SESSIONS:
                gate.set()
            await gate.wait()
            writer.write(
                b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"
                b"Subject: crowd\r\n\r\nhello\r\n.\r\nQUIT\r\n"
            )
            await writer.drain()
            rest = await reader.read()
            return greeting + rest
        finally:
            writer.close()

    return await asyncio.wait_for(asyncio.gather(*(session() for _ in range(SESSIONS))), 120)


def test_ten_thousand_concurrent_sessions(start_gateway):
    # Our 10,000 sockets, plus the gateway's 10,000 in its own process.
    raise_nofile(SESSIONS + 500)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= SESSIONS + 100, f"RLIMIT_NOFILE hard limit too low for this test: {soft}"
    # The backend comes from the start_gateway fixture (both, by default).
    gw = start_gateway("--max-connections", str(SESSIONS + 100))
    before = open_fds(gw.pid)
    ends = asyncio.run(crowd(gw.host, gw.port))
    ok = [e for e in ends if e.startswith(b"220 ") and b"\r\n250 2.0.0 Ok: queued as " in e and b"\r\n221 2.0.0 " in e]
    assert len(ok) == SESSIONS, [e for e in ends if e not in ok][:3]
    poll(lambda: open_fds(gw.pid) <= before, 20, "the gateway to close every connection")
