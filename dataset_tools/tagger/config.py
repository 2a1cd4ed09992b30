"""Options of `loratrain tag` (and the UI's tagger panel), named as in sd-scripts where it has them."""
from __future__ import annotations

from dataclasses import dataclass

from loratrain.common.config import CommandConfig, ConfigError, opt

from ..captions import CAPTION_POLICIES, normalize_extension
from .preprocess import RESIZE_MODES


@dataclass
class TagConfig(CommandConfig):
    dataset_dir: str = opt("", "folder of images to caption", metadata={"positional": True})
    model: str = opt("SmilingWolf/wd-swinv2-tagger-v3",
                     "tagger: a folder with model.onnx + selected_tags.csv, a Hugging Face cache folder "
                     "(models--org--name), a repo id, or a short name such as wd-vit-v3")
    download: bool = opt(False, "fetch a repo id that is not in the local cache from Hugging Face (needs internet)")
    device: str = opt("auto", "auto (CUDA when it really loads, else CPU), cuda (fail without it) or cpu",
                      metadata={"choices": ["auto", "cuda", "cpu"]})
    recursive: bool = opt(False, "also tag images in subfolders")
    caption_extension: str = opt(".txt", "caption file extension written next to each image")
    existing: str = opt("skip", "when a caption exists: skip, overwrite, append or prepend (new tags first)",
                        metadata={"choices": ["skip", "overwrite", "append", "prepend"]})
    general_threshold: float = opt(0.35, "keep general tags with probability >= this")
    character_threshold: float = opt(0.85, "keep character tags with probability >= this")
    thresholds: str = opt("default", "default (the values above) or model (the model card's P=R threshold for both)",
                          metadata={"choices": ["default", "model"]})
    general_mcut: bool = opt(False, "per-image MCut threshold for general tags instead of a fixed one")
    character_mcut: bool = opt(False, "per-image MCut threshold for character tags (never below 0.15)")
    rating: str = opt("none", "add the rating tag: none, first or last", metadata={"choices": ["none", "first", "last"]})
    remove_underscore: bool = opt(True, "write tags with spaces instead of underscores (kaomoji such as ^_^ are kept)")
    escape_brackets: bool = opt(False, "write ( ) \\ as \\( \\) \\\\ so A1111 reads them literally")
    undesired_tags: list[str] = opt([], "tags never written (exact names, with spaces or underscores)")
    undesired_regex: list[str] = opt([], "tags matching any of these regular expressions (whole tag) are never written")
    trigger_words: list[str] = opt([], "tags put first in every caption, e.g. the LoRA's trigger word")
    always_first_tags: list[str] = opt([], "if predicted, these tags are moved to the front, in this order")
    character_tags_first: bool = opt(False, "character tags before general tags")
    character_tag_expand: bool = opt(False, "split name_(series) into name, series")
    tag_replacement: str = opt("", "replacements 'src,dst;src2,dst2' (\\, and \\; escape), applied after the rest")
    caption_separator: str = opt(", ", "separator written between tags")
    batch_size: int = opt(0, "images per model call; 0 = 2 on CPU (bigger batches are slower there), 16 on CUDA. "
                             "Forced to 1 for models with a fixed batch of 1 (WD v2)")
    workers: int = opt(0, "threads decoding and preprocessing images ahead of the model; 0 = 2 on CPU (the model "
                          "needs the cores), all cores with CUDA")
    resize: str = opt("bicubic", "bicubic (canonical) or area_lanczos (sd-scripts)")
    output_jsonl: str = opt("", "also write every image's tags and scores to this JSONL file")
    on_bad_image: str = opt("skip", "skip (report at the end) or error", metadata={"choices": ["skip", "error"]})
    quiet: bool = opt(False, "no progress bar")

    def validate(self) -> None:
        if not self.dataset_dir:
            raise ConfigError("dataset_dir is required")
        if self.existing not in CAPTION_POLICIES:
            raise ConfigError(f"existing must be one of {CAPTION_POLICIES.names()}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {RESIZE_MODES.names()}")
        for name in ("general_threshold", "character_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1")
        if self.batch_size < 0 or self.workers < 0:
            raise ConfigError("batch_size and workers must be >= 0")
        self.caption_extension = normalize_extension(self.caption_extension)
