"""The gateway's record, on by default (issue 18): one transaction line per message with
every field, one line per refusal whose reason word is the label of
`smtpgw_refusals_total`, a line when a connection ends, refusal floods summarised, JSON
that a log pipeline takes as is, and journald priorities."""

from __future__ import annotations

import json
import signal
import re
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from edge_support import client_context, make_certificate, wire_from
from smtpwire import IO_TIMEOUT, Wire, assert_reply, make_message

TEXT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse(line: str) -> dict:
    """A line as {"level", "target", "message", fields...}, from text or JSON."""
    line = re.sub(r"^<\d>", "", line.rstrip("\n"))
    if line.startswith("{"):
        event = json.loads(line)
        return {"level": event["level"], "target": event["target"], **event["fields"]}
    match = re.match(r"\S+\s+(\w+) (\S+): (.*?)((?: \w+=.*)?)$", line)
    assert match, line
    fields = {}
    for key, value in TEXT_FIELD.findall(match.group(4)):
        fields[key] = json.loads(value) if value.startswith('"') else value
    return {"level": match.group(1), "target": match.group(2), "message": match.group(3), **fields}


def wait_lines(gw, pred, count: int = 1, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in (parse(line) for line in list(gw.log)) if pred(p)]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"{len(found)} of {count} lines; stderr:\n{gw.stderr}"
            return found
        time.sleep(0.05)


def refusals(gw, reason: str, count: int = 1) -> list[dict]:
    return wait_lines(gw, lambda p: p["target"] == "smtpgw::refusal" and p.get("reason") == reason, count)


def refusal_metric(gw, reason: str, at_least: float = 1, timeout: float = 5.0) -> float:
    """`smtpgw_refusals_total{reason}`, waited for (reactors publish every 100 ms) until it
    reaches `at_least`."""
    deadline = time.monotonic() + timeout
    while True:
        value = gw.metric(f'smtpgw_refusals_total{{reason="{reason}"}}')
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


MESSAGE = make_message("logline")  # with Message-ID: <logline@e2e.test>


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_transaction_line_by_default_with_every_field(start_gateway, tmp_path, fmt):
    crt, key = make_certificate(tmp_path)
    gw = start_gateway("--log-format", fmt, "--hostname", "mx.test", "--tls-cert", str(crt), "--tls-key", str(key))
    with smtplib.SMTP(gw.host, gw.port, local_hostname="client.test", timeout=IO_TIMEOUT) as client:
        client.starttls(context=client_context(crt))
        client.ehlo("helo.test")
        client.sendmail("alice@b.example", ["x@example.com", "y@example.com"], MESSAGE)
        port = client.sock.getsockname()[1]
        client.quit()
    [qid] = gw.spool_ids()
    [line] = wait_lines(gw, lambda p: p["target"] == "smtpgw::message")
    assert line["level"] == "INFO" and line["message"] == "message"
    assert line["id"] == qid
    assert line["client"] == f"127.0.0.1:{port}"
    assert line["helo"] == "helo.test"
    assert line["tls"] == "TLSv1.3"
    assert line["from"] == "alice@b.example"
    rcpts = line["rcpts"] if fmt == "json" else line["rcpts"].split(",")
    assert rcpts == ["x@example.com", "y@example.com"]
    assert int(line["nrcpt"]) == 2
    assert int(line["size"]) == len(MESSAGE)
    assert line["message_id"] == "<logline@e2e.test>"
    assert int(line["code"]) == 250 and int(line["ms"]) >= 0
    assert line["sink"] == "spool"
    # The same session id is on the connection's last line.
    [end] = wait_lines(gw, lambda p: p["target"] == "smtpgw::session")
    assert end["session"] == line["session"]


def test_plaintext_line_says_tls_none_and_hides_recipients_on_request(start_gateway):
    gw = start_gateway("--log-recipients", "hash")
    for _ in range(2):
        with gw.session() as w:
            w.deliver(make_message("hashed"), rcpts=("secret@example.com",))
    lines = wait_lines(gw, lambda p: p["target"] == "smtpgw::message", 2)
    assert all(p["tls"] == "none" for p in lines)
    assert lines[0]["rcpts"] == lines[1]["rcpts"] and re.fullmatch(r"[0-9a-f]{16}", lines[0]["rcpts"])
    assert "secret@example.com" not in gw.stderr


