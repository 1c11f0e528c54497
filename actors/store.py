"""The store actor: the single writer of the node's DuckDB file.

What is on disk: envelopes (ciphertext; id, time, type and author device in clear so time and type
filters need no keys), links between memory ids, and tombstones. Nothing readable about a
memory's content, metadata or embedding is ever written here.

Durability: a :class:`Put` is answered only after its transaction has committed, and DuckDB syncs
its write-ahead log on commit, so an acknowledged add survives ``kill -9``. Batches share one
transaction (one sync), which is what makes bulk ingest fast.

DuckDB is blocking, so every statement runs in a worker thread; the actor handles one message at a
time, so the connection is never used by two threads at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, assert_never

import trio

from actors import _duckdb
from actors.runtime import Mailbox, Reply
from dmgn.errors import (
    Ambiguous,
    DaemonOwnsDataDir,
    DiskFull,
    DmgnError,
    InvalidInput,
    NotFound,
    TamperedEnvelope,
)

T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M")

#: Puts committed together at most (see StoreActor._put_group): enough to absorb a burst from
#: many writers, small enough that one transaction stays short.
PUT_GROUP_MAX = 64
#: Shortest id prefix accepted: 6 hex chars = 16M values; shorter prefixes collide too often in a
#: lifetime store to be useful as references.
MIN_PREFIX = 6


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
class PutResult:
    added: tuple[str, ...]  # newly stored ids
    present: tuple[str, ...]  # already stored (idempotent re-add)
    tombstoned: tuple[str, ...]  # refused: deleted before (deletes win)


@dataclass(frozen=True, slots=True)
class StoreStats:
    memories: int
    links: int
    tombstones: int
    file_bytes: int


@dataclass(frozen=True, slots=True)
class Put:
    items: tuple[StoredEnvelope, ...]
    links: tuple[Link, ...]
    reply: Reply[PutResult]


@dataclass(frozen=True, slots=True)
class Get:
    ids: tuple[str, ...]
    reply: Reply[dict[str, StoredEnvelope]]


@dataclass(frozen=True, slots=True)
class Resolve:
    """Full id for a reference (a full id or a unique prefix of at least MIN_PREFIX chars)."""

    ref: str
    reply: Reply[str]


@dataclass(frozen=True, slots=True)
class Recent:
    limit: int | None
    types: tuple[str, ...]
    after: int | None
    before: int | None
    offset: int
    newest_first: bool
    reply: Reply[list[StoredEnvelope]]


@dataclass(frozen=True, slots=True)
class Delete:
    id: str
    reply: Reply[bool]


@dataclass(frozen=True, slots=True)
class AddLink:
    link: Link
    reply: Reply[bool]


@dataclass(frozen=True, slots=True)
class Unlink:
    """Remove the edge ``(from_id, to_id, edge_type)``; answers whether it existed."""

    from_id: str
    to_id: str
    edge_type: str
    reply: Reply[bool]


@dataclass(frozen=True, slots=True)
class RemoveLink:
    """A change for :class:`Apply`: the edge is removed (absent is fine)."""

    from_id: str
    to_id: str
    edge_type: str


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A change for :class:`Apply`: the memory is deleted (and stays deleted)."""

    id: str


Change = StoredEnvelope | Link | RemoveLink | Tombstone


@dataclass(frozen=True, slots=True)
class ApplyResult:
    added: tuple[str, ...]  # memories newly stored
    deleted: tuple[str, ...]  # memories that were present and are now gone
    changed: int  # changes that altered the store (adds, deletes, links added/removed/reweighted)


