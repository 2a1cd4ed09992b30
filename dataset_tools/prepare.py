"""`loratrain dataset prepare`: kohya `<repeats>_<tokens>` folders plus the dataset TOML the trainer reads.

Repeats are balanced so that repeats x images is about the same for every concept (the kohya_ss
balancing rule, `max(1, round(target / images))`), where the target is a step count per concept and
epoch, or by default the largest concept's image count. The TOML always names `caption_extension`,
because sd-scripts defaults to `.caption` while taggers write `.txt`: the most common reason
captions are silently ignored.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from loratrain.core.captions import CaptionExtension, caption_path
from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import ConfigError, Problem
from loratrain.core.images import list_images
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_write_text

LINK_MODES = ("hardlink", "symlink", "copy")


class PrepareConfig(JobConfig):
    output_dir: str = opt("", "where img/, reg/ and dataset.toml are created", positional=True, path="output")
    concepts: list[str] = opt([], "source folders as FOLDER=TOKENS (e.g. 'photos/rex=sks dog'); TOKENS defaults to the folder name",
                              path="concept")
    steps_per_concept: int = opt(0, "target repeats x images per concept and epoch (0: match the largest concept)", ge=0)
    max_repeats: int = opt(100, "upper bound for the computed repeats", ge=1)
    reg_dir: str = opt("", "regularization images folder", path="dir")
    reg_class: str = opt("", "class tokens of the regularization images (e.g. 'dog')")
    reg_repeats: int = opt(1, "repeats of the regularization folder", ge=1)
    caption_extension: CaptionExtension = opt(".txt", "caption extension, written explicitly into the TOML")
    link: str = opt("hardlink", "hardlink, symlink or copy the images (captions are always copied)", choices=LINK_MODES)
    resolution: int = opt(512, "resolution written into the TOML")
    batch_size: int = opt(1, "batch_size written into the TOML")
    enable_bucket: bool = opt(True, "aspect-ratio bucketing in the TOML")
    shuffle_caption: bool = opt(False, "shuffle_caption in the TOML")
    keep_tokens: int = opt(0, "keep_tokens in the TOML (e.g. 1 keeps the trigger word first)")
    toml_name: str = opt("dataset.toml", "file name of the dataset config inside output_dir (one name, no folder)", path="name")
    overwrite: bool = opt(False, "add to an output_dir that already has img/ or reg/ (the TOML is rewritten; existing files are never replaced)")

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.reg_dir and not self.reg_class:
            out.append(("reg_class", "--reg_dir needs --reg_class (the class tokens of the regularization images)"))
        if "/" in self.reg_class or os.sep in self.reg_class or "\x00" in self.reg_class:
            out.append(("reg_class", f"{self.reg_class!r}: class tokens become a folder name and may not contain / or NUL"))
        for spec in self.concepts:
            try:
                parse_concept(spec)
            except ConfigError as e:
                out.append(("concepts", str(e)))
        return out

    def requirements(self) -> list[Problem]:
        out = [("output_dir", "is required")] if not self.output_dir else []
        return out + ([("concepts", "give at least one --concepts FOLDER=TOKENS")] if not self.concepts else [])


@dataclass
class Concept:
    source: Path
    tokens: str
    images: list[Path]
    repeats: int = 1
    folder: Path | None = None


@dataclass
class PrepareResult(JobResult):
    concepts: list[Concept] = field(default_factory=list)
    reg: Concept | None = None
    toml: Path | None = None
    missing_captions: list[Path] = field(default_factory=list)

    def summary(self) -> list[str]:
        if self.stopped:
            return ["stopped; the files placed so far were removed again"]
        lines = [f"{c.folder}: {len(c.images)} image(s) x {c.repeats} repeats = {len(c.images) * c.repeats}"
                 for c in self.concepts + ([self.reg] if self.reg else [])]
        if self.missing_captions:
            lines.append(f"warning: {len(self.missing_captions)} image(s) have no caption; their folder's tokens will be used "
                         f"(first: {self.missing_captions[0]})")
        return lines + [f"dataset config: {self.toml}", f"train with: loratrain train --dataset_config {self.toml} ..."]


def parse_concept(spec: str) -> tuple[Path, str]:
    folder, sep, tokens = spec.rpartition("=") if "=" in spec else (spec, "", "")
    folder_path = Path(folder)
    tokens = " ".join(tokens.split()) if sep else folder_path.name
    if not tokens:
        raise ConfigError(f"concept {spec!r}: empty tokens")
    if "/" in tokens or os.sep in tokens:
        raise ConfigError(f"concept {spec!r}: tokens may not contain a path separator")
    return folder_path, tokens


def balance_repeats(counts: list[int], steps_per_concept: int = 0, max_repeats: int = 100) -> list[int]:
    """repeats_i = max(1, round(target / images_i)), capped; the target defaults to the largest concept."""
    target = steps_per_concept or max(counts)
    return [min(max_repeats, max(1, round(target / n))) for n in counts]


def _place(src: Path, dst: Path, mode: str) -> str:
    """Link or copy one image; a hard link falls back to a copy across file systems."""
    if mode == "symlink":
        dst.symlink_to(src.resolve())
        return mode
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return mode
        except OSError:
            pass
    shutil.copy2(src, dst)
    return "copy"


def _check_paths(cfg: PrepareConfig, out: Path, sources: list[Path]) -> None:
    out_r = out.resolve()
    for src in sources:
        if not src.is_dir():
            raise ConfigError(f"source folder not found: {src}")
        src_r = src.resolve()
        if src_r == out_r or out_r in src_r.parents or src_r in out_r.parents:
            raise ConfigError(f"{src}: source and output folders may not contain each other ({out})")
    for sub in ("img", "reg"):
        if (out / sub).exists() and any((out / sub).iterdir()) and not cfg.overwrite:
            raise ConfigError(f"{out / sub} already exists and is not empty; pass --overwrite to add to it")


@job
def run_prepare(cfg: PrepareConfig, reporter: Reporter, stop: StopFlag) -> PrepareResult:
    """Link (or copy) images into balanced `<repeats>_<tokens>` folders and write the dataset TOML.

    Nothing is written before every source is read and every target checked free; a stop removes
    the files this run placed, so the output is either complete (with its TOML) or as it was.
    """
    out = Path(cfg.output_dir)
    parsed = [parse_concept(c) for c in cfg.concepts]
    sources = [p for p, _ in parsed] + ([Path(cfg.reg_dir)] if cfg.reg_dir else [])
    _check_paths(cfg, out, sources)
    result = PrepareResult()
    for src, tokens in parsed:
        images = list_images(src)
        if not images:
            raise ConfigError(f"{src}: no training images (.png .jpg .jpeg .webp .bmp)")
        result.concepts.append(Concept(src, tokens, images))
    for concept, r in zip(result.concepts, balance_repeats([len(c.images) for c in result.concepts],
                                                           cfg.steps_per_concept, cfg.max_repeats)):
        concept.repeats = r
        concept.folder = out / "img" / f"{r}_{concept.tokens}"
    if cfg.reg_dir:
        reg_images = list_images(cfg.reg_dir)
        if not reg_images:
            raise ConfigError(f"{cfg.reg_dir}: no regularization images")
        result.reg = Concept(Path(cfg.reg_dir), " ".join(cfg.reg_class.split()), reg_images, cfg.reg_repeats)
        result.reg.folder = out / "reg" / f"{cfg.reg_repeats}_{result.reg.tokens}"

    everything = result.concepts + ([result.reg] if result.reg else [])
    clashes = [c.folder / i.name for c in everything for i in c.images if (c.folder / i.name).exists()]
    if clashes:
        raise ConfigError(f"{len(clashes)} file(s) already exist in the output (first: {clashes[0]}); nothing was written")
    placed: list[Path] = []
    made_dirs = [d for d in {out, out / "img", out / "reg", *(c.folder for c in everything)} if not d.exists()]
    reporter.start(sum(len(c.images) for c in everything), "preparing", unit="img")
    try:
        for concept in everything:
            concept.folder.mkdir(parents=True, exist_ok=True)
            for img in concept.images:
                if stop.is_set():
                    raise _Undo
                dst = concept.folder / img.name
                _place(img, dst, cfg.link)
                placed.append(dst)
                cap = caption_path(img, cfg.caption_extension)
                if cap.is_file():
                    shutil.copy2(cap, caption_path(dst, cfg.caption_extension))
                    placed.append(caption_path(dst, cfg.caption_extension))
                elif concept is not result.reg:
                    result.missing_captions.append(img)
                reporter.advance()
        result.toml = out / cfg.toml_name
        atomic_write_text(result.toml, dataset_toml(cfg, result))
    except BaseException as e:
        for path in reversed(placed):
            path.unlink(missing_ok=True)
        for d in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        reporter.done("")
        if isinstance(e, _Undo):
            return PrepareResult(stopped=True)
        raise
    reporter.done("")
    return result


class _Undo(Exception):
    """A stop while placing files: remove what this run placed."""


def dataset_toml(cfg: PrepareConfig, result: PrepareResult) -> str:
    """The sd-scripts dataset config: absolute image_dir paths, explicit caption_extension everywhere."""
    subsets = []
    for c in result.concepts + ([result.reg] if result.reg else []):
        sub = {"image_dir": str(c.folder.resolve()), "num_repeats": c.repeats, "class_tokens": c.tokens,
               "caption_extension": cfg.caption_extension}
        if c is result.reg:
            sub["is_reg"] = True
        subsets.append(sub)
    general = {"resolution": cfg.resolution, "batch_size": cfg.batch_size, "enable_bucket": cfg.enable_bucket,
               "caption_extension": cfg.caption_extension, "shuffle_caption": cfg.shuffle_caption,
               "keep_tokens": cfg.keep_tokens}
    header = ("# Written by `loratrain dataset prepare`; read by `loratrain train --dataset_config` and sd-scripts.\n"
              "# Folder names are not parsed when a config is used: repeats and tokens are the keys below.\n")
    return header + tomli_w.dumps({"general": general, "datasets": [{"subsets": subsets}]})
