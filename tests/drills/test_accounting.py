"""The drills' accounting can fail: a missing record, an altered byte, a stored copy
too many are each counted (no gateway; records made up the way the gateway stores them)."""

from __future__ import annotations

from drill import Attempt, account, new_message

ID = "01M8V5FVYN7404NNS5G8FSKD1{}"


def stored(message_id: str, message: bytes) -> bytes:
    return (
        b"Received: from load.test ([127.0.0.1])\r\n\tby vm (smtpgw) with ESMTP id "
        + message_id.encode()
        + b"\r\n\tfor <x@example.com>;\r\n\tWed, 02 Dec 2026 10:41:29 +0000\r\n"
        + message
    )


def attempt(n: int, code: int | None, token_message=None) -> Attempt:
    token, message = token_message or new_message("acct", 300)
    a = Attempt(token, message, ("127.0.0.1", 25), 0.0, 1.0, code, "dot", "")
    if code == 250:
        a.msg_id = ID.format(n)
    return a


def test_intact_records_count_as_found_and_none_lost():
    attempts = [attempt(i, 250) for i in range(3)]
    records = {a.msg_id: [stored(a.msg_id, a.message)] for a in attempts}
    counts = account(attempts, records)
    assert (counts.sent, counts.ok, counts.found, counts.lost, counts.duplicated) == (3, 3, 3, 0, 0)


def test_a_missing_or_altered_record_is_lost():
    attempts = [attempt(i, 250) for i in range(3)]
    records = {a.msg_id: [stored(a.msg_id, a.message)] for a in attempts[:2]}
    altered = bytearray(records[attempts[1].msg_id][0])
    altered[-5] ^= 0x20
    records[attempts[1].msg_id] = [bytes(altered)]
    counts = account(attempts, records)
    assert counts.lost == 2 and sorted(counts.lost_ids) == sorted([attempts[1].msg_id, attempts[2].msg_id])


def test_a_message_stored_before_its_retry_is_a_duplicate_not_a_loss():
    message = new_message("acct", 300)
    lost_reply = attempt(0, None, message)  # stored, but the 250 never arrived
    retry = attempt(1, 250, message)
    records = {ID.format(0): [stored(ID.format(0), message[1])], retry.msg_id: [stored(retry.msg_id, message[1])]}
    counts = account([lost_reply, retry], records)
    assert (counts.sent, counts.ok, counts.noreply, counts.found, counts.lost, counts.duplicated) == (2, 1, 1, 2, 0, 1)


def test_a_4xx_and_a_5xx_are_counted():
    counts = account([attempt(0, 451), attempt(1, 452), attempt(2, 554)], {})
    assert (counts.temp, counts.perm, counts.ok, counts.lost) == (2, 1, 0, 0)
