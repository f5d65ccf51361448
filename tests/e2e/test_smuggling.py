"""SMTP smuggling (CVE-2023-51764/5/6): a bare CR or LF around a dot never ends a message.

Each payload hides a second transaction behind a fake end of data. A vulnerable server
would answer 250 for the first part and then run the hidden MAIL/RCPT/DATA. The gateway
must read on to the real CRLF.CRLF and give one answer for the whole thing: by default
`550 5.6.0` and nothing stored; with `--bare-lf normalize` one message, stored with CRLF.
"""

import re

import pytest

from smtpwire import assert_reply, make_message, queued_id

FAKE_ENDS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF.CR-X": b"\r\n.\rX",
    "CR.CR": b"\r.\r",
    "LF.CR": b"\n.\r",
    # no dot at all: a bare line ending anywhere refuses the message just the same
    "LF-in-text": b" and\nmore\r\n",
    "CR-in-text": b" and\rmore\r\n",
}

HIDDEN = (
    b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    b"From: <admin@example.com>\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)


def smuggling_payload(fake_end: bytes) -> bytes:
    """What follows `354`: a message, a fake end, a hidden transaction, the real end."""
    return make_message("outer", b"first part")[:-2] + fake_end + HIDDEN + b".\r\n"


def send_smuggled(gateway, fake_end: bytes, bytewise: bool):
    """Sends the payload after DATA, then NOOP; returns the replies to both."""
    with gateway.session() as wire:
        wire.envelope()
        wire.expect("DATA", "354")
        payload = smuggling_payload(fake_end) + b"NOOP\r\n"
        if bytewise:
            wire.send_bytewise(payload)
        else:
            wire.send(payload)
        return wire.reply(), wire.reply()


BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "byte-at-a-time"])


@BYTEWISE
@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
def test_smuggling_is_refused_by_default(gateway, fake_end, bytewise):
    verdict, after = send_smuggled(gateway, fake_end, bytewise)
    assert_reply(verdict, "550 5.6.0", "the whole smuggling message")
    # The very next reply answers our NOOP: no hidden MAIL/RCPT/DATA was ever run.
    assert_reply(after, "250 2.0.0", "NOOP after the refused message")
    assert gateway.spool_ids() == []


@BYTEWISE
@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
def test_smuggling_normalized_is_one_message(start_gateway, fake_end, bytewise):
    gateway = start_gateway("--bare-lf", "normalize")
    verdict, after = send_smuggled(gateway, fake_end, bytewise)
    message_id = queued_id(verdict)
    assert_reply(after, "250 2.0.0", "NOOP after the message")
    assert gateway.spool_ids() == [message_id]
    body = gateway.cat(message_id, body=True)
    assert body.startswith(make_message("outer", b"first part")[:-2])
    assert b"smuggled body\r\n" in body and body.endswith(b"\r\n")
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", body), f"bare CR or LF stored: {body!r}"
