"""XSeg end to end on faces with a known occluder: label 20 by their geometry, train the tiny segmenter on CPU,
reach IoU >= 0.9 on 20 faces it never saw, apply it (training then uses the masks), remove and undo.

The faces are the extracted test photos with a coloured bar or disc painted over part of each face; the truth
is the landmark hull minus the occluder, and the labels are that geometry as DFL-style polygons.
"""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from loratrain.cli import main
from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.demo_data import make_photos
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.faceset import list_faces, load_face, read_meta, save_face
from loratrain.facetrain.landmarks import hull_mask
from loratrain.facetrain.train.data import AugmentOptions, FaceSamples
from loratrain.facetrain.xseg.apply import run_xseg_apply, run_xseg_remove, run_xseg_undo
from loratrain.facetrain.xseg.config import XSegApplyConfig, XSegRemoveConfig, XSegTrainConfig, XSegUndoConfig
from loratrain.facetrain.xseg.data import XSegAugment, XSegSamples, iou
from loratrain.facetrain.xseg.model import XSegPredictor, load_xseg
from loratrain.facetrain.xseg.polys import EXCLUDE, INCLUDE, Poly, polys_mask, set_face_polys
from loratrain.facetrain.xseg.train import run_xseg_train

N_LABELLED, N_HELD = 20, 20


def _occluder(rng: np.random.Generator, hull: np.ndarray) -> np.ndarray:
    """Polygon of a bar or a disc over part of the face (inside the hull's box)."""
    ys, xs = np.nonzero(hull)
    cx, cy = rng.uniform(xs.min() + 5, xs.max() - 5), rng.uniform(ys.min() + 5, ys.max() - 5)
    side = xs.max() - xs.min()
    if rng.random() < 0.5:
        return cv2.boxPoints(((cx, cy), (side * rng.uniform(0.15, 0.25), side * rng.uniform(0.7, 1.1)),
                              rng.uniform(0, 180))).astype(np.float64)
    r = side * rng.uniform(0.15, 0.25)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


@pytest.fixture(scope="module")
def occluded(tmp_path_factory):
    """40 faces with a painted occluder each; returns (faceset, truth masks by name)."""
    root = tmp_path_factory.mktemp("xseg")
    make_photos(root / "photos", N_LABELLED + N_HELD + 4, seed=5)
    run_face_extract(ExtractConfig(input=str(root / "photos"), output_dir=str(root / "faces"), image_size=96, max_faces=1),
                     RecordingReporter())
    rng = np.random.default_rng(0)
    truths = {}
    faces = list_faces(root / "faces")
    assert len(faces) >= N_LABELLED + N_HELD
    for extra in faces[N_LABELLED + N_HELD:]:
        extra.unlink()
    faces = faces[:N_LABELLED + N_HELD]
    for k, path in enumerate(faces):
        img, meta = load_face(path)
        side = img.shape[0]
        hull = hull_mask((side, side), meta.landmarks_array(), meta.eyebrows_expand_mod)
        occ = _occluder(rng, hull)
        colour = [(30, 200, 40), (200, 60, 200), (20, 120, 240)][k % 3]
        cv2.fillPoly(img, [np.round(occ).astype(np.int32)], colour)
        save_face(path.with_suffix(".png"), img, meta)  # lossless, so the painted edge is where the label says
        path.unlink()
        include = cv2.findContours((hull > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
        polys = [Poly(INCLUDE, c[:, 0].astype(float).tolist()) for c in include] + [Poly(EXCLUDE, occ.tolist())]
        truths[path.with_suffix(".png").name] = polys_mask(polys, side)
        if k < N_LABELLED:
            set_face_polys(path.with_suffix(".png"), polys)
    return root / "faces", truths


def _cfg(faceset, model, **kw) -> XSegTrainConfig:
    base = dict(faceset=str(faceset), model=str(model), iterations=300, batch_size=8, lr=1e-3, resolution=64, base_channels=8,
                depth=4, holdout=2, preview_every=150, save_every=150, workers=1, device="cpu", seed=0)
    base.update(kw)
    return XSegTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(occluded, tmp_path_factory):
    model = tmp_path_factory.mktemp("xseg_model") / "xseg.safetensors"
    rec = RecordingReporter()
    result = run_xseg_train(_cfg(occluded[0], model), rec)
    return model, result, rec


def test_polygons_make_dfls_mask_includes_then_excludes():
    include = Poly(INCLUDE, [[2, 2], [17, 2], [17, 17], [2, 17]])
    exclude = Poly(EXCLUDE, [[5, 5], [10, 5], [10, 10], [5, 10]])
    a = polys_mask([exclude, include], 20)  # drawn in any order: excludes still cut the includes
    assert a[7, 7] == 0 and a[3, 3] == 1 and a[0, 0] == 0
    np.testing.assert_array_equal(a, polys_mask([include, exclude], 20))


def test_segmenter_reaches_iou_09_on_faces_it_never_saw(occluded, trained):
    faceset, truths = occluded
    model, result, rec = trained
    assert result.iteration == 300 and result.labelled == N_LABELLED and result.held_out == 2
    assert result.iou is not None and result.iou > 0.8
    names = sorted(truths)[N_LABELLED:]  # the 20 faces without labels
    predictor = XSegPredictor(model)
    faces = np.stack([load_face(faceset / n)[0].astype(np.float32) / 255 for n in names])
    pred = predictor(faces)
    scores = [iou(p, truths[n]) for p, n in zip(pred, names)]
    assert np.mean(scores) >= 0.9, scores
    # the occluder is left out: inside it the mask is (mostly) off, though it lies inside the hull
    assert rec.samples and result.preview_path
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])


