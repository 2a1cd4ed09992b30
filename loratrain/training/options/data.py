"""Where the images come from and how each is read. The per-folder options (SubsetOptions) and per-dataset
options (DatasetOptions) are declared here once: TrainConfig takes them as command-line and TOML options, and a
dataset TOML's [[datasets]] / [[datasets.subsets]] tables override them per dataset and per folder
(training/data/subsets.py builds its Subset and DatasetSpec on these very classes). DataOptions is the rest: options
of the run as a whole, which a dataset TOML cannot change."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, field_validator

from loratrain.core.captions import CaptionExtension
from loratrain.core.config import opt, parse_resolution
from loratrain.core.errors import ConfigError, Problem

from . import DATA

#: caption options that change a caption from step to step (a cache of text encoder outputs cannot hold them)
RANDOM_CAPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs",
                   "enable_wildcard", "token_warmup_step")


class SubsetOptions(BaseModel):
    """How the images of one folder are captioned and augmented."""

    trigger_word: str = opt("", "put this word first in every caption the trainer reads (moved to the front where a caption "
                                "has it, added where not); keep_tokens 1 keeps it there when tags shuffle", group=DATA)
    caption_extension: CaptionExtension = opt(".txt", "caption file extension", group=DATA)
    shuffle_caption: bool = opt(False, "shuffle comma-separated tags", group=DATA)
    keep_tokens: int = opt(0, "leading tags kept in place when shuffling", ge=0, group=DATA)
    keep_tokens_separator: str = opt("", "tags before this separator stay fixed (instead of keep_tokens)", group=DATA, advanced=True)
    caption_separator: str = opt(",", "separator between tags", group=DATA, advanced=True)
    secondary_separator: str = opt("", "a separator inside a tag group (e.g. ';;;'): the group shuffles and drops as one tag, "
                                       "then becomes ordinary tags", group=DATA, advanced=True)
    enable_wildcard: bool = opt(False, "captions with {a|b|c} take one choice per step, multi-line captions one random line",
                                group=DATA, advanced=True)
    token_warmup_min: int = opt(1, "token warm-up: tags seen at the first step", ge=1, group=DATA, advanced=True)
    token_warmup_step: float = opt(0.0, "token warm-up: step by which every tag is seen (< 1: a share of the total; 0 = off)",
                                   ge=0, group=DATA, advanced=True)
    resize_interpolation: str = opt("", "how images are resized into their bucket (default: lanczos down, bicubic up)",
                                    choices=["", "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"],
                                    group=DATA, advanced=True)
    caption_prefix: str = opt("", "text put before every caption", group=DATA, advanced=True)
    caption_suffix: str = opt("", "text put after every caption", group=DATA, advanced=True)
    caption_dropout_every_n_epochs: int = opt(0, "train every N-th epoch with empty captions (0 = off)", ge=0, group=DATA,
                                              advanced=True)
    caption_dropout_rate: float = opt(0.0, "probability of training a sample with an empty caption", ge=0, le=1, group=DATA, advanced=True)
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each tag", ge=0, le=1, group=DATA, advanced=True)
    flip_aug: bool = opt(False, "random horizontal flips", group=DATA)
    color_aug: bool = opt(False, "sd-scripts' colour jitter (hue shift or gamma, a third of the steps); those images are "
                                 "VAE-encoded every step instead of cached", group=DATA, advanced=True)
    random_crop: bool = opt(False, "a random crop of each image every step instead of the centre one (encoded every step)",
                            group=DATA, advanced=True)
    alpha_mask: bool = opt(False, "each image's alpha channel weights its loss (transparent parts are not learned)", group=DATA,
                           advanced=True)
    conditioning_data_dir: str = opt("", "masked_loss: folder of mask images named like the training images (white = learned, "
                                         "black = ignored; directly or in folders named like the image folders)", group=DATA,
                                     path="dir", advanced=True)

    @field_validator("trigger_word")
    @classmethod
    def _one_tag(cls, value: str) -> str:
        """A trigger word is one tag of one caption line: spaces around it are dropped (tags are compared without
        them), a newline would make it a line of its own (a multi-line caption is a choice of lines)."""
        if value and not value.strip():
            raise ValueError("is only spaces: give a word, or leave it empty for none")
        if any(not c.isprintable() for c in value.strip()):
            raise ValueError("must be one line of text (no newline, tab or other control character)")
        return value.strip()

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        if not self.caption_separator:
            out.append(("caption_separator", "must not be empty (the tags of a caption are split at it)"))
        for name in ("caption_separator", "keep_tokens_separator", "secondary_separator"):
            sep = getattr(self, name)
            if self.trigger_word and sep and sep in self.trigger_word:
                out.append(("trigger_word", f"{self.trigger_word!r} contains the {name} {sep!r}: the trigger must be one "
                                            "tag, or it is split, doubled and shuffled apart"))
        return out

    def requirements(self) -> list[Problem]:
        if self.conditioning_data_dir and not Path(self.conditioning_data_dir).exists():
            return [("conditioning_data_dir", f"not found: {self.conditioning_data_dir}")]
        return []


class DatasetOptions(BaseModel):
    """How one dataset's images are bucketed and split for validation."""

    enable_bucket: bool = opt(False, "aspect-ratio buckets", group=DATA)
    bucket_no_upscale: bool = opt(False, "an image smaller than the resolution keeps its size: its own bucket, never upscaled "
                                  "(min/max bucket reso ignored)", group=DATA, advanced=True)
    min_bucket_reso: int = opt(256, "smallest bucket side", ge=8, group=DATA, advanced=True)
    max_bucket_reso: int = opt(1024, "largest bucket side", ge=8, group=DATA, advanced=True)
    bucket_reso_steps: int = opt(64, "bucket side step (a multiple of 8)", ge=8, group=DATA, advanced=True)
    validation_split: float = opt(0.0, "share of each training folder's images held out to measure a validation loss "
                                       "(0 = none; reg folders are never split)", ge=0, lt=1, group=DATA, advanced=True)
    validation_seed: int | None = opt(None, "seed of which images are held out and of the validation noise (default: seed)",
                                      group=DATA, advanced=True)

    @field_validator("bucket_reso_steps")
    @classmethod
    def _bucket_step(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} must be a multiple of 8")
        return value

    def problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.enable_bucket:
            for name in ("min_bucket_reso", "max_bucket_reso"):
                if getattr(self, name) % self.bucket_reso_steps:
                    out.append((name, f"{getattr(self, name)} must be a multiple of bucket_reso_steps {self.bucket_reso_steps}"))
            if self.min_bucket_reso > self.max_bucket_reso:
                out.append(("min_bucket_reso", "min_bucket_reso is above max_bucket_reso"))
        return out

    def requirements(self) -> list[Problem]:
        return []


