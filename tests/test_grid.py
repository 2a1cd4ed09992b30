"""XY(Z) grid on tiny models: parsing, loop order, layout, labels, metadata, seeds, LoRA weights, stop."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from loratrain.core.errors import ConfigError
from loratrain.core.lora.keys import lora_sites
from loratrain.core.models.families import FAMILIES
from loratrain.core.models.loading import load_model
from loratrain.core.models.tiny import make_tiny_model, write_single_file
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.core.safe_io import save_safetensors
from loratrain.core.tensor_io import LazySafetensors
from loratrain.grid.axes import parse_axis_values
from loratrain.grid.runner import GridConfig, run_grid


@pytest.mark.parametrize("axis,text,expected", [
    ("steps", "1-5", [1, 2, 3, 4, 5]),
    ("steps", "1-5 (+2)", [1, 3, 5]),
    ("seed", "10-1 (-3)", [10, 7, 4, 1]),
    ("steps", "1-10 [5]", [1, 3, 5, 7, 10]),
    ("cfg_scale", "0-1 [5]", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("cfg_scale", "1-2 (+0.5), 7", [1.0, 1.5, 2.0, 7.0]),
    ("sampler", 'euler_a, "ddim"', ["euler_a", "ddim"]),
])
def test_axis_values_parse_like_the_xyz_plot(axis, text, expected):
    assert parse_axis_values(axis, text)[1] == expected


@pytest.mark.parametrize("text", ["1-3 (+0.5)", "1.5-3", "1-2.5 [3]", "2.5"])
def test_integer_axes_refuse_fractions_instead_of_rounding(text):
    with pytest.raises(ConfigError, match="axis steps"):
        parse_axis_values("steps", text)


@pytest.fixture(scope="module")
def grid_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    a = write_single_file(make_tiny_model("sd1", seed=0), root / "a.safetensors")
    b = write_single_file(make_tiny_model("sd1", seed=1), root / "b.safetensors")
    with LazySafetensors(a) as f:
        sites = lora_sites({k: v.shape for k, v in f.tensors.items()}, FAMILIES["sd1"], f.metadata)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, site in sites.items():
        if site.kind == "attn" and not name.startswith("lora_unet_input") and not name.startswith("lora_unet_middle") \
                and not name.startswith("lora_unet_output") and len(site.shape) == 2:
            sd[f"{name}.lora_down.weight"] = torch.randn(4, site.shape[1], generator=g)
            sd[f"{name}.lora_up.weight"] = torch.randn(site.shape[0], 4, generator=g) * 0.5
            sd[f"{name}.alpha"] = torch.tensor(4.0)
    lora = root / "style.safetensors"
    save_safetensors(sd, lora)
    return {"a": a, "b": b, "lora": lora}


def base_cfg(models, out, **kw):
    cfg = dict(model=str(models["a"]), prompt="a red circle", negative_prompt="blurry", width=64, height=64, steps=2,
               seed=1234, sampler="ddim", output_dir=str(out))
    cfg.update(kw)
    return GridConfig(**cfg)


def counting_loader():
    calls = []

    def loader(path, **kw):
        calls.append(path)
        return load_model(path, **kw)
    return loader, calls


def pixels(path_or_img):
    img = Image.open(path_or_img) if not isinstance(path_or_img, Image.Image) else path_or_img
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_lora_weight_grid_with_checkpoint_z(grid_models, tmp_path):
    loader, calls = counting_loader()
    cfg = base_cfg(grid_models, tmp_path / "g", loras=[f"{grid_models['lora']}:1"], x_type="lora_weight", x_values="0,1",
                   y_type="steps", y_values="1-2", z_type="checkpoint", z_values=f"{grid_models['a']},{grid_models['b']}")
    res = run_grid(cfg, RecordingReporter(), loader=loader)
    assert res.complete and len(res.cells) == 8
    assert calls == [str(grid_models["a"]), str(grid_models["b"])]  # checkpoint outermost: one load each
    assert [p.name for p in res.grids] == ["xy_grid_z00.png", "xy_grid_z01.png", "xyz_grid.png"]

    grid = Image.open(res.grids[0])
    left, cell = 48, 64  # left pad = 3/4 of the cell width
    top = grid.height - 2 * cell
    assert grid.width == left + 2 * cell and top > 0
    arr = pixels(grid)
    assert (arr[:top, left:] < 128).any() and (arr[top:, :left] < 128).any()  # column and row labels drawn
    assert np.array_equal(arr[top:top + cell, left + cell:left + 2 * cell], pixels(res.cells[(1, 0, 0)]))

    meta = json.loads(grid.text["loratrain.grid"])
    assert meta["axes"]["x"]["values"] == [0.0, 1.0] and meta["axes"]["z"]["type"] == "checkpoint"
    assert meta["seed"] == 1234 and meta["base"]["prompt"] == "a red circle"
    assert "X Type: LoRA weight" in grid.text["parameters"] and "Seed: 1234" in grid.text["parameters"]
    cell_text = Image.open(res.cells[(1, 1, 1)]).text["parameters"]
    assert "Steps: 2" in cell_text and "Model: b" in cell_text and "AddNet Weight A 1: 1" in cell_text
    # each Z value's grid carries its own first cell's text (the ckB grid names model b, not a)
    z1 = Image.open(res.grids[1]).text["parameters"]
    assert "Model: b" in z1 and "Model: a" not in z1
    assert "Model: a" in grid.text["parameters"] and "Negative prompt: blurry" in grid.text["parameters"]

    weight0, weight1 = pixels(res.cells[(0, 0, 0)]), pixels(res.cells[(1, 0, 0)])
    assert np.abs(weight0 - weight1).mean() > 1.0  # the LoRA changes the image

    # the same seed gives the same cell again, and weight 0 equals the model without any LoRA
    plain = run_grid(base_cfg(grid_models, tmp_path / "plain", x_type="seed", x_values="1234", y_type="steps", y_values="1"),
                     RecordingReporter())
    no_negative = run_grid(base_cfg(grid_models, tmp_path / "noneg", x_type="seed", x_values="1234", y_type="steps", y_values="1",
                                    negative_prompt=""), RecordingReporter())
    assert "Negative prompt" not in Image.open(no_negative.cells[(0, 0, 0)]).text["parameters"]  # A1111 omits an empty one
    assert "Negative prompt" not in Image.open(no_negative.grids[0]).text["parameters"]
    assert np.array_equal(pixels(plain.cells[(0, 0, 0)]), weight0)
    again = run_grid(base_cfg(grid_models, tmp_path / "again", loras=[f"{grid_models['lora']}:1"], x_type="seed",
                              x_values="1234", y_type="steps", y_values="1"), RecordingReporter())
    assert np.array_equal(pixels(again.cells[(0, 0, 0)]), weight1)

    # LoRA block weights: all 26 blocks at 1 is the plain LoRA, the NONE preset switches it off
    all_ones = ",".join(["1"] * 26)
    blocks = run_grid(base_cfg(grid_models, tmp_path / "lbw", loras=[f"{grid_models['lora']}:1"], x_type="lora_blocks",
                               x_values=f'"{all_ones}",NONE', y_type="steps", y_values="1", draw_legend=False), RecordingReporter())
    assert np.array_equal(pixels(blocks.cells[(0, 0, 0)]), weight1)
    assert np.array_equal(pixels(blocks.cells[(1, 0, 0)]), weight0)
    assert Image.open(blocks.grids[0]).size == (128, 64)  # no legend: exactly the cells


def test_bad_values_fail_before_anything_is_generated(grid_models, tmp_path):
    def never(*a, **k):
        raise AssertionError("a model was loaded")

    cases = [
        (dict(x_type="steps", x_values="1,abc", y_type="seed", y_values="1"), "steps.*'abc'"),
        (dict(x_type="sampler", x_values="euler_a,nonsense", y_type="seed", y_values="1"), "nonsense"),
        (dict(x_type="checkpoint", x_values="missing.safetensors", y_type="seed", y_values="1"), "missing.safetensors"),
        (dict(x_type="prompt_sr", x_values="green,blue", y_type="seed", y_values="1"), "first value 'green'"),
        (dict(x_type="lora_weight", x_values="0,1", y_type="seed", y_values="1"), "needs a LoRA"),
        (dict(x_type="wobble", x_values="1", y_type="seed", y_values="1"), "unknown grid axis"),
    ]
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            run_grid(base_cfg(grid_models, tmp_path / "bad", **kw), RecordingReporter(), loader=never)
    assert not (tmp_path / "bad").exists()
    proc = subprocess.run([sys.executable, "-m", "loratrain", "grid", "--model", str(grid_models["a"]), "--prompt", "x",
                           "--x_type", "steps", "--x_values", "1-x", "--y_type", "seed", "--y_values", "1",
                           "--output_dir", str(tmp_path / "cli")], capture_output=True, text=True)
    assert proc.returncode == 2 and "axis steps" in proc.stderr


def test_stop_keeps_made_cells_and_writes_a_partial_grid(grid_models, tmp_path):
    stop = StopFlag()

    class StopAfterOne(RecordingReporter):
        def advance(self, n=1, **metrics):
            super().advance(n, **metrics)
            stop.set()

    cfg = base_cfg(grid_models, tmp_path / "p", x_type="prompt_sr", x_values="red,blue,green", y_type="steps", y_values="1")
    res = run_grid(cfg, StopAfterOne(), stop)
    assert not res.complete and list(res.cells) == [(0, 0, 0)]
    grid = Image.open(res.grids[0])
    assert grid.width == 48 + 3 * 64
    assert json.loads(grid.text["loratrain.grid"])["complete"] is False
    right_cell = pixels(grid)[-64:, -64:]
    assert (right_cell == 255).all()  # cells never made stay blank


@pytest.mark.slow
def test_sdxl_grid_over_our_trained_lora_in_both_layouts(tiny_files, dataset, tmp_path):
    """A LoRA the trainer wrote, in the kohya layout and in the PEFT layout, gives the same cell."""
    from loratrain.training.trainer import run_train

    from .conftest import quick_config

    result = run_train(quick_config(tiny_files["sdxl_file"], dataset, tmp_path / "out", save_peft_format=True,
                                learning_rate=5e-2, network_train_unet_only=True), RecordingReporter())
    kohya = result.lora_path
    peft = kohya.with_name(kohya.stem + ".peft.safetensors")
    assert peft.is_file()
    loader, calls = counting_loader()
    cfg = GridConfig(model=str(tiny_files["sdxl_file"]), prompt="a circle", width=64, height=64, steps=2, seed=7,
                     sampler="euler_a", loras=[f"{kohya}:1"], x_type="lora", x_values=f"{kohya},{peft}",
                     y_type="lora_weight", y_values="0,1", output_dir=str(tmp_path / "g"))
    res = run_grid(cfg, RecordingReporter(), loader=loader)
    assert len(calls) == 1 and res.complete
    assert np.array_equal(pixels(res.cells[(0, 1, 0)]), pixels(res.cells[(1, 1, 0)]))  # same LoRA, two layouts
    assert np.array_equal(pixels(res.cells[(0, 0, 0)]), pixels(res.cells[(1, 0, 0)]))  # weight 0: the base model
    assert np.abs(pixels(res.cells[(0, 0, 0)]) - pixels(res.cells[(0, 1, 0)])).mean() > 0.5


def test_color_drift_measures_the_cast_against_weight_zero(tmp_path):
    from loratrain.core.session import LoraUse
    from loratrain.grid.axes import CellParams
    from loratrain.grid.drift import lab, measure_drift, missing_references

    np.testing.assert_allclose(lab(np.array([[255, 255, 255]], np.uint8))[0], [100, 0, 0], atol=0.05)
    np.testing.assert_allclose(lab(np.array([[255, 0, 0]], np.uint8))[0], [53.24, 80.09, 67.20], atol=0.05)  # CIE values
    rng = np.random.default_rng(0)
    scene = rng.integers(60, 190, (64, 64, 3)).astype(np.float64)
    cells, done = {}, {}
    for i, (weight, tint) in enumerate(((0.0, (0, 0, 0)), (0.5, (4, 2, -3)), (1.0, (45, 15, -40)))):
        img = np.clip(scene + np.array(tint), 0, 255).astype(np.uint8)
        done[(i, 0, 0)] = tmp_path / f"{i}.png"
        Image.fromarray(img).save(done[(i, 0, 0)])
        cells[(i, 0, 0)] = CellParams("m.safetensors", "a cat", loras=[LoraUse("l.safetensors", weight)], seed=7)
    drift = {d.weight: d for d in measure_drift(cells, done, {}, 10.0, 0.3)}
    assert set(drift) == {0.5, 1.0} and all(d.reference == (0, 0, 0) for d in drift.values())  # weight 0 is the reference
    assert 0 < drift[0.5].delta_e < 10 and not drift[0.5].flagged
    assert drift[1.0].delta_e > 10 and drift[1.0].chroma_change > 0 and drift[1.0].flagged
    assert not missing_references(cells)
    other_seed = {(3, 0, 0): CellParams("m.safetensors", "a cat", loras=[LoraUse("l.safetensors", 1.0)], seed=8)}
    assert [p.seed for p in missing_references({**cells, **other_seed})] == [8]  # a reference is the same cell, seed included


def test_grid_writes_a_color_drift_report(grid_models, tmp_path):
    res = run_grid(base_cfg(grid_models, tmp_path / "g", loras=[f"{grid_models['lora']}:1"], x_type="lora_weight",
                            x_values="0.5,1", y_type="seed", y_values="1", color_drift="on", drift_delta_e=1e-9),
                   RecordingReporter())
    report = json.loads((tmp_path / "g" / "color_drift.json").read_text())
    assert [c["weight"] for c in report["cells"]] == [0.5, 1.0] and all(c["reference"] == [-1, -1, 0] for c in report["cells"])
    assert (tmp_path / "g" / "cells" / "reference_00.png").is_file() and all(c["flagged"] for c in report["cells"])
    assert res.summary()[0].startswith("colour drift (rule of thumb") and "2 of 2 LoRA cells drift" in res.summary()[0]
    auto = run_grid(base_cfg(grid_models, tmp_path / "a", loras=[f"{grid_models['lora']}:1"], x_type="lora_weight",
                             x_values="0.5,1", y_type="seed", y_values="1"), RecordingReporter())
    assert "no LoRA cell has a weight-0 twin" in auto.summary()[0] and not (tmp_path / "a" / "color_drift.json").exists()
    # a later grid in the same folder without drift numbers: the earlier grid's report does not stay beside it
    run_grid(base_cfg(grid_models, tmp_path / "g", loras=[f"{grid_models['lora']}:1"], x_type="lora_weight", x_values="0.5,1",
                      y_type="seed", y_values="1", color_drift="off"), RecordingReporter())
    assert not (tmp_path / "g" / "color_drift.json").exists()
