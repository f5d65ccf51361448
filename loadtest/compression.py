#!/usr/bin/env python3
"""loadtest/compression.py: what Kafka compression costs and saves on realistic mail.

Generates a deterministic corpus of mail (seeded): plain text, multipart/alternative
text + HTML newsletters, and messages with base64 attachments, some compressible (CSV)
and most not (random bytes standing in for JPEG, PDF and Office files, which are
already compressed). The words are English, drawn with their frequencies from the
comments and docstrings of Python's standard library.

Then, for each `compression.type` (interleaved over --rounds rounds), starts the
gateway (`--sink kafka`, the given broker), sends the whole corpus over --connections
SMTP connections, and measures:
- gateway CPU (utime+stime from /proc/PID/stat) per message;
- bytes the gateway sent to the broker (TCP bytes_acked of its sockets to the broker
  port, from `ss -tin`, at the end of the round: produce requests, i.e. the record
  batches as they are stored in the topic plus request framing).

Usage: loadtest/compression.py --gateway target/release/smtpgw --brokers 127.0.0.1:PORT
         [--topic T] [--messages N] [--rounds R] [--connections C] [--types none,lz4,zstd]
         [--write-corpus DIR]
Only 127.0.0.1; every process started here is stopped by PID.
"""

import argparse
import base64
import collections
import json
import os
import random
import re
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path


def vocabulary():
    """English words with their frequencies, from the stdlib's comments and docstrings."""
    counts = collections.Counter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[:200]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for chunk in re.findall(r'#([^\n]*)|"""(.*?)"""', text, re.S):
            for word in re.findall(r"[A-Za-z]{2,}", " ".join(chunk)):
                counts[word.lower()] += 1
    words = [w for w, _ in counts.most_common(5000)]
    weights = [counts[w] for w in words]
    return words, weights


class Corpus:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.words, self.weights = vocabulary()
        self.people = [
            f"{self.rng.choice(self.words)}.{self.rng.choice(self.words)}@{d}"
            for d in ("example.com", "example.org", "mail.example.net")
            for _ in range(30)
        ]

    def sentence(self):
        n = self.rng.randint(6, 22)
        ws = self.rng.choices(self.words, self.weights, k=n)
        return ws[0].capitalize() + " " + " ".join(ws[1:]) + self.rng.choice(".....?!")

    def paragraph(self):
        return " ".join(self.sentence() for _ in range(self.rng.randint(2, 7)))

    def text(self, size):
        out = []
        while sum(len(p) for p in out) < size:
            out.append(self.paragraph())
        return "\n\n".join(out) + "\n\n-- \n" + self.rng.choice(self.people) + "\n"

    def html(self, text):
        rows = "".join(
            f'<tr><td style="padding:4px 8px;border:1px solid #ddd">{self.rng.choice(self.words)}</td>'
            f'<td style="padding:4px 8px;border:1px solid #ddd;text-align:right">{self.rng.randint(1, 99999)}</td></tr>\n'
            for _ in range(self.rng.randint(3, 20))
        )
        paras = "".join(
            f'<p style="font-family:Arial,Helvetica,sans-serif;font-size:14px;line-height:20px;color:#333333;margin:0 0 12px 0">{p}</p>\n'
            for p in text.split("\n\n")
        )
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Newsletter</title></head>\n"
            '<body style="margin:0;padding:0;background:#f4f4f4">\n'
            '<table width="100%" cellpadding="0" cellspacing="0" border="0"><tr><td align="center">\n'
            '<table width="600" cellpadding="0" cellspacing="0" border="0" style="background:#ffffff">\n'
            f'<tr><td style="padding:20px">\n{paras}<table cellspacing="0" style="border-collapse:collapse">\n{rows}</table>\n'
            '<p style="font-size:11px;color:#999999">You receive this because you subscribed. '
            '<a href="https://example.com/unsubscribe?u=1234567890abcdef">Unsubscribe</a></p>\n'
            "</td></tr></table>\n</td></tr></table>\n</body></html>\n"
        )

    def csv(self, size):
        lines = ["date,account,item,quantity,amount,comment"]
        while sum(len(l) + 1 for l in lines) < size:
            lines.append(
                f"2026-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d},"
                f"{self.rng.randint(10000, 99999)},{self.rng.choice(self.words)},"
                f"{self.rng.randint(1, 500)},{self.rng.randint(1, 999999) / 100:.2f},"
                f"{' '.join(self.rng.choices(self.words, self.weights, k=3))}"
            )
        return ("\n".join(lines) + "\n").encode()

    def message(self, i):
        m = EmailMessage()
        sender = self.rng.choice(self.people)
        m["From"] = sender
        m["To"] = ", ".join(self.rng.sample(self.people, self.rng.randint(1, 3)))
        m["Subject"] = self.sentence()[:70]
        m["Date"] = format_datetime(
            __import__("datetime").datetime(2026, 12, 1, 9, 0, tzinfo=__import__("datetime").timezone.utc)
        )
        m["Message-ID"] = make_msgid(idstring=str(i), domain="example.com")
        kind = self.rng.random()
        text = self.text(self.rng.randint(500, 6000))
        m.set_content(text)
        if kind < 0.35:
            pass  # plain text
        elif kind < 0.65:
            m.add_alternative(self.html(text), subtype="html")
        elif kind < 0.75:
            m.add_attachment(self.csv(self.rng.randint(20_000, 300_000)), maintype="text",
                             subtype="csv", filename="report.csv")
        else:
            # Already-compressed content (JPEG, PDF, DOCX): incompressible bytes.
            size = int(self.rng.lognormvariate(11.5, 1.0))  # median ~100 KB
            size = max(10_000, min(size, 4_000_000))
            kind = self.rng.choice([("image", "jpeg", "photo.jpg"), ("application", "pdf", "invoice.pdf"),
                                    ("application", "vnd.openxmlformats-officedocument.wordprocessingml.document", "letter.docx")])
            m.add_attachment(self.rng.randbytes(size), maintype=kind[0], subtype=kind[1], filename=kind[2])
        return sender, m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def bytes_to_broker(pid, port):
    """TCP payload bytes the process's sockets to 127.0.0.1:port had acknowledged."""
    out = subprocess.run(["ss", "-tinpH", "dst", f"127.0.0.1:{port}"], capture_output=True,
                         text=True, timeout=10).stdout
    total = 0
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if f"pid={pid}," in line and i + 1 < len(lines):
            m = re.search(r"bytes_acked:(\d+)", lines[i + 1])
            if m:
                total += int(m.group(1))
    return total


