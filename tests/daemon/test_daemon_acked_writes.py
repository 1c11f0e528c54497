"""An add is answered once it is durable (store and sync feed) and queued for indexing, not after
its embedding: what was acknowledged survives `kill -9`, and is searchable right away and after
the restart."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors._feed_log import FeedLog
from dmgn.feed import AddMemory
from tests.daemon.test_daemon_process import Node, node, wait_gone

pytestmark = pytest.mark.slow

__all__ = ["node"]  # the fixture, imported for the tests below


@pytest.fixture
def lexical(node: Node) -> Iterator[Node]:
    node.env["DMGN_EMBEDDER"] = "hashing"  # fast; the ordering under test is the embedder's own
    yield node


def logged_adds(root: Path) -> set[str]:
    """Memory ids in the gossip feed log on disk (read with the daemon dead)."""
    log = FeedLog(root / "gossip" / "feeds.log")
    try:
        return {e.op.memory_id for e, _ in log.load() if isinstance(e.op, AddMemory)}
    finally:
        log.close()


def test_acknowledged_adds_survive_sigkill_and_are_searchable(
    lexical: Node, tmp_path: Path
) -> None:
    node = lexical
    pid = node.start()
    single = node.json("add", "the lighthouse keeper painted the door blue")
    # Searchable as soon as it is acknowledged: the indexer serves its inbox in order.
    hits = node.json("query", "lighthouse door", "--alpha", "0")["results"]
    assert [h["id"] for h in hits] == [single["id"]]

    source = tmp_path / "history.jsonl"
    lines = [
        json.dumps({"content": f"imported line {i} about harbour number {i}"}) for i in range(700)
    ]
    source.write_text("\n".join(lines) + "\n")
    summary = node.json("add", "--jsonl", str(source))
    assert summary["added"] == 700 and summary["failed"] == []
    # Killed the moment the import is acknowledged: its last batches may still be embedding.
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)

    stored = logged_adds(node.root)
    assert single["id"] in stored and len(stored) == 701  # every acknowledged add was in the feed

    node.start()
    status = node.json("status")
    assert status["memories"] == 701
    assert status["index"]["memories"] == 701  # what the kill cut short was indexed at start
    hits = node.json("query", "harbour number 699", "--alpha", "0", "--limit", "1")["results"]
    assert hits and hits[0]["snippet"] == "imported line 699 about harbour number 699"
    node.run("stop")
