"""Finer control of a face training run (docs/face-model.md#finer-control): which parts train (per-part freezes,
the old layers `face grow` locks for a while), the learning-rate schedule, and the likeness curve with its warning.

Per-part freezes name the model's own modules (`encoder`, `encoder.body.2`, `inter_AB`, `decoder_src.res`, ...),
so a name means exactly what `model.named_modules()` says; `decoder_mask` is the one pseudo-name (every decoder's
mask branch, as `freeze_decoder_mask`). Checked against the archi before any work: an LIAE model has no
`decoder_src`, and saying so beats a run that trains what the user meant to hold still.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loratrain.core.errors import ConfigError

from .watchers import Watcher

if TYPE_CHECKING:
    from loratrain.core.progress import Reporter

    from ..models.archi import FaceAutoencoder
    from .trainer import FaceTrainer, FaceTrainResult

MASK_PARTS = ("upms", "out_mask")  # a decoder's mask branch


def split_parts(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def main_part_names(model: FaceAutoencoder) -> list[str]:
    """The names a user is shown: top-level parts, encoder blocks, each decoder's pieces, decoder_mask."""
    modules = dict(model.named_modules())
    names = [n for n, _ in model.named_children()]
    names += [n for n in modules if n.startswith("encoder.body.") and n.count(".") == 2]
    for dec in getattr(model, "decoder_names", ()):
        names += [f"{dec}.{p}" for p in ("ups", "res", "out", "upms", "out_mask") if f"{dec}.{p}" in modules]
    return names + ["decoder_mask"]


def part_modules(model: FaceAutoencoder, name: str) -> list[torch.nn.Module]:
    """The modules one part name covers; ConfigError naming the model's parts when it names none."""
    if name == "decoder_mask":
        return [getattr(getattr(model, dec), p) for dec in model.decoder_names for p in MASK_PARTS
                if hasattr(getattr(model, dec), p)]
    modules = dict(model.named_modules())
    if name and name in modules and any(True for _ in modules[name].parameters()):
        return [modules[name]]
    kind = model.spec.kind.upper()
    raise ConfigError(problems=[("freeze_parts", f"{name!r} is not a part of this {kind} model ({model.cfg.archi}); "
                                                 f"its parts: {', '.join(main_part_names(model))}")])


def part_names_problem(text: str, archi: str) -> str | None:
    """The first unknown name of a comma list for `archi`, checked on a tiny model of the same structure."""
    from ..models.archi import ArchSpec, FaceModelConfig, build_model

    try:
        spec = ArchSpec.parse(archi)
    except ValueError as e:
        return str(e)
    try:
        model = build_model(FaceModelConfig(archi, spec.resolution_multiple(), 4, 2, 2, 2))
    except Exception:  # an architecture that cannot be built this small: the trainer checks the names on the real model
        return None
    for name in split_parts(text):
        try:
            part_modules(model, name)
        except ConfigError as e:
            return e.problems[0][1]
    return None


def saved_archi(path: Path) -> str | None:
    """The archi of a saved model (its metadata only), or None when there is no readable one."""
    from safetensors import safe_open

    from loratrain.core.paths import confine

    from .state import CONFIG_KEY

    try:
        path = confine(path, "face model")
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            archi = json.loads((f.metadata() or {})[CONFIG_KEY])["model"]["archi"]
        return archi if isinstance(archi, str) else None
    except Exception:  # an unreadable file is the trainer's to report, with its own message
        return None


def frozen_part_params(model: FaceAutoencoder, text: str) -> set[int]:
    """ids of the parameters the `freeze_parts` list holds still."""
    out: set[int] = set()
    for name in split_parts(text):
        for module in part_modules(model, name):
            out.update(id(p) for p in module.parameters())
    return out


# ------------------------------------------------------------------ learning-rate schedule