def test_apply_writes_masks_that_training_uses_then_remove_and_undo(occluded, trained, tmp_path):
    faceset = tmp_path / "faces"
    shutil.copytree(occluded[0], faceset)
    model = trained[0]
    before = {p.name: p.read_bytes() for p in list_faces(faceset)}
    res = run_xseg_apply(XSegApplyConfig(faceset=str(faceset), model=str(model), device="cpu"))
    assert res.new == N_LABELLED + N_HELD and res.changed == 0
    name = sorted(occluded[1])[-1]  # an unlabelled face: its mask is the prediction
    meta = read_meta(faceset / name)
    assert meta.extra["xseg_source"] == "applied:xseg.safetensors"
    stored = meta.xseg_mask(96)
    assert iou(stored, occluded[1][name]) > 0.85
    # a labelled face keeps its hand-drawn mask
    labelled = sorted(occluded[1])[0]
    np.testing.assert_array_equal(read_meta(faceset / labelled).xseg_mask(96) > 0.5, occluded[1][labelled] > 0.5)
    # pixels untouched: only the metadata changed
    img, _ = load_face(faceset / name)
    ref = cv2.imdecode(np.frombuffer(before[name], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(img, ref)
    # face training takes the applied mask, not the landmark hull
    samples = FaceSamples(faceset, 32, read_meta(faceset / name).face_type, AugmentOptions())
    k = [p.name for p in samples.paths].index(name)
    train_mask = samples.sample(k, np.random.default_rng(0), augment=False)["mask"][..., 0]
    np.testing.assert_allclose(train_mask, cv2.resize(stored, (32, 32), interpolation=cv2.INTER_LINEAR), atol=1e-6)
    # a second apply changes nothing
    again = run_xseg_apply(XSegApplyConfig(faceset=str(faceset), model=str(model), device="cpu"))
    assert again.new == 0 and again.changed == 0 and again.unchanged == N_LABELLED + N_HELD
    # remove, then undo twice: back to the bytes before apply
    removed = run_xseg_remove(XSegRemoveConfig(faceset=str(faceset), only_applied=True))
    assert removed.removed == N_HELD  # the labelled faces' masks came from their labels
    assert read_meta(faceset / name).xseg_mask(96) is None
    run_xseg_undo(XSegUndoConfig(faceset=str(faceset)))
    assert read_meta(faceset / name).xseg_mask(96) is not None
    run_xseg_undo(XSegUndoConfig(faceset=str(faceset)))  # the second apply
    run_xseg_undo(XSegUndoConfig(faceset=str(faceset)))  # the first apply
    assert {p.name: p.read_bytes() for p in list_faces(faceset)} == before


def test_resume_continues_from_the_saved_iteration(occluded, tmp_path):
    model = tmp_path / "m.safetensors"
    first = run_xseg_train(_cfg(occluded[0], model, iterations=6, save_every=3, preview_every=3))
    assert first.iteration == 6
    _, info = load_xseg(model)
    assert info["iteration"] == 6 and len(info["held_out"]) == 2
    straight = tmp_path / "straight.safetensors"
    run_xseg_train(_cfg(occluded[0], straight, iterations=10, save_every=5, preview_every=5))
    rec = RecordingReporter()
    resumed = run_xseg_train(_cfg(occluded[0], model, iterations=10, save_every=5, preview_every=5), rec)
    assert resumed.iteration == 10 and any("resuming" in line for line in rec.lines)
    a, b = load_xseg(model)[0].state_dict(), load_xseg(straight)[0].state_dict()
    # the resumed run drew the same batches with the restored optimizer: the weights agree closely
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    backups = sorted((tmp_path / "backups").glob("m_*.safetensors"))
    assert 1 <= len(backups) <= 3


def test_cli_refuses_unlabelled_faceset_and_bad_journal(occluded, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in sorted(list_faces(occluded[0]))[N_LABELLED:N_LABELLED + 3]:
        shutil.copy(p, plain / p.name)
    code = main(["face", "xseg", "train", str(plain), str(tmp_path / "m.safetensors"), "--resolution", "64", "--depth", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "no face has include polygons" in err and not (tmp_path / "m.safetensors").exists()
    code = main(["face", "xseg", "train", str(plain), str(tmp_path / "m.safetensors"), "--resolution", "60", "--depth", "4"])
    assert code == 2 and "divisible" in capsys.readouterr().err
    # a planted journal naming a file outside the faceset is refused, nothing restored
    jdir = plain / ".loratrain" / "xseg"
    jdir.mkdir(parents=True)
    (jdir / "0-apply.json").write_text(json.dumps({"action": "apply", "faces": {"../x.png": {"xseg_mask": None}}}))
    code = main(["face", "xseg", "undo", str(plain)])
    assert code == 2 and "not a face of this faceset" in capsys.readouterr().err
    assert (jdir / "0-apply.json").exists()


def test_samples_keep_label_and_pixels_registered(occluded):
    """Warp, flip and occluders move the label with the image: the painted occluder's colour stays outside the mask."""
    faceset, truths = occluded
    paths = sorted(list_faces(faceset))[:N_LABELLED]
    samples = XSegSamples(paths, 64, "", XSegAugment(occluders=False, color=False, blur=False))
    for k in range(6):
        rng = np.random.default_rng(k)
        img, mask = samples.sample(k, rng)
        clean_img, clean_mask = samples.clean(k)
        assert abs(mask.mean() - clean_mask.mean()) < 0.12  # the same face area, moved
        green = (img[..., 1] > 0.6) & (img[..., 0] < 0.3) & (img[..., 2] < 0.3)  # the bar of face 0, 3, ...
        if green.sum() > 20:
            assert mask[green].mean() < 0.25
    torch.manual_seed(0)
