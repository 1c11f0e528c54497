"""Checks the engine makes from what nodes actually hold, not from what they say about it.

* :func:`shard_holdings` / :func:`durability_from_storage`: for every memory an identity's
  devices hold, which storage nodes (online now) hold a shard of it whose tag verifies under
  the identity's shard key, by index. A memory with at least ``k`` distinct verified indices
  can be rebuilt; the shard keeper's own placement records are not consulted.
* :func:`stores_agree`: every device of every identity holds the same memories, tombstones and
  links, and exactly the ops the workload made (no memory missing, no deleted one back, none
  that no op made).

The storage service keeps its objects in its tables (dicts in sims); the sims read them from the
running actor (the sim has every node in its hands; nothing on the wire could).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors import storage as sg
from actors import vault as vt
from actors._storage_tables import MemoryStorageTables, StorageTables
from actors.node import RunningNode
from actors.runtime import call, expect
from dmgn.shards import ShardKeys


def storage_tables(node: RunningNode) -> StorageTables | None:
    """The rows of the node's running storage service (found through its supervisor)."""
    owner = node.supervisor.running("storage")
    if isinstance(owner, sg.StorageService):
        return owner._db  # None once stopped
    raise LookupError("this node runs no storage service")


def shard_holdings(tables: StorageTables, oids: list[bytes]) -> dict[bytes, bytes]:
    """Those of ``oids`` the tables hold (for any owner): object id -> bytes."""
    held: dict[bytes, bytes] = {}
    if isinstance(tables, MemoryStorageTables):
        # What is held, not what is wanted, is the short list (hundreds of nodes: a read per
        # owner of every wanted id would cost storage nodes x owners x ids).
        wanted = set(oids)
        for objects in tables._objects.values():
            held.update((oid, data) for oid, data in objects.items() if oid in wanted)
        return held
    owners, _objects, _mail = tables.usage()
    for owner in sorted(owners):
        held.update(tables.read_objects(owner, oids, 1 << 62))  # a check reads everything
    return held


async def shard_keys(node: RunningNode) -> ShardKeys:
    """The identity's shard key, as its device's vault derives it."""
    return ShardKeys(await expect(await call(node.vault, vt.DeriveKey, "shards")))


@dataclass
class DurabilityCheck:
    k: int
    n: int
    memories: int = 0
    durable: int = 0  # >= k verified shards on online storage nodes
    #: Memories with fewer than k verified shards, by identity.
    short: dict[int, list[str]] = field(default_factory=dict)
    #: Shards that are there but whose tag does not verify (a corrupt holder).
    corrupt_shards: int = 0
    shards_held: int = 0

    def as_json(self, reported_lost: int, reported_unplaced: int) -> dict[str, Any]:
        not_durable = self.memories - self.durable
        return {
            "k": self.k,
            "n": self.n,
            "memories": self.memories,
            "durable": self.durable,
            "not_durable": not_durable,
            "shards_held": self.shards_held,
            "corrupt_shards": self.corrupt_shards,
            "keepers_report_lost": reported_lost,
            "keepers_report_unplaced": reported_unplaced,
            # The must-show: each memory is rebuildable from what storage nodes hold, or the
            # keepers report it lost. (The keepers' "unplaced" counts memories with any shard
            # not placed, e.g. n = 6 shards on 4 storage nodes; it is shown, not excused.)
            "every_memory_durable_or_reported_lost": not_durable <= reported_lost,
            "short": {str(i): ids[:20] for i, ids in sorted(self.short.items())},
        }


def durability_from_storage(
    k: int,
    n: int,
    memories: dict[int, tuple[ShardKeys, frozenset[str]]],
    storage: list[StorageTables],
) -> DurabilityCheck:
    """Count, for each identity's memories, the distinct shard indices whose tag verifies in
    the (online, honest) storage nodes' ``storage`` tables."""
    wanted = {
        keys.shard_id(mid, index): (ident, mid, index)
        for ident, (keys, ids) in memories.items()
        for mid in ids
        for index in range(n)
    }
    oids = sorted(wanted)
    held = [shard_holdings(tables, oids) for tables in storage]
    check = DurabilityCheck(k, n, shards_held=sum(len(h) for h in held))
    good: dict[tuple[int, str], set[int]] = {}
    for node in held:
        for oid, data in node.items():
            ident, mid, index = wanted[oid]
            if memories[ident][0].check(mid, index, data):
                good.setdefault((ident, mid), set()).add(index)
            else:
                check.corrupt_shards += 1
    for ident, (_keys, ids) in sorted(memories.items()):
        for mid in sorted(ids):
            check.memories += 1
            if len(good.get((ident, mid), ())) >= k:
                check.durable += 1
            else:
                check.short.setdefault(ident, []).append(mid)
    return check


@dataclass(frozen=True)
class StoreView:
    memories: frozenset[str]
    tombstones: frozenset[str]
    links: frozenset[tuple[str, str]]


def stores_agree(
    views: dict[int, list[StoreView]], created: dict[int, list[str]], deleted: dict[int, set[str]]
) -> dict[str, Any]:
    """Whether every device of each identity holds the same thing, and the ops made."""
    differing = []
    missing = resurrected = unknown = 0
    for ident, devices in sorted(views.items()):
        if any(v != devices[0] for v in devices[1:]):
            differing.append(ident)
        want = {m for m in created.get(ident, []) if m not in deleted.get(ident, set())}
        gone = deleted.get(ident, set())
        for view in devices:
            missing += len(want - view.memories)
            resurrected += len(gone & view.memories)
            unknown += len(view.memories - set(created.get(ident, [])))
    return {
        "identities": len(views),
        "devices": sum(len(v) for v in views.values()),
        "identical": not differing,
        "differing_identities": differing,
        "live_memories_missing": missing,
        "deleted_memories_present": resurrected,
        "memories_no_op_made": unknown,
        "holds_the_ops_made": not differing and missing == resurrected == unknown == 0,
    }
