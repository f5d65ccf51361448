"""Many clients, vanishing clients, and kill -9 in the middle of a load.

The durability promise under test: a message that got `250` is in the spool, intact,
even if the gateway is killed right after; a message that did not complete is never
there; every record in the spool is a whole message that some client sent.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from smtpwire import assert_reply, data_payload, make_message, queued_id, token_of

CONCURRENT = 200


def exported_by_token(gateway, path) -> dict:
    """The spool's messages by the token in their Message-ID; no token may repeat."""
    records = {}
    for record in gateway.export(path):
        token = token_of(record.value)
        assert token is not None, f"stored message without a test token: {record.value[:300]!r}"
        assert token not in records, f"message {token} stored twice"
        records[token] = record
    return records


def test_200_concurrent_sessions(gateway, tmp_path):
    all_connected = threading.Barrier(CONCURRENT, timeout=30)

    def client(i: int) -> tuple[str, bytes]:
        message = make_message(f"concurrent-{i}", f"client {i}\r\n".encode() * (1 + i % 50))
        with gateway.session() as wire:
            all_connected.wait()  # all sessions are open at the same time
            message_id = wire.deliver(message)
            wire.expect("QUIT", "221 2.0.0")
        return message_id, message

    with ThreadPoolExecutor(CONCURRENT) as pool:
        results = list(pool.map(client, range(CONCURRENT)))
    ids = [message_id for message_id, _ in results]
    assert len(set(ids)) == CONCURRENT
    assert sorted(gateway.spool_ids()) == sorted(ids)
    stored = exported_by_token(gateway, tmp_path / "all.mbox")
    for i, (_, message) in enumerate(results):
        assert stored[f"concurrent-{i}"].value.endswith(message)
    for message_id, message in results[:: CONCURRENT // 5]:
        assert gateway.cat(message_id, body=True) == message


# --- clients that vanish ------------------------------------------------------------

VANISHING_MESSAGE = make_message("vanished", (b"v" * 70 + b"\r\n") * 200)
PAYLOAD = data_payload(VANISHING_MESSAGE)


def cut_data(wire, payload: bytes) -> None:
    wire.envelope()
    wire.expect("DATA", "354")
    wire.send(payload)


VANISH_POINTS = {
    "right-after-354": lambda wire: cut_data(wire, b""),
    "half-way-through-body": lambda wire: cut_data(wire, PAYLOAD[: len(PAYLOAD) // 2]),
    "before-final-dot": lambda wire: cut_data(wire, PAYLOAD[:-3]),
    "final-dot-without-crlf": lambda wire: cut_data(wire, PAYLOAD[:-2]),
    "mid-bdat-chunk": lambda wire: (wire.envelope(), wire.send(b"BDAT 1000 LAST\r\n" + b"b" * 500)),
}


@pytest.mark.parametrize("how", ["close", "abort"], ids=["fin", "reset"])
@pytest.mark.parametrize("point", VANISH_POINTS)
def test_client_vanishing_mid_message_leaves_no_record(gateway, point, how):
    wire = gateway.session()
    VANISH_POINTS[point](wire)
    time.sleep(0.2)  # let the server take in what was sent before the client goes
    getattr(wire, how)()
    with gateway.session() as survivor:
        good_id = survivor.deliver(make_message("survivor"))
        survivor.expect("QUIT", "221 2.0.0")
    time.sleep(0.5)
    assert gateway.spool_ids() == [good_id]


# --- kill -9 under load -------------------------------------------------------------


@dataclass
class Sent:
    message: bytes
    outcome: str = "in flight"  # until the final reply: then "queued" or "refused NNN"
    message_id: str | None = None


LOAD_CLIENTS = 12
MAX_MESSAGES_PER_CLIENT = 2000
SIZES = [300, 3_000, 30_000, 150_000]


def random_message(token: str, rng: random.Random) -> bytes:
    size = rng.choice(SIZES)
    line = f"{token} ".encode() * 8
    lines = [(b"." if rng.random() < 0.1 else b"") + line[:76] + b"\r\n" for _ in range(size // 78 + 1)]
    return make_message(token, b"".join(lines))


ENVELOPE = [("MAIL FROM:<a@b.example>", "250 2.1.0"), ("RCPT TO:<x@example.com>", "250 2.1.5"), ("DATA", "354")]


def send_one(wire, sent: Sent) -> bool:
    """One transaction; False once the server says it is closing (421)."""
    for line, spec in ENVELOPE:
        reply = wire.cmd(line)
        if reply.code == 421:
            sent.outcome = "closing"
            return False
        assert_reply(reply, spec, line)
    wire.send(data_payload(sent.message))
    reply = wire.reply()
    if reply.code == 250:
        sent.message_id = queued_id(reply)
        sent.outcome = "queued"
    else:
        sent.outcome = f"refused {reply.code}"
    return reply.code != 421


def load_client(gateway, name: str, stop: threading.Event, log: dict[str, Sent]) -> None:
    """Sends messages until `stop`, a 421 or the gateway going away, logging each one
    before its first byte is sent."""
    rng = random.Random(name)
    try:
        with gateway.session() as wire:
            for seq in range(MAX_MESSAGES_PER_CLIENT):
                if stop.is_set():
                    return
                token = f"{name}-{seq}"
                sent = log[token] = Sent(random_message(token, rng))
                if not send_one(wire, sent):
                    return
    except (OSError, EOFError):
        return  # killed under us: the message under way stays "in flight"


@contextmanager
def load(gateway, name: str):
    """LOAD_CLIENTS sessions sending messages until the block ends; yields their log."""
    log: dict[str, Sent] = {}
    stop = threading.Event()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        futures = [pool.submit(load_client, gateway, f"{name}-c{i}", stop, log) for i in range(LOAD_CLIENTS)]
        try:
            yield log
        finally:
            stop.set()
            for future in futures:
                future.result(timeout=60)


def load_then_kill(gateway, round_no: int, kill_after: float) -> dict[str, Sent]:
    with load(gateway, f"load-r{round_no}") as log:
        time.sleep(kill_after)
        gateway.kill9()
    queued = sum(s.outcome == "queued" for s in log.values())
    print(f"round {round_no}: {queued} queued, {len(log) - queued} in flight or refused")  # shown on failure
    assert queued > 0, f"round {round_no}: nothing was accepted before the kill"
    return log


def check_spool_against(gateway, sent: dict[str, Sent], mbox) -> dict:
    """Every message that got 250 is stored intact under its id; every stored message
    is one a client sent, whole; nothing refused is stored. Returns the stored ones."""
    ids = gateway.spool_ids()
    stored = exported_by_token(gateway, mbox)
    assert len(ids) == len(set(ids)) == len(stored)
    for token, record in stored.items():
        assert token in sent, f"spool holds {token}, which no client sent"
        assert record.value.startswith(b"Received: ")
        assert record.value.endswith(sent[token].message), f"{token} is stored damaged"
    for token, s in sent.items():
        if s.outcome == "queued":
            assert token in stored and s.message_id in ids, f"{token} got 250 ({s.message_id}) but is gone"
        elif s.outcome != "in flight":
            assert token not in stored, f"{token} was refused ({s.outcome}) but is stored"
    return stored


@pytest.mark.timeout(300)
def test_kill9_during_load_then_restart_keeps_every_acknowledged_message(gateway, tmp_path):
    sent: dict[str, Sent] = {}
    for round_no, kill_after in enumerate([1.5, 2.5]):
        sent |= load_then_kill(gateway, round_no, kill_after)
        gateway.restart()  # same spool: it must recover from whatever the kill left

    # The recovered spool takes new mail after the old.
    with gateway.session() as wire:
        after = Sent(make_message("after-restart"), "queued")
        after.message_id = wire.deliver(after.message)
        sent["after-restart"] = after

    check_spool_against(gateway, sent, tmp_path / "recovered.mbox")
    assert {s.outcome for s in sent.values()} <= {"queued", "in flight"}, "refusals under plain load"
    queued = [s for s in sent.values() if s.outcome == "queued"]
    for s in random.Random(0).sample(queued, min(10, len(queued))):
        assert gateway.cat(s.message_id, body=True) == s.message


def test_spool_tools_read_whole_messages_next_to_a_busy_gateway(gateway, tmp_path):
    snapshots = []
    with load(gateway, "busy") as log:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            # A fresh file each time: export refuses to replace one without --force.
            mbox = tmp_path / f"snapshot-{len(snapshots)}.mbox"
            snapshots.append((gateway.spool_ids(), exported_by_token(gateway, mbox)))
    final_ids = gateway.spool_ids()
    assert len(snapshots) > 1 and snapshots[-1][0], "no snapshot saw any message"
    for ids, stored in snapshots:
        assert set(ids) <= set(final_ids), "spool ls listed a message that later vanished"
        for token, record in stored.items():
            assert record.value.endswith(log[token].message), f"export under load gave {token} damaged"


def test_graceful_restart_keeps_the_spool_and_appends(gateway):
    with gateway.session() as wire:
        before = [wire.deliver(make_message(f"before-{i}")) for i in range(3)]
    assert gateway.stop() == 0
    gateway.start()
    with gateway.session() as wire:
        after = [wire.deliver(make_message(f"after-{i}")) for i in range(2)]
    assert gateway.spool_ids() == before + after
    assert gateway.cat(before[0], body=True) == make_message("before-0")


@pytest.mark.timeout(120)
def test_sigterm_under_load_answers_every_message_sent(start_gateway, tmp_path):
    drain_timeout = 10
    gateway = start_gateway("--drain-timeout", str(drain_timeout))
    with load(gateway, "drain") as sent:
        time.sleep(1.5)
        gateway.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert gateway.wait(drain_timeout + 5) == 0
    assert time.monotonic() - signalled <= drain_timeout + 1
    # Drain finishes what was sent: no message is left without its answer.
    unanswered = [token for token, s in sent.items() if s.outcome == "in flight"]
    assert not unanswered, f"sent but never answered during drain: {unanswered}"
    assert any(s.outcome == "queued" for s in sent.values())
    gateway.start()
    check_spool_against(gateway, sent, tmp_path / "drained.mbox")
