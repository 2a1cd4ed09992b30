"""Finer control of face training (issue 22): colour-transfer strength and the random mode, per-part freezes,
face grow's lock, AdamW weight decay, the lr schedule, likeness warnings, held-out faces, validation and early
stopping. Most checks drive a FaceTrainer on synthetic batches (no faceset needed); the ones about data and
the loop run the real trainer on the tiny extracted facesets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import loratrain.facetrain.train.data as data_mod
from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.facetrain.demo_data import make_photos
from loratrain.facetrain.export import load_face_model
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.grow import grow_model
from loratrain.facetrain.optim import OPTIMIZERS
from loratrain.facetrain.train.config import FaceTrainConfig
from loratrain.facetrain.train.control import LikenessWatcher, main_part_names, schedule_scale
from loratrain.facetrain.train.data import CT_RANDOM_MODES, AugmentOptions, FaceSamples
from loratrain.facetrain.train.trainer import FaceTrainer, _train, run_face_train
from loratrain.facetrain.train.validation import held_out_count, hold_out
from loratrain.facetrain.train.watchers import Watcher

from .test_face_train import cfg_for


@pytest.fixture(scope="module")
def facesets(tmp_path_factory):
    """Eight extracted faces each of src and dst (offline, as tests/test_face_train.py makes them)."""
    root = tmp_path_factory.mktemp("facesets")
    for look, seed in (("src", 0), ("dst", 1)):
        make_photos(root / f"{look}_photos", 8, seed, look)
        run_face_extract(ExtractConfig(input=str(root / f"{look}_photos"), output_dir=str(root / look), image_size=96,
                                       max_faces=1), RecordingReporter())
    return root / "src", root / "dst"


TINY = dict(resolution=32, ae_dims=16, e_dims=4, d_dims=4, batch_size=2, workers=0, seed=0, max_iters=10)


def tiny_cfg(tmp_path, **kw) -> FaceTrainConfig:
    return FaceTrainConfig(**{"model_dir": str(tmp_path / "m"), "src_faceset": "s", "dst_faceset": "d", "archi": "df",
                              **TINY, **kw})


def synthetic(n: int = 2, res: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"input": torch.rand(n, 3, res, res, generator=g), "target": torch.rand(n, 3, res, res, generator=g),
               "mask": torch.ones(n, 1, res, res), "em": torch.zeros(n, 1, res, res), "index": torch.arange(n)}


def steps(trainer: FaceTrainer, n: int = 2) -> None:
    s, d = synthetic(seed=1), synthetic(seed=2)
    for _ in range(n):
        trainer.step(s, d)


# ---------------------------------------------------------------- colour transfer strength and the random mode


def test_ct_power_mixes_and_random_rotates_modes(facesets, monkeypatch):
    dst = FaceSamples(facesets[1], 32, "wf", AugmentOptions())

    def src(**kw):
        return FaceSamples(facesets[0], 32, "wf", AugmentOptions(**kw), ct_reference=dst)

    def draw(samples, seed=5):
        return samples.sample(0, np.random.default_rng(seed))

    none, off, full = draw(src(ct_mode="none")), draw(src(ct_mode="rct", ct_power=0)), draw(src(ct_mode="rct"))
    for k in ("input", "target"):  # power 0 is no transfer at all (not even a random draw), power 1 the mode's output
        np.testing.assert_array_equal(off[k], none[k])
    assert np.abs(full["target"] - none["target"]).mean() > 0.01
    img = src().face(0)[0]
    moved = src(ct_mode="rct")._recolour(img, np.random.default_rng(3))
    half = src(ct_mode="rct", ct_power=0.5)._recolour(img, np.random.default_rng(3))
    np.testing.assert_allclose(half, img + 0.5 * (moved - img), atol=1e-6)
    np.testing.assert_array_equal(src(ct_mode="rct", ct_power=1)._recolour(img, np.random.default_rng(3)), moved)

    used = []
    real = data_mod.color_transfer
    monkeypatch.setattr(data_mod, "color_transfer", lambda mode, *a, **k: used.append(mode) or real("rct", *a, **k))
    rnd = src(ct_mode="random")
    for seed in range(40):
        rnd._recolour(img, np.random.default_rng(seed))
    assert set(used) == set(CT_RANDOM_MODES) == {"rct", "lct", "mkl", "idt", "sot"}  # uniform per sample
    first = list(used)
    used.clear()
    for seed in range(40):
        rnd._recolour(img, np.random.default_rng(seed))
    assert used == first  # seeded: the same samples get the same modes
    assert FaceTrainConfig(ct_mode="random", ct_power=0.5).ct_power == 0.5
    with pytest.raises(ConfigError, match="ct_power"):
        FaceTrainConfig(ct_power=1.5)


# ---------------------------------------------------------------- per-part freezes


def _moved(before: dict, trainer: FaceTrainer) -> set[str]:
    after = trainer.model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("archi, parts", [
    ("df", ["encoder", "encoder.body.0", "encoder.body.3", "inter", "decoder_src", "decoder_dst", "decoder_mask",
            "decoder_src.res", "inter.dense1"]),
    ("liae", ["inter_AB", "inter_B", "decoder", "decoder_mask", "encoder.body.1"]),
])
def test_each_frozen_part_stays_still(tmp_path, archi, parts):
    for part in parts:
        trainer = FaceTrainer(tiny_cfg(tmp_path, archi=archi, freeze_parts=part, lr=1e-3), RecordingReporter())
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        steps(trainer, 1)
        moved = _moved(before, trainer)
        if part == "decoder_mask":
            held = {k for k in before if ".upms." in k or ".out_mask." in k}
        else:
            held = {k for k in before if k.startswith(part + ".")}
        assert held and not held & moved, (part, held & moved)
        assert moved, part  # the rest trains


def test_src_to_src_pass_trains_inter_ab_alone(tmp_path):
    """The recipe's src-to-src lighting pass (LIAE): train AB only, not B, not the shared decoder or encoder."""
    trainer = FaceTrainer(tiny_cfg(tmp_path, archi="liae", freeze_parts="encoder, inter_B, decoder", lr=1e-3),
                          RecordingReporter())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    steps(trainer)
    assert {k.split(".")[0] for k in _moved(before, trainer)} == {"inter_AB"}
    assert {n.split(".")[0] for n, _ in trainer.named} == {"inter_AB"}


