"""The kohya_ss GUI's saved JSON configs ("Save config", its `presets/lora/*.json`) as sd-scripts options.

The GUI stores its form fields, not sd-scripts' arguments: `max_resolution`, `optimizer`,
`LoRA_type`, `lr_warmup` in percent, `xformers = "sdpa"`, numbers as strings and "" for unset.
When it starts a run it turns them into a `config_lora-*.toml` (kohya_gui/lora_gui.py); this
module makes the same translation, so `loratrain train --config_file preset.json` trains what the
GUI's Start button would have. The result then goes through kohya.translate like any sd-scripts
config. A JSON is recognised by content (a `LoRA_type` key), whatever its file name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratrain.core.errors import ConfigError

from .kohya import is_off

MARKER = "LoRA_type"

RENAMED = {"max_resolution": "resolution", "optimizer": "optimizer_type", "lora_network_weights": "network_weights",
           "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs"}

#: GUI LoRA_type -> (network_module, the GUI fields it passes as network_args), as lora_gui.py builds them;
#: kohya.translate then reads network_args like any sd-scripts config (algo=, dora_wd, conv_dim, unit, ...)
LORA_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Standard": ("lora", ()),
    "Kohya LoCon": ("locon", ("conv_dim", "conv_alpha")),
    "LoCon": ("lycoris.kohya", ("algo=locon", "conv_dim", "conv_alpha")),
    "LyCORIS/LoCon": ("lycoris.kohya", ("algo=locon", "conv_dim", "conv_alpha")),
    "LyCORIS/LoHa": ("lycoris.kohya", ("algo=loha", "conv_dim", "conv_alpha")),
    "LyCORIS/LoKr": ("lycoris.kohya", ("algo=lokr", "conv_dim", "conv_alpha", "factor", "decompose_both")),
    "LyCORIS/iA3": ("lycoris.kohya", ("algo=ia3", "train_on_input")),
    "Kohya DyLoRA": ("dylora", ("unit",)),
    "LyCORIS/DyLoRA": ("lycoris.kohya", ("algo=dylora", "unit")),
}
#: network_args the GUI passes for every type when set: LyCORIS' switches and networks.lora's arguments
COMMON_ARG_FIELDS = ("dora_wd", "use_tucker", "use_cp", "rank_dropout", "module_dropout", "block_dims", "block_alphas",
                     "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
                     "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
#: GUI form state with no sd-scripts meaning (or one this translation already used): dropped, named in the log
GUI_ONLY = {"model_list", "num_cpu_threads_per_process", "LyCORIS_preset", "train_norm", "bypass_mode", "use_scalar",
            "rank_dropout_scale", "constrain", "rescaled", "decompose_both", "factor", "train_on_input", "unit", "dora_wd",
            "conv_dim", "conv_alpha", "noise_offset_type", "epoch", "lr_warmup", "stop_text_encoder_training_pct",
            "stop_text_encoder_training", "sdxl", "sdxl_no_half_vae", "use_wandb", "wandb_api_key", "wandb_run_name",
            "log_tracker_name", "log_tracker_config", "log_config", "extra_accelerate_launch_args", "gpu_ids",
            "multi_gpu", "num_processes", "num_machines", "main_process_port", "mixed_precision_accelerate",
            "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic", "highvram", "lowvram",
            "sample_prompts_file", "save_as_bool", "save_every_n_steps_state"}


def read_json_config(path: str | Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a JSON config must be an object of options")
    return data


def is_gui_json(data: dict[str, Any]) -> bool:
    return MARKER in data


def _number(value: Any) -> Any:
    """The GUI keeps many numbers as strings ("1", "0.0001"); "" means unset (None)."""
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
    return value


@dataclass(frozen=True)
class GuiNames:
    """How a GUI JSON spells our options, so each problem names the key of the user's file (LoRA_type, optimizer,
    max_resolution, lr_warmup; not network_module, optimizer_type, ...) and the file itself."""

    names: dict[str, str]  # our option -> the GUI key its value came from; every key of the file -> itself
    lora_type: str
    source: str

    @classmethod
    def of(cls, data: dict[str, Any], source: str) -> GuiNames | None:
        if not is_gui_json(data):
            return None
        gui = {k: _number(v) for k, v in data.items()}
        names = {key: key for key in data}
        names.update({ours: key for key, ours in RENAMED.items() if key in data and ours not in data})
        names["network_module"] = MARKER
        if not gui.get("lr_warmup_steps") and gui.get("lr_warmup"):
            names["lr_warmup_steps"] = "lr_warmup"
        if not gui.get("max_train_steps") and not gui.get("max_train_epochs") and gui.get("epoch"):
            names["max_train_epochs"] = "epoch"
        if "unit" in data:
            names["dylora_unit"] = "unit"
        return cls(names, str(gui.get(MARKER) or "Standard"), source.removesuffix(" + command line"))

    def renamed(self, error: ConfigError) -> ConfigError:
        out = []
        for field, text in error.problems:
            key = re.split(r"[=: ]", text, maxsplit=1)[0]
            if field == "network_args" and key in self.names:  # a GUI field the translation passed as network_args
                field = key
            field = self.names.get(field, field)
            text = re.sub(r"(?<![\w.])network_module (= )?[\w.]+", f"{MARKER} {self.lora_type!r}", text)
            for ours, theirs in self.names.items():
                if ours != theirs and "_" in ours:
                    text = re.sub(rf"(?<![\w.]){re.escape(ours)}(?!\w)", theirs, text)
            out.append((field, f"{text} (in {self.source})" if field in self.names else text))
        return ConfigError(problems=out)


def from_gui_json(data: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[tuple[str, str]]]:
    """GUI fields -> sd-scripts keys: (data, log lines, problems)."""
    gui = {k: _number(v) for k, v in data.items()}
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    lora_type = str(gui.get(MARKER) or "Standard")
    if lora_type not in LORA_TYPES:
        problems.append((MARKER, f"{lora_type!r}: not implemented here (LoRA types here: {', '.join(LORA_TYPES)})"))
    module, arg_fields = LORA_TYPES.get(lora_type, LORA_TYPES["Standard"])
    args = [f if "=" in f else f"{f}={gui[f]}" for f in arg_fields if "=" in f or gui.get(f) is not None]
    args += [f"{f}={gui[f]}" for f in COMMON_ARG_FIELDS if not is_off(f, gui.get(f))]  # "" and 0: the GUI's "not set"
    out["network_module"] = module
    if args:
        out["network_args"] = args
    # steps, warmup, schedule: as the GUI computes them when it starts a run
    if not gui.get("max_train_steps") and not gui.get("max_train_epochs") and gui.get("epoch"):
        out["max_train_epochs"] = gui["epoch"]  # the GUI turns epochs into max_train_steps from the folder counts
    if gui.get("lr_warmup_steps"):
        out["lr_warmup_steps"] = gui["lr_warmup_steps"]
    elif gui.get("lr_warmup"):
        warmup = gui["lr_warmup"]
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 100:
            problems.append(("lr_warmup", f"{data['lr_warmup']!r}: the GUI's warmup is a number, a percent of the steps "
                                          "(0 to 99)"))
        else:
            out["lr_warmup_steps"] = warmup / 100  # percent of the total: a ratio < 1 here
    if gui.get("lr_scheduler_num_cycles") is None and gui.get("epoch"):
        out["lr_scheduler_num_cycles"] = gui["epoch"]
    attention = gui.get("xformers")
    if attention in ("xformers", True):
        out["xformers"] = True
    elif attention == "sdpa":
        out["sdpa"] = True
    noise = gui.get("noise_offset_type", "Original")
    dropped = ({"multires_noise_iterations", "multires_noise_discount"} if noise == "Original"
               else {"noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"})
    te_lr, unet_lr = gui.get("text_encoder_lr"), gui.get("unet_lr")
    if te_lr == 0 and unet_lr:
        out["network_train_unet_only"] = True
    elif unet_lr == 0 and te_lr:
        out["network_train_text_encoder_only"] = True
    if gui.get("sample_prompts") and "\n" in str(gui["sample_prompts"]):
        problems.append(("sample_prompts", "the GUI keeps the prompts' text here; save it to a .txt file and give that path"))
    if gui.get("additional_parameters"):
        problems.append(("additional_parameters", f"{gui['additional_parameters']!r}: give these flags on the command line"))
    # 0 means "unset" for these in the GUI (it passes None to sd-scripts)
    unset_when_zero = {"seed", "max_timestep", "max_train_steps", "max_train_epochs"}
    handled = {MARKER, "xformers", "additional_parameters", *COMMON_ARG_FIELDS}
    ignored = []
    for key, value in gui.items():
        if key in out or key in dropped or key in handled or (key in unset_when_zero and value == 0):
            continue
        if key in GUI_ONLY:
            ignored.append(key)
        elif key in ("text_encoder_lr", "unet_lr", "learning_rate") and not value:
            continue  # 0 / "" means "not trained" or "use learning_rate": handled above
        elif value is None:
            continue  # "": the GUI's unset
        else:
            out[RENAMED.get(key, key)] = value
    logs = [f"kohya_ss GUI config: network_args {' '.join(args)}"] if args else []
    if ignored:
        logs.append(f"ignored GUI field(s) {', '.join(sorted(ignored))}: GUI form state, or already used above")
    return out, logs, problems
