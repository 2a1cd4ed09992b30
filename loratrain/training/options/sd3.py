"""SD3 / SD3.5 options of `loratrain train`, named as sd-scripts' sd3_train_network.py names them: the CLIP-G file,
the CLIP masks and lora_sd3's network arguments. The CLIP-L / T5-XXL files, the T5 tokenizer, `--vae`, the flow
options (weighting_scheme, logit_mean/std, mode_scale, training_shift, apply_t5_attn_mask, t5xxl_max_token_length)
and `split_qkv` are shared with FLUX.1 and SD.

Why a group of its own: these options mean something only with an SD3 model, and an option of another family would
silently do nothing there; both directions are named before any model loads.
"""
from __future__ import annotations

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem

SD3 = "SD3.5"
#: FLUX.1 options that mean nothing to SD3 (sd-scripts' sd3_train_network.py has no such option), and why
FLUX_ONLY = {
    "ae": "SD3's VAE is --vae",
    "train_blocks": "SD3 blocks are chosen with train_block_indices",
    "in_dims": "SD3's embedders take emb_dims",
    "timestep_sampling": "SD3 draws timesteps with weighting_scheme and training_shift",
    "sigmoid_scale": "SD3 draws timesteps with weighting_scheme and training_shift",
    "discrete_flow_shift": "SD3's shift is training_shift",
    "model_prediction_type": "SD3's prediction is always the preconditioned one (noisy - sigma * output)",
    "guidance_scale": "SD3 has no guidance input",
    "model_type": "flux / chroma name FLUX.1 files; an SD3 model is told from its keys",
}
#: SD1/SDXL options refused with SD3 besides FluxOptions' SD_ONLY list (which names them for FLUX.1)
SD3_NETWORKS = ("lora", "networks.lora", "lora_sd3", "networks.lora_sd3")
#: options an SD3 full fine-tune (network_module full; sd-scripts' sd3_train.py) cannot use, and why
SD3_FULL_REFUSES = {
    "blocks_to_swap": "block swap keeps each swapped block's weights on the host for good, as frozen LoRA base "
                      "weights; a full fine-tune changes them every step (use --fsdp with several processes)",
    "split_qkv": "a LoRA argument",
    "train_block_indices": "a LoRA argument; a full fine-tune trains every block",
    "emb_dims": "a LoRA argument",
    "save_diffusers_layout": "writes a LoRA's diffusers twin; a full fine-tune saves the single-file model",
    "train_t5xxl": "a full fine-tune trains the transformer only here (sd3_train.py's --train_text_encoder is not built)",
    "use_ema": "not implemented for SD3 yet",
    "save_diffusers": "not implemented for SD3 yet (the save is the single-file model, as sd3_train.py writes)",
    "stop_text_encoder_training": "SD3's text encoders do not train in a full fine-tune here",
}


