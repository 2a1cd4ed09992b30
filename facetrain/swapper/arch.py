"""Our own identity-injection generator, and a stand-in face recogniser, built directly as ONNX graphs.

Why ONNX first: every swapper we train (an imported inswapper-style file or one of ours) then goes through the
same path: `OnnxModule` runs it in torch, training changes initializer values only, and export writes them back
into the graph. So our own architecture has inswapper's contract by construction: inputs `target`
(N x 3 x S x S, RGB 0..1) and `source` (N x 512, the recogniser embedding mapped by `emap` and divided by its
norm), output `output` (N x 3 x S x S, RGB 0..1), and the embedding map as the graph's last initializer, which is
where FaceFusion reads it.

The generator: a 7x7 stem, two stride-2 convolutions, `blocks` residual blocks whose two convolutions are each
instance-normalised and re-styled by the source (AdaIN: a linear map of the embedding gives a scale and a shift
per channel), two nearest-upsample convolutions and a 7x7 head through tanh to 0..1. The recogniser stand-in
(`build_recognizer_onnx`) is a small random CNN with ArcFace's I/O (N x 3 x 112 x 112 at (x - 127.5) / 127.5 ->
N x 512): it exists for tests, the demo and benchmarks only; its embeddings mean nothing about real people.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 13
EMBED = 512


@dataclass(frozen=True)
class GeneratorSpec:
    resolution: int = 128
    base: int = 64
    blocks: int = 6
    embed: int = EMBED
    batch: int | str = 1  # inswapper's files fix the batch to 1; "N" for a dynamic batch

    def check(self) -> list[str]:
        out = []
        if self.resolution % 4 or not 16 <= self.resolution <= 1024:
            out.append(f"resolution {self.resolution}: a multiple of 4 from 16 to 1024")
        if not 4 <= self.base <= 512:
            out.append(f"base {self.base}: 4 to 512 channels")
        if not 1 <= self.blocks <= 16:
            out.append(f"blocks {self.blocks}: 1 to 16")
        return out


class _Graph:
    """A tiny ONNX graph writer: named initializers and nodes with generated output names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.inits, self.k = rng, [], [], 0

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, arr: np.ndarray) -> str:
        self.k += 1
        return self.init(f"const_{self.k}", arr)

    def node(self, op: str, ins: list[str], n_out: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        outs = []
        for _ in range(n_out):
            self.k += 1
            outs.append(f"{op.lower()}_{self.k}")
        self.nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, gain: float = 2.0,
             reflect: bool = True) -> str:
        fan_in = cin * k * k
        w = self.rng.normal(0, np.sqrt(gain / fan_in), (cout, cin, k, k)).astype(np.float32)
        if reflect and k > 1:
            p = k // 2
            x = self.node("Pad", [x, self.const(np.array([0, 0, p, p, 0, 0, p, p], np.int64))], mode="reflect")
            pads = [0, 0, 0, 0]
        else:
            pads = [k // 2] * 4
        return self.node("Conv", [x, self.init(f"{name}.weight", w), self.init(f"{name}.bias", np.zeros(cout, np.float32))],
                         kernel_shape=[k, k], strides=[stride, stride], pads=pads)

    def leaky(self, x: str) -> str:
        return self.node("LeakyRelu", [x], alpha=0.2)

    def adain(self, name: str, x: str, source: str, channels: int, embed: int) -> str:
        """Instance-normalise x, then scale by (1 + gamma) and shift by beta, both linear in the source."""
        mean = self.node("ReduceMean", [x], axes=[2, 3], keepdims=1)
        centred = self.node("Sub", [x, mean])
        var = self.node("ReduceMean", [self.node("Mul", [centred, centred])], axes=[2, 3], keepdims=1)
        std = self.node("Sqrt", [self.node("Add", [var, self.const(np.array(1e-5, np.float32))])])
        normed = self.node("Div", [centred, std])
        w = self.rng.normal(0, 0.02 / np.sqrt(embed) * 8, (embed, 2 * channels)).astype(np.float32)
        style = self.node("Gemm", [source, self.init(f"{name}.linear.weight", w),
                                   self.init(f"{name}.linear.bias", np.zeros(2 * channels, np.float32))])
        gamma, beta = self.node("Split", [style, self.const(np.array([channels, channels], np.int64))], n_out=2, axis=1)
        axes = self.const(np.array([2, 3], np.int64))
        gamma = self.node("Unsqueeze", [gamma, axes])
        beta = self.node("Unsqueeze", [beta, axes])
        scaled = self.node("Mul", [normed, self.node("Add", [gamma, self.const(np.array(1.0, np.float32))])])
        return self.node("Add", [scaled, beta])

    def model(self, name: str, inputs: list[Any], outputs: list[Any], doc: str) -> Any:
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="loratrain")
        model.ir_version = 8  # onnxruntime releases back to 1.10 read it
        model.doc_string = doc
        return model


