"""ONNX models with the WD tagger contract, built locally for tests, the benchmark and offline demos.

`linear` is exactly predictable: probabilities = sigmoid(mean(BGR)/255 @ W + b), so tests can check
the whole pipeline against numpy. `conv` and `vit` are stand-ins with a real tagger's cost: `vit` at
dim 768, depth 12, patch 16 has the FLOPs of ViT-B/16 at 448 px, the architecture of
wd-vit-tagger-v3 (random weights, so its tags mean nothing). Needs the `onnx` package (a test extra).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def write_tags_csv(path: Path, names: list[str], categories: list[int]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (n, c) in enumerate(zip(names, categories)):
            w.writerow([i, n, c, 1000 - i])


class _Graph:
    """Just enough of a graph builder to keep the model definitions readable."""

    def __init__(self, seed: int) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.inits: list = []
        self.rng = np.random.default_rng(seed)
        self._n = 0

    def const(self, value: np.ndarray, name: str | None = None) -> str:
        self._n += 1
        name = name or f"w{self._n}"
        self.inits.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def random(self, shape: tuple[int, ...], std: float) -> str:
        return self.const(self.rng.normal(0, std, shape).astype(np.float32))

    def op(self, kind: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"t{self._n}"
        self.nodes.append(self.helper.make_node(kind, list(inputs), [out], **attrs))
        return out


def _conv_trunk(g: _Graph, x: str, width: int, depth: int) -> tuple[str, int]:
    channels = 3
    for i in range(depth):
        out_c = width * (2 ** min(i, 2))
        stride, k = (4, 4) if i == 0 else (2 if i < 4 else 1, 3)
        w = g.random((out_c, channels, k, k), (2 / (channels * k * k)) ** 0.5)
        x = g.op("Relu", g.op("Conv", x, w, g.const(np.zeros(out_c, np.float32)), strides=[stride, stride],
                              pads=[0, 0, 0, 0] if k == 4 else [1, 1, 1, 1]))
        channels = out_c
    return g.op("ReduceMean", x, g.const(np.array([2, 3], np.int64)), keepdims=0), channels


def _vit_trunk(g: _Graph, x: str, dim: int, depth: int, patch: int = 16) -> tuple[str, int]:
    x = g.op("Conv", x, g.random((dim, 3, patch, patch), 0.02), strides=[patch, patch])
    x = g.op("Transpose", g.op("Reshape", x, g.const(np.array([0, dim, -1], np.int64))), perm=[0, 2, 1])
    ones, zeros = g.const(np.ones(dim, np.float32)), g.const(np.zeros(dim, np.float32))
    scale = g.const(np.array(dim ** -0.5, np.float32))
    for _ in range(depth):
        h = g.op("LayerNormalization", x, ones, zeros, axis=-1)
        q, k, v = (g.op("MatMul", h, g.random((dim, dim), 0.02)) for _ in range(3))
        att = g.op("Softmax", g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 1])), scale), axis=-1)
        x = g.op("Add", x, g.op("MatMul", g.op("MatMul", att, v), g.random((dim, dim), 0.02)))
        h = g.op("LayerNormalization", x, ones, zeros, axis=-1)
        mlp = g.op("MatMul", g.op("Relu", g.op("MatMul", h, g.random((dim, 4 * dim), 0.02))), g.random((4 * dim, dim), 0.02))
        x = g.op("Add", x, mlp)
    return g.op("ReduceMean", x, g.const(np.array([1], np.int64)), keepdims=0), dim


def build_tagger(folder: str | Path, names: list[str], categories: list[int], weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None, size: int = 448, batch: int | None = None, kind: str = "linear",
                 width: int = 32, depth: int = 3, input_name: str = "input_1:0", seed: int = 0) -> Path:
    """Write `model.onnx` + `selected_tags.csv` into `folder`; `batch=1` mimics the fixed-batch v2 exports.

    `weight` [3, tags] and `bias` [tags] define the `linear` kind; `width`/`depth` size the others
    (for `vit`, width is the embedding dim)."""
    import onnx
    from onnx import TensorProto, helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(names)
    g = _Graph(seed)
    x = g.op("Transpose", g.op("Mul", input_name, g.const(np.array(1 / 255, np.float32))), perm=[0, 3, 1, 2])
    if kind == "linear":
        pooled, channels = g.op("ReduceMean", x, g.const(np.array([2, 3], np.int64)), keepdims=0), 3
    elif kind == "conv":
        pooled, channels = _conv_trunk(g, x, width, depth)
    elif kind == "vit":
        pooled, channels = _vit_trunk(g, x, width, depth)
    else:
        raise ValueError(f"unknown tiny tagger kind {kind!r}")
    if weight is None or np.shape(weight)[0] != channels:
        weight = g.rng.normal(0, channels ** -0.5, (channels, n))
    bias = np.zeros(n) if bias is None else bias
    logits = g.op("Add", g.op("MatMul", pooled, g.const(np.asarray(weight, np.float32))), g.const(np.asarray(bias, np.float32)))
    g.nodes.append(helper.make_node("Sigmoid", [logits], ["predictions_sigmoid"]))
    dim0 = batch if batch else "batch"
    graph = helper.make_graph(
        g.nodes, f"tiny_wd_tagger_{kind}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [dim0, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [dim0, n])], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="loratrain-tiny")
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    write_tags_csv(folder / "selected_tags.csv", names, categories)
    return folder


def linear_probabilities(batch_bgr: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """What a `linear` tiny tagger outputs, computed with numpy alone."""
    pooled = batch_bgr.astype(np.float64).mean(axis=(1, 2)) / 255.0
    return 1.0 / (1.0 + np.exp(-(pooled @ weight.astype(np.float64) + bias)))
