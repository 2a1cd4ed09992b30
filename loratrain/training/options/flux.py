"""FLUX.1 options of `loratrain train`: the separate component files and sd-scripts' lora_flux network arguments, named
as sd-scripts' flux_train_network.py names them, plus its flow-matching options (training/flow_matching.py).

Why a group of its own: these options mean something only when the base model is FLUX.1, and an SD option set with
a FLUX model (or a FLUX option with an SD model) would silently do nothing; both are named before any model loads.
"""
from __future__ import annotations

from loratrain.core.config import opt
from loratrain.core.errors import Problem

from ..flow_matching import FlowMatchOptions

FLUX = "FLUX.1"
MODEL_FAMILIES = ("auto", "sd", "flux", "sd3")
#: SD-only options and why they are refused with a FLUX.1 model (FLUX trains on a flow, not a DDPM schedule)
SD_ONLY = {
    "v_parameterization": "FLUX.1 predicts a velocity; there is no v / epsilon choice",
    "min_snr_gamma": "an SNR weight of the DDPM schedule; use weighting_scheme",
    "debiased_estimation_loss": "a DDPM-schedule weight; use weighting_scheme",
    "scale_v_pred_loss_like_noise_pred": "a v-prediction weight of the DDPM schedule",
    "v_pred_like_loss": "a v-prediction weight of the DDPM schedule",
    "zero_terminal_snr": "a DDPM-schedule change; FLUX's flow already ends at pure noise",
    "noise_offset": "not implemented for FLUX.1 yet",
    "multires_noise_iterations": "not implemented for FLUX.1 yet",
    "vae": "FLUX.1's autoencoder is --ae",
    "base_weights": "not implemented for FLUX.1 yet",
    "full_fp16": "not implemented for FLUX.1 yet",
    "fused_backward_pass": "not implemented for FLUX.1 yet",
    "torch_compile": "not implemented for FLUX.1 yet",
    "xformers": "FLUX.1 uses PyTorch's SDPA attention",
    "scale_weight_norms": "not implemented for FLUX.1 yet",
    "save_peft_format": "for FLUX.1 use --save_diffusers_layout",
    "network_train_text_encoder_only": "only the FLUX.1 transformer trains here",
    "weighted_captions": "not implemented for FLUX.1 yet",
    "network_dropout": "not implemented for FLUX.1 yet",
    "rank_dropout": "not implemented for FLUX.1 yet",
    "module_dropout": "not implemented for FLUX.1 yet",
    "conv_dim": "FLUX.1 has no convolutions to train",
    "dim_from_weights": "not implemented for FLUX.1 yet",
    "loraplus_lr_ratio": "not implemented for FLUX.1 yet",
    "loraplus_unet_lr_ratio": "not implemented for FLUX.1 yet",
    "block_dims": "FLUX.1 blocks are chosen with train_blocks",
    "down_lr_weight": "an SD UNet block weight",
    "up_lr_weight": "an SD UNet block weight",
    "mid_lr_weight": "an SD UNet block weight",
}
#: options of this class SD3 takes too (the rest are FLUX.1's own)
FLOW_SHARED = ("clip_l", "t5xxl", "t5_tokenizer", "blocks_to_swap", "cpu_offload_checkpointing", "fsdp", "train_t5xxl")
#: FLUX options a full fine-tune (network_module full) cannot use, and why
FULL_REFUSES = {
    "blocks_to_swap": "block swap keeps each swapped block's weights on the host for good, as frozen LoRA base "
                      "weights; a full fine-tune changes them every step (use --fsdp with several processes)",
    "train_blocks": "a LoRA argument; a full fine-tune trains every block",
    "split_qkv": "a LoRA argument",
    "in_dims": "a LoRA argument",
    "save_diffusers_layout": "writes a LoRA's diffusers twin; a full fine-tune saves the BFL-layout model",
    "train_t5xxl": "a full fine-tune trains the transformer only (as sd-scripts' flux_train.py)",
    # `loratrain finetune` / `dreambooth` options the FLUX.1 full fine-tune does not implement (yet)
    "use_ema": "not implemented for FLUX.1 yet",
    "save_diffusers": "not implemented for FLUX.1 yet (the save is the BFL-layout single file)",
    "stop_text_encoder_training": "FLUX.1's text encoders do not train in a full fine-tune",
}
#: network kinds a FLUX.1 run trains: sd-scripts' lora_flux, or LyCORIS' LoHa / LoKr on the same modules
FLUX_NETWORKS = ("lora", "networks.lora", "lora_flux", "networks.lora_flux")
FLOW_LYCORIS = ("loha", "lokr", "dora")
#: LoRA-only options of the flow families, refused with a LyCORIS kind
LYCORIS_REFUSES = {
    "split_qkv": "an argument of sd-scripts' LoRA (one adapter per q / k / v slice); LyCORIS trains each fused Linear whole",
    "save_diffusers_layout": "diffusers' PEFT layout holds LoRA only; a LoHa / LoKr / DoRA file is read in LyCORIS' layout "
                             "(ComfyUI, A1111, this tool)",
}


