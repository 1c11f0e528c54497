"""Where the storage service keeps other identities' objects and mailbox items.

The service (:mod:`actors.storage`) owns the rules: who may ask, quotas, rate limits, signed
deletes, batch sizes. This module only stores rows, in one of two interchangeable backends:

* :class:`DuckStorageTables`: the node's ``storage.duckdb`` (production; a file, 0600), or an
  in-memory DuckDB database (tests).
* :class:`MemoryStorageTables`: plain dicts, for sims, where hundreds of nodes share one process
  and a DuckDB database per node costs ~5 MiB and a millisecond or more per statement.

Both answer every method the same way (``tests/sims/test_sims_backends.py`` runs the same
operations against both). Methods block (DuckDB); the service runs them in a worker thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from actors import _duckdb

__all__ = ["DuckStorageTables", "MemoryStorageTables", "StorageTables"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    owner BLOB NOT NULL, oid BLOB NOT NULL, data BLOB NOT NULL, stored_at BIGINT NOT NULL,
    size BIGINT, PRIMARY KEY (owner, oid));
CREATE TABLE IF NOT EXISTS mail (
    owner BLOB NOT NULL, stream BLOB NOT NULL, seq BIGINT NOT NULL, data BLOB NOT NULL,
    size BIGINT, PRIMARY KEY (owner, stream, seq));
CREATE TABLE IF NOT EXISTS sources (owner BLOB PRIMARY KEY, source VARCHAR NOT NULL);
"""
#: Files made before rows carried their size: the column is added and filled once. Sizes are
#: kept beside the data so that a read can choose what fits its batch without loading blobs
#: (``octet_length(data)`` reads every blob it measures).
_MIGRATE = """
ALTER TABLE objects ADD COLUMN IF NOT EXISTS size BIGINT;
ALTER TABLE mail ADD COLUMN IF NOT EXISTS size BIGINT;
UPDATE objects SET size = octet_length(data) WHERE size IS NULL;
UPDATE mail SET size = octet_length(data) WHERE size IS NULL;
"""


def _fitting(sizes: list[int], max_bytes: int) -> int:
    """How many of ``sizes`` (in order) fit ``max_bytes`` together; at least one."""
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if n and total > max_bytes:
            return n
    return len(sizes)


