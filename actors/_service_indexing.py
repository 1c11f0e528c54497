"""How the memory service feeds the indexer: queued, bounded, and counted for ``dmgn status``.

A private helper of :mod:`actors.service` (it sends the indexer's messages, so it sits between
the service and the leaf actors). The search index is a cache of the store: an add is answered
once it is durable and its memories are *queued* at the indexer, whose inbox is served in
order, so a later search sees them while the embedding itself follows the answer
(docs/search.md). This module owns that queue's bounds and its bookkeeping, which nothing else
in the service touches.
"""

from __future__ import annotations

import dataclasses
import logging

import trio

from actors import indexer as ix
from actors import store as st
from actors.runtime import (
    DEFAULT_CALL_TIMEOUT,
    ActorGone,
    Address,
    Err,
    Ok,
    Reply,
    Result,
    call,
    expect,
)
from dmgn.memory import Memory

__all__ = [
    "INDEX_CHUNK",
    "INDEX_IN_FLIGHT",
    "INDEX_SAVE_INTERVAL",
    "INDEX_TIMEOUT",
    "STATUS_INDEX_WAIT",
    "IndexFeed",
]

# The service's logger: these lines are the service's, wherever the code sits.
log = logging.getLogger("dmgn.service")

#: How often a running node saves its search index snapshot when it changed (a long-running
#: daemon; the offline CLI saves once, at exit). At 100k memories a save takes ~2 s.
INDEX_SAVE_INTERVAL = 600.0
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

Opened = list[tuple[st.StoredEnvelope, Memory]]


class IndexFeed:
    """The service's side of the indexer: index now, queue for indexing, figures, snapshots."""

    def __init__(self, indexer: Address[ix.Msg]) -> None:
        self._indexer = indexer
        #: Where background waits for the indexer run (set while the service serves).
        self._background: trio.Nursery | None = None
        self._slots = trio.Semaphore(INDEX_IN_FLIGHT)
        #: Memories queued with the indexer and not answered yet, those answered as added
        #: since the last ``Stats`` answer, and that answer (for status during a bulk import).
        self._queued = 0
        self._indexed_since_stats = 0
        self._stats: ix.IndexStats | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """The service serves: queue from now on, waiting for answers in ``nursery``.

        The slots are new on each (re)start, so a crashed incarnation's unreleased slots are
        not inherited."""
        self._slots = trio.Semaphore(INDEX_IN_FLIGHT)
        self._background = nursery

    def detach(self) -> None:
        """The service stopped serving: index and wait again, as the offline CLI does."""
        self._background = None

    async def index(self, opened: Opened) -> None:
        """Index memories and wait until the indexer has them (embedding included)."""
        items = tuple(
            ix.IndexItem(s.id, m.content, m.type, m.created_at, m.embedding) for s, m in opened
        )
        for start in range(0, len(items), ix.MAX_BATCH):
            await expect(
                await call(
                    self._indexer, ix.Index, items[start : start + ix.MAX_BATCH], timeout=600
                )
            )

    async def index_soon(self, opened: Opened) -> None:
        """Queue memories with the indexer and return without waiting for their vectors.

        The indexer serves its inbox in order, so a search, delete or status asked after this
        returns sees these memories; the embedding runs while the caller is answered (and, in
        a bulk import, while the next batch is sealed and stored). At most
        :data:`INDEX_IN_FLIGHT` messages wait unanswered, so a bulk import goes no faster than
        the embedder. A failure is only logged: the add is durable, and the service's
        ``reconcile_index`` indexes what is missing at the next start. Unattached (outside the
        service's ``run``) this waits, as :meth:`index` does.
        """
        background = self._background
        if background is None:
            await self.index(opened)
            return
        items = tuple(
            ix.IndexItem(s.id, m.content, m.type, m.created_at, m.embedding) for s, m in opened
        )
        for start in range(0, len(items), INDEX_CHUNK):
            chunk = items[start : start + INDEX_CHUNK]
            await self._slots.acquire()
            send, receive = trio.open_memory_channel[Result[ix.IndexResult]](1)
            try:
                await self._indexer.send(ix.Index(chunk, Reply(send)))
            except ActorGone:
                self._slots.release()
                log.warning(
                    "%d memories stored but not indexed yet: the indexer stopped", len(chunk)
                )
                return
            except BaseException:
                self._slots.release()
                raise
            self._queued += len(chunk)
            background.start_soon(self._indexed, receive, len(chunk))

    async def _indexed(
        self, receive: trio.MemoryReceiveChannel[Result[ix.IndexResult]], count: int
    ) -> None:
        """Wait for one queued Index message's answer (see :meth:`index_soon`)."""
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
            self._queued -= count
            self._slots.release()

    async def stats_now(self) -> tuple[ix.IndexStats, int]:
        """The indexer's figures, and how many memories are still queued for indexing.

        The indexer answers in order, so while memories are queued its answer waits for their
        embedding; past STATUS_INDEX_WAIT the last answer is brought up to date with what was
        indexed since, and the memories still queued are counted as such."""
        waited = None if self._queued == 0 or self._stats is None else STATUS_INDEX_WAIT
        result = await call(self._indexer, ix.Stats, timeout=waited or DEFAULT_CALL_TIMEOUT)
        if isinstance(result, Ok):
            # It counts every Index message queued before it, i.e. all answered so far.
            self._stats = result.value
            self._indexed_since_stats = 0
            return result.value, 0
        last = self._stats
        if waited is None or result.code != "timeout" or last is None:
            return await expect(result), 0
        count = last.count + self._indexed_since_stats
        return dataclasses.replace(last, count=count), self._queued

    async def save_periodically(self) -> None:
        """Bound how much a crash costs at the next start (re-indexing what the last snapshot
        missed) by saving the snapshot every INDEX_SAVE_INTERVAL when it changed."""
        saved: str | None = None
        while True:
            await trio.sleep(INDEX_SAVE_INTERVAL)
            stats = await call(self._indexer, ix.Stats)
            if isinstance(stats, Ok) and stats.value.fingerprint != saved:
                await self.persist()
                saved = stats.value.fingerprint

    async def persist(self) -> None:
        """Write the encrypted index snapshot (a cache; see the service's reconcile_index)."""
        result = await call(self._indexer, ix.Persist, timeout=120)
        if isinstance(result, Err):
            log.warning("could not save the search index: %s", result.reason)
