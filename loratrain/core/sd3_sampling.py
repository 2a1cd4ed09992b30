"""SD3 / SD3.5 text conditioning and sample images (training samples; the same Euler flow sampler sd-scripts uses).

Conditioning, as sd-scripts' Sd3TextEncodingStrategy makes it: CLIP-L and CLIP-G each at 77 tokens (CLIP-G padded
with token 0), their penultimate hidden states side by side (768 + 1280 channels) and zero-padded up to T5's width,
then T5-XXL's states appended along the sequence (77 + t5 tokens); the pooled vector is CLIP-L's projected pooled
output next to CLIP-G's (2048). The masks only reach the encoders (`apply_lg_attn_mask`, `apply_t5_attn_mask`); the
MMDiT attends to every token, as in sd-scripts and SAI's reference.

Sampling is sd-scripts' sd3_train_utils.do_sample: sigmas shift(t) for t evenly spaced from 1 to shift(1/1000)
(shift 3.0), then 0; the model sees sigma * 1000; Euler steps on the velocity; classifier-free guidance with
the negative prompt (empty when none) at the prompt's scale (sd-scripts' default 7.5, 30 steps). The noise comes from a
CPU generator seeded by the prompt's seed in the latent shape, so a seed gives the same image on any device.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .flow_schedule import shift_sigmas
from .flux_sampling import FluxSession, decode
from .models.sd3_loading import SD3Model
from .sampling import Generated, SamplePrompt, infotext, save_sample

DEFAULT_STEPS, DEFAULT_SCALE, SAMPLE_SHIFT = 30, 7.5, 3.0  # sd-scripts' SD3 sample defaults
SAMPLER_NAME = "Euler (flow)"
Cond = tuple[torch.Tensor, torch.Tensor]  # (context (B, 77 + T5 tokens, joint dim), pooled (B, pooled dim))


@dataclass
class SD3TextOptions:
    """How prompts are encoded: T5's length and which encoders see their padding masks (the run's settings)."""

    t5_len: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _clip(model: torch.nn.Module, tokenizer: object, texts: list[str], masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tok = tokenizer(texts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")  # type: ignore[operator]
    dev = _device(model)
    out = model(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev) if masked else None,
                output_hidden_states=True, return_dict=True)
    return out.hidden_states[-2].float(), out.text_embeds.float()


@torch.no_grad()
def encode_texts(sd3: SD3Model, texts: list[str], opts: SD3TextOptions) -> Cond:
    """(context, pooled) for a batch, on the T5 encoder's device; training's captions and sample prompts alike."""
    return encode_texts_grad(sd3, texts, opts)


def encode_texts_grad(sd3: SD3Model, texts: list[str], opts: SD3TextOptions) -> Cond:
    """encode_texts with autograd on: a training run whose text-encoder LoRA trains backpropagates through it."""
    if sd3.clip_l is None or sd3.clip_g is None or sd3.t5xxl is None:
        raise ConfigError(f"prompt {texts[0][:60]!r} was not encoded before the text encoders were freed")
    l_out, l_pooled = _clip(sd3.clip_l, sd3.clip_tokenizer, texts, opts.apply_lg_attn_mask)
    g_out, g_pooled = _clip(sd3.clip_g, sd3.clip_g_tokenizer, texts, opts.apply_lg_attn_mask)
    tok = sd3.t5_tokenizer(texts, max_length=opts.t5_len, padding="max_length", truncation=True, return_tensors="pt")
    dev = _device(sd3.t5xxl)
    t5 = sd3.t5xxl(tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev) if opts.apply_t5_attn_mask else None,
                   return_dict=True).last_hidden_state.float()
    lg = torch.cat([l_out.to(dev), g_out.to(dev)], dim=-1)
    width = sd3.config.joint_attention_dim
    if lg.shape[-1] > width or t5.shape[-1] != width:
        raise ConfigError(f"SD3 text encoders do not fit this transformer: CLIP-L + CLIP-G give {lg.shape[-1]} channels, "
                          f"T5 {t5.shape[-1]}; its context_embedder takes {width}")
    context = torch.cat([F.pad(lg, (0, width - lg.shape[-1])), t5], dim=-2)
    pooled = torch.cat([l_pooled.to(dev), g_pooled.to(dev)], dim=-1)
    if pooled.shape[-1] != sd3.config.pooled_projection_dim:  # a folder's config may lack the sizes sd3_sources checks
        raise ConfigError(f"SD3 text encoders do not fit this transformer: CLIP-L + CLIP-G pool {pooled.shape[-1]} "
                          f"channels; its pooled_projection_dim is {sd3.config.pooled_projection_dim}")
    return context, pooled


def encode_text(sd3: SD3Model, text: str, opts: SD3TextOptions) -> Cond:
    """encode_texts of one prompt, kept on the CPU (the sample cache outlives the encoders)."""
    context, pooled = encode_texts(sd3, [text], opts)
    return context.cpu(), pooled.cpu()


def sample_sigmas(steps: int, shift: float = SAMPLE_SHIFT) -> list[float]:
    """sd-scripts' (and SAI's reference) get_all_sigmas over ModelSamplingDiscreteFlow(shift): t evenly from 1 down to
    sigma_min = shift(1/1000) (the shifted table's first entry, taken as a timestep), each shifted, then 0."""
    t_end = float(shift_sigmas(torch.tensor([1.0 / 1000]), shift)[0])
    return shift_sigmas(torch.linspace(1.0, t_end, steps), shift).tolist() + [0.0]


@torch.no_grad()
def sd3_generate(sd3: SD3Model, prompt: SamplePrompt, out_path: str | Path, opts: SD3TextOptions,
                 encoded: dict[str, Cond] | None = None, extra_info: dict[str, str] | None = None,
                 shift: float = SAMPLE_SHIFT, extra_params: dict[str, str] | None = None) -> Generated:
    """One image saved atomically as PNG with A1111-style `parameters`. `encoded`: prompts already encoded (training
    frees the encoders after caching); others are encoded now. The seed is the prompt's or a random one."""
    seed = prompt.seed if prompt.seed is not None else secrets.randbelow(2**31 - 1)
    factor = 2 ** (len(sd3.ae.config.block_out_channels) - 1) if sd3.ae is not None else 8
    side = factor * sd3.config.patch_size
    width, height = max(side, prompt.width - prompt.width % side), max(side, prompt.height - prompt.height % side)
    prompt = replace(prompt, width=width, height=height)

    def cond_of(text: str) -> Cond:
        return encoded[text] if encoded is not None and text in encoded else encode_text(sd3, text, opts)

    model = sd3.transformer
    dev = _device(model)
    cond, uncond = cond_of(prompt.prompt), cond_of(prompt.negative_prompt)
    context = torch.cat([cond[0], uncond[0]]).to(dev)
    pooled = torch.cat([cond[1], uncond[1]]).to(dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, sd3.config.in_channels, height // factor, width // factor, generator=gen).to(dev)
    sigmas = sample_sigmas(prompt.steps, shift)
    for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((2,), cur * 1000.0, device=dev)
        v = model(torch.cat([x, x]), t, context, pooled).float()
        v_pos, v_neg = v.chunk(2)
        x = x + (nxt - cur) * (v_neg + (v_pos - v_neg) * prompt.cfg_scale)
    image = decode(sd3, x)  # type: ignore[arg-type] - decode needs only `.ae`
    params = infotext(prompt, SAMPLER_NAME, seed, 1, {"Shift": f"{shift:g}", "Model type": f"SD3 {sd3.variant}",
                                                          **(extra_params or {})})
    return save_sample(image, out_path, params, extra_info)


# ---- a loaded SD3 model with LoRAs, for `generate` and the grid ---------------------------------------------------
def is_sd3_checkpoint(path: str) -> bool:
    from .models.sd3_loading import is_sd3_model

    return bool(path) and is_sd3_model(path)


@dataclass
class SD3Parts:
    """The SD3 part files shared by every checkpoint of a run (sd-scripts' option names)."""

    clip_l: str = ""
    clip_g: str = ""
    t5xxl: str = ""
    vae: str = ""
    t5_tokenizer: str = ""
    t5xxl_max_token_length: int | None = None
    apply_t5_attn_mask: bool = False
    apply_lg_attn_mask: bool = False

    @classmethod
    def of(cls, cfg: Any) -> SD3Parts:
        return cls(**{f.name: getattr(cfg, f.name, f.default) or f.default for f in fields(cls)})


class SD3Session(FluxSession):
    """FLUX's session (one checkpoint at a time, each LoRA read once and hooked at its weight) with SD3's loader,
    LoRA reader and sampler. `shift` is the sampling shift (None: SD3's 3.0); there is no guidance input."""

    def __init__(self, parts: SD3Parts) -> None:
        super().__init__()
        self.parts = parts  # type: ignore[assignment]

    def _load(self, path: str, dtype: torch.dtype) -> SD3Model:  # type: ignore[override]
        from .models.sd3_loading import load_sd3, sd3_sources

        p = self.parts
        return load_sd3(sd3_sources(path, p.clip_l, p.clip_g, p.t5xxl, p.vae, p.t5_tokenizer), dtype)

    def text_options(self) -> SD3TextOptions:  # type: ignore[override]
        from .flow_schedule import t5_max_length

        p = self.parts
        return SD3TextOptions(t5_max_length(p, "sd3"), p.apply_lg_attn_mask, p.apply_t5_attn_mask)

    def _read_lora(self, path: str) -> Any:
        """A FlowLoraFile from a kohya-layout lora_sd3 file (LoRA, LoHa or LoKr; a split_qkv file loads as its
        block-diagonal fused form: the same ΔW) or diffusers' PEFT layout, with its text-encoder modules' hooks."""
        from safetensors import safe_open

        from .lora.flow_te_hooks import FlowLoraFile, split_text_encoders
        from .lora.sd3_layouts import diffusers_sd3_to_kohya, is_diffusers_sd3_lora
        from .lora.sd3_network import sd3_lora_from_kohya
        from .paths import confine

        with safe_open(str(confine(path, "LoRA")), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        if not sd:
            raise ConfigError(f"{path}: no LoRA modules found (an empty file)")
        unet, encoders = split_text_encoders(sd, self.model, path)
        if is_diffusers_sd3_lora(unet):  # diffusers' PEFT layout: the same ΔW in ours
            unet = diffusers_sd3_to_kohya(unet, self.model.config, path)  # type: ignore[union-attr]
        return FlowLoraFile(sd3_lora_from_kohya(self.model.config, unet, source=path) if unet else None,  # type: ignore[union-attr]
                            encoders)

    def generate(self, prompt: SamplePrompt, out_path: str | Path, shift: float | None = None,
                 extra_params: dict[str, str] | None = None) -> Generated:
        return sd3_generate(self.model, prompt, out_path, self.text_options(), shift=shift or SAMPLE_SHIFT,  # type: ignore[arg-type]
                            extra_params=extra_params)
