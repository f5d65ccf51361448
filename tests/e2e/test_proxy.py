"""PROXY protocol v1/v2 through the binary: the header's address is the client's in the
stored record and the trace line, per-address limits count it, and a connection without
a valid header from a trusted balancer is closed with nothing sent."""

from __future__ import annotations

import socket
import struct
import time

from edge_support import BioTls, headers, listener_port, metric, recv_all, wire_from
from smtpwire import assert_reply, data_payload, make_message

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_tcp4(src: str, sport: int, tlvs: bytes = b"") -> bytes:
    addresses = socket.inet_aton(src) + socket.inet_aton("192.0.2.1") + struct.pack("!HH", sport, 25)
    return SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses) + len(tlvs)) + addresses + tlvs


def v2_local() -> bytes:
    return SIG + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def proxied(start_gateway, mode: str = "v2", *extra: str):
    return start_gateway("--proxy-protocol", mode, "--proxy-trusted-cidr", "127.0.0.1/32", *extra)


def test_v2_header_address_is_the_client_everywhere(start_gateway):
    # The per-message log line is on by default.
    gateway = proxied(start_gateway, "any")
    message = make_message("proxy-v2")
    # An AWS NLB adds a TLV (type 0xEA) with its endpoint id: ignored.
    tlv = b"\xea\x00\x05\x01vpce"
    with gateway.wire() as wire:
        wire.send(v2_tcp4("203.0.113.9", 40001, tlv))
        assert_reply(wire.reply(), "220", "greeting after the header")
        wire.hello()
        message_id = wire.deliver(message)
    assert gateway.cat(message_id, body=True) == message
    assert headers(gateway, message_id)["smtp.client_addr"] == ["203.0.113.9:40001"]
    assert gateway.cat(message_id).startswith(b"Received: from client.test ([203.0.113.9])")
    assert metric(gateway, "smtpgw_proxy_headers_total") >= 1
    # The per-message log line (target smtpgw::message) names the header's client too.
    line = wait_for_line(gateway, message_id)
    assert "client=203.0.113.9:40001" in line, line
    assert "127.0.0.1" not in line, line


