"""`dmgn peers` is honest (issue 20): one row per peer with every address it is known by (the
bootstrap address that turned out to be a device is that device's row), "in sync" only when the
version vectors match, failing addresses shown."""

from __future__ import annotations

import time

from actors import discovery as dc
from actors import gossip as gs
from actors._node_status import discovery_section, peers_rows
from actors.peering import ConnectedPeer, DialTarget, PeeringStatus
from dmgn.app.render import _lag

A, B = bytes([1]) * 16, bytes([2]) * 16
IDENTITY = "ab" * 32


def _gossip(ours: dict[bytes, int], theirs: dict[bytes, int]) -> gs.GossipStatus:
    peer = gs.PeerStatus(
        B.hex(), IDENTITY, True, True, time.time(), time.time(), theirs,
        sum(ours.values()) - sum(theirs.values()), 0, 0, 0, 0, 0, None,
    )  # fmt: skip
    return gs.GossipStatus(A.hex(), ours, 3, (peer,), None)


def _peering() -> PeeringStatus:
    connected = ConnectedPeer(
        B.hex(), B.hex(), IDENTITY, True, "ws://10.0.0.2:4001", "outbound", time.time(), 1.0
    )
    bootstrap = DialTarget(
        "ws://10.0.0.2:4001", "bootstrap", B.hex(), True, 0, None, ("ws://10.0.0.2:4001",)
    )
    mdns = DialTarget(
        "ws://10.0.0.2:4001",
        "mdns",
        B.hex(),
        True,
        0,
        None,
        ("ws://10.0.0.2:4001", "ws://[fd00::2]:4001"),
        (("ws://[fd00::2]:4001", "3 failed dials: unreachable"),),
    )
    return PeeringStatus((connected,), (bootstrap, mdns), {})


def test_one_row_per_peer_with_every_address_and_failing_ones() -> None:
    found = (
        dc.FoundPeer("ws://10.0.0.2:4001", ("ws://10.0.0.2:4001",), ("bootstrap",), 0.0, None),
        dc.FoundPeer(B.hex(), ("ws://10.0.0.2:4001",), ("mdns",), 0.0, None),
    )
    rows = peers_rows(_peering(), _gossip({A: 2, B: 1}, {A: 2, B: 1}), found)
    assert len(rows) == 1, rows
    (row,) = rows
    assert row["device_id"] == B.hex() and row["kind"] == "device"
    assert row["addrs"] == ["ws://10.0.0.2:4001", "ws://[fd00::2]:4001"]
    assert set(row["sources"]) == {"bootstrap", "mdns"}
    assert row["failing"] == {"ws://[fd00::2]:4001": "3 failed dials: unreachable"}
    assert row["in_sync"] is True


def test_in_sync_only_when_the_vectors_match() -> None:
    rows = peers_rows(_peering(), _gossip({A: 3, B: 1}, {A: 2, B: 1}), ())
    assert rows[0]["in_sync"] is False
    assert _lag(rows[0]["behind_us"], rows[0]["ahead_of_us"], rows[0]["in_sync"]) == "lacks 1"
    # Counts of zero with vectors that differ (the peer has a device we never heard of).
    rows = peers_rows(_peering(), _gossip({A: 2}, {A: 2, B: 4}), ())
    assert rows[0]["in_sync"] is False
    assert _lag(0, 0, False) == "not confirmed"


def test_the_discovery_section_says_what_discovery_does() -> None:
    status = dc.DiscoveryStatus(
        A.hex(), ("ws://10.0.0.1:4001",), True, 4001, 2, ("ws://10.0.0.2:4001",), (), None,
        "lookup: timed out", mdns_interfaces=("all",), dht_bootstrap="1 of 1 answered",
        dht_bind="0.0.0.0",
    )  # fmt: skip
    section = discovery_section(status)
    assert section["mdns"] == ["all"] and section["dht_port"] == 4001
    assert section["dht_neighbors"] == 2 and section["dht_bootstrap"] == "1 of 1 answered"
    assert section["last_error"] == "lookup: timed out"
    assert section["announced_addrs"] == ["ws://10.0.0.1:4001"]
    assert discovery_section(None) == {"enabled": False, "last_error": None}
