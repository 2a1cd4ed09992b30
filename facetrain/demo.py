"""`loratrain demo face`: bundled photos -> extraction and alignment -> a small DF model -> preview and ONNX."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratrain.common.progress import Reporter

from .demo_data import make_photos
from .export import export_onnx
from .extract.extract import ExtractConfig, extract_faces
from .train.config import FaceTrainConfig
from .train.trainer import train_faces


@dataclass
class FaceDemoResult:
    src_faces: int
    dst_faces: int
    first: float
    last: float
    model_path: Path
    preview_path: Path
    onnx_path: Path


def run_face_demo(root: Path, iterations: int, reporter: Reporter) -> FaceDemoResult:
    counts = {}
    for look, seed in (("src", 0), ("dst", 1)):
        photos = root / f"{look}_photos"
        if not photos.is_dir():
            make_photos(photos, 16, seed, look)
        res = extract_faces(ExtractConfig(input=str(photos), output_dir=str(root / look), image_size=128, overwrite=True,
                                          max_faces=1), reporter)
        counts[look] = len(res.faces)
    cfg = FaceTrainConfig(model_dir=str(root / "model"), src_faceset=str(root / "src"), dst_faceset=str(root / "dst"),
                          archi="df-ud", resolution=64, ae_dims=96, e_dims=24, d_dims=24, batch_size=8, max_iters=iterations,
                          preview_every=100, save_every=200, ct_mode="rct", workers=2)
    result = train_faces(cfg, reporter)
    total = [h["src_loss"] + h["dst_loss"] for h in result.history]
    onnx_path = export_onnx(result.model_path, root / "model" / "face.onnx")
    return FaceDemoResult(counts["src"], counts["dst"], sum(total[:20]) / max(1, len(total[:20])),
                          sum(total[-20:]) / max(1, len(total[-20:])), result.model_path, result.preview_path, onnx_path)
