"""The light backends sims use answer exactly as the DuckDB ones production uses.

Random sequences of operations run against both; every answer must be equal. The rules
(quotas, tombstones, ...) live in the actors and are shared; these tests pin the rows.
"""

from __future__ import annotations

import hashlib
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors import store
from actors._keeper_tables import DuckKeeperTables, MemoryKeeperTables
from actors._storage_tables import DuckStorageTables, MemoryStorageTables
from actors._store_tables import MemoryStoreTables
from actors.store import Link, StoredEnvelope
from dmgn.errors import DmgnError

FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

owners = st.sampled_from([b"alice", b"bob"])
oids = st.lists(st.sampled_from([b"o1", b"o2", b"o3", b"o4"]), max_size=4)
blob = st.binary(max_size=6)
streams = st.sampled_from([b"s1", b"s2"])
seqs = st.integers(min_value=1, max_value=5)

storage_ops = st.one_of(
    st.tuples(st.just("put"), owners, st.lists(st.tuples(oids.map(tuple), blob), max_size=3)),
    st.tuples(st.just("read"), owners, oids, st.integers(min_value=1, max_value=12)),
    st.tuples(st.just("sizes"), owners, oids),
    st.tuples(st.just("delete"), owners, oids),
    st.tuples(st.just("mail"), owners, streams, seqs, st.lists(blob, max_size=3)),
    st.tuples(st.just("heads"), owners, st.integers(min_value=1, max_value=3)),
    st.tuples(
        st.just("range"), owners, streams, seqs, seqs, st.integers(min_value=1, max_value=12)
    ),
    st.tuples(st.just("usage")),
)


def _storage_op(tables: Any, op: tuple[Any, ...]) -> object:
    match op:
        case ("put", owner, pairs):
            # Unique ids per put (the service refuses duplicates before the tables see them).
            chosen = {oid: data for ids, data in pairs for oid in ids}
            tables.put_objects(owner, list(chosen), list(chosen.values()), 7)
            return None
        case ("read", owner, ids, budget):
            return tables.read_objects(owner, ids, budget)
        case ("sizes", owner, ids):
            return tables.object_sizes(owner, ids)
        case ("delete", owner, ids):
            return tables.delete_objects(owner, ids)
        case ("mail", owner, stream, first, items):
            return tables.write_mail(owner, stream, first, items)
        case ("heads", owner, limit):
            return tables.mail_heads(owner, limit)
        case ("range", owner, stream, first, last, budget):
            return tables.mail_range(owner, stream, first, last, budget)
        case ("usage",):
            used, objects, mail = tables.usage()
            return {o: n for o, n in used.items() if n}, objects, mail, tables.mail_count()
    raise AssertionError(op)


@FEW
@given(st.lists(storage_ops, max_size=25))
# Edge cases random sequences reach rarely: a lower seq written after a higher one (the head
# stays), a replaced item (counted once), a gap in a range, deletes of what is not there.
@example(
    [
        ("mail", b"alice", b"s1", 4, [b"d"]),
        ("mail", b"alice", b"s1", 1, [b"a", b"bb"]),
        ("mail", b"alice", b"s1", 2, [b"b"]),
        ("heads", b"alice", 3),
        ("range", b"alice", b"s1", 1, 5, 100),
        ("range", b"alice", b"s1", 1, 5, 1),
        ("delete", b"bob", [b"o1"]),
        ("usage",),
    ]
)
def test_memory_storage_tables_answer_as_duckdb_does(ops: list[tuple[Any, ...]]) -> None:
    duck, light = DuckStorageTables(None), MemoryStorageTables()
    try:
        for op in ops:
            assert _storage_op(light, op) == _storage_op(duck, op), op
    finally:
        duck.close()


memory_ids = st.sampled_from(["m1", "m2", "m3"])
keeper_ops = st.one_of(
    st.tuples(
        st.just("record"),
        st.lists(st.tuples(memory_ids, st.integers(0, 3), st.sampled_from([b"p", b"q"]))),
    ),
    st.tuples(st.just("unrecord"), st.lists(st.tuples(memory_ids, st.integers(0, 3)))),
    st.tuples(st.just("placements")),
    st.tuples(st.just("put"), st.lists(st.tuples(seqs, memory_ids, blob), max_size=4)),
    st.tuples(st.just("replace"), seqs, blob),
    st.tuples(st.just("from"), seqs),
    st.tuples(st.just("naming"), st.lists(memory_ids, max_size=3)),
    st.tuples(st.just("last")),
)


