"""Options of `loratrain dataset check`; where the defaults come from: docs/dataset-tools.md#quality-check-defaults."""
from __future__ import annotations

from pathlib import Path

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
    people: bool = opt(False, "every concept shows one person: more than one face is an error, shot balance judged everywhere")
    person_concepts: list[str] = opt([], "concept folders (10_alice) or their class tokens (alice) showing one person "
                                         "(default: faces are counted everywhere, more than one is a warning)")
    face_detector: str = opt("dlib", "face detector of the people and shot_balance checks: dlib (HOG, fast) or dlib_cnn "
                                     "(also finds turned faces; slow without CUDA)", choices=["dlib", "dlib_cnn"])
    marks_contrast: float = opt(40.0, "text_marks: least contrast (0-255) of a stroke of overlaid text", gt=0, le=255, group="marks")
    marks_min_letters: int = opt(5, "text_marks: least letters in a line of overlaid text", ge=2, group="marks")
    marks_isolation: float = opt(3.0, "text_marks: how much denser in strokes a text line must be than the band around it",
                                 gt=0, group="marks")
    marks_tiled_lines: int = opt(5, "text_marks: least same-height text lines spread over the image for a tiled watermark",
                                 ge=2, group="marks")
    text_model: str = opt("", "text_marks: an ONNX text detector (DB, or EAST with 'east' in its name) used instead of "
                              "the built-in method; yours to bring, nothing is downloaded", path="file", group="marks")
    video_min_frames: int = opt(4, "video_marks: least frames of one clip (same folder, size and name stem) to compare",
                                ge=2, group="marks")
    checks: list[str] = opt([], "run only these checks (default: all)", registry=CHECKS)
    json_output: str = opt("", "also write the report as JSON here", path="output")
    quarantine: str = opt("", "move flagged images (and their captions) into this folder; nothing is deleted", path="output")
    quarantine_checks: list[str] = opt(DEFAULT_QUARANTINE, "which checks' findings are moved by --quarantine", registry=CHECKS)
    workers: int = opt(2, "threads decoding images", ge=1)
    quiet: bool = opt(False, "no progress bar")

    def requirements(self) -> list[Problem]:
        out: list[Problem] = [("dataset_dir", "is required")] if not self.dataset_dir else []
        model = Path(self.text_model).expanduser()
        if self.text_model and not model.is_file():  # said before any image is measured
            out.append(("text_model", f"{self.text_model} {'is a folder' if model.is_dir() else 'not found'}; "
                                      "give an ONNX file"))
        return out
