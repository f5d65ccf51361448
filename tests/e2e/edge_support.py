"""Helpers shared by the edge tests (TLS, PROXY, limits): connections from a chosen
loopback source address, a self-signed certificate made with the openssl CLI, the
implicit-TLS listener's address from the log, stored record headers and metrics."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from smtpwire import IO_TIMEOUT, Wire



def wire_from(gateway, source: str, port: int | None = None) -> Wire:
    """A Wire whose connection comes from `source` (127.0.0.x: all loopback)."""
    assert source.startswith("127."), "the suite only ever talks to loopback"
    wire = Wire.__new__(Wire)
    wire.sock = socket.create_connection(
        (gateway.host, port or gateway.port), timeout=IO_TIMEOUT, source_address=(source, 0)
    )
    wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wire.buf = b""
    return wire


def make_certificate(directory: Path, name: str = "mx.test") -> tuple[Path, Path]:
    """A self-signed end-entity certificate for `name` and its key (PEM)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:FALSE", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def client_context(cafile: Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """Verifies the gateway's certificate against `cafile`, as a careful client does."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def listener_port(gateway, kind: str, timeout: float = 10.0) -> int:
    """The port of the gateway's listener of `kind` (`ImplicitTls`, `ProxiedSmtp`), from its log."""
    pattern = re.compile(rf"listening addr=(\S+) kind={kind}\b")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(gateway.stderr)
        if match:
            return int(match.group(1).rpartition(":")[2])
        time.sleep(0.02)
    raise AssertionError(f"no {kind} listener in the log:\n{gateway.stderr}")


def tls_port(gateway) -> int:
    return listener_port(gateway, "ImplicitTls")


def headers(gateway, message_id: str) -> dict[str, list[str]]:
    """The stored record's headers (`smtpgw spool cat --headers`)."""
    out: dict[str, list[str]] = {}
    for line in gateway.tool("cat", "--headers", message_id).decode().splitlines():
        name, _, value = line.partition(": ")
        out.setdefault(name, []).append(value)
    return out


def metrics(gateway) -> str:
    assert gateway.metrics_addr, "no metrics_addr= in the log"
    with urllib.request.urlopen(f"http://{gateway.metrics_addr}/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric(gateway, name: str, deadline: float = 5.0, at_least: float | None = None) -> float:
    """A sample's value (`name` with its labels as exposed), waiting out the flush: until
    it is above 0, or with `at_least` until it reaches that (reactors flush their counts
    separately, so a first non-zero reading can still miss a later event's count)."""
    pattern = re.compile(r"^" + re.escape(name) + r" (\S+)$", re.M)
    end = time.monotonic() + deadline
    value = 0.0
    while True:
        match = pattern.search(metrics(gateway))
        value = float(match.group(1)) if match else 0.0
        reached = value >= at_least if at_least is not None else value > 0
        if reached or time.monotonic() > end:
            return value
        time.sleep(0.1)


def recv_all(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    """Everything the server sends until it closes."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


class BioTls:
    """A TLS client over a socket the test controls (ssl's MemoryBIO), so its first
    flight can be sent exactly as the test chooses: here after a PROXY header."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="mx.test")
        self.buf = b""

    def client_hello(self) -> bytes:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def _flush_and_fill(self) -> None:
        out = self.outgoing.read()
        if out:
            self.sock.sendall(out)
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError("server closed during the handshake")
        self.incoming.write(data)

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self.sock.sendall(self.outgoing.read())
                return
            except ssl.SSLWantReadError:
                self._flush_and_fill()

    def records(self, data: bytes) -> bytes:
        """`data` encrypted, for the test to send as it likes."""
        self.obj.write(data)
        return self.outgoing.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.records(data))

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            try:
                self.buf += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._flush_and_fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"\n".join(lines)
