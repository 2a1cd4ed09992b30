"""Reusing parts of another face model: `face train --init_from OTHER.safetensors --init_parts encoder,inter,decoder`
(docs/face-model.md#reusing-parts-of-another-model).

The recipes move parts between models (an encoder and decoder trained on many faces; inters swapped between
SAEHD and AMP). This copies the named parts of a saved model into a new one before its first step, layer by
layer: a layer (its weight and bias together) is copied only when every tensor of it exists in the source
under the same name with the same shape, so no layer is ever half-copied; every layer that is not copied is
named in the run's notes with the reason (no counterpart, or both shapes).

Why a first-run option rather than a separate `face transplant` job: the copy lands in the same process that
builds the new model from its options, before anything is trained, so the first save holds the copied weights
with the model's own architecture and options, and no optimizer state exists yet that would describe the
weights the copy replaced (a transplant into a trained model would have to drop it part by part). On a model
that already exists the option is ignored, with a note: it never overwrites training.

Which module feeds which, across architectures: the same name when the source has it, otherwise the module
that plays the same role: the code the swap decodes ("swap": DF's inter, LIAE's inter_AB, AMP's inter_src;
DF's decoder_src, the shared decoder of LIAE and AMP) or dst's own code ("dst": DF's inter, LIAE's inter_B,
AMP's inter_dst; DF's decoder_dst, the shared decoders). A `df-udt` model and an AMP model of the same sizes
share the encoder body, each inter's `dense2` and the whole decoder (models/amp.py); AMP's encoder `dense`
lives in DF's inter as `dense1`, so those two are named as having no counterpart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratrain.core.errors import ConfigError
from loratrain.core.paths import confine

from .models.archi import ARCHITECTURES, ArchSpec, FaceAutoencoder
from .train.model_file import check_model_file
from .train.state import read_checkpoint
from .train.watchers import Watcher

PARTS = ("encoder", "inter", "decoder")
#: the roles each architecture's inters and decoders play; the first is the one a target module asks for
ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "df": {"inter": ("swap", "dst"), "decoder_src": ("swap",), "decoder_dst": ("dst",)},
    "liae": {"inter_AB": ("swap",), "inter_B": ("dst",), "decoder": ("swap", "dst")},
    "amp": {"inter_src": ("swap",), "inter_dst": ("dst",), "decoder": ("swap", "dst")},
}


def parse_parts(text: str) -> list[str]:
    """`encoder,inter,decoder` (any subset, any order) -> the list; an unknown name is a ConfigError."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PARTS]
    if bad or not names:
        raise ConfigError(f"init_parts: {', '.join(bad) or 'empty'}: use a comma list of {', '.join(PARTS)}")
    return [p for p in PARTS if p in names]  # one order, whatever the user's: the log reads the same each time


@dataclass
class TransplantReport:
    source: str
    copied: dict[str, list[str]] = field(default_factory=dict)  # target module -> its layers copied
    layers: dict[str, int] = field(default_factory=dict)  # target module -> how many layers it has
    not_copied: list[str] = field(default_factory=list)  # "layer: reason", one per layer left as initialised

    def lines(self) -> list[str]:
        done = [f"{m} ({len(ls)} of {self.layers[m]} layers)" for m, ls in self.copied.items() if ls]
        out = [f"init_from {self.source}: copied {', '.join(done) or 'nothing'}"]
        out += [f"init_from: not copied (left as initialised): {item}" for item in self.not_copied]
        return out


def _modules(kind: str, part: str) -> tuple[str, ...]:
    cls = ARCHITECTURES.get(kind)
    return ("encoder",) if part == "encoder" else cls.inter_names if part == "inter" else cls.decoder_names


def counterpart(target_kind: str, module: str, source_kind: str, part: str) -> str | None:
    """The source module that feeds target `module`: the same name, else the one with the target's main role."""
    candidates = _modules(source_kind, part)
    if module in candidates:
        return module
    role = ROLES.get(target_kind, {}).get(module, ())[:1]
    return next((c for c in candidates if role and role[0] in ROLES.get(source_kind, {}).get(c, ())), None)


def _layers(state: dict[str, torch.Tensor], module: str) -> dict[str, list[str]]:
    """Keys of `module` grouped by layer (the key less its last component: weight, bias)."""
    out: dict[str, list[str]] = {}
    for key in state:
        if key.startswith(module + "."):
            out.setdefault(key.rsplit(".", 1)[0], []).append(key)
    return out


@torch.no_grad()
def transplant(model: FaceAutoencoder, weights: dict[str, torch.Tensor], source_archi: str, parts: list[str],
               source_name: str = "the source") -> TransplantReport:
    """Copy the fitting layers of `parts` from `weights` (a model of `source_archi`) into `model`, in place."""
    source_kind = ArchSpec.parse(source_archi).kind
    target_kind = model.spec.kind
    state = model.state_dict()  # shares storage with the parameters: copy_ writes the model
    report = TransplantReport(f"{source_name} ({source_archi})")
    for part in parts:
        for module in _modules(target_kind, part):
            src_module = counterpart(target_kind, module, source_kind, part)
            report.copied[module] = []
            report.layers[module] = len(_layers(state, module))
            if src_module is None:
                report.not_copied.append(f"{module}: the {source_archi} model has no {part} in that role")
                continue
            for layer, keys in _layers(state, module).items():
                src_keys = {k: src_module + k[len(module):] for k in keys}
                missing = [s for s in src_keys.values() if s not in weights]
                if missing:
                    report.not_copied.append(f"{layer}: no {missing[0].rsplit('.', 1)[0]} in the {source_archi} model")
                    continue
                wrong = [(k, s) for k, s in src_keys.items() if tuple(weights[s].shape) != tuple(state[k].shape)]
                if wrong:
                    k, s = wrong[0]
                    report.not_copied.append(f"{layer}: {s} is {list(weights[s].shape)}, here {list(state[k].shape)}")
                    continue
                for k, s in src_keys.items():
                    state[k].copy_(weights[s].to(state[k].dtype))
                report.copied[module].append(layer)
    return report


def load_source(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(weights, archi) of a saved face model, or a ConfigError naming the option."""
    path = confine(path, "init_from")
    if not path.is_file():
        raise ConfigError(f"init_from: model file not found: {path}")
    try:
        info, cfg = check_model_file(path)  # header and tensor shapes checked before a weight is read
        weights, _ = read_checkpoint(path)
        archi = cfg.archi
        ArchSpec.parse(archi)
    except ConfigError as e:
        raise ConfigError(f"init_from: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"init_from: {path} is not a loratrain face model ({e})") from None
    return weights, archi


class InitFromWatcher(Watcher):
    """At a model's first run, before the first step, copy `--init_parts` of `--init_from` into it."""

    def __init__(self, reporter) -> None:  # noqa: ANN001
        self.reporter = reporter

    def start(self, trainer, result, writer) -> None:  # noqa: ANN001
        cfg = trainer.cfg
        if trainer.model_path.exists() or trainer.iteration:
            lines = [f"init_from ignored: {trainer.model_path.name} already exists (init_from is a first-run option)"]
        else:
            weights, archi = load_source(cfg.init_from)
            report = transplant(trainer.model, weights, archi, parse_parts(cfg.init_parts), Path(cfg.init_from).name)
            lines = report.lines()
        for line in lines:
            trainer.notes.append(line)
            self.reporter.log(f"note: {line}")
