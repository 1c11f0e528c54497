"""The lexical embedder's vectors are persisted (index snapshots), so a faster implementation
must give the very same bytes: checked against the original one, inlined here."""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from collections.abc import Sequence

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as hs

from dmgn.embedding import HashingEmbedder

_WORD = re.compile(r"\w+", re.UNICODE)


def reference(texts: Sequence[str], dim: int) -> np.ndarray:
    """HashingEmbedder.embed as first written (one feature at a time, numpy scalar adds)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        features: dict[int, float] = {}

        def add(token: str, weight: float, features: dict[int, float] = features) -> None:
            code = zlib.crc32(token.encode("utf-8"))
            features[code] = features.get(code, 0.0) + weight

        for word in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
            add(word, 1.0)
            padded = f"<{word}>"
            grams = [padded[i : i + n] for n in (3, 4, 5) for i in range(len(padded) - n + 1)]
            if grams:
                share = 0.5 / math.sqrt(len(grams))
                for gram in grams:
                    add("#" + gram, share)
        for code, weight in features.items():
            sign = 1.0 if code & 0x80000000 else -1.0
            out[row, code % dim] += sign * math.log1p(abs(weight))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (out / norms).astype(np.float32, copy=False)


WORDS = hs.text(alphabet="abcdeéßøﬁ漢字аб0_", min_size=0, max_size=12)
TEXTS = hs.lists(WORDS, max_size=40).map(" ".join) | hs.text(max_size=300)


@settings(max_examples=200, deadline=None)
@given(hs.lists(TEXTS, min_size=1, max_size=8), hs.sampled_from([16, 384, 1000]))
def test_hashing_vectors_are_byte_identical_to_the_original(texts: list[str], dim: int) -> None:
    embedder = HashingEmbedder(dim)
    assert embedder.embed(texts).tobytes() == reference(texts, dim).tobytes()
    # The word cache gives the same answer the second time, and for repeated words.
    assert embedder.embed(texts * 2).tobytes() == reference(texts * 2, dim).tobytes()
