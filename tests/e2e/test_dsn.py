"""DSN (RFC 3461) end to end through the spool: Python's smtplib sends RET/ENVID on
MAIL and NOTIFY/ORCPT on RCPT, the stored record carries them (`smtpgw spool cat
--headers`), one NOTIFY and one ORCPT per `smtp.rcpt_to` in its order, and every
malformed parameter gets a 501 5.5.4 that names it while the session goes on."""

from __future__ import annotations

import pytest

from edge_support import headers
from smtpwire import ULID, assert_reply, queued_id


def queued(reply: bytes) -> str:
    match = ULID.search(reply.decode())
    assert match, reply
    return match.group(0)


def test_dsn_parameters_are_stored_per_recipient(gateway):
    with gateway.smtplib() as client:
        client.ehlo("client.test")
        assert client.has_extn("DSN")
        refused = client.sendmail(
            "sender@client.test",
            ["bob@example.com", "carol@example.com"],
            b"Subject: dsn\r\n\r\nbody\r\n",
            mail_options=["RET=HDRS", "ENVID=abc+2Bdef"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+40x.example"],
        )
        assert refused == {}
        # A second transaction without DSN parameters: every header is still there,
        # empty, so a consumer can zip the lists.
        client.mail("sender@client.test")
        client.rcpt("dave@example.com")
        code, reply = client.data(b"Subject: plain\r\n\r\nbody\r\n")
        assert code == 250
        plain_id = queued(reply)
    ids = gateway.spool_ids()
    assert len(ids) == 2 and plain_id in ids
    [dsn_id] = [i for i in ids if i != plain_id]
    stored = headers(gateway, dsn_id)
    assert stored["smtp.rcpt_to"] == ["bob@example.com", "carol@example.com"]
    assert stored["smtp.rcpt_notify"] == ["SUCCESS,FAILURE", "SUCCESS,FAILURE"]
    assert stored["smtp.rcpt_orcpt"] == ["rfc822;bob+40x.example"] * 2
    assert stored["smtp.dsn_ret"] == ["HDRS"]
    assert stored["smtp.dsn_envid"] == ["abc+2Bdef"]
    # smtplib adds SIZE itself; the parameters as sent stay in smtp.mail_params.
    [params] = stored["smtp.mail_params"]
    assert params.endswith(" RET=HDRS ENVID=abc+2Bdef"), params
    plain = headers(gateway, plain_id)
    assert plain["smtp.rcpt_to"] == ["dave@example.com"]
    for name in ("smtp.dsn_ret", "smtp.dsn_envid", "smtp.rcpt_notify", "smtp.rcpt_orcpt"):
        assert plain[name] == [""], name


@pytest.mark.parametrize(
    "command,text",
    [
        ("MAIL FROM:<a@client.test> RET=NONE", "Malformed RET parameter"),
        ("MAIL FROM:<a@client.test> RET=FULL RET=FULL", "Duplicate MAIL parameter"),
        ("MAIL FROM:<a@client.test> ENVID=" + "e" * 101, "Malformed ENVID parameter"),
        ("MAIL FROM:<a@client.test> ENVID=a+2b", "Malformed ENVID parameter"),
        ("RCPT TO:<b@example.com> NOTIFY=NEVER,DELAY", "Malformed NOTIFY parameter"),
        ("RCPT TO:<b@example.com> NOTIFY=DELAY,DELAY", "Malformed NOTIFY parameter"),
        ("RCPT TO:<b@example.com> NOTIFY=NEVER NOTIFY=NEVER", "Duplicate RCPT parameter"),
        ("RCPT TO:<b@example.com> ORCPT=b@x.example", "Malformed ORCPT parameter"),
        ("RCPT TO:<b@example.com> ORCPT=rfc822;" + "o" * 494, "Malformed ORCPT parameter"),
    ],
)
def test_malformed_dsn_parameters_get_501(gateway, command, text):
    with gateway.smtplib() as client:
        client.ehlo("client.test")
        if command.startswith("RCPT"):
            assert client.mail("a@client.test")[0] == 250
        code, reply = client.docmd(command)
        assert (code, reply.decode().split(" ", 1)[1].startswith(text)) == (501, True), reply
        assert reply.startswith(b"5.5.4 "), reply
        assert client.noop()[0] == 250


def test_dsn_session_written_one_byte_at_a_time(gateway):
    """One byte per write, a refused DSN parameter in the middle: the same replies and
    the same record as whole commands (the Rust session tests try every split)."""
    with gateway.wire() as wire:
        assert_reply(wire.reply(), "220", "greeting")
        wire.send_bytewise(
            b"EHLO client.test\r\nMAIL FROM:<a@b.example> RET=FULL ENVID=x+2By\r\n"
            b"RCPT TO:<x@example.com> NOTIFY=NEVER,DELAY\r\n"
            b"RCPT TO:<x@example.com> NOTIFY=delay,failure ORCPT=rfc822;x+40example.com\r\n"
            b"RCPT TO:<y@example.com>\r\nDATA\r\nSubject: b\r\n\r\nbytewise\r\n.\r\nQUIT\r\n"
        )
        for spec in ["250", "250 2.1.0", "501 5.5.4", "250 2.1.5", "250 2.1.5", "354"]:
            assert_reply(wire.reply(), spec, "byte-at-a-time DSN session")
        message_id = queued_id(wire.reply())
        assert_reply(wire.reply(), "221 2.0.0", "QUIT")
    stored = headers(gateway, message_id)
    assert stored["smtp.rcpt_to"] == ["x@example.com", "y@example.com"]
    assert stored["smtp.rcpt_notify"] == ["FAILURE,DELAY", ""]
    assert stored["smtp.rcpt_orcpt"] == ["rfc822;x+40example.com", ""]
    assert (stored["smtp.dsn_ret"], stored["smtp.dsn_envid"]) == (["FULL"], ["x+2By"])


def test_longest_dsn_lines_are_read_whole(gateway):
    """RFC 3461 lets a RCPT line grow by 500 octets for ORCPT and a MAIL line by 100 for
    ENVID: a 500-character ORCPT and a 100-character ENVID are accepted and stored."""
    envid = "e" * 100
    orcpt = "rfc822;" + "o" * 493
    with gateway.smtplib() as client:
        client.ehlo("client.test")
        assert client.mail("a@client.test", [f"ENVID={envid}"])[0] == 250
        code, reply = client.docmd(f"RCPT TO:<{'r' * 40}@example.com> ORCPT={orcpt}")
        assert code == 250, reply
        code, reply = client.data(b"Subject: long\r\n\r\nx\r\n")
        assert code == 250, reply
        message_id = queued(reply)
        # One octet more than RCPT's 1012 is a line too long; the session goes on.
        code, _ = client.docmd("RCPT TO:<b@example.com> ORCPT=rfc822;" + "p" * 974)
        assert code == 500
        assert client.noop()[0] == 250
    stored = headers(gateway, message_id)
    assert stored["smtp.dsn_envid"] == [envid]
    assert stored["smtp.rcpt_orcpt"] == [orcpt]
