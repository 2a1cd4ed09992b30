"""`loratrain demo`: a tiny SD1-shaped model, a two-concept synthetic dataset, a LoRA+LoCon run.

Everything goes through the real paths: the model is written as a single-file checkpoint and
loaded back, the dataset is kohya repeat folders with .txt captions, and the output is a kohya LoRA.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from .common.progress import Reporter, StopFlag
from .training.config import TrainConfig
from .training.trainer import TrainResult, train

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
    from .models.tiny import make_tiny_model, write_single_file

    model_path = write_single_file(make_tiny_model(family, seed=seed), root / "tiny_model.safetensors")
    data = root / "dataset"
    make_concept_images(data / "4_circle", "circle", 12, 64, seed)
    make_concept_images(data / "4_square", "square", 12, 64, seed + 1)
    prompts = root / "prompts.txt"
    prompts.write_text("circle, red circle, simple background --w 64 --h 64 --s 12 --d 1\n"
                       "square, blue square, simple background --w 64 --h 64 --s 12 --d 2\n", encoding="utf-8")
    return model_path, data, prompts


def run_demo(root: Path, steps: int = 300, reporter: Reporter | None = None, stop: StopFlag | None = None) -> TrainResult:
    root.mkdir(parents=True, exist_ok=True)
    model_path, data, prompts = prepare_demo(root)
    cfg = TrainConfig(pretrained_model_name_or_path=str(model_path), train_data_dir=str(data), resolution="64",
                      output_dir=str(root / "output"), output_name="demo_lora", network_module="locon", network_dim=8,
                      network_alpha=8.0, conv_dim=4, conv_alpha=4.0, learning_rate=2e-3, text_encoder_lr=5e-4,
                      train_batch_size=4, max_train_steps=steps, lr_scheduler="cosine", lr_warmup_steps=0.05,
                      save_every_n_steps=max(1, steps // 3), save_last_n_steps=2, sample_prompts=str(prompts),
                      sample_every_n_steps=max(1, steps // 2), sample_sampler="euler", seed=1)
    return train(cfg, reporter, stop)
