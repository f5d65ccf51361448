"""Protocol hardening against the real binary: EHLO keywords, IDN and address-literal
accept-domains, hostile HELO/EHLO arguments and local parts against the stored trace
line, terminal-safe spool tools, and BDAT content under the --bare-lf policy."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

import pytest

from conftest import gateway_binary, gateway_env
from smtpwire import assert_reply, make_message, queued_id


def ehlo_keywords(reply) -> set[str]:
    return {line[4:].split(" ", 1)[0].upper() for line in reply.lines[1:]}


def test_ehlo_lists_every_implemented_optional_command_and_help_omits_expn(gateway):
    with gateway.wire() as wire:
        assert_reply(wire.reply(), "220")
        keywords = ehlo_keywords(wire.expect("EHLO client.test", "250"))
        assert {"HELP", "SEND", "SOML", "SAML"} <= keywords, keywords
        help_text = wire.expect("HELP", "214").text
        assert "EXPN" not in help_text, help_text
        assert_reply(wire.cmd("EXPN list"), "502 5.5.1")
        for verb in ("SEND", "SOML", "SAML"):
            assert_reply(wire.cmd(f"{verb} FROM:<a@b.example>"), "250 2.1.0")
            assert_reply(wire.cmd("RSET"), "250")


def test_idn_and_address_literal_accept_domains(start_gateway):
    gateway = start_gateway("--accept-domain", "bücher.example,[192.0.2.1],[IPv6:2001:db8::1]")
    with gateway.session() as wire:
        wire.expect("MAIL FROM:<a@b.example> SMTPUTF8", "250 2.1.0")
        for rcpt in (
            "u@xn--bcher-kva.example",
            "u@XN--BCHER-KVA.EXAMPLE",
            "u@bücher.example",
            "u@BÜCHER.EXAMPLE",
            "u@[192.0.2.1]",
            "u@[IPv6:2001:DB8:0::1]",
        ):
            assert_reply(wire.cmd(f"RCPT TO:<{rcpt}>".encode()), "250 2.1.5", rcpt)
        for rcpt in ("u@xn--bcher-kvb.example", "u@[192.0.2.2]", "u@bucher.example"):
            assert_reply(wire.cmd(f"RCPT TO:<{rcpt}>".encode()), "550 5.7.1", rcpt)


def test_accept_domain_literal_and_idn_errors_name_the_flag():
    result = subprocess.run(
        [str(gateway_binary()), "--accept-domain", "[300.1.1.1]"],
        capture_output=True,
        timeout=30,
        env=gateway_env(),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stderr.decode().startswith("error: --accept-domain: not a valid address literal"), result.stderr


HOSTILE_HELO = [
    "evil;x(foo)",
    "[127.0.0.1])",
    "a\u202eb.example",
    "line\u2028sep.example",
    "client.example(comment)",
    'quote"d',
    "semi;colon",
    "[300.1.1.1]",
    "bücher.example",
]


@pytest.mark.parametrize("helo", HOSTILE_HELO)
def test_hostile_helo_is_refused_and_the_session_goes_on(gateway, helo):
    with gateway.wire() as wire:
        assert_reply(wire.reply(), "220")
        for verb in ("HELO", "EHLO"):
            assert_reply(wire.cmd(f"{verb} {helo}".encode()), "501 5.5.4", f"{verb} {helo!r}")
        assert_reply(wire.cmd("MAIL FROM:<a@b.example>"), "503 5.5.1")
        wire.hello("fine.example")
        wire.envelope()
        queued_id(wire.data(make_message("after-bad-helo")))


@pytest.mark.parametrize("local", ["\u0085", "\u009b31m", "\u2028", "\u2029", "\u202e", "\u2066", "\x1b[31m"])
def test_hostile_local_parts_are_refused(gateway, local):
    with gateway.session() as wire:
        reply = wire.cmd(f'MAIL FROM:<"a{local}b"@b.example> SMTPUTF8'.encode())
        assert reply.code == 501, (local, reply)
        wire.expect("MAIL FROM:<a@b.example> SMTPUTF8", "250 2.1.0")
        reply = wire.cmd(f'RCPT TO:<"a{local}b"@example.com>'.encode())
        assert reply.code == 501, (local, reply)


def received_line(gateway, message_id: str) -> bytes:
    """The stored trace line up to its date: `Received: ...;`"""
    head, sep, _ = gateway.cat(message_id).partition(b";\r\n\t")
    assert sep, "no date part in the stored Received: line"
    return head


@pytest.mark.parametrize(
    ("helo", "rcpt"),
    [
        ("[127.0.0.1]", "plain@example.com"),
        ("[IPv6:::1]", '"semi;colon(paren)"@example.com'),
        ("DESKTOP-AB_12", '"sp ace\\"q"@example.com'),
        ("client.example", '"ü ber"@example.com'),
    ],
)
def test_stored_trace_line_keeps_its_structure(gateway, helo, rcpt):
    with gateway.session(helo=helo) as wire:
        wire.expect("MAIL FROM:<a@b.example> SMTPUTF8", "250 2.1.0")
        wire.expect(f"RCPT TO:<{rcpt}>".encode(), "250 2.1.5")
        message_id = queued_id(wire.data(make_message("trace")))
    head = received_line(gateway, message_id).decode()
    lines = head.split("\r\n\t")
    assert lines[0] == f"Received: from {helo} ([127.0.0.1])", head
    assert lines[1].startswith("by ") and f" id {message_id}" in lines[1], head
    assert lines[2] == f"for <{rcpt}>", head
    assert len(lines) == 3, head
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in "".join(lines)), head


def test_spool_cat_on_a_terminal_escapes_control_characters(gateway):
    body = b"colour \x1b[31mred\x1b[0m and \xc2\x9b csi and \xe2\x80\xae rlo\r\n"
    with gateway.session() as wire:
        wire.envelope()
        message_id = queued_id(wire.data(make_message("tty", body)))
    # Through a pipe the message is exact...
    assert gateway.cat(message_id, body=True).endswith(body)
    # ...on a terminal nothing in it reaches the terminal as a control sequence.
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(gateway_binary()), "spool", "cat", "--body", "--spool-dir", str(gateway.spool_dir), message_id],
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
            env=gateway_env(),
        )
        os.close(follower)
        follower = -1
        output = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert b"\x1b" not in output and b"\xc2\x9b" not in output and b"\xe2\x80\xae" not in output, output
    assert b"\\u{1b}[31mred" in output and b"\\u{9b}" in output and b"\\u{202e}" in output, output


@pytest.mark.parametrize(
    "chunks",
    [
        [b"a\n.\nMAIL FROM:<evil@b.example>\r\n"],
        [b"Subject: x\r\n\r\nline\rcr\r\n"],
        [b"first\r\n", b"second\n"],
        [b"ends in a bare CR\r"],
    ],
)
def test_bdat_bare_line_endings_are_refused_like_data(gateway, chunks):
    with gateway.session() as wire:
        wire.envelope()
        for i, chunk in enumerate(chunks):
            last = " LAST" if i == len(chunks) - 1 else ""
            wire.send(f"BDAT {len(chunk)}{last}\r\n".encode() + chunk)
            reply = wire.reply()
        assert_reply(reply, "550 5.6.0")
        wire.expect("NOOP", "250")
    assert gateway.spool_ids() == []


def test_bdat_bare_line_endings_are_normalized_with_the_policy(start_gateway):
    gateway = start_gateway("--bare-lf", "normalize")
    with gateway.session() as wire:
        wire.envelope()
        wire.send(b"BDAT 2\r\na\r")
        assert_reply(wire.reply(), "250 2.0.0")
        # The CR that ended the first chunk and this LF are one CRLF.
        last = b"\nb\n.\nc\r\n"
        wire.send(f"BDAT {len(last)} LAST\r\n".encode() + last)
        message_id = queued_id(wire.reply())
    assert gateway.cat(message_id, body=True) == b"a\r\nb\r\n.\r\nc\r\n"
