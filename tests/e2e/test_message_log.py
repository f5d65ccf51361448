"""One log line per message handed to the sink, in text and JSON, and none by default."""

from __future__ import annotations

import json
import time

import pytest

from smtpwire import make_message


def wait_for(gw, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(gw.log):
            if needle in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line with {needle!r}; stderr:\n{gw.stderr()}")


def send_one(gw) -> str:
    with gw.session() as w:
        return w.deliver(make_message("logline"), mail_from="alice@b.example", rcpts=("x@example.com", "y@example.com"))


def test_text_line_names_id_client_sender_and_result(start_gateway):
    gw = start_gateway("--log-level", "info")
    qid = send_one(gw)
    line = wait_for(gw, f"id={qid}")
    assert "message" in line
    for field in ("client=127.0.0.1:", 'from="alice@b.example"', "rcpts=2", "code=250", 'sink="spool"', 'helo="client.test"'):
        assert field in line, (field, line)


def test_json_line_carries_the_same_fields(start_gateway):
    gw = start_gateway("--log-level", "info", "--log-format", "json")
    qid = send_one(gw)
    line = wait_for(gw, qid)
    event = json.loads(line)
    assert event["target"] == "smtpgw::message"
    fields = event["fields"]
    assert fields["id"] == qid
    assert fields["code"] == 250 and fields["rcpts"] == 2 and fields["sink"] == "spool"
    assert fields["from"] == '"alice@b.example"'
    assert fields["client"].startswith("127.0.0.1:")
    assert isinstance(fields["size"], int) and fields["size"] > 0


def test_off_by_default(start_gateway):
    gw = start_gateway()
    qid = send_one(gw)
    # The message is stored (the spool has it) but no line names it.
    assert qid in gw.spool_ids()
    gw.stop()
    assert qid not in gw.all_stderr
