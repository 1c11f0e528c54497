"""all-MiniLM-L6-v2 as an ONNX graph, built here from the hash-checked safetensors weights.

Private to :mod:`dmgn.embedding`. Nothing is downloaded or exported from another framework: the
graph is written node by node with the ``onnx`` package's helper API and computes exactly what
:meth:`dmgn.embedding.MiniLMEmbedder._forward` computes in numpy (BERT encoder, erf GELU,
masked mean pooling; the caller normalises). Inputs: ``input_ids`` int64 ``(batch, width)``,
``mask`` float32 ``(batch, width)``, ``positions`` int64 ``(width,)``; output ``pooled`` float32
``(batch, dim)``.

The built graph (~90 MB, the weights as initializers) is cached by the caller, keyed by
:data:`GRAPH_VERSION` and the weights' sha256, so a change here or to the weights rebuilds it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Bump whenever the graph built below changes (the cache key includes it).
GRAPH_VERSION = 1
OPSET = 17


def build_minilm_graph(
    weights: Mapping[str, NDArray[np.float32]],
    *,
    heads: int,
    layers: int,
    eps: float,
) -> bytes:
    """The serialised ONNX model. ``weights`` are as :class:`~dmgn.embedding.MiniLMEmbedder`
    holds them: the safetensors tensors with 2-D linear weights transposed to ``(in, out)``."""
    from onnx import TensorProto, helper, numpy_helper

    dim = int(weights["embeddings.word_embeddings.weight"].shape[1])
    head_dim = dim // heads
    nodes: list[object] = []
    inits: list[object] = []
    counter = [0]

    def fresh(stem: str) -> str:
        counter[0] += 1
        return f"{stem}_{counter[0]}"

    def const(name: str, value: NDArray[np.generic]) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        out = fresh(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def linear(x: str, prefix: str) -> str:
        w = const(prefix + ".weight", weights[prefix + ".weight"])
        b = const(prefix + ".bias", weights[prefix + ".bias"])
        return node("Add", [node("MatMul", [x, w]), b])

    def layer_norm(x: str, prefix: str) -> str:
        scale = const(prefix + ".weight", weights[prefix + ".weight"])
        bias = const(prefix + ".bias", weights[prefix + ".bias"])
        return node("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)

    # Embeddings: word + position + token type 0, then LayerNorm.
    word = const("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"])
    pos = const(
        "embeddings.position_embeddings.weight", weights["embeddings.position_embeddings.weight"]
    )
    token_type = const(
        "embeddings.token_type_embeddings.weight0",
        weights["embeddings.token_type_embeddings.weight"][0],
    )
    x = node(
        "Add",
        [node("Gather", [word, "input_ids"], axis=0), node("Gather", [pos, "positions"], axis=0)],
    )
    x = layer_norm(node("Add", [x, token_type]), "embeddings.LayerNorm")

    # Additive attention bias (batch, 1, 1, width): 0 for tokens, -1e9 for padding.
    one = const("one", np.array(1.0, np.float32))
    big = const("minus_big", np.array(-1e9, np.float32))
    axes_12 = const("axes_12", np.array([1, 2], np.int64))
    bias = node("Unsqueeze", [node("Mul", [node("Sub", [one, "mask"]), big]), axes_12])
    split_shape = const("split_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, dim], np.int64))
    scale = const("scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    half = const("half", np.array(0.5, np.float32))
    inv_sqrt2 = const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))

    for n in range(layers):
        p = f"encoder.layer.{n}."
        q = node(
            "Transpose",
            [node("Reshape", [linear(x, p + "attention.self.query"), split_shape])],
            perm=[0, 2, 1, 3],
        )
        k = node(
            "Transpose",
            [node("Reshape", [linear(x, p + "attention.self.key"), split_shape])],
            perm=[0, 2, 3, 1],
        )
        v = node(
            "Transpose",
            [node("Reshape", [linear(x, p + "attention.self.value"), split_shape])],
            perm=[0, 2, 1, 3],
        )
        scores = node("Add", [node("Mul", [node("MatMul", [q, k]), scale]), bias])
        probs = node("Softmax", [scores], axis=-1)
        context = node(
            "Reshape",
            [node("Transpose", [node("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_shape],
        )
        attended = node("Add", [linear(context, p + "attention.output.dense"), x])
        x = layer_norm(attended, p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        # exact GELU: 0.5 · h · (1 + erf(h / √2))
        gelu = node(
            "Mul",
            [
                node("Mul", [h, half]),
                node("Add", [node("Erf", [node("Mul", [h, inv_sqrt2])]), one]),
            ],
        )
        x = layer_norm(node("Add", [linear(gelu, p + "output.dense"), x]), p + "output.LayerNorm")

    # Masked mean over the tokens.
    axis_2 = const("axis_2", np.array([2], np.int64))
    axis_1 = const("axis_1", np.array([1], np.int64))
    tiny = const("tiny", np.array(1e-9, np.float32))
    mask3 = node("Unsqueeze", ["mask", axis_2])
    summed = node("ReduceSum", [node("Mul", [x, mask3]), axis_1], keepdims=0)
    counts = node("Max", [node("ReduceSum", ["mask", axis_1], keepdims=1), tiny])
    nodes.append(helper.make_node("Div", [summed, counts], ["pooled"]))

    graph = helper.make_graph(
        nodes,  # type: ignore[arg-type]
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "width"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "width"]),
            helper.make_tensor_value_info("positions", TensorProto.INT64, ["width"]),
        ],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", dim])],
        initializer=inits,  # type: ignore[arg-type]
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dmgn"
    )
    model.ir_version = 8
    serialised: bytes = model.SerializeToString()
    return serialised
