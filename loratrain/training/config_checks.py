"""Checks of TrainConfig's input files made before any model loads: each reads a header or builds a stand-in,
so a wrong VAE, network file, scheduler argument or prompt file is named first."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loratrain.core.config import Problem

from .config import WEIGHT_MARKERS  # imported lazily by config.requirements, after config itself


def vae_problems(path: Path) -> list[Problem]:
    """A VAE file that is missing or is not a VAE is named before the model loads (its header only is read)."""
    if not path.is_file():
        return [("vae", f"file not found: {path}")]
    if path.suffix.lower() != ".safetensors":
        return [("vae", f"{path}: give a .safetensors VAE (pickled .pt/.ckpt files are not loaded)")]
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        return [("vae", f"{path}: unreadable safetensors file ({e})")]
    from loratrain.core.models.families import VAE_DIFFUSERS_KEY, VAE_LDM_KEY, VAE_PREFIX

    if not any(k in keys or VAE_PREFIX + k in keys for k in (VAE_LDM_KEY, VAE_DIFFUSERS_KEY)):
        return [("vae", f"{path}: not a VAE file (no encoder.down.* / encoder.down_blocks.* weights)")]
    return []

def lora_file_problems(cfg: Any, path: Path) -> list[Problem]:
    """A network_weights file must hold modules of this run's network kind (its header is enough to tell)."""
    kind = cfg.network_kind
    if kind == "full":
        return [("network_weights", f"{path}: a full fine-tune starts from a checkpoint "
                                    "(pretrained_model_name_or_path), not from a network file")]
    markers = WEIGHT_MARKERS.get(kind, (".lora_down.weight",))
    keys = _header_keys(path, "network_weights")
    if isinstance(keys, tuple):
        return [keys]
    if not any(k.endswith(markers) for k in keys):
        what = f"{kind} modules" if kind in WEIGHT_MARKERS else "kohya LoRA modules"
        return [("network_weights", f"{path}: holds no {what} (no *{markers[0]} keys); is it a model checkpoint, or "
                                    "a file of another network kind?")]
    return []

def _header_keys(path: Path, field: str) -> list[str] | Problem:
    """The tensor names of a .safetensors file from its header, or the problem reading it."""
    from loratrain.core.tensor_io import LazySafetensors

    try:
        with LazySafetensors(path, field) as f:
            return list(f.keys())
    except (OSError, ValueError) as e:
        return (field, str(e))


def base_weights_problems(cfg: Any) -> list[Problem]:
    """Each base_weights file exists, is a LoRA / LyCORIS file (its header) and is for the base model's family."""
    from loratrain.core.config import ConfigError
    from loratrain.core.lora.kinds import MODULE_KINDS
    from loratrain.core.session import lora_use

    markers = (".lora_down.weight", ".dora_scale") + tuple(f".{m}" for k in MODULE_KINDS.names() for m in MODULE_KINDS.get(k).markers)
    out: list[Problem] = []
    for path in cfg.base_weights:
        try:
            lora_use(path, cfg.pretrained_model_name_or_path)  # exists, and the family both headers name agrees
        except ConfigError as e:
            out.append(("base_weights", str(e)))
            continue
        keys = _header_keys(Path(path), "base_weights")
        if isinstance(keys, tuple):
            out.append(keys)
        elif not any(k.endswith(markers) for k in keys):
            out.append(("base_weights", f"{path}: holds no LoRA or LyCORIS modules; is it a model checkpoint?"))
    return out


def schedule_problems(cfg: Any) -> list[Problem]:
    """Build the schedule on a stand-in optimizer, so bad lr_scheduler_args fail before any model loads."""
    import torch

    from .optim import create_scheduler, torch_scheduler_class

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    try:
        if cfg.lr_scheduler_type and torch_scheduler_class(cfg.lr_scheduler_type) is None:
            return [("lr_scheduler_type", f"{cfg.lr_scheduler_type}: not a class of torch.optim.lr_scheduler (e.g. "
                                          "CosineAnnealingLR); other modules are not imported")]
        create_scheduler(cfg.lr_scheduler_type or cfg.lr_scheduler, opt, cfg.max_train_steps, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles,
                         cfg.lr_scheduler_power, cfg.lr_decay_steps, cfg.lr_scheduler_timescale,
                         cfg.lr_scheduler_min_lr_ratio, cfg.learning_rate, cfg.lr_scheduler_args)
    except (ValueError, TypeError, KeyError) as e:
        return [("lr_scheduler_type" if cfg.lr_scheduler_type else "lr_scheduler_args", f"{cfg.lr_scheduler_args}: {e}")]
    return []

def prompt_problems(cfg: Any) -> list[Problem]:
    from loratrain.core.samplers import SAMPLERS
    from loratrain.core.sampling import SamplePrompt, load_prompts

    try:
        prompts = load_prompts(cfg.sample_prompts, SamplePrompt(""))
    except (OSError, ValueError) as e:
        return [("sample_prompts", str(e))]
    bad = sorted({p.sampler for p in prompts if p.sampler and p.sampler not in SAMPLERS})
    if bad:
        return [("sample_prompts", f"{cfg.sample_prompts}: unknown sampler(s) {', '.join(bad)} (--ss); "
                                   f"choose one of: {', '.join(SAMPLERS.names())}")]
    return []
