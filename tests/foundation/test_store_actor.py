"""The store actor over a real DuckDB file."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from actors import store as st
from actors.runtime import ActorSpec, Err, Ok, Supervisor, call, reuse


def envelope(n: int, created_at: int = 0, kind: str = "text") -> st.StoredEnvelope:
    body = f"ciphertext {n}".encode()
    return st.StoredEnvelope(
        hashlib.sha256(body).hexdigest(), created_at or n, kind, bytes(16), body
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[st.StoreActor]:
    actor = st.StoreActor(tmp_path / "memories.duckdb")
    async with Supervisor() as sup:
        await sup.start(ActorSpec("store", reuse(actor), actor.mailbox))
        yield actor


async def test_put_is_idempotent_and_reports_what_was_new(store: st.StoreActor) -> None:
    a, b = envelope(1), envelope(2)
    first = await call(store.mailbox.address, st.Put, (a, b, a), ())
    assert first == Ok(st.PutResult((a.id, b.id), (), ()))
    again = await call(store.mailbox.address, st.Put, (a,), ())
    assert again == Ok(st.PutResult((), (a.id,), ()))


async def test_deleted_memory_cannot_come_back(store: st.StoreActor) -> None:
    a, b = envelope(1), envelope(2)
    link = st.Link(b.id, a.id, "related", 1.0, 5)
    await call(store.mailbox.address, st.Put, (a, b), (link,))
    assert await call(store.mailbox.address, st.Delete, a.id) == Ok(True)
    assert await call(store.mailbox.address, st.Edges, (b.id,)) == Ok([])
    # Deletes win: a later re-add (e.g. from a slow peer) is refused.
    readd = await call(store.mailbox.address, st.Put, (a,), ())
    assert readd == Ok(st.PutResult((), (), (a.id,)))
    # And links to it are not recreated either.
    assert await call(store.mailbox.address, st.AddLink, link) == Ok(False)
    assert await call(store.mailbox.address, st.Edges, (b.id,)) == Ok([])


async def test_recent_filters_by_type_and_time_newest_first(store: st.StoreActor) -> None:
    items = [
        envelope(i, created_at=100 + i, kind="text" if i % 2 else "observation") for i in range(10)
    ]
    await call(store.mailbox.address, st.Put, tuple(items), ())
    result = await call(store.mailbox.address, st.Recent, 3, ("text",), 101, 109, 0, True)
    assert isinstance(result, Ok)
    assert [s.created_at for s in result.value] == [107, 105, 103]


def two_envelopes_sharing_a_prefix(length: int) -> tuple[st.StoredEnvelope, st.StoredEnvelope]:
    seen: dict[str, st.StoredEnvelope] = {}
    n = 0
    while True:
        item = envelope(n)
        n += 1
        other = seen.setdefault(item.id[:length], item)
        if other is not item:
            return other, item


async def test_prefix_resolution_is_unambiguous_or_says_why(store: st.StoreActor) -> None:
    a, b = two_envelopes_sharing_a_prefix(6)
    await call(store.mailbox.address, st.Put, (a, b), ())
    assert await call(store.mailbox.address, st.Resolve, a.id[:12]) == Ok(a.id)
    assert await call(store.mailbox.address, st.Resolve, a.id.upper()) == Ok(a.id)
    ambiguous = await call(store.mailbox.address, st.Resolve, a.id[:6])
    assert isinstance(ambiguous, Err) and ambiguous.code == "ambiguous_id"
    assert "give more characters" in ambiguous.reason
    short = await call(store.mailbox.address, st.Resolve, a.id[:5])
    assert isinstance(short, Err) and "unique prefix of at least 6" in short.reason
    missing = await call(store.mailbox.address, st.Resolve, "ffffffffffff")
    assert isinstance(missing, Err) and missing.code == "not_found"


async def test_put_refuses_an_envelope_that_does_not_match_its_id(store: st.StoreActor) -> None:
    good = envelope(1)
    forged = st.StoredEnvelope(good.id, 1, "text", bytes(16), b"other bytes")
    result = await call(store.mailbox.address, st.Put, (forged,), ())
    assert isinstance(result, Err) and result.code == "tampered"
    assert await call(store.mailbox.address, st.Get, (good.id,)) == Ok({})


async def test_data_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "memories.duckdb"
    a = envelope(7)
    for _ in range(2):
        actor = st.StoreActor(path)
        async with Supervisor() as sup:
            await sup.start(ActorSpec("store", reuse(actor), actor.mailbox))
            await call(actor.mailbox.address, st.Put, (a,), ())
            got = await call(actor.mailbox.address, st.Get, (a.id,))
            assert got == Ok({a.id: a})
    assert path.stat().st_mode & 0o777 == 0o600


async def test_concurrent_puts_all_land(store: st.StoreActor) -> None:
    async def put(i: int) -> None:
        await call(store.mailbox.address, st.Put, (envelope(i),), ())

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(put, i)
    stats = await call(store.mailbox.address, st.Stats)
    assert isinstance(stats, Ok) and stats.value.memories == 200


async def test_a_bad_put_in_a_group_commit_fails_alone(store: st.StoreActor) -> None:
    """Concurrent puts share one transaction; a tampered one is refused, the others land."""
    results: dict[int, object] = {}

    async def put(i: int) -> None:
        item = envelope(i)
        if i == 7:
            item = st.StoredEnvelope(item.id, item.created_at, item.type, item.device, b"evil")
        results[i] = await call(store.mailbox.address, st.Put, (item,), ())

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(put, i)
    bad = results.pop(7)
    assert isinstance(bad, Err) and bad.code == "tampered"
    assert all(isinstance(r, Ok) and r.value.added for r in results.values())
    stats = await call(store.mailbox.address, st.Stats)
    assert isinstance(stats, Ok) and stats.value.memories == 39
