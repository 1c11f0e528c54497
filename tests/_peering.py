"""A peering actor wired to test mailboxes: the transport's inbox is read by the test (each
`tp.Dial` answered by hand), PeerFound and transport events are sent by it."""

from __future__ import annotations

import os
from typing import NamedTuple

import trio

from actors import discovery as dc
from actors import peering as pr
from actors import transport as tp
from actors.runtime import Mailbox
from dmgn.reputation import Reputation


class PeeringUnderTest(NamedTuple):
    peering: pr.Peering
    transport: Mailbox[tp.TransportMessage]
    found: trio.MemorySendChannel[dc.PeerFound]
    events: trio.MemorySendChannel[tp.TransportEvent]
    #: Only held (so its address stays valid); nothing here reads it.
    gossip: Mailbox[object]


def peering_under_test(
    identity: bytes,
    *,
    redial_interval: float,
    bootstrap: tuple[str, ...] = (),
    reputation: Reputation | None = None,
    events_buffer: int = 4,
    gossip_buffer: int = 16,
) -> PeeringUnderTest:
    transport: Mailbox[tp.TransportMessage] = Mailbox("transport", 16)
    gossip: Mailbox[object] = Mailbox("gossip", gossip_buffer)
    events_send, events = trio.open_memory_channel[tp.TransportEvent](events_buffer)
    found_send, found = trio.open_memory_channel[dc.PeerFound](8)
    peering = pr.Peering(
        identity=identity,
        device_id=os.urandom(16),
        transport=transport.address,
        gossip=gossip.address,  # type: ignore[arg-type]  # nobody connects: never sent to
        events=events,
        found=found,
        bootstrap=bootstrap,
        redial_interval=redial_interval,
        reputation=reputation,
    )
    return PeeringUnderTest(peering, transport, found_send, events_send, gossip)
