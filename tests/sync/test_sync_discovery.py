"""Two in-process nodes of one identity, over real WebSocket + Noise on loopback, that are told
nothing about each other: Zeroconf (and nothing else) makes them converge."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from actors.node import Networking, NetworkSettings, RunningNode, open_node, start_networking
from dmgn import api
from dmgn.embedding import HashingEmbedder
from wire.websocket import WebSocketNetwork

sys.path.insert(0, str(Path(__file__).parent))
from test_sync_in_process import add, eventually, ids

sys.path.insert(0, str(Path(__file__).parents[1] / "discovery"))
from test_discovery_mdns import _multicast_loopback_works

SEED = os.urandom(32)


@asynccontextmanager
async def lan_node(
    *, mdns: bool, dht_port: int | None = None, bootstrap: tuple[str, ...] = ()
) -> AsyncIterator[tuple[RunningNode, Networking]]:
    async with open_node(SEED, os.urandom(16), None, embedder=HashingEmbedder()) as node:
        settings = NetworkSettings(
            listen_addr="ws://127.0.0.1:0",
            bootstrap=bootstrap,
            mdns=mdns,
            mdns_interfaces=["127.0.0.1"],
            dht_port=dht_port,
            sync_interval=5.0,
            redial_interval=0.5,
        )
        online = await start_networking(node, WebSocketNetwork(), settings, None)
        yield node, online
        await online.close()


async def test_two_nodes_find_each_other_with_zeroconf_alone_and_converge() -> None:
    reason = await trio.to_thread.run_sync(_multicast_loopback_works)
    if reason is not None:
        pytest.skip(reason)
    async with lan_node(mdns=True) as (a, _), lan_node(mdns=True) as (b, _):
        m1, m2 = await add(a, "found on the LAN"), await add(b, "no configuration needed")

        async def same() -> bool:
            return await ids(a) == {m1, m2} == await ids(b)

        await eventually(same)
        peers = (await a.request(api.Peers()))["peers"]
        # Other dmgn nodes on this machine may announce themselves too: look only at ours.
        rows = {p["device_id"]: (p["kind"], p["state"], p["sources"]) for p in peers}
        assert rows[b.device_id.hex()] == ("device", "connected", ["mdns"])
        assert [p for p in peers if p["kind"] == "device"] == [
            p for p in peers if p["device_id"] == b.device_id.hex()
        ]
