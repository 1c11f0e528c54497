"""Our own addresses come from the interfaces (issue 20): every non-loopback address of the
listener's family, loopback only when there is nothing else; an address that is ourselves is
never dialed; an address that keeps failing backs off and shows as failing."""

from __future__ import annotations

import ipaddress
import os

import trio

from actors import discovery as dc
from actors import peering as pr
from actors import transport as tp
from actors._addresses import local_addresses, reachable_addresses
from actors.runtime import Ok, call
from tests._peering import peering_under_test

IP = ipaddress.ip_address
LAN = [
    ("lo", IP("127.0.0.1")),
    ("lo", IP("::1")),
    ("eth0", IP("10.1.0.2")),
    ("eth0", IP("fd00::2")),
    ("wlan0", IP("192.168.7.9")),
]


def test_a_wildcard_listener_announces_every_non_loopback_address_of_its_family() -> None:
    assert reachable_addresses("ws://0.0.0.0:4001", LAN) == (
        "ws://10.1.0.2:4001",
        "ws://192.168.7.9:4001",
    )
    assert reachable_addresses("ws://[::]:4001", LAN) == ("ws://[fd00::2]:4001",)


def test_loopback_only_when_there_is_nothing_else_and_a_concrete_host_is_itself() -> None:
    only_lo = [("lo", IP("127.0.0.1")), ("lo", IP("::1"))]
    assert reachable_addresses("ws://0.0.0.0:4001", only_lo) == ("ws://127.0.0.1:4001",)
    assert reachable_addresses("ws://127.0.0.1:4001", LAN) == ("ws://127.0.0.1:4001",)
    assert reachable_addresses("ws://10.1.0.2:9", LAN) == ("ws://10.1.0.2:9",)


def test_the_real_interfaces_give_no_loopback_when_a_lan_address_exists() -> None:
    found = reachable_addresses("ws://0.0.0.0:4001")
    assert found  # something is always announced
    hosts = [IP(a.split("//")[1].rsplit(":", 1)[0]) for a in found]
    assert all(h.is_loopback for h in hosts) or not any(h.is_loopback for h in hosts)


def test_local_addresses_include_loopback_for_recognising_ourselves() -> None:
    own = local_addresses("ws://0.0.0.0:4001", LAN)
    assert {"ws://127.0.0.1:4001", "ws://10.1.0.2:4001", "ws://[::1]:4001"} <= own
    assert "ws://10.1.0.2:4002" not in own


async def test_our_own_addresses_are_never_dialed_and_failing_ones_back_off() -> None:
    peer = os.urandom(16)
    peering, transport, found_send, events_send, _gossip = peering_under_test(
        os.urandom(32), redial_interval=0.4
    )
    dialed: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        told = await call(
            peering.mailbox.address, pr.OwnAddresses, frozenset({"ws://127.0.0.1:4001"})
        )
        assert isinstance(told, Ok)
        # A peer that (wrongly) announces loopback next to its LAN address.
        await found_send.send(
            dc.PeerFound(("ws://127.0.0.1:4001", "ws://10.9.9.9:4001"), "mdns", peer)
        )
        with trio.move_on_after(2.0):  # several redial rounds (backoff <= 0.4 s)
            async for message in transport.receive:
                assert isinstance(message, tp.Dial)
                dialed.append(message.address)
                message.reply.err("connection refused", "unreachable")
        state = await call(peering.mailbox.address, pr.PeeringState)
        nursery.cancel_scope.cancel()
    events_send.close()
    assert "ws://127.0.0.1:4001" not in dialed
    assert dialed.count("ws://10.9.9.9:4001") >= 2
    assert len(dialed) <= 8  # backed off, not hammered (2 s / 0.4 s cap, jittered)
    assert isinstance(state, Ok)
    (target,) = state.value.targets
    assert target.addrs == ("ws://127.0.0.1:4001", "ws://10.9.9.9:4001")
    failing = dict(target.failing)
    assert "connection refused" in failing["ws://10.9.9.9:4001"]
    assert "ws://127.0.0.1:4001" not in failing
