"""XSeg in the swap path (DFL's mask modes 6-9) and the occlusion report: each XSeg mode is its formula, directly and
through the real frame path with a tiny random segmenter file; a mode without a segmenter is refused before any
work; the report lists the frame where something covers the face, and no other."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter
from loratrain.core.safe_io import save_safetensors
from loratrain.facetrain.demo_data import make_photos
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.faceset import list_faces, read_meta
from loratrain.facetrain.models.archi import FaceModelConfig, build_model
from loratrain.facetrain.swap.compose import MergeOptions, crop_hull, prepare
from loratrain.facetrain.swap.config import MASK_MODES, XSEG_MASK_MODES, SwapConfig
from loratrain.facetrain.swap.frame import FaceFinder, open_segmenter, predict_crops, swap_frame, to_work
from loratrain.facetrain.swap.masks import MASK_MODES as MASK_REGISTRY
from loratrain.facetrain.swap.masks import MaskInputs, face_mask, occluded_share
from loratrain.facetrain.swap.media import open_source
from loratrain.facetrain.swap.predict import load_predictor
from loratrain.facetrain.swap.run import run_face_swap
from loratrain.facetrain.train.state import CONFIG_KEY
from loratrain.facetrain.xseg.model import XSegNet, XSegPredictor, XSegSpec, save_xseg

COVERED = 2  # the frame whose lower face is painted over (after its face was extracted)


def _bar(lm: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): from the nose tip down past the chin, over the whole jaw width: roughly half the face."""
    return int(lm[:, 0].min()) - 4, int(lm[30, 1]), int(lm[:, 0].max()) + 4, int(lm[:, 1].max()) + 4


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Four still frames (PNG) with their faces extracted, an untrained 32-px face model, a random XSeg file, and
    frame COVERED painted black over its lower face once its landmarks are known (the dst faceset keeps them)."""
    root = tmp_path_factory.mktemp("xseg_swap")
    frames = root / "frames"
    frames.mkdir()
    for i, photo in enumerate(make_photos(root / "photos", 4, 3, "dst")):
        cv2.imwrite(str(frames / f"f{i}.png"), cv2.imread(str(photo)))
    run_face_extract(ExtractConfig(input=str(frames), output_dir=str(root / "faces"), image_size=64, max_faces=1),
                     RecordingReporter())
    metas = {Path(read_meta(p).source_filename).name: read_meta(p) for p in list_faces(root / "faces")}
    assert sorted(metas) == [f"f{i}.png" for i in range(4)]
    lm = np.asarray(metas[f"f{COVERED}.png"].source_landmarks)
    img = cv2.imread(str(frames / f"f{COVERED}.png"))
    x0, y0, x1, y1 = _bar(lm)
    img[y0:y1, x0:x1] = 0
    cv2.imwrite(str(frames / f"f{COVERED}.png"), img)

    spec = FaceModelConfig(archi="df", resolution=32, ae_dims=32, e_dims=8, d_dims=8, d_mask_dims=8)
    torch_model = build_model(spec)
    model = root / "face.safetensors"
    weights = {k: v.detach().contiguous() for k, v in torch_model.state_dict().items()}
    save_safetensors(weights, model, {CONFIG_KEY: json.dumps({"model": asdict(spec), "iteration": 0,
                                                              "options": {"face_type": "wf"}})})
    xseg = root / "xseg.safetensors"
    save_xseg(XSegNet(XSegSpec(resolution=32, base=4, depth=3)), xseg, {"iteration": 0})
    return {"root": root, "frames": frames, "faces": root / "faces", "model": model, "xseg": xseg, "bar": (x0, y0, x1, y1)}


def cfg_for(kit, output: Path | str = "", **kw) -> SwapConfig:
    base = dict(input=str(kit["frames"]), model=str(kit["model"]), output=str(output or kit["root"] / "unused"),
                dst_faceset=str(kit["faces"]), xseg_model=str(kit["xseg"]), smooth=False)
    return SwapConfig(**{**base, **kw})


def not_black(faces: np.ndarray) -> np.ndarray:
    """A stand-in segmenter that calls every pixel face except pure black (the painted-over part)."""
    return (faces.max(-1) > 0.04).astype(np.float32)


# ---------------------------------------------------------------- the formulas


def test_xseg_modes_are_their_formulas():
    r = 16
    yy, xx = np.mgrid[:r, :r] / r
    prd, dst = (xx * 0.9 + 0.05).astype(np.float32), (yy * 0.9 + 0.05).astype(np.float32)
    xp, xd = ((1 - xx) * 0.8 + 0.1).astype(np.float32), ((1 - yy) * 0.7 + 0.2).astype(np.float32)
    hull = np.zeros((r, r), np.float32)
    hull[4:12, 4:12] = 1
    inputs = MaskInputs(hull, prd, dst, xp, xd)
    expected = {"XSeg-prd": xp, "XSeg-dst": xd, "XSeg-prd*XSeg-dst": xp * xd,
                "learned-prd*learned-dst*XSeg-prd*XSeg-dst": prd * dst * xp * xd}
    assert set(expected) == set(XSEG_MASK_MODES)
    assert set(MASK_REGISTRY.names()) == set(MASK_MODES) | set(XSEG_MASK_MODES)  # config and registry agree
    for mode, want in expected.items():
        np.testing.assert_allclose(face_mask(mode, inputs), np.where(want < 1 / 255, 0, want), atol=1e-6, err_msg=mode)
    small = MaskInputs(hull, prd, dst, np.full((r, r), 0.5 / 255, np.float32), xd)
    assert face_mask("XSeg-prd", small).max() == 0  # under 1/255 is noise
    with pytest.raises(ConfigError, match="xseg_model"):
        face_mask("XSeg-dst", MaskInputs(hull, prd, dst))
    # the occluded share: the part of the hull the segmenter does not call face
    half = np.ones((r, r), np.float32)
    half[8:] = 0
    assert occluded_share(half, hull) == pytest.approx(0.5)
    assert occluded_share(np.ones((r, r), np.float32), hull) == 0.0
    assert occluded_share(half, np.zeros((r, r), np.float32)) == 0.0  # no face area: nothing to report


def test_xseg_modes_through_the_frame_path(kit):
    """swap_frame with a real (random) segmenter file: the merge mask of raw-predict is the mode's formula over
    the face model's and the segmenter's own outputs, computed here independently of the swap path."""
    source = open_source(str(kit["frames"]), 0)
    index, rgb = next(iter(source.frames(1, 2)))
    predictor = load_predictor(kit["model"], "cpu")
    r = predictor.resolution
    masks = XSegPredictor(kit["xseg"], "cpu")
    finder = FaceFinder(cfg_for(kit), source)
    crop = prepare(to_work(rgb), finder(index, rgb)[0], r, "wf")
    face, fmask, dmask = predictor.predict(crop.dst[None])
    xp, xd = masks(face)[0], masks(crop.dst[None])[0]
    seen = []
    for mode in XSEG_MASK_MODES:
        cfg = cfg_for(kit, mask_mode=mode, mode="raw-predict", device="cpu")
        want = {"XSeg-prd": xp, "XSeg-dst": xd, "XSeg-prd*XSeg-dst": xp * xd,
                "learned-prd*learned-dst*XSeg-prd*XSeg-dst": fmask[0, ..., 0] * dmask[0, ..., 0] * xp * xd}[mode]
        want = np.where(want < 1 / 255, 0, want)
        segmenter = open_segmenter(cfg)
        assert segmenter.on_prd == (mode != "XSeg-dst") and segmenter.on_dst  # XSeg-prd only where it is read
        out = swap_frame(index, rgb, finder, predictor, "wf", MergeOptions.of(cfg), False, segmenter=segmenter,
                         with_mask=True)
        assert out.faces == 1 and out.mask.shape == (r, r)
        np.testing.assert_allclose(out.mask, want, atol=1e-5, err_msg=mode)
        assert out.occluded == [pytest.approx(occluded_share(xd, crop_hull(crop, r)), abs=1e-6)]
        seen.append(out.mask)
    assert all(np.abs(a - b).max() > 1e-3 for i, a in enumerate(seen) for b in seen[i + 1:])  # four different masks
    # without a segmenter nothing is segmented and nothing measured
    plain = predict_crops(predictor, [crop])
    assert plain[0].xseg_prd is None and plain[0].xseg_dst is None
    assert open_segmenter(cfg_for(kit, xseg_model="")) is None


# ---------------------------------------------------------------- refused before work


def test_xseg_mode_without_a_segmenter_is_refused_before_work(kit, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["face", "swap", str(kit["frames"]), str(out), "--model", str(kit["model"]), "--quiet"]
    assert main([*args, "--mask_mode", "XSeg-prd*XSeg-dst"]) == 2
    err = capsys.readouterr().err
    assert "xseg_model" in err and "needs a segmenter" in err and "Traceback" not in err
    assert not out.exists()
    assert main([*args, "--mask_mode", "XSeg-dst", "--xseg_model", str(tmp_path / "missing.safetensors")]) == 2
    assert "xseg model file not found" in capsys.readouterr().err
    assert main([*args, "--xseg_model", str(kit["model"])]) == 2  # a face model is not a segmenter
    assert "not a loratrain XSeg model" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError, match="needs a segmenter"):
        run_face_swap(cfg_for(kit, out, xseg_model="", mask_mode="learned-prd*learned-dst*XSeg-prd*XSeg-dst"))


# ---------------------------------------------------------------- the occlusion report


def test_occlusion_report_lists_the_covered_frame(kit, tmp_path, monkeypatch):
    monkeypatch.setattr(XSegPredictor, "__call__", lambda self, faces: not_black(faces))
    res = run_face_swap(cfg_for(kit, tmp_path / "a"), RecordingReporter())
    assert res.faces == 4 and res.occlusion_threshold == 0.15
    assert [index for index, _ in res.occluded] == [COVERED]
    share = res.occluded[0][1]
    assert 0.25 < share < 0.75
    line = [x for x in res.summary() if x.startswith("XSeg")][0]
    assert "1 frame(s) with more than 15% of a face covered" in line and f"{COVERED} ({share:.0%})" in line
    # a threshold above the covered share: nothing listed; no segmenter: nothing measured
    high = run_face_swap(cfg_for(kit, tmp_path / "b", occlusion_threshold=0.9, end=3), RecordingReporter())
    assert high.occluded == [] and "XSeg: no frame with more than 90% of a face covered" in high.summary()
    plain = run_face_swap(cfg_for(kit, tmp_path / "c", xseg_model="", end=1), RecordingReporter())
    assert plain.occlusion_threshold is None and not [x for x in plain.summary() if x.startswith("XSeg")]
    # the XSeg-dst mode leaves what covers the face alone; the landmark hull pastes over it
    x0, y0, x1, y1 = kit["bar"]
    inner = (slice(y0 + 6, y1 - 6), slice(x0 + 6, x1 - 6))
    for mask_mode, covered in (("XSeg-dst", True), ("dst", False)):
        run_face_swap(cfg_for(kit, tmp_path / mask_mode, mask_mode=mask_mode, color_transfer_mode="none", start=COVERED,
                              end=COVERED + 1, visible_mark=False), RecordingReporter())
        got = cv2.imread(str(tmp_path / mask_mode / f"f{COVERED}.png"))
        assert (got[inner].mean() < 8) == covered, mask_mode  # (the 32-px mask's edge is soft: a mean, not a max)


def test_ui_preview_shows_the_mask(kit, monkeypatch):
    pytest.importorskip("gradio")
    from loratrain.ui.config import AppContext
    from loratrain.ui.pages.face import Page
    from loratrain.ui.workspace import Workspace

    monkeypatch.setattr(XSegPredictor, "__call__", lambda self, faces: not_black(faces))
    page = Page(AppContext(workspace=Workspace([kit["root"]]), runner=None))
    values = page.sections["Swap"].form.to_values({
        "input": str(kit["frames"]), "model": str(kit["model"]), "dst_faceset": str(kit["faces"]),
        "xseg_model": str(kit["xseg"]), "mask_mode": "XSeg-dst", "visible_mark": False})
    plain, _ = page.preview(COVERED, *values)
    image, note = page.show_preview(COVERED, True, *values)
    h, w = plain.shape[:2]
    assert image.shape == (h, w // 2 * 3, 3) and "of the face covered" in note
    np.testing.assert_array_equal(image[:, :w], plain)
    mask = image[:, w:, 0]
    assert (mask[..., None] == image[:, w:]).all()  # grey
    x0, y0, x1, y1 = kit["bar"]
    assert mask[y0 + 6:y1 - 6, x0 + 6:x1 - 6].mean() < 8  # the covered part is out of the mask (its edge is soft)
    assert mask[:y0].max() == 255  # the rest of the face is in it
