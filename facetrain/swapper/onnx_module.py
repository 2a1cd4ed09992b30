"""An ONNX graph as a torch module: its float initializers become parameters, its nodes run as torch ops.

Why not a converter that rebuilds the network as torch code: the swapper we fine-tune must go back out as the
*same* file (FaceFusion reads its input and output names, its shapes and its last initializer, the embedding
map), so we keep the graph and only ever change initializer values. `OnnxModule.to_onnx()` is the original model
with the tuned weights written in; onnxruntime then runs the very graph torch trained. Parameters are grouped
into *blocks* (the initializer's name up to its first numbered part: `styles.3`, `down2`, `up1`) so a recipe
can freeze the early blocks and train the later ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loratrain.core.errors import ConfigError

from .onnx_file import load_onnx  # noqa: F401  (re-exported: the loader lives where torch is not imported)
from .onnx_ops import OPS

#: node inputs that are settings, not learnt weights (a float initializer there is never trained)
_FIXED_INPUTS = {"Resize": {1, 2, 3}, "Upsample": {1}, "Clip": {1, 2}, "Pad": {1, 2, 3}, "BatchNormalization": {3, 4},
                 "Reshape": {1}, "Expand": {1}, "ConstantOfShape": {0}, "Slice": {1, 2, 3, 4}, "Split": {1},
                 "Unsqueeze": {1}, "Squeeze": {1}, "ReduceMean": {1}, "ReduceSum": {1}}
_FLOATS = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def block_name(name: str) -> str:
    """`styles.3.style1.linear.weight` -> `styles.3`; `down2.weight` -> `down2`; `onnx::Conv_7` -> `onnx::Conv_7`."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if re.fullmatch(r"\d+", p) or re.search(r"\d$", p):
            return ".".join(parts[:i + 1])
    return parts[0] if len(parts) > 1 else name


class OnnxModule(nn.Module):
    """Run an ONNX graph in torch (float32), differentiably. `inputs` / `outputs` are the graph's names in order."""

    def __init__(self, model: Any, what: str = "model") -> None:
        super().__init__()
        from onnx import helper

        self.proto = model
        graph = model.graph
        self.what = what
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS and n.op_type != "Constant"})
        if unknown:
            raise ConfigError(f"{what}: operators not supported by the importer: {', '.join(unknown)}")
        init_names = [t.name for t in graph.initializer]
        self.inputs = [i.name for i in graph.input if i.name not in set(init_names)]
        self.outputs = [o.name for o in graph.output]
        self.input_shapes = {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                      for d in i.type.tensor_type.shape.dim] for i in graph.input if i.name in self.inputs}
        self.output_shapes = {o.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                       for d in o.type.tensor_type.shape.dim] for o in graph.output}
        fixed: set[str] = set()
        used: set[str] = set()
        for node in graph.node:
            for k, name in enumerate(node.input):
                used.add(name)
                if k in _FIXED_INPUTS.get(node.op_type, ()):
                    fixed.add(name)
        self.param_names: list[str] = []
        self.params = nn.ParameterList()
        self.consts: dict[str, torch.Tensor] = {}
        self._index: dict[str, int] = {}
        for t in graph.initializer:
            arr = _array(t, what)
            if t.data_type in _FLOATS:
                learnt = t.name in used and t.name not in fixed and arr.size > 1  # a scalar is an epsilon or a constant
                self._index[t.name] = len(self.param_names)
                self.param_names.append(t.name)
                self.params.append(nn.Parameter(torch.from_numpy(np.array(arr, np.float32)), requires_grad=learnt))
            else:
                self.consts[t.name] = _tensor(arr, t.name, what)
        self.learnable = {n for n in self.param_names if self.params[self._index[n]].requires_grad}
        self.nodes: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        for node in graph.node:
            attrs = {}
            for a in node.attribute:
                v = helper.get_attribute_value(a)
                if a.type == a.TENSOR:
                    v = _tensor(_array(v, what), f"{node.op_type} {a.name}", what)
                elif a.type in (a.GRAPH, a.GRAPHS):
                    raise ConfigError(f"{what}: control flow ({node.op_type}) is not supported by the importer")
                attrs[a.name] = v
            if node.op_type == "Constant":
                if len(node.output) != 1:
                    raise ConfigError(f"{what}: a Constant node with {len(node.output)} outputs")
                self.consts[node.output[0]] = _constant(attrs, what)
                continue
            if not any(node.output):
                raise ConfigError(f"{what}: a {node.op_type} node has no output")
            attrs["_op"], attrs["_n_out"] = node.op_type, len(node.output)
            self.nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        self.nodes = _ordered(self.nodes, {i.name for i in graph.input} | set(self._index) | set(self.consts),
                              self.outputs, what)
        # free each intermediate after its last reader (inference memory); graph outputs are kept
        last: dict[str, int] = {}
        for k, (_, ins, _, _) in enumerate(self.nodes):
            for name in ins:
                last[name] = k
        self._drop = [[n for n in ins if last.get(n) == k and n not in self.outputs and n not in self._index
                       and n not in self.consts] for k, (_, ins, _, _) in enumerate(self.nodes)]
        self._order = self._first_use()

    def _first_use(self) -> list[str]:
        seen: list[str] = []
        for _, ins, _, _ in self.nodes:
            seen.extend(n for n in ins if n in self._index and n not in seen)
        return seen + [n for n in self.param_names if n not in seen]

    # ---- weights
    def param(self, name: str) -> nn.Parameter:
        return self.params[self._index[name]]

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Every float initializer by its ONNX name (the key of our checkpoints)."""
        return {n: self.params[i] for n, i in self._index.items()}

    def blocks(self) -> list[str]:
        """The learnt weights' blocks, in the order the graph first uses them (input side first)."""
        out: list[str] = []
        for n in self._order:
            b = block_name(n)
            if n in self.learnable and b not in out:
                out.append(b)
        return out

    def freeze_until(self, block: str) -> list[str]:
        """Freeze every learnt weight the graph uses before the first weight of `block`; returns the frozen names."""
        blocks = self.blocks()
        if block not in blocks:
            raise ConfigError(f"freeze_until: no block {block!r} in the {self.what}; its blocks, input side first: "
                              f"{', '.join(blocks[:40])}{' ...' if len(blocks) > 40 else ''}")
        frozen = []
        for n in self._order:
            if block_name(n) == block:
                break
            if n in self.learnable:
                self.param(n).requires_grad_(False)
                frozen.append(n)
        return frozen

    def to_onnx(self) -> Any:
        """The original model with the current weights written in, each in its original dtype."""
        import onnx
        from onnx import numpy_helper

        out = onnx.ModelProto()
        out.CopyFrom(self.proto)
        for t in out.graph.initializer:
            if t.name in self._index:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                arr = self.param(t.name).detach().float().cpu().numpy()
                t.CopyFrom(numpy_helper.from_array(arr.astype(dtype), t.name))
        return out

    # ---- running
    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        env: dict[str, Any] = dict(zip(self.inputs, args))
        env.update(kwargs)
        missing = [n for n in self.inputs if n not in env]
        if missing:
            raise ValueError(f"{self.what}: missing inputs {missing}")
        device = next(iter(env.values())).device
        for name, i in self._index.items():
            env[name] = self.params[i]
        for name, t in self.consts.items():
            env[name] = t.to(device) if t.is_floating_point() else t
        for k, (op, ins, outs, attrs) in enumerate(self.nodes):
            args_in = [env[n] if n else None for n in ins]
            result = OPS.get(op)(*args_in, **attrs)
            if isinstance(result, tuple):
                env.update(zip(outs, result))
            else:
                env[outs[0]] = result
            for n in self._drop[k]:
                env.pop(n, None)
        res = [env[n] for n in self.outputs]
        return res[0] if len(res) == 1 else tuple(res)


