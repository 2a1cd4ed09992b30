"""`face swap --swapper`: an identity-injection swapper (inswapper's contract) through the real swap path, on tiny
graphs the tests build: a random generator and recogniser from swapper/arch.py, an identity swapper (its output
is its input, so any misplacement of the warp shows), and GFPGAN / CodeFormer-shaped restorers."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from loratrain.cli import main
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.facetrain.demo_data import make_clip, make_photos
from loratrain.facetrain.swap.config import SwapConfig
from loratrain.facetrain.swap.label import mark_box, read_image_label
from loratrain.facetrain.swap.run import run_face_swap
from loratrain.facetrain.swapper.arch import GeneratorSpec, build_generator_onnx, build_recognizer_onnx, save_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402


def _graph(nodes, inputs, outputs, inits=()):  # noqa: ANN001, ANN202
    model = helper.make_model(helper.make_graph(nodes, "t", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _value(name: str, shape: list, kind: int = TensorProto.FLOAT):  # noqa: ANN202
    return helper.make_tensor_value_info(name, kind, shape)


def identity_swapper(path: Path, size: int = 128) -> Path:
    """inswapper's contract (target N x 3 x S x S, source N x 512), output = target: the swap gives the frame back."""
    return save_onnx(_graph([helper.make_node("Identity", ["target"], ["output"])],
                            [_value("target", [1, 3, size, size]), _value("source", [1, 512])],
                            [_value("output", [1, 3, size, size])]), path)


def restorer(path: Path, codeformer: bool = False, size: int = 64) -> Path:
    """A face restorer's I/O at -1..1, `y = 0.5 x` (pulls the face toward grey). The CodeFormer-shaped one
    multiplies by its double `weight` input instead, so with weight 0.5 both give the same face."""
    if codeformer:
        nodes = [helper.make_node("Cast", ["weight"], ["w"], to=TensorProto.FLOAT), helper.make_node("Mul", ["input", "w"], ["output"])]
        inputs = [_value("input", [1, 3, size, size]), _value("weight", [], TensorProto.DOUBLE)]
        inits = []
    else:
        nodes = [helper.make_node("Mul", ["input", "half"], ["output"])]
        inputs = [_value("input", ["N", 3, size, size])]
        inits = [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])]
    return save_onnx(_graph(nodes, inputs, [_value("output", ["N", 3, size, size])], inits), path)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("swapper")
    src = make_photos(root / "src", 2, 0, "src")
    dst = make_photos(root / "dst", 1, 1, "dst")[0]
    return {"root": root, "src": src, "dst": dst,
            "g": build_generator_onnx(root / "g.onnx", GeneratorSpec(32, 8, 1), seed=0),
            "g_dyn": build_generator_onnx(root / "g_dyn.onnx", GeneratorSpec(32, 8, 1, batch="N"), seed=0),
            "r": build_recognizer_onnx(root / "r.onnx", seed=0),
            "same": identity_swapper(root / "same.onnx")}


def swap(kit, output: Path, **kw) -> object:  # noqa: ANN001
    base = dict(input=str(kit["dst"]), swapper=str(kit["g"]), source=[str(kit["root"] / "src")], recognizer=str(kit["r"]),
                output=str(output))
    return run_face_swap(SwapConfig(**{**base, **kw}), RecordingReporter())


def face_box(img: np.ndarray) -> tuple[slice, slice]:
    """Where the demo photo's face is (300 x 360 frame): well inside the swapper's square."""
    return slice(90, 170), slice(140, 220)


def test_photo_swap_through_the_cli_is_labelled_and_changes_only_the_face(kit, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["face", "swap", str(kit["dst"]), str(out), "--swapper", str(kit["g"]), "--source", *map(str, kit["src"]),
                 "--recognizer", str(kit["r"]), "--quiet"]) == 0
    assert "1 face(s) swapped in 1 frame(s)" in capsys.readouterr().out
    label = read_image_label(out)
    assert label["AI-generated"] == "true" and label["iptc_ai_source"] == "True" and label["loratrain.model"] == "g.onnx"
    src, got = cv2.imread(str(kit["dst"])).astype(int), cv2.imread(str(out)).astype(int)
    x0, y0, x1, y1 = mark_box(got.shape)
    assert np.abs(got[y0:y1, x0:x1] - src[y0:y1, x0:x1]).mean() > 20  # the visible mark
    ys, xs = face_box(src)
    assert np.abs(got[ys, xs] - src[ys, xs]).mean() > 15  # the random generator's face replaces the dst face
    assert np.abs(got[:40, :40] - src[:40, :40]).max() <= 1  # the background is the frame's (the corner: no face there)
    assert np.abs(got[250:, :60] - src[250:, :60]).max() <= 1
    # the same weights with a free batch dimension (batched, not looped) swap the same face
    dyn = tmp_path / "dyn.png"
    swap(kit, dyn, swapper=str(kit["g_dyn"]), source=list(map(str, kit["src"])))
    assert np.abs(cv2.imread(str(dyn)).astype(int) - got).max() <= 2


