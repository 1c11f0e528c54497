"""The memory service: the node's use cases, composed from the actors. Entry-point layer.

This module is the composition root (docs/design.md, "Layers": only entry points wire actors
together). It runs as one more actor serving :mod:`dmgn.api` requests, so the CLI in-process, the
control socket and the MCP bridge all reach the same code through one typed channel. A use case
like "add a memory" is a short sequence of requests to the actors that own each resource:
resolve links (store) → seal (vault) → durable put (store) → index (indexer).

Requests are handled concurrently (each in its own task, bounded), because a slow query must not
hold up an add; the service's own state is only addresses and a clock.

This module serves, dispatches and holds the writes (add, delete, link, synced ops); each other
concern has a private helper module that sits below it and above the leaf actors: the reads
(``_service_reads``), feeding the indexer (``_service_indexing``), retention
(``_service_retention``), a replica's window (``_service_replica``), backups
(``_service_backup``) and the status gauges (``_service_metrics``).
"""

from __future__ import annotations

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
from actors._service_backup import write_backup
from actors._service_indexing import IndexFeed
from actors._service_metrics import refresh_metrics
from actors._service_reads import Reads
from actors._service_replica import ReplicaWindow
from actors._service_requests import ServiceMsg
from actors._service_retention import Retention
from actors.runtime import (
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
from dmgn import __version__, api, feed
from dmgn.errors import DmgnError, InvalidInput
from dmgn.memory import Memory, read_header, validate_memory
from dmgn.metrics import NodeMetrics
from dmgn.retention import RetentionPolicy

log = logging.getLogger("dmgn.service")
T = TypeVar("T")


#: Requests served at once. Beyond this, callers queue in the bounded inbox (backpressure).
MAX_CONCURRENT_REQUESTS = 32
#: How often a running node applies its retention policy. Periods are days to years, so an
#: hour late costs nothing, and a run over an unchanged store is a few index lookups.
RETENTION_INTERVAL = 3600.0
#: Envelopes decrypted per round trip to the vault when scanning the whole store.
SCAN_PAGE = 512
#: Queries for our other devices answered at once (each device may have 8 running here).
MAX_LOCAL_QUERIES = 16


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
        self._retention = Retention(
            retention or RetentionPolicy({}),
            store,
            self._delete_id,
            retention_interval,
            SCAN_PAGE,
        )
        self._replica = ReplicaWindow(replica_days, store, indexer, wall_clock, SCAN_PAGE)
        self._wall_clock = wall_clock
        self._last_ns = 0
        self._reconciled = False
        self._indexing = IndexFeed(indexer)
        self._reads = Reads(store, vault, indexer, router, default_alpha)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self._reconciled:
            await self.reconcile_index()
            self._reconciled = True
        slots = trio.Semaphore(MAX_CONCURRENT_REQUESTS)
        try:
            async with trio.open_nursery() as nursery:
                self._indexing.attach(nursery)
                nursery.start_soon(self._serve_apply)
                nursery.start_soon(self._serve_link)
                nursery.start_soon(self._indexing.save_periodically)
                if self._retention.policy.max_age:
                    nursery.start_soon(self._retention.apply_periodically)
                if self._replica.days is not None:
                    await self.evict_outside_window()
                    nursery.start_soon(self._replica.evict_periodically)
                # Their own slots: our routed queries hold main slots while they wait for other
                # devices, whose local queries must never wait for those slots here.
                nursery.start_soon(self._serve_local_queries, trio.Semaphore(MAX_LOCAL_QUERIES))
                task_status.started()
                async for message in self.mailbox:
                    await slots.acquire()
                    nursery.start_soon(self._serve, message, slots)
        finally:
            self._indexing.detach()

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
        window_start = self._replica.start()
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
                await self._indexing.index(await self._reads.open(list(found.values())))
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
            await self._indexing.index(await self._reads.open(list(found.values())))

    async def evict_outside_window(self) -> int:
        """A ``recent:<days>`` replica: drop what left the window (see actors._service_replica).
        Returns how many memories were dropped."""
        return await self._replica.evict()

    async def persist_index(self) -> None:
        """Write the encrypted index snapshot (a cache; see :meth:`reconcile_index`)."""
        await self._indexing.persist()

    # -- use cases ---------------------------------------------------------------------------

    async def _add(self, request: api.AddMemory) -> api.Response:
        link_ids = [await self._reads.resolve(ref) for ref in request.links]
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
        # answered; a search asked after the answer waits for it (see IndexFeed.index_soon).
        await self._indexing.index_soon([(stored, memory)])
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
                link_ids = [await self._reads.resolve(ref) for ref in item.links]
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
        await self._indexing.index_soon([pair for pair in opened if pair[0].id in added])
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
        return await self._reads.get(request)

    async def _query(self, request: api.QueryMemories, *, route: bool = True) -> api.Response:
        return await self._reads.query(request, route=route)

    async def _context(self, request: api.GetContext) -> api.Response:
        return await self._reads.context(request)

    async def _delete(self, request: api.DeleteMemory) -> api.Response:
        memory_id = await self._reads.resolve(request.id)
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
        from_id = await self._reads.resolve(request.from_id)
        to_id = await self._reads.resolve(request.to_id)
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
        return await self._reads.graph(request)

    async def _status(self, request: api.Status) -> api.Response:
        identity = await expect(await call(self._vault, vt.Whoami))
        stats = await expect(await call(self._store, st.Stats))
        index, queued = await self._indexing.stats_now()
        info = self._info
        network = await status() if (status := self._network and self._network.status) else {}
        refresh_metrics(self._metrics, stats, network, self._inbox_depths())
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

    async def _apply_retention(self, dry_run: bool) -> api.Response:
        """Delete what the retention policy says has expired (see actors._service_retention)."""
        return await self._retention.apply(dry_run)

    async def _backup(self, request: api.Backup) -> api.Response:
        """Stream a consistent snapshot of the store into an encrypted archive (dmgn.backup;
        see actors._service_backup)."""
        return await write_backup(
            self._vault, self._store, self._device_id, request.path, SCAN_PAGE
        )

    async def _peers(self, request: api.Peers) -> api.Response:
        peers = self._network and self._network.peers
        return await peers() if peers else {"peers": []}
