"""XSeg data both ways with DeepFaceLab (docs/face-swap.md#xseg-labels): `face export-dfl` writes DFLJPG files a
plain unpickler reads with DFL's keys and types, `face import-dfl` gives the same polygons, mask and landmarks
back, and `face train` says per faceset how many faces have XSeg masks."""
from __future__ import annotations

import base64
import pickle
import shutil
import struct

import cv2
import numpy as np
import pytest

from loratrain.cli import main
from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.config import ExportDflConfig
from loratrain.facetrain.demo_data import make_photos
from loratrain.facetrain.export_dfl import MAX_APP15, run_face_export_dfl
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.faceset import encode_mask, list_faces, load_face, read_meta, save_face, write_meta
from loratrain.facetrain.train.config import FaceTrainConfig
from loratrain.facetrain.train.trainer import run_face_train
from loratrain.facetrain.xseg.polys import EXCLUDE, INCLUDE, Poly, face_polys, set_face_polys


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dflx")
    make_photos(root / "photos", 3, 0, "src")
    run_face_extract(ExtractConfig(input=str(root / "photos"), output_dir=str(root / "faces"), image_size=96, max_faces=1),
                     RecordingReporter())
    assert len(list_faces(root / "faces")) == 3
    return root / "faces"


def _labelled_copy(extracted, folder):
    """The faceset with polygons on every face and an XSeg mask on the first; the last face as a PNG."""
    shutil.copytree(extracted, folder)
    faces = list_faces(folder)
    img, meta = load_face(faces[-1])
    faces[-1].unlink()
    save_face(faces[-1].with_suffix(".png"), img, meta)
    faces = list_faces(folder)
    for k, face in enumerate(faces):
        set_face_polys(face, [Poly(INCLUDE, [[10, 12.5], [80, 10], [85, 90], [12, 88]]),
                              Poly(EXCLUDE, [[40 + k, 40], [60, 42.25], [50, 60]])])
    mask = np.zeros((96, 96), np.uint8)
    cv2.ellipse(mask, (48, 52), (30, 40), 0, 0, 360, 255, -1)
    meta = read_meta(faces[0])
    meta.extra["xseg_mask"] = encode_mask(mask)
    write_meta(faces[0], meta)
    return faces, mask


