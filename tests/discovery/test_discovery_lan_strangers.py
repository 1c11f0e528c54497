"""Peers found on the LAN (mDNS) are dialed only as devices of our own identity (issue 13
item 6, issue 20): the handshake checks the responder's certificate against the identity we
expect before it sends ours, so a stranger in range is not connected and never sees our
certificate from a dial of ours. Storage peers are chosen (bootstrap, add_peer, the DHT)."""

from __future__ import annotations

import os

import trio

from actors import discovery as dc
from actors import peering as pr
from actors import transport as tp
from actors.runtime import Ok, call
from tests._peering import peering_under_test

OURS = os.urandom(32)
STRANGER = os.urandom(32)


async def test_mdns_finds_are_dialed_expecting_our_identity_others_as_found() -> None:
    peering, transport, found_send, events_send, _gossip = peering_under_test(
        OURS, redial_interval=5.0, bootstrap=("ws://10.0.0.9:4001",)
    )
    expected: dict[str, bytes | None] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        await found_send.send(dc.PeerFound(("ws://10.0.0.2:4001",), "mdns", os.urandom(16)))
        await found_send.send(
            dc.PeerFound(("ws://10.0.0.3:4001",), "dht", os.urandom(16), STRANGER)
        )
        with trio.move_on_after(2.0):
            async for message in transport.receive:
                assert isinstance(message, tp.Dial)
                expected[message.address] = message.expected_identity
                message.reply.err("refused", "unreachable")
                if len(expected) == 3:
                    break
        nursery.cancel_scope.cancel()
    events_send.close()
    assert expected == {
        "ws://10.0.0.2:4001": OURS,  # the LAN: only our own devices
        "ws://10.0.0.3:4001": STRANGER,  # a chosen storage peer's verified record
        "ws://10.0.0.9:4001": None,  # a bootstrap address: whoever a person pointed us at
    }


async def test_a_lan_stranger_is_dialed_once_and_its_identity_never_shown() -> None:
    peering, transport, found_send, events_send, _gossip = peering_under_test(
        OURS, redial_interval=0.2
    )
    stranger = os.urandom(16)
    dials = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        await found_send.send(dc.PeerFound(("ws://10.0.0.7:4001",), "mdns", stranger))
        with trio.move_on_after(1.5):  # several redial intervals
            async for message in transport.receive:
                assert isinstance(message, tp.Dial)
                dials += 1
                reason = "peer is a different identity than the one dialed"
                message.reply.err(f"cannot connect to {message.address}: {reason}", "dial_failed")
                # It announces itself again (an mDNS update): still not dialed.
                await found_send.send(dc.PeerFound(("ws://10.0.0.7:4001",), "mdns", stranger))
        state = await call(peering.mailbox.address, pr.PeeringState)
        nursery.cancel_scope.cancel()
    events_send.close()
    assert dials == 1
    assert isinstance(state, Ok) and state.value.targets == ()


async def test_a_stranger_announcing_our_devices_id_does_not_hide_that_device() -> None:
    """The "different identity" refusal is a close reason the remote chose: an attacker who
    announces our device B's id at its own address is ignored at that address only, and B's
    own announcements are still dialed."""
    peering, transport, found_send, events_send, _gossip = peering_under_test(
        OURS, redial_interval=0.2
    )
    device_b = os.urandom(16)
    attacker, real = "ws://10.0.0.66:4001", "ws://10.0.0.5:4001"
    dialed: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        await found_send.send(dc.PeerFound((attacker,), "mdns", device_b))
        with trio.fail_after(10):
            async for message in transport.receive:
                assert isinstance(message, tp.Dial)
                dialed.append(message.address)
                if message.address == real:
                    message.reply.err("not yet", "dial_failed")
                    break
                reason = "device handshake failed: the peer is a different identity"
                message.reply.err(f"cannot connect to {message.address}: {reason}", "dial_failed")
                # The attacker announces again (ignored), then B announces itself.
                await found_send.send(dc.PeerFound((attacker,), "mdns", device_b))
                await found_send.send(dc.PeerFound((real,), "mdns", device_b))
        nursery.cancel_scope.cancel()
    events_send.close()
    assert dialed == [attacker, real]