def test_unknown_or_foreign_part_names_are_refused_before_work(facesets, tmp_path, capsys):
    problems = dict(FaceTrainConfig(archi="liae", freeze_parts="decoder_src").problems())
    assert "'decoder_src' is not a part of this LIAE model" in problems["freeze_parts"]
    assert "inter_AB" in problems["freeze_parts"]  # the message lists the model's parts
    assert "freeze_parts" in dict(FaceTrainConfig(archi="df", freeze_parts="inter_AB").problems())
    assert "freeze_parts" in dict(FaceTrainConfig(archi="df", freeze_parts="encoder,bogus").problems())
    assert not FaceTrainConfig(archi="df-ud", freeze_parts="encoder.body.2, decoder_dst,decoder_mask").problems()
    # the saved model's archi decides, not the options' (archi is a first-run option)
    run_face_train(tiny_cfg(tmp_path, src_faceset=str(facesets[0]), dst_faceset=str(facesets[1]), max_iters=1,
                            preview_every=1), RecordingReporter())
    cfg = FaceTrainConfig(model_dir=str(tmp_path / "m"), archi="liae", freeze_parts="decoder_dst")
    assert not cfg.problems()
    assert main(["face", "train", str(tmp_path / "x"), "--src_faceset", str(facesets[0]), "--dst_faceset",
                 str(facesets[1]), "--archi", "liae", "--freeze_parts", "inter"]) == 2
    assert "'inter' is not a part of this LIAE model" in capsys.readouterr().err
    model = FaceTrainer(tiny_cfg(tmp_path / "n", archi="liae"), RecordingReporter()).model
    assert {"inter_AB", "inter_B", "decoder", "encoder.body.0", "decoder_mask"} <= set(main_part_names(model))


def test_existing_freeze_flags_still_work(tmp_path):
    trainer = FaceTrainer(tiny_cfg(tmp_path, freeze_inter=True, freeze_decoder_mask=True, lr=1e-3), RecordingReporter())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    steps(trainer)
    moved = _moved(before, trainer)
    assert not {k for k in moved if k.startswith("inter.") or ".upms." in k or ".out_mask." in k}
    assert any(k.startswith("encoder.") for k in moved)


