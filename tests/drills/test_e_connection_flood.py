"""Drill e: 10,000 idle connections plus a connect flood from one address, while normal
clients on other addresses keep sending.

The per-address limits apply to loopback here (`--trusted-cidr` names a documentation
prefix instead), so the idle crowd is spread over 400 addresses in 100 /24 prefixes
(25 each, under the per-address and per-prefix caps) and every one of them must get
its `220`; the flood comes from 127.0.0.66 alone, in a process of its own, and meets
the per-address connection rate limit. The normal clients' rate is measured before
and during; only a generous ratio is asserted (the machine has two shared cores).
"""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from drill import Load, account, acked, raise_nofile, rate, ready, report, spool_records
from e2e_conftest import wait_for

IDLE = 10_000
NORMAL_SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
FLOOD_SOURCE = "127.0.0.66"
FLOOD_SECONDS = 6.0
WINDOW = 3.0

FLOOD = r"""
import socket, struct, sys, time
source, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
made = greeted = refused_421 = failed = 0
while time.monotonic() < end:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    except OSError:
        failed += 1
        continue
    try:
        first = s.recv(64)
        greeted += first.startswith(b"220")
        refused_421 += first.startswith(b"421")
    except OSError:
        pass
    # A reset, not a FIN: no TIME_WAIT left behind to use up the source's ports.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    made += 1
print(made, greeted, refused_421, failed)
"""


def idle_sources(n: int) -> list[str]:
    """n addresses, four to a /24: 127.1.P.1-4."""
    return [f"127.1.{i // 4}.{i % 4 + 1}" for i in range(n)]


class IdleCrowd:
    """Connections that take their greeting and then say nothing, held until `close()`.
    Opened in batches of non-blocking connects, so no more SYNs wait at once than a
    listen backlog takes."""

    def __init__(self, port: int):
        self.port = port
        self.socks: list[socket.socket] = []

    def open(self, count: int, sources: list[str], batch: int = 500, timeout: float = 20) -> dict[str, int]:
        outcome: Counter[str] = Counter()
        for first in range(0, count, batch):
            waiting: dict[socket.socket, bytes] = {}
            with selectors.DefaultSelector() as selector:
                for i in range(first, min(first + batch, count)):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    self.socks.append(s)
                    s.setblocking(False)
                    s.bind((sources[i % len(sources)], 0))
                    s.connect_ex(("127.0.0.1", self.port))
                    waiting[s] = b""
                    selector.register(s, selectors.EVENT_READ)
                deadline = time.monotonic() + timeout
                while waiting and time.monotonic() < deadline:
                    for key, _ in selector.select(timeout=0.5):
                        s = key.fileobj
                        try:
                            chunk = s.recv(512)
                        except OSError as error:
                            outcome[type(error).__name__] += 1
                        else:
                            waiting[s] += chunk
                            if chunk and b"\n" not in waiting[s]:
                                continue
                            outcome[waiting[s][:3].decode(errors="replace") or "closed"] += 1
                        selector.unregister(s)
                        del waiting[s]
                outcome["no greeting"] += len(waiting)
        return {k: v for k, v in outcome.items() if v}

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.mark.timeout(150)
def test_e_idle_crowd_and_connect_flood_leave_normal_clients_their_rate(start_gateway, io_backend, tmp_path):
    raise_nofile(IDLE + 2000)
    gateway = start_gateway(
        *("--reactors", "2", "--max-connections", str(IDLE + 2000)),
        # Not loopback: the per-address limits apply to every client of the drill.
        *("--trusted-cidr", "192.0.2.0/24"),
    )
    wait_for("/readyz 200", lambda: ready(gateway), timeout=20)
    load = Load(lambda: [(gateway.host, gateway.port)], workers=len(NORMAL_SOURCES), sources=NORMAL_SOURCES).start()
    crowd = IdleCrowd(gateway.port)
    flood = None
    try:
        time.sleep(0.5)
        base_start = time.monotonic()
        time.sleep(WINDOW)
        base_rate = rate(load.attempts, base_start, base_start + WINDOW)

        opening = time.monotonic()
        idle = crowd.open(IDLE, idle_sources(400))
        opened_s = time.monotonic() - opening
        active = gateway.metric("smtpgw_connections_active")

        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, FLOOD_SOURCE, str(gateway.port), str(FLOOD_SECONDS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        flood_start = time.monotonic()
        time.sleep(1.0)
        during_start = time.monotonic()
        time.sleep(WINDOW)
        flood_rate = rate(load.attempts, during_start, during_start + WINDOW)
        out, _ = flood.communicate(timeout=FLOOD_SECONDS + 30)
        made, greeted, refused_421, failed = map(int, out.split())
        flood_s = time.monotonic() - flood_start
        attempts = load.stop(finish=10)
        assert gateway.running(), "the gateway died under the flood"
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait(timeout=10)
        if not load._stop.is_set():
            load.stop()
        crowd.close()

    records = spool_records(gateway, tmp_path / "export.mbox")
    counts = account(attempts, records)
    report(
        f"e idle+flood [{io_backend}]",
        counts,
        idle_220=idle.get("220", 0),
        idle_open_s=opened_s,
        connections_active=int(active),
        flood_connects=made,
        flood_per_s=made / flood_s,
        flood_421=refused_421,
        flood_220=greeted,
        rate_before=base_rate,
        rate_during=flood_rate,
    )
    assert idle == {"220": IDLE}, f"the idle crowd's greetings: {idle}"
    assert active >= IDLE
    assert refused_421 > 0, "the flood never met the per-address connection rate limit"
    assert counts.lost == 0 and counts.perm == 0 and counts.temp == 0 and counts.noreply == 0
    assert acked(attempts)
    # Generous: client and gateway share two cores with the flood.
    assert flood_rate >= base_rate / 3, f"normal clients: {base_rate:.0f}/s before, {flood_rate:.0f}/s during the flood"
