"""The model's two backends give the same vectors; threads are set, never left to defaults."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from dmgn.embedding import (
    EmbedderUnavailable,
    MiniLMEmbedder,
)

SENTENCES = [
    "I finally adopted a beagle puppy from the shelter last weekend.",
    "the meeting moved to Thursday at 3pm",
    "Ünïcödé テスト 漢字 and emoji 🎉",
    "",
    "word " * 400,  # longer than the model's 256 word pieces
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def onnx_model(cache_dir: Path) -> MiniLMEmbedder:
    return MiniLMEmbedder(backend="onnxruntime", cache_dir=cache_dir, threads=1)


@pytest.fixture(scope="module")
def numpy_model() -> MiniLMEmbedder:
    # One thread: tests share the cores with other work, where BLAS threads only wait.
    return MiniLMEmbedder(backend="numpy", threads=1)


def test_onnx_vectors_match_numpy_within_1e_5_cosine(
    onnx_model: MiniLMEmbedder, numpy_model: MiniLMEmbedder
) -> None:
    assert (onnx_model.backend, numpy_model.backend) == ("onnxruntime", "numpy")
    assert onnx_model.name == numpy_model.name  # same vector space: snapshots stay valid
    for texts in (SENTENCES, SENTENCES[:1]):  # a batch and a single text
        a, b = onnx_model.embed(texts), numpy_model.embed(texts)
        cosines = np.sum(a * b, axis=1)
        assert np.all(cosines >= 1 - 1e-5), cosines
    long_text = " ".join(f"sentence {i} tells of topic {i % 13}." for i in range(40))
    (a, owners_a), (b, owners_b) = (
        onnx_model.embed_windows([long_text, "short"]),
        numpy_model.embed_windows([long_text, "short"]),
    )
    assert owners_a == owners_b and owners_a.count(0) > 2 and owners_a.count(1) == 1
    assert np.all(np.sum(a * b, axis=1) >= 1 - 1e-5)


def test_the_built_graph_is_cached_private_and_reused(
    onnx_model: MiniLMEmbedder, cache_dir: Path
) -> None:
    (graph,) = cache_dir.glob("*.onnx")
    assert stat.S_IMODE(graph.stat().st_mode) == 0o600
    before = graph.stat().st_mtime_ns
    again = MiniLMEmbedder(backend="onnxruntime", cache_dir=cache_dir)
    assert graph.stat().st_mtime_ns == before  # loaded, not rebuilt
    assert np.allclose(again.embed(["hello"]), onnx_model.embed(["hello"]), atol=1e-6)


def test_the_batch_session_is_made_by_the_first_batch_with_its_threads(
    onnx_model: MiniLMEmbedder, cache_dir: Path
) -> None:
    model = MiniLMEmbedder(backend="onnxruntime", cache_dir=cache_dir, threads=2)
    sessions = model._onnx
    assert sessions is not None
    single = model.embed(["one text"])
    assert sessions._batch is None  # single texts never needed it (~0.2 s and ~90 MB saved)
    batch = model.embed(["one text", "and another"])
    assert sessions._batch is not None and sessions._batch is not sessions._single
    assert sessions._batch.get_session_options().intra_op_num_threads == 2
    assert np.allclose(batch[0], single[0], atol=1e-6)
    assert np.allclose(batch, onnx_model.embed(["one text", "and another"]), atol=1e-6)


def test_a_damaged_cached_graph_is_replaced(
    onnx_model: MiniLMEmbedder, cache_dir: Path, tmp_path: Path
) -> None:
    (good,) = cache_dir.glob("*.onnx")
    graph = tmp_path / good.name
    graph.write_bytes(b"not a model")
    # auto: falls back to numpy for this run, and drops the bad file so the next start rebuilds
    fallback = MiniLMEmbedder(backend="auto", cache_dir=tmp_path)
    assert fallback.backend == "numpy" and "onnxruntime unavailable" in fallback.backend_detail
    assert not graph.exists()
    rebuilt = MiniLMEmbedder(backend="onnxruntime", cache_dir=tmp_path)
    assert rebuilt.backend == "onnxruntime"
    assert graph.read_bytes() == good.read_bytes()  # the build is deterministic
    assert np.allclose(rebuilt.embed(["x y"]), onnx_model.embed(["x y"]), atol=1e-6)


def test_forcing_onnxruntime_when_it_cannot_load_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(EmbedderUnavailable, match="onnxruntime package is not installed"):
        MiniLMEmbedder(backend="onnxruntime", cache_dir=tmp_path)
    assert MiniLMEmbedder(cache_dir=tmp_path).backend == "numpy"  # auto falls back
    with pytest.raises(EmbedderUnavailable, match="backend 'tpu' is unknown"):
        MiniLMEmbedder(backend="tpu")


def test_numpy_backend_uses_one_blas_thread_per_single_text_and_n_per_batch(
    numpy_model: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_forward = numpy_model._forward

    def spy(ids: Any, mask: Any) -> Any:
        seen.append(max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"))
        return real_forward(ids, mask)

    monkeypatch.setattr(numpy_model, "_forward", spy)
    monkeypatch.setattr(numpy_model, "_threads", 2)
    numpy_model.embed(["one text"])
    numpy_model.embed(["two", "texts"])
    assert seen == [1, 2]


def test_embed_threads_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmgn.embedding import batch_threads

    monkeypatch.setenv("DMGN_EMBED_THREADS", "3")
    assert batch_threads() == 3
    monkeypatch.setenv("DMGN_EMBED_THREADS", "lots")
    with pytest.raises(EmbedderUnavailable, match="not a whole number"):
        batch_threads()
    monkeypatch.delenv("DMGN_EMBED_THREADS")
    assert 1 <= batch_threads() <= max(1, min(4, os.cpu_count() or 1))


def test_windows_are_whole_sentences_overlapping_and_bounded(
    onnx_model: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dmgn.embedding as embedding

    sentences = [f"Sentence number {i} is about topic {i * 7}." for i in range(60)]
    text = " ".join(sentences)
    windows = onnx_model.windows(text)
    tok = onnx_model._full
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert len(windows) > 3
    decoded = []
    for window in windows:
        assert window[0] == cls and window[-1] == sep and len(window) <= embedding.WINDOW_TOKENS
        decoded.append(tok.decode(window[1:-1]))
    for before, after in itertools.pairwise(decoded):
        assert before.endswith(".") and after.endswith(".")  # cut between sentences
        shared = before.split(". ")[-1]
        assert after.startswith(shared)  # the next window repeats the last sentence
    every = " ".join(decoded)
    assert all(s.lower() in every for s in sentences)  # nothing left out

    # A text that fits the model gets one row; a longer one its first 256 pieces plus windows.
    vectors, owners = onnx_model.embed_windows([text, "short"])
    assert owners == [0] * (1 + len(windows)) + [1]
    assert np.allclose(vectors[0], onnx_model.embed([text])[0], atol=1e-6)
    monkeypatch.setattr(embedding, "MAX_WINDOWS", 3)
    assert len(onnx_model.windows(text)) == 3
    one_long_sentence = "word " * 1000
    assert all(len(w) <= embedding.WINDOW_TOKENS for w in onnx_model.windows(one_long_sentence))
