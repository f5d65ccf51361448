"""Per-address limits through the binary, with many loopback source addresses
(127.0.0.2, 127.0.0.3, ... are all loopback): connections per IP and per /24,
connection and message rates, the error budget, early talkers, and a hostile address
cut off while 50 normal clients on other addresses keep their full message rate."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge_support import metric, recv_all, wire_from
from smtpwire import assert_reply, make_message

# 127.0.0.1 stays exempt (as loopback is by default) so the suite's own helpers work;
# every other loopback address is an ordinary client.
TRUSTED = ("--trusted-cidr", "127.0.0.1/32")


def greeting(gateway, source: str):
    wire = wire_from(gateway, source)
    return wire, wire.reply()


def test_connections_per_ip(start_gateway):
    gateway = start_gateway(*TRUSTED, "--max-connections-per-ip", "2")
    a, ra = greeting(gateway, "127.0.0.2")
    b, rb = greeting(gateway, "127.0.0.2")
    c, rc = greeting(gateway, "127.0.0.2")
    d, rd = greeting(gateway, "127.0.0.3")
    try:
        assert_reply(ra, "220")
        assert_reply(rb, "220")
        assert_reply(rc, "421 4.7.0", "third connection from one address")
        assert "Too many connections from your address" in rc.text
        assert c.closed_by_server()
        assert_reply(rd, "220", "another address")
        # The exempt address is not limited.
        trusted = [greeting(gateway, "127.0.0.1") for _ in range(4)]
        for wire, reply in trusted:
            assert_reply(reply, "220")
            wire.close()
        # Closing one frees its slot.
        a.expect("QUIT", "221")
        a.close()
        deadline = time.monotonic() + 5
        while True:
            e, re_ = greeting(gateway, "127.0.0.2")
            if re_.code == 220 or time.monotonic() > deadline:
                break
            e.close()
            time.sleep(0.05)
        assert_reply(re_, "220", "after a connection closed")
        e.close()
    finally:
        for w in (a, b, c, d):
            w.close()
    assert metric(gateway, 'smtpgw_connections_rejected_total{reason="per_ip"}') >= 1


def test_connections_per_prefix(start_gateway):
    gateway = start_gateway(*TRUSTED, "--max-connections-per-ip", "0", "--max-connections-per-prefix", "3")
    held = [greeting(gateway, f"127.0.0.{i}") for i in (2, 3, 4)]
    try:
        for _, reply in held:
            assert_reply(reply, "220")
        w, reply = greeting(gateway, "127.0.0.5")
        assert_reply(reply, "421 4.7.0", "fourth connection from one /24")
        assert "network" in reply.text
        w.close()
        w, reply = greeting(gateway, "127.0.1.2")
        assert_reply(reply, "220", "another /24")
        w.close()
    finally:
        for w, _ in held:
            w.close()
    assert metric(gateway, 'smtpgw_connections_rejected_total{reason="per_prefix"}') >= 1


def test_connection_rate(start_gateway):
    gateway = start_gateway(*TRUSTED, "--max-connection-rate-per-ip", "3")
    for _ in range(3):
        with wire_from(gateway, "127.0.0.7") as wire:
            assert_reply(wire.reply(), "220")
    with wire_from(gateway, "127.0.0.7") as wire:
        assert_reply(wire.reply(), "421 4.7.0", "fourth connection within the minute")
    with wire_from(gateway, "127.0.0.8") as wire:
        assert_reply(wire.reply(), "220", "another address")
    assert metric(gateway, 'smtpgw_connections_rejected_total{reason="connection_rate"}') >= 1


def test_message_rate(start_gateway):
    gateway = start_gateway(*TRUSTED, "--max-message-rate-per-ip", "2")
    with wire_from(gateway, "127.0.0.9") as wire:
        assert_reply(wire.reply(), "220")
        wire.hello()
        wire.deliver(make_message("rate-1"))
        wire.deliver(make_message("rate-2"))
        assert_reply(wire.cmd("MAIL FROM:<a@b.example>"), "421 4.7.0", "third message within the minute")
        assert wire.closed_by_server()
    # The limit is the address's, across connections.
    with wire_from(gateway, "127.0.0.9") as wire:
        assert_reply(wire.reply(), "220")
        wire.hello()
        assert_reply(wire.cmd("MAIL FROM:<a@b.example>"), "421 4.7.0")
    assert len(gateway.spool_ids()) == 2
    assert metric(gateway, 'smtpgw_session_limit_closes_total{reason="message_rate"}', at_least=2) >= 2


def test_error_budget(start_gateway):
    gateway = start_gateway(*TRUSTED, "--error-budget", "3")
    with wire_from(gateway, "127.0.0.10") as wire:
        assert_reply(wire.reply(), "220")
        wire.expect("XYZZY", "500")
        wire.expect("RCPT TO:<x@example.com>", "503")
        wire.expect("NOOP", "250")
        # The third refusal is answered, then the budget's 421 follows (as Postfix does).
        assert_reply(wire.cmd("BOGUS"), "500")
        assert_reply(wire.reply(), "421 4.7.0", "after the third refused command")
        assert wire.closed_by_server()
    assert metric(gateway, 'smtpgw_session_limit_closes_total{reason="error_budget"}') >= 1


def test_too_many_recipients_spend_the_error_budget(start_gateway):
    """Issue 20 item 2: a client that pipelines RCPTs past --max-recipients gets `452`
    for each, and those spend the error budget like `5xx`: the session is closed."""
    import smtplib

    from smtpwire import IO_TIMEOUT

    gateway = start_gateway(*TRUSTED, "--error-budget", "5", "--max-recipients", "3")
    client = smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT,
                          source_address=("127.0.0.12", 0))
    try:
        client.ehlo()
        assert client.has_extn("pipelining")
        assert client.mail("sender@b.example")[0] == 250
        client.send("".join(f"RCPT TO:<r{i}@example.com>\r\n" for i in range(50)))
        codes = []
        for _ in range(50):
            code, _ = client.getreply()
            codes.append(code)
            if code == 421:
                break
        assert codes == [250] * 3 + [452] * 5 + [421], codes
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.getreply()
    finally:
        client.close()
    assert metric(gateway, 'smtpgw_session_limit_closes_total{reason="error_budget"}') >= 1


def test_early_talker_with_greeting_delay(start_gateway):
    gateway = start_gateway(*TRUSTED, "--greeting-delay", "1s")
    with wire_from(gateway, "127.0.0.11") as wire:
        wire.send(b"EHLO spammer.test\r\nMAIL FROM:<a@b.example>\r\n")
        data = recv_all(wire.sock)
    assert data.startswith(b"554 5.5.0 "), data
    assert data.count(b"\r\n") == 1, data
    # A client that waits gets its greeting and a normal session.
    with wire_from(gateway, "127.0.0.12") as wire:
        assert_reply(wire.reply(), "220")
        wire.hello()
        wire.deliver(make_message("patient"))
    assert metric(gateway, 'smtpgw_connections_rejected_total{reason="early_talker"}') >= 1


NORMAL_CLIENTS = 50
MESSAGES_EACH = 4


def normal_client(gateway, index: int) -> list[int]:
    """Delivers its messages over one connection; returns the final reply codes."""
    codes = []
    with wire_from(gateway, f"127.0.2.{10 + index}") as wire:
        assert_reply(wire.reply(), "220")
        wire.hello()
        for i in range(MESSAGES_EACH):
            wire.envelope()
            wire.expect("DATA", "354")
            wire.send(make_message(f"normal-{index}-{i}") + b".\r\n")
            codes.append(wire.reply().code)
        wire.expect("QUIT", "221")
    return codes


def hostile(gateway, stop_after: float) -> dict[str, int]:
    """Floods from one address: connections over its cap, early talk, error budget."""
    seen = {"refused": 0, "early": 0, "errors": 0}
    end = time.monotonic() + stop_after
    while time.monotonic() < end:
        try:
            with wire_from(gateway, "127.0.0.66") as wire:
                wire.send(b"EHLO flood\r\n" + b"XYZZY\r\n" * 10)
                data = recv_all(wire.sock, timeout=5)
        except OSError:
            continue
        if data.startswith(b"421 4.7.0"):
            seen["refused"] += 1
        elif data.startswith(b"554 5.5.0"):
            seen["early"] += 1
        elif b"421 4.7.0" in data:
            seen["errors"] += 1
    return seen


def test_hostile_address_is_cut_off_while_normal_clients_are_served(start_gateway):
    gateway = start_gateway(
        *TRUSTED, "--max-connection-rate-per-ip", "60", "--error-budget", "5", "--greeting-delay", "200ms",
        "--max-connections-per-ip", "5",
    )
    with ThreadPoolExecutor(max_workers=NORMAL_CLIENTS + 4) as pool:
        floods = [pool.submit(hostile, gateway, 4.0) for _ in range(4)]
        normals = [pool.submit(normal_client, gateway, i) for i in range(NORMAL_CLIENTS)]
        codes = [n.result(timeout=120) for n in normals]
        seen = [f.result(timeout=120) for f in floods]
    assert all(c == [250] * MESSAGES_EACH for c in codes), codes
    assert len(gateway.spool_ids()) == NORMAL_CLIENTS * MESSAGES_EACH
    total = {k: sum(s[k] for s in seen) for k in seen[0]}
    assert total["early"] > 0 and total["refused"] > 0, total
