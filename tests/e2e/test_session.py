"""Whole SMTP sessions from real clients: smtplib, swaks, and raw pipelined bursts."""

from __future__ import annotations

import re
import subprocess

import pytest

from smtpwire import QUEUED, assert_reply, data_payload, make_message, queued_id

EXTENSIONS = ["PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "DSN", "HELP", "SEND", "SOML", "SAML"]


def ehlo_keywords(reply) -> dict[str, str]:
    """EHLO keyword -> its parameters, from every line but the greeting one."""
    words = (line[4:].split(" ", 1) for line in reply.lines[1:])
    return {w[0].upper(): (w[1] if len(w) > 1 else "") for w in words}


def test_greeting_and_ehlo_advertise_exactly_what_works(start_gateway):
    gateway = start_gateway("--hostname", "mx.e2e.example", "--max-message-size", "123456")
    with gateway.wire() as wire:
        greeting = assert_reply(wire.reply(), "220", "greeting")
        assert greeting.lines[0].split()[1] == "mx.e2e.example"
        reply = wire.expect("EHLO client.test", "250")
    assert reply.lines[0].startswith("250-mx.e2e.example")
    keywords = ehlo_keywords(reply)
    assert sorted(keywords) == sorted(EXTENSIONS), reply.text
    assert keywords["SIZE"] == "123456"


def test_smtplib_full_session(gateway):
    first = make_message("smtplib-1", b"Hi,\r\n.leading dot\r\n..two dots\r\n.\r\nbye\r\n")
    second = make_message("smtplib-2", b"second message\r\n")
    with gateway.smtplib() as client:
        assert client.ehlo()[0] == 250
        assert all(client.has_extn(ext) for ext in EXTENSIONS)
        assert client.noop()[0] == 250
        assert client.verify("someone")[0] == 252
        assert client.docmd("HELP")[0] == 214
        assert client.mail("sender@b.example", [f"SIZE={len(first)}", "BODY=8BITMIME"])[0] == 250
        assert client.rcpt("x@example.com")[0] == 250
        assert client.rcpt("Postmaster")[0] == 250
        code, text = client.data(first)
        assert code == 250, text
        first_id = QUEUED.search(text.decode()).group(1)
        assert client.rset()[0] == 250
        refused = client.sendmail("a@b.example", ["y@EXAMPLE.com", "z@elsewhere.example"], second)
        assert list(refused) == ["z@elsewhere.example"]
        code, text = refused["z@elsewhere.example"]
        assert code == 550 and text.startswith(b"5.7.1"), text
        assert client.quit()[0] == 221
    ids = gateway.spool_ids()
    assert len(ids) == 2 and ids[0] == first_id
    assert gateway.cat(first_id, body=True) == first
    assert gateway.cat(ids[1], body=True) == second


SWAKS_MODES = {
    "esmtp": [],
    "pipelining": ["--pipeline"],
    "helo": ["--protocol", "SMTP"],
}


@pytest.mark.parametrize("mode", SWAKS_MODES)
def test_swaks_session(gateway, tmp_path, mode):
    # swaks converts LF to CRLF, stuffs leading dots and ends the data with CRLF . CRLF.
    text = b"Subject: swaks " + mode.encode() + b"\nMessage-ID: <swaks@e2e.test>\n\n.dotted\nFrom here on\nlast line"
    source = tmp_path / "message.txt"
    source.write_bytes(text)
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(gateway.port), "--helo", "client.test",
         "--from", "a@b.example", "--to", "x@example.com", "--data", f"@{source}", "--timeout", "10",
         *SWAKS_MODES[mode]],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    transcript = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, transcript + result.stderr.decode("utf-8", "replace")
    assert re.search(r"<-\s+221 2\.0\.0", transcript), transcript
    message_id = QUEUED.search(transcript).group(1)
    assert gateway.spool_ids() == [message_id]
    assert gateway.cat(message_id, body=True) == text.replace(b"\n", b"\r\n") + b"\r\n"


def test_multiple_transactions_per_session(gateway):
    messages = [make_message(f"multi-{i}", f"message {i}\r\n".encode()) for i in range(5)]
    ids = []
    with gateway.session() as wire:
        for i, message in enumerate(messages):
            if i == 2:  # an aborted transaction between two good ones leaves no trace
                wire.envelope()
                wire.expect("RSET", "250 2.0.0")
            ids.append(wire.deliver(message, mail_from=f"s{i}@b.example"))
        wire.expect("QUIT", "221 2.0.0")
    assert len(set(ids)) == len(ids)
    assert gateway.spool_ids() == ids
    for message_id, message in zip(ids, messages):
        assert gateway.cat(message_id, body=True) == message


