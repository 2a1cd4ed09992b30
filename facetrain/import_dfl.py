"""`loratrain face import-dfl`: a folder of DeepFaceLab DFLJPG faces -> our faceset format, file by file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag

from .config import ImportDflConfig
from .faceset import FacesetError, import_dfl_file


@dataclass
class ImportDflResult(JobResult):
    output: str = ""
    imported: int = 0
    refused: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        return [f"imported {self.imported} face(s) into {self.output}; refused {len(self.refused)}"] + [f"  {r}" for r in self.refused]

    @property
    def exit_code(self) -> int:
        return 130 if self.stopped else (1 if self.refused else 0)


@job
def run_face_import(cfg: ImportDflConfig, reporter: Reporter, stop: StopFlag) -> ImportDflResult:
    """Convert each DFLJPG through the allow-list unpickler (a refused file is named, never run); stop per file."""
    src, dst = Path(cfg.input), Path(cfg.output)
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")) if src.is_dir() else []
    if not files:
        raise ConfigError(f"no DFLJPG files in {src}")
    result = ImportDflResult(output=str(dst))
    reporter.start(len(files), "importing", unit="face")
    for f in files:
        if stop.is_set():
            result.stopped = True
            break
        try:
            import_dfl_file(f, dst / f.name)
            result.imported += 1
        except FacesetError as e:
            result.refused.append(str(e))
        reporter.advance()
    reporter.done("")
    return result
