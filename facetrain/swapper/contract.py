"""What a swapper file promises: its input and output names, its crop, its normalisation and its embedding map.

FaceFusion's inswapper contract (its face_swapper processor): input `target` N x 3 x S x S (RGB,
0..1, crop by the `arcface_128` template), input `source` N x 512, output N x 3 x S x S (RGB 0..1); the source is
the recogniser's raw embedding multiplied by the graph's last initializer (`emap`, 512 x 512) and divided by the
embedding's norm. Files we export keep all of it and add metadata (`loratrain.template`, `loratrain.normalisation`)
so a file trained at another crop says so; a foreign file without it is taken to follow inswapper's contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loratrain.core.errors import ConfigError

NORMALISATIONS = ("0..1", "-1..1")
#: crop sizes and embedding widths a swapper may declare: every known one (inswapper 128, SimSwap 224 / 512, HyperSwap
#: 256; embeddings of 512) lies well inside; a file declaring more would only make every buffer sized from it huge
SIZES, EMBEDS = (16, 2048), (1, 8192)
#: ONNX element types of float tensors (float, float16, double, bfloat16): the crop and the embedding are floats
FLOAT_TYPES = (1, 10, 11, 16)
TEMPLATE_KEY, NORM_KEY = "loratrain.template", "loratrain.normalisation"


@dataclass
class SwapperContract:
    target: str
    source: str
    output: str
    size: int
    embed: int
    batch: int | None          # a fixed batch (inswapper: 1), or None when the batch is dynamic
    template: str = "arcface_128"
    normalisation: str = "0..1"
    emap: np.ndarray | None = None  # embed x embed, or None: the source is the L2-normalised embedding

    def latent(self, embedding: np.ndarray) -> np.ndarray:
        """The `source` input for raw recogniser embeddings (N x embed or embed)."""
        e = np.atleast_2d(np.asarray(embedding, np.float32))
        norm = np.linalg.norm(e, axis=1, keepdims=True).clip(1e-12)
        return ((e @ self.emap) if self.emap is not None else e) / norm

    def to_input(self, rgb01: np.ndarray) -> np.ndarray:
        """N x S x S x 3 RGB 0..1 -> the model's N x 3 x S x S target."""
        x = np.ascontiguousarray(rgb01.transpose(0, 3, 1, 2), np.float32)
        return x * 2 - 1 if self.normalisation == "-1..1" else x

    def from_output(self, out: np.ndarray) -> np.ndarray:
        """The model's N x 3 x S x S output -> N x S x S x 3 RGB 0..1."""
        y = np.asarray(out, np.float32).transpose(0, 2, 3, 1)
        return np.clip((y + 1) / 2 if self.normalisation == "-1..1" else y, 0, 1)


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim]


def read_contract(model: Any, what: str = "swapper") -> SwapperContract:
    """The contract of an ONNX ModelProto, or a ConfigError saying what the file has instead."""
    from onnx import numpy_helper

    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    images = [i for i in inputs if len(_dims(i)) == 4]
    vectors = [i for i in inputs if len(_dims(i)) == 2]
    outs = [o for o in model.graph.output if len(_dims(o)) == 4]
    shapes = ", ".join(f"{i.name} {_dims(i)}" for i in inputs)
    if len(inputs) != 2 or len(images) != 1 or len(vectors) != 1 or not outs:
        raise ConfigError(f"{what}: expected an identity-injection swapper (inswapper-style: a target image input "
                          f"N x 3 x S x S, a source embedding input N x 512 and an image output); it has inputs {shapes}")
    t, src = _dims(images[0]), _dims(vectors[0])
    if t[1] != 3 or not isinstance(t[2], int) or t[2] != t[3] or not isinstance(src[1], int):
        raise ConfigError(f"{what}: the target input must be N x 3 x S x S and the source N x D with fixed S and D; "
                          f"it has {shapes}")
    if not SIZES[0] <= t[2] <= SIZES[1] or not EMBEDS[0] <= src[1] <= EMBEDS[1]:
        raise ConfigError(f"{what}: a crop of {t[2]} px and an embedding of {src[1]} values; a face swapper has "
                          f"{SIZES[0]} to {SIZES[1]} px and 1 to {EMBEDS[1]} values")
    odd = [i.name for i in (images[0], vectors[0], outs[0]) if i.type.tensor_type.elem_type not in FLOAT_TYPES]
    if odd:
        raise ConfigError(f"{what}: {', '.join(odd)}: not a float tensor (the crop, the embedding and the result are)")
    embed = int(src[1])
    emap = None
    last = model.graph.initializer[-1] if len(model.graph.initializer) else None
    if last is not None and list(last.dims) == [embed, embed]:
        try:
            emap = np.asarray(numpy_helper.to_array(last), np.float32)
        except Exception as e:  # data of the wrong length, a type numpy cannot hold as float32
            raise ConfigError(f"{what}: its embedding map {last.name!r} cannot be read ({str(e).strip()[:160]})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    norm = meta.get(NORM_KEY, "0..1")
    if norm not in NORMALISATIONS:
        raise ConfigError(f"{what}: metadata {NORM_KEY}={norm!r}; expected one of {', '.join(NORMALISATIONS)}")
    from .align import TEMPLATES

    template = meta.get(TEMPLATE_KEY, "arcface_128")
    if template not in TEMPLATES:
        raise ConfigError(f"{what}: metadata {TEMPLATE_KEY}={template!r}; expected one of {', '.join(TEMPLATES)}")
    batch = t[0] if isinstance(t[0], int) and t[0] > 0 else None
    if batch is not None and batch > 256:  # every run pads up to a fixed batch
        raise ConfigError(f"{what}: a fixed batch of {batch} faces; at most 256")
    return SwapperContract(images[0].name, vectors[0].name, outs[0].name, int(t[2]), embed, batch, template, norm, emap)


def stamp(model: Any, template: str, normalisation: str, extra: dict[str, str] | None = None) -> Any:
    """Set our metadata on a ModelProto (replacing earlier values), for files we write."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in (TEMPLATE_KEY, NORM_KEY, *(extra or {}))]
    del model.metadata_props[:]
    for k, v in [*keep, (TEMPLATE_KEY, template), (NORM_KEY, normalisation), *(extra or {}).items()]:
        p = model.metadata_props.add()
        p.key, p.value = k, v
    return model
