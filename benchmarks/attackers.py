"""Strangers that attack a node over real WebSocket + Noise (issue 12), for benchmarks and tests.

Each stranger has a fresh identity (identities cost nothing) and leaves from its own loopback
address (all of 127/8 is loopback on Linux), so per-address limits are exercised as they would
be by many machines. A stranger that is refused or closed comes back after `RECONNECT_DELAY`,
as a persistent attacker would.

- `idle_stranger`: completes the handshake, answers pings, never says anything;
- `partial_stranger`: completes the handshake and starts a message of `PARTIAL_BYTES` that it
  never finishes (what took main to 1.24 GB).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import trio

from actors.gossip import GOSSIP_REGISTRY
from dmgn.storage_protocol import STORAGE_MESSAGE_TYPES
from wire import WireError, secure_connection
from wire.testing import TestIdentity, open_raw_channel, unfinished_message_frames
from wire.websocket import WebSocketNetwork

__all__ = ["PARTIAL_BYTES", "RECONNECT_DELAY", "AttackStats", "idle_stranger", "partial_stranger"]

#: What each partial stranger tries to park: the largest message a device may send.
PARTIAL_BYTES = 16 * 1024 * 1024
#: A refused or closed stranger comes back after about this long (jittered).
RECONNECT_DELAY = 1.0
#: What a node speaks: a stranger that understands it stays connected as long as it may.
NODE_REGISTRY = GOSSIP_REGISTRY.extended(*STORAGE_MESSAGE_TYPES)


@dataclass
class AttackStats:
    handshakes: int = 0
    failures: int = 0
    closes: dict[str, int] = field(default_factory=dict)
    bytes_parked: int = 0

    def closed(self, reason: str) -> None:
        key = reason.split(":")[-1].strip()[:60] or reason[:60]
        self.closes[key] = self.closes.get(key, 0) + 1


async def idle_stranger(address: str, source: str, stats: AttackStats) -> None:
    while True:
        network = WebSocketNetwork(source_address=source)
        try:
            async with network.dial(address) as stream:
                connection = await secure_connection(
                    stream,
                    TestIdentity.generate().new_device(),
                    initiator=True,
                    registry=NODE_REGISTRY,
                )
                stats.handshakes += 1
                while True:
                    await connection.receive()  # answers pings; raises when closed
        except WireError as error:
            stats.failures += 1
            stats.closed(str(error))
        await trio.sleep(RECONNECT_DELAY * random.uniform(0.5, 1.5))


async def partial_stranger(address: str, source: str, stats: AttackStats) -> None:
    while True:
        network = WebSocketNetwork(source_address=source)
        try:
            async with network.dial(address) as stream:
                channel = await open_raw_channel(
                    stream, TestIdentity.generate().new_device(), registry=NODE_REGISTRY
                )
                stats.handshakes += 1
                for frame in unfinished_message_frames(channel, PARTIAL_BYTES):
                    await stream.send_message(frame)
                    stats.bytes_parked += len(frame)
                while True:
                    await stream.receive_message()  # holds it until the node gives up
        except WireError as error:
            stats.failures += 1
            stats.closed(str(error))
        await trio.sleep(RECONNECT_DELAY * random.uniform(0.5, 1.5))
