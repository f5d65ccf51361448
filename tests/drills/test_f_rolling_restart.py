"""Drill f: a rolling restart of two gateways behind one pool of MTA-like clients.

Two gateways, each on a port of its own and with its own spool (a spool is never
shared), take mail from one client pool that moves to the other gateway on `421`, a
refused connection or any `4xx`, as MTAs do with several MX hosts, and opens a new
connection, to the next gateway, every 10 messages. Under load, the
first gateway is stopped with SIGTERM, waited for and started again, then the second.
(The fixture starts every gateway on a fresh free port, so the pool reads the
addresses back after each failure, as a client behind a load balancer would reach the
new process; the old port refuses, as the same port does while nothing listens.) Then: no acknowledged message is missing from the two spools, none is
refused for good (no `5xx`), and every message the pool held is accepted in the end.
"""

from __future__ import annotations

import signal
import time

import pytest

from drill import Load, account, acked, ready, report, spool_records
from e2e_conftest import wait_for

DRAIN_TIMEOUT = 5


@pytest.mark.timeout(120)
def test_f_rolling_restart_loses_and_bounces_nothing(start_gateway, io_backend, tmp_path):
    gateways = [start_gateway("--reactors", "1", "--drain-timeout", str(DRAIN_TIMEOUT)) for _ in range(2)]
    for g in gateways:
        wait_for("/readyz 200", lambda: ready(g), timeout=20)
    ports = [g.port for g in gateways]  # of every process, in start order
    load = Load(lambda: [(g.host, g.port) for g in gateways], workers=6, per_connection=10, pace=0.02).start()
    time.sleep(1.5)
    restarts = []
    for i, gateway in enumerate(gateways):
        stopping = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(DRAIN_TIMEOUT + 5)
        assert code == 0, f"gateway {i} exited {code} on SIGTERM"
        stopped = time.monotonic()
        gateway.start()
        ports.append(gateway.port)
        wait_for("/readyz 200 after the restart", lambda: ready(gateway), timeout=20)
        restarts.append((stopped - stopping, time.monotonic() - stopped))

        def new_process_took_mail() -> bool:
            return any(a.target[1] == gateway.port for a in acked(load.attempts))

        # The pool moves over as its connections end (every 10 messages).
        wait_for("the restarted gateway to take mail", new_process_took_mail, timeout=20)
        time.sleep(1.0)
    attempts = load.stop(finish=15)

    records: dict[str, list[bytes]] = {}
    for i, gateway in enumerate(gateways):
        for message_id, values in spool_records(gateway, tmp_path / f"export-{i}.mbox").items():
            records.setdefault(message_id, []).extend(values)
    counts = account(attempts, records)
    per_process = [sum(1 for a in acked(attempts) if a.target[1] == p) for p in ports]
    report(
        f"f rolling-restart [{io_backend}]",
        counts,
        acked_per_process=per_process,
        drain_s=max(r[0] for r in restarts),
        restart_s=max(r[1] for r in restarts),
        refused_connects=load.connect_failures,
    )
    assert counts.lost == 0, f"acknowledged but missing or altered: {counts.lost_ids[:10]}"
    assert counts.perm == 0, [a.reply for a in attempts if a.code and a.code >= 500][:5]
    assert not load.unfinished, f"messages the pool never got accepted: {load.unfinished}"
    assert len(set(ports)) == 4 and all(per_process), f"a gateway process took no mail: {per_process}"
