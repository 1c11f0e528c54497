"""The memory service answers an add once it is durable and queued for indexing; the embedding
follows. A search asked after the answer still sees the memory (the indexer serves its inbox in
order), and `status` answers during a long embedding instead of waiting for it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import trio
import trio.testing

from actors.node import open_node
from dmgn import api
from dmgn.embedding import HashingEmbedder, Vectors
from tests._deadlines import scaled

SEED = bytes(range(32))


class GatedEmbedder(HashingEmbedder):
    """The lexical embedder, held at a gate for texts that mention "gated"."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def embed(self, texts: Sequence[str]) -> Vectors:
        if any("gated" in text for text in texts):
            self.waiting.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super().embed(texts)


async def test_adds_are_answered_before_their_embedding_and_searches_wait_for_it() -> None:
    embedder = GatedEmbedder()
    async with open_node(SEED, os.urandom(16), None, embedder=embedder) as node:
        before = await node.request(api.Status())
        assert before["index"]["memories"] == 0 and "queued" not in before["index"]

        memories = tuple(api.AddMemory(content=f"gated harbour note {i}") for i in range(200))
        added = await node.request(api.AddMemories(memories=memories))
        assert added["added"] == 200
        assert not embedder.gate.is_set()  # answered while the embedding cannot finish
        await trio.to_thread.run_sync(embedder.waiting.wait, 60)

        started = time.monotonic()
        during = await node.request(api.Status())
        assert time.monotonic() - started < scaled(10)  # the service waits 0.5 s, then answers
        assert during["memories"] == 200  # durable
        assert during["index"]["queued"] == 200 and during["index"]["memories"] == 0

        found: list[api.Response] = []

        async def search() -> None:
            query = api.QueryMemories(text="harbour note 199", alpha=0.0, limit=1)
            found.append(await node.request(query))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(search)
            # Every task is parked (the embedding thread holds the gate): the search waits
            # behind the embedding rather than answering without the memory.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert not found
            embedder.gate.set()
        assert found[0]["results"][0]["snippet"] == "gated harbour note 199"

        after = await node.request(api.Status())
        assert after["index"]["memories"] == 200 and "queued" not in after["index"]
