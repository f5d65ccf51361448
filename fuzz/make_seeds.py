#!/usr/bin/env python3
"""Writes the seed corpus of the session_feed fuzz target (fuzz/corpus/session_feed/).

Each seed is `[flags] [k] [k cuts, u16 LE] [client stream]` (see fuzz/src/lib.rs): a
meaningful SMTP session, cut where a read boundary is most dangerous: inside the
end-of-data marker, between a BDAT header and its chunk, inside a command line.
Run it again after changing a seed; the files are checked in.
"""

import struct
from pathlib import Path

OUT = Path(__file__).resolve().parent / "corpus" / "session_feed"

HELLO = b"EHLO client.test\r\n"
TXN = HELLO + b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n"
SMUGGLED_IN_BDAT = b"hi\r\n.\r\nMAIL FROM:<e@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
AGAIN = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\n"

import base64


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# Flags for AUTH seeds: 8 offers AUTH, 16 requires it, 32 lets it relay.
AUTH, REQUIRED, RELAY = 8, 16, 32
GOOD = b64(b"\0alice\0secret")

SEEDS = {
    "data-simple": (0, TXN + b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n"),
    "data-dot-stuffing": (0, TXN + b"DATA\r\n..dot\r\n.\r\n..\r\n\xe9t\xe9\r\n\r\n.\r\nNOOP\r\n"),
    "data-empty-body": (0, TXN + b"DATA\r\n.\r\nQUIT\r\n"),
    "bdat-chunks": (0, TXN + b"BDAT 5\r\n.\r\n\nxBDAT 3 LAST\r\nendQUIT\r\n"),
    "bdat-zero-last": (0, TXN + b"BDAT 0 LAST\r\nNOOP\r\n"),
    "bdat-carrying-dot-and-mail": (0, TXN + b"BDAT %d LAST\r\n%sNOOP\r\n" % (len(SMUGGLED_IN_BDAT), SMUGGLED_IN_BDAT)),
    "bdat-rset-between-chunks": (0, TXN + b"BDAT 3\r\nabcRSET\r\nBDAT 3 LAST\r\nxyz" + AGAIN + b"BDAT 2 LAST\r\nok"),
    "bdat-helo-between-chunks": (0, TXN + b"BDAT 3\r\nabcHELO again\r\nBDAT 3 LAST\r\nxyzNOOP\r\n"),
    "smuggling-lf-dot-lf": (0, TXN + b"DATA\r\na\n.\nMAIL FROM:<e@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n"),
    "smuggling-lf-dot-crlf-normalize": (1, TXN + b"DATA\r\na\n.\r\nMAIL FROM:<e@x.test>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n"),
    "smuggling-cr-dot-cr": (0, TXN + b"DATA\r\na\r.\r\nb\r\n.\rX\r\n.\r\nNOOP\r\n"),
    "smuggling-crlf-dot-lf-normalize": (1, TXN + b"DATA\r\na\r\n.\nb\r\n.\r\nQUIT\r\n"),
    "pipelined-two-messages": (0, TXN + b"DATA\r\none\r\n.\r\n" + AGAIN + b"DATA\r\ntwo\r\n.\r\nQUIT\r\n"),
    "oversize-data-then-ok": (0, TXN + b"DATA\r\n" + (b"x" * 78 + b"\r\n") * 60 + b".\r\n" + AGAIN + b"DATA\r\nok\r\n.\r\n"),
    "oversize-bdat": (0, TXN + b"BDAT 3000\r\n" + b"a" * 3000 + b"BDAT 3000 LAST\r\n" + b"b" * 3000 + b"DATA\r\n"),
    "exact-size-limit": (0, TXN + b"DATA\r\n" + (b"y" * 62 + b"\r\n") * 64 + b".\r\n"),
    "long-command-line": (0, b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n" + HELLO),
    "too-many-recipients": (
        0,
        HELLO + b"MAIL FROM:<a@x.test>\r\n" + b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(6)) + b"DATA\r\nx\r\n.\r\n",
    ),
    "every-verb": (
        0,
        b"HELO c\r\nVRFY a\r\nEXPN b\r\nHELP\r\nNOOP\r\nTURN\r\nSTARTTLS\r\nAUTH PLAIN\r\nXYZZY\r\nRSET\r\nQUIT\r\n",
    ),
    "rfc821-verbs": (0, HELLO + b"SEND FROM:<a@x.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\ns\r\n.\r\nSOML FROM:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\nt\r\n.\r\n"),
    "mail-params": (
        0,
        HELLO + b"MAIL FROM:<a@x.test> SIZE=99999 BODY=8BITMIME\r\nMAIL FROM:<a@x.test> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n"
        b"RCPT TO:<b@example.com> NOTIFY=NEVER\r\nMAIL FROM:<a@x.test> X=\x7f\r\nRSET\r\nMAIL FROM:<a@x.test> BAD=a=b\r\n",
    ),
    # DSN (RFC 3461): every parameter accepted, then each way to get it wrong.
    "dsn-params": (
        0,
        HELLO + b"MAIL FROM:<a@x.test> RET=HDRS ENVID=abc+2Bdef\r\n"
        b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40x.example\r\n"
        b"RCPT TO:<c@example.com>\r\nRCPT TO:<d@example.com> notify=never orcpt=x-local;d\r\n"
        b"DATA\r\ndsn\r\n.\r\n"
        b"MAIL FROM:<a@x.test> RET=FULL ENVID=" + b"e" * 100 + b"\r\nRCPT TO:<b@example.com> ORCPT=rfc822;" + b"o" * 493 + b"\r\n"
        b"BDAT 3 LAST\r\nxyzQUIT\r\n",
    ),
    "dsn-malformed": (
        0,
        HELLO + b"MAIL FROM:<a@x.test> RET=BOTH\r\nMAIL FROM:<a@x.test> RET=FULL RET=HDRS\r\n"
        b"MAIL FROM:<a@x.test> ENVID=a+2b\r\nMAIL FROM:<a@x.test> ENVID=a+0A\r\n"
        b"MAIL FROM:<a@x.test> ENVID=" + b"e" * 101 + b"\r\nMAIL FROM:<a@x.test> ENVID=" + b"e" * 600 + b"\r\n"
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com> NOTIFY=NEVER,DELAY\r\n"
        b"RCPT TO:<b@example.com> NOTIFY=DELAY,DELAY\r\nRCPT TO:<b@example.com> NOTIFY=\r\n"
        b"RCPT TO:<b@example.com> ORCPT=rfc822\r\nRCPT TO:<b@example.com> ORCPT=rfc822;a+\r\n"
        b"RCPT TO:<b@example.com> ORCPT=rfc822;\xc3\xbc\r\nRCPT TO:<b@example.com> ORCPT=a;b ORCPT=a;b\r\n"
        b"RCPT TO:<b@example.com> ORCPT=rfc822;" + b"o" * 494 + b"\r\nRCPT TO:<b@example.com> ORCPT=rfc822;" + b"o" * 1000 + b"\r\n"
        b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@example.com> NOTIFY=NEVER\r\nQUIT\r\n",
    ),
    "sink-failures": (6, TXN + b"DATA\r\n1\r\n.\r\n" + AGAIN + b"DATA\r\n2\r\n.\r\n" + AGAIN + b"BDAT 1 LAST\r\n3" + AGAIN + b"DATA\r\n4\r\n.\r\n"),
    "bare-lf-commands-nul": (0, b"EHLO c\nMAIL FROM:<a@x.test>\nRCPT TO:<b@example.com>\r\nNO\x00OP\r\nDATA\r\n\x00\r\n.\r\n"),
    # AUTH (RFC 4954): PLAIN and LOGIN with and without an initial response, then a
    # message (recorded with its user, relayed anywhere with flag 32).
    "auth-plain-login-relay": (
        AUTH | RELAY,
        HELLO + b"AUTH PLAIN " + GOOD + b"\r\nMAIL FROM:<a@x.test> AUTH=<>\r\nRCPT TO:<b@elsewhere.test>\r\n"
        b"DATA\r\nrelayed\r\n.\r\nRSET\r\n",
    ),
    "auth-login-challenges": (
        AUTH,
        HELLO + b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"secret") + b"\r\n" + AGAIN + b"DATA\r\nx\r\n.\r\n",
    ),
    # Every way to get AUTH wrong: cancel, bad base64, unknown mechanism, twice, inside
    # a transaction, wrong password, a temporary failure, required before MAIL, locked.
    "auth-refusals": (
        AUTH | REQUIRED,
        HELLO + b"MAIL FROM:<a@x.test>\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN " + b64(b"alice") + b"\r\n*\r\n"
        b"AUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\nAUTH\r\nAUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n"
        b"AUTH PLAIN " + b64(b"\0busy\0x") + b"\r\nAUTH PLAIN " + GOOD + b"\r\nAUTH PLAIN " + GOOD + b"\r\n"
        b"MAIL FROM:<a@x.test>\r\nAUTH LOGIN\r\n",
    ),
    "auth-locked": (AUTH, HELLO + b"AUTH PLAIN " + b64(b"\0locked\0x") + b"\r\nNOOP\r\n"),
    "auth-long-response": (AUTH, HELLO + b"AUTH PLAIN\r\n" + b"A" * 12300 + b"\r\nNOOP\r\n"),
    "auth-not-offered": (0, HELLO + b"AUTH PLAIN " + GOOD + b"\r\nQUIT\r\n"),
    "order-errors": (0, b"MAIL FROM:<a@x.test>\r\nEHLO c\r\nRCPT TO:<b@example.com>\r\nDATA\r\nBDAT 4\r\nQUITMAIL FROM:<a@x.test>\r\nMAIL FROM:<a@x.test>\r\n"),
}


def cuts_for(stream: bytes) -> list[int]:
    """Up to 16 cut points: inside each end-of-data marker and each BDAT header."""
    cuts = set()
    for marker in (b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"BDAT "):
        start = 0
        while (at := stream.find(marker, start)) >= 0:
            cuts.update(at + i for i in range(1, len(marker)))
            start = at + 1
    return sorted(cuts)[:16]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    for name, (flags, stream) in SEEDS.items():
        cuts = cuts_for(stream)
        data = bytes([flags, len(cuts)]) + b"".join(struct.pack("<H", c) for c in cuts) + stream
        (OUT / name).write_bytes(data)
    print(f"{len(SEEDS)} seeds in {OUT}")


if __name__ == "__main__":
    main()
