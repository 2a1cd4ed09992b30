"""5-point alignment, the ArcFace-style recogniser over a user's ONNX file, and `--recognizer` for identity in sort and
swap; on real extracted landmarks and tiny ONNX graphs the tests build themselves (nothing is downloaded)."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.facetrain.faceset import list_faces, load_face, read_meta, save_face
from loratrain.facetrain.swapper.align import TEMPLATES, align_crop, five_points, points_in, similarity_matrix, template
from loratrain.facetrain.swapper.recognizer import Recognizer, RecognizerIdentity, normed


# ---- tiny ONNX graphs ------------------------------------------------------------------------------------------
def _save(path: Path, nodes: list, inits: dict[str, np.ndarray], in_shape: list, out_name: str, out_shape: list) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_recognizer(path: Path, batch: int | str = "N", size: int = 112, dim: int = 512, seed: int = 0) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: ArcFace's I/O (N x 3 x 112 x 112 -> N x dim), random."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["input.1", "w", "b"], ["c"], strides=[4, 4], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["embedding"], transB=1)]
    inits = {"w": rng.normal(0, 0.3, (8, 3, 3, 3)), "b": rng.normal(0, 0.1, 8), "fc": rng.normal(0, 0.5, (dim, 8)),
             "fb": np.zeros(dim)}
    return _save(path, nodes, inits, [batch, 3, size, size], "embedding", [batch, dim])


def channel_means(path: Path) -> Path:
    """N x 3 x 112 x 112 -> N x 3: the mean of each input channel, so a test reads exactly what the model was fed."""
    from onnx import helper

    nodes = [helper.make_node("GlobalAveragePool", ["input.1"], ["g"]), helper.make_node("Flatten", ["g"], ["means"], axis=1)]
    return _save(path, nodes, {}, ["N", 3, 112, 112], "means", ["N", 3])


def feature_map(path: Path) -> Path:
    """A wrong model for a recogniser: 112 px in, a 4-D feature map out (like a detector or a segmenter)."""
    from onnx import helper

    nodes = [helper.make_node("Conv", ["input.1", "w"], ["fmap"], strides=[4, 4])]
    return _save(path, nodes, {"w": np.ones((2, 3, 4, 4))}, [1, 3, 112, 112], "fmap", [1, 2, 28, 28])


# ---- alignment ---------------------------------------------------------------------------------------------------
def test_five_points_on_extracted_landmarks(facesets6):
    for path in list_faces(facesets6[0]):
        lm = read_meta(path).landmarks_array()
        p5 = five_points(lm)
        assert p5.shape == (5, 2)
        assert np.allclose(p5[0], lm[36:42].mean(0)) and np.allclose(p5[1], lm[42:48].mean(0))
        assert np.allclose(p5[2:], lm[[30, 48, 54]])
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = p5
        assert lx < nx < rx and mlx < nx < mrx  # image order: the eye on the left of the picture first
        assert max(ly, ry) < ny < min(mly, mry)  # eyes, then nose, then mouth down the face
        assert np.array_equal(five_points(p5), p5)  # five points pass through
    for bad in (np.zeros((10, 2)), np.zeros((68, 3)), np.zeros(136)):
        with pytest.raises(ValueError, match=r"68 dlib/DFL points .* or 5 points"):
            five_points(bad)


def test_templates_are_faces_in_image_order():
    for name, pts in TEMPLATES.items():
        assert pts.shape == (5, 2) and (pts > 0).all() and (pts < 1).all(), name
        assert pts[0, 0] < pts[2, 0] < pts[1, 0] and pts[:2, 1].max() < pts[2, 1] < pts[3:, 1].min(), name
    v2 = TEMPLATES["arcface_112_v2"] * 112
    assert np.allclose(v2[0], [38.2946, 51.6963]) and np.allclose(v2[4], [70.7299, 92.2041])
    assert np.allclose(TEMPLATES["arcface_128"] * 128, v2 + [8, 0])  # insightface's norm_crop at 128
    with pytest.raises(ValueError, match="unknown alignment template 'nope'"):
        template("nope", 112)


@pytest.mark.parametrize("name,size,scale", [("arcface_112_v2", 112, 4.0), ("arcface_112_v2", 112, 0.6),
                                             ("arcface_128", 128, 1.3), ("ffhq_512", 256, 2.5), ("arcface_112_v1", 112, 1.0)])
def test_crop_puts_the_points_on_the_template(name, size, scale):
    """Dots drawn where a rotated, scaled, shifted face's 5 points are land, in the crop, on the template: the warp
    (area-shrunk, bicubic or plain) and its matrix agree to a fifth of a pixel."""
    angle = np.deg2rad(17)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = np.array([70.0, 40.0])
    want = template(name, size)
    pts = want @ rot.T + shift  # crop -> image: where the points lie in the photo
    side = int(np.ceil((pts.max() + size * scale) * 1.1))
    image = np.zeros((side, side, 3), np.uint8)
    radius = 2.5 * max(scale, 1.0)
    for x, y in pts:
        cv2.circle(image, (round(x * 16), round(y * 16)), round(radius * 16), (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    crop, mat = align_crop(image, pts, name, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    assert np.abs(points_in(mat, pts) - want).max() < 1e-6
    gray = crop[..., 0].astype(np.float64)
    win = int(radius / scale + 4)
    for tx, ty in want:
        x0, y0 = int(tx) - win, int(ty) - win
        patch = gray[y0:y0 + 2 * win + 1, x0:x0 + 2 * win + 1]
        yy, xx = np.mgrid[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]]
        found = np.array([(patch * xx).sum(), (patch * yy).sum()]) / patch.sum()
        assert np.abs(found - [tx, ty]).max() < 0.2, (name, scale, found, (tx, ty))


def test_crop_of_a_real_face_levels_the_eyes_on_the_template():
    from loratrain.core.faces import DETECTORS, LANDMARKERS, find_faces
    from loratrain.facetrain.demo_data import astronaut_bgr

    rgb = cv2.cvtColor(astronaut_bgr(), cv2.COLOR_BGR2RGB)
    (_, lm), = find_faces(rgb, DETECTORS.get("dlib")(upsample=1), LANDMARKERS.get("dlib68")(), 40, 0.5)
    crop, mat = align_crop(rgb, five_points(lm), "arcface_112_v2", 112)
    eyes = points_in(mat, five_points(lm))[:2]
    # a least-squares fit of five real points: the eyes land within a few pixels (dlib's mouth corners sit wider
    # and higher than insightface's template, which pulls the fit), level to under two degrees
    assert np.abs(eyes - template("arcface_112_v2", 112)[:2]).max() < 4
    assert abs(np.degrees(np.arctan2(*(eyes[1] - eyes[0])[::-1]))) < 2
    # pixels follow the matrix: the crop is the photo warped by it
    again = cv2.warpAffine(rgb, mat, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(again.astype(int) - crop).mean() < 4


def test_similarity_refuses_points_it_cannot_fit():
    with pytest.raises(ValueError, match="coincide"):
        similarity_matrix(np.ones((5, 2)), "arcface_112_v2", 112)
    with pytest.raises(ValueError, match="5 finite"):
        similarity_matrix(np.full((5, 2), np.nan), "arcface_112_v2", 112)


# ---- recogniser ------------------------------------------------------------------------------------------------
def test_recognizer_embeds_faces(facesets6, tmp_path):
    rec = Recognizer(tiny_recognizer(tmp_path / "tiny.onnx"))
    assert rec.dim == 512 and rec.batch is None
    faces = [load_face(p) for p in list_faces(facesets6[0])[:3]]
    rgbs = [cv2.cvtColor(img, cv2.COLOR_BGR2RGB) for img, _ in faces]
    embs = [rec.embed(rgb, m.landmarks_array()) for rgb, (_, m) in zip(rgbs, faces)]
    assert all(e.shape == (512,) and e.dtype == np.float32 for e in embs)
    # the same face gives the same embedding, from 68 landmarks or their 5 points, alone or in a batch
    assert np.array_equal(rec.embed(rgbs[0], faces[0][1].landmarks_array()), embs[0])
    assert np.allclose(rec.embed(rgbs[0], five_points(faces[0][1].landmarks_array())), embs[0], atol=1e-6)
    crops = np.stack([rec.crop(rgb, m.landmarks_array()) for rgb, (_, m) in zip(rgbs, faces)])
    assert np.allclose(rec.embed_crops(crops), np.stack(embs), atol=1e-5)
    assert not np.allclose(embs[0], embs[1])  # other faces, other embeddings
    # a model fixed at batch 1 (as many exported recognisers are) is looped: the same numbers
    one = Recognizer(tiny_recognizer(tmp_path / "one.onnx", batch=1))
    assert one.batch == 1 and np.allclose(one.embed_crops(crops), rec.embed_crops(crops), atol=1e-5)
    assert rec.embed_crops(crops[:0]).shape == (0, 512)
    with pytest.raises(ValueError, match="N x 112 x 112 x 3"):
        rec.embed_crops(crops[:, :64])
    v = normed(np.stack(embs))
    assert np.allclose(np.linalg.norm(v, axis=1), 1) and np.array_equal(normed(np.zeros(4)), np.zeros(4))


def test_recognizer_feeds_rgb_scaled_to_plus_minus_one(tmp_path):
    """insightface's convention: RGB (our images are RGB already: no flip), (x - 127.5) / 127.5, NCHW."""
    rec = Recognizer(channel_means(tmp_path / "means.onnx"))
    crop = np.zeros((1, 112, 112, 3), np.uint8)
    crop[..., 0], crop[..., 2] = 255, 102
    assert np.allclose(rec.embed_crops(crop)[0], [1.0, -1.0, (102 - 127.5) / 127.5], atol=1e-4)


