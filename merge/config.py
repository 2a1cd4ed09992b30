"""Configs of `loratrain merge`, `convert` and `lora bake|merge|extract|convert-ia3`: light to import (the CLI and the UI
build their flags and forms from them); each job module holds the work."""
from __future__ import annotations

import re
from pathlib import Path

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import Problem
from loratrain.core.lora.spec import lora_spec_problems, parse_lora_spec
from loratrain.core.precision import CANONICAL

PRECISIONS = ("auto", *CANONICAL, "float")
METHODS = "loratrain.merge.methods:MERGE_METHODS"


class MergeConfig(JobConfig):
    model_a: str = opt("", "model A (.safetensors)", positional=True, path="file", group="Models")
    model_b: str = opt("", "model B (.safetensors)", positional=True, path="file", group="Models")
    model_c: str = opt("", "model C, for add_difference (.safetensors)", path="file", group="Models")
    output: str = opt("", "output .safetensors file", path="output", group="Output")
    method: str = opt("weighted_sum", "merge method; w is always the share of B", registry=METHODS, group="Weights")
    alpha: float | None = opt(None, "plain merge: the weight of B for every key", group="Weights")
    weights: str = opt("", "block merge: 25 comma-separated weights IN00..IN11,M00,OUT00..OUT11 (SDXL: 19, or 25 converted)",
                       group="Weights")
    preset: str = opt("", "block merge: a named preset (GRAD_V, GRAD_A, FLAT_25, WRAP08, ...)", group="Weights")
    preset_file: str = opt("", "extra presets, one 'NAME<TAB>25 values' per line", path="file", group="Weights", advanced=True)
    base_alpha: float | None = opt(None, "block merge: weight of B for text encoder, VAE and other keys (default 0)", group="Weights")
    save_precision: str = opt("auto", "output dtype of float tensors (auto keeps each input's)", choices=PRECISIONS, group="Output")
    position_ids: str = opt("keep", "CLIP position_ids: keep A's, or reset to 0..N-1 (never interpolated)",
                            choices=["keep", "reset"], group="Output", advanced=True)
    prune: bool = opt(False, "drop EMA weights (model_ema.*) from the output", group="Output")
    vae: str = opt("", "bake this VAE (.safetensors, LDM keys) into the output", path="file", group="Output")
    discard_weights: str = opt("", "drop keys matching this regular expression from the output", group="Output", advanced=True)
    hash_models: bool = opt(True, "record the inputs' SHA-256 in sd_merge_models (computed while merging)", group="Output",
                            advanced=True)
    overwrite: bool = opt(False, "replace the output file if it exists", group="Output")
    list_presets: bool = opt(False, "print the block-weight presets and exit", advanced=True)

    @property
    def block_mode(self) -> bool:
        return bool(self.weights or self.preset)

    def problems(self) -> list[Problem]:
        """Everything that needs only the values (flags and TOML merged), before any file is opened."""
        if self.list_presets:
            return []
        out: list[Problem] = []
        if self.discard_weights:
            try:
                re.compile(self.discard_weights)
            except re.error as e:
                out.append(("discard_weights", f"not a valid regular expression ({e})"))
        if self.output and Path(self.output).suffix.lower() != ".safetensors":
            out.append(("output", f"must end in .safetensors, got {Path(self.output).name}"))
        if self.weights and self.preset:
            out.append(("preset", "give --weights or --preset, not both"))
        if self.block_mode and self.alpha is not None:
            out.append(("alpha", "--alpha is for a plain merge; with --weights/--preset use --base_alpha for the non-block keys"))
        if not self.block_mode and self.alpha is None:
            out.append(("alpha", "give --alpha W (the share of B) for a plain merge, or --weights/--preset for a block merge"))
        if not self.block_mode and self.base_alpha is not None:
            out.append(("base_alpha", "--base_alpha only applies to a block merge (--weights or --preset)"))
        from .methods import MERGE_METHODS

        if self.method in MERGE_METHODS:
            needs_c = MERGE_METHODS.get(self.method).needs_c
            if self.model_c and not needs_c:
                out.append(("model_c", f"--model_c is not used by {self.method}; did you mean --method add_difference?"))
        if self.preset:
            from .presets import merge_preset

            try:
                merge_preset(self.preset, self.preset_file or None)
            except (ValueError, OSError) as e:
                out.append(("preset", str(e)))
        return out

    def requirements(self) -> list[Problem]:
        if self.list_presets:
            return []
        out = [(name, "is required") for name in ("model_a", "model_b", "output") if not getattr(self, name)]
        from .methods import MERGE_METHODS

        if self.method in MERGE_METHODS and MERGE_METHODS.get(self.method).needs_c and not self.model_c:
            out.append(("model_c", f"{self.method} needs --model_c"))
        return out + _output_problems(self, "output", [self.model_a, self.model_b, self.model_c, self.vae, self.preset_file])


