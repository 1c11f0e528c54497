"""The indexer's text side: a tokenizer and an incremental BM25 index (private to the indexer).

Why not a library: ``bm25s`` (and ``rank_bm25``) build a static index over a whole corpus; a
memory store gains and loses single memories all day, and rebuilding 100k documents per add is
out of the question. DuckDB's ``fts`` extension is not in the wheel and cannot be downloaded here.
BM25 itself is a few lines over posting lists, so we keep postings ourselves:

* a posting list per term, ``array('i')`` of slots (ascending, since slots only grow) and their
  term frequencies; numpy reads them without copying;
* deleting a memory removes it from every posting list it appears in (binary search, then a
  memmove), so a deleted memory's words are really gone, not just hidden;
* document frequencies and the average length count live documents only.

Scoring is Okapi BM25 (k1 = 1.2, b = 0.75, Lucene's IDF ``ln(1 + (N - df + 0.5)/(df + 0.5))``).
:meth:`TextIndex.scores` also returns the score a document would get by containing every query
term once at average length (Σ idf, but at least the idf of a word only one memory contains),
which the indexer divides by to put text scores on a 0–1 scale that means "how much of the
query this memory matches", independent of corpus size.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

K1 = 1.2
B = 0.75

#: A query's terms beyond this many (the rarest are kept) add nothing but time: a pasted page
#: as a query still returns in milliseconds.
MAX_QUERY_TERMS = 64

_WORD = re.compile(r"\w+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")

# Common English function words: they match nearly every memory, so they only add noise and
# inflate the normalisation of short questions ("what did I say about ...").
_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    s t don ll m re ve d o y""".split()  # noqa: SIM905 (a word list reads better as prose)
)


def _stem(word: str) -> str:
    """A deliberately light suffix stripper: plurals, -ing, -ed. Predictable over clever: it must
    never merge unrelated words, it only has to meet "dogs"/"dog" and "adopted"/"adopt"."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        return word[:-3]
    if word.endswith("ed") and len(word) > 4:
        return word[:-2]
    return word


def tokenize(text: str) -> list[str]:
    """Words → NFKC, case-folded, stop words dropped, lightly stemmed. Runs of CJK characters
    (no spaces between words) become overlapping character bigrams, the usual trick."""
    tokens: list[str] = []
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).casefold()):
        if _CJK.search(word):
            chars = [c for c in word if _CJK.match(c)]
            tokens.extend(
                chars if len(chars) == 1 else [a + b for a, b in itertools.pairwise(chars)]
            )
            rest = _CJK.sub(" ", word).split()
            tokens.extend(_stem(w) for w in rest if w not in _STOPWORDS)
        elif word not in _STOPWORDS:
            tokens.append(_stem(word))
    return tokens


class TextIndex:
    """BM25 over slots (small integers the indexer assigns). Not thread-safe: one owner."""

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self._terms: list[str] = []
        self._post_slots: list[array[int]] = []
        self._post_tfs: list[array[int]] = []
        self._doc_terms: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._doc_len = np.zeros(1024, dtype=np.float32)
        self._total_len = 0
        self._capacity_slots = 0

    @property
    def documents(self) -> int:
        return len(self._doc_terms)

    @property
    def vocabulary(self) -> int:
        return len(self._terms)

    def add(self, slot: int, text: str) -> None:
        """Index ``text`` under ``slot``; slots must be added in increasing order."""
        counts = Counter(tokenize(text))
        self.add_counts(slot, counts.items())

    def add_counts(self, slot: int, counts: Iterable[tuple[str, int]]) -> None:
        term_ids: list[int] = []
        tfs: list[int] = []
        for term, tf in counts:
            term_id = self._vocab.get(term)
            if term_id is None:
                term_id = len(self._terms)
                self._vocab[term] = term_id
                self._terms.append(term)
                self._post_slots.append(array("i"))
                self._post_tfs.append(array("i"))
            self._post_slots[term_id].append(slot)
            self._post_tfs[term_id].append(tf)
            term_ids.append(term_id)
            tfs.append(tf)
        length = sum(tfs)
        self._ensure_slot(slot)
        self._doc_len[slot] = length
        self._total_len += length
        self._doc_terms[slot] = (tuple(term_ids), tuple(tfs))

    def remove(self, slot: int) -> None:
        """Erase a document: out of every posting list, lengths and counts updated."""
        entry = self._doc_terms.pop(slot, None)
        if entry is None:
            return
        for term_id in entry[0]:
            slots = self._post_slots[term_id]
            at = bisect.bisect_left(slots, slot)
            if at < len(slots) and slots[at] == slot:
                del slots[at]
                del self._post_tfs[term_id][at]
        self._total_len -= int(self._doc_len[slot])
        self._doc_len[slot] = 0

    def doc_counts(self, slot: int) -> list[tuple[str, int]]:
        """A document's (term, tf) pairs: what a snapshot keeps to rebuild postings."""
        term_ids, tfs = self._doc_terms.get(slot, ((), ()))
        return [(self._terms[t], tf) for t, tf in zip(term_ids, tfs, strict=True)]

    def scores(self, query: str, slots: int) -> tuple[NDArray[np.float32], float]:
        """Dense BM25 scores over ``slots`` slots, and what a full match scores: Σ idf of the
        query's known terms, at least the idf of a word that only one memory contains."""
        out = np.zeros(slots, dtype=np.float32)
        n_docs = self.documents
        if n_docs == 0:
            return out, 0.0
        known = {self._vocab[t] for t in tokenize(query) if t in self._vocab}
        weighted = []
        for term_id in known:
            df = len(self._post_slots[term_id])
            if df:
                weighted.append((math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5)), term_id))
        weighted.sort(reverse=True)
        weighted = weighted[:MAX_QUERY_TERMS]
        avgdl = max(self._total_len / n_docs, 1.0)
        for idf, term_id in weighted:
            post = np.frombuffer(self._post_slots[term_id], dtype=np.int32)
            post = post[post < slots]
            tf = np.frombuffer(self._post_tfs[term_id], dtype=np.int32)[: len(post)]
            tf = tf.astype(np.float32)
            norm = K1 * (1.0 - B + B * self._doc_len[post] / avgdl)
            out[post] += np.float32(idf) * tf * (K1 + 1.0) / (tf + norm)
        # A full text score needs at least the evidence of one word found in a single memory:
        # a query of common words only ("where do I work") must not reach 1 by matching them.
        rarest = math.log(1.0 + (n_docs - 1 + 0.5) / (1 + 0.5))
        ideal = sum(idf for idf, _ in weighted)
        return out, max(ideal, rarest) if weighted else 0.0

    def _ensure_slot(self, slot: int) -> None:
        if slot >= len(self._doc_len):
            grown = np.zeros(max(slot + 1, 2 * len(self._doc_len)), dtype=np.float32)
            grown[: len(self._doc_len)] = self._doc_len
            self._doc_len = grown