def wait_for_line(gateway, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gateway.stderr.splitlines():
            if needle in line and "smtpgw::message" in line:
                return line
        time.sleep(0.02)
    raise AssertionError(f"no smtpgw::message line with {needle} in the log:\n{gateway.stderr}")


def test_v1_header(start_gateway):
    gateway = proxied(start_gateway, "v1")
    with gateway.wire() as wire:
        wire.send(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 25\r\n")
        assert_reply(wire.reply(), "220")
        wire.hello()
        message_id = wire.deliver(make_message("proxy-v1"))
    assert headers(gateway, message_id)["smtp.client_addr"] == ["[2001:db8::7]:51000"]


def test_local_header_is_a_health_check(start_gateway):
    gateway = proxied(start_gateway)
    with gateway.wire() as wire:
        wire.send(v2_local())
        assert_reply(wire.reply(), "220")
        wire.expect("QUIT", "221")


def closed_unanswered(gateway, payload: bytes, source: str = "127.0.0.1") -> bytes:
    with wire_from(gateway, source) as wire:
        if payload:
            wire.send(payload)
        return recv_all(wire.sock)


def test_missing_malformed_or_truncated_header_gets_nothing(start_gateway):
    gateway = proxied(start_gateway, "v2", "--idle-timeout", "2")
    assert closed_unanswered(gateway, b"EHLO client.test\r\n") == b""
    assert closed_unanswered(gateway, b"PROXY TCP4 203.0.113.9 192.0.2.1 1 25\r\n") == b"", "v1 on a v2 listener"
    assert closed_unanswered(gateway, bytes(range(256))) == b""
    # A header that stops halfway: closed at the header timeout, still unanswered.
    assert closed_unanswered(gateway, v2_tcp4("203.0.113.9", 40001)[:20]) == b""
    assert metric(gateway, 'smtpgw_connections_rejected_total{reason="proxy_invalid"}', at_least=3) >= 3


def test_header_from_an_untrusted_source_is_refused(start_gateway):
    gateway = start_gateway("--proxy-protocol", "v2", "--proxy-trusted-cidr", "127.0.0.1/32")
    assert closed_unanswered(gateway, v2_tcp4("203.0.113.9", 40001), source="127.0.0.2") == b""
    assert metric(gateway, 'smtpgw_connections_rejected_total{reason="proxy_untrusted"}') >= 1


def test_per_ip_limit_counts_the_header_address(start_gateway):
    gateway = proxied(start_gateway, "v2", "--max-connections-per-ip", "1")
    with gateway.wire() as first, gateway.wire() as other, gateway.wire() as second:
        first.send(v2_tcp4("198.51.100.7", 1000))
        assert_reply(first.reply(), "220")
        other.send(v2_tcp4("198.51.100.8", 1000))
        assert_reply(other.reply(), "220", "another client behind the same balancer")
        second.send(v2_tcp4("198.51.100.7", 1001))
        assert_reply(second.reply(), "421 4.7.0", "second connection of the same client")
        assert second.closed_by_server()


def test_proxy_protocol_needs_trusted_cidrs():
    from conftest import run_binary

    result = run_binary("--proxy-protocol", "v2")
    assert result.returncode != 0
    assert result.stderr.decode().strip().splitlines()[-1].count("--proxy-trusted-cidr") == 1


def test_proxy_listen_is_the_only_listener_that_expects_the_header(start_gateway):
    # One gateway, two SMTP listeners: --listen for direct clients, --proxy-listen for
    # the load balancer, which alone must send the header.
    gateway = proxied(start_gateway, "v2", "--proxy-listen", "127.0.0.1:0", "--idle-timeout", "2")
    port = listener_port(gateway, "ProxiedSmtp")
    assert port != gateway.port

    with gateway.wire() as direct:
        assert_reply(direct.reply(), "220", "--listen greets a client at once")
        direct.hello()
        direct_id = direct.deliver(make_message("direct"))
    assert headers(gateway, direct_id)["smtp.client_addr"][0].startswith("127.0.0.1:")

    with wire_from(gateway, "127.0.0.1", port) as balanced:
        balanced.send(v2_tcp4("203.0.113.9", 40001))
        assert_reply(balanced.reply(), "220", "greeting after the header")
        balanced.hello()
        balanced_id = balanced.deliver(make_message("balanced"))
    assert headers(gateway, balanced_id)["smtp.client_addr"] == ["203.0.113.9:40001"]

    # A client without the header on the PROXY listener gets nothing; a header sent to
    # --listen is not a header there but a command line, refused as one.
    with wire_from(gateway, "127.0.0.1", port) as bare:
        bare.send(b"EHLO client.test\r\n")
        assert recv_all(bare.sock) == b""
    with gateway.wire() as direct:
        assert_reply(direct.reply(), "220")
        assert_reply(direct.cmd(b"PROXY TCP4 203.0.113.9 192.0.2.1 1 25"), "500")
    assert metric(gateway, 'smtpgw_connections_rejected_total{reason="proxy_invalid"}') >= 1


def test_split_header_then_a_big_client_hello_on_the_implicit_tls_listener(start_gateway, tmp_path):
    """Issue 20 item 6: the header as 10 bytes, then the rest of it with a ClientHello of
    over 6 KB in one send; every byte after the header must reach TLS."""
    from edge_support import client_context, make_certificate, tls_port

    crt, key = make_certificate(tmp_path)
    gateway = proxied(start_gateway, "v1", "--hostname", "mx.test", "--tls-cert", str(crt),
                      "--tls-key", str(key), "--listen-tls", "127.0.0.1:0")
    context = client_context(crt)
    # Many long ALPN names make the ClientHello span several segments, as a client
    # with many extensions does.
    context.set_alpn_protocols([chr(ord("a") + i) * 250 for i in range(24)])
    with wire_from(gateway, "127.0.0.1", tls_port(gateway)) as wire:
        tls = BioTls(wire.sock, context)
        hello = tls.client_hello()
        assert len(hello) > 6000, len(hello)
        header = b"PROXY TCP4 203.0.113.9 192.0.2.1 40001 465\r\n"
        wire.send(header[:10])
        # Its own read: the gateway buffers a partial header.
        time.sleep(0.3)
        wire.send(header[10:] + hello)
        tls.handshake()
        assert tls.reply().startswith(b"220 mx.test"), "greeting inside TLS"
        tls.send(b"EHLO client.test\r\n")
        assert tls.reply().startswith(b"250")
        message = make_message("split-proxy-big-hello")
        tls.send(b"MAIL FROM:<sender@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n")
        for code in (b"250", b"250", b"354"):
            assert tls.reply().startswith(code)
        tls.send(data_payload(message))
        queued = tls.reply()
        assert queued.startswith(b"250"), queued
    [message_id] = gateway.spool_ids()
    assert gateway.cat(message_id, body=True) == message
    assert headers(gateway, message_id)["smtp.client_addr"] == ["203.0.113.9:40001"]
