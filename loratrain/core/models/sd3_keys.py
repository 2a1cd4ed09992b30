"""SD3/SD3.5 transformer weights between the single-file layout (our model, SAI's files) and diffusers'
SD3Transformer2DModel.

Why: a diffusers folder (`transformer/`) must load into our single-file-layout model, and a checkpoint we write must be
readable by diffusers. The differences are names plus two reshapes: the single file fuses q/k/v (`attn.qkv`,
`attn2.qkv`) where diffusers keeps separate Linears; and two AdaLN layers emit [shift | scale] in the file where
diffusers' AdaLayerNormContinuous emits [scale | shift]: the final layer's and the last block's pre-only context half.
"""
from __future__ import annotations

import torch

from .dit_parts import block_count
from .fused_keys import from_diffusers, require, to_diffusers

#: one-to-one top-level modules: single-file path -> diffusers path
_TOP = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_POS = ("pos_embed", "pos_embed.pos_embed")
#: per block (joint_blocks.N. <-> transformer_blocks.N.): modules that exist only when the diffusers side has them
_BLOCK = {
    "x_block.adaLN_modulation.1": "norm1.linear", "context_block.adaLN_modulation.1": "norm1_context.linear",
    "x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
}
_NORMS = {
    "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
}
#: fused single-file q/k/v -> the diffusers Linears its output rows split into, in order
QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
       "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def module_map(depth: int, hidden: int) -> dict[str, list[tuple[str, int, int]]]:
    """Single-file Linear/Conv path -> [(diffusers path, first row, end row)] for every weight-bearing module of a
    transformer of this depth (modules a given model lacks, e.g. attn2 or the last block's MLP, are simply absent
    from its state dict). A one-to-one module maps to one entry covering all rows (end -1)."""
    out: dict[str, list[tuple[str, int, int]]] = {k: [(v, 0, -1)] for k, v in _TOP.items()}
    out[FINAL_MOD[0]] = [(FINAL_MOD[1], 0, -1)]
    for i in range(depth):
        for ours, theirs in _BLOCK.items():
            out[f"joint_blocks.{i}.{ours}"] = [(f"transformer_blocks.{i}.{theirs}", 0, -1)]
        for ours, parts in QKV.items():
            out[f"joint_blocks.{i}.{ours}"] = [(f"transformer_blocks.{i}.{p}", j * hidden, (j + 1) * hidden)
                                               for j, p in enumerate(parts)]
    return out


def _swapped(path: str, depth: int, pre_only_last: bool) -> bool:
    """Whether this module's output halves are ordered differently in diffusers (see the module docstring)."""
    return path == FINAL_MOD[0] or (pre_only_last and path == f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1")


def _renames(depth: int) -> dict[str, str]:
    """Single-file key -> diffusers key of the position table and every q/k norm weight."""
    out = {f"joint_blocks.{i}.{ours}.weight": f"transformer_blocks.{i}.{theirs}.weight"
           for i in range(depth) for ours, theirs in _NORMS.items()}
    out[_POS[0]] = _POS[1]
    return out


def sd3_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare single-file SD3 transformer state dict -> SD3Transformer2DModel's."""
    require(sd, ("joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight"), "a bare single-file SD3 state dict")
    depth, hidden = block_count(sd, "joint_blocks."), sd["x_embedder.proj.weight"].shape[0]
    pre_only = f"joint_blocks.{depth - 1}.context_block.mlp.fc1.weight" not in sd
    return to_diffusers(sd, module_map(depth, hidden), lambda p: _swapped(p, depth, pre_only), _renames(depth),
                        "SD3 state dict")


def diffusers_to_sd3(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel's state dict (bare, or under `transformer.`) -> the single-file layout (bare keys)."""
    if any(k.startswith("transformer.") for k in sd):
        sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    require(sd, ("transformer_blocks.0.attn.add_q_proj.weight", "pos_embed.proj.weight"),
            "a diffusers SD3Transformer2DModel state dict")
    depth, hidden = block_count(sd, "transformer_blocks."), sd["pos_embed.proj.weight"].shape[0]
    pre_only = f"transformer_blocks.{depth - 1}.ff_context.net.0.proj.weight" not in sd
    renames = {theirs: ours for ours, theirs in _renames(depth).items()}
    return from_diffusers(sd, module_map(depth, hidden), lambda p: _swapped(p, depth, pre_only), renames,
                          "diffusers SD3 state dict")
