"""Run the checks over a folder, print a table, write JSON, and move flagged files aside."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratrain.core.captions import caption_path
from loratrain.core.images import UNSUPPORTED_IMAGE_EXTENSIONS, list_images
from loratrain.core.jobs import JobResult, job
from loratrain.core.parallel import ordered_map
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_write_json

from .checks import CAPTION_LIKE, CHECKS, Dataset, Finding
from .config import CheckConfig
from .measure import measure


@dataclass
class Report(JobResult):
    root: str
    images: int
    findings: list[Finding] = field(default_factory=list)
    moved: list[dict] = field(default_factory=list)
    sections: dict = field(default_factory=dict)  # per-check extras (shot mix per concept, ...): Dataset.sections

    def summary(self) -> list[str]:
        return [format_table(self)]

    @property
    def exit_code(self) -> int:
        """1 while an error-level finding remains (not moved to quarantine): a dataset the trainer would misread."""
        if self.stopped:
            return 130
        moved = {m["from"] for m in self.moved}
        return 1 if any(f.severity == "error" and f.path not in moved for f in self.findings) else 0

    def counts(self) -> Counter:
        return Counter(f.check for f in self.findings)

    def to_json(self) -> dict:
        return {"root": self.root, "images": self.images, "counts": dict(self.counts()),
                "findings": [asdict(f) for f in self.findings], "quarantined": self.moved, "sections": self.sections}


@job
def run_check(cfg: CheckConfig, reporter: Reporter, stop: StopFlag) -> Report:
    """Measure every image (threads), run the checks, optionally move flagged files aside (never delete).

    stop ends the measuring after the current image; nothing is moved then. Result: the findings,
    what was moved, and an exit code of 1 while error-level findings remain.
    """
    root = Path(cfg.dataset_dir)
    paths = list_images(root, cfg.recursive)
    unsupported = list_images(root, cfg.recursive, UNSUPPORTED_IMAGE_EXTENSIONS)
    reporter.start(len(paths), "checking", unit="img")
    infos = []
    for _, info in ordered_map(measure, paths, cfg.workers, lookahead=4 * cfg.workers):
        if isinstance(info, BaseException):
            raise info
        infos.append(info)
        reporter.advance()
        if stop.is_set():
            reporter.done("")
            return Report(root=str(root), images=len(infos), stopped=True)
    reporter.done("")
    ds = Dataset(root=root, infos=infos, unsupported=unsupported, cfg=cfg, reporter=reporter, stop=stop)
    report = Report(root=str(root), images=len(paths), sections=ds.sections)
    for name in cfg.checks or CHECKS.names():
        report.findings += CHECKS.get(name)(ds)
    if cfg.quarantine:
        report.moved = quarantine(report.findings, root, Path(cfg.quarantine), set(cfg.quarantine_checks))
    if cfg.json_output:
        atomic_write_json(cfg.json_output, report.to_json())
    return report


def _free_name(dst: Path) -> Path:
    n = 1
    out = dst
    while out.exists() or out.is_symlink():
        out = dst.with_name(f"{dst.stem}.{n}{dst.suffix}")
        n += 1
    return out


def quarantine(findings: list[Finding], root: Path, dest: Path, checks: set[str]) -> list[dict]:
    """Move each flagged image and its caption files under `dest`, keeping relative paths; log every move."""
    root_r, dest_r = root.resolve(), dest.resolve()
    if dest_r == root_r:
        raise ValueError(f"quarantine folder {dest} is the dataset folder itself")
    reasons: dict[Path, list[str]] = {}
    for f in findings:
        p = Path(f.path)
        if f.check in checks and p.is_file() and p.resolve() != root_r and root_r in p.resolve().parents:
            reasons.setdefault(p, []).append(f.check)
    moved = []
    for image, why in sorted(reasons.items()):
        rel = image.resolve().relative_to(root_r)
        companions = [c for c in (caption_path(image, e) for e in CAPTION_LIKE) if c.is_file() and c != image]
        for src in [image, *companions]:
            if dest_r in src.resolve().parents:
                continue  # a quarantine folder inside the dataset is not re-checked
            dst = _free_name(dest / rel.parent / src.name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(src, dst)
            except OSError:
                shutil.move(str(src), str(dst))
            moved.append({"from": str(src), "to": str(dst), "checks": why})
    if moved:
        manifest = dest / "quarantine.json"
        old = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else []
        old.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "moved": moved})
        atomic_write_json(manifest, old)
    return moved


def format_table(report: Report) -> str:
    """A plain table: one line per finding, grouped by check, then a summary line."""
    lines = []
    width = max((len(f.check) for f in report.findings), default=5)
    for f in sorted(report.findings, key=lambda f: (f.check, f.path)):
        lines.append(f"{f.severity:7s} {f.check:{width}s}  {f.path}  {f.message}")
    counts = report.counts()
    errors = sum(1 for f in report.findings if f.severity == "error")
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no findings"
    for section in report.sections.values():
        lines += section.get("summary", []) if isinstance(section, dict) else []
    lines.append(f"{report.images} image(s) checked: {summary} ({errors} error(s))")
    if report.moved:
        lines.append(f"moved {len(report.moved)} file(s) to quarantine (see quarantine.json there)")
    return "\n".join(lines)
