"""FLUX.1 LoRA files between the layouts people share them in, and our kohya (`lora_flux`) layout.

Why: FLUX LoRAs come from several trainers. sd-scripts writes `lora_unet_double_blocks_N_img_attn_qkv.lora_down/up`
on BFL's fused Linears (our layout, `flux_network.py`). diffusers, SimpleTuner (diffusers' `save_lora_weights`, PEFT
keys) and ai-toolkit write diffusers module names with PEFT's `lora_A`/`lora_B` under `transformer.` (ai-toolkit
also `diffusion_model.` prefixes and `lora_down`/`lora_up`), where q, k and v (and, in single blocks, the MLP-in
`proj_mlp`) are separate Linears. ComfyUI-style files put BFL names under `diffusion_model.`. Every tool here (bake,
merge, resize, `--network_weights`) reads our layout, so the others are converted on the way in, exactly:

- diffusers -> kohya: the separate q/k/v (/MLP-in) LoRAs of one fused BFL Linear become one LoRA on it. When they
  share one `lora_A` and one scale (what we write, and what a LoRA trained on the fused Linear means) the result is
  that A with the B rows stacked; otherwise their A's are stacked and their B's put on the block diagonal (rank = the
  sum of their ranks), which is sd-scripts' split_qkv form. A missing slice is zero rows. ΔW is the same, row for row.
- kohya -> diffusers (`--save_diffusers_layout`): each fused LoRA's up rows split over the diffusers Linears; a
  block-diagonal (split_qkv) up gives each slice only its own columns. alpha/rank is folded into `lora_B`, so the file
  needs no alpha: diffusers, PEFT and ComfyUI all read it at scale 1 (lora_alpha = r is PEFT's default).

alpha in the PEFT layout: a `<module>.alpha` key (some ai-toolkit / kohya-converted files), else the
`lora_adapter_metadata` diffusers writes into the safetensors header (`lora_alpha`, `r`, `alpha_pattern`), else
scale 1 (alpha = rank). The final AdaLN's rows are [shift | scale] in BFL and [scale | shift] in diffusers: swapped.
Text-encoder LoRAs: CLIP-L `lora_te1_*` <-> `text_encoder.*`, T5 `lora_te3_*` <-> `text_encoder_2.*` (names only).
"""
from __future__ import annotations

import json
import re

import torch

from loratrain.core.errors import ConfigError
from loratrain.core.models.dit_parts import block_count
from loratrain.core.models.flux_keys import FINAL_MOD, module_map, swap_halves

from .flux_network import DOUBLE, PREFIX, SINGLE

#: prefixes trainers put in front of the transformer's module paths
_TRANSFORMER_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_TE = {"text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te3_"}
_TOP_BFL = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
            "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", FINAL_MOD[0])
_PARTS = {"lora_A.weight": "down", "lora_A.default.weight": "down", "lora_down.weight": "down",
          "lora_B.weight": "up", "lora_B.default.weight": "up", "lora_up.weight": "up", "alpha": "alpha"}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_CLIP = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")
_T5 = re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention_[qkvo]|DenseReluDense_(?:wi_0|wi_1|wi|wo))$")


def is_kohya_flux(keys: object) -> bool:
    return any(str(k).startswith((PREFIX + "double_blocks_", PREFIX + "single_blocks_")) for k in keys)  # type: ignore[attr-defined]


def is_flux_lora(keys: object) -> bool:
    """Whether a LoRA state dict's keys are a FLUX.1 transformer's, in any layout this module reads. (A diffusers-layout
    file with double blocks only names the same modules as an SD3 one; it is told apart by its single blocks.)"""
    keys = list(keys)  # type: ignore[call-overload]
    return is_kohya_flux(keys) or any(w in k for k in keys for w in ("single_transformer_blocks.", "double_blocks.",
                                                                     "single_blocks."))


def bfl_path(name: str) -> str | None:
    """A BFL module path from a kohya name (`lora_unet_double_blocks_0_img_attn_qkv` -> `double_blocks.0.img_attn.qkv`)."""
    body = name[len(PREFIX):]
    m = re.match(r"^(double|single)_blocks_(\d+)_(.+)$", body)
    if m:
        kind, i, rest = m.groups()
        table = {p.replace(".", "_"): p for p in (DOUBLE if kind == "double" else SINGLE)}
        return f"{kind}_blocks.{i}.{table[rest]}" if rest in table else None
    return {p.replace(".", "_"): p for p in _TOP_BFL}.get(body)


