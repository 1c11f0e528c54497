"""Half-written snapshots left by a crash are removed when the indexer next starts."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from actors import indexer as ix
from actors.runtime import Err, call
from dmgn.embedding import HashingEmbedder


async def test_orphan_snapshot_temporaries_are_removed_at_start(tmp_path: Path) -> None:
    key = os.urandom(32)
    orphans = [tmp_path / ".index.snapshot.tmp-4242", tmp_path / ".index.snapshot.tmp-1"]
    for orphan in orphans:
        orphan.write_bytes(b"half a snapshot")
    others = [tmp_path / ".config.json.tmp-4242", tmp_path / "index.snapshot.tmp-notours"]
    for other in others:
        other.write_bytes(b"not the indexer's")
    actor = ix.IndexerActor(HashingEmbedder(), tmp_path, key)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        saved = await call(actor.mailbox.address, ix.Persist)
        assert not isinstance(saved, Err)
        nursery.cancel_scope.cancel()
    assert not any(orphan.exists() for orphan in orphans)
    assert all(other.exists() for other in others)
    assert (tmp_path / "index.snapshot").exists()
