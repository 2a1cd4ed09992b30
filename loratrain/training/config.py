"""`loratrain train` options, with sd-scripts names so existing TOML files and habits carry over.

The options are declared in groups (training/options/: model, data, network, optimizer and schedule, noise and loss,
saving, sampling), each with its own checks; TrainConfig is all of them at once, so the flags and TOML keys stay
flat, and holds the rules that tie two groups together. Importing this module is light (no torch): the CLI builds
its flags and the UI its form from it. Names that go through a registry (network module, optimizer, scheduler,
sampler) are checked against that registry when the config is validated, before any model loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, PrivateAttr

from loratrain.core.config import JobConfig
from loratrain.core.errors import ConfigError, Problem

from .kohya import GUI_KEYS, SD_SCRIPTS_FLAGS, cli_value, translate
from .options import DATA, LOGS, MODEL, NET, NOISE, OPTIM, SAMPLE, SAVE
from .options.data import RANDOM_CAPTIONS, DataOptions, DatasetOptions, SubsetOptions
from .options.flux import FluxOptions
from .options.model import ModelOptions
from .options.network import NetworkOptions
from .options.noise import NoiseOptions
from .options.optimizer import OptimizerOptions
from .options.sampling import SamplingOptions
from .options.saving import SavingOptions
from .options.sd3 import SD3Options

__all__ = ["DATA", "LOGS", "MODEL", "NET", "NOISE", "OPTIM", "SAMPLE", "SAVE", "TrainConfig"]

#: the option groups in the order the form and --help show them
GROUPS = (ModelOptions, DataOptions, DatasetOptions, SubsetOptions, NetworkOptions, OptimizerOptions, NoiseOptions, SavingOptions,
          SamplingOptions, FluxOptions, SD3Options)


# pydantic takes a class's fields from its bases last to first: listed in reverse, they appear in GROUPS' order
class TrainConfig(SD3Options, FluxOptions, SamplingOptions, SavingOptions, NoiseOptions, OptimizerOptions, NetworkOptions, SubsetOptions, DatasetOptions,
                  DataOptions, ModelOptions, JobConfig):
    """`loratrain train`: sd-scripts' option names; its other options (kohya.py) are accepted or refused by name."""

    COMPAT_FLAGS = tuple(SD_SCRIPTS_FLAGS) + tuple(GUI_KEYS)
    #: inf and nan are no learning rate, weight, ratio or strength: every float option must be finite
    model_config = ConfigDict(allow_inf_nan=False)
    #: a kohya_ss GUI JSON's keys for our options and the file, so its problems are named as that file spells them
    _gui: Any = PrivateAttr(default=None)

    @classmethod
    def build(cls, data: dict[str, Any], source: str = "config", check: bool = True) -> Any:
        """JobConfig.build; a kohya_ss GUI JSON's problems (now and at check) name its own keys and the file."""
        from .kohya_gui import GuiNames

        gui = GuiNames.of(data, source)
        try:
            cfg = super().build(data, source, check=False)
        except ConfigError as e:
            raise (gui.renamed(e) if gui else e) from None
        cfg._gui = gui
        return cfg.check(ready=False) if check else cfg

    def check(self, ready: bool = True) -> Any:
        try:
            return super().check(ready)
        except ConfigError as e:
            raise (self._gui.renamed(e) if self._gui else e) from None

    @classmethod
    def compat(cls, flat: dict) -> tuple[dict, list[str], list[Problem]]:
        from .kohya import is_off
        from .kohya_gui import from_gui_json, is_gui_json

        notes: list[str] = []
        problems: list[Problem] = []
        lora_type = flat.get("LoRA_type") if is_gui_json(flat) else None
        if lora_type is not None:  # the kohya_ss GUI's saved JSON: its form fields first become sd-scripts options
            flat, notes, problems = from_gui_json(flat)
            known = set(cls.model_fields) | set(SD_SCRIPTS_FLAGS) | set(GUI_KEYS)
            unused = sorted(k for k, v in flat.items() if k not in known and is_off(k, v))
            flat = {k: v for k, v in flat.items() if k not in unused}
            if unused:
                notes.append(f"ignored GUI field(s) left off: {', '.join(unused)}")
        flat, more_notes, more_problems = translate(flat, set(cls.model_fields))
        if lora_type is not None:
            notes.insert(0, f"kohya_ss GUI config: LoRA_type {lora_type!r} -> network_module {flat.get('network_module')}")
        return flat, notes + more_notes, problems + more_problems

    @classmethod
    def read_config_file(cls, path: str | Path) -> dict[str, Any]:
        """A TOML, or the kohya_ss GUI's saved .json (recognised by content: compat translates it)."""
        from .kohya_gui import read_json_config

        return read_json_config(path) if Path(path).suffix.lower() == ".json" else super().read_config_file(path)

    @classmethod
    def compat_value(cls, values: list[str]) -> object:
        return cli_value(values)

    def problems(self) -> list[Problem]:
        """Each group's own checks, then the rules between groups."""
        out: list[Problem] = [p for group in GROUPS for p in group.problems(self)]
        if self.cache_text_encoder_outputs or self.cache_text_encoder_outputs_to_disk:
            if not self.network_train_unet_only:
                out.append(("cache_text_encoder_outputs", "needs network_train_unet_only: a text encoder being trained "
                                                          "changes its outputs every step"))
            random_captions = [n for n in RANDOM_CAPTIONS if getattr(self, n)]
            if random_captions:
                out.append(("cache_text_encoder_outputs", f"captions change from step to step with {', '.join(random_captions)}; "
                                                          "turn those off or the cache"))
        if (self.color_aug or self.random_crop) and (self.masked_loss or self.alpha_mask):
            out.append(("random_crop" if self.random_crop else "color_aug", "not implemented together with masked_loss / alpha_mask"))
        return out

    def requirements(self) -> list[Problem]:
        """What must exist before a model is loaded: each group's inputs, then the block counts the model decides."""
        from .config_checks import block_count_problems

        out: list[Problem] = [p for group in GROUPS for p in group.requirements(self)]
        return out + block_count_problems(self)