def test_the_swapper_crop_lands_back_where_it_was_cut(kit, tmp_path):
    """An identity swapper through the whole path (warp to its template, run, warp back, merge) returns the frame."""
    out = tmp_path / "same.png"
    swap(kit, out, swapper=str(kit["same"]), color_transfer_mode="none", visible_mark=False)
    src, got = cv2.imread(str(kit["dst"])).astype(int), cv2.imread(str(out)).astype(int)
    ys, xs = face_box(src)
    # only the resampling through its 128 px crop softens it (2.7 here; a misplaced warp is off by whole features)
    assert np.abs(got[ys, xs] - src[ys, xs]).mean() < 5
    assert np.abs(got - src).mean() < 2


def test_the_ui_preview_shows_what_the_swapper_swap_writes(kit, tmp_path):
    from loratrain.facetrain.swap.preview import preview

    out = tmp_path / "written.png"
    swap(kit, out)
    cfg = SwapConfig(input=str(kit["dst"]), swapper=str(kit["g"]), source=[str(kit["root"] / "src")], recognizer=str(kit["r"]),
                     output=str(tmp_path / "preview.png"))
    shown = preview(cfg, 0)
    assert shown.faces == 1 and shown.mask.max() == 255 and shown.mask[:20, :20].max() == 0  # the soft box, inside the frame
    np.testing.assert_array_equal(shown.output, cv2.imread(str(out))[..., ::-1])


def test_restoration_is_blended_by_restore_blend(kit, tmp_path):
    gfpgan, codeformer = restorer(tmp_path / "gfpgan.onnx"), restorer(tmp_path / "codeformer.onnx", codeformer=True)
    plain, none, full, cf = (tmp_path / f"{n}.png" for n in ("plain", "none", "full", "cf"))
    kw = dict(swapper=str(kit["same"]), color_transfer_mode="none")
    swap(kit, plain, **kw)
    swap(kit, none, restore_model=str(gfpgan), restore_blend=0.0, **kw)
    swap(kit, full, restore_model=str(gfpgan), restore_blend=1.0, **kw)
    swap(kit, cf, restore_model=str(codeformer), restore_blend=1.0, restore_fidelity=0.5, **kw)
    a, b, c, d = (cv2.imread(str(p)).astype(int) for p in (plain, none, full, cf))
    np.testing.assert_array_equal(a, b)  # blend 0: exactly the unrestored swap
    ys, xs = face_box(a)
    grey = np.abs(c[ys, xs] - 128).mean()
    assert grey < np.abs(a[ys, xs] - 128).mean() * 0.7  # the restorer's output (pulled to grey) replaced the face
    assert np.abs(c[:40, :40] - a[:40, :40]).max() <= 1  # only the face
    assert np.abs(c - d).max() <= 1  # CodeFormer's weight input got restore_fidelity (0.5: the same face)


