"""The memory service: the node's use cases, composed from the actors. Entry-point layer.

This module is the composition root (see DESIGN.md section 2: only entry points wire actors
together). It runs as one more actor serving :mod:`dmgn.api` requests, so the CLI in-process, the
control socket and the MCP bridge all reach the same code through one typed channel. A use case
like "add a memory" is a short sequence of requests to the actors that own each resource:
resolve links (store) → seal (vault) → durable put (store) → index (indexer).

Requests are handled concurrently (each in its own task, bounded), because a slow query must not
hold up an add; the service's own state is only addresses and a clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from actors import store as st
from actors import vault as vt
from actors.runtime import (
    ActorSpec,
    Address,
    Err,
    Mailbox,
    Ok,
    Request,
    Result,
    Supervisor,
    ask,
    call,
)
from dmgn import __version__, api
from dmgn.errors import DmgnError, InvalidInput, error_for_code
from dmgn.memory import Memory, validate_memory

log = logging.getLogger("dmgn.service")
T = TypeVar("T")

ServiceMsg = Request[api.ApiRequest, api.Response]

#: Requests served at once. Beyond this, callers queue in the bounded inbox (backpressure).
MAX_CONCURRENT_REQUESTS = 32
SNIPPET_CHARS = 200
#: Envelopes decrypted per round trip to the vault when scanning the whole store.
SCAN_PAGE = 512


async def expect(result: Result[T]) -> T:
    """Unwrap an actor reply, turning ``Err`` back into the typed user-facing error."""
    if isinstance(result, Err):
        raise error_for_code(result.code, result.reason)
    return result.value


@dataclass
class NodeInfo:
    """Facts about the running process, filled in by whoever hosts the node."""

    data_dir: Path | None
    started_at: float = field(default_factory=time.time)
    mode: str = "offline"
    listen_addrs: list[str] = field(default_factory=list)


class MemoryService:
    def __init__(self, vault: Address[vt.VaultMsg], store: Address[st.StoreMsg],
                 info: NodeInfo) -> None:
        self.mailbox: Mailbox[ServiceMsg] = Mailbox("service", 128)
        self._vault = vault
        self._store = store
        self._info = info
        self._last_ns = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        slots = trio.Semaphore(MAX_CONCURRENT_REQUESTS)
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for message in self.mailbox:
                await slots.acquire()
                nursery.start_soon(self._serve, message, slots)

    async def _serve(self, message: ServiceMsg, slots: trio.Semaphore) -> None:
        try:
            message.reply.send(await self.handle(message.body))
        finally:
            slots.release()

    async def handle(self, request: api.ApiRequest) -> Result[api.Response]:
        """Run one request; every failure comes back as an ``Err`` with a sentence."""
        handler = getattr(self, "_" + request.op)
        try:
            request.validate()
            return Ok(await handler(request))
        except DmgnError as error:
            return Err(str(error), error.code)
        except Exception as error:  # a bug: report it to the caller, keep serving others
            log.exception("request %s failed", request.op)
            return Err(f"internal error while handling {request.op}: {error}", "internal")

    # -- helpers -----------------------------------------------------------------------------

    def _now_ns(self) -> int:
        # Strictly increasing, so memories added in one burst keep their order.
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
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

    # -- use cases ---------------------------------------------------------------------------

    async def _add(self, request: api.AddMemory) -> api.Response:
        link_ids = [await self._resolve(ref) for ref in request.links]
        memory = Memory(request.content, request.type, self._now_ns(), dict(request.metadata),
                        request.embedding)
        validate_memory(memory)
        memory_id, envelope = await expect(await call(self._vault, vt.Seal, memory))
        identity = await expect(await call(self._vault, vt.Whoami))
        links = tuple(st.Link(memory_id, target, request.link_type, 1.0, memory.created_at)
                      for target in link_ids)
        stored = st.StoredEnvelope(memory_id, memory.created_at, memory.type,
                                   identity.device_id, envelope)
        await expect(await call(self._store, st.Put, (stored,), links))
        return {"id": memory_id, "timestamp": memory.created_at, "type": memory.type,
                "links": link_ids}

    async def _get(self, request: api.GetMemory) -> api.Response:
        memory_id = await self._resolve(request.id)
        stored, memory = await self._open_one(memory_id)
        edges = await expect(await call(self._store, st.Edges, (memory_id,)))
        return {**_describe(stored, memory, include_content=True),
                "metadata": memory.metadata,
                "links": [_edge(e) for e in edges]}

    async def _query(self, request: api.QueryMemories) -> api.Response:
        if request.recent:
            newest = await expect(await call(
                self._store, st.Recent, request.limit, request.types, request.after,
                request.before, 0, True))
            opened = await self._open(newest)
            # Most recent N, shown in chronological order (like `tail`).
            results = [{**_describe(s, m, request.include_content), "score": 1.0}
                       for s, m in reversed(opened)]
            return {"results": results, "count": len(results)}
        hits = await self._scan_query(request)
        return {"results": hits, "count": len(hits)}

    async def _scan_query(self, request: api.QueryMemories) -> list[dict[str, Any]]:
        """Keyword match over every memory, decrypted page by page."""
        words = [w for w in (request.text or "").lower().split() if w]
        phrase = (request.text or "").lower().strip()
        only: set[str] | None = None
        if request.links_of:
            root = await self._resolve(request.links_of)
            edges = await expect(await call(self._store, st.Edges, (root,)))
            only = {e.to_id if e.from_id == root else e.from_id for e in edges}
        scored: list[tuple[float, int, dict[str, Any]]] = []
        offset = 0
        while True:
            page = await expect(await call(
                self._store, st.Recent, SCAN_PAGE, request.types, request.after,
                request.before, offset, True))
            for stored, memory in await self._open(page):
                if only is not None and stored.id not in only:
                    continue
                text = memory.content.lower()
                matched = sum(1 for w in words if w in text)
                if not matched:
                    continue
                score = matched / len(words) * (0.8 if phrase not in text else 1.0)
                scored.append((score, stored.created_at,
                               {**_describe(stored, memory, request.include_content, words),
                                "score": round(score, 4)}))
            if len(page) < SCAN_PAGE:
                break
            offset += SCAN_PAGE
        scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [item[2] for item in scored[: request.limit]]

    async def _context(self, request: api.GetContext) -> api.Response:
        newest = await expect(await call(
            self._store, st.Recent, request.limit, (), None, None, 0, True))
        now = time.time_ns()
        memories = [{"id": s.id, "content": m.content, "type": m.type,
                     "timestamp": m.created_at, "time_ago": _time_ago(now - m.created_at),
                     "metadata": m.metadata}
                    for s, m in reversed(await self._open(newest))]
        chars = sum(len(str(m["content"])) for m in memories)
        return {"memories": memories, "count": len(memories),
                "context_window_hint": f"{len(memories)} most recent memories, oldest first, "
                                       f"about {chars // 4} tokens"}

    async def _delete(self, request: api.DeleteMemory) -> api.Response:
        memory_id = await self._resolve(request.id)
        deleted = await expect(await call(self._store, st.Delete, memory_id))
        return {"id": memory_id, "deleted": deleted}

    async def _link(self, request: api.LinkMemories) -> api.Response:
        from_id = await self._resolve(request.from_id)
        to_id = await self._resolve(request.to_id)
        if from_id == to_id:
            raise InvalidInput("a memory cannot link to itself")
        link = st.Link(from_id, to_id, request.edge_type, request.weight, self._now_ns())
        created = await expect(await call(self._store, st.AddLink, link))
        return {"from_id": from_id, "to_id": to_id, "edge_type": request.edge_type,
                "weight": request.weight, "created": created}

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
        nodes = [{"id": s.id, "type": s.type, "timestamp": s.created_at,
                  "link_count": degree.get(s.id, 0)}
                 for s in sorted(stored.values(), key=lambda s: s.created_at)]
        return {"root_id": root, "nodes": nodes,
                "edges": [_edge(e) for e in edges.values()], "depth": request.max_depth}

    async def _status(self, request: api.Status) -> api.Response:
        identity = await expect(await call(self._vault, vt.Whoami))
        stats = await expect(await call(self._store, st.Stats))
        info = self._info
        return {
            "identity_id": identity.identity_id,
            "device_id": identity.device_id.hex(),
            "version": __version__,
            "mode": info.mode,
            "uptime_s": round(time.time() - info.started_at, 3),
            "data_dir": str(info.data_dir) if info.data_dir else None,
            "memories": stats.memories,
            "links": stats.links,
            "tombstones": stats.tombstones,
            "store_bytes": stats.file_bytes,
            "peers": 0,
            "listen_addrs": info.listen_addrs,
        }

    async def _peers(self, request: api.Peers) -> api.Response:
        return {"peers": []}


def _describe(stored: st.StoredEnvelope, memory: Memory, include_content: bool,
              words: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"memory_id": stored.id, "id": stored.id, "type": memory.type,
                           "timestamp": memory.created_at}
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
    piece = flat[start:start + SNIPPET_CHARS]
    return ("…" if start else "") + piece + ("…" if start + SNIPPET_CHARS < len(flat) else "")


def _edge(link: st.Link) -> dict[str, Any]:
    return {"from": link.from_id, "to": link.to_id, "type": link.edge_type,
            "weight": link.weight, "created": link.created_at}


def _time_ago(delta_ns: int) -> str:
    seconds = max(0, delta_ns // 1_000_000_000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@dataclass
class RunningNode:
    """Handles to a started node's actors, for the entry points."""

    service: Address[ServiceMsg]
    vault: Address[vt.VaultMsg]
    store: Address[st.StoreMsg]
    supervisor: Supervisor
    info: NodeInfo

    async def request(self, request: api.ApiRequest, timeout: float = 60.0) -> api.Response:
        """Run a request and return its response, raising the typed error on failure."""
        result = await ask(self.service, request, timeout)
        return await expect(result)


@asynccontextmanager
async def open_node(seed: bytes, device_id: bytes, data_dir: Path | None,
                    info: NodeInfo | None = None) -> AsyncIterator[RunningNode]:
    """Start the local actors (vault, store, service) under one supervisor.

    ``data_dir=None`` keeps everything in memory (sims and tests).
    """
    info = info or NodeInfo(data_dir)
    vault = vt.VaultActor(seed, device_id)
    store = st.StoreActor(data_dir / "memories.duckdb" if data_dir else None)
    service = MemoryService(vault.mailbox.address, store.mailbox.address, info)
    async with Supervisor() as supervisor:
        await supervisor.start(ActorSpec("vault", vault.run, vault.mailbox))
        await supervisor.start(ActorSpec("store", store.run, store.mailbox))
        await supervisor.start(ActorSpec("service", service.run, service.mailbox))
        yield RunningNode(service.mailbox.address, vault.mailbox.address,
                          store.mailbox.address, supervisor, info)
