"""The query router across devices of one identity, in one process: real actors (vault, DuckDB
store, indexer, service, gossip, router, transport with real Noise) over ``wire.MemoryNetwork``.

Three devices: ``a`` and ``b`` keep every memory, ``c`` keeps ``recent:1``. A memory written
three days ago (``a``'s clock set back) syncs to ``c``'s feed log but not into its store or
index, and a query on ``c`` still finds it through the router.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from actors import router as qr
from actors.node import Networking, RunningNode
from actors.peering import PeeringState
from actors.runtime import call, expect
from dmgn import api
from dmgn.errors import NotFound
from tests._deadlines import scaled
from tests._harness import eventually, online_node
from wire import ConnectionHandler, MemoryNetwork, MessageStream, Network

SEED = bytes(range(32))
STRANGER = bytes(range(1, 33))
DEADLINE = 20.0
DAY_NS = 86_400 * 1_000_000_000
#: A full-replica device syncing every 5 s, asked with a 10 s query timeout unless a test says.
device = partial(online_node, sync_interval=5.0, replica="full", query_timeout=10.0)
OLD_TEXT = "the lighthouse keeper wrote about albatross migrations"


def clock(offset_days: float) -> Callable[[], int]:
    return lambda: time.time_ns() + int(offset_days * DAY_NS)


async def router_state(node: RunningNode) -> qr.RouterStatus:
    assert node.router is not None
    return await expect(await call(node.router, qr.RouterState))


async def knows_full_devices(node: RunningNode, count: int) -> bool:
    state = await router_state(node)
    return sum(1 for _, replica, up in state.devices if up and replica == "full") == count


async def synced(node: RunningNode, entries: int, online: Networking) -> bool:
    return (await online.gossip_status()).entries >= entries


async def received_types(online: Networking) -> dict[str, int]:
    state = await expect(await call(online.peering, PeeringState))
    return dict(state.received)


async def test_recent_replica_finds_an_old_memory_through_a_full_device() -> None:
    network = MemoryNetwork()
    async with (
        device(network, "a", wall_clock=clock(-3)) as (a, _),
        device(network, "b", peers=("mem://a",)) as (b, _),
        device(network, "c", peers=("mem://a", "mem://b"), replica="recent:1") as (c, online_c),
    ):
        old = (await a.request(api.AddMemory(content=OLD_TEXT)))["id"]
        new = (await b.request(api.AddMemory(content="fresh notes about albatross chicks")))["id"]
        await eventually(lambda: synced(c, 2, online_c))
        await eventually(lambda: knows_full_devices(c, 2))

        # c logged both feed entries but stores only the memory inside its window.
        with pytest.raises(NotFound):
            await c.request(api.GetMemory(id=old))
        assert (await c.request(api.GetMemory(id=new)))["id"] == new

        answer = await c.request(api.QueryMemories(text="albatross", limit=5))
        assert {r["id"] for r in answer["results"]} == {old, new}
        assert answer["partial"] is False
        rows = {d["device_id"]: d for d in answer["devices"]}
        assert rows["local"]["replica"] == "recent:1"
        assert rows["local"]["results"] == 1
        assert rows[a.device_id.hex()]["answered"] and rows[b.device_id.hex()]["answered"]
        # Merged by score and deduplicated: each id once, best first.
        scores = [r["score"] for r in answer["results"]]
        assert scores == sorted(scores, reverse=True) and len(answer["results"]) == 2

        # A full device answers alone: nothing it lacks.
        full = await a.request(api.QueryMemories(text="albatross"))
        assert [d["device_id"] for d in full["devices"]] == ["local"]
        assert full["partial"] is False

        # A query limited to c's own window is not routed.
        window = await c.request(
            api.QueryMemories(text="albatross", after=time.time_ns() - DAY_NS // 2)
        )
        assert [r["id"] for r in window["results"]] == [new]
        assert [d["device_id"] for d in window["devices"]] == ["local"]


async def test_a_stopped_device_makes_the_answer_partial_not_late() -> None:
    network = MemoryNetwork()
    timeout = 8.0
    async with (
        device(network, "a", wall_clock=clock(-3)) as (a, _),
        device(network, "c", peers=("mem://a",), replica="recent:1", query_timeout=timeout) as (
            c,
            online_c,
        ),
    ):
        old = (await a.request(api.AddMemory(content=OLD_TEXT)))["id"]
        async with device(network, "b", peers=("mem://a", "mem://c")) as (b, _):
            await eventually(lambda: synced(c, 1, online_c))
            await eventually(lambda: knows_full_devices(c, 2))
        # b stopped (clean close): c knows it is offline and does not wait for it.
        await eventually(lambda: knows_full_devices(c, 1))
        started = trio.current_time()
        answer = await c.request(api.QueryMemories(text="albatross"))
        elapsed = trio.current_time() - started
        assert elapsed < timeout / 2
        assert [r["id"] for r in answer["results"]] == [old]
        assert answer["partial"] is True
        rows = {d["device_id"]: d for d in answer["devices"]}
        assert rows[a.device_id.hex()]["answered"] is True
        assert rows[b.device_id.hex()] == {
            "device_id": b.device_id.hex(),
            "replica": "full",
            "asked": False,
            "answered": False,
            "results": 0,
            "ms": None,
            "error": "offline",
        }
        assert "offline" in answer["partial_reason"]


class FreezableNetwork:
    """A ``Network`` whose incoming frames can be held back: a device that hangs (a laptop
    lid closed mid-query) without closing its connections."""

    def __init__(self, inner: Network) -> None:
        self.inner = inner
        self.thawed = trio.Event()
        self.thawed.set()

    def freeze(self) -> None:
        self.thawed = trio.Event()

    async def listen(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def held(stream: MessageStream) -> None:
            await handler(_Held(stream, self))

        await self.inner.listen(address, held, task_status=task_status)

    def dial(self, address: str) -> AbstractAsyncContextManager[MessageStream]:
        return self._dial(address)

    @asynccontextmanager
    async def _dial(self, address: str) -> AsyncIterator[MessageStream]:
        async with self.inner.dial(address) as stream:
            yield _Held(stream, self)


class _Held:
    def __init__(self, inner: MessageStream, network: FreezableNetwork) -> None:
        self._inner = inner
        self._network = network

    @property
    def remote_address(self) -> str:
        return self._inner.remote_address

    async def send_message(self, data: bytes) -> None:
        await self._inner.send_message(data)

    async def send_messages(self, data: list[bytes]) -> None:
        await self._inner.send_messages(data)

    async def receive_message(self) -> bytes:
        data = await self._inner.receive_message()
        await self._network.thawed.wait()
        return data

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self._inner.aclose(code, reason)


async def test_a_hung_device_costs_at_most_the_query_timeout() -> None:
    network = MemoryNetwork()
    hanging = FreezableNetwork(network)
    timeout = 1.5
    async with (
        device(network, "a", wall_clock=clock(-3)) as (a, _),
        device(hanging, "b", peers=("mem://a",)) as (b, _),
        device(
            network, "c", peers=("mem://a", "mem://b"), replica="recent:1", query_timeout=timeout
        ) as (c, online_c),
    ):
        old = (await a.request(api.AddMemory(content=OLD_TEXT)))["id"]
        await eventually(lambda: synced(c, 1, online_c))
        await eventually(lambda: knows_full_devices(c, 2))
        hanging.freeze()
        started = trio.current_time()
        answer = await c.request(api.QueryMemories(text="albatross"))
        elapsed = trio.current_time() - started
        hanging.thawed.set()
        assert timeout <= elapsed < timeout + scaled(5.0)  # generous: the machine is shared
        assert [r["id"] for r in answer["results"]] == [old]
        assert answer["partial"] is True
        rows = {d["device_id"]: d for d in answer["devices"]}
        assert rows[a.device_id.hex()]["answered"] is True
        assert rows[b.device_id.hex()]["asked"] is True
        assert rows[b.device_id.hex()]["answered"] is False
        assert "no answer within" in rows[b.device_id.hex()]["error"]


async def test_a_storage_peer_never_receives_a_query() -> None:
    network = MemoryNetwork()
    async with (
        device(network, "a", wall_clock=clock(-3)) as (a, online_a),
        device(network, "s", seed=STRANGER, peers=("mem://a",)) as (_, online_s),
        device(network, "c", peers=("mem://a", "mem://s"), replica="recent:1") as (c, online_c),
    ):
        await a.request(api.AddMemory(content=OLD_TEXT))
        await eventually(lambda: synced(c, 1, online_c))
        await eventually(lambda: knows_full_devices(c, 1))

        async def stranger_connected_to_both() -> bool:
            state = await expect(await call(online_s.peering, PeeringState))
            return len(state.connected) == 2

        await eventually(stranger_connected_to_both)
        for _ in range(3):
            answer = await c.request(api.QueryMemories(text="albatross"))
            assert answer["count"] == 1
        # The device got the queries; the storage peer got no query message of any kind.
        assert (await received_types(online_a)).get("query.request") == 3
        stranger = await received_types(online_s)
        assert not [kind for kind in stranger if kind.startswith("query.")], stranger
        assert not [kind for kind in stranger if kind.startswith("gossip.")], stranger
        assert (await router_state(c)).devices == ((a.device_id.hex(), "full", True),)


async def test_a_recent_replica_drops_memories_that_left_its_window(tmp_path: Path) -> None:
    network = MemoryNetwork()
    device_id = os.urandom(16)
    async with device(network, "c", replica="recent:1", data_dir=tmp_path, device_id=device_id) as (
        c,
        _,
    ):
        kept = (await c.request(api.AddMemory(content="written on the small device")))["id"]
        assert (await c.request(api.QueryMemories(text="small device")))["count"] == 1
    # Two days later the same device starts again: the memory left the window.
    async with device(
        network,
        "c",
        replica="recent:1",
        data_dir=tmp_path,
        device_id=device_id,
        wall_clock=clock(2),
    ) as (c, online):
        with pytest.raises(NotFound):
            await c.request(api.GetMemory(id=kept))
        assert (await c.request(api.Status()))["memories"] == 0
        answer = await c.request(api.QueryMemories(text="small device"))
        assert answer["count"] == 0 and answer["partial"] is True
        # Dropped from the store, not deleted: no tombstone, the feed still has it.
        assert (await c.request(api.Status()))["tombstones"] == 0
        assert (await online.gossip_status()).entries == 1
