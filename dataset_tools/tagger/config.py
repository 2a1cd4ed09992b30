"""Options of `loratrain tag` (and the UI's tagger panel), named as in sd-scripts where it has them."""
from __future__ import annotations

from loratrain.core.captions import CaptionExtension
from loratrain.core.config import JobConfig, opt
from loratrain.core.devices import DEVICES
from loratrain.core.errors import Problem


class TagConfig(JobConfig):
    dataset_dir: str = opt("", "folder of images to caption", positional=True, path="dir")
    model: str = opt("SmilingWolf/wd-swinv2-tagger-v3",
                     "tagger: a folder with model.onnx + selected_tags.csv, a Hugging Face cache folder "
                     "(models--org--name), a repo id, or a short name such as wd-vit-v3", path="any")
    download: bool = opt(False, "fetch a repo id that is not in the local cache from Hugging Face (needs internet)")
    device: str = opt("auto", "auto (CUDA when it really loads, else CPU), cuda (fail without it) or cpu", choices=DEVICES)
    recursive: bool = opt(False, "also tag images in subfolders")
    caption_extension: CaptionExtension = opt(".txt", "caption file extension written next to each image")
    existing: str = opt("skip", "when a caption exists: skip, overwrite, append or prepend (new tags first; "
                                "the caption's later lines are kept)", registry="loratrain.dataset_tools.captions:CAPTION_POLICIES")
    general_threshold: float = opt(0.35, "keep general tags with probability >= this", ge=0, le=1)
    character_threshold: float = opt(0.85, "keep character tags with probability >= this", ge=0, le=1)
    thresholds: str = opt("default", "default (the values above) or model (the model card's P=R threshold for both)",
                          choices=["default", "model"])
    general_mcut: bool = opt(False, "per-image MCut threshold for general tags instead of a fixed one")
    character_mcut: bool = opt(False, "per-image MCut threshold for character tags (never below 0.15)")
    rating: str = opt("none", "add the rating tag: none, first or last", choices=["none", "first", "last"])
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
                             "Forced to 1 for models with a fixed batch of 1 (WD v2)", ge=0)
    workers: int = opt(0, "threads decoding and preprocessing images ahead of the model; 0 = 2 on CPU (the model "
                          "needs the cores), all cores with CUDA", ge=0)
    resize: str = opt("bicubic", "bicubic (canonical) or area_lanczos (sd-scripts)",
                      registry="loratrain.dataset_tools.tagger.preprocess:RESIZE_MODES")
    output_jsonl: str = opt("", "also write every image's tags and scores to this JSONL file", path="output")
    on_bad_image: str = opt("skip", "skip (report at the end) or error", choices=["skip", "error"])
    quiet: bool = opt(False, "no progress bar")

    def requirements(self) -> list[Problem]:
        return [("dataset_dir", "is required")] if not self.dataset_dir else []
