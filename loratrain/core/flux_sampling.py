"""FLUX.1 sample images: training samples (`--sample_prompts`), `loratrain generate` and the grid with a FLUX.1 model.

Why a sampler of its own: FLUX.1 is a rectified flow over packed 2x2 latent tokens, not a DDPM UNet, so none of the
diffusers SD pipelines or schedulers of sampling.py apply. This follows BFL's reference sampler as sd-scripts'
flux_train_utils uses it: Euler steps x += (sigma_next - sigma) * v over `flow_matching.flux_schedule` (time-shifted
by the image's token count for dev; unshifted for schnell, as BFL samples it), the embedded guidance value for dev
(`--g`, default 3.5; schnell has no guidance input), CLIP-L pooled + T5-XXL conditioning (T5 mask only with
apply_t5_attn_mask), then the AE decodes (z / scaling_factor + shift_factor, from its config).

Prompt lines are sd-scripts' (`--w --h --s --d --g --n --l`). `--l` is a true CFG scale that runs a second
(negative) pass only when a negative prompt is given and it is not 1: FLUX.1 dev is guidance-distilled, so SD's
default 7.5 without a negative prompt would only double the cost and burn the image. A1111 attention weights are not
applied to FLUX prompts (the text is encoded as written). The noise comes from a CPU generator seeded by the prompt's
seed, drawn in sd-scripts' packed (1, tokens, 64) shape, so a seed gives the same image on any device and run.

Chroma (no CLIP-L, not guidance-distilled) as sd-scripts' sampler runs it: the shifted schedule, T5 always masked
(Chroma needs it), and real CFG whenever `--l` is not 1, with the negative prompt (empty when none is given), in two
passes per step; `--g` still feeds Chroma's approximator, but defaults to 0 here (sd-scripts' docs: "set --g 0 for
Chroma"; diffusers' Chroma always passes 0), not FLUX.1 dev's 3.5.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import ConfigError
from .models.flux_loading import FluxModel
from .sampling import Generated, SamplePrompt, infotext, save_sample

DEFAULT_GUIDANCE = 3.5
CHROMA_GUIDANCE = 0.0
DEFAULT_STEPS = 20  # sd-scripts' FLUX sample default
SAMPLER_NAME = "Euler (flow)"
Cond = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (CLIP-L pooled, T5 hidden states, T5 mask), batch of 1


@dataclass
class FluxTextOptions:
    """How prompts are encoded: the T5 length and whether T5's padding is masked (the training run's settings)."""

    t5_len: int = 512
    apply_t5_attn_mask: bool = False


def t5_length(opts: Any, variant: str) -> int:
    """sd-scripts' T5 length for a FLUX-family variant: Chroma counts as not schnell (512 unless set)."""
    from loratrain.core.flow_schedule import t5_max_length

    return t5_max_length(opts, "flux", "schnell" if variant == "schnell" else "dev")


def masks_t5(flux: FluxModel, opts: FluxTextOptions) -> bool:
    """Whether T5's padding is masked: with apply_t5_attn_mask, and always for Chroma (it is trained so)."""
    return opts.apply_t5_attn_mask or flux.config.chroma


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_texts(flux: FluxModel, texts: list[str], opts: FluxTextOptions) -> Cond:
    """(CLIP-L pooled, T5 states, T5 mask) for a batch, on the encoders' device, as sd-scripts'
    FluxTextEncodingStrategy makes them: CLIP at 77 tokens, T5 padded to `t5_len`; T5 sees its mask only with
    apply_t5_attn_mask (always for Chroma). Training's captions and the sample prompts go through here alike.
    Chroma has no CLIP-L: its "pooled" is a (B, 1) zero placeholder the transformer ignores."""
    return encode_texts_grad(flux, texts, opts)


