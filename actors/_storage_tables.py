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
    PRIMARY KEY (owner, oid));
CREATE TABLE IF NOT EXISTS mail (
    owner BLOB NOT NULL, stream BLOB NOT NULL, seq BIGINT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (owner, stream, seq));
"""


class StorageTables(Protocol):
    def usage(self) -> tuple[dict[bytes, int], int, int]:
        """(bytes held per owner, objects, mail items)."""
        ...

    def object_sizes(self, owner: bytes, oids: list[bytes]) -> dict[bytes, int]:
        """The sizes of those of ``oids`` that ``owner`` holds here."""
        ...

    def put_objects(self, owner: bytes, oids: list[bytes], blobs: list[bytes], now: int) -> None:
        """Store (or replace) the objects, in one transaction."""
        ...

    def read_objects(self, owner: bytes, oids: list[bytes]) -> dict[bytes, bytes]: ...

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
        self, owner: bytes, stream: bytes, first: int, last: int
    ) -> list[tuple[int, bytes]]:
        """The items with ``first <= seq <= last``, by seq."""
        ...

    def mail_count(self) -> int: ...

    def close(self) -> None: ...


class DuckStorageTables:
    """The tables in a DuckDB database (``path=None``: in memory)."""

    def __init__(self, path: Path | None) -> None:
        self._db = _duckdb.open_private(path, _SCHEMA)

    def usage(self) -> tuple[dict[bytes, int], int, int]:
        db = self._db
        used = {
            bytes(owner): int(n)
            for owner, n in db.execute(
                "SELECT owner, sum(n) FROM (SELECT owner, octet_length(data) AS n FROM objects "
                "UNION ALL SELECT owner, octet_length(data) FROM mail) GROUP BY owner"
            ).fetchall()
        }
        (objects,) = db.execute("SELECT count(*) FROM objects").fetchone() or (0,)
        return used, int(objects), self.mail_count()

    def object_sizes(self, owner: bytes, oids: list[bytes]) -> dict[bytes, int]:
        rows = self._db.execute(
            "SELECT oid, octet_length(data) FROM objects WHERE owner = ? AND oid IN "
            "(SELECT unnest(?::BLOB[]))",
            [owner, oids],
        ).fetchall()
        return {bytes(oid): int(n) for oid, n in rows}

    def put_objects(self, owner: bytes, oids: list[bytes], blobs: list[bytes], now: int) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            # One statement over lists: executemany costs ~5 ms a row in DuckDB.
            db.execute(
                "INSERT OR REPLACE INTO objects SELECT ?, unnest(?::BLOB[]), unnest(?::BLOB[]), ?",
                [owner, oids, blobs, now],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def read_objects(self, owner: bytes, oids: list[bytes]) -> dict[bytes, bytes]:
        rows = self._db.execute(
            "SELECT oid, data FROM objects WHERE owner = ? AND oid IN (SELECT unnest(?::BLOB[]))",
            [owner, oids],
        ).fetchall()
        return {bytes(oid): bytes(data) for oid, data in rows}

    def delete_objects(self, owner: bytes, oids: list[bytes]) -> tuple[int, int]:
        rows = self._db.execute(
            "DELETE FROM objects WHERE owner = ? AND oid IN (SELECT unnest(?::BLOB[])) "
            "RETURNING octet_length(data)",
            [owner, oids],
        ).fetchall()
        return len(rows), sum(int(n) for (n,) in rows)

    def write_mail(
        self, owner: bytes, stream: bytes, first: int, items: list[bytes]
    ) -> tuple[int, int]:
        db = self._db
        before = db.execute(
            "SELECT count(*), coalesce(sum(octet_length(data)), 0) FROM mail WHERE owner = ? "
            "AND stream = ? AND seq BETWEEN ? AND ?",
            [owner, stream, first, first + len(items) - 1],
        ).fetchone()
        assert before is not None
        db.execute(
            "INSERT OR REPLACE INTO mail SELECT ?, ?, unnest(?::BIGINT[]), unnest(?::BLOB[])",
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
        self, owner: bytes, stream: bytes, first: int, last: int
    ) -> list[tuple[int, bytes]]:
        rows = self._db.execute(
            "SELECT seq, data FROM mail WHERE owner = ? AND stream = ? AND seq BETWEEN ? "
            "AND ? ORDER BY seq",
            [owner, stream, first, last],
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
        self._mail_items = 0

    def usage(self) -> tuple[dict[bytes, int], int, int]:
        used: dict[bytes, int] = {}
        for owner, objects in self._objects.items():
            used[owner] = used.get(owner, 0) + sum(len(b) for b in objects.values())
        for owner, streams in self._mail.items():
            size = sum(len(b) for items in streams.values() for b in items.values())
            used[owner] = used.get(owner, 0) + size
        count = sum(len(objects) for objects in self._objects.values())
        return used, count, self._mail_items

    def object_sizes(self, owner: bytes, oids: list[bytes]) -> dict[bytes, int]:
        held = self._objects.get(owner, {})
        return {oid: len(held[oid]) for oid in oids if oid in held}

    def put_objects(self, owner: bytes, oids: list[bytes], blobs: list[bytes], now: int) -> None:
        held = self._objects.setdefault(owner, {})
        for oid, blob in zip(oids, blobs, strict=True):
            held[oid] = blob

    def read_objects(self, owner: bytes, oids: list[bytes]) -> dict[bytes, bytes]:
        held = self._objects.get(owner, {})
        return {oid: held[oid] for oid in dict.fromkeys(oids) if oid in held}

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
        self, owner: bytes, stream: bytes, first: int, last: int
    ) -> list[tuple[int, bytes]]:
        held = self._mail.get(owner, {}).get(stream, {})
        if last - first < len(held):
            return [(seq, held[seq]) for seq in range(first, last + 1) if seq in held]
        return sorted((seq, b) for seq, b in held.items() if first <= seq <= last)

    def mail_count(self) -> int:
        return self._mail_items

    def close(self) -> None:
        pass
