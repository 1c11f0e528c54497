"""The light backends sims use answer exactly as the DuckDB ones production uses.

Random sequences of operations run against both; every answer must be equal. The rules
(quotas, tombstones, ...) live in the actors and are shared; these tests pin the rows.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors._keeper_tables import DuckKeeperTables, MemoryKeeperTables
from actors._storage_tables import DuckStorageTables, MemoryStorageTables

FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

owners = st.sampled_from([b"alice", b"bob"])
oids = st.lists(st.sampled_from([b"o1", b"o2", b"o3", b"o4"]), max_size=4)
blob = st.binary(max_size=6)
streams = st.sampled_from([b"s1", b"s2"])
seqs = st.integers(min_value=1, max_value=5)

storage_ops = st.one_of(
    st.tuples(st.just("put"), owners, st.lists(st.tuples(oids.map(tuple), blob), max_size=3)),
    st.tuples(st.just("read"), owners, oids),
    st.tuples(st.just("sizes"), owners, oids),
    st.tuples(st.just("delete"), owners, oids),
    st.tuples(st.just("mail"), owners, streams, seqs, st.lists(blob, max_size=3)),
    st.tuples(st.just("heads"), owners, st.integers(min_value=1, max_value=3)),
    st.tuples(st.just("range"), owners, streams, seqs, seqs),
    st.tuples(st.just("usage")),
)


def _storage_op(tables: Any, op: tuple[Any, ...]) -> object:
    match op:
        case ("put", owner, pairs):
            # Unique ids per put (the service refuses duplicates before the tables see them).
            chosen = {oid: data for ids, data in pairs for oid in ids}
            tables.put_objects(owner, list(chosen), list(chosen.values()), 7)
            return None
        case ("read", owner, ids):
            return tables.read_objects(owner, ids)
        case ("sizes", owner, ids):
            return tables.object_sizes(owner, ids)
        case ("delete", owner, ids):
            return tables.delete_objects(owner, ids)
        case ("mail", owner, stream, first, items):
            return tables.write_mail(owner, stream, first, items)
        case ("heads", owner, limit):
            return tables.mail_heads(owner, limit)
        case ("range", owner, stream, first, last):
            return tables.mail_range(owner, stream, first, last)
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
        ("range", b"alice", b"s1", 1, 5),
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
