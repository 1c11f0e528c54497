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
from typing import TypeVar, assert_never

import trio

from actors import _duckdb
from actors._store_tables import DuckStoreTables, StoreTables, TableSnapshot
from actors._store_tables import Link as Link
from actors._store_tables import StoredEnvelope as StoredEnvelope
from actors._store_tables import TombstoneRow as TombstoneRow
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


@dataclass
class _Snapshot:
    rows: TableSnapshot
    used_at: float


class StoreActor:
    """Owns the node's rows: a DuckDB file at ``path`` (``None``: an in-memory DuckDB
    database), or the ``tables`` given (sims: :class:`~actors._store_tables.MemoryStoreTables`).
    The rules below are the same for every backend."""

    def __init__(
        self, path: Path | None, *, capacity: int = 64, tables: StoreTables | None = None
    ) -> None:
        self.mailbox: Mailbox[StoreMsg] = Mailbox("store", capacity)
        self._path = path
        self._given_tables = tables
        self._db: StoreTables | None = None
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
                    await trio.to_thread.run_sync(snapshot.rows.close)
                await trio.to_thread.run_sync(db.close)

    def _open(self) -> StoreTables:
        if self._given_tables is not None:
            return self._given_tables
        try:
            return DuckStoreTables(self._path)
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
    def db(self) -> StoreTables:
        assert self._db is not None
        return self._db

    def _rollback(self) -> None:
        """Roll back after a failure, keeping the failure (the tables never raise for
        "nothing to roll back", which would replace the real reason)."""
        self.db.rollback()

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
        db.begin()
        try:
            results = [self._put_in_transaction(message) for message in messages]
            db.commit()
        except BaseException:
            self._rollback()
            raise
        return results

    def _put_in_transaction(self, message: Put) -> PutResult:
        if not message.items and not message.links:
            return PutResult((), (), ())
        ids = [item.id for item in message.items]
        db = self.db
        tombstoned = db.existing("tombstones", ids)
        present = db.existing("memories", ids)
        fresh = [
            item for item in message.items if item.id not in tombstoned and item.id not in present
        ]
        # Duplicates inside one batch are inserted once.
        unique = list({item.id: item for item in fresh}.values())
        db.insert_memories(unique, time.time_ns())
        for link in message.links:
            self._insert_link(link)
        return PutResult(
            tuple(i.id for i in unique), tuple(sorted(present)), tuple(sorted(tombstoned))
        )

    def _insert_link(self, link: Link) -> bool:
        """A link is kept unless one end is deleted; a known edge gets the new weight."""
        db = self.db
        if db.existing("tombstones", [link.from_id, link.to_id]):
            return False
        if db.link_weight(link.from_id, link.to_id, link.edge_type) is not None:
            db.set_link_weight(link.from_id, link.to_id, link.edge_type, link.weight)
            return False
        db.insert_links([link])
        return True

    def _get(self, message: Get) -> dict[str, StoredEnvelope]:
        if not message.ids:
            return {}
        found = {row.id: row for row in self.db.get(list(message.ids))}
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
        rows = self.db.with_prefix(ref, 3)
        if not rows:
            if len(ref) == 64 and self.db.existing("tombstones", [ref]):
                raise NotFound(f"memory {ref[:12]} was deleted")
            raise NotFound(f"no memory with id {ref!r}")
        if len(rows) > 1:
            raise Ambiguous(
                f"{ref!r} matches several memories ({', '.join(r[:12] for r in rows)}...); "
                "give more characters of the id"
            )
        return rows[0]

    def _recent(self, message: Recent) -> list[StoredEnvelope]:
        return self.db.recent(
            message.types,
            message.after,
            message.before,
            message.newest_first,
            message.limit,
            message.offset,
        )

    def _delete(self, message: Delete) -> bool:
        db = self.db
        db.begin()
        try:
            existed = self._tombstone(message.id)
            db.commit()
        except BaseException:
            self._rollback()
            raise
        return existed

    def _tombstone(self, memory_id: str) -> bool:
        """Delete a memory and its links, and remember it is deleted (deletes win)."""
        db = self.db
        existed = bool(db.existing("memories", [memory_id]))
        db.delete_memories([memory_id])
        db.delete_links_touching([memory_id])
        db.insert_tombstones([TombstoneRow(memory_id, time.time_ns())])
        return existed

    def _remove_link(self, from_id: str, to_id: str, edge_type: str) -> bool:
        if self.db.link_weight(from_id, to_id, edge_type) is None:
            return False
        self.db.delete_link(from_id, to_id, edge_type)
        return True

    def _unlink(self, message: Unlink) -> bool:
        db = self.db
        db.begin()
        try:
            existed = self._remove_link(message.from_id, message.to_id, message.edge_type)
            db.commit()
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
        db.begin()
        try:
            # Adds are checked against what is stored in one query; a later change in the same
            # batch (a delete) is seen because changes run in order below.
            tombstoned = db.existing("tombstones", [i.id for i in items])
            present = db.existing("memories", [i.id for i in items])
            now = time.time_ns()
            for change in message.changes:
                if isinstance(change, StoredEnvelope):
                    if change.id in tombstoned or change.id in present:
                        continue
                    db.insert_memories([change], now)
                    present.add(change.id)
                    added.append(change.id)
                    changed += 1
                elif isinstance(change, Link):
                    if db.existing("tombstones", [change.from_id, change.to_id]):
                        continue
                    before = db.link_weight(change.from_id, change.to_id, change.edge_type)
                    self._insert_link(change)
                    changed += before is None or before != change.weight
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
            db.commit()
        except BaseException:
            self._rollback()
            raise
        gone = set(deleted)
        return ApplyResult(tuple(i for i in added if i not in gone), tuple(deleted), changed)

    def _inventory(self, message: Inventory) -> StoreInventory:
        db = self.db
        memories = frozenset(db.ids("memories"))
        tombstones = frozenset(db.ids("tombstones"))
        return StoreInventory(memories, tombstones, tuple(db.links()))

    def _addlink(self, message: AddLink) -> bool:
        db = self.db
        db.begin()
        try:
            created = self._insert_link(message.link)
            db.commit()
        except BaseException:
            self._rollback()
            raise
        return created

    def _edges(self, message: Edges) -> list[Link]:
        if not message.ids:
            return []
        return self.db.edges(list(message.ids))

    def _ids(self, message: Ids) -> frozenset[str]:
        return frozenset(self.db.ids("memories"))

    def _evict(self, message: Evict) -> tuple[str, ...]:
        return tuple(self.db.evict(message.before))

    def _stats(self, message: Stats) -> StoreStats:
        count = self.db.count
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
        rows = self.db.snapshot()
        number, self._next_snapshot = self._next_snapshot, self._next_snapshot + 1
        self._snapshots[number] = _Snapshot(rows, now)
        return SnapshotInfo(number, *rows.counts)

    def _snapshotread(self, message: SnapshotRead) -> SnapshotPage:
        snapshot = self._snapshots.get(message.snapshot)
        if snapshot is None:
            raise NotFound(f"backup snapshot {message.snapshot} is not open (expired?)")
        snapshot.used_at = time.monotonic()
        page = snapshot.rows.next_page(max(1, message.limit))
        if page is None:
            return SnapshotPage(done=True)
        match page:
            case ("memories", rows):
                return SnapshotPage(memories=tuple(rows))  # type: ignore[arg-type]
            case ("links", rows):
                return SnapshotPage(links=tuple(rows))  # type: ignore[arg-type]
            case (_, rows):
                return SnapshotPage(tombstones=tuple(rows))  # type: ignore[arg-type]

    def _snapshotclose(self, message: SnapshotClose) -> bool:
        return self._close_snapshot(message.snapshot)

    def _close_snapshot(self, number: int) -> bool:
        snapshot = self._snapshots.pop(number, None)
        if snapshot is None:
            return False
        snapshot.rows.close()
        return True

    def _load(self, message: Load) -> LoadResult:
        for item in message.memories:
            if hashlib.sha256(item.envelope).hexdigest() != item.id:
                raise TamperedEnvelope(
                    f"memory {item.id[:12]}: envelope does not hash to its id; nothing in "
                    "this batch was stored"
                )
        db = self.db
        # Set-at-a-time (a few statements per batch, not one per row): a 10k restore is a few
        # dozen statements instead of tens of thousands. Deletes win: tombstones first, then
        # only rows that touch no tombstone.
        db.begin()
        try:
            tombstones = db.insert_tombstones(list(message.tombstones))
            if message.tombstones:
                gone = [t.id for t in message.tombstones]
                db.delete_memories(gone)
                db.delete_links_touching(gone)
            memories = links = 0
            if message.memories:
                dead = db.existing("tombstones", [m.id for m in message.memories])
                memories = db.insert_memories(
                    [m for m in message.memories if m.id not in dead], time.time_ns()
                )
            if message.links:
                ends = {k.from_id for k in message.links} | {k.to_id for k in message.links}
                dead = db.existing("tombstones", sorted(ends))
                links = db.insert_links(
                    [k for k in message.links if k.from_id not in dead and k.to_id not in dead]
                )
            db.commit()
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
