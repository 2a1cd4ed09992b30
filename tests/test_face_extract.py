"""Face extraction, alignment, faceset metadata, DFL import and sorting, on scikit-image's real photo."""
from __future__ import annotations

import dataclasses
import os
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from loratrain.cli import main
from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.demo_data import astronaut_bgr, make_photos
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.faceset import FacesetError, import_dfl_file, list_faces, load_face, make_meta, read_meta, save_face
from loratrain.facetrain.landmarks import FACE_TYPES, align_face, estimate_yaw_pitch, face_matrix, transform_points


@pytest.fixture(scope="module")
def faceset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faces")
    make_photos(root / "photos", 6, seed=0)
    res = run_face_extract(ExtractConfig(input=str(root / "photos"), output_dir=str(root / "aligned"), image_size=96), RecordingReporter())
    assert len(res.faces) >= 5
    return root / "aligned"


def test_extraction_finds_the_face_and_its_landmarks(tmp_path):
    cv2.imwrite(str(tmp_path / "astronaut.png"), astronaut_bgr())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    res = run_face_extract(ExtractConfig(input=str(tmp_path), output_dir=str(tmp_path / "out"), image_size=128), RecordingReporter())
    assert len(res.faces) == 1 and len(res.unreadable) == 1  # the shoulder patch (score ~0.1) is not a face
    meta = read_meta(res.faces[0])
    x0, y0, x1, y1 = meta.source_rect
    assert 150 < x0 < 200 and 50 < y0 < 100 and 240 < x1 < 290 and 140 < y1 < 190
    lm = np.asarray(meta.source_landmarks)
    eyes_y = lm[36:48, 1].mean()
    assert y0 < eyes_y < lm[48:68, 1].mean() < y1 + 10  # eyes above the mouth, inside the box
    assert meta.face_type == "wf" and np.asarray(meta.landmarks).max() < 128


@pytest.mark.parametrize("face_type", list(FACE_TYPES))
def test_alignment_round_trips(faceset, face_type):
    img, meta = load_face(list_faces(faceset)[0])
    src = np.asarray(meta.source_landmarks)
    mat = face_matrix(src, 256, face_type)
    back = transform_points(transform_points(src, mat), mat, invert=True)
    assert np.abs(back - src).max() < 1.0
    # the stored matrix and landmarks agree as well (after JSON rounding)
    stored = transform_points(meta.landmarks_array(), np.asarray(meta.image_to_face_mat), invert=True)
    assert np.abs(stored - src).max() < 1.0
    aligned, _ = align_face(astronaut_bgr(), src, 64, face_type)
    assert aligned.shape == (64, 64, 3)


def test_face_types_grow_outwards(faceset):
    src = np.asarray(read_meta(list_faces(faceset)[0]).source_landmarks)
    sides = [np.linalg.norm(transform_points(np.array([[0, 0], [100, 0]]), face_matrix(src, 100, ft), invert=True)[1]
                            - transform_points(np.array([[0, 0]]), face_matrix(src, 100, ft), invert=True)[0]) for ft in FACE_TYPES]
    assert sides == sorted(sides) and sides[0] < sides[-1] / 2


def test_metadata_round_trips_in_jpeg_and_png(tmp_path):
    rng = np.random.default_rng(0)
    lm = rng.uniform(0, 64, (68, 2))
    meta = make_meta("head", lm, "frame.png", (1.5, 2, 30, 40), lm * 3, np.array([[0.5, 0.1, 3], [-0.1, 0.5, 4]]))
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for ext in ("jpg", "png"):
        path = save_face(tmp_path / f"f.{ext}", img, meta)
        back, m2 = load_face(path)
        assert m2.face_type == "head" and m2.source_filename == "frame.png" and m2.source_rect == [1.5, 2, 30, 40]
        assert np.abs(m2.landmarks_array() - lm).max() < 1e-3
        assert back.shape == img.shape
    cv2.imwrite(str(tmp_path / "plain.jpg"), img)
    with pytest.raises(FacesetError, match="no loratrain.face metadata"):
        read_meta(tmp_path / "plain.jpg")


def _dfljpg(path: Path, payload: bytes) -> None:
    ok, jpg = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))
    jpg = jpg.tobytes()
    path.write_bytes(jpg[:2] + b"\xff\xef" + struct.pack(">H", len(payload) + 2) + payload + jpg[2:])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/loratrain_pwned",))


