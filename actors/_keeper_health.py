"""How the shard keeper judges its memories' shards: what to repair, and how durable they are.

Sans-IO, as :mod:`actors._dial_schedule` is: fed the placements, which peers are live and the
time, it answers with decisions and counts; it imports no trio (a contract in pyproject.toml
keeps it so), so the rules can be read and tested apart from the requests that act on them.

The rules (docs/storage.md): a shard on a peer gone for longer than the grace period is
dropped; a memory with fewer than ``repair_below`` (k + 2) live shards has its shards on absent
peers dropped too, so they are placed anew on live ones; any memory missing a shard is placed
again. A memory is durable with k live shards, complete with n, at risk under k + 2, lost under k.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass

__all__ = ["Durability", "RepairPlan", "durability", "plan_repair"]

#: Placements: memory id -> shard index -> the key of the peer holding it.
Placed = Mapping[str, Mapping[int, bytes]]


@dataclass(frozen=True, slots=True)
class Durability:
    k: int
    n: int
    memories: int  # memories with placement records
    complete: int  # all n shards live
    durable: int  # >= k live shards
    at_risk: int  # fewer than k + 2 live shards (durable or not)
    lost: int  # fewer than k live shards
    unplaced: int  # waiting for placement
    storage_peers: int
    mailbox_items: int
    peer_scores: dict[str, int]
    #: Shard bytes sent by repairs since start.
    repair_bytes: int = 0
    #: Durable memories over every memory the keeper is responsible for (placed or still
    #: waiting for its first placement); 1.0 when there are none.
    durable_fraction: float = 1.0


@dataclass(frozen=True, slots=True)
class RepairPlan:
    #: Placements to forget (memory id, shard index), in placement order.
    drop: list[tuple[str, int]]
    #: Memories with a shard to place anew.
    needy: set[str]
    #: Peers away past the grace period: their shards are dropped, and so are they.
    gone: set[bytes]


def plan_repair(
    placements: Placed,
    *,
    live: Container[bytes],
    down_since: Mapping[bytes, float],
    now: float,
    down_grace: float,
    busy: Container[str],
    n: int,
    repair_below: int,
) -> RepairPlan:
    """A repair round's decisions; memories in ``busy`` (forgotten, or being dispersed) are
    left to whoever has them."""
    gone = {key for key, since in down_since.items() if now - since >= down_grace}
    drop: list[tuple[str, int]] = []
    needy: set[str] = set()
    for mid, placed in placements.items():
        if mid in busy:
            continue
        live_count = sum(1 for key in placed.values() if key in live)
        dropped = 0
        for i, key in placed.items():
            absent = key not in live
            if key in gone or (absent and live_count < repair_below):
                drop.append((mid, i))
                dropped += 1
        if dropped or live_count < repair_below or len(placed) < n:
            needy.add(mid)
    return RepairPlan(drop, needy, gone)


def durability(
    placements: Placed,
    *,
    live: Container[bytes],
    forgotten: Container[str],
    waiting: set[str],
    k: int,
    n: int,
    repair_below: int,
    storage_peers: int,
    mailbox_items: int,
    peer_scores: dict[str, int],
    repair_bytes: int,
) -> Durability:
    """Counts over the placements (forgotten memories aside) and the memories ``waiting`` for
    placement."""
    durable = at_risk = lost = complete = 0
    memories = 0
    for mid, placed in placements.items():
        if mid in forgotten:
            continue
        memories += 1
        live_count = sum(1 for key in placed.values() if key in live)
        durable += live_count >= k
        complete += live_count >= n
        at_risk += live_count < repair_below
        lost += live_count < k
    never_placed = sum(1 for mid in waiting if mid not in placements and mid not in forgotten)
    responsible = memories + never_placed
    return Durability(
        k,
        n,
        memories,
        complete,
        durable,
        at_risk,
        lost,
        len(waiting),
        storage_peers,
        mailbox_items,
        peer_scores,
        repair_bytes,
        durable / responsible if responsible else 1.0,
    )
