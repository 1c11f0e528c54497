"""The gossip actor: device feeds, version vectors and sync sessions with our other devices.

What it owns: the node's copy of every device feed of our identity (an append-only log file in
the data dir, *not* the store's DuckDB file), the version vector summarising it, and the state of
each sync session. The memory service :class:`Publish`-es local changes; the transport reports
peers (:class:`PeerUp` / :class:`PeerDown`) and hands over their gossip messages
(:class:`Inbound`); verified remote ops go to the *apply* address (the service) as
:class:`ApplyOps` requests, which is the only way anything a peer sent reaches the store.

Protocol (message schemas below, registered with ``wire``'s schema registry):

* ``gossip.vector {heads, ask}``: "I have at least these seqs". Sent with ``ask=True`` when a
  device connects, every ``sync_interval`` (anti-entropy) and on :class:`SyncNow`; the receiver
  answers with its own vector (``ask=False``). A partial vector (``ask=False``) also announces a
  new entry that could not be pushed directly.
* ``gossip.want {device, first, last}``: "send me these entries of that feed" (≤
  ``MAX_WANT_ENTRIES``). Catching up is *pulled* by the receiver, one request per feed at a time,
  so a node that is far behind controls its own pace (flow control) and never gets the same
  range from two peers at once.
* ``gossip.ops {entries}``: entries in feed order (answers to wants, or live pushes of an entry
  that directly follows what the peer is known to have).

Safety rules: every entry is decoded strictly, checked for continuity (seq and hash chain) and
for the identity's signature (and an added envelope's signature) *before* anything is applied; a
batch with one bad entry is applied not at all, and its sender is cut off with a logged reason and
a lower score. Entries are applied before they are logged, so a crash between the two re-fetches
and re-applies (applying is idempotent) instead of losing an op. Peers are rate limited on
messages and on wasted work (duplicates, out-of-sequence entries); new, valid entries are never
penalised, because only a holder of the identity key can make them.

Convergence rules (order independent across feeds): memories are immutable and content-addressed;
a delete is a tombstone that wins over any add, before or after; a link and an unlink of the same
edge resolve last-writer-wins by ``(at, device_id, seq)`` of their entries, decided here so the
store only sees the winners.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar, assert_never

import trio

from actors._feed_log import FeedLog, _Feed
from actors._gossip_limits import (
    APPLY_TIMEOUT,
    CUT_OFF_PENALTY,
    DEFAULT_SYNC_INTERVAL,
    MAX_BATCH_BYTES,
    MAX_BATCH_ENTRIES,
    MAX_PENDING_WANTS,
    MAX_WANT_ENTRIES,
    MESSAGE_BURST,
    MESSAGE_RATE,
    OUTBOX_MESSAGES,
    PUBLISH_GROUP_MAX,
    REFUSE_SCORE,
    THREAD_VERIFY_THRESHOLD,
    WANT_TIMEOUT,
    WASTE_BURST,
    WASTE_RATE,
)
from actors._gossip_peers import _Misbehaved, _Peer, _Reputation, _Serve
from actors._gossip_wire import (
    GOSSIP_MESSAGE_TYPES,
    GOSSIP_REGISTRY,
    OPS,
    VECTOR,
    WANT,
    _ops_message,
    _vector_message,
)
from actors.runtime import Address, Err, Mailbox, Ok, Reply, Result, call
from dmgn.errors import DmgnError
from dmgn.feed import (
    FEED_ENTRY_CONTEXT,
    MAX_ENTRY_BYTES,
    AddMemory,
    Delete,
    FeedEntry,
    FeedError,
    FeedHead,
    Link,
    Op,
    Unlink,
    UnsignedEntry,
    VersionVector,
    check_continuity,
    decode_entry,
)
from wire import (
    Message,
    WireError,
)

log = logging.getLogger("dmgn.gossip")
R = TypeVar("R")

#: The inbox: a burst of ops from every connected device, and the service's publishes.
INBOX_CAPACITY = 256

#: Signs ``(at_ns, op)`` items as the next entries of a feed after a head, in order; an op that
#: cannot be an entry gets its ``Err`` in its place (the node passes ``vault.SignFeed``).
SignFeed = Callable[
    [FeedHead | None, bytes, tuple[tuple[int, Op], ...]],
    Awaitable[Result[list[FeedEntry | Err]]],
]

__all__ = [
    "CUT_OFF_PENALTY",
    "DEFAULT_SYNC_INTERVAL",
    "GOSSIP_MESSAGE_TYPES",
    "GOSSIP_REGISTRY",
    "INBOX_CAPACITY",
    "MAX_WANT_ENTRIES",
    "MESSAGE_BURST",
    "OPS",
    "PUBLISH_GROUP_MAX",
    "REFUSE_SCORE",
    "VECTOR",
    "WANT",
    "WANT_TIMEOUT",
    "WASTE_BURST",
    "ApplyMsg",
    "ApplyOps",
    "FeedLog",
    "GossipActor",
    "GossipMsg",
    "GossipStatus",
    "Heads",
    "Inbound",
    "Ingest",
    "PeerDown",
    "PeerStatus",
    "PeerUp",
    "Publish",
    "PublishMany",
    "SyncNow",
    "SyncState",
]

# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """A local change, already applied by the service: sign it, log it durably, push it.

    Answered with the signed entry once it is in the durable log.
    """

    op: Op
    reply: Reply[FeedEntry]


@dataclass(frozen=True, slots=True)
class PublishMany:
    """Local changes of one bulk add, in order (at most ``PUBLISH_GROUP_MAX``): signed, logged
    with one disk sync and pushed like a group of :class:`Publish`, without a message (and a
    waiting task) per op.

    Answered with the signed entries once they are in the durable log; an ``Err`` if an op
    could not be signed (those before it are logged; the rest are published at the next start).
    """

    ops: tuple[Op, ...]
    reply: Reply[tuple[FeedEntry, ...]]


@dataclass(frozen=True, slots=True)
class PeerUp:
    """An authenticated connection is open. ``send`` carries gossip messages to the peer (the
    transport encodes them with :data:`GOSSIP_REGISTRY`); the actor closes it when it is done
    with the peer. ``identity`` is the peer's verified identity public key."""

    peer_id: str
    identity: bytes
    is_device: bool
    send: trio.MemorySendChannel[Message]


