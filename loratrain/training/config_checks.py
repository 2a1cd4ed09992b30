"""Checks of TrainConfig's input files made before any model loads: each reads a header or builds a stand-in,
so a wrong VAE, network file, scheduler argument or prompt file is named first."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loratrain.core.errors import ConfigError, Problem
from loratrain.core.paths import confine


def vae_problems(path: Path) -> list[Problem]:
    """A VAE file that is missing or is not a VAE is named before the model loads (its header only is read)."""
    if not path.is_file():
        return [("vae", f"file not found: {path}")]
    if path.suffix.lower() != ".safetensors":
        return [("vae", f"{path}: give a .safetensors VAE (pickled .pt/.ckpt files are not loaded)")]
    try:
        from safetensors import safe_open

        with safe_open(str(confine(path, "vae")), framework="pt") as f:
            keys = set(f.keys())
    except ConfigError as e:
        return [("vae", str(e).split(": ", 1)[-1])]
    except Exception as e:  # safetensors raises its own error types for a damaged header
        return [("vae", f"{path}: unreadable safetensors file ({e})")]
    from loratrain.core.models.families import VAE_DIFFUSERS_KEY, VAE_LDM_KEY, VAE_PREFIX

    if not any(k in keys or VAE_PREFIX + k in keys for k in (VAE_LDM_KEY, VAE_DIFFUSERS_KEY)):
        return [("vae", f"{path}: not a VAE file (no encoder.down.* / encoder.down_blocks.* weights)")]
    return []

def lora_file_problems(cfg: Any, path: Path) -> list[Problem]:
    """A network_weights file must hold modules of this run's network kind (its header is enough to tell)."""
    from .networks import NETWORKS

    kind = NETWORKS.get(cfg.network_kind)
    markers = kind.file_markers
    if not markers:
        return [("network_weights", f"{path}: network_module {kind.name} starts from a checkpoint "
                                    "(pretrained_model_name_or_path) or its own training state, not from a network file")]
    keys = _header_keys(path, "network_weights")
    if isinstance(keys, tuple):
        return [keys]
    if not any(k.endswith(markers) for k in keys):
        what = "kohya LoRA modules" if markers == (".lora_down.weight",) else f"{kind.name} modules"
        return [("network_weights", f"{path}: holds no {what} (no *{markers[0]} keys); is it a model checkpoint, or "
                                    "a file of another network kind?")]
    return family_problems("network_weights", path, model_family(cfg.pretrained_model_name_or_path))

def model_family(model: str) -> Any:
    """The base model's Family from its header (single file) or unet/config.json (diffusers folder), without loading
    it; None when neither tells (the loader then says why)."""
    import json

    from loratrain.core.models.families import detect_family, family_from_unet_config

    try:
        path = confine(Path(model).expanduser(), "pretrained_model_name_or_path")
        if path.is_file() and path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return detect_family(set(f.keys()), str(path))
        if (path / "unet" / "config.json").is_file():
            return family_from_unet_config(json.loads((path / "unet" / "config.json").read_text(encoding="utf-8")))
    except Exception:  # noqa: BLE001 - only a probe: an unreadable model is named where it loads
        return None
    return None


def family_problems(field: str, path: Path, family: Any) -> list[Problem]:
    """A LoRA made for the other family than the base model's (its module names or metadata tell) is named."""
    from loratrain.core.lora.files import lora_is_sdxl
    from loratrain.core.tensor_io import LazySafetensors

    if family is None:
        return []
    try:
        with LazySafetensors(path, field) as f:
            names, meta = {k.split(".")[0] for k in f.keys()}, dict(f.metadata)
    except (OSError, ValueError):
        return []  # the header check names it
    sdxl = lora_is_sdxl(names, meta)  # type: ignore[arg-type]
    if sdxl is None or sdxl == family.is_sdxl:
        return []
    return [(field, f"{path} is an {'SDXL' if sdxl else 'SD1/SD2'} LoRA; the model is {family.name.upper()} "
                    f"({Path(path).name} belongs to another model family)")]


