"""Every job the product offers, once: the CLI builds its commands from this table and the UI its pages.

Each entry names its config class and its `run_<job>` function by import path, so listing the jobs
(or building the argument parser) imports only the light config modules, never torch-heavy code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from loratrain.core.registry import Registry

FACE = ("cv2", "dlib")


@dataclass(frozen=True)
class JobSpec:
    path: tuple[str, ...]  # the command words: ("train",), ("lora", "bake"), ("tags", "add")
    config: str  # "module:Class" of its JobConfig
    run: str  # "module:function" following the job contract
    help: str
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)  # option values the command itself sets (tags add -> op=add)
    extras: tuple[str, ...] = ()  # optional modules it needs; checked first, with the pip command to get them
    stop_when: str = "after the current item"  # what a first Ctrl-C does
    gpu: bool = False  # one such job at a time (the UI queues the rest)

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def config_class(self) -> Any:
        return _load(self.config)

    def run_function(self) -> Any:
        return _load(self.run)


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


JOBS: Registry[JobSpec] = Registry("command")
#: help of command groups that are not jobs themselves
GROUPS = {"face": "DeepFaceLab-style face tools: extract, sort, train (DF / LIAE), grow, export, swap. "
                  "Use only faces of people who have given their consent.",
          "face xseg": "masks: train a segmenter on hand-labelled faces, apply it to a faceset, remove or undo",
          "face swapper": "identity-injection swappers (FaceFusion's inswapper family): fine-tune on one person, inspect",
          "face snapshot": "pinned copies of a face model (never rotated away): save, list, restore (itself undoable)",
          "lora": "bake LoRAs (and LyCORIS files) into a checkpoint, merge LoRAs, resize a LoRA's rank, extract a LoRA "
                  "from two checkpoints, convert an (IA)^3 file to a LoRA",
          "dataset": "prepare repeat folders, check quality, extract video frames",
          "tags": "edit the captions of a dataset in bulk, with undo (filters --all_of / --any_of / --none_of choose the images; "
                  "every edit is journalled and the originals are backed up in DIR/.loratrain/)"}


def add(*specs: JobSpec) -> None:
    for spec in specs:
        JOBS.register(spec.name)(spec)


T, G, M, D, F = "loratrain.training", "loratrain.grid", "loratrain.merge", "loratrain.dataset_tools", "loratrain.facetrain"
TAG_EDITS = {
    "add": "add --tags to the selected captions (--front to put them first)",
    "remove": "remove --tags (--regex: patterns matching whole tags)",
    "replace": "replace --find with --replace_with, per tag or in the whole caption (--scope)",
    "move_front": "move --tags to the front, in the order given",
    "dedupe": "remove repeated tags",
    "sort": "sort tags (--sort_by alphabetical|frequency|length|tokens, --keep_first N)",
    "truncate": "drop tags from the end until the caption fits --max_tokens CLIP tokens",
    "list": "tag frequency table of the selected images",
    "set": "set one image's caption (--image, --caption)",
    "undo": "undo the newest edit (or tagging run), restoring byte-identical captions",
    "history": "list the edits that can be undone",
}

add(
    JobSpec(("train",), f"{T}.config:TrainConfig", f"{T}.trainer:run_train", "train a LoRA / LoCon",
            "Train a LoRA; options use sd-scripts names.", stop_when="after this step and saving a resumable state", gpu=True),
    JobSpec(("dreambooth",), f"{T}.dreambooth:DreamBoothConfig", f"{T}.dreambooth:run_dreambooth",
            "DreamBooth: fine-tune the whole model with class images (generated when missing) and prior preservation",
            "Full fine-tune of SD1/SD2/SDXL from the same N_concept folders as `train`; --class_prompt and "
            "--num_class_images fill --reg_data_dir with class images from the base model. Saves single-file checkpoints.",
            fixed={"network_module": "full"}, stop_when="after this step and saving a resumable state", gpu=True),
    JobSpec(("finetune",), f"{T}.dreambooth:FinetuneConfig", f"{T}.dreambooth:run_finetune",
            "fine-tune the whole model (UNet, and text encoders unless --network_train_unet_only)",
            "The training loop of `train` on every weight; saves single-file checkpoints (`lora extract` against the "
            "base gives a LoRA of the result).", fixed={"network_module": "full"},
            stop_when="after this step and saving a resumable state", gpu=True),
    JobSpec(("generate",), f"{G}.config:GenerateConfig", f"{G}.generate:run_generate",
            "generate an image with a base model and LoRAs", gpu=True),
    JobSpec(("grid",), f"{G}.config:GridConfig", f"{G}.runner:run_grid",
            "XY(Z) comparison grid of checkpoints, LoRAs, weights and sampling settings",
            "Values: a,b,c (CSV) or on numeric axes 1-5, 1-5 (+2), 0-1 [5].", stop_when="after the current cell", gpu=True),
    JobSpec(("merge",), f"{M}.config:MergeConfig", f"{M}.checkpoint:run_merge",
            "merge two or three checkpoints (weighted sum / add difference, optional block weights)",
            "Streaming checkpoint merge. w is always the share of model B: weighted_sum = A*(1-w) + B*w, "
            "add_difference = A + (B-C)*w.", stop_when="(nothing is written)"),
    JobSpec(("convert",), f"{M}.config:ConvertConfig", f"{M}.convert:run_convert", "single-file checkpoint <-> diffusers folder",
            "Convert SD1/SD2/SDXL between an LDM single file (.safetensors) and a diffusers folder."),
    JobSpec(("lora", "bake"), f"{M}.config:BakeConfig", f"{M}.lora_bake:run_lora_bake",
            "bake LoRAs into a checkpoint: W += ratio * up@down * alpha/rank (streamed)", stop_when="(nothing is written)"),
    JobSpec(("lora", "merge"), f"{M}.config:LoraMergeConfig", f"{M}.lora_merge:run_lora_merge",
            "merge LoRAs into one (concatenate ranks, or SVD to a new rank)", stop_when="(nothing is written)"),
    JobSpec(("lora", "resize"), f"{M}.config:LoraResizeConfig", f"{M}.lora_resize:run_lora_resize",
            "reduce a LoRA's rank by SVD: a fixed rank, or per module by sv_ratio / sv_fro / sv_cumulative",
            stop_when="(nothing is written)"),
    JobSpec(("lora", "extract"), f"{M}.config:LoraExtractConfig", f"{M}.lora_extract:run_lora_extract",
            "extract a LoRA from two checkpoints by SVD (kohya layout)", stop_when="(nothing is written)"),
    JobSpec(("lora", "convert-ia3"), f"{M}.config:LoraConvertIa3Config", f"{M}.lora_convert:run_lora_convert_ia3",
            "convert an (IA)^3 file to a LoRA by SVD of W * w on its base model (ComfyUI and diffusers read no (IA)^3)",
            stop_when="(nothing is written)"),
    JobSpec(("tag",), f"{D}.tagger.config:TagConfig", f"{D}.tagger.runner:run_tag", "caption a folder of images with a WD14 tagger (ONNX)",
            "Writes <image>.txt captions with a SmilingWolf WD tagger. Every written caption is journalled: "
            "`loratrain tags undo DIR` restores the previous files.", extras=("onnxruntime",), stop_when="after this batch"),
    *(JobSpec(("tags", op), f"{D}.editor.config:TagsConfig", f"{D}.editor.run:run_tags", text, text, fixed={"op": op})
      for op, text in TAG_EDITS.items()),
    JobSpec(("dataset", "prepare"), f"{D}.prepare:PrepareConfig", f"{D}.prepare:run_prepare",
            "build <repeats>_<tokens> folders and the dataset TOML",
            "Repeats are balanced so repeats x images is about equal across concepts.", stop_when="(what was placed is removed)"),
    JobSpec(("dataset", "check"), f"{D}.quality.config:CheckConfig", f"{D}.quality.report:run_check",
            "report corrupt, small, blurred, duplicate images and caption problems",
            "Prints a table (and --json_output); --quarantine DIR moves flagged files, never deletes them. "
            "Exit code 1 when an error-level finding remains.", stop_when="after this image"),
    JobSpec(("dataset", "fix-marks"), f"{D}.quality.fix_marks:FixMarksConfig", f"{D}.quality.fix_marks:run_fix_marks",
            "crop away or inpaint the text and marks `dataset check` found (undo: `loratrain tags undo DIR`)",
            "Boxes come from --report (a check's --json_output) or are found again. Every changed image is journalled; "
            "`loratrain tags undo DIR` restores the original bytes.", stop_when="after this image"),
    JobSpec(("dataset", "frames"), f"{D}.frames:FramesConfig", f"{D}.frames:run_frames",
            "extract frames from a video, dropping near-duplicates and blurred ones", stop_when="after this frame"),
    JobSpec(("face", "extract"), f"{F}.extract.config:ExtractConfig", f"{F}.extract.extract:run_face_extract",
            "detect, landmark and align faces from images or a video", extras=FACE, stop_when="after this frame"),
    JobSpec(("face", "sort"), f"{F}.extract.config:SortConfig", f"{F}.extract.sort:run_face_sort",
            "sort a faceset by yaw, pitch, blur, hist or identity", extras=FACE),
    JobSpec(("face", "train"), f"{F}.train.config:FaceTrainConfig", f"{F}.train.trainer:run_face_train",
            "train a DF / LIAE face model (SAEHD options)", extras=("cv2",), stop_when="after this iteration and saving", gpu=True),
    JobSpec(("face", "report"), f"{F}.face_report:FaceReportConfig", f"{F}.face_report:run_face_report",
            "rank a model's faces worst first by their average loss (bad masks or crops show at the top)",
            "Reads <model_name>.faces.json, which `face train` keeps beside the model (--face_stats): per face, the "
            "moving average of its loss and of its mask difference, and how often it was drawn. Flags faces above "
            "--threshold; --csv / --json write every face."),
    JobSpec(("face", "grow"), f"{F}.config:GrowConfig", f"{F}.grow:run_face_grow",
            "continue a model at a higher resolution (progressive growth)", extras=("cv2",)),
    JobSpec(("face", "export"), f"{F}.config:ExportConfig", f"{F}.export:run_face_export",
            "export to ONNX in the DeepFaceLab .dfm contract", extras=("cv2", "onnx")),
    JobSpec(("face", "swap"), f"{F}.swap.config:SwapConfig", f"{F}.swap.run:run_face_swap",
            "put the trained face onto a video, frames or an image (labelled AI-generated)",
            "DeepFaceLab's merger options (mask modes, blend modes, colour transfer, erode/blur, sharpen) on a "
            "one-command pipeline. Every output carries an 'AI-generated' label (metadata always, a visible mark "
            "unless --no-visible_mark). Use only faces of people who have given their consent.",
            extras=FACE, stop_when="after this frame (finished video segments are kept: rerun to continue)", gpu=True),
    JobSpec(("face", "import-dfl"), f"{F}.config:ImportDflConfig", f"{F}.import_dfl:run_face_import",
            "convert DeepFaceLab DFLJPG faces (pickled metadata, checked by an allow list)", extras=("cv2",)),
    JobSpec(("face", "export-dfl"), f"{F}.config:ExportDflConfig", f"{F}.export_dfl:run_face_export_dfl",
            "write a faceset as DeepFaceLab DFLJPG faces, XSeg polygons and masks included",
            "JPEG faces keep their image data byte for byte (PNG faces are encoded at quality 95); DFL's metadata goes "
            "into an APP15 segment. Never writes into the faceset itself.", extras=("cv2",), stop_when="after this face"),
    JobSpec(("face", "xseg", "train"), f"{F}.xseg.config:XSegTrainConfig", f"{F}.xseg.train:run_xseg_train",
            "train a face segmenter (XSeg) on the faces labelled with include/exclude polygons",
            "A small U-Net learns DeepFaceLab's XSeg masks from the hand-labelled faces only, with warps, flips, colour, "
            "blur and pasted occluders; some labelled faces are held out to measure IoU. Resumes the model file it is given.",
            extras=("cv2",), stop_when="after this iteration and saving", gpu=True),
    JobSpec(("face", "xseg", "apply"), f"{F}.xseg.config:XSegApplyConfig", f"{F}.xseg.apply:run_xseg_apply",
            "write a segmenter's masks into a faceset (training and the swap use them; undo: `face xseg undo`)",
            extras=("cv2",), stop_when="after this batch (faces done so far keep their new masks, and undo restores them)"),
    JobSpec(("face", "xseg", "remove"), f"{F}.xseg.config:XSegRemoveConfig", f"{F}.xseg.apply:run_xseg_remove",
            "remove the XSeg masks of a faceset (polygons stay; undo: `face xseg undo`)", extras=("cv2",)),
    JobSpec(("face", "xseg", "undo"), f"{F}.xseg.config:XSegUndoConfig", f"{F}.xseg.apply:run_xseg_undo",
            "undo the newest `face xseg apply` or `face xseg remove` on a faceset", extras=("cv2",)),
    JobSpec(("face", "swapper", "train"), f"{F}.swapper.config:SwapperTrainConfig", f"{F}.swapper.train:run_swapper_train",
            "fine-tune an identity-injection swapper (inswapper-style .onnx) on one person, or train ours from scratch",
            "Identity (recogniser cosine), L1/L2/LPIPS reconstruction, attribute and GAN losses; freeze the early blocks "
            "(--freeze_until); AdamW, cosine schedule, accumulation, bf16/fp16, held-out validation with early stopping. "
            "The saved .onnx keeps the input and output names, shapes and embedding map of the file it came from, so "
            "FaceFusion and `face swap --swapper` load it unchanged. Models and their licences are yours to bring. "
            "Use only faces of people who have given their consent.",
            extras=("cv2", "onnx"), stop_when="after this iteration and saving", gpu=True),
    JobSpec(("face", "swapper", "info"), f"{F}.swapper.config:SwapperInfoConfig", f"{F}.swapper.info:run_swapper_info",
            "show a swapper file's inputs, outputs, crop, embedding map and blocks (for --freeze_until)",
            extras=("cv2", "onnx")),
    *(JobSpec(("face", "snapshot", op), f"{F}.snapshots:SnapshotConfig", f"{F}.snapshots:run_face_snapshot", text, text,
              fixed={"op": op}, stop_when="(each action is one short copy)")
      for op, text in (("save", "pin a copy of a face model (model, optimizer state, plan state) as snapshots/NAME"),
                       ("list", "list a face model's snapshots"),
                       ("restore", "put a snapshot back (the current files are first pinned as before-restore-<time>)"))),
    JobSpec(("demo",), f"{T}.demo:LoraDemoConfig", f"{T}.demo:run_lora_demo",
            "train a LoRA+LoCon on a tiny built-in model (or `demo face`), end to end, offline", gpu=True),
    JobSpec(("demo", "lora"), f"{T}.demo:LoraDemoConfig", f"{T}.demo:run_lora_demo",
            "train a LoRA+LoCon on a tiny built-in model and a synthetic dataset", gpu=True),
    JobSpec(("demo", "face"), f"{F}.demo:FaceDemoConfig", f"{F}.demo:run_face_demo",
            "extract, align and train a face model on bundled photos", extras=("cv2", "dlib", "skimage", "onnx"), gpu=True),
)


def missing_extras(spec: JobSpec) -> str | None:
    """The install hint when a job's optional modules are missing (checked before its config is even built)."""
    import importlib.util

    missing = []
    for module in spec.extras:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ValueError, ImportError):  # a module blocked in sys.modules
            found = False
        if not found:
            missing.append(module)
    if not missing:
        return None
    extra = "tagger" if missing == ["onnxruntime"] else "face"
    hint = "'loratrain[tagger]' (CPU) or 'loratrain[tagger-gpu]' (CUDA), not both" if extra == "tagger" else "'loratrain[face]'"
    return f"{spec.name} needs {', '.join(missing)}: pip install {hint}"
