"""``dmgn backup``: the service streams a consistent snapshot of the store into an archive.

A private helper of :mod:`actors.service` (it sends the vault's and the store's messages, so
it sits between the service and the leaf actors). The archive format is domain
(:mod:`dmgn.backup`); this module is the run that fills one: the key derived in the vault, the
store's snapshot read page by page (adds and syncs go on meanwhile and are simply not in this
archive), the file written off the Trio thread.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import trio

from actors import store as st
from actors import vault as vt
from actors.runtime import Address, Err, call, expect
from dmgn import api, backup

__all__ = ["write_backup"]

# The service's logger: these lines are the service's, wherever the code sits.
log = logging.getLogger("dmgn.service")


async def write_backup(
    vault: Address[vt.VaultMsg],
    store: Address[st.StoreMsg],
    device_id: bytes,
    path: str,
    page_size: int,
) -> api.Response:
    """Write the encrypted archive at ``path``; answer with its manifest (counts, identity).

    A failure removes the partial file (``ArchiveWriter.abort``); the snapshot is closed in
    every case, shielded, so a cancelled backup does not pin the store's snapshot."""
    key = await expect(await call(vault, vt.DeriveKey, backup.KEY_PURPOSE))
    identity = await expect(await call(vault, vt.Whoami))
    snapshot = await expect(await call(store, st.SnapshotOpen))
    writer: backup.ArchiveWriter | None = None
    try:
        writer = await trio.to_thread.run_sync(
            backup.ArchiveWriter,
            Path(path),
            key,
            identity.identity_id,
            device_id.hex(),
            time.time_ns(),
        )
        while True:
            page = await expect(await call(store, st.SnapshotRead, snapshot.snapshot, page_size))
            if page.done:
                break
            await trio.to_thread.run_sync(writer.add, *_archive_rows(page))
        manifest = await trio.to_thread.run_sync(writer.finish)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        with trio.CancelScope(shield=True):
            closed = await call(store, st.SnapshotClose, snapshot.snapshot)
            if isinstance(closed, Err):
                log.warning("backup snapshot not closed: %s", closed.reason)
    log.info("backup written to %s: %s", path, manifest["counts"])
    return {"file": path, "identity_id": identity.identity_id, **manifest}


def _archive_rows(page: st.SnapshotPage) -> tuple[str, list[backup.Row]]:
    if page.memories:
        return "memories", [
            (m.id, m.created_at, m.type, m.device, m.envelope) for m in page.memories
        ]
    if page.links:
        return "links", [
            (k.from_id, k.to_id, k.edge_type, float(k.weight), k.created_at) for k in page.links
        ]
    return "tombstones", [(t.id, t.deleted_at) for t in page.tombstones]
