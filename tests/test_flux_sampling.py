"""FLUX.1 sample images (issue 25): samples written during training, `generate` with and without a LoRA, the grid's
guidance and LoRA-weight axes, all through the real CLI on the tiny FLUX/CLIP/T5/AE files of test_flux_train."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_flux_train import _args, flux_files  # noqa: F401,F811 - the module-scoped fixture of tiny FLUX files


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratrain", *args], capture_output=True, text=True, timeout=600)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _parts(files: dict[str, Path]) -> list[str]:
    return [a for n in ("clip_l", "t5xxl", "ae", "t5_tokenizer") for a in (f"--{n}", str(files[n]))] + \
        ["--apply_t5_attn_mask", "--t5xxl_max_token_length", "8"]


def _generate(files, out: Path, *extra: str) -> Path:
    res = _run("generate", "--model", str(files["model"]), "--prompt", "a photo of sks dog", "--width", "64",
               "--height", "64", "--steps", "3", "--seed", "7", "--output", str(out), *_parts(files), *extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_training_writes_flux_samples_and_generate_applies_the_lora(flux_files, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog --w 64 --h 64 --s 2 --d 11 --g 4.0\n# a comment\nsks dog circle --s 2 --n square --l 2\n")
    res = _run("train", *_args(flux_files, tmp_path / "o", "--sample_prompts", str(prompts), "--sample_every_n_steps", "4",
                               "--learning_rate", "5e-2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    samples = sorted((tmp_path / "o" / "sample").glob("*.png"))
    assert [p.name for p in samples] == ["f_000004_00_11.png", "f_000004_01_6.png"]  # second: seed = --seed 5 + index 1
    first = Image.open(samples[0])
    assert first.size == (64, 64)
    info = first.info["parameters"]
    assert "Distilled CFG Scale: 4" in info and "Steps: 2" in info and "Seed: 11" in info and "FLUX.1 dev" in info
    assert "Negative prompt: square" in Image.open(samples[1]).info["parameters"]

    lora = tmp_path / "o" / "f.safetensors"
    base = _pixels(_generate(flux_files, tmp_path / "base.png"))
    again = _pixels(_generate(flux_files, tmp_path / "again.png"))
    with_lora = _pixels(_generate(flux_files, tmp_path / "lora.png", "--network_weights", f"{lora}:1.0"))
    at_zero = _pixels(_generate(flux_files, tmp_path / "zero.png", "--network_weights", f"{lora}:0"))
    assert np.array_equal(base, again)  # same seed, same image
    assert np.array_equal(base, at_zero)  # weight 0 is the base model
    assert np.abs(base - with_lora).max() > 0  # the trained LoRA changes the image
    other_seed = _pixels(_generate(flux_files, tmp_path / "seed.png", "--seed", "8"))
    assert np.abs(base - other_seed).max() > 0

    grid = tmp_path / "grid"
    res = _run("grid", "--model", str(flux_files["model"]), "--prompt", "a photo of sks dog", "--width", "64", "--height",
               "64", "--steps", "2", "--seed", "3", "--loras", str(lora), "--x_type", "guidance", "--x_values", "1,5",
               "--y_type", "lora_weight", "--y_values", "0,1", "--output_dir", str(grid), "--color_drift", "off",
               *_parts(flux_files))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cells = {p.name: _pixels(p) for p in (grid / "cells").glob("*.png")}
    assert len(cells) == 4 and (grid / "xy_grid.png").is_file()
    assert np.abs(cells["z00_y00_x00.png"] - cells["z00_y00_x01.png"]).max() > 0  # guidance changes the image
    assert np.abs(cells["z00_y00_x00.png"] - cells["z00_y01_x00.png"]).max() > 0  # LoRA weight changes it
    assert "Distilled CFG Scale: 5" in Image.open(grid / "cells" / "z00_y00_x01.png").info["parameters"]


def test_flux_only_axes_are_refused_with_an_sd_model(tmp_path):
    from loratrain.core.errors import ConfigError
    from loratrain.grid.config import GridConfig
    from loratrain.grid.plan import plan_grid

    cfg = GridConfig.model_construct(prompt="x", x_type="guidance", x_values="1,2", y_type="seed", y_values="1,2")
    try:
        plan_grid(cfg, 0)
    except ConfigError as e:
        assert "guidance" in str(e) and "FLUX" in str(e)
    else:
        raise AssertionError("a guidance axis without a FLUX.1 model was accepted")


def test_flux_options_with_an_sd_model_are_named(flux_files, tmp_path):  # noqa: F811
    from loratrain.core.errors import ConfigError
    from loratrain.grid.config import GenerateConfig

    with pytest.raises(ConfigError) as e:  # the AE file exists and is no FLUX.1 transformer
        GenerateConfig.build({"model": str(flux_files["ae"]), "prompt": "x", "output": str(tmp_path / "x.png"),
                              "clip_l": str(flux_files["clip_l"]), "shift": 2.0}).check()
    assert [f for f, _ in e.value.problems] == ["clip_l", "shift"], e.value.problems
