"""Per-face diagnosis and hard-sample focus during face training (docs/face-model.md#per-face-diagnosis-and-hard-samples).

Every step, the faces just trained on (`trainer.last_faces`) get their losses booked (`trainer.last_per_sample`):
a moving average per face, `new = decay * old + (1 - decay) * loss` (the first draw sets it), for the
reconstruction loss and for the mean |learned mask - faceset mask|. Averaging per face rather than per step
is what makes a bad face visible: one step's batch mixes good and bad faces, one face's average does not.

The table is saved beside the model (`<model_name>.faces.json`, facetrain/face_report.py owns the format) at
every model save, so it survives a stop and a resume, and `loratrain face report` ranks it.

Hard-sample focus (`--hard_sample_power S`): each face is drawn with probability proportional to
`average loss ** S` (times the yaw balance when --uniform_yaw is on). S = 0 is the uniform sampler, S = 1
draws a face with 4x the loss 4x as often, larger S concentrates harder. A face not drawn yet counts as the
worst face seen so far, so every face is tried early. The sampler runs in the main process (a DataLoader
iterates its sampler there, whatever the workers), so it reads the table the watcher updates directly; it
sees the losses of a few steps back (the batches the workers prefetch), which is all "recent" means here.

Cost per step: O(batch) array writes for the bookkeeping; the sampler rebuilds one cumulative sum over the
faces (numpy) when the table has changed, and draws each face with one binary search. bench/face_train.py
measures both as a share of the step time.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Sampler

from loratrain.core.safe_io import atomic_write_text

from ..face_report import SIDES, FaceEntry, FaceStatsFile, SideStats, dump_stats, read_stats, stats_path
from .watchers import Watcher

if TYPE_CHECKING:
    from loratrain.core.progress import Reporter

    from .data import FaceSamples
    from .trainer import FaceTrainer, FaceTrainResult


class FaceTable:
    """The per-face figures of one side, as arrays indexed like the faceset (FaceSamples.paths)."""

    def __init__(self, names: list[str], faceset: str = "") -> None:
        n = len(names)
        self.names, self.faceset = list(names), faceset
        self.loss = np.full(n, np.nan)  # moving average; NaN = never drawn
        self.last = np.full(n, np.nan)
        self.mask = np.full(n, np.nan)
        self.draws = np.zeros(n, np.int64)
        self.seen_at = np.zeros(n, np.int64)
        self.version = 0  # bumped on every update: the sampler rebuilds its sums only then

    def __len__(self) -> int:
        return len(self.names)

    def update(self, index: np.ndarray, loss: np.ndarray, mask_diff: np.ndarray | None, decay: float, iteration: int) -> None:
        """Book one batch. A face drawn twice in one batch is booked twice, in order (as two draws)."""
        index = np.asarray(index, np.int64).reshape(-1)
        loss = np.asarray(loss, np.float64).reshape(-1)
        mask = np.full(len(index), np.nan) if mask_diff is None else np.asarray(mask_diff, np.float64).reshape(-1)
        if len(np.unique(index)) == len(index):
            self._book(index, loss, mask, decay)
        else:  # repeats: one face at a time so each draw sees the last (O(batch))
            for k in range(len(index)):
                self._book(index[k:k + 1], loss[k:k + 1], mask[k:k + 1], decay)
        self.seen_at[index] = iteration
        self.version += 1

    def _book(self, index: np.ndarray, loss: np.ndarray, mask: np.ndarray, decay: float) -> None:
        for arr, value in ((self.loss, loss), (self.mask, mask)):
            old = arr[index]
            arr[index] = np.where(np.isnan(old), value, decay * old + (1 - decay) * value)
        self.last[index] = loss
        self.draws[index] += 1

    def hardness(self) -> np.ndarray:
        """Each face's average loss, a face never drawn counting as the worst seen (1.0 when none is seen yet)."""
        seen = ~np.isnan(self.loss)
        fill = float(self.loss[seen].max()) if seen.any() else 1.0
        return np.where(seen, self.loss, fill)

    # ---- the saved form (facetrain/face_report.py) ----
    def export(self) -> SideStats:
        out = SideStats(faceset=self.faceset)
        for i in np.flatnonzero(self.draws > 0):
            mask = float(self.mask[i]) if np.isfinite(self.mask[i]) else 0.0
            out.faces[self.names[i]] = FaceEntry(float(self.loss[i]), float(self.last[i]), mask, int(self.draws[i]),
                                                 int(self.seen_at[i]))
        return out

    def restore(self, saved: SideStats) -> int:
        """Take back the figures of the faces still in the faceset (by file name); returns how many."""
        where = {name: i for i, name in enumerate(self.names)}
        found = 0
        for name, e in saved.faces.items():
            i = where.get(name)
            if i is None:
                continue  # set aside since, or another faceset
            self.loss[i], self.last[i], self.mask[i] = e.loss, e.last_loss, e.mask_diff
            self.draws[i], self.seen_at[i] = e.draws, e.seen_at
            found += 1
        self.version += 1
        return found


