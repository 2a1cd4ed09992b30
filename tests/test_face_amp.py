"""DeepFaceLab's AMP model: training, the morph formula, .dfm export with morph_value, swap, growth, and reusing
parts of another model (SAEHD <-> AMP) at a first run."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.export import export_onnx, load_face_model
from loratrain.facetrain.grow import grow_model
from loratrain.facetrain.models.amp import AMP, morph_mix
from loratrain.facetrain.models.archi import ArchSpec, FaceModelConfig, build_model
from loratrain.facetrain.parts import transplant
from loratrain.facetrain.swap.predict import load_predictor
from loratrain.facetrain.train.config import FaceTrainConfig
from loratrain.facetrain.train.state import save_checkpoint
from loratrain.facetrain.train.trainer import run_face_train

from .conftest import extract_facesets

SIZES = dict(resolution=32, ae_dims=32, e_dims=8, d_dims=8, d_mask_dims=4)


@pytest.fixture(scope="module")
def facesets(tmp_path_factory):
    return extract_facesets(tmp_path_factory.mktemp("facesets"), 8)


def cfg_for(facesets, model_dir, **kw) -> FaceTrainConfig:
    base = dict(model_dir=str(model_dir), src_faceset=str(facesets[0]), dst_faceset=str(facesets[1]), archi="amp",
                batch_size=4, max_iters=20, preview_every=10, save_every=10, workers=0, seed=0, **SIZES)
    base.update(kw)
    return FaceTrainConfig(**base)


def _model(archi: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(FaceModelConfig(archi, **SIZES)).eval()


def _save(model, path):
    info = {"model": dataclasses.asdict(model.cfg), "iteration": 0, "options": {"face_type": "wf"}}
    save_checkpoint(path, path.with_name(path.stem + ".state.safetensors"),
                    {k: v.contiguous() for k, v in model.state_dict().items()}, info, {}, {"opt": {"scalars": {}}}, 0)
    return path


# ---------------------------------------------------------------- structure and the morph formula


def test_amp_structure_and_archi_string():
    model = _model("amp", 0)
    assert isinstance(model, AMP) and model.spec == ArchSpec("amp", u=True, d=True, t=True)
    assert model.inter_names == ("inter_src", "inter_dst") and model.decoder_names == ("decoder",)
    out = model.train_forward(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    assert out["swap"].shape == (2, 3, 32, 32) and out["dst_mask"].shape == (2, 1, 32, 32)
    assert out["src_code"].shape == (2, 32, 1, 1)  # ae_dims channels on an R/32 grid, as DFL's inters
    with pytest.raises(ValueError, match="no modifiers"):
        ArchSpec.parse("amp-ud")
    problems = dict(FaceTrainConfig(model_dir="m", src_faceset="s", dst_faceset="d", archi="amp", resolution=48).problems())
    assert "multiple of 32" in problems["resolution"]
    with pytest.raises(ValueError, match="morph_factor"):  # DFL's prompt allows 0.1 .. 0.5
        FaceTrainConfig(model_dir="m", archi="amp", morph_factor=0.9)


def test_morph_0_and_1_and_between_follow_dfls_formula():
    """DFL: swap code = first int(ae_dims * morph) channels of inter_src(dst), the rest of inter_dst(dst)."""
    model = _model("amp", 1)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        feat = model.encoder(x)
        code_s, code_d = model.inter_src(feat), model.inter_dst(feat)
        for morph in (0.0, 0.25, 0.33, 0.5, 0.9, 1.0):
            k = int(32 * np.float32(morph))
            want = model.decoder(torch.cat([code_s[:, :k], code_d[:, k:]], 1))
            got = model.swap(x, morph)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), morph
            assert torch.equal(got[2], model.decoder(code_d)[1])  # the dst mask: dst's own code
        assert torch.equal(model.swap(x, 0.0)[0], model.decoder(code_d)[0])  # morph 0: dst reconstructed
        assert torch.equal(model.swap(x, 1.0)[0], model.decoder(code_s)[0])  # morph 1: inter_src's code alone
        assert not torch.equal(model.swap(x, 0.0)[0], model.swap(x, 1.0)[0])
    assert torch.equal(morph_mix(code_s, code_d, torch.tensor([0.5])), torch.cat([code_s[:, :16], code_d[:, 16:]], 1))


def test_training_mixes_src_codes_channel_by_channel():
    """Each src code channel comes from inter_src with probability morph_factor, else from inter_dst (DFL)."""
    model = _model("amp", 2)
    model.morph_factor = 0.33
    src = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        feat = model.encoder(src)
        code_s, code_d = model.inter_src(feat), model.inter_dst(feat)
        torch.manual_seed(0)
        out = model.train_forward(src, torch.rand(2, 3, 32, 32))
    from_s = (out["src_code"] == code_s).all(dim=(2, 3))
    from_d = (out["src_code"] == code_d).all(dim=(2, 3))
    assert bool((from_s | from_d).all())
    assert abs(float(from_s.float().mean()) - 0.33) < 0.05


# ---------------------------------------------------------------- training, export, swap, growth


def test_amp_trains_exports_and_swaps(facesets, tmp_path):
    res = run_face_train(cfg_for(facesets, tmp_path / "m", max_iters=30, preview_every=30, save_every=30, lr=1e-3,
                                 morph_factor=0.4), RecordingReporter())
    loss = [h["src_loss"] + h["dst_loss"] for h in res.history]
    first, last = np.mean(loss[:10]), np.mean(loss[-10:])
    assert last < 0.85 * first, (first, last)  # ~0.68 on this seed
    assert "dst_background" in res.history[-1]  # DFL's weak dst background term is on
    assert res.preview_path.is_file() and cv2.imread(str(res.preview_path)).shape[1] == 5 * 32
    model, info = load_face_model(res.model_path)
    assert isinstance(model, AMP) and info["model"]["archi"] == "amp" and info["options"]["morph_factor"] == 0.4

    dfm = export_onnx(res.model_path, tmp_path / "amp.dfm")
    sess = ort.InferenceSession(str(dfm), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in sess.get_inputs()] == [("in_face:0", [32, 32, 3]), ("morph_value:0", [])]
    assert sess.get_inputs()[1].shape == [1]  # DFL's morph_value placeholder is shape (1,)
    assert [o.name for o in sess.get_outputs()] == ["out_celeb_face", "out_celeb_face_mask", "out_face_mask"]
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    onnx_pred, torch_pred = load_predictor(dfm, "cpu", 0.5), load_predictor(res.model_path, "cpu", 0.5)
    for morph in (0.0, 0.5, 1.0):
        got = sess.run(None, {"in_face:0": x, "morph_value:0": np.array([morph], np.float32)})
        with torch.no_grad():
            want = model.swap(torch.from_numpy(x).permute(0, 3, 1, 2), morph)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    # the swap path feeds --morph_value to both kinds of file alike
    for a, b in zip(onnx_pred.predict(x), torch_pred.predict(x)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    half = sess.run(None, {"in_face:0": x, "morph_value:0": np.array([0.5], np.float32)})
    np.testing.assert_allclose(onnx_pred.predict(x)[0], np.clip(half[0], 0, 1), atol=1e-6)

    grown = grow_model(res.model_path, 64)
    assert {k.rsplit(".", 1)[0] for k in grown.reinitialised} == {"encoder.dense", "inter_src.dense2", "inter_dst.dense2"}
    assert any(k.startswith("decoder.") for k in grown.kept) and any(k.startswith("encoder.body") for k in grown.kept)
    more = run_face_train(cfg_for(facesets, tmp_path / "m", max_iters=31, preview_every=31), RecordingReporter())
    assert more.iteration == 31 and cv2.imread(str(more.preview_path)).shape[1] == 5 * 64


# ---------------------------------------------------------------- reuse across models


def _equal(a: dict, b: dict, prefix_a: str, prefix_b: str) -> bool:
    keys = [k for k in a if k.startswith(prefix_a + ".")]
    return bool(keys) and all(torch.equal(a[k], b[prefix_b + k[len(prefix_a):]]) for k in keys)


def test_reuse_saehd_to_amp_and_back():
    df, amp = _model("df-udt", 3), _model("amp", 4)
    df_w = {k: v.clone() for k, v in df.state_dict().items()}
    amp_before = {k: v.clone() for k, v in amp.state_dict().items()}
    report = transplant(amp, df_w, "df-udt", ["encoder", "inter", "decoder"], "df.safetensors")
    w = amp.state_dict()
    assert _equal(w, df_w, "encoder.body", "encoder.body")
    assert _equal(w, df_w, "inter_src.dense2", "inter.dense2") and _equal(w, df_w, "inter_dst.dense2", "inter.dense2")
    assert _equal(w, df_w, "decoder", "decoder_src")  # the decoder the swap uses
    # AMP's encoder dense lives in DF's inter: named, and left exactly as it was
    assert report.not_copied == ["encoder.dense: no encoder.dense in the df-udt model"]
    assert torch.equal(w["encoder.dense.weight"], amp_before["encoder.dense.weight"])
    assert any("encoder.dense" in line for line in report.lines())

    back = _model("df-udt", 5)
    before = {k: v.clone() for k, v in back.state_dict().items()}
    report = transplant(back, {k: v.clone() for k, v in w.items()}, "amp", ["inter", "decoder"])
    b = back.state_dict()
    assert _equal(b, w, "decoder_src", "decoder") and _equal(b, w, "decoder_dst", "decoder")
    assert _equal(b, w, "inter.dense2", "inter_src.dense2")
    assert report.not_copied == ["inter.dense1: no inter_src.dense1 in the amp model"]
    assert torch.equal(b["inter.dense1.weight"], before["inter.dense1.weight"])
    assert _equal(b, before, "encoder", "encoder")  # not asked for: untouched


def test_reuse_names_every_layer_that_does_not_fit():
    liae, amp = _model("liae-ud", 6), _model("amp", 7)
    before = {k: v.clone() for k, v in amp.state_dict().items()}
    report = transplant(amp, {k: v.clone() for k, v in liae.state_dict().items()}, "liae-ud", ["encoder", "inter", "decoder"])
    after = amp.state_dict()
    copied = {layer for layers in report.copied.values() for layer in layers}
    named = {item.split(":")[0] for item in report.not_copied}
    layers = {k.rsplit(".", 1)[0] for k in after}
    assert copied | named == layers and not copied & named  # every layer either copied whole or named
    assert any("is [" in item and "here [" in item for item in report.not_copied)  # shape mismatches give both shapes
    assert "encoder.body.0.0" in copied  # the first Downscale has the same shape in both encoders
    for k in after:
        if k.rsplit(".", 1)[0] in named:
            assert torch.equal(after[k], before[k]), k


def test_init_from_at_first_run(facesets, tmp_path):
    src_path = _save(_model("df-udt", 8), tmp_path / "df.safetensors")
    cfg = cfg_for(facesets, tmp_path / "m", max_iters=1, lr=0.0, init_from=str(src_path), init_parts="decoder,inter")
    res = run_face_train(cfg, RecordingReporter())
    model, _ = load_face_model(res.model_path)
    df_w = load_face_model(src_path)[0].state_dict()
    w = model.state_dict()
    assert _equal(w, df_w, "decoder", "decoder_src") and _equal(w, df_w, "inter_dst.dense2", "inter.dense2")
    assert not _equal(w, df_w, "encoder.body", "encoder.body")  # not asked for
    assert "init_from df.safetensors (df-udt): copied inter_src (1 of 1 layers), inter_dst (1 of 1 layers), decoder " \
           "(22 of 22 layers)" in res.notes
    again = run_face_train(cfg.replace(max_iters=2), RecordingReporter())  # a resume never overwrites training
    assert any("init_from ignored" in n for n in again.notes)
    with pytest.raises(ConfigError, match="init_parts: head"):
        cfg.replace(init_parts="encoder,head")
