"""A storage peer that violated the protocol drops below the honest ones and gets no shards:
eight in-process nodes over real WebSocket + Noise on loopback (the storage tests' cluster)."""

from __future__ import annotations

from actors import peering as pr
from actors import vault as vt
from actors.runtime import call, expect
from tests.storage._cluster import cluster, eventually


async def test_a_protocol_violator_gets_no_shards_and_scores_below_honest_peers() -> None:
    async with cluster() as nodes:
        villain = await nodes.start("v", "villain")
        honest = [await nodes.start(f"s{i}", f"stranger{i % 3}") for i in range(6)]
        owner = await nodes.start("owner", "owner")
        assert await owner.online.wait_for_storage_peers(7, 30) == 7
        # Strangers know the villain by its storage key (issue 20), not its identity.
        shown = (await expect(await call(villain.node.vault, vt.Whoami))).storage_public_key
        state = await expect(await call(owner.online.peering, pr.PeeringState))
        (villain_id,) = [c.peer_id for c in state.connected if c.peer_id[:16] == shown.hex()[:16]]
        await expect(
            await call(owner.online.peering, pr.CutOff, villain_id, "test: malformed message")
        )

        async def villain_back() -> bool:
            state = await expect(await call(owner.online.peering, pr.PeeringState))
            return any(c.peer_id == villain_id for c in state.connected)

        await eventually(villain_back)  # a bootstrap peer is redialed whatever its score
        ids = [await owner.add(f"memory {i} for the honest") for i in range(10)]

        async def placed() -> bool:
            d = await owner.durability()
            return d.memories == len(ids) and d.durable == len(ids) and d.unplaced == 0

        await eventually(placed)
        assert (await villain.storage()).objects == 0
        held = [(await m.storage()).objects for m in honest]
        assert all(objects > 0 for objects in held), held
        state = await expect(await call(owner.online.peering, pr.PeeringState))
        scores = {k: v["score"] for k, v in state.reputation.items()}
        honest_ids = [c.peer_id for c in state.connected if c.peer_id != villain_id]
        assert len(honest_ids) == 6
        assert scores[villain_id] < min(scores[k] for k in honest_ids)
