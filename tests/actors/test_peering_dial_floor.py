"""A found peer whose reputation is under the dial floor is not dialed, and is dialed again
soon after its record has decayed back above it: no event says when, so the dial loop looks
again every DIAL_RECHECK while someone is held back (and only then)."""

from __future__ import annotations

import math
import os

import trio
import trio.testing

from actors import discovery as dc
from actors import peering as pr
from actors import transport as tp
from dmgn.reputation import HALF_LIFE, NEUTRAL, Reputation
from tests._peering import peering_under_test
from wire.testing import TestIdentity

#: The DHT finds a peer again this often (its record is forgotten after FOUND_PEER_TTL).
REFIND = 1500.0


async def test_a_peer_under_the_dial_floor_is_dialed_within_a_recheck_of_recovering(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = TestIdentity.generate().public_key, TestIdentity.generate().public_key
    device = os.urandom(16)
    key = f"{theirs.hex()[:16]}/{device.hex()}"  # peering's name for another identity's node
    await trio.sleep(1.0)  # a record made at clock 0 would not start decaying
    reputation = Reputation(clock=trio.current_time)
    reputation.violated(key, False, "forged an op")
    violated_at = trio.current_time()
    assert reputation.score(key) < pr.DIAL_FLOOR
    # Its score is NEUTRAL - 35 x 2^(-t / HALF_LIFE) (one violation, nothing else known),
    # rounded to 0.1: it reads as the floor from 0.05 under it.
    recovers_at = violated_at + HALF_LIFE * math.log2(35.0 / (NEUTRAL - pr.DIAL_FLOOR + 0.05))
    under = peering_under_test(ours, redial_interval=5.0, reputation=reputation)
    found_at: list[float] = []

    async def refind() -> None:
        while True:
            found_at.append(trio.current_time())
            await under.found.send(dc.PeerFound(("mem://them",), "dht", device, theirs))
            await trio.sleep(REFIND)

    async with trio.open_nursery() as nursery:
        await nursery.start(under.peering.run)
        nursery.start_soon(refind)
        with trio.fail_after(recovers_at + 2 * REFIND):
            async for message in under.transport.receive:
                if isinstance(message, tp.Dial | tp.DialStorage):
                    dialed_at = trio.current_time()
                    message.reply.err("refused", "dial_failed")
                    break
                reply = getattr(message, "reply", None)
                if reply is not None:
                    reply.err("not answered in this test")
        nursery.cancel_scope.cancel()
    # Not while under the floor.
    assert dialed_at >= recovers_at
    assert reputation.score(key) >= pr.DIAL_FLOOR
    # Within a recheck of its recovery, and not because it was found again at that moment.
    assert dialed_at <= recovers_at + pr.DIAL_RECHECK + 1.0
    assert all(abs(dialed_at - t) > 1.0 for t in found_at)