class StorageTables(Protocol):
    def usage(self) -> tuple[dict[bytes, tuple[int, int]], int, int]:
        """((bytes, rows) held per owner, objects, mail items)."""
        ...

    def sources(self) -> dict[bytes, str]:
        """The source address each owner holding anything here was first stored from."""
        ...

    def set_source(self, owner: bytes, source: str | None) -> None:
        """Remember where ``owner`` was first stored from (None: forget it)."""
        ...

    def object_sizes(self, owner: bytes, oids: list[bytes]) -> dict[bytes, int]:
        """The sizes of those of ``oids`` that ``owner`` holds here."""
        ...

    def put_objects(self, owner: bytes, oids: list[bytes], blobs: list[bytes], now: int) -> None:
        """Store (or replace) the objects, in one transaction."""
        ...

    def read_objects(self, owner: bytes, oids: list[bytes], max_bytes: int) -> dict[bytes, bytes]:
        """Those of ``oids`` held, in the order asked, as many as fit ``max_bytes`` (at least
        one): blobs beyond that are never loaded."""
        ...

    def delete_objects(self, owner: bytes, oids: list[bytes]) -> tuple[int, int]:
        """Delete what is there of ``oids``: (objects deleted, bytes freed)."""
        ...

    def write_mail(
        self, owner: bytes, stream: bytes, first: int, items: list[bytes]
    ) -> tuple[int, int]:
        """Store ``items`` at seq ``first``, ``first + 1``, ... (replacing what is there);
        returns (items replaced, bytes replaced)."""
        ...

    def mail_heads(self, owner: bytes, limit: int) -> list[tuple[bytes, int]]:
        """(stream, highest seq) of ``owner``'s streams, by stream, at most ``limit``."""
        ...

    def mail_range(
        self, owner: bytes, stream: bytes, first: int, last: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """The items with ``first <= seq <= last``, by seq, as many as fit ``max_bytes`` (at
        least one): items beyond that are never loaded."""
        ...

    def mail_count(self) -> int: ...

    def close(self) -> None: ...


class DuckStorageTables:
    """The tables in a DuckDB database (``path=None``: in memory), in at most ``memory_limit``
    bytes of RAM (None: DuckDB's default, 80% of the machine's) and one thread (the service
    runs one statement at a time)."""

    def __init__(self, path: Path | None, *, memory_limit: int | None = None) -> None:
        self._db = _duckdb.open_private(path, _SCHEMA, memory_limit=memory_limit, threads=1)
        self._db.execute(_MIGRATE)

    def usage(self) -> tuple[dict[bytes, tuple[int, int]], int, int]:
        db = self._db
        used = {
            bytes(owner): (int(n), int(rows))
            for owner, n, rows in db.execute(
                "SELECT owner, sum(size), count(*) FROM (SELECT owner, size FROM objects "
                "UNION ALL SELECT owner, size FROM mail) GROUP BY owner"
            ).fetchall()
        }
        (objects,) = db.execute("SELECT count(*) FROM objects").fetchone() or (0,)
        return used, int(objects), self.mail_count()

    def sources(self) -> dict[bytes, str]:
        rows = self._db.execute("SELECT owner, source FROM sources").fetchall()
        return {bytes(owner): str(source) for owner, source in rows}

    def set_source(self, owner: bytes, source: str | None) -> None:
        if source is None:
            self._db.execute("DELETE FROM sources WHERE owner = ?", [owner])
        else:
            self._db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?)", [owner, source])

    def object_sizes(self, owner: bytes, oids: list[bytes]) -> dict[bytes, int]:
        rows = self._db.execute(
            "SELECT oid, size FROM objects WHERE owner = ? AND oid IN (SELECT unnest(?::BLOB[]))",
            [owner, oids],
        ).fetchall()
        return {bytes(oid): int(n) for oid, n in rows}

    def put_objects(self, owner: bytes, oids: list[bytes], blobs: list[bytes], now: int) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            # One statement over lists: executemany costs ~5 ms a row in DuckDB.
            db.execute(
                "INSERT OR REPLACE INTO objects (owner, oid, data, stored_at, size) "
                "SELECT ?, oid, data, ?, octet_length(data) "
                "FROM (SELECT unnest(?::BLOB[]) AS oid, unnest(?::BLOB[]) AS data)",
                [owner, now, oids, blobs],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def read_objects(self, owner: bytes, oids: list[bytes], max_bytes: int) -> dict[bytes, bytes]:
        sizes = self.object_sizes(owner, oids)
        held = [oid for oid in dict.fromkeys(oids) if oid in sizes]
        chosen = held[: _fitting([sizes[oid] for oid in held], max_bytes)]
        if not chosen:
            return {}
        rows = self._db.execute(
            "SELECT oid, data FROM objects WHERE owner = ? AND oid IN (SELECT unnest(?::BLOB[]))",
            [owner, chosen],
        ).fetchall()
        found = {bytes(oid): bytes(data) for oid, data in rows}
        return {oid: found[oid] for oid in chosen if oid in found}

    def delete_objects(self, owner: bytes, oids: list[bytes]) -> tuple[int, int]:
        rows = self._db.execute(
            "DELETE FROM objects WHERE owner = ? AND oid IN (SELECT unnest(?::BLOB[])) "
            "RETURNING size",
            [owner, oids],
        ).fetchall()
        return len(rows), sum(int(n) for (n,) in rows)

    def write_mail(
        self, owner: bytes, stream: bytes, first: int, items: list[bytes]
    ) -> tuple[int, int]:
        db = self._db
        before = db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM mail WHERE owner = ? "
            "AND stream = ? AND seq BETWEEN ? AND ?",
            [owner, stream, first, first + len(items) - 1],
        ).fetchone()
        assert before is not None
        db.execute(
            "INSERT OR REPLACE INTO mail (owner, stream, seq, data, size) "
            "SELECT ?, ?, seq, data, octet_length(data) "
            "FROM (SELECT unnest(?::BIGINT[]) AS seq, unnest(?::BLOB[]) AS data)",
            [owner, stream, [first + n for n in range(len(items))], items],
        )
        return int(before[0]), int(before[1])

    def mail_heads(self, owner: bytes, limit: int) -> list[tuple[bytes, int]]:
        rows = self._db.execute(
            "SELECT stream, max(seq) FROM mail WHERE owner = ? GROUP BY stream "
            "ORDER BY stream LIMIT ?",
            [owner, limit],
        ).fetchall()
        return [(bytes(s), int(n)) for s, n in rows]

    def mail_range(
        self, owner: bytes, stream: bytes, first: int, last: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        # Sizes first (no blob is loaded), then only the items that fit.
        sized = self._db.execute(
            "SELECT seq, size FROM mail WHERE owner = ? AND stream = ? AND seq BETWEEN ? "
            "AND ? ORDER BY seq",
            [owner, stream, first, last],
        ).fetchall()
        fit = _fitting([int(n) for _, n in sized], max_bytes)
        if not fit:
            return []
        rows = self._db.execute(
            "SELECT seq, data FROM mail WHERE owner = ? AND stream = ? AND seq BETWEEN ? "
            "AND ? ORDER BY seq",
            [owner, stream, first, int(sized[fit - 1][0])],
        ).fetchall()
        return [(int(seq), bytes(data)) for seq, data in rows]

    def mail_count(self) -> int:
        (count,) = self._db.execute("SELECT count(*) FROM mail").fetchone() or (0,)
        return int(count)

    def close(self) -> None:
        self._db.close()


class MemoryStorageTables:
    """The same tables in dicts (sims): owner -> oid -> data, owner -> stream -> seq -> data.

    Mail heads are kept as items arrive, so a heads request costs a dict lookup.
    """

    def __init__(self) -> None:
        self._objects: dict[bytes, dict[bytes, bytes]] = {}
        self._mail: dict[bytes, dict[bytes, dict[int, bytes]]] = {}
        self._heads: dict[bytes, dict[bytes, int]] = {}
        self._sources: dict[bytes, str] = {}
        self._mail_items = 0

    def usage(self) -> tuple[dict[bytes, tuple[int, int]], int, int]:
        used: dict[bytes, tuple[int, int]] = {}
        for owner, objects in self._objects.items():
            n, rows = used.get(owner, (0, 0))
            used[owner] = (n + sum(len(b) for b in objects.values()), rows + len(objects))
        for owner, streams in self._mail.items():
            n, rows = used.get(owner, (0, 0))
            size = sum(len(b) for items in streams.values() for b in items.values())
            count = sum(len(items) for items in streams.values())
            used[owner] = (n + size, rows + count)
        count = sum(len(objects) for objects in self._objects.values())
        return {o: u for o, u in used.items() if u[1]}, count, self._mail_items

    def sources(self) -> dict[bytes, str]:
        return dict(self._sources)

    def set_source(self, owner: bytes, source: str | None) -> None:
        if source is None:
            self._sources.pop(owner, None)
        else:
            self._sources[owner] = source

    def object_sizes(self, owner: bytes, oids: list[bytes]) -> dict[bytes, int]:
        held = self._objects.get(owner, {})
        return {oid: len(held[oid]) for oid in oids if oid in held}

    def put_objects(self, owner: bytes, oids: list[bytes], blobs: list[bytes], now: int) -> None:
        held = self._objects.setdefault(owner, {})
        for oid, blob in zip(oids, blobs, strict=True):
            held[oid] = blob

    def read_objects(self, owner: bytes, oids: list[bytes], max_bytes: int) -> dict[bytes, bytes]:
        held = self._objects.get(owner, {})
        found = [oid for oid in dict.fromkeys(oids) if oid in held]
        chosen = found[: _fitting([len(held[oid]) for oid in found], max_bytes)]
        return {oid: held[oid] for oid in chosen}

    def delete_objects(self, owner: bytes, oids: list[bytes]) -> tuple[int, int]:
        held = self._objects.get(owner, {})
        gone = [held.pop(oid) for oid in dict.fromkeys(oids) if oid in held]
        if not held:
            self._objects.pop(owner, None)
        return len(gone), sum(len(b) for b in gone)

    def write_mail(
        self, owner: bytes, stream: bytes, first: int, items: list[bytes]
    ) -> tuple[int, int]:
        held = self._mail.setdefault(owner, {}).setdefault(stream, {})
        replaced = replaced_bytes = 0
        for n, item in enumerate(items):
            old = held.get(first + n)
            if old is None:
                self._mail_items += 1
            else:
                replaced += 1
                replaced_bytes += len(old)
            held[first + n] = item
        if items:
            heads = self._heads.setdefault(owner, {})
            heads[stream] = max(heads.get(stream, first), first + len(items) - 1)
        return replaced, replaced_bytes

    def mail_heads(self, owner: bytes, limit: int) -> list[tuple[bytes, int]]:
        return sorted(self._heads.get(owner, {}).items())[:limit]

    def mail_range(
        self, owner: bytes, stream: bytes, first: int, last: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        held = self._mail.get(owner, {}).get(stream, {})
        if last - first < len(held):
            rows = [(seq, held[seq]) for seq in range(first, last + 1) if seq in held]
        else:
            rows = sorted((seq, b) for seq, b in held.items() if first <= seq <= last)
        return rows[: _fitting([len(b) for _, b in rows], max_bytes)]

    def mail_count(self) -> int:
        return self._mail_items

    def close(self) -> None:
        pass
