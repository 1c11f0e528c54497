"""Publishing what predates gossip: store contents that are in no feed (made offline, before
this node ran gossip, or lost to a crash between a store write and its feed append), found by
comparing the store with the feed log when the node goes online.
"""

from __future__ import annotations

import logging

import trio

from actors import gossip as gs
from actors import store as st
from actors._node_handles import RunningNode
from actors.runtime import Address, Err, call, expect
from dmgn import feed

log = logging.getLogger("dmgn.node")

__all__ = ["load_feed", "publish_unsynced"]


def _feed_contents(
    entries: list[feed.FeedEntry],
) -> tuple[set[str], set[str], set[tuple[str, str, str]]]:
    added: set[str] = set()
    deleted: set[str] = set()
    edges: set[tuple[str, str, str]] = set()
    for entry in entries:
        op = entry.op
        if isinstance(op, feed.AddMemory):
            added.add(op.memory_id)
        elif isinstance(op, feed.Delete):
            deleted.add(op.memory_id)
        else:
            edges.add((op.from_id, op.to_id, op.edge_type))
    return added, deleted, edges


async def publish_unsynced(
    node: RunningNode, gossip: Address[gs.GossipMsg], feed_entries: list[feed.FeedEntry]
) -> int:
    """Publish store contents that are in no feed: memories, links and deletes made before this
    node ran gossip, by an offline `dmgn` command, or lost between a store write and its feed
    append by a crash. Call before any peer connects (so nothing synced meanwhile is mistaken
    for a local change). Returns how many ops were published."""
    added, deleted, edges = _feed_contents(feed_entries)
    inventory = await expect(await call(node.store, st.Inventory, timeout=120))
    ops: list[feed.Op] = []
    missing = sorted(inventory.memories - added)
    for start in range(0, len(missing), 512):
        found = await expect(await call(node.store, st.Get, tuple(missing[start : start + 512])))
        ops.extend(
            feed.AddMemory(s.envelope) for s in sorted(found.values(), key=lambda s: s.created_at)
        )
    ops.extend(
        feed.Link(link.from_id, link.to_id, link.edge_type, link.weight)
        for link in sorted(inventory.links, key=lambda link: link.created_at)
        if (link.from_id, link.to_id, link.edge_type) not in edges
    )
    ops.extend(feed.Delete(memory_id) for memory_id in sorted(inventory.tombstones - deleted))
    if not ops:
        return 0
    log.info("publishing %d local changes that are in no sync feed yet", len(ops))
    # Concurrent publishes share disk syncs (gossip's group commit); a bounded number in flight.
    limit = trio.CapacityLimiter(gs.PUBLISH_GROUP_MAX)
    failures: list[str] = []

    async def publish(op: feed.Op) -> None:
        async with limit:
            result = await call(gossip, gs.Publish, op, timeout=120)
            if isinstance(result, Err):
                failures.append(result.reason)

    # Order matters only between ops on the same memory (add before link/delete), and each
    # kind is published after the previous kind has been logged.
    for kind in (feed.AddMemory, feed.Link, feed.Delete):
        async with trio.open_nursery() as nursery:
            for op in ops:
                if isinstance(op, kind):
                    nursery.start_soon(publish, op)
    if failures:
        log.warning(
            "%d changes could not be published (%s); retried at next start",
            len(failures),
            failures[0],
        )
    return len(ops) - len(failures)


async def load_feed(feed_log: gs.FeedLog) -> list[tuple[feed.FeedEntry, int]]:
    def load() -> list[tuple[feed.FeedEntry, int]]:
        try:
            return feed_log.load()
        finally:
            feed_log.close()

    if feed_log.blocking:
        return await trio.to_thread.run_sync(load)
    return load()
