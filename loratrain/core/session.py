"""A loaded base model with any number of LoRAs (kohya or PEFT layout) applied at given weights."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import pick_device
from .errors import ConfigError
from .lora.files import parse_lora_spec
from .models.ldm_keys import unet_module_pairs
from .models.loading import SDModel
from .paths import confine, locate
from .sampling import build_pipeline


@dataclass
class LoraUse:
    path: str
    weight: float = 1.0
    blocks: str = ""  # LoRA block-weight preset / vector ("" = all blocks at 1)


def lora_use(text: str, model: str = "") -> LoraUse:
    """`PATH[:WEIGHT[:BLOCKS]]`, checked to exist and, given the base `model` file, to be made for its family
    (both headers only: a LoRA of another family is named before the model loads)."""
    from .lora.spec import missing_lora, spec_value_problems

    spec = parse_lora_spec(text)
    confine(spec.path, "LoRA")
    if not locate(spec.path).is_file():
        raise ConfigError(missing_lora(text, spec))
    problems = spec_value_problems(text, spec)
    if problems:
        raise ConfigError(problems[0])
    if model and Path(model).is_file() and Path(model).suffix.lower() == ".safetensors":
        _check_family(spec.path, model)
    return LoraUse(spec.path, spec.ratio, spec.blocks)


def _check_family(lora: str, model: str) -> None:
    from safetensors import safe_open

    from .lora.files import check_family
    from .models.families import ModelTypeError, detect_family

    try:
        with safe_open(lora, framework="pt") as f:
            names, meta = {k.split(".")[0] for k in f.keys()}, f.metadata() or {}
        with safe_open(model, framework="pt") as f:
            family = detect_family(set(f.keys()), model)
    except (OSError, ValueError, ModelTypeError):  # unreadable or odd headers are reported where the files load
        return
    check_family(names, meta, family, lora, Path(model).name)


class ModelSession:
    """The current checkpoint and its LoRA adapters; a new checkpoint drops both.

    Used by `generate` and the grid: a LoRA file is loaded once per checkpoint, and a weight change
    is only an adapter scale (diffusers' own loader, so kohya and PEFT files load unchanged).
    """

    def __init__(self, loader: Callable[..., SDModel], allow_pickle: bool) -> None:
        self.loader, self.allow_pickle = loader, allow_pickle
        self.path: str | None = None
        self.model: SDModel | None = None
        self.adapters: dict[tuple[str, str], str] = {}
        self.loads = 0
        self._active: tuple | None = None
        self.patcher = WeightPatcher()
        self.device = pick_device("auto")

    def ensure(self, path: str) -> SDModel:
        if path != self.path:
            self.model = None
            self.model = self.loader(path, allow_pickle=self.allow_pickle).to(self.device)
            self.path, self.adapters, self.patcher = path, {}, WeightPatcher()
            self.loads += 1
        assert self.model is not None
        return self.model

    def activate(self, loras: list[LoraUse], sampler: str = "ddim") -> None:
        assert self.model is not None
        wanted = (self.path, tuple((u.path, u.blocks, u.weight) for u in loras))
        if wanted == self._active:
            return  # same adapters at the same scales: nothing to do between cells
        pipe = build_pipeline(self.model, sampler)
        lyco = [u for u in loras if self.patcher.is_lycoris(u.path)]
        loras = [u for u in loras if u not in lyco]
        self.patcher.apply(self.model, lyco)
        names, weights = [], []
        for use in loras:
            key = (use.path, use.blocks)
            if key not in self.adapters:
                name = f"lora{len(self.adapters)}"
                source = block_scaled_lora(use.path, use.blocks, self.model) if use.blocks else use.path
                pipe.load_lora_weights(source, adapter_name=name)
                self.adapters[key] = name
            names.append(self.adapters[key])
            weights.append(use.weight)
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=weights)
        elif self.adapters:
            pipe.disable_lora()
        self._active = wanted


def block_scaled_lora(path: str, blocks: str, model: SDModel) -> dict[str, torch.Tensor]:
    """A kohya LoRA with each module's up weights scaled by its block's LoRA block weight."""
    from safetensors.torch import load_file

    from .lora.blocks import lora_name_block
    from .lora.files import lbw_weights

    ratios = lbw_weights(blocks, model.family)
    ldm_of = dict(unet_module_pairs(dict(model.unet.config)))
    sd = load_file(str(confine(path, "LoRA")))
    for key in list(sd):
        if key.endswith(".lora_up.weight"):
            sd[key] = sd[key] * ratios[lora_name_block(key.split(".")[0], model.family, ldm_of)]
    return sd


def is_lycoris_file(path: str) -> bool:
    """Whether a LoRA file holds LyCORIS kinds (LoHa, LoKr, (IA)^3, full, OFT, DoRA), which diffusers' loader does not
    read: a marker suffix of any registered module kind."""
    from safetensors import safe_open

    from .lora.kinds import MODULE_KINDS

    suffixes = tuple(f".{m}" for k in MODULE_KINDS.names() for m in MODULE_KINDS.get(k).markers) + (".dora_scale",)
    with safe_open(str(confine(path, "LoRA")), framework="pt") as f:
        return any(k.endswith(suffixes) for k in f.keys())


class WeightPatcher:
    """LyCORIS files applied our own way: W = W0 + sum(weight * block ratio * dW) on the model's own modules,
    with W0 kept so a new weight (the next grid cell) starts from the original again. Exact for every kind."""

    def __init__(self) -> None:
        self.originals: dict[torch.nn.Module, torch.Tensor] = {}
        self.modules: dict[str, dict] = {}  # file -> its modules, read once
        self.kinds: dict[str, bool] = {}  # file -> whether it is a LyCORIS file
        self.names: dict[str, torch.nn.Module] | None = None  # the model's modules by kohya name, built once
        self.ldm_of: dict[str, str] = {}

    def is_lycoris(self, path: str) -> bool:
        if path not in self.kinds:
            self.kinds[path] = is_lycoris_file(path)
        return self.kinds[path]

    def restore(self) -> None:
        with torch.no_grad():
            for module, weight in self.originals.items():
                module.weight.copy_(weight.to(module.weight.device, module.weight.dtype))

    def apply(self, model: SDModel, uses: list[LoraUse]) -> None:
        from .lora.blocks import lora_name_block
        from .lora.files import lbw_weights, read_lora
        from .lora.keys import module_kohya_names

        self.restore()
        if not uses:
            return
        if self.names is None:
            self.names, self.ldm_of = module_kohya_names(model), dict(unet_module_pairs(dict(model.unet.config)))
        with torch.no_grad():
            for use in uses:
                if use.path not in self.modules:
                    self.modules[use.path] = read_lora(use.path)[0]
                ratios = lbw_weights(use.blocks, model.family) if use.blocks else None
                found = 0
                for name, lyco in self.modules[use.path].items():
                    module = self.names.get(name)
                    if module is None:
                        continue
                    found += 1
                    if module not in self.originals:
                        self.originals[module] = module.weight.detach().to("cpu", copy=True)
                    base = self.originals[module].float()
                    ratio = use.weight * (ratios[lora_name_block(name, model.family, self.ldm_of)] if ratios else 1.0)
                    delta = lyco.delta(tuple(base.shape), base)
                    module.weight.add_((ratio * delta).to(module.weight.device, module.weight.dtype))
                if not found:
                    raise ConfigError(f"{use.path}: none of its modules exist in this model; is it for another model family?")
