"""Where the shard keeper remembers its placements and its mailbox outbox.

The keeper (:mod:`actors.shard_keeper`) decides what goes where; this module only stores rows,
in one of two interchangeable backends: :class:`DuckKeeperTables` (the node's
``shards.duckdb``, 0600; in memory for tests) and :class:`MemoryKeeperTables` (dicts, for sims,
where a DuckDB database per node costs ~5 MiB). Both answer every method the same way
(``tests/sims/test_sims_backends.py``). Methods block; the keeper runs them in a worker thread,
one at a time (:class:`KeeperDb`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from actors import _duckdb

__all__ = ["DuckKeeperTables", "KeeperDb", "KeeperTables", "MemoryKeeperTables"]

R = TypeVar("R")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS placements (
    memory_id VARCHAR NOT NULL, idx INTEGER NOT NULL, peer BLOB NOT NULL,
    PRIMARY KEY (memory_id, idx));
CREATE TABLE IF NOT EXISTS outbox (seq BIGINT PRIMARY KEY, memory_id VARCHAR, item BLOB NOT NULL);
"""

#: Outbox items one read returns at most.
OUTBOX_PAGE = 64


class KeeperTables(Protocol):
    def placements(self) -> list[tuple[str, int, bytes]]:
        """Every (memory id, shard index, peer key)."""
        ...

    def record(self, rows: list[tuple[str, int, bytes]]) -> None:
        """Insert or replace placements."""
        ...

    def unrecord(self, rows: list[tuple[str, int]]) -> None: ...

    def outbox_last(self) -> int:
        """The highest outbox seq (0 when empty)."""
        ...

    def outbox_put(self, rows: list[tuple[int, str, bytes]]) -> None:
        """Insert or replace (seq, memory id, sealed item)."""
        ...

    def outbox_replace(self, seq: int, item: bytes) -> None:
        """Replace the item at ``seq``; it no longer names a memory."""
        ...

    def outbox_from(self, first: int) -> list[tuple[int, bytes]]:
        """Up to :data:`OUTBOX_PAGE` (seq, item) with seq >= ``first``, by seq."""
        ...

    def outbox_naming(self, memory_ids: list[str]) -> list[tuple[int, str, bytes]]:
        """(seq, memory id, item) of the items naming one of ``memory_ids``, by seq."""
        ...

    def close(self) -> None: ...


class DuckKeeperTables:
    def __init__(self, path: Path | None) -> None:
        self._db = _duckdb.open_private(path, _SCHEMA)

    def placements(self) -> list[tuple[str, int, bytes]]:
        rows = self._db.execute("SELECT memory_id, idx, peer FROM placements").fetchall()
        return [(str(m), int(i), bytes(p)) for m, i, p in rows]

    def record(self, rows: list[tuple[str, int, bytes]]) -> None:
        # One statement over lists: executemany costs ~5 ms a row in DuckDB.
        self._db.execute(
            "INSERT OR REPLACE INTO placements "
            "SELECT unnest(?::VARCHAR[]), unnest(?::INTEGER[]), unnest(?::BLOB[])",
            [[m for m, _, _ in rows], [i for _, i, _ in rows], [k for _, _, k in rows]],
        )

    def unrecord(self, rows: list[tuple[str, int]]) -> None:
        self._db.execute(
            "DELETE FROM placements USING (SELECT unnest(?::VARCHAR[]) AS m, "
            "unnest(?::INTEGER[]) AS i) AS gone WHERE memory_id = gone.m AND idx = gone.i",
            [[m for m, _ in rows], [i for _, i in rows]],
        )

    def outbox_last(self) -> int:
        row = self._db.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()
        return int(row[0]) if row else 0

    def outbox_put(self, rows: list[tuple[int, str, bytes]]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO outbox SELECT unnest(?::BIGINT[]), "
            "unnest(?::VARCHAR[]), unnest(?::BLOB[])",
            [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]],
        )

    def outbox_replace(self, seq: int, item: bytes) -> None:
        self._db.execute("UPDATE outbox SET item = ?, memory_id = NULL WHERE seq = ?", [item, seq])

    def outbox_from(self, first: int) -> list[tuple[int, bytes]]:
        rows = self._db.execute(
            "SELECT seq, item FROM outbox WHERE seq >= ? ORDER BY seq LIMIT ?",
            [first, OUTBOX_PAGE],
        ).fetchall()
        return [(int(seq), bytes(item)) for seq, item in rows]

    def outbox_naming(self, memory_ids: list[str]) -> list[tuple[int, str, bytes]]:
        rows = self._db.execute(
            "SELECT seq, memory_id, item FROM outbox WHERE memory_id IN "
            "(SELECT unnest(?::VARCHAR[])) ORDER BY seq",
            [memory_ids],
        ).fetchall()
        return [(int(seq), str(m), bytes(item)) for seq, m, item in rows]

    def close(self) -> None:
        self._db.close()


class MemoryKeeperTables:
    def __init__(self) -> None:
        self._placements: dict[tuple[str, int], bytes] = {}
        self._outbox: dict[int, tuple[str | None, bytes]] = {}
        self._last = 0

    def placements(self) -> list[tuple[str, int, bytes]]:
        return [(m, i, p) for (m, i), p in self._placements.items()]

    def record(self, rows: list[tuple[str, int, bytes]]) -> None:
        for m, i, p in rows:
            self._placements[m, i] = p

    def unrecord(self, rows: list[tuple[str, int]]) -> None:
        for key in rows:
            self._placements.pop(key, None)

    def outbox_last(self) -> int:
        return self._last

    def outbox_put(self, rows: list[tuple[int, str, bytes]]) -> None:
        for seq, m, item in rows:
            self._outbox[seq] = (m, item)
            self._last = max(self._last, seq)

    def outbox_replace(self, seq: int, item: bytes) -> None:
        if seq in self._outbox:
            self._outbox[seq] = (None, item)

    def outbox_from(self, first: int) -> list[tuple[int, bytes]]:
        found: list[tuple[int, bytes]] = []
        # Seqs are dense in practice (one per feed entry): walk them, fall back to a sort.
        seq = first
        while len(found) < OUTBOX_PAGE and seq <= self._last:
            held = self._outbox.get(seq)
            if held is None:
                return sorted((s, i) for s, (_, i) in self._outbox.items() if s >= first)[
                    :OUTBOX_PAGE
                ]
            found.append((seq, held[1]))
            seq += 1
        return found

    def outbox_naming(self, memory_ids: list[str]) -> list[tuple[int, str, bytes]]:
        wanted = set(memory_ids)
        return sorted(
            (seq, m, item)
            for seq, (m, item) in self._outbox.items()
            if m is not None and m in wanted
        )

    def close(self) -> None:
        pass


class KeeperDb:
    """The keeper's tables once open, run in a worker thread one statement at a time (a
    connection is not shared between threads)."""

    def __init__(self) -> None:
        self._tables: KeeperTables | None = None
        self._lock = trio.Lock()

    def open(self, tables: KeeperTables) -> None:
        self._tables = tables

    def close(self) -> KeeperTables | None:
        tables, self._tables = self._tables, None
        return tables

    @property
    def tables(self) -> KeeperTables:
        assert self._tables is not None
        return self._tables

    async def run(self, function: Callable[..., R], *args: Any) -> R:
        async with self._lock:
            return await trio.to_thread.run_sync(function, *args)