def _keeper_op(tables: Any, op: tuple[Any, ...]) -> object:
    match op:
        case ("record", rows):
            tables.record(list({(m, i): (m, i, p) for m, i, p in rows}.values()))
            return None
        case ("unrecord", rows):
            tables.unrecord(rows)
            return None
        case ("placements",):
            return sorted(tables.placements())
        case ("put", rows):
            tables.outbox_put(list({s: (s, m, b) for s, m, b in rows}.values()))
            return None
        case ("replace", seq, item):
            tables.outbox_replace(seq, item)
            return None
        case ("from", first):
            return tables.outbox_from(first)
        case ("naming", ids):
            return tables.outbox_naming(ids)
        case ("last",):
            return tables.outbox_last()
    raise AssertionError(op)


@FEW
@given(st.lists(keeper_ops, max_size=25))
@example(
    [
        ("put", [(1, "m1", b"a"), (2, "m2", b"b"), (4, "m1", b"d")]),
        ("replace", 2, b"B"),
        ("replace", 3, b"nothing there"),
        ("from", 1),
        ("naming", ["m1", "m2"]),
        ("last",),
    ]
)
def test_memory_keeper_tables_answer_as_duckdb_does(ops: list[tuple[Any, ...]]) -> None:
    duck, light = DuckKeeperTables(None), MemoryKeeperTables()
    try:
        for op in ops:
            assert _keeper_op(light, op) == _keeper_op(duck, op), op
    finally:
        duck.close()


# -- the store: the same messages through the same rules, on both backends ---------------------

ENVELOPES = [f"envelope {n}".encode() for n in range(5)]
STORED = [
    StoredEnvelope(
        hashlib.sha256(e).hexdigest(), 1000 + 10 * (n % 3), ("note", "fact")[n % 2], b"d", e
    )
    for n, e in enumerate(ENVELOPES)
]
IDS = [s.id for s in STORED]
stored = st.sampled_from(STORED)
some_ids = st.lists(st.sampled_from(IDS), max_size=3)
links = st.builds(
    Link,
    st.sampled_from(IDS),
    st.sampled_from(IDS),
    st.sampled_from(["related", "cites"]),
    st.sampled_from([0.5, 1.0]),
    st.integers(1, 3),
)
changes = st.one_of(
    stored,
    links,
    st.builds(store.RemoveLink, st.sampled_from(IDS), st.sampled_from(IDS), st.just("related")),
    st.builds(store.Tombstone, st.sampled_from(IDS)),
)
store_ops = st.one_of(
    st.tuples(st.just("put"), st.lists(stored, max_size=3), st.lists(links, max_size=2)),
    st.tuples(st.just("apply"), st.lists(changes, max_size=5)),
    st.tuples(st.just("delete"), st.sampled_from(IDS)),
    st.tuples(st.just("link"), links),
    st.tuples(st.just("unlink"), st.sampled_from(IDS), st.sampled_from(IDS)),
    st.tuples(
        st.just("load"),
        st.lists(stored, max_size=3),
        st.lists(links, max_size=2),
        st.lists(
            st.builds(store.TombstoneRow, st.sampled_from(IDS), st.integers(1, 9)), max_size=2
        ),
    ),
    st.tuples(st.just("evict"), st.sampled_from([1005, 1015, 1025])),
    st.tuples(st.just("get"), some_ids),
    st.tuples(st.just("resolve"), st.sampled_from([i[:8] for i in IDS] + ["0" * 8, "abc"])),
    st.tuples(
        st.just("recent"),
        st.sampled_from([None, 2]),
        st.sampled_from([(), ("note",)]),
        st.sampled_from([None, 1005]),
        st.sampled_from([None, 1025]),
        st.integers(0, 2),
        st.booleans(),
    ),
    st.tuples(st.just("edges"), some_ids),
    st.tuples(st.just("read")),
)