def build_generator(spec: GeneratorSpec, seed: int = 0) -> Any:
    """Our ID-injection generator (randomly initialised, seeded) as an ONNX ModelProto with inswapper's contract."""
    from onnx import TensorProto, helper

    problems = spec.check()
    if problems:
        raise ValueError("generator: " + "; ".join(problems))
    g = _Graph(np.random.default_rng(seed))
    c, s, e = spec.base, spec.resolution, spec.embed
    x = g.leaky(g.conv("first", "target", 3, c, 7))
    x = g.leaky(g.conv("down1", x, c, 2 * c, 3, 2, reflect=False))
    x = g.leaky(g.conv("down2", x, 2 * c, 4 * c, 3, 2, reflect=False))
    for i in range(spec.blocks):
        h = g.adain(f"styles.{i}.style1", g.conv(f"styles.{i}.conv1", x, 4 * c, 4 * c, 3), "source", 4 * c, e)
        h = g.node("Relu", [h])
        h = g.adain(f"styles.{i}.style2", g.conv(f"styles.{i}.conv2", h, 4 * c, 4 * c, 3, gain=0.2), "source", 4 * c, e)
        x = g.node("Add", [x, h])
    two = g.const(np.array([1, 1, 2, 2], np.float32))
    for i, (cin, cout) in enumerate(((4 * c, 2 * c), (2 * c, c)), 1):
        x = g.node("Resize", [x, "", two], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        x = g.leaky(g.conv(f"up{i}", x, cin, cout, 3))
    x = g.node("Tanh", [g.conv("last", x, c, 3, 7, gain=0.1)])
    half = g.const(np.array(0.5, np.float32))
    g.nodes.append(helper.make_node("Add", [g.node("Mul", [x, half]), half], ["output"]))
    g.init("emap", np.eye(e, dtype=np.float32))  # last initializer: the embedding map (identity for ours)
    b = spec.batch
    return g.model("loratrain_swapper",
                   [helper.make_tensor_value_info("target", TensorProto.FLOAT, [b, 3, s, s]),
                    helper.make_tensor_value_info("source", TensorProto.FLOAT, [b, e])],
                   [helper.make_tensor_value_info("output", TensorProto.FLOAT, [b, 3, s, s])],
                   f"loratrain identity-injection generator: resolution {s}, base {c}, blocks {spec.blocks}")


def build_recognizer(seed: int = 0, embed: int = EMBED, width: int = 16) -> Any:
    """A random stand-in with ArcFace's I/O (tests, demo, benchmarks): N x 3 x 112 x 112 -> N x embed."""
    from onnx import TensorProto, helper

    g = _Graph(np.random.default_rng(seed + 1000))
    x, cin = "input.1", 3
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        x = g.conv(f"layer{i}.conv", x, cin, cout, 3, 2, reflect=False)
        x = g.node("PRelu", [x, g.init(f"layer{i}.prelu", np.full((cout, 1, 1), 0.25, np.float32))])
        cin = cout
    # flatten the 7 x 7 map (not a global average): the embedding then depends on where features are, as a
    # face's identity does, rather than on its mean colour
    x = g.node("Flatten", [x], axis=1)
    cin *= 7 * 7
    w = g.rng.normal(0, np.sqrt(1 / cin), (embed, cin)).astype(np.float32)
    x = g.node("Gemm", [x, g.init("fc.weight", w), g.init("fc.bias", np.zeros(embed, np.float32))], transB=1)
    g.nodes.append(helper.make_node("BatchNormalization", [x, g.init("features.weight", np.ones(embed, np.float32)),
                                                           g.init("features.bias", np.zeros(embed, np.float32)),
                                                           g.init("features.running_mean", np.zeros(embed, np.float32)),
                                                           g.init("features.running_var", np.ones(embed, np.float32))],
                                    ["embedding"], epsilon=1e-5))
    return g.model("loratrain_standin_recogniser",
                   [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                   [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", embed])],
                   "A random stand-in with ArcFace's I/O, for tests and demos: not a face recogniser.")


def save_onnx(model: Any, path: str | Path) -> Path:
    """Write atomically (a kill leaves the old file or none, never half a model)."""
    from loratrain.core.safe_io import atomic_write_bytes

    atomic_write_bytes(path, model.SerializeToString())
    return Path(path)


def build_generator_onnx(path: str | Path, spec: GeneratorSpec = GeneratorSpec(), seed: int = 0) -> Path:
    return save_onnx(build_generator(spec, seed), path)


def build_recognizer_onnx(path: str | Path, seed: int = 0) -> Path:
    return save_onnx(build_recognizer(seed), path)
