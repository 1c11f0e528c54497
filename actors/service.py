"""The memory service: the node's use cases, composed from the actors. Entry-point layer.

This module is the composition root (docs/design.md, "Layers": only entry points wire actors
together). It runs as one more actor serving :mod:`dmgn.api` requests, so the CLI in-process, the
control socket and the MCP bridge all reach the same code through one typed channel. A use case
like "add a memory" is a short sequence of requests to the actors that own each resource:
resolve links (store) → seal (vault) → durable put (store) → index (indexer).

Requests are handled concurrently (each in its own task, bounded), because a slow query must not
hold up an add; the service's own state is only addresses and a clock.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, assert_never

import trio

from actors import gossip as gs
from actors import indexer as ix
from actors import router as qr
from actors import shard_keeper as sk
from actors import store as st
from actors import vault as vt
from actors._service_requests import ServiceMsg
from actors.runtime import (
    DEFAULT_CALL_TIMEOUT,
    ActorGone,
    Address,
    Err,
    Mailbox,
    Ok,
    Reply,
    Result,
    call,
    expect,
)
from dmgn import __version__, api, backup, feed
from dmgn.errors import DmgnError, InvalidInput, error_for_code
from dmgn.memory import Memory, read_header, validate_memory
from dmgn.metrics import NodeMetrics
from dmgn.retention import RetentionPolicy

log = logging.getLogger("dmgn.service")
T = TypeVar("T")


#: Requests served at once. Beyond this, callers queue in the bounded inbox (backpressure).
MAX_CONCURRENT_REQUESTS = 32
SNIPPET_CHARS = 200
#: How often a running node saves its search index snapshot when it changed (a long-running
#: daemon; the offline CLI saves once, at exit). At 100k memories a save takes ~2 s.
INDEX_SAVE_INTERVAL = 600.0
#: How often a running node applies its retention policy. Periods are days to years, so an
#: hour late costs nothing, and a run over an unchanged store is a few index lookups.
RETENTION_INTERVAL = 3600.0
#: Deletes per retention run (each is a store commit and a feed op): a first run over years of
#: backlog is spread over several runs rather than holding the store for minutes.
RETENTION_MAX_PER_RUN = 10_000
#: Expired memories listed by id in a retention answer (the counts cover all of them).
RETENTION_EXAMPLES = 20
#: Envelopes decrypted per round trip to the vault when scanning the whole store.
SCAN_PAGE = 512
#: Queries for our other devices answered at once (each device may have 8 running here).
MAX_LOCAL_QUERIES = 16
#: How often a ``recent:<days>`` replica drops memories that left its window (and at start).
EVICT_INTERVAL = 3600.0
#: Deadline for the router's merged answer; the router itself answers within its
#: ``query_timeout``, so this only catches a wedged router.
FAN_OUT_DEADLINE = 120.0
_DAY_NS = 86_400 * 1_000_000_000


@dataclass
class NodeInfo:
    """Facts about the running process, filled in by whoever hosts the node."""

    data_dir: Path | None
    started_at: float = field(default_factory=time.time)
    mode: str = "offline"
    listen_addrs: list[str] = field(default_factory=list)
    #: Where the REST API answers (empty: not served).
    api_urls: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NetworkLink:
    """What the node's online half lends the service: where to publish local changes, and how
    to fill ``dmgn peers`` and the ``sync`` part of ``dmgn status``.

    Absent while the node is offline (the CLI in-process, or before networking starts): local
    changes are then only in the store, and are published when a networked node next starts
    (see ``actors.node.publish_unsynced``).
    """

    gossip: Address[gs.GossipMsg]
    #: ``dmgn peers`` rows.
    peers: Callable[[], Awaitable[dict[str, Any]]] | None = None
    #: The ``sync`` section of ``dmgn status`` and the number of connected peers.
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None
    #: The shard keeper: told what to disperse (added memories) and forget (deleted ones).
    keeper: Address[sk.KeeperMsg] | None = None


@dataclass(frozen=True, slots=True)
class AttachNetwork:
    """The node went online (or its online half grew): use this link from now on."""

    link: NetworkLink
    reply: Reply[None]


#: Deadline for the gossip actor to log a local op durably (a group-committed fsync).
PUBLISH_TIMEOUT = 30.0
#: Index messages queued with the indexer and not yet answered. An add is answered once it is
#: durable and its memories are queued for indexing (the indexer serves its inbox in order, so
#: any later search sees them); the embedding runs meanwhile. This bound makes a bulk import
#: wait for the embedder instead of queueing minutes of work in front of every search.
INDEX_IN_FLIGHT = 4
#: Memories per queued Index message: with INDEX_IN_FLIGHT, what a search or `dmgn status`
#: asked during a bulk import waits behind is at most 256 short texts (~0.6 s of embedding on
#: this 2-core machine when quiet). The embedder's own forward passes are 32 texts.
INDEX_CHUNK = 64
#: Deadline for the indexer to embed and index one batch (a batch of long memories is slow).
INDEX_TIMEOUT = 600.0
#: How long `dmgn status` waits for the indexer's own figures while memories are queued for
#: indexing; past it, status shows the last figures plus what was indexed since, and what is
#: still queued (``index.queued``), so it answers within a second or two during a bulk import.
STATUS_INDEX_WAIT = 0.5


class MemoryService:
    def __init__(
        self,
        vault: Address[vt.VaultMsg],
        store: Address[st.StoreMsg],
        indexer: Address[ix.Msg],
        info: NodeInfo,
        device_id: bytes,
        *,
        default_alpha: float = 0.5,
        metrics: NodeMetrics | None = None,
        inbox_depths: Callable[[], list[tuple[str, int]]] = list,
        retention: RetentionPolicy | None = None,
        retention_interval: float = RETENTION_INTERVAL,
        router: Address[qr.RouterMsg] | None = None,
        replica_days: int | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.mailbox: Mailbox[ServiceMsg] = Mailbox("service", 128)
        #: Queries the router asks on behalf of our other devices: answered from this node
        #: alone, never routed again.
        self.local_mailbox: Mailbox[qr.LocalQuery] = Mailbox("local_query", 32)
        #: Verified remote ops from the gossip actor (:class:`actors.gossip.ApplyOps`).
        self.apply_mailbox: Mailbox[gs.ApplyMsg] = Mailbox("apply", 16)
        #: The networking half of the tree attaches itself here when the node goes online.
        self.link_mailbox: Mailbox[AttachNetwork] = Mailbox("service-link", 4)
        self._network: NetworkLink | None = None
        self._vault = vault
        self._store = store
        self._indexer = indexer
        self._info = info
        self._device_id = device_id
        self._default_alpha = default_alpha
        self._metrics = metrics or NodeMetrics()
        self._inbox_depths = inbox_depths
        self._retention = retention or RetentionPolicy({})
        self._retention_interval = retention_interval
        self._router = router
        self._replica_days = replica_days
        self._wall_clock = wall_clock
        self._last_ns = 0
        self._reconciled = False
        #: Where background waits for the indexer run (set while :meth:`run` serves).
        self._background: trio.Nursery | None = None
        self._index_slots = trio.Semaphore(INDEX_IN_FLIGHT)
        #: Memories queued with the indexer and not answered yet, those answered as added
        #: since the last ``Stats`` answer, and that answer (for status during a bulk import).
        self._index_queued = 0
        self._indexed_since_stats = 0
        self._index_stats: ix.IndexStats | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self._reconciled:
            await self.reconcile_index()
            self._reconciled = True
        slots = trio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._index_slots = trio.Semaphore(INDEX_IN_FLIGHT)
        try:
            async with trio.open_nursery() as nursery:
                self._background = nursery
                nursery.start_soon(self._serve_apply)
                nursery.start_soon(self._serve_link)
                nursery.start_soon(self._save_index_periodically)
                if self._retention.max_age:
                    nursery.start_soon(self._apply_retention_periodically)
                if self._replica_days is not None:
                    await self.evict_outside_window()
                    nursery.start_soon(self._evict_periodically)
                # Their own slots: our routed queries hold main slots while they wait for other
                # devices, whose local queries must never wait for those slots here.
                nursery.start_soon(self._serve_local_queries, trio.Semaphore(MAX_LOCAL_QUERIES))
                task_status.started()
                async for message in self.mailbox:
                    await slots.acquire()
                    nursery.start_soon(self._serve, message, slots)
        finally:
            self._background = None

    async def _serve(self, message: ServiceMsg, slots: trio.Semaphore) -> None:
        try:
            message.reply.send(await self.handle(message.body))
        finally:
            slots.release()

    def close_side_mailboxes(self) -> None:
        """The supervisor's stop hook: late senders to the side inboxes fail fast."""
        self.apply_mailbox.close()
        self.link_mailbox.close()
        self.local_mailbox.close()

    async def _serve_link(self) -> None:
        async for message in self.link_mailbox:
            self._network = message.link
            message.reply.ok(None)

    async def _serve_local_queries(self, slots: trio.Semaphore) -> None:
        async with trio.open_nursery() as nursery:
            async for message in self.local_mailbox:
                await slots.acquire()
                nursery.start_soon(self._serve_local, message, slots)

    async def _serve_local(self, message: qr.LocalQuery, slots: trio.Semaphore) -> None:
        try:
            message.reply.send(await self.handle(message.body, route=False))
        finally:
            slots.release()

    async def _serve_apply(self) -> None:
        # One batch at a time, in arrival order: the gossip actor waits for each answer anyway.
        async for message in self.apply_mailbox:
            try:
                message.reply.ok(await self.apply_ops(message.entries))
            except DmgnError as error:
                message.reply.err(str(error), error.code)
            except Exception as error:  # a bug: the ops are fetched and applied again later
                log.exception("applying %d synced ops failed", len(message.entries))
                message.reply.err(f"internal error while applying synced ops: {error}", "internal")

    async def apply_ops(self, entries: tuple[feed.FeedEntry, ...]) -> int:
        """Apply verified ops from our other devices (the ``ApplyOps`` contract of
        :mod:`actors.gossip`): in order, idempotently, in one store transaction; durable when
        this returns. Then index what was added and unindex what was deleted (the index is a
        cache that ``reconcile_index`` repairs, so a failure there is only logged)."""
        changes: list[st.Change] = []
        window_start = self._window_start()
        for entry in entries:
            op = entry.op
            if isinstance(op, feed.AddMemory):
                header = read_header(op.envelope)
                if window_start is not None and header.created_at < window_start:
                    continue  # outside this replica's window: its feed entry is still logged
                changes.append(
                    st.StoredEnvelope(
                        header.id, header.created_at, header.type, header.device, op.envelope
                    )
                )
            elif isinstance(op, feed.Link):
                changes.append(st.Link(op.from_id, op.to_id, op.edge_type, op.weight, entry.at))
            elif isinstance(op, feed.Unlink):
                changes.append(st.RemoveLink(op.from_id, op.to_id, op.edge_type))
            else:
                changes.append(st.Tombstone(op.memory_id))
        doomed = tuple(c.id for c in changes if isinstance(c, st.Tombstone))
        held = await expect(await call(self._store, st.Get, doomed)) if doomed else {}
        result = await expect(await call(self._store, st.Apply, tuple(changes), timeout=120))
        if result.added:
            await self._tell_keeper(sk.Disperse(tuple(result.added)))
        if result.deleted:
            envelopes = tuple((m, held[m].envelope) for m in result.deleted if m in held)
            await self._tell_keeper(sk.Forget(tuple(result.deleted), envelopes))
        try:
            if result.deleted:
                await expect(await call(self._indexer, ix.Unindex, result.deleted))
            if result.added:
                found = await expect(await call(self._store, st.Get, result.added))
                await self._index(await self._open(list(found.values())))
        except DmgnError as error:
            log.warning("synced changes stored but the search index lags: %s", error)
        self._metrics.synced_ops.inc(result.changed)
        return result.changed

    async def _publish(self, op: feed.Op) -> None:
        """Hand a local change (already durable in the store) to gossip for our devices.

        Awaited before the user's request is answered, so an acknowledged change is in the
        feed log too; if gossip cannot take it, the change is published at the next start
        instead (``publish_unsynced``), so this only logs.
        """
        if self._network is None:
            return
        gossip = self._network.gossip
        result = await call(gossip, gs.Publish, op, timeout=PUBLISH_TIMEOUT)
        if isinstance(result, Err):
            log.warning(
                "local change not yet in the sync feed (%s); it will be published at "
                "the next start",
                result.reason,
            )

    async def _tell_keeper(self, message: sk.KeeperMsg) -> None:
        """Dispersal and forgetting are background work: a slow or stopped keeper only delays
        them (the keeper compares the store with its placements when it starts)."""
        keeper = self._network.keeper if self._network else None
        if keeper is None:
            return
        with trio.move_on_after(PUBLISH_TIMEOUT):
            try:
                await keeper.send(message)
            except ActorGone:
                log.info("shard keeper stopped; it catches up with the store at its next start")

    async def handle(self, request: api.AnyRequest, *, route: bool = True) -> Result[api.Response]:
        """Run one (validated) request; every failure comes back as an ``Err`` with a sentence.

        ``route=False`` answers a query from this node alone (what our other devices ask)."""
        try:
            return Ok(await self._dispatch(request, route=route))
        except DmgnError as error:
            return Err(str(error), error.code)
        except Exception as error:  # a bug: report it to the caller, keep serving others
            log.exception("request %s failed", request.op)
            return Err(f"internal error while handling {request.op}: {error}", "internal")

    async def _dispatch(self, request: api.AnyRequest, *, route: bool) -> api.Response:
        match request:
            case api.AddMemory():
                return await self._add(request)
            case api.AddMemories():
                return await self._add_many(request)
            case api.QueryMemories():
                with self._metrics.query_seconds.time():
                    return await self._query(request, route=route)
            case api.GetMemory():
                return await self._get(request)
            case api.DeleteMemory():
                return await self._delete(request)
            case api.LinkMemories():
                return await self._link(request)
            case api.GetGraph():
                return await self._graph(request)
            case api.GetContext():
                return await self._context(request)
            case api.Status():
                return await self._status(request)
            case api.Peers():
                return await self._peers(request)
            case api.Backup():
                return await self._backup(request)
            case api.Retention():
                return await self._apply_retention(request.dry_run)
            case _:
                assert_never(request)

    # -- helpers -----------------------------------------------------------------------------

    def _now_ns(self) -> int:
        # Strictly increasing, so memories added in one burst keep their order.
        self._last_ns = max(self._wall_clock(), self._last_ns + 1)
        return self._last_ns

    async def _resolve(self, ref: str) -> str:
        return await expect(await call(self._store, st.Resolve, ref))

    async def _open(
        self, stored: list[st.StoredEnvelope]
    ) -> list[tuple[st.StoredEnvelope, Memory]]:
        """Decrypt envelopes; ones that fail verification are skipped and logged, not shown."""
        if not stored:
            return []
        pairs = tuple((s.id, s.envelope) for s in stored)
        opened = await expect(await call(self._vault, vt.Open, pairs))
        out = []
        for item, result in zip(stored, opened, strict=True):
            if isinstance(result, vt.OpenFailed):
                log.warning("skipping memory: %s", result.reason)
                continue
            out.append((item, result.memory))
        return out

    async def _open_one(self, memory_id: str) -> tuple[st.StoredEnvelope, Memory]:
        found = await expect(await call(self._store, st.Get, (memory_id,)))
        if memory_id not in found:
            raise error_for_code("not_found", f"no memory with id {memory_id}")
        stored = found[memory_id]
        opened = await expect(await call(self._vault, vt.Open, ((stored.id, stored.envelope),)))
        result = opened[0]
        if isinstance(result, vt.OpenFailed):
            raise error_for_code("tampered", result.reason)
        return stored, result.memory

    async def reconcile_index(self) -> None:
        """Make the index hold exactly the store's live memories.

        The index snapshot is only a cache: memories added since it was written (or after a
        crash, or by an offline CLI) are indexed now, and deleted ones are removed. The store is
        the source of truth, so no add is ever lost from search because a snapshot was stale.
        """
        live = await expect(await call(self._store, st.Ids))
        indexed = await expect(await call(self._indexer, ix.ListIds))
        stale = tuple(sorted(indexed - live))
        if stale:
            await expect(await call(self._indexer, ix.Unindex, stale))
        missing = sorted(live - indexed)
        if missing:
            log.info("indexing %d memories not yet in the search index", len(missing))
        for start in range(0, len(missing), SCAN_PAGE):
            ids = tuple(missing[start : start + SCAN_PAGE])
            found = await expect(await call(self._store, st.Get, ids))
            await self._index(await self._open(list(found.values())))

    async def _index(self, opened: list[tuple[st.StoredEnvelope, Memory]]) -> None:
        items = tuple(
            ix.IndexItem(s.id, m.content, m.type, m.created_at, m.embedding) for s, m in opened
        )
        for start in range(0, len(items), ix.MAX_BATCH):
            await expect(
                await call(
                    self._indexer, ix.Index, items[start : start + ix.MAX_BATCH], timeout=600
                )
            )

    async def _index_soon(self, opened: list[tuple[st.StoredEnvelope, Memory]]) -> None:
        """Queue memories with the indexer and return without waiting for their vectors.

        The indexer serves its inbox in order, so a search, delete or status asked after this
        returns sees these memories; the embedding runs while the caller is answered (and, in
        a bulk import, while the next batch is sealed and stored). At most
        :data:`INDEX_IN_FLIGHT` messages wait unanswered, so a bulk import goes no faster than
        the embedder. A failure is only logged: the add is durable, and ``reconcile_index``
        indexes what is missing at the next start. Outside :meth:`run` this waits, as before.
        """
        background = self._background
        if background is None:
            await self._index(opened)
            return
        items = tuple(
            ix.IndexItem(s.id, m.content, m.type, m.created_at, m.embedding) for s, m in opened
        )
        for start in range(0, len(items), INDEX_CHUNK):
            chunk = items[start : start + INDEX_CHUNK]
            await self._index_slots.acquire()
            send, receive = trio.open_memory_channel[Result[ix.IndexResult]](1)
            try:
                await self._indexer.send(ix.Index(chunk, Reply(send)))
            except ActorGone:
                self._index_slots.release()
                log.warning(
                    "%d memories stored but not indexed yet: the indexer stopped", len(chunk)
                )
                return
            except BaseException:
                self._index_slots.release()
                raise
            self._index_queued += len(chunk)
            background.start_soon(self._indexed, receive, len(chunk))

    async def _indexed(
        self, receive: trio.MemoryReceiveChannel[Result[ix.IndexResult]], count: int
    ) -> None:
        """Wait for one queued Index message's answer (see :meth:`_index_soon`)."""
        try:
            with receive, trio.move_on_after(INDEX_TIMEOUT):
                try:
                    result = await receive.receive()
                except trio.EndOfChannel:
                    result = Err("the indexer dropped the request without answering", "no_reply")
                if isinstance(result, Err):
                    log.warning("%d memories stored but not indexed yet: %s", count, result.reason)
                else:
                    self._indexed_since_stats += result.value.added
                return
            log.warning(
                "%d memories stored but not indexed yet: the indexer did not answer within %gs",
                count,
                INDEX_TIMEOUT,
            )
        finally:
            self._index_queued -= count
            self._index_slots.release()

    async def _index_stats_now(self) -> tuple[ix.IndexStats, int]:
        """The indexer's figures, and how many memories are still queued for indexing.

        The indexer answers in order, so while memories are queued its answer waits for their
        embedding; past STATUS_INDEX_WAIT the last answer is brought up to date with what was
        indexed since, and the memories still queued are counted as such."""
        waited = None if self._index_queued == 0 or self._index_stats is None else STATUS_INDEX_WAIT
        result = await call(self._indexer, ix.Stats, timeout=waited or DEFAULT_CALL_TIMEOUT)
        if isinstance(result, Ok):
            # It counts every Index message queued before it, i.e. all answered so far.
            self._index_stats = result.value
            self._indexed_since_stats = 0
            return result.value, 0
        last = self._index_stats
        if waited is None or result.code != "timeout" or last is None:
            return await expect(result), 0
        count = last.count + self._indexed_since_stats
        return dataclasses.replace(last, count=count), self._index_queued

    async def _save_index_periodically(self) -> None:
        """Bound how much a crash costs at the next start (re-indexing what the last snapshot
        missed) by saving the snapshot every INDEX_SAVE_INTERVAL when it changed."""
        saved: str | None = None
        while True:
            await trio.sleep(INDEX_SAVE_INTERVAL)
            stats = await call(self._indexer, ix.Stats)
            if isinstance(stats, Ok) and stats.value.fingerprint != saved:
                await self.persist_index()
                saved = stats.value.fingerprint

    def _window_start(self) -> int | None:
        if self._replica_days is None:
            return None
        return self._wall_clock() - self._replica_days * _DAY_NS

    async def evict_outside_window(self) -> int:
        """A ``recent:<days>`` replica: drop envelopes (and index entries) older than the
        window. Not tombstones: the memories stay live on our full devices, reached through
        the router; their feed entries stay in the gossip log, so this device still syncs and
        relays every op. Returns how many were dropped."""
        window_start = self._window_start()
        if window_start is None:
            return 0
        dropped = await expect(await call(self._store, st.Evict, window_start, timeout=120))
        if dropped:
            log.info(
                "replica recent:%d: dropped %d memories older than the window",
                self._replica_days,
                len(dropped),
            )
            for start in range(0, len(dropped), SCAN_PAGE):
                await expect(
                    await call(self._indexer, ix.Unindex, dropped[start : start + SCAN_PAGE])
                )
        return len(dropped)

    async def _evict_periodically(self) -> None:
        while True:
            await trio.sleep(EVICT_INTERVAL)
            try:
                await self.evict_outside_window()
            except DmgnError as error:
                log.warning("could not drop memories outside the replica window: %s", error)

    async def persist_index(self) -> None:
        """Write the encrypted index snapshot (a cache; see :meth:`reconcile_index`)."""
        result = await call(self._indexer, ix.Persist, timeout=120)
        if isinstance(result, Err):
            log.warning("could not save the search index: %s", result.reason)

    # -- use cases ---------------------------------------------------------------------------

    async def _add(self, request: api.AddMemory) -> api.Response:
        link_ids = [await self._resolve(ref) for ref in request.links]
        memory = Memory(
            request.content, request.type, self._now_ns(), dict(request.metadata), request.embedding
        )
        validate_memory(memory)
        memory_id, envelope = await expect(await call(self._vault, vt.Seal, memory))
        links = tuple(
            st.Link(memory_id, target, request.link_type, 1.0, memory.created_at)
            for target in link_ids
        )
        stored = st.StoredEnvelope(
            memory_id, memory.created_at, memory.type, self._device_id, envelope
        )
        put = await expect(await call(self._store, st.Put, (stored,), links))
        self._metrics.added(len(put.added))
        # Durable now. The embedding runs while the op is logged for sync and the caller is
        # answered; a search asked after the answer waits for it (see _index_soon).
        await self._index_soon([(stored, memory)])
        await self._publish(feed.AddMemory(envelope))
        await self._tell_keeper(sk.Disperse((memory_id,)))
        for link in links:
            await self._publish(feed.Link(link.from_id, link.to_id, link.edge_type, link.weight))
        return {
            "id": memory_id,
            "timestamp": memory.created_at,
            "timestamp_rfc3339": api.rfc3339(memory.created_at),
            "type": memory.type,
            "links": link_ids,
        }

    async def _add_many(self, request: api.AddMemories) -> api.Response:
        """Bulk add: seal each memory, store them all in one transaction, publish them together
        (gossip group-commits its log), then index them in batches. A memory that cannot be
        added is reported by its position in ``errors``; the rest go in."""
        stored: list[st.StoredEnvelope] = []
        opened: list[tuple[st.StoredEnvelope, Memory]] = []
        links: list[st.Link] = []
        ids: list[str | None] = [None] * len(request.memories)
        errors: list[dict[str, Any]] = []
        todo: list[tuple[int, Memory, list[str], str]] = []
        for position, item in enumerate(request.memories):
            try:
                link_ids = [await self._resolve(ref) for ref in item.links]
                memory = Memory(
                    item.content, item.type, self._now_ns(), dict(item.metadata), item.embedding
                )
                validate_memory(memory)
            except DmgnError as error:
                errors.append({"index": position, "error": str(error), "code": error.code})
                continue
            todo.append((position, memory, link_ids, item.link_type))
        sealed = await expect(
            await call(self._vault, vt.SealMany, tuple(memory for _, memory, _, _ in todo))
        )
        for (position, memory, link_ids, link_type), outcome in zip(todo, sealed, strict=True):
            if isinstance(outcome, vt.SealFailed):
                errors.append({"index": position, "error": outcome.reason, "code": outcome.code})
                continue
            memory_id, envelope = outcome
            entry = st.StoredEnvelope(
                memory_id, memory.created_at, memory.type, self._device_id, envelope
            )
            stored.append(entry)
            opened.append((entry, memory))
            ids[position] = memory_id
            links.extend(
                st.Link(memory_id, target, link_type, 1.0, memory.created_at) for target in link_ids
            )
        errors.sort(key=lambda e: int(e["index"]))
        if not stored:
            return {"added": 0, "present": 0, "refused": 0, "ids": ids, "errors": errors}
        put = await expect(
            await call(self._store, st.Put, tuple(stored), tuple(links), timeout=120)
        )
        added = set(put.added)
        self._metrics.added(len(put.added))
        # Durable now: embed (the indexer's thread) while the ops are signed and logged.
        await self._index_soon([pair for pair in opened if pair[0].id in added])
        if put.added:
            await self._tell_keeper(sk.Disperse(tuple(put.added)))
        await self._publish_all([feed.AddMemory(s.envelope) for s in stored if s.id in added])
        await self._publish_all(
            [feed.Link(k.from_id, k.to_id, k.edge_type, k.weight) for k in links]
        )
        return {
            "added": len(put.added),
            "present": len(put.present),
            "refused": len(put.tombstoned),
            "ids": ids,
            "errors": errors,
        }

    async def _publish_all(self, ops: list[feed.Op]) -> None:
        """Publish many ops in order, a group at a time: one message, one signature pass and
        one disk sync per group in the gossip actor (not a message and a task per op)."""
        if not ops or self._network is None:
            return
        gossip = self._network.gossip
        for start in range(0, len(ops), gs.PUBLISH_GROUP_MAX):
            group = tuple(ops[start : start + gs.PUBLISH_GROUP_MAX])
            result = await call(gossip, gs.PublishMany, group, timeout=PUBLISH_TIMEOUT)
            if isinstance(result, Err):
                log.warning(
                    "local changes not yet in the sync feed (%s); they will be published at "
                    "the next start",
                    result.reason,
                )

    async def _get(self, request: api.GetMemory) -> api.Response:
        memory_id = await self._resolve(request.id)
        stored, memory = await self._open_one(memory_id)
        edges = await expect(await call(self._store, st.Edges, (memory_id,)))
        return {
            **_describe(stored, memory, include_content=True),
            "metadata": memory.metadata,
            "links": [_edge(e) for e in edges],
        }

    async def _query(self, request: api.QueryMemories, *, route: bool = True) -> api.Response:
        """Answer from this node, then (``route``) let the router ask our devices that may
        hold more and merge their answers (see :mod:`actors.router`)."""
        local = await self._local_query(request)
        if not route or self._router is None:
            return local
        routed = await call(
            self._router, qr.FanOut, request, tuple(local["results"]), timeout=FAN_OUT_DEADLINE
        )
        if isinstance(routed, Err):
            log.warning("query router failed (%s); answering from this device only", routed.reason)
            return {
                **local,
                "devices": [],
                "partial": True,
                "partial_reason": f"query router: {routed.reason}",
            }
        merged = routed.value
        return {
            "results": merged.results,
            "count": len(merged.results),
            "devices": [d.to_json() for d in merged.devices],
            "partial": merged.partial,
            "partial_reason": merged.partial_reason,
        }

    async def _local_query(self, request: api.QueryMemories) -> api.Response:
        text = request.text if request.text and request.text.strip() else None
        only: frozenset[str] | None = None
        if request.links_of:
            root = await self._resolve(request.links_of)
            edges = await expect(await call(self._store, st.Edges, (root,)))
            only = frozenset(e.to_id if e.from_id == root else e.from_id for e in edges)
        if request.recent or (text is None and request.embedding is None):
            return await self._recent(request, only)
        if only is not None and not only:
            return {"results": [], "count": 0}
        alpha = self._default_alpha if request.alpha is None else request.alpha
        hits = await expect(
            await call(
                self._indexer,
                search_request(
                    text=text,
                    embedding=request.embedding,
                    alpha=alpha,
                    limit=request.limit,
                    types=frozenset(request.types) or None,
                    after_ns=request.after,
                    before_ns=request.before,
                    only_ids=only,
                ),
            )
        )
        found = await expect(await call(self._store, st.Get, tuple(h.memory_id for h in hits)))
        memories = {s.id: m for s, m in await self._open(list(found.values()))}
        words = (text or "").lower().split()
        results = []
        for hit in hits:
            memory = memories.get(hit.memory_id)
            if memory is None:  # deleted meanwhile, or failed verification (logged)
                continue
            results.append(
                {
                    **_describe(found[hit.memory_id], memory, request.include_content, words),
                    "score": round(hit.score, 6),
                    "vector_score": round(hit.vector_score, 6),
                    "text_score": round(hit.text_score, 6),
                }
            )
        return {"results": results, "count": len(results)}

    async def _recent(
        self, request: api.QueryMemories, only: frozenset[str] | None
    ) -> api.Response:
        """The most recent ``limit`` memories (of ``only``, the links of a memory, if given),
        in chronological order like ``tail``. No score: nothing was ranked."""
        if only is None:
            newest = await expect(
                await call(
                    self._store,
                    st.Recent,
                    request.limit,
                    request.types,
                    request.after,
                    request.before,
                    0,
                    True,
                )
            )
        else:
            found = await expect(await call(self._store, st.Get, tuple(sorted(only))))
            matching = [
                s
                for s in found.values()
                if (not request.types or s.type in request.types)
                and (request.after is None or s.created_at > request.after)
                and (request.before is None or s.created_at < request.before)
            ]
            matching.sort(key=lambda s: (s.created_at, s.id), reverse=True)
            newest = matching[: request.limit]
        results = [
            _describe(s, m, request.include_content) for s, m in reversed(await self._open(newest))
        ]
        return {"results": results, "count": len(results)}

    async def _context(self, request: api.GetContext) -> api.Response:
        newest = await expect(
            await call(self._store, st.Recent, request.limit, (), None, None, 0, True)
        )
        now = time.time_ns()
        memories = [
            {
                "id": s.id,
                "content": m.content,
                "type": m.type,
                "timestamp": m.created_at,
                "timestamp_rfc3339": api.rfc3339(m.created_at),
                "time_ago": _time_ago(now - m.created_at),
                "metadata": m.metadata,
            }
            for s, m in reversed(await self._open(newest))
        ]
        chars = sum(len(str(m["content"])) for m in memories)
        return {
            "memories": memories,
            "count": len(memories),
            "context_window_hint": f"{len(memories)} most recent memories, oldest first, "
            f"about {chars // 4} tokens",
        }

    async def _delete(self, request: api.DeleteMemory) -> api.Response:
        memory_id = await self._resolve(request.id)
        return {"id": memory_id, "deleted": await self._delete_id(memory_id, "user")}

    async def _delete_id(self, memory_id: str, reason: str) -> bool:
        """The one delete path: tombstone (store), publish (sync), unindex."""
        held = await expect(await call(self._store, st.Get, (memory_id,)))
        deleted = await expect(await call(self._store, st.Delete, memory_id))
        await self._publish(feed.Delete(memory_id))
        await self._tell_keeper(
            sk.Forget((memory_id,), tuple((m, s.envelope) for m, s in held.items()))
        )
        await expect(await call(self._indexer, ix.Unindex, (memory_id,)))
        if deleted:
            self._metrics.deletes.labels(reason).inc()
        return deleted

    async def _link(self, request: api.LinkMemories) -> api.Response:
        from_id = await self._resolve(request.from_id)
        to_id = await self._resolve(request.to_id)
        if from_id == to_id:
            raise InvalidInput("a memory cannot link to itself")
        link = st.Link(from_id, to_id, request.edge_type, request.weight, self._now_ns())
        created = await expect(await call(self._store, st.AddLink, link))
        await self._publish(feed.Link(from_id, to_id, request.edge_type, request.weight))
        return {
            "from_id": from_id,
            "to_id": to_id,
            "edge_type": request.edge_type,
            "weight": request.weight,
            "created": created,
        }

    async def _graph(self, request: api.GetGraph) -> api.Response:
        root = await self._resolve(request.start_id)
        seen = {root}
        frontier = {root}
        edges: dict[tuple[str, str, str], st.Link] = {}
        for _ in range(request.max_depth):
            if not frontier:
                break
            batch = tuple(sorted(frontier))
            found = await expect(await call(self._store, st.Edges, batch))
            frontier = set()
            for edge in found:
                edges[(edge.from_id, edge.to_id, edge.edge_type)] = edge
                for end in (edge.from_id, edge.to_id):
                    if end not in seen:
                        seen.add(end)
                        frontier.add(end)
        ids = tuple(sorted(seen))
        stored = await expect(await call(self._store, st.Get, ids))
        degree: dict[str, int] = {}
        for edge in edges.values():
            degree[edge.from_id] = degree.get(edge.from_id, 0) + 1
            degree[edge.to_id] = degree.get(edge.to_id, 0) + 1
        nodes = [
            {
                "id": s.id,
                "type": s.type,
                "timestamp": s.created_at,
                "timestamp_rfc3339": api.rfc3339(s.created_at),
                "link_count": degree.get(s.id, 0),
            }
            for s in sorted(stored.values(), key=lambda s: s.created_at)
        ]
        return {
            "root_id": root,
            "nodes": nodes,
            "edges": [_edge(e) for e in edges.values()],
            "depth": request.max_depth,
        }

    async def _status(self, request: api.Status) -> api.Response:
        identity = await expect(await call(self._vault, vt.Whoami))
        stats = await expect(await call(self._store, st.Stats))
        index, queued = await self._index_stats_now()
        info = self._info
        network = await status() if (status := self._network and self._network.status) else {}
        self._refresh_metrics(stats, network)
        return {
            "identity_id": identity.identity_id,
            "device_id": identity.device_id.hex(),
            "version": __version__,
            "mode": info.mode,
            "uptime_s": round(time.time() - info.started_at, 3),
            "started_at": api.rfc3339(int(info.started_at * 1e9)),
            "data_dir": str(info.data_dir) if info.data_dir else None,
            "memories": stats.memories,
            "links": stats.links,
            "tombstones": stats.tombstones,
            "store_bytes": stats.file_bytes,
            "index": {
                "memories": index.count,
                "embedder": index.embedder,
                "backend": index.embedder_backend,
                "search_alpha": self._default_alpha,
                "bytes": index.approx_bytes,
                "spaces": [f"{sp.name} ({sp.kind}, {sp.vectors})" for sp in index.spaces],
                **({"queued": queued} if queued else {}),
            },
            "peers": 0,
            "listen_addrs": info.listen_addrs,
            "api_urls": info.api_urls,
            **network,
            "metrics": self._metrics.to_json(),
        }

    def _refresh_metrics(self, stats: st.StoreStats, network: dict[str, Any]) -> None:
        """Fill the gauges that mirror other actors' state, just before they are read."""
        metrics = self._metrics
        metrics.memories.set(stats.memories)
        metrics.links.set(stats.links)
        metrics.tombstones.set(stats.tombstones)
        metrics.store_bytes.set(stats.file_bytes)
        metrics.peers.set(network.get("peers", 0))
        devices = network.get("sync", {}).get("devices", [])
        metrics.set_sync_lag(
            {d["device_id"]: d["ahead_of_us"] for d in devices if d.get("ahead_of_us") is not None}
        )
        metrics.set_inbox_depths(self._inbox_depths())
        storage = network.get("storage")
        if storage is not None:
            metrics.storage_held.set(storage["bytes_held"])
        durability = network.get("durability")
        if durability is not None:
            metrics.shard_durability.set(durability["durable_fraction"])

    async def _apply_retention_periodically(self) -> None:
        while True:
            await trio.sleep(self._retention_interval)
            try:
                outcome = await self._apply_retention(dry_run=False)
            except DmgnError as error:
                log.warning("retention: %s; tried again in %gs", error, self._retention_interval)
                continue
            if outcome["deleted"]:
                log.info(
                    "retention deleted %d expired memories",
                    outcome["deleted"],
                    extra={"expired": outcome["expired"]},
                )

    async def _apply_retention(self, dry_run: bool) -> api.Response:
        """Find memories past their type's period (oldest first) and delete them through the
        ordinary delete path, so the tombstones sync. At most RETENTION_MAX_PER_RUN per run:
        a long backlog is worked off over several runs instead of holding the store."""
        cutoffs = self._retention.cutoffs(time.time_ns())
        expired: dict[str, int] = {}
        examples: list[dict[str, Any]] = []
        deleted = 0
        budget = RETENTION_MAX_PER_RUN
        for kind, cutoff in cutoffs.items():
            expired[kind] = 0
            offset = 0
            while budget > 0:
                page = await expect(
                    await call(
                        self._store,
                        st.Recent,
                        min(SCAN_PAGE, budget),
                        (kind,),
                        None,
                        cutoff,
                        offset,
                        False,
                    )
                )
                if not page:
                    break
                budget -= len(page)
                expired[kind] += len(page)
                examples.extend(
                    {
                        "id": s.id,
                        "type": s.type,
                        "timestamp": s.created_at,
                        "timestamp_rfc3339": api.rfc3339(s.created_at),
                    }
                    for s in page[: max(0, RETENTION_EXAMPLES - len(examples))]
                )
                if dry_run:
                    offset += len(page)
                    continue
                for stored in page:
                    deleted += await self._delete_id(stored.id, "retention")
        return {
            "dry_run": dry_run,
            "policy": self._retention.describe(),
            "expired": expired,
            "deleted": deleted,
            "more": budget <= 0,
            "examples": examples,
        }

    async def _backup(self, request: api.Backup) -> api.Response:
        """Stream a consistent snapshot of the store into an encrypted archive (dmgn.backup).

        The key is derived in the vault; the store serves the snapshot page by page, so adds
        and syncs go on meanwhile and are simply not in this archive.
        """
        key = await expect(await call(self._vault, vt.DeriveKey, backup.KEY_PURPOSE))
        identity = await expect(await call(self._vault, vt.Whoami))
        snapshot = await expect(await call(self._store, st.SnapshotOpen))
        writer: backup.ArchiveWriter | None = None
        try:
            writer = await trio.to_thread.run_sync(
                backup.ArchiveWriter,
                Path(request.path),
                key,
                identity.identity_id,
                self._device_id.hex(),
                time.time_ns(),
            )
            while True:
                page = await expect(
                    await call(self._store, st.SnapshotRead, snapshot.snapshot, SCAN_PAGE)
                )
                if page.done:
                    break
                await trio.to_thread.run_sync(writer.add, *_archive_rows(page))
            manifest = await trio.to_thread.run_sync(writer.finish)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            with trio.CancelScope(shield=True):
                closed = await call(self._store, st.SnapshotClose, snapshot.snapshot)
                if isinstance(closed, Err):
                    log.warning("backup snapshot not closed: %s", closed.reason)
        log.info("backup written to %s: %s", request.path, manifest["counts"])
        return {"file": request.path, "identity_id": identity.identity_id, **manifest}

    async def _peers(self, request: api.Peers) -> api.Response:
        peers = self._network and self._network.peers
        return await peers() if peers else {"peers": []}


