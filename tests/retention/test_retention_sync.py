"""Retention on a synced pair of in-process nodes (real actors over wire.MemoryNetwork): the
dry run lists what expired and deletes nothing; the real run deletes it as tombstones that sync,
so the memories disappear on both devices; types without a period, or "forever", stay."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from actors.node import RunningNode
from dmgn import api
from dmgn.config import Config
from tests._harness import eventually, online_node
from wire import MemoryNetwork

SEED = bytes(range(32))
POLICY = {"conversation": "1s", "document": "forever"}


@asynccontextmanager
async def synced_pair(
    retention_interval: float | None = None,
) -> AsyncIterator[tuple[RunningNode, RunningNode]]:
    network = MemoryNetwork()
    config = Config(retention=POLICY)  # type: ignore[arg-type]  # pydantic validates the dict
    async with (
        online_node(network, "a", config=config, retention_interval=retention_interval) as (a, _),
        online_node(network, "b", peers=("mem://a",)) as (b, _),
    ):
        yield a, b


async def ids(node: RunningNode) -> set[str]:
    response = await node.request(api.QueryMemories(recent=True, limit=1000))
    return {r["id"] for r in response["results"]}


async def fill(a: RunningNode) -> tuple[set[str], set[str]]:
    """Returns (will expire, stays)."""
    expiring, staying = set(), set()
    for i in range(5):
        expiring.add(
            (await a.request(api.AddMemory(content=f"chat {i}", type="conversation")))["id"]
        )
    for kind in ("document", "text", "observation"):
        staying.add((await a.request(api.AddMemory(content=f"a {kind}", type=kind)))["id"])
    return expiring, staying


async def past_the_period(last_created_ns: int) -> None:
    """Let the 1 s period pass for memories created up to ``last_created_ns`` (time passing is
    what is tested here, not settling)."""
    await trio.sleep(max(0.0, (last_created_ns + 1_200_000_000 - time.time_ns()) / 1e9))


async def test_dry_run_then_real_run_removes_expired_memories_on_both_devices() -> None:
    async with synced_pair() as (a, b):
        expiring, staying = await fill(a)
        filled = time.time_ns()
        everything = expiring | staying

        async def b_has_all() -> bool:
            return await ids(b) == everything

        await eventually(b_has_all)
        await past_the_period(filled)

        dry = await a.request(api.Retention(dry_run=True))
        assert dry["expired"] == {"conversation": 5} and dry["deleted"] == 0
        assert {e["id"] for e in dry["examples"]} == expiring
        assert dry["policy"] == {"conversation": "1s"}
        assert await ids(a) == everything == await ids(b)

        real = await a.request(api.Retention(dry_run=False))
        assert real["deleted"] == 5
        assert await ids(a) == staying

        async def b_lost_them() -> bool:
            return await ids(b) == staying

        await eventually(b_lost_them)
        status_b = await b.request(api.Status())
        assert status_b["tombstones"] == 5
        status_a = await a.request(api.Status())
        assert status_a["metrics"]["dmgn_memories_deleted_total"] == {"retention": 5.0}
        assert (await a.request(api.Retention(dry_run=True)))["expired"] == {"conversation": 0}


async def test_the_service_applies_retention_periodically() -> None:
    async with synced_pair(retention_interval=0.2) as (a, b):
        _, staying = await fill(a)
        await past_the_period(time.time_ns())

        async def both_lost_them() -> bool:
            return await ids(a) == staying == await ids(b)

        await eventually(both_lost_them)
