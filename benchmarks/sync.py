"""Benchmark device sync: two nodes of one identity over real WebSocket + Noise on loopback.

    .venv/bin/python benchmarks/sync.py [--quick]

Writes benchmarks/out/sync.json and .md (--out benchmarks/results to replace the committed
results). Bounded to a few minutes.

Setup: two complete nodes in this one process (`open_node` + `start_networking`, exactly what
`dmgn-node` runs: vault, DuckDB store and feed log in temporary data dirs with their fsyncs,
indexer with the lexical embedder, gossip, transport), connected over `WebSocketNetwork` on
127.0.0.1. Discovery is off (B has A as its only peer). One process means both nodes share one
core's worth of Python: real daemons on two machines would each have their own.

What is measured:
- live replication: A's service takes N adds from 32 concurrent writers while B is connected;
  ops/s = N / (time from the first add until B's store holds all N);
- catch-up after a partition: 10,000 memories written on A while B is away (B's node not
  running), then B starts and dials A; time until B's store holds all of them (and the rate);
- bytes on the wire per memory: what A's and B's transports wrote to WebSocket during the
  catch-up (Noise ciphertext, framing, gossip vectors and wants, keepalives), divided by the
  memories replicated; and the envelope size for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors import store as st  # noqa: E402 - needs the repo root on sys.path as a script
from actors import vault as vt  # noqa: E402
from actors.node import (  # noqa: E402  # noqa: E402
    Networking,
    NetworkSettings,
    RunningNode,
    expect,
    open_node,
    start_networking,
)
from actors.runtime import call  # noqa: E402
from dmgn import api  # noqa: E402
from dmgn.embedding import HashingEmbedder  # noqa: E402
from dmgn.memory import Memory  # noqa: E402
from wire.websocket import WebSocketNetwork  # noqa: E402

#: Where runs go unless --out says otherwise (gitignored): a run never overwrites tracked files.
OUT = ROOT / "benchmarks" / "out"
SEED = os.urandom(32)
CONTENT = "memory {i}: the quick brown fox observes the lazy dog near the river bank " * 3


@asynccontextmanager
async def online(
    data_dir: Path, device_id: bytes, bootstrap: tuple[str, ...] = (), port: int = 0
) -> AsyncIterator[tuple[RunningNode, Networking]]:
    async with open_node(SEED, device_id, data_dir, embedder=HashingEmbedder()) as node:
        settings = NetworkSettings(
            listen_addr=f"ws://127.0.0.1:{port}",
            bootstrap=bootstrap,
            discovery=False,
            redial_interval=0.5,
        )
        net = await start_networking(node, WebSocketNetwork(), settings, data_dir)
        yield node, net
        await net.close()


async def memories(node: RunningNode) -> int:
    return (await expect(await call(node.store, st.Stats))).memories


async def wait_for_count(node: RunningNode, count: int, deadline: float) -> float:
    start = time.monotonic()
    with trio.fail_after(deadline):
        while True:  # polling: the count lives in another actor
            if await memories(node) >= count:
                break
            await trio.sleep(0.05)
    return time.monotonic() - start


async def write_offline(data_dir: Path, device_id: bytes, count: int) -> int:
    """Seal ``count`` memories and store them in batches (as an offline import would); they are
    published to the feed when the node next goes online. Returns the mean envelope size."""
    total = 0
    async with open_node(SEED, device_id, data_dir, embedder=HashingEmbedder()) as node:
        base = time.time_ns()
        for start in range(0, count, 500):
            batch = []
            for i in range(start, min(count, start + 500)):
                memory = Memory(CONTENT.format(i=i), "text", base + i, {}, None)
                memory_id, envelope = await expect(await call(node.vault, vt.Seal, memory))
                total += len(envelope)
                batch.append(
                    st.StoredEnvelope(memory_id, memory.created_at, "text", device_id, envelope)
                )
            await expect(await call(node.store, st.Put, tuple(batch), (), timeout=120))
    return total // count


async def live_replication(root: Path, count: int) -> dict[str, Any]:
    a_dir, b_dir = root / "live-a", root / "live-b"
    a_dir.mkdir()
    b_dir.mkdir()
    async with (
        online(a_dir, os.urandom(16)) as (a, a_net),
        online(b_dir, os.urandom(16), bootstrap=a_net.listen_addrs) as (b, _),
    ):
        with trio.fail_after(20):
            while True:
                if (await b.request(api.Status()))["peers"] >= 1:
                    break
                await trio.sleep(0.05)
        limiter = trio.CapacityLimiter(32)

        async def add(i: int) -> None:
            async with limiter:
                await a.request(api.AddMemory(content=CONTENT.format(i=i)))

        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(add, i)
        written = time.monotonic() - start
        await wait_for_count(b, count, 120)
        elapsed = time.monotonic() - start
    return {
        "memories": count,
        "writers": 32,
        "local_add_rate": round(count / written, 1),
        "replicated_ops_per_s": round(count / elapsed, 1),
        "seconds": round(elapsed, 2),
    }


async def local_baseline(root: Path, count: int) -> float:
    """Adds/s of one node with no networking at all (same writers), for context."""
    data_dir = root / "alone"
    data_dir.mkdir()
    async with open_node(SEED, os.urandom(16), data_dir, embedder=HashingEmbedder()) as node:
        limiter = trio.CapacityLimiter(32)

        async def add(i: int) -> None:
            async with limiter:
                await node.request(api.AddMemory(content=CONTENT.format(i=i)))

        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(add, i)
        return round(count / (time.monotonic() - start), 1)


async def catch_up(root: Path, count: int) -> dict[str, Any]:
    a_dir, b_dir = root / "part-a", root / "part-b"
    a_dir.mkdir()
    b_dir.mkdir()
    a_device, b_device = os.urandom(16), os.urandom(16)
    envelope_bytes = await write_offline(a_dir, a_device, count)
    publish_start = time.monotonic()
    async with online(a_dir, a_device) as (_, a_net):
        published = time.monotonic() - publish_start
        before_out = a_net.counters.bytes_out + a_net.counters.bytes_in
        start = time.monotonic()
        async with online(b_dir, b_device, bootstrap=a_net.listen_addrs) as (b, b_net):
            seconds = await wait_for_count(b, count, 240)
            elapsed = time.monotonic() - start
            wire_bytes = b_net.counters.bytes_out + b_net.counters.bytes_in
            a_wire = a_net.counters.bytes_out + a_net.counters.bytes_in - before_out
            gossip = await b_net.gossip_status()
    return {
        "memories": count,
        "publish_at_start_s": round(published, 2),
        "converge_s": round(elapsed, 2),
        "converge_after_connect_s": round(seconds, 2),
        "ops_per_s": round(count / elapsed, 1),
        "envelope_bytes": envelope_bytes,
        "wire_bytes_total": wire_bytes,
        "wire_bytes_seen_by_a": a_wire,
        "wire_bytes_per_memory": round(wire_bytes / count, 1),
        "gossip_payload_bytes_per_memory": round(sum(p.bytes_in for p in gossip.peers) / count, 1),
    }


def markdown(results: dict[str, Any]) -> str:
    live, part = results["live"], results["catch_up"]
    return "\n".join(
        [
            "# Sync benchmark",
            "",
            f"`{results['command']}` on {results['machine']}, Python {results['python']}, "
            f"{results['when']}. Two nodes in one process over WebSocket + Noise on loopback "
            "(DuckDB, feed log fsyncs, lexical embedder; discovery off).",
            "",
            "| what | result |",
            "|---|---|",
            f"| live replication, {live['memories']} adds from {live['writers']} concurrent "
            f"writers on A | **{live['replicated_ops_per_s']} ops/s** replicated to B "
            f"(A took adds at {live['local_add_rate']}/s; a node with no networking at "
            f"{live['no_network_add_rate']}/s) |",
            f"| catch-up after a partition, {part['memories']} memories | converged in "
            f"**{part['converge_s']} s** from B's start ({part['ops_per_s']} ops/s) |",
            f"| bytes on the wire per memory (catch-up, both directions, WebSocket payloads) | "
            f"**{part['wire_bytes_per_memory']}** for a {part['envelope_bytes']}-byte envelope "
            f"(gossip entry payload {part['gossip_payload_bytes_per_memory']}) |",
            f"| A publishing {part['memories']} pre-existing memories to its feed at start | "
            f"{part['publish_at_start_s']} s |",
            "",
        ]
    )


async def main(quick: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-bench-sync-"))
    try:
        live = await live_replication(root, 300 if quick else 2000)
        live["no_network_add_rate"] = await local_baseline(root, 300)
        part = await catch_up(root, 1000 if quick else 10_000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "command": "benchmarks/sync.py" + (" --quick" if quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "live": live,
        "catch_up": part,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (seconds)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for sync.json and .md")
    args = parser.parse_args()
    results = trio.run(main, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (args.out / f"sync{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"sync{suffix}.md").write_text(markdown(results))
    print(markdown(results))
