"""What is written, when, under which name and with which metadata; resuming an earlier run."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from loratrain.core.config import opt
from loratrain.core.errors import Problem
from loratrain.core.precision import NAMES as PRECISION_NAMES

from . import SAVE


class SavingOptions(BaseModel):
    output_dir: str = opt("output", "where LoRA files, state and samples go", group=SAVE, path="output")
    output_name: str = opt("last", "base file name (one name, no folder)", group=SAVE, path="name")
    save_precision: str = opt("fp16", "dtype of saved LoRA files: fp16, bf16, fp32 (sd-scripts: float)",
                              choices=PRECISION_NAMES[:4], group=SAVE)
    save_every_n_epochs: int = opt(0, "save a LoRA every N epochs", ge=0, group=SAVE)
    save_n_epoch_ratio: int = opt(0, "save about N files over the run: every max(1, epochs // N) epochs (overrides "
                                     "save_every_n_epochs)", ge=0, group=SAVE, advanced=True)
    save_every_n_steps: int = opt(0, "save a LoRA every N steps", ge=0, group=SAVE)
    save_last_n_epochs: int = opt(0, "keep only the last N epoch saves (0 = all)", ge=0, group=SAVE, advanced=True)
    save_last_n_steps: int = opt(0, "keep only the last N step saves (0 = all)", ge=0, group=SAVE, advanced=True)
    save_peft_format: bool = opt(False, "also write diffusers/PEFT pytorch_lora_weights.safetensors", group=SAVE, advanced=True)
    resume: str = opt("", "training state folder to continue from, or 'latest'", group=SAVE, path="state")
    overwrite: bool = opt(False, "replace an earlier run's LoRA files and resumable state with the same output_name", group=SAVE)
    training_comment: str = opt("", "free text stored in the LoRA metadata", group=SAVE, advanced=True)
    metadata_title: str = opt("", "modelspec title (default: output_name)", group=SAVE, advanced=True)
    metadata_author: str = opt("", "modelspec author", group=SAVE, advanced=True)
    metadata_description: str = opt("", "modelspec description", group=SAVE, advanced=True)
    metadata_license: str = opt("", "modelspec license", group=SAVE, advanced=True)
    metadata_tags: str = opt("", "modelspec tags, comma-separated", group=SAVE, advanced=True)
    metadata_usage_hint: str = opt("", "modelspec usage hint (e.g. \"use the word 'sks'\")", group=SAVE, advanced=True)
    metadata_trigger_phrase: str = opt("", "modelspec trigger phrase", group=SAVE, advanced=True)
    metadata_merged_from: str = opt("", "modelspec merged_from (what this model was made from)", group=SAVE, advanced=True)
    metadata_preprocessor: str = opt("", "modelspec preprocessor", group=SAVE, advanced=True)
    metadata_is_negative_embedding: str = opt("", "modelspec is_negative_embedding", group=SAVE, advanced=True)
    metadata_thumbnail: str = opt("", "modelspec thumbnail: an image file, stored in the metadata as a data URL", group=SAVE,
                                  advanced=True, path="file")

    def problems(self) -> list[Problem]:
        if self.metadata_thumbnail and Path(self.metadata_thumbnail).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            return [("metadata_thumbnail", f"{self.metadata_thumbnail}: a .png, .jpg or .webp image")]
        return []

    def requirements(self) -> list[Problem]:
        """The thumbnail and the state to resume exist; the output folder is a folder; an earlier run is not replaced
        unless asked."""
        from ..config_checks import earlier_run_problems, resume_problems
        from ..saving import STATE_SUFFIX, find_state

        out: list[Problem] = []
        if self.metadata_thumbnail and not Path(self.metadata_thumbnail).exists():
            out.append(("metadata_thumbnail", f"not found: {self.metadata_thumbnail}"))
        if self.resume and self.resume != "latest" and not Path(self.resume).is_dir():
            out.append(("resume", f"state folder not found: {self.resume}"))
        elif self.resume and self.resume != "latest":
            out += resume_problems(Path(self.resume))
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            out.append(("output_dir", f"{self.output_dir} is a file, not a folder"))
        if self.resume == "latest":
            state = Path(self.output_dir) / f"{self.output_name}{STATE_SUFFIX}"
            if find_state(state) is None:
                out.append(("resume", f"nothing to resume: no complete training state {state} (or .tmp/.old beside it); "
                                      "run without --resume"))
        return out + earlier_run_problems(self)
