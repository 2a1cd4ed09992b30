"""ONNX operators as differentiable torch functions: one registry entry per op type.

Why our own: a swapper file (inswapper-style) and a recogniser are small CNN graphs over a few dozen op types;
running them as torch lets us fine-tune the swapper and back-propagate through the recogniser, and writing the
tuned weights back into the *same* graph keeps the exported file's inputs, outputs and embedding convention
identical to the one it came from. Each function receives the node's inputs (tensors, or None for an omitted
optional input) and its attributes (a dict), and returns a tensor or a tuple of tensors. Semantics follow the ONNX
operator specification, opsets 9 to 21 (attribute-form and input-form variants of the same op both handled).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from loratrain.core.registry import Registry

Op = Callable[..., Any]
OPS: Registry[Op] = Registry("ONNX operator")


#: the most elements one tensor may get from sizes a file computes (Expand, ConstantOfShape, Resize, Pad): 4 GiB
#: of float32, far above any face model's activations; a hostile or broken file fails here, named, instead of
#: the machine running out of memory
MAX_ELEMENTS = 1 << 30


def _check_size(shape: list[int], op: str) -> None:
    n = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"{op}: a negative size {d} in {shape}")
        n *= d
    if n > MAX_ELEMENTS:
        raise ValueError(f"{op}: a tensor of shape {shape} ({n:,} values) is too large for a face model")


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    return lambda a, b, **_: fn(a, b)


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Max": torch.maximum,
                   "Min": torch.minimum, "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt}.items():
    OPS.register(_name)(_binary(_fn))


@OPS.register("Div")
def _div(a, b, **_):  # noqa: ANN001, ANN202
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


for _name, _fn in {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Sqrt": torch.sqrt, "Exp": torch.exp,
                   "Log": torch.log, "Abs": torch.abs, "Neg": torch.neg, "Erf": torch.erf, "Reciprocal": torch.reciprocal,
                   "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos}.items():
    OPS.register(_name)(lambda x, _f=_fn, **_: _f(x))


@OPS.register("Identity", "Dropout")
def _identity(x, *_, **__):  # noqa: ANN001, ANN202
    return x


@OPS.register("LeakyRelu")
def _leaky(x, alpha: float = 0.01, **_):  # noqa: ANN001, ANN202
    return F.leaky_relu(x, alpha)


@OPS.register("PRelu")
def _prelu(x, slope, **_):  # noqa: ANN001, ANN202
    if slope.dim() == 1 and x.dim() > 2 and slope.numel() == x.shape[1]:
        slope = slope.reshape(1, -1, *([1] * (x.dim() - 2)))
    return torch.where(x >= 0, x, x * slope)


@OPS.register("Clip")
def _clip(x, lo=None, hi=None, min: float | None = None, max: float | None = None, **_):  # noqa: ANN001, ANN202, A002
    lo = float(lo) if lo is not None else min
    hi = float(hi) if hi is not None else max
    return torch.clamp(x, lo, hi)


@OPS.register("Softmax")
def _softmax(x, axis: int = -1, **_):  # noqa: ANN001, ANN202
    return torch.softmax(x, axis)


@OPS.register("Conv")
def _conv(x, w, b=None, *, strides=None, pads=None, dilations=None, group: int = 1, auto_pad: bytes | str = "NOTSET",
          **_):  # noqa: ANN001, ANN202
    nd = w.dim() - 2
    strides = strides or [1] * nd
    dilations = dilations or [1] * nd
    pads = list(pads or [0] * (2 * nd))
    if _s(auto_pad) in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x.shape[2:], w.shape[2:], strides, dilations, _s(auto_pad) == "SAME_UPPER")
    begin, end = pads[:nd], pads[nd:]
    if begin != end:  # asymmetric: pad explicitly (F.pad takes the last dimension first)
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])])
        begin = [0] * nd
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(x, w, b, strides, begin, dilations, group)


def _same_pads(size, kernel, strides, dilations, upper: bool) -> list[int]:  # noqa: ANN001
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = -(-int(n) // s)
        total = max(0, (out - 1) * s + (int(k) - 1) * d + 1 - int(n))
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return begin + end


@OPS.register("ConvTranspose")
def _conv_t(x, w, b=None, *, strides=None, pads=None, dilations=None, group: int = 1, output_padding=None, **_):  # noqa: ANN001, ANN202
    nd = w.dim() - 2
    pads = list(pads or [0] * (2 * nd))
    if pads[:nd] != pads[nd:]:
        raise NotImplementedError("ConvTranspose with asymmetric pads")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return conv(x, w, b, strides or [1] * nd, pads[:nd], output_padding or [0] * nd, group, dilations or [1] * nd)


@OPS.register("Gemm")
def _gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0, **_):  # noqa: ANN001, ANN202, N803
    y = (a.t() if transA else a) @ (b.t() if transB else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@OPS.register("MatMul")
def _matmul(a, b, **_):  # noqa: ANN001, ANN202
    return a @ b


@OPS.register("BatchNormalization")
def _bn(x, scale, bias, mean, var, *, epsilon: float = 1e-5, **_):  # noqa: ANN001, ANN202
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


@OPS.register("InstanceNormalization")
def _instance_norm(x, scale, bias, *, epsilon: float = 1e-5, **_):  # noqa: ANN001, ANN202
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


def _axes(x: torch.Tensor, axes_in: torch.Tensor | None, axes: list[int] | None) -> list[int] | None:
    got = _ints(axes_in) if axes_in is not None else list(axes or [])
    return [a % x.dim() for a in got] or None


def _reduce(fn: Callable[..., torch.Tensor]) -> Op:
    def op(x, axes_in=None, *, axes=None, keepdims: int = 1, noop_with_empty_axes: int = 0, **_):  # noqa: ANN001, ANN202
        dims = _axes(x, axes_in, axes)
        if dims is None:
            if noop_with_empty_axes:
                return x
            dims = list(range(x.dim()))
        return fn(x, dims, keepdims)
    return op


OPS.register("ReduceMean")(_reduce(lambda x, d, k: x.mean(d, keepdim=bool(k))))
OPS.register("ReduceSum")(_reduce(lambda x, d, k: x.sum(d, keepdim=bool(k))))
OPS.register("ReduceSumSquare")(_reduce(lambda x, d, k: (x * x).sum(d, keepdim=bool(k))))
OPS.register("ReduceMax")(_reduce(lambda x, d, k: x.amax(d, keepdim=bool(k))))
OPS.register("ReduceL2")(_reduce(lambda x, d, k: x.square().sum(d, keepdim=bool(k)).sqrt()))


@OPS.register("GlobalAveragePool")
def _gap(x, **_):  # noqa: ANN001, ANN202
    return x.mean(list(range(2, x.dim())), keepdim=True)


@OPS.register("MaxPool", "AveragePool")
def _pool(x, *, kernel_shape, strides=None, pads=None, ceil_mode: int = 0, count_include_pad: int = 0, _op: str = "", **_):  # noqa: ANN001, ANN202
    nd = len(kernel_shape)
    pads = list(pads or [0] * (2 * nd))
    if pads[:nd] != pads[nd:]:
        raise NotImplementedError("pooling with asymmetric pads")
    strides = strides or [1] * nd
    if _op == "MaxPool":
        return F.max_pool2d(x, kernel_shape, strides, pads[:nd], ceil_mode=bool(ceil_mode))
    return F.avg_pool2d(x, kernel_shape, strides, pads[:nd], ceil_mode=bool(ceil_mode),
                        count_include_pad=bool(count_include_pad))


@OPS.register("Pad")
def _pad(x, pads_in=None, value=None, axes_in=None, *, mode: bytes | str = "constant", pads=None, **_):  # noqa: ANN001, ANN202
    p = _ints(pads_in) if pads_in is not None else list(pads or [])
    n = len(p) // 2
    axes = _ints(axes_in) if axes_in is not None else list(range(n))
    full = [0] * (2 * x.dim())
    for i, a in enumerate(axes):
        a %= x.dim()
        full[a], full[x.dim() + a] = p[i], p[n + i]
    _check_size([d + full[a] + full[x.dim() + a] for a, d in enumerate(x.shape)], "Pad")
    torch_pads = [v for a in reversed(range(x.dim())) for v in (full[a], full[x.dim() + a])]
    while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:  # torch pads from the last dimension back
        torch_pads = torch_pads[:-2]
    m = _s(mode)
    if m == "constant":
        return F.pad(x, torch_pads, value=float(value) if value is not None and value.numel() else 0.0)
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[m])


@OPS.register("Resize", "Upsample")
def _resize(x, roi=None, scales=None, sizes=None, *, mode: bytes | str = "nearest",
            coordinate_transformation_mode: bytes | str = "half_pixel", nearest_mode: bytes | str = "round_prefer_floor",
            _op: str = "", **_):  # noqa: ANN001, ANN202
    if _op == "Upsample":  # opset 9: (x, scales)
        scales, roi = roi, None
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
    else:
        size = [int(round(float(n) * float(s))) for n, s in zip(x.shape[2:], scales.reshape(-1).tolist()[2:])]
    _check_size([*x.shape[:2], *size], "Resize")
    m, ct = _s(mode), _s(coordinate_transformation_mode)
    if m == "nearest":
        if ct == "asymmetric" and _s(nearest_mode) == "floor":
            return F.interpolate(x, size=size, mode="nearest")
        if ct in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn") or _s(nearest_mode) != "floor":
            return F.interpolate(x, size=size, mode="nearest-exact")
        return F.interpolate(x, size=size, mode="nearest")
    lin = "bilinear" if x.dim() == 4 else "linear"
    if m == "cubic":
        lin = "bicubic"
    return F.interpolate(x, size=size, mode=lin, align_corners=ct == "align_corners")


@OPS.register("Reshape")
def _reshape(x, shape, *, allowzero: int = 0, **_):  # noqa: ANN001, ANN202
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@OPS.register("Flatten")
def _flatten(x, *, axis: int = 1, **_):  # noqa: ANN001, ANN202
    axis %= max(x.dim(), 1)
    lead = 1
    for d in x.shape[:axis]:
        lead *= d
    return x.reshape(lead, -1)


@OPS.register("Unsqueeze")
def _unsqueeze(x, axes_in=None, *, axes=None, **_):  # noqa: ANN001, ANN202
    dims = _ints(axes_in) if axes_in is not None else list(axes or [])
    rank = x.dim() + len(dims)
    for a in sorted(d % rank for d in dims):
        x = x.unsqueeze(a)
    return x


@OPS.register("Squeeze")
def _squeeze(x, axes_in=None, *, axes=None, **_):  # noqa: ANN001, ANN202
    dims = _ints(axes_in) if axes_in is not None else list(axes or [])
    if not dims:
        return x.squeeze()
    for a in sorted((d % x.dim() for d in dims), reverse=True):
        x = x.squeeze(a)
    return x


@OPS.register("Transpose")
def _transpose(x, *, perm=None, **_):  # noqa: ANN001, ANN202
    return x.permute(perm if perm else list(reversed(range(x.dim()))))


@OPS.register("Concat")
def _concat(*xs, axis: int = 0, **_):  # noqa: ANN001, ANN202
    return torch.cat([t for t in xs if t is not None], axis)


@OPS.register("Split")
def _split(x, split_in=None, *, axis: int = 0, split=None, num_outputs: int = 0, _n_out: int = 1, **_):  # noqa: ANN001, ANN202
    sizes = _ints(split_in) if split_in is not None else list(split or [])
    if not sizes:
        n = num_outputs or _n_out
        size = -(-x.shape[axis] // n)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
    return tuple(torch.split(x, sizes, axis))


@OPS.register("Slice")
def _slice(x, starts_in=None, ends_in=None, axes_in=None, steps_in=None, *, starts=None, ends=None, axes=None, **_):  # noqa: ANN001, ANN202
    st = _ints(starts_in) if starts_in is not None else list(starts)
    en = _ints(ends_in) if ends_in is not None else list(ends)
    ax = _ints(axes_in) if axes_in is not None else list(axes or range(len(st)))
    sp = _ints(steps_in) if steps_in is not None else [1] * len(st)
    index: list[slice] = [slice(None)] * x.dim()
    for s, e, a, k in zip(st, en, ax, sp):
        if k <= 0:
            raise NotImplementedError("Slice with a negative step")
        n = x.shape[a % x.dim()]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[a % x.dim()] = slice(s, e, k)
    return x[tuple(index)]


@OPS.register("Shape")
def _shape(x, *, start: int = 0, end: int | None = None, **_):  # noqa: ANN001, ANN202
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


@OPS.register("Gather")
def _gather(x, idx, *, axis: int = 0, **_):  # noqa: ANN001, ANN202
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.index_select(x, axis, idx.reshape(-1)).reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


@OPS.register("Cast")
def _cast(x, *, to: int = 1, **_):  # noqa: ANN001, ANN202
    from onnx import helper

    return x.to(_torch_dtype(helper.tensor_dtype_to_np_dtype(to)))


def _torch_dtype(np_dtype: Any) -> torch.dtype:
    import numpy as np

    return torch.from_numpy(np.zeros(1, np_dtype)).dtype


@OPS.register("ConstantOfShape")
def _const_of_shape(shape, *, value=None, **_):  # noqa: ANN001, ANN202
    fill = value if isinstance(value, torch.Tensor) else torch.zeros(1)
    _check_size(_ints(shape), "ConstantOfShape")
    return torch.full(_ints(shape), fill.reshape(-1)[0].item(), dtype=fill.dtype)


@OPS.register("Expand")
def _expand(x, shape, **_):  # noqa: ANN001, ANN202
    dims = _ints(shape)
    if not dims:
        return x
    _check_size(list(torch.broadcast_shapes(tuple(x.shape), tuple(max(d, 1) for d in dims))), "Expand")
    return x * torch.ones(dims, dtype=x.dtype, device=x.device)


@OPS.register("Where")
def _where(c, a, b, **_):  # noqa: ANN001, ANN202
    return torch.where(c.bool(), a, b)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
