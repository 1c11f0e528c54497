"""Benchmark backup/restore: 10,000 memories, the daemon running, real processes.

    .venv/bin/python benchmarks/backup.py [--memories N]

Writes benchmarks/results/backup.json and benchmarks/results/backup.md.

Steps (what the issue's must-show asks, at full size):
1. `dmgn init` a data dir A; fill its store in-process with N memories through the service
   (32 concurrent writers), a link for every second memory, and a tenth deleted;
2. `dmgn start`; `dmgn backup -o FILE` through the daemon while a writer keeps adding
   memories over the control socket; `dmgn stop`;
3. `dmgn export` the identity, `dmgn import` it into a fresh data dir B, `dmgn restore -i FILE`;
4. compare A's store as of the backup with B's: every memory (envelope bytes), link and
   tombstone; then a flipped byte, a truncated archive and another identity's archive are
   each restored into B and must be refused with B's files unchanged (SHA-256 of every file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors import store as st  # noqa: E402 - needs the repo root on sys.path as a script
from actors.node import open_node  # noqa: E402
from actors.runtime import call, expect  # noqa: E402
from dmgn import api  # noqa: E402
from dmgn.app.unlock import unlock  # noqa: E402
from dmgn.embedding import HashingEmbedder  # noqa: E402
from dmgn.paths import DataDir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PASSPHRASE = "benchmark-passphrase"


def dmgn(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DMGN_DATA_DIR": str(root), "DMGN_PASSPHRASE": PASSPHRASE}
    env["DMGN_EMBEDDER"] = "hashing"
    done = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    if ok and done.returncode != 0:
        raise SystemExit(f"dmgn {' '.join(args)} failed: {done.stderr}")
    return done


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "node.lock"
    }


async def populate(root: Path, count: int) -> None:
    seed, device = unlock(DataDir(root), PASSPHRASE)
    async with open_node(seed, device, root, embedder=HashingEmbedder()) as node:
        limit = trio.CapacityLimiter(32)
        ids: list[str] = []

        async def add(i: int) -> None:
            async with limit:
                kind = ("text", "conversation", "observation", "document")[i % 4]
                request = api.AddMemory(
                    content=f"benchmark memory {i}: " + "words " * 40, type=kind
                )
                ids.append((await node.request(request))["id"])

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(add, i)
        for a, b in zip(ids[::2], ids[1::2], strict=False):
            await node.request(api.LinkMemories(from_id=a, to_id=b))
        for memory_id in ids[::10]:
            await node.request(api.DeleteMemory(id=memory_id))


async def store_rows(root: Path) -> dict[str, Any]:
    seed, device = unlock(DataDir(root), PASSPHRASE)
    async with open_node(seed, device, root, embedder=HashingEmbedder()) as node:
        inventory = await expect(await call(node.store, st.Inventory, timeout=120))
        memories: dict[str, bytes] = {}
        ids = sorted(inventory.memories)
        for start in range(0, len(ids), 512):
            found = await expect(await call(node.store, st.Get, tuple(ids[start : start + 512])))
            memories.update({k: v.envelope for k, v in found.items()})
        return {
            "memories": memories,
            "links": sorted(inventory.links, key=lambda k: (k.from_id, k.to_id, k.edge_type)),
            "tombstones": sorted(inventory.tombstones),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memories", type=int, default=10_000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dmgn-bb-"))
    a, b, c = base / "a", base / "b", base / "c"
    figures: dict[str, Any] = {"memories_written": args.memories}
    try:
        dmgn(a, "init")
        config = a / "config.json"
        document = json.loads(config.read_text())
        document.update(listen_addr="ws://127.0.0.1:0", mdns=False)
        config.write_text(json.dumps(document))
        started = time.monotonic()
        trio.run(populate, a, args.memories)
        figures["populate_s"] = round(time.monotonic() - started, 1)
        expected = trio.run(store_rows, a)
        started = time.monotonic()
        # The first start publishes the 10k offline adds into the sync feed before it answers.
        dmgn(a, "start", "--timeout", "900")
        figures["first_start_s"] = round(time.monotonic() - started, 1)
        archive = base / "a.dmgnbak"
        stop = threading.Event()
        during: list[int] = []

        during_ids: list[str] = []

        def keep_adding() -> None:
            while not stop.is_set():
                done = dmgn(a, "add", f"during the backup {len(during)}", "--json", ok=False)
                during.append(done.returncode)
                if done.returncode == 0:
                    during_ids.append(json.loads(done.stdout)["id"])

        writer = threading.Thread(target=keep_adding)
        writer.start()
        started = time.monotonic()
        made = json.loads(dmgn(a, "backup", "-o", str(archive), "--json").stdout)
        figures["backup_s"] = round(time.monotonic() - started, 2)
        stop.set()
        writer.join()
        figures["adds_during_backup_ok"] = sum(1 for r in during if r == 0)
        dmgn(a, "stop")
        figures["archive_bytes"] = archive.stat().st_size
        figures["counts"] = made["counts"]
        identity = base / "identity.export"
        dmgn(a, "export", "-o", str(identity))
        dmgn(b, "import", "-i", str(identity), "--json")
        started = time.monotonic()
        restored = json.loads(dmgn(b, "restore", "-i", str(archive), "--json").stdout)
        figures["restore_s"] = round(time.monotonic() - started, 2)
        got = trio.run(store_rows, b)
        # The archive is the snapshot: what A held before the writer started, plus those of
        # the writer's adds that committed before the snapshot opened (and nothing torn).
        extra = set(got["memories"]) - set(expected["memories"])
        figures["adds_in_snapshot"] = len(extra)
        figures["identical"] = {
            "memories": {k: got["memories"][k] for k in expected["memories"]}
            == expected["memories"]
            and extra <= set(during_ids)
            and len(got["memories"]) == made["counts"]["memories"],
            "links": got["links"] == expected["links"],
            "tombstones": got["tombstones"] == expected["tombstones"],
        }
        figures["restored"] = {k: restored[k] for k in ("memories", "links", "tombstones")}
        data = archive.read_bytes()
        flipped = base / "flipped"
        flipped.write_bytes(data[:5000] + bytes([data[5000] ^ 1]) + data[5001:])
        truncated = base / "truncated"
        truncated.write_bytes(data[: len(data) - 1])
        dmgn(c, "init")
        foreign = base / "foreign.dmgnbak"
        dmgn(c, "backup", "-o", str(foreign))
        before = tree_hash(b)
        refusals = {}
        for name, bad in (("flipped", flipped), ("truncated", truncated), ("foreign", foreign)):
            done = dmgn(b, "restore", "-i", str(bad), ok=False)
            refusals[name] = {
                "exit": done.returncode,
                "message": done.stderr.strip(),
                "unchanged": tree_hash(b) == before,
            }
        figures["refusals"] = refusals
    finally:
        for root in (a, b, c):
            if (root / "dmgn-node.pid").exists():
                dmgn(root, "stop", "--force", ok=False)
        shutil.rmtree(base, ignore_errors=True)
    figures["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.python_version()}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backup.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        "# Backup and restore (benchmarks/backup.py)",
        "",
        f"{args.memories} memories written; archive taken through the running daemon while a",
        "writer kept adding over the control socket; restored into a fresh data dir after",
        "`dmgn import`.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| store at backup (memories / links / tombstones) | {figures['counts']['memories']} / "
        f"{figures['counts']['links']} / {figures['counts']['tombstones']} |",
        f"| backup through the daemon | {figures['backup_s']} s, "
        f"{figures['archive_bytes'] / 1e6:.1f} MB |",
        f"| adds served during the backup | {figures['adds_during_backup_ok']} "
        f"({figures['adds_in_snapshot']} committed before the snapshot, so in the archive) |",
        f"| restore (verify + load + swap) | {figures['restore_s']} s |",
        f"| identical after restore | {figures['identical']} |",
    ]
    for name, refusal in figures["refusals"].items():
        lines.append(
            f"| {name} archive | exit {refusal['exit']}, unchanged: {refusal['unchanged']}: "
            f"`{refusal['message']}` |"
        )
    lines += ["", f"Machine: {figures['machine']}; populate took {figures['populate_s']} s.", ""]
    (RESULTS / "backup.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