# ---------------------------------------------------------------- face grow: fresh layers, lock of the old ones


def test_grow_locks_old_layers_then_unlocks_and_refuses_freezing_fresh_ones(facesets, tmp_path):
    base = dict(archi="liae", max_iters=2, preview_every=100, save_every=100, lr=1e-3, ae_dims=16, e_dims=4, d_dims=4,
                batch_size=2)
    first = run_face_train(cfg_for(facesets, tmp_path / "m", **base), RecordingReporter())
    grown = grow_model(first.model_path, 64, lock_old_iters=2)
    fresh = set(grown.reinitialised)
    assert fresh and all(".dense" in k for k in fresh)
    # a fresh layer frozen before it trained would stay random: refused (freeze_inter covers the re-initialised dense)
    with pytest.raises(ConfigError, match="re-initialised"):
        run_face_train(cfg_for(facesets, tmp_path / "m", **{**base, "max_iters": 4, "freeze_inter": True}), RecordingReporter())
    w0 = load_face_model(first.model_path)[0].state_dict()
    rep = RecordingReporter()
    locked = run_face_train(cfg_for(facesets, tmp_path / "m", **{**base, "max_iters": 4}), rep)
    w1 = load_face_model(locked.model_path)[0].state_dict()
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed and changed <= fresh  # iterations 3-4: only the re-initialised layers moved
    assert any("stay locked until iteration 4" in line for line in rep.lines)
    rep = RecordingReporter()
    free = run_face_train(cfg_for(facesets, tmp_path / "m", **{**base, "max_iters": 6}), rep)
    w2 = load_face_model(free.model_path)[0].state_dict()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if k not in fresh)  # unlocked after N
    assert not load_face_model(free.model_path)[1]["watchers"].get("grow_lock")  # done: nothing left in the info


# ---------------------------------------------------------------- weight decay and the lr schedule


def test_adamw_weight_decay_follows_the_formula_and_others_refuse_it(tmp_path):
    for wd, want in ((None, 0.01), (0.1, 0.1), (0.0, 0.0)):
        p = torch.nn.Parameter(torch.full((5,), 2.0))
        opt = OPTIMIZERS.get("adamw")([p], 0.5, weight_decay=wd)
        p.grad = torch.zeros(5)
        opt.step()  # zero gradient: Adam's step is 0/(0+eps) = 0, so only the decoupled decay p *= 1 - lr*wd acts
        torch.testing.assert_close(p.detach(), torch.full((5,), 2.0 * (1 - 0.5 * want)))
    trainer = FaceTrainer(tiny_cfg(tmp_path, optimizer="adamw", weight_decay=0.05), RecordingReporter())
    assert trainer.opt.param_groups[0]["weight_decay"] == 0.05
    assert dict(FaceTrainConfig(optimizer="adabelief", weight_decay=0.1).problems())["weight_decay"].startswith(
        "optimizer adabelief has no weight decay")
    assert "weight_decay" in dict(FaceTrainConfig(optimizer="rmsprop", weight_decay=0.01).problems())
    assert not FaceTrainConfig(optimizer="adabelief", weight_decay=0).problems()


def test_cosine_schedule_with_warmup_matches_the_formula(tmp_path):
    trainer = FaceTrainer(tiny_cfg(tmp_path, lr=1e-3, lr_schedule="cosine", lr_warmup_iters=10, max_iters=110),
                          RecordingReporter())
    for it in (0, 4, 9):
        assert trainer.lr_at(it) == pytest.approx(1e-3 * (it + 1) / 10)
    for it in (10, 35, 60, 109, 110, 500):
        t = min(1.0, (it - 10) / 100)
        assert trainer.lr_at(it) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * t)))
    assert trainer.lr_at(60) == pytest.approx(5e-4)
    steps(trainer, 3)
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(3e-4)  # the update after 2 steps used lr_at(2)
    assert schedule_scale(50, "constant", 0, 100) == 1.0 and schedule_scale(2, "constant", 4, 100) == 0.75
    assert "lr_warmup_iters" in dict(FaceTrainConfig(lr_schedule="cosine", lr_warmup_iters=100, max_iters=100).problems())


