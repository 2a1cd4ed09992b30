"""SD3 / SD3.5 LoRA training: `loratrain train` with an SD3 base model, as sd-scripts' sd3_train_network.py trains it.

Why a subclass of the FLUX.1 trainer: the data, loop, caption and latent caches, saving, validation and bit-exact
resume are the same flow-matching trainer; SD3 differs in its parts (MMDiT + CLIP-L + CLIP-G + T5-XXL + 16-channel
VAE, core/models/sd3_loading.py), its conditioning (core/sd3_sampling.py's encode_texts: CLIP states padded beside T5's,
projected pooled vectors), its timestep draw and loss (sd-scripts' sd3_train_utils: u from weighting_scheme's density,
shifted by training_shift, integer timesteps; the output preconditioned to noisy - sigma * output and compared with
the clean latents, weighted by weighting_scheme) and its LoRA (networks.lora_sd3, core/lora/sd3_network.py).
Without `--network_train_unet_only` CLIP-L and CLIP-G LoRAs train too (`lora_te1_*`, `lora_te2_*`), and T5-XXL's with
network_args train_t5xxl=True (`lora_te3_*`), as sd-scripts' sd3_train_network.py trains them (the FLUX trainer's
machinery; text_encoder_lr is sd-scripts' [CLIP-L, CLIP-G, T5] list).
"""
from __future__ import annotations

import torch

from loratrain.core import sd3_sampling
from loratrain.core.lora.sd3_network import create_sd3_lora
from loratrain.core.models.sd3_loading import load_sd3, sd3_sources
from loratrain.core.sd3_sampling import SD3TextOptions

from . import flow_matching as fm
from .flux_trainer import FluxLoRATrainer
from .networks.base import NetworkSpec
from .networks.sd3 import SD3Network

#: sd-scripts' SD3 metadata keys (sd3_train_network.py update_metadata) and the options they record
SD3_METADATA = ("apply_lg_attn_mask", "apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std", "mode_scale")
#: SD3's single-file layout keeps the transformer's blocks under this name (what --fp8_base stores in float8)
FP8_PARTS = ("joint_blocks.",)