def _segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of each JPEG header segment, read here independently of the code under test."""
    assert data[:2] == b"\xff\xd8"
    out, pos = [], 2
    while data[pos + 1] != 0xDA:
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((data[pos + 1], data[pos + 4:pos + 2 + length]))
        pos += 2 + length
    return out


def test_export_dfl_writes_dfls_dict_and_import_gives_it_back(extracted, tmp_path):
    faces, mask = _labelled_copy(extracted, tmp_path / "ours")
    out = tmp_path / "dfl"
    assert main(["face", "export-dfl", str(tmp_path / "ours"), str(out)]) == 0
    exported = sorted(out.iterdir())
    assert [p.name for p in exported] == sorted(f.stem + ".jpg" for f in faces)
    for face, dfl in zip(faces, exported):
        data = dfl.read_bytes()
        segs = _segments(data)
        markers = [m for m, _ in segs]
        assert markers[:2] == [0xE0, 0xEF] and segs[0][1].startswith(b"JFIF\0")  # APP15 right after the last APPn
        assert b"loratrain.face" not in data  # our comment is gone
        if face.suffix == ".jpg":  # the compressed image data is kept byte for byte
            original = face.read_bytes()
            assert data[data.index(b"\xff\xda"):] == original[original.index(b"\xff\xda"):]
        payload = dict(segs)[0xEF]
        assert b"numpy._core" not in payload  # numpy 1.x (DFL's) could not import it
        d = pickle.loads(payload)  # a plain unpickler, as DFL uses
        meta = read_meta(face)
        assert d["face_type"] == "whole_face" and isinstance(d["source_filename"], str)
        assert isinstance(d["source_rect"], tuple) and len(d["source_rect"]) == 4
        assert isinstance(d["eyebrows_expand_mod"], float)
        for key, shape in (("landmarks", (68, 2)), ("source_landmarks", (68, 2)), ("image_to_face_mat", (2, 3))):
            assert isinstance(d[key], np.ndarray) and d[key].shape == shape, key
        np.testing.assert_array_equal(d["landmarks"], meta.landmarks)
        polys = d["seg_ie_polys"]
        assert isinstance(polys, dict) and [p["type"] for p in polys["polys"]] == [1, 0]
        assert all(type(p["type"]) is int and p["pts"].dtype == np.float32 and p["pts"].shape[1] == 2 for p in polys["polys"])
        assert polys["polys"][0]["pts"].flags.writeable  # DFL's XSeg editor moves points in place
        if face == faces[0]:
            buf = d["xseg_mask"]  # what cv2.imencode gave DFL: an (N, 1) uint8 array of PNG bytes
            assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.shape[1] == 1 and buf.tobytes()[:4] == b"\x89PNG"
            np.testing.assert_array_equal(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), mask)
        else:
            assert "xseg_mask" not in d  # DFL leaves out what is None
    # and back: the same polygons, mask and landmarks
    assert main(["face", "import-dfl", str(out), str(tmp_path / "back")]) == 0
    for face, dfl in zip(faces, exported):
        before, after = read_meta(face), read_meta(tmp_path / "back" / dfl.name)
        assert face_polys(after) == face_polys(before)
        np.testing.assert_array_equal(after.landmarks_array(), before.landmarks_array())
        np.testing.assert_array_equal(np.asarray(after.image_to_face_mat), np.asarray(before.image_to_face_mat))
        if face == faces[0]:
            np.testing.assert_array_equal(after.xseg_mask(96), before.xseg_mask(96))
        else:
            assert after.xseg_mask(96) is None
        assert cv2.imread(str(tmp_path / "back" / dfl.name)).shape == (96, 96, 3)


def test_export_dfl_refuses_the_faceset_itself_and_existing_files(extracted, tmp_path, capsys):
    faces = tmp_path / "faces"
    shutil.copytree(extracted, faces)
    before = {p.name: p.read_bytes() for p in faces.iterdir()}
    assert main(["face", "export-dfl", str(faces), str(faces)]) == 2
    assert main(["face", "export-dfl", str(faces), str(faces / "dfl")]) == 2
    assert "output" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in faces.iterdir()} == before  # nothing written into the input
    out = tmp_path / "dfl"
    assert main(["face", "export-dfl", str(faces), str(out)]) == 0
    assert main(["face", "export-dfl", str(faces), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["face", "export-dfl", str(faces), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temp files left


def test_export_dfl_shrinks_a_mask_that_does_not_fit_one_app15_segment(extracted, tmp_path):
    folder = tmp_path / "ours"
    folder.mkdir()
    img, meta = load_face(list_faces(extracted)[0])
    noise = (np.random.default_rng(0).random((512, 512)) > 0.5).astype(np.uint8) * 255  # ~60 kB as PNG, also as JPEG q0
    meta.extra["xseg_mask"] = base64.b64encode(cv2.imencode(".png", noise)[1].tobytes()).decode()
    save_face(folder / "big.png", img, meta)  # a PNG face's metadata has room for it
    meta.extra["xseg_mask"] = base64.b64encode(b"not an image").decode()
    save_face(folder / "broken.jpg", img, meta)
    rec = RecordingReporter()
    result = run_face_export_dfl(ExportDflConfig(faceset=str(folder), output=str(tmp_path / "dfl")), rec)
    assert result.exported == 1 and result.with_masks == 1 and result.exit_code == 1
    assert len(result.refused) == 1 and "broken.jpg: its XSeg mask cannot be decoded" in result.refused[0]
    assert sorted(p.name for p in (tmp_path / "dfl").iterdir()) == ["big.jpg"]
    assert any("shrunk to 256x256" in line for line in rec.lines) and result.notes
    payload = dict(_segments((tmp_path / "dfl" / "big.jpg").read_bytes()))[0xEF]
    assert len(payload) <= MAX_APP15
    small = cv2.imdecode(pickle.loads(payload)["xseg_mask"], cv2.IMREAD_UNCHANGED)
    assert small.shape == (256, 256) and abs(small.mean() - noise.mean()) < 5


def test_face_train_says_how_many_faces_have_xseg_masks(extracted, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _labelled_copy(extracted, src)
    shutil.copytree(extracted, dst)
    rec = RecordingReporter()
    cfg = FaceTrainConfig(model_dir=str(tmp_path / "model"), src_faceset=str(src), dst_faceset=str(dst), archi="df",
                          resolution=32, ae_dims=16, e_dims=8, d_dims=8, batch_size=2, max_iters=1, preview_every=1,
                          save_every=1, workers=0, seed=0)
    run_face_train(cfg, rec)
    assert "src faceset: 1 of 3 faces have XSeg masks (the rest train on the landmark hull)" in rec.lines
    assert "dst faceset: 0 of 3 faces have XSeg masks (all train on the landmark hull)" in rec.lines
