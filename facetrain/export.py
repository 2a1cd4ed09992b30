"""ONNX export in DeepFaceLab's .dfm contract, so the swap path and DFM-reading tools can run the model.

Input `in_face:0`: NHWC float, BGR 0..1, resolution x resolution. Outputs: `out_celeb_face` (the face in
src's likeness), `out_celeb_face_mask` (its mask) and `out_face_mask` (the dst mask), all NHWC. An AMP model
also takes `morph_value:0`, shape [1], in 0..1, as DFL's AMP export does (docs/face-model.md#amp).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import atomic_path, new_output

from .config import ExportConfig
from .models.archi import FaceAutoencoder
from .train.model_file import load_model_file


class _DfmWrapper(torch.nn.Module):
    def __init__(self, model: FaceAutoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, face: torch.Tensor, morph: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = face.permute(0, 3, 1, 2)
        out = self.model.swap(x) if morph is None else self.model.swap(x, morph)
        return tuple(t.permute(0, 2, 3, 1) for t in out)


def takes_morph(model: FaceAutoencoder) -> bool:
    """AMP's swap mixes two codes by a morph value; the exported model then has DFL's `morph_value:0` input."""
    from .models.amp import AMP

    return isinstance(model, AMP)


def load_face_model(path: str | Path) -> tuple[FaceAutoencoder, dict]:
    """The model and its header; the header is checked against the file's tensors before anything is built
    (train/model_file.py), so a planted or damaged file is a ConfigError naming it."""
    model, info = load_model_file(Path(path))
    return model.eval(), info


def export_onnx(model_path: str | Path, output: str | Path, opset: int = 17) -> Path:
    model, info = load_face_model(model_path)
    res = model.cfg.resolution
    wrapper = _DfmWrapper(model).eval()
    example: tuple[torch.Tensor, ...] = (torch.rand(1, res, res, 3),)
    names = ["in_face:0"]
    if takes_morph(model):
        example, names = example + (torch.tensor([0.5]),), names + ["morph_value:0"]
    output = Path(output)
    with atomic_path(output) as tmp, torch.no_grad():
        torch.onnx.export(wrapper, example, str(tmp), input_names=names,
                          output_names=["out_celeb_face", "out_celeb_face_mask", "out_face_mask"],
                          dynamic_axes={"in_face:0": {0: "batch"}}, opset_version=opset, dynamo=False)
        _add_metadata(tmp, {"face_type": str(info.get("options", {}).get("face_type", "")), "resolution": str(res),
                            "producer": "loratrain face export"})
    return output


def _add_metadata(path: Path, values: dict[str, str]) -> None:
    """The face type and resolution ride along in the ONNX file, so `face swap` crops as the model was trained."""
    import onnx

    model = onnx.load(str(path))
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


@dataclass
class ExportResult(JobResult):
    output: Path
    morph: bool = False  # the model has AMP's morph_value:0 input

    def summary(self) -> list[str]:
        inputs = "inputs in_face:0, morph_value:0 (0..1)" if self.morph else "input in_face:0"
        return [f"wrote {self.output} ({inputs}, outputs out_celeb_face, out_celeb_face_mask, out_face_mask)"]


@job
def run_face_export(cfg: ExportConfig, reporter: Reporter, stop: StopFlag) -> ExportResult:
    """ONNX in DeepFaceLab's .dfm contract, written atomically (one unit)."""
    new_output(cfg.output, cfg.overwrite)
    output = export_onnx(cfg.model, cfg.output)
    import onnx

    return ExportResult(output=output, morph=any(i.name == "morph_value:0" for i in onnx.load(str(output)).graph.input))
