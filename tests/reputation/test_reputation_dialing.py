"""The peering actor dials by reputation: best first, and not at all a found peer that recently
violated the protocol. The transport here is a fake that records dials and refuses them."""

from __future__ import annotations

import os

import pytest
import trio

from actors import discovery as dc
from actors import peering as pr
from actors import transport as tp
from actors.runtime import Ok, call
from dmgn.reputation import Reputation
from tests._peering import peering_under_test

OURS = os.urandom(32)
STRANGER = os.urandom(32)


def key(device: bytes) -> str:
    return f"{STRANGER.hex()[:16]}/{device.hex()}"


async def test_dials_go_to_the_best_reputed_first_and_never_to_a_violator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pr, "MAX_PARALLEL_DIALS", 1)
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
