"""A stranger attacking a node's DHT over real UDP on loopback (issue 12 items 4, 5 and 8).

The stranger speaks kademlia's wire format (rpcudp: ``0x00 | 20-byte id | msgpack[name, args]``)
from its own 127.0.0.x address. The full-size run (20,000 STOREs, RSS curve) is
``benchmarks/attack_dht.py``; these are bounded versions of it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import umsgpack
from kademlia.utils import digest
from nacl.signing import SigningKey

from actors import discovery as dc
from actors._dht import ALLOWANCE_RATE, MAX_RECORDS_PER_SOURCE, RESPONSE_ALLOWANCE
from actors.node import NetworkSettings, open_node, start_networking
from dmgn.embedding import HashingEmbedder
from dmgn.peer_record import MAX_ADDRS, RECORD_CONTEXT, PeerRecord, ProviderLocator, ProviderRecord
from wire.websocket import WebSocketNetwork


def request(name: str, *args: object) -> bytes:
    return b"\x00" + os.urandom(20) + umsgpack.packb([name, list(args)])


def sealed_record(addrs: int = 1) -> tuple[bytes, bytes]:
    """A valid sealed record under its own key, as any stranger can make: (dht key, value)."""
    key = SigningKey.generate()
    now = int(time.time())
    entry = PeerRecord(
        bytes(key.verify_key),
        os.urandom(16),
        os.urandom(32),
        tuple(f"ws://[2001:db8::{i}]:4001" for i in range(addrs)),
        now,
        now + 3600,
    )
    entry = entry.signed(key.sign(RECORD_CONTEXT + entry.signing_payload()).signature)
    inner = ProviderRecord(bytes(key.verify_key), (entry,), now, now + 3600)
    inner = inner.signed(key.sign(RECORD_CONTEXT + inner.signing_payload()).signature)
    locator = ProviderLocator(os.urandom(32))
    return digest(locator.key), locator.seal(inner).encode()


class Stranger:
    """A UDP socket at its own loopback address, counting what it sends and receives."""

    def __init__(self, sock: trio.socket.SocketType, target: tuple[str, int]) -> None:
        self.sock, self.target = sock, target
        self.sent = self.received = 0

    async def send(self, datagram: bytes) -> None:
        self.sent += len(datagram)
        await self.sock.sendto(datagram, self.target)

    async def receive_all(self) -> None:
        while True:
            data, _ = await self.sock.recvfrom(65536)
            self.received += len(data)


@asynccontextmanager
async def attacked(source: str) -> AsyncIterator[tuple[dc.DhtNode, Stranger]]:
    node = dc.DhtNode()
    await node.start(0, "127.0.0.1")
    assert node.port is not None
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind((source, 0))
    stranger = Stranger(sock, ("127.0.0.1", node.port))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stranger.receive_all)
            yield node, stranger
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
        node.stop()


async def settled(node: dc.DhtNode) -> None:
    """Wait until the node has taken in everything sent (no datagram for 0.3 s)."""
    with trio.fail_after(60):
        seen = -1
        while True:
            if node.stats.datagrams_in == seen:
                return
            seen = node.stats.datagrams_in
            await trio.sleep(0.3)


async def test_thousands_of_stores_from_one_stranger_leave_a_bounded_table_no_amplification() -> (
    None
):
    async with attacked("127.0.0.21") as (node, stranger):
        for i in range(2000):
            key, value = sealed_record() if i % 4 else (os.urandom(20), os.urandom(600))
            # A new node id every time: each looks like a newcomer to kademlia.
            await stranger.send(request("store", os.urandom(20), key, value))
            if i % 25 == 0:
                await trio.sleep(0.01)  # loopback UDP drops what a full socket buffer cannot take
        await settled(node)
        stats = node.stats
        assert stats.stores_accepted + stats.stores_refused >= 1000
        assert len(node.table) <= MAX_RECORDS_PER_SOURCE
        assert stats.stores_accepted <= MAX_RECORDS_PER_SOURCE
        assert stats.bytes_out <= stats.bytes_in
        assert stranger.received <= stranger.sent
        assert stats.welcomes <= 1  # one newcomer address welcomed, not 2,000


async def test_find_value_floods_get_no_more_bytes_back_than_they_send() -> None:
    async with attacked("127.0.0.22") as (node, stranger):
        key, value = sealed_record(addrs=MAX_ADDRS)  # a large answer (~1 KiB)
        assert node.table.put(key, value, "self") is None
        start = time.monotonic()
        for i in range(600):
            await stranger.send(request("find_value", os.urandom(20), key))
            if i % 25 == 0:
                await trio.sleep(0.01)
        await settled(node)
        elapsed = time.monotonic() - start
        stats = node.stats
        assert stats.answers_dropped > 0
        assert stats.bytes_out <= stats.bytes_in + RESPONSE_ALLOWANCE + ALLOWANCE_RATE * elapsed
        assert stranger.received <= stranger.sent + RESPONSE_ALLOWANCE + ALLOWANCE_RATE * elapsed


async def test_junk_datagrams_are_counted_and_summarised_never_logged_as_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    junk = [
        b"",
        b"\x00" * 10,
        b"\x00" + os.urandom(20) + b"\xc1",  # msgpack's one invalid byte
        b"\x00" + os.urandom(20) + umsgpack.packb({"not": "a list"}),
        b"\x00" + os.urandom(20) + umsgpack.packb(["store", [1, 2, 3]]),
        b"\x00" + os.urandom(20) + umsgpack.packb(["find_node", [b"short", [1]]]),
        b"\x00" + os.urandom(20) + umsgpack.packb(["ping", []]),
        b"\x00" + os.urandom(20) + umsgpack.packb(["shutdown", [b"x" * 20]]),
        b"\x01" + os.urandom(20) + umsgpack.packb(True),  # an answer nobody asked for
        b"\x07" + os.urandom(40),
    ]
    async with attacked("127.0.0.23") as (node, stranger):
        for i in range(1000):
            await stranger.send(junk[i % len(junk)] or os.urandom(30))
            if i % 50 == 0:
                await trio.sleep(0.01)
        await settled(node)
        assert node.stats.malformed >= 500
        # Still serving: a well-formed ping from the same address gets its answer.
        before = stranger.received
        await stranger.send(request("ping", os.urandom(20)))
        with trio.fail_after(10):
            while True:
                if stranger.received > before:
                    break
                await trio.sleep(0.02)
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= 10


async def test_the_dht_binds_the_host_of_listen_addr_not_every_interface() -> None:
    async with open_node(os.urandom(32), os.urandom(16), None, embedder=HashingEmbedder()) as node:
        settings = NetworkSettings(listen_addr="ws://127.0.0.1:0", mdns=False, dht_port=0)
        online = await start_networking(node, WebSocketNetwork(), settings, None)
        assert online.discovery is not None
        status = await dc_state(online.discovery)
        assert status.dht_bind == "127.0.0.1"
        await online.close()


async def dc_state(address: object) -> dc.DiscoveryStatus:
    from actors.runtime import Ok, call

    result = await call(address, dc.DiscoveryState)  # type: ignore[arg-type]
    assert isinstance(result, Ok)
    return result.value
