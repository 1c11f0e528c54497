"""The indexer actor: hybrid search over faiss vectors and a BM25 text index.

It is the only code that touches faiss, the text index and the embedder's model. It never sees
the store: at unlock the node either lets it load its own encrypted snapshot (and checks
``IndexStats.fingerprint`` against the store's live ids with :func:`fingerprint_of`), or sends
:class:`Reset` and feeds it every decrypted memory again with :class:`Index`.

Scores and spaces are explained in ``actors/_index_core.py``; in short, ``score = alpha · cosine
+ (1 − alpha) · text match``, both on 0–1 scales, ties to the newer memory; caller-provided
embeddings get their own faiss index per dimension and are searched by query embeddings of that
dimension, while text queries use the built-in embedder's vectors, which every memory has.

Persistence: one file, ``<data_dir>/index.snapshot``, XChaCha20-Poly1305 under ``index_key``
(additional data binds it to its purpose and format), written atomically with mode 0600. It is
written on :class:`Persist` (the node sends one periodically and before locking), never
implicitly, so its cost (at 100k memories: ~1.7 s to serialise 213 MB, plus encryption and
fsync; ~2.7 s to load) lands where the node chooses.

Heavy work (model forward passes, faiss adds and searches, snapshot I/O) runs in a worker thread;
messages are handled one at a time, so the index is never touched by two threads at once.
"""

from __future__ import annotations

import errno
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

import numpy as np
import trio
from numpy.typing import NDArray

from actors._index_core import (
    BUILTIN,
    Entry,
    Scored,
    SearchIndex,
    SnapshotFormatError,
    caller_space,
    fingerprint_of,
)
from actors._index_vectors import ANN_THRESHOLD
from actors.runtime import Mailbox, Reply
from dmgn.crypto import KEY_BYTES, DecryptionFailed, seal, unseal
from dmgn.embedding import Embedder, EmbedderUnavailable, embed_windows
from dmgn.paths import write_private

__all__ = [
    "MAX_LIMIT",
    "MAX_QUERY_CHARS",
    "Embed",
    "Hit",
    "Index",
    "IndexItem",
    "IndexResult",
    "IndexStats",
    "IndexerActor",
    "ListIds",
    "Persist",
    "Reset",
    "Search",
    "SpaceStats",
    "Stats",
    "Unindex",
    "fingerprint_of",
]

log = logging.getLogger("dmgn.indexer")

#: Results per query. Agents want a handful; a thousand is a dump, which is the store's job.
MAX_LIMIT = 1000
#: Query text beyond this is a mistake (a file pasted as a query), not a question.
MAX_QUERY_CHARS = 20_000
#: Largest embedding accepted from a caller (text-embedding-3-large has 3072).
MAX_EMBEDDING_DIM = 4096
#: Items per Index message: bounds the time one message holds the actor (the model embeds
#: ~100 memories/s on two cores), so searches queued behind a bulk load still get served.
MAX_BATCH = 512
#: Texts per Embed message, for the same reason.
MAX_EMBED_TEXTS = 256

SNAPSHOT_NAME = "index.snapshot"
_SNAPSHOT_AAD = b"dmgn index snapshot v1"
_MEMORY_ID = re.compile(r"^[0-9a-f]{64}$")


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexItem:
    memory_id: str  # 64 lowercase hex
    text: str
    type: str
    created_at_ns: int
    embedding: tuple[float, ...] | None = None  # caller-provided, any dimension


@dataclass(frozen=True, slots=True)
class IndexResult:
    added: int
    already_present: int


@dataclass(frozen=True, slots=True)
class Index:
    """Index memories (idempotent: an id already indexed is left as it is)."""

    items: tuple[IndexItem, ...]
    reply: Reply[IndexResult]


@dataclass(frozen=True, slots=True)
class Unindex:
    """Erase memories (deleted or tombstoned) from every index; replies how many were found."""

    ids: tuple[str, ...]
    reply: Reply[int]


@dataclass(frozen=True, slots=True)
class Hit:
    memory_id: str
    score: float
    vector_score: float
    text_score: float
    created_at_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Search:
    """A query. ``text`` and/or ``embedding``; ``alpha`` weighs vector against text (1 = vector
    only, 0 = text only); filters are ANDed: ``types`` any of, ``after_ns < created <
    before_ns``, ``only_ids`` (the caller resolves "links of X" into this)."""

    reply: Reply[list[Hit]]
    text: str | None = None
    embedding: tuple[float, ...] | None = None
    alpha: float = 0.5
    limit: int = 10
    types: frozenset[str] | None = None
    after_ns: int | None = None
    before_ns: int | None = None
    only_ids: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class SpaceStats:
    name: str  # "builtin" or "caller:<dim>"
    dim: int
    kind: str  # "flat" (exact) or "ivf<lists>-sq8" (approximate, re-scored exactly)
    vectors: int


