"""End to end through Kafka: Python smtplib sends, the gateway publishes, an independent
client (confluent-kafka, assign() to partition 0) reads the topic back, and every value
and header is compared with what was sent.

Runs when SMTPGW_TEST_KAFKA=host:port names a broker (`scripts/kafka-broker.sh start`
prints one for a local tansu) and `confluent_kafka` is importable; skipped otherwise.
The topic is SMTPGW_TEST_KAFKA_TOPIC or smtp.inbound and must exist. Other records in
it are ignored (matched by key), so a long-lived broker can be shared.
"""

from __future__ import annotations

import os
import random
import re
import smtplib
import time

import pytest

from smtpwire import IO_TIMEOUT, ULID

BROKER = os.environ.get("SMTPGW_TEST_KAFKA")
TOPIC = os.environ.get("SMTPGW_TEST_KAFKA_TOPIC", "smtp.inbound")

if not BROKER:
    pytest.skip("SMTPGW_TEST_KAFKA not set", allow_module_level=True)
pytest.importorskip("confluent_kafka", reason="pip install confluent-kafka to run the Kafka e2e test")

RECEIVED = re.compile(rb"\AReceived: from client\.test \(\[127\.0\.0\.1\]\)\r\n\tby mx\.test \(smtpgw\) with ESMTP id [0-9A-Z]{26}(\r\n\tfor <[^>]*>)?;\r\n\t[^\r\n]*\r\n\Z")


KAFKA_SINK = ("--sink", "kafka", "--kafka-brokers", BROKER, "--kafka-topic", TOPIC)


@pytest.fixture
def gateway(start_gateway):
    # No size limit on tansu; let the producer take 1 MiB bodies plus overhead.
    return start_gateway(
        *("--hostname", "mx.test", "--kafka-config", "message.max.bytes=3000000", "--max-message-size", "2M"),
        sink=KAFKA_SINK,
    )


def smtp(gateway) -> smtplib.SMTP:
    s = smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT)
    s.ehlo("client.test")
    return s


def bodies() -> list[bytes]:
    """Dot-stuffing candidates, 8-bit bytes, CRLF at every offset, empty, and 1 MiB.
    smtplib turns any bare CR or LF into CRLF, so bodies only have CRLF line ends; a
    truly empty DATA is covered by the Rust sink tests."""
    rng = random.Random(20261123)
    eight_bit = bytes(b for b in range(256) if b not in (10, 13))
    out = [
        b"",
        b"\r\n",
        b".\r\n..\r\n.x\r\n...\r\n",
        b"Subject: dots\r\n\r\n.\r\n.leading\r\n..two\r\n",
        eight_bit + b"\r\n",
    ]
    # CRLF after every prefix length 0..40 of a line.
    out.append(b"".join(eight_bit[:n] + b"\r\n" for n in range(41)))
    for size in (100, 5000, 70000):
        lines = []
        total = 0
        while total < size:
            line = bytes(rng.choice(eight_bit) for _ in range(rng.randrange(0, 200)))
            if rng.random() < 0.2:
                line = b"." + line
            lines.append(line + b"\r\n")
            total += len(lines[-1])
        out.append(b"".join(lines))
    mib = (b"x" * 998 + b"\r\n") * ((1 << 20) // 1000 + 1)
    out.append(mib[: (1 << 20) - 2] + b"\r\n")
    return out


def consume(keys: set[bytes], timeout: float = 60.0) -> dict[bytes, list]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": BROKER, "group.id": "smtpgw-e2e", "enable.auto.commit": False})
    try:
        meta = c.list_topics(TOPIC, timeout=10)
        partitions = meta.topics[TOPIC].partitions or {0: None}
        c.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in partitions])
        found: dict[bytes, list] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and set(found) != keys:
            m = c.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, m.error()
            if m.key() in keys:
                found.setdefault(m.key(), []).append(m)
        return found
    finally:
        c.close()


