"""Where the store actor keeps its rows: envelopes, links, tombstones.

The store actor (:mod:`actors.store`) owns the rules (deletes win, links to deleted memories
are not kept, envelopes must hash to their id, re-adds are idempotent, which ids a prefix
names); this module only keeps rows, in one of two interchangeable backends:

* :class:`DuckStoreTables`: the node's ``memories.duckdb`` (production; a file, 0600), or an
  in-memory DuckDB database (tests).
* :class:`MemoryStoreTables`: dicts, for sims, where hundreds of nodes share one process and a
  DuckDB database per node costs ~5 MiB and a millisecond or more per statement. It has no
  rollback: the actor checks every input before it writes, so only a bug fails mid-batch.

Both answer every method the same way (``tests/sims/test_sims_backends.py`` runs the same
store messages against both). Methods block (DuckDB); the actor runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from actors import _duckdb

__all__ = [
    "DuckStoreTables",
    "Link",
    "MemoryStoreTables",
    "StoreTables",
    "StoredEnvelope",
    "TableSnapshot",
    "TombstoneRow",
]


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    id: str
    created_at: int
    type: str
    device: bytes
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Link:
    from_id: str
    to_id: str
    edge_type: str
    weight: float
    created_at: int


@dataclass(frozen=True, slots=True)
class TombstoneRow:
    id: str
    deleted_at: int


Table = Literal["memories", "links", "tombstones"]
#: What a snapshot page holds: rows of one table, tables in this order.
SnapshotRows = tuple[Table, list[StoredEnvelope] | list[Link] | list[TombstoneRow]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    id VARCHAR PRIMARY KEY,
    created_at BIGINT NOT NULL,
    type VARCHAR NOT NULL,
    device BLOB NOT NULL,
    envelope BLOB NOT NULL,
    stored_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS memories_by_time ON memories (created_at);
CREATE INDEX IF NOT EXISTS memories_by_type ON memories (type, created_at);
CREATE TABLE IF NOT EXISTS links (
    from_id VARCHAR NOT NULL,
    to_id VARCHAR NOT NULL,
    edge_type VARCHAR NOT NULL,
    weight DOUBLE NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (from_id, to_id, edge_type)
);
CREATE INDEX IF NOT EXISTS links_by_to ON links (to_id);
CREATE TABLE IF NOT EXISTS tombstones (
    id VARCHAR PRIMARY KEY,
    deleted_at BIGINT NOT NULL
);
"""


class TableSnapshot(Protocol):
    """A consistent read of every row as of its opening, page by page."""

    counts: tuple[int, int, int]  # memories, links, tombstones

    def next_page(self, limit: int) -> SnapshotRows | None:
        """Up to ``limit`` rows of the current table (memories by id, links by key,
        tombstones by id), or None once every table is read."""
        ...

    def close(self) -> None: ...


