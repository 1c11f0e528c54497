"""Kademlia discovery with several DHT nodes in one process, on 127.0.0.1 only.

Real UDP and a real clock (kademlia runs its own asyncio loop in a thread); every wait is
bounded by a deadline.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import pytest
import trio
from kademlia.utils import digest
from nacl.signing import SigningKey

from actors import discovery as dc
from actors._dht import _Entry
from actors.runtime import Err, Ok, Result, call
from dmgn.crypto import hkdf_sha256
from dmgn.peer_record import (
    RECORD_CONTEXT,
    PeerRecord,
    ProviderLocator,
    ProviderRecord,
    RecordError,
    decode_sealed_record,
)

KEY = SigningKey(bytes(range(32)))
IDENTITY = bytes(KEY.verify_key)


def signed_peer(
    device: bytes, ttl: int = 3600, addr: str = "ws://127.0.0.1:4001", key: SigningKey = KEY
) -> PeerRecord:
    now = int(time.time())
    unsigned = PeerRecord(
        bytes(key.verify_key), device, os.urandom(32), (addr,), now - 1, now - 1 + ttl
    )
    return unsigned.signed(key.sign(RECORD_CONTEXT + unsigned.signing_payload()).signature)


def sealed(
    locator: ProviderLocator, entries: list[PeerRecord], *, issued: int | None = None
) -> bytes:
    now = int(time.time()) if issued is None else issued
    inner = ProviderRecord(IDENTITY, tuple(entries), now, now + 3600)
    inner = inner.signed(KEY.sign(RECORD_CONTEXT + inner.signing_payload()).signature)
    return locator.seal(inner).encode()


@pytest.fixture
async def dht_nodes() -> AsyncIterator[list[dc.DhtNode]]:
    nodes = [dc.DhtNode(ksize=8) for _ in range(5)]
    try:
        with trio.fail_after(30):
            for node in nodes:
                await node.start(0, "127.0.0.1")
            first = nodes[0].port
            assert first is not None
            for node in nodes[1:]:
                assert await node.bootstrap([("127.0.0.1", first)]) >= 1
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _force_store(node: dc.DhtNode, key: bytes, value: bytes) -> None:
    """What a malicious DHT node does: keep (and serve) whatever bytes it likes."""
    node.table._entries[digest(key)] = _Entry(value, 0, 2**40, "evil", time.monotonic())


async def test_sealed_record_published_by_one_node_is_found_by_another(
    dht_nodes: list[dc.DhtNode],
) -> None:
    locator = ProviderLocator(os.urandom(32))
    value = sealed(locator, [signed_peer(os.urandom(16))])
    with trio.fail_after(30):
        assert await dht_nodes[1].set(locator.key, value)
        raw = await dht_nodes[4].get(locator.key)
    assert raw == value
    now = int(time.time())
    opened = locator.open(decode_sealed_record(raw, now=now), now=now, identity=IDENTITY)
    assert len(opened.entries) == 1


async def test_honest_nodes_store_only_valid_records_under_their_signers_key(
    dht_nodes: list[dc.DhtNode],
) -> None:
    mine, theirs = ProviderLocator(os.urandom(32)), ProviderLocator(os.urandom(32))
    good = sealed(mine, [signed_peer(os.urandom(16))])
    tampered = bytearray(good)
    tampered[-70] ^= 1
    future = sealed(mine, [signed_peer(os.urandom(16))], issued=int(time.time()) + 120)
    with trio.fail_after(30):
        # Someone else's valid record under our key, a tampered one, one from the future,
        # and a plain (unsealed) peer record: none is stored anywhere.
        await dht_nodes[1].set(mine.key, sealed(theirs, [signed_peer(os.urandom(16))]))
        await dht_nodes[2].set(mine.key, bytes(tampered))
        await dht_nodes[3].set(mine.key, future)
        await dht_nodes[3].set(mine.key, signed_peer(os.urandom(16)).encode())
        assert await dht_nodes[4].get(mine.key) is None
    assert all(node.local_value(mine.key) is None for node in dht_nodes)


async def test_a_record_is_replaced_only_by_a_newer_one_from_the_same_signer(
    dht_nodes: list[dc.DhtNode],
) -> None:
    locator = ProviderLocator(os.urandom(32))
    now = int(time.time())
    older = sealed(locator, [signed_peer(os.urandom(16))], issued=now - 100)
    newer = sealed(locator, [signed_peer(os.urandom(16))], issued=now - 10)
    with trio.fail_after(30):
        assert await dht_nodes[1].set(locator.key, newer)
        await dht_nodes[2].set(locator.key, older)  # a replay of an old one
        assert await dht_nodes[4].get(locator.key) == newer


async def test_tampered_record_served_by_malicious_nodes_is_never_returned(
    dht_nodes: list[dc.DhtNode],
) -> None:
    locator = ProviderLocator(os.urandom(32))
    tampered = bytearray(sealed(locator, [signed_peer(os.urandom(16))]))
    tampered[-70] ^= 1
    for node in dht_nodes[:4]:
        _force_store(node, locator.key, bytes(tampered))
    with trio.fail_after(30):
        assert await dht_nodes[4].get(locator.key) is None
    with pytest.raises(RecordError):
        decode_sealed_record(bytes(tampered), now=int(time.time()))


# -- through the actor --------------------------------------------------------------------------


class Device:
    def __init__(self, seed: bytes, listen_port: int, bootstrap: tuple[str, ...] = ()) -> None:
        self.key = SigningKey(seed)
        self.device_id = os.urandom(16)
        self.found_send, self.found = trio.open_memory_channel[dc.PeerFound](64)
        self.locator = ProviderLocator(hkdf_sha256(seed, b"test locator"))
        self.actor = dc.DiscoveryActor(
            identity=bytes(self.key.verify_key),
            device_id=self.device_id,
            noise_key=os.urandom(32),
            sign=self.sign,
            locator=self.locator,
            found=self.found_send,
            listen_port=listen_port,
            addrs=(f"ws://127.0.0.1:{listen_port}",),
            bootstrap=bootstrap,
            dht_port=0,
            dht_interface="127.0.0.1",
            mdns=False,
            lookup_interval=0.5,
        )

    async def sign(self, context: bytes, data: bytes) -> Result[bytes]:
        return Ok(self.key.sign(context + data).signature)

    async def next_found(self, source: str) -> dc.PeerFound:
        with trio.fail_after(30):
            async for event in self.found:
                if event.source == source:
                    return event
        raise AssertionError("found channel closed")


async def test_two_devices_find_each_other_through_the_dht_from_one_bootstrap_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first device starts alone: its first publish has nobody to store it and is retried
    # after MIN_REPUBLISH_INTERVAL (10 s), and only then does its lookup find the second
    # device (the suite waited those 10 s). The retry is what this waits for, sooner.
    monkeypatch.setattr(dc, "MIN_REPUBLISH_INTERVAL", 1.0)
    seed = os.urandom(32)
    first = Device(seed, 14001)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.actor.run)
        status = await call(first.actor.mailbox.address, dc.DiscoveryState)
        assert isinstance(status, Ok) and status.value.dht_port is not None
        assert status.value.dht_bind == "127.0.0.1"
        # The second knows the first only by a ws:// bootstrap address whose port is the DHT's.
        second = Device(seed, 14002, bootstrap=(f"ws://127.0.0.1:{status.value.dht_port}",))
        await nursery.start(second.actor.run)
        boot = await second.next_found("bootstrap")
        assert boot.addrs == (f"ws://127.0.0.1:{status.value.dht_port}",)
        found = await second.next_found("dht")
        assert found.device_id == first.device_id
        assert found.addrs == ("ws://127.0.0.1:14001",)
        assert found.identity == bytes(first.key.verify_key)
        found_back = await first.next_found("dht")
        assert found_back.device_id == second.device_id
        looked_up = await call(second.actor.mailbox.address, dc.LookupPeer, first.device_id)
        assert isinstance(looked_up, Ok) and looked_up.value is not None
        assert looked_up.value.addrs == ("ws://127.0.0.1:14001",)
        providers = await call(
            first.actor.mailbox.address, dc.LookupIdentity, bytes(first.key.verify_key)
        )
        assert isinstance(providers, Ok)
        assert {r.device_id for r in providers.value} == {first.device_id, second.device_id}
        # Another identity's devices cannot be looked up: its record is sealed.
        other = await call(first.actor.mailbox.address, dc.LookupIdentity, os.urandom(32))
        assert isinstance(other, Err) and other.code == "blinded"
        nursery.cancel_scope.cancel()


async def test_a_strangers_record_cannot_displace_or_shadow_our_provider_record() -> None:
    seed = os.urandom(32)
    device = Device(seed, 14003)
    async with trio.open_nursery() as nursery:
        await nursery.start(device.actor.run)
        dht = device.actor._dht
        assert dht is not None
        key = device.locator.key
        with trio.fail_after(30):
            while True:
                if dht.local_value(key) is not None:
                    break
                await trio.sleep(0.05)
        ours = dht.local_value(key)
        # A stranger signs a record, 290 s in the future, with its own locator and offers it
        # under our key: refused (wrong signer for the key; and from the future).
        stranger = ProviderLocator(os.urandom(32))
        forged = sealed(stranger, [signed_peer(os.urandom(16))], issued=int(time.time()) + 290)
        assert dht.table.put(digest(key), forged, "192.0.2.1") is not None
        assert dht.local_value(key) == ours
        result = await call(
            device.actor.mailbox.address, dc.LookupIdentity, bytes(device.key.verify_key)
        )
        assert isinstance(result, Ok)
        assert [r.device_id for r in result.value] == [device.device_id]
        nursery.cancel_scope.cancel()