def test_every_message_is_in_the_topic_byte_for_byte(gateway):
    rcpts = ["x@example.com", "y@example.com", "x@example.com"]
    sent: dict[bytes, bytes] = {}
    s = smtp(gateway)
    deadline = time.monotonic() + 20
    for body in bodies():
        while True:
            s.mail("sender@client.test")
            for r in rcpts:
                assert s.rcpt(r)[0] == 250
            code, reply = s.data(body)
            # The gateway takes mail once its sink has seen the broker.
            if code == 451 and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            break
        assert code == 250, reply
        match = ULID.search(reply.decode())
        assert match, reply
        # smtplib ends what it sends with CRLF (so b"" goes out as one empty line).
        sent[match.group(0).encode()] = body if body.endswith(b"\r\n") else body + b"\r\n"
    s.quit()

    found = consume(set(sent))
    assert set(found) == set(sent), f"missing {set(sent) - set(found)}"
    for key, body in sent.items():
        assert len(found[key]) == 1, "one 250, one record"
        m = found[key][0]
        value = m.value() or b""
        assert value.endswith(body)
        assert RECEIVED.match(value[: len(value) - len(body)]), value[:300]
        headers: dict[str, list[bytes]] = {}
        for k, v in m.headers() or []:
            headers.setdefault(k, []).append(v or b"")
        assert [k for k, _ in m.headers()][:3] == ["smtp.id", "smtp.verb", "smtp.mail_from"]
        assert headers["smtp.id"] == [key]
        assert headers["smtp.verb"] == [b"MAIL"]
        assert headers["smtp.mail_from"] == [b"sender@client.test"]
        assert headers["smtp.rcpt_to"] == [r.encode() for r in rcpts]
        assert headers["smtp.helo"] == [b"client.test"]
        assert headers["smtp.client_addr"][0].startswith(b"127.0.0.1:")
        assert headers["smtp.tls"] == [b"false"]
        assert headers["smtp.schema"] == [b"1"]
        assert len(headers["smtp.node"]) == 1 and headers["smtp.node"][0]
        assert int(headers["smtp.session"][0]) > 0
        assert len(headers["smtp.received_at"]) == 1 and len(headers["smtp.mail_params"]) == 1


def accepted(send, deadline: float) -> bytes:
    """Runs `send` (one whole transaction) until it is not a 451 for a sink that has
    not yet seen the broker; returns the key from `queued as <id>`."""
    while True:
        code, reply = send()
        if code == 451 and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        assert code == 250, reply
        match = ULID.search(reply.decode())
        assert match, reply
        return match.group(0).encode()