def resume_problems(folder: Path) -> list[Problem]:
    """A state folder given to --resume, read before the model loads: each file must have the size train_state.json
    records and be readable. A save is written beside the state and swapped in whole, so a folder that disagrees
    with its train_state.json was damaged afterwards; it is named corrupt, file by file."""
    import json

    from .saving import INFO_FILE, STATE_FILES

    info_path = folder / INFO_FILE
    if not info_path.is_file():
        return [("resume", f"{folder}: not a training state folder (no {INFO_FILE})")]
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        return [("resume", f"{info_path}: corrupt or unreadable ({e}); this state cannot be resumed")]
    sizes = info.get("files") if isinstance(info.get("files"), dict) else {name: None for name in STATE_FILES}
    strange = sorted(str(n) for n in sizes if n not in STATE_FILES)
    if strange:  # a state names only its own files: anything else (a path) is never looked at
        return [("resume", f"{info_path}: names files that are no part of a training state ({', '.join(map(repr, strange[:3]))}); "
                           "this state cannot be resumed")]
    out: list[Problem] = []
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            out.append(("resume", f"{path}: missing from the training state; this state cannot be resumed"))
        elif size is not None and path.stat().st_size != size:
            out.append(("resume", f"{path}: corrupt ({path.stat().st_size} bytes, {INFO_FILE} records {size}); this state "
                                  "cannot be resumed"))
    if out:
        return out
    keys = _header_keys(folder / "network.safetensors", "resume")
    if isinstance(keys, tuple):
        return [("resume", f"{folder / 'network.safetensors'}: corrupt or unreadable ({keys[1]})")]
    try:
        import torch

        torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)  # mapped: tensors not read
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged archive or pickle
        return [("resume", f"{folder / 'optimizer.pt'}: corrupt or unreadable ({type(e).__name__}: {e}); this state "
                           "cannot be resumed")]
    return []


def block_count_problems(cfg: Any) -> list[Problem]:
    """Per-block options hold one value per block of the base model's family (told from its header): the lr weights
    12 down/up and 1 mid for SD1/SD2, 9 and 3 for SDXL; block dims/alphas 25 or 23."""
    from .networks.blocks import check_text, count_problems

    spec = cfg.block_spec()
    if not (spec or spec.alphas or spec.conv_alphas):
        return []
    family = model_family(cfg.pretrained_model_name_or_path)
    if family is None:
        return []
    named = {field for field, _ in check_text(spec)}  # a count no family has is named there already
    return [p for p in count_problems(spec, family.is_sdxl) if p[0] not in named]


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
    from loratrain.core.errors import ConfigError
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
        else:  # a diffusers-folder model too (lora_use reads single files only)
            out += family_problems("base_weights", Path(path), model_family(cfg.pretrained_model_name_or_path))
    return out


def earlier_run_problems(cfg: Any) -> list[Problem]:
    """A run never replaces an earlier one's files of the same output_name unless told: its LoRA (or checkpoint) saves,
    numbered ones and PEFT copies included, and its resumable state (NAME-state/, .tmp, .old) need --overwrite, or
    --resume to continue that run. With save_diffusers, a folder where a save would go that is not a diffusers folder
    (model_index.json) is refused even then: it is someone's folder, never deleted."""
    import re

    from .saving import STATE_SUFFIX, find_state

    out_dir, name = Path(cfg.output_dir).expanduser(), cfg.output_name
    if not name or not out_dir.is_dir():
        return []
    numbered = r"(-\d{6}|-step\d{8})?"
    saves = re.compile(re.escape(name) + numbered + r"(\.peft)?\.safetensors")
    folders = re.compile(re.escape(name) + numbered)
    states = {f"{name}{STATE_SUFFIX}{s}" for s in ("", ".tmp", ".old")}
    found: list[Path] = []
    out: list[Problem] = []
    try:
        entries = sorted(out_dir.iterdir(), key=lambda p: (p.name != f"{name}.safetensors", p.name not in states, p.name))
    except OSError as e:
        return [("output_dir", f"{out_dir}: cannot be read ({e.strerror})")]
    for p in entries:
        if p.name in states or saves.fullmatch(p.name):
            found.append(p)
        elif getattr(cfg, "save_diffusers", False) and folders.fullmatch(p.name) and (p.is_dir() or p.is_symlink()):
            if (p / "model_index.json").is_file():
                found.append(p)
            else:
                out.append(("output_name", f"{p} is a folder but not a diffusers folder (no model_index.json), and save_diffusers "
                                           "writes there: it is never replaced; move it or choose another output_name"))
    if found and not (cfg.overwrite or cfg.resume):
        more = f" and {len(found) - 1} more file(s) of that run" if len(found) > 1 else ""
        resumable = find_state(out_dir / f"{name}{STATE_SUFFIX}") is not None
        todo = "pass --overwrite to replace it or --resume latest to continue" if resumable else \
            "pass --overwrite to replace it, or choose another output_name"
        out.append(("output_name", f"{found[0]} exists (an earlier run named {name!r}{more}); {todo}"))
    return out


