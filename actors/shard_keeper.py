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

This module is the actor: its messages, its settings and its dispatch. The work is done by
private helpers, one part each: :mod:`actors._keeper_peers` (the live storage peers, their
scores, requests and answers), :mod:`actors._keeper_placement` (dispersal, repair, forgetting),
:mod:`actors._keeper_health` (what a repair drops and places again, durability counts; sans-IO),
:mod:`actors._keeper_audit`, :mod:`actors._keeper_mailbox` (pushing),
:mod:`actors._keeper_recovery` (pulling, restore) and :mod:`actors._keeper_tables` (the rows).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import assert_never

import trio

from actors._keeper_audit import AuditReport, Audits
from actors._keeper_health import Durability
from actors._keeper_mailbox import Outbox
from actors._keeper_peers import AVOID_SCORE, PENALTY, StoragePeers
from actors._keeper_placement import Placements
from actors._keeper_recovery import Recovery, RecoveryReport
from actors._keeper_tables import DuckKeeperTables, KeeperDb, KeeperTables
from actors.runtime import Mailbox, Reply, Result
from dmgn.feed import FeedEntry, VersionVector
from dmgn.shards import MailKeys, ShardKeys, ShardParams
from wire import Message, PeerIdentity

__all__ = [
    "AVOID_SCORE",
    "PENALTY",
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
    "PeerReputation",
    "Recover",
    "RecoveryReport",
    "RepairNow",
    "ShardKeeper",
    "StoragePeerDown",
    "StoragePeerUp",
    "StorageReply",
    "SyncMailbox",
]


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
    one never seen). Below :data:`actors._keeper_peers.PLACEMENT_FLOOR` the peer gets no new
    shards or mailbox items, whatever its audit score here."""

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
    :meth:`actors._keeper_mailbox.Outbox.keep_deleted_adds`); missing ones are rebuilt from
    shards."""

    memory_ids: tuple[str, ...]
    envelopes: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class MailPush:
    """Entries this device just published: seal them into the mailbox; no answer."""

    entries: tuple[FeedEntry, ...]


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
class AuditNow:
    reply: Reply[AuditReport]


@dataclass(frozen=True, slots=True)
class RepairNow:
    """Run a repair round now; answers how many shards were placed."""

    reply: Reply[int]


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
        settings = settings or KeeperSettings()
        params = settings.params
        self._db = KeeperDb()
        self._peers = StoragePeers(
            owner=owner,
            send=send,
            sign=sign,
            close=close,
            request_timeout=settings.request_timeout,
        )
        self._placements = Placements(
            peers=self._peers,
            db=self._db,
            owner=owner,
            shard_keys=shard_keys,
            params=params,
            sign=sign,
            envelopes=envelopes,
            inventory=inventory,
            forget_stale=self._forget_later,
            wall_clock=wall_clock,
            repair_interval=settings.repair_interval,
            down_grace=settings.down_grace,
        )
        self._audits = Audits(
            peers=self._peers,
            placements=self._placements,
            owner=owner,
            shard_keys=shard_keys,
            params=params,
            envelopes=envelopes,
            interval=settings.audit_interval,
            sample=settings.audit_sample,
        )
        self._recovery = Recovery(
            peers=self._peers,
            placements=self._placements,
            owner=owner,
            device_id=device_id,
            shard_keys=shard_keys,
            params=params,
            mail_keys=mail_keys,
            envelopes=envelopes,
            ingest=ingest,
            vector=vector,
            sync_interval=settings.sync_interval,
            mail_poll_interval=settings.mail_poll_interval,
            auto_pull=settings.auto_pull,
        )
        self._outbox = Outbox(
            peers=self._peers,
            db=self._db,
            owner=owner,
            device_id=device_id,
            mail_keys=mail_keys,
            fetch=self._recovery.fetch,
            replicas=settings.mailbox_replicas,
            sync_interval=settings.sync_interval,
        )
        self._nursery: trio.Nursery | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._db.open(await trio.to_thread.run_sync(self._open))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self._peers.nursery = nursery
                nursery.start_soon(self._placements.place_loop)
                nursery.start_soon(self._outbox.loop)
                nursery.start_soon(self._recovery.loop)
                nursery.start_soon(self._audits.loop)
                nursery.start_soon(self._placements.repair_loop)
                task_status.started()
                async for message in self.mailbox:
                    await self._handle(message)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = self._peers.nursery = None
            db = self._db.close()
            if db is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(db.close)

    def _open(self) -> KeeperTables:
        db = self._given_tables or DuckKeeperTables(self._path)
        self._placements.load(db.placements())
        self._outbox.seq = db.outbox_last()
        return db

    async def _handle(self, message: KeeperMsg) -> None:
        assert self._nursery is not None
        match message:
            case StoragePeerUp(peer):
                self._peers.up(peer)
                self._placements.wake()
                self._outbox.wake()
                self._recovery.wake()
            case PeerReputation(peer, score):
                self._peers.set_reputation(peer, score)
            case StoragePeerDown(peer):
                self._peers.down(peer)
            case MailNotice(peer, notice):
                self._recovery.take_notice(peer, notice)
            case StorageReply(peer, reply):
                self._peers.answer(peer, reply)
            case Disperse(ids):
                self._placements.disperse(ids)
            case Forget(ids, envelopes):
                self._placements.forget(ids)
                self._nursery.start_soon(self._forget, ids, dict(envelopes))
            case MailPush(entries):
                await self._outbox.push(entries)
            case Recover(progress, reply):
                self._nursery.start_soon(self._serve_recover, progress, reply)
            case SyncMailbox(reply):
                self._nursery.start_soon(self._serve_recover, None, reply)
            case AuditNow(reply):
                self._nursery.start_soon(self._serve_audit, reply)
            case RepairNow(reply):
                self._nursery.start_soon(self._serve_repair, reply)
            case KeeperState(reply):
                reply.ok(self._placements.durability(mailbox_items=self._outbox.seq))
            case _:
                assert_never(message)

    # -- requests that take a while, each in a task ------------------------------------------

    async def _serve_recover(
        self, progress: Callable[[int, int], None] | None, reply: Reply[RecoveryReport]
    ) -> None:
        reply.ok(await self._recovery.pull(progress))

    async def _serve_audit(self, reply: Reply[AuditReport]) -> None:
        reply.ok(await self._audits.audit())

    async def _serve_repair(self, reply: Reply[int]) -> None:
        reply.ok(await self._placements.repair())

    # -- forgetting ----------------------------------------------------------------------------

    def _forget_later(self, memory_ids: tuple[str, ...]) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._forget, memory_ids)

    async def _forget(
        self, memory_ids: tuple[str, ...], envelopes: dict[str, bytes] | None = None
    ) -> None:
        """Our adds of these memories are kept whole in the mailbox first (the shards they
        need are about to go), then their shards are deleted."""
        await self._outbox.keep_deleted_adds(memory_ids, envelopes or {})
        await self._placements.delete_shards(memory_ids)
