"""The peering actor dials by reputation: best first, and not at all a found peer that recently
violated the protocol, until its record has decayed back above the dial floor. The transport
here is a fake that records dials and refuses them."""

from __future__ import annotations

import math
import os

import pytest
import trio
import trio.testing

from actors import _dial_schedule as ds
from actors import discovery as dc
from actors import peering as pr
from actors import transport as tp
from actors.runtime import Ok, call
from dmgn.reputation import HALF_LIFE, NEUTRAL, Reputation
from tests._peering import peering_under_test

OURS = os.urandom(32)
STRANGER = os.urandom(32)
#: The DHT finds a peer again this often (its record is forgotten after FOUND_PEER_TTL).
REFIND = 1500.0


def key(device: bytes) -> str:
    return f"{STRANGER.hex()[:16]}/{device.hex()}"


async def test_dials_go_to_the_best_reputed_first_and_never_to_a_violator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ds, "MAX_PARALLEL_DIALS", 1)
    honest, neutral, violator = os.urandom(16), os.urandom(16), os.urandom(16)
    table = Reputation()
    table.connected(key(honest), False)
    table.answered(key(honest), False, 20.0)
    table.disconnected(key(honest), False)
    table.violated(key(violator), False, "malformed gossip message")
    table.violated(key(violator), False, "malformed gossip message")
    addresses = {honest: "ws://h:1", neutral: "ws://n:1", violator: "ws://v:1"}

    peering, transport, found_send, events_send, _gossip = peering_under_test(
        OURS, redial_interval=0.3, reputation=table
    )
    dialed: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        for device, address in addresses.items():
            await found_send.send(dc.PeerFound((address,), "dht", device, STRANGER))
        with trio.move_on_after(2.0):  # several redial rounds (backoff <= 0.3 s)
            async for message in transport.receive:
                assert isinstance(message, tp.Dial)
                dialed.append(message.address)
                message.reply.err("unreachable", "unreachable")
        state = await call(peering.mailbox.address, pr.PeeringState)
        nursery.cancel_scope.cancel()
    assert dialed[:2] == ["ws://h:1", "ws://n:1"]
    assert "ws://v:1" not in dialed
    assert dialed.count("ws://h:1") >= 2  # redialed: a refusal is not a reason to give up
    assert isinstance(state, Ok)
    shown = state.value.reputation  # what `dmgn peers` shows
    assert shown[key(violator)]["score"] < shown[key(honest)]["score"]
    assert shown[key(violator)]["last_reason"] == "malformed gossip message"
    events_send.close()


async def test_a_violator_is_dialed_within_a_recheck_of_its_record_recovering(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No event says when a record has decayed back above the dial floor, so the dial loop
    # looks again every DIAL_RECHECK while a found peer is held back under it (and only then).
    device = os.urandom(16)
    await trio.sleep(1.0)  # a record made at clock 0 would not start decaying
    table = Reputation(clock=trio.current_time)
    table.violated(key(device), False, "forged an op")
    assert table.score(key(device)) < ds.DIAL_FLOOR
    # Its score is NEUTRAL - 35 x 2^(-t / HALF_LIFE) (one violation, nothing else known),
    # rounded to 0.1: it reads as the floor from 0.05 under it.
    recovers_at = trio.current_time() + HALF_LIFE * math.log2(
        35.0 / (NEUTRAL - ds.DIAL_FLOOR + 0.05)
    )
    peering, transport, found_send, events_send, _gossip = peering_under_test(
        OURS, redial_interval=5.0, reputation=table
    )
    found_at: list[float] = []

    async def refind() -> None:
        while True:
            found_at.append(trio.current_time())
            await found_send.send(dc.PeerFound(("ws://v:1",), "dht", device, STRANGER))
            await trio.sleep(REFIND)

    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        nursery.start_soon(refind)
        with trio.fail_at(recovers_at + 2 * REFIND):
            message = await transport.receive.receive()
        dialed_at = trio.current_time()
        assert isinstance(message, tp.Dial)
        message.reply.err("unreachable", "unreachable")
        nursery.cancel_scope.cancel()
    # Not while under the floor.
    assert dialed_at >= recovers_at
    assert table.score(key(device)) >= ds.DIAL_FLOOR
    # Within a recheck of its recovery, and not because it was found again at that moment.
    assert dialed_at <= recovers_at + ds.DIAL_RECHECK + 1.0
    assert all(abs(dialed_at - t) > 1.0 for t in found_at)
    events_send.close()
