"""`loratrain demo`: a tiny SD1-shaped model, a two-concept synthetic dataset, a LoRA+LoCon run.

Everything goes through the real paths: the model is written as a single-file checkpoint and
loaded back, the dataset is kohya repeat folders with .txt captions, and the output is a kohya LoRA.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from loratrain.core.config import JobConfig, opt
from loratrain.core.jobs import JobResult, job
from loratrain.core.progress import Reporter, StopFlag

from .config import TrainConfig

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}


def make_concept_images(folder: Path, shape: str, n: int, size: int, seed: int) -> None:
    """Simple shapes with tag captions: enough structure for a LoRA to learn in a few hundred steps."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        color = rng.choice(list(COLORS))
        bg = tuple(rng.randint(200, 255) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
        img.save(folder / f"{shape}_{i:03d}.png")
        (folder / f"{shape}_{i:03d}.txt").write_text(f"{shape}, {color} {shape}, simple background", encoding="utf-8")


def prepare_demo(root: Path, family: str = "sd1", seed: int = 0) -> tuple[Path, Path, Path]:
    """The tiny model, the two-concept dataset and the prompt file under `root` (reused when already there)."""
    from loratrain.core.models.tiny import make_tiny_model, write_single_file

    model_path = root / "tiny_model.safetensors"
    if not model_path.is_file():
        write_single_file(make_tiny_model(family, seed=seed), model_path)
    data = root / "dataset"
    for folder, shape, offset in ((data / "4_circle", "circle", 0), (data / "4_square", "square", 1)):
        if not folder.is_dir():
            make_concept_images(folder, shape, 12, 64, seed + offset)
    prompts = root / "prompts.txt"
    if not prompts.is_file():
        prompts.write_text("circle, red circle, simple background --w 64 --h 64 --s 12 --d 1\n"
                           "square, blue square, simple background --w 64 --h 64 --s 12 --d 2\n", encoding="utf-8")
    return model_path, data, prompts


def demo_train_config(root: Path, steps: int = 300) -> TrainConfig:
    """A LoRA+LoCon run on the demo files that learns visibly in a few hundred CPU steps."""
    model_path, data, prompts = prepare_demo(root)
    return TrainConfig(pretrained_model_name_or_path=str(model_path), train_data_dir=str(data), resolution="64",
                       output_dir=str(root / "output"), output_name="demo_lora", network_module="locon", network_dim=8,
                       network_alpha=8.0, conv_dim=4, conv_alpha=4.0, learning_rate=2e-3, text_encoder_lr=5e-4,
                       train_batch_size=4, max_train_steps=steps, lr_scheduler="cosine", lr_warmup_steps=0.05,
                       save_every_n_steps=max(1, steps // 3), save_last_n_steps=2, sample_prompts=str(prompts),
                       sample_every_n_steps=max(1, steps // 2), sample_sampler="euler", seed=1)


class LoraDemoConfig(JobConfig):
    output_dir: str = opt("demo_output", "where the tiny model, the dataset and the training output are written", path="output")
    steps: int = opt(300, "optimizer steps", ge=1)


@dataclass
class LoraDemoResult(JobResult):
    root: Path
    train: Any  # the TrainResult

    def summary(self) -> list[str]:
        losses = self.train.losses
        first, last = losses[:20], losses[-20:]
        out = self.root / "output"
        lines = [f"loss: first 20 steps avg {sum(first) / max(1, len(first)):.4f} -> last 20 steps avg "
                 f"{sum(last) / max(1, len(last)):.4f}"] if losses else []
        return lines + [f"LoRA (kohya layout): {self.train.lora_path}", f"training state (resume): {self.train.state_dir}",
                        f"samples: {out / 'sample'}", f"TensorBoard logs: {out / 'logs'}  (tensorboard --logdir {out / 'logs'})"]


@job
def run_lora_demo(cfg: LoraDemoConfig, reporter: Reporter, stop: StopFlag) -> LoraDemoResult:
    """Build the demo files and train on them. Result: the training result and where everything is."""
    from .trainer import run_train

    root = Path(cfg.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # the demo folder is the demo's own (model, data and output rebuilt each time): a second demo replaces the first
    result = run_train(demo_train_config(root, cfg.steps).model_copy(update={"overwrite": True}), reporter, stop)
    return LoraDemoResult(root=root, train=result, stopped=result.stopped)