def _store_op(actor: store.StoreActor, op: tuple[Any, ...]) -> object:
    try:
        match op:
            case ("put", items, new_links):
                return actor._put_all([store.Put(tuple(items), tuple(new_links), None)])  # type: ignore[arg-type]
            case ("apply", batch):
                return actor._apply(store.Apply(tuple(batch), None))  # type: ignore[arg-type]
            case ("delete", memory_id):
                return actor._delete(store.Delete(memory_id, None))  # type: ignore[arg-type]
            case ("link", link):
                return actor._addlink(store.AddLink(link, None))  # type: ignore[arg-type]
            case ("unlink", a, b):
                return actor._unlink(store.Unlink(a, b, "related", None))  # type: ignore[arg-type]
            case ("load", items, new_links, tombs):
                return actor._load(store.Load(tuple(items), tuple(new_links), tuple(tombs), None))  # type: ignore[arg-type]
            case ("evict", before):
                return actor._evict(store.Evict(before, None))  # type: ignore[arg-type]
            case ("get", ids):
                return actor._get(store.Get(tuple(ids), None))  # type: ignore[arg-type]
            case ("resolve", ref):
                return actor._resolve(store.Resolve(ref, None))  # type: ignore[arg-type]
            case ("recent", limit, types, after, before, offset, newest):
                return actor._recent(
                    store.Recent(limit, types, after, before, offset, newest, None)  # type: ignore[arg-type]
                )
            case ("edges", ids):
                return actor._edges(store.Edges(tuple(ids), None))  # type: ignore[arg-type]
            case ("read",):
                inv = actor._inventory(store.Inventory(None))  # type: ignore[arg-type]
                stats = actor._stats(store.Stats(None))  # type: ignore[arg-type]
                info = actor._snapshotopen(store.SnapshotOpen(None))  # type: ignore[arg-type]
                pages = []
                while not (
                    page := actor._snapshotread(store.SnapshotRead(info.snapshot, 2, None))
                ).done:  # type: ignore[arg-type]
                    pages.append(page)
                actor._snapshotclose(store.SnapshotClose(info.snapshot, None))  # type: ignore[arg-type]
                ids = actor._ids(store.Ids(None))  # type: ignore[arg-type]
                return (
                    inv.memories,
                    inv.tombstones,
                    set(inv.links),
                    stats,
                    info.memories,
                    pages,
                    ids,
                )
    except DmgnError as error:
        return type(error).__name__, str(error)
    raise AssertionError(op)


@FEW
@given(st.lists(store_ops, max_size=20))
@example(
    [
        ("put", [STORED[0], STORED[1]], [Link(IDS[0], IDS[1], "related", 1.0, 1)]),
        ("link", Link(IDS[0], IDS[1], "related", 0.5, 2)),
        ("apply", [store.Tombstone(IDS[1]), STORED[1], Link(IDS[1], IDS[0], "cites", 1.0, 3)]),
        ("load", [STORED[2], STORED[1]], [Link(IDS[2], IDS[0], "cites", 1.0, 1)], []),
        ("resolve", IDS[1][:8]),
        ("recent", 1, (), None, None, 1, True),
        ("edges", [IDS[0]]),
        ("evict", 1015),
        ("read",),
    ]
)
# Two memories of one time: ordered by id too, whichever was stored first.
# (STORED[0]'s id sorts after STORED[3]'s.)
@example([("put", [STORED[0], STORED[3]], []), ("recent", 1, (), None, None, 0, False)])
@example([("put", [STORED[3], STORED[0]], []), ("recent", 1, (), None, None, 0, True)])
def test_memory_store_tables_give_the_store_the_same_answers(ops: list[tuple[Any, ...]]) -> None:
    duck, light = store.StoreActor(None), store.StoreActor(None, tables=MemoryStoreTables())
    duck._db, light._db = duck._open(), light._open()
    try:
        # Tombstones carry the time of the delete: one clock for both.
        with mock.patch.object(store.time, "time_ns", lambda: 5):
            for op in ops:
                assert _store_op(light, op) == _store_op(duck, op), op
    finally:
        duck.db.close()