def test_dfl_import_accepts_plain_data_and_refuses_code(tmp_path, capsys):
    lm = np.random.default_rng(1).uniform(0, 32, (68, 2)).astype(np.float32)
    good = {"face_type": "whole_face", "landmarks": lm, "source_filename": "a.png", "source_rect": (1, 2, 3, 4),
            "source_landmarks": lm * 2, "image_to_face_mat": np.eye(2, 3), "eyebrows_expand_mod": 1.0}
    dfl = tmp_path / "dfl"
    dfl.mkdir()
    _dfljpg(dfl / "good.jpg", pickle.dumps(good))
    _dfljpg(dfl / "evil.jpg", pickle.dumps({"landmarks": _Evil()}))
    _dfljpg(dfl / "evil2.jpg", pickle.dumps({"landmarks": lm, "x": Path("/etc")}))
    assert main(["face", "import-dfl", str(dfl), str(tmp_path / "ours")]) == 1
    out = capsys.readouterr().out
    assert "imported 1" in out and "refused 2" in out and "posix.system" in out
    assert not Path("/tmp/loratrain_pwned").exists()
    meta = read_meta(tmp_path / "ours" / "good.jpg")
    assert meta.face_type == "wf" and np.abs(meta.landmarks_array() - lm).max() < 1e-3
    assert cv2.imread(str(tmp_path / "ours" / "good.jpg")).shape == (32, 32, 3)
    assert not (tmp_path / "ours" / "evil.jpg").exists()
    with pytest.raises(FacesetError):
        import_dfl_file(tmp_path / "ours" / "good.jpg", tmp_path / "again.jpg")  # ours has no APP15


def test_sort_by_yaw_and_identity(faceset, tmp_path):
    import shutil

    work = tmp_path / "set"
    shutil.copytree(faceset, work)
    names = sorted(p.name for p in list_faces(work))
    assert main(["face", "sort", str(work), "--by", "yaw"]) == 0
    files = list_faces(work)
    assert len(files) == len(names) and all(p.name[:6].rstrip("_").isdigit() for p in files)
    yaws = [estimate_yaw_pitch(read_meta(p).landmarks_array())[0] for p in files]
    assert yaws == sorted(yaws)
    assert main(["face", "sort", str(work), "--by", "blur"]) == 0  # re-sorting replaces the rank prefix (the order:
    assert sorted(p.name[6:] for p in list_faces(work)) == names  # test_sort_by_blur_pitch_and_hist)
    assert main(["face", "sort", str(work), "--by", "identity"]) == 0  # one person: nobody moves
    assert not (work / "_other").exists() and len(list_faces(work)) == len(names)


def _sorted_names(folder: Path) -> list[str]:
    """The faces' names without their rank prefix, in rank order."""
    files = list_faces(folder)
    assert all(p.name[:6].rstrip("_").isdigit() for p in files)
    return [p.name[6:] for p in files]


def test_sort_by_blur_pitch_and_hist(faceset, tmp_path):
    """Each sort key through the real CLI on faces built with a known answer: blurred copies, copies whose nose is
    moved (pitch), and two colour families (hist)."""
    img, meta = load_face(list_faces(faceset)[0])
    # blur: the sharpest first, the most blurred last (DFL's order); --descending reverses it
    blur = tmp_path / "blur"
    blur.mkdir()
    sigmas = {"c.png": 0.0, "a.png": 1.0, "d.png": 2.0, "b.png": 3.5}  # name -> Gaussian sigma of its copy
    for name, sigma in sigmas.items():
        save_face(blur / name, cv2.GaussianBlur(img, (0, 0), sigma) if sigma else img, meta)
    assert main(["face", "sort", str(blur), "--by", "blur"]) == 0
    assert _sorted_names(blur) == sorted(sigmas, key=sigmas.get) == ["c.png", "a.png", "d.png", "b.png"]
    assert main(["face", "sort", str(blur), "--by", "blur", "--descending"]) == 0
    assert _sorted_names(blur) == sorted(sigmas, key=sigmas.get, reverse=True)
    # pitch: the nose tip's height between the eye line and the mouth (the landmarks say it, not the pixels)
    pitch = tmp_path / "pitch"
    pitch.mkdir()
    lm = meta.landmarks_array()
    span = float(np.linalg.norm(lm[48:68].mean(0) - (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2))
    shifts = {"p1.png": 0.1, "p2.png": -0.15, "p3.png": 0.0, "p4.png": -0.05, "p5.png": 0.2}  # of the eye-mouth span
    for name, shift in shifts.items():
        moved = lm.copy()
        moved[30, 1] += shift * span
        save_face(pitch / name, img, dataclasses.replace(meta, landmarks=moved.tolist()))
    assert main(["face", "sort", str(pitch), "--by", "pitch"]) == 0
    order = _sorted_names(pitch)
    assert order == sorted(shifts, key=shifts.get)  # nose lower (head tipped down) sorts later
    pitches = [estimate_yaw_pitch(read_meta(p).landmarks_array())[1] for p in list_faces(pitch)]
    assert pitches == sorted(pitches) and pitches[-1] - pitches[0] > 0.3
    # hist: a chain of nearest colour histograms, so look-alikes sit together: two colour families, interleaved
    # by name, come out as two runs
    hist = tmp_path / "hist"
    hist.mkdir()
    for i in range(3):
        for family, gains in (("warm", (0.6, 0.8, 1.2)), ("cool", (1.25, 0.9, 0.55))):  # BGR gains
            tinted = np.clip(img.astype(np.float32) * np.array(gains) + 4 * i, 0, 255).astype(np.uint8)
            save_face(hist / f"{i}_{family}.png", tinted, meta)
    assert main(["face", "sort", str(hist), "--by", "hist"]) == 0
    families = [Path(n).stem.split("_")[1] for n in _sorted_names(hist)]
    assert sorted(families) == ["cool"] * 3 + ["warm"] * 3
    assert sum(a != b for a, b in zip(families, families[1:])) == 1, families  # one switch: two runs


def test_video_extraction(tmp_path, capsys):
    import imageio_ffmpeg

    frames = make_photos(tmp_path / "p", 4, seed=3)
    h, w = cv2.imread(str(frames[0])).shape[:2]
    h, w = h // 16 * 16, w // 16 * 16
    writer = imageio_ffmpeg.write_frames(str(tmp_path / "clip.mp4"), (w, h), fps=4, ffmpeg_log_level="error", quality=8)
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(f))[:h, :w], cv2.COLOR_BGR2RGB)).tobytes())
    writer.close()
    assert main(["face", "extract", str(tmp_path / "clip.mp4"), "--image_size", "64", "--quiet"]) == 0
    faces = list_faces(tmp_path / "clip_aligned")
    assert len(faces) >= 3 and "clip.mp4#000000" in {read_meta(p).source_filename for p in faces}
    assert "face(s) from 4 frame(s)" in capsys.readouterr().out


