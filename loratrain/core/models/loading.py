"""Load SD1 / SD2 / SDXL from a diffusers folder, an HF cache folder or a single-file checkpoint.

Everything is local: configs and tokenizer data for single files come from `configs/` (or from
the file's own metadata when we wrote it), never from a hub.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..hf_cache import resolve_hf_cache
from ..paths import confine, roots
from ..tokenizer import clip_tokenizer
from ..weights import load_state_dict
from . import text_encoder_keys
from .families import VAE_DIFFUSERS_KEY, VAE_LDM_KEY, VAE_PREFIX, Family, ModelTypeError, detect_family, family_from_unet_config
from .single_file import CONFIG_METADATA_KEY, split_checkpoint


@dataclass
class SDModel:
    family: Family
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[CLIPTokenizer]
    noise_scheduler: DDPMScheduler
    source: str
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SDModel":
        for m in (self.unet, self.vae, *self.text_encoders):
            move(m, device, dtype)
        return self


def move(module: torch.nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Move / cast a component the way diffusers intends, without its override's warning.

    diffusers' `ModelMixin.to` warns about "modules that should be kept in float32" whenever a dtype is
    passed, even for models that keep none (SD's UNet and VAE). This casts with torch's own `to` and
    then restores exactly the modules a model declares in `_keep_in_fp32_modules` to float32.
    """
    torch.nn.Module.to(module, device=device, dtype=dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype is not None and keep:
        for name, sub in module.named_modules():
            if any(part in keep for part in name.split(".")):
                torch.nn.Module.to(sub, dtype=torch.float32)
    return module


def build_component(component: str, cfg: dict[str, Any], with_projection: bool = False) -> torch.nn.Module:
    """A randomly initialised component from its config dict (wrap in init_empty_weights for no memory)."""
    if component == "unet":
        return UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    if component == "vae":
        return AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    te_cfg = CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(te_cfg)


def load_model(path: str | Path, *, allow_pickle: bool = False, v_parameterization: bool | None = None,
               expect_family: str | None = None, dtype: torch.dtype | None = None) -> SDModel:
    """Load a base model for training or sampling, on CPU (the caller moves it).

    dtype: the UNet and text encoders are loaded straight into it (the VAE stays float32), one
    tensor at a time: training in bf16 never holds an fp32 copy of the model. None: float32.
    """
    path = confine(Path(path).expanduser(), "model")
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    model = _load_folder(resolve_hf_cache(path), dtype) if path.is_dir() else _load_single_file(path, allow_pickle, dtype)
    if expect_family and model.family.name != expect_family:
        raise ModelTypeError(f"{path}: is an {model.family.name} model, but {expect_family} was asked for")
    if v_parameterization is not None:
        model.noise_scheduler = DDPMScheduler.from_config(
            model.noise_scheduler.config, prediction_type="v_prediction" if v_parameterization else "epsilon")
    for m in (model.unet, model.vae, *model.text_encoders):
        m.requires_grad_(False)
        m.eval()
    return model


def _load_folder(root: Path, dtype: torch.dtype | None = None) -> SDModel:
    if roots():  # diffusers and transformers open the folder's files themselves: a weight file linking out is refused here
        for file in sorted(root.rglob("*")):
            confine(file, "model file")
    if not (root / "unet" / "config.json").is_file():
        raise ModelTypeError(f"{root}: not a diffusers model folder (no unet/config.json)")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True, torch_dtype=dtype or torch.float32)
    family = family_from_unet_config(dict(unet.config))
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
    tes, toks = [], []
    for i, spec in enumerate(family.text_encoders):
        cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
        tes.append(cls.from_pretrained(root / spec.component, local_files_only=True, torch_dtype=dtype or torch.float32))
        tok_dir = root / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")
        toks.append(CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True) if tok_dir.is_dir()
                    else clip_tokenizer(family.pad_tokens()[i]))
    sched_dir = root / "scheduler"
    if (sched_dir / "scheduler_config.json").is_file():
        sched_cfg = json.loads((sched_dir / "scheduler_config.json").read_text())
    else:
        sched_cfg = family.shipped_configs()["scheduler"]
    scheduler = _training_scheduler(sched_cfg)
    cfgs = {"unet": _plain(dict(unet.config)), "vae": _plain(dict(vae.config)), "scheduler": sched_cfg}
    for spec, te in zip(family.text_encoders, tes):
        cfgs[spec.component] = _plain(te.config.to_dict())
    return SDModel(family, unet, vae, tes, toks, scheduler, str(root), cfgs)


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """The JSON-storable part of a loaded config (what writing a single file embeds)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
            if not k.startswith("_") and (v is None or isinstance(v, (int, float, str, bool, list, tuple)))}


def _training_scheduler(cfg: dict[str, Any]) -> DDPMScheduler:
    keep = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset",
                                "rescale_betas_zero_snr") if k in cfg}
    return DDPMScheduler(**keep, clip_sample=False)


def _load_single_file(path: Path, allow_pickle: bool, dtype: torch.dtype | None = None) -> SDModel:
    dtype = dtype or torch.float32
    sd, meta = load_state_dict(path, allow_pickle=allow_pickle, dtype=dtype, keep_fp32=(VAE_PREFIX,))
    family = detect_family(set(sd), str(path))
    cfgs = json.loads(meta[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in meta else family.shipped_configs()
    parts = split_checkpoint(sd, family, cfgs, str(path))
    del sd
    unet = _instantiate("unet", cfgs["unet"], parts.pop("unet"), path, "UNet", dtype=dtype)
    vae = _instantiate("vae", cfgs["vae"], parts.pop("vae"), path, "VAE")
    tes = [_instantiate(spec.component, cfgs[spec.component], parts.pop(spec.component), path, spec.component, spec.with_projection,
                        dtype=dtype) for spec in family.text_encoders]
    toks = [clip_tokenizer(p) for p in family.pad_tokens()]
    sched_cfg = dict(cfgs["scheduler"])
    if meta.get("modelspec.prediction_type") == "v":
        sched_cfg["prediction_type"] = "v_prediction"
    return SDModel(family, unet, vae, tes, toks, _training_scheduler(sched_cfg), str(path), cfgs)


def _check_shapes(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [k for k in expected.keys() & got.keys() if expected[k] != got[k]]
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: file {got[k]} vs model {expected[k]}" for k in wrong[:3]))
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise ModelTypeError(f"{path}: {what} weights do not fit the {what} config: " + "; ".join(parts))


def _instantiate(component: str, cfg: dict[str, Any], sd: dict[str, torch.Tensor], path: Path, what: str,
                 with_projection: bool = False, dtype: torch.dtype = torch.float32) -> Any:
    """Build on the meta device, check every shape, then adopt the loaded tensors (no second copy)."""
    with init_empty_weights():
        model = build_component(component, cfg, with_projection)
    if component.startswith("text_encoder"):
        sd = text_encoder_keys.to_model_names(model, sd)
    _check_shapes(model, sd, path, what)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, strict=False, assign=True)
    _fix_buffers(model)
    return model


def _fix_buffers(model: torch.nn.Module) -> None:
    """Buffers not in the state dict (position ids) stay on the meta device after assign=True."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name == "position_ids":
                    module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
                else:
                    raise RuntimeError(f"buffer {name} was not loaded")