class BakeConfig(JobConfig):
    model: str = opt("", "checkpoint to bake into (.safetensors)", positional=True, path="file")
    loras: list[str] = opt([], "LoRA files as PATH[:RATIO[:BLOCKS]]; BLOCKS a LoRA block-weight preset or 12/17/20/26 values (FLUX: 61)",
                           path="lora")
    output: str = opt("", "output .safetensors", path="output")
    save_precision: str = opt("auto", "dtype of float tensors in the output (auto keeps the model's)", choices=PRECISIONS)
    overwrite: bool = opt(False, "replace the output if it exists")

    def requirements(self) -> list[Problem]:
        out = [(name, "is required") for name in ("model", "loras", "output") if not getattr(self, name)]
        out += _output_problems(self, "output", [self.model, *(parse_lora_spec(t).path for t in self.loras)])
        return out + lora_spec_problems(self.loras, "loras")


class LoraMergeConfig(JobConfig):
    loras: list[str] = opt([], "LoRA files as PATH[:RATIO[:BLOCKS]] (BLOCKS: a LoRA block-weight preset or 12/17/20/26 "
                           "values, as lora bake takes)", path="lora")
    output: str = opt("", "output .safetensors", path="output")
    model: str = opt("", "the base checkpoint: needed (with --mode svd) to merge LoHa / LoKr / (IA)^3 / DoRA files, for "
                     "their weights' shapes and, for (IA)^3 and DoRA, the weights themselves; with block weights, which "
                     "U-Net block each module is in (else the LoRAs' family's standard layout)", path="file")
    mode: str = opt("concat", "concat: exact sum, rank = sum of ranks; svd: re-factorise to --new_rank", choices=["concat", "svd"])
    new_rank: int = opt(16, "svd: rank of linear / 1x1 modules", ge=1)
    new_conv_rank: int | None = opt(None, "svd: rank of 3x3 conv modules (default: new_rank)", ge=1)
    clamp_quantile: float = opt(0.99, "svd: clamp factors to this quantile of their magnitudes (1 = off)", gt=0, le=1)
    save_precision: str = opt("fp16", "output dtype", choices=[*CANONICAL, "float"])
    overwrite: bool = opt(False, "replace the output if it exists")

    def requirements(self) -> list[Problem]:
        out = [(name, "is required") for name in ("loras", "output") if not getattr(self, name)]
        out += _output_problems(self, "output", [self.model, *(parse_lora_spec(t).path for t in self.loras)])
        return out + lora_spec_problems(self.loras, "loras") + _family_problems(self.loras)


RESIZE_METHODS = ("", "sv_ratio", "sv_fro", "sv_cumulative")