def test_pipelined_commands_get_replies_in_order(gateway):
    first = make_message("pipe-1")
    second = make_message("pipe-2", b"second\r\n")
    with gateway.session() as wire:
        wire.send(
            "MAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n"
            "RCPT TO:<Postmaster>\r\nNOOP\r\nDATA\r\n"
        )
        for spec in ["250 2.1.0", "250 2.1.5", "550 5.7.1", "250 2.1.5", "250 2.0.0", "354"]:
            assert_reply(wire.reply(), spec, "pipelined burst")
        wire.send(
            data_payload(first) + b"MAIL FROM:<>\r\nRCPT TO:<y@example.com>\r\nDATA\r\n"
            + data_payload(second) + b"QUIT\r\n"
        )
        first_id = queued_id(wire.reply())
        for spec in ["250 2.1.0", "250 2.1.5", "354"]:
            assert_reply(wire.reply(), spec, "pipelined after DATA")
        second_id = queued_id(wire.reply())
        assert_reply(wire.reply(), "221 2.0.0", "QUIT")
        assert wire.closed_by_server()
    assert gateway.spool_ids() == [first_id, second_id]
    assert gateway.cat(second_id, body=True) == second


def test_whole_session_written_one_byte_at_a_time(gateway):
    # Every split of commands and body across reads must give the same replies and bytes.
    message = make_message("bytewise", b".dot\r\nline\r\n")
    with gateway.wire() as wire:
        assert_reply(wire.reply(), "220", "greeting")
        wire.send_bytewise(
            b"EHLO client.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"
            + data_payload(message) + b"QUIT\r\n"
        )
        for spec in ["250", "250 2.1.0", "250 2.1.5", "354"]:
            assert_reply(wire.reply(), spec, "byte-at-a-time session")
        message_id = queued_id(wire.reply())
        assert_reply(wire.reply(), "221 2.0.0", "QUIT")
    assert gateway.cat(message_id, body=True) == message


def test_many_pipelined_transactions_in_one_write(gateway):
    count = 50
    messages = [make_message(f"burst-{i}", b"x" * i + b"\r\n") for i in range(count)]
    burst = b"".join(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n" + data_payload(m) for m in messages
    )
    with gateway.session() as wire:
        wire.send(burst + b"QUIT\r\n")
        ids = []
        for _ in messages:
            for spec in ["250 2.1.0", "250 2.1.5", "354"]:
                assert_reply(wire.reply(), spec, "burst")
            ids.append(queued_id(wire.reply()))
        assert_reply(wire.reply(), "221", "QUIT")
    assert gateway.spool_ids() == ids
    assert gateway.cat(ids[-1], body=True) == messages[-1]


# --- BDAT (RFC 3030) ----------------------------------------------------------------


def test_bdat_chunks_are_stored_raw(gateway):
    # No dot-unstuffing and no terminator scan: these bytes are the message verbatim.
    chunks = [make_message("bdat-1", b""), b".not stuffed\r\n..two\r\n.\r\n", b"tail without CRLF"]
    with gateway.session() as wire:
        wire.envelope()
        for chunk in chunks[:-1]:
            wire.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
            reply = assert_reply(wire.reply(), "250 2.0.0", "BDAT chunk")
            assert str(len(chunk)) in reply.text
        wire.send(f"BDAT {len(chunks[-1])} LAST\r\n".encode() + chunks[-1])
        message_id = queued_id(wire.reply())
    assert gateway.cat(message_id, body=True) == b"".join(chunks)


def test_bdat_pipelined_with_empty_last_chunk(gateway):
    message = make_message("bdat-2", b"pipelined chunks\r\n")
    half = len(message) // 2
    with gateway.session() as wire:
        wire.send(
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\n"
            + f"BDAT {half}\r\n".encode() + message[:half]
            + f"BDAT {len(message) - half}\r\n".encode() + message[half:]
            + b"BDAT 0 LAST\r\nQUIT\r\n"
        )
        for spec in ["250 2.1.0", "250 2.1.5"]:
            assert_reply(wire.reply(), spec, "envelope")
        for size in (half, len(message) - half):
            reply = assert_reply(wire.reply(), "250 2.0.0", "BDAT")
            assert str(size) in reply.text
        message_id = queued_id(wire.reply())
        assert_reply(wire.reply(), "221", "QUIT")
    assert gateway.cat(message_id, body=True) == message