def flow_network_problems(cfg: object, lora_spellings: tuple[str, ...], label: str, lora_name: str) -> list[Problem]:
    """The network a FLUX.1 / SD3 run trains: `lora_name` (sd-scripts' spellings), or LoHa / LoKr
    (`lycoris.kohya` with algo=, or their names); the LoRA-only options refused with a LyCORIS kind."""
    module, kind = getattr(cfg, "network_module", "lora"), getattr(cfg, "network_kind", "lora")
    if kind in FLOW_LYCORIS:
        return [(n, f"not with network_module {kind}: {why}") for n, why in LYCORIS_REFUSES.items() if getattr(cfg, n, False)]
    if module not in lora_spellings:
        return [("network_module", f"{module}: {label} trains {lora_name} (LoRA), LoHa, LoKr or DoRA (network_module "
                                   "loha / lokr / dora, or lycoris.kohya with algo=loha / lokr, or dora_wd=True)")]
    return []


class FluxOptions(FlowMatchOptions):
    model_family: str = opt("auto", "auto = from the model's keys; flux = the model must be FLUX.1 (an SD file is refused); "
                            "sd = SD1/SD2/SDXL; sd3 = SD3 / SD3.5", choices=MODEL_FAMILIES, group=FLUX, advanced=True)
    model_type: str = opt("auto", "FLUX.1 family (sd-scripts' --model_type): flux = FLUX.1 dev/schnell, chroma = Chroma "
                          "(no CLIP-L; needs apply_t5_attn_mask); auto = from the transformer's keys. A type the file "
                          "is not is refused", choices=("auto", "flux", "chroma"), group=FLUX, advanced=True)
    clip_l: str = opt("", "FLUX.1: the CLIP-L text encoder (.safetensors, transformers CLIPTextModel keys); default: the one "
                          "inside the model file or folder", group=FLUX, path="file")
    t5xxl: str = opt("", "FLUX.1: the T5-XXL text encoder (.safetensors, transformers T5EncoderModel keys; fp16/bf16/fp8)",
                     group=FLUX, path="file")
    ae: str = opt("", "FLUX.1: the autoencoder (ae.safetensors, BFL / LDM keys)", group=FLUX, path="file")
    t5_tokenizer: str = opt("", "FLUX.1 / SD3: folder of the T5 tokenizer (tokenizer.json; e.g. FLUX.1's tokenizer_2/); "
                                "empty = a diffusers folder's own, else the T5 v1.1 tokenizer shipped with loratrain",
                            group=FLUX, path="dir")
    train_blocks: str = opt("all", "FLUX.1 LoRA (network_args train_blocks): all, single or double blocks",
                            choices=("all", "single", "double"), group=FLUX, advanced=True)
    split_qkv: bool = opt(False, "FLUX.1 LoRA (network_args split_qkv): one LoRA per q / k / v (and MLP-in) slice of the "
                                 "fused Linears", group=FLUX, advanced=True)
    blocks_to_swap: int = opt(0, "FLUX.1 / SD3: keep this many of the last transformer blocks in host memory and copy "
                                 "each to the GPU just before it runs (sd-scripts' meaning: FLUX N//2 double and "
                                 "(N-N//2)*2 single blocks, SD3 the last N joint blocks); less GPU memory, slower steps; "
                                 "needs gradient_checkpointing", ge=0, group=FLUX, advanced=True)
    cpu_offload_checkpointing: bool = opt(False, "FLUX.1 / SD3 (sd-scripts' option): with gradient checkpointing, keep the "
                                                 "activations between transformer blocks in host memory (less GPU "
                                                 "memory, a copy per block each way); turns gradient_checkpointing on; "
                                                 "not with blocks_to_swap (as sd-scripts)", group=FLUX, advanced=True)
    save_diffusers_layout: bool = opt(False, "FLUX.1: also write each saved LoRA in the diffusers layout (`transformer.*` "
                                             "lora_A / lora_B) beside it as <name>.diffusers.safetensors", group=FLUX,
                                      advanced=True)
    train_t5xxl: bool = opt(False, "FLUX.1 / SD3 LoRA (network_args train_t5xxl): train a LoRA on T5-XXL too (lora_te3_*), "
                                   "besides the CLIP encoders that train unless network_train_unet_only", group=FLUX,
                            advanced=True)
    fsdp: bool = opt(False, "FLUX.1 full fine-tune (network_module full) with several processes: shard the transformer's "
                            "weights, gradients and optimizer state across them (PyTorch FSDP2), each process holding "
                            "1/N; launch with torchrun / accelerate launch", group=FLUX, advanced=True)
    in_dims: str = opt("", "FLUX.1 LoRA (network_args in_dims): ranks of the img, time, vector, guidance, txt input "
                           "embedders, e.g. [4,0,0,0,4]", group=FLUX, advanced=True)

    def in_dims_list(self) -> list[int] | None:
        text = self.in_dims.strip().strip("[]")
        return [int(v) for v in text.replace(",", " ").split()] if text else None

    def problems(self) -> list[Problem]:
        out = super().problems()
        try:
            dims = self.in_dims_list()
        except ValueError:
            return out + [("in_dims", f"{self.in_dims!r}: give 5 integer ranks, e.g. [4,0,0,0,4]")]
        if dims is not None and (len(dims) != 5 or min(dims) < 0):
            out.append(("in_dims", f"{self.in_dims!r}: give 5 ranks >= 0 (img, time, vector, guidance, txt)"))
        out += self._fsdp_problems()
        if self.train_t5xxl and getattr(self, "network_train_unet_only", False):
            out.append(("train_t5xxl", "trains a text encoder, but network_train_unet_only trains the transformer only"))
        if self.blocks_to_swap and self.cpu_offload_checkpointing:  # FLUX.1 and SD3 alike, whatever the model
            out.append(("cpu_offload_checkpointing", "not with blocks_to_swap (sd-scripts refuses the pair too): choose "
                                                     "one way to save GPU memory"))
        return out

    def _fsdp_problems(self) -> list[Problem]:
        """--fsdp shards a full fine-tune (samples and validation then run on every process: flux_full.py)."""
        if not self.fsdp:
            return []
        if getattr(self, "network_kind", "") != "full":
            return [("fsdp", "shards a full fine-tune: needs network_module full (a LoRA's few weights are not worth "
                             "sharding)")]
        return []

    def is_flux(self) -> bool:
        from loratrain.core.models.flux_loading import is_flux_model

        if self.model_family != "auto":
            return self.model_family == "flux"
        return bool(getattr(self, "pretrained_model_name_or_path", "")) and is_flux_model(self.pretrained_model_name_or_path)

    def requirements(self) -> list[Problem]:
        """With a FLUX.1 model: every part found (headers only), and no SD-only option set; with an SD model: no FLUX
        option set."""
        from loratrain.core.errors import ConfigError
        from loratrain.core.models.flux_loading import flux_sources

        model = getattr(self, "pretrained_model_name_or_path", "")
        if not model:
            return []
        flux_set = [n for n in ("clip_l", "t5xxl", "ae", "t5_tokenizer", "in_dims") if getattr(self, n)]
        flux_set += ["model_type"] * (self.model_type != "auto")
        flux_set += ["train_blocks"] * (self.train_blocks != "all") + ["split_qkv"] * self.split_qkv
        flux_set += ["blocks_to_swap"] * bool(self.blocks_to_swap) + ["save_diffusers_layout"] * self.save_diffusers_layout
        flux_set += ["train_t5xxl"] * self.train_t5xxl + ["fsdp"] * self.fsdp
        flux_set += ["cpu_offload_checkpointing"] * self.cpu_offload_checkpointing
        if not self.is_flux():
            if getattr(self, "is_sd3", lambda: False)():  # SD3 shares some and refuses the rest (options/sd3.py)
                return []
            if self.model_family == "sd" or flux_set:
                return [(n, f"a {'FLUX.1 / SD3' if n in FLOW_SHARED else 'FLUX.1'} option, but the model is "
                            f"{'neither' if n in FLOW_SHARED else 'not FLUX.1'}") for n in flux_set]
            return []
        out: list[Problem] = []
        try:
            found = flux_sources(model, self.clip_l, self.t5xxl, self.ae, self.t5_tokenizer, self.model_type)
            if found.config.chroma and not self.apply_t5_attn_mask:  # sd-scripts asserts it for Chroma
                out.append(("apply_t5_attn_mask", "Chroma needs --apply_t5_attn_mask (it attends only each prompt's "
                                                  "T5 tokens; sd-scripts refuses Chroma without it)"))
            if self.blocks_to_swap:
                from loratrain.core.models.block_swap import swap_counts

                swap_counts(found.config.depth, found.config.depth_single_blocks, self.blocks_to_swap)
        except ConfigError as e:
            field, _, text = str(e).partition(": ")
            out.append((field, text) if field in type(self).model_fields else ("pretrained_model_name_or_path", str(e)))
        defaults = type(self).model_fields
        for name, why in SD_ONLY.items():
            if name in defaults and getattr(self, name) != defaults[name].get_default(call_default_factory=True):
                out.append((name, f"not with a FLUX.1 model: {why}"))
        if self.blocks_to_swap and not getattr(self, "gradient_checkpointing", False):
            out.append(("blocks_to_swap", "needs --gradient_checkpointing (a swapped block's weights must not be "
                                          "kept for backward)"))
        full = getattr(self, "network_kind", "") == "full"
        if full:
            out += [(n, f"not with a FLUX.1 full fine-tune: {why}") for n, why in FULL_REFUSES.items()
                    if n in defaults and getattr(self, n) != defaults[n].get_default(call_default_factory=True)]
        else:
            out += flow_network_problems(self, FLUX_NETWORKS, "FLUX.1", "networks.lora_flux")
        if getattr(self, "loss_type", "l2") not in ("l2", "l1"):
            out.append(("loss_type", f"{self.loss_type}: FLUX.1 trains with l2 or l1 here (huber not yet)"))
        return out
