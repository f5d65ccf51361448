"""Every reply code of the protocol, table-driven.

Each scenario is a script of `(command line, expected reply)` run lock-step on a fresh
connection; expectations name the code and, where the gateway promises one, the
enhanced status code (see smtpwire.reply_matches for the notation). Scripts go on after
an error to show that errors keep the session and its transaction state.
"""

import pytest

from smtpwire import assert_reply

HELLO = [("EHLO client.test", "250")]
MAIL = HELLO + [("MAIL FROM:<a@b.example>", "250 2.1.0")]
RCPT = MAIL + [("RCPT TO:<x@example.com>", "250 2.1.5")]
LONG_LOCAL = "a" * 65
LONG_PATH = "@".join(["a" * 60, ".".join(["d" * 60] * 4) + ".example.com"])  # 316 octets

SCENARIOS = {
    # greeting and order
    "helo-needs-argument": ([("HELO", "501"), ("HELO client.test", "250")], ()),
    "ehlo-needs-argument": ([("EHLO", "501"), ("EHLO client.test", "250")], ()),
    "mail-before-helo": ([("MAIL FROM:<a@b.example>", "503 5.5.1"), *HELLO], ()),
    "rcpt-before-mail": (HELLO + [("RCPT TO:<x@example.com>", "503 5.5.1")], ()),
    "data-before-mail": (HELLO + [("DATA", "503 5.5.1")], ()),
    "data-without-valid-rcpt": (MAIL + [("RCPT TO:<x@elsewhere.example>", "550 5.7.1"), ("DATA", "554 5.5.1")], ()),
    "nested-mail-keeps-transaction": (
        MAIL + [("MAIL FROM:<c@d.example>", "503 5.5.1"), ("RCPT TO:<x@example.com>", "250 2.1.5"), ("DATA", "354")],
        (),
    ),
    "rset-ends-transaction": (RCPT + [("RSET", "250 2.0.0"), ("RCPT TO:<x@example.com>", "503 5.5.1")], ()),
    "ehlo-ends-transaction": (RCPT + [("EHLO client.test", "250"), ("RCPT TO:<x@example.com>", "503 5.5.1")], ()),
    "verbs-are-case-insensitive": (
        [("ehlo client.test", "250"), ("mail from:<a@b.example>", "250 2.1.0"),
         ("rcpt to:<x@example.com>", "250 2.1.5"), ("rset", "250 2.0.0")],
        (),
    ),
    # MAIL
    "sender-syntax": (HELLO + [("MAIL FROM:<a@@b.example>", "501 5.1.7"), ("MAIL FROM:<a@b.example>", "250 2.1.0")], ()),
    "mail-argument-syntax": (HELLO + [("MAIL", "501 5.5.4"), ("MAIL TO:<a@b.example>", "501 5.5.4")], ()),
    "null-sender": (HELLO + [("MAIL FROM:<>", "250 2.1.0")], ()),
    "unknown-mail-parameter": (HELLO + [("MAIL FROM:<a@b.example> FROBNICATE=1", "555 5.5.4"), *MAIL[1:]], ()),
    "mail-parameters-need-ehlo": (
        [("HELO client.test", "250"), ("MAIL FROM:<a@b.example> SIZE=100", "555"), ("MAIL FROM:<a@b.example>", "250 2.1.0")],
        (),
    ),
    "size-parameter": (
        HELLO + [("MAIL FROM:<a@b.example> SIZE=1001", "552 5.3.4"), ("MAIL FROM:<a@b.example> SIZE=1000", "250 2.1.0")],
        ("--max-message-size", "1000"),
    ),
    "size-parameter-of-20-digits": (
        HELLO + [("MAIL FROM:<a@b.example> SIZE=99999999999999999999", "552 5.3.4")],  # RFC 1870: 1*20DIGIT
        (),
    ),
    "sender-local-part-too-long": (HELLO + [(f"MAIL FROM:<{LONG_LOCAL}@b.example>", "553|501 5.x.x")], ()),
    "sender-not-ascii-without-smtputf8": (HELLO + [("MAIL FROM:<jöran@b.example>", "553 5.6.7")], ()),
    # RCPT
    "accepted-domain-any-case": (MAIL + [("RCPT TO:<x@EXAMPLE.COM>", "250 2.1.5"), ("RCPT TO:<y@Example.Com>", "250 2.1.5")], ()),
    "never-an-open-relay": (
        MAIL + [("RCPT TO:<x@elsewhere.example>", "550 5.7.1"), ("RCPT TO:<x@example.com.evil.example>", "550 5.7.1"),
                ("RCPT TO:<@example.com:x@elsewhere.example>", "550 5.7.1"), ("RCPT TO:<x@example.com>", "250 2.1.5")],
        (),
    ),
    "accept-domain-is-repeatable": (
        MAIL + [("RCPT TO:<x@other.example>", "250 2.1.5"), ("RCPT TO:<x@example.com>", "250 2.1.5")],
        ("--accept-domain", "other.example"),
    ),
    "postmaster-always-accepted": (
        MAIL + [("RCPT TO:<Postmaster>", "250 2.1.5"), ("RCPT TO:<POSTMASTER>", "250 2.1.5"), ("RCPT TO:<postmaster>", "250 2.1.5")],
        (),
    ),
    "null-recipient": (MAIL + [("RCPT TO:<>", "501 5.1.3"), ("RCPT TO:<x@example.com>", "250 2.1.5")], ()),
    "unknown-rcpt-parameter": (MAIL + [("RCPT TO:<x@example.com> FROBNICATE=1", "555 5.5.4")], ()),
    "recipient-not-ascii-without-smtputf8": (MAIL + [("RCPT TO:<ñoño@example.com>", "553 5.6.7")], ()),
    "utf8-addresses-with-smtputf8": (
        HELLO + [("MAIL FROM:<jöran@bücher.example> SMTPUTF8", "250 2.1.0"), ("RCPT TO:<ñoño@example.com>", "250 2.1.5")],
        (),
    ),
    "address-forms": (
        HELLO + [('MAIL FROM:<"john doe"@[192.0.2.1]>', "250 2.1.0"), ('RCPT TO:<"x y"@example.com>', "250 2.1.5"),
                 ("RCPT TO:<@relay.example:z@example.com>", "250 2.1.5"), (f"RCPT TO:<{'a' * 64}@example.com>", "250 2.1.5")],
        (),
    ),
    "recipient-too-long": (
        MAIL + [(f"RCPT TO:<{LONG_LOCAL}@example.com>", "553|501 5.x.x"), (f"RCPT TO:<{LONG_PATH}>", "553|501 5.x.x")],
        (),
    ),
    "default-recipient-limit": (
        MAIL + [(f"RCPT TO:<r{i}@example.com>", "250 2.1.5") for i in range(100)]
        + [("RCPT TO:<r100@example.com>", "452 4.5.3"), ("DATA", "354")],
        (),
    ),
    "configured-recipient-limit": (
        MAIL + [(f"RCPT TO:<r{i}@example.com>", "250 2.1.5") for i in range(3)] + [("RCPT TO:<r3@example.com>", "452 4.5.3")],
        ("--max-recipients", "3"),
    ),
    # the other commands
    "rset-noop": (HELLO + [("RSET", "250 2.0.0"), ("NOOP", "250 2.0.0")], ()),
    "vrfy": ([("VRFY someone", "252 2.5.2"), ("VRFY", "501")], ()),
    "expn-and-turn": ([("EXPN staff", "502 5.5.1"), ("TURN", "502 5.5.1")], ()),
    "help": ([("HELP", "214"), ("HELP MAIL", "214"), ("HELP FROBNICATE", "504 5.5.4")], ()),
    "unknown-verb": ([("FROBNICATE", "500 5.5.2"), *HELLO], ()),
    "line-over-512-octets": (HELLO + [("NOOP " + "x" * 600, "500 5.5.6"), ("NOOP", "250 2.0.0")], ()),
    "line-of-512-octets": (HELLO + [("VRFY " + "a" * 505, "252")], ()),
    "errors-keep-transaction": (
        RCPT + [("FROBNICATE", "500 5.5.2"), ("MAIL FROM:<c@d.example>", "503 5.5.1"), ("RCPT TO:<>", "501"),
                ("NOOP " + "x" * 600, "500 5.5.6"), ("RCPT TO:<y@example.com>", "250 2.1.5"), ("DATA", "354")],
        (),
    ),
}


@pytest.mark.parametrize("steps, flags", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_reply_codes(start_gateway, steps, flags):
    gateway = start_gateway(*flags)
    with gateway.wire() as wire:
        assert_reply(wire.reply(), "220", "greeting")
        for line, spec in steps:
            wire.expect(line, spec)


def test_quit_replies_221_and_closes(gateway):
    with gateway.session() as wire:
        wire.expect("QUIT", "221 2.0.0")
        assert wire.closed_by_server()
