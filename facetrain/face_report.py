"""`loratrain face report`: the faces a model fails on, worst first (docs/face-model.md#per-face-diagnosis-and-hard-samples).

Training keeps, per face, a moving average of its loss and of the difference between the model's learned mask
and the faceset's mask (facetrain/train/diagnosis.py) and saves it beside the model as
`<model_name>.faces.json`. This module owns that file's format (reading it checks every name and number,
since a file is untrusted) and the ranking; it imports neither torch nor OpenCV, so the report and the app's
"worst faces" view stay light.

The recipes' rule of thumb: a src face whose loss stays above 0.5 while the rest are well below usually has a
bad mask or a bad crop; look at it and set it aside rather than training on it for days.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import ConfigError, Problem
from loratrain.core.jobs import JobResult, job
from loratrain.core.paths import check_name, confine, name_problem
from loratrain.core.progress import Reporter, StopFlag

STATS_VERSION = 1
SIDES = ("src", "dst")
SORT_KEYS = ("loss", "mask_diff", "last_loss", "draws")
MAX_STATS_BYTES = 256 * 2 ** 20  # a faces file of a million faces is ~100 MB; more is not one of ours
MAX_COUNT = 2 ** 62  # draws, seen_at, iteration: training's int64 counters, with room to add
MAX_FIGURE = 1e12  # a loss or mask difference; far beyond any real one, small enough to print and sum


def stats_path(model_dir: str | Path, model_name: str = "face") -> Path:
    """Where a model's per-face table lives: beside the model file, named after it."""
    return Path(model_dir) / f"{check_name(model_name, 'model_name')}.faces.json"


@dataclass
class FaceEntry:
    """One face's figures: `loss` the moving average, `last_loss` its latest loss, `mask_diff` the moving average
    of mean |learned mask - faceset mask|, `draws` how often it was trained on, `seen_at` the last iteration."""

    loss: float
    last_loss: float
    mask_diff: float
    draws: int
    seen_at: int


@dataclass
class SideStats:
    faceset: str = ""
    faces: dict[str, FaceEntry] = field(default_factory=dict)


@dataclass
class FaceStatsFile:
    iteration: int = 0
    decay: float = 0.8
    sides: dict[str, SideStats] = field(default_factory=dict)
    skipped: int = 0  # entries refused on reading (a bad name or number)


def dump_stats(stats: FaceStatsFile) -> str:
    """The file's text (compact: a big faceset's table is rewritten at every save)."""
    sides = {side: {"faceset": s.faceset, "faces": {name: asdict(e) for name, e in s.faces.items()}}
             for side, s in stats.sides.items()}
    return json.dumps({"version": STATS_VERSION, "iteration": stats.iteration, "decay": stats.decay, "sides": sides},
                      separators=(",", ":"), allow_nan=False)


def _number(value: Any, hi: float = MAX_FIGURE) -> float | None:
    """A finite figure in 0..hi, or None. The range is checked before converting: a 400-digit integer in the file
    would overflow float() (and the int64 tables training restores into)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= hi:
        return None  # NaN fails the comparison too
    return float(value)


def _count(value: Any) -> int | None:
    """A whole count in 0..MAX_COUNT (a float that is whole counts: JSON writers may emit 3.0), or None."""
    if isinstance(value, float) and value.is_integer():
        value = int(value) if abs(value) <= MAX_COUNT else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return None
    return value


def _entry(raw: Any) -> FaceEntry | None:
    if not isinstance(raw, dict):
        return None
    nums = {k: _number(raw.get(k)) for k in ("loss", "last_loss", "mask_diff")}
    counts = {k: _count(raw.get(k)) for k in ("draws", "seen_at")}
    if any(v is None for v in (*nums.values(), *counts.values())):
        return None
    return FaceEntry(nums["loss"], nums["last_loss"], nums["mask_diff"], counts["draws"], counts["seen_at"])


def parse_stats(text: str, where: str) -> FaceStatsFile:
    """A faces file's content, checked: face names must be one path component each (they are later joined to the
    faceset folder), figures finite and non-negative; a bad entry is skipped and counted, a bad file refused."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the stack
        raise ConfigError(f"{where}: not a per-face table ({str(e)[:200]})") from None
    if not isinstance(data, dict) or data.get("version") != STATS_VERSION or not isinstance(data.get("sides"), dict):
        raise ConfigError(f"{where}: not a per-face table of this version (expected version {STATS_VERSION})")
    out = FaceStatsFile(iteration=_count(data.get("iteration")) or 0, decay=_number(data.get("decay"), 1.0) or 0.0)
    for side in SIDES:
        raw = data["sides"].get(side)
        if not isinstance(raw, dict):
            continue
        faces = raw.get("faces") if isinstance(raw.get("faces"), dict) else {}
        s = SideStats(faceset=raw.get("faceset") if isinstance(raw.get("faceset"), str) else "")
        for name, value in faces.items():
            entry = _entry(value)
            if entry is None or not isinstance(name, str) or not name or name_problem(name):
                out.skipped += 1
                continue
            s.faces[name] = entry
        out.sides[side] = s
    return out