def test_recognizer_refuses_files_that_are_no_recogniser(tmp_path):
    with pytest.raises(ConfigError, match=r"small\.onnx: expected an ArcFace-style .*input\.1 Nx3x64x64"):
        Recognizer(tiny_recognizer(tmp_path / "small.onnx", size=64))
    with pytest.raises(ConfigError, match=r"fmap\.onnx: expected .*outputs fmap 1x2x28x28"):
        Recognizer(feature_map(tmp_path / "fmap.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(ConfigError, match=r"junk\.onnx: not a readable ONNX file"):
        Recognizer(tmp_path / "junk.onnx")
    with pytest.raises(ConfigError, match="recogniser file not found"):
        Recognizer(tmp_path / "missing.onnx")


def test_the_stand_in_recognizer_of_arch_loads(tmp_path):
    arch = pytest.importorskip("loratrain.facetrain.swapper.arch")
    rec = Recognizer(arch.build_recognizer_onnx(tmp_path / "standin.onnx", seed=0))
    assert rec.dim >= 1 and rec.embed_crops(np.zeros((2, 112, 112, 3), np.uint8)).shape == (2, rec.dim)


# ---- identity with --recognizer -----------------------------------------------------------------------------------
def test_identity_encoders_share_one_interface(tmp_path):
    from loratrain.facetrain.extract.plugins import IdentityEncoder, identity_encoder, identity_threshold

    enc = identity_encoder(str(tiny_recognizer(tmp_path / "tiny.onnx")))
    assert isinstance(enc, RecognizerIdentity) and identity_encoder(str(tmp_path / "tiny.onnx")) is enc  # loaded once
    a, b = np.array([1.0, 0.0]), np.array([3.0, 3.0])
    assert enc.distance(a, b) == pytest.approx(1 - np.sqrt(0.5)) and enc.distance(a, 5 * a) == pytest.approx(0)
    assert np.allclose(enc.distance(np.stack([a, b]), b), [1 - np.sqrt(0.5), 0], atol=1e-6)
    assert IdentityEncoder.distance(a, b) == pytest.approx(np.sqrt(13))
    # 0 is each encoder's own default; a number is taken as given
    assert identity_threshold(enc, 0) == 0.6 == identity_threshold(IdentityEncoder, 0)
    assert identity_threshold(enc, 0.25) == 0.25
    with pytest.raises(ConfigError, match="recogniser file not found"):
        identity_encoder(str(tmp_path / "missing.onnx"))


def test_sort_by_identity_with_a_recognizer(facesets6, tmp_path, capsys):
    """`face sort --by identity --recognizer` through the real CLI orders by cosine distance to the set's median
    embedding and sets aside exactly the faces over the threshold."""
    from skimage import data

    work = tmp_path / "set"
    shutil.copytree(facesets6[0], work)
    img, meta = load_face(list_faces(work)[0])
    save_face(work / "zz_stranger.jpg", cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), img.shape[:2][::-1]), meta)
    onnx_path = tiny_recognizer(tmp_path / "tiny.onnx")
    rec = Recognizer(onnx_path)
    emb = {p.name: normed(rec.embed(cv2.cvtColor(load_face(p)[0], cv2.COLOR_BGR2RGB), read_meta(p).landmarks_array()))
           for p in list_faces(work)}
    med = normed(np.median(np.stack(list(emb.values())), axis=0))
    dist = {name: 1 - float(e @ med) for name, e in emb.items()}
    want = sorted(dist, key=dist.get)

    assert main(["face", "sort", str(work), "--by", "identity", "--recognizer", str(onnx_path), "--identity_threshold", "2"]) == 0
    ranked = list_faces(work)
    assert [p.name[:5] for p in ranked] == [f"{i:05d}" for i in range(len(want))]
    assert [p.name[6:] for p in ranked] == want and not (work / "_other").exists()
    # a threshold between the two farthest faces moves the farthest, and only it
    limit = (dist[want[-1]] + dist[want[-2]]) / 2
    assert main(["face", "sort", str(work), "--by", "identity", "--recognizer", str(onnx_path),
                 "--identity_threshold", f"{limit:.9f}"]) == 0
    assert [p.name[6:] for p in (work / "_other").iterdir()] == [want[-1]]
    assert [p.name[6:] for p in list_faces(work)] == want[:-1]
    # a file that is no recogniser is named before any face is renamed
    capsys.readouterr()
    before = sorted(p.name for p in list_faces(work))
    bad = tiny_recognizer(tmp_path / "small.onnx", size=64)
    assert main(["face", "sort", str(work), "--by", "identity", "--recognizer", str(bad)]) != 0
    out = capsys.readouterr()
    assert "small.onnx" in out.out + out.err and "ArcFace" in out.out + out.err
    assert sorted(p.name for p in list_faces(work)) == before


