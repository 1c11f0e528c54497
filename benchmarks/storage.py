"""Benchmark the storage network: shards and mailbox on other identities' nodes, on loopback.

    .venv/bin/python benchmarks/storage.py [--memories 10000] [--out benchmarks/results]

Setup: 8 storage nodes of 4 identities and one owner device, all complete nodes in this one
process (`open_node` + `start_networking`: vault, DuckDB store, storage service and shard
keeper with their own DuckDB files in memory, gossip, transport) over `WebSocketNetwork` on
127.0.0.1 with the Noise handshake. Shards are 3-of-6. One process means every node shares one
core's worth of Python (and DuckDB's threads share the machine's two cores), so throughputs are
lower bounds of what separate machines do.

What is measured:
- storage overhead: bytes the storage peers hold for the owner (shards + mailbox) divided by
  the bytes of the envelopes; and the shards alone (n x bucket size / envelope size);
- dispersal: time until every memory has all 6 shards placed;
- repair traffic per lost node: stop the node holding most shards, repair, shard bytes sent;
- restore: a fresh device of the identity (new data dir) pulls the mailbox and rebuilds every
  memory from shards: time and memories/s;
- audit cost: one audit round (64 shards per peer, the hourly default) - bytes on the wire and
  CPU time of the keeper's recomputation, per node per hour.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors import shard_keeper as sk  # noqa: E402 - needs the repo root on sys.path
from actors import storage as sg  # noqa: E402
from actors import store as st  # noqa: E402
from actors import transport as tp  # noqa: E402
from actors.node import (  # noqa: E402
    Networking,
    NetworkSettings,
    RunningNode,
    open_node,
    start_networking,
)
from actors.runtime import call, expect  # noqa: E402
from dmgn import api  # noqa: E402
from dmgn.embedding import HashingEmbedder  # noqa: E402
from dmgn.shards import ShardParams, shard_size  # noqa: E402
from wire.websocket import WebSocketNetwork  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
KEEPER = sk.KeeperSettings(
    params=ShardParams(3, 6),
    repair_interval=3600.0,  # repairs are run by hand here, to measure them
    down_grace=0.0,
    audit_interval=3600.0,
    sync_interval=3600.0,
    request_timeout=60.0,
)
LIMITS = tp.TransportLimits(
    max_strangers_per_ip=64, max_pending_handshakes_per_ip=64, stranger_idle_timeout=3600.0
)


class Node:
    def __init__(self, node: RunningNode, online: Networking, stop: trio.Event) -> None:
        self.node, self.online, self.stop_event = node, online, stop
        self.done = trio.Event()

    async def stop(self) -> None:
        await self.online.close("benchmark stops this node")
        self.stop_event.set()
        await self.done.wait()

    async def storage(self) -> sg.StorageStatus:
        return await expect(await call(self.online.storage, sg.StorageState))


async def start(
    nursery: trio.Nursery, identity: str, peers: tuple[str, ...], *, auto_pull: bool = True
) -> Node:
    seed = hashlib.sha256(b"storage benchmark " + identity.encode()).digest()
    settings = NetworkSettings(
        listen_addr="ws://127.0.0.1:0",
        bootstrap=peers,
        discovery=False,
        sync_interval=3600.0,
        redial_interval=0.5,
        keeper=replace(KEEPER, auto_pull=auto_pull),
        transport_limits=LIMITS,
    )

    async def run(*, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_node(seed, os.urandom(16), None, embedder=HashingEmbedder()) as node:
            online = await start_networking(node, WebSocketNetwork(), settings, None)
            handle = Node(node, online, trio.Event())
            task_status.started(handle)
            await handle.stop_event.wait()
        handle.done.set()

    node: Node = await nursery.start(run)
    return node


async def wait_until(check: Any, timeout: float) -> float:
    started = time.perf_counter()
    with trio.fail_after(timeout):
        while True:
            if await check():
                break
            await trio.sleep(0.1)  # polling other actors' state: no event to wait on
    return time.perf_counter() - started


async def measure(memories: int) -> dict[str, Any]:
    results: dict[str, Any] = {"memories": memories, "k": 3, "n": 6, "storage_nodes": 8}
    async with trio.open_nursery() as nursery:
        storage: list[Node] = []
        for i in range(8):
            storage.append(
                await start(
                    nursery, f"stranger{i % 4}", tuple(s.online.listen_addrs[0] for s in storage)
                )
            )
        addrs = tuple(s.online.listen_addrs[0] for s in storage)
        owner = await start(nursery, "owner", addrs)
        await owner.online.wait_for_storage_peers(8, 30)

        limit = trio.CapacityLimiter(32)
        started = time.perf_counter()

        async def add(i: int) -> None:
            async with limit:
                text = f"memory {i}: " + " ".join(f"word{(i * 7 + j) % 997}" for j in range(40))
                await owner.node.request(api.AddMemory(content=text, metadata={"i": str(i)}))

        async with trio.open_nursery() as adds:
            for i in range(memories):
                adds.start_soon(add, i)
        results["add_seconds"] = round(time.perf_counter() - started, 2)

        async def dispersed() -> bool:
            d = await owner.online.durability()
            return d.complete >= memories and d.unplaced == 0

        await wait_until(dispersed, 3600)
        results["dispersal_seconds_after_adds"] = round(
            time.perf_counter() - started - results["add_seconds"], 2
        )
        results["dispersal_memories_per_s"] = round(memories / (time.perf_counter() - started), 1)

        inventory = await expect(await call(owner.node.store, st.Inventory, timeout=600))
        envelope_bytes = 0
        shard_bytes = 0
        ids = sorted(inventory.memories)
        for at in range(0, len(ids), 512):
            found = await expect(await call(owner.node.store, st.Get, tuple(ids[at : at + 512])))
            for stored in found.values():
                envelope_bytes += len(stored.envelope)
                shard_bytes += 6 * shard_size(len(stored.envelope), 3)

        async def mailed() -> bool:
            d = await owner.online.durability()
            held = sum([(await s.storage()).mail_items for s in storage])
            return held >= 4 * d.mailbox_items

        await wait_until(mailed, 600)
        held = sum([(await s.storage()).bytes_held for s in storage])
        results["envelope_bytes"] = envelope_bytes
        results["mean_envelope_bytes"] = round(envelope_bytes / memories)
        results["network_bytes"] = held
        results["overhead_total"] = round(held / envelope_bytes, 3)
        results["overhead_shards_only"] = round(shard_bytes / envelope_bytes, 3)

        # Audit: one round, as the hourly schedule runs it.
        cpu = time.process_time()
        wall = time.perf_counter()
        audit = await expect(await call(owner.online.keeper, sk.AuditNow, timeout=600))
        results["audit_round"] = {
            "shards_audited": audit.audited,
            "failed": audit.failed,
            "peers": audit.peers,
            "bytes_per_peer": round((audit.bytes_sent + audit.bytes_received) / audit.peers),
            "seconds": round(time.perf_counter() - wall, 3),
            "process_cpu_seconds": round(time.process_time() - cpu, 3),
        }

        # Repair: lose the node holding most shards.
        counts = [((await s.storage()).objects, i) for i, s in enumerate(storage)]
        _, victim = max(counts)
        lost_objects = counts[victim][0]
        before = (await owner.online.durability()).repair_bytes
        await storage[victim].stop()
        survivors = [s for i, s in enumerate(storage) if i != victim]

        async def noticed() -> bool:
            return (await owner.online.durability()).storage_peers <= 7

        await wait_until(noticed, 60)
        wall = time.perf_counter()
        placed = await expect(await call(owner.online.keeper, sk.RepairNow, timeout=3600))
        after = await owner.online.durability()
        results["repair_per_lost_node"] = {
            "shards_lost": lost_objects,
            "shards_placed": placed,
            "bytes_sent": after.repair_bytes - before,
            "seconds": round(time.perf_counter() - wall, 2),
            "complete_after": after.complete,
        }

        # Restore on a fresh device from the 7 storage nodes left.
        await owner.stop()
        # No pull on connect: the restore below does all of the work, so it is what is timed.
        left = tuple(s.online.listen_addrs[0] for s in survivors)
        fresh = await start(nursery, "owner", left, auto_pull=False)
        await fresh.online.wait_for_storage_peers(7, 30)
        wall = time.perf_counter()
        report = await fresh.online.restore(timeout=3600)
        elapsed = time.perf_counter() - wall
        restored = len(await expect(await call(fresh.node.store, st.Ids)))
        results["restore"] = {
            "from_storage_nodes": 7,
            "memories_restored": restored,
            "unrecoverable": len(report.unrecoverable),
            "feed_entries": report.entries,
            "seconds": round(elapsed, 2),
            "memories_per_s": round(restored / elapsed, 1),
        }
        for node in [fresh, *survivors]:
            await node.stop()
    results["audit_per_node_per_hour"] = {
        "bytes": results["audit_round"]["bytes_per_peer"],
        "note": "one round per audit_interval (1 h), 64 shards per peer",
    }
    return results


def markdown(results: dict[str, Any]) -> str:
    r = results
    a, rp, rs = r["audit_round"], r["repair_per_lost_node"], r["restore"]
    return "\n".join(
        [
            "# Storage network benchmark",
            "",
            f"{r['memories']} memories (mean envelope {r['mean_envelope_bytes']} B), shards "
            f"{r['k']}-of-{r['n']} on {r['storage_nodes']} storage nodes of 4 identities, one "
            "process over WebSocket + Noise on 127.0.0.1 "
            f"({r['machine']['cpus']} CPUs, Python {r['machine']['python']}).",
            "",
            "| measure | value |",
            "|---|---|",
            f"| storage overhead, shards only (6 x bucket / envelope) | "
            f"{r['overhead_shards_only']} |",
            f"| storage overhead, all held (shards + mailbox) / envelope bytes | "
            f"{r['overhead_total']} |",
            f"| adds (32 writers) | {r['add_seconds']} s |",
            f"| dispersal finished after the adds | +{r['dispersal_seconds_after_adds']} s "
            f"({r['dispersal_memories_per_s']} memories/s overall) |",
            f"| repair per lost node: shards lost / placed | {rp['shards_lost']} / "
            f"{rp['shards_placed']} |",
            f"| repair per lost node: bytes sent, time | {rp['bytes_sent']} B, {rp['seconds']} s |",
            f"| restore from {rs['from_storage_nodes']} nodes: memories, time | "
            f"{rs['memories_restored']} in {rs['seconds']} s ({rs['memories_per_s']}/s), "
            f"{rs['unrecoverable']} unrecoverable |",
            f"| audit round (hourly): shards, bytes per peer, keeper time | {a['shards_audited']}, "
            f"{a['bytes_per_peer']} B, {a['seconds']} s |",
            f"| audit cost per node per hour | {r['audit_per_node_per_hour']['bytes']} B on the "
            "wire, 64 shard hashes |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    results = trio.run(measure, args.memories)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "storage.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
