"""A small raw SMTP client for protocol edge cases, plus message helpers.

smtplib and swaks are the real clients of the suite; this module exists for what they
will not do on purpose: pipelined bursts, bare CR/LF, vanishing mid-DATA, byte-at-a-time
writes. Every socket operation has a timeout, so no test can hang on a silent server.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

IO_TIMEOUT = 10.0

ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
QUEUED = re.compile(r"queued as <?([0-9A-HJKMNP-TV-Z]{26})>?")
ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


@dataclass
class Reply:
    code: int
    enhanced: str | None
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return self.text


def _matches(pattern: str, value: str) -> bool:
    return len(pattern) == len(value) and all(p in ("x", v) for p, v in zip(pattern, value))


def reply_matches(reply: Reply, spec: str) -> bool:
    """`spec` is `CODES [ENHANCED]`: CODES is one code or alternatives joined by `|`, and
    `x` matches any digit, e.g. `250 2.1.0`, `501`, `553|501 5.x.x`, `5xx`."""
    codes, _, enhanced = spec.partition(" ")
    if not any(_matches(code, str(reply.code)) for code in codes.split("|")):
        return False
    return not enhanced or (reply.enhanced is not None and _matches(enhanced, reply.enhanced))


def assert_reply(reply: Reply, spec: str, what: str = "") -> Reply:
    assert reply_matches(reply, spec), f"{what!r}: expected {spec!r}, got {reply.text!r}"
    return reply


def queued_id(reply: Reply) -> str:
    """The message id of a `250 2.0.0 Ok: queued as <ULID>` reply."""
    assert_reply(reply, "250 2.0.0", "end of message")
    match = QUEUED.search(reply.text)
    assert match, f"no 'queued as <ULID>' in {reply.text!r}"
    return match.group(1)


class Wire:
    """One SMTP connection to 127.0.0.1, read reply by reply."""

    def __init__(self, host: str, port: int, timeout: float = IO_TIMEOUT):
        assert host == "127.0.0.1", "the suite only ever talks to loopback"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """Vanish with a TCP reset instead of a FIN, as a crashed client does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def send_bytewise(self, data: bytes, pause: float = 0.0) -> None:
        """One byte per write, so the server sees every possible split of `data`."""
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])
            if pause:
                time.sleep(pause)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed by the server; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> Reply:
        """Reads one (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            line = self._line().decode("utf-8", "replace")
            assert re.match(r"\d{3}[ -]|\d{3}$", line), f"malformed reply line {line!r} after {lines}"
            lines.append(line)
            if line[3:4] != "-":
                break
        codes = {line[:3] for line in lines}
        assert len(codes) == 1, f"multi-line reply mixes codes: {lines}"
        match = ENHANCED.match(lines[0][4:])
        return Reply(int(lines[0][:3]), match.group(1) if match else None, lines)

    def replies(self, count: int) -> list[Reply]:
        return [self.reply() for _ in range(count)]

    def cmd(self, line: str | bytes) -> Reply:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def expect(self, line: str | bytes, spec: str) -> Reply:
        return assert_reply(self.cmd(line), spec, line)

    def closed_by_server(self, timeout: float = IO_TIMEOUT) -> bool:
        """True once the server closed the connection (EOF or reset) with nothing unread."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return not self.buf
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return not self.buf
        except socket.timeout:
            return False

    # --- transactions -------------------------------------------------------------

    def hello(self, helo: str = "client.test", ehlo: bool = True) -> Reply:
        return self.expect(f"{'EHLO' if ehlo else 'HELO'} {helo}", "250")

    def envelope(self, mail_from: str = "sender@b.example", rcpts=("x@example.com",), params: str = "") -> None:
        self.expect(f"MAIL FROM:<{mail_from}>{' ' + params if params else ''}", "250 2.1.0")
        for rcpt in rcpts:
            self.expect(f"RCPT TO:<{rcpt}>", "250 2.1.5")

    def data(self, message: bytes) -> Reply:
        """DATA with `message` dot-stuffed and terminated; returns the final reply."""
        self.expect("DATA", "354")
        self.send(data_payload(message))
        return self.reply()

    def deliver(self, message: bytes, mail_from: str = "sender@b.example", rcpts=("x@example.com",), params: str = "") -> str:
        """A whole transaction that must be accepted; returns the queued id."""
        self.envelope(mail_from, rcpts, params)
        return queued_id(self.data(message))


def open_session(host: str, port: int, helo: str = "client.test", ehlo: bool = True) -> Wire:
    wire = Wire(host, port)
    try:
        assert_reply(wire.reply(), "220", "greeting")
        wire.hello(helo, ehlo)
    except BaseException:
        wire.close()
        raise
    return wire


# --- messages ---------------------------------------------------------------------


def make_message(token: str, body: bytes = b"Hello.\r\n", subject: str = "e2e test", sender: str = "sender@b.example") -> bytes:
    """An RFC 5322 message with CRLF line endings whose Message-ID carries `token`."""
    head = (
        f"From: <{sender}>\r\n"
        f"To: <x@example.com>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{token}@e2e.test>\r\n"
        "\r\n"
    ).encode()
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head + body


MESSAGE_ID = re.compile(rb"^Message-ID: <([^@>]+)@e2e\.test>\r?$", re.MULTILINE | re.IGNORECASE)


def token_of(message: bytes) -> str | None:
    match = MESSAGE_ID.search(message)
    return match.group(1).decode() if match else None


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 section 4.5.2: a line that starts with a dot gets one more."""
    return re.sub(rb"(^|\r\n)\.", rb"\1..", message)


def data_payload(message: bytes) -> bytes:
    """What goes on the wire after `354` for a CRLF message: stuffed, then `.` CRLF."""
    if message and not message.endswith(b"\r\n"):
        raise ValueError("a DATA message must end with CRLF to round-trip exactly")
    return dot_stuff(message) + b".\r\n"