class HardFaceSampler(Sampler):
    """Endless (index, seed) pairs like data.RandomFaceSampler, each face drawn with probability
    proportional to `base * hardness ** power` (`base`: the yaw balance, or uniform)."""

    def __init__(self, table: FaceTable, power: float, seed: int, base: np.ndarray | None = None) -> None:
        self.table, self.power, self.seed = table, float(power), seed
        self.base = np.ones(len(table)) if base is None else np.asarray(base, np.float64)

    def probabilities(self) -> np.ndarray:
        w = self.base * np.power(np.maximum(self.table.hardness(), 1e-12), self.power)
        total = w.sum()
        if not np.isfinite(total) or total <= 0:
            w, total = self.base, self.base.sum()
        return w / total

    def __iter__(self):  # noqa: ANN204
        rng = np.random.default_rng(self.seed)
        version, cum, n = -1, np.ones(1), len(self.table)
        while True:
            if self.table.version != version:
                version = self.table.version
                cum = np.cumsum(self.probabilities())
            index = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), n - 1)
            yield index, int(rng.integers(2 ** 31))


def yaw_balance(samples: FaceSamples) -> np.ndarray:
    """Per-face base weights of --uniform_yaw: each occupied yaw bin equally likely, the faces in a bin alike
    (the same bins as data.RandomFaceSampler, taken from it)."""
    from .data import RandomFaceSampler

    base = np.zeros(len(samples))
    bins = RandomFaceSampler(samples, True, 0).bins or []
    for group in bins:
        base[group] = 1.0 / (len(bins) * len(group))
    return base


def hard_sampler(trainer: FaceTrainer, samples: FaceSamples, seed: int) -> HardFaceSampler | None:
    """The sampler FaceTrainer.loader uses for `samples`, or None for the plain one (power 0, or no table)."""
    tables = getattr(trainer, "face_tables", None)
    if trainer.cfg.hard_sample_power <= 0 or not tables:
        return None
    side = "src" if samples is trainer.src else "dst" if samples is trainer.dst else None
    if side is None or side not in tables or tables[side].names != [p.name for p in samples.paths]:
        return None  # not the faces the table was built on
    base = yaw_balance(samples) if trainer.cfg.uniform_yaw else None
    return HardFaceSampler(tables[side], trainer.cfg.hard_sample_power, seed, base)