class SD3Options(BaseModel):
    clip_g: str = opt("", "SD3.5: the CLIP-G text encoder (.safetensors with text_projection, transformers "
                          "CLIPTextModelWithProjection keys); default: the one inside the model file or folder",
                      group=SD3, path="file")
    apply_lg_attn_mask: bool = opt(False, "SD3.5: mask CLIP-L's and CLIP-G's padding tokens in the text encoders",
                                   group=SD3, advanced=True)
    train_block_indices: str = opt("", "SD3.5 LoRA (network_args train_block_indices): joint blocks that get a LoRA, "
                                       "all / none / e.g. 0-5,10; empty = all", group=SD3, advanced=True)
    emb_dims: str = opt("", "SD3.5 LoRA (network_args emb_dims): ranks of context_embedder, t_embedder, x_embedder, "
                            "y_embedder, final modulation and final linear, e.g. [4,0,0,4,0,4]", group=SD3, advanced=True)

    def emb_dims_list(self) -> list[int] | None:
        text = self.emb_dims.strip().strip("[]")
        return [int(v) for v in text.replace(",", " ").split()] if text else None

    def problems(self) -> list[Problem]:
        try:
            dims = self.emb_dims_list()
        except ValueError:
            return [("emb_dims", f"{self.emb_dims!r}: give 6 integer ranks, e.g. [4,0,0,4,0,4]")]
        if dims is not None and (len(dims) != 6 or min(dims) < 0):
            return [("emb_dims", f"{self.emb_dims!r}: give 6 ranks >= 0 (context, t, x, y, final_mod, final_linear)")]
        return []

    def is_sd3(self) -> bool:
        from loratrain.core.models.sd3_loading import is_sd3_model

        family = getattr(self, "model_family", "auto")
        if family != "auto":
            return family == "sd3"
        model = getattr(self, "pretrained_model_name_or_path", "")
        return bool(model) and is_sd3_model(model)

    def requirements(self) -> list[Problem]:
        """With an SD3 model: every part found (headers only), lora_sd3's block selection valid, and no option of
        another family set; with any other model: no SD3 option set."""
        from loratrain.core.errors import ConfigError
        from loratrain.core.models.sd3_loading import sd3_sources

        from .flux import SD_ONLY

        model = getattr(self, "pretrained_model_name_or_path", "")
        if not model:
            return []
        own = [n for n in ("clip_g", "train_block_indices", "emb_dims") if getattr(self, n)]
        own += ["apply_lg_attn_mask"] * self.apply_lg_attn_mask + ["training_shift"] * (getattr(self, "training_shift", 1.0) != 1.0)
        if not self.is_sd3():
            return [(n, "an SD3.5 option, but the model is not SD3/SD3.5") for n in own]
        out: list[Problem] = []
        try:
            found = sd3_sources(model, getattr(self, "clip_l", ""), self.clip_g, getattr(self, "t5xxl", ""),
                                getattr(self, "vae", "") or "", getattr(self, "t5_tokenizer", ""))
            if self.train_block_indices:
                from loratrain.core.lora.sd3_network import parse_block_selection

                parse_block_selection(self.train_block_indices, found.config.num_layers)
            out += _weights_problems(getattr(self, "network_weights", ""), found.config)
            swap = getattr(self, "blocks_to_swap", 0)
            if swap > found.config.num_layers:
                out.append(("blocks_to_swap", f"{swap} joint blocks; this model has {found.config.num_layers}"))
            if swap and not getattr(self, "gradient_checkpointing", False):
                out.append(("blocks_to_swap", "needs --gradient_checkpointing (a swapped block's weights must not be "
                                              "kept for backward)"))
        except ConfigError as e:
            field, _, text = str(e).partition(": ")
            if field.startswith("network_args train_block_indices"):
                field, text = "train_block_indices", str(e)
            out.append((field, text) if field in type(self).model_fields else ("pretrained_model_name_or_path", str(e)))
        defaults = type(self).model_fields
        refused = {k: v for k, v in SD_ONLY.items() if k != "vae"} | FLUX_ONLY
        for name, why in refused.items():
            if name in defaults and getattr(self, name) != defaults[name].get_default(call_default_factory=True):
                out.append((name, f"not with an SD3 model: {why}"))
        from .flux import FLOW_LYCORIS, flow_network_problems

        if getattr(self, "network_kind", "lora") == "full":
            out += [(n, f"not with an SD3 full fine-tune: {why}") for n, why in SD3_FULL_REFUSES.items()
                    if n in defaults and getattr(self, n) != defaults[n].get_default(call_default_factory=True)]
        else:
            out += flow_network_problems(self, SD3_NETWORKS, "SD3", "networks.lora_sd3")
        if getattr(self, "network_kind", "lora") in FLOW_LYCORIS and not self.problems() and (self.emb_dims_list() or [0] * 3)[2]:
            out.append(("emb_dims", "x_embedder's rank (the 3rd value) trains the patchifying conv: a LoRA argument; "
                                    "LoHa / LoKr train Linears only"))
        if getattr(self, "loss_type", "l2") not in ("l2", "l1"):
            out.append(("loss_type", f"{self.loss_type}: SD3 trains with l2 or l1 here (huber not yet)"))
        return out


def _weights_problems(value: str, config: object) -> list[Problem]:
    """`--network_weights` FILE must name modules of this SD3 model (a FLUX or SD LoRA is refused before anything
    loads, from the file's header); a training-state folder is checked when it loads."""
    from pathlib import Path

    from loratrain.core.lora.sd3_network import kohya_name, linear_shapes
    from loratrain.core.paths import confine

    if not value or not value.endswith(".safetensors") or not Path(value).is_file():
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(confine(value, "network_weights")), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - an unreadable header is the user's file problem
        return [("network_weights", f"{value} is not a readable .safetensors file ({e})")]
    names = {k.split(".", 1)[0] for k in keys}
    known = {kohya_name(p) for p in linear_shapes(config)}  # type: ignore[arg-type]
    if any(".lora_A." in k for k in keys):  # diffusers' PEFT layout (sd3_layouts.py reads it): its module names
        from loratrain.core.lora.sd3_layouts import PREFIX
        from loratrain.core.models.sd3_keys import module_map

        known = {PREFIX + theirs for targets in module_map(config.num_layers, config.hidden_size).values()  # type: ignore[attr-defined]
                 for theirs, _, _ in targets}
        names = {k.split(".lora_", 1)[0] for k in keys}
    unknown = sorted(n for n in names if n not in known and not n.startswith("lora_te"))
    if unknown:
        return [("network_weights", f"{value}: module {unknown[0]} is not a layer of this SD3 model (a LoRA for "
                                    "another model or SD3 size?)")]
    return []
