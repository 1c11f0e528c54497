"""The indexer's state and search logic, synchronous and free of Trio (private to the indexer).

The actor in ``actors/indexer.py`` owns one :class:`SearchIndex` and calls it from a worker
thread; benchmarks and the quality evaluation call it directly.

Memories live in *slots* (0, 1, 2, ... in the order they were indexed). Per slot: id, type,
creation time, alive flag; the text index and every vector space are keyed by slot. Deleting
erases a memory's words and vectors at once and frees its slot for the next compaction.

Scoring (what ``alpha`` means):
  vector score = cosine between query and memory vectors, clipped to [0, 1];
  text score   = BM25 / Σ idf of the query's terms, clipped to [0, 1]: 1 means the memory contains
                 every (known) query word, 0.5 about half of the query's weight;
  score        = alpha · vector + (1 − alpha) · text, when both are asked for; with only text
                 (alpha = 0) or only a vector (alpha = 1 or no text), that one score.
Both halves are on absolute 0–1 scales (not rescaled per query), so a score means the same in
every query and across devices merging results. Ties go to the more recent memory.

Vector spaces: every memory has a vector from the built-in embedder (space ``builtin``), which
text queries use. A caller may also supply its own embedding (MCP/API); those live in a separate
space per dimension (``caller:<dim>``), because a caller's 384-dim model and ours are different
spaces even when the sizes agree. A query embedding searches the caller space of its dimension.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
from numpy.typing import NDArray

from actors._index_text import TextIndex
from actors._index_vectors import ANN_THRESHOLD, VectorSpace

#: 2: a memory may own several built-in vectors (windows of a long text). Snapshots of another
#: format are not read; the indexer reports why and the node rebuilds from the store.
SNAPSHOT_FORMAT = 2
BUILTIN = "builtin"

#: Below this many candidate memories (after filters) vectors are scanned exactly: a few ms,
#: and no risk of an approximate search missing a match hidden among filtered-out neighbours.
EXACT_SCAN_LIMIT = 20_000

#: Candidates taken from each side (vector, text) per requested result, before exact rescoring.
CANDIDATES_PER_RESULT = 4
MIN_CANDIDATES = 50


def fuse(
    vector: NDArray[np.float32], text: NDArray[np.float32], alpha: float
) -> NDArray[np.float32]:
    """The hybrid score of each candidate: a plain convex combination of the two 0–1 scores.

    Tried on benchmarks/quality.py and not kept, since none beat it by more than noise while
    each costs something: per-query min-max rescaling (+0.7 recall@10 points at alpha 0.7 with
    the model, −11 points at 0.5 with the lexical embedder, and scores no longer comparable
    across queries or devices); subtracting a per-query background cosine (no change).
    """
    combined: NDArray[np.float32] = alpha * vector + (1.0 - alpha) * text
    return combined


def caller_space(dim: int) -> str:
    return f"caller:{dim}"


def fingerprint_of(ids: Iterable[str]) -> str:
    """``"<count>:<sha256 of the sorted ids, one per line>"``: equal iff the id sets are equal.

    The store computes the same over its live memory ids to decide whether a loaded snapshot
    matches it (else: reset and re-index).
    """
    ordered = sorted(ids)
    digest = hashlib.sha256("\n".join(ordered).encode()).hexdigest()
    return f"{len(ordered)}:{digest}"


class SnapshotFormatError(ValueError):
    """A snapshot written in another format (by an older or newer dmgn)."""


@dataclass(frozen=True, slots=True)
class Entry:
    memory_id: str
    text: str
    type: str
    created_at_ns: int
    #: ``(dim,)``, or ``(windows, dim)`` for a long text embedded in several windows.
    builtin_vector: NDArray[np.float32]
    caller_vector: NDArray[np.float32] | None


@dataclass(frozen=True, slots=True)
class Scored:
    memory_id: str
    score: float
    vector_score: float
    text_score: float
    created_at_ns: int


class SearchIndex:
    """Everything the indexer knows. Single owner; not thread-safe."""

    def __init__(self, embedder: str, dim: int, ann_threshold: int = ANN_THRESHOLD) -> None:
        self.embedder = embedder
        self.dim = dim
        self.ann_threshold = ann_threshold
        self._ids: list[str] = []
        self._slot_of: dict[str, int] = {}
        self._created = np.zeros(1024, dtype=np.int64)
        self._type = np.zeros(1024, dtype=np.int16)
        self._alive = np.zeros(1024, dtype=np.bool_)
        self._type_codes: dict[str, int] = {}
        self._text = TextIndex()
        self._spaces: dict[str, VectorSpace] = {BUILTIN: VectorSpace(dim, ann_threshold)}

    # -- facts ---------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self._slot_of)

    @property
    def slots(self) -> int:
        return len(self._ids)

    @property
    def dead_slots(self) -> int:
        return self.slots - self.count

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._slot_of

    def ids(self) -> frozenset[str]:
        return frozenset(self._slot_of)

    def fingerprint(self) -> str:
        return fingerprint_of(self._slot_of)

    def spaces(self) -> dict[str, VectorSpace]:
        return dict(self._spaces)

    def nbytes(self) -> int:
        per_slot = self.slots * (8 + 2 + 1 + 80)
        return per_slot + sum(s.nbytes() for s in self._spaces.values())

    def needs_compaction(self) -> bool:
        """Dead slots cost memory and scan time; rebuild once they are a quarter of all."""
        return self.dead_slots > max(1000, self.slots // 4)

    # -- changes ---------------------------------------------------------------------------

    def add(self, entries: Sequence[Entry]) -> tuple[int, int]:
        """Index new memories; ids already indexed are left as they are (memories are
        immutable). Returns (added, already present)."""
        fresh: list[Entry] = []
        seen: set[str] = set()
        for entry in entries:
            if entry.memory_id in self._slot_of or entry.memory_id in seen:
                continue
            seen.add(entry.memory_id)
            fresh.append(entry)
        if not fresh:
            return 0, len(entries)
        first = self.slots
        self._grow(first + len(fresh))
        for offset, entry in enumerate(fresh):
            slot = first + offset
            self._ids.append(entry.memory_id)
            self._slot_of[entry.memory_id] = slot
            self._created[slot] = entry.created_at_ns
            self._type[slot] = self._type_code(entry.type)
            self._alive[slot] = True
            self._text.add(slot, entry.text)
        slots = list(range(first, first + len(fresh)))
        blocks = [np.atleast_2d(e.builtin_vector) for e in fresh]
        owners = [slot for slot, block in zip(slots, blocks, strict=True) for _ in block]
        self._spaces[BUILTIN].add(owners, np.concatenate(blocks))
        by_dim: dict[int, list[tuple[int, NDArray[np.float32]]]] = {}
        for slot, entry in zip(slots, fresh, strict=True):
            if entry.caller_vector is not None:
                by_dim.setdefault(len(entry.caller_vector), []).append((slot, entry.caller_vector))
        for dim, rows in by_dim.items():
            space = self._spaces.setdefault(caller_space(dim), VectorSpace(dim, self.ann_threshold))
            space.add([s for s, _ in rows], np.stack([v for _, v in rows]))
        return len(fresh), len(entries) - len(fresh)

    def remove(self, memory_ids: Iterable[str]) -> int:
        removed = 0
        for memory_id in memory_ids:
            slot = self._slot_of.pop(memory_id, None)
            if slot is None:
                continue
            removed += 1
            self._ids[slot] = ""
            self._alive[slot] = False
            self._created[slot] = 0
            self._type[slot] = 0
            self._text.remove(slot)
            for space in self._spaces.values():
                space.remove(slot)
        return removed

    def compacted(self) -> SearchIndex:
        """A fresh index holding only live memories (slots renumbered, graphs rebuilt)."""
        fresh = SearchIndex(self.embedder, self.dim, self.ann_threshold)
        live = np.flatnonzero(self._alive[: self.slots])
        fresh._grow(len(live))
        for new_slot, old_slot in enumerate(live.tolist()):
            memory_id = self._ids[old_slot]
            fresh._ids.append(memory_id)
            fresh._slot_of[memory_id] = new_slot
            fresh._created[new_slot] = self._created[old_slot]
            fresh._type[new_slot] = fresh._type_code(self._type_name(int(self._type[old_slot])))
            fresh._alive[new_slot] = True
            fresh._text.add_counts(new_slot, self._text.doc_counts(old_slot))
        new_of_old = {int(old): new for new, old in enumerate(live.tolist())}
        for name, space in self._spaces.items():
            vectors, owners = space.rows_of(live)
            target = VectorSpace(space.dim, self.ann_threshold)
            target.add([new_of_old[s] for s in owners], vectors)
            if target.rows or name == BUILTIN:
                fresh._spaces[name] = target
        return fresh

    # -- search ----------------------------------------------------------------------------

    def search(
        self,
        *,
        text: str | None,
        query_vector: NDArray[np.float32] | None,
        space: str,
        alpha: float,
        limit: int,
        types: frozenset[str] | None = None,
        after_ns: int | None = None,
        before_ns: int | None = None,
        only_ids: frozenset[str] | None = None,
    ) -> list[Scored]:
        n = self.slots
        mask = self._filter(types, after_ns, before_ns, only_ids)
        n_candidates = int(mask.sum())
        if n_candidates == 0:
            return []
        pool = max(limit * CANDIDATES_PER_RESULT, MIN_CANDIDATES)
        use_text = text is not None and alpha < 1.0
        use_vector = query_vector is not None and (alpha > 0.0 or text is None)
        if not use_text and not use_vector:
            use_vector = query_vector is not None
            use_text = not use_vector and text is not None

        candidates: list[NDArray[np.int64]] = []
        text_scores: NDArray[np.float32] | None = None
        if use_text and text is not None:
            raw, ideal = self._text.scores(text, n)
            if ideal > 0:
                text_scores = np.minimum(raw / np.float32(ideal), np.float32(1.0))
                text_scores[~mask] = 0.0
                positive = np.flatnonzero(text_scores > 0)
                if len(positive) > pool:
                    part = np.argpartition(-text_scores[positive], pool)[:pool]
                    positive = positive[part]
                candidates.append(positive.astype(np.int64))
            else:
                text_scores = np.zeros(n, dtype=np.float32)
        vector_space = self._spaces.get(space) if use_vector else None
        if vector_space is not None and query_vector is not None:
            slots, _ = self._nearest(vector_space, query_vector, mask, n_candidates, pool)
            candidates.append(slots)
        if not candidates:
            return []
        chosen = np.unique(np.concatenate(candidates))
        if len(chosen) == 0:
            return []
        if vector_space is not None and query_vector is not None:
            best, _ = vector_space.best_scores(chosen, query_vector)
            vscores = np.clip(best, 0.0, 1.0).astype(np.float32)
        else:
            vscores = np.zeros(len(chosen), dtype=np.float32)
        tscores = (
            text_scores[chosen]
            if text_scores is not None
            else np.zeros(len(chosen), dtype=np.float32)
        )
        if use_vector and use_text:
            combined = fuse(vscores, tscores, alpha)
        elif use_vector:
            combined = vscores
        else:
            combined = tscores
        keep = combined > 0
        chosen, combined, vscores, tscores = (
            chosen[keep],
            combined[keep],
            vscores[keep],
            tscores[keep],
        )
        created = self._created[chosen]
        order = np.lexsort((-created, -np.round(combined, 6)))[:limit]
        return [
            Scored(
                self._ids[int(chosen[i])],
                float(combined[i]),
                float(vscores[i]),
                float(tscores[i]),
                int(created[i]),
            )
            for i in order
        ]

    def _nearest(
        self,
        space: VectorSpace,
        query: NDArray[np.float32],
        mask: NDArray[np.bool_],
        n_candidates: int,
        pool: int,
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        everything = n_candidates == self.count
        if space.is_approximate and n_candidates > EXACT_SCAN_LIMIT:
            # Filters remove a share of the neighbours: ask for proportionally more.
            widen = math.ceil(space.live_rows / max(n_candidates, 1))
            slots, sims = space.approximate(query, min(pool * widen, 4096))
            passing = mask[slots]
            if passing.sum() >= min(pool, n_candidates) or everything:
                return slots[passing], sims[passing]
        return space.exact(query, None if everything else mask, pool)

    def _filter(
        self,
        types: frozenset[str] | None,
        after_ns: int | None,
        before_ns: int | None,
        only_ids: frozenset[str] | None,
    ) -> NDArray[np.bool_]:
        n = self.slots
        mask = self._alive[:n].copy()
        if types is not None:
            codes = [self._type_codes[t] for t in types if t in self._type_codes]
            mask &= np.isin(self._type[:n], np.array(codes, dtype=np.int16))
        if after_ns is not None:
            mask &= self._created[:n] > after_ns
        if before_ns is not None:
            mask &= self._created[:n] < before_ns
        if only_ids is not None:
            allowed = np.zeros(n, dtype=np.bool_)
            slots = [self._slot_of[i] for i in only_ids if i in self._slot_of]
            allowed[slots] = True
            mask &= allowed
        return mask

    # -- snapshot ----------------------------------------------------------------------------

    def to_snapshot(self) -> bytes:
        """Everything needed to answer queries again without re-embedding, as msgpack.

        Dead slots are written as empty ids; their words and vectors were erased on delete.
        """
        n = self.slots
        terms: list[str] = []
        term_of: dict[str, int] = {}
        doc_offsets = array("q", [0])
        doc_terms = array("i")
        doc_tfs = array("i")
        for slot in range(n):
            for term, tf in self._text.doc_counts(slot):
                code = term_of.get(term)
                if code is None:
                    code = term_of[term] = len(terms)
                    terms.append(term)
                doc_terms.append(code)
                doc_tfs.append(tf)
            doc_offsets.append(len(doc_terms))
        spaces = {
            name: {"dim": space.dim, **space.to_bytes()} for name, space in self._spaces.items()
        }
        state = {
            "format": SNAPSHOT_FORMAT,
            "embedder": self.embedder,
            "dim": self.dim,
            "ids": self._ids,
            "created": self._created[:n].tobytes(),
            "type": self._type[:n].tobytes(),
            "types": sorted(self._type_codes, key=self._type_codes.__getitem__),
            "terms": terms,
            "doc_offsets": doc_offsets.tobytes(),
            "doc_terms": doc_terms.tobytes(),
            "doc_tfs": doc_tfs.tobytes(),
            "spaces": spaces,
        }
        packed: bytes = msgpack.packb(state, use_bin_type=True)
        return packed

    @classmethod
    def from_snapshot(cls, data: bytes, ann_threshold: int = ANN_THRESHOLD) -> SearchIndex:
        state = msgpack.unpackb(data, raw=False)
        if state.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotFormatError(
                f"the index snapshot has format {state.get('format')!r}, this dmgn reads "
                f"format {SNAPSHOT_FORMAT}"
            )
        index = cls(state["embedder"], int(state["dim"]), ann_threshold)
        ids: list[str] = state["ids"]
        n = len(ids)
        index._grow(n)
        index._ids = list(ids)
        index._slot_of = {memory_id: slot for slot, memory_id in enumerate(ids) if memory_id}
        index._created[:n] = np.frombuffer(state["created"], dtype=np.int64)
        index._type[:n] = np.frombuffer(state["type"], dtype=np.int16)
        index._type_codes = {name: code for code, name in enumerate(state["types"])}
        index._alive[:n] = np.array([bool(i) for i in ids], dtype=np.bool_)
        terms: list[str] = state["terms"]
        offsets = np.frombuffer(state["doc_offsets"], dtype=np.int64)
        doc_terms = np.frombuffer(state["doc_terms"], dtype=np.int32)
        doc_tfs = np.frombuffer(state["doc_tfs"], dtype=np.int32)
        for slot in range(n):
            if not ids[slot]:
                continue
            lo, hi = int(offsets[slot]), int(offsets[slot + 1])
            index._text.add_counts(
                slot,
                zip(
                    [terms[t] for t in doc_terms[lo:hi].tolist()],
                    doc_tfs[lo:hi].tolist(),
                    strict=True,
                ),
            )
        index._spaces = {
            name: VectorSpace.from_bytes(int(s["dim"]), s, ann_threshold)
            for name, s in state["spaces"].items()
        }
        builtin = index._spaces.get(BUILTIN)
        if (
            builtin is None
            or builtin.live_slots != index.count
            or not all(builtin.has(slot) for slot in index._slot_of.values())
        ):
            raise ValueError("index snapshot is inconsistent: built-in vectors do not match ids")
        return index

    # -- internals ---------------------------------------------------------------------------

    def _type_code(self, name: str) -> int:
        code = self._type_codes.get(name)
        if code is None:
            code = self._type_codes[name] = len(self._type_codes)
        return code

    def _type_name(self, code: int) -> str:
        for name, value in self._type_codes.items():
            if value == code:
                return name
        return ""

    def _grow(self, size: int) -> None:
        if size <= len(self._alive):
            return
        capacity = max(size, 2 * len(self._alive))
        for attr in ("_created", "_type", "_alive"):
            old = getattr(self, attr)
            new = np.zeros(capacity, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, attr, new)