def _te_path(name: str) -> tuple[str, str] | None:
    """(diffusers prefix, module path) of a kohya text-encoder name, None when not one we know."""
    for prefix, kohya in _TE.items():
        if name.startswith(kohya):
            body = name[len(kohya):]
            m = _CLIP.match(body) if kohya == "lora_te1_" else _T5.match(body)
            if not m:
                return None
            if kohya == "lora_te1_":
                layer, mod = m.groups()
                mod = mod.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
                return prefix, f"text_model.encoder.layers.{layer}.{mod}"
            block, layer, mod = m.groups()
            mod = mod.replace("SelfAttention_", "SelfAttention.").replace("DenseReluDense_", "DenseReluDense.")
            return prefix, f"encoder.block.{block}.layer.{layer}.{mod}"
    return None


def _metadata_alphas(meta: dict[str, str] | None) -> tuple[float | None, dict[str, float]]:
    """(global lora_alpha / r scale numerator, per-module alpha) from diffusers' `lora_adapter_metadata`."""
    raw = (meta or {}).get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise ConfigError("LoRA metadata lora_adapter_metadata is not JSON") from None
    data = {k.removeprefix("transformer."): v for k, v in data.items()} if isinstance(data, dict) else {}
    alpha = data.get("lora_alpha")
    pattern = data.get("alpha_pattern") or {}
    return (float(alpha) if alpha is not None else None), {str(k): float(v) for k, v in pattern.items()}


def _group(sd: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for suffix, part in _PARTS.items():
            if key.endswith("." + suffix):
                groups.setdefault(key[:-len(suffix) - 1], {})[part] = value
                break
        else:
            if "lora_magnitude_vector" in key or key.endswith(".dora_scale"):
                raise ConfigError(f"{source}: {key}: a DoRA FLUX LoRA; only plain LoRA converts between layouts so far")
            raise ConfigError(f"{source}: {key} is not part of a LoRA (lora_A/lora_B, lora_down/lora_up or alpha)")
    for name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise ConfigError(f"{source}: module {name} lacks its {'lora_B / lora_up' if 'down' in parts else 'lora_A / lora_down'}")
    return groups


def flux_lora_to_kohya(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                       source: str = "LoRA") -> dict[str, torch.Tensor]:
    """Any FLUX LoRA layout above -> our kohya layout, same ΔW for every Linear. A kohya file comes back as it is."""
    if all(k.startswith(("lora_unet_", "lora_te")) for k in sd):
        return dict(sd)
    groups = _group(sd, source)
    meta_alpha, pattern = _metadata_alphas(metadata)
    out: dict[str, torch.Tensor] = {}
    transformer: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # diffusers/BFL path -> (down, up, scale)
    for name, parts in groups.items():
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        if alpha is None:
            short = next((p for p in _TRANSFORMER_PREFIXES if name.startswith(p)), "")
            alpha = next((v for k, v in pattern.items() if name[len(short):] == k or name.endswith("." + k)), meta_alpha)
        te = next((p for p in _TE if name.startswith(p)), None)
        if te is not None:
            kohya = _TE[te] + name[len(te):].replace(".", "_")
            out.update({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                        f"{kohya}.alpha": torch.tensor(float(alpha if alpha is not None else rank))})
            continue
        path = name
        for p in _TRANSFORMER_PREFIXES:
            path = path.removeprefix(p)
        transformer[path] = (down, up, (alpha / rank) if alpha is not None else 1.0)
    if not transformer:
        return out
    paths = list(transformer)
    if any(p.startswith(("double_blocks.", "single_blocks.")) or p in _TOP_BFL for p in paths):  # BFL names (ComfyUI)
        for path, (down, up, scale) in transformer.items():
            m = _BLOCK.match(path)
            if (m and m.group(3) not in (DOUBLE if m.group(1) == "double_blocks" else SINGLE)) or (not m and path not in _TOP_BFL):
                raise ConfigError(f"{source}: {path} is no Linear of a FLUX.1 transformer")
            _put(out, PREFIX + path.replace(".", "_"), down, up, scale)
        return out
    hidden, mlp = _sizes(transformer, source)
    table = module_map(block_count(paths, "transformer_blocks."), block_count(paths, "single_transformer_blocks."), hidden, mlp)
    where = {diff: (bfl, start, end) for bfl, targets in table.items() for diff, start, end in targets}
    unknown = sorted(set(paths) - set(where))
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]} is no Linear of a FLUX.1 transformer (diffusers names)")
    for bfl, targets in table.items():
        present = [(transformer[d], s, e) for d, s, e in targets if d in transformer]
        if not present:
            continue
        name = PREFIX + bfl.replace(".", "_")
        if len(targets) == 1:
            (down, up, scale), _, _ = present[0]
            _put(out, name, down, swap_halves(up) if bfl == FINAL_MOD[0] else up, scale)
            continue
        out_rows = targets[-1][2]
        downs = [d for (d, _, _), _, _ in present]
        scales = {s for (_, _, s), _, _ in present}
        if len(present) == len(targets) and len(scales) == 1 and all(torch.equal(d, downs[0]) for d in downs):
            _put(out, name, downs[0], torch.cat([u for (_, u, _), _, _ in present]), scales.pop())
            continue
        rank = sum(d.shape[0] for d in downs)
        dtype = downs[0].dtype
        same = len(scales) == 1
        up = torch.zeros(out_rows, rank, dtype=torch.float32 if not same else dtype)
        col = 0
        for (d, u, s), start, end in present:
            up[start:end, col:col + d.shape[0]] = u if same else u.float() * s
            col += d.shape[0]
        _put(out, name, torch.cat([d.to(dtype) for d in downs]), up.to(dtype), scales.pop() if same else 1.0)
    return out


