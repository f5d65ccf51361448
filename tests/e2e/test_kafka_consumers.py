"""The record contract (docs/record.md) proved by its example consumer: varied mail goes
in through real clients (smtplib, raw SMTP for BDAT and a cut transaction), the
gateway publishes it to Kafka, examples/consumer.py reads the topic and writes each
message and a JSON sidecar, and what it wrote is compared byte for byte with what the
clients sent.

Runs when SMTPGW_TEST_KAFKA=host:port names a broker (scripts/kafka-broker.sh start)
and confluent_kafka is importable. Other records in the topic are written by the
consumer too and ignored here (matched by id).
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smtpwire import IO_TIMEOUT, assert_reply, open_session, queued_id
from test_kafka import accepted

BROKER = os.environ.get("SMTPGW_TEST_KAFKA")
TOPIC = os.environ.get("SMTPGW_TEST_KAFKA_TOPIC", "smtp.inbound")

if not BROKER:
    pytest.skip("SMTPGW_TEST_KAFKA not set", allow_module_level=True)
pytest.importorskip("confluent_kafka", reason="pip install confluent-kafka to run the Kafka e2e test")

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = ROOT / "examples" / "consumer.py"


def rust_consumer() -> Path:
    """examples/consumer.rs, built next to the gateway (`cargo test --release` or
    `cargo build --release --example consumer` builds it)."""
    binary = Path(os.environ.get("SMTPGW_BIN", ROOT / "target" / "release" / "smtpgw")).parent / "examples" / "consumer"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing: cargo build --release --example consumer")
    return binary


def sendmail_until_ready(gateway, sender: str, rcpts: list[str], body: bytes, options=()) -> tuple[str, bytes]:
    """smtplib until the sink has seen the broker; (id, the message as the gateway
    received it: smtplib ends it with CRLF)."""

    def send():
        s = smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT)
        try:
            s.ehlo("client.test")
            code, reply = s.mail(sender, list(options))
            assert code == 250, reply
            for r in rcpts:
                assert s.rcpt(r)[0] == 250
            code, reply = s.data(body)
            s.quit()
            return code, reply
        finally:
            s.close()

    id_ = accepted(send, time.monotonic() + 20).decode()
    return id_, body if body.endswith(b"\r\n") else body + b"\r\n"


def test_the_example_consumer_writes_exactly_what_was_sent(start_gateway, tmp_path, io_backend):
    gw = start_gateway(
        "--hostname",
        "mx.test",
        sink=("--sink", "kafka", "--kafka-brokers", BROKER, "--kafka-topic", TOPIC),
    )
    sent: dict[str, tuple[str, list[str], bytes]] = {}

    # 8-bit, several recipients (one twice), dots to unstuff.
    eight_bit = bytes(b for b in range(256) if b not in (10, 13))
    body = b"Subject: 8bit\r\n\r\n" + eight_bit + b"\r\n.leading dot\r\n..two\r\n"
    rcpts = ["x@example.com", "y@example.com", "x@example.com"]
    id_, got = sendmail_until_ready(gw, "sender@client.test", rcpts, body, ["BODY=8BITMIME"])
    sent[id_] = ("sender@client.test", rcpts, got)

    # SMTPUTF8 addresses and a UTF-8 body.
    sender, rcpt = "jörg@client.test", "dörte@example.com"
    body = "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\nGrüße, 你好\r\n".encode()
    id_, got = sendmail_until_ready(gw, sender, [rcpt], body, ["SMTPUTF8", "BODY=8BITMIME"])
    sent[id_] = (sender, [rcpt], got)

    # BDAT in three chunks that split a line and a CRLF, a line of one dot (no stuffing
    # in BDAT) and no final CRLF: BDAT takes the bytes as they are.
    chunks = [b"Subject: bdat\r\n\r\nfirst ", b"half\r", b"\n.\r\n\x00\xff no CRLF at the end"]
    with open_session(gw.host, gw.port) as w:
        w.envelope("bdat@client.test", ("z@example.com",))
        for i, chunk in enumerate(chunks):
            last = " LAST" if i == len(chunks) - 1 else ""
            w.send(f"BDAT {len(chunk)}{last}\r\n".encode() + chunk)
            reply = w.reply()
        assert_reply(reply, "250", "BDAT LAST")
        sent[queued_id(reply)] = ("bdat@client.test", ["z@example.com"], b"".join(chunks))

    # A message cut mid-DATA (no 250: no record), then sent again whole.
    marker = f"cut-{time.time_ns()}".encode()
    whole = b"Subject: retried\r\n\r\n" + marker + b"\r\n" + b"line of a long message\r\n" * 2000
    with open_session(gw.host, gw.port) as w:
        w.envelope("retry@client.test", ("x@example.com",))
        w.expect("DATA", "354")
        w.send(whole[: len(whole) // 2])
        w.abort()
    id_, got = sendmail_until_ready(gw, "retry@client.test", ["x@example.com"], whole)
    sent[id_] = ("retry@client.test", ["x@example.com"], got)

    flags = ["--brokers", BROKER, "--topic", TOPIC, "--idle", "3"]
    for name, command in [("python", [sys.executable, str(CONSUMER)]), ("rust", [str(rust_consumer())])]:
        out = tmp_path / f"consumed-{name}"
        run = subprocess.run([*command, *flags, "--out", str(out)], capture_output=True, timeout=120)
        assert run.returncode == 0, f"{name}: {run.stderr.decode(errors='replace')}"
        check_written(out, sent, marker, run.stderr)


def check_written(out: Path, sent: dict, marker: bytes, stderr: bytes) -> None:
    """What one consumer wrote in `out`, against what was sent."""
    sessions = set()
    for id_, (sender, rcpts, message) in sent.items():
        eml = out / f"{id_}.eml"
        assert eml.exists(), f"{out.name}: {id_} not written; consumer said {stderr!r}"
        assert eml.read_bytes() == message, f"{out.name}: {id_}: the message differs from what was sent"
        env = json.loads((out / f"{id_}.json").read_text(encoding="utf-8"))
        assert env["id"] == id_
        assert env["schema"] == "1"
        assert env["node"] == "mx.test"
        assert env["mail_from"] == sender
        assert env["rcpt_to"] == rcpts
        assert env["helo"] == "client.test"
        assert env["trace"].startswith("Received: from client.test ([127.0.0.1])\r\n\tby mx.test (smtpgw) with ")
        assert id_ in env["trace"]
        assert int(env["session"]) > 0
        sessions.add(env["session"])
    # One session per connection: five connections that got a 250.
    assert len(sessions) == len(sent), sessions
    # The cut transaction left nothing: only the retried copy carries the marker.
    with_marker = [p.name for p in out.glob("*.eml") if marker in p.read_bytes()]
    assert with_marker == [f"{[i for i, s in sent.items() if s[0] == 'retry@client.test'][0]}.eml"]