def test_log_level_warn_turns_the_info_lines_off(start_gateway):
    # (The harness needs the listening and metrics lines.)
    gw = start_gateway("--log-level", "warn,smtpgw::net=info,smtpgw::metrics=info")
    with gw.session() as w:
        qid = w.deliver(make_message("quiet"))
        w.expect("RCPT TO:<x@elsewhere.test>", "503")
    refusals(gw, "bad_sequence")
    gw.stop()
    assert qid in gw.spool_ids()
    assert qid not in gw.all_stderr and "connection closed" not in gw.all_stderr


def test_connection_end_line_says_how_it_ended(start_gateway):
    gw = start_gateway("--idle-timeout", "1s")
    with gw.session() as w:
        w.deliver(make_message("end"))
        w.expect("QUIT", "221")
    with gw.session() as w:
        w.close()
    with gw.session() as w:
        w.abort()
    with gw.session() as w:
        assert_reply(w.reply(), "421 4.4.2")
        assert w.closed_by_server(timeout=10)
    ends = wait_lines(gw, lambda p: p["target"] == "smtpgw::session", 4)
    by_end = {p["ended"]: p for p in ends}
    # A reset (abort) is an error; a FIN is the client closing.
    assert set(by_end) == {"quit", "client_closed", "error", "timeout"}, ends
    quit_line = by_end["quit"]
    assert int(quit_line["accepted"]) == 1 and int(quit_line["refused"]) == 0
    assert int(quit_line["bytes_in"]) > len(make_message("end")) and int(quit_line["bytes_out"]) > 0
    assert int(quit_line["ms"]) >= 0 and quit_line["client"].startswith("127.0.0.1:")
    refusals(gw, "idle_timeout")


