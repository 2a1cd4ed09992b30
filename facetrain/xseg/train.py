"""`loratrain face xseg train`: a face segmenter learned from the hand-labelled faces only.

Resumable: the model file carries its iteration and held-out split, a state file beside it the optimizer, and
every sample's augmentation is seeded from (seed, iteration, slot), so a resumed run draws what the
uninterrupted run would have. Each save first copies the previous one into `backups/`, rotated by save order.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loratrain.core.devices import pick_device
from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, job
from loratrain.core.paths import confine
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import save_safetensors

from ..train.preview import write_preview
from ..train.state import companions, load_optimizer, optimizer_tensors, read_state, rotate_backup
from .config import XSegTrainConfig
from .data import XSegAugment, XSegSamples, iou, labelled_faces
from .model import XSegNet, XSegSpec, load_xseg, save_xseg, to_input

STATE_KEY = "loratrain.xseg_state"


@dataclass
class XSegTrainResult(JobResult):
    model_path: str = ""
    iteration: int = 0
    labelled: int = 0
    held_out: int = 0
    iou: float | None = None          # mean IoU on the held-out faces (None without any)
    preview_path: str = ""
    history: list[dict] = field(default_factory=list)

    def summary(self) -> list[str]:
        where = f"held-out IoU {self.iou:.3f} on {self.held_out} face(s)" if self.iou is not None else "no held-out faces"
        return [f"xseg model {self.model_path} at iteration {self.iteration}: trained on {self.labelled - self.held_out} "
                f"labelled face(s), {where}"]


def _split(labelled: list[Path], holdout: int, seed: int, saved: list[str] | None) -> tuple[list[Path], list[Path]]:
    """(train, held out). A resumed model keeps its held-out faces (by name) so its IoU stays comparable."""
    if saved is not None:
        names = set(saved)
        held = [p for p in labelled if p.name in names]
        return [p for p in labelled if p.name not in names], held
    n = holdout or (max(1, len(labelled) // 10) if len(labelled) >= 5 else 0)
    n = min(n, max(len(labelled) - 1, 0))
    order = np.random.default_rng(seed).permutation(len(labelled))
    held = sorted(labelled[i] for i in order[:n])
    return [p for p in labelled if p not in held], held


class XSegTrainer:
    def __init__(self, cfg: XSegTrainConfig, reporter: Reporter) -> None:
        self.cfg, self.reporter = cfg, reporter
        self.path = confine(cfg.model, "model", write=True)
        self.state_path, self.logs_dir, self.preview_path = companions(self.path)
        self.device = pick_device(cfg.device)
        self.iteration, self.saved_heldout = 0, None
        if self.path.exists():
            self.model, info = load_xseg(self.path)
            self.iteration = int(info.get("iteration", 0))
            self.saved_heldout = info.get("held_out")
            if not isinstance(self.saved_heldout, list) or not all(isinstance(n, str) for n in self.saved_heldout):
                self.saved_heldout = None
            reporter.log(f"resuming {self.path.name} at iteration {self.iteration} ({self.model.spec.resolution} px; "
                         "the file's resolution, width and depth are kept)")
        else:
            self.model = XSegNet(XSegSpec(cfg.resolution, cfg.base_channels, cfg.depth, cfg.face_type))
        self.model.to(self.device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self._load_state()

    def _load_state(self) -> None:
        if not self.state_path.exists() or not self.iteration:
            return
        try:
            tensors, meta = read_state(self.state_path, STATE_KEY, self.iteration)
            load_optimizer(self.opt, list(self.model.named_parameters()), "opt", tensors, meta)
        except Exception as e:  # a stale or damaged state costs the optimizer's momentum, never the model
            self.reporter.log(f"note: optimizer state not restored ({str(e)[:160]}); it starts fresh")

    def save(self, info: dict) -> None:
        for p in (self.path, self.state_path):
            rotate_backup(p, self.cfg.keep_backups)
        tensors, meta = optimizer_tensors(self.opt, list(self.model.named_parameters()), "opt")
        save_safetensors(tensors, self.state_path, {STATE_KEY: json.dumps({"iteration": self.iteration, **meta})})
        save_xseg(self.model, self.path, {"iteration": self.iteration, **info})

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        logits = self.model(x)
        prob = torch.sigmoid(logits)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        inter = (prob * y).sum((1, 2, 3))
        dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
        loss = bce + dice.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.iteration += 1
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, faces: np.ndarray) -> np.ndarray:
        self.model.eval()
        out = torch.sigmoid(self.model(to_input(faces, self.model.spec.resolution).to(self.device)))[:, 0].cpu().numpy()
        self.model.train()
        return out


def _batch(samples: XSegSamples, seed: int, iteration: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `iteration`: face k and its augmentation drawn from a generator seeded by (seed, iteration, k)."""
    def one(k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, iteration, k])
        return samples.sample(int(rng.integers(len(samples))), rng)

    pairs = [one(k) for k in range(size)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]).transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].copy())
    return x, y


def _preview(trainer: XSegTrainer, faces: list[np.ndarray], truths: list[np.ndarray | None]) -> np.ndarray:
    """Rows of face | predicted mask over it | truth (when known); BGR uint8."""
    masks = trainer.predict(np.stack(faces))
    rows = []
    for face, mask, truth in zip(faces, masks, truths):
        shade = face.copy()
        shade[..., 2] = np.clip(shade[..., 2] * 0.5 + mask * 0.5, 0, 1)
        shade[..., :2] *= (0.4 + 0.6 * mask[..., None])
        cols = [face, shade, np.repeat((truth if truth is not None else np.full_like(mask, 0.5))[..., None], 3, 2)]
        rows.append(np.concatenate(cols, 1))
    return (np.concatenate(rows, 0) * 255).round().clip(0, 255).astype(np.uint8)


