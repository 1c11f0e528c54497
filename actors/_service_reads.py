"""The memory service's read use cases: get, query (here and on our devices), context, graph.

A private helper of :mod:`actors.service` (it sends the store's, the vault's, the indexer's and
the router's messages, so it sits between the service and the leaf actors). Reads change
nothing; each finds memories (store, index), decrypts them (vault) and shapes the answer every
interface shows. The writes, and serving, stay in the service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from actors import indexer as ix
from actors import router as qr
from actors import store as st
from actors import vault as vt
from actors.runtime import Address, Err, Reply, call, expect
from dmgn import api
from dmgn.errors import error_for_code
from dmgn.formatting import snippet, time_ago
from dmgn.memory import Memory

__all__ = ["FAN_OUT_DEADLINE", "Reads", "search_request"]

# The service's logger: these lines are the service's, wherever the code sits.
log = logging.getLogger("dmgn.service")

#: Deadline for the router's merged answer; the router itself answers within its
#: ``query_timeout``, so this only catches a wedged router.
FAN_OUT_DEADLINE = 120.0


class Reads:
    """What the service answers without changing anything, from the actors that hold it."""

    def __init__(
        self,
        store: Address[st.StoreMsg],
        vault: Address[vt.VaultMsg],
        indexer: Address[ix.Msg],
        router: Address[qr.RouterMsg] | None,
        default_alpha: float,
    ) -> None:
        self._store = store
        self._vault = vault
        self._indexer = indexer
        self._router = router
        self._default_alpha = default_alpha

    async def resolve(self, ref: str) -> str:
        """A memory's full id from what a user typed (an id or a unique prefix of one)."""
        return await expect(await call(self._store, st.Resolve, ref))

    async def open(self, stored: list[st.StoredEnvelope]) -> list[tuple[st.StoredEnvelope, Memory]]:
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

    async def get(self, request: api.GetMemory) -> api.Response:
        memory_id = await self.resolve(request.id)
        stored, memory = await self._open_one(memory_id)
        edges = await expect(await call(self._store, st.Edges, (memory_id,)))
        return {
            **_describe(stored, memory, include_content=True),
            "metadata": memory.metadata,
            "links": [_edge(e) for e in edges],
        }

    async def query(self, request: api.QueryMemories, *, route: bool = True) -> api.Response:
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
            root = await self.resolve(request.links_of)
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
        memories = {s.id: m for s, m in await self.open(list(found.values()))}
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
            _describe(s, m, request.include_content) for s, m in reversed(await self.open(newest))
        ]
        return {"results": results, "count": len(results)}

    async def context(self, request: api.GetContext) -> api.Response:
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
                "time_ago": time_ago(now - m.created_at),
                "metadata": m.metadata,
            }
            for s, m in reversed(await self.open(newest))
        ]
        chars = sum(len(str(m["content"])) for m in memories)
        return {
            "memories": memories,
            "count": len(memories),
            "context_window_hint": f"{len(memories)} most recent memories, oldest first, "
            f"about {chars // 4} tokens",
        }

    async def graph(self, request: api.GetGraph) -> api.Response:
        root = await self.resolve(request.start_id)
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


def _edge(link: st.Link) -> dict[str, Any]:
    return {
        "from": link.from_id,
        "to": link.to_id,
        "type": link.edge_type,
        "weight": link.weight,
        "created": link.created_at,
        "created_rfc3339": api.rfc3339(link.created_at),
    }
