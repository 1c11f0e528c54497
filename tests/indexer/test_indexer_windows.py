"""Long memories: every part of a long text is found by meaning; deletes erase every window."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
import trio

from actors._index_core import SNAPSHOT_FORMAT
from actors.indexer import (
    SNAPSHOT_NAME,
    Index,
    IndexerActor,
    IndexItem,
    Persist,
    Search,
    Stats,
    Unindex,
)
from actors.runtime import Ok, call
from dmgn.crypto import seal, unseal
from dmgn.embedding import MiniLMEmbedder

KEY = bytes(range(32))

FILLER = [
    "The committee reviewed the quarterly budget and approved the new printer lease.",
    "Traffic on the ring road was slow because of roadworks near the stadium.",
    "We discussed the font of the newsletter header for far too long.",
    "Someone suggested moving the weekly sync to a shorter slot in the morning.",
    "The spreadsheet of office supplies was updated with staples and folders.",
]


def mid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def long_document(fact: str, depth: int, paragraphs: int = 30) -> str:
    lines = [FILLER[i % len(FILLER)] for i in range(paragraphs)]
    lines.insert(depth, fact)
    return " ".join(lines)


@pytest.fixture(scope="module")
def model() -> MiniLMEmbedder:
    return MiniLMEmbedder(threads=1)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def ask(actor: IndexerActor, make: object) -> object:
    result = await call(actor.mailbox.address, make, timeout=120)  # type: ignore[arg-type]
    assert isinstance(result, Ok), result
    return result.value


async def test_a_fact_deep_in_a_long_memory_is_found_by_meaning(
    nursery: trio.Nursery, model: MiniLMEmbedder, tmp_path: Path
) -> None:
    actor = IndexerActor(model, tmp_path, KEY)
    await nursery.start(actor.run)
    facts = {
        "dog": "My sister finally adopted a beagle puppy from the animal shelter.",
        "flight": "Our flight to Lisbon for the anniversary leaves on the ninth of October.",
        "allergy": "Remember that Tom is severely allergic to peanuts and carries an EpiPen.",
    }
    items = [
        IndexItem(mid(name), long_document(fact, depth=25), "document", i)
        for i, (name, fact) in enumerate(facts.items())
    ]
    await ask(actor, lambda r: Index(tuple(items), r))
    stats = await ask(actor, Stats)
    (builtin,) = [s for s in stats.spaces if s.name == "builtin"]  # type: ignore[attr-defined]
    assert builtin.vectors > len(items)  # several windows per memory
    # The facts sit past the model's 256 word pieces, in words the queries do not share.
    assert len(model._tokenizer.encode(items[0].text).overflowing) > 0
    queries = {
        "dog": "which pet did a relative get",
        "flight": "when do we travel to Portugal",
        "allergy": "who has a nut allergy",
    }
    for name, question in queries.items():
        hits = await ask(actor, lambda r, q=question: Search(reply=r, text=q, alpha=1.0, limit=1))
        assert [h.memory_id for h in hits] == [mid(name)], question  # type: ignore[attr-defined]

    # Survives a snapshot round trip, and a delete erases every window of the memory.
    await ask(actor, Persist)
    reloaded = IndexerActor(model, tmp_path, KEY)
    await nursery.start(reloaded.run)
    assert (await ask(reloaded, Stats)).loaded_from_snapshot  # type: ignore[attr-defined]
    assert await ask(reloaded, lambda r: Unindex((mid("dog"),), r)) == 1
    after = await ask(reloaded, Stats)
    (space,) = [s for s in after.spaces if s.name == "builtin"]  # type: ignore[attr-defined]
    per_memory = builtin.vectors // len(items)
    assert space.vectors == builtin.vectors - per_memory
    hits = await ask(reloaded, lambda r: Search(reply=r, text=queries["dog"], alpha=1.0, limit=3))
    assert mid("dog") not in {h.memory_id for h in hits}  # type: ignore[attr-defined]


async def test_a_snapshot_of_the_old_format_is_rebuilt_not_read(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from dmgn.embedding import HashingEmbedder

    first = IndexerActor(HashingEmbedder(), tmp_path, KEY)
    await nursery.start(first.run)
    await ask(first, lambda r: Index((IndexItem(mid("a"), "kept words", "text", 1),), r))
    await ask(first, Persist)
    path = tmp_path / SNAPSHOT_NAME
    aad = b"dmgn index snapshot v1"
    state = msgpack.unpackb(unseal(KEY, path.read_bytes(), aad), raw=False)
    assert state["format"] == SNAPSHOT_FORMAT == 2
    state["format"] = 1  # what dmgn wrote before long memories had several vectors
    path.write_bytes(seal(KEY, msgpack.packb(state, use_bin_type=True), aad))

    second = IndexerActor(HashingEmbedder(), tmp_path, KEY)
    await nursery.start(second.run)
    stats = await ask(second, Stats)
    assert stats.count == 0 and not stats.loaded_from_snapshot  # type: ignore[attr-defined]
    problem = stats.snapshot_problem  # type: ignore[attr-defined]
    assert "another version of dmgn" in problem and "rebuilding from the store" in problem
