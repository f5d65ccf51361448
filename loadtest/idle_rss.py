#!/usr/bin/env python3
"""RSS per connection at 10,000 connections, for each I/O backend.

Usage: loadtest/idle_rss.py [--connections N] [--backends uring,epoll] [BINARY]
       loadtest/idle_rss.py --tls-hello=-1,0,16000,49152 [--connections 2000] [BINARY]

Starts the gateway (null sink, loopback, port 0) once per backend, opens N
connections and reads every greeting ("idle"), measures VmRSS growth per
connection; then sends EHLO/MAIL/RCPT/DATA and 1 KiB of body on each ("mid-DATA")
and measures again. The gateway is stopped by PID. Prints one line per backend and
state, in KiB per connection.

With --tls-hello, measures half-open TLS connections instead: the gateway gets an
implicit-TLS listener (a certificate made with the openssl CLI), and for each size
in the list N connections each send that many bytes of a ClientHello that declares
itself larger (handshake records, never completed), then stay silent; size -1 is
the plaintext listener's idle connection, for comparison. A fresh gateway per size,
with a handshake timeout longer than the measurement. A line per size says the RSS
per connection and how many of the N connections the gateway kept open.
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


def start(binary: str, backend: str, n: int, spool: str, kinds: set[str], *extra: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """The gateway (null sink, loopback, port 0) with room for `n` connections, once it
    logs a listener of each of `kinds`; returns it and each kind's address."""
    gw = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--sink", "null",
         "--spool-dir", spool, "--accept-domain", "example.com", "--io-backend", backend,
         "--max-connections", str(n + 100), "--idle-timeout", "600s", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1", "SMTPGW_LOG": "info"}, text=True,
    )
    addrs: dict[str, str] = {}
    deadline = time.monotonic() + 15
    while not kinds <= addrs.keys() and time.monotonic() < deadline:
        m = re.search(r"listening addr=(\S+) kind=(\w+)", gw.stderr.readline())
        if m:
            addrs[m.group(2)] = m.group(1)
    if not kinds <= addrs.keys():
        gw.kill()
        gw.wait()
        sys.exit(f"idle_rss: gateway ({backend}) did not start")
    time.sleep(0.3)
    return gw, addrs


def stop(gw: subprocess.Popen, socks: list[socket.socket]) -> None:
    """Closes the client sockets and kills the gateway by its PID."""
    for s in socks:
        s.close()
    gw.send_signal(signal.SIGKILL)
    gw.wait()


def measure(binary: str, backend: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as spool:
        gw, addrs = start(binary, backend, n, spool, {"Smtp"})
        socks: list[socket.socket] = []
        try:
            host, port = addrs["Smtp"].rsplit(":", 1)
            base = settle(gw.pid)
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
        finally:
            stop(gw, socks)


def partial_client_hello(size: int, record: int = 16_384) -> bytes:
    """`size` bytes of handshake records of `record` bytes of payload carrying the
    start of a ClientHello that declares 60,000 bytes, so it never completes."""
    body = bytes([1]) + (60_000).to_bytes(3, "big") + b"\x03\x03" + bytes(60_000)
    out = b""
    pos = 0
    while len(out) < size:
        chunk = body[pos:pos + record]
        pos += len(chunk)
        out += bytes([22, 3, 1]) + len(chunk).to_bytes(2, "big") + chunk
    return out[:size]


def open_count(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has not closed."""
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            alive += 1 if s.recv(1, socket.MSG_PEEK) else 0
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        s.setblocking(True)
    return alive


def measure_tls(binary: str, backend: str, n: int, size: int, record: int) -> None:
    """One gateway, N connections each sending `size` bytes of a partial ClientHello
    (0: connect and stay silent; -1: the plaintext listener, greeting read, for
    comparison)."""
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = f"{tmp}/c.pem", f"{tmp}/k.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "2", "-subj", "/CN=mx.test", "-addext", "subjectAltName=DNS:mx.test",
                        "-addext", "basicConstraints=critical,CA:FALSE", "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=60)
        # A binary from before the handshake deadline has no such flag.
        helptext = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
        timeout = ["--tls-handshake-timeout", "600s"] if "--tls-handshake-timeout" in helptext else []
        gw, addrs = start(binary, backend, n, f"{tmp}/spool", {"Smtp", "ImplicitTls"},
                          "--listen-tls", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key,
                          "--max-connections-per-ip", "0", "--max-connection-rate-per-ip", "0", *timeout)
        socks: list[socket.socket] = []
        try:
            host, port = addrs["Smtp" if size < 0 else "ImplicitTls"].rsplit(":", 1)
            base = settle(gw.pid)
            payload = partial_client_hello(max(size, 0), record)
            socks += [socket.create_connection((host, int(port))) for _ in range(n)]
            for s in socks:
                if size < 0:
                    recv_line(s)
                elif payload:
                    try:
                        s.sendall(payload)
                    except OSError:
                        pass
            held = settle(gw.pid)
            alive = open_count(socks) if size >= 0 else n
            what = "plaintext connections after the greeting" if size < 0 else \
                f"half-open TLS connections, {size}-byte partial ClientHello in {record}-byte records"
            print(f"{backend:6} {n} {what}: {(held - base) / n:.1f} KiB per connection "
                  f"(RSS {base} -> {held} KiB), {alive} of {n} kept open", flush=True)
        finally:
            stop(gw, socks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--backends", default="uring,epoll")
    ap.add_argument("--tls-hello", help="comma-separated partial ClientHello sizes: measure half-open TLS instead")
    ap.add_argument("--tls-record", type=int, default=16_384, help="payload bytes per handshake record")
    ap.add_argument("binary", nargs="?", default=str(Path(__file__).resolve().parent.parent / "target/release/smtpgw"))
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.connections + 1000), hard))
    for backend in a.backends.split(","):
        if a.tls_hello is not None:
            for size in a.tls_hello.split(","):
                measure_tls(a.binary, backend, a.connections, int(size), a.tls_record)
        else:
            measure(a.binary, backend, a.connections)


if __name__ == "__main__":
    main()
