"""Load SD3 / SD3.5 (3 medium, 3.5 medium, 3.5 large) for LoRA training: the MMDiT, CLIP-L, CLIP-G, T5-XXL and the
16-channel VAE.

Why a loader of its own: SAI ships SD3.5 as a transformer file (`model.diffusion_model.*`, often with the VAE as
`first_stage_model.*` and, in the `..._incl_clips_t5xxl` files, the encoders as `text_encoders.clip_l|clip_g|t5xxl.
transformer.*`) plus separate encoder files, which sd-scripts names `--clip_l --clip_g --t5xxl --vae`; diffusers ships
a folder. As for FLUX.1 (flux_loading.py, whose readers this reuses), `sd3_sources` reads headers only and names the
option of a missing part before anything loads; `load_sd3` then reads just those tensors. Both CLIPs keep their
`text_projection`: SD3's pooled vector is the projected one (FLUX.1's CLIP-L pooled is not).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..paths import confine
from .flux_loading import (
    AE_MARK,
    CLIP_MARK,
    T5_MARK,
    Part,
    _assign,
    _confine_tree,
    _count,
    _file,
    _read,
    _shapes,
    find_t5_tokenizer,
    load_ae,
    load_t5_tokenizer,
    load_t5xxl,
    transformer_source,
)
from .sd3 import SD3Config, SD3Transformer, sd3_config_from_shapes, sd3_prefix

#: SD3's VAE latents, z = (x - shift) * scale (sd-scripts' sd3_models.VAE_SHIFT_FACTOR / VAE_SCALE_FACTOR)
VAE_SCALE, VAE_SHIFT = 1.5305, 0.0609
#: a CLIP's hidden states and pooled output; SD3 takes the penultimate layer's states
CLIP_G_ACT, CLIP_L_ACT = "gelu", "quick_gelu"


@dataclass(frozen=True)
class SD3Sources:
    transformer: Part
    clip_l: Part
    clip_g: Part
    t5xxl: Part
    vae: Part
    t5_tokenizer: Path
    config: SD3Config


def is_sd3_model(model: str | Path) -> bool:
    """Whether a base model is SD3/SD3.5 (an MMDiT single file, or a diffusers folder of an SD3 pipeline), from its
    header or config alone; False for anything unreadable (the SD loader then says why)."""
    try:
        path = confine(Path(model).expanduser(), "pretrained_model_name_or_path")
        if path.is_dir():
            configs = (path / "model_index.json", path / "transformer" / "config.json")
            return any(c.is_file() and "SD3" in json.loads(confine(c, "model file").read_text(encoding="utf-8"))
                       .get("_class_name", "") for c in configs)
        return path.is_file() and sd3_prefix(_shapes(path, "model")) is not None
    except Exception:  # noqa: BLE001 - only a probe
        return False


def _find(shapes: dict[str, Any], mark: str, role: str = "") -> str | None:
    """The prefix of the part whose keys end in `mark`; with several (an all-in-one file's two CLIPs) the one whose
    prefix names `role` (SAI's `text_encoders.clip_g.`), else the first."""
    found = [k[: -len(mark)] for k in shapes if k.endswith(mark)]
    named = [p for p in found if role and role in p]
    return (named or found or [None])[0]


def sd3_sources(model: str, clip_l: str = "", clip_g: str = "", t5xxl: str = "", vae: str = "",
                t5_tokenizer: str = "") -> SD3Sources:
    """Where each SD3 part comes from, from headers only; ConfigError naming the option of the first part missing.
    A separate file wins; else the part inside the model file, or the diffusers folder's subfolder."""
    root = confine(Path(model).expanduser(), "pretrained_model_name_or_path")
    if not root.exists():
        raise ConfigError(f"pretrained_model_name_or_path: model not found: {model}")
    from .sd3_keys import diffusers_to_sd3

    main, config, transformer = transformer_source(root, "SD3", diffusers_to_sd3, sd3_config_from_shapes, sd3_prefix)

    def part(value: str, option: str, mark: str, what: str, sub: str, role: str) -> Part:
        if value:
            path = _file(value, option)
            prefix = _find(_shapes(path, option), mark, role)
            if prefix is None:
                raise ConfigError(f"{option}: {path} holds no {what} weights (no *{mark})")
            return Part(path, prefix)
        if root.is_dir() and (root / sub).is_dir():
            return Part(root / sub, folder=True)
        prefix = _find(main, mark, role) if main else None
        if prefix is not None and (not role or role in prefix):
            return Part(root, prefix)
        raise ConfigError(f"{option}: SD3 needs the {what} ({option} FILE.safetensors); {root.name} does not contain it")

    clip_l_part = part(clip_l, "clip_l", CLIP_MARK, "CLIP-L text encoder", "text_encoder", "clip_l")
    clip_g_part = part(clip_g, "clip_g", CLIP_MARK, "CLIP-G text encoder", "text_encoder_2", "clip_g")
    t5_part = part(t5xxl, "t5xxl", T5_MARK, "T5-XXL text encoder", "text_encoder_3", "")
    vae_part = part(vae, "vae", AE_MARK, "VAE", "vae", "")
    if (clip_l_part.path.resolve(), clip_l_part.prefix) == (clip_g_part.path.resolve(), clip_g_part.prefix):  # `a/../x`
        raise ConfigError(f"clip_g: SD3 needs CLIP-G as well as CLIP-L; {clip_l_part.path.name} holds one CLIP only")
    for p in (transformer, clip_l_part, clip_g_part, t5_part, vae_part):
        if p.folder:
            _confine_tree(p.path, "pretrained_model_name_or_path")
    _check_vae(vae_part, config)
    _check_widths(clip_l_part, clip_g_part, t5_part, config)
    tok = find_t5_tokenizer(root, t5_tokenizer, "tokenizer_3")
    return SD3Sources(transformer, clip_l_part, clip_g_part, t5_part, vae_part, tok, config)


def _width(part: Part, option: str, mark: str, axis: int, key: str, fields: tuple[str, ...]) -> tuple[int | None, ...]:
    """From a part's header (or config.json): the width of the `mark` tensor's `axis` and of `key`'s first axis
    (None where absent: the loader then names what is missing)."""
    if part.folder:
        cfg_file = part.path / "config.json"
        cfg = json.loads(confine(cfg_file, option).read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        return tuple(cfg.get(f) for f in fields)
    shapes = _shapes(part.path, option)
    marked, extra = shapes.get(part.prefix + mark), shapes.get(part.prefix + key) if key else None
    return (marked[axis] if marked else None, extra[0] if extra else None)


def _check_widths(clip_l: Part, clip_g: Part, t5: Part, config: SD3Config) -> None:
    """The encoders must fit the transformer: CLIP-L's and CLIP-G's hidden states side by side no wider than the
    context_embedder's input (they are zero-padded up to it), T5's as wide, and the two projected pooled vectors
    summing to pooled_projection_dim. Checked from headers, so a wrong file is named before latents are cached rather
    than as a matrix-shape error inside the first training step (the pooled vector is only used there)."""
    l_hidden, l_proj = _width(clip_l, "clip_l", CLIP_MARK, 0, "text_projection.weight", ("hidden_size", "projection_dim"))
    g_hidden, g_proj = _width(clip_g, "clip_g", CLIP_MARK, 0, "text_projection.weight", ("hidden_size", "projection_dim"))
    (t5_width, _) = _width(t5, "t5xxl", T5_MARK, 1, "", ("d_model", "d_model"))
    ctx, pooled = config.joint_attention_dim, config.pooled_projection_dim
    names = f"CLIP-L {clip_l.path.name}, CLIP-G {clip_g.path.name}"
    if l_hidden and g_hidden and l_hidden + g_hidden > ctx:
        raise ConfigError(f"clip_g: with clip_l, {names}: hidden sizes {l_hidden} + {g_hidden} = {l_hidden + g_hidden} are "
                          f"wider than this transformer's context ({ctx}); wrong CLIP file for this model?")
    if t5_width and t5_width != ctx:
        raise ConfigError(f"t5xxl: {t5.path.name} has width {t5_width}, this transformer's context takes {ctx}; "
                          "wrong T5 file for this model?")
    if l_proj and g_proj and l_proj + g_proj != pooled:
        raise ConfigError(f"clip_g: with clip_l, {names}: pooled sizes {l_proj} + {g_proj} = {l_proj + g_proj}, this "
                          f"transformer's pooled_projection_dim is {pooled}; wrong CLIP file for this model?")


def _check_vae(vae: Part, config: SD3Config) -> None:
    """The VAE must be SD3's: no quant convs, latent channels = the transformer's input channels (an SD/SDXL VAE has
    4 and quant convs), read from its header or config.json."""
    if vae.folder:
        cfg_file = vae.path / "config.json"
        got = json.loads(cfg_file.read_text(encoding="utf-8")).get("latent_channels") if cfg_file.is_file() else None
        quant = False
    else:
        shapes = _shapes(vae.path, "vae")
        conv_out = shapes.get(vae.prefix + "encoder.conv_out.weight")
        got = conv_out[0] // 2 if conv_out else None
        quant = vae.prefix + "quant_conv.weight" in shapes
    if quant or (got is not None and got != config.in_channels):
        what = "it has quant_conv layers" if quant else f"{got} latent channels, the transformer takes {config.in_channels}"
        raise ConfigError(f"vae: {vae.path} is not SD3's VAE ({what}; an SD/SDXL VAE?)")


def load_transformer(part: Part, config: SD3Config, dtype: torch.dtype) -> SD3Transformer:
    from accelerate import init_empty_weights

    from .fp8_linear import dequantize, split_scaled

    if part.folder:
        from .sd3_keys import diffusers_to_sd3

        sd, scales = diffusers_to_sd3(_read(part, dtype)), {}
    else:  # native dtypes first: a scaled-fp8 file's float32 scales must not be rounded to `dtype`
        sd, scales = split_scaled(_read(part, None))
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in dequantize(sd, scales, dtype).items()}
    with init_empty_weights():
        model = SD3Transformer(config)
    _assign(model, sd, f"transformer {part.path}")
    model.fp8_scales = scales
    return model


def load_clip(part: Part, dtype: torch.dtype, role: str) -> torch.nn.Module:
    """CLIP-L or CLIP-G as transformers' CLIPTextModelWithProjection (SD3 pools through text_projection). Sizes come
    from the shapes; the activation from the role (OpenCLIP's bigG uses gelu, OpenAI's L quick_gelu)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .text_encoder_keys import to_model_names

    what = f"{role} {part.path}"
    if part.folder:
        return CLIPTextModelWithProjection.from_pretrained(part.path, local_files_only=True, torch_dtype=dtype)
    sd = _read(part, dtype, skip=("logit_scale",))
    try:
        vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
        proj = sd["text_projection.weight"].shape[0]
        config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, projection_dim=proj,
                                num_attention_heads=max(1, hidden // 64), num_hidden_layers=_count(sd, "text_model.encoder.layers."),
                                intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                                max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                                hidden_act=CLIP_G_ACT if role == "clip_g" else CLIP_L_ACT, eos_token_id=49407)
    except KeyError as e:
        raise ConfigError(f"{what}: missing tensor {e} (SD3 needs the CLIP with its text_projection)") from None
    with init_empty_weights():
        model = CLIPTextModelWithProjection(config)
    _assign(model, to_model_names(model, sd), what, ignore=("text_model.embeddings.position_ids", "embeddings.position_ids"))
    return model


@dataclass
class SD3Model:
    transformer: SD3Transformer
    clip_l: Any
    clip_g: Any
    t5xxl: Any
    ae: Any
    clip_tokenizer: Any
    clip_g_tokenizer: Any
    t5_tokenizer: Any
    sources: SD3Sources

    @property
    def config(self) -> SD3Config:
        return self.transformer.config

    @property
    def variant(self) -> str:
        return self.config.variant


def load_sd3(sources: SD3Sources, dtype: torch.dtype = torch.float32, encoder_dtype: torch.dtype | None = None) -> SD3Model:
    """Every part, frozen and in eval mode, on the CPU; the VAE in float32 with SD3's latent shift and scale."""
    from ..tokenizer import clip_tokenizer

    transformer = load_transformer(sources.transformer, sources.config, dtype)
    ae = load_ae(sources.vae)
    if not sources.vae.folder:  # the LDM-key file carries no config: SD3's factors (a diffusers vae/config.json has them)
        ae.register_to_config(scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT)
    enc = encoder_dtype or dtype
    parts = [transformer, load_clip(sources.clip_l, enc, "clip_l"), load_clip(sources.clip_g, enc, "clip_g"),
             load_t5xxl(sources.t5xxl, enc), ae]
    for m in parts:
        m.requires_grad_(False)
        m.eval()
    # sd-scripts pads CLIP-G with token 0 (`!`, as OpenCLIP does) and CLIP-L with <|endoftext|>
    return SD3Model(parts[0], parts[1], parts[2], parts[3], ae, clip_tokenizer(), clip_tokenizer("!"),
                    load_t5_tokenizer(sources.t5_tokenizer), sources)


def vae_ldm_state(part: Part) -> dict[str, torch.Tensor]:
    """SD3's VAE as the single files hold it (LDM keys, no prefix), from wherever it was loaded: a single file's
    `first_stage_model.*` (or a separate --vae file) as it is, a diffusers `vae/` folder converted back. A full
    fine-tune's save writes it beside the transformer, as sd-scripts' sd3_train.py does."""
    if not part.folder:
        return _read(part, None)
    from diffusers import AutoencoderKL

    from .ldm_keys import convert_keys, vae_module_pairs, vae_reshape

    ae = AutoencoderKL.from_pretrained(confine(part.path, "vae"), local_files_only=True)
    return vae_reshape(convert_keys(ae.state_dict(), vae_module_pairs(dict(ae.config)), to_ldm=True, what=f"vae {part.path}"),
                       to_ldm=True)

