#!/usr/bin/env python3
"""RSS per connection at 10,000 connections, for each I/O backend.

Usage: loadtest/idle_rss.py [--connections N] [--backends uring,epoll] [BINARY]

Starts the gateway (null sink, loopback, port 0) once per backend, opens N
connections and reads every greeting ("idle"), measures VmRSS growth per
connection; then sends EHLO/MAIL/RCPT/DATA and 1 KiB of body on each ("mid-DATA")
and measures again. The gateway is stopped by PID. Prints one line per backend and
state, in KiB per connection.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise KeyError("VmRSS")


def settle(pid: int) -> int:
    """RSS once it stops moving (the reactors have processed what was sent)."""
    last, same = -1, 0
    for _ in range(100):
        now = rss_kib(pid)
        same = same + 1 if now == last else 0
        if same >= 5:
            return now
        last = now
        time.sleep(0.1)
    return last


def recv_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = s.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def measure(binary: str, backend: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as spool:
        gw = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--sink", "null",
             "--spool-dir", spool, "--accept-domain", "example.com", "--io-backend", backend,
             "--max-connections", str(n + 100), "--idle-timeout", "600s"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "NO_COLOR": "1", "SMTPGW_LOG": "info"}, text=True,
        )
        try:
            addr = None
            deadline = time.monotonic() + 15
            while addr is None and time.monotonic() < deadline:
                line = gw.stderr.readline()
                m = re.search(r"listening addr=(\S+)", line)
                if m:
                    addr = m.group(1)
            if addr is None:
                sys.exit(f"idle_rss: gateway ({backend}) did not start")
            host, port = addr.rsplit(":", 1)
            time.sleep(0.3)
            base = settle(gw.pid)
            socks = []
            for _ in range(n):
                s = socket.create_connection((host, int(port)))
                socks.append(s)
            for s in socks:
                recv_line(s)
            idle = settle(gw.pid)
            print(f"{backend:6} {n} connections after the greeting: {(idle - base) / n:.1f} KiB per connection"
                  f" (RSS {base} -> {idle} KiB)", flush=True)
            body = b"Subject: rss\r\n\r\n" + b"x" * 1000 + b"\r\n"
            for s in socks:
                s.sendall(b"HELO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n" + body)
            data = settle(gw.pid)
            print(f"{backend:6} {n} connections in the middle of DATA: {(data - base) / n:.1f} KiB per connection"
                  f" (RSS {base} -> {data} KiB)", flush=True)
            for s in socks:
                s.close()
        finally:
            gw.send_signal(signal.SIGKILL)
            gw.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--backends", default="uring,epoll")
    ap.add_argument("binary", nargs="?", default=str(Path(__file__).resolve().parent.parent / "target/release/smtpgw"))
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.connections + 1000), hard))
    for backend in a.backends.split(","):
        measure(a.binary, backend, a.connections)


if __name__ == "__main__":
    main()