def test_a_stopped_video_swap_with_a_swapper_resumes_to_the_same_video(kit, tmp_path):
    import os
    import shutil
    import subprocess

    import imageio_ffmpeg

    from loratrain.core.errors import ConfigError

    clip = make_clip(tmp_path / "clip.mp4", frames=8, fps=12)
    person = tmp_path / "person"
    shutil.copytree(kit["root"] / "src", person)
    kw = dict(input=str(clip), segment_frames=4, batch_size=3, source=[str(person)])
    whole = tmp_path / "whole.mp4"
    swap(kit, whole, **kw)
    stop = StopFlag()

    class StopAfter(RecordingReporter):
        def advance(self, n: int = 1, **metrics: float) -> None:
            super().advance(n, **metrics)
            if self.step >= 6:
                stop.set()

    out = tmp_path / "resumed.mp4"
    cfg = SwapConfig(swapper=str(kit["g"]), recognizer=str(kit["r"]), output=str(out), **kw)
    assert run_face_swap(cfg, StopAfter(), stop).stopped and not out.exists()
    # another photo of the source person at the same path is another swap: not resumed into this one
    photo = sorted(person.iterdir())[0]
    data, st = photo.read_bytes(), photo.stat()
    photo.write_bytes(kit["dst"].read_bytes())
    with pytest.raises(ConfigError, match="holds a stopped swap with other options"):
        run_face_swap(cfg, RecordingReporter())
    photo.write_bytes(data)
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    done = run_face_swap(cfg, RecordingReporter())
    assert done.resumed_at == 4 and done.frames == 4

    def decode(path: Path) -> list[np.ndarray]:
        reader = imageio_ffmpeg.read_frames(str(path))
        w, h = next(reader)["size"]
        return [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]

    a, b = decode(whole), decode(out)
    assert len(a) == len(b) == 8 and all(np.array_equal(x, y) for x, y in zip(a, b))
    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert "comment         : AI-generated" in info and "g.onnx" in info


def test_swapper_errors_are_one_clear_line(kit, tmp_path, capsys):
    dst, out = str(kit["dst"]), str(tmp_path / "o.png")
    base = ["face", "swap", dst, out]

    def fails(*args: str) -> str:
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "--swapper needs the person to put in" in fails("--swapper", str(kit["g"]), "--recognizer", str(kit["r"]))
    assert "--swapper needs the recogniser" in fails("--swapper", str(kit["g"]), "--source", str(kit["src"][0]))
    assert "not both" in fails("--swapper", str(kit["g"]), "--model", str(kit["g"]), "--source", str(kit["src"][0]),
                               "--recognizer", str(kit["r"]))
    assert "only with --swapper" in fails("--model", str(kit["g"]), "--source", str(kit["src"][0]))
    assert "file not found" in fails("--swapper", str(tmp_path / "nope.onnx"), "--source", str(kit["src"][0]),
                                     "--recognizer", str(kit["r"]))
    # a DeepFaceLab .dfm is a --model: refused by name, then (renamed .onnx) by its contract
    dfl = _graph([helper.make_node("Identity", ["in_face:0"], [f"out_{k}"]) for k in range(3)],
                 [_value("in_face:0", ["N", 32, 32, 3])], [_value(f"out_{k}", ["N", 32, 32, 3]) for k in range(3)])
    dfm, renamed = save_onnx(dfl, tmp_path / "face.dfm"), save_onnx(dfl, tmp_path / "face.onnx")
    assert "a DeepFaceLab .dfm or a trained face model goes to --model" in fails(
        "--swapper", str(dfm), "--source", str(kit["src"][0]), "--recognizer", str(kit["r"]))
    err = fails("--swapper", str(renamed), "--source", str(kit["src"][0]), "--recognizer", str(kit["r"]))
    assert "expected an identity-injection swapper" in err and "in_face:0" in err and len(err.strip().splitlines()) == 1
    # a swapper given as the recogniser: named as the wrong kind of file
    err = fails("--swapper", str(kit["g"]), "--source", str(kit["src"][0]), "--recognizer", str(kit["g"]))
    assert "expected an ArcFace-style face recogniser" in err
    # a source image without a face
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 120, 3), 90, np.uint8))
    assert "no face found" in fails("--swapper", str(kit["g"]), "--source", str(blank), "--recognizer", str(kit["r"]))
    assert not Path(out).exists()


def test_the_swapper_file_is_parsed_once_on_the_swap_path(kit, tmp_path, monkeypatch):
    """An inswapper is 550 MB: its contract and the onnxruntime session come from one read of the file (the
    recogniser, a separate file, is read at most once: a process keeps it loaded for --reference's filter too)."""
    import onnx as onnx_mod

    from loratrain.facetrain.swap.swapper_predict import load_swapper

    reads: list[str] = []
    real = onnx_mod.load

    def counting(path, *a, **kw):  # noqa: ANN001, ANN202
        reads.append(Path(str(path)).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(onnx_mod, "load", counting)
    cfg = SwapConfig(input=str(kit["dst"]), swapper=str(kit["g"]), source=[str(kit["root"] / "src")],
                     recognizer=str(kit["r"]), output=str(tmp_path / "out.png"))
    load_swapper(cfg)
    assert reads.count(kit["g"].name) == 1 and reads.count(kit["r"].name) <= 1, reads
