"""Backup and restore with the real actors in-process: a DuckDB store on disk, the vault, the
service; the archive format checked against damage, truncation and another identity's key."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from actors import store as st
from actors.node import RunningNode, open_node, restore_archive
from actors.runtime import call, expect
from dmgn import api, backup
from dmgn.embedding import HashingEmbedder
from dmgn.errors import BackupRefused, InvalidInput

SEED = bytes(range(32))
OTHER_SEED = bytes(range(100, 132))
MEMORIES = 500


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` by content: what "nothing changed" means."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def fill(node: RunningNode, count: int) -> tuple[list[str], list[str]]:
    """``count`` memories (some linked), a fifth of them deleted. Returns (live, deleted)."""
    ids: list[str] = [""] * count
    limit = trio.CapacityLimiter(16)

    async def add(i: int) -> None:
        async with limit:
            kind = ("text", "conversation", "observation", "document")[i % 4]
            response = await node.request(
                api.AddMemory(content=f"memory {i} about {i % 7}", type=kind)
            )
            ids[i] = response["id"]

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(add, i)
    for i in range(1, count, 3):
        await node.request(
            api.LinkMemories(
                from_id=ids[i], to_id=ids[i - 1], edge_type="follows", weight=0.5 + i / count
            )
        )
    deleted = ids[::5]
    for memory_id in deleted:
        await node.request(api.DeleteMemory(id=memory_id))
    return [i for i in ids if i not in set(deleted)], deleted


async def contents(store_dir: Path) -> dict[str, Any]:
    """Every memory row, link and tombstone of a data dir's store."""
    async with open_node(SEED, os.urandom(16), store_dir, embedder=HashingEmbedder()) as node:
        inventory = await expect(await call(node.store, st.Inventory))
        found = await expect(await call(node.store, st.Get, tuple(inventory.memories)))
        snapshot = await expect(await call(node.store, st.SnapshotOpen))
        tombstones: list[st.TombstoneRow] = []
        while not (
            page := await expect(await call(node.store, st.SnapshotRead, snapshot.snapshot, 1000))
        ).done:
            tombstones.extend(page.tombstones)
        await expect(await call(node.store, st.SnapshotClose, snapshot.snapshot))
        return {
            "memories": {k: (v.created_at, v.type, v.device, v.envelope) for k, v in found.items()},
            "links": sorted(inventory.links, key=lambda k: (k.from_id, k.to_id, k.edge_type)),
            "tombstones": sorted(tombstones, key=lambda t: t.id),
        }


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return tmp_path / "a"


async def make_backup(root: Path, archive: Path, count: int = MEMORIES) -> dict[str, Any]:
    await trio.Path(root).mkdir(exist_ok=True)
    async with open_node(SEED, os.urandom(16), root, embedder=HashingEmbedder()) as node:
        await fill(node, count)
        return await node.request(api.Backup(path=str(archive)))


async def test_restore_into_a_fresh_data_dir_gives_identical_memories_links_and_tombstones(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "node.dmgnbak"
    manifest = await make_backup(tmp_path / "a", archive)
    counts = manifest["counts"]
    assert (counts["memories"], counts["tombstones"]) == (400, 100) and counts["links"] > 50
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    fresh = tmp_path / "b"
    fresh.mkdir()
    result = await restore_archive(SEED, os.urandom(16), fresh, archive, merge=False)
    assert (result["memories"], result["links"], result["tombstones"]) == tuple(counts.values())
    assert await contents(fresh) == await contents(tmp_path / "a")
    assert not (fresh / "restore.tmp").exists()
    # The restored node serves them: search finds a memory, a deleted one stays deleted.
    async with open_node(SEED, os.urandom(16), fresh, embedder=HashingEmbedder()) as node:
        hits = await node.request(api.QueryMemories(text="memory 3 about 3", limit=5))
        assert hits["count"] > 0


async def test_backup_while_writes_go_on_is_one_consistent_snapshot(tmp_path: Path) -> None:
    archive = tmp_path / "snap.dmgnbak"
    (tmp_path / "a").mkdir()
    async with open_node(SEED, os.urandom(16), tmp_path / "a", embedder=HashingEmbedder()) as node:
        await fill(node, 200)
        before = await expect(await call(node.store, st.Stats))
        added_during: list[str] = []
        started = 0
        writing = trio.Event()

        async def keep_adding(cancel: trio.CancelScope) -> None:
            nonlocal started
            with cancel:
                for i in range(10_000):
                    started += 1  # an add may commit before its answer reaches this task
                    added_during.append(
                        (await node.request(api.AddMemory(content=f"during {i}")))["id"]
                    )
                    writing.set()

        cancel = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_adding, cancel)
            await writing.wait()
            manifest = await node.request(api.Backup(path=str(archive)))
            during_backup = started
            cancel.cancel()
    counts = manifest["counts"]
    # Exactly the store as of the snapshot: what was there before, plus what committed before
    # the snapshot opened (at most the adds begun by the end of the backup), nothing torn.
    assert before.memories < counts["memories"] <= before.memories + during_backup
    assert counts["links"] == before.links and counts["tombstones"] == before.tombstones
    assert backup.verify(archive, await_key(), identity())["counts"] == counts


