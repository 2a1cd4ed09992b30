"""Load FLUX.1 (dev / schnell) for LoRA training: the transformer, CLIP-L, T5-XXL and the 16-channel autoencoder.

Why a loader of its own: FLUX.1 is shipped as separate files, each named by its own sd-scripts option
(`--pretrained_model_name_or_path flux1-dev.safetensors --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors
--ae ae.safetensors`), or as a diffusers folder, or as one ComfyUI file holding some of the parts. `flux_sources`
reads only the files' headers and says where each part comes from, so a missing part is named (by its option) before
anything loads; `load_flux` then reads only those tensors. Sizes come from the tensors' shapes over the configs
shipped in `configs/models/flux/` (so tiny test models load with the same code); fp8-stored weights (float8_e4m3fn /
e5m2, as in `flux1-dev-fp8`) are upcast to the compute dtype as they are read.

Chroma (a FLUX.1 derivative without CLIP-L, core/models/chroma.py) loads through the same path: detected from its
keys (`distilled_guidance_layer.*`), or named with `model_type` (sd-scripts' --model_type flux|chroma; a mismatch with
the file is an error); it needs no `--clip_l` (one given is reported unused), T5-XXL and the AE are FLUX.1's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..paths import confine, roots
from .chroma import build_transformer
from .flux import FluxConfig, FluxTransformer, flux_config_from_shapes, flux_prefix

#: a tensor each part always has, after the part's prefix (found in a file by its suffix)
CLIP_MARK = "text_model.encoder.layers.0.self_attn.q_proj.weight"
T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
AE_MARK = "encoder.down.0.block.0.conv1.weight"
#: sd-scripts' --model_type values ("auto": from the file's keys)
MODEL_TYPES = ("auto", "flux", "chroma")
#: AutoencoderKL shift of FLUX.1's latents, z = (x - shift) * scale, for a diffusers config that lacks it (ae.json has it)
AE_SHIFT = 0.1159


@dataclass(frozen=True)
class Part:
    """Where one component's tensors are: a .safetensors file and a key prefix, or a diffusers subfolder."""

    path: Path
    prefix: str = ""
    folder: bool = False


@dataclass(frozen=True)
class FluxSources:
    transformer: Part
    clip_l: Part | None  # None for Chroma (no CLIP-L)
    t5xxl: Part
    ae: Part
    t5_tokenizer: Path
    config: FluxConfig
    notes: tuple[str, ...] = ()  # what was given but is not used (a --clip_l with Chroma)