@dataclass(frozen=True, slots=True)
class PeerDown:
    peer_id: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """A gossip message from a peer, already decoded and schema-checked by the transport."""

    peer_id: str
    message: Message


@dataclass(frozen=True, slots=True)
class SyncNow:
    """Start a sync round with every connected device now; answers how many were asked."""

    reply: Reply[int]


@dataclass(frozen=True, slots=True)
class PeerStatus:
    peer_id: str
    identity: str
    is_device: bool
    connected: bool
    connected_at: float | None  # wall clock (time.time())
    last_sync_at: float | None  # when its last vector arrived
    vector: VersionVector  # what it has told us it has
    behind_us: int  # entries we have that it (as far as we know) lacks
    ahead_of_us: int  # entries it has that we lack
    score: int
    bytes_in: int
    bytes_out: int
    entries_in: int
    cut_off_reason: str | None


@dataclass(frozen=True, slots=True)
class GossipStatus:
    device_id: str
    vector: VersionVector
    entries: int
    peers: tuple[PeerStatus, ...]
    last_apply_error: str | None


@dataclass(frozen=True, slots=True)
class SyncState:
    reply: Reply[GossipStatus]


@dataclass(frozen=True, slots=True)
class Heads:
    """Our version vector alone: what the shard keeper's mailbox pull compares with each
    storage peer's heads. (``SyncState`` builds every peer's row, lags included; the keeper
    asked for it on every pull and that was ~1.5% of a 250-node sim.)"""

    reply: Reply[VersionVector]


@dataclass(frozen=True, slots=True)
class Ingest:
    """Entries of our identity's feeds that came from elsewhere than a device (the mailbox on
    storage peers, a restore): checked exactly like a device's ops (continuity, identity and
    envelope signatures) and applied; entries we hold are skipped, a feed stops at its first
    gap. Answers how many entries were new, or ``Err`` naming the first bad entry (then
    nothing of that batch is applied)."""

    entries: tuple[FeedEntry, ...]
    reply: Reply[int]


GossipMsg = (
    Publish | PublishMany | PeerUp | PeerDown | Inbound | SyncNow | SyncState | Heads | Ingest
)


@dataclass(frozen=True, slots=True)
class ApplyOps:
    """Request to the *apply* address (the service): apply verified remote ops, in order.

    Every entry has been checked (signature, continuity, envelope signature and author). The
    service must apply idempotently: ``AddMemory`` → ``read_header`` then ``store.Put`` (a present
    or tombstoned id is a no-op); ``Link`` → ``store.AddLink`` (``created_at`` = ``entry.at``;
    replaces the weight); ``Unlink`` → remove that edge; ``Delete`` → ``store.Delete`` (tombstone,
    deletes win). Link/unlink conflicts are already resolved: only winners are sent. Answer
    ``Ok(number of ops that changed something)`` once durable, or ``Err`` (nothing is logged then,
    and the ops are fetched and applied again later).
    """

    entries: tuple[FeedEntry, ...]
    reply: Reply[int]