def test_identity_sort_moves_other_people(faceset, tmp_path):
    import shutil

    from skimage import data

    work = tmp_path / "set"
    shutil.copytree(faceset, work)
    img, meta = load_face(list_faces(work)[0])
    stranger = cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), img.shape[:2][::-1])  # not this person
    save_face(work / "zz_stranger.jpg", stranger, meta)
    n = len(list_faces(work))
    assert main(["face", "sort", str(work), "--by", "identity"]) == 0
    assert [p.name for p in (work / "_other").iterdir()] == ["zz_stranger.jpg"]
    assert len(list_faces(work)) == n - 1


def _onnx_constant_model(path: Path, input_name: str, input_shape: list[int], outputs: dict[str, np.ndarray]) -> None:
    """An ONNX graph that ignores its image (times zero) and returns fixed tensors: a stand-in with a real contract."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceSum", [input_name], ["s"], keepdims=0), helper.make_node("Mul", ["s", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.array(0, np.float32), "zero")]
    outs = []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), name + "_c"))
        nodes.append(helper.make_node("Add", [name + "_c", "z"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "stand_in", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
                              outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_onnx_detector_and_landmarker_plugins(tmp_path):
    from loratrain.facetrain.extract.plugins import DETECTORS, LANDMARKERS

    size = 64  # strides 8/16/32 -> 8x8, 4x4, 2x2 grids with 2 anchors each
    outs = {}
    for s in (8, 16, 32):
        n = (size // s) ** 2 * 2
        outs[f"score_{s}"] = np.zeros((n, 1))
        outs[f"bbox_{s}"] = np.ones((n, 4))
    anchor = (2 * 8 + 3) * 2  # grid x=3, y=2, first anchor: centre (24, 16)
    outs["score_8"][anchor] = 0.9
    outs["bbox_8"][anchor] = [1, 0.5, 2, 1.5]  # distances in stride units
    outs["score_8"][anchor + 1] = 0.8  # an overlapping duplicate, removed by NMS
    _onnx_constant_model(tmp_path / "scrfd.onnx", "input.1", [1, 3, size, size],
                         {k: outs[k] for k in ["score_8", "score_16", "score_32", "bbox_8", "bbox_16", "bbox_32"]})
    detect = DETECTORS.get("scrfd")(model_path=str(tmp_path / "scrfd.onnx"))
    boxes = detect(np.zeros((128, 128, 3), np.uint8))  # letterbox scale 0.5: boxes come back doubled
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0][:4], [(24 - 8) * 2, (16 - 4) * 2, (24 + 16) * 2, (16 + 12) * 2])
    assert boxes[0][4] == pytest.approx(0.9)

    heat = np.zeros((1, 68, 64, 64))
    peaks = np.random.default_rng(0).integers(8, 56, (68, 2))
    heat[0, np.arange(68), peaks[:, 1], peaks[:, 0]] = 1
    _onnx_constant_model(tmp_path / "fan.onnx", "input", [1, 3, 256, 256], {"heatmaps": heat})
    lm = LANDMARKERS.get("2dfan4")(model_path=str(tmp_path / "fan.onnx"))(np.zeros((300, 300, 3), np.uint8), (100, 100, 195, 195))
    # crop: the box (side 95) is scaled to 195 px around the crop centre 128; heatmap pixels are 4 crop pixels
    expected = (peaks * 4 - 128) / (195 / 95) + 147.5
    np.testing.assert_allclose(lm, expected, atol=1e-3)
    with pytest.raises(Exception, match="detector_model"):
        DETECTORS.get("scrfd")(model_path="")