class DataOptions(BaseModel):
    """The dataset as a whole: its folders or TOML, resolution, batch, caches and validation schedule."""

    train_data_dir: str = opt("", "folder of <repeats>_<class tokens> subfolders", group=DATA, path="dir")
    reg_data_dir: str = opt("", "folder of regularization <repeats>_<class> subfolders", group=DATA, path="dir")
    dataset_config: str = opt("", "sd-scripts dataset TOML (replaces train/reg_data_dir)", group=DATA, path="file")
    resolution: str = opt("512", "training resolution: N or W,H (multiples of 8)", group=DATA)
    train_batch_size: int = opt(1, "images per batch", ge=1, group=DATA)
    prior_loss_weight: float = opt(1.0, "loss weight of regularization images", ge=0, group=DATA)
    validate_every_n_steps: int | None = opt(None, "validation loss every N steps too (default: only at the end of epochs)",
                                             ge=1, group=DATA, advanced=True)
    validate_every_n_epochs: int | None = opt(None, "validation loss every N epochs (default: every epoch)", ge=1, group=DATA,
                                              advanced=True)
    max_validation_steps: int | None = opt(None, "at most this many held-out batches per validation (default: all)", ge=1,
                                           group=DATA, advanced=True)
    cache_text_encoder_outputs: bool = opt(False, "encode every caption once before training and move the text encoders off the "
                                                  "GPU (needs network_train_unet_only and fixed captions)", group=DATA, advanced=True)
    cache_text_encoder_outputs_to_disk: bool = opt(False, "cache_text_encoder_outputs, kept in files beside the images instead "
                                                          "of memory; later runs read them back", group=DATA, advanced=True)
    cache_latents_to_disk: bool = opt(False, "keep encoded latents beside the images (invalidated when an image changes)",
                                      group=DATA, advanced=True)
    on_bad_image: str = opt("skip", "corrupt image: skip it (named in the log) or error", choices=["skip", "error"], group=DATA,
                            advanced=True)
    weighted_captions: bool = opt(False, "read (word:1.3), (word) and [word] in captions as A1111 does and weight those tokens' "
                                         "text encoder outputs (no commas inside brackets when tags are shuffled)", group=DATA,
                                  advanced=True)
    max_token_length: int | None = opt(None, "caption tokens: 75 (unset), 150 or 225 (2 or 3 windows of 75, as sd-scripts)",
                                       group=DATA, advanced=True)

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: str) -> str:
        try:
            parse_resolution(value, "")
        except ConfigError as e:
            raise ValueError(str(e).strip()) from None
        return value

    @field_validator("max_token_length")
    @classmethod
    def _token_windows(cls, value: int | None) -> int | None:
        if value not in (None, 75, 150, 225):
            raise ValueError(f"{value} must be 75, 150 or 225 (windows of 75 tokens)")
        return None if value == 75 else value

    def resolution_wh(self) -> tuple[int, int]:
        return parse_resolution(self.resolution)

    def problems(self) -> list[Problem]:
        return []

    def requirements(self) -> list[Problem]:
        out: list[Problem] = []
        if not (self.train_data_dir or self.dataset_config):
            out.append(("train_data_dir", "give train_data_dir or dataset_config"))
        for name in ("train_data_dir", "reg_data_dir"):
            value = getattr(self, name)
            if value and not Path(value).is_dir():
                out.append((name, f"folder not found: {value}"))
        if self.dataset_config and not Path(self.dataset_config).is_file():
            out.append(("dataset_config", f"file not found: {self.dataset_config}"))
        return out


def dataset_defaults(options: object | None = None) -> dict[str, object]:
    """Every folder and dataset option as a dataset TOML spells it (`resolution` as (W, H), `batch_size`): the values
    its tables start from, taken from `options` (a TrainConfig) or, without one, from the declarations above."""
    def value(name: str, cls: type[BaseModel]) -> object:
        return getattr(options, name) if options is not None else cls.model_fields[name].get_default(call_default_factory=True)

    out = {n: value(n, SubsetOptions) for n in SubsetOptions.model_fields}
    out |= {n: value(n, DatasetOptions) for n in DatasetOptions.model_fields}
    return out | {"resolution": parse_resolution(value("resolution", DataOptions)),
                  "batch_size": value("train_batch_size", DataOptions)}

