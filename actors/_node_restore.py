"""Restoring a `dmgn backup` archive into a data dir: verified whole first, loaded into a
staged store, renamed over the old one in one step. (``dmgn restore --from-network`` goes
online instead: :func:`actors.node.restore_from_network`.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from actors import store as st
from actors import vault as vt
from actors.runtime import ActorSpec, Address, Supervisor, call, expect, reuse
from dmgn import backup
from dmgn.errors import DmgnError

__all__ = ["RESTORE_WORK_DIR", "restore_archive"]


#: Where a restore builds the new store before it replaces the old one (same file system, so
#: the final rename is atomic).
RESTORE_WORK_DIR = "restore.tmp"


async def restore_archive(
    seed: bytes,
    device_id: bytes,
    data_dir: Path,
    source: Path,
    *,
    merge: bool,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Restore a `dmgn backup` archive into ``data_dir`` (no daemon may run; the caller holds
    the data dir).

    1. verify the whole archive (identity, every tag, counts, checksums, envelope hashes) -
       any problem raises :class:`~dmgn.errors.BackupRefused` and nothing was written;
    2. build the new store in ``restore.tmp/``: empty (replace) or a copy of the current
       store (``merge``: union, deletes win), and load the archive into it;
    3. rename it over ``memories.duckdb`` - one atomic step, so the data dir holds either the
       old store or the new one, never half of each.

    The search index is a cache: the next start re-indexes what changed. ``progress`` gets
    ``(phase, bytes read)`` with phase ``verify`` then ``load``.
    """
    store_path = data_dir / "memories.duckdb"
    work = data_dir / RESTORE_WORK_DIR
    vault = vt.VaultActor(seed, device_id)
    async with Supervisor() as supervisor:
        await supervisor.start(ActorSpec("vault", reuse(vault), vault.mailbox))
        key = await expect(await call(vault.mailbox.address, vt.DeriveKey, backup.KEY_PURPOSE))
        identity = await expect(await call(vault.mailbox.address, vt.Whoami))

    def phase(name: str) -> Callable[[int], None] | None:
        return None if progress is None else partial(progress, name)

    verified = await trio.to_thread.run_sync(
        partial(backup.verify, source, key, identity.identity_id, progress=phase("verify"))
    )
    await trio.to_thread.run_sync(partial(shutil.rmtree, work, ignore_errors=True))
    work.mkdir(mode=0o700)
    try:
        staged = work / "memories.duckdb"
        if store_path.exists():
            # Opening and closing the store checkpoints it: a write-ahead log left by a crash is
            # folded into the file, so the file alone is the store (to copy, or to replace).
            await _with_store(store_path, None)
            if store_path.with_name(store_path.name + ".wal").exists():
                raise DmgnError(
                    f"{store_path} still has a write-ahead log after a checkpoint; "
                    "nothing restored (start and stop the node once, then retry)"
                )
            if merge:
                await trio.to_thread.run_sync(shutil.copyfile, store_path, staged)
        loaded = await _with_store(
            staged, partial(_load_archive, source, key, identity.identity_id, phase("load"))
        )
        assert loaded is not None
        if not merge and (loaded.memories, loaded.links, loaded.tombstones) != (
            verified["counts"]["memories"],
            verified["counts"]["links"],
            verified["counts"]["tombstones"],
        ):
            raise DmgnError(
                f"the restored store holds {loaded.memories} memories, {loaded.links} links and "
                f"{loaded.tombstones} tombstones, not what {source} lists; nothing restored"
            )
        os.replace(staged, store_path)
        _fsync_directory(data_dir)
    finally:
        await trio.to_thread.run_sync(partial(shutil.rmtree, work, ignore_errors=True))
    return {
        "file": str(source),
        "mode": "merge" if merge else "replace",
        "archive": verified,
        "memories": loaded.memories,
        "links": loaded.links,
        "tombstones": loaded.tombstones,
    }


async def _with_store(
    path: Path,
    work: Callable[[Address[st.StoreMsg]], Awaitable[None]] | None,
) -> st.StoreStats | None:
    """Run ``work`` against a store actor on ``path``, then stop it (closing = checkpoint)."""
    store = st.StoreActor(path)
    async with Supervisor() as supervisor:
        await supervisor.start(ActorSpec("store", reuse(store), store.mailbox))
        if work is None:
            return None
        await work(store.mailbox.address)
        return await expect(await call(store.mailbox.address, st.Stats))
    return None  # not reached: the supervisor re-raises what stopped the block


async def _load_archive(
    source: Path,
    key: bytes,
    identity_id: str,
    progress: Callable[[int], None] | None,
    store: Address[st.StoreMsg],
) -> None:
    """Load every chunk of a (verified) archive, one store transaction per chunk. Reading
    checks the archive again, so a file changed since the verify pass fails here, before the
    staged store replaces anything."""
    rows = backup.iter_archive(source, key, identity_id, progress=progress)
    while True:
        chunk = await trio.to_thread.run_sync(next, rows, None)
        if chunk is None:
            return
        kind, items = chunk
        memories: tuple[st.StoredEnvelope, ...] = ()
        links: tuple[st.Link, ...] = ()
        tombstones: tuple[st.TombstoneRow, ...] = ()
        if kind == "memories":
            memories = tuple(st.StoredEnvelope(*r) for r in items)
        elif kind == "links":
            links = tuple(st.Link(*r) for r in items)
        else:
            tombstones = tuple(st.TombstoneRow(*r) for r in items)
        await expect(await call(store, st.Load, memories, links, tombstones, timeout=600))


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
