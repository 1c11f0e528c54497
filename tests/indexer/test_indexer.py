"""The indexer actor's guarantees, as specifications."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import trio

from actors._index_text import tokenize
from actors.indexer import (
    MAX_QUERY_CHARS,
    Embed,
    Hit,
    Index,
    IndexerActor,
    IndexItem,
    IndexResult,
    IndexStats,
    ListIds,
    Persist,
    Reset,
    Search,
    Stats,
    Unindex,
    fingerprint_of,
)
from actors.runtime import Err, Ok, Reply, Result, call
from dmgn.embedding import (
    Embedder,
    HashingEmbedder,
    MiniLMEmbedder,
    default_embedder,
)

T = TypeVar("T")
KEY = bytes(range(32))
SECOND = 1_000_000_000


def mid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def item(
    name: str,
    text: str,
    *,
    type: str = "text",
    at: int = 0,
    embedding: tuple[float, ...] | None = None,
) -> IndexItem:
    return IndexItem(mid(name), text, type, at * SECOND, embedding)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()


async def ask(actor: IndexerActor, make: Callable[[Reply[T]], Any]) -> T:
    result: Result[T] = await call(actor.mailbox.address, make, timeout=60)
    assert isinstance(result, Ok), result
    return result.value


async def search(actor: IndexerActor, **kw: Any) -> list[Hit]:
    return await ask(actor, lambda r: Search(reply=r, **kw))


async def search_err(actor: IndexerActor, **kw: Any) -> Err:
    result: Result[list[Hit]] = await call(
        actor.mailbox.address, lambda r: Search(reply=r, **kw), timeout=60
    )
    assert isinstance(result, Err), result
    return result


async def index(actor: IndexerActor, *items: IndexItem) -> IndexResult:
    return await ask(actor, lambda r: Index(tuple(items), r))


def ids(hits: list[Hit]) -> list[str]:
    return [h.memory_id for h in hits]


class Running:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery

    async def start(
        self, embedder: Embedder, data_dir: Path | None = None, **kw: Any
    ) -> IndexerActor:
        actor = IndexerActor(embedder, data_dir, KEY if data_dir else None, **kw)
        await self.nursery.start(actor.run)
        return actor


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    async with trio.open_nursery() as nursery:
        yield Running(nursery)
        nursery.cancel_scope.cancel()


CHAT = [
    ("dog", "I finally adopted a beagle puppy from the shelter last weekend, we named him Max."),
    ("job", "Starting Monday I'll be working as a nurse at St. Mary's hospital downtown."),
    ("trip", "We're flying to Lisbon in October for our tenth wedding anniversary."),
    ("allergy", "Be careful with the cake, I'm allergic to peanuts."),
    ("car", "My old Honda broke down again so I'm shopping for an electric car."),
    ("piano", "I practise the piano every evening, mostly Chopin nocturnes."),
]


# -- finding things -------------------------------------------------------------------------


async def test_memory_found_by_meaning_with_no_shared_words(
    running: Running, minilm: MiniLMEmbedder
) -> None:
    actor = await running.start(minilm)
    await index(actor, *(item(n, t, at=i) for i, (n, t) in enumerate(CHAT)))
    for question, expected in [
        ("What pet does the user own?", "dog"),
        ("Which food causes a reaction?", "allergy"),
        ("what instrument do they play", "piano"),
        ("Where is the couple travelling for a celebration?", "trip"),
    ]:
        assert not set(tokenize(question)) & set(tokenize(dict(CHAT)[expected]))
        hits = await search(actor, text=question, limit=3)
        assert hits[0].memory_id == mid(expected), (question, hits)
        assert hits[0].text_score == 0.0 and hits[0].vector_score > 0.2


async def test_exact_rare_word_found_by_bm25(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    filler = [
        item(f"f{i}", f"Note {i}: talked about the weather and groceries again.", at=i)
        for i in range(200)
    ]
    await index(actor, *filler, item("rare", "The wifi password is xylophone-42-quokka.", at=5))
    for alpha in (0.0, 0.5):
        hits = await search(actor, text="quokka", alpha=alpha, limit=5)
        assert hits[0].memory_id == mid("rare")
        assert hits[0].text_score == pytest.approx(1.0)
    text_only = await search(actor, text="quokka", alpha=0.0, limit=5)
    assert ids(text_only) == [mid("rare")]  # nothing else shares the word


async def test_scores_are_normalised_and_alpha_weighs_them(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    await index(actor, *(item(n, t, at=i) for i, (n, t) in enumerate(CHAT)))
    for alpha in (0.0, 0.3, 0.5, 1.0):
        for hit in await search(actor, text="allergic to peanuts", alpha=alpha, limit=6):
            assert 0.0 <= hit.vector_score <= 1.0 and 0.0 <= hit.text_score <= 1.0
            if 0 < alpha < 1:
                assert hit.score == pytest.approx(
                    alpha * hit.vector_score + (1 - alpha) * hit.text_score, abs=1e-6
                )
            elif alpha == 0:
                assert hit.score == pytest.approx(hit.text_score)
            else:
                assert hit.score == pytest.approx(hit.vector_score)


async def test_common_words_alone_do_not_make_a_full_text_match(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    await index(
        actor,
        *(item(f"w{i}", f"busy at work again, day {i}", at=i) for i in range(50)),
        item("rare", "the zeppelin tour was booked", at=99),
    )
    common = await search(actor, text="work", alpha=0.0, limit=3)
    assert common and all(h.text_score < 0.5 for h in common)
    assert (await search(actor, text="zeppelin", alpha=0.0))[0].text_score == pytest.approx(1.0)


async def test_ties_are_broken_by_recency(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    same = "Reminder: water the plants."
    await index(actor, item("old", same, at=10), item("new", same, at=20), item("mid", same, at=15))
    hits = await search(actor, text="water the plants", limit=3)
    assert ids(hits) == [mid("new"), mid("mid"), mid("old")]


async def test_filters_are_honoured(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    await index(
        actor,
        item("a", "budget meeting notes for the garden project", type="text", at=100),
        item("b", "budget meeting notes for the garden project", type="conversation", at=200),
        item("c", "budget meeting notes for the garden project", type="observation", at=300),
        item("d", "budget meeting notes for the garden project", type="conversation", at=400),
    )
    q = "garden budget"
    assert set(ids(await search(actor, text=q, types=frozenset({"conversation"})))) == {
        mid("b"),
        mid("d"),
    }
    assert set(ids(await search(actor, text=q, after_ns=150 * SECOND))) == {
        mid("b"),
        mid("c"),
        mid("d"),
    }
    assert set(ids(await search(actor, text=q, before_ns=300 * SECOND))) == {mid("a"), mid("b")}
    assert ids(await search(actor, text=q, only_ids=frozenset({mid("c"), mid("zzz")}))) == [
        mid("c")
    ]
    assert ids(
        await search(actor, text=q, types=frozenset({"conversation"}), after_ns=300 * SECOND)
    ) == [mid("d")]
    assert await search(actor, text=q, types=frozenset({"document"})) == []


async def test_filters_are_honoured_past_the_approximate_index_threshold(running: Running) -> None:
    actor = await running.start(HashingEmbedder(), ann_threshold=300)
    batch = [
        item(
            f"m{i}",
            f"daily log {i} about hiking trails and weather",
            type="observation" if i % 10 == 0 else "text",
            at=i,
        )
        for i in range(600)
    ]
    for start in range(0, 600, 200):
        await index(actor, *batch[start : start + 200])
    stats = await ask(actor, Stats)
    assert stats.spaces[0].kind.startswith("ivf")
    hits = await search(actor, text="hiking weather", types=frozenset({"observation"}), limit=100)
    assert len(hits) == 60
    assert all(int(h.created_at_ns // SECOND) % 10 == 0 for h in hits)


# -- deleting -------------------------------------------------------------------------------


async def test_deleted_memories_are_never_returned(running: Running, tmp_path: Path) -> None:
    actor = await running.start(HashingEmbedder(), tmp_path, ann_threshold=50)
    batch = [item(f"m{i}", f"entry {i} about sailing boats on the lake", at=i) for i in range(120)]
    await index(actor, *batch, item("secret", "the vault code is marmalade", at=500))
    gone = (mid("secret"), *(mid(f"m{i}") for i in range(0, 120, 2)))
    assert await ask(actor, lambda r: Unindex(gone, r)) == len(gone)
    for query in (
        {"text": "marmalade"},
        {"text": "sailing boats lake", "limit": 200},
        {"text": "marmalade", "alpha": 1.0},
        {"text": "sailing", "alpha": 0.0, "limit": 200},
    ):
        assert not set(ids(await search(actor, **query))) & set(gone)
    assert len(await search(actor, text="sailing boats lake", limit=200)) == 60
    # Erased, not hidden: the snapshot written afterwards holds no trace of the words.
    await ask(actor, Persist)
    reloaded = await running.start(HashingEmbedder(), tmp_path, ann_threshold=50)
    assert (await ask(reloaded, Stats)).count == 60
    assert await search(reloaded, text="marmalade", alpha=0.0) == []
    assert mid("secret") not in ids(await search(reloaded, text="marmalade", limit=100))
    assert not set(ids(await search(reloaded, text="sailing", limit=200))) & set(gone)


async def test_unindexing_many_compacts_and_keeps_the_rest_searchable(running: Running) -> None:
    actor = await running.start(HashingEmbedder(), ann_threshold=500)
    batch = [
        item(f"m{i}", f"record {i} concerning topic{i % 7} and apples", at=i) for i in range(2000)
    ]
    for start in range(0, 2000, 500):
        await index(actor, *batch[start : start + 500])
    await ask(actor, lambda r: Unindex(tuple(mid(f"m{i}") for i in range(1500)), r))
    stats = await ask(actor, Stats)
    assert stats.count == 500 and stats.dead_slots == 0  # compacted
    assert stats.fingerprint == fingerprint_of(mid(f"m{i}") for i in range(1500, 2000))
    hits = await search(actor, text="topic3", alpha=0.0, limit=1000)
    assert {h.memory_id for h in hits} == {mid(f"m{i}") for i in range(1500, 2000) if i % 7 == 3}


# -- persistence ----------------------------------------------------------------------------


async def test_index_rebuilt_after_restart_gives_the_same_top_results(
    running: Running, tmp_path: Path, minilm: MiniLMEmbedder
) -> None:
    first = await running.start(minilm, tmp_path)
    memories = [item(n, t, at=i) for i, (n, t) in enumerate(CHAT)]
    await index(first, *memories)
    queries = ["what pet do I have", "peanuts", "travel plans", "music practice"]
    before = [ids(await search(first, text=q, limit=3)) for q in queries]
    size = await ask(first, Persist)
    assert size > 0
    snapshot = tmp_path / "index.snapshot"
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    assert b"beagle" not in snapshot.read_bytes()  # encrypted at rest

    loaded = await running.start(minilm, tmp_path)
    stats = await ask(loaded, Stats)
    assert stats.loaded_from_snapshot and stats.count == len(CHAT)
    assert stats.fingerprint == fingerprint_of(m.memory_id for m in memories)
    assert [ids(await search(loaded, text=q, limit=3)) for q in queries] == before

    # A full rebuild from the store (reset + re-index) agrees too.
    await ask(loaded, Reset)
    assert (await ask(loaded, Stats)).count == 0
    await index(loaded, *reversed(memories))
    assert [ids(await search(loaded, text=q, limit=3)) for q in queries] == before


async def test_snapshot_under_another_key_is_refused_and_reported(
    running: Running, tmp_path: Path
) -> None:
    first = await running.start(HashingEmbedder(), tmp_path)
    await index(first, item("x", "something worth keeping"))
    await ask(first, Persist)
    stranger = IndexerActor(HashingEmbedder(), tmp_path, bytes(32))
    await running.nursery.start(stranger.run)
    stats = await ask(stranger, Stats)
    assert stats.count == 0 and not stats.loaded_from_snapshot
    assert stats.snapshot_problem is not None and "could not be decrypted" in stats.snapshot_problem


async def test_snapshot_from_another_embedder_is_not_used(running: Running, tmp_path: Path) -> None:
    first = await running.start(HashingEmbedder(dim=256), tmp_path)
    await index(first, item("x", "something worth keeping"))
    await ask(first, Persist)
    other = await running.start(HashingEmbedder(dim=384), tmp_path)
    stats = await ask(other, Stats)
    assert stats.count == 0 and stats.snapshot_problem is not None
    assert "hash-ngram-v1-256" in stats.snapshot_problem


# -- odd queries and bad input --------------------------------------------------------------


async def test_empty_huge_and_unicode_queries(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    await index(
        actor,
        item("jp", "東京で寿司を食べました 🍣", at=1),
        item("ar", "ذهبت إلى السوق اليوم", at=2),
        item("en", "Ate sushi in Tokyo yesterday", at=3),
    )
    for empty in ("", "   \n\t"):
        err = await search_err(actor, text=empty)
        assert err.code == "invalid_request" and "query is empty" in err.reason
    assert "query is empty" in (await search_err(actor)).reason
    err = await search_err(actor, text="x" * (MAX_QUERY_CHARS + 1))
    assert "limited to" in err.reason
    long_hits = await search(actor, text=("sushi Tokyo " * 1500)[:MAX_QUERY_CHARS])
    assert long_hits[0].memory_id == mid("en")
    assert (await search(actor, text="寿司"))[0].memory_id == mid("jp")
    assert (await search(actor, text="السوق"))[0].memory_id == mid("ar")
    assert isinstance(await search(actor, text="🍣 ✨ \u200b"), list)
    assert (await search_err(actor, text="sushi", limit=0)).code == "invalid_request"
    assert (await search_err(actor, text="sushi", alpha=1.5)).code == "invalid_request"


async def test_search_on_an_empty_index_returns_nothing(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    assert await search(actor, text="anything at all") == []


async def test_a_bad_item_rejects_the_whole_batch(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    result: Result[IndexResult] = await call(
        actor.mailbox.address,
        lambda r: Index((item("ok", "fine"), IndexItem("not-hex", "bad", "text", 0)), r),
    )
    assert isinstance(result, Err) and "64 lowercase hex" in result.reason
    nan = await call(
        actor.mailbox.address, lambda r: Index((item("v", "x", embedding=(1.0, float("nan"))),), r)
    )
    assert isinstance(nan, Err) and "NaN" in nan.reason
    assert (await ask(actor, Stats)).count == 0


async def test_reindexing_is_idempotent(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    assert await index(actor, item("a", "one"), item("b", "two")) == IndexResult(2, 0)
    assert await index(actor, item("a", "one"), item("c", "three")) == IndexResult(1, 1)
    assert await ask(actor, ListIds) == frozenset({mid("a"), mid("b"), mid("c")})


# -- caller embeddings ----------------------------------------------------------------------


async def test_caller_embeddings_are_searched_in_their_own_space(running: Running) -> None:
    actor = await running.start(HashingEmbedder())
    await index(
        actor,
        item("north", "alpha", embedding=(1.0, 0.0, 0.0)),
        item("east", "beta", embedding=(0.0, 1.0, 0.0)),
        item("plain", "gamma"),
    )
    hits = await search(actor, embedding=(0.1, 0.9, 0.0), limit=5)
    assert ids(hits)[0] == mid("east") and mid("plain") not in ids(hits)
    both = await search(actor, text="alpha", embedding=(0.0, 1.0, 0.0), alpha=0.5)
    assert set(ids(both)[:2]) == {mid("north"), mid("east")}
    err = await search_err(actor, embedding=(1.0, 0.0))
    assert "2-dimension" in err.reason
    stats: IndexStats = await ask(actor, Stats)
    assert {(s.name, s.dim, s.vectors) for s in stats.spaces} == {
        ("builtin", 384, 3),
        ("caller:3", 3, 2),
    }


async def test_embed_gives_unit_vectors_of_the_builtin_embedder(running: Running) -> None:
    actor = await running.start(HashingEmbedder(dim=64))
    vectors: tuple[tuple[float, ...], ...] = await ask(
        actor, lambda r: Embed(("hello world", "héllo wörld"), r)
    )
    assert len(vectors) == 2 and all(len(v) == 64 for v in vectors)
    assert all(np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5) for v in vectors)


# -- embedders ------------------------------------------------------------------------------


def test_minilm_reproduces_sentence_transformers(minilm: MiniLMEmbedder) -> None:
    # Reference: sentence-transformers 6.2 / torch 2.14 on the same weights, normalised.
    reference = {
        "I adopted a beagle named Max last spring.": [
            -0.007036,
            -0.029368,
            0.045363,
            0.049463,
            -0.116003,
            -0.020951,
            -0.017092,
            -0.004955,
            -0.018081,
            -0.011907,
            0.028852,
            0.033381,
        ],
        "What kind of dog do I have?": [
            0.006087,
            0.002548,
            0.03934,
            0.067851,
            -0.034666,
            0.011282,
            0.033529,
            -0.060625,
            0.049508,
            -0.006824,
            0.054958,
            -0.095215,
        ],
    }
    vectors = minilm.embed(list(reference))
    for row, expected in zip(vectors, reference.values(), strict=True):
        np.testing.assert_allclose(row[:12], expected, atol=2e-6)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.45652, abs=1e-4)
    assert minilm.embed([]).shape == (0, 384)


def test_default_embedder_falls_back_to_lexical_without_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMGN_MODEL_DIR", str(tmp_path))
    assert isinstance(default_embedder(), HashingEmbedder)
    monkeypatch.delenv("DMGN_MODEL_DIR")
    assert default_embedder().name == "all-MiniLM-L6-v2"


def test_swapped_weights_are_refused(tmp_path: Path, minilm: MiniLMEmbedder) -> None:
    from dmgn.embedding import EmbedderUnavailable, find_minilm_model_dir

    source = find_minilm_model_dir()
    assert source is not None
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(EmbedderUnavailable, match="sha256 mismatch"):
        MiniLMEmbedder(tmp_path)


def test_hashing_embedder_is_stable_and_typo_tolerant() -> None:
    embedder = HashingEmbedder()
    a, b, c = embedder.embed(["restaurant reservation", "restaurant reservaton", "tax forms"])
    assert float(a @ b) > 0.5 > 0.1 > float(a @ c)
    assert np.array_equal(embedder.embed(["restaurant reservation"])[0], a)
