"""In-process nodes over real WebSocket + Noise on 127.0.0.1 (port 0) for storage tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from actors import shard_keeper as sk
from actors import storage as sg
from actors import store as st
from actors import transport as tp
from actors.node import Networking, NetworkSettings, RunningNode, open_node, start_networking
from actors.runtime import call, expect
from dmgn import api
from dmgn.embedding import HashingEmbedder
from dmgn.shards import ShardParams
from tests._harness import eventually as _eventually
from wire.websocket import WebSocketNetwork

DEADLINE = 60.0


def seed_of(name: str) -> bytes:
    return hashlib.sha256(b"storage test identity " + name.encode()).digest()


@dataclass
class Member:
    name: str
    node: RunningNode
    online: Networking
    stop_requested: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    stopped: bool = False

    @property
    def address(self) -> str:
        return self.online.listen_addrs[0]

    async def stop(self) -> None:
        """Stop this node (its connections close cleanly) and wait until it is gone."""
        if not self.stopped:
            self.stopped = True
            with trio.CancelScope(shield=True):
                await self.online.close("test stops this node", timeout=2.0)
                self.stop_requested.set()
                await self.done.wait()

    async def ids(self) -> frozenset[str]:
        return await expect(await call(self.node.store, st.Ids))

    async def durability(self) -> sk.Durability:
        return await self.online.durability()

    async def storage(self) -> sg.StorageStatus:
        return await expect(await call(self.online.storage, sg.StorageState))

    async def add(self, text: str, **fields: Any) -> str:
        return str((await self.node.request(api.AddMemory(content=text, **fields)))["id"])


def default_keeper() -> sk.KeeperSettings:
    return sk.KeeperSettings(
        params=ShardParams(3, 6),
        repair_interval=0.5,
        down_grace=0.5,
        audit_interval=3600.0,
        sync_interval=2.0,
        request_timeout=10.0,
    )


@dataclass
class Cluster:
    """Nodes each in their own task (a node's nurseries must close in the task that opened
    them, and nodes stop in any order)."""

    nursery: trio.Nursery
    members: list[Member] = field(default_factory=list)
    keeper: sk.KeeperSettings = field(default_factory=default_keeper)
    storage_limits: sg.StorageLimits | None = None

    async def start(
        self,
        name: str,
        identity: str,
        *,
        data_dir: Path | None = None,
        device_id: bytes | None = None,
        bootstrap: tuple[str, ...] | None = None,
        storage_limits: sg.StorageLimits | None = None,
        keeper: sk.KeeperSettings | None = None,
        listen_addr: str = "ws://127.0.0.1:0",
    ) -> Member:
        peers = (
            bootstrap
            if bootstrap is not None
            else tuple(m.address for m in self.members if not m.stopped)
        )
        settings = NetworkSettings(
            listen_addr=listen_addr,
            bootstrap=peers,
            discovery=False,
            sync_interval=(keeper or self.keeper).sync_interval,
            redial_interval=0.5,
            keeper=keeper or self.keeper,
            storage_limits=storage_limits or self.storage_limits,
            # Every node is on 127.0.0.1: the per-address caps for strangers would refuse them.
            transport_limits=tp.TransportLimits(
                max_strangers_per_ip=64,
                max_pending_handshakes_per_ip=64,
                stranger_idle_timeout=3600.0,
            ),
        )
        device = device_id or os.urandom(16)
        if data_dir is not None:
            await trio.Path(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)

        async def run(*, task_status: trio.TaskStatus[Member] = trio.TASK_STATUS_IGNORED) -> None:
            async with open_node(
                seed_of(identity), device, data_dir, embedder=HashingEmbedder()
            ) as node:
                online = await start_networking(node, WebSocketNetwork(), settings, data_dir)
                member = Member(name, node, online)
                task_status.started(member)
                try:
                    await member.stop_requested.wait()
                finally:
                    member.stopped = True
            member.done.set()

        member: Member = await self.nursery.start(run)
        self.members.append(member)
        return member

    async def close(self) -> None:
        for member in reversed(self.members):
            await member.stop()


@asynccontextmanager
async def cluster(**options: Any) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        nodes = Cluster(nursery, **options)
        try:
            yield nodes
        finally:
            await nodes.close()


async def eventually(check: Callable[[], Awaitable[bool]], deadline: float = DEADLINE) -> None:
    """`tests._harness.eventually` with the cluster's longer default deadline (real WebSocket
    nodes placing and repairing shards)."""
    await _eventually(check, deadline)
