"""The shard keeper's audits: do our storage peers still hold the shards they were given?

Each live peer is asked to hash a random sample of the shards it holds for us with a fresh
nonce; the keeper recomputes those shards from the local envelopes (the encoding is
deterministic) and compares. A missing or wrong answer drops that placement (the repair loop
places the shard anew) and lowers the peer's score (:meth:`StoragePeers.penalize`). Audits
cost the peer a hash per shard and us an encoding per memory sampled, never a shard's transfer.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from actors._keeper_peers import Failure, PeerKey, StoragePeers, blist
from actors._keeper_placement import Placements
from actors.runtime import Err, Result
from dmgn import storage_protocol as sp
from dmgn.shards import ShardKeys, ShardParams, encode_shards
from wire import Value

__all__ = ["AuditReport", "Audits"]


@dataclass(frozen=True, slots=True)
class AuditReport:
    audited: int
    failed: int
    peers: int
    bytes_sent: int
    bytes_received: int


class Audits:
    """Audit rounds, every ``interval`` or when asked."""

    def __init__(
        self,
        *,
        peers: StoragePeers,
        placements: Placements,
        owner: bytes,
        shard_keys: ShardKeys,
        params: ShardParams,
        envelopes: Callable[[tuple[str, ...]], Awaitable[Result[dict[str, bytes]]]],
        interval: float,
        sample: int,
    ) -> None:
        self._peers = peers
        self._placements = placements
        self._owner = owner
        self._shards = shard_keys
        self._params = params
        self._envelopes = envelopes
        self._interval = interval
        #: Shards audited per peer per round.
        self._sample = sample

    async def loop(self) -> None:
        while True:
            await trio.sleep(self._interval)
            await self.audit()

    async def audit(self) -> AuditReport:
        by_peer: dict[PeerKey, list[tuple[str, int]]] = {}
        for mid, placed in self._placements.placed.items():
            if mid in self._placements.forgotten:
                continue
            for i, key in placed.items():
                if key in self._peers.live:
                    by_peer.setdefault(key, []).append((mid, i))
        totals = [0, 0, 0, 0]  # audited, failed, bytes out, bytes in
        failed: list[tuple[str, int]] = []

        async def audit(key: PeerKey, sample: list[tuple[str, int]]) -> None:
            peer = self._peers.live.get(key)
            if peer is None:
                return
            found = await self._envelopes(tuple(sorted({m for m, _ in sample})))
            if isinstance(found, Err):
                return
            sample = [(m, i) for m, i in sample if m in found.value]
            if not sample:
                return
            nonce = os.urandom(32)
            oids = [self._shards.shard_id(m, i) for m, i in sample]
            reply = await self._peers.request(
                peer.peer, sp.AUDIT, owner=self._owner, oids=list[Value](oids), nonce=nonce
            )
            totals[2] += 64 + 32 * len(oids)
            if isinstance(reply, Failure):
                if reply.code != "not_connected":
                    self._peers.penalize(key, f"audit not answered: {reply.reason}")
                return
            proofs = dict(zip(blist(reply["oids"]), blist(reply["proofs"]), strict=False))
            totals[3] += 64 + 64 * len(proofs)
            bad = 0
            for (mid, i), oid in zip(sample, oids, strict=True):
                shard = encode_shards(found.value[mid], self._shards, self._params)[i]
                totals[0] += 1
                if proofs.get(oid) != hashlib.sha256(nonce + shard).digest():
                    bad += 1
                    failed.append((mid, i))
            if bad:
                totals[1] += bad
                self._peers.penalize(key, f"failed {bad} of {len(sample)} audited shards", bad)

        async with trio.open_nursery() as nursery:
            for key, held in by_peer.items():
                sample = random.sample(held, min(len(held), self._sample))
                nursery.start_soon(audit, key, sample)
        await self._placements.unrecord(failed)
        self._placements.pending_retry.update(m for m, _ in failed)
        return AuditReport(totals[0], totals[1], len(by_peer), totals[2], totals[3])
