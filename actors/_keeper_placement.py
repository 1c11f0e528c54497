"""The shard keeper's placements: which storage peer holds which shard of our memories.

Dispersal, repair and forgetting, for :mod:`actors.shard_keeper` (its module docstring tells
the protocol). :class:`Placements` keeps the placement records (in memory, and in the keeper's
tables through :class:`KeeperDb`) and the memories waiting for placement; it encodes shards
from the store's envelopes and puts each on the live peer XOR-closest to its shard id, never two
shards of one memory on one peer. What a repair round drops and places again is decided by
:func:`actors._keeper_health.plan_repair`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from actors._keeper_health import Durability, durability, plan_repair
from actors._keeper_peers import REFUSAL_BACKOFF, Failure, PeerKey, StoragePeers
from actors._keeper_tables import KeeperDb
from actors.runtime import Err, Result
from dmgn import storage_protocol as sp
from dmgn.shards import DELETE_CONTEXT, ShardKeys, ShardParams, delete_payload, encode_shards
from wire import Value

log = logging.getLogger("dmgn.shards")

__all__ = ["PLACE_ROUND", "Placements"]

#: Memories encoded and placed per round (bounds memory: 128 x 6 shards of a few KiB).
PLACE_ROUND = 128

#: (memory id, shard index, shard id, shard) on its way to one peer.
_Item = tuple[str, int, bytes, bytes]


class Placements:
    """Placement records, the memories waiting for placement, and the rounds that place them."""

    def __init__(
        self,
        *,
        peers: StoragePeers,
        db: KeeperDb,
        owner: bytes,
        shard_keys: ShardKeys,
        params: ShardParams,
        sign: Callable[[bytes, bytes], Awaitable[Result[bytes]]],
        envelopes: Callable[[tuple[str, ...]], Awaitable[Result[dict[str, bytes]]]],
        inventory: Callable[[], Awaitable[Result[tuple[frozenset[str], frozenset[str]]]]],
        forget_stale: Callable[[tuple[str, ...]], None],
        wall_clock: Callable[[], int],
        repair_interval: float,
        down_grace: float,
    ) -> None:
        self._peers = peers
        self._db = db
        self._owner = owner
        self._shards = shard_keys
        self._params = params
        self._sign = sign
        self._envelopes = envelopes
        self._inventory = inventory
        #: Called with the memories the store deleted while their shards are still out there.
        self._forget_stale = forget_stale
        self._wall_clock = wall_clock
        self._repair_interval = repair_interval
        self._down_grace = down_grace
        self.placed: dict[str, dict[int, PeerKey]] = {}
        self.to_place: set[str] = set()
        #: Memories with shards that found no peer; the repair loop tries them again.
        self.pending_retry: set[str] = set()
        self._placing: set[str] = set()
        self.forgotten: set[str] = set()
        self._wakeup = trio.Event()
        self._initial_scan_done = False
        #: Bytes sent and received by repair placements (benchmarks read it).
        self.repair_bytes = 0

    def load(self, rows: Iterable[tuple[str, int, PeerKey]]) -> None:
        """The records as the tables hold them at start."""
        self.placed = {}
        for memory_id, idx, peer in rows:
            self.placed.setdefault(memory_id, {})[idx] = peer

    def wake(self) -> None:
        self._wakeup.set()

    def disperse(self, memory_ids: Iterable[str]) -> None:
        self.to_place.update(i for i in memory_ids if i not in self.forgotten)
        self.wake()

    def forget(self, memory_ids: Iterable[str]) -> None:
        """Tombstoned: never placed again (their shards are deleted by :meth:`delete_shards`)."""
        self.forgotten.update(memory_ids)
        self.to_place.difference_update(memory_ids)

    def top_up(self, memory_ids: Iterable[str]) -> None:
        """Memories rebuilt from shards: place what was lost while we were away."""
        self.to_place.update(memory_ids)
        self.wake()

    # -- placement -----------------------------------------------------------------------------

    async def place_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            if not self._peers.live:
                continue
            if not self._initial_scan_done:
                self._initial_scan_done = True
                await self._scan_store()
            while self.to_place and any(self._peers.usable(k) for k in self._peers.live):
                batch = sorted(self.to_place)[:PLACE_ROUND]
                self.to_place.difference_update(batch)
                placed = await self._place(batch)
                if not placed:
                    break  # nothing could be placed now: wait for peers (or the repair loop)

    async def _scan_store(self) -> None:
        """At first contact: what the store holds that is not (fully) placed, and what the
        store deleted that still has shards out there."""
        result = await self._inventory()
        if isinstance(result, Err):
            log.warning("shards: cannot read the store inventory: %s", result.reason)
            return
        memories, tombstones = result.value
        n = self._params.n
        self.to_place.update(
            m for m in memories if len(self.placed.get(m, {})) < n and m not in tombstones
        )
        stale = tuple(m for m in tombstones if m in self.placed)
        if stale:
            self.forgotten.update(stale)
            self._forget_stale(stale)

    async def _place(self, memory_ids: list[str], *, repair: bool = False) -> int:
        """Place every unplaced shard of ``memory_ids``; returns how many were placed."""
        busy = self._placing & set(memory_ids)
        memory_ids = [m for m in memory_ids if m not in busy]
        self.pending_retry.update(busy)
        self._placing.update(memory_ids)
        try:
            return await self._place_now(memory_ids, repair=repair)
        finally:
            self._placing.difference_update(memory_ids)

    async def _place_now(self, memory_ids: list[str], *, repair: bool) -> int:
        found = await self._envelopes(tuple(memory_ids))
        if isinstance(found, Err):
            self.to_place.update(memory_ids)
            return 0
        plan: dict[PeerKey, list[_Item]] = {}
        leftover: set[str] = set()
        for mid in memory_ids:
            envelope = found.value.get(mid)
            if envelope is None or mid in self.forgotten:
                continue
            placed = self.placed.setdefault(mid, {})
            missing = [i for i in range(self._params.n) if i not in placed]
            if not missing:
                continue
            used = set(placed.values())
            targets: list[tuple[int, bytes, PeerKey]] = []
            for i in missing:
                oid = self._shards.shard_id(mid, i)
                target = self._peers.closest(oid, exclude=used)
                if target is None:
                    leftover.add(mid)
                    continue
                used.add(target)
                targets.append((i, oid, target))
            if not targets:
                # Nobody to take them (too few usable peers): no encoding either. The repair
                # pass comes back to such a memory every minute, and the encoding was ~2% of
                # a 250-node sim's CPU, all for shards that went nowhere.
                continue
            shards = encode_shards(envelope, self._shards, self._params)
            for i, oid, target in targets:
                plan.setdefault(target, []).append((mid, i, oid, shards[i]))
        placed_count = 0

        async def put_all(key: PeerKey, items: list[_Item]) -> None:
            nonlocal placed_count
            for batch in _batches(items):
                peer = self._peers.live.get(key)
                if peer is None:
                    leftover.update(m for m, _, _, _ in batch)
                    continue
                reply = await self._peers.request(
                    peer.peer,
                    sp.PUT,
                    owner=self._owner,
                    oids=[oid for _, _, oid, _ in batch],
                    blobs=[blob for _, _, _, blob in batch],
                )
                if isinstance(reply, Failure):
                    log.info(
                        "shards: %s refused %d shards: %s", key.hex()[:16], len(batch), reply.reason
                    )
                    peer.refusing_until = trio.current_time() + REFUSAL_BACKOFF
                    leftover.update(m for m, _, _, _ in batch)
                    continue
                if repair:
                    self.repair_bytes += sum(len(blob) for _, _, _, blob in batch)
                await self.record([(m, i, key) for m, i, _, _ in batch])
                placed_count += len(batch)

        async with trio.open_nursery() as nursery:
            for key, items in plan.items():
                nursery.start_soon(put_all, key, items)
        # Shards that found no peer wait for the next round (more peers, or the repair loop).
        self.unplaced_later(leftover)
        return placed_count

    def unplaced_later(self, memory_ids: Iterable[str]) -> None:
        self.pending_retry.update(m for m in memory_ids if m not in self.forgotten)

    async def record(self, rows: list[tuple[str, int, PeerKey]]) -> None:
        if not rows:
            return
        for mid, i, key in rows:
            self.placed.setdefault(mid, {})[i] = key

        await self._db.run(self._db.tables.record, rows)

    async def unrecord(self, rows: list[tuple[str, int]]) -> None:
        for mid, i in rows:
            placed = self.placed.get(mid)
            if placed is not None:
                placed.pop(i, None)
                if not placed:
                    del self.placed[mid]

        if rows:
            await self._db.run(self._db.tables.unrecord, rows)

    # -- repair --------------------------------------------------------------------------------

    async def repair_loop(self) -> None:
        while True:
            await trio.sleep(self._repair_interval)
            await self.repair()

    async def repair(self) -> int:
        needy: set[str] = set(self.pending_retry)
        self.pending_retry.clear()
        plan = plan_repair(
            self.placed,
            live=self._peers.live,
            down_since=self._peers.down_since,
            now=trio.current_time(),
            down_grace=self._down_grace,
            busy=self.forgotten | self.to_place | self._placing,  # dispersal has these
            n=self._params.n,
            repair_below=self._params.repair_below,
        )
        needy |= plan.needy
        await self.unrecord(plan.drop)
        for key in plan.gone:
            self._peers.down_since.pop(key, None)  # it may have come back meanwhile
        if not needy or not self._peers.live:
            self.pending_retry.update(needy)
            return 0
        count = 0
        ordered = sorted(needy)
        for start in range(0, len(ordered), PLACE_ROUND):
            count += await self._place(ordered[start : start + PLACE_ROUND], repair=True)
        if count:
            log.info("shards: repair placed %d shards", count)
        return count

    # -- forgetting ----------------------------------------------------------------------------

    async def delete_shards(self, memory_ids: tuple[str, ...]) -> None:
        """Ask the live holders of ``memory_ids``' shards to delete them (a request signed by
        the owner key); the records of the shards deleted go."""
        by_peer: dict[PeerKey, list[tuple[str, int]]] = {}
        for mid in memory_ids:
            for i, key in self.placed.get(mid, {}).items():
                by_peer.setdefault(key, []).append((mid, i))
        done: list[tuple[str, int]] = []
        for key, items in by_peer.items():
            peer = self._peers.live.get(key)
            if peer is None:
                continue  # retried at the next start (the tombstone stays in the store)
            for start in range(0, len(items), sp.MAX_BATCH_OBJECTS):
                batch = items[start : start + sp.MAX_BATCH_OBJECTS]
                oids = [self._shards.shard_id(m, i) for m, i in batch]
                at = self._wall_clock()
                signature = await self._sign(DELETE_CONTEXT, delete_payload(self._owner, at, oids))
                if isinstance(signature, Err):
                    return
                reply = await self._peers.request(
                    peer.peer,
                    sp.DELETE,
                    owner=self._owner,
                    oids=list[Value](oids),
                    at=at,
                    sig=signature.value,
                )
                if not isinstance(reply, Failure):
                    done.extend(batch)
        await self.unrecord(done)

    # -- status --------------------------------------------------------------------------------

    def durability(self, *, mailbox_items: int) -> Durability:
        return durability(
            self.placed,
            live=self._peers.live,
            forgotten=self.forgotten,
            waiting=self.to_place | self.pending_retry,
            k=self._params.k,
            n=self._params.n,
            repair_below=self._params.repair_below,
            storage_peers=len(self._peers.live),
            mailbox_items=mailbox_items,
            peer_scores={key.hex()[:16]: score for key, score in self._peers.scores.items()},
            repair_bytes=self.repair_bytes,
        )


def _batches(items: list[_Item]) -> Iterable[list[_Item]]:
    batch: list[_Item] = []
    size = 0
    for item in items:
        if batch and (
            len(batch) >= sp.MAX_BATCH_OBJECTS or size + len(item[3]) > sp.MAX_BATCH_BYTES
        ):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item[3])
    if batch:
        yield batch