def await_key() -> bytes:
    from dmgn.identity import derived_key

    return derived_key(SEED, backup.KEY_PURPOSE)


def identity() -> str:
    from dmgn.identity import identity_id

    return identity_id(SEED)


@pytest.fixture
async def archive_and_target(tmp_path: Path) -> tuple[Path, Path]:
    archive = tmp_path / "good.dmgnbak"
    await make_backup(tmp_path / "a", archive, 60)
    target = tmp_path / "target"
    target.mkdir()
    async with open_node(SEED, os.urandom(16), target, embedder=HashingEmbedder()) as node:
        await node.request(api.AddMemory(content="already here"))
    return archive, target


def damaged(archive: Path, how: str) -> Path:
    data = bytearray(archive.read_bytes())
    out = archive.with_name(f"{how}.dmgnbak")
    if how == "flipped":
        data[len(data) // 2] ^= 0x01
    elif how == "truncated":
        data = data[: len(data) - 100]
    elif how == "chunk-dropped":
        data = data[: len(data) - 50]  # ends mid-chunk
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("how", ["flipped", "truncated", "chunk-dropped"])
async def test_damaged_archive_is_refused_and_nothing_changes(
    archive_and_target: tuple[Path, Path], how: str
) -> None:
    archive, target = archive_and_target
    bad = damaged(archive, how)
    before = tree_hash(target)
    with pytest.raises(BackupRefused, match=r"damaged|truncated") as refused:
        await restore_archive(SEED, os.urandom(16), target, bad, merge=False)
    assert "\n" not in str(refused.value)
    assert tree_hash(target) == before


async def test_archive_of_another_identity_is_refused_and_nothing_changes(
    archive_and_target: tuple[Path, Path],
) -> None:
    archive, target = archive_and_target
    before = tree_hash(target)
    with pytest.raises(BackupRefused, match="backup of identity"):
        await restore_archive(OTHER_SEED, os.urandom(16), target, archive, merge=True)
    assert tree_hash(target) == before


async def test_an_edited_header_fails_authentication(archive_and_target: tuple[Path, Path]) -> None:
    archive, _ = archive_and_target
    data = archive.read_bytes()
    edited = archive.with_name("edited.dmgnbak")
    at = data.index(b'"created_at":') + len(b'"created_at":')
    edited.write_bytes(data[:at] + (b"2" if data[at : at + 1] != b"2" else b"3") + data[at + 1 :])
    with pytest.raises(BackupRefused, match="fails authentication"):
        backup.verify(edited, await_key(), identity())


async def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(BackupRefused, match="not a dmgn backup"):
        backup.verify(junk, await_key(), identity())


async def test_merge_keeps_local_memories_and_archive_deletions_win(
    archive_and_target: tuple[Path, Path],
) -> None:
    archive, target = archive_and_target
    result = await restore_archive(SEED, os.urandom(16), target, archive, merge=True)
    restored = await contents(target)
    # 60 backed up, 12 of them deleted; plus the one the target already had.
    assert len(restored["memories"]) == 48 + 1
    assert len(restored["tombstones"]) == 12
    assert result["mode"] == "merge"


async def test_replace_drops_what_the_archive_does_not_hold(
    archive_and_target: tuple[Path, Path],
) -> None:
    archive, target = archive_and_target
    await restore_archive(SEED, os.urandom(16), target, archive, merge=False)
    assert len((await contents(target))["memories"]) == 48


async def test_backup_refuses_an_existing_file_and_a_relative_path(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    (tmp_path / "a").mkdir()
    async with open_node(SEED, os.urandom(16), tmp_path / "a", embedder=HashingEmbedder()) as node:
        with pytest.raises(InvalidInput, match="exists"):
            await node.request(api.Backup(path=str(taken)))
    with pytest.raises(InvalidInput, match="absolute"):
        api.Backup(path="relative.bak")
    assert taken.read_text() == "keep me"