ApplyMsg = ApplyOps

# -- the actor ----------------------------------------------------------------------------------


class GossipActor:
    """Syncs our identity's device feeds with the connected devices.

    ``sign(context, data)`` asks the vault to sign with the identity key (the node passes
    ``lambda c, d: call(vault, vault.Sign, c, d)``; actors do not import each other);
    ``sign_feed(head, device_id, items)``, if given, signs a group of ``(at_ns, op)`` as the
    next entries in one round trip (``vault.SignFeed``). ``apply``
    serves :class:`ApplyOps`. ``cut_off(peer_id, reason)`` is awaited when a peer is cut off, so the
    transport can close its connection with that reason.
    """

    def __init__(
        self,
        *,
        identity: bytes,
        device_id: bytes,
        sign: Callable[[bytes, bytes], Awaitable[Result[bytes]]],
        apply: Address[ApplyMsg],
        log: FeedLog,
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
        cut_off: Callable[[str, str], Awaitable[object]] | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        capacity: int = INBOX_CAPACITY,
        published: Callable[[tuple[FeedEntry, ...]], Awaitable[object]] | None = None,
        sign_feed: SignFeed | None = None,
        mailbox: Mailbox[GossipMsg] | None = None,
    ) -> None:
        """``mailbox``: made by the caller when others need gossip's address before it exists
        (the node's tree: the shard keeper and peering are built first)."""
        self.mailbox: Mailbox[GossipMsg] = mailbox or Mailbox("gossip", capacity)
        #: Told about every entry this device signs, once it is durable (the shard keeper
        #: pushes them to the mailbox on storage peers).
        self._published = published
        self._identity = identity
        self._device_id = device_id
        self._sign = sign
        self._sign_feed = sign_feed
        self._apply = apply
        self._log = log
        self._sync_interval = sync_interval
        self._cut_off_hook = cut_off
        self._wall_clock = wall_clock
        self._reputation: dict[str, _Reputation] = {}
        self._reset_state()

    def _reset_state(self) -> None:
        self._feeds: dict[bytes, _Feed] = {}
        self._edges: dict[tuple[str, str, str], tuple[int, bytes, int]] = {}
        self._edge_present: dict[tuple[str, str, str], FeedEntry | None] = {}
        self._deleted: set[str] = set()
        self._peers: dict[str, _Peer] = {}
        # feed → (peer asked, last seq asked, when): one catch-up request per feed at a time.
        self._inflight: dict[bytes, tuple[str, int, float]] = {}
        self._last_apply_error: str | None = None
        self._held: GossipMsg | None = None  # taken from the inbox while grouping publishes
        self._last_at = 0
        self._entries = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._reset_state()
        loaded = await self._blocking(self._log.load)
        for entry, offset in loaded:
            self._feed(entry.device_id).add(entry, offset)
            self._index(entry)
        self._entries = len(loaded)
        own = self._feeds.get(self._device_id)
        log.info(
            "gossip: %d feed entries from %d devices loaded (own feed at seq %d)",
            len(loaded),
            len(self._feeds),
            own.seq if own else 0,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._anti_entropy)
                task_status.started()
                async for message in self.mailbox:
                    await self._handle(message)
                    while self._held is not None:
                        held, self._held = self._held, None
                        await self._handle(held)
        finally:
            for peer in list(self._peers.values()):
                peer.send.close()
            self._peers.clear()
            self._log.close()

    async def _handle(self, message: GossipMsg) -> None:
        match message:
            case Publish():
                await self._publish(message)
            case PublishMany():
                await self._publish_many(message)
            case PeerUp():
                await self._peer_up(message)
            case PeerDown():
                self._drop_peer(message.peer_id)
            case Inbound():
                await self._inbound(message)
            case SyncNow():
                message.reply.ok(self._sync_round())
            case SyncState():
                message.reply.ok(self._status())
            case Heads():
                message.reply.ok(self._vector())
            case Ingest():
                await self._ingest(message)
            case _:
                assert_never(message)

    async def _blocking(self, function: Callable[[], R]) -> R:
        if self._log.blocking:
            return await trio.to_thread.run_sync(function)
        return function()

    async def _anti_entropy(self) -> None:
        while True:
            await trio.sleep(self._sync_interval)
            self._sync_round()

    # -- local state -----------------------------------------------------------------------

    def _feed(self, device: bytes) -> _Feed:
        feed = self._feeds.get(device)
        if feed is None:
            feed = self._feeds[device] = _Feed()
        return feed

    def _vector(self) -> VersionVector:
        return VersionVector({d: f.seq for d, f in self._feeds.items()})

    def _index(self, entry: FeedEntry) -> bool:
        """Record an entry's effect on the converged state; True if the store must apply it."""
        op = entry.op
        match op:
            case AddMemory():
                return op.memory_id not in self._deleted
            case Delete():
                self._deleted.add(op.memory_id)
                return True
            case Link() | Unlink():
                key = (op.from_id, op.to_id, op.edge_type)
                stamp = (entry.at, entry.device_id, entry.seq)
                current = self._edges.get(key)
                # >= so that re-receiving the winner (after a failed apply) applies it again.
                if current is not None and stamp < current:
                    return False
                self._edges[key] = stamp
                if isinstance(op, Link):
                    return op.from_id not in self._deleted and op.to_id not in self._deleted
                return True

    async def _append(self, entries: list[FeedEntry]) -> None:
        offsets = await self._blocking(partial(self._log.append, entries))
        for entry, offset in zip(entries, offsets, strict=True):
            self._feed(entry.device_id).add(entry, offset)
        self._entries += len(entries)

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self, first: Publish) -> None:
        """Sign, log and push a group of local ops with one disk sync (group commit).

        Publishes already queued behind ``first`` join its group, so concurrent writers share
        syncs instead of paying one each; a message of another kind ends the group and is
        handled next.
        """
        group = [first]
        while len(group) < PUBLISH_GROUP_MAX:
            try:
                queued = self.mailbox.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if not isinstance(queued, Publish):
                self._held = queued
                break
            group.append(queued)
        signed = await self._sign_group([message.op for message in group])
        entries = [entry for entry in signed if not isinstance(entry, Err)]
        failed = await self._log_group(entries)
        if failed is not None:  # none of the group is logged: nobody may think it durable
            signed = [outcome if isinstance(outcome, Err) else failed for outcome in signed]
            entries = []
        for message, outcome in zip(group, signed, strict=True):
            message.reply.send(outcome if isinstance(outcome, Err) else Ok(outcome))
        await self._push_group(entries)

    async def _publish_many(self, message: PublishMany) -> None:
        if len(message.ops) > PUBLISH_GROUP_MAX:
            message.reply.err(
                f"{len(message.ops)} ops in one PublishMany; send at most {PUBLISH_GROUP_MAX}",
                "invalid_request",
            )
            return
        signed = await self._sign_group(list(message.ops))
        entries = [entry for entry in signed if not isinstance(entry, Err)]
        not_logged = await self._log_group(entries)
        if not_logged is not None:
            message.reply.send(not_logged)
            return
        failed = [outcome for outcome in signed if isinstance(outcome, Err)]
        if failed:
            message.reply.err(
                f"{len(failed)} of {len(signed)} ops not logged: {failed[0].reason}",
                failed[0].code,
            )
        else:
            message.reply.ok(tuple(entries))
        await self._push_group(entries)

    async def _sign_group(self, ops: list[Op]) -> list[FeedEntry | Err]:
        """Sign ``ops`` as the next entries of our feed, in order; an op that cannot be signed
        gets its ``Err`` in its place and takes no seq.

        The first entry of a group is verified in full (identity signature, and an added
        envelope's author): it proves the vault signs with this identity's key. The others come
        from the same vault and key moments later, and peers verify every entry they receive;
        checking each again here was a third of a bulk import's CPU."""
        head = self._feed(self._device_id).head(self._device_id)
        if self._sign_feed is not None and len(ops) > 1:
            return await self._sign_chain(head, ops)
        signed: list[FeedEntry | Err] = []
        verified = False
        for op in ops:
            entry = await self._sign_entry(op, head, verify=not verified)
            signed.append(entry)
            if not isinstance(entry, Err):
                head = entry.head
                verified = True
        return signed

    async def _sign_chain(self, head: FeedHead | None, ops: list[Op]) -> list[FeedEntry | Err]:
        """:meth:`_sign_group` in one round trip to the vault."""
        assert self._sign_feed is not None
        items = tuple((self._next_at(), op) for op in ops)
        result = await self._sign_feed(head, self._device_id, items)
        if isinstance(result, Err):
            failed = Err(f"could not sign the feed entries: {result.reason}", result.code)
            return [failed] * len(ops)
        signed = result.value
        first = next((e for e in signed if not isinstance(e, Err)), None)
        if first is not None:
            try:
                first.verify(self._identity)
            except FeedError as error:
                # Every entry after it is chained to it and signed by the same key.
                return [Err(f"the vault signed with another identity: {error}", "internal")] * len(
                    ops
                )
        return signed

    def _next_at(self) -> int:
        # Strictly increasing per device, so link/unlink order follows publish order even when
        # the wall clock steps back.
        self._last_at = max(self._wall_clock(), self._last_at + 1)
        return self._last_at

    async def _log_group(self, entries: list[FeedEntry]) -> Err | None:
        """Log signed entries of our feed with one disk sync and record their effect.

        Returns the ``Err`` for every publisher if the log could not be written (a full disk):
        then none of them is logged, our feed's head has not moved (the next publish takes the
        same seq), and the changes reach the feed at the next start (``publish_unsynced``)."""
        if not entries:
            return None
        try:
            await self._append(entries)
        except DmgnError as error:
            log.warning("gossip: %d local changes not logged for sync: %s", len(entries), error)
            return Err(str(error), error.code)
        for entry in entries:
            wins = self._index(entry)
            if isinstance(entry.op, Link | Unlink) and not wins:
                # The service applied a link change that an earlier-received, later-stamped op
                # overrides (clock skew between devices); keep this store on the converged
                # answer.
                await self._reapply_edge(entry.op)
        return None

    async def _push_group(self, entries: list[FeedEntry]) -> None:
        """Push logged entries to connected devices and tell the shard keeper (after the
        publishers have their answers: neither is part of a write's durability)."""
        if not entries:
            return
        self._announce(entries, source=None)
        if self._published is not None:
            await self._published(tuple(entries))

    async def _sign_entry(
        self, op: Op, head: FeedHead | None, *, verify: bool = True
    ) -> FeedEntry | Err:
        try:
            unsigned = UnsignedEntry.after(head, self._device_id, self._next_at(), op)
        except FeedError as error:
            return Err(str(error), error.code)
        signature = await self._sign(FEED_ENTRY_CONTEXT, unsigned.signing_payload())
        if isinstance(signature, Err):
            return Err(f"could not sign the feed entry: {signature.reason}", signature.code)
        try:
            entry = unsigned.signed(signature.value)
            if verify:
                entry.verify(self._identity)
        except FeedError as error:
            return Err(f"the vault signed with another identity: {error}", "internal")
        return entry

    async def _reapply_edge(self, op: Link | Unlink) -> None:
        _, device, seq = self._edges[(op.from_id, op.to_id, op.edge_type)]
        winner = await self._read_entries(device, seq, seq)
        applied = await call(self._apply, ApplyOps, tuple(winner), timeout=APPLY_TIMEOUT)
        if isinstance(applied, Err):
            # The store keeps the edge as it was; logged so the lag is visible.
            log.warning("re-applying the winning op on an edge failed: %s", applied.reason)

    async def _read_entries(self, device: bytes, first: int, last: int) -> list[FeedEntry]:
        spans = self._feeds[device].spans(first, last)
        raw = await self._blocking(partial(self._log.read, spans))
        return [decode_entry(data) for data in raw]

    # -- peers -----------------------------------------------------------------------------

    async def _peer_up(self, message: PeerUp) -> None:
        self._drop_peer(message.peer_id)
        reputation = self._reputation.setdefault(message.peer_id, _Reputation())
        reputation.identity, reputation.is_device = message.identity, message.is_device
        peer = _Peer(
            message.peer_id, message.identity, message.is_device, message.send, time.time()
        )
        if message.is_device and message.identity != self._identity:
            await self._cut_off(peer, "claims to be our device but has another identity")
            return
        if reputation.score <= REFUSE_SCORE:
            await self._cut_off(
                peer, f"refused: score {reputation.score} after {reputation.cut_off_reason}"
            )
            return
        self._peers[peer.peer_id] = peer
        self._nursery.start_soon(self._pump, peer)
        if peer.is_device:
            peer.enqueue(_vector_message(self._vector().to_wire(), ask=True))

    def _drop_peer(self, peer_id: str) -> None:
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        peer.scope.cancel()
        peer.send.close()
        for device, (asked, _, _) in list(self._inflight.items()):
            if asked == peer_id:
                del self._inflight[device]
        for other in self._peers.values():
            self._request_missing(other)

    async def _cut_off(self, peer: _Peer, reason: str) -> None:
        reputation = self._reputation.setdefault(peer.peer_id, _Reputation())
        reputation.score -= CUT_OFF_PENALTY
        reputation.cut_off_reason = reason
        log.warning(
            "gossip: cut off peer %s (score %d): %s", peer.peer_id, reputation.score, reason
        )
        self._drop_peer(peer.peer_id)
        peer.send.close()
        if self._cut_off_hook is not None:
            await self._cut_off_hook(peer.peer_id, reason)

    async def _pump(self, peer: _Peer) -> None:
        """Sends one peer's queued messages and answers its wants, in order.

        One task per peer, so a slow peer backs up only its own queue.
        """
        with peer.scope:
            try:
                while True:
                    if not peer.queue:
                        if peer.overflowed and peer.is_device:
                            peer.overflowed = False
                            peer.queue.append(_vector_message(self._vector().to_wire(), ask=True))
                            continue
                        peer.wakeup = trio.Event()
                        await peer.wakeup.wait()
                        continue
                    item = peer.queue.popleft()
                    if isinstance(item, _Serve):
                        peer.pending_wants -= 1
                        await self._serve(peer, item)
                    else:
                        await self._send(peer, item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self._peers.get(peer.peer_id) is peer:
                    self._drop_peer(peer.peer_id)

    async def _send(self, peer: _Peer, message: Message) -> None:
        await peer.send.send(message)
        if message.type == OPS.name:
            entries = message["entries"]
            assert isinstance(entries, list)
            peer.bytes_out += sum(len(e) for e in entries if isinstance(e, bytes))

    async def _serve(self, peer: _Peer, want: _Serve) -> None:
        seq = want.first
        while seq <= want.last:
            # Read a bounded slice at a time: the log may be far larger than memory allows.
            feed = self._feeds[want.device]
            last = min(want.last, seq + MAX_BATCH_ENTRIES - 1)
            sizes = feed.lengths[seq - 1 : last]
            total, count = 0, 0
            for size in sizes:
                if count and total + size > MAX_BATCH_BYTES:
                    break
                total += size
                count += 1
            spans = feed.spans(seq, seq + count - 1)
            raw = await self._blocking(partial(self._log.read, spans))
            await self._send(peer, _ops_message(raw))
            seq += count

    def _offer(self, peer: _Peer, item: Message) -> bool:
        if len(peer.queue) >= OUTBOX_MESSAGES:
            peer.overflowed = True
            return False
        peer.enqueue(item)
        return True

    def _announce(self, entries: list[FeedEntry], source: str | None) -> None:
        """Live push of new entries to every device that directly needs them."""
        for peer in self._peers.values():
            if not peer.is_device or peer.peer_id == source:
                continue
            push: list[bytes] = []
            notify: dict[bytes, int] = {}
            for entry in entries:
                if peer.known.get(entry.device_id, 0) == entry.seq - 1:
                    push.append(entry.encoded)
                    peer.known[entry.device_id] = entry.seq
                elif peer.known.get(entry.device_id, 0) < entry.seq:
                    notify[entry.device_id] = entry.seq
            for start in range(0, len(push), MAX_BATCH_ENTRIES):
                if not self._offer(peer, _ops_message(push[start : start + MAX_BATCH_ENTRIES])):
                    # Not sent: forget that we thought it would be.
                    for entry in entries:
                        peer.known[entry.device_id] = min(
                            peer.known.get(entry.device_id, 0), entry.seq - 1
                        )
                    break
            if notify:
                self._offer(peer, _vector_message(VersionVector(notify).to_wire(), ask=False))

    def _sync_round(self) -> int:
        asked = 0
        vector = self._vector().to_wire()
        for peer in self._peers.values():
            if peer.is_device and self._offer(peer, _vector_message(vector, ask=True)):
                asked += 1
        return asked

    def _request_missing(self, peer: _Peer) -> None:
        """Ask ``peer`` for the next range of each feed it has and we lack (one ask per feed)."""
        if not peer.is_device:
            return
        for device, theirs in peer.told.items():
            ours = self._feeds[device].seq if device in self._feeds else 0
            if theirs <= ours:
                continue
            inflight = self._inflight.get(device)
            now = trio.current_time()
            if inflight is not None:
                asked_peer, asked_last, asked_at = inflight
                if (
                    asked_last > ours
                    and asked_peer in self._peers
                    and now - asked_at < WANT_TIMEOUT
                ):
                    continue  # an earlier ask is still being answered
            last = min(theirs, ours + MAX_WANT_ENTRIES)
            if self._offer(peer, WANT(device=device, first=ours + 1, last=last)):
                self._inflight[device] = (peer.peer_id, last, now)

    # -- inbound ---------------------------------------------------------------------------

    async def _inbound(self, message: Inbound) -> None:
        peer = self._peers.get(message.peer_id)
        if peer is None:
            return  # already dropped; late messages from its connection are ignored
        try:
            if not peer.is_device:
                raise _Misbehaved("sent gossip but is not one of our devices")
            if not peer.messages.take(1, trio.current_time()):
                raise _Misbehaved(f"flooding: more than {MESSAGE_RATE:g} messages/s")
            match message.message.type:
                case VECTOR.name:
                    self._on_vector(peer, message.message)
                case WANT.name:
                    self._on_want(peer, message.message)
                case OPS.name:
                    await self._on_ops(peer, message.message)
                case other:
                    raise _Misbehaved(f"unexpected message type {other!r}")
        except (_Misbehaved, FeedError, WireError) as error:
            await self._cut_off(peer, str(error))

    def _on_vector(self, peer: _Peer, message: Message) -> None:
        VECTOR.validate(message.fields)
        theirs = VersionVector.from_wire(message["heads"])
        for device, seq in theirs.items():
            peer.told[device] = max(seq, peer.told.get(device, 0))
            peer.known[device] = max(seq, peer.known.get(device, 0))
        if message["ask"]:
            peer.last_sync_at = time.time()
            self._offer(peer, _vector_message(self._vector().to_wire(), ask=False))
        self._request_missing(peer)

    def _on_want(self, peer: _Peer, message: Message) -> None:
        WANT.validate(message.fields)
        device, first, last = (
            message.get_bytes("device"),
            message.get_int("first"),
            message.get_int("last"),
        )
        if last < first or last - first >= MAX_WANT_ENTRIES:
            raise _Misbehaved(f"bad want range {first}..{last}")
        if peer.pending_wants >= MAX_PENDING_WANTS:
            raise _Misbehaved(f"flooding: more than {MAX_PENDING_WANTS} outstanding wants")
        have = self._feeds[device].seq if device in self._feeds else 0
        last = min(last, have)
        if first > last:
            return  # we told it we had more than we do: cannot happen, but is harmless
        peer.pending_wants += 1
        peer.known[device] = max(last, peer.known.get(device, 0))
        peer.enqueue(_Serve(device, first, last))

    async def _on_ops(self, peer: _Peer, message: Message) -> None:
        OPS.validate(message.fields)
        raw = message["entries"]
        assert isinstance(raw, list)
        blobs = [b for b in raw if isinstance(b, bytes)]
        size = sum(len(b) for b in blobs)
        if len(blobs) > 1 and size > MAX_BATCH_BYTES + MAX_ENTRY_BYTES:
            raise _Misbehaved(f"ops batch of {size} bytes exceeds {MAX_BATCH_BYTES}")
        peer.bytes_in += size
        entries = [decode_entry(b) for b in blobs]
        fresh, wasted = self._sort_batch(peer, entries)
        if wasted and not peer.waste.take(wasted, trio.current_time()):
            raise _Misbehaved(
                f"flooding: more than {WASTE_RATE:g} duplicate or out-of-sequence entries/s"
            )
        if fresh:
            if len(fresh) > THREAD_VERIFY_THRESHOLD and self._log.blocking:
                await trio.to_thread.run_sync(self._verify_all, fresh)
            else:
                self._verify_all(fresh)
            await self._accept(peer, fresh)
        self._request_missing(peer)

    def _sort_batch(self, peer: _Peer, entries: list[FeedEntry]) -> tuple[list[FeedEntry], int]:
        """Split a batch into entries new to us (contiguous, chained) and wasted ones.

        Raises for a batch no honest peer sends: a feed out of order within the batch, or an
        entry that conflicts with one we hold (a fork, or a forgery).
        """
        fresh: list[FeedEntry] = []
        wasted = 0
        heads: dict[bytes, FeedHead | None] = {}
        previous_in_batch: dict[bytes, int] = {}
        for entry in entries:
            device = entry.device_id
            if device in previous_in_batch and entry.seq != previous_in_batch[device] + 1:
                raise _Misbehaved(
                    f"entries of feed {device.hex()[:8]} out of order in one batch "
                    f"({previous_in_batch[device]} then {entry.seq})"
                )
            previous_in_batch[device] = entry.seq
            if device not in heads:
                feed = self._feeds.get(device)
                heads[device] = feed.head(device) if feed else None
            head = heads[device]
            have = head.seq if head else 0
            if entry.seq <= have:
                feed = self._feeds[device]
                if feed.hash_at(entry.seq) != entry.hash:
                    raise _Misbehaved(
                        f"entry {device.hex()[:8]}/{entry.seq} conflicts with the "
                        "one we hold (forged, or a forked feed)"
                    )
                wasted += 1
                continue
            if entry.seq > have + 1:
                # Ahead of us (a push racing a catch-up): remember, and fetch the gap.
                peer.told[device] = max(entry.seq, peer.told.get(device, 0))
                wasted += 1
                continue
            check_continuity(head, entry)
            heads[device] = entry.head
            fresh.append(entry)
        if len(entries) > wasted + len(fresh):  # pragma: no cover - accounting invariant
            raise AssertionError("batch accounting")
        return fresh, wasted

    def _verify_all(self, entries: list[FeedEntry]) -> None:
        for entry in entries:
            entry.verify(self._identity)

    async def _accept(self, peer: _Peer, entries: list[FeedEntry]) -> None:
        to_apply = tuple(entry for entry in entries if self._index(entry))
        if to_apply:
            result = await call(self._apply, ApplyOps, to_apply, timeout=APPLY_TIMEOUT)
            if isinstance(result, Err):
                # Not logged, so the vector does not advance: the ops are fetched again later.
                self._last_apply_error = result.reason
                log.warning(
                    "gossip: applying %d ops from %s failed: %s; retrying in %gs",
                    len(to_apply),
                    peer.peer_id,
                    result.reason,
                    WANT_TIMEOUT,
                )
                return
        # Nothing else changes the feeds while this message is handled (one message at a
        # time), so the verified entries still continue them.
        fresh = entries
        try:
            await self._append(fresh)
        except DmgnError as error:
            # Applied but not logged: the vector does not advance and they are fetched again.
            self._last_apply_error = str(error)
            log.warning("gossip: %d ops from %s not logged: %s", len(fresh), peer.peer_id, error)
            return
        peer.entries_in += len(fresh)
        for entry in fresh:
            peer.known[entry.device_id] = max(entry.seq, peer.known.get(entry.device_id, 0))
            peer.told[entry.device_id] = max(entry.seq, peer.told.get(entry.device_id, 0))
        self._announce(fresh, source=peer.peer_id)

    async def _ingest(self, message: Ingest) -> None:
        fresh: list[FeedEntry] = []
        heads: dict[bytes, FeedHead | None] = {}
        try:
            for entry in sorted(message.entries, key=lambda e: (e.device_id, e.seq)):
                device = entry.device_id
                if device not in heads:
                    feed = self._feeds.get(device)
                    heads[device] = feed.head(device) if feed else None
                head = heads[device]
                have = head.seq if head else 0
                if entry.seq <= have:
                    if device in self._feeds and self._feeds[device].hash_at(entry.seq) != (
                        entry.hash
                    ):
                        raise FeedError(
                            f"entry {device.hex()[:8]}/{entry.seq} conflicts with the one we hold"
                        )
                    continue
                if entry.seq > have + 1:
                    continue  # a gap in that feed: what follows it waits for the gap
                check_continuity(head, entry)
                heads[device] = entry.head
                fresh.append(entry)
            if len(fresh) > THREAD_VERIFY_THRESHOLD and self._log.blocking:
                await trio.to_thread.run_sync(self._verify_all, fresh)
            else:
                self._verify_all(fresh)
        except FeedError as error:
            message.reply.err(str(error), error.code)
            return
        to_apply = tuple(entry for entry in fresh if self._index(entry))
        if to_apply:
            result = await call(self._apply, ApplyOps, to_apply, timeout=APPLY_TIMEOUT)
            if isinstance(result, Err):
                self._last_apply_error = result.reason
                message.reply.err(f"applying fetched ops failed: {result.reason}", result.code)
                return
        if fresh:
            try:
                await self._append(fresh)
            except DmgnError as error:
                message.reply.err(f"fetched ops not logged: {error}", error.code)
                return
            self._announce(fresh, source=None)
        message.reply.ok(len(fresh))

    # -- status ----------------------------------------------------------------------------

    def _status(self) -> GossipStatus:
        ours = self._vector()
        peers = []
        for peer_id, reputation in sorted(self._reputation.items()):
            peer = self._peers.get(peer_id)
            told = VersionVector(peer.told) if peer else VersionVector()
            known = VersionVector(peer.known) if peer else VersionVector()
            peers.append(
                PeerStatus(
                    peer_id=peer_id,
                    identity=reputation.identity.hex(),
                    is_device=reputation.is_device,
                    connected=peer is not None,
                    connected_at=peer.connected_at if peer else None,
                    last_sync_at=peer.last_sync_at if peer else None,
                    vector=told,
                    behind_us=known.lag_behind(ours) if peer else 0,
                    ahead_of_us=ours.lag_behind(told) if peer else 0,
                    score=reputation.score,
                    bytes_in=peer.bytes_in if peer else 0,
                    bytes_out=peer.bytes_out if peer else 0,
                    entries_in=peer.entries_in if peer else 0,
                    cut_off_reason=reputation.cut_off_reason,
                )
            )
        return GossipStatus(
            self._device_id.hex(), ours, self._entries, tuple(peers), self._last_apply_error
        )
