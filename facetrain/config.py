"""Configs of `loratrain face grow | export | import-dfl | export-dfl`: light to import (no torch, no OpenCV), so every
command's flags exist even on an install without the face extras."""
from __future__ import annotations

from loratrain.core.config import JobConfig, opt
from loratrain.core.errors import Problem


class GrowConfig(JobConfig):
    model: str = opt("", "the model's .safetensors file", positional=True, path="file")
    resolution: int = opt(0, "the new, larger resolution", ge=0)
    keep_backups: int = opt(3, "rotating backups kept in backups/", ge=0)
    lock_old_iters: int = opt(0, "keep the layers the grow keeps locked for the first N iterations of training (the "
                                 "re-initialised ones train alone meanwhile); 0 = no lock", ge=0)

    def requirements(self) -> list[Problem]:
        out = [("model", "is required")] if not self.model else []
        return out + ([("resolution", "is required")] if not self.resolution else [])


class ExportConfig(JobConfig):
    model: str = opt("", "the model's .safetensors file", positional=True, path="file")
    output: str = opt("", "the .onnx (or .dfm) file to write", positional=True, path="output")
    overwrite: bool = opt(False, "replace the output if it exists")

    def requirements(self) -> list[Problem]:
        from loratrain.core.safe_io import output_problems

        out = [(name, "is required") for name in ("model", "output") if not getattr(self, name)]
        return out + output_problems("output", self.output, [self.model], "onnx", self.overwrite)


class ImportDflConfig(JobConfig):
    input: str = opt("", "folder of DFLJPG faces", positional=True, path="dir")
    output: str = opt("", "folder for the converted faces", positional=True, path="output")

    def requirements(self) -> list[Problem]:
        return [(name, "is required") for name in ("input", "output") if not getattr(self, name)]


class ExportDflConfig(JobConfig):
    faceset: str = opt("", "folder of aligned faces (ours)", positional=True, path="dir")
    output: str = opt("", "folder for the DeepFaceLab DFLJPG files (made if missing; not the faceset itself)",
                      positional=True, path="output")
    overwrite: bool = opt(False, "replace files of the same name already in the output folder")

    def requirements(self) -> list[Problem]:
        from loratrain.core.paths import locate, real, within

        out = [(name, "is required") for name in ("faceset", "output") if not getattr(self, name)]
        if out:
            return out
        if within(real(locate(self.output)), real(locate(self.faceset))):  # links followed, from the job's folder
            out.append(("output", f"{self.output} is (or lies inside) the faceset {self.faceset}; DFLJPG files would "
                                  "mix with the faces they come from: choose another folder"))
        return out
