"""The two storage gauges follow the network: dmgn_shard_durability is the owner's fraction of
memories that enough live shards rebuild (0 while nothing is placed, 1 once every memory is,
lower again when holders go), and dmgn_storage_held_bytes is what a storage node holds."""

from __future__ import annotations

from typing import Any

from actors import peering as pr
from actors.runtime import call, expect
from dmgn import api
from tests.storage._cluster import Member, cluster, eventually


async def metrics(member: Member) -> dict[str, Any]:
    status = await member.node.request(api.Status())
    found: dict[str, Any] = status["metrics"]
    return found


async def test_durability_and_held_bytes_gauges_move_with_the_shards() -> None:
    async with cluster() as nodes:
        owner = await nodes.start("owner", "owner")
        for i in range(4):
            await owner.add(f"memory {i} waiting for storage peers")

        async def known() -> bool:
            return (await owner.durability()).unplaced == 4

        await eventually(known)
        waiting = await metrics(owner)
        # No storage peer yet: four memories, none durable.
        assert waiting["dmgn_shard_durability"] == 0.0
        assert waiting["dmgn_storage_held_bytes"] == 0.0

        # Storage nodes that dial the owner are not its storage peers (they would learn its
        # owner key); the owner dials them.
        storage = [await nodes.start(f"s{i}", f"stranger{i}", bootstrap=()) for i in range(6)]
        for member in storage:
            await expect(await call(owner.online.peering, pr.AddPeer, member.address))

        async def all_durable() -> bool:
            d = await owner.durability()
            return d.durable == 4 and d.unplaced == 0

        await eventually(all_durable)
        assert (await metrics(owner))["dmgn_shard_durability"] == 1.0
        for member in storage:
            # One status: its storage section and the gauge it refreshed (shards and mailbox
            # items may still be arriving, so two separate reads can differ).
            status = await member.node.request(api.Status())
            held = status["storage"]["bytes_held"]
            assert status["metrics"]["dmgn_storage_held_bytes"] == held
        assert sum([(await member.storage()).bytes_held for member in storage]) > 0

        # Four of six holders gone (k = 3 of n = 6): nothing can be rebuilt until repair,
        # and with two peers left repair cannot make anything durable again.
        for member in storage[:4]:
            await member.stop()

        async def none_durable() -> bool:
            return (await metrics(owner))["dmgn_shard_durability"] == 0.0

        await eventually(none_durable)