def _read_as_text(args: list[str]) -> str:
    """A note naming the key=value items whose value is no Python literal (so it reaches the optimizer or schedule as
    text), or ""."""
    import ast

    text = []
    for item in args:
        key, _, value = item.partition("=")
        try:
            ast.literal_eval(value.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            text.append(f"{key.strip()}={value.strip()}")
    if len(args) == 1 and text:
        return "; the value is not a number or other Python literal, so it was passed as text"
    return f"; {', '.join(text)}: not a number or other Python literal, so passed as text" if text else ""


def optimizer_problems(cfg: Any) -> list[Problem]:
    """Build the optimizer with optimizer_args on a stand-in parameter and take one step, so a keyword the optimizer
    does not take or a value it cannot use is named (with the item) before any model loads."""
    import warnings

    import torch

    from .optim import OPTIMIZERS, parse_optimizer_args

    if not cfg.optimizer_args or cfg.optimizer_type not in OPTIMIZERS or OPTIMIZERS.get(cfg.optimizer_type).missing():
        return []  # nothing to try, or the optimizer itself is the problem (named by requirements)
    spec = OPTIMIZERS.get(cfg.optimizer_type)

    def error(args: list[str]) -> Exception | None:
        param = torch.nn.Parameter(torch.zeros(1))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = spec.make([{"params": [param], "lr": cfg.learning_rate}], cfg.learning_rate, parse_optimizer_args(args))
                if spec.package != "bitsandbytes":  # its 8-bit kernels want a GPU: built here, not stepped
                    getattr(opt, "train", lambda: None)()  # schedule-free optimizers step in train mode only
                    param.grad = torch.full_like(param, 1e-3)
                    opt.step()
        except Exception as e:  # noqa: BLE001 - whatever the arguments make it raise is theirs (see below)
            return e
        return None

    failure = error(cfg.optimizer_args)
    if failure is None or error([]) is not None:
        return []  # fine, or the stand-in fails even without arguments: then the run itself says why
    name = cfg.optimizer_type
    for item in cfg.optimizer_args:
        alone = error([item])
        if alone is None:
            continue
        key = item.partition("=")[0].strip()
        if "unexpected keyword argument" in str(alone):
            return [("optimizer_args", f"{item}: {name} takes no argument {key!r}")]
        return [("optimizer_args", f"{item}: not a value {name} can use for {key!r} ({alone}){_read_as_text([item])}")]
    return [("optimizer_args", f"{' '.join(cfg.optimizer_args)}: {name} refuses these arguments together ({failure})"
                               f"{_read_as_text(cfg.optimizer_args)}")]


def schedule_problems(cfg: Any) -> list[Problem]:
    """Build the schedule on a stand-in optimizer and take one step, so bad lr_scheduler_args (an unknown keyword, a
    value of the wrong type) fail before any model loads."""
    import warnings

    import torch

    from .optim import create_scheduler, torch_scheduler_class

    if cfg.lr_scheduler_type and torch_scheduler_class(cfg.lr_scheduler_type) is None:
        return [("lr_scheduler_type", f"{cfg.lr_scheduler_type}: not a class of torch.optim.lr_scheduler (e.g. "
                                      "CosineAnnealingLR); other modules are not imported")]
    name = cfg.lr_scheduler_type or cfg.lr_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schedule = create_scheduler(name, opt, cfg.max_train_steps, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles,
                                        cfg.lr_scheduler_power, cfg.lr_decay_steps, cfg.lr_scheduler_timescale,
                                        cfg.lr_scheduler_min_lr_ratio, cfg.learning_rate, cfg.lr_scheduler_args)
            opt.step()
            schedule.step()
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        args = " ".join(cfg.lr_scheduler_args)
        return [("lr_scheduler_args" if args else "lr_scheduler_type",
                 f"{name}{' ' + args if args else ''}: {e}{_read_as_text(cfg.lr_scheduler_args)}")]
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
