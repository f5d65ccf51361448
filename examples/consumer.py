#!/usr/bin/env python3
"""A consumer of smtpgw's Kafka records (docs/record.md, schema 1) that writes each
message as received to OUT/<id>.eml and its envelope to OUT/<id>.json, once per id.

    examples/consumer.py --brokers 127.0.0.1:9092 --topic smtp.inbound --out DIR [--idle S]

It reads every partition from the beginning with assign() (no consumer group needed,
and tansu gives subscribe() its partitions only after ~23 s), and stops after --idle
seconds without a record (0: runs until interrupted). Deduplication is by key, the
message id (docs/record.md, "Duplicates"): a key whose .eml exists is skipped and
counted. Files appear atomically (written under a temporary name, then renamed; the
.eml last, so its presence means both are complete). Needs confluent-kafka.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

# The trace line the gateway adds ends with its date's zone and CRLF; client text in it
# is escaped, so this is never earlier in the line (docs/record.md, "Value").
TRACE_END = b" +0000\r\n"
LIST_HEADERS = {"smtp.rcpt_to"}


def envelope(msg) -> dict:
    """The record's headers as JSON: each header once, `rcpt_to` a list; values are
    UTF-8 by the contract, and a value that is not is an error, not a guess."""
    env: dict = {"rcpt_to": []}
    for name, value in msg.headers() or []:
        text = (value or b"").decode("utf-8")
        field = name.removeprefix("smtp.")
        if name in LIST_HEADERS:
            env[field].append(text)
        else:
            env[field] = text
    env["partition"] = msg.partition()
    env["offset"] = msg.offset()
    return env


def split(value: bytes) -> tuple[bytes, bytes]:
    """(trace line, message as received)."""
    at = value.find(TRACE_END)
    if not value.startswith(b"Received: ") or at < 0:
        raise ValueError("value does not start with smtpgw's Received: line")
    end = at + len(TRACE_END)
    return value[:end], value[end:]


def write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", default="smtp.inbound")
    ap.add_argument("--out", required=True)
    ap.add_argument("--idle", type=float, default=0.0, help="stop after this many seconds without a record; 0: never")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    c = Consumer({"bootstrap.servers": args.brokers, "group.id": "smtpgw-example", "enable.auto.commit": False})
    written = duplicates = 0
    try:
        meta = c.list_topics(args.topic, timeout=10)
        topic = meta.topics.get(args.topic)
        if topic is None or topic.error is not None:
            print(f"consumer: topic {args.topic}: {topic.error if topic else 'not found'}", file=sys.stderr)
            return 1
        c.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in topic.partitions])
        last = time.monotonic()
        while args.idle <= 0 or time.monotonic() - last < args.idle:
            m = c.poll(0.2)
            if m is None:
                continue
            if m.error() is not None:
                print(f"consumer: {m.error()}", file=sys.stderr)
                return 1
            last = time.monotonic()
            key = (m.key() or b"").decode("ascii")
            if len(key) != 26 or not key.isalnum():
                print(f"consumer: skipping a record whose key {key!r} is not a message id", file=sys.stderr)
                continue
            eml = os.path.join(args.out, key + ".eml")
            if os.path.exists(eml):
                duplicates += 1
                continue
            trace, message = split(m.value() or b"")
            env = envelope(m)
            env["trace"] = trace.decode("utf-8")
            write_atomic(os.path.join(args.out, key + ".json"), json.dumps(env, ensure_ascii=False, indent=1).encode())
            write_atomic(eml, message)
            written += 1
    finally:
        c.close()
    print(f"consumer: {written} messages written, {duplicates} duplicates skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
