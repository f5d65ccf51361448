"""TLS through the binary, with Python's ssl module and swaks as clients and a
self-signed certificate made in the test: STARTTLS and implicit TLS (RFC 8314), a full
transaction stored byte-exact with `smtp.tls`, the STARTTLS injection (CVE-2011-0411),
STARTTLS with an argument, and --require-tls."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_binary
from edge_support import BioTls, client_context, headers, make_certificate, metric, tls_port, wire_from
from smtpwire import IO_TIMEOUT, assert_reply, data_payload, make_message

QUEUED = re.compile(r"queued as ([0-9A-HJKMNP-TV-Z]{26})")


@pytest.fixture
def cert(tmp_path):
    return make_certificate(tmp_path)


def tls_gateway(start_gateway, cert, *extra: str):
    crt, key = cert
    return start_gateway("--hostname", "mx.test", "--tls-cert", str(crt), "--tls-key", str(key), *extra)


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_smtplib_starttls_full_transaction(start_gateway, cert, version):
    gateway = tls_gateway(start_gateway, cert)
    maximum = ssl.TLSVersion.TLSv1_2 if version == "TLSv1.2" else None
    message = make_message("starttls", b"Over TLS.\r\n.leading dot\r\n")
    with smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        code, text = client.starttls(context=client_context(cert[0], maximum))
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        assert client.sock.version() == version
        client.ehlo()
        assert not client.has_extn("starttls"), "STARTTLS offered again after TLS"
        client.sendmail("sender@b.example", ["x@example.com"], message)
        client.quit()
    [message_id] = gateway.spool_ids()
    assert gateway.cat(message_id, body=True) == message
    [tls] = headers(gateway, message_id)["smtp.tls"]
    assert tls.startswith(version + " TLS"), tls
    assert b"with ESMTPS id" in gateway.cat(message_id)
    assert metric(gateway, f'smtpgw_tls_handshakes_total{{version="{version}"}}') >= 1


def test_swaks_tls(start_gateway, cert, tmp_path):
    gateway = tls_gateway(start_gateway, cert)
    text = b"Subject: swaks tls\n\nbody line\n.dotted"
    source = tmp_path / "message.txt"
    source.write_bytes(text)
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(gateway.port), "--helo", "client.test",
         "--from", "a@b.example", "--to", "x@example.com", "--data", f"@{source}", "--timeout", "10",
         "--tls"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    transcript = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, transcript + result.stderr.decode("utf-8", "replace")
    assert "TLS started" in transcript, transcript
    [message_id] = gateway.spool_ids()
    assert QUEUED.search(transcript).group(1) == message_id
    assert gateway.cat(message_id, body=True) == text.replace(b"\n", b"\r\n") + b"\r\n"
    assert headers(gateway, message_id)["smtp.tls"][0].startswith("TLSv1.")


def test_commands_pipelined_after_starttls_are_never_executed(start_gateway, cert):
    """CVE-2011-0411: a man in the middle appends plaintext commands to STARTTLS."""
    gateway = tls_gateway(start_gateway, cert)
    with gateway.wire() as wire:
        assert_reply(wire.reply(), "220")
        wire.send(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<x@example.com>\r\n")
        assert_reply(wire.reply(), "250")
        assert_reply(wire.reply(), "220 2.0.0", "STARTTLS")
        assert wire.buf == b"", "a reply to the injected commands"
        tls = client_context(cert[0]).wrap_socket(wire.sock, server_hostname="mx.test")
        tls.sendall(b"EHLO client.test\r\n")
        reply = b""
        while not re.search(rb"^250 ", reply, re.M):
            reply += tls.recv(4096)
        tls.sendall(b"RCPT TO:<x@example.com>\r\nDATA\r\n")
        reply = b""
        while reply.count(b"\r\n") < 2:
            reply += tls.recv(4096)
        # The injected MAIL was discarded: no transaction exists.
        assert reply.startswith(b"503 5.5.1 Need MAIL"), reply
        tls.close()
    assert gateway.spool_ids() == []
    assert metric(gateway, "smtpgw_starttls_discarded_bytes_total") >= len(
        b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<x@example.com>\r\n"
    )


def test_starttls_with_an_argument_and_without_a_certificate(start_gateway, cert):
    gateway = tls_gateway(start_gateway, cert)
    with gateway.session() as wire:
        wire.expect("STARTTLS now", "501 5.5.4")
        wire.expect("NOOP", "250")
    plain = start_gateway()
    with plain.session() as wire:
        wire.expect("STARTTLS", "502 5.5.1")


def test_require_tls(start_gateway, cert):
    gateway = tls_gateway(start_gateway, cert, "--require-tls")
    with smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT) as client:
        client.ehlo()
        code, text = client.mail("sender@b.example")
        assert (code, text[:5]) == (530, b"5.7.0"), text
        client.rset()
        client.starttls(context=client_context(cert[0]))
        client.ehlo()
        client.sendmail("sender@b.example", ["x@example.com"], make_message("required"))
    assert len(gateway.spool_ids()) == 1


def test_implicit_tls_listener(start_gateway, cert):
    gateway = tls_gateway(start_gateway, cert, "--listen-tls", "127.0.0.1:0")
    port = tls_port(gateway)
    assert port != gateway.port
    message = make_message("implicit")
    with smtplib.SMTP_SSL(gateway.host, port, local_hostname="client.test", timeout=IO_TIMEOUT,
                          context=client_context(cert[0])) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("sender@b.example", ["x@example.com"], message)
    [message_id] = gateway.spool_ids()
    assert gateway.cat(message_id, body=True) == message
    assert headers(gateway, message_id)["smtp.tls"][0].startswith("TLSv1.3 ")
    # The plaintext listener still offers STARTTLS.
    with smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("starttls")


def test_plaintext_on_the_implicit_tls_listener_is_a_failed_handshake(start_gateway, cert):
    gateway = tls_gateway(start_gateway, cert, "--listen-tls", "127.0.0.1:0")
    from edge_support import recv_all, wire_from

    with wire_from(gateway, "127.0.0.1", tls_port(gateway)) as wire:
        wire.send(b"EHLO client.test\r\n")
        data = recv_all(wire.sock)
    assert not data.startswith(b"220"), data
    assert metric(gateway, 'smtpgw_tls_handshake_failures_total{reason="bad_message"}') >= 1


def replace_atomically(source: Path, target: Path) -> None:
    tmp = target.with_suffix(".new")
    shutil.copyfile(source, tmp)
    os.rename(tmp, target)


def wait_for_log(gateway, pattern: str, after: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, gateway.stderr[after:])
        if match:
            return match.group(0)
        time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} in the log:\n{gateway.stderr[after:]}")


def served_certificate(gateway, cafile: Path) -> bytes:
    """The DER certificate a new STARTTLS handshake presents, verified against `cafile`."""
    client = smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT)
    try:
        client.ehlo()
        client.starttls(context=client_context(cafile))
        der = client.sock.getpeercert(binary_form=True)
        client.quit()
    finally:
        client.close()
    return der


def test_sighup_reloads_the_certificate_while_a_tls_session_is_open(start_gateway, tmp_path):
    """A renewed certificate is picked up on SIGHUP: the session encrypted before it
    completes its message, and a new handshake presents the new certificate."""
    for name in ("old", "new", "live"):
        (tmp_path / name).mkdir()
    old_crt, old_key = make_certificate(tmp_path / "old")
    new_crt, new_key = make_certificate(tmp_path / "new")
    live = tmp_path / "live"
    crt, key = live / "mx.crt", live / "mx.key"
    replace_atomically(old_crt, crt)
    replace_atomically(old_key, key)
    gateway = tls_gateway(start_gateway, (crt, key), "--listen-tls", "127.0.0.1:0")
    old_der = ssl.PEM_cert_to_DER_cert(old_crt.read_text())
    new_der = ssl.PEM_cert_to_DER_cert(new_crt.read_text())
    assert old_der != new_der
    assert served_certificate(gateway, old_crt) == old_der

    first = make_message("before-reload", b"Started before the reload.\r\n" * 20)
    second = make_message("after-reload")
    with smtplib.SMTP(gateway.host, gateway.port, local_hostname="client.test", timeout=IO_TIMEOUT) as client:
        client.ehlo()
        client.starttls(context=client_context(old_crt))
        client.ehlo()
        assert client.mail("sender@b.example")[0] == 250
        assert client.rcpt("x@example.com")[0] == 250

        mark = len(gateway.stderr)
        replace_atomically(new_crt, crt)
        replace_atomically(new_key, key)
        gateway.send_signal(signal.SIGHUP)
        wait_for_log(gateway, r"TLS certificate reloaded", after=mark)

        # The session encrypted with the old certificate carries on and is stored.
        code, text = client.data(first)
        assert code == 250, text
        assert client.sock.getpeercert(binary_form=True) == old_der
        # A new handshake (STARTTLS and implicit TLS) sees the new certificate only.
        assert served_certificate(gateway, new_crt) == new_der
        with pytest.raises(ssl.SSLCertVerificationError):
            served_certificate(gateway, old_crt)
        with smtplib.SMTP_SSL(gateway.host, tls_port(gateway), local_hostname="client.test",
                              timeout=IO_TIMEOUT, context=client_context(new_crt)) as implicit:
            assert implicit.sock.getpeercert(binary_form=True) == new_der
        # And the old session is still usable after all that.
        client.sendmail("sender@b.example", ["x@example.com"], second)
        client.quit()

    # A certificate that does not load is refused; the running one stays.
    mark = len(gateway.stderr)
    key.write_text("not a key\n")
    gateway.send_signal(signal.SIGHUP)
    wait_for_log(gateway, r"TLS certificate refused", after=mark)
    assert served_certificate(gateway, new_crt) == new_der

    ids = gateway.spool_ids()
    assert len(ids) == 2, ids
    assert [gateway.cat(i, body=True) for i in ids] == [first, second]
    assert gateway.running()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--listen-tls", "127.0.0.1:0"], "--listen-tls"),
        (["--require-tls"], "--require-tls"),
        (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "--tls-cert"),
        (["--tls-cert", "/nonexistent/cert.pem"], "--tls-key"),
    ],
)
def test_tls_configuration_errors_name_the_flag(args, flag, tmp_path):
    result = run_binary("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                        "--spool-dir", str(tmp_path / "spool"), *args)
    assert result.returncode != 0
    last = result.stderr.decode().strip().splitlines()[-1]
    assert flag in last, last


def test_key_that_does_not_match_the_certificate(tmp_path):
    crt, _ = make_certificate(tmp_path, "a.test")
    _, other_key = make_certificate(tmp_path, "b.test")
    result = run_binary("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                        "--spool-dir", str(tmp_path / "spool"), "--tls-cert", str(crt), "--tls-key", str(other_key))
    assert result.returncode != 0
    assert "--tls-cert/--tls-key" in result.stderr.decode(), result.stderr


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_tls_client_that_never_reads_is_bounded_and_dropped(start_gateway, cert):
    """Pipelines commands over TLS and never reads a reply: the gateway stops reading
    (its output cap), its memory stays flat, others are served, and the idle timeout
    drops the connection."""
    import socket

    gateway = tls_gateway(start_gateway, cert, "--listen-tls", "127.0.0.1:0", "--idle-timeout", "3")
    port = tls_port(gateway)
    before = rss_kib(gateway.pid)
    raw = socket.create_connection((gateway.host, port), timeout=IO_TIMEOUT)
    tls = client_context(cert[0]).wrap_socket(raw, server_hostname="mx.test")
    tls.settimeout(2)
    sent = 0
    chunk = b"NOOP\r\n" * 10_000
    try:
        while sent < 64 * 1024 * 1024:
            tls.sendall(chunk)
            sent += len(chunk)
    except (TimeoutError, socket.timeout):
        pass
    assert sent < 64 * 1024 * 1024, "the gateway kept reading a client that never reads"
    assert rss_kib(gateway.pid) - before < 64 * 1024, "memory grew with the unread replies"
    with smtplib.SMTP_SSL(gateway.host, port, local_hostname="client.test", timeout=IO_TIMEOUT,
                          context=client_context(cert[0])) as other:
        assert other.noop()[0] == 250
    # Dropped at the idle timeout: reading now finds the end (after whatever replies
    # were in flight).
    tls.settimeout(IO_TIMEOUT)
    try:
        while tls.recv(65536):
            pass
    except (ssl.SSLError, ConnectionResetError):
        pass
    tls.close()


def test_a_final_dot_before_a_bad_record_in_the_same_segment_is_answered(start_gateway, cert):
    """Issue 20 item 7: the message's last record and a record that fails to decrypt
    arrive together: the message is stored and answered `250` before the connection
    fails."""
    gateway = tls_gateway(start_gateway, cert, "--listen-tls", "127.0.0.1:0")
    message = make_message("final-dot-then-bad-record")
    with wire_from(gateway, "127.0.0.1", tls_port(gateway)) as wire:
        tls = BioTls(wire.sock, client_context(cert[0]))
        tls.handshake()
        assert tls.reply().startswith(b"220 mx.test")
        tls.send(b"EHLO client.test\r\nMAIL FROM:<sender@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
        for code in (b"250", b"250", b"250", b"354"):
            assert tls.reply().startswith(code)
        good = tls.records(data_payload(message))
        bad = bytearray(tls.records(b"QUIT\r\n"))
        bad[-1] ^= 1  # the record's authentication tag: bad_record_mac
        wire.sock.sendall(good + bytes(bad))
        assert tls.reply().startswith(b"250 2.0.0 Ok: queued as ")
        with pytest.raises(ssl.SSLError):
            tls.reply()
    [message_id] = gateway.spool_ids()
    assert gateway.cat(message_id, body=True) == message


def test_silent_and_trickling_handshakes_are_closed_at_the_handshake_timeout(start_gateway, cert):
    """Issue 20 item 5: with --tls-handshake-timeout 1s a handshake that is silent or
    trickles a byte at a time is closed unanswered after about a second, long before the
    idle timeout (300 s here); after STARTTLS the same."""
    import socket

    gateway = tls_gateway(start_gateway, cert, "--listen-tls", "127.0.0.1:0", "--tls-handshake-timeout", "1s",
                          "--idle-timeout", "300")
    port = tls_port(gateway)
    context = client_context(cert[0])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello_obj = context.wrap_bio(incoming, outgoing, server_hostname="mx.test")
    with pytest.raises(ssl.SSLWantReadError):
        hello_obj.do_handshake()
    hello = outgoing.read()

    def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> int | None:
        """How many bytes of `trickle` (sent a byte every 0.2 s) were out when the
        server closed, or None if it did not within `seconds`."""
        sock.settimeout(0.2)
        deadline = time.monotonic() + seconds
        sent = 0
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
                if not data:
                    return sent
                raise AssertionError(f"the server answered an unfinished handshake: {data!r}")
            except (TimeoutError, socket.timeout):
                pass
            except ConnectionResetError:
                return sent
            if sent < len(trickle):
                try:
                    sock.sendall(trickle[sent:sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    return sent
                sent += 1
        return None

    with socket.create_connection((gateway.host, port), timeout=IO_TIMEOUT) as silent:
        assert closed_within(silent, 15) is not None, "silent handshake still open"
    with socket.create_connection((gateway.host, port), timeout=IO_TIMEOUT) as trickling:
        sent = closed_within(trickling, 15, hello)
        # Closed while still being fed: the bytes did not extend its time.
        assert sent is not None and 0 < sent < len(hello), (sent, len(hello))
    with socket.create_connection((gateway.host, gateway.port), timeout=IO_TIMEOUT) as plain:
        plain.recv(1024)
        plain.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
        replies = b""
        while b"220 2.0.0" not in replies:
            data = plain.recv(65536)
            assert data, replies
            replies += data
        assert closed_within(plain, 15) is not None, "silent handshake after STARTTLS still open"
    assert metric(gateway, 'smtpgw_tls_handshake_failures_total{reason="timeout"}', at_least=3) >= 3


def test_a_large_partial_client_hello_is_failed_at_once_not_held(start_gateway, cert):
    """Issue 20 item 5: the audit's half-open connection, 48 KiB of a ClientHello that
    never completes, was held whole until the idle timeout. A client may send at most
    8 KiB before its handshake is done (README "TLS"), so the connection is failed as
    soon as it is over that, unanswered, long before the handshake timeout (60 s here)."""
    import socket

    gateway = tls_gateway(start_gateway, cert, "--listen-tls", "127.0.0.1:0", "--tls-handshake-timeout", "60s",
                          "--idle-timeout", "300")
    context = client_context(cert[0])
    # A real client's ClientHello made large by many long ALPN names (about 50 KB,
    # several records), as a client with very many extensions would send.
    context.set_alpn_protocols([chr(ord("a") + i % 26) * 250 for i in range(200)])
    outgoing = ssl.MemoryBIO()
    hello_obj = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="mx.test")
    with pytest.raises(ssl.SSLWantReadError):
        hello_obj.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 48 * 1024, len(hello)
    partial = hello[:48 * 1024]

    with socket.create_connection((gateway.host, tls_port(gateway)), timeout=IO_TIMEOUT) as sock:
        started = time.monotonic()
        try:
            sock.sendall(partial)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while the rest was still being sent: what the bound is for
        sock.settimeout(10)
        try:
            answered = sock.recv(65536)
        except ConnectionResetError:
            answered = b""
        except (TimeoutError, socket.timeout):
            raise AssertionError("a 48 KiB partial ClientHello is still held open after 10 s") from None
        assert answered == b"", f"the server answered an unfinished handshake: {answered!r}"
        assert time.monotonic() - started < 10
    assert metric(gateway, 'smtpgw_tls_handshake_failures_total{reason="bad_message"}') >= 1
    # Other clients are unaffected.
    with smtplib.SMTP_SSL(gateway.host, tls_port(gateway), local_hostname="client.test", timeout=IO_TIMEOUT,
                          context=client_context(cert[0])) as other:
        assert other.noop()[0] == 250
