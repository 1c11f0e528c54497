"""The indexer's vector side: one faiss index per vector space (private to the indexer).

A space holds vectors of one embedder (the built-in one, or callers' vectors of one dimension).
Rows are appended; ``row_slot`` maps a row to the indexer's slot. Exact search
(``IndexFlatIP``) while the space is small, HNSW past :data:`HNSW_THRESHOLD` rows: at 100k × 384
a flat scan costs ~40 ms on this project's 2-core machines, HNSW well under 1 ms.

Deleting cannot take a node out of an HNSW graph, so a deleted row's vector is overwritten with
zeros in faiss' own storage (there is no other copy): the content is gone from memory and from
the next snapshot, while the graph keeps its edges and stays navigable. A zero vector scores 0
against everything, and dead rows are filtered out of results anyway. When too many rows are
dead the indexer rebuilds the space from the live ones.
"""

from __future__ import annotations

from array import array
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

_faiss: Any = faiss  # SearchParametersHNSW is missing from faiss' stubs

#: Rows past which a space switches from exact search to HNSW. Below it a flat scan is a few ms
#: and exact; above it the scan grows linearly and HNSW's graph build has paid for itself.
HNSW_THRESHOLD = 20_000

#: HNSW graph degree. 32 (the value checked in DESIGN §11) gives recall@10 ≥ 0.95 at 100k for
#: both of our embedders with the efSearch below; 16 costs recall on the hashed vectors.
HNSW_M = 32
#: Build-time beam. faiss' default 40 is tuned for speed; 64 buys recall for a modest build cost.
HNSW_EF_CONSTRUCTION = 64
#: Query-time beam, raised per query when the caller asks for more neighbours than this.
HNSW_EF_SEARCH = 96


class VectorSpace:
    """Vectors of one dimension, rows → slots, exact or HNSW. One owner, not thread-safe."""

    def __init__(self, dim: int, hnsw_threshold: int = HNSW_THRESHOLD) -> None:
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        # faiss' stubs do not know the subclasses' members (hnsw, storage, get_xb).
        self._index: Any = faiss.IndexFlatIP(dim)
        self._row_slot = array("i")
        self._slot_row: dict[int, int] = {}
        self.dead_rows = 0

    @property
    def kind(self) -> str:
        return "hnsw" if self.is_hnsw else "flat"

    @property
    def is_hnsw(self) -> bool:
        return isinstance(self._index, faiss.IndexHNSWFlat)

    @property
    def rows(self) -> int:
        return int(self._index.ntotal)

    @property
    def live_rows(self) -> int:
        return self.rows - self.dead_rows

    def nbytes(self) -> int:
        graph = 0
        if self.is_hnsw:
            graph = int(self._index.hnsw.neighbors.size()) * 4
        return self.rows * self.dim * 4 + graph + len(self._row_slot) * 4

    def add(self, slots: list[int], vectors: NDArray[np.float32]) -> None:
        if not slots:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        first = self.rows
        self._index.add(vectors)
        for offset, slot in enumerate(slots):
            self._row_slot.append(slot)
            self._slot_row[slot] = first + offset
        if not self.is_hnsw and self.rows > self.hnsw_threshold:
            self._switch_to_hnsw()

    def has(self, slot: int) -> bool:
        return slot in self._slot_row

    def remove(self, slot: int) -> None:
        row = self._slot_row.pop(slot, None)
        if row is None:
            return
        self._storage()[row] = 0.0
        self._row_slot[row] = -1
        self.dead_rows += 1

    def vectors_of(self, slots: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Stored vectors for ``slots`` (zeros where a slot has none), and which had one."""
        rows = np.fromiter((self._slot_row.get(int(s), -1) for s in slots), dtype=np.int64,
                           count=len(slots))
        present = rows >= 0
        out = np.zeros((len(slots), self.dim), dtype=np.float32)
        if present.any():
            out[present] = self._storage()[rows[present]]
        return out, present

    def exact(self, query: NDArray[np.float32], slot_mask: NDArray[np.bool_] | None,
              k: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Exact top-``k`` (slots, cosines) among rows whose slot passes ``slot_mask``."""
        if self.rows == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        row_slot = np.frombuffer(self._row_slot, dtype=np.int32).astype(np.int64)
        keep = row_slot >= 0
        if slot_mask is not None:
            keep[keep] = slot_mask[row_slot[keep]]
        rows = np.flatnonzero(keep)
        if len(rows) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        storage = self._storage()
        sims = storage @ query if len(rows) == self.rows else storage[rows] @ query
        top = _top_k(sims, k)
        return row_slot[rows[top]], sims[top]

    def approximate(self, query: NDArray[np.float32],
                    k: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """faiss top-``k`` (slots, cosines), dead rows dropped (so possibly fewer than k)."""
        if self.rows == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        k = min(k, self.rows)
        params = None
        if self.is_hnsw:
            params = _faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, k))
        sims, rows = self._index.search(query.reshape(1, -1), k, params=params)
        rows, sims = rows[0], sims[0]
        valid = rows >= 0
        rows, sims = rows[valid], sims[valid]
        slots = np.frombuffer(self._row_slot, dtype=np.int32)[rows].astype(np.int64)
        live = slots >= 0
        return slots[live], sims[live].astype(np.float32)

    # -- snapshot ----------------------------------------------------------------------------

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(serialised faiss index, row → slot map)."""
        blob = faiss.serialize_index(self._index)
        return blob.tobytes(), self._row_slot.tobytes()

    @classmethod
    def from_bytes(cls, dim: int, index_blob: bytes, row_slot: bytes,
                   hnsw_threshold: int = HNSW_THRESHOLD) -> VectorSpace:
        space = cls(dim, hnsw_threshold)
        index = faiss.deserialize_index(np.frombuffer(index_blob, dtype=np.uint8))
        if index.d != dim:
            raise ValueError(f"snapshot vector index has {index.d} dimensions, expected {dim}")
        space._index = index
        space._row_slot = array("i")
        space._row_slot.frombytes(row_slot)
        if len(space._row_slot) != index.ntotal:
            raise ValueError("snapshot vector index and its row map disagree")
        space._slot_row = {s: r for r, s in enumerate(space._row_slot) if s >= 0}
        space.dead_rows = len(space._row_slot) - len(space._slot_row)
        return space

    # -- internals ---------------------------------------------------------------------------

    def _storage(self) -> NDArray[np.float32]:
        """A writable numpy view of faiss' vector storage (valid until the next add)."""
        flat: Any = faiss.downcast_index(self._index.storage) if self.is_hnsw else self._index
        n = int(flat.ntotal)
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        pointer = flat.get_xb()
        view: NDArray[np.float32] = faiss.rev_swig_ptr(pointer, n * self.dim).reshape(
            n, self.dim)
        return view

    def _switch_to_hnsw(self) -> None:
        vectors = np.array(self._storage(), copy=True)
        index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(vectors)
        self._index = index


def _top_k(scores: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """Indices of the ``k`` largest scores, best first."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k)[:k]
    return part[np.argsort(-scores[part], kind="stable")]
