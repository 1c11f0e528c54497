"""The shard keeper actor: our memories' shards and our feed's mailbox on other people's nodes.

Client side of :mod:`dmgn.storage_protocol` (the server is :mod:`actors.storage`):

* **Dispersal.** Each memory's envelope is erasure-coded k-of-n (:mod:`dmgn.shards`) and shard
  ``i`` goes to the live storage peer XOR-closest to its shard id (a keyed hash of (id, i)),
  never to our own devices (they are not storage peers) and never two shards of one memory to
  one peer. Placements are recorded in the keeper's file (``shards.duckdb``).
* **Audits** (every ``audit_interval``): each live peer is asked to hash a sample of the shards
  it holds with a fresh nonce; the keeper recomputes the shards from the local envelope (the
  encoding is deterministic) and compares. A missing or wrong answer drops that placement and
  lowers the peer's score; a peer at or below :data:`AVOID_SCORE` gets no new shards.
* **Repair** (every ``repair_interval`` and when a holder goes away): placements on peers gone
  for longer than ``down_grace`` are dropped; a memory with fewer than k + 2 live shards has its
  shards on absent peers dropped too; every unplaced shard is placed anew (recomputed from the
  local envelope; after a restore, from the k shards that rebuilt it).
* **Owner.** Everything is held under the identity's storage-owner key (``owner``; the vault
  derives it from the seed, so a restore needs only the vault export), never the identity key:
  storage peers know us only by a per-node storage key (issue 20). Each request carries the
  owner key's proof for the storage key of the peer it goes to (made once per peer).
* **Forgetting.** Shards of tombstoned memories are deleted with a request signed by the
  owner key (the vault signs).
* **Mailbox.** Every entry this device publishes is sealed (:class:`dmgn.shards.MailKeys`),
  kept in the keeper's outbox and pushed to the ``mailbox_replicas`` live peers XOR-closest to
  the identity's blinded mailbox target. The keeper asks each storage peer for its heads when
  it connects (and so at start), asks it to watch our mailbox (``mail.notify`` when another
  device pushes there), and pulls the entries our feeds lack: at once on a notice our feeds do
  not cover yet, and otherwise every ``mail_poll_interval`` from a watching peer (every
  ``sync_interval`` from one that does not watch). It rebuilds thin adds from shards and hands
  the entries to gossip (:class:`actors.gossip.Ingest`), which checks continuity and
  signatures: a mailbox that drops, reorders or forges entries is detected (an item that does
  not decrypt in its place, a chain that breaks) and scored down.
* **Recover** (``dmgn restore --from-network``): the same pull, for everything, with progress.

Dependencies come in as callables (actors do not import each other): ``send`` (transport),
``sign`` (vault: the storage-owner key), ``envelopes``/``inventory`` (store),
``ingest``/``vector`` (gossip).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, assert_never

import trio

from actors._keeper_tables import DuckKeeperTables, KeeperTables
from actors.runtime import Err, Mailbox, Ok, Reply, Result
from dmgn import storage_protocol as sp
from dmgn.feed import FeedEntry, FeedError, VersionVector
from dmgn.shards import (
    DELETE_CONTEXT,
    MAX_MAIL_ITEM_BYTES,
    MailEntry,
    MailKeys,
    ShardError,
    ShardKeys,
    ShardParams,
    decode_shards,
    delete_payload,
    encode_shards,
)
from wire import Message, MessageType, PeerIdentity, Value

log = logging.getLogger("dmgn.shards")
R = TypeVar("R")

__all__ = [
    "AVOID_SCORE",
    "AuditNow",
    "AuditReport",
    "Disperse",
    "Durability",
    "Forget",
    "KeeperMsg",
    "KeeperSettings",
    "KeeperState",
    "MailNotice",
    "MailPush",
    "Recover",
    "RecoveryReport",
    "RepairNow",
    "ShardKeeper",
    "StoragePeerDown",
    "StoragePeerUp",
    "StorageReply",
    "SyncMailbox",
]

#: Reputation (0-100, from the peering actor: uptime, latency, sync, audits, violations) below
#: which a peer gets no new shards or mailbox items; one protocol violation or failed audit puts
#: a peer under it for days (dmgn/reputation.py). 50 is a peer never seen.
PLACEMENT_FLOOR = 40.0
NEUTRAL_REPUTATION = 50.0
#: A peer at or below this score gets no new shards or mailbox items (it still serves reads).
AVOID_SCORE = -20
#: Score lost per failed audit item, corrupt shard or undecryptable mailbox item.
PENALTY = 5
#: Memories encoded and placed per round (bounds memory: 128 x 6 shards of a few KiB).
PLACE_ROUND = 128
#: Memories fetched per request round in a restore (x n shard ids <= MAX_BATCH_OBJECTS).
FETCH_CHUNK = 40
#: Fetch rounds in flight at once during a restore.
FETCH_PARALLEL = 8
#: Entries handed to gossip per Ingest.
INGEST_BATCH = 512
#: How long a peer that refused a put (quota, rate) is left alone.
REFUSAL_BACKOFF = 60.0
#: A storage peer's notices make us ask it for heads at most this often (a peer sending
#: notice after notice gets one ask per gap, not one per notice).
NOTICE_GAP = 5.0
#: Streams with a pending notice remembered per peer (a mailbox answers for MAX_STREAMS).
MAX_NOTICES = sp.MAX_STREAMS


@dataclass(frozen=True)
class KeeperSettings:
    params: ShardParams = field(default_factory=ShardParams)
    audit_interval: float = 3600.0
    #: Shards audited per peer per round.
    audit_sample: int = 64
    repair_interval: float = 60.0
    #: How long a holder may be away before its shards are placed elsewhere.
    down_grace: float = 600.0
    #: Storage peers holding this identity's mailbox: n - k + 1, so losing n - k peers (what the
    #: shards survive) leaves at least one copy of the feeds.
    mailbox_replicas: int = 4
    sync_interval: float = 60.0
    #: How often a storage peer that watches our mailbox (it sends ``mail.notify``) is asked
    #: for heads anyway, which renews the watch; a peer that does not watch is asked every
    #: ``sync_interval``. Asking every peer each sync round made those asks and their answers
    #: over half of all messages in a 500-node sim hour.
    mail_poll_interval: float = 600.0
    request_timeout: float = 30.0
    #: Pull from the mailbox by itself (when storage peers connect and every sync interval);
    #: off for ``dmgn restore --from-network``, which asks once, with progress.
    auto_pull: bool = True


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoragePeerUp:
    peer: PeerIdentity


@dataclass(frozen=True, slots=True)
class StoragePeerDown:
    peer: PeerIdentity


@dataclass(frozen=True, slots=True)
class PeerReputation:
    """The peering actor's reputation score for a storage peer (dmgn.reputation, 0-100, 50 for
    one never seen). Below :data:`PLACEMENT_FLOOR` the peer gets no new shards or mailbox
    items, whatever its audit score here."""

    peer: PeerIdentity
    score: float


@dataclass(frozen=True, slots=True)
class StorageReply:
    """A ``storage.reply`` from a peer (routed here by peering)."""

    peer: PeerIdentity
    message: Message


@dataclass(frozen=True, slots=True)
class MailNotice:
    """A ``mail.notify`` from a storage peer (routed here by peering): a hint to pull."""

    peer: PeerIdentity
    message: Message


@dataclass(frozen=True, slots=True)
class Disperse:
    """Memories (in the local store) whose shards should be placed; no answer."""

    memory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Forget:
    """Tombstoned memories: delete their shards; no answer. ``envelopes`` are theirs as the
    store held them just before (our adds of them become whole mailbox items, see
    ``_keep_deleted_adds``); missing ones are rebuilt from shards."""

    memory_ids: tuple[str, ...]
    envelopes: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class MailPush:
    """Entries this device just published: seal them into the mailbox; no answer."""

    entries: tuple[FeedEntry, ...]


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    streams: int
    entries: int
    memories: int
    unrecoverable: tuple[str, ...]
    storage_peers: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Recover:
    """Pull every entry our feeds lack from the mailbox and rebuild its memories from shards.

    ``progress(done, total)`` is called as memories are fetched (for a progress bar)."""

    progress: Callable[[int, int], None] | None
    reply: Reply[RecoveryReport]


@dataclass(frozen=True, slots=True)
class SyncMailbox:
    reply: Reply[RecoveryReport]


@dataclass(frozen=True, slots=True)
class AuditReport:
    audited: int
    failed: int
    peers: int
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True, slots=True)
class AuditNow:
    reply: Reply[AuditReport]


@dataclass(frozen=True, slots=True)
class RepairNow:
    """Run a repair round now; answers how many shards were placed."""

    reply: Reply[int]


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
class KeeperState:
    reply: Reply[Durability]


KeeperMsg = (
    StoragePeerUp
    | StoragePeerDown
    | PeerReputation
    | StorageReply
    | MailNotice
    | Disperse
    | Forget
    | MailPush
    | Recover
    | SyncMailbox
    | AuditNow
    | RepairNow
    | KeeperState
)

PeerKey = bytes  # identity public key (32) || device id (16)


def _peer_key(peer: PeerIdentity) -> PeerKey:
    return peer.identity_public_key + peer.device_id


def _distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


@dataclass
class _Peer:
    peer: PeerIdentity
    node_id: bytes
    mail_head: int | None = None  # how much of our stream it holds, once asked
    refusing_until: float = 0.0
    #: When to ask it for heads next (0: at once), and when we last did.
    heads_due: float = 0.0
    heads_asked: float = -math.inf
    #: Streams it told us (``mail.notify``) it holds up to a seq, not yet looked at.
    notices: dict[bytes, int] = field(default_factory=dict)


@dataclass
class _Slot:
    peer: PeerKey
    event: trio.Event = field(default_factory=trio.Event)
    message: Message | None = None


@dataclass(frozen=True, slots=True)
class _Failure:
    code: str
    reason: str


class ShardKeeper:
    """See the module docstring."""

    def __init__(
        self,
        path: Path | None,
        *,
        owner: bytes,
        device_id: bytes,
        shard_keys: ShardKeys,
        mail_keys: MailKeys,
        send: Callable[[PeerIdentity, Message], Awaitable[Result[None]]],
        sign: Callable[[bytes, bytes], Awaitable[Result[bytes]]],
        envelopes: Callable[[tuple[str, ...]], Awaitable[Result[dict[str, bytes]]]],
        inventory: Callable[[], Awaitable[Result[tuple[frozenset[str], frozenset[str]]]]],
        ingest: Callable[[tuple[FeedEntry, ...]], Awaitable[Result[int]]],
        vector: Callable[[], Awaitable[Result[VersionVector]]],
        close: Callable[[PeerIdentity, str], Awaitable[object]] | None = None,
        settings: KeeperSettings | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        capacity: int = 256,
        tables: KeeperTables | None = None,
    ) -> None:
        self.mailbox: Mailbox[KeeperMsg] = Mailbox("shard_keeper", capacity)
        self._path = path
        #: Given (sims: :class:`~actors._keeper_tables.MemoryKeeperTables`), or opened at
        #: ``path`` when the actor starts.
        self._given_tables = tables
        self._owner = owner
        #: Owner proofs per storage key (one signature each, made once; bounded by clearing).
        self._proofs: dict[bytes, bytes] = {}
        self._device_id = device_id
        self._shards = shard_keys
        self._mail = mail_keys
        self._send = send
        self._sign = sign
        self._envelopes = envelopes
        self._inventory = inventory
        self._ingest = ingest
        self._vector = vector
        self._close = close
        self._settings = settings or KeeperSettings()
        self._params = self._settings.params
        self._wall_clock = wall_clock
        self._stream = mail_keys.stream_id(device_id)
        self._mail_target = mail_keys.mailbox_target(owner)
        self._db: KeeperTables | None = None
        self._placements: dict[str, dict[int, PeerKey]] = {}
        self._outbox_seq = 0
        self._live: dict[PeerKey, _Peer] = {}
        self._down_since: dict[PeerKey, float] = {}
        self._scores: dict[PeerKey, int] = {}
        #: Reputation of live peers, from the peering actor (dropped when a peer goes down).
        self._reputation: dict[PeerKey, float] = {}
        self._waiting: dict[int, _Slot] = {}
        self._rids = itertools.count(random.randrange(sp.MAX_RID // 2))
        self._to_place: set[str] = set()
        #: Memories with shards that found no peer; the repair loop tries them again.
        self._pending_retry: set[str] = set()
        self._placing: set[str] = set()
        self._forgotten: set[str] = set()
        self._place_wakeup = trio.Event()
        self._mail_wakeup = trio.Event()
        self._pull_wakeup = trio.Event()
        self._initial_scan_done = False
        self._nursery: trio.Nursery | None = None
        self._pull_lock = trio.Lock()
        self._db_lock = trio.Lock()
        #: Bytes sent and received by repair placements (benchmarks read it).
        self.repair_bytes = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._db = await trio.to_thread.run_sync(self._open)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._place_loop)
                nursery.start_soon(self._mail_loop)
                nursery.start_soon(self._pull_loop)
                nursery.start_soon(self._audit_loop)
                nursery.start_soon(self._repair_loop)
                task_status.started()
                async for message in self.mailbox:
                    await self._handle(message)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            db, self._db = self._db, None
            if db is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(db.close)

    def _open(self) -> KeeperTables:
        db = self._given_tables or DuckKeeperTables(self._path)
        self._placements = {}
        for memory_id, idx, peer in db.placements():
            self._placements.setdefault(memory_id, {})[idx] = peer
        self._outbox_seq = db.outbox_last()
        return db

    @property
    def _conn(self) -> KeeperTables:
        assert self._db is not None
        return self._db

    async def _in_db(self, function: Callable[..., R], *args: Any) -> R:
        """Run a statement in a worker thread; one at a time (a connection is not shared)."""
        async with self._db_lock:
            return await trio.to_thread.run_sync(function, *args)

    async def _handle(self, message: KeeperMsg) -> None:
        assert self._nursery is not None
        match message:
            case StoragePeerUp(peer):
                self._peer_up(peer)
            case PeerReputation(peer, score):
                self._reputation[_peer_key(peer)] = score
            case StoragePeerDown(peer):
                key = _peer_key(peer)
                self._reputation.pop(key, None)
                if self._live.pop(key, None) is not None:
                    self._down_since[key] = trio.current_time()
            case MailNotice(peer, notice):
                self._take_notice(peer, notice)
            case StorageReply(peer, reply):
                slot = self._waiting.get(reply.get_int("rid"))
                if slot is not None and slot.peer == _peer_key(peer) and slot.message is None:
                    slot.message = reply
                    slot.event.set()
                else:
                    log.info(
                        "shards: late or unexpected answer %d from %s",
                        reply.get_int("rid"),
                        _peer_key(peer).hex()[:16],
                    )
            case Disperse(ids):
                self._to_place.update(i for i in ids if i not in self._forgotten)
                self._place_wakeup.set()
            case Forget(ids, envelopes):
                self._forgotten.update(ids)
                self._to_place.difference_update(ids)
                self._nursery.start_soon(self._forget, ids, dict(envelopes))
            case MailPush(entries):
                await self._mail_push(entries)
            case Recover(progress, reply):
                self._nursery.start_soon(self._serve_recover, progress, reply)
            case SyncMailbox(reply):
                self._nursery.start_soon(self._serve_recover, None, reply)
            case AuditNow(reply):
                self._nursery.start_soon(self._serve_audit, reply)
            case RepairNow(reply):
                self._nursery.start_soon(self._serve_repair, reply)
            case KeeperState(reply):
                reply.ok(self._durability())
            case _:
                assert_never(message)

    def _take_notice(self, peer: PeerIdentity, notice: Message) -> None:
        live = self._live.get(_peer_key(peer))
        if live is None or notice.get_bytes("owner") != self._owner:
            return  # not one of our storage peers now, or not about our mailbox
        stream, seq = notice.get_bytes("stream"), notice.get_int("seq")
        if stream not in live.notices and len(live.notices) >= MAX_NOTICES:
            return
        live.notices[stream] = max(seq, live.notices.get(stream, 0))
        self._pull_wakeup.set()

    def _peer_up(self, peer: PeerIdentity) -> None:
        # Peering hands over only storage-mode connections we dialed (never our own devices,
        # and never the owner key, which no peer presents as its certificate key).
        key = _peer_key(peer)
        self._live[key] = _Peer(peer, hashlib.sha256(key).digest())
        self._down_since.pop(key, None)
        self._place_wakeup.set()
        self._mail_wakeup.set()
        self._pull_wakeup.set()

    # -- requests to peers -------------------------------------------------------------------

    async def _request(
        self, peer: PeerIdentity, kind: MessageType, **fields: Value
    ) -> Message | _Failure:
        proof = await self._proof(peer.identity_public_key)
        if isinstance(proof, _Failure):
            return proof
        rid = next(self._rids) % sp.MAX_RID
        slot = _Slot(_peer_key(peer))
        self._waiting[rid] = slot
        try:
            message = kind(rid=rid, proof=proof, **fields)
            while True:
                sent = await self._send(peer, message)
                if isinstance(sent, Ok):
                    break
                if sent.code != "busy":
                    return _Failure("not_connected", sent.reason)
                await trio.sleep(0.02)
            with trio.move_on_after(self._settings.request_timeout):
                await slot.event.wait()
            if slot.message is None:
                log.warning(
                    "storage peer %s: no answer to %s in time",
                    _peer_key(peer).hex()[:16],
                    kind.name,
                )
                return _Failure("timeout", f"no answer to {kind.name} in time")
            code, reason = sp.reply_fields(slot.message)
            if code:
                return _Failure(code, reason)
            return slot.message
        finally:
            del self._waiting[rid]

    async def _proof(self, storage_key: bytes) -> bytes | _Failure:
        proof = self._proofs.get(storage_key)
        if proof is None:
            signed = await self._sign(sp.OWNER_PROOF_CONTEXT, sp.owner_proof_message(storage_key))
            if isinstance(signed, Err):
                return _Failure("sign_failed", signed.reason)
            if len(self._proofs) >= 1024:
                self._proofs.clear()
            proof = self._proofs[storage_key] = signed.value
        return proof

    def _penalize(self, key: PeerKey, why: str, times: int = 1) -> None:
        before = self._scores.get(key, 0)
        score = before - PENALTY * times
        self._scores[key] = score
        log.warning("storage peer %s scored down to %d: %s", key.hex()[:16], score, why)
        peer = self._live.get(key)
        if score <= AVOID_SCORE < before and peer is not None and self._close is not None:
            # Cut off, as gossip cuts off a misbehaving device; it gets no new shards even if
            # it reconnects (the score outlives the connection).
            assert self._nursery is not None
            self._nursery.start_soon(self._close, peer.peer, f"cut off: {why} (score {score})")

    def _usable(self, key: PeerKey) -> bool:
        peer = self._live.get(key)
        return (
            peer is not None
            and self._scores.get(key, 0) > AVOID_SCORE
            and self._reputation.get(key, NEUTRAL_REPUTATION) >= PLACEMENT_FLOOR
            and peer.refusing_until <= trio.current_time()
        )

    # -- placement -----------------------------------------------------------------------------

    async def _place_loop(self) -> None:
        while True:
            await self._place_wakeup.wait()
            self._place_wakeup = trio.Event()
            if not self._live:
                continue
            if not self._initial_scan_done:
                self._initial_scan_done = True
                await self._scan_store()
            while self._to_place and any(self._usable(k) for k in self._live):
                batch = sorted(self._to_place)[:PLACE_ROUND]
                self._to_place.difference_update(batch)
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
        self._to_place.update(
            m for m in memories if len(self._placements.get(m, {})) < n and m not in tombstones
        )
        stale = tuple(m for m in tombstones if m in self._placements)
        if stale:
            self._forgotten.update(stale)
            assert self._nursery is not None
            self._nursery.start_soon(self._forget, stale)

    async def _place(self, memory_ids: list[str], *, repair: bool = False) -> int:
        """Place every unplaced shard of ``memory_ids``; returns how many were placed."""
        busy = self._placing & set(memory_ids)
        memory_ids = [m for m in memory_ids if m not in busy]
        self._pending_retry.update(busy)
        self._placing.update(memory_ids)
        try:
            return await self._place_now(memory_ids, repair=repair)
        finally:
            self._placing.difference_update(memory_ids)

    async def _place_now(self, memory_ids: list[str], *, repair: bool) -> int:
        found = await self._envelopes(tuple(memory_ids))
        if isinstance(found, Err):
            self._to_place.update(memory_ids)
            return 0
        plan: dict[PeerKey, list[tuple[str, int, bytes, bytes]]] = {}
        leftover: set[str] = set()
        for mid in memory_ids:
            envelope = found.value.get(mid)
            if envelope is None or mid in self._forgotten:
                continue
            placed = self._placements.setdefault(mid, {})
            missing = [i for i in range(self._params.n) if i not in placed]
            if not missing:
                continue
            used = set(placed.values())
            targets: list[tuple[int, bytes, PeerKey]] = []
            for i in missing:
                oid = self._shards.shard_id(mid, i)
                target = self._closest(oid, exclude=used)
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

        async def put_all(key: PeerKey, items: list[tuple[str, int, bytes, bytes]]) -> None:
            nonlocal placed_count
            for batch in _batches(items):
                peer = self._live.get(key)
                if peer is None:
                    leftover.update(m for m, _, _, _ in batch)
                    continue
                reply = await self._request(
                    peer.peer,
                    sp.PUT,
                    owner=self._owner,
                    oids=[oid for _, _, oid, _ in batch],
                    blobs=[blob for _, _, _, blob in batch],
                )
                if isinstance(reply, _Failure):
                    log.info(
                        "shards: %s refused %d shards: %s", key.hex()[:16], len(batch), reply.reason
                    )
                    peer.refusing_until = trio.current_time() + REFUSAL_BACKOFF
                    leftover.update(m for m, _, _, _ in batch)
                    continue
                if repair:
                    self.repair_bytes += sum(len(blob) for _, _, _, blob in batch)
                await self._record([(m, i, key) for m, i, _, _ in batch])
                placed_count += len(batch)

        async with trio.open_nursery() as nursery:
            for key, items in plan.items():
                nursery.start_soon(put_all, key, items)
        # Shards that found no peer wait for the next round (more peers, or the repair loop).
        self._unplaced_later(leftover)
        return placed_count

    def _unplaced_later(self, memory_ids: Iterable[str]) -> None:
        self._pending_retry.update(m for m in memory_ids if m not in self._forgotten)

    def _closest(self, oid: bytes, exclude: set[PeerKey]) -> PeerKey | None:
        best: tuple[int, PeerKey] | None = None
        for key, peer in self._live.items():
            if key in exclude or not self._usable(key):
                continue
            distance = _distance(peer.node_id, oid)
            if best is None or distance < best[0]:
                best = (distance, key)
        return None if best is None else best[1]

    async def _record(self, rows: list[tuple[str, int, PeerKey]]) -> None:
        if not rows:
            return
        for mid, i, key in rows:
            self._placements.setdefault(mid, {})[i] = key

        await self._in_db(self._conn.record, rows)

    async def _unrecord(self, rows: list[tuple[str, int]]) -> None:
        for mid, i in rows:
            placed = self._placements.get(mid)
            if placed is not None:
                placed.pop(i, None)
                if not placed:
                    del self._placements[mid]

        if rows:
            await self._in_db(self._conn.unrecord, rows)

    # -- repair --------------------------------------------------------------------------------

    async def _repair_loop(self) -> None:
        while True:
            await trio.sleep(self._settings.repair_interval)
            await self._repair()

    async def _serve_repair(self, reply: Reply[int]) -> None:
        reply.ok(await self._repair())

    async def _repair(self) -> int:
        now = trio.current_time()
        gone = {
            key
            for key, since in self._down_since.items()
            if now - since >= self._settings.down_grace
        }
        drop: list[tuple[str, int]] = []
        needy: set[str] = set(self._pending_retry)
        self._pending_retry.clear()
        for mid, placed in self._placements.items():
            if mid in self._forgotten or mid in self._to_place or mid in self._placing:
                continue  # dispersal has it
            live = sum(1 for key in placed.values() if key in self._live)
            dropped = 0
            for i, key in placed.items():
                absent = key not in self._live
                if key in gone or (absent and live < self._params.repair_below):
                    drop.append((mid, i))
                    dropped += 1
            if dropped or live < self._params.repair_below or len(placed) < self._params.n:
                needy.add(mid)
        await self._unrecord(drop)
        for key in gone:
            del self._down_since[key]
        if not needy or not self._live:
            self._pending_retry.update(needy)
            return 0
        count = 0
        ordered = sorted(needy)
        for start in range(0, len(ordered), PLACE_ROUND):
            count += await self._place(ordered[start : start + PLACE_ROUND], repair=True)
        if count:
            log.info("shards: repair placed %d shards", count)
        return count

    # -- audits --------------------------------------------------------------------------------

    async def _audit_loop(self) -> None:
        while True:
            await trio.sleep(self._settings.audit_interval)
            await self._audit()

    async def _serve_audit(self, reply: Reply[AuditReport]) -> None:
        reply.ok(await self._audit())

    async def _audit(self) -> AuditReport:
        by_peer: dict[PeerKey, list[tuple[str, int]]] = {}
        for mid, placed in self._placements.items():
            if mid in self._forgotten:
                continue
            for i, key in placed.items():
                if key in self._live:
                    by_peer.setdefault(key, []).append((mid, i))
        totals = [0, 0, 0, 0]  # audited, failed, bytes out, bytes in
        failed: list[tuple[str, int]] = []

        async def audit(key: PeerKey, sample: list[tuple[str, int]]) -> None:
            peer = self._live.get(key)
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
            reply = await self._request(
                peer.peer, sp.AUDIT, owner=self._owner, oids=list[Value](oids), nonce=nonce
            )
            totals[2] += 64 + 32 * len(oids)
            if isinstance(reply, _Failure):
                if reply.code != "not_connected":
                    self._penalize(key, f"audit not answered: {reply.reason}")
                return
            proofs = dict(zip(_blist(reply["oids"]), _blist(reply["proofs"]), strict=False))
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
                self._penalize(key, f"failed {bad} of {len(sample)} audited shards", bad)

        async with trio.open_nursery() as nursery:
            for key, held in by_peer.items():
                sample = random.sample(held, min(len(held), self._settings.audit_sample))
                nursery.start_soon(audit, key, sample)
        await self._unrecord(failed)
        self._pending_retry.update(m for m, _ in failed)
        return AuditReport(totals[0], totals[1], len(by_peer), totals[2], totals[3])

    # -- forgetting ----------------------------------------------------------------------------

    async def _forget(
        self, memory_ids: tuple[str, ...], envelopes: dict[str, bytes] | None = None
    ) -> None:
        await self._keep_deleted_adds(memory_ids, envelopes or {})
        by_peer: dict[PeerKey, list[tuple[str, int]]] = {}
        for mid in memory_ids:
            for i, key in self._placements.get(mid, {}).items():
                by_peer.setdefault(key, []).append((mid, i))
        done: list[tuple[str, int]] = []
        for key, items in by_peer.items():
            peer = self._live.get(key)
            if peer is None:
                continue  # retried at the next start (the tombstone stays in the store)
            for start in range(0, len(items), sp.MAX_BATCH_OBJECTS):
                batch = items[start : start + sp.MAX_BATCH_OBJECTS]
                oids = [self._shards.shard_id(m, i) for m, i in batch]
                at = self._wall_clock()
                signature = await self._sign(DELETE_CONTEXT, delete_payload(self._owner, at, oids))
                if isinstance(signature, Err):
                    return
                reply = await self._request(
                    peer.peer,
                    sp.DELETE,
                    owner=self._owner,
                    oids=list[Value](oids),
                    at=at,
                    sig=signature.value,
                )
                if not isinstance(reply, _Failure):
                    done.extend(batch)
        await self._unrecord(done)

    # -- the mailbox: pushing ------------------------------------------------------------------

    async def _mail_push(self, entries: tuple[FeedEntry, ...]) -> None:
        fresh = []
        for entry in entries:
            if entry.device_id != self._device_id or entry.seq <= self._outbox_seq:
                continue
            fresh.append(entry)
            self._outbox_seq = entry.seq
        if fresh:
            # Sealed in the worker thread with the insert: a bulk import pushes a group of
            # hundreds, which would hold the event loop (and every actor on it) meanwhile.
            await self._in_db(self._seal_into_outbox, fresh)
            self._mail_wakeup.set()

    def _seal_into_outbox(self, entries: list[FeedEntry]) -> None:
        rows: list[tuple[int, Any, bytes]] = []  # memory id: None for an entry of no memory
        for entry in entries:
            mail_entry = MailEntry.of(entry)
            rows.append((entry.seq, mail_entry.memory_id, self._mail.seal(mail_entry)))
        self._conn.outbox_put(rows)

    async def _keep_deleted_adds(
        self, memory_ids: tuple[str, ...], known: dict[str, bytes]
    ) -> None:
        """Our adds of memories about to lose their shards become whole mailbox items.

        A thin add needs the memory's shards to be completed, and the feed cannot be checked
        past an entry it cannot complete; so before the shards go, the envelope goes into the
        add's own (sealed) item, and the new item replaces the thin one in the mailbox.
        """
        ids = list(memory_ids)
        rows = await self._in_db(self._conn.outbox_naming, ids)
        if not rows:
            return
        missing = [str(m) for _, m, _ in rows if str(m) not in known]
        envelopes = {**known, **(await self._fetch(missing, None) if missing else {})}
        for seq, mid, item in rows:
            envelope = envelopes.get(str(mid))
            if envelope is None:
                continue
            try:
                entry = self._mail.open(self._stream, int(seq), bytes(item)).complete(envelope)
            except FeedError:
                continue
            whole = self._mail.seal(MailEntry(entry.device_id, entry.seq, entry.encoded))
            if len(whole) > MAX_MAIL_ITEM_BYTES:
                # No storage peer takes an item this large (dmgn.shards.MAX_MAIL_ITEM_BYTES):
                # the add stays thin, and a restore stops this feed there.
                log.info("mailbox: the add at %d is too large to keep whole; it stays thin", seq)
                continue
            await self._in_db(self._conn.outbox_replace, int(seq), whole)
            # Every peer known to hold the thin item gets the whole one (the mailbox set moves
            # as peers come and go); a peer not that far yet gets it with the normal push.
            holders = [
                p for p in self._live.values() if p.mail_head is not None and p.mail_head >= seq
            ]
            for peer in holders:
                await self._request(
                    peer.peer,
                    sp.MAIL_PUSH,
                    owner=self._owner,
                    stream=self._stream,
                    first=int(seq),
                    items=[whole],
                )

    def _mailbox_peers(self) -> list[_Peer]:
        usable = [p for k, p in self._live.items() if self._usable(k)]
        usable.sort(key=lambda p: _distance(p.node_id, self._mail_target))
        return usable[: self._settings.mailbox_replicas]

    async def _mail_loop(self) -> None:
        while True:
            with trio.move_on_after(self._settings.sync_interval):
                await self._mail_wakeup.wait()
            self._mail_wakeup = trio.Event()
            async with trio.open_nursery() as nursery:
                for peer in self._mailbox_peers():
                    if peer.mail_head is None or peer.mail_head < self._outbox_seq:
                        # (A peer known to hold all of our stream needs no task this round.)
                        nursery.start_soon(self._push_to, peer)

    async def _push_to(self, peer: _Peer) -> None:
        if peer.mail_head is None:
            heads = await self._request(peer.peer, sp.MAIL_HEADS, owner=self._owner)
            if isinstance(heads, _Failure):
                return
            known = dict(zip(_blist(heads["streams"]), _ilist(heads["seqs"]), strict=False))
            peer.mail_head = known.get(self._stream, 0)
        while peer.mail_head < self._outbox_seq:
            first = peer.mail_head + 1
            rows = await self._in_db(self._conn.outbox_from, first)
            if not rows:
                return
            if int(rows[0][0]) != first:
                # Entries from before this keeper existed: the mailbox starts after them.
                log.info("mailbox: outbox has no entry %d; pushing from %d", first, rows[0][0])
                first = int(rows[0][0])
            items: list[Value] = []
            size = 0
            for n, (seq, item) in enumerate(rows):
                if len(item) > MAX_MAIL_ITEM_BYTES:
                    # Kept whole before storage peers capped items: no peer takes it (and the
                    # schema would refuse to send it), so its thin form goes instead.
                    try:
                        whole = self._mail.open(self._stream, int(seq), bytes(item)).complete()
                    except FeedError as error:
                        log.error("mailbox: our outbox item %d does not open: %s", seq, error)
                        break
                    item = self._mail.seal(MailEntry.of(whole))
                if int(seq) != first + n or (items and size + len(item) > sp.MAX_BATCH_BYTES):
                    break
                items.append(bytes(item))
                size += len(item)
            reply = await self._request(
                peer.peer,
                sp.MAIL_PUSH,
                owner=self._owner,
                stream=self._stream,
                first=first,
                items=items,
            )
            if isinstance(reply, _Failure):
                log.info(
                    "mailbox: %s refused items from %d: %s",
                    peer.node_id.hex()[:16],
                    first,
                    reply.reason,
                )
                peer.refusing_until = trio.current_time() + REFUSAL_BACKOFF
                return
            peer.mail_head = first + len(items) - 1

    # -- the mailbox: pulling, and recovery ----------------------------------------------------

    async def _pull_loop(self) -> None:
        while True:
            now = trio.current_time()
            wake = now + self._settings.sync_interval
            for peer in self._live.values() if self._settings.auto_pull else ():
                wake = min(wake, peer.heads_due)
                if peer.notices:
                    wake = min(wake, peer.heads_asked + NOTICE_GAP)
            with trio.move_on_at(max(wake, now)):
                await self._pull_wakeup.wait()
            # Let the first few peers connect before asking (they usually arrive together).
            await trio.sleep(0.2)
            self._pull_wakeup = trio.Event()
            if self._live and self._settings.auto_pull:
                await self._pull(None, due_only=True)

    async def _serve_recover(
        self, progress: Callable[[int, int], None] | None, reply: Reply[RecoveryReport]
    ) -> None:
        reply.ok(await self._pull(progress))

    async def _pull(
        self, progress: Callable[[int, int], None] | None, *, due_only: bool = False
    ) -> RecoveryReport:
        async with self._pull_lock:
            return await self._pull_locked(progress, due_only)

    def _heads_wanted(
        self, peer: _Peer, now: float, vector: VersionVector, known: dict[bytes, bytes]
    ) -> bool:
        """Whether a periodic pull asks ``peer`` for heads now: it is due, or it told us of
        entries our feeds lack (gossip has usually brought them first: then nothing to ask)."""
        if now >= peer.heads_due:
            return True
        if not peer.notices or now < peer.heads_asked + NOTICE_GAP:
            return False
        news = any(
            stream not in known or vector[known[stream]] < seq
            for stream, seq in peer.notices.items()
        )
        peer.notices.clear()
        return news

    async def _pull_locked(
        self, progress: Callable[[int, int], None] | None, due_only: bool
    ) -> RecoveryReport:
        started = trio.current_time()
        vector_result = await self._vector()
        vector = vector_result.value if isinstance(vector_result, Ok) else VersionVector()
        known_streams = {self._mail.stream_id(d): d for d in vector}
        known_streams[self._stream] = self._device_id
        now = trio.current_time()
        peers = [
            peer
            for peer in self._live.values()
            if not due_only or self._heads_wanted(peer, now, vector, known_streams)
        ]
        heads: dict[bytes, list[tuple[int, _Peer]]] = {}

        async def ask_heads(peer: _Peer) -> None:
            # Due again in a sync interval unless it watches for us (then much later).
            peer.heads_asked = trio.current_time()
            peer.heads_due = peer.heads_asked + self._settings.sync_interval
            peer.notices.clear()
            reply = await self._request(peer.peer, sp.MAIL_HEADS, owner=self._owner, watch=1)
            if isinstance(reply, _Failure):
                return
            watch = reply.fields.get("watch", 0)
            if isinstance(watch, int) and watch > 0:
                poll = min(self._settings.mail_poll_interval, watch / 2)
                peer.heads_due = peer.heads_asked + poll
            for stream, seq in zip(_blist(reply["streams"]), _ilist(reply["seqs"]), strict=False):
                heads.setdefault(stream, []).append((seq, peer))
                if stream == self._stream:
                    peer.mail_head = seq

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask_heads, peer)
        pulled: dict[bytes, list[MailEntry]] = {}
        #: Per pulled stream, the entries still missing after this pull (none, once ingested).
        missing: dict[bytes, int] = {}
        for stream, offers in heads.items():
            device = known_streams.get(stream)
            have = vector[device] if device is not None else 0
            offers.sort(key=lambda offer: -offer[0])
            if offers[0][0] > have:
                pulled[stream] = await self._pull_stream(stream, have + 1, offers)
                missing[stream] = offers[0][0] - have
        needed = sorted(
            {e.memory_id for entries in pulled.values() for e in entries if e.memory_id}
        )
        local = await self._local_envelopes(needed)
        remote_ids = [m for m in needed if m not in local]
        fetched = await self._fetch(remote_ids, progress)
        envelopes = {**local, **fetched}
        unrecoverable: list[str] = []
        ingested = 0
        for stream, entries in pulled.items():
            complete: list[FeedEntry] = []
            for mail_entry in entries:
                mid = mail_entry.memory_id
                try:
                    complete.append(mail_entry.complete(envelopes.get(mid) if mid else None))
                    continue
                except FeedError:
                    pass
                # A thin add whose shards are gone (the memory was deleted): another peer may
                # hold the whole item that replaced it.
                whole = await self._whole_item(stream, mail_entry.seq, heads.get(stream, []))
                if whole is not None:
                    complete.append(whole)
                    continue
                # This feed stops here: what follows cannot be checked without this entry.
                if mid is not None:
                    unrecoverable.append(mid)
                break
            for start in range(0, len(complete), INGEST_BATCH):
                result = await self._ingest(tuple(complete[start : start + INGEST_BATCH]))
                if isinstance(result, Err):
                    log.warning("mailbox: fetched entries rejected: %s", result.reason)
                    break
                ingested += result.value
                missing[stream] -= min(INGEST_BATCH, len(complete) - start)
        # A stream we could not complete (shards not found yet, a peer that answered short):
        # its peers are asked again next sync round, not only at their next poll.
        retry = trio.current_time() + self._settings.sync_interval
        for stream, left in missing.items():
            if left > 0:
                for _, peer in heads[stream]:
                    peer.heads_due = min(peer.heads_due, retry)
        if fetched:
            self._to_place.update(fetched)  # top up what was lost while we were away
            self._place_wakeup.set()
        if ingested:
            log.info(
                "mailbox: %d entries and %d memories from storage peers", ingested, len(fetched)
            )
        return RecoveryReport(
            len(pulled),
            ingested,
            len(fetched),
            tuple(sorted(set(unrecoverable))),
            len(peers),
            trio.current_time() - started,
        )

    async def _whole_item(
        self, stream: bytes, seq: int, offers: list[tuple[int, _Peer]]
    ) -> FeedEntry | None:
        for offered, peer in offers:
            if offered < seq:
                continue
            reply = await self._request(
                peer.peer, sp.MAIL_PULL, owner=self._owner, stream=stream, first=seq, last=seq
            )
            if isinstance(reply, _Failure):
                continue
            for item in _blist(reply["items"])[:1]:
                try:
                    entry = self._mail.open(stream, seq, item)
                    if entry.full is not None:
                        return entry.complete()
                except FeedError as error:
                    self._penalize(_peer_key(peer.peer), str(error))
        return None

    async def _pull_stream(
        self, stream: bytes, first: int, offers: list[tuple[int, _Peer]]
    ) -> list[MailEntry]:
        """Entries of ``stream`` from ``first`` on, from the peer offering most; a peer whose
        items do not decrypt in place is scored down and the next one asked."""
        entries: list[MailEntry] = []
        seq = first
        for offered, peer in offers:
            while seq <= offered:
                reply = await self._request(
                    peer.peer,
                    sp.MAIL_PULL,
                    owner=self._owner,
                    stream=stream,
                    first=seq,
                    last=min(offered, seq + sp.MAX_MAIL_BATCH - 1),
                )
                if isinstance(reply, _Failure):
                    break
                items = _blist(reply["items"])
                if not items:
                    self._penalize(_peer_key(peer.peer), "mailbox claimed items it does not give")
                    break
                try:
                    for item in items:
                        entries.append(self._mail.open(stream, seq, item))
                        seq += 1
                except FeedError as error:
                    self._penalize(_peer_key(peer.peer), str(error))
                    break
        return entries

    async def _local_envelopes(self, ids: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(ids), 512):
            result = await self._envelopes(tuple(ids[start : start + 512]))
            if isinstance(result, Ok):
                found.update(result.value)
        return found

    async def _fetch(
        self, ids: list[str], progress: Callable[[int, int], None] | None
    ) -> dict[str, bytes]:
        """Rebuild envelopes from shards held by any live peer."""
        found: dict[str, bytes] = {}
        done = 0
        limit = trio.CapacityLimiter(FETCH_PARALLEL)
        holders: list[tuple[str, int, PeerKey]] = []

        async def fetch_chunk(chunk: list[str]) -> None:
            nonlocal done
            async with limit:
                wanted = {
                    self._shards.shard_id(m, i): (m, i)
                    for m in chunk
                    for i in range(self._params.n)
                }
                got: dict[str, dict[int, bytes]] = {}

                async def ask(peer: _Peer) -> None:
                    reply = await self._request(
                        peer.peer, sp.GET, owner=self._owner, oids=list[Value](wanted)
                    )
                    if isinstance(reply, _Failure):
                        return
                    key = _peer_key(peer.peer)
                    for oid, blob in zip(
                        _blist(reply["oids"]), _blist(reply["blobs"]), strict=False
                    ):
                        where = wanted.get(oid)
                        if where is None:
                            continue
                        mid, i = where
                        if not self._shards.check(mid, i, blob):
                            self._penalize(key, f"served a corrupt shard of {mid[:12]}")
                            continue
                        got.setdefault(mid, {})[i] = blob
                        holders.append((mid, i, key))

                async with trio.open_nursery() as nursery:
                    for peer in list(self._live.values()):
                        nursery.start_soon(ask, peer)
                for mid in chunk:
                    try:
                        found[mid] = decode_shards(
                            mid, got.get(mid, {}), self._shards, self._params
                        )
                    except ShardError as error:
                        log.warning("restore: %s", error)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(ids))

        async with trio.open_nursery() as nursery:
            for start in range(0, len(ids), FETCH_CHUNK):
                nursery.start_soon(fetch_chunk, ids[start : start + FETCH_CHUNK])
        if progress is not None and not ids:
            progress(0, 0)
        # Where the shards were found is where they are: keep auditing and repairing them.
        unique: dict[tuple[str, int], PeerKey] = {}
        for mid, i, key in holders:
            if mid in found:
                unique.setdefault((mid, i), key)
        await self._record([(m, i, k) for (m, i), k in unique.items()])
        return found

    # -- status --------------------------------------------------------------------------------

    def _durability(self) -> Durability:
        k = self._params.k
        durable = at_risk = lost = complete = 0
        memories = 0
        for mid, placed in self._placements.items():
            if mid in self._forgotten:
                continue
            memories += 1
            live = sum(1 for key in placed.values() if key in self._live)
            durable += live >= k
            complete += live >= self._params.n
            at_risk += live < self._params.repair_below
            lost += live < k
        waiting = self._to_place | self._pending_retry
        never_placed = sum(
            1 for mid in waiting if mid not in self._placements and mid not in self._forgotten
        )
        responsible = memories + never_placed
        return Durability(
            k,
            self._params.n,
            memories,
            complete,
            durable,
            at_risk,
            lost,
            len(waiting),
            len(self._live),
            self._outbox_seq,
            {key.hex()[:16]: score for key, score in self._scores.items()},
            self.repair_bytes,
            durable / responsible if responsible else 1.0,
        )


def _batches(
    items: list[tuple[str, int, bytes, bytes]],
) -> Iterable[list[tuple[str, int, bytes, bytes]]]:
    batch: list[tuple[str, int, bytes, bytes]] = []
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


def _blist(value: Value) -> list[bytes]:
    return [v for v in value if isinstance(v, bytes)] if isinstance(value, list) else []


def _ilist(value: Value) -> list[int]:
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []
