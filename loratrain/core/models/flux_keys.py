"""FLUX.1 transformer weights between BFL's layout (our model, single files) and diffusers' FluxTransformer2DModel.

Why: a diffusers folder (`transformer/`) must load into our BFL-layout model, and a LoRA or checkpoint we write must
be readable by diffusers. The differences are names plus three reshapes: BFL fuses q/k/v (`img_attn.qkv`, and in
single blocks q/k/v + MLP-in as `linear1`) where diffusers keeps separate Linears; and the final AdaLN emits
[shift | scale] where diffusers' `norm_out.linear` emits [scale | shift].

Chroma (ChromaTransformer2DModel) uses the same names for what it keeps; it lacks the embedders and modulation
Linears (absent keys are simply not converted) and adds the approximator, `distilled_guidance_layer.*`, whose
MLP layers diffusers names linear_1 / linear_2 and whose RMS norms' `scale` diffusers names `weight`.
"""
from __future__ import annotations

import torch

from .dit_parts import block_count
from .fused_keys import from_diffusers, require, swap_halves, to_diffusers  # noqa: F401  (swap_halves: public here too)

#: one-to-one modules: BFL module path -> diffusers module path ({i}: block index)
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight", "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
#: fused BFL Linears -> the diffusers Linears their output rows split into, in order
DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


APPROX = "distilled_guidance_layer"


def module_map(depth: int, depth_single: int, hidden: int, mlp_hidden: int,
               approximator_depth: int = 0) -> dict[str, list[tuple[str, int, int]]]:
    """BFL Linear path -> [(diffusers Linear path, first row, end row)] for every Linear of the transformer.

    A one-to-one module maps to one entry covering all its rows. The final modulation is listed as one entry too;
    its row halves swap (see `swap_halves`). `approximator_depth` > 0 adds Chroma's approximator Linears.
    """
    out: dict[str, list[tuple[str, int, int]]] = {}
    if approximator_depth:
        for name in ("in_proj", "out_proj"):
            out[f"{APPROX}.{name}"] = [(f"{APPROX}.{name}", 0, -1)]
        for i in range(approximator_depth):
            out[f"{APPROX}.layers.{i}.in_layer"] = [(f"{APPROX}.layers.{i}.linear_1", 0, -1)]
            out[f"{APPROX}.layers.{i}.out_layer"] = [(f"{APPROX}.layers.{i}.linear_2", 0, -1)]
    for bfl, diff in _TOP.items():
        out[bfl] = [(diff, 0, -1)]
    out[FINAL_MOD[0]] = [(FINAL_MOD[1], 0, -1)]
    for i in range(depth):
        for bfl, diff in _DOUBLE.items():
            out[f"double_blocks.{i}.{bfl}"] = [(f"transformer_blocks.{i}.{diff}", 0, -1)]
        for bfl, parts in DOUBLE_QKV.items():
            out[f"double_blocks.{i}.{bfl}"] = [(f"transformer_blocks.{i}.{p}", j * hidden, (j + 1) * hidden)
                                               for j, p in enumerate(parts)]
    sizes = [hidden, hidden, hidden, mlp_hidden]
    for i in range(depth_single):
        for bfl, diff in _SINGLE.items():
            out[f"single_blocks.{i}.{bfl}"] = [(f"single_transformer_blocks.{i}.{diff}", 0, -1)]
        starts = [sum(sizes[:j]) for j in range(4)]
        out[f"single_blocks.{i}.linear1"] = [(f"single_transformer_blocks.{i}.{p}", s, s + n)
                                             for p, s, n in zip(SINGLE_LINEAR1, starts, sizes)]
    return out


def _norm_renames(depth: int, depth_single: int, approximator_depth: int = 0) -> dict[str, str]:
    """BFL key -> diffusers key of every q/k norm scale (and of Chroma's approximator norms)."""
    out = {f"{APPROX}.norms.{i}.scale": f"{APPROX}.norms.{i}.weight" for i in range(approximator_depth)}
    out |= {f"double_blocks.{i}.{bfl}": f"transformer_blocks.{i}.{diff}" for i in range(depth) for bfl, diff in _DOUBLE_NORMS.items()}
    out.update({f"single_blocks.{i}.{bfl}": f"single_transformer_blocks.{i}.{diff}"
                for i in range(depth_single) for bfl, diff in _SINGLE_NORMS.items()})
    return out


def _final(path: str) -> bool:
    return path == FINAL_MOD[0]


def bfl_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare BFL-layout transformer state dict -> FluxTransformer2DModel's."""
    require(sd, ("double_blocks.0.img_attn.qkv.weight", "img_in.weight"), "a bare BFL-layout FLUX state dict")
    hidden = sd["img_in.weight"].shape[0]
    mlp = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden if "single_blocks.0.linear1.weight" in sd else 0
    depth, single = block_count(sd, "double_blocks."), block_count(sd, "single_blocks.")
    approx = block_count(sd, f"{APPROX}.layers.")
    return to_diffusers(sd, module_map(depth, single, hidden, mlp, approx), _final, _norm_renames(depth, single, approx),
                        "FLUX state dict")


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel's state dict (bare, or under `transformer.`) -> BFL's layout."""
    if any(k.startswith("transformer.") for k in sd):
        sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    require(sd, ("transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"), "a diffusers FluxTransformer2DModel state dict")
    hidden = sd["x_embedder.weight"].shape[0]
    mlp = sd["single_transformer_blocks.0.proj_mlp.weight"].shape[0] if "single_transformer_blocks.0.proj_mlp.weight" in sd else 0
    depth, single = block_count(sd, "transformer_blocks."), block_count(sd, "single_transformer_blocks.")
    approx = block_count(sd, f"{APPROX}.layers.")
    renames = {diff: bfl for bfl, diff in _norm_renames(depth, single, approx).items()}
    return from_diffusers(sd, module_map(depth, single, hidden, mlp, approx), _final, renames,
                          "diffusers FLUX state dict")
