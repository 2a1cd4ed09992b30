"""Options of `loratrain dataset check`; where the defaults come from: docs/dataset-tools.md#quality-check-defaults."""
from __future__ import annotations

from loratrain.core.captions import CaptionExtension
from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import Problem

DEFAULT_QUARANTINE = ["corrupt", "unsupported", "exact_duplicate", "near_duplicate", "blurry", "too_small", "extreme_aspect"]
CHECKS = "loratrain.dataset_tools.quality.checks:CHECKS"


class CheckConfig(JobConfig):
    dataset_dir: str = opt("", "dataset folder (subfolders such as img/10_concept are included)", positional=True, path="dir")
    recursive: bool = opt(True, "include subfolders")
    caption_extension: CaptionExtension = opt(".txt", "caption extension the trainer will read")
    min_side: int = opt(512, "flag images whose short side is below this", ge=1)
    max_aspect: float = opt(2.5, "flag images whose long/short side ratio exceeds this", ge=1)
    blur_threshold: float = opt(100.0, "flag images whose Laplacian variance (at <=1024 px) is below this", ge=0)
    near_duplicate_distance: int = opt(6, "pHash Hamming distance (of 64 bits) at or below which images are near-duplicates",
                                       ge=0, le=64)
    tag_share: float = opt(0.75, "flag a tag present on at least this share of captioned images", gt=0, le=1)
    ignore_tags: list[str] = opt([], "tags never reported as imbalanced (folder class tokens are always ignored)")
    checks: list[str] = opt([], "run only these checks (default: all)", registry=CHECKS)
    json_output: str = opt("", "also write the report as JSON here", path="output")
    quarantine: str = opt("", "move flagged images (and their captions) into this folder; nothing is deleted", path="output")
    quarantine_checks: list[str] = opt(DEFAULT_QUARANTINE, "which checks' findings are moved by --quarantine", registry=CHECKS)
    workers: int = opt(2, "threads decoding images", ge=1)
    quiet: bool = opt(False, "no progress bar")

    def requirements(self) -> list[Problem]:
        return [("dataset_dir", "is required")] if not self.dataset_dir else []