def _put(out: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
    out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)


def _sizes(transformer: dict[str, tuple[torch.Tensor, torch.Tensor, float]], source: str) -> tuple[int, int]:
    """(hidden, MLP hidden) of the model a diffusers-layout LoRA was made for, read from its shapes: every block Linear
    but the MLP-outs takes `hidden` inputs; the MLP width from an MLP Linear, else FLUX.1's ratio 4."""
    hidden = mlp = None
    for path, (down, up, _) in transformer.items():
        if re.search(r"\.(attn\.to_q|attn\.to_k|attn\.to_v|norm1\.linear|norm\.linear|proj_mlp|attn\.add_q_proj)$", path):
            hidden = hidden or down.shape[1]
        if path.endswith(("ff.net.0.proj", "ff_context.net.0.proj", "proj_mlp")):
            mlp = mlp or up.shape[0]
        if path.endswith(("ff.net.2", "ff_context.net.2")):
            mlp = mlp or down.shape[1]
    if hidden is None:
        for path, (down, up, _) in transformer.items():
            if path.endswith(("attn.to_out.0", "attn.to_add_out")) or path in ("x_embedder", "context_embedder", "proj_out"):
                hidden = up.shape[0] if path != "proj_out" else down.shape[1]
                break
    if hidden is None:
        raise ConfigError(f"{source}: cannot tell the FLUX hidden size from this LoRA's modules")
    return hidden, mlp or 4 * hidden


def kohya_flux_to_diffusers(sd: dict[str, torch.Tensor], prefix: str = "transformer") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our kohya layout -> diffusers' (`transformer.<module>.lora_A/lora_B.weight`, alpha folded into lora_B).

    Returns the state dict and the kohya modules it could not place (names it does not know).
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = value
    out: dict[str, torch.Tensor] = {}
    skipped = []
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ConfigError(f"{name}: not a plain LoRA module (no lora_down / lora_up); only LoRA converts to diffusers")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else float(down.shape[0])
        scale = alpha / down.shape[0]
        te = _te_path(name)
        if te is not None:
            _put_peft(out, te[0] + te[1], down, up, scale)
            continue
        path = bfl_path(name) if name.startswith(PREFIX) else None
        if path is None:
            skipped.append(name)
            continue
        hidden = down.shape[1]
        mlp = up.shape[0] - 3 * hidden if path.endswith("linear1") else 4 * hidden
        m = _BLOCK.match(path)
        index = int(m.group(2)) + 1 if m else 0
        table = module_map(index if path.startswith("double") else 0, index if path.startswith("single") else 0, hidden, mlp)
        targets = table[path]
        if path == FINAL_MOD[0]:
            up = swap_halves(up)
        if len(targets) == 1:
            _put_peft(out, f"{prefix}.{targets[0][0]}", down, up, scale)
            continue
        used = [set(torch.nonzero(up[s:e].abs().sum(0)).flatten().tolist()) for _, s, e in targets]
        disjoint = sum(len(u) for u in used) == len(set().union(*used)) and sum(bool(u) for u in used) > 1
        for (diff, start, end), cols in zip(targets, used):
            if disjoint:
                if not cols:
                    continue
                idx = torch.tensor(sorted(cols))
                _put_peft(out, f"{prefix}.{diff}", down[idx], up[start:end][:, idx], scale)
            else:
                _put_peft(out, f"{prefix}.{diff}", down, up[start:end], scale)
    return out, skipped


def _put_peft(out: dict[str, torch.Tensor], module: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    out[f"{module}.lora_A.weight"] = down.clone()  # q/k/v share one A: separate copies, as safetensors requires
    out[f"{module}.lora_B.weight"] = (up.clone() if scale == 1.0 else (up.float() * scale).to(up.dtype)).contiguous()


def save_diffusers_layout(sd: dict[str, torch.Tensor], path: object, metadata: dict[str, str] | None = None) -> list[str]:
    """Write the diffusers-layout copy of a kohya FLUX LoRA (atomically); returns the modules left out."""
    from loratrain.core.safe_io import save_safetensors

    converted, skipped = kohya_flux_to_diffusers(sd)
    save_safetensors(converted, path, {**(metadata or {}), "format": "pt"})  # type: ignore[arg-type]
    return skipped
