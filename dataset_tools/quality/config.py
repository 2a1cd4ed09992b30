"""Options of `loratrain dataset check`; defaults from the reference spec's recommendations."""
from __future__ import annotations

from dataclasses import dataclass

from loratrain.common.config import CommandConfig, ConfigError, opt

from ..captions import normalize_extension

DEFAULT_QUARANTINE = ["corrupt", "unsupported", "exact_duplicate", "near_duplicate", "blurry", "too_small", "extreme_aspect"]


@dataclass
class CheckConfig(CommandConfig):
    dataset_dir: str = opt("", "dataset folder (subfolders such as img/10_concept are included)", metadata={"positional": True})
    recursive: bool = opt(True, "include subfolders")
    caption_extension: str = opt(".txt", "caption extension the trainer will read")
    min_side: int = opt(512, "flag images whose short side is below this")
    max_aspect: float = opt(2.5, "flag images whose long/short side ratio exceeds this")
    blur_threshold: float = opt(100.0, "flag images whose Laplacian variance (at <=1024 px) is below this")
    near_duplicate_distance: int = opt(6, "pHash Hamming distance (of 64 bits) at or below which images are near-duplicates")
    tag_share: float = opt(0.75, "flag a tag present on at least this share of captioned images")
    ignore_tags: list[str] = opt([], "tags never reported as imbalanced (folder class tokens are always ignored)")
    checks: list[str] = opt([], "run only these checks (default: all)")
    json_output: str = opt("", "also write the report as JSON here")
    quarantine: str = opt("", "move flagged images (and their captions) into this folder; nothing is deleted")
    quarantine_checks: list[str] = opt(DEFAULT_QUARANTINE, "which checks' findings are moved by --quarantine")
    workers: int = opt(2, "threads decoding images")
    quiet: bool = opt(False, "no progress bar")

    def validate(self) -> None:
        from .checks import CHECKS

        if not self.dataset_dir:
            raise ConfigError("dataset_dir is required")
        for name in self.checks + self.quarantine_checks:
            if name not in CHECKS:
                raise ConfigError(f"unknown check {name!r}; checks: {', '.join(CHECKS.names())}")
        if not 0 < self.tag_share <= 1:
            raise ConfigError("tag_share must be in (0, 1]")
        self.caption_extension = normalize_extension(self.caption_extension)