# ---------------------------------------------------------------- likeness


def test_likeness_is_plotted_and_a_worsening_streak_warns():
    rep = RecordingReporter()
    w = LikenessWatcher(rep, patience=2)

    class T:
        iteration = 0

    for i, score in enumerate([1.0, 0.8, 0.85, 0.9, 0.7, 0.75, 0.76, 0.9, 0.95], 1):
        T.iteration = i * 10
        w.after_preview(T, score, {})
    assert [m["likeness"] for m in rep.metrics] == [1.0, 0.8, 0.85, 0.9, 0.7, 0.75, 0.76, 0.9, 0.95]
    warns = [line for line in rep.lines if line.startswith("warning: likeness")]
    assert len(warns) == 3  # after 0.85, 0.9 (2 worse than 0.8); after 0.75, 0.76; after 0.9, 0.95 (4 worse than 0.7)
    assert "best 0.8000 (iteration 20)" in warns[0] and "best 0.7000 (iteration 50)" in warns[1]
    again = LikenessWatcher(rep, patience=2)
    again.restore(w.state())
    assert (again.best, again.best_at, again.worse) == (0.7, 50, 4)
    again.restore({"best": "x", "worse": -3})  # from a file: checked
    assert again.best is None and again.worse == 0
    assert not LikenessWatcher(RecordingReporter(), 0).after_preview(T, None, {})


# ---------------------------------------------------------------- held-out faces, validation, early stopping


class Spy(Watcher):
    """Records every face file the training data path decodes once training has started."""

    def __init__(self, monkeypatch):
        self.loaded: list[str] = []
        self.on = False
        for name in ("face", "face_and_mask"):
            real = getattr(FaceSamples, name)

            def wrapped(samples, index, _real=real):
                if self.on:
                    self.loaded.append(samples.paths[index].name)
                return _real(samples, index)
            monkeypatch.setattr(FaceSamples, name, wrapped)

    def start(self, trainer, result, writer):
        self.held = {side: [p.name for p in s.paths] for side, s in trainer.held_out.items()}
        self.train_names = {p.name for p in trainer.src.paths} | {p.name for p in trainer.dst.paths}
        self.on = True


