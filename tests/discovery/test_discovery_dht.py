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
from actors.runtime import Ok, Result, call
from dmgn.peer_record import (
    RECORD_CONTEXT,
    PeerRecord,
    RecordError,
    decode_peer_record,
    decode_provider_record,
    peer_key,
    provider_key,
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
    storage = node._server.storage
    storage.data[digest(key)] = (time.monotonic(), value)


async def test_record_published_by_one_node_is_found_by_another(
    dht_nodes: list[dc.DhtNode],
) -> None:
    device = os.urandom(16)
    record = signed_peer(device)
    with trio.fail_after(30):
        assert await dht_nodes[1].set(peer_key(device), record.encode())
        raw = await dht_nodes[4].get(peer_key(device))
    assert raw is not None
    found = decode_peer_record(raw, now=int(time.time()), expected_device=device)
    assert found == record


async def test_honest_nodes_refuse_to_store_tampered_or_expired_records(
    dht_nodes: list[dc.DhtNode],
) -> None:
    device = os.urandom(16)
    tampered = signed_peer(device).encode().replace(b"127.0.0.1", b"127.0.0.9")
    expired = signed_peer(device, ttl=1)
    with trio.fail_after(30):
        await trio.sleep(1.1)  # let the one-second record expire (real clock: kademlia's)
        await dht_nodes[1].set(peer_key(device), tampered)
        await dht_nodes[2].set(peer_key(device), expired.encode())
        assert await dht_nodes[4].get(peer_key(device)) is None
    assert all(node.local_value(peer_key(device)) is None for node in dht_nodes)


async def test_tampered_record_served_by_malicious_nodes_is_rejected_on_read(
    dht_nodes: list[dc.DhtNode],
) -> None:
    device = os.urandom(16)
    good = signed_peer(device)
    tampered = good.encode().replace(b"127.0.0.1", b"127.0.0.9")
    for node in dht_nodes[:4]:
        _force_store(node, peer_key(device), tampered)
    with trio.fail_after(30):
        raw = await dht_nodes[4].get(peer_key(device))
    assert raw == tampered  # the DHT hands it over...
    with pytest.raises(RecordError, match="signature"):  # ...and the reader refuses it
        decode_peer_record(raw, now=int(time.time()), expected_device=device)


# -- through the actor --------------------------------------------------------------------------


class Device:
    def __init__(self, seed: bytes, listen_port: int, bootstrap: tuple[str, ...] = ()) -> None:
        self.key = SigningKey(seed)
        self.device_id = os.urandom(16)
        self.found_send, self.found = trio.open_memory_channel[dc.PeerFound](64)
        self.actor = dc.DiscoveryActor(
            identity=bytes(self.key.verify_key),
            device_id=self.device_id,
            noise_key=os.urandom(32),
            sign=self.sign,
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


async def test_two_devices_find_each_other_through_the_dht_from_one_bootstrap_address() -> None:
    seed = os.urandom(32)
    first = Device(seed, 14001)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.actor.run)
        status = await call(first.actor.mailbox.address, dc.DiscoveryState)
        assert isinstance(status, Ok) and status.value.dht_port is not None
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
        nursery.cancel_scope.cancel()


async def test_forged_provider_record_for_our_identity_is_ignored() -> None:
    seed = os.urandom(32)
    device = Device(seed, 14003)
    async with trio.open_nursery() as nursery:
        await nursery.start(device.actor.run)
        dht = device.actor._dht
        assert dht is not None
        stranger = SigningKey(os.urandom(32))
        # A stranger's record, re-labelled as ours: the signature cannot match.
        key = provider_key(bytes(device.key.verify_key))
        real = dht.local_value(key)
        with trio.fail_after(30):
            while real is None:
                await trio.sleep(0.05)
                real = dht.local_value(key)
        assert decode_provider_record(real, now=int(time.time()))
        fake = signed_peer(os.urandom(16), key=stranger)
        forged = real.replace(real[real.index(device.device_id) :][:16], fake.device_id)
        _force_store(dht, key, forged)
        result = await call(
            device.actor.mailbox.address, dc.LookupIdentity, bytes(device.key.verify_key)
        )
        assert result == Ok(())
        nursery.cancel_scope.cancel()