class LoraResizeConfig(JobConfig):
    model: str = opt("", "the LoRA / LoCon file to resize", positional=True, path="file")
    output: str = opt("", "output .safetensors", path="output")
    new_rank: int = opt(4, "rank of the result (with a dynamic method: the most it may keep)", ge=1)
    new_conv_rank: int | None = opt(None, "rank of 3x3 conv modules (default: new_rank)", ge=1)
    dynamic_method: str = opt("", "per-module rank rule: sv_ratio (keep singular values >= largest / param), sv_fro "
                              "(keep this share of the Frobenius norm), sv_cumulative (this share of their sum)",
                              choices=list(RESIZE_METHODS))
    dynamic_param: float | None = opt(None, "the dynamic method's value (sv_ratio > 1, the shares in 0..1)", gt=0)
    dylora_rank: int = opt(0, "cut a DyLoRA to its first N components instead of an SVD (a multiple of its unit)", ge=0)
    save_precision: str = opt("fp16", "output dtype", choices=[*CANONICAL, "float"])
    overwrite: bool = opt(False, "replace the output if it exists")

    def problems(self) -> list[Problem]:
        if self.dylora_rank and self.dynamic_method:
            return [("dylora_rank", "a DyLoRA cut keeps the first N components: no dynamic method with it")]
        if self.dynamic_method and self.dynamic_param is None:
            return [("dynamic_param", f"is required with --dynamic_method {self.dynamic_method}")]
        if self.dynamic_method in ("sv_fro", "sv_cumulative") and self.dynamic_param is not None and self.dynamic_param > 1:
            return [("dynamic_param", f"{self.dynamic_method} keeps a share: give a value in 0..1")]
        if self.dynamic_method == "sv_ratio" and self.dynamic_param is not None and self.dynamic_param < 1:
            return [("dynamic_param", "sv_ratio keeps singular values >= largest / ratio: give a ratio >= 1")]
        return []

    def requirements(self) -> list[Problem]:
        out = [(name, "is required") for name in ("model", "output") if not getattr(self, name)]
        header = _lora_header(self.model) if self.dylora_rank else None
        if header is not None and not _is_dylora(header[1]):
            module = header[1].get("ss_network_module") or "not recorded"
            out.append(("dylora_rank", f"{self.model} is not a DyLoRA (its ss_network_module: {module}): only a DyLoRA "
                                       "learned each rank, so only it can be cut; use --new_rank (an SVD resize) instead"))
        return out + _output_problems(self, "output", [self.model])


def _lora_header(path: str) -> tuple[set[str], dict[str, str]] | None:
    """A LoRA file's module names and metadata from its header (None when it cannot be read: the job says why)."""
    from loratrain.core.tensor_io import LazySafetensors

    if not path or not Path(path).is_file():
        return None
    try:
        with LazySafetensors(path, "LoRA") as f:
            return {k.split(".")[0] for k in f.keys()}, dict(f.metadata)
    except (OSError, ValueError):
        return None


def _is_dylora(meta: dict[str, str]) -> bool:
    """sd-scripts' networks.dylora, or LyCORIS with algo=dylora, as the file's metadata records them."""
    import json

    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    algo = str(args.get("algo", "")) if isinstance(args, dict) else ""
    return "dylora" in meta.get("ss_network_module", "").lower() or algo.lower() == "dylora"


def _family_problems(loras: list[str]) -> list[Problem]:
    """LoRAs of SD1/SD2 and of SDXL (told from module names or metadata) never merge into one file."""
    from loratrain.core.lora.files import lora_is_sdxl

    made_for: dict[bool, str] = {}
    for text in loras:
        path = parse_lora_spec(text).path
        header = _lora_header(path)
        sdxl = lora_is_sdxl(header[0], header[1]) if header else None  # type: ignore[arg-type]
        if sdxl is not None:
            made_for.setdefault(sdxl, path)
    if len(made_for) < 2:
        return []
    return [("loras", f"{made_for[False]} is an SD1/SD2 LoRA and {made_for[True]} an SDXL LoRA: only LoRAs of one model "
                      "family merge")]


class LoraExtractConfig(JobConfig):
    model_org: str = opt("", "the base checkpoint", positional=True, path="file")
    model_tuned: str = opt("", "the fine-tuned checkpoint", positional=True, path="file")
    output: str = opt("", "output LoRA .safetensors", path="output")
    dim: int = opt(4, "rank of linear / 1x1 modules", ge=1)
    conv_dim: int = opt(0, "rank of 3x3 conv modules (0: no conv LoRA)", ge=0)
    clamp_quantile: float = opt(0.99, "clamp factors to this quantile of their magnitudes (1 = off)", gt=0, le=1)
    min_diff: float = opt(0.01, "text encoder deltas all below this are dropped (U-Net only LoRA)", ge=0)
    save_precision: str = opt("fp16", "output dtype", choices=[*CANONICAL, "float"])
    overwrite: bool = opt(False, "replace the output if it exists")

    def requirements(self) -> list[Problem]:
        out = [(name, "is required") for name in ("model_org", "model_tuned", "output") if not getattr(self, name)]
        return out + _output_problems(self, "output", [self.model_org, self.model_tuned])


