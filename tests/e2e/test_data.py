"""Message bodies: byte-exact round trips through the spool, 8-bit and UTF-8 mail, size."""

from __future__ import annotations

import pytest

from smtpwire import assert_reply, data_payload, make_message, queued_id, token_of

# Bodies whose dots, CRs and 8-bit bytes a sloppy DATA reader would mangle.
TRICKY_BODIES = {
    "leading-dots": b".\r\n..\r\n...\r\n.a\r\n..a\r\n",
    "dot-lines-everywhere": b"a\r\n.\r\nb\r\n.\r\n",
    "ends-with-dot-line": b"text\r\n.\r\n",
    "from-lines": b"From here\r\n>From there\r\n>>From everywhere\r\nFrom\r\n",
    "blank-lines": b"\r\n\r\n\r\n",
    "crlf-dot-inside-line": b"a.\r\nb .\r\n. c\r\n",
    "8bit": bytes(range(0x80, 0x100)) + b"\r\n" + "Grüße, 你好, 🙂\r\n".encode(),
    "long-line": b"x" * 5000 + b"\r\n",
}


def sent_messages(bodies: dict[str, bytes]) -> dict[str, bytes]:
    return {name: make_message(name, body) for name, body in bodies.items()}


@pytest.mark.parametrize("name", TRICKY_BODIES)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "byte-at-a-time"])
def test_dot_stuffing_round_trips_byte_exact(gateway, name, bytewise):
    message = make_message(name, TRICKY_BODIES[name])
    with gateway.session() as wire:
        wire.envelope(params="BODY=8BITMIME")
        wire.expect("DATA", "354")
        payload = data_payload(message)
        if bytewise:
            wire.send_bytewise(payload)
        else:
            wire.send(payload)
        message_id = queued_id(wire.reply())
    assert gateway.cat(message_id, body=True) == message


def test_message_that_is_only_headers_and_empty_message(gateway):
    messages = [b"Subject: no body\r\n", b""]
    with gateway.session() as wire:
        ids = [wire.deliver(message) for message in messages]
    for message_id, message in zip(ids, messages):
        assert gateway.cat(message_id, body=True) == message


def test_mbox_export_gives_back_the_exact_bytes(gateway, tmp_path):
    messages = sent_messages(TRICKY_BODIES)
    senders = {}
    with gateway.session() as wire:
        for i, (name, message) in enumerate(messages.items()):
            senders[name] = "" if i % 3 == 0 else f"s{i}@b.example"
            wire.deliver(message, mail_from=senders[name], params="BODY=8BITMIME")
    ids = gateway.spool_ids()
    exported = gateway.export(tmp_path / "spool.mbox")
    assert len(exported) == len(messages) == len(ids)
    for message_id, record in zip(ids, exported):
        name = token_of(record.value)
        assert record.value == gateway.cat(message_id), f"export differs from cat for {name}"
        assert record.value.endswith(messages[name])
        assert record.value.startswith(b"Received: ")
        assert record.sender == (senders[name] or "MAILER-DAEMON")
        assert record.added[0] == f"X-Envelope-From: <{senders[name]}>", record.added
        assert all(line.startswith("X-Envelope-To: <") for line in record.added[1:]), record.added


def test_8bit_and_utf8_mail_with_smtplib(gateway):
    message = (
        "From: Jöran <jöran@bücher.example>\r\nTo: Ñoño <ñoño@example.com>\r\n"
        "Subject: Grüße 🙂\r\nMessage-ID: <utf8@e2e.test>\r\n\r\n"
        "Ünïcödé body, 日本語.\r\n"
    ).encode()
    with gateway.smtplib() as client:
        client.ehlo()
        assert client.has_extn("smtputf8") and client.has_extn("8bitmime")
        refused = client.sendmail(
            "jöran@bücher.example", ["ñoño@example.com"], message, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
        assert refused == {}
    [line] = gateway.spool_ls()
    message_id = line.split()[0]
    assert "jöran@bücher.example" in line
    assert gateway.cat(message_id, body=True) == message


# --- size limits (RFC 1870) ---------------------------------------------------------

LIMIT = 1000


def body_of_size(size: int, dotted: bool = True) -> bytes:
    """A message of exactly `size` octets ending in CRLF; with `dotted`, every line starts
    with a dot, so on the wire it is far longer than `size` (stuffing does not count)."""
    line = (b"." if dotted else b"") + b"y" * 8 + b"\r\n"
    message = line * (size // len(line) - 1)
    message += b"z" * (size - len(message) - 2) + b"\r\n"
    assert len(message) == size and message.endswith(b"\r\n")
    return message


@pytest.fixture
def small_gateway(start_gateway):
    return start_gateway("--max-message-size", str(LIMIT))


@pytest.mark.parametrize("size, accepted", [(LIMIT, True), (LIMIT - 1, True), (LIMIT + 1, False), (200_000, False)])
def test_body_size_limit_and_session_survives(small_gateway, size, accepted):
    message = body_of_size(size)
    follow_up = make_message("after-size")
    with small_gateway.session() as wire:
        wire.envelope()
        reply = wire.data(message)
        if accepted:
            first_id = queued_id(reply)
        else:
            assert_reply(reply, "552 5.3.4", f"{size}-octet body")
        second_id = wire.deliver(follow_up)
        wire.expect("QUIT", "221 2.0.0")
    expected = ([first_id] if accepted else []) + [second_id]
    assert small_gateway.spool_ids() == expected
    if accepted:
        assert small_gateway.cat(first_id, body=True) == message


def test_bdat_over_size_is_refused(small_gateway):
    with small_gateway.session() as wire:
        wire.envelope()
        chunk = b"b" * (LIMIT + 1)
        wire.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
        assert_reply(wire.reply(), "552 5.3.4", "BDAT over size")
        message_id = wire.deliver(make_message("after-bdat"))
    assert small_gateway.spool_ids() == [message_id]


def test_bdat_of_exactly_max_size_is_accepted(small_gateway):
    message = body_of_size(LIMIT, dotted=False)
    with small_gateway.session() as wire:
        wire.envelope()
        wire.send(f"BDAT {len(message)} LAST\r\n".encode() + message)
        message_id = queued_id(wire.reply())
    assert small_gateway.cat(message_id, body=True) == message
