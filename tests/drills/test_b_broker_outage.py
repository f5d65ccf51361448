"""Drill b: the broker goes away for 10 s under load and comes back.

The broker is a tansu of the drill's own (not the shared test broker), reached through
a TCP forwarder whose port is the one the broker advertises. tansu's only storage is
memory, so the drill stops the broker two ways:

- `cut` (the `fallback` and `no-fallback` variants): the forwarder's port refuses
  connections and every open connection is reset, which is all a client can see of a
  stopped broker, while tansu behind it keeps the records it acknowledged; so every
  `250` of the whole drill is checked against the topic.
- `restart` (`no-fallback-restart`): the tansu process is stopped (SIGTERM) with the
  forwarder's port closed, and a new one started 10 s later: a real stop and start,
  after which the broker knows neither the records nor the gateway's idempotent
  producer. Only the `250`s from the new broker's start on can be checked.

With `--spool-fallback`: no `451` at all; once the forwarder has drained the backlog,
every acknowledged message is in the topic, byte for byte. Without it: `451` during
the outage, never a `250` without a record, and `250`s again within seconds of the
broker's return (measured and reported; the bound asserted is generous, the machine
is shared).
"""

from __future__ import annotations

import time

import pytest

from drill import (
    Load,
    OutageProxy,
    Tansu,
    account,
    acked,
    first_250_after,
    kafka_sink,
    rate,
    ready,
    report,
    require,
    tansu_binary,
    topic_records,
)
from e2e_conftest import wait_for

OUTAGE = 10.0
TOPIC = "drill.outage"


class OwnBroker:
    """tansu behind an OutageProxy, with the topic created."""

    def __init__(self, binary):
        self.binary = binary
        self.proxy = OutageProxy()
        self.addr = self.proxy.addr
        self.tansu: Tansu | None = None
        self.start()

    def start(self) -> None:
        """A new tansu (empty) behind the forwarder, which it then opens."""
        self.tansu = Tansu(self.binary, advertised_port=self.proxy.port)
        self.proxy.upstream = self.tansu.port
        self.tansu.create_topic(TOPIC)
        self.proxy.up()

    def stop(self) -> None:
        self.proxy.down()
        self.tansu.stop()

    def close(self) -> None:
        try:
            self.proxy.close()
        finally:
            self.tansu.stop()


@pytest.fixture
def broker():
    pytest.importorskip("confluent_kafka")
    binary = tansu_binary()
    require(binary is not None, "no tansu broker: scripts/kafka-broker.sh start installs it (or set SMTPGW_TANSU)")
    broker = OwnBroker(binary)
    try:
        yield broker
    finally:
        broker.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("variant", ["fallback", "no-fallback", "no-fallback-restart"])
def test_b_broker_outage_under_load(start_gateway, io_backend, broker, variant, tmp_path):
    fallback = variant == "fallback"
    restart = variant.endswith("restart")
    extra = ("--spool-fallback", "--spool-dir", str(tmp_path / "fallback")) if fallback else ()
    gateway = start_gateway("--reactors", "2", "--publish-timeout", "3s", sink=kafka_sink(broker.addr, TOPIC) + extra)
    wait_for("/readyz 200", lambda: ready(gateway), timeout=30)

    load = Load(lambda: [(gateway.host, gateway.port)], workers=4, pace=0.03).start()
    time.sleep(2.5)
    down = time.monotonic()
    if restart:
        broker.stop()
    else:
        broker.proxy.down()
    time.sleep(OUTAGE)
    if restart:
        broker.start()
    else:
        broker.proxy.up()
    up = time.monotonic()
    figures: dict[str, float] = {}
    if fallback:

        def drained() -> bool:
            return gateway.metric("smtpgw_forward_awaiting_records") == 0

        # The backlog drains while the clients go on sending (now straight to Kafka).
        wait_for("the forwarder to drain the backlog", drained, timeout=60, interval=0.1)
        figures["drained_after_s"] = time.monotonic() - up
        time.sleep(2)
        attempts = load.stop(finish=10)
        wait_for("the forwarder to drain what came since", drained, timeout=60, interval=0.1)
    else:
        wait_for("a 250 after the broker's return", lambda: first_250_after(load.attempts, up), timeout=60, interval=0.1)
        back = first_250_after(load.attempts, up)
        time.sleep(2)
        attempts = load.stop(finish=10)
        figures["recovery_s"] = back - up
        figures["rate_before"] = rate(attempts, down - 2, down)
        figures["rate_after"] = rate(attempts, back, back + 2)
    # From half a second in: an acknowledgement already on its way at the cut may land.
    during = [a for a in attempts if down + 0.5 <= a.ended < up]
    figures["acked_during_outage"] = sum(1 for a in during if a.code == 250)
    figures["451_during_outage"] = sum(1 for a in during if a.code == 451)

    if restart:
        # The new broker holds only what was sent from its start on.
        attempts = [a for a in attempts if a.started >= up]
    records = topic_records(broker.addr, TOPIC, {a.msg_id for a in acked(attempts)})
    counts = account(attempts, records)
    report(f"b broker-outage {variant} [{io_backend}]", counts, **figures)
    assert counts.lost == 0, f"acknowledged but not in the topic (or altered): {counts.lost_ids[:10]}"
    assert counts.perm == 0
    assert not load.unfinished, f"messages never accepted: {load.unfinished}"
    if fallback:
        assert counts.temp == 0, [a.reply for a in attempts if a.code and 400 <= a.code < 500][:5]
        assert counts.noreply == 0
        assert figures["acked_during_outage"] > 0, "no message was taken while the broker was away"
    else:
        assert figures["acked_during_outage"] == 0, "250 while no broker was reachable"
        assert figures["451_during_outage"] > 0, "no 451 while the broker was away"
        # Generous: the gateway probes once a second; the machine is shared and noisy.
        assert figures["recovery_s"] < 20
