"""Hostile or careless clients: floods of pipelined commands and random bytes."""

import random
import threading

import pytest

from smtpwire import assert_reply, make_message


def test_pipelined_flood_is_answered_in_full_and_in_order(gateway):
    # The client writes far more than any buffer holds before reading a reply; the
    # server must push back rather than drop, reorder or buffer without bound.
    count = 100_000
    with gateway.session() as wire:
        writer = threading.Thread(target=wire.send, args=(b"NOOP\r\n" * count + b"HELP\r\n",), daemon=True)
        writer.start()
        for i in range(count):
            reply = wire.reply()
            assert reply.code == 250, f"reply {i}: {reply.text!r}"
        assert_reply(wire.reply(), "214", "HELP after the flood")
        writer.join(timeout=10)
        wire.deliver(make_message("after-flood"))


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_never_take_the_gateway_down(gateway, seed):
    rng = random.Random(seed)
    noise = bytes(rng.getrandbits(8) for _ in range(64 * 1024))
    if seed % 2:  # half of the runs start with a valid transaction, so DATA mode gets noise too
        noise = b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n" + noise
    with gateway.wire() as wire:
        try:
            wire.send(noise)
        except (BrokenPipeError, ConnectionResetError):
            pass  # hanging up on noise is fine
        wire.closed_by_server(timeout=0.5)  # whatever it answers, or whether it hangs up
    assert gateway.running(), "gateway died on random input"
    with gateway.session() as wire:
        wire.deliver(make_message(f"after-noise-{seed}"))
