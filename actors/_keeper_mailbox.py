"""The shard keeper's mailbox, pushing side: our feed entries, sealed, onto storage peers.

Every entry this device publishes is sealed (:class:`dmgn.shards.MailKeys`), kept in the
keeper's outbox (its tables) and pushed to the ``replicas`` usable peers XOR-closest to the
identity's blinded mailbox target, each from where it stands (its head of our stream, asked
once). The pulling side, and restore, are :mod:`actors._keeper_recovery`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from actors._keeper_peers import REFUSAL_BACKOFF, Failure, StoragePeer, StoragePeers, blist, ilist
from actors._keeper_tables import KeeperDb
from dmgn import storage_protocol as sp
from dmgn.feed import FeedEntry, FeedError
from dmgn.shards import MAX_MAIL_ITEM_BYTES, MailEntry, MailKeys
from wire import Value

log = logging.getLogger("dmgn.shards")

__all__ = ["Outbox"]

#: Rebuilds envelopes from shards (:meth:`actors._keeper_recovery.Recovery.fetch`).
Fetch = Callable[[list[str], Callable[[int, int], None] | None], Awaitable[dict[str, bytes]]]


class Outbox:
    """Our sealed entries, and the rounds that push them to the mailbox's peers."""

    def __init__(
        self,
        *,
        peers: StoragePeers,
        db: KeeperDb,
        owner: bytes,
        device_id: bytes,
        mail_keys: MailKeys,
        fetch: Fetch,
        replicas: int,
        sync_interval: float,
    ) -> None:
        self._peers = peers
        self._db = db
        self._owner = owner
        self._device_id = device_id
        self._mail = mail_keys
        self._fetch = fetch
        self._replicas = replicas
        self._sync_interval = sync_interval
        self.stream = mail_keys.stream_id(device_id)
        self._target = mail_keys.mailbox_target(owner)
        #: The highest seq in the outbox (entries of ours sealed so far).
        self.seq = 0
        self._wakeup = trio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def push(self, entries: tuple[FeedEntry, ...]) -> None:
        fresh = []
        for entry in entries:
            if entry.device_id != self._device_id or entry.seq <= self.seq:
                continue
            fresh.append(entry)
            self.seq = entry.seq
        if fresh:
            # Sealed in the worker thread with the insert: a bulk import pushes a group of
            # hundreds, which would hold the event loop (and every actor on it) meanwhile.
            await self._db.run(self._seal_into_outbox, fresh)
            self.wake()

    def _seal_into_outbox(self, entries: list[FeedEntry]) -> None:
        rows: list[tuple[int, Any, bytes]] = []  # memory id: None for an entry of no memory
        for entry in entries:
            mail_entry = MailEntry.of(entry)
            rows.append((entry.seq, mail_entry.memory_id, self._mail.seal(mail_entry)))
        self._db.tables.outbox_put(rows)

    async def keep_deleted_adds(self, memory_ids: tuple[str, ...], known: dict[str, bytes]) -> None:
        """Our adds of memories about to lose their shards become whole mailbox items.

        A thin add needs the memory's shards to be completed, and the feed cannot be checked
        past an entry it cannot complete; so before the shards go, the envelope goes into the
        add's own (sealed) item, and the new item replaces the thin one in the mailbox.
        """
        ids = list(memory_ids)
        rows = await self._db.run(self._db.tables.outbox_naming, ids)
        if not rows:
            return
        missing = [str(m) for _, m, _ in rows if str(m) not in known]
        envelopes = {**known, **(await self._fetch(missing, None) if missing else {})}
        for seq, mid, item in rows:
            envelope = envelopes.get(str(mid))
            if envelope is None:
                continue
            try:
                entry = self._mail.open(self.stream, int(seq), bytes(item)).complete(envelope)
            except FeedError:
                continue
            whole = self._mail.seal(MailEntry(entry.device_id, entry.seq, entry.encoded))
            if len(whole) > MAX_MAIL_ITEM_BYTES:
                # No storage peer takes an item this large (dmgn.shards.MAX_MAIL_ITEM_BYTES):
                # the add stays thin, and a restore stops this feed there.
                log.info("mailbox: the add at %d is too large to keep whole; it stays thin", seq)
                continue
            await self._db.run(self._db.tables.outbox_replace, int(seq), whole)
            # Every peer known to hold the thin item gets the whole one (the mailbox set moves
            # as peers come and go); a peer not that far yet gets it with the normal push.
            holders = [
                p
                for p in self._peers.live.values()
                if p.mail_head is not None and p.mail_head >= seq
            ]
            for peer in holders:
                await self._peers.request(
                    peer.peer,
                    sp.MAIL_PUSH,
                    owner=self._owner,
                    stream=self.stream,
                    first=int(seq),
                    items=[whole],
                )

    async def loop(self) -> None:
        while True:
            with trio.move_on_after(self._sync_interval):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            async with trio.open_nursery() as nursery:
                for peer in self._peers.nearest(self._target, self._replicas):
                    if peer.mail_head is None or peer.mail_head < self.seq:
                        # (A peer known to hold all of our stream needs no task this round.)
                        nursery.start_soon(self._push_to, peer)

    async def _push_to(self, peer: StoragePeer) -> None:
        if peer.mail_head is None:
            heads = await self._peers.request(peer.peer, sp.MAIL_HEADS, owner=self._owner)
            if isinstance(heads, Failure):
                return
            known = dict(zip(blist(heads["streams"]), ilist(heads["seqs"]), strict=False))
            peer.mail_head = known.get(self.stream, 0)
        while peer.mail_head < self.seq:
            first = peer.mail_head + 1
            rows = await self._db.run(self._db.tables.outbox_from, first)
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
                        whole = self._mail.open(self.stream, int(seq), bytes(item)).complete()
                    except FeedError as error:
                        log.error("mailbox: our outbox item %d does not open: %s", seq, error)
                        break
                    item = self._mail.seal(MailEntry.of(whole))
                if int(seq) != first + n or (items and size + len(item) > sp.MAX_BATCH_BYTES):
                    break
                items.append(bytes(item))
                size += len(item)
            reply = await self._peers.request(
                peer.peer,
                sp.MAIL_PUSH,
                owner=self._owner,
                stream=self.stream,
                first=first,
                items=items,
            )
            if isinstance(reply, Failure):
                log.info(
                    "mailbox: %s refused items from %d: %s",
                    peer.node_id.hex()[:16],
                    first,
                    reply.reason,
                )
                peer.refusing_until = trio.current_time() + REFUSAL_BACKOFF
                return
            peer.mail_head = first + len(items) - 1