@dataclass(frozen=True, slots=True)
class IndexStats:
    count: int
    dead_slots: int
    embedder: str
    #: what computes the built-in vectors, e.g. "onnxruntime 1.32.0, 1 thread per single
    #: text, 2 per batch", or "hashing" for the lexical embedder
    embedder_backend: str
    spaces: tuple[SpaceStats, ...]
    approx_bytes: int
    fingerprint: str  # fingerprint_of(live ids); compare with the store's
    loaded_from_snapshot: bool
    snapshot_problem: str | None  # why a snapshot present on disk was not used


@dataclass(frozen=True, slots=True)
class Stats:
    reply: Reply[IndexStats]


@dataclass(frozen=True, slots=True)
class ListIds:
    reply: Reply[frozenset[str]]


@dataclass(frozen=True, slots=True)
class Embed:
    """Embed texts with the built-in embedder (for other actors); unit vectors."""

    texts: tuple[str, ...]
    reply: Reply[tuple[tuple[float, ...], ...]]


@dataclass(frozen=True, slots=True)
class Persist:
    """Write the encrypted snapshot now; replies with its size in bytes (0 when in memory)."""

    reply: Reply[int]


@dataclass(frozen=True, slots=True)
class Reset:
    """Forget everything (before a full rebuild from the store)."""

    reply: Reply[None]


Msg = Index | Unindex | Search | Stats | ListIds | Embed | Persist | Reset


# -- the actor ----------------------------------------------------------------------------------


class _Invalid(Exception):
    """A request the caller got wrong; its message is the sentence to send back."""