class SD3LoRATrainer(FluxLoRATrainer):
    ENCODERS = ("clip_l", "clip_g", "t5xxl")
    TEXT = sd3_sampling
    METADATA_KEYS = SD3_METADATA

    # -- parts ---------------------------------------------------------------------------------
    def _sources(self):
        cfg = self.cfg
        return sd3_sources(cfg.pretrained_model_name_or_path, cfg.clip_l, cfg.clip_g, cfg.t5xxl, cfg.vae or "",
                           cfg.t5_tokenizer)

    def _load_model(self, sources, weight_dtype: torch.dtype) -> None:
        cfg = self.cfg
        self.flux = load_sd3(sources, weight_dtype)  # the flow trainer's model slot (transformer, ae, encoders)
        self.variant = self.flux.variant
        self.t5_len = fm.t5_max_length(cfg, "sd3")
        self.text_opts = SD3TextOptions(self.t5_len, cfg.apply_lg_attn_mask, cfg.apply_t5_attn_mask)
        self.reporter.log(f"model: SD3 {self.variant} from {sources.transformer.path.name} (CLIP-L {sources.clip_l.path.name}, "
                          f"CLIP-G {sources.clip_g.path.name}, T5-XXL {sources.t5xxl.path.name}, VAE "
                          f"{sources.vae.path.name}); T5 tokens {self.t5_len}")

    def _place(self, transformer: torch.nn.Module, weight_dtype: torch.dtype):
        from .flux_memory import place_transformer  # fp8_base (the joint blocks' Linears), blocks_to_swap (joint blocks)

        return place_transformer(transformer, self.cfg, self.device, weight_dtype, self.reporter.log, fp8_parts=FP8_PARTS)

    def _build_network(self) -> SD3Network:
        cfg = self.cfg
        args: dict[str, str] = {}
        if cfg.split_qkv:
            args["split_qkv"] = "True"
        if cfg.train_block_indices:
            args["train_block_indices"] = cfg.train_block_indices
        if cfg.emb_dims:
            args["emb_dims"] = str(cfg.emb_dims_list())
        net = create_sd3_lora(self.flux.config, cfg.network_dim, cfg.network_alpha, cfg.split_qkv,
                              emb_dims=cfg.emb_dims_list(), train_block_indices=cfg.train_block_indices or None,
                              kind=self.adapter_kind)
        self.reporter.log(f"network: {self._network_label(net)}, {len(net.lora)} modules{' (split_qkv)' if cfg.split_qkv else ''}; "
                          f"dim {cfg.network_dim}, alpha {cfg.network_alpha} -> scale alpha/dim = "
                          f"{cfg.network_alpha / cfg.network_dim:.4g}")
        network = SD3Network(net, NetworkSpec(cfg.network_dim, cfg.network_alpha, train_text_encoder=bool(self.te_parts)),
                             self._network_args(args), self._te_network())
        network.diffusers_copy = cfg.save_diffusers_layout
        return network

    def _trained_encoders(self) -> list[tuple[str, str, str, int]]:
        """sd-scripts' lora_sd3: CLIP-L and CLIP-G unless network_train_unet_only, T5-XXL with train_t5xxl."""
        if self.cfg.network_train_unet_only:
            return []
        out = [("text_encoder", "lora_te1", "clip_l", 0), ("text_encoder_2", "lora_te2", "clip_g", 1)]
        return out + ([("text_encoder_3", "lora_te3", "t5xxl", 2)] if self.cfg.train_t5xxl else [])

    # -- conditioning and the step -------------------------------------------------------------
    def _forward(self, latents: torch.Tensor, noise: torch.Tensor, cond: tuple[torch.Tensor, ...], gens: list,
                 timestep: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """sd-scripts' SD3 step; each sample's u from its own generator (so resume and several processes draw the
        same), validation at a fixed timestep. The target is the clean latents."""
        cfg, model = self.cfg, self.flux.transformer
        context, pooled = cond
        if timestep is None:
            draws = [fm.sample_timesteps_sd3(latents[i:i + 1], noise[i:i + 1], cfg, g, cfg.min_timestep, cfg.max_timestep)
                     for i, g in enumerate(gens)]
            noisy = torch.cat([d.noisy for d in draws])
            timesteps = torch.cat([d.timesteps for d in draws])
            sigmas = torch.cat([d.sigmas for d in draws])
        else:
            timesteps = torch.full((latents.shape[0],), float(timestep), device=latents.device)
            sigmas = (timesteps / fm.NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1)
            noisy = sigmas * noise + (1.0 - sigmas) * latents
        out = model(noisy, timesteps, context, pooled)
        pred, weighting = fm.sd3_prediction(out.float(), noisy, sigmas, cfg.weighting_scheme)
        return pred, latents, weighting

    # -- saving and samples --------------------------------------------------------------------
    def _model_spec(self) -> tuple[str, str, str]:
        """sd-scripts writes SD3's model type ("5-large", "5-medium", "medium") as ss_base_model_version, and
        determine_implementation gives an SD3 LoRA "diffusers"."""
        return self.variant, f"stable-diffusion-3-{self.variant}", "diffusers"

    def _sample_prompts(self) -> list:
        from loratrain.core.sampling import SamplePrompt, load_prompts
        from loratrain.core.sd3_sampling import DEFAULT_SCALE, DEFAULT_STEPS

        res = self.cfg.resolution_wh()
        return load_prompts(self.cfg.sample_prompts, SamplePrompt("", width=res[0], height=res[1], steps=DEFAULT_STEPS,
                                                                  cfg_scale=DEFAULT_SCALE))

    def _generate(self, prompt, path, extra_info: dict[str, str]):
        from loratrain.core.sd3_sampling import sd3_generate

        return sd3_generate(self.flux, prompt, path, self.text_opts, encoded=self.sample_cache, extra_info=extra_info)
