"""Face model training: colour transfer statistics, random warp, DF / LIAE learning, resume, safety nets, export."""
from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

import loratrain.facetrain.train.trainer as trainer_mod
from loratrain.cli import main
from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.augment import apply_warp, warp_params
from loratrain.facetrain.color import COLOR_TRANSFERS
from loratrain.facetrain.demo_data import astronaut_bgr
from loratrain.facetrain.export import export_onnx, load_face_model
from loratrain.facetrain.grow import grow_model
from loratrain.facetrain.models.archi import ArchSpec, FaceModelConfig, build_model
from loratrain.facetrain.train.config import FaceTrainConfig
from loratrain.facetrain.train.trainer import run_face_train

from .conftest import extract_facesets


@pytest.fixture(scope="module")
def facesets(tmp_path_factory):
    return extract_facesets(tmp_path_factory.mktemp("facesets"), 8)


def cfg_for(facesets, model_dir, **kw) -> FaceTrainConfig:
    base = dict(model_dir=str(model_dir), src_faceset=str(facesets[0]), dst_faceset=str(facesets[1]), archi="df", resolution=32,
                ae_dims=32, e_dims=8, d_dims=8, batch_size=4, max_iters=20, preview_every=10, save_every=10, workers=0, seed=0)
    base.update(kw)
    return FaceTrainConfig(**base)


# ---------------------------------------------------------------- colour transfer and augmentation


def _pair():
    a = cv2.resize(astronaut_bgr(), (96, 96)).astype(np.float32) / 255
    b = 0.15 + a * np.array([0.5, 0.7, 0.6], np.float32) + 0.1 * a[..., ::-1]  # re-lit, channels mixed, inside 0..1
    b = cv2.GaussianBlur(b.astype(np.float32), (5, 5), 0)
    return a, b


