"""A full disk: the store says "disk full" and loses nothing, the indexer survives its snapshot,
and the gossip actor answers "disk full" to a publish it could not log instead of crashing.

A real full disk: a child process in its own mount namespace (``unshare -rm``) mounts a 3 MiB
tmpfs, puts a data dir on it and fills it. Skipped where unprivileged namespaces are off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import hashlib, json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import trio
from actors import indexer as ix
from actors import store as st
from actors.runtime import Err, call
from dmgn.embedding import HashingEmbedder

data = Path(sys.argv[1])
filler = data / "filler"


def envelope():
    body = os.urandom(20_000)
    digest = hashlib.sha256(body).hexdigest()
    return st.StoredEnvelope(digest, time.time_ns(), "text", b"d" * 16, body)


async def fill_store(out):
    filler.write_bytes(b"x" * 512 * 1024)  # freed later, to show the store recovers
    actor = st.StoreActor(data / "memories.duckdb")
    acked = []
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        for _ in range(400):
            item = envelope()
            result = await call(actor.mailbox.address, st.Put, (item,), ())
            if isinstance(result, Err):
                out["store_errors"].append([result.code, result.reason])
                if len(out["store_errors"]) == 3:
                    break
            else:
                acked.append(item.id)
        filler.unlink()
        item = envelope()
        result = await call(actor.mailbox.address, st.Put, (item,), ())
        out["put_after_freeing"] = "ok" if not isinstance(result, Err) else result.code
        acked.append(item.id)
        nursery.cancel_scope.cancel()
    # Reopen: every acknowledged add is there.
    actor = st.StoreActor(data / "memories.duckdb")
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        found = await call(actor.mailbox.address, st.Get, tuple(acked))
        out["acked"] = len(acked)
        out["readable_after_reopen"] = len(found.value)
        nursery.cancel_scope.cancel()


async def fill_snapshot(out):
    (data / "memories.duckdb").unlink()
    (data / "memories.duckdb.wal").unlink(missing_ok=True)
    actor = ix.IndexerActor(HashingEmbedder(), data, os.urandom(32))
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        items = tuple(
            ix.IndexItem(f"{i:064x}", os.urandom(3000).hex(), "text", i) for i in range(64)
        )
        await call(actor.mailbox.address, ix.Index, items)
        with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
            for size in (65536, 1):
                try:
                    while True:
                        f.write(b"x" * size)
                except OSError:
                    pass
        saved = await call(actor.mailbox.address, ix.Persist)
        out["persist_full"] = [saved.code, saved.reason] if isinstance(saved, Err) else "ok"
        stats = await call(actor.mailbox.address, ix.Stats)
        out["indexer_answers_after"] = not isinstance(stats, Err) and stats.value.count == 64
        out["temporaries_left"] = sorted(p.name for p in data.glob(".index.snapshot.tmp-*"))
        filler.unlink()
        saved = await call(actor.mailbox.address, ix.Persist)
        out["persist_after_freeing"] = "ok" if not isinstance(saved, Err) else saved.reason
        nursery.cancel_scope.cancel()


def fill_disk():
    with open(filler, "wb", buffering=0) as f:  # to the last byte
        for size in (65536, 1):
            try:
                while True:
                    f.write(b"x" * size)
            except OSError:
                pass


async def fill_feed(out):
    from actors import gossip as gs
    from actors.runtime import Mailbox
    from actors.vault import Seal, Sign, VaultActor
    from dmgn import feed
    from dmgn.memory import Memory
    from nacl.signing import SigningKey

    seed, device = os.urandom(32), os.urandom(16)
    vault = VaultActor(seed, device)
    path = data / "feeds.log"

    async def sign(context, payload):
        return await call(vault.mailbox.address, Sign, context, payload)

    gossip = gs.GossipActor(
        identity=bytes(SigningKey(seed).verify_key),
        device_id=device,
        sign=sign,
        apply=Mailbox("apply", 1).address,
        log=gs.FeedLog(path),
    )

    async def publish(n):
        memory = Memory(f"memory {n} " + "x" * 8192, "text", n + 1)  # a page or more each
        sealed = await call(vault.mailbox.address, Seal, memory)
        return await call(gossip.mailbox.address, gs.Publish, feed.AddMemory(sealed.value[1]))

    acked, failures = [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(vault.run)
        await nursery.start(gossip.run)
        for n in range(3):
            acked.append((await publish(n)).value.seq)
        fill_disk()
        for n in range(3, 6):
            result = await publish(n)
            failures.append([result.code, result.reason] if isinstance(result, Err) else "ok")
        heads = await call(gossip.mailbox.address, gs.Heads)
        out["feed_answers_when_full"] = not isinstance(heads, Err)
        filler.unlink()
        result = await publish(6)
        out["publish_after_freeing"] = "ok" if not isinstance(result, Err) else result.reason
        if not isinstance(result, Err):
            acked.append(result.value.seq)
        nursery.cancel_scope.cancel()
    out["feed_errors"] = failures
    out["feed_acked_seqs"] = acked
    out["feed_seqs_after_reopen"] = [entry.seq for entry, _ in gs.FeedLog(path).load()]


async def main():
    out = {"store_errors": []}
    await fill_store(out)
    await fill_snapshot(out)
    await fill_feed(out)
    print(json.dumps(out))


trio.run(main)
"""


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


pytestmark = pytest.mark.skipif(
    not _namespaces_work(), reason="needs unshare -rm (user + mount namespaces) to mount a tmpfs"
)


@pytest.fixture
def mount_point() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="dmgn-full-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def run_on_a_full_disk(mount_point: Path) -> dict[str, Any]:
    script = mount_point.parent / f"{mount_point.name}.py"
    script.write_text(CHILD)
    try:
        done = subprocess.run(
            [
                "unshare",
                "-rm",
                "sh",
                "-c",
                'mount -t tmpfs -o size=3m tmpfs "$0" && exec "$1" "$2" "$0" "$3"',
                str(mount_point),
                sys.executable,
                str(script),
                str(ROOT),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "DMGN_EMBEDDER": "hashing"},
        )
    finally:
        script.unlink()
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_full_disk_is_reported_as_disk_full_and_loses_nothing(mount_point: Path) -> None:
    out = run_on_a_full_disk(mount_point)
    codes = {code for code, _ in out["store_errors"]}
    assert codes == {"disk_full"}, out["store_errors"]
    reason = out["store_errors"][0][1]
    assert "is full" in reason and "free some space" in reason
    assert "rollback" not in reason.lower()
    assert out["put_after_freeing"] == "ok"
    assert out["acked"] > 10 and out["readable_after_reopen"] == out["acked"]
    # The indexer: an error reply, no crash, no half-written file, and a save once there is room.
    code, reason = out["persist_full"]
    assert code == "disk_full" and "disk is full" in reason
    assert out["indexer_answers_after"] is True
    assert out["temporaries_left"] == []
    assert out["persist_after_freeing"] == "ok"
    # Gossip: each publish it could not log is an Err saying so, the actor keeps answering,
    # and exactly the acknowledged entries are in the log, in order, with no gap at the seq the
    # failed publishes tried (the next publish takes it).
    assert [code for code, _ in out["feed_errors"]] == ["disk_full"] * 3, out["feed_errors"]
    assert "is full" in out["feed_errors"][0][1] and "free some space" in out["feed_errors"][0][1]
    assert out["feed_answers_when_full"] is True
    assert out["publish_after_freeing"] == "ok"
    assert out["feed_acked_seqs"] == [1, 2, 3, 4]
    assert out["feed_seqs_after_reopen"] == [1, 2, 3, 4]
