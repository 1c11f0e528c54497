"""Nodes wired by `dmgn.networking` in one process: the real actors (vault, DuckDB store,
indexer, service, gossip, transport with real Noise) over `wire.MemoryNetwork`, real clock.

These pin the wiring itself (publish on local change, ApplyOps into the store and index,
peers/status reports, bad peers, restart of gossip); the multi-process tests in this folder
show the same over WebSocket between real `dmgn-node` processes.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import trio
from nacl.signing import SigningKey

from actors import gossip as gs
from actors.node import (
    DEVICE_REGISTRY,
    RunningNode,
    open_node,
)
from dmgn import api
from dmgn.embedding import HashingEmbedder
from tests._harness import eventually
from tests._harness import online_node as _online_node
from wire import ConnectionClosed, MemoryNetwork, WireError, secure_connection
from wire.testing import TestIdentity

SEED = bytes(range(32))
STRANGER = bytes(range(1, 33))
DEADLINE = 20.0
#: Devices sync every 5 s here (the default is longer), so a missed push is caught up soon.
online_node = partial(_online_node, sync_interval=5.0)


async def ids(node: RunningNode) -> set[str]:
    response = await node.request(api.QueryMemories(recent=True, limit=1000))
    return {r["id"] for r in response["results"]}


async def add(node: RunningNode, text: str) -> str:
    return str((await node.request(api.AddMemory(content=text)))["id"])


async def test_adds_links_and_deletes_replicate_both_ways_and_are_searchable() -> None:
    network = MemoryNetwork()
    async with (
        online_node(network, "a") as (a, _),
        online_node(network, "b", peers=("mem://a",)) as (b, _),
    ):
        m1 = await add(a, "the laptop remembers pelicans")
        m2 = await add(b, "the desktop remembers herons")
        await eventually(lambda: _same(a, b, {m1, m2}))
        await b.request(api.LinkMemories(from_id=m2, to_id=m1, edge_type="related", weight=0.5))

        async def linked() -> bool:
            got = await a.request(api.GetMemory(id=m1))
            return any(link["from"] == m2 for link in got["links"])

        await eventually(linked)
        hits = await b.request(api.QueryMemories(text="pelicans"))
        assert [h["id"] for h in hits["results"]][:1] == [m1]
        await a.request(api.DeleteMemory(id=m2))
        await eventually(lambda: _same(a, b, {m1}))
        status = await b.request(api.Status())
        assert status["peers"] == 1 and status["tombstones"] == 1
        assert status["sync"]["devices"][0]["behind_us"] == 0
        peers = (await a.request(api.Peers()))["peers"]
        assert [(p["kind"], p["state"]) for p in peers] == [("device", "connected")]


async def _same(a: RunningNode, b: RunningNode, expected: set[str]) -> bool:
    return await ids(a) == expected == await ids(b)


async def test_memories_added_while_offline_are_published_at_start(tmp_path: Path) -> None:
    network = MemoryNetwork()
    device = os.urandom(16)
    async with open_node(SEED, device, tmp_path, embedder=HashingEmbedder()) as offline:
        early = await add(offline, "written before gossip existed")
    async with (
        online_node(network, "a", data_dir=tmp_path, device_id=device) as (a, online),
        online_node(network, "b", peers=("mem://a",)) as (b, _),
    ):
        assert online.published_at_start == 1
        await eventually(lambda: _same(a, b, {early}))
    async with online_node(network, "a", data_dir=tmp_path, device_id=device) as (a, online):
        assert online.published_at_start == 0


async def test_a_stranger_is_a_storage_peer_and_gets_nothing() -> None:
    network = MemoryNetwork()
    async with (
        online_node(network, "a") as (a, _),
        online_node(network, "s", seed=STRANGER, peers=("mem://a",)) as (s, _),
        online_node(network, "b", peers=("mem://a",)) as (b, _),
    ):
        first = await add(a, "private to our devices")

        async def both_seen() -> bool:
            peers = (await a.request(api.Peers()))["peers"]
            kinds = sorted((p["kind"], p["state"]) for p in peers)
            # The stranger dialed us: a client we serve, not one of our storage peers.
            return kinds == [("client", "connected"), ("device", "connected")]

        await eventually(both_seen)
        # A live push goes to every session at once: once our other device has the second
        # memory (and the first, by catch-up), the stranger would have had both if it got any.
        second = await add(a, "also private")
        await eventually(lambda: _same(a, b, {first, second}))
        assert await ids(s) == set()


async def test_gossip_restart_resumes_sessions_on_open_connections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    network = MemoryNetwork()
    async with (
        online_node(network, "a") as (a, online_a),
        online_node(network, "b", peers=("mem://a",)) as (b, _),
    ):
        first = await add(a, "before the crash")
        await eventually(lambda: _same(a, b, {first}))
        # A crash of the gossip actor: the supervisor restarts it; the open connection must be
        # handed to the new incarnation, or nothing would sync until a reconnect.
        ours = bytes(SigningKey(SEED).verify_key)
        await online_a.gossip.send(gs.PeerUp("bogus", ours, True, None))  # type: ignore[arg-type]
        await eventually(lambda: _logged(caplog, "actor gossip crashed"))
        second = await add(a, "after the crash")
        await eventually(lambda: _same(a, b, {first, second}))


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def test_a_device_sending_garbage_is_cut_off_and_honest_devices_are_not_disturbed() -> None:
    network = MemoryNetwork()
    async with (
        online_node(network, "a") as (a, _),
        online_node(network, "b", peers=("mem://a",)) as (b, _),
    ):
        # Holds our identity key (so the handshake admits it as a device), then misbehaves.
        rogue = TestIdentity(SigningKey(SEED)).new_device()
        async with network.dial("mem://a") as stream:
            connection = await secure_connection(
                stream, rogue, initiator=True, registry=DEVICE_REGISTRY
            )
            await connection.send(gs.OPS(entries=[b"\x93not a feed entry"]))
            with trio.fail_after(DEADLINE), pytest.raises((ConnectionClosed, WireError)):
                while True:
                    await connection.receive()
        rogue_id = rogue.certificate.device_id.hex()

        async def rogue_row() -> dict[str, object]:
            rows = {p["device_id"]: p for p in (await a.request(api.Peers()))["peers"]}
            row: dict[str, object] = rows[rogue_id]
            return row

        # Our side of the closed connection is reported down a moment after the rogue sees it
        # close (the transport's PeerDown reaches peering through its event channel).
        async def rogue_gone() -> bool:
            return (await rogue_row())["state"] != "connected"

        await eventually(rogue_gone)
        bad = await rogue_row()
        assert bad["state"] == "cut off" and bad["score"] < 0 and bad["cut_off_reason"]
        m = await add(b, "honest devices still sync")
        await eventually(lambda: _same(a, b, {m}))
        assert await ids(a) == {m}
