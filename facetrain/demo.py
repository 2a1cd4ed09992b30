"""`loratrain demo face`: bundled photos -> extraction and alignment -> a small DF model -> preview and ONNX ->
a swapped, labelled video with its audio."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratrain.core.config import JobConfig, opt
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag

from .extract.config import ExtractConfig
from .train.config import FaceTrainConfig


class FaceDemoConfig(JobConfig):
    output_dir: str = opt("demo_face", "where the photos, facesets and the model are written", path="output")
    steps: int = opt(400, "training iterations", ge=1)


@dataclass
class FaceDemoResult(JobResult):
    src_faces: int
    dst_faces: int
    first: float
    last: float
    model_path: Path
    preview_path: Path
    onnx_path: Path
    swap_path: Path | None = None
    swapped_faces: int = 0

    def summary(self) -> list[str]:
        lines = [f"faces: {self.src_faces} src + {self.dst_faces} dst extracted and aligned",
                 f"loss (src+dst): first 20 iterations avg {self.first:.4f} -> last 20 avg {self.last:.4f}",
                 f"model: {self.model_path}", f"ONNX (.dfm contract): {self.onnx_path}",
                 f"preview (src | pred src | dst | pred dst | swap): {self.preview_path}"]
        if self.swap_path:
            lines.append(f"swapped video (labelled AI-generated, audio kept): {self.swap_path} ({self.swapped_faces} faces)")
        return lines


@job
def run_face_demo(cfg: FaceDemoConfig, reporter: Reporter, stop: StopFlag) -> FaceDemoResult:
    """Bundled photos -> extraction and alignment -> a small DF model -> preview and ONNX, offline."""
    from .demo_data import make_photos
    from .export import export_onnx
    from .extract.extract import run_face_extract
    from .train.trainer import run_face_train

    root = Path(cfg.output_dir).resolve()
    iterations = cfg.steps
    counts = {}
    for look, seed in (("src", 0), ("dst", 1)):
        photos = root / f"{look}_photos"
        if not photos.is_dir():
            make_photos(photos, 16, seed, look)
        res = run_face_extract(ExtractConfig(input=str(photos), output_dir=str(root / look), image_size=128, overwrite=True,
                                             max_faces=1), reporter, stop)
        counts[look] = len(res.faces)
    cfg = FaceTrainConfig(model_dir=str(root / "model"), src_faceset=str(root / "src"), dst_faceset=str(root / "dst"),
                          archi="df-ud", resolution=64, ae_dims=96, e_dims=24, d_dims=24, batch_size=8, max_iters=iterations,
                          preview_every=100, save_every=200, ct_mode="rct", workers=2)
    result = run_face_train(cfg, reporter, stop)
    total = [h["src_loss"] + h["dst_loss"] for h in result.history]
    onnx_path = export_onnx(result.model_path, root / "model" / "face.onnx")
    out = FaceDemoResult(src_faces=counts["src"], dst_faces=counts["dst"], first=sum(total[:20]) / max(1, len(total[:20])),
                         last=sum(total[-20:]) / max(1, len(total[-20:])), model_path=result.model_path,
                         preview_path=result.preview_path, onnx_path=onnx_path, stopped=result.stopped)
    if result.stopped or stop.is_set():
        return out
    from .demo_data import make_clip
    from .swap.config import SwapConfig
    from .swap.run import run_face_swap

    clip = root / "dst_clip.mp4"
    if not clip.is_file():
        make_clip(clip, frames=24, fps=12)  # the dst look on a still camera, with a 440 Hz tone as its audio
    swapped = run_face_swap(SwapConfig(input=str(clip), model=str(result.model_path), output=str(root / "swapped.mp4"),
                                       overwrite=True, blur_mask_modifier=40, erode_mask_modifier=10), reporter, stop)
    out.swap_path, out.swapped_faces, out.stopped = Path(swapped.output), swapped.faces, swapped.stopped
    return out
