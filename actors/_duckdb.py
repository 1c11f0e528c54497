"""The one module that imports duckdb (docs/design.md, "Layers": each heavy library has one owner).

The store's memories file and the storage service's shard file are both DuckDB databases; each
is owned by exactly one actor, which opens it here and runs every statement in a worker thread.
Keeping the import in one place makes a version upgrade (or a replacement) a one-file change.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

__all__ = [
    "Connection",
    "Error",
    "IOException",
    "TransactionException",
    "connect",
    "open_private",
]

Connection = duckdb.DuckDBPyConnection
Error = duckdb.Error
IOException = duckdb.IOException
TransactionException = duckdb.TransactionException


def connect(path: str) -> Connection:
    """Open ``path`` (``":memory:"`` for a database that lives only in this process)."""
    return duckdb.connect(path)


def open_private(
    path: Path | None,
    schema: str,
    *,
    memory_limit: int | None = None,
    threads: int | None = None,
) -> Connection:
    """Open an actor's own database (``None``: in memory), readable by this user alone (ids,
    times and structure are private even where the contents are ciphertext), and make sure
    ``schema`` (idempotent DDL) is in place.

    ``memory_limit`` (bytes) and ``threads`` bound DuckDB's buffer pool and worker threads
    (None: DuckDB's defaults, 80% of the machine's RAM and one thread per core); past the
    limit DuckDB evicts cached blocks, or fails the statement (``Error``) when it cannot; a
    checkpoint that cannot pin what it rewrites is FATAL and invalidates the connection, so
    the limit must exceed the largest table the database may hold."""
    db = connect(str(path) if path else ":memory:")
    if path is not None:
        os.chmod(path, 0o600)
    if memory_limit is not None:
        db.execute(f"SET memory_limit = '{int(memory_limit)}B'")
    if threads is not None:
        db.execute(f"SET threads = {int(threads)}")
    db.execute(schema)
    return db
