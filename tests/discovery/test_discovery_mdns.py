"""Zeroconf: two devices on one LAN (here: loopback) find each other with no configuration."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio
from nacl.signing import SigningKey

from actors import discovery as dc
from actors.runtime import Ok, Result
from dmgn.peer_record import ProviderLocator

MDNS_GROUP = "224.0.0.251"


def _multicast_loopback_works() -> str | None:
    """None if a multicast datagram sent on 127.0.0.1 comes back; else why not."""
    try:
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as error:
        return f"no UDP sockets: {error}"
    with receiver, sender:
        try:
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            receiver.bind(("", 0))
            port = receiver.getsockname()[1]
            membership = struct.pack(
                "4s4s", socket.inet_aton(MDNS_GROUP), socket.inet_aton("127.0.0.1")
            )
            receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            sender.setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1")
            )
            sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sender.sendto(b"probe", (MDNS_GROUP, port))
            receiver.settimeout(1.0)
            receiver.recvfrom(16)
        except OSError as error:
            return f"multicast on loopback is not possible here ({error})"
    return None


class Device:
    def __init__(self, seed: bytes, port: int) -> None:
        self.key = SigningKey(seed)
        self.device_id = os.urandom(16)
        self.found_send, self.found = trio.open_memory_channel[dc.PeerFound](64)
        self.actor = dc.DiscoveryActor(
            identity=bytes(self.key.verify_key),
            device_id=self.device_id,
            noise_key=os.urandom(32),
            sign=self.sign,
            locator=ProviderLocator(os.urandom(32)),
            found=self.found_send,
            listen_port=port,
            addrs=(f"ws://127.0.0.1:{port}",),
            dht_port=None,
            mdns=True,
            mdns_interfaces=["127.0.0.1"],
        )

    async def sign(self, context: bytes, data: bytes) -> Result[bytes]:
        return Ok(self.key.sign(context + data).signature)

    async def find(self, device_id: bytes) -> dc.PeerFound:
        with trio.fail_after(20):
            async for event in self.found:
                if event.source == "mdns" and event.device_id == device_id:
                    return event
        raise AssertionError("found channel closed")


async def test_two_devices_find_each_other_on_the_lan_without_configuration() -> None:
    reason = await trio.to_thread.run_sync(_multicast_loopback_works)
    if reason is not None:
        pytest.skip(reason)
    seed = os.urandom(32)
    laptop, desktop = Device(seed, 15001), Device(seed, 15002)
    async with trio.open_nursery() as nursery:
        # Both at once: each start waits ~1.7 s for zeroconf to probe and register its name.
        async with trio.open_nursery() as starting:
            starting.start_soon(nursery.start, laptop.actor.run)
            starting.start_soon(nursery.start, desktop.actor.run)
        found = await laptop.find(desktop.device_id)
        assert found.addrs == ("ws://127.0.0.1:15002",)
        # Nothing about the identity is announced on the LAN.
        assert found.identity is None and found.noise_key is None
        back = await desktop.find(laptop.device_id)
        assert back.addrs == ("ws://127.0.0.1:15001",)
        nursery.cancel_scope.cancel()