def _ordered(nodes: list, known: set[str], outputs: list[str], what: str) -> list:
    """The nodes in an order where each runs after the nodes that make its inputs: the file's own order when it is
    one (the ONNX standard asks for it; onnxruntime sorts by itself, so we do too). A name nothing makes, or nodes
    waiting on each other, is a ConfigError naming it, before anything runs."""
    import heapq

    producer = {o: k for k, (_, _, outs, _) in enumerate(nodes) for o in outs if o}
    for op, ins, _, _ in nodes:
        for n in ins:
            if n and n not in known and n not in producer:
                raise ConfigError(f"{what}: a {op} node reads {n!r}, which no input, weight or node makes")
    for n in outputs:
        if n not in known and n not in producer:
            raise ConfigError(f"{what}: the graph's output {n!r} is made by no node")
    waits = [{producer[n] for n in ins if n and n not in known} for _, ins, _, _ in nodes]
    users: dict[int, list[int]] = {}
    for k, deps in enumerate(waits):
        for d in deps:
            users.setdefault(d, []).append(k)
    left = [len(d) for d in waits]
    ready = [k for k, n in enumerate(left) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, []):
            left[u] -= 1
            if left[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        stuck = next(k for k, n in enumerate(left) if n)
        raise ConfigError(f"{what}: its nodes form a cycle (a {nodes[stuck][0]} node waits, through others, on its own "
                          "output)")
    return [nodes[k] for k in order]


def _array(t: Any, what: str) -> np.ndarray:
    """A TensorProto's values, or a ConfigError naming the file and the tensor (data of the wrong length, ...)."""
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(t)
    except Exception as e:  # onnx / numpy raise ValueError, TypeError, ... for a damaged tensor
        raise ConfigError(f"{what}: tensor {t.name!r} cannot be read ({str(e).strip()[:160] or type(e).__name__})") from None


def _tensor(arr: np.ndarray, name: str, what: str) -> torch.Tensor:
    """A non-float tensor as torch: strings, 8-bit and 4-bit floats have no torch type the importer runs."""
    try:
        return torch.from_numpy(np.array(arr))
    except TypeError:
        raise ConfigError(f"{what}: tensor {name!r} has the type {arr.dtype}, which the importer cannot run") from None


def _constant(attrs: dict[str, Any], what: str = "model") -> torch.Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64),
                       ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise ConfigError(f"{what}: a Constant node with an unsupported value ({', '.join(attrs) or 'none'})")


def load_module(path: str | Path, what: str = "model") -> OnnxModule:
    return OnnxModule(load_onnx(path, what), f"{what} {Path(path).name}")