@dataclass(frozen=True, slots=True)
class Apply:
    """Apply changes in order in one transaction (one sync): how synced ops reach the store.

    Idempotent: a present or tombstoned memory is not re-added, a link touching a tombstoned
    memory is not stored, removing an absent edge or deleting twice changes nothing. Envelopes
    must hash to their id, or nothing in the batch is applied.
    """

    changes: tuple[Change, ...]
    reply: Reply[ApplyResult]


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything the store holds by identity: live ids, tombstoned ids and every edge (for
    finding local changes that are in no sync feed yet)."""

    reply: Reply[StoreInventory]


@dataclass(frozen=True, slots=True)
class StoreInventory:
    memories: frozenset[str]
    tombstones: frozenset[str]
    links: tuple[Link, ...]


@dataclass(frozen=True, slots=True)
class Edges:
    """Links touching any of ``ids`` (either end)."""

    ids: tuple[str, ...]
    reply: Reply[list[Link]]


@dataclass(frozen=True, slots=True)
class Stats:
    reply: Reply[StoreStats]


@dataclass(frozen=True, slots=True)
class Ids:
    """Every live memory id (for reconciling the index with the store)."""

    reply: Reply[frozenset[str]]


@dataclass(frozen=True, slots=True)
class TombstoneRow:
    id: str
    deleted_at: int


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    snapshot: int
    memories: int
    links: int
    tombstones: int


@dataclass(frozen=True, slots=True)
class SnapshotOpen:
    """Start a consistent read of the whole store (for a backup) while writes go on.

    The snapshot is a read transaction on a second connection: DuckDB's MVCC keeps showing it
    the store as of this moment, however many writes commit meanwhile. Read it page by page
    with :class:`SnapshotRead`; other messages are served between pages.
    """

    reply: Reply[SnapshotInfo]


@dataclass(frozen=True, slots=True)
class SnapshotPage:
    """Up to ``limit`` rows of one table; tables come in the order memories, links,
    tombstones; ``done`` once all are read."""

    memories: tuple[StoredEnvelope, ...] = ()
    links: tuple[Link, ...] = ()
    tombstones: tuple[TombstoneRow, ...] = ()
    done: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotRead:
    snapshot: int
    limit: int
    reply: Reply[SnapshotPage]


@dataclass(frozen=True, slots=True)
class SnapshotClose:
    snapshot: int
    reply: Reply[bool]


@dataclass(frozen=True, slots=True)
class LoadResult:
    memories: int  # rows newly stored
    links: int
    tombstones: int


@dataclass(frozen=True, slots=True)
class Load:
    """Store rows from a backup in one transaction, keeping their times (a link's
    ``created_at``, a tombstone's ``deleted_at``). Same rules as :class:`Apply`: deletes win,
    present rows are kept, envelopes must hash to their id or nothing is stored."""

    memories: tuple[StoredEnvelope, ...]
    links: tuple[Link, ...]
    tombstones: tuple[TombstoneRow, ...]
    reply: Reply[LoadResult]


@dataclass(frozen=True, slots=True)
class Evict:
    """Drop the envelopes of memories created before ``before`` (ns) without tombstoning them:
    a ``recent:<days>`` replica keeps only its window, and older memories stay live on the
    devices that keep everything (reached through the query router). Links are kept, so the
    graph still knows the edges. Answers the ids dropped."""

    before: int
    reply: Reply[tuple[str, ...]]


StoreMsg = (
    Put
    | Get
    | Resolve
    | Recent
    | Delete
    | AddLink
    | Unlink
    | Apply
    | Inventory
    | Edges
    | Stats
    | Ids
    | SnapshotOpen
    | SnapshotRead
    | SnapshotClose
    | Load
    | Evict
)

#: Snapshots open at once: one backup at a time is the normal case; a second lets a new backup
#: start while an abandoned one has not yet expired.
MAX_SNAPSHOTS = 2
#: A snapshot not read for this long is closed when another is opened (its reader is gone).
SNAPSHOT_IDLE_SECONDS = 600.0
_SNAPSHOT_QUERIES = (
    ("memories", "SELECT id, created_at, type, device, envelope FROM memories ORDER BY id"),
    (
        "links",
        "SELECT from_id, to_id, edge_type, weight, created_at FROM links "
        "ORDER BY from_id, to_id, edge_type",
    ),
    ("tombstones", "SELECT id, deleted_at FROM tombstones ORDER BY id"),
)


@dataclass
class _Snapshot:
    cursor: _duckdb.Connection
    used_at: float
    table: int = -1  # index into _SNAPSHOT_QUERIES of the query whose rows are being read


_SCHEMA = """
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


class StoreActor:
    """Owns one DuckDB database: a file path, or ``None`` for an in-memory store (sims)."""

    def __init__(self, path: Path | None, *, capacity: int = 64) -> None:
        self.mailbox: Mailbox[StoreMsg] = Mailbox("store", capacity)
        self._path = path
        self._db: _duckdb.Connection | None = None
        self._snapshots: dict[int, _Snapshot] = {}
        self._next_snapshot = 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._db = await trio.to_thread.run_sync(self._open)
        try:
            task_status.started()
            held: StoreMsg | None = None
            while True:
                message = held if held is not None else await self.mailbox.__anext__()
                held = None
                if isinstance(message, Put):
                    held = await self._put_group(message)
                else:
                    await self._handle(message)
        except StopAsyncIteration:
            pass
        finally:
            db, self._db = self._db, None
            snapshots, self._snapshots = self._snapshots, {}
            with trio.CancelScope(shield=True):
                for snapshot in snapshots.values():
                    await trio.to_thread.run_sync(snapshot.cursor.close)
                await trio.to_thread.run_sync(db.close)

    def _open(self) -> _duckdb.Connection:
        try:
            return _duckdb.open_private(self._path, _SCHEMA)
        except _duckdb.IOException as error:
            if "lock" in str(error).lower():
                raise DaemonOwnsDataDir(
                    f"{self._path} is in use by another dmgn process (is dmgn-node running? "
                    "use `dmgn stop`, or run commands while it runs - they go through it)"
                ) from None
            if _disk_is_full(error):
                raise DiskFull(
                    f"cannot open {self._path}: the disk holding it is full; free some space "
                    "and try again (nothing stored is lost)"
                ) from None
            raise

    async def _handle(self, message: StoreMsg) -> None:
        match message:
            case Get():
                await self._answer(message.reply, self._get, message)
            case Resolve():
                await self._answer(message.reply, self._resolve, message)
            case Recent():
                await self._answer(message.reply, self._recent, message)
            case Delete():
                await self._answer(message.reply, self._delete, message)
            case AddLink():
                await self._answer(message.reply, self._addlink, message)
            case Unlink():
                await self._answer(message.reply, self._unlink, message)
            case Apply():
                await self._answer(message.reply, self._apply, message)
            case Inventory():
                await self._answer(message.reply, self._inventory, message)
            case Edges():
                await self._answer(message.reply, self._edges, message)
            case Stats():
                await self._answer(message.reply, self._stats, message)
            case Ids():
                await self._answer(message.reply, self._ids, message)
            case SnapshotOpen():
                await self._answer(message.reply, self._snapshotopen, message)
            case SnapshotRead():
                await self._answer(message.reply, self._snapshotread, message)
            case SnapshotClose():
                await self._answer(message.reply, self._snapshotclose, message)
            case Load():
                await self._answer(message.reply, self._load, message)
            case Evict():
                await self._answer(message.reply, self._evict, message)
            case Put():
                raise AssertionError("run() sends every Put through _put_group")
            case _:
                assert_never(message)

    async def _answer(self, reply: Reply[R], handler: Callable[[M], R], message: M) -> None:
        """Run one handler in a worker thread (DuckDB blocks) and answer with its value."""
        try:
            result = await trio.to_thread.run_sync(handler, message)
        except DmgnError as error:
            reply.err(str(error), error.code)
        except _duckdb.Error as error:
            reply.err(*self._failure(error))
        else:
            reply.ok(result)

    def _failure(self, error: _duckdb.Error) -> tuple[str, str]:
        """(reason, code) for a DuckDB error; a full disk is named as such."""
        if _disk_is_full(error):
            return (
                f"the disk holding {self._path or 'the memory store'} is full, so nothing was "
                "written; free some space and try again (what was stored before is intact)",
                DiskFull.code,
            )
        return f"the memory store failed: {error}", "store_error"

    @property
    def db(self) -> _duckdb.Connection:
        assert self._db is not None
        return self._db

    def _rollback(self) -> None:
        """Roll back after a failure, keeping the failure: when COMMIT itself failed (a full
        disk refusing the WAL write), DuckDB has already aborted the transaction and ROLLBACK
        raises "no transaction is active" - which used to replace the real reason."""
        with contextlib.suppress(_duckdb.TransactionException):  # nothing left to roll back
            self.db.execute("ROLLBACK")

    # Handlers run in a worker thread and return the reply value.

    async def _put_group(self, first: Put) -> StoreMsg | None:
        """Commit ``first`` and every Put queued behind it in one transaction (group commit).

        A commit syncs the write-ahead log, and that sync, not the insert, is most of what an
        add costs; concurrent writers (several agents, gossip catching up) then share one. Each
        Put still gets its own answer, only after the shared commit. Returns a non-Put message
        taken from the inbox while grouping, to be handled next.
        """
        group = [first]
        held: StoreMsg | None = None
        while len(group) < PUT_GROUP_MAX:
            try:
                queued = self.mailbox.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if not isinstance(queued, Put):
                held = queued
                break
            group.append(queued)
        valid: list[Put] = []
        for message in group:
            problem = _hash_problem(message)
            if problem is not None:
                message.reply.err(problem, "tampered")
            else:
                valid.append(message)
        if not valid:
            return held
        try:
            results = await trio.to_thread.run_sync(self._put_all, valid)
        except _duckdb.Error as error:
            reason, code = self._failure(error)
            for message in valid:
                message.reply.err(reason, code)
        except BaseException as error:
            for message in valid:
                message.reply.err(
                    f"the store failed: {type(error).__name__}: {error}", "store_error"
                )
            raise
        else:
            for message, result in zip(valid, results, strict=True):
                message.reply.ok(result)
        return held

    def _put_all(self, messages: list[Put]) -> list[PutResult]:
        db = self.db
        db.execute("BEGIN TRANSACTION")
        try:
            results = [self._put_in_transaction(message) for message in messages]
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return results

    def _put_in_transaction(self, message: Put) -> PutResult:
        if not message.items and not message.links:
            return PutResult((), (), ())
        ids = [item.id for item in message.items]
        db = self.db
        tombstoned = self._existing("tombstones", ids)
        present = self._existing("memories", ids)
        fresh = [
            item for item in message.items if item.id not in tombstoned and item.id not in present
        ]
        # Duplicates inside one batch are inserted once.
        unique = list({item.id: item for item in fresh}.values())
        now = time.time_ns()
        rows = [(i.id, i.created_at, i.type, i.device, i.envelope, now) for i in unique]
        if len(rows) == 1:
            db.execute("INSERT INTO memories VALUES (?, ?, ?, ?, ?, ?)", rows[0])
        elif rows:
            # One statement over column lists, not executemany: DuckDB runs executemany row by
            # row (~3 ms a row here), this is ~40x faster for a bulk import's batches.
            db.execute(
                "INSERT INTO memories SELECT unnest(?), unnest(?), unnest(?), "
                "unnest(?::BLOB[]), unnest(?::BLOB[]), unnest(?)",
                [list(column) for column in zip(*rows, strict=True)],
            )
        for link in message.links:
            self._insert_link(link)
        return PutResult(
            tuple(i.id for i in unique), tuple(sorted(present)), tuple(sorted(tombstoned))
        )

    def _existing(self, table: str, ids: list[str]) -> set[str]:
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

    def _insert_link(self, link: Link) -> bool:
        if self._existing("tombstones", [link.from_id, link.to_id]):
            return False
        exists = self.db.execute(
            "SELECT 1 FROM links WHERE from_id = ? AND to_id = ? AND edge_type = ?",
            [link.from_id, link.to_id, link.edge_type],
        ).fetchone()
        if exists:
            self.db.execute(
                "UPDATE links SET weight = ? WHERE from_id = ? AND to_id = ? AND edge_type = ?",
                [link.weight, link.from_id, link.to_id, link.edge_type],
            )
            return False
        self.db.execute(
            "INSERT INTO links VALUES (?, ?, ?, ?, ?)",
            [link.from_id, link.to_id, link.edge_type, link.weight, link.created_at],
        )
        return True

    def _get(self, message: Get) -> dict[str, StoredEnvelope]:
        if not message.ids:
            return {}
        rows = self.db.execute(
            "SELECT id, created_at, type, device, envelope FROM memories "
            "WHERE id IN (SELECT unnest(?))",
            [list(message.ids)],
        ).fetchall()
        found = {row[0]: _row(row) for row in rows}
        for stored in found.values():
            if hashlib.sha256(stored.envelope).hexdigest() != stored.id:
                raise TamperedEnvelope(
                    f"memory {stored.id[:12]}: stored bytes do not hash to its id (tampered or "
                    "corrupted store file); it was not returned"
                )
        return found

    def _resolve(self, message: Resolve) -> str:
        ref = message.ref.strip().lower()
        if len(ref) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in ref) or len(ref) > 64:
            raise NotFound(
                f"{message.ref!r} is not a memory id (64 hex characters, or a unique prefix of "
                f"at least {MIN_PREFIX})"
            )
        rows = self.db.execute(
            "SELECT id FROM memories WHERE starts_with(id, ?) LIMIT 3", [ref]
        ).fetchall()
        if not rows:
            if len(ref) == 64 and self._existing("tombstones", [ref]):
                raise NotFound(f"memory {ref[:12]} was deleted")
            raise NotFound(f"no memory with id {ref!r}")
        if len(rows) > 1:
            raise Ambiguous(
                f"{ref!r} matches several memories ({', '.join(r[0][:12] for r in rows)}...); "
                "give more characters of the id"
            )
        return str(rows[0][0])

    def _recent(self, message: Recent) -> list[StoredEnvelope]:
        where: list[str] = ["TRUE"]
        params: list[object] = []
        if message.types:
            where.append("type IN (SELECT unnest(?))")
            params.append(list(message.types))
        if message.after is not None:
            where.append("created_at > ?")
            params.append(message.after)
        if message.before is not None:
            where.append("created_at < ?")
            params.append(message.before)
        order = "DESC" if message.newest_first else "ASC"
        sql = (
            f"SELECT id, created_at, type, device, envelope FROM memories "
            f"WHERE {' AND '.join(where)} ORDER BY created_at {order}, id {order}"
        )
        if message.limit is not None:
            sql += f" LIMIT {int(message.limit)} OFFSET {int(message.offset)}"
        return [_row(row) for row in self.db.execute(sql, params).fetchall()]

    def _delete(self, message: Delete) -> bool:
        db = self.db
        db.execute("BEGIN TRANSACTION")
        try:
            existed = self._tombstone(message.id)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return existed

    def _tombstone(self, memory_id: str) -> bool:
        db = self.db
        existed = bool(self._existing("memories", [memory_id]))
        db.execute("DELETE FROM memories WHERE id = ?", [memory_id])
        db.execute("DELETE FROM links WHERE from_id = ? OR to_id = ?", [memory_id, memory_id])
        if not self._existing("tombstones", [memory_id]):
            db.execute("INSERT INTO tombstones VALUES (?, ?)", [memory_id, time.time_ns()])
        return existed

    def _remove_link(self, from_id: str, to_id: str, edge_type: str) -> bool:
        key = [from_id, to_id, edge_type]
        where = "WHERE from_id = ? AND to_id = ? AND edge_type = ?"
        if not self.db.execute(f"SELECT 1 FROM links {where}", key).fetchone():
            return False
        self.db.execute(f"DELETE FROM links {where}", key)
        return True

    def _unlink(self, message: Unlink) -> bool:
        db = self.db
        db.execute("BEGIN TRANSACTION")
        try:
            existed = self._remove_link(message.from_id, message.to_id, message.edge_type)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return existed

    def _apply(self, message: Apply) -> ApplyResult:
        items = [c for c in message.changes if isinstance(c, StoredEnvelope)]
        for item in items:
            if hashlib.sha256(item.envelope).hexdigest() != item.id:
                raise TamperedEnvelope(
                    f"memory {item.id[:12]}: envelope does not hash to its "
                    "id; nothing in this batch was applied"
                )
        db = self.db
        added: list[str] = []
        deleted: list[str] = []
        changed = 0
        db.execute("BEGIN TRANSACTION")
        try:
            # Adds are checked against what is stored in one query; a later change in the same
            # batch (a delete) is seen because changes run in order below.
            tombstoned = self._existing("tombstones", [i.id for i in items])
            present = self._existing("memories", [i.id for i in items])
            now = time.time_ns()
            for change in message.changes:
                if isinstance(change, StoredEnvelope):
                    if change.id in tombstoned or change.id in present:
                        continue
                    db.execute(
                        "INSERT INTO memories VALUES (?, ?, ?, ?, ?, ?)",
                        [
                            change.id,
                            change.created_at,
                            change.type,
                            change.device,
                            change.envelope,
                            now,
                        ],
                    )
                    present.add(change.id)
                    added.append(change.id)
                    changed += 1
                elif isinstance(change, Link):
                    if self._existing("tombstones", [change.from_id, change.to_id]):
                        continue
                    before = self.db.execute(
                        "SELECT weight FROM links WHERE from_id = ? AND to_id = ? AND "
                        "edge_type = ?",
                        [change.from_id, change.to_id, change.edge_type],
                    ).fetchone()
                    self._insert_link(change)
                    changed += before is None or before[0] != change.weight
                elif isinstance(change, RemoveLink):
                    changed += self._remove_link(change.from_id, change.to_id, change.edge_type)
                else:
                    if change.id in tombstoned:
                        continue
                    if self._tombstone(change.id):
                        deleted.append(change.id)
                    tombstoned.add(change.id)
                    present.discard(change.id)
                    changed += 1
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        gone = set(deleted)
        return ApplyResult(tuple(i for i in added if i not in gone), tuple(deleted), changed)

    def _inventory(self, message: Inventory) -> StoreInventory:
        db = self.db
        memories = frozenset(r[0] for r in db.execute("SELECT id FROM memories").fetchall())
        tombstones = frozenset(r[0] for r in db.execute("SELECT id FROM tombstones").fetchall())
        links = tuple(
            Link(*row)
            for row in db.execute(
                "SELECT from_id, to_id, edge_type, weight, created_at FROM links"
            ).fetchall()
        )
        return StoreInventory(memories, tombstones, links)

    def _addlink(self, message: AddLink) -> bool:
        db = self.db
        db.execute("BEGIN TRANSACTION")
        try:
            created = self._insert_link(message.link)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return created

    def _edges(self, message: Edges) -> list[Link]:
        if not message.ids:
            return []
        rows = self.db.execute(
            "SELECT from_id, to_id, edge_type, weight, created_at FROM links "
            "WHERE from_id IN (SELECT unnest($ids)) OR to_id IN (SELECT unnest($ids)) "
            "ORDER BY created_at, from_id, to_id",
            {"ids": list(message.ids)},
        ).fetchall()
        return [Link(*row) for row in rows]

    def _ids(self, message: Ids) -> frozenset[str]:
        return frozenset(row[0] for row in self.db.execute("SELECT id FROM memories").fetchall())

    def _evict(self, message: Evict) -> tuple[str, ...]:
        rows = self.db.execute(
            "DELETE FROM memories WHERE created_at < ? RETURNING id", [message.before]
        ).fetchall()
        return tuple(sorted(row[0] for row in rows))

    def _stats(self, message: Stats) -> StoreStats:
        def count(table: str) -> int:
            row = self.db.execute(f"SELECT count(*) FROM {table}").fetchone()
            return int(row[0]) if row else 0

        size = 0
        if self._path is not None:
            # The file and its write-ahead log: what the store holds on disk right now (the
            # file alone grows only at checkpoints).
            for path in (self._path, self._path.with_name(self._path.name + ".wal")):
                with contextlib.suppress(FileNotFoundError):
                    size += path.stat().st_size
        return StoreStats(count("memories"), count("links"), count("tombstones"), size)

    # -- snapshots (backup) and loading (restore) --------------------------------------------

    def _snapshotopen(self, message: SnapshotOpen) -> SnapshotInfo:
        now = time.monotonic()
        for number, old in list(self._snapshots.items()):
            if now - old.used_at > SNAPSHOT_IDLE_SECONDS:
                self._close_snapshot(number)
        if len(self._snapshots) >= MAX_SNAPSHOTS:
            raise InvalidInput(
                f"{MAX_SNAPSHOTS} backups are already running; wait for one to finish"
            )
        cursor = self.db.cursor()
        cursor.execute("BEGIN TRANSACTION")
        counts = []
        for table in ("memories", "links", "tombstones"):
            row = cursor.execute(f"SELECT count(*) FROM {table}").fetchone()
            counts.append(int(row[0]) if row else 0)
        number, self._next_snapshot = self._next_snapshot, self._next_snapshot + 1
        self._snapshots[number] = _Snapshot(cursor, now)
        return SnapshotInfo(number, *counts)

    def _snapshotread(self, message: SnapshotRead) -> SnapshotPage:
        snapshot = self._snapshots.get(message.snapshot)
        if snapshot is None:
            raise NotFound(f"backup snapshot {message.snapshot} is not open (expired?)")
        snapshot.used_at = time.monotonic()
        limit = max(1, message.limit)
        while snapshot.table < len(_SNAPSHOT_QUERIES):
            if snapshot.table >= 0:
                rows = snapshot.cursor.fetchmany(limit)
                if rows:
                    kind = _SNAPSHOT_QUERIES[snapshot.table][0]
                    if kind == "memories":
                        return SnapshotPage(memories=tuple(_row(r) for r in rows))
                    if kind == "links":
                        return SnapshotPage(links=tuple(Link(*r) for r in rows))
                    return SnapshotPage(tombstones=tuple(TombstoneRow(*r) for r in rows))
            snapshot.table += 1
            if snapshot.table < len(_SNAPSHOT_QUERIES):
                snapshot.cursor.execute(_SNAPSHOT_QUERIES[snapshot.table][1])
        return SnapshotPage(done=True)

    def _snapshotclose(self, message: SnapshotClose) -> bool:
        return self._close_snapshot(message.snapshot)

    def _close_snapshot(self, number: int) -> bool:
        snapshot = self._snapshots.pop(number, None)
        if snapshot is None:
            return False
        try:
            snapshot.cursor.execute("ROLLBACK")
        finally:
            snapshot.cursor.close()
        return True

    def _load(self, message: Load) -> LoadResult:
        for item in message.memories:
            if hashlib.sha256(item.envelope).hexdigest() != item.id:
                raise TamperedEnvelope(
                    f"memory {item.id[:12]}: envelope does not hash to its id; nothing in "
                    "this batch was stored"
                )
        db = self.db
        # Set-at-a-time statements (unnest of column lists), not a statement per row: a 10k
        # restore is a few dozen statements instead of tens of thousands.
        tomb = {
            "i": [t.id for t in message.tombstones],
            "at": [t.deleted_at for t in message.tombstones],
        }
        mem = {
            "i": [m.id for m in message.memories],
            "c": [m.created_at for m in message.memories],
            "t": [m.type for m in message.memories],
            "d": [m.device for m in message.memories],
            "e": [m.envelope for m in message.memories],
            "now": time.time_ns(),
        }
        link = {
            "f": [k.from_id for k in message.links],
            "t": [k.to_id for k in message.links],
            "e": [k.edge_type for k in message.links],
            "w": [float(k.weight) for k in message.links],
            "c": [k.created_at for k in message.links],
        }

        def count(sql: str, params: dict[str, Any]) -> int:
            row = db.execute(sql, params).fetchone()
            return int(row[0]) if row else 0

        db.execute("BEGIN TRANSACTION")
        try:
            tombstones = 0
            if message.tombstones:
                tombstones = count(
                    "INSERT OR IGNORE INTO tombstones SELECT unnest($i), unnest($at)", tomb
                )
                db.execute("DELETE FROM memories WHERE id IN (SELECT unnest($i))", {"i": tomb["i"]})
                db.execute(
                    "DELETE FROM links WHERE from_id IN (SELECT unnest($i)) "
                    "OR to_id IN (SELECT unnest($i))",
                    {"i": tomb["i"]},
                )
            memories = 0
            if message.memories:
                memories = count(
                    "INSERT OR IGNORE INTO memories SELECT * FROM (SELECT unnest($i) AS id, "
                    "unnest($c), unnest($t), unnest($d), unnest($e), $now) "
                    "WHERE id NOT IN (SELECT id FROM tombstones)",
                    mem,
                )
            links = 0
            if message.links:
                links = count(
                    "INSERT OR IGNORE INTO links SELECT * FROM (SELECT unnest($f) AS f, "
                    "unnest($t) AS t, unnest($e), unnest($w), unnest($c)) "
                    "WHERE f NOT IN (SELECT id FROM tombstones) "
                    "AND t NOT IN (SELECT id FROM tombstones)",
                    link,
                )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return LoadResult(memories, links, tombstones)


#: How the C library words ENOSPC and EDQUOT; DuckDB puts strerror() in its IO errors.
_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded")


def _disk_is_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return any(words in text for words in _DISK_FULL_WORDS)


def _hash_problem(message: Put) -> str | None:
    for item in message.items:
        if hashlib.sha256(item.envelope).hexdigest() != item.id:
            return (
                f"memory {item.id[:12]}: envelope does not hash to its id; nothing in this "
                "batch was stored"
            )
    return None


def _row(row: tuple[Any, ...]) -> StoredEnvelope:
    return StoredEnvelope(row[0], row[1], row[2], bytes(row[3]), bytes(row[4]))