def test_empty_data_and_raw_bdat_are_published_exactly(gateway):
    """The cases smtplib.sendmail cannot send: a DATA body of zero octets (the final
    dot right after 354) and BDAT chunks, which are stored without any unstuffing."""
    s = smtp(gateway)

    def transaction(body_step):
        def send():
            s.mail("sender@client.test")
            assert s.rcpt("x@example.com")[0] == 250
            return body_step()

        return send

    def empty_data():
        assert s.docmd("DATA")[0] == 354
        s.send(b".\r\n")
        return s.getreply()

    chunks = [b"Subject: bdat\r\n\r\n.not unstuffed\r\n", b"\x00\xff\r\n.\r\n", b"end"]

    def bdat():
        for chunk in chunks[:-1]:
            s.send(b"BDAT %d\r\n" % len(chunk) + chunk)
            assert s.getreply()[0] == 250
        s.send(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
        return s.getreply()

    deadline = time.monotonic() + 20
    sent = {
        accepted(transaction(empty_data), deadline): b"",
        accepted(transaction(bdat), deadline): b"".join(chunks),
    }
    s.quit()
    found = consume(set(sent))
    assert set(found) == set(sent), f"missing {set(sent) - set(found)}"
    for key, body in sent.items():
        value = found[key][0].value() or b""
        assert RECEIVED.match(value[: len(value) - len(body)]), value[:300]
        assert value.endswith(body) and len(found[key]) == 1


def test_dsn_parameters_are_record_headers_per_recipient(gateway):
    """RFC 3461 parameters sent by smtplib reach the record: RET and ENVID once, NOTIFY
    and ORCPT once per smtp.rcpt_to in its order (empty where the client gave none)."""
    s = smtp(gateway)
    assert s.has_extn("DSN")

    def send():
        s.mail("sender@client.test", ["RET=HDRS", "ENVID=abc+2Bdef"])
        assert s.rcpt("bob@example.com", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+40x.example"])[0] == 250
        assert s.rcpt("carol@example.com")[0] == 250
        assert s.rcpt("dan@example.com", ["NOTIFY=NEVER"])[0] == 250
        return s.data(b"Subject: dsn\r\n\r\nbody\r\n")

    key = accepted(send, time.monotonic() + 20)
    s.quit()
    found = consume({key})
    assert len(found.get(key, [])) == 1, found
    headers: dict[str, list[bytes]] = {}
    for k, v in found[key][0].headers() or []:
        headers.setdefault(k, []).append(v or b"")
    assert headers["smtp.rcpt_to"] == [b"bob@example.com", b"carol@example.com", b"dan@example.com"]
    assert headers["smtp.rcpt_notify"] == [b"SUCCESS,FAILURE", b"", b"NEVER"]
    assert headers["smtp.rcpt_orcpt"] == [b"rfc822;bob+40x.example", b"", b""]
    assert headers["smtp.dsn_ret"] == [b"HDRS"]
    assert headers["smtp.dsn_envid"] == [b"abc+2Bdef"]


def test_transaction_line_names_the_partition_and_offset_the_record_got(gateway):
    """Issue 18 item 1: for Kafka the transaction line carries where the record is, so an
    operator can go from a log line straight to the record."""
    s = smtp(gateway)
    deadline = time.monotonic() + 20

    def send():
        s.mail("sender@client.test")
        s.rcpt("x@example.com")
        return s.data(b"Subject: where\r\n\r\nfind me\r\n")

    keys = [accepted(send, deadline) for _ in range(3)]
    s.quit()
    found = consume(set(keys))
    for key in keys:
        [record] = found[key]
        deadline = time.monotonic() + 10
        while True:
            lines = [l for l in gateway.stderr.splitlines() if f"id={key.decode()}" in l and " code=250" in l]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(lines) == 1, lines
        assert "sink=kafka" in lines[0], lines[0]
        assert f" partition={record.partition()} " in lines[0], (lines[0], record.partition())
        assert re.search(rf" offset={record.offset()}( |$)", lines[0]), (lines[0], record.offset())


def test_authenticated_sender_is_a_record_header(start_gateway, tmp_path):
    """SMTP AUTH: the user the session authenticated as reaches the Kafka record as
    smtp.auth (and the Received: line says ESMTPA, loopback plaintext here); a session
    that did not authenticate has it empty."""
    import subprocess

    from conftest import gateway_binary, gateway_env

    hashed = subprocess.run([str(gateway_binary()), "auth", "hash"], input=b"secret\n",
                            capture_output=True, timeout=60, env=gateway_env())
    assert hashed.returncode == 0, hashed.stderr
    users = tmp_path / "users"
    users.write_text(f"alice:{hashed.stdout.decode().strip()}\n")
    gateway = start_gateway("--hostname", "mx.test", "--auth-users", str(users), "--auth-allow-plaintext",
                            sink=KAFKA_SINK)
    keys = {}
    for user in ("alice", None):
        s = smtp(gateway)
        if user:
            s.login(user, "secret")

        def send():
            s.mail("app@client.test")
            assert s.rcpt("x@example.com")[0] == 250
            return s.data(b"Subject: auth\r\n\r\nbody\r\n")

        keys[user] = accepted(send, time.monotonic() + 20)
        s.quit()
    found = consume(set(keys.values()))
    for user, key in keys.items():
        [record] = found[key]
        headers = dict(record.headers() or [])
        assert headers["smtp.auth"] == (user or "").encode(), headers
        protocol = b" with ESMTPA id " if user else b" with ESMTP id "
        assert protocol in (record.value() or b"")[:300]
