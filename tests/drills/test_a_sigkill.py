"""Drill a: SIGKILL the gateway under load, start it again, and find every message that
got `250` in the store, byte for byte: in the spool (spool sink) or in the topic
(Kafka sink, on the shared test broker, a topic of the drill's own).

The clients keep sending through the kill (refused connections, lost replies) and the
restart; a message whose `250` never arrived is sent again, so duplicates are allowed
and counted, losses are not.
"""

from __future__ import annotations

import time

import pytest

from drill import KAFKA, Load, account, acked, create_topic, kafka_sink, ready, report, require, spool_records, topic_records
from e2e_conftest import wait_for


@pytest.mark.parametrize("sink", ["spool", "kafka"])
def test_a_sigkill_under_load_loses_no_acknowledged_message(start_gateway, io_backend, sink, tmp_path):
    if sink == "kafka":
        require(KAFKA is not None, "SMTPGW_TEST_KAFKA not set (scripts/kafka-broker.sh start)")
        pytest.importorskip("confluent_kafka")
        topic = create_topic(KAFKA, "drill.sigkill")
        gateway = start_gateway("--reactors", "2", "--publish-timeout", "5s", sink=kafka_sink(KAFKA, topic))
    else:
        gateway = start_gateway("--reactors", "2")
    wait_for("/readyz 200", lambda: ready(gateway), timeout=20)

    load = Load(lambda: [(gateway.host, gateway.port)], workers=6, pace=0.02).start()
    time.sleep(2.0)
    before_kill = len(acked(load.attempts))
    gateway.kill9()
    killed = time.monotonic()
    time.sleep(0.5)  # the clients meet a dead port
    gateway.start()
    wait_for("/readyz 200 after the restart", lambda: ready(gateway), timeout=20)
    restarted = time.monotonic()
    time.sleep(1.5)
    attempts = load.stop(finish=10)

    if sink == "kafka":
        records = topic_records(KAFKA, topic, {a.msg_id for a in acked(attempts)})
    else:
        records = spool_records(gateway, tmp_path / "export.mbox")
    counts = account(attempts, records)
    after = sum(1 for a in acked(attempts) if a.started >= restarted)
    report(
        f"a sigkill {sink} [{io_backend}]",
        counts,
        acked_before_kill=before_kill,
        acked_after_restart=after,
        down_s=restarted - killed,
    )
    assert before_kill > 0 and after > 0, "the load did not run on both sides of the kill"
    assert counts.lost == 0, f"acknowledged but missing or altered: {counts.lost_ids[:10]}"
    assert counts.perm == 0
    assert not load.unfinished, f"messages never accepted after the restart: {load.unfinished}"