def _sliced_distance(x: np.ndarray, y: np.ndarray) -> float:
    rng = np.random.default_rng(9)
    dirs = rng.normal(size=(32, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    px, py = x.reshape(-1, 3) @ dirs.T, y.reshape(-1, 3) @ dirs.T
    return float(np.abs(np.sort(px, 0) - np.sort(py, 0)).mean())


def test_each_colour_transfer_matches_its_statistics():
    a, b = _pair()
    for name in ("lct", "mkl"):  # linear maps: mean and covariance of the reference, exactly
        out = COLOR_TRANSFERS.get(name)(a, b)
        np.testing.assert_allclose(out.reshape(-1, 3).mean(0), b.reshape(-1, 3).mean(0), atol=2e-3)
        np.testing.assert_allclose(np.cov(out.reshape(-1, 3), rowvar=False), np.cov(b.reshape(-1, 3), rowvar=False), atol=2e-3)
    out = COLOR_TRANSFERS.get("rct")(a, b)  # Reinhard: Lab mean and std per channel
    lab_o, lab_b = (cv2.cvtColor(x, cv2.COLOR_BGR2LAB).reshape(-1, 3) for x in (out, b))
    np.testing.assert_allclose(lab_o.mean(0), lab_b.mean(0), atol=1.0)
    np.testing.assert_allclose(lab_o.std(0), lab_b.std(0), atol=1.0)
    before = _sliced_distance(a, b)
    for name, kw in (("idt", {}), ("sot", {"regularize": False})):  # the colour distributions move most of the way
        out = COLOR_TRANSFERS.get(name)(a, b, rng=np.random.default_rng(0), **kw)
        assert _sliced_distance(out, b) < 0.5 * before, name
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    smooth = COLOR_TRANSFERS.get("sot")(a, b, rng=np.random.default_rng(0))  # DFL's spatially blurred displacement
    assert _sliced_distance(smooth, b) < 0.8 * before


def test_random_warp_keeps_content_in_place_on_average():
    rng = np.random.default_rng(0)
    size = 64
    ident = np.broadcast_to(np.arange(size, dtype=np.float32), (size, size))
    dx = np.zeros((size, size))
    mag = []
    for _ in range(400):
        p = warp_params(size, rng)
        dx += p.mapx - ident
        mag.append(np.abs(p.mapx - ident).mean())
    assert np.abs(dx / 400).max() < 0.5 < np.mean(mag)  # each warp moves pixels, the average does not
    img = cv2.resize(astronaut_bgr(), (size, size)).astype(np.float32) / 255
    p = warp_params(size, rng, flip=False)
    no_warp = apply_warp(img, p, random_warp=False)
    mask = apply_warp(np.ones((size, size, 1), np.float32), p, random_warp=False, is_mask=True)
    assert no_warp.shape == img.shape and mask.shape == (size, size, 1)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("archi", ["df", "liae", "df-udtc", "liae-ud"])
def test_archi_shapes(archi):
    spec = ArchSpec.parse(archi)
    res = 64
    model = build_model(FaceModelConfig(archi, res, 32, 8, 8, 4))
    out = model.train_forward(torch.rand(2, 3, res, res), torch.rand(2, 3, res, res))
    assert out["swap"].shape == (2, 3, res, res) and out["dst_mask"].shape == (2, 1, res, res)
    assert (spec.kind == "liae") == hasattr(model, "inter_AB")
    with pytest.raises(ValueError):
        ArchSpec.parse("df-x")


@pytest.mark.slow
@pytest.mark.parametrize("archi", ["df", "liae"])
def test_tiny_models_learn(facesets, tmp_path, archi):
    res = run_face_train(cfg_for(facesets, tmp_path / archi, archi=archi, max_iters=150, preview_every=150, save_every=150,
                              lr=5e-4), RecordingReporter())
    loss = [h["src_loss"] + h["dst_loss"] for h in res.history]
    first, last = np.mean(loss[:10]), np.mean(loss[-10:])
    assert last < 0.6 * first, (archi, first, last)
    assert res.preview_path.is_file() and cv2.imread(str(res.preview_path)).shape[1] == 5 * 32
    assert "likeness" in res.history[-1] and 0 < res.history[-1]["likeness"] < 2


def test_resume_backups_and_freeze(facesets, tmp_path):
    cfg = cfg_for(facesets, tmp_path / "m", max_iters=20, keep_backups=2)
    first = run_face_train(cfg, RecordingReporter())
    assert first.iteration == 20
    enc_before = {k: v.clone() for k, v in load_face_model(first.model_path)[0].encoder.state_dict().items()}
    res = run_face_train(cfg.replace(max_iters=40, freeze_encoder=True), RecordingReporter())
    assert res.iteration == 40 and res.history[0]["iteration"] == 21
    assert not any("start fresh" in n for n in res.notes)
    enc_after = load_face_model(res.model_path)[0].encoder.state_dict()
    assert all(torch.equal(enc_before[k], enc_after[k]) for k in enc_before)
    backups = sorted(p.name for p in (tmp_path / "m" / "backups").glob("face_0*.safetensors"))
    assert backups == ["face_0000030.safetensors", "face_0000040.safetensors"]  # rotating, newest two
    with safe_open(str(res.model_path), framework="pt") as f:
        assert '"iteration": 40' in f.metadata()["loratrain.face_model"]


def test_nan_guard_keeps_last_save(facesets, tmp_path, monkeypatch):
    cfg = cfg_for(facesets, tmp_path / "m", max_iters=30)
    real = trainer_mod.generator_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, logs, per_sample = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 15 else loss), logs, per_sample

    monkeypatch.setattr(trainer_mod, "generator_loss", poisoned)
    with pytest.raises(FloatingPointError, match="iteration 15"):
        run_face_train(cfg, RecordingReporter())
    model, info = load_face_model(tmp_path / "m" / "face.safetensors")
    assert info["iteration"] == 10 and all(torch.isfinite(p).all() for p in model.parameters())


def test_pretrain_then_train_resets_inter(facesets, tmp_path):
    pre = run_face_train(cfg_for(facesets, tmp_path / "m", pretrain=True, dst_faceset="", max_iters=10), RecordingReporter())
    # a mode that implies settings says which it changed (DeepFaceLab's pretrain turns random_warp off, yaw on, ...)
    assert "pretrain sets random_warp = False (was True), as DeepFaceLab's pretraining does" in pre.notes
    assert any(n.startswith("pretrain sets uniform_yaw = True") for n in pre.notes)
    before = load_face_model(pre.model_path)[0]
    res = run_face_train(cfg_for(facesets, tmp_path / "m", max_iters=5), RecordingReporter())
    assert any("re-initialised" in n for n in res.notes) and res.iteration == 5
    after = load_face_model(res.model_path)[0]
    # decoders carry over (5 small steps move a weight by a few 1e-3 at most); the inter is re-initialised (moves ~1e-1)
    dec = (before.decoder_src.out[0].weight - after.decoder_src.out[0].weight).abs()
    inter = (before.inter.dense1.weight - after.inter.dense1.weight).abs()
    assert dec.max() < 1e-2 < inter.mean(), (dec.max(), inter.mean())


def test_all_saehd_options_together(facesets, tmp_path):
    cfg = cfg_for(facesets, tmp_path / "m", archi="df-ud", max_iters=6, gan_power=0.1, true_face_power=0.01,
                  face_style_power=10, bg_style_power=5, eyes_mouth_prio=True, blur_out_mask=True, uniform_yaw=True,
                  lr_dropout=True, clipgrad=True, ct_mode="sot", random_hsv_power=0.05, random_src_flip=True,
                  optimizer="adamw", gradient_accumulation_steps=2, precision="bf16", channels_last=True)
    res = run_face_train(cfg, RecordingReporter())
    keys = set(res.history[-1])
    assert {"gan", "gan_d", "true_face", "code_d", "face_style", "bg_style"} <= keys
    assert all(np.isfinite(v) for h in res.history for v in h.values())
    assert any("GPU setting" in n for n in res.notes)
    again = run_face_train(cfg.replace(max_iters=8), RecordingReporter())  # discriminator states resume too
    assert again.iteration == 8 and not any("start fresh" in n for n in again.notes)


def test_export_and_grow(facesets, tmp_path):
    res = run_face_train(cfg_for(facesets, tmp_path / "m", archi="liae-ud", max_iters=4), RecordingReporter())
    onnx_path = export_onnx(res.model_path, tmp_path / "face.dfm")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "in_face:0"
    assert [o.name for o in sess.get_outputs()] == ["out_celeb_face", "out_celeb_face_mask", "out_face_mask"]
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    got = sess.run(None, {"in_face:0": x})
    model, _ = load_face_model(res.model_path)
    want = model.swap(torch.from_numpy(x).permute(0, 3, 1, 2))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.permute(0, 2, 3, 1).detach().numpy(), atol=1e-4)

    grown = grow_model(res.model_path, 64)
    assert all("dense" in k for k in grown.reinitialised) and any(k.startswith("decoder.") for k in grown.kept)
    model64, info = load_face_model(res.model_path)
    assert info["model"]["resolution"] == 64 and info["grown_from"] == 32
    assert torch.equal(model64.decoder.ups[0][0].weight, model.decoder.ups[0][0].weight)
    more = run_face_train(cfg_for(facesets, tmp_path / "m", archi="liae-ud", max_iters=6), RecordingReporter())
    assert more.iteration == 6 and cv2.imread(str(more.preview_path)).shape[1] == 5 * 64