def test_held_out_faces_are_never_drawn_and_validation_is_logged(facesets, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    rep = RecordingReporter()
    cfg = cfg_for(facesets, tmp_path / "m", max_iters=8, validation_faces=2, validation_every=4, uniform_yaw=True,
                  ct_mode="rct", preview_every=100, save_every=100, ae_dims=16, e_dims=4, d_dims=4)
    res = _train(cfg, rep, StopFlag(), [spy])
    assert len(spy.held["src"]) == len(spy.held["dst"]) == 2
    held = set(spy.held["src"]) | set(spy.held["dst"])
    assert len(spy.loaded) >= 8 * 4 and not held & set(spy.loaded)  # drawn faces and colour references alike
    assert not held & spy.train_names
    vals = [m for m in rep.metrics if "val_loss" in m]
    assert [m["step"] for m in vals] == [4, 8]
    assert all(m["val_loss"] == pytest.approx(m["val_src"] + m["val_dst"]) for m in vals)
    assert [h["iteration"] for h in res.history if "val_loss" in h] == [4, 8]
    # a resume holds out the same faces (seeded over sorted names)
    spy2 = Spy(monkeypatch)
    _train(cfg.replace(max_iters=9), RecordingReporter(), StopFlag(), [spy2])
    assert spy2.held == spy.held


def test_held_out_counts_and_shares(facesets):
    src = FaceSamples(facesets[0], 32, "wf", AugmentOptions())
    cfg = FaceTrainConfig(validation_faces=0.25, seed=3)
    train, _, held = hold_out(cfg, src, src)  # one faceset on both sides (pretraining): the same faces held out
    assert len(held["src"]) == 2 and held["src"].paths == held["dst"].paths  # a quarter of 8 faces
    assert sorted(train.paths + held["src"].paths) == src.paths and not set(train.paths) & set(held["src"].paths)
    assert held_out_count(3, 8) == 3 and held_out_count(0.01, 8) == 1 and held_out_count(0, 8) == 0
    with pytest.raises(ConfigError, match="at least one must remain"):
        hold_out(cfg.replace(validation_faces=8), src, src)
    assert "validation_faces" in dict(FaceTrainConfig(validation_faces=2.5).problems())


def test_early_stopping_ends_the_run_with_its_reason(facesets, tmp_path):
    # lr 0: the validation loss cannot improve, so the second check ends the run (patience 1)
    cfg = cfg_for(facesets, tmp_path / "m", max_iters=50, lr=0.0, validation_faces=2, validation_every=2,
                  early_stopping_patience=1, preview_every=100, save_every=100, ae_dims=16, e_dims=4, d_dims=4)
    rep = RecordingReporter()
    res = run_face_train(cfg, rep)
    assert res.iteration == 4 and res.ended_by.startswith("early stopping: the validation loss")
    assert "for 1 checks" in res.ended_by and any("early stopping" in line for line in rep.lines)
    _, info = load_face_model(res.model_path)
    assert info["iteration"] == 4 and info["watchers"]["validation"]["best_at"] == 2
    assert "early_stopping_patience" in dict(FaceTrainConfig(early_stopping_patience=3).problems())


def test_options_reach_the_cli_and_the_form(facesets, tmp_path):
    from loratrain.facetrain.config import GrowConfig

    props = FaceTrainConfig.model_json_schema()["properties"]
    for name in ("ct_power", "freeze_parts", "weight_decay", "likeness_patience", "validation_faces",
                 "validation_every", "early_stopping_patience", "lr_schedule", "lr_warmup_iters"):
        assert props[name]["group"] == "finer control", name
    assert "random" in props["ct_mode"]["choices"]
    assert GrowConfig(model="m.safetensors", resolution=64, lock_old_iters=5).lock_old_iters == 5
    first = run_face_train(tiny_cfg(tmp_path, src_faceset=str(facesets[0]), dst_faceset=str(facesets[1]), max_iters=1,
                                    preview_every=1), RecordingReporter())
    assert main(["face", "grow", str(first.model_path), "--resolution", "64", "--lock_old_iters", "3"]) == 0
    state = load_face_model(first.model_path)[1]["watchers"]["grow_lock"]
    assert state["grown_at"] == 1 and state["until"] == 4
    # a cosine schedule's lr is a metric too (the Face page's lr plot)
    rep = RecordingReporter()
    run_face_train(tiny_cfg(tmp_path, src_faceset=str(facesets[0]), dst_faceset=str(facesets[1]), max_iters=4,
                            preview_every=20, lr_schedule="cosine", lr=1e-3), rep)
    lrs = [m["lr"] for m in rep.metrics if "lr" in m]
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * (i - 1) / 4)) for i in (2, 4)])


def test_float_options_of_every_group_must_be_finite(tmp_path, capsys):
    """`ge=0` lets inf through; every float option of the control, diagnosis, distillation and AMP groups must be
    finite, and a huge one is "too large", never echoed as a 300-digit number (CLI: one line, exit 2)."""
    from loratrain.facetrain.train.config import GROUPS

    floats = [name for group in GROUPS for name, f in group.model_fields.items()
              if name in group.__annotations__ and "float" in str(f.annotation)]
    assert {"weight_decay", "validation_faces", "distill_weight", "hard_sample_power", "morph_factor"} <= set(floats)
    for name in floats:
        for value, says in ((math.inf, "finite"), (math.nan, "finite"), (1e300, "too large")):
            try:  # an option with an upper bound refuses it as it is built; the rest in problems()
                problems = dict(FaceTrainConfig(optimizer="adamw", **{name: value}).problems())
            except ConfigError as e:
                assert name in str(e)
                continue
            assert says in problems.get(name, ""), (name, value, problems)
    for flag, value, says in (("--weight_decay", "inf", "must be a finite number"), ("--validation_faces", "1e300", "too large")):
        assert main(["face", "train", str(tmp_path / "m"), "--src_faceset", str(tmp_path), "--dst_faceset", str(tmp_path),
                     "--optimizer", "adamw", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1 and "0" * 20 not in err