class LoraConvertIa3Config(JobConfig):
    lora: str = opt("", "the (IA)^3 file to convert (LyCORIS' `weight` + `on_input` per module)", path="file")
    model: str = opt("", "the base checkpoint it was trained on: (IA)^3 scales that model's weights (dW = W * w)", path="file")
    output: str = opt("", "output LoRA .safetensors (kohya layout: every reader loads it)", path="output")
    rank: int = opt(16, "rank of linear / 1x1 modules; W * w is as full-rank as W, so only the full rank is exact", ge=1)
    conv_rank: int | None = opt(None, "rank of 3x3 conv modules (default: rank)", ge=1)
    clamp_quantile: float = opt(1.0, "clamp factors to this quantile of their magnitudes (1 = off: the plain truncated SVD)",
                                gt=0, le=1)
    save_precision: str = opt("fp16", "output dtype", choices=[*CANONICAL, "float"])
    overwrite: bool = opt(False, "replace the output if it exists")

    def requirements(self) -> list[Problem]:
        out = [(name, "is required") for name in ("lora", "model", "output") if not getattr(self, name)]
        out += _ia3_problems(self.lora)
        return out + _output_problems(self, "output", [self.model, self.lora])


def _ia3_problems(path: str) -> list[Problem]:
    """The input of `lora convert-ia3` holds (IA)^3 modules only (told from the header: LyCORIS marks each with
    `on_input`); any other kind is named with the command that does convert it."""
    from loratrain.core.tensor_io import LazySafetensors

    if not path:
        return []  # required: said by requirements
    if not Path(path).is_file():
        return [("lora", f"{path} is a folder; expected an (IA)^3 .safetensors file" if Path(path).is_dir()
                 else f"(IA)^3 file not found: {path}")]
    try:
        with LazySafetensors(path, "LoRA") as f:
            keys = list(f.keys())
    except (OSError, ValueError):
        return []  # unreadable: the job says why
    modules = {k.split(".")[0] for k in keys}
    ia3 = {k.split(".")[0] for k in keys if k.endswith(".on_input")}
    if not ia3:
        return [("lora", f"{path} is not an (IA)^3 file (no module has `on_input`): for LoHa / LoKr / DoRA / OFT use "
                         "`lora merge --mode svd --model BASE`, for a LoRA `lora resize`")]
    if modules - ia3:
        other = sorted(modules - ia3)[0]
        return [("lora", f"{path} holds other modules besides (IA)^3 ones (e.g. {other}): use `lora merge --mode svd "
                         "--model BASE`, which re-factorises every kind")]
    return []


class ConvertConfig(JobConfig):
    source: str = opt("", "a .safetensors (or, with --allow_pickle, .ckpt) file, or a diffusers folder", positional=True, path="any")
    target: str = opt("", "OUT.safetensors for a single file, otherwise a diffusers folder", positional=True, path="output")
    save_precision: str = opt("fp16", "dtype of float tensors in the output", choices=[*CANONICAL, "float"])
    allow_pickle: bool = opt(False, "read a pickled .ckpt with torch.load(weights_only=True)")
    overwrite: bool = opt(False, "replace the target if it exists")

    def requirements(self) -> list[Problem]:
        out = [(name, "is required") for name in ("source", "target") if not getattr(self, name)]
        if Path(self.target).suffix.lower() in (".ckpt", ".pt", ".bin"):
            out.append(("target", "we only write .safetensors or diffusers folders"))
        kind = "safetensors" if Path(self.target).suffix.lower() == ".safetensors" else "diffusers"
        return out + _output_problems(self, "target", [self.source], kind)


def _output_problems(cfg: JobConfig, field: str, inputs: list[str], kind: str = "safetensors") -> list[Problem]:
    """The output of every job here: not one of its inputs (nor inside or around one), not replaced without
    --overwrite, and with it only when it is an output of the same kind (safe_io.output_problems)."""
    from loratrain.core.safe_io import output_problems

    return output_problems(field, getattr(cfg, field), inputs, kind, cfg.overwrite)