class StoreTables(Protocol):
    def begin(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """Undo since :meth:`begin` (after a failure; nothing to undo is fine)."""
        ...

    def existing(self, table: Literal["memories", "tombstones"], ids: list[str]) -> set[str]:
        """Those of ``ids`` with a row in ``table``."""
        ...

    def insert_memories(self, items: list[StoredEnvelope], stored_at: int) -> int:
        """Insert the items not present (by id); returns how many were inserted."""
        ...

    def link_weight(self, from_id: str, to_id: str, edge_type: str) -> float | None: ...

    def set_link_weight(self, from_id: str, to_id: str, edge_type: str, weight: float) -> None: ...

    def insert_links(self, links: list[Link]) -> int:
        """Insert the links whose key (from, to, type) is not present; returns how many."""
        ...

    def delete_link(self, from_id: str, to_id: str, edge_type: str) -> None: ...

    def delete_memories(self, ids: list[str]) -> None: ...

    def delete_links_touching(self, ids: list[str]) -> None:
        """Delete the links with either end in ``ids``."""
        ...

    def insert_tombstones(self, rows: list[TombstoneRow]) -> int:
        """Insert the tombstones not present; returns how many were inserted."""
        ...

    def get(self, ids: list[str]) -> list[StoredEnvelope]: ...

    def with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` live ids starting with ``prefix``, by id."""
        ...

    def recent(
        self,
        types: tuple[str, ...],
        after: int | None,
        before: int | None,
        newest_first: bool,
        limit: int | None,
        offset: int,
    ) -> list[StoredEnvelope]:
        """Live memories of ``types`` (all when empty) created strictly between ``after`` and
        ``before``, by (created_at, id), newest first or oldest first; ``offset`` applies
        with a ``limit`` only."""
        ...

    def ids(self, table: Literal["memories", "tombstones"]) -> list[str]: ...

    def links(self) -> list[Link]: ...

    def edges(self, ids: list[str]) -> list[Link]:
        """Links with either end in ``ids``, by (created_at, from_id, to_id, edge_type)."""
        ...

    def evict(self, before: int) -> list[str]:
        """Delete the memories created before ``before``; returns their ids, sorted."""
        ...

    def count(self, table: Table) -> int: ...

    def snapshot(self) -> TableSnapshot: ...

    def close(self) -> None: ...


# -- DuckDB ---------------------------------------------------------------------------------

_SNAPSHOT_QUERIES: tuple[tuple[Table, str], ...] = (
    ("memories", "SELECT id, created_at, type, device, envelope FROM memories ORDER BY id"),
    (
        "links",
        "SELECT from_id, to_id, edge_type, weight, created_at FROM links "
        "ORDER BY from_id, to_id, edge_type",
    ),
    ("tombstones", "SELECT id, deleted_at FROM tombstones ORDER BY id"),
)


def _row(row: tuple[Any, ...]) -> StoredEnvelope:
    return StoredEnvelope(row[0], row[1], row[2], bytes(row[3]), bytes(row[4]))


def _typed(table: Table, rows: list[tuple[Any, ...]]) -> SnapshotRows:
    if table == "memories":
        return table, [_row(r) for r in rows]
    if table == "links":
        return table, [Link(*r) for r in rows]
    return table, [TombstoneRow(*r) for r in rows]


class _DuckSnapshot:
    """A read transaction on a second connection: DuckDB's MVCC keeps showing it the store as
    of its start, however many writes commit meanwhile."""

    def __init__(self, cursor: _duckdb.Connection) -> None:
        self._cursor = cursor
        cursor.execute("BEGIN TRANSACTION")
        counts = []
        for table in ("memories", "links", "tombstones"):
            row = cursor.execute(f"SELECT count(*) FROM {table}").fetchone()
            counts.append(int(row[0]) if row else 0)
        self.counts = (counts[0], counts[1], counts[2])
        self._table = -1

    def next_page(self, limit: int) -> SnapshotRows | None:
        while self._table < len(_SNAPSHOT_QUERIES):
            if self._table >= 0:
                rows = self._cursor.fetchmany(limit)
                if rows:
                    return _typed(_SNAPSHOT_QUERIES[self._table][0], rows)
            self._table += 1
            if self._table < len(_SNAPSHOT_QUERIES):
                self._cursor.execute(_SNAPSHOT_QUERIES[self._table][1])
        return None

    def close(self) -> None:
        try:
            self._cursor.execute("ROLLBACK")
        finally:
            self._cursor.close()


class DuckStoreTables:
    """The rows in a DuckDB database: a file (opened 0600) or ``None`` for in memory."""

    def __init__(self, path: Path | None) -> None:
        self.db = _duckdb.open_private(path, SCHEMA)

    def begin(self) -> None:
        self.db.execute("BEGIN TRANSACTION")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        # When COMMIT itself failed (a full disk refusing the WAL write), DuckDB has already
        # aborted the transaction and ROLLBACK raises "no transaction is active".
        with contextlib.suppress(_duckdb.TransactionException):
            self.db.execute("ROLLBACK")

    def existing(self, table: Literal["memories", "tombstones"], ids: list[str]) -> set[str]:
        if not ids:
            return set()
        if len(ids) == 1:
            # The common case (one add): an equality lookup uses the primary-key index directly
            # and costs a third of binding and unnesting a list.
            rows = self.db.execute(f"SELECT id FROM {table} WHERE id = ?", ids).fetchall()
        else:
            rows = self.db.execute(
                f"SELECT id FROM {table} WHERE id IN (SELECT unnest(?))", [ids]
            ).fetchall()
        return {row[0] for row in rows}

    def insert_memories(self, items: list[StoredEnvelope], stored_at: int) -> int:
        if not items:
            return 0
        if len(items) == 1:
            i = items[0]
            row = self.db.execute(
                "INSERT OR IGNORE INTO memories VALUES (?, ?, ?, ?, ?, ?)",
                [i.id, i.created_at, i.type, i.device, i.envelope, stored_at],
            ).fetchone()
            return int(row[0]) if row else 0
        # One statement over column lists, not executemany: DuckDB runs executemany row by row
        # (~3 ms a row here), this is ~40x faster for a bulk import's batches.
        row = self.db.execute(
            "INSERT OR IGNORE INTO memories SELECT unnest(?), unnest(?), unnest(?), "
            "unnest(?::BLOB[]), unnest(?::BLOB[]), ?",
            [
                [i.id for i in items],
                [i.created_at for i in items],
                [i.type for i in items],
                [i.device for i in items],
                [i.envelope for i in items],
                stored_at,
            ],
        ).fetchone()
        return int(row[0]) if row else 0

    def link_weight(self, from_id: str, to_id: str, edge_type: str) -> float | None:
        row = self.db.execute(
            "SELECT weight FROM links WHERE from_id = ? AND to_id = ? AND edge_type = ?",
            [from_id, to_id, edge_type],
        ).fetchone()
        return None if row is None else float(row[0])

    def set_link_weight(self, from_id: str, to_id: str, edge_type: str, weight: float) -> None:
        self.db.execute(
            "UPDATE links SET weight = ? WHERE from_id = ? AND to_id = ? AND edge_type = ?",
            [weight, from_id, to_id, edge_type],
        )

    def insert_links(self, links: list[Link]) -> int:
        if not links:
            return 0
        row = self.db.execute(
            "INSERT OR IGNORE INTO links SELECT unnest($f), unnest($t), unnest($e), "
            "unnest($w), unnest($c)",
            {
                "f": [k.from_id for k in links],
                "t": [k.to_id for k in links],
                "e": [k.edge_type for k in links],
                "w": [float(k.weight) for k in links],
                "c": [k.created_at for k in links],
            },
        ).fetchone()
        return int(row[0]) if row else 0

    def delete_link(self, from_id: str, to_id: str, edge_type: str) -> None:
        self.db.execute(
            "DELETE FROM links WHERE from_id = ? AND to_id = ? AND edge_type = ?",
            [from_id, to_id, edge_type],
        )

    def delete_memories(self, ids: list[str]) -> None:
        if len(ids) == 1:
            self.db.execute("DELETE FROM memories WHERE id = ?", ids)
        elif ids:
            self.db.execute("DELETE FROM memories WHERE id IN (SELECT unnest(?))", [ids])

    def delete_links_touching(self, ids: list[str]) -> None:
        if len(ids) == 1:
            self.db.execute("DELETE FROM links WHERE from_id = ? OR to_id = ?", ids * 2)
        elif ids:
            self.db.execute(
                "DELETE FROM links WHERE from_id IN (SELECT unnest($i)) "
                "OR to_id IN (SELECT unnest($i))",
                {"i": ids},
            )

    def insert_tombstones(self, rows: list[TombstoneRow]) -> int:
        if not rows:
            return 0
        row = self.db.execute(
            "INSERT OR IGNORE INTO tombstones SELECT unnest($i), unnest($at)",
            {"i": [t.id for t in rows], "at": [t.deleted_at for t in rows]},
        ).fetchone()
        return int(row[0]) if row else 0

    def get(self, ids: list[str]) -> list[StoredEnvelope]:
        if not ids:
            return []
        rows = self.db.execute(
            "SELECT id, created_at, type, device, envelope FROM memories "
            "WHERE id IN (SELECT unnest(?))",
            [ids],
        ).fetchall()
        return [_row(row) for row in rows]

    def with_prefix(self, prefix: str, limit: int) -> list[str]:
        rows = self.db.execute(
            "SELECT id FROM memories WHERE starts_with(id, ?) ORDER BY id LIMIT ?",
            [prefix, limit],
        ).fetchall()
        return [str(r[0]) for r in rows]

    def recent(
        self,
        types: tuple[str, ...],
        after: int | None,
        before: int | None,
        newest_first: bool,
        limit: int | None,
        offset: int,
    ) -> list[StoredEnvelope]:
        where: list[str] = ["TRUE"]
        params: list[object] = []
        if types:
            where.append("type IN (SELECT unnest(?))")
            params.append(list(types))
        if after is not None:
            where.append("created_at > ?")
            params.append(after)
        if before is not None:
            where.append("created_at < ?")
            params.append(before)
        order = "DESC" if newest_first else "ASC"
        sql = (
            f"SELECT id, created_at, type, device, envelope FROM memories "
            f"WHERE {' AND '.join(where)} ORDER BY created_at {order}, id {order}"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        return [_row(row) for row in self.db.execute(sql, params).fetchall()]

    def ids(self, table: Literal["memories", "tombstones"]) -> list[str]:
        return [str(r[0]) for r in self.db.execute(f"SELECT id FROM {table}").fetchall()]

    def links(self) -> list[Link]:
        rows = self.db.execute(
            "SELECT from_id, to_id, edge_type, weight, created_at FROM links"
        ).fetchall()
        return [Link(*row) for row in rows]

    def edges(self, ids: list[str]) -> list[Link]:
        if not ids:
            return []
        rows = self.db.execute(
            "SELECT from_id, to_id, edge_type, weight, created_at FROM links "
            "WHERE from_id IN (SELECT unnest($ids)) OR to_id IN (SELECT unnest($ids)) "
            "ORDER BY created_at, from_id, to_id, edge_type",
            {"ids": ids},
        ).fetchall()
        return [Link(*row) for row in rows]

    def evict(self, before: int) -> list[str]:
        rows = self.db.execute(
            "DELETE FROM memories WHERE created_at < ? RETURNING id", [before]
        ).fetchall()
        return sorted(str(row[0]) for row in rows)

    def count(self, table: Table) -> int:
        row = self.db.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else 0

    def snapshot(self) -> TableSnapshot:
        return _DuckSnapshot(self.db.cursor())

    def close(self) -> None:
        self.db.close()


# -- dicts (sims) -----------------------------------------------------------------------------

LinkKey = tuple[str, str, str]


class _MemorySnapshot:
    """Copies of the rows as of its opening (sims' stores are small)."""

    def __init__(self, tables: MemoryStoreTables) -> None:
        memories = sorted(tables._memories.values(), key=lambda m: m.id)
        links = [tables._links[k] for k in sorted(tables._links)]
        tombstones = [TombstoneRow(i, at) for i, at in sorted(tables._tombstones.items())]
        self.counts = (len(memories), len(links), len(tombstones))
        self._pending: list[SnapshotRows] = [
            ("memories", list(memories)),
            ("links", list(links)),
            ("tombstones", list(tombstones)),
        ]

    def next_page(self, limit: int) -> SnapshotRows | None:
        while self._pending:
            table, rows = self._pending[0]
            if rows:
                page, rest = rows[:limit], rows[limit:]
                self._pending[0] = (table, rest)
                return table, page
            self._pending.pop(0)
        return None

    def close(self) -> None:
        self._pending = []


class MemoryStoreTables:
    """The same rows in dicts (ids to rows; links by key and by either end)."""

    def __init__(self) -> None:
        self._memories: dict[str, StoredEnvelope] = {}
        self._tombstones: dict[str, int] = {}
        self._links: dict[LinkKey, Link] = {}
        self._touching: dict[str, set[LinkKey]] = {}

    def begin(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def existing(self, table: Literal["memories", "tombstones"], ids: list[str]) -> set[str]:
        rows: dict[str, Any] = self._memories if table == "memories" else self._tombstones
        return {i for i in ids if i in rows}

    def insert_memories(self, items: list[StoredEnvelope], stored_at: int) -> int:
        added = 0
        for item in items:
            if item.id not in self._memories:
                self._memories[item.id] = item
                added += 1
        return added

    def link_weight(self, from_id: str, to_id: str, edge_type: str) -> float | None:
        link = self._links.get((from_id, to_id, edge_type))
        return None if link is None else link.weight

    def set_link_weight(self, from_id: str, to_id: str, edge_type: str, weight: float) -> None:
        key = (from_id, to_id, edge_type)
        link = self._links.get(key)
        if link is not None:
            self._links[key] = Link(from_id, to_id, edge_type, weight, link.created_at)

    def insert_links(self, links: list[Link]) -> int:
        added = 0
        for link in links:
            key = (link.from_id, link.to_id, link.edge_type)
            if key in self._links:
                continue
            self._links[key] = Link(*key, float(link.weight), link.created_at)
            self._touching.setdefault(link.from_id, set()).add(key)
            self._touching.setdefault(link.to_id, set()).add(key)
            added += 1
        return added

    def delete_link(self, from_id: str, to_id: str, edge_type: str) -> None:
        key = (from_id, to_id, edge_type)
        if self._links.pop(key, None) is None:
            return
        for end in (from_id, to_id):
            keys = self._touching.get(end)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._touching[end]

    def delete_memories(self, ids: list[str]) -> None:
        for i in ids:
            self._memories.pop(i, None)

    def delete_links_touching(self, ids: list[str]) -> None:
        for i in ids:
            for key in list(self._touching.get(i, ())):
                self.delete_link(*key)

    def insert_tombstones(self, rows: list[TombstoneRow]) -> int:
        added = 0
        for row in rows:
            if row.id not in self._tombstones:
                self._tombstones[row.id] = row.deleted_at
                added += 1
        return added

    def get(self, ids: list[str]) -> list[StoredEnvelope]:
        return [self._memories[i] for i in dict.fromkeys(ids) if i in self._memories]

    def with_prefix(self, prefix: str, limit: int) -> list[str]:
        return sorted(i for i in self._memories if i.startswith(prefix))[:limit]

    def recent(
        self,
        types: tuple[str, ...],
        after: int | None,
        before: int | None,
        newest_first: bool,
        limit: int | None,
        offset: int,
    ) -> list[StoredEnvelope]:
        rows = [
            m
            for m in self._memories.values()
            if (not types or m.type in types)
            and (after is None or m.created_at > after)
            and (before is None or m.created_at < before)
        ]
        rows.sort(key=lambda m: (m.created_at, m.id), reverse=newest_first)
        if limit is None:
            return rows  # no limit: the offset is not applied (as in SQL above)
        return rows[offset : offset + max(0, limit)]

    def ids(self, table: Literal["memories", "tombstones"]) -> list[str]:
        return list(self._memories if table == "memories" else self._tombstones)

    def links(self) -> list[Link]:
        return list(self._links.values())

    def edges(self, ids: list[str]) -> list[Link]:
        keys = {key for i in ids for key in self._touching.get(i, ())}
        found = [self._links[k] for k in keys]
        found.sort(key=lambda k: (k.created_at, k.from_id, k.to_id, k.edge_type))
        return found

    def evict(self, before: int) -> list[str]:
        gone = sorted(i for i, m in self._memories.items() if m.created_at < before)
        for i in gone:
            del self._memories[i]
        return gone

    def count(self, table: Table) -> int:
        if table == "memories":
            return len(self._memories)
        return len(self._links) if table == "links" else len(self._tombstones)

    def snapshot(self) -> TableSnapshot:
        return _MemorySnapshot(self)

    def close(self) -> None:
        pass
