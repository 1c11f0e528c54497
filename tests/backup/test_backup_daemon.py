"""`dmgn backup` through a running `dmgn-node`, `dmgn restore` into a fresh data dir after
`dmgn import`: real processes, real files. The 10k-memory run of the same is
``benchmarks/backup.py`` (figures in benchmarks/results/backup.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import store as st
from actors.node import open_node
from actors.runtime import call, expect
from dmgn import api
from dmgn.app.daemon import pid_alive
from dmgn.app.unlock import unlock
from dmgn.embedding import HashingEmbedder
from dmgn.paths import DataDir
from tests._deadlines import scaled

pytestmark = pytest.mark.slow

PASSPHRASE = "backup-test-passphrase"
MEMORIES = 300


def dmgn(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DMGN_DATA_DIR": str(root), "DMGN_PASSPHRASE": PASSPHRASE}
    env["DMGN_EMBEDDER"] = "hashing"
    env.pop("DMGN_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(120),
        stdin=subprocess.DEVNULL,
    )
    if ok:
        assert done.returncode == 0, done.stderr
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
        limit = trio.CapacityLimiter(16)
        ids: list[str] = []

        async def add(i: int) -> None:
            async with limit:
                ids.append((await node.request(api.AddMemory(content=f"note {i}")))["id"])

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
        inventory = await expect(await call(node.store, st.Inventory))
        found = await expect(await call(node.store, st.Get, tuple(inventory.memories)))
        return {
            "memories": {k: v.envelope for k, v in found.items()},
            "links": sorted(inventory.links, key=lambda k: (k.from_id, k.to_id, k.edge_type)),
            "tombstones": sorted(inventory.tombstones),
        }


@pytest.fixture
def roots() -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="dmgn-"))  # short: socket paths are limited
    try:
        yield base / "a", base / "b"
    finally:
        for root in (base / "a", base / "b"):
            pid_file = root / "dmgn-node.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text())
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def configure(root: Path) -> None:
    config = root / "config.json"
    document = json.loads(config.read_text())
    document.update(listen_addr="ws://127.0.0.1:0", mdns=False)
    config.write_text(json.dumps(document))


def test_backup_through_the_daemon_restores_identically_in_a_fresh_data_dir(
    roots: tuple[Path, Path],
) -> None:
    a, b = roots
    dmgn(a, "init")
    configure(a)
    trio.run(populate, a, MEMORIES)
    expected = trio.run(store_rows, a)
    dmgn(a, "start")
    archive = a.parent / "a.dmgnbak"
    made = json.loads(dmgn(a, "backup", "-o", str(archive), "--json").stdout)
    # The daemon still serves while and after it backs up; a restore waits for it to stop.
    dmgn(a, "add", "after the backup")
    refused = dmgn(a, "restore", "-i", str(archive), ok=False)
    assert refused.returncode != 0 and "dmgn stop" in refused.stderr
    dmgn(a, "stop")
    assert made["counts"]["memories"] == len(expected["memories"])
    identity = a.parent / "identity.export"
    dmgn(a, "export", "-o", str(identity))

    dmgn(b, "import", "-i", str(identity), "--json")
    restored = json.loads(dmgn(b, "restore", "-i", str(archive), "--json").stdout)
    assert restored["memories"] == len(expected["memories"])
    assert trio.run(store_rows, b) == expected

    # Damaged, truncated and foreign archives: one line, exit code, nothing changed.
    data = archive.read_bytes()
    flipped = a.parent / "flipped"
    flipped.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    truncated = a.parent / "truncated"
    truncated.write_bytes(data[: len(data) // 2])
    c = a.parent / "c"
    dmgn(c, "init")
    foreign = a.parent / "foreign.dmgnbak"
    dmgn(c, "backup", "-o", str(foreign))  # offline: no daemon runs for c
    before = tree_hash(b)
    for bad, says in ((flipped, "damaged"), (truncated, "truncated"), (foreign, "identity")):
        refused = dmgn(b, "restore", "-i", str(bad), ok=False)
        assert refused.returncode == 14, refused.stderr
        assert says in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
        assert tree_hash(b) == before