def test_bdat_out_of_order_is_refused_and_its_bytes_consumed(gateway):
    with gateway.session() as wire:
        # Without MAIL the chunk is refused, but its bytes must not be read as commands.
        wire.send(b"BDAT 12\r\nQUIT\r\nQUIT\r\n")
        assert_reply(wire.reply(), "503", "BDAT without MAIL")
        wire.expect("HELP", "214")
        wire.envelope()
        wire.send(b"BDAT 5\r\nhello")
        assert_reply(wire.reply(), "250 2.0.0", "BDAT")
        wire.expect("DATA", "503")
        wire.send(b"BDAT 2 LAST\r\n\r\n")
        message_id = queued_id(wire.reply())
    assert gateway.cat(message_id, body=True) == b"hello\r\n"


# --- what is stored with a message --------------------------------------------------


def received_lines(value: bytes) -> list[bytes]:
    """The `Received:` trace header at the start of a stored value, unfolded line by line."""
    assert value.startswith(b"Received: "), value[:200]
    lines = value.split(b"\r\n")
    header = [lines[0]]
    for line in lines[1:]:
        if not line.startswith(b"\t"):
            break
        header.append(line)
    return header


@pytest.mark.parametrize("rcpts", [["x@example.com"], ["x@example.com", "Postmaster"]], ids=["one-rcpt", "two-rcpts"])
def test_stored_message_carries_trace_and_envelope(gateway, tmp_path, rcpts):
    message = make_message("meta", b"body\r\n")
    with gateway.session(helo="client.test") as wire:
        message_id = wire.deliver(message, mail_from="sender@b.example", rcpts=rcpts)
    value = gateway.cat(message_id)
    trace = received_lines(value)
    assert value == b"\r\n".join(trace) + b"\r\n" + message
    received = b" ".join(trace).decode()
    for part in ["client.test", "127.0.0.1", message_id]:
        assert part in received, f"{part!r} missing from {received!r}"
    assert ("for <x@example.com>" in received) == (len(rcpts) == 1)
    [line] = gateway.spool_ls()
    assert line.split()[0] == message_id
    assert "<sender@b.example>" in line and f"{len(rcpts)} rcpt" in line, line
    [exported] = gateway.export(tmp_path / "out.mbox")
    assert exported.sender == "sender@b.example" and exported.value == value


@pytest.mark.parametrize("verb", ["MAIL", "SEND", "SOML", "SAML"])
def test_rfc821_verbs_open_a_transaction(gateway, verb):
    message = make_message(f"verb-{verb}")
    with gateway.session() as wire:
        wire.expect(f"{verb} FROM:<a@b.example>", "250 2.1.0")
        wire.expect("RCPT TO:<x@example.com>", "250 2.1.5")
        message_id = queued_id(wire.data(message))
    assert gateway.cat(message_id, body=True) == message


def test_null_sender_is_exported_as_mailer_daemon(gateway, tmp_path):
    with gateway.session() as wire:
        wire.deliver(make_message("bounce"), mail_from="")
    [line] = gateway.spool_ls()
    assert "<>" in line
    [exported] = gateway.export(tmp_path / "out.mbox")
    assert exported.sender == "MAILER-DAEMON"


def test_one_hundred_recipients_are_stored_and_the_101st_is_refused(gateway):
    rcpts = [f"r{i:03}@example.com" for i in range(101)]
    with gateway.session() as wire:
        wire.expect("MAIL FROM:<sender@b.example>", "250 2.1.0")
        for rcpt in rcpts[:100]:
            wire.expect(f"RCPT TO:<{rcpt}>", "250 2.1.5")
        wire.expect(f"RCPT TO:<{rcpts[100]}>", "452 4.5.3")
        message_id = queued_id(wire.data(make_message("hundred")))
    [line] = gateway.spool_ls()
    assert line.split()[0] == message_id and "  100 rcpt" in line, line
    # The trace line names a recipient only when there is exactly one.
    assert b"for <" not in gateway.cat(message_id).split(b"\r\n\r\n", 1)[0]
