"""Sim devices: a real node (vault, store, indexer, service, gossip, transport) per device.

Every device runs the production actors: the store, storage service and shard keeper on their
light in-memory tables (``light_tables``: the same rules as on DuckDB, rows in dicts), the
lexical embedder (the model would cost seconds of real time per node and adds nothing to a
sync experiment), a feed log in memory, and the real Noise handshake over the
:class:`~sims.network.SimNetwork`. Those rows and that log make up a :class:`SimDisk`: a node
started again on the same one is a process restarted from its data dir (new actors, the rows
they find are what the last ones left).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from actors import gossip as gs
from actors import store as st
from actors._keeper_tables import MemoryKeeperTables
from actors._storage_tables import MemoryStorageTables
from actors._store_tables import MemoryStoreTables
from actors.node import (
    Networking,
    NetworkSettings,
    NodeInfo,
    RunningNode,
    open_node,
    start_networking,
)
from actors.runtime import call, expect
from dmgn.embedding import HashingEmbedder
from sims.network import SimNetwork

#: Virtual wall clock origin (2026-01-01T00:00:00Z): feed entries carry wall-clock times, which
#: under MockClock must come from virtual time to keep runs deterministic.
EPOCH_NS = 1_767_225_600 * 1_000_000_000


def virtual_wall_clock() -> int:
    return EPOCH_NS + int(trio.current_time() * 1e9)


def device_id_for(name: str) -> bytes:
    return hashlib.sha256(b"sim device " + name.encode()).digest()[:16]


@dataclass
class SimDisk:
    """What a node keeps on disk in production (memories.duckdb, storage.duckdb, shards.duckdb,
    gossip/feeds.log), as the rows themselves. The vault needs none: a sim node's seed is
    given. Not kept, as a real restart would keep it: the peer reputation table
    (peers/reputation.json) and the search index, which the indexer rebuilds from the store."""

    store: MemoryStoreTables = field(default_factory=MemoryStoreTables)
    storage: MemoryStorageTables = field(default_factory=MemoryStorageTables)
    keeper: MemoryKeeperTables = field(default_factory=MemoryKeeperTables)
    feed_log: gs.FeedLog = field(default_factory=lambda: gs.FeedLog(None))


@dataclass
class SimDevice:
    name: str
    node: RunningNode
    online: Networking

    async def ids(self) -> frozenset[str]:
        return await expect(await call(self.node.store, st.Ids))


@asynccontextmanager
async def sim_device(
    sim: SimNetwork,
    name: str,
    seed: bytes,
    *,
    bootstrap: tuple[str, ...] = (),
    sync_interval: float = 10.0,
    redial_interval: float = 1.0,
    disk: SimDisk | None = None,
) -> AsyncIterator[SimDevice]:
    """Start one device of identity ``seed`` on the sim network as ``mem://<name>``, on
    ``disk`` (a new, empty one by default)."""
    disk = disk if disk is not None else SimDisk()
    info = NodeInfo(None, mode="sim")
    async with open_node(
        seed,
        device_id_for(name),
        None,
        info,
        embedder=HashingEmbedder(),
        wall_clock=virtual_wall_clock,
        light_tables=True,
        store_tables=disk.store,
    ) as node:
        settings = NetworkSettings(
            listen_addr=f"mem://{name}",
            bootstrap=bootstrap,
            discovery=False,
            sync_interval=sync_interval,
            redial_interval=redial_interval,
        )
        online = await start_networking(
            node,
            sim.node(name),
            settings,
            None,
            feed_log=disk.feed_log,
            wall_clock=virtual_wall_clock,
            light_tables=True,
            storage_tables=disk.storage,
            keeper_tables=disk.keeper,
        )
        try:
            yield SimDevice(name, node, online)
        finally:
            with trio.CancelScope(shield=True):
                await online.close("sim device stopping", timeout=1.0)