def read_stats(path: str | Path) -> FaceStatsFile:
    """Read a faces file (confined: a path from a user or a browser), as `parse_stats` checks it."""
    path = confine(path, "per-face table")
    try:
        if path.stat().st_size > MAX_STATS_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_STATS_BYTES >> 20} MiB; not a per-face table")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: train the model with --face_stats (the default) to have one") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ConfigError(f"{path}: not a per-face table ({e})") from None
    return parse_stats(text, str(path))


# ---------------------------------------------------------------- ranking


@dataclass
class Ranked:
    rank: int
    side: str
    face: str
    loss: float
    last_loss: float
    mask_diff: float
    draws: int
    seen_at: int
    flagged: bool


def rank_faces(stats: FaceStatsFile, side: str = "src", threshold: float = 0.5, sort_by: str = "loss") -> list[Ranked]:
    """Every face of `side` ("src", "dst" or "both"), worst first by `sort_by`; flagged when its average loss is
    above `threshold`. Ties keep the file name order, so the ranking is the same on every run."""
    if sort_by not in SORT_KEYS:
        raise ConfigError(f"sort_by {sort_by!r}: one of {', '.join(SORT_KEYS)}")
    rows = []
    for s in (SIDES if side == "both" else (side,)):
        for name, e in stats.sides.get(s, SideStats()).faces.items():
            rows.append((s, name, e))
    rows.sort(key=lambda r: (-float(getattr(r[2], sort_by)), r[0], r[1]))
    return [Ranked(k + 1, s, name, e.loss, e.last_loss, e.mask_diff, e.draws, e.seen_at, e.loss > threshold)
            for k, (s, name, e) in enumerate(rows)]


def draw_spread(stats: FaceStatsFile, side: str) -> str:
    """How unevenly the faces of a side were drawn: what hard-sample focus changes (uniform: max/mean near 1-2)."""
    draws = [e.draws for e in stats.sides.get(side, SideStats()).faces.values()]
    if not draws or not sum(draws):  # no entry, or entries with no draw (not written by training): no spread
        return f"{side}: no faces drawn yet"
    mean = sum(draws) / len(draws)
    return (f"{side}: {len(draws)} faces drawn, {sum(draws)} draws; per face min {min(draws)}, mean {mean:.1f}, "
            f"max {max(draws)} (max/mean {max(draws) / mean:.2f})")


def table(rows: list[Ranked], top: int) -> str:
    lines = [f"{'rank':>4}  {'side':4}  {'loss':>7}  {'last':>7}  {'mask':>6}  {'draws':>6}  flag  face"]
    for r in rows[:top]:
        lines.append(f"{r.rank:4d}  {r.side:4}  {r.loss:7.4f}  {r.last_loss:7.4f}  {r.mask_diff:6.3f}  {r.draws:6d}  "
                     f"{'  !!' if r.flagged else '    '}  {r.face}")
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more (all in --csv / --json)")
    return "\n".join(lines)