def read_vae_file(path: str | Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A separate VAE file (`--vae`) as a diffusers AutoencoderKL state dict: LDM keys (A1111's VAE files, e.g.
    vae-ft-mse-840000), the same under `first_stage_model.` (a whole checkpoint), or diffusers keys."""
    from . import ldm_keys

    sd, _ = load_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    if VAE_DIFFUSERS_KEY in sd:
        return sd
    if VAE_LDM_KEY not in sd:
        raise ValueError(f"{path}: not a VAE file (no {VAE_LDM_KEY} or {VAE_DIFFUSERS_KEY})")
    sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    return ldm_keys.vae_reshape(ldm_keys.convert_keys(sd, ldm_keys.vae_module_pairs(cfg), to_ldm=False, what="VAE"), to_ldm=False)


def replace_vae(model: SDModel, path: str | Path) -> None:
    """Load a separate VAE file into the model's VAE, every shape checked; the message names the file."""
    sd = read_vae_file(path, model.configs.get("vae") or dict(model.vae.config))
    own = model.vae.state_dict()
    missing = sorted(set(own) - set(sd))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        what = f"missing {missing[0]}" if missing else f"{bad[0]} is {list(sd[bad[0]].shape)}, the model's {list(own[bad[0]].shape)}"
        raise ValueError(f"{path}: this VAE does not fit the model's ({what})")
    model.vae.load_state_dict({k: sd[k].to(own[k].dtype) for k in own})