class IndexerActor:
    """Owns the search indexes. ``data_dir=None`` keeps everything in memory (sims, tests)."""

    def __init__(
        self,
        embedder: Embedder,
        data_dir: Path | None = None,
        index_key: bytes | None = None,
        *,
        ann_threshold: int = ANN_THRESHOLD,
        capacity: int = 64,
    ) -> None:
        if data_dir is not None and (index_key is None or len(index_key) != KEY_BYTES):
            raise ValueError("a persistent indexer needs a 32-byte index_key")
        self.mailbox: Mailbox[Msg] = Mailbox("indexer", capacity)
        self._embedder = embedder
        self._data_dir = data_dir
        self._key = index_key
        self._ann_threshold = ann_threshold
        self._index = SearchIndex(embedder.name, embedder.dim, ann_threshold)
        self._loaded = False
        self._snapshot_problem: str | None = None

    @property
    def snapshot_path(self) -> Path | None:
        return None if self._data_dir is None else self._data_dir / SNAPSHOT_NAME

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limit_blas_threads()
        if not self._loaded:
            await trio.to_thread.run_sync(self._load_snapshot)
        task_status.started()
        async for msg in self.mailbox:
            try:
                await self._dispatch(msg)
            except _Invalid as invalid:
                msg.reply.err(str(invalid), "invalid_request")
            except EmbedderUnavailable as why:  # a lazily loaded model that failed to load
                msg.reply.err(f"the embedding model is unavailable: {why}", "unavailable")

    async def _dispatch(self, msg: Msg) -> None:
        match msg:
            case Search():
                await self._search(msg)
            case Index():
                await self._add(msg)
            case Unindex():
                await self._remove(msg)
            case Embed():
                await self._embed(msg)
            case Stats():
                msg.reply.ok(self._stats())
            case ListIds():
                msg.reply.ok(self._index.ids())
            case Persist():
                await self._persist_answer(msg)
            case Reset():
                self._index = SearchIndex(
                    self._embedder.name, self._embedder.dim, self._ann_threshold
                )
                msg.reply.ok(None)
            case _:
                assert_never(msg)

    # -- handlers ---------------------------------------------------------------------------

    async def _add(self, msg: Index) -> None:
        if len(msg.items) > MAX_BATCH:
            raise _Invalid(
                f"{len(msg.items)} memories in one Index message; send at most "
                f"{MAX_BATCH} per message so searches are not held up"
            )
        for item in msg.items:
            _check_item(item)
        added, present = await trio.to_thread.run_sync(self._embed_and_add, msg.items)
        msg.reply.ok(IndexResult(added, present))

    def _embed_and_add(self, items: tuple[IndexItem, ...]) -> tuple[int, int]:
        fresh = [item for item in items if item.memory_id not in self._index]
        if fresh:
            vectors, owners = embed_windows(self._embedder, [item.text for item in fresh])
        else:
            vectors, owners = np.zeros((0, self._embedder.dim), np.float32), []
        rows_of: dict[int, list[int]] = {}
        for row, owner in enumerate(owners):
            rows_of.setdefault(owner, []).append(row)
        entries = [
            Entry(
                item.memory_id,
                item.text,
                item.type,
                item.created_at_ns,
                vectors[rows_of[i]],  # one row per window of the text
                None if item.embedding is None else _unit(item.embedding),
            )
            for i, item in enumerate(fresh)
        ]
        added, _ = self._index.add(entries)
        return added, len(items) - added

    async def _remove(self, msg: Unindex) -> None:
        def remove() -> int:
            removed = self._index.remove(msg.ids)
            if self._index.needs_compaction():
                self._index = self._index.compacted()
            return removed

        msg.reply.ok(await trio.to_thread.run_sync(remove))

    async def _search(self, msg: Search) -> None:
        _check_search(msg)
        if self._index.count == 0:
            msg.reply.ok([])
            return
        text = msg.text if msg.text is not None and msg.text.strip() else None
        space = BUILTIN
        query_vector: NDArray[np.float32] | None = None
        if msg.embedding is not None:
            space = caller_space(len(msg.embedding))
            if space not in self._index.spaces():
                raise _Invalid(
                    f"no memory was indexed with a {len(msg.embedding)}-dimension embedding, "
                    "so a query embedding of that size has nothing to match; send the query as "
                    "text, or embeddings of the size your memories were stored with"
                )
            query_vector = _unit(msg.embedding)

        def run() -> list[Scored]:
            vector = query_vector
            if vector is None and text is not None and msg.alpha > 0:
                vector = self._embedder.embed([text])[0]
            return self._index.search(
                text=text,
                query_vector=vector,
                space=space,
                alpha=msg.alpha,
                limit=msg.limit,
                types=msg.types,
                after_ns=msg.after_ns,
                before_ns=msg.before_ns,
                only_ids=msg.only_ids,
            )

        found = await trio.to_thread.run_sync(run)
        msg.reply.ok(
            [
                Hit(s.memory_id, s.score, s.vector_score, s.text_score, s.created_at_ns)
                for s in found
            ]
        )

    async def _embed(self, msg: Embed) -> None:
        if len(msg.texts) > MAX_EMBED_TEXTS:
            raise _Invalid(
                f"{len(msg.texts)} texts in one Embed message; send at most {MAX_EMBED_TEXTS}"
            )
        vectors = await trio.to_thread.run_sync(self._embedder.embed, list(msg.texts))
        msg.reply.ok(tuple(tuple(float(x) for x in row) for row in vectors))

    def _stats(self) -> IndexStats:
        spaces = tuple(
            SpaceStats(name, space.dim, space.kind, space.live_rows)
            for name, space in sorted(self._index.spaces().items())
        )
        return IndexStats(
            count=self._index.count,
            dead_slots=self._index.dead_slots,
            embedder=self._embedder.name,
            embedder_backend=str(getattr(self._embedder, "backend_detail", "built-in")),
            spaces=spaces,
            approx_bytes=self._index.nbytes(),
            fingerprint=self._index.fingerprint(),
            loaded_from_snapshot=self._loaded,
            snapshot_problem=self._snapshot_problem,
        )

    # -- snapshot ---------------------------------------------------------------------------

    async def _persist_answer(self, msg: Persist) -> None:
        """Save the snapshot; a disk that refuses it (full, read-only, gone) is an answer, not a
        crash: the snapshot is a cache, the previous one (or none) stays, and the index in
        memory is untouched."""
        try:
            size = await trio.to_thread.run_sync(self._persist)
        except OSError as error:
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = (
                f"the index snapshot was not saved: "
                f"{'the disk is full' if full else error.strerror or error} "
                f"({self.snapshot_path}); search works, and the next start rebuilds what the "
                "snapshot misses from the store"
            )
            log.warning("%s", reason)
            msg.reply.err(reason, "disk_full" if full else "io_error")
        else:
            msg.reply.ok(size)

    def _persist(self) -> int:
        path = self.snapshot_path
        if path is None or self._key is None:
            return 0
        if self._index.dead_slots:
            self._index = self._index.compacted()
        sealed = seal(self._key, self._index.to_snapshot(), _SNAPSHOT_AAD)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, sealed)
        return len(sealed)

    def _load_snapshot(self) -> None:
        path = self.snapshot_path
        if path is None or self._key is None:
            return
        self._remove_orphan_temporaries(path)
        if not path.exists():
            return
        try:
            data = unseal(self._key, path.read_bytes(), _SNAPSHOT_AAD)
            index = SearchIndex.from_snapshot(data, self._ann_threshold)
        except DecryptionFailed:
            self._snapshot_problem = (
                f"{path} could not be decrypted with this identity's key "
                "(another identity's, or damaged); rebuilding from the store"
            )
        except SnapshotFormatError as other:
            self._snapshot_problem = (
                f"{path} was written by another version of dmgn ({other}); rebuilding from "
                "the store"
            )
        except (ValueError, KeyError, TypeError) as broken:
            self._snapshot_problem = f"{path} is unreadable ({broken}); rebuilding from the store"
        else:
            if (index.embedder, index.dim) != (self._embedder.name, self._embedder.dim):
                self._snapshot_problem = (
                    f"{path} was built with the {index.embedder} embedder, this node uses "
                    f"{self._embedder.name}; rebuilding from the store"
                )
            else:
                self._index = index
                self._loaded = True
        if self._snapshot_problem:
            log.warning("%s", self._snapshot_problem)

    @staticmethod
    def _remove_orphan_temporaries(path: Path) -> None:
        """Delete half-written snapshots (``.index.snapshot.tmp-<pid>``) left by a process that
        died while saving. Safe: the indexer only runs for the holder of the data dir lock, so
        no other process can be writing one."""
        for orphan in path.parent.glob(f".{path.name}.tmp-*"):
            try:
                orphan.unlink()
            except FileNotFoundError:
                continue
            except OSError as error:
                log.warning("could not remove %s: %s", orphan, error.strerror or error)
                continue
            log.info("removed %s, left by a save that was interrupted", orphan)


