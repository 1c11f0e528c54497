"""The shard keeper's mailbox, pulling side, and restore: what our feeds lack, from storage peers.

The keeper asks each storage peer for its heads when it connects (and so at start), asks it to
watch our mailbox (``mail.notify`` when another device pushes there), and pulls the entries our
feeds lack: at once on a notice our feeds do not cover yet, and otherwise every
``mail_poll_interval`` from a watching peer (every ``sync_interval`` from one that does not
watch). Thin adds are rebuilt from shards (:meth:`Recovery.fetch`, any k of n) and the entries
handed to gossip (``ingest``), which checks continuity and signatures: a mailbox that drops,
reorders or forges entries is detected and scored down here. ``dmgn restore --from-network``
is the same pull, for everything, with progress. The pushing side is
:mod:`actors._keeper_mailbox`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from actors._keeper_peers import (
    Failure,
    PeerKey,
    StoragePeer,
    StoragePeers,
    blist,
    ilist,
    peer_key,
)
from actors._keeper_placement import Placements
from actors.runtime import Err, Ok, Result
from dmgn import storage_protocol as sp
from dmgn.feed import FeedEntry, FeedError, VersionVector
from dmgn.shards import MailEntry, MailKeys, ShardError, ShardKeys, ShardParams, decode_shards
from wire import Message, PeerIdentity, Value

log = logging.getLogger("dmgn.shards")

__all__ = ["Recovery", "RecoveryReport"]

#: Memories fetched per request round in a restore (x n shard ids <= MAX_BATCH_OBJECTS).
FETCH_CHUNK = 40
#: Fetch rounds in flight at once during a restore.
FETCH_PARALLEL = 8
#: Entries handed to gossip per Ingest.
INGEST_BATCH = 512
#: A storage peer's notices make us ask it for heads at most this often (a peer sending
#: notice after notice gets one ask per gap, not one per notice).
NOTICE_GAP = 5.0
#: Streams with a pending notice remembered per peer (a mailbox answers for MAX_STREAMS).
MAX_NOTICES = sp.MAX_STREAMS

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    streams: int
    entries: int
    memories: int
    unrecoverable: tuple[str, ...]
    storage_peers: int
    seconds: float


class Recovery:
    """Pulls from the mailbox (periodically, on notice, or for a restore) and rebuilds
    memories from shards."""

    def __init__(
        self,
        *,
        peers: StoragePeers,
        placements: Placements,
        owner: bytes,
        device_id: bytes,
        shard_keys: ShardKeys,
        params: ShardParams,
        mail_keys: MailKeys,
        envelopes: Callable[[tuple[str, ...]], Awaitable[Result[dict[str, bytes]]]],
        ingest: Callable[[tuple[FeedEntry, ...]], Awaitable[Result[int]]],
        vector: Callable[[], Awaitable[Result[VersionVector]]],
        sync_interval: float,
        mail_poll_interval: float,
        auto_pull: bool,
    ) -> None:
        self._peers = peers
        self._placements = placements
        self._owner = owner
        self._device_id = device_id
        self._shards = shard_keys
        self._params = params
        self._mail = mail_keys
        self._envelopes = envelopes
        self._ingest = ingest
        self._vector = vector
        self._sync_interval = sync_interval
        self._mail_poll_interval = mail_poll_interval
        self._auto_pull = auto_pull
        self._stream = mail_keys.stream_id(device_id)
        self._wakeup = trio.Event()
        self._lock = trio.Lock()

    def wake(self) -> None:
        self._wakeup.set()

    def take_notice(self, peer: PeerIdentity, notice: Message) -> None:
        live = self._peers.live.get(peer_key(peer))
        if live is None or notice.get_bytes("owner") != self._owner:
            return  # not one of our storage peers now, or not about our mailbox
        stream, seq = notice.get_bytes("stream"), notice.get_int("seq")
        if stream not in live.notices and len(live.notices) >= MAX_NOTICES:
            return
        live.notices[stream] = max(seq, live.notices.get(stream, 0))
        self.wake()

    async def loop(self) -> None:
        while True:
            now = trio.current_time()
            wake = now + self._sync_interval
            for peer in self._peers.live.values() if self._auto_pull else ():
                wake = min(wake, peer.heads_due)
                if peer.notices:
                    wake = min(wake, peer.heads_asked + NOTICE_GAP)
            with trio.move_on_at(max(wake, now)):
                await self._wakeup.wait()
            # Let the first few peers connect before asking (they usually arrive together).
            await trio.sleep(0.2)
            self._wakeup = trio.Event()
            if self._peers.live and self._auto_pull:
                await self.pull(None, due_only=True)

    async def pull(self, progress: Progress | None, *, due_only: bool = False) -> RecoveryReport:
        async with self._lock:
            return await self._pull_locked(progress, due_only)

    def _heads_wanted(
        self, peer: StoragePeer, now: float, vector: VersionVector, known: dict[bytes, bytes]
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

    async def _pull_locked(self, progress: Progress | None, due_only: bool) -> RecoveryReport:
        started = trio.current_time()
        vector_result = await self._vector()
        vector = vector_result.value if isinstance(vector_result, Ok) else VersionVector()
        known_streams = {self._mail.stream_id(d): d for d in vector}
        known_streams[self._stream] = self._device_id
        now = trio.current_time()
        peers = [
            peer
            for peer in self._peers.live.values()
            if not due_only or self._heads_wanted(peer, now, vector, known_streams)
        ]
        heads: dict[bytes, list[tuple[int, StoragePeer]]] = {}

        async def ask_heads(peer: StoragePeer) -> None:
            # Due again in a sync interval unless it watches for us (then much later).
            peer.heads_asked = trio.current_time()
            peer.heads_due = peer.heads_asked + self._sync_interval
            peer.notices.clear()
            reply = await self._peers.request(peer.peer, sp.MAIL_HEADS, owner=self._owner, watch=1)
            if isinstance(reply, Failure):
                return
            watch = reply.fields.get("watch", 0)
            if isinstance(watch, int) and watch > 0:
                poll = min(self._mail_poll_interval, watch / 2)
                peer.heads_due = peer.heads_asked + poll
            for stream, seq in zip(blist(reply["streams"]), ilist(reply["seqs"]), strict=False):
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
        fetched = await self.fetch(remote_ids, progress)
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
        retry = trio.current_time() + self._sync_interval
        for stream, left in missing.items():
            if left > 0:
                for _, peer in heads[stream]:
                    peer.heads_due = min(peer.heads_due, retry)
        if fetched:
            self._placements.top_up(fetched)
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
        self, stream: bytes, seq: int, offers: list[tuple[int, StoragePeer]]
    ) -> FeedEntry | None:
        for offered, peer in offers:
            if offered < seq:
                continue
            reply = await self._peers.request(
                peer.peer, sp.MAIL_PULL, owner=self._owner, stream=stream, first=seq, last=seq
            )
            if isinstance(reply, Failure):
                continue
            for item in blist(reply["items"])[:1]:
                try:
                    entry = self._mail.open(stream, seq, item)
                    if entry.full is not None:
                        return entry.complete()
                except FeedError as error:
                    self._peers.penalize(peer_key(peer.peer), str(error))
        return None

    async def _pull_stream(
        self, stream: bytes, first: int, offers: list[tuple[int, StoragePeer]]
    ) -> list[MailEntry]:
        """Entries of ``stream`` from ``first`` on, from the peer offering most; a peer whose
        items do not decrypt in place is scored down and the next one asked."""
        entries: list[MailEntry] = []
        seq = first
        for offered, peer in offers:
            while seq <= offered:
                reply = await self._peers.request(
                    peer.peer,
                    sp.MAIL_PULL,
                    owner=self._owner,
                    stream=stream,
                    first=seq,
                    last=min(offered, seq + sp.MAX_MAIL_BATCH - 1),
                )
                if isinstance(reply, Failure):
                    break
                items = blist(reply["items"])
                if not items:
                    self._peers.penalize(
                        peer_key(peer.peer), "mailbox claimed items it does not give"
                    )
                    break
                try:
                    for item in items:
                        entries.append(self._mail.open(stream, seq, item))
                        seq += 1
                except FeedError as error:
                    self._peers.penalize(peer_key(peer.peer), str(error))
                    break
        return entries

    async def _local_envelopes(self, ids: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(ids), 512):
            result = await self._envelopes(tuple(ids[start : start + 512]))
            if isinstance(result, Ok):
                found.update(result.value)
        return found

    async def fetch(self, ids: list[str], progress: Progress | None) -> dict[str, bytes]:
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

                async def ask(peer: StoragePeer) -> None:
                    reply = await self._peers.request(
                        peer.peer, sp.GET, owner=self._owner, oids=list[Value](wanted)
                    )
                    if isinstance(reply, Failure):
                        return
                    key = peer_key(peer.peer)
                    for oid, blob in zip(blist(reply["oids"]), blist(reply["blobs"]), strict=False):
                        where = wanted.get(oid)
                        if where is None:
                            continue
                        mid, i = where
                        if not self._shards.check(mid, i, blob):
                            self._peers.penalize(key, f"served a corrupt shard of {mid[:12]}")
                            continue
                        got.setdefault(mid, {})[i] = blob
                        holders.append((mid, i, key))

                async with trio.open_nursery() as nursery:
                    for peer in list(self._peers.live.values()):
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
        await self._placements.record([(m, i, k) for (m, i), k in unique.items()])
        return found