def schedule_scale(iteration: int, schedule: str, warmup: int, max_iters: int) -> float:
    """The factor on lr for the update after `iteration` steps: linear warmup (iteration+1)/warmup over the first
    `warmup` updates, then 1 (constant) or half a cosine from 1 down to 0 at `max_iters` (cosine)."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    if schedule != "cosine":
        return 1.0
    span = max(1, max_iters - warmup)
    progress = min(1.0, max(0.0, (iteration - warmup) / span))
    return 0.5 * (1 + math.cos(math.pi * progress))


class LrWatcher(Watcher):
    """With a schedule (cosine or a warmup), the lr is a metric of the job (the Face page's lr plot), ten points
    per preview interval: enough to see the curve, few enough not to flood the job's event file."""

    def __init__(self, reporter: Reporter, every: int) -> None:
        self.reporter, self.every = reporter, max(1, every)

    def after_step(self, trainer: FaceTrainer, logs: dict[str, float]) -> str | None:
        if trainer.iteration % self.every == 0:
            self.reporter.advance(0, lr=trainer.lr_at(trainer.iteration - 1))
        return None


# ------------------------------------------------------------------ likeness


class LikenessWatcher(Watcher):
    """Plots the likeness score (a metric of the job at each preview: the Face page draws it beside the losses)
    and warns once it has not beaten its best (lower = closer to src's identity) for `patience` previews in a row;
    it warns again after another `patience` such previews. Counts survive a resume."""

    name = "likeness"

    def __init__(self, reporter: Reporter, patience: int) -> None:
        self.reporter, self.patience = reporter, patience
        self.best: float | None = None
        self.best_at = 0
        self.worse = 0

    def after_preview(self, trainer: FaceTrainer, likeness: float | None, logs: dict[str, float]) -> str | None:
        if likeness is None:
            return None
        self.reporter.advance(0, likeness=likeness)
        if self.best is None or likeness < self.best:
            self.best, self.best_at, self.worse = likeness, trainer.iteration, 0
            return None
        self.worse += 1
        if self.patience and self.worse % self.patience == 0:
            self.reporter.log(f"warning: likeness {likeness:.4f} at iteration {trainer.iteration} has not beaten its best "
                              f"{self.best:.4f} (iteration {self.best_at}) for {self.worse} previews: the recipes lock the "
                              "encoder (or turn warp back on) when likeness falls")
        return None

    def state(self) -> dict:
        return {"best": self.best, "best_at": self.best_at, "worse": self.worse}

    def restore(self, state: dict) -> None:
        best = state.get("best")
        self.best = float(best) if isinstance(best, (int, float)) and math.isfinite(best) else None
        self.best_at = int(state["best_at"]) if isinstance(state.get("best_at"), int) else 0
        self.worse = int(state["worse"]) if isinstance(state.get("worse"), int) and state["worse"] >= 0 else 0


# ------------------------------------------------------------------ face grow's lock of the old layers


class GrowLockWatcher(Watcher):
    """After `face grow`: the layers the grow kept stay locked (no gradient, so no update) until iteration `until`,
    while the re-initialised ones learn to fit them; then they unlock, said in the log. Freezing a re-initialised
    layer before it has trained a step is refused: it would stay random. `face grow` writes this watcher's state
    into the model info; the trainer hands it back like any watcher's."""

    name = "grow_lock"

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.grown_at = self.until = -1
        self.fresh: set[str] = set()
        self.locked: list[torch.nn.Parameter] = []

    def restore(self, state: dict) -> None:
        fresh = state.get("fresh")
        if isinstance(fresh, list) and all(isinstance(f, str) for f in fresh):
            self.fresh = set(fresh)
        for key in ("grown_at", "until"):
            if isinstance(state.get(key), int):
                setattr(self, key, state[key])

    def start(self, trainer: FaceTrainer, result: FaceTrainResult, writer: Any) -> None:
        if self.grown_at < 0:
            return
        named = dict(trainer.model.named_parameters())
        trainable = {id(p) for p in trainer.params}
        if trainer.iteration == self.grown_at:
            held = sorted(n for n in self.fresh if n in named and id(named[n]) not in trainable)
            if held:
                layers = sorted({n.rsplit(".", 1)[0] for n in held})
                raise ConfigError(problems=[("freeze_parts", f"face grow re-initialised {', '.join(layers)}; freezing "
                                             "them now would leave them random (the freeze flags, freeze_parts, or LIAE's "
                                             "inter_AB rule with random_warp off): train them first")])
        if trainer.iteration < self.until:
            self.locked = [p for n, p in named.items() if n not in self.fresh and id(p) in trainable]
            for p in self.locked:
                p.requires_grad_(False)
            self.reporter.log(f"face grow: the {len(self.locked)} kept tensors stay locked until iteration {self.until}; "
                              "the re-initialised layers train alone")

    def after_step(self, trainer: FaceTrainer, logs: dict[str, float]) -> str | None:
        if self.locked and trainer.iteration >= self.until:
            for p in self.locked:
                p.requires_grad_(True)
            self.locked = []
            self.reporter.log(f"iteration {trainer.iteration}: face grow's lock ends; the kept layers train again")
        if trainer.iteration > self.grown_at and trainer.iteration >= self.until:
            self.grown_at = self.until = -1  # done: nothing left to keep in the model info
            self.fresh = set()
        return None

    def state(self) -> dict:
        if self.grown_at < 0:
            return {}
        return {"grown_at": self.grown_at, "until": self.until, "fresh": sorted(self.fresh)}


def control_watchers(trainer: FaceTrainer, reporter: Reporter) -> list[Watcher]:
    """This feature's watchers, the grow lock first (it may refuse the run before anything else starts)."""
    from .validation import ValidationWatcher

    cfg = trainer.cfg
    out: list[Watcher] = [GrowLockWatcher(reporter), LikenessWatcher(reporter, cfg.likeness_patience)]
    if cfg.lr_schedule != "constant" or cfg.lr_warmup_iters:
        out.append(LrWatcher(reporter, cfg.preview_every // 10))
    if trainer.held_out:
        out.append(ValidationWatcher(reporter, cfg.validation_every, cfg.early_stopping_patience))
    return out