def test_swap_reference_filter_uses_the_recognizer(facesets6, tmp_path):
    """The swap's --reference filter with --recognizer: cosine distances, 0 meaning the recogniser's 0.6."""
    from loratrain.facetrain.swap.config import SwapConfig
    from loratrain.facetrain.swap.frame import FaceFinder

    src = facesets6[0]
    faces = list_faces(src)
    names = [Path(read_meta(p).source_filename).name for p in faces]
    source = SimpleNamespace(source_name=lambda i: names[i])
    photos = [cv2.cvtColor(cv2.imread(str(src.parent / "src_photos" / n)), cv2.COLOR_BGR2RGB) for n in names]
    onnx_path = str(tiny_recognizer(tmp_path / "tiny.onnx"))

    def finder(threshold: float) -> FaceFinder:
        cfg = SwapConfig(input=str(src.parent / "src_photos"), model="m.onnx", output=str(tmp_path / "o.png"),
                         dst_faceset=str(src), reference=[str(faces[0])], recognizer=onnx_path, identity_threshold=threshold)
        return FaceFinder(cfg, source)

    loose = finder(0)
    assert isinstance(loose.encoder, RecognizerIdentity) and loose.threshold == 0.6
    assert all(len(loose(i, rgb)) == 1 for i, rgb in enumerate(photos)) and loose.other_people == 0
    strict = finder(1e-9)
    assert all(strict(i, rgb) == [] for i, rgb in enumerate(photos)) and strict.other_people == len(photos)
    missing = SwapConfig(input=str(src.parent / "src_photos"), model=onnx_path, output=str(tmp_path / "o.png"),
                         recognizer=str(tmp_path / "nope.onnx"))
    assert ("recognizer", f"recogniser file not found: {tmp_path / 'nope.onnx'}") in missing.requirements()