def held_out_iou(trainer: XSegTrainer, held: XSegSamples | None) -> float | None:
    if held is None or not len(held):
        return None
    scores = []
    for i in range(0, len(held), 16):
        batch = [held.clean(k) for k in range(i, min(i + 16, len(held)))]
        pred = trainer.predict(np.stack([b[0] for b in batch]))
        scores += [iou(p, b[1]) for p, b in zip(pred, batch)]
    return float(np.mean(scores))


@job
def run_xseg_train(cfg: XSegTrainConfig, reporter: Reporter, stop: StopFlag) -> XSegTrainResult:
    """Train (or resume) a segmenter on the labelled faces of `faceset` (and `dst_faceset`).

    reporter: phase "training xseg ...", the loss per iteration, held-out IoU and a preview (face | predicted mask
    | truth, unlabelled faces first) every `preview_every`. stop: saves after the current iteration.
    Result: model path, iteration, labelled / held-out counts, held-out IoU, loss history.
    """
    labelled, unlabelled = labelled_faces(cfg.faceset, cfg.dst_faceset)
    if not labelled:
        raise ConfigError(f"faceset {cfg.faceset}: no face has include polygons; label some on the app's Face page "
                          "(Masks tab) or import DeepFaceLab faces that have them")
    device = pick_device(cfg.device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        trainer = XSegTrainer(cfg, reporter)
        return _train(cfg, trainer, labelled, unlabelled, reporter, stop)


def _train(cfg: XSegTrainConfig, trainer: XSegTrainer, labelled: list[Path], unlabelled: list[Path], reporter: Reporter,
           stop: StopFlag) -> XSegTrainResult:
    spec = trainer.model.spec
    train_paths, held_paths = _split(labelled, cfg.holdout, cfg.seed, trainer.saved_heldout)
    if not train_paths:
        raise ConfigError(f"faceset {cfg.faceset}: every labelled face is held out; label more faces or lower --holdout")
    aug = XSegAugment(cfg.random_warp, cfg.random_flip, cfg.random_color, cfg.random_blur, cfg.random_occluders)
    reporter.log(f"{len(labelled)} labelled face(s): {len(train_paths)} to train on, {len(held_paths)} held out for IoU; "
                 f"{len(unlabelled)} unlabelled")
    samples = XSegSamples(train_paths, spec.resolution, spec.face_type, aug)
    held = XSegSamples(held_paths, spec.resolution, spec.face_type, aug) if held_paths else None
    show = [XSegSamples([p], spec.resolution, spec.face_type, aug).clean(0)[0] for p in unlabelled[:3]]
    show_truth: list[np.ndarray | None] = [None] * len(show)
    for k in range(min(len(held_paths), 4 - len(show))) if held else ():
        face, truth = held.clean(k)
        show.append(face)
        show_truth.append(truth)
    result = XSegTrainResult(model_path=str(trainer.path), iteration=trainer.iteration, labelled=len(labelled),
                             held_out=len(held_paths))
    info = {"held_out": [p.name for p in held_paths], "labelled": len(labelled)}
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(trainer.logs_dir))
    reporter.start(cfg.iterations, f"training xseg {spec.resolution}px on {trainer.device.type}",
                   initial=min(trainer.iteration, cfg.iterations))
    pool = ThreadPoolExecutor(cfg.workers) if cfg.workers > 0 else None
    try:
        pending = pool.submit(_batch, samples, cfg.seed, trainer.iteration, cfg.batch_size) if pool else None
        while trainer.iteration < cfg.iterations:
            it = trainer.iteration
            x, y = pending.result() if pending else _batch(samples, cfg.seed, it, cfg.batch_size)
            if pool and it + 1 < cfg.iterations:  # the next batch is prepared while this one trains
                pending = pool.submit(_batch, samples, cfg.seed, it + 1, cfg.batch_size)
            loss = trainer.step(x.to(trainer.device), y.to(trainer.device))
            it = trainer.iteration
            result.history.append({"iteration": it, "loss": loss})
            reporter.advance(1, loss=loss)
            writer.add_scalar("xseg/loss", loss, it)
            if it % cfg.preview_every == 0 or it == cfg.iterations:
                result.iou = held_out_iou(trainer, held)
                if result.iou is not None:
                    writer.add_scalar("xseg/held_out_iou", result.iou, it)
                    result.history[-1]["iou"] = result.iou
                if show:
                    grid = _preview(trainer, show, show_truth)
                    result.preview_path = str(write_preview(grid, trainer.preview_path))
                    iou_text = f", held-out IoU {result.iou:.3f}" if result.iou is not None else ""
                    reporter.sample([result.preview_path], [f"iteration {it}{iou_text}: face | predicted mask | label"])
                    writer.add_image("xseg/preview", grid[..., ::-1].copy(), it, dataformats="HWC")
            if it % cfg.save_every == 0:
                trainer.save({**info, "iou": result.iou})
            if stop.is_set():
                result.stopped = True
                break
        if result.iou is None and held is not None:
            result.iou = held_out_iou(trainer, held)
        trainer.save({**info, "iou": result.iou})
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
        reporter.done("")
    result.iteration = trainer.iteration
    return result