def test_face_train_cli(facesets, tmp_path, capsys):
    d = tmp_path / "cli"
    assert main(["face", "train", str(d), "--src_faceset", str(facesets[0]), "--dst_faceset", str(facesets[1]), "--archi", "liae",
                 "--resolution", "32", "--ae_dims", "32", "--e_dims", "8", "--d_dims", "8", "--batch_size", "2", "--max_iters", "3",
                 "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "consent" in out and "iteration 3" in out and (d / "face.safetensors").is_file() and (d / "logs").is_dir()
    assert main(["face", "train", str(d), "--src_faceset", str(facesets[0]), "--dst_faceset", str(facesets[1]),
                 "--archi", "liae", "--true_face_power", "0.1"]) == 2  # DF only
    assert main(["face", "train", str(tmp_path / "x"), "--src_faceset", str(tmp_path / "none"), "--dst_faceset",
                 str(facesets[1]), "--resolution", "32", "--ae_dims", "32", "--e_dims", "8", "--d_dims", "8"]) == 2
    assert "none" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_works_without_the_optional_extras():
    """A base install (no OpenCV, dlib, onnxruntime, onnx, scikit-image) still parses every command, and the
    face and tagger commands say what to install instead of failing on an import."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('cv2', 'dlib', 'onnxruntime', 'onnx', 'skimage'): sys.modules[m] = None\n"
            "from loratrain.cli import build_parser, main\n"
            "build_parser()\n"
            "assert main(['face', 'extract', 'x']) == 2\n"
            "assert main(['face', 'train', 'm', '--src_faceset', 'a', '--dst_faceset', 'b']) == 2\n"
            "assert main(['demo', 'face']) == 2\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("pip install 'loratrain[face]'") == 3


def test_ct_mode_names_match_the_registry():
    from loratrain.facetrain.train.config import CT_MODES

    assert sorted(CT_MODES) == COLOR_TRANSFERS.names()


def test_adabelief_is_dfls_and_lr_dropout_updates_a_third():
    from loratrain.facetrain.optim import AdaBelief, LrDropout

    p = torch.nn.Parameter(torch.zeros(10000))
    g = torch.linspace(-1, 1, 10000)
    opt = AdaBelief([p], lr=0.01)
    p.grad = g.clone()
    opt.step()
    m = 0.1 * g
    v = 0.001 * (g - m) ** 2
    torch.testing.assert_close(p.detach(), -0.01 * m / (v.sqrt() + 1e-6))  # no bias correction, as in DFL

    q = torch.nn.Parameter(torch.zeros(10000))
    drop = LrDropout([q])
    sgd = torch.optim.SGD([q], lr=1.0)
    q.grad = torch.ones(10000)
    drop.before_step()
    sgd.step()
    drop.after_step()
    assert 0.27 < (q != 0).float().mean().item() < 0.33
    assert drop.lr_scale(0) == 1.0 and drop.lr_scale(250) == pytest.approx(0.0)