class FaceStatsWatcher(Watcher):
    """Books every step's faces, saves the table with the model, logs the draw spread."""

    name = "face_stats"

    def __init__(self, trainer: FaceTrainer, reporter: Reporter) -> None:
        self.reporter = reporter
        self.decay = trainer.cfg.face_stats_decay
        self.path = stats_path(trainer.dir, trainer.cfg.model_name)
        self.tables: dict[str, FaceTable] = {}
        self.iteration = 0
        self.writer: Any = None
        self.every = max(1, trainer.cfg.preview_every)

    def start(self, trainer: FaceTrainer, result: FaceTrainResult, writer: Any) -> None:
        cfg = trainer.cfg
        folders = {"src": cfg.src_faceset, "dst": cfg.dst_faceset or cfg.src_faceset}
        for side, samples in (("src", trainer.src), ("dst", trainer.dst)):
            if samples is not None:
                self.tables[side] = FaceTable([p.name for p in samples.paths], str(Path(folders[side])))
        self.writer, self.iteration = writer, trainer.iteration
        if self.path.exists():
            try:
                saved = read_stats(self.path)
                found = {side: t.restore(saved.sides[side]) for side, t in self.tables.items() if side in saved.sides}
                self.reporter.log("per-face table resumed: " + ", ".join(f"{n} {s} faces" for s, n in found.items()))
            except (ValueError, OSError, OverflowError) as e:  # ValueError includes ConfigError
                self.reporter.log(f"note: per-face table not resumed, starting afresh ({e})")
        trainer.face_tables = self.tables  # the hard-sample sampler draws by these (FaceTrainer.loader)

    def after_step(self, trainer: FaceTrainer, logs: dict[str, float]) -> str | None:
        per, faces = trainer.last_per_sample, trainer.last_faces
        keys = [k for side in SIDES for k in (side, f"{side}_mask_diff") if k in per]
        if not keys:
            return None
        values = dict(zip(keys, torch.stack([per[k].float() for k in keys]).cpu().numpy()))  # one device sync
        self.iteration = trainer.iteration
        for side, table in self.tables.items():
            index = faces.get(side)
            if index is not None and side in values:
                table.update(index.numpy(), values[side], values.get(f"{side}_mask_diff"), self.decay, trainer.iteration)
        if self.writer is not None and trainer.iteration % self.every == 0:
            self.log(self.writer, trainer.iteration)
        return None

    def log(self, writer: Any, iteration: int) -> None:
        """TensorBoard: the draw counts per face (histogram) and how uneven they are; the loss spread."""
        for side, t in self.tables.items():
            drawn = t.draws[t.draws > 0]
            if not len(drawn):
                continue
            writer.add_histogram(f"faces/{side}_draws", t.draws, iteration)
            writer.add_scalar(f"faces/{side}_draws_max_over_mean", float(drawn.max() / t.draws.mean()), iteration)
            writer.add_scalar(f"faces/{side}_never_drawn", float((t.draws == 0).sum()), iteration)
            seen = t.loss[~np.isnan(t.loss)]
            writer.add_histogram(f"faces/{side}_loss", seen, iteration)
            writer.add_scalar(f"faces/{side}_worst_loss", float(seen.max()), iteration)

    def table_file(self) -> FaceStatsFile:
        return FaceStatsFile(iteration=self.iteration, decay=self.decay, sides={s: t.export() for s, t in self.tables.items()})

    def state(self) -> dict:
        """Called at every model save: the table is written then (atomically), beside the model, so the two match."""
        if not self.tables:
            return {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, dump_stats(self.table_file()))
        return {"file": self.path.name, "iteration": self.iteration}

    def finish(self, trainer: FaceTrainer, result: FaceTrainResult) -> None:
        for side, t in self.tables.items():
            drawn = t.draws[t.draws > 0]
            if len(drawn):
                worst = int(np.nanargmax(t.loss))
                self.reporter.log(f"{side} faces: {len(drawn)} of {len(t)} drawn, max/mean draws "
                                  f"{drawn.max() / t.draws.mean():.2f}; worst {t.names[worst]} (average loss "
                                  f"{t.loss[worst]:.4f}); `loratrain face report {trainer.dir}` ranks them all")


def diagnosis_watchers(trainer: FaceTrainer, reporter: Reporter) -> list[Watcher]:
    """The per-face watcher when --face_stats is on (watchers_for adds what this returns)."""
    return [FaceStatsWatcher(trainer, reporter)] if trainer.cfg.face_stats else []