def _archive_rows(page: st.SnapshotPage) -> tuple[str, list[backup.Row]]:
    if page.memories:
        return "memories", [
            (m.id, m.created_at, m.type, m.device, m.envelope) for m in page.memories
        ]
    if page.links:
        return "links", [
            (k.from_id, k.to_id, k.edge_type, float(k.weight), k.created_at) for k in page.links
        ]
    return "tombstones", [(t.id, t.deleted_at) for t in page.tombstones]


def search_request(**fields: Any) -> Callable[[Reply[list[ix.Hit]]], ix.Search]:
    """``Search`` takes keyword fields and its reply; ``call`` supplies the reply last."""

    def make(reply: Reply[list[ix.Hit]]) -> ix.Search:
        return ix.Search(reply=reply, **fields)

    return make


def _describe(
    stored: st.StoredEnvelope, memory: Memory, include_content: bool, words: list[str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "memory_id": stored.id,
        "id": stored.id,
        "type": memory.type,
        "timestamp": memory.created_at,
        "timestamp_rfc3339": api.rfc3339(memory.created_at),
    }
    if include_content:
        out["content"] = memory.content
    else:
        out["snippet"] = snippet(memory.content, words or [])
    return out


def snippet(content: str, words: list[str]) -> str:
    """A window of the content around the first matched word (or its start)."""
    flat = " ".join(content.split())
    if len(flat) <= SNIPPET_CHARS:
        return flat
    lower = flat.lower()
    hits = [i for i in (lower.find(w) for w in words) if i >= 0]
    start = max(0, min(hits) - SNIPPET_CHARS // 4) if hits else 0
    piece = flat[start : start + SNIPPET_CHARS]
    return ("…" if start else "") + piece + ("…" if start + SNIPPET_CHARS < len(flat) else "")


def _edge(link: st.Link) -> dict[str, Any]:
    return {
        "from": link.from_id,
        "to": link.to_id,
        "type": link.edge_type,
        "weight": link.weight,
        "created": link.created_at,
        "created_rfc3339": api.rfc3339(link.created_at),
    }


def _time_ago(delta_ns: int) -> str:
    seconds = max(0, delta_ns // 1_000_000_000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
