"""The one module that imports duckdb (DESIGN.md section 2: each heavy library has one owner).

The store's memories file and the storage service's shard file are both DuckDB databases; each
is owned by exactly one actor, which opens it here and runs every statement in a worker thread.
Keeping the import in one place makes a version upgrade (or a replacement) a one-file change.
"""

from __future__ import annotations

import duckdb

__all__ = ["Connection", "Error", "IOException", "TransactionException", "connect"]

Connection = duckdb.DuckDBPyConnection
Error = duckdb.Error
IOException = duckdb.IOException
TransactionException = duckdb.TransactionException


def connect(path: str) -> Connection:
    """Open ``path`` (``":memory:"`` for a database that lives only in this process)."""
    return duckdb.connect(path)
