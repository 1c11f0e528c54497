"""Shards and mailbox over real WebSocket + Noise: disperse, lose nodes, restore elsewhere."""

from __future__ import annotations

from tests.storage._cluster import cluster, eventually


async def test_small_restore_from_network_after_wiping_devices() -> None:
    async with cluster() as nodes:
        for i in range(7):
            await nodes.start(f"s{i}", f"stranger{i % 3}")
        owner = await nodes.start("owner", "owner")
        ids = [await owner.add(f"memory number {i} about pelicans") for i in range(20)]

        async def placed() -> bool:
            d = await owner.durability()
            return d.memories == 20 and d.durable == 20 and d.unplaced == 0

        await eventually(placed)

        async def mailed() -> bool:
            held = [(await m.storage()).mail_items for m in nodes.members[:7]]
            return sum(held) >= 4 * 20

        await eventually(mailed)
        await owner.stop()
        fresh = await nodes.start("fresh", "owner")
        assert await fresh.online.wait_for_storage_peers(7, 30) == 7
        report = await fresh.online.restore()
        assert report.unrecoverable == ()
        assert await fresh.ids() == frozenset(ids)