# -- threads ------------------------------------------------------------------------------------


def limit_blas_threads() -> None:
    """One BLAS thread for the whole process unless a caller asks for more for a while.

    numpy's OpenBLAS otherwise starts a spinning thread per core and uses them for every matrix
    product, which made one query ~60x slower while other processes kept the cores busy. The
    model embedder raises the limit around its own batches (see ``dmgn.embedding``); faiss'
    OpenMP pool is held at one thread in ``actors/_index_vectors.py``.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


# -- validation ---------------------------------------------------------------------------------


def _check_item(item: IndexItem) -> None:
    if not isinstance(item.memory_id, str) or not _MEMORY_ID.match(item.memory_id):
        raise _Invalid(
            f"memory id {item.memory_id!r} is not 64 lowercase hex characters; "
            "nothing from this batch was indexed"
        )
    if not isinstance(item.text, str):
        raise _Invalid(f"memory {item.memory_id[:12]} has no text; nothing was indexed")
    if item.embedding is not None:
        _check_embedding(item.embedding, f"memory {item.memory_id[:12]}'s embedding")


def _check_search(msg: Search) -> None:
    has_text = msg.text is not None and bool(msg.text.strip())
    if not has_text and msg.embedding is None:
        raise _Invalid("the query is empty: give some text or an embedding to search for")
    if msg.text is not None and len(msg.text) > MAX_QUERY_CHARS:
        raise _Invalid(
            f"the query text is {len(msg.text)} characters; queries are limited to "
            f"{MAX_QUERY_CHARS}: search for the key sentence instead"
        )
    if not (isinstance(msg.limit, int) and 1 <= msg.limit <= MAX_LIMIT):
        raise _Invalid(f"limit must be between 1 and {MAX_LIMIT}, not {msg.limit!r}")
    if not (isinstance(msg.alpha, int | float) and 0.0 <= msg.alpha <= 1.0):
        raise _Invalid(
            f"alpha must be between 0 (text only) and 1 (vector only), not {msg.alpha!r}"
        )
    if msg.embedding is not None:
        _check_embedding(msg.embedding, "the query embedding")


def _check_embedding(embedding: Any, what: str) -> None:
    if not isinstance(embedding, tuple | list) or not 1 <= len(embedding) <= MAX_EMBEDDING_DIM:
        raise _Invalid(f"{what} must be a list of 1 to {MAX_EMBEDDING_DIM} numbers")
    try:
        values = np.asarray(embedding, dtype=np.float64)
    except (TypeError, ValueError):
        raise _Invalid(f"{what} contains something that is not a number") from None
    if not np.all(np.isfinite(values)) or not math.isfinite(float(np.linalg.norm(values))):
        raise _Invalid(f"{what} contains NaN or infinite values")
    if float(np.linalg.norm(values)) == 0.0:
        raise _Invalid(f"{what} is all zeros, so it points nowhere")


def _unit(embedding: tuple[float, ...]) -> NDArray[np.float32]:
    vector = np.asarray(embedding, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / np.float32(norm) if norm > 0 else vector