def encode_texts_grad(flux: FluxModel, texts: list[str], opts: FluxTextOptions) -> Cond:
    """encode_texts with autograd on: a training run whose text-encoder LoRA trains backpropagates through it."""
    chroma = flux.config.chroma
    if flux.t5xxl is None or (flux.clip_l is None and not chroma):
        raise ConfigError(f"prompt {texts[0][:60]!r} was not encoded before the text encoders were freed")
    tok = flux.t5_tokenizer(texts, max_length=opts.t5_len, padding="max_length", truncation=True, return_tensors="pt")
    dev = _device(flux.t5xxl)
    mask = tok.attention_mask.to(dev)
    t5 = flux.t5xxl(tok.input_ids.to(dev), attention_mask=mask if masks_t5(flux, opts) else None,
                    return_dict=True).last_hidden_state
    if chroma:
        return torch.zeros(len(texts), 1), t5.float(), mask
    clip_ids = flux.clip_tokenizer(texts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    pooled = flux.clip_l(clip_ids.to(_device(flux.clip_l)), return_dict=True).pooler_output
    return pooled.float(), t5.float(), mask


def encode_text(flux: FluxModel, text: str, opts: FluxTextOptions) -> Cond:
    """encode_texts of one prompt, kept on the CPU (the sample cache outlives the encoders)."""
    pooled, t5, mask = encode_texts(flux, [text], opts)
    return pooled.cpu(), t5.cpu(), mask.cpu()


def latent_factor(flux: FluxModel) -> int:
    """Image pixels per latent pixel (8 for FLUX.1's AE: 2^(levels - 1))."""
    return 2 ** (len(flux.ae.config.block_out_channels) - 1)


def sample_size(flux: FluxModel, width: int, height: int) -> tuple[int, int]:
    """Sides rounded down to whole 2x2 latent patches (16 px for FLUX.1), as sd-scripts rounds them."""
    patch = 2 * latent_factor(flux)
    return max(patch, width - width % patch), max(patch, height - height % patch)


def schedule(flux: FluxModel, steps: int, seq_len: int, shift: float | None = None) -> list[float]:
    """The sigmas from 1 to 0: `shift` s > 0 is a fixed shift s*t / (1 + (s-1)*t) (= BFL's with mu = ln s); None or
    0 is BFL's own: resolution-dependent for dev, none for schnell."""
    from loratrain.core import flow_schedule as fm

    if shift:
        return fm.shift_sigmas(torch.linspace(1, 0, steps + 1), float(shift)).tolist()
    return fm.flux_schedule(steps, seq_len, shift=flux.variant != "schnell")


@torch.no_grad()
def denoise(flux: FluxModel, noise: torch.Tensor, ph: int, pw: int, cond: Cond, sigmas: list[float], guidance: float,
            opts: FluxTextOptions, uncond: Cond | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """Euler over `sigmas` from packed `noise` (1, ph*pw, C); the state stays float32 whatever the model's dtype."""
    from loratrain.core import flow_schedule as fm

    model = flux.transformer
    dev = _device(model)
    x = noise.to(dev, torch.float32)

    def velocity(c: Cond, t: float) -> torch.Tensor:
        pooled, t5, mask = (v.to(dev) for v in c)
        return fm.flux_forward(model, x, ph, pw, t5, pooled, torch.full((1,), t, device=dev), guidance,
                               mask if masks_t5(flux, opts) else None).float()

    for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
        v = velocity(cond, cur)
        if uncond is not None:
            v = _cfg(v, velocity(uncond, cur), cfg_scale)
        x = x + (nxt - cur) * v
    return x


def _cfg(cond_v: torch.Tensor, uncond_v: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond_v + scale * (cond_v - uncond_v)


@torch.no_grad()
def decode(flux: FluxModel, latents: torch.Tensor) -> Image.Image:
    """(1, C, h, w) transformer latents -> an RGB image: undo the AE's shift and scale, decode, map [-1, 1] to 0..255."""
    ae = flux.ae
    if ae is None:
        raise ConfigError("the autoencoder was freed; sample images need it")
    p = next(ae.parameters())
    z = latents.to(p.device, p.dtype) / ae.config.scaling_factor + ae.config.shift_factor  # load_ae sets it
    x = ae.decode(z).sample[0].float().clamp(-1, 1)
    return Image.fromarray(((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def flux_generate(flux: FluxModel, prompt: SamplePrompt, out_path: str | Path, opts: FluxTextOptions,
                  guidance: float | None = None, shift: float | None = None,
                  encoded: dict[str, Cond] | None = None, extra_info: dict[str, str] | None = None,
                  extra_params: dict[str, str] | None = None) -> Generated:
    """One FLUX.1 image saved atomically as PNG with A1111-style `parameters` (Forge's `Distilled CFG Scale`).

    `encoded`: prompts already encoded (training frees the text encoders after caching); others are encoded now.
    `prompt.guidance` (--g) wins over `guidance` (None: 3.5, or 0 for Chroma); the seed is the prompt's or a random
    one (torch's global RNG is never touched)."""
    from loratrain.core import flow_schedule as fm

    seed = prompt.seed if prompt.seed is not None else secrets.randbelow(2**31 - 1)
    width, height = sample_size(flux, prompt.width, prompt.height)
    prompt = replace(prompt, width=width, height=height)
    chroma = flux.config.chroma
    if guidance is None:
        guidance = CHROMA_GUIDANCE if chroma else DEFAULT_GUIDANCE
    g = prompt.guidance if prompt.guidance is not None else guidance
    f = latent_factor(flux)
    ph, pw = height // (2 * f), width // (2 * f)

    def cond_of(text: str) -> Cond:
        if encoded is not None and text in encoded:
            return encoded[text]
        return encode_text(flux, text, opts)

    cond = cond_of(prompt.prompt)
    # FLUX.1: a second pass only with a negative prompt (dev is guidance-distilled); Chroma: whenever --l is not 1
    true_cfg = prompt.cfg_scale != 1.0 and (chroma or bool(prompt.negative_prompt))
    uncond = cond_of(prompt.negative_prompt) if true_cfg else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(1, ph * pw, flux.config.in_channels, generator=gen)
    sigmas = schedule(flux, prompt.steps, ph * pw, shift)
    x = denoise(flux, noise, ph, pw, cond, sigmas, g, opts, uncond, prompt.cfg_scale)
    image = decode(flux, fm.unpack_latents(x, ph, pw))
    extra = {"Distilled CFG Scale": f"{g:g}"} if flux.config.guidance_embed or (chroma and g) else {}
    if shift:
        extra["Shift"] = f"{shift:g}"
    if not true_cfg:
        prompt = replace(prompt, cfg_scale=1.0)
    params = infotext(prompt, SAMPLER_NAME, seed, 1, {**extra, "Model type": model_label(flux), **(extra_params or {})})
    return save_sample(image, out_path, params, extra_info)


def model_label(flux: FluxModel) -> str:
    return "Chroma" if flux.config.chroma else f"FLUX.1 {flux.variant}"


# ---- a loaded FLUX.1 model with LoRAs, for `generate` and the grid ------------------------------------------------
def is_flux_checkpoint(path: str) -> bool:
    from .models.flux_loading import is_flux_model

    return bool(path) and is_flux_model(path)


def read_flux_lora(path: str, flux: FluxModel) -> Any:
    """A LoRA file (sd-scripts' lora_flux layout, or another layout flux_layouts converts; LoRA, LoHa or LoKr) as a
    FlowLoraFile: its transformer network and its text-encoder modules' hooks."""
    from safetensors import safe_open

    from .lora.flow_te_hooks import FlowLoraFile, split_text_encoders
    from .lora.flux_network import flux_lora_from_kohya
    from .paths import confine

    with safe_open(str(confine(path, "LoRA")), framework="pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    if not sd:
        raise ConfigError(f"{path}: no LoRA modules found (an empty file)")
    from .lora.flux_layouts import flux_lora_to_kohya

    unet, encoders = split_text_encoders(flux_lora_to_kohya(sd, meta, source=path), flux, path)
    return FlowLoraFile(flux_lora_from_kohya(flux.config, unet, source=path) if unet else None, encoders)


@dataclass
class FluxParts:
    """The FLUX.1 part files shared by every checkpoint of a run (sd-scripts' option names)."""

    clip_l: str = ""
    t5xxl: str = ""
    ae: str = ""
    t5_tokenizer: str = ""
    t5xxl_max_token_length: int | None = None
    apply_t5_attn_mask: bool = False
    model_type: str = "auto"

    @classmethod
    def of(cls, cfg: Any) -> FluxParts:
        return cls(**{f.name: getattr(cfg, f.name, f.default) for f in fields(cls)})


@dataclass
class FluxSession:
    """The grid's / generate's model session for FLUX.1: one checkpoint loaded at a time, each LoRA file read once
    per checkpoint and hooked onto the transformer and text encoders at its weight (weight 0 is not hooked at all: the
    base model)."""

    parts: FluxParts = field(default_factory=FluxParts)
    path: str | None = None
    model: FluxModel | None = None
    loads: int = 0
    networks: dict[tuple[str, int], Any] = field(default_factory=dict)

    def ensure(self, path: str) -> FluxModel:
        """The model of `path`, loaded (bf16 on CUDA, float32 elsewhere) and placed on the device unless it is the one
        already loaded; LoRAs read for another checkpoint are forgotten."""
        from .devices import pick_device

        if path != self.path:
            self.model, self.networks = None, {}
            device = pick_device("auto")
            model = self._load(path, torch.bfloat16 if device.type == "cuda" else torch.float32)
            for name in ("transformer", "clip_l", "clip_g", "t5xxl", "ae"):
                if getattr(model, name, None) is not None:  # Chroma has no CLIP-L, FLUX no CLIP-G
                    torch.nn.Module.to(getattr(model, name), device)
            self.model, self.path = model, path
            self.loads += 1
        assert self.model is not None
        return self.model

    def _load(self, path: str, dtype: torch.dtype) -> FluxModel:
        from .models.flux_loading import flux_sources, load_flux

        p = self.parts
        return load_flux(flux_sources(path, p.clip_l, p.t5xxl, p.ae, p.t5_tokenizer, p.model_type), dtype)

    def text_options(self) -> FluxTextOptions:
        assert self.model is not None
        return FluxTextOptions(t5_length(self.parts, self.model.variant), self.parts.apply_t5_attn_mask)

    def activate(self, loras: list[Any], sampler: str = "") -> None:
        """Hook exactly `loras` (LoraUse: path, weight, blocks) onto the model; every other one is unhooked."""
        assert self.model is not None
        for net in self.networks.values():
            net.remove()
        seen: dict[str, int] = {}
        for use in loras:
            if use.blocks:
                raise ConfigError(f"{use.path}: LoRA block weights are not supported for FLUX.1 sampling yet")
            key = (use.path, seen.get(use.path, 0))
            seen[use.path] = key[1] + 1
            if key not in self.networks:
                dev = _device(self.model.transformer)
                self.networks[key] = self._read_lora(use.path).to(dev, torch.float32)
            if use.weight != 0:
                self.networks[key].set_multiplier(float(use.weight))
                self.networks[key].apply_to(self.model)

    def _read_lora(self, path: str) -> Any:
        assert self.model is not None
        return read_flux_lora(path, self.model)

    def generate(self, prompt: SamplePrompt, out_path: str | Path, shift: float | None = None,
                 extra_params: dict[str, str] | None = None) -> Generated:
        assert self.model is not None
        return flux_generate(self.model, prompt, out_path, self.text_options(), shift=shift, extra_params=extra_params)
