"""The indexer's vector side: faiss indexes per vector space (private to the indexer).

A space holds vectors of one embedder (the built-in one, or callers' vectors of one dimension).
Rows are appended; ``row_slot`` maps a row to the indexer's slot. A slot may own several
consecutive rows (a long memory embedded in overlapping windows); it then scores as its best
row, so a query finds the window that holds the fact.

* Storage of record, and exact search: a faiss ``IndexFlatIP``. Its vectors are scanned through
  a numpy view with ``einsum`` rather than ``IndexFlatIP.search``: same algorithm, but faiss'
  OpenMP pool made one query 10x slower (2.8 → 29 ms at 10k) on the project's 2-core machines.
* Past :data:`ANN_THRESHOLD` rows, candidates come from an IVF index with 8-bit scalar-quantised
  codes (``IndexIVFScalarQuantizer``), and the best of them are re-scored exactly from the flat
  storage, so quantisation never changes a returned score. Why IVF and not HNSW (measured on the
  benchmark's 100k memories, hashed 384-dim vectors, one thread):

      HNSW M=32 efC=128: build 103 s (970/s); recall@10 0.89 @ ef=400, 0.95 @ ef=1200 (5.9 ms)
      IVF-SQ8 nlist=512 nprobe=64 + exact re-score: train 4 s, add 1.2 s; recall@10 0.97, 1.7 ms

  IVF also deletes for real (``remove_ids``), where an HNSW graph can only hide a node.
  The coarse centroids are trained on the vectors present when the space crosses the threshold
  and re-trained each time it has grown 4x since, so they follow what is stored.

Deleting erases every row of a slot: its vectors are zeroed in the flat storage and their codes
removed from the IVF lists; the rows' slot becomes -1. When too many rows are dead the indexer
rebuilds the space.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

#: Rows past which a space adds an IVF index. Below it an exact scan is ~2.5 ms (10k × 384) and
#: needs no training; 20k rows are also enough to train 256–512 centroids.
ANN_THRESHOLD = 20_000

#: Retrain the IVF centroids when the space has grown this many times since the last training.
RETRAIN_GROWTH = 4

#: Candidates fetched from the IVF index per wanted result, before exact re-scoring.
RESCORE_FACTOR = 4
MIN_RESCORE = 50

#: k-means sample per centroid: faiss warns below 39 (and cannot train with fewer points than
#: lists); more than 64 adds training time, not quality.
MIN_TRAINING_POINTS_PER_LIST = 39
TRAINING_POINTS_PER_LIST = 64


def ivf_lists(rows: int) -> int:
    """Coarse lists for ``rows`` vectors: the power of two nearest 2·√rows, within [64, 4096]."""
    target = max(64.0, min(4096.0, 2.0 * math.sqrt(rows)))
    return int(2 ** round(math.log2(target)))


def ivf_probes(lists: int) -> int:
    """Lists visited per query: an eighth of them (recall@10 ≥ 0.95 in the benchmark)."""
    return max(16, lists // 8)


class VectorSpace:
    """Vectors of one dimension, rows → slots, exact or IVF. One owner, not thread-safe."""

    def __init__(self, dim: int, ann_threshold: int = ANN_THRESHOLD) -> None:
        self.dim = dim
        self.ann_threshold = ann_threshold
        # faiss' stubs do not know the subclasses' members (get_xb, nprobe, ...).
        self._flat: Any = faiss.IndexFlatIP(dim)
        self._ivf: Any = None
        self._trained_at = 0
        self._ivf_quantizer: Any = None  # an IVF index borrows its quantizer; keep it alive
        self._row_slot = array("i")
        #: slot -> (first row, number of rows); a slot's rows are always consecutive.
        self._slot_rows: dict[int, tuple[int, int]] = {}
        #: rows beyond the first of their slot (0 when every slot has one vector).
        self._extra_rows = 0
        self.dead_rows = 0

    @property
    def kind(self) -> str:
        return "flat" if self._ivf is None else f"ivf{self._ivf.nlist}-sq8"

    @property
    def is_approximate(self) -> bool:
        return self._ivf is not None

    @property
    def rows(self) -> int:
        return int(self._flat.ntotal)

    @property
    def live_rows(self) -> int:
        return self.rows - self.dead_rows

    @property
    def live_slots(self) -> int:
        return len(self._slot_rows)

    def nbytes(self) -> int:
        codes = 0 if self._ivf is None else int(self._ivf.ntotal) * (self.dim + 8)
        return self.rows * self.dim * 4 + codes + len(self._row_slot) * 4

    def add(self, slots: list[int], vectors: NDArray[np.float32]) -> None:
        """Append ``vectors``, row ``i`` owned by ``slots[i]``; a slot's rows must be
        consecutive and new (memories are immutable, so a slot is never extended)."""
        if not slots:
            return
        _one_thread()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        first = self.rows
        self._flat.add(vectors)
        for offset, slot in enumerate(slots):
            self._row_slot.append(slot)
            span = self._slot_rows.get(slot)
            if span is None:
                self._slot_rows[slot] = (first + offset, 1)
            else:
                self._slot_rows[slot] = (span[0], span[1] + 1)
                self._extra_rows += 1
        if self._ivf is None:
            if self.rows > self.ann_threshold:
                self._train_ivf()
        elif self.rows >= RETRAIN_GROWTH * self._trained_at:
            self._train_ivf()
        else:
            self._ivf.add_with_ids(vectors, np.arange(first, self.rows, dtype=np.int64))

    def has(self, slot: int) -> bool:
        return slot in self._slot_rows

    def remove(self, slot: int) -> None:
        span = self._slot_rows.pop(slot, None)
        if span is None:
            return
        first, count = span
        rows = np.arange(first, first + count, dtype=np.int64)
        self._storage()[first : first + count] = 0.0
        if self._ivf is not None:
            self._ivf.remove_ids(rows)
        for row in range(first, first + count):
            self._row_slot[row] = -1
        self.dead_rows += count
        self._extra_rows -= count - 1

    def rows_of(self, slots: NDArray[np.int64]) -> tuple[NDArray[np.float32], list[int]]:
        """Every stored vector of ``slots`` (in order) and the slot owning each row; slots
        without vectors contribute nothing."""
        spans = [self._slot_rows.get(int(s)) for s in slots]
        rows = [r for span in spans if span for r in range(span[0], span[0] + span[1])]
        owners = [
            int(s) for s, span in zip(slots, spans, strict=True) if span for _ in range(span[1])
        ]
        vectors = (
            self._storage()[np.array(rows, dtype=np.int64)]
            if rows
            else np.zeros((0, self.dim), np.float32)
        )
        return np.ascontiguousarray(vectors), owners

    def best_scores(
        self, slots: NDArray[np.int64], query: NDArray[np.float32]
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Each slot's best cosine with ``query`` over its rows (0 where it has none), and
        which slots had vectors."""
        scores = np.zeros(len(slots), dtype=np.float32)
        present = np.zeros(len(slots), dtype=np.bool_)
        if not len(slots):
            return scores, present
        spans = [self._slot_rows.get(int(s)) for s in slots]
        storage = self._storage()
        if self._extra_rows == 0:
            rows = np.fromiter((sp[0] if sp else -1 for sp in spans), np.int64, len(slots))
            present = rows >= 0
            if present.any():
                scores[present] = np.einsum("ij,j->i", storage[rows[present]], query)
            return scores, present
        for i, span in enumerate(spans):
            if span is not None:
                present[i] = True
                first, count = span
                scores[i] = float(np.max(storage[first : first + count] @ query))
        return scores, present

    def exact(
        self, query: NDArray[np.float32], slot_mask: NDArray[np.bool_] | None, k: int
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
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
        # einsum, not `@`: a matrix-vector product is memory-bound, and BLAS' thread pool
        # only adds wake-up latency (2x slower, with 30 ms outliers, on 2 cores).
        matrix = storage if len(rows) == self.rows else storage[rows]
        sims = np.einsum("ij,j->i", matrix, query)
        if self._extra_rows == 0:
            top = _top_k(sims, k)
            return row_slot[rows[top]], sims[top]
        return _best_per_slot(row_slot[rows], sims, k, self._extra_rows)

    def approximate(
        self, query: NDArray[np.float32], k: int
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Top-``k`` (slots, exact cosines) from IVF candidates; exact search while small."""
        if self._ivf is None:
            return self.exact(query, None, k)
        _one_thread()
        fetch = max(k * RESCORE_FACTOR, MIN_RESCORE)
        if self._extra_rows:  # several rows per slot: fetch enough rows for k distinct slots
            fetch = math.ceil(fetch * self.live_rows / max(1, self.live_slots))
        _, found = self._ivf.search(query.reshape(1, -1), min(fetch, self.rows))
        rows = found[0][found[0] >= 0]
        if len(rows) == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        sims = np.einsum("ij,j->i", self._storage()[rows], query)
        slots = np.frombuffer(self._row_slot, dtype=np.int32)[rows].astype(np.int64)
        live = slots >= 0
        if self._extra_rows == 0:
            top = _top_k(sims[live], k)
            return slots[live][top], sims[live][top]
        return _best_per_slot(slots[live], sims[live], k, self._extra_rows)

    # -- snapshot ----------------------------------------------------------------------------

    def to_bytes(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "flat": faiss.serialize_index(self._flat).tobytes(),
            "row_slot": self._row_slot.tobytes(),
            "trained_at": self._trained_at,
        }
        if self._ivf is not None:
            state["ivf"] = faiss.serialize_index(self._ivf).tobytes()
        return state

    @classmethod
    def from_bytes(
        cls, dim: int, state: dict[str, Any], ann_threshold: int = ANN_THRESHOLD
    ) -> VectorSpace:
        space = cls(dim, ann_threshold)
        space._flat = faiss.deserialize_index(np.frombuffer(state["flat"], dtype=np.uint8))
        if space._flat.d != dim:
            raise ValueError(f"snapshot vectors have {space._flat.d} dimensions, expected {dim}")
        if "ivf" in state:
            space._ivf = faiss.deserialize_index(np.frombuffer(state["ivf"], dtype=np.uint8))
            space._ivf.nprobe = ivf_probes(space._ivf.nlist)
        space._trained_at = int(state["trained_at"])
        space._row_slot = array("i")
        space._row_slot.frombytes(state["row_slot"])
        if len(space._row_slot) != space._flat.ntotal:
            raise ValueError("snapshot vectors and their row map disagree")
        for row, slot in enumerate(space._row_slot):
            if slot < 0:
                space.dead_rows += 1
                continue
            span = space._slot_rows.get(slot)
            if span is None:
                space._slot_rows[slot] = (row, 1)
            elif span[0] + span[1] == row:
                space._slot_rows[slot] = (span[0], span[1] + 1)
                space._extra_rows += 1
            else:
                raise ValueError("snapshot vectors of one memory are not consecutive")
        return space

    # -- internals ---------------------------------------------------------------------------

    def _storage(self) -> NDArray[np.float32]:
        """A writable numpy view of the flat index's vectors (valid until the next add)."""
        n = self.rows
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        view: NDArray[np.float32] = faiss.rev_swig_ptr(self._flat.get_xb(), n * self.dim)
        return view.reshape(n, self.dim)

    def _train_ivf(self) -> None:
        """(Re)build the IVF index from the live rows, centroids trained on a sample of them."""
        live = np.flatnonzero(np.frombuffer(self._row_slot, dtype=np.int32) >= 0)
        lists = max(1, min(ivf_lists(len(live)), len(live) // MIN_TRAINING_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf: Any = faiss.IndexIVFScalarQuantizer(
            quantizer, self.dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        sample = live
        if len(live) > lists * TRAINING_POINTS_PER_LIST:
            rng = np.random.default_rng(len(live))  # deterministic: same data, same index
            sample = np.sort(rng.choice(live, lists * TRAINING_POINTS_PER_LIST, replace=False))
        storage = self._storage()
        ivf.train(np.ascontiguousarray(storage[sample]))
        ivf.add_with_ids(np.ascontiguousarray(storage[live]), live.astype(np.int64))
        ivf.nprobe = ivf_probes(lists)
        self._ivf = ivf
        self._ivf_quantizer = quantizer
        self._trained_at = len(live)


def _one_thread() -> None:
    """faiss' OpenMP pool costs more than it saves for single queries and small batches on
    2 cores (and spinning threads slow numpy down too). OpenMP settings are per thread, and
    Trio reuses worker threads, so this is set on every entry."""
    faiss.omp_set_num_threads(1)


def _best_per_slot(
    slots: NDArray[np.int64], sims: NDArray[np.float32], k: int, extra_rows: int
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Top-``k`` slots by their best row: rows sorted best first, then each slot's first.

    Only the best ``k + extra_rows`` rows can hold them (each row ranked above a top-k slot's
    best row is another top slot's best row or one of the extra rows), so only those are sorted.
    """
    keep = k + extra_rows
    if keep < len(sims):
        part = np.argpartition(-sims, keep)[:keep]
        slots, sims = slots[part], sims[part]
    order = np.argsort(-sims, kind="stable")
    _, first = np.unique(slots[order], return_index=True)
    best = order[np.sort(first)][:k]
    return slots[best], sims[best]


def _top_k(scores: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """Indices of the ``k`` largest scores, best first."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k)[:k]
    return part[np.argsort(-scores[part], kind="stable")]
