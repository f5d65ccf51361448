"""An mboxrd reader, written from the format's definition rather than from the gateway.

A message starts at a line beginning with `From `; its last line is the empty line that
the writer appended; inside it, `>From `, `>>From `, ... lines lose one `>`. Lines end
at LF only: CR is an ordinary byte here, so CRLF mail comes back byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEPARATOR = re.compile(rb"From (\S+) (\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})\n")
QUOTED_FROM = re.compile(rb">+From ")


# `smtpgw spool export` adds the envelope as header lines ending with this mark.
EXPORT_MARK = re.compile(rb"([^\n]*) \(added by smtpgw spool export\)\r?\n")


@dataclass
class MboxMessage:
    sender: str
    date: str
    value: bytes
    # The header lines the export added (the envelope), without their mark.
    added: list[str]


def lines(data: bytes) -> list[bytes]:
    """Splits at LF only, keeping the LF (bytes.splitlines would also split at CR)."""
    return re.findall(rb"[^\n]*\n|[^\n]+\Z", data)


def parse(data: bytes) -> list[MboxMessage]:
    chunks: list[tuple[re.Match, list[bytes]]] = []
    for line in lines(data):
        if line.startswith(b"From "):
            match = SEPARATOR.fullmatch(line)
            assert match, f"malformed mbox separator line {line!r}"
            chunks.append((match, []))
            continue
        assert chunks, f"mbox data before the first separator: {line!r}"
        chunks[-1][1].append(line[1:] if QUOTED_FROM.match(line) else line)
    messages = []
    for match, body in chunks:
        value = b"".join(body)
        assert value.endswith(b"\n"), "an mboxrd message must end with its blank line"
        added = []
        while mark := EXPORT_MARK.match(value):
            added.append(mark.group(1).decode())
            value = value[mark.end():]
        messages.append(MboxMessage(match.group(1).decode(), match.group(2).decode(), value[:-1], added))
    return messages