def session_refusals(w: Wire) -> None:
    w.hello()
    w.expect("XYZZY", "500 5.5.2")
    w.expect(b"NOOP " + b"x" * 600, "500 5.5.6")
    w.expect("MAIL FROM:<a@b.example> SIZE=99999999", "552 5.3.4")
    w.expect("MAIL FROM:<a@b.example>", "250")
    w.expect("RCPT TO:<\"esc\\\\aped\"@elsewhere.test>", "550 5.7.1")
    w.expect("RCPT TO:<x@example.com>", "250")
    w.expect("RCPT TO:<y@example.com>", "452 4.5.3")
    w.expect("DATA", "354")
    w.send(b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n")
    assert_reply(w.reply(), "550 5.6.0")
    w.expect("MAIL FROM:<a@b.example>", "250")
    w.expect("RCPT TO:<x@example.com>", "250")
    w.expect("DATA", "354")
    w.send(b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n")
    assert_reply(w.reply(), "552 5.3.4")


def test_every_session_refusal_has_a_line_and_its_metric(start_gateway):
    gw = start_gateway("--max-recipients", "1", "--max-message-size", "4000")
    with gw.session() as w:
        session_refusals(w)
    relay = refusals(gw, "relay_denied")[0]
    assert relay["command"] == "RCPT" and relay["code"] in ("550", 550) and relay["enhanced"] == "5.7.1"
    assert relay["address"] == '"esc\\\\aped"@elsewhere.test', relay
    assert relay["client"].startswith("127.0.0.1:") and "session" in relay
    assert refusals(gw, "too_large", 2)[0]["command"] == "MAIL"
    for reason in ("unknown_command", "line_too_long", "too_many_recipients", "bare_line_ending"):
        refusals(gw, reason)
    gw.wait_idle()
    for reason in ("relay_denied", "too_large", "unknown_command", "line_too_long", "too_many_recipients", "bare_line_ending"):
        assert refusal_metric(gw, reason) >= 1, reason
    # The too_large metric label of the older counter is the same word.
    assert gw.metric('smtpgw_messages_rejected_total{reason="too_large"}') >= 1


# 127.0.0.1 is exempt from the per-address limits so the harness works; clients come
# from other loopback addresses.
TRUSTED = ("--trusted-cidr", "127.0.0.1/32")


def test_limit_refusals(start_gateway):
    gw = start_gateway(*TRUSTED, "--max-connections-per-ip", "1", "--error-budget", "2", "--max-message-rate-per-ip", "1")
    with wire_from(gw, "127.0.0.2") as w:
        assert_reply(w.reply(), "220")
        w.hello()
        with wire_from(gw, "127.0.0.2") as second:
            assert_reply(second.reply(), "421 4.7.0")
        w.deliver(make_message("rate"))
        w.expect("MAIL FROM:<a@b.example>", "421 4.7.0")
    gw.wait_idle()
    with wire_from(gw, "127.0.0.3") as w:
        assert_reply(w.reply(), "220")
        w.expect("XYZZY", "500")
        w.expect("XYZZY", "500")
        assert_reply(w.reply(), "421 4.7.0")
    per_ip = refusals(gw, "per_ip")[0]
    assert per_ip["code"] in ("421", 421) and "command" not in per_ip
    assert refusals(gw, "message_rate")[0]["command"] == "MAIL"
    refusals(gw, "error_budget")
    ends = wait_lines(gw, lambda p: p["target"] == "smtpgw::session", 3)
    assert {p["ended"] for p in ends} == {"limit"}, ends
    for reason in ("per_ip", "message_rate", "error_budget"):
        assert refusal_metric(gw, reason) >= 1, reason


def test_early_talker(start_gateway):
    gw = start_gateway("--greeting-delay", "1s")
    with Wire(gw.host, gw.port) as early:
        early.send("EHLO early.test\r\n")
        assert_reply(early.reply(), "554 5.5.0")
    line = refusals(gw, "early_talker")[0]
    assert line["code"] in ("554", 554) and line["enhanced"] == "5.5.0"
    assert refusal_metric(gw, "early_talker") >= 1


def test_max_connections(start_gateway):
    gw = start_gateway("--max-connections", "1")
    with gw.session():
        with Wire(gw.host, gw.port) as over:
            assert_reply(over.reply(), "421 4.3.2")
    line = refusals(gw, "max_connections")[0]
    assert line["client"].startswith("127.0.0.1:")
    assert refusal_metric(gw, "max_connections") >= 1


def test_proxy_and_tls_refusals(start_gateway, tmp_path):
    crt, key = make_certificate(tmp_path)
    gw = start_gateway(
        "--proxy-protocol", "v1", "--proxy-trusted-cidr", "127.0.0.2/32",
        "--tls-cert", str(crt), "--tls-key", str(key), "--require-tls",
    )
    with wire_from(gw, "127.0.0.1") as untrusted:
        assert untrusted.closed_by_server()
    with wire_from(gw, "127.0.0.2") as bad:
        bad.send(b"NOT A PROXY HEADER\r\n")
        assert bad.closed_by_server()
    with wire_from(gw, "127.0.0.2") as ok:
        ok.send(b"PROXY TCP4 203.0.113.5 192.0.2.1 4000 25\r\n")
        assert_reply(ok.reply(), "220")
        ok.hello()
        ok.expect("MAIL FROM:<a@b.example>", "530 5.7.0")
        ok.expect("STARTTLS", "220")
        ok.send(b"\x16\x03\x01\x00\x05hello")
        assert ok.closed_by_server()
    assert refusals(gw, "proxy_untrusted")[0]["client"].startswith("127.0.0.1:")
    refusals(gw, "proxy_invalid")
    tls_required = refusals(gw, "tls_required")[0]
    # The real client, after the PROXY header.
    assert tls_required["client"] == "203.0.113.5:4000" and tls_required["address"] == "a@b.example"
    handshake = refusals(gw, "tls_handshake")[0]
    assert handshake["client"] == "203.0.113.5:4000" and handshake["detail"]
    for reason in ("proxy_untrusted", "proxy_invalid", "tls_required", "tls_handshake"):
        assert refusal_metric(gw, reason) >= 1, reason


def test_a_refusal_flood_is_summarised(start_gateway):
    """10,000 connections refused by the per-address limit give a handful of lines and
    a count of the rest, not 10,000 lines."""
    gw = start_gateway(*TRUSTED, "--max-connections-per-ip", "1")
    refused = 0
    with wire_from(gw, "127.0.0.2") as held:
        assert_reply(held.reply(), "220")
        for _ in range(10_000):
            with socket.create_connection((gw.host, gw.port), timeout=IO_TIMEOUT, source_address=("127.0.0.2", 0)) as s:
                s.settimeout(IO_TIMEOUT)
                if s.recv(64).startswith(b"421"):
                    refused += 1
    assert refused == 10_000
    gw.wait_idle(timeout=30)
    lines = [parse(line) for line in gw.log]
    written = [p for p in lines if p.get("reason") == "per_ip" and p["message"] == "refused"]
    summaries = [p for p in lines if p.get("reason") == "per_ip" and p["message"] == "refusals suppressed"]
    deadline = time.monotonic() + 5
    while sum(int(p["suppressed"]) for p in summaries) + len(written) < 10_000 and time.monotonic() < deadline:
        time.sleep(0.2)
        lines = [parse(line) for line in gw.log]
        written = [p for p in lines if p.get("reason") == "per_ip" and p["message"] == "refused"]
        summaries = [p for p in lines if p.get("reason") == "per_ip" and p["message"] == "refusals suppressed"]
    assert len(written) + len(summaries) <= 100, (len(written), len(summaries))
    assert len(written) + sum(int(p["suppressed"]) for p in summaries) == 10_000
    assert all(p["client_ip"] == "127.0.0.2" for p in summaries)
    assert refusal_metric(gw, "per_ip", 10_000) == 10_000


def test_every_json_line_is_plain_typed_json(start_gateway, tmp_path):
    """A varied set of sessions with --log-format json: every stderr line parses, and
    each known field has its type (strings unquoted, numbers as numbers)."""
    gw = start_gateway("--log-format", "json", "--max-recipients", "1", "--max-message-size", "4000")
    with gw.session() as w:
        w.deliver(MESSAGE)
        session_refusals(w)
        w.expect("QUIT", "221")
    with gw.session() as w:
        w.abort()
    wait_lines(gw, lambda p: p["target"] == "smtpgw::session", 2)
    gw.stop()
    numbers = {"session", "nrcpt", "size", "code", "ms", "accepted", "refused", "bytes_in", "bytes_out", "suppressed",
               "partition", "offset"}
    strings = {"id", "client", "helo", "tls", "from", "message_id", "sink", "command", "address",
               "enhanced", "reason", "detail", "ended", "error", "client_ip", "message"}
    seen = set()
    for raw in gw.all_stderr.splitlines():
        event = json.loads(raw)
        assert set(event) == {"timestamp", "level", "target", "fields"}, raw
        assert event["level"] in ("ERROR", "WARN", "INFO", "DEBUG", "TRACE")
        for key, value in event["fields"].items():
            seen.add(key)
            if key in numbers:
                assert isinstance(value, int) and not isinstance(value, bool), (key, raw)
            elif key in strings:
                assert isinstance(value, str), (key, raw)
                # No text-format quotes around the value (a quoted local part is the
                # address itself).
                assert key == "address" or not value.startswith('"'), (key, raw)
            elif key == "rcpts":
                assert isinstance(value, list) and all(isinstance(v, str) for v in value), raw
    assert {"session", "id", "rcpts", "message_id", "reason", "ended", "bytes_in"} <= seen


def test_journald_priorities(start_gateway):
    gw = start_gateway(env={"JOURNAL_STREAM": "8:12345"})
    with gw.session() as w:
        w.deliver(make_message("journal"))
        w.expect("RCPT TO:<x@elsewhere.test>", "503")
        w.expect("QUIT", "221")
    wait_lines(gw, lambda p: p["target"] == "smtpgw::session")
    gw.stop()
    lines = gw.all_stderr.splitlines()
    assert lines and all(re.match(r"<[3-7]>", line) for line in lines), lines
    for line in lines:
        p = parse(line)
        want = {"ERROR": "<3>", "WARN": "<4>", "INFO": "<6>", "DEBUG": "<7>"}[p["level"]]
        assert line.startswith(want), line
    assert any(line.startswith("<4>") and "reason=bad_sequence" in line for line in lines)
    assert any(line.startswith("<6>") and "smtpgw::message" in line for line in lines)


def test_more_refusal_reasons(start_gateway):
    """Per prefix, connection rate, session time, data rate and the drain: each a line
    with its reason word and the same label on the metric."""
    gw = start_gateway(
        *TRUSTED, "--max-connections-per-prefix", "1", "--max-connection-rate-per-ip", "1",
        "--max-session-time", "2s", "--min-data-rate", "1000000/1s",
    )
    with wire_from(gw, "127.0.0.2") as held:
        assert_reply(held.reply(), "220")
        with wire_from(gw, "127.0.0.3") as same_prefix:
            assert_reply(same_prefix.reply(), "421 4.7.0")
    gw.wait_idle()
    with wire_from(gw, "127.0.0.2") as second:
        assert_reply(second.reply(), "421 4.7.0")  # the second connection this minute
    with gw.session() as slow:
        slow.envelope()
        slow.expect("DATA", "354")
        slow.send(b"Subject: slow\r\n")
        assert_reply(slow.reply(), "421 4.4.2")
    with gw.session() as long:
        deadline = time.monotonic() + 10
        reply = None
        while time.monotonic() < deadline:
            reply = long.cmd("NOOP")
            if not reply.text.startswith("250"):
                break
            time.sleep(0.2)
        assert_reply(reply, "421 4.4.2")
    for reason in ("per_prefix", "connection_rate", "data_rate", "session_timeout"):
        assert refusals(gw, reason)[0]["code"] in ("421", 421), reason
        assert refusal_metric(gw, reason) >= 1, reason
    with gw.session() as draining:
        gw.send_signal(15)
        assert_reply(draining.reply(), "421 4.3.2")
    assert refusals(gw, "shutting_down")[0]["code"] in ("421", 421)
    assert gw.wait(30) == 0
    ends = [p for p in (parse(line) for line in gw.log) if p["target"] == "smtpgw::session"]
    assert {p["ended"] for p in ends} >= {"limit", "timeout", "drain"}, ends


def test_sink_refusals_and_their_transaction_lines(start_gateway):
    """A Kafka sink with no broker answers 451 (sink_temporary); a full spool 452
    (storage_full). Each message has its transaction line with the code and the sink's
    reason, and its refusal line."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    kafka = start_gateway(sink=("--sink", "kafka", "--kafka-brokers", f"127.0.0.1:{port}", "--publish-timeout", "1s"))
    with kafka.session() as w:
        w.envelope()
        w.expect("DATA", "354")
        w.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert_reply(w.reply(), "451 4.3.0")
    line = refusals(kafka, "sink_temporary")[0]
    assert line["command"] == "DATA" and line["detail"]
    [tx] = wait_lines(kafka, lambda p: p["target"] == "smtpgw::message")
    assert tx["level"] == "WARN" and int(tx["code"]) == 451 and tx["sink"] == "kafka" and tx["error"]
    assert refusal_metric(kafka, "sink_temporary") >= 1

    spool = start_gateway("--spool-max-bytes", "2K")
    codes = []
    with spool.session() as w:
        for _ in range(10):
            w.envelope()
            w.expect("DATA", "354")
            w.send(b"Subject: x\r\n\r\n" + b"z" * 1000 + b"\r\n.\r\n")
            codes.append(w.reply().text[:3])
            if codes[-1] == "452":
                break
    assert codes[-1] == "452", codes
    assert refusals(spool, "storage_full")[0]["enhanced"] == "4.3.1"
    assert refusal_metric(spool, "storage_full") >= 1


def test_a_message_stored_in_the_fallback_spool_says_so(start_gateway, tmp_path):
    """Kafka sink, nothing listening at the broker's address, --spool-fallback: the
    message gets 250 from the fallback spool, and its transaction line names that
    (`sink=spool-fallback`), not Kafka."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    spool = tmp_path / "fallback"
    gw = start_gateway(
        spool_dir=spool,
        sink=(
            "--sink", "kafka", "--kafka-brokers", f"127.0.0.1:{port}", "--publish-timeout", "1s",
            "--spool-fallback", "--spool-dir", str(spool),
        ),
    )
    with gw.session() as w:
        qid = w.deliver(make_message("fallback"))
    [tx] = wait_lines(gw, lambda p: p["target"] == "smtpgw::message")
    assert tx["level"] == "INFO" and int(tx["code"]) == 250, tx
    assert tx["id"] == qid and tx["sink"] == "spool-fallback", tx
    assert "error" not in tx, tx
    assert qid in gw.spool_ids()


def test_body_memory_refusal(start_gateway):
    """One reactor whose body memory budget two partial bodies spend: a new transaction
    is refused with 451 4.3.1, its line's reason word the metric's label."""
    gw = start_gateway("--reactors", "1", "--max-message-size", "10K", "--max-body-memory", "10K")
    with gw.session() as a, gw.session() as b, gw.session() as c:
        for w in (a, b):
            w.envelope()
            w.expect("DATA", "354")
            w.send(b"Subject: held\r\n\r\n" + b"x" * 7000 + b"\r\n")
        # Both partial bodies are read (and charged) before the third client asks.
        deadline = time.monotonic() + 10
        while True:
            reply = c.cmd("MAIL FROM:<m@b.example>")
            if reply.text.startswith("451") or time.monotonic() > deadline:
                break
            c.expect("RSET", "250")
            time.sleep(0.05)
        assert_reply(reply, "451 4.3.1")
        for w in (a, b):
            w.send(b".\r\n")
            assert_reply(w.reply(), "250")
    line = refusals(gw, "body_memory")[0]
    assert line["command"] == "MAIL" and line["address"] == "m@b.example", line
    assert line["code"] in ("451", 451) and line["enhanced"] == "4.3.1", line
    assert refusal_metric(gw, "body_memory") >= 1


def test_log_recipients_from_the_file_and_only_at_a_restart(start_gateway, tmp_path):
    config = tmp_path / "smtpgw.toml"
    config.write_text('log-recipients = "count"\n')
    gw = start_gateway("--config", str(config))
    with gw.session() as w:
        w.deliver(make_message("counted"), rcpts=("a@example.com", "b@example.com"))
    [line] = wait_lines(gw, lambda p: p["target"] == "smtpgw::message")
    assert "rcpts" not in line and int(line["nrcpt"]) == 2
    config.write_text('log-recipients = "full"\n')
    gw.send_signal(signal.SIGHUP)
    [warning] = wait_lines(gw, lambda p: "only change at a restart" in p["message"])
    assert "log-recipients" in warning["settings"], warning


def test_a_reload_turns_the_transaction_line_off_and_on(start_gateway, tmp_path):
    """Reactors decide whether to copy a line's fields when the filter is set, so a
    SIGHUP that changes --log-level must reach them."""
    config = tmp_path / "smtpgw.toml"
    config.write_text('log-level = "info"\n')
    gw = start_gateway("--config", str(config))
    sent = []
    for level in ("info,smtpgw::message=warn", "info"):
        config.write_text(f'log-level = "{level}"\n')
        gw.send_signal(signal.SIGHUP)
        wait_lines(gw, lambda p: "configuration reloaded" in p["message"], count=len(sent) + 1)
        with gw.session() as w:
            sent.append(w.deliver(make_message(f"reload-{len(sent)}")))
        # The connection's last line is written after its transaction line would be.
        wait_lines(gw, lambda p: p["target"] == "smtpgw::session", count=len(sent))
    lines = wait_lines(gw, lambda p: p["target"] == "smtpgw::message")
    assert [p["id"] for p in lines] == [sent[1]], lines


def test_a_stalled_log_reader_costs_lines_not_mail(io_backend, tmp_path):
    """stderr is a pipe nobody reads (a stuck log shipper): the writer thread blocks, its
    queue fills, and then lines are dropped and counted while every message still gets
    its 250 at full speed."""
    import urllib.request

    from conftest import gateway_binary, gateway_env, io_backend_args

    proc = subprocess.Popen(
        [str(gateway_binary()), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--accept-domain", "example.com", "--sink", "null", *io_backend_args(io_backend)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=gateway_env(),
    )
    try:
        addr = metrics = None
        deadline = time.monotonic() + 10
        while (addr is None or metrics is None) and time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            metrics = metrics or (re.search(r"metrics_addr=(\S+)", line) or [None, None])[1]
            addr = addr or (re.search(r"listening addr=(\S+)", line) or [None, None])[1]
        assert addr and metrics, "no addresses in the log"
        # From here on nobody reads stderr.
        host, _, port = addr.rpartition(":")
        one = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nBDAT 10 LAST\r\n0123456789"
        per_connection, connections = 6000, 4

        def blast(results: list) -> None:
            with socket.create_connection((host, int(port)), timeout=IO_TIMEOUT) as s:
                s.settimeout(IO_TIMEOUT)
                reader_buf = bytearray()
                sender = threading.Thread(target=s.sendall, args=(b"EHLO c.test\r\n" + one * per_connection,))
                sender.start()
                while reader_buf.count(b"queued as") < per_connection:
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    reader_buf += chunk
                sender.join()
                results.append(reader_buf.count(b"250 2.0.0 Ok: queued as"))

        results: list[int] = []
        threads = [threading.Thread(target=blast, args=(results,)) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == [per_connection] * connections, results

        def dropped() -> float:
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as resp:
                body = resp.read().decode()
            match = re.search(r"^smtpgw_log_lines_dropped_total (\S+)$", body, re.M)
            return float(match.group(1)) if match else -1

        # 24,000 lines against a queue of 16,384 and a 64 KiB pipe: thousands dropped.
        assert dropped() > 1000
    finally:
        proc.terminate()
        try:
            # The exit's flush waits a bounded time for the stuck pipe.
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    assert proc.returncode == 0
