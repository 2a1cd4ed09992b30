"""Config of `loratrain merge`: one dataclass shared by the CLI, TOML files and the UI."""
from __future__ import annotations

import re
from dataclasses import dataclass

from loratrain.common.config import CommandConfig, ConfigError, opt

from .methods import MERGE_METHODS
from .tensor_io import SAVE_DTYPES

PRECISIONS = ("auto", *SAVE_DTYPES)


@dataclass
class MergeConfig(CommandConfig):
    model_a: str = opt("", "model A (.safetensors)", metadata={"positional": True})
    model_b: str = opt("", "model B (.safetensors)", metadata={"positional": True})
    model_c: str = opt("", "model C, for add_difference (.safetensors)")
    output: str = opt("", "output .safetensors file")
    method: str = opt("weighted_sum", "merge method; w is always the share of B",
                      metadata={"choices": ["weighted_sum", "add_difference"]})
    alpha: float | None = opt(None, "plain merge: the weight of B for every key")
    weights: str = opt("", "block merge: 25 comma-separated weights IN00..IN11,M00,OUT00..OUT11 (SDXL: 19, or 25 converted)")
    preset: str = opt("", "block merge: a named preset (GRAD_V, GRAD_A, FLAT_25, WRAP08, ...)")
    preset_file: str = opt("", "extra presets, one 'NAME<TAB>25 values' per line")
    base_alpha: float | None = opt(None, "block merge: weight of B for text encoder, VAE and other keys (default 0)")
    save_precision: str = opt("auto", "output dtype of float tensors (auto keeps each input's)", metadata={"choices": list(PRECISIONS)})
    position_ids: str = opt("keep", "CLIP position_ids: keep A's, or reset to 0..N-1 (never interpolated)",
                            metadata={"choices": ["keep", "reset"]})
    prune: bool = opt(False, "drop EMA weights (model_ema.*) from the output")
    vae: str = opt("", "bake this VAE (.safetensors, LDM keys) into the output")
    discard_weights: str = opt("", "drop keys matching this regular expression from the output")
    hash_models: bool = opt(True, "record the inputs' SHA-256 in sd_merge_models (reads each input once more, in parallel)")
    overwrite: bool = opt(False, "replace the output file if it exists")

    def validate(self) -> None:
        if self.method.lower() not in MERGE_METHODS:
            raise ConfigError(f"method: unknown merge method {self.method!r}; choose one of {', '.join(MERGE_METHODS.names())}")
        if self.save_precision not in PRECISIONS:
            raise ConfigError(f"save_precision must be one of {', '.join(PRECISIONS)}")
        if self.position_ids not in ("keep", "reset"):
            raise ConfigError("position_ids must be keep or reset")
        if self.discard_weights:
            try:
                re.compile(self.discard_weights)
            except re.error as e:
                raise ConfigError(f"discard_weights: not a valid regular expression ({e})") from None

    @property
    def block_mode(self) -> bool:
        return bool(self.weights or self.preset)

    def check_complete(self) -> None:
        """Checks that need every value (flags and TOML merged), before any file is opened."""
        if not self.model_a or not self.model_b:
            raise ConfigError("merge needs MODEL_A and MODEL_B")
        if not self.output:
            raise ConfigError("--output is required")
        if self.weights and self.preset:
            raise ConfigError("give --weights or --preset, not both")
        if self.block_mode and self.alpha is not None:
            raise ConfigError("--alpha is for a plain merge; with --weights/--preset use --base_alpha for the non-block keys")
        if not self.block_mode and self.alpha is None:
            raise ConfigError("give --alpha W (the share of B) for a plain merge, or --weights/--preset for a block merge")
        if not self.block_mode and self.base_alpha is not None:
            raise ConfigError("--base_alpha only applies to a block merge (--weights or --preset)")
        needs_c = MERGE_METHODS.get(self.method).needs_c
        if needs_c and not self.model_c:
            raise ConfigError(f"{self.method} needs --model_c")
        if self.model_c and not needs_c:
            raise ConfigError(f"--model_c is not used by {self.method}; did you mean --method add_difference?")