def _shapes(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a .safetensors file (its header only; read once per file version: a config
    check, the trainer and the samplers ask again for the same files). The caller must not change the dict."""
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{what}: {path} is not a .safetensors file (pickled checkpoints are not read)")
    try:
        st = path.stat()
        return _header_shapes(str(path.resolve()), st.st_mtime_ns, st.st_size)
    except Exception as e:  # noqa: BLE001 - any unreadable header is the same problem for the user
        raise ConfigError(f"{what}: {path} is not a readable .safetensors file ({e})") from None


@lru_cache(maxsize=32)
def _header_shapes(path: str, _mtime_ns: int, _size: int) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _confine_tree(folder: Path, what: str) -> None:
    """Every file under a folder the libraries open themselves (transformers, diffusers, tokenizers read weights and
    vocabularies in native code, past the worker's audit hook): one linking out of the roots is refused here."""
    if roots():
        for file in sorted(folder.rglob("*")):
            confine(file, what)


def _prefix_of(shapes: dict[str, Any], mark: str) -> str | None:
    for key in shapes:
        if key.endswith(mark):
            return key[: -len(mark)]
    return None


def is_flux_model(model: str | Path) -> bool:
    """Whether a base model is FLUX.1 (a BFL-layout transformer file, or a diffusers folder of a FLUX pipeline), from
    its header or config alone; False for anything unreadable (the SD loader then says why)."""
    try:
        path = confine(Path(model).expanduser(), "pretrained_model_name_or_path")
        if path.is_dir():
            configs = (path / "model_index.json", path / "transformer" / "config.json")
            names = [json.loads(confine(cfg, "model file").read_text(encoding="utf-8")).get("_class_name", "")
                     for cfg in configs if cfg.is_file()]
            return any("Flux" in n or "Chroma" in n for n in names)
        return path.is_file() and flux_prefix(_shapes(path, "model")) is not None
    except Exception:  # noqa: BLE001 - only a probe
        return False


def _file(value: str, option: str) -> Path:
    path = confine(Path(value).expanduser(), option)
    if not path.is_file():
        raise ConfigError(f"{option}: file not found: {value}")
    return path


def _part_in(path: Path, shapes: dict[str, Any], mark: str, option: str, what: str) -> Part:
    prefix = _prefix_of(shapes, mark)
    if prefix is None:
        raise ConfigError(f"{option}: {path} holds no {what} weights (no *{mark})")
    return Part(path, prefix)


def transformer_source(root: Path, family: str, to_native: Any, config_from_shapes: Any,
                       prefix_of: Any) -> tuple[dict[str, Any], Any, Part]:
    """(the main file's tensor shapes ({} for a folder), the config read from the shapes, the transformer's Part) of a
    single file or a diffusers folder (its `transformer/` keys converted to the native layout by `to_native`, on
    the meta device: shapes only). Shared by the DiT families (FLUX.1, SD3)."""
    if not root.is_dir():
        main = _shapes(root, "pretrained_model_name_or_path")
        return main, config_from_shapes(main, str(root)), Part(root, prefix_of(main) or "")
    if not (root / "transformer" / "config.json").is_file():
        raise ConfigError(f"pretrained_model_name_or_path: {root} is not a diffusers {family} folder (no transformer/)")
    shapes: dict[str, Any] = {}
    for f in sorted((root / "transformer").glob("*.safetensors")):
        shapes.update(_shapes(confine(f, "model file"), "pretrained_model_name_or_path"))
    if not shapes:
        raise ConfigError(f"pretrained_model_name_or_path: {root}/transformer has no .safetensors weights")
    native = to_native({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    return {}, config_from_shapes({k: tuple(v.shape) for k, v in native.items()}, str(root)), \
        Part(root / "transformer", folder=True)


def find_t5_tokenizer(root: Path, value: str, sub: str) -> Path:
    """The T5 tokenizer folder: `--t5_tokenizer`, else the diffusers folder's own (`sub`), else the one shipped with
    loratrain (T5 v1.1's, configs/tokenizers/t5: what FLUX.1 and SD3.5 use); its vocabulary is loaded once here so a
    damaged one is named before any model loads."""
    if value or (root.is_dir() and (root / sub).is_dir()):
        tok = confine(Path(value).expanduser(), "t5_tokenizer") if value else root / sub
        if tok.is_dir():
            _confine_tree(tok, "t5_tokenizer" if value else "pretrained_model_name_or_path")
    else:
        from loratrain import configs

        tok = configs.path("tokenizers", "t5")
        if not tok.is_dir():
            raise ConfigError(f"t5_tokenizer: the shipped T5 tokenizer is missing ({tok}: a damaged install?); pass "
                              "--t5_tokenizer DIR (a folder with tokenizer.json, e.g. FLUX.1's tokenizer_2/)")
    if not tok.is_dir() or not ((tok / "tokenizer.json").is_file() or (tok / "tokenizer_config.json").is_file()):
        raise ConfigError(f"t5_tokenizer: {tok} is not a tokenizer folder (no tokenizer.json)")
    if not ((tok / "tokenizer.json").is_file() or (tok / "spiece.model").is_file()):  # a config alone loads an empty
        raise ConfigError(f"t5_tokenizer: {tok} holds no vocabulary (tokenizer.json or spiece.model); every word "
                          "would be <unk>")
    load_t5_tokenizer(tok)  # a damaged vocabulary is named now, not after the transformer has loaded
    return tok


def flux_sources(model: str, clip_l: str = "", t5xxl: str = "", ae: str = "", t5_tokenizer: str = "",
                 model_type: str = "auto") -> FluxSources:
    """Where each FLUX.1 part comes from, from headers only; ConfigError naming the option of the first part missing.

    A separate file (`--clip_l`, `--t5xxl`, `--ae`) wins; else the part inside the main single file (ComfyUI's
    all-in-one layout) or the diffusers folder's subfolder is used. `model_type` flux / chroma must be what the
    transformer's keys say (auto: whichever they say); Chroma takes no CLIP-L."""
    root = confine(Path(model).expanduser(), "pretrained_model_name_or_path")
    if not root.exists():
        raise ConfigError(f"pretrained_model_name_or_path: model not found: {model}")
    from .flux_keys import diffusers_to_bfl

    main, config, transformer = transformer_source(root, "FLUX.1", diffusers_to_bfl, flux_config_from_shapes, flux_prefix)
    _check_model_type(model_type, config, root)

    def part(value: str, option: str, mark: str, what: str, sub: str) -> Part:
        if value:
            path = _file(value, option)
            return _part_in(path, _shapes(path, option), mark, option, what)
        if root.is_dir() and (root / sub).is_dir():
            return Part(root / sub, folder=True)
        prefix = _prefix_of(main, mark) if main else None
        if prefix is not None:
            return Part(root, prefix)
        raise ConfigError(f"{option}: FLUX.1 needs the {what} ({option} FILE.safetensors); "
                          f"{root.name} does not contain it")

    notes: tuple[str, ...] = ()
    if config.chroma:  # Chroma has no CLIP-L: sd-scripts builds a dummy one; nothing is read here
        clip = None
        if clip_l:
            notes = (f"clip_l: {Path(clip_l).name} is unused: Chroma has no CLIP-L text encoder",)
    else:
        clip = part(clip_l, "clip_l", CLIP_MARK, "CLIP-L text encoder", "text_encoder")
    # a diffusers ChromaPipeline folder keeps T5 and its tokenizer as text_encoder / tokenizer (FLUX.1: *_2)
    t5_sub, tok_sub = ("text_encoder", "tokenizer") if config.chroma else ("text_encoder_2", "tokenizer_2")
    t5 = part(t5xxl, "t5xxl", T5_MARK, "T5-XXL text encoder", t5_sub)
    vae = part(ae, "ae", AE_MARK, "autoencoder", "vae")
    for p in (transformer, clip, t5, vae):
        if p is not None and p.folder:  # a subfolder of the diffusers model folder (a separate part is always a file)
            _confine_tree(p.path, "pretrained_model_name_or_path")
    _check_ae(vae, config)
    tok = find_t5_tokenizer(root, t5_tokenizer, tok_sub)
    return FluxSources(transformer, clip, t5, vae, tok, config, notes)


def _check_model_type(model_type: str, config: FluxConfig, root: Path) -> None:
    """sd-scripts' --model_type is a claim about the file: refused when the keys say otherwise."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type: {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    found = "chroma" if config.chroma else "flux"
    if model_type != "auto" and model_type != found:
        what = "a Chroma transformer (distilled_guidance_layer, no per-block modulation)" if config.chroma \
            else f"a FLUX.1 {config.variant} transformer"
        raise ConfigError(f"model_type: {model_type}, but {root.name} is {what}; use --model_type {found} (or auto)")


def _check_ae(vae: Part, config: FluxConfig) -> None:
    """The autoencoder must be FLUX.1's (no quant convs, latent channels = the transformer's packed input / 4), seen
    from its header or config.json: an SD VAE is refused before anything loads."""
    want = config.in_channels // 4
    if vae.folder:
        cfg_file = vae.path / "config.json"
        got = json.loads(cfg_file.read_text(encoding="utf-8")).get("latent_channels") if cfg_file.is_file() else None
        quant = False
    else:
        shapes = _shapes(vae.path, "ae")
        conv_out = shapes.get(vae.prefix + "encoder.conv_out.weight")
        got = conv_out[0] // 2 if conv_out else None
        quant = vae.prefix + "quant_conv.weight" in shapes
    if quant or (got is not None and got != want):
        what = "it has quant_conv layers" if quant else f"{got} latent channels, the transformer takes {want} (x 2x2 patches)"
        raise ConfigError(f"ae: {vae.path} is not FLUX.1's autoencoder ({what}; an SD/SDXL VAE?)")


def _read(part: Part, dtype: torch.dtype | None, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A part's tensors without its prefix; floating ones (fp8 included) converted to `dtype` one at a time."""
    from safetensors import safe_open

    files = sorted(part.path.glob("*.safetensors")) if part.folder else [part.path]
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(confine(file, "model file")), framework="pt") as f:
            for key in f.keys():
                if not key.startswith(part.prefix) or key[len(part.prefix):].startswith(skip):
                    continue
                t = f.get_tensor(key)
                out[key[len(part.prefix):]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def _assign(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()) -> None:
    """Load weights into a model made under init_empty_weights; every parameter must come from the file."""
    own = model.state_dict()
    extra = sorted(k for k in sd if k not in own and not k.startswith(ignore))
    if extra:
        raise ConfigError(f"{what}: unexpected tensor {extra[0]} (not this model's; a different architecture?)")
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ConfigError(f"{what}: {bad[0]} is {list(sd[bad[0]].shape)}, the model's is {list(own[bad[0]].shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False, assign=True)
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise ConfigError(f"{what}: missing tensor {empty[0]} (a partial or damaged file)")


def load_transformer(part: Part, config: FluxConfig, dtype: torch.dtype) -> FluxTransformer:
    from accelerate import init_empty_weights

    if part.folder:
        from .flux_keys import diffusers_to_bfl

        sd, scales = diffusers_to_bfl(_read(part, dtype)), {}
    else:  # native dtypes first: a scaled-fp8 file's float32 scales must not be rounded to `dtype`
        from .fp8_linear import dequantize, split_scaled

        sd, scales = split_scaled(_read(part, None))
        sd = dequantize(sd, scales, dtype)
        for k, v in sd.items():  # one tensor at a time: each original is freed as it is replaced
            if v.is_floating_point():
                sd[k] = v.to(dtype)
    with init_empty_weights():
        model = build_transformer(config)
    _assign(model, sd, f"transformer {part.path}")
    model.fp8_scales = scales  # reused by --fp8_base, so a scaled file's fp8 values come back exactly
    return model


def _config(name: str) -> dict[str, Any]:
    from loratrain import configs

    return json.loads(configs.path("models", "flux", name).read_text(encoding="utf-8"))


def _count(keys: object, stem: str) -> int:
    found = {int(k[len(stem):].split(".", 1)[0]) for k in keys if k.startswith(stem)}  # type: ignore[attr-defined]
    return max(found) + 1 if found else 0


def load_clip_l(part: Part, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    if part.folder:
        return CLIPTextModel.from_pretrained(part.path, local_files_only=True, torch_dtype=dtype)
    sd = _read(part, dtype, skip=("text_projection", "logit_scale"))
    cfg = _config("clip_l.json")
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
               max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
               intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
               num_hidden_layers=_count(sd, "text_model.encoder.layers."))
    with init_empty_weights():
        model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    from .text_encoder_keys import to_model_names

    _assign(model, to_model_names(model, sd), f"clip_l {part.path}", ignore=("text_model.embeddings.position_ids",
                                                                           "embeddings.position_ids"))
    return model


def load_t5xxl(part: Part, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    if part.folder:
        return T5EncoderModel.from_pretrained(part.path, local_files_only=True, torch_dtype=dtype)
    sd = _read(part, dtype, skip=("decoder.", "lm_head."))
    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if emb is None:
        raise ConfigError(f"t5xxl {part.path}: no token embedding (shared.weight)")
    sd["shared.weight"] = sd["encoder.embed_tokens.weight"] = emb
    cfg = _config("t5xxl.json")
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    cfg.update(vocab_size=emb.shape[0], d_model=emb.shape[1], num_heads=heads, num_layers=_count(sd, "encoder.block."),
               d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads, d_ff=wi.shape[0],
               relative_attention_num_buckets=sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[0],
               feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0)
    with init_empty_weights():
        model = T5EncoderModel(T5Config(**{k: v for k, v in cfg.items() if k != "architectures"}))
    _assign(model, sd, f"t5xxl {part.path}")
    return model


def load_ae(part: Part) -> torch.nn.Module:
    """FLUX.1's autoencoder as diffusers' AutoencoderKL (float32), from BFL's `ae.safetensors` (LDM key names)."""
    from diffusers import AutoencoderKL

    from .ldm_keys import convert_keys, vae_module_pairs, vae_reshape

    if part.folder:
        ae = AutoencoderKL.from_pretrained(part.path, local_files_only=True)
        if ae.config.shift_factor is None:  # an older FLUX.1 vae/config.json: the shift is FLUX.1's all the same
            ae.register_to_config(shift_factor=AE_SHIFT)
        return ae
    sd = _read(part, torch.float32)
    cfg = _config("ae.json")
    levels = _count(sd, "encoder.down.")
    cfg.update(block_out_channels=[sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
               latent_channels=sd["encoder.conv_out.weight"].shape[0] // 2, layers_per_block=_count(sd, "encoder.down.0.block."),
               in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    try:
        sd = convert_keys(vae_reshape(sd, to_ldm=False), vae_module_pairs(cfg), to_ldm=False, what=f"ae {part.path}")
    except KeyError as e:
        raise ConfigError(str(e).strip("'\"")) from None
    ae = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    _assign(ae, sd, f"ae {part.path}")
    return ae


def load_t5_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from loratrain import configs

    if Path(folder) != configs.path("tokenizers", "t5"):  # the shipped one is the package's own data, not user input
        folder = confine(folder, "t5_tokenizer")
    try:
        if (folder / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>", eos_token="</s>")
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise their own types for a bad vocabulary
        why = " ".join(str(e).split())[:300]
        raise ConfigError(f"t5_tokenizer: {folder} is not a readable tokenizer ({why})") from None


@dataclass
class FluxModel:
    transformer: FluxTransformer  # a chroma.ChromaTransformer for Chroma
    clip_l: Any  # None for Chroma
    t5xxl: Any
    ae: Any
    clip_tokenizer: Any
    t5_tokenizer: Any
    sources: FluxSources

    @property
    def config(self) -> FluxConfig:
        return self.transformer.config

    @property
    def variant(self) -> str:
        return self.config.variant


def load_flux(sources: FluxSources, dtype: torch.dtype = torch.float32, encoder_dtype: torch.dtype | None = None) -> FluxModel:
    """Every part, frozen and in eval mode, on the CPU; the autoencoder in float32. Its latent channels must be the
    transformer's packed input channels / 4."""
    from ..tokenizer import clip_tokenizer

    transformer = load_transformer(sources.transformer, sources.config, dtype)
    ae = load_ae(sources.ae)  # FLUX.1's: flux_sources checked its latent channels
    clip = load_clip_l(sources.clip_l, encoder_dtype or dtype) if sources.clip_l is not None else None
    parts = [transformer, clip, load_t5xxl(sources.t5xxl, encoder_dtype or dtype), ae]
    for m in parts:
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return FluxModel(parts[0], clip, parts[2], ae, clip_tokenizer() if clip is not None else None,
                     load_t5_tokenizer(sources.t5_tokenizer), sources)