def to_csv(rows: list[Ranked]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "side", "face", "loss", "last_loss", "mask_diff", "draws", "seen_at", "flagged"])
    for r in rows:
        writer.writerow([r.rank, r.side, r.face, f"{r.loss:.6f}", f"{r.last_loss:.6f}", f"{r.mask_diff:.6f}", r.draws,
                         r.seen_at, int(r.flagged)])
    return buf.getvalue()


# ---------------------------------------------------------------- the job


class FaceReportConfig(JobConfig):
    model_dir: str = opt("", "folder of the trained face model (holds <model_name>.faces.json)", positional=True, path="dir")
    model_name: str = opt("face", "file name stem of the model (one name, no folder)", path="name")
    side: str = opt("src", "which faceset's faces: src, dst or both", choices=("src", "dst", "both"))
    threshold: float = opt(0.5, "flag faces whose average loss is above this (the recipe: src loss > 0.5 finds bad masks "
                                "or crops)", ge=0.0)
    sort_by: str = opt("loss", "rank by loss (moving average), mask_diff, last_loss or draws", choices=SORT_KEYS)
    top: int = opt(20, "rows printed (--csv and --json hold every face)", ge=0)
    csv_output: str = opt("", "write the whole ranking as CSV here", path="output", flag="csv")
    json_output: str = opt("", "write the whole ranking as JSON here", path="output", flag="json")

    def requirements(self) -> list[Problem]:
        from loratrain.core.safe_io import output_conflicts

        out: list[Problem] = [] if self.model_dir else [("model_dir", "is required")]
        for name in ("csv_output", "json_output"):
            value = getattr(self, name)
            if value and self.model_dir:
                out += [(name, m) for m in output_conflicts(value, [stats_path(self.model_dir, self.model_name or "face")])]
        return out


@dataclass
class FaceReportResult(JobResult):
    rows: list[Ranked] = field(default_factory=list)
    iteration: int = 0
    threshold: float = 0.5
    top: int = 20
    spread: list[str] = field(default_factory=list)
    skipped: int = 0
    faceset: dict[str, str] = field(default_factory=dict)

    @property
    def flagged(self) -> list[Ranked]:
        return [r for r in self.rows if r.flagged]

    def summary(self) -> list[str]:
        lines = [table(self.rows, self.top), *self.spread]
        if self.skipped:
            lines.append(f"{self.skipped} entr(y/ies) of the table were unreadable and skipped")
        lines.append(f"{len(self.rows)} face(s) at iteration {self.iteration}; {len(self.flagged)} above loss "
                     f"{self.threshold:g}" + (" (look at their masks and crops; set bad ones aside)" if self.flagged else ""))
        return lines

    def to_json(self) -> dict:
        return {"iteration": self.iteration, "threshold": self.threshold, "faceset": self.faceset,
                "faces": [asdict(r) for r in self.rows], "draws": self.spread}


@job
def run_face_report(cfg: FaceReportConfig, reporter: Reporter, stop: StopFlag) -> FaceReportResult:
    """Rank a model's faces worst first from its per-face table (written by `face train`).

    Result: the ranked rows (every face of the chosen side(s), with its flag), the draw spread per side, and the
    table printed as the summary; --csv / --json receive every row. Reads nothing but the table.
    """
    from loratrain.core.safe_io import atomic_write_json, atomic_write_text

    stats = read_stats(stats_path(cfg.model_dir, cfg.model_name))
    rows = rank_faces(stats, cfg.side, cfg.threshold, cfg.sort_by)
    sides = SIDES if cfg.side == "both" else (cfg.side,)
    result = FaceReportResult(rows=rows, iteration=stats.iteration, threshold=cfg.threshold, top=cfg.top,
                              spread=[draw_spread(stats, s) for s in sides], skipped=stats.skipped,
                              faceset={s: stats.sides[s].faceset for s in sides if s in stats.sides})
    if cfg.csv_output:
        atomic_write_text(confine(cfg.csv_output, "csv", write=True), to_csv(rows))
    if cfg.json_output:
        atomic_write_json(confine(cfg.json_output, "json", write=True), result.to_json())
    return result