def start_gateway(binary, brokers, topic, compression, log):
    args = [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--sink", "kafka",
            "--kafka-brokers", brokers, "--kafka-topic", topic, "--accept-domain", "example.com",
            "--accept-domain", "example.org", "--accept-domain", "mail.example.net",
            "--max-message-size", "10M", "--kafka-config", f"compression.type={compression}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGW_")}
    env["SMTPGW_LOG"] = "info,smtpgw::message=warn"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        log.flush()
        text = Path(log.name).read_text(errors="replace")
        m = re.search(r"listening.* addr=127\.0\.0\.1:(\d+)", text)
        ready = re.search(r"\bready\b", text)
        if m and ready:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited: {text}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("gateway did not start")


def send_all(port, messages, connections):
    chunks = [messages[i::connections] for i in range(connections)]
    failures = []

    def worker(chunk):
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.ehlo("client.example")
            for sender, rcpts, body in chunk:
                # Until the sink has seen the broker, 451: retry.
                for _ in range(100):
                    try:
                        s.sendmail(sender, rcpts, body)
                        break
                    except smtplib.SMTPResponseException as e:
                        if e.smtp_code // 100 != 4:
                            failures.append(e)
                            break
                        time.sleep(0.1)
                    except smtplib.SMTPRecipientsRefused as e:
                        failures.append(e)
                        break

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} messages refused: {failures[:3]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", default="smtp.inbound")
    ap.add_argument("--messages", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--types", default="none,lz4,zstd")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--write-corpus")
    a = ap.parse_args()
    host, port = a.brokers.rsplit(":", 1)
    assert host == "127.0.0.1", "loopback only"

    corpus = Corpus(a.seed)
    messages = []
    for i in range(a.messages):
        sender, body = corpus.message(i)
        messages.append((sender, [corpus.rng.choice(corpus.people)], body))
    total = sum(len(b) for _, _, b in messages)
    sizes = sorted(len(b) for _, _, b in messages)
    print(f"corpus: {len(messages)} messages, {total} bytes, median {sizes[len(sizes) // 2]}, "
          f"largest {sizes[-1]}", flush=True)
    if a.write_corpus:
        d = Path(a.write_corpus)
        d.mkdir(parents=True, exist_ok=True)
        for i, (_, _, body) in enumerate(messages):
            (d / f"{i:05d}.eml").write_bytes(body)

    results = collections.defaultdict(list)
    types = a.types.split(",")
    for r in range(a.rounds):
        for t in (types if r % 2 == 0 else types[::-1]):
            with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
                proc, smtp_port = start_gateway(a.gateway, a.brokers, a.topic, t, log)
                try:
                    # Warm-up: the producer connects and learns the partitions.
                    send_all(smtp_port, messages[:5], 1)
                    wire0, cpu0 = bytes_to_broker(proc.pid, port), cpu_ticks(proc.pid)
                    t0 = time.monotonic()
                    send_all(smtp_port, messages, a.connections)
                    took = time.monotonic() - t0
                    time.sleep(0.5)  # the last acknowledgements
                    cpu = cpu_ticks(proc.pid) - cpu0
                    wire = bytes_to_broker(proc.pid, port) - wire0
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            hz = os.sysconf("SC_CLK_TCK")
            row = {"type": t, "round": r, "messages": len(messages), "corpus_bytes": total,
                   "cpu_us_per_msg": cpu / hz * 1e6 / len(messages), "wire_bytes": wire,
                   "wire_ratio": wire / total, "seconds": took}
            results[t].append(row)
            print(json.dumps(row), flush=True)
    print("\n| compression.type | gateway CPU per message | bytes to the broker | of the corpus |")
    print("|---|---|---|---|")
    base = statistics.median(x["cpu_us_per_msg"] for x in results[types[0]])
    for t in types:
        cpu = statistics.median(x["cpu_us_per_msg"] for x in results[t])
        wire = statistics.median(x["wire_bytes"] for x in results[t])
        rng = [x["cpu_us_per_msg"] for x in results[t]]
        print(f"| {t} | {cpu:.0f} µs ({min(rng):.0f}–{max(rng):.0f}); {cpu - base:+.0f} µs vs {types[0]} "
              f"| {wire / len(messages) / 1024:.1f} KiB per message | {wire / total:.1%} |")


if __name__ == "__main__":
    main()
