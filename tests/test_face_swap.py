"""The swap path end to end on a tiny trained model and a generated clip with a tone: every mask mode and blend
mode, the labels in every output kind, smoothing, resume after a kill, and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.facetrain.demo_data import make_clip, make_photos
from loratrain.facetrain.export import export_onnx
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.swap.compose import MergeOptions, merge_face, prepare
from loratrain.facetrain.swap.config import BLEND_MODES, MASK_MODES, SwapConfig
from loratrain.facetrain.swap.label import mark_box, read_image_label
from loratrain.facetrain.swap.masks import MaskInputs, face_mask, process_subres
from loratrain.facetrain.swap.run import run_face_swap
from loratrain.facetrain.swap.smooth import Smoother, crop_jitter
from loratrain.facetrain.train.config import FaceTrainConfig
from loratrain.facetrain.train.trainer import run_face_train

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    for look, seed in (("src", 0), ("dst", 1)):
        make_photos(root / f"{look}_photos", 6, seed, look)
        run_face_extract(ExtractConfig(input=str(root / f"{look}_photos"), output_dir=str(root / look), image_size=64, max_faces=1))
    cfg = FaceTrainConfig(model_dir=str(root / "model"), src_faceset=str(root / "src"), dst_faceset=str(root / "dst"), archi="df",
                          resolution=32, ae_dims=32, e_dims=8, d_dims=8, batch_size=4, max_iters=20, workers=0, save_every=20)
    model = run_face_train(cfg).model_path
    clip = make_clip(root / "clip.mp4", frames=16, fps=12)
    return {"root": root, "model": model, "clip": clip}


def decode(path: Path) -> list[np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return [np.frombuffer(f, np.uint8).reshape(h, w, 3).copy() for f in reader]


def probe(path: Path) -> str:
    return subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr


def swap(kit, output, **kw) -> object:
    cfg = SwapConfig(input=str(kw.pop("input", kit["clip"])), model=str(kw.pop("model", kit["model"])), output=str(output), **kw)
    return run_face_swap(cfg, RecordingReporter())


# ---------------------------------------------------------------- units: masks and blends


def _face(size: int = 256):
    frame = decode(make_clip(Path(os.environ.get("TMPDIR", "/tmp")) / f"lt_face_{os.getpid()}.mp4", frames=1, tone_hz=0))[0]
    from loratrain.facetrain.extract.plugins import DETECTORS, LANDMARKERS

    box = DETECTORS.get("dlib")()(frame)[0]
    lm = LANDMARKERS.get("dlib68")()(frame, box[:4])
    return frame[..., ::-1].astype(np.float32) / 255, lm


@pytest.fixture(scope="module")
def face():
    return _face()


def test_each_mask_mode_is_its_formula(face):
    frame, lm = face
    r = 32
    crop = prepare(frame, lm, r, "wf")
    yy, xx = np.mgrid[:r, :r] / r
    prd, dst = (xx * 0.9 + 0.05).astype(np.float32), (yy * 0.9 + 0.05).astype(np.float32)
    hull = np.zeros((r, r), np.float32)
    hull[8:24, 8:24] = 1
    inputs = MaskInputs(hull, prd, dst)
    expected = {"full": np.ones((r, r)), "dst": hull, "learned-prd": prd, "learned-dst": dst,
                "learned-prd*learned-dst": prd * dst, "learned-prd+learned-dst": np.clip(prd + dst, 0, 1)}
    assert set(expected) == set(MASK_MODES)
    for mode, want in expected.items():
        want = np.where(want < 1 / 255, 0, want)  # values under 1/255 are noise, set to 0
        np.testing.assert_allclose(face_mask(mode, inputs), want, atol=1e-6, err_msg=mode)
    tiny = MaskInputs(hull, np.full((r, r), 0.5 / 255, np.float32), dst)
    assert face_mask("learned-prd", tiny).max() == 0  # under 1/255 is noise
    # erosion shrinks, dilation grows, blur softens and fades to zero inside the crop (4x sub-resolution)
    sub = cv2.resize(hull, (4 * r, 4 * r), interpolation=cv2.INTER_NEAREST)
    plain, eroded, dilated = (process_subres(sub, r, e, 0).sum() for e in (0, 20, -20))
    assert eroded < plain < dilated
    blurred = process_subres(np.ones((4 * r, 4 * r), np.float32), r, 0, 40)
    assert blurred[0].max() < 1e-3 and blurred[:, 0].max() < 1e-3 and blurred[2 * r, 2 * r] > 0.99
    assert 0 < blurred[2 * r, 22] < 1  # a soft edge
    # the dst mode really uses the landmark hull of this face
    pred = (crop.dst, np.ones((r, r, 1), np.float32), np.ones((r, r, 1), np.float32))
    out_dst = merge_face(frame, crop, pred, MergeOptions(mask_mode="dst", color_transfer_mode="none"), np.random.default_rng(0))
    out_full = merge_face(frame, crop, pred, MergeOptions(mask_mode="full", color_transfer_mode="none"), np.random.default_rng(0))
    assert 0 < out_dst[1].sum() < out_full[1].sum()


def test_each_blend_mode_does_what_it_says(face):
    frame, lm = face
    r = 64
    crop = prepare(frame, lm, r, "wf")
    green = np.zeros((r, r, 3), np.float32)
    green[..., 1] = 0.8
    masks = np.zeros((r, r, 1), np.float32)
    masks[12:52, 12:52] = 1
    pred = (green, masks, masks)
    rng = np.random.default_rng(0)
    outs = {}
    for mode in BLEND_MODES:
        got = merge_face(frame, crop, pred, MergeOptions(mode=mode, color_transfer_mode="none", blur_mask_modifier=20), rng)
        assert got is not None, mode
        outs[mode] = got
    frame_mask = outs["overlay"][1][..., 0]
    inside = frame_mask > 0.99
    assert inside.sum() > 200
    np.testing.assert_array_equal(outs["original"][0], frame)                      # original: the frame unchanged
    assert outs["overlay"][0][inside][:, 1].mean() > 0.75 and outs["overlay"][0][inside][:, 0].mean() < 0.05
    outside = outs["overlay"][1][..., 0] == 0
    np.testing.assert_array_equal(outs["overlay"][0][outside], frame[outside])     # nothing outside the mask changes
    hm = outs["hist-match"][0][inside]                                             # hist-match: toward the face's colours
    assert abs(hm.mean(0) - frame[inside].mean(0)).max() < abs(outs["overlay"][0][inside].mean(0) - frame[inside].mean(0)).max()
    sl = outs["seamless"][0][inside]                                               # Poisson: keeps the frame's light level
    assert abs(sl.mean() - frame[inside].mean()) < abs(outs["overlay"][0][inside].mean() - frame[inside].mean())
    assert not np.allclose(outs["seamless-hist-match"][0], outs["seamless"][0])
    raw_square = (outs["raw-rgb"][0] - frame).any(-1)                              # raw-rgb: the whole square
    assert raw_square.sum() > (outs["overlay"][0] - frame).any(-1).sum()
    assert outs["raw-predict"][0].shape == (r, r, 3) and np.allclose(outs["raw-predict"][0], green)
    # a mask too small to paste is skipped, as DFL does
    dot = np.zeros((r, r, 1), np.float32)
    dot[30:31, 30:31] = 1
    assert merge_face(frame, crop, (green, dot, dot), MergeOptions(), rng) is None


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(img, np.float32), cv2.COLOR_BGR2GRAY)


def _high_freq(img: np.ndarray, where: np.ndarray) -> float:
    """Mean squared Laplacian of the grey image over `where`: the energy of fine detail (and of noise)."""
    return float((cv2.Laplacian(_gray(img), cv2.CV_32F) ** 2)[where].mean())


def _grad_energy(img: np.ndarray, where: np.ndarray, axis: int) -> float:
    """Mean squared difference between neighbours along `axis` (1: horizontal, 0: vertical) over `where`."""
    d = np.diff(_gray(img), axis=axis) ** 2
    return float(d[where[:-1] if axis == 0 else where[:, :-1]].mean())


def test_each_post_option_has_its_effect(face):
    """Every post-processing option against the same merge with the option off: the effect it is named for, where
    it should be, and nothing where it should not (docs/face-swap.md#post-processing)."""
    frame, lm = face
    r = 64
    crop = prepare(frame, lm, r, "wf")
    square = np.zeros((r, r, 1), np.float32)
    square[12:52, 12:52] = 1
    textured = (crop.dst, square, square)  # the face itself as the prediction: real detail for the filters to act on
    base = {"color_transfer_mode": "none", "blur_mask_modifier": 20}

    def merge(motion=(0.0, 0.0), on=frame, **kw):  # noqa: ANN001, ANN202
        crop.motion = motion
        return merge_face(on, crop, textured, MergeOptions(**base, **kw), np.random.default_rng(0))

    off, mask = merge()
    inside, outside = mask[..., 0] > 0.99, mask[..., 0] == 0
    assert inside.sum() > 2000 and outside.sum() > 20000
    # sharpening raises the fine detail inside the face, a negative amount (median blur) lowers it; outside the
    # mask nothing changes
    detail = _high_freq(off, inside)
    for mode in ("box", "gaussian"):
        sharp = merge(sharpen_mode=mode, blursharpen_amount=60)[0]
        assert _high_freq(sharp, inside) > 1.3 * detail, mode
        np.testing.assert_array_equal(sharp[outside], frame[outside])
    assert _high_freq(merge(sharpen_mode="box", blursharpen_amount=100)[0], inside) > _high_freq(
        merge(sharpen_mode="box", blursharpen_amount=30)[0], inside) > detail  # more amount, more sharpening
    assert _high_freq(merge(blursharpen_amount=-40)[0], inside) < 0.5 * detail
    # motion blur smears along the face's motion (8 px per frame): neighbour differences along it drop far more
    # than across it, whichever way it moves; a face that does not move is not blurred
    for degrees, along, across in ((0.0, 1, 0), (90.0, 0, 1)):
        blurred = merge(motion=(8.0, degrees), motion_blur_power=100)[0]
        ratio = {axis: _grad_energy(blurred, inside, axis) / _grad_energy(off, inside, axis) for axis in (0, 1)}
        assert ratio[along] < 0.5 * ratio[across] and ratio[along] < 0.3, (degrees, ratio)
        np.testing.assert_array_equal(blurred[outside], frame[outside])
    still = merge(motion=(0.5, 0.0), motion_blur_power=100)[0]
    assert _grad_energy(still, inside, 1) > 0.9 * _grad_energy(off, inside, 1)
    # colour degrade quantises the face to an adaptive 256-colour palette
    def colours(img: np.ndarray) -> int:
        return len(np.unique((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)[inside], axis=0))

    assert colours(merge(color_degrade_power=100)[0]) <= 256 < colours(off) // 4
    assert 256 < colours(merge(color_degrade_power=50)[0])  # half power: blended back toward the face
    # denoise cleans the frame around the face: on a noisy frame, the output is closer to the clean one
    noisy = np.clip(frame + np.random.default_rng(1).normal(0, 0.05, frame.shape).astype(np.float32), 0, 1)
    noisy_off, denoised = merge(on=noisy)[0], merge(on=noisy, image_denoise_power=150)[0]
    error_off, error_denoised = (float(np.abs(x - frame)[outside].mean()) for x in (noisy_off, denoised))
    assert error_denoised < 0.9 * error_off, (error_off, error_denoised)
    assert _high_freq(denoised, outside) < 0.5 * _high_freq(noisy_off, outside)
    # bicubic degrade (a down/up scale) removes fine detail of the frame
    assert _high_freq(merge(bicubic_degrade_power=60)[0], outside) < 0.5 * _high_freq(off, outside)
    # output_face_scale: DFL's formula (scale = 1 + 0.01 * value zooms the crop in), so a negative value pastes the
    # face over more of the frame and a positive one over less; the mask follows
    changed = {}
    for value in (-20, 0, 20):
        got, got_mask = merge(output_face_scale=value) if value else (off, mask)
        changed[value] = int((got != frame).any(-1).sum())
        assert int((got_mask > 0).sum()) == changed[value]
    assert changed[-20] > 1.3 * changed[0] and changed[20] < 0.8 * changed[0], changed


def test_smoothing_cuts_jitter_on_a_still_clip(tmp_path):
    from loratrain.facetrain.extract.plugins import DETECTORS, LANDMARKERS

    frames = decode(make_clip(tmp_path / "still.mp4", frames=20, noise=6.0, tone_hz=0))
    detect, landmark = DETECTORS.get("dlib")(), LANDMARKERS.get("dlib68")()
    raw = [landmark(f, detect(f)[0][:4]) for f in frames]
    smoother = Smoother(12.0)
    smoothed = [smoother(i, [lm])[0][0] for i, lm in enumerate(raw)]
    before, after = crop_jitter(raw), crop_jitter(smoothed)
    assert before > 0.2 and after < 0.5 * before, (before, after)
    # a moving face is followed, not dragged behind: the lag stays under one frame of motion (3 px)
    moving = [lm + [3.0 * i, 0] for i, lm in enumerate(raw)]
    s2 = Smoother(12.0)
    followed = [s2(i, [lm])[0][0] for i, lm in enumerate(moving)]
    assert abs(followed[-1][:, 0].mean() - moving[-1][:, 0].mean()) < 2.0
    state = smoother.state()
    again = Smoother(12.0)
    again.restore(state)
    np.testing.assert_array_equal(again(20, [raw[0]])[0][0], smoother(20, [raw[0]])[0][0])


# ---------------------------------------------------------------- end to end


def test_video_swap_keeps_audio_and_is_labelled(kit, tmp_path, capsys):
    out = tmp_path / "swapped.mp4"
    frames_dir = tmp_path / "frames"
    assert main(["face", "swap", str(kit["clip"]), str(out), "--model", str(kit["model"]), "--output_frames", str(frames_dir),
                 "--quiet"]) == 0
    assert "16 face(s) swapped in 16 frame(s)" in capsys.readouterr().out
    info = probe(out)
    assert "Audio: aac" in info and "12 fps" in info and "comment         : AI-generated" in info
    src, got = decode(kit["clip"]), decode(out)
    assert len(got) == len(src) == 16
    x0, y0, x1, y1 = mark_box(got[0].shape)
    for f, s in zip(got, src):
        assert np.abs(f[y0:y1, x0:x1].astype(int) - s[y0:y1, x0:x1]).mean() > 20  # the visible mark, every frame
        assert np.abs(f[60:200, 60:200].astype(int) - s[60:200, 60:200]).mean() > 2  # the face changed
    pngs = sorted(frames_dir.glob("*.png"))
    assert len(pngs) == 16
    label = read_image_label(pngs[0])
    assert label["AI-generated"] == "true" and label["iptc_ai_source"] == "True" and "face.safetensors" in label["loratrain.model"]
    # an image in, a JPEG out: XMP and comment; --no-visible_mark keeps the metadata
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), cv2.cvtColor(src[3], cv2.COLOR_RGB2BGR))
    marked, clean = tmp_path / "marked.jpg", tmp_path / "clean.jpg"
    swap(kit, marked, input=still)
    swap(kit, clean, input=still, visible_mark=False)
    for path in (marked, clean):
        label = read_image_label(path)
        assert label["iptc_ai_source"] == "True" and "AI-generated" in label["comment"]
    a, b = cv2.imread(str(marked)), cv2.imread(str(clean))
    assert np.abs(a[y0:y1, x0:x1].astype(int) - b[y0:y1, x0:x1]).mean() > 20
    assert np.abs(a[:100, :100].astype(int) - b[:100, :100]).mean() < 3


def test_onnx_model_and_dst_faceset_give_the_same_swap(kit, tmp_path):
    onnx_path = export_onnx(kit["model"], tmp_path / "face.dfm")
    a = swap(kit, tmp_path / "a", end=4, smooth=False)
    b = swap(kit, tmp_path / "b", end=4, smooth=False, model=onnx_path)
    assert a.faces == b.faces == 4
    for name in ("frame_000000.png", "frame_000003.png"):
        assert np.abs(cv2.imread(str(tmp_path / "a" / name)).astype(int) - cv2.imread(str(tmp_path / "b" / name))).max() <= 3
    # reuse faces extracted from the frames (DFL's merger does): no detection at swap time
    run_face_extract(ExtractConfig(input=str(kit["clip"]), output_dir=str(tmp_path / "dst_faces"), image_size=64, max_faces=1),
                     RecordingReporter())
    c = swap(kit, tmp_path / "c", end=4, smooth=False, dst_faceset=str(tmp_path / "dst_faces"))
    assert c.faces == 4
    assert np.abs(cv2.imread(str(tmp_path / "a" / "frame_000002.png")).astype(int)
                  - cv2.imread(str(tmp_path / "c" / "frame_000002.png"))).mean() < 1.0
    # only faces close to a reference person are swapped
    other = swap(kit, tmp_path / "d", end=2, reference=[str(next((kit["root"] / "dst").glob("*.jpg")))], identity_threshold=0.01)
    assert other.faces == 0 and other.frames == 2 and other.other_people == 2


def test_preview_shows_what_the_swap_writes(kit, tmp_path, monkeypatch):
    """The UI's one-frame preview and the swap job give the same pixels for a frame, in every blend mode and with the
    post-processing and random colour transfers on: both go through `frame.compose_frame` (the run is read back from
    its lossless PNG frames; batch 1 so the model sees the same batch, no smoothing as the preview has no history)."""
    from loratrain.facetrain.swap import frame as frame_mod
    from loratrain.facetrain.swap.preview import preview_frame

    composed: list[int] = []
    real = frame_mod.compose_frame

    def spy(index, *args, **kw):  # noqa: ANN001, ANN202
        composed.append(index)
        return real(index, *args, **kw)

    monkeypatch.setattr(frame_mod, "compose_frame", spy)
    monkeypatch.setattr("loratrain.facetrain.swap.run.compose_frame", spy)
    cases = [{"mode": m} for m in BLEND_MODES] + [
        {"mode": "seamless", "color_transfer_mode": "sot-m", "sharpen_mode": "gaussian", "blursharpen_amount": 40,
         "image_denoise_power": 60, "bicubic_degrade_power": 20, "color_degrade_power": 30, "output_face_scale": -10},
        {"mode": "overlay", "color_transfer_mode": "idt", "mask_mode": "dst", "erode_mask_modifier": 10, "blur_mask_modifier": 30,
         "blursharpen_amount": -20, "visible_mark": False}]
    for n, kw in enumerate(cases):
        out = tmp_path / f"run{n}"
        composed.clear()
        res = swap(kit, out, start=2, end=4, batch_size=1, smooth=False, **kw)
        assert res.faces == 2 and composed == [2, 3], kw  # the run composed its frames with the shared function
        cfg = SwapConfig(input=str(kit["clip"]), model=str(kit["model"]), output=str(tmp_path / "preview.png"), **kw)
        for index in (2, 3):
            written = cv2.imread(str(out / f"frame_{index:06d}.png"))
            composed.clear()
            original, shown, faces = preview_frame(cfg, index)
            assert composed == [index] and faces == 1
            np.testing.assert_array_equal(shown[..., ::-1], written, err_msg=f"{kw} frame {index}")
            side = 32 if kw["mode"] == "raw-predict" else 256  # raw-predict: the model's aligned prediction
            assert written.shape == (side, side, 3), kw
            if kw["mode"] == "original":
                x0, y0, x1, y1 = mark_box(written.shape)
                unmarked = np.ones(written.shape[:2], bool)
                unmarked[y0:y1, x0:x1] = False
                np.testing.assert_array_equal(shown[unmarked], original[unmarked])  # the frame itself, labelled
    # raw-predict into a video: every frame is the prediction, so the video has the model's size
    swap(kit, tmp_path / "raw.mp4", mode="raw-predict", end=3)
    assert [f.shape for f in decode(tmp_path / "raw.mp4")] == [(32, 32, 3)] * 3


def test_a_killed_swap_resumes_to_the_same_video(kit, tmp_path):
    whole = tmp_path / "whole.mp4"
    swap(kit, whole, segment_frames=4)
    out = tmp_path / "resumed.mp4"
    cmd = [sys.executable, "-m", "loratrain", "face", "swap", str(kit["clip"]), str(out), "--model", str(kit["model"]),
           "--segment_frames", "4", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = tmp_path / ".resumed.mp4.swap-parts"
    deadline = time.time() + 120
    def saved_frames() -> int:  # what the resumable state records (a segment file is renamed just before it)
        try:
            return int(json.loads((parts / "state.json").read_text())["next_frame"])
        except (OSError, ValueError, KeyError):
            return 0

    while time.time() < deadline and saved_frames() < 8:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # never a broken file at the final path
    kept = sorted(p.name for p in parts.glob("seg_*.mp4"))
    assert 2 <= len(kept) < 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("seg_*.mp4")}
    result = swap(kit, out, segment_frames=4)
    assert result.resumed_at >= 8 and result.frames == 16 - result.resumed_at
    assert not parts.exists()
    a, b = decode(whole), decode(out)
    assert len(a) == len(b) == 16
    assert [int(np.abs(x.astype(int) - y).max()) for x, y in zip(a, b)] == [0] * 16
    assert "Audio: aac" in probe(out)
    del mtimes
    # a stop from the UI or Ctrl-C: the same, in process
    stop = StopFlag()

    class StopAfter(RecordingReporter):
        def advance(self, n: int = 1, **metrics: float) -> None:
            super().advance(n, **metrics)
            if self.step >= 6:
                stop.set()

    cfg = SwapConfig(input=str(kit["clip"]), model=str(kit["model"]), output=str(tmp_path / "stopped.mp4"), segment_frames=4)
    assert run_face_swap(cfg, StopAfter(), stop).stopped
    assert not (tmp_path / "stopped.mp4").exists()
    done = run_face_swap(cfg, RecordingReporter())
    assert done.resumed_at == 4 and len(decode(tmp_path / "stopped.mp4")) == 16


def test_bad_input_is_named_before_any_work(kit, tmp_path, capsys):
    # an output that exists
    existing = tmp_path / "exists.mp4"
    existing.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        swap(kit, existing)
    assert existing.read_bytes() == b"keep me"
    # a video without faces: nothing written
    blank = tmp_path / "blank.mp4"
    writer = imageio_ffmpeg.write_frames(str(blank), (128, 128), fps=8, ffmpeg_log_level="error")
    writer.send(None)
    for _ in range(4):
        writer.send(np.full((128, 128, 3), 90, np.uint8))
    writer.close()
    with pytest.raises(ConfigError, match="no face found in any of the 4 frame"):
        swap(kit, tmp_path / "none.mp4", input=blank)
    assert not (tmp_path / "none.mp4").exists() and not (tmp_path / ".none.mp4.swap-parts").exists()
    # a frame folder with mixed sizes, a corrupt frame
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    cv2.imwrite(str(mixed / "a.png"), np.zeros((64, 64, 3), np.uint8))
    cv2.imwrite(str(mixed / "b.png"), np.zeros((64, 80, 3), np.uint8))
    with pytest.raises(ConfigError, match="mixes sizes: a.png is 64x64, b.png is 80x64"):
        swap(kit, tmp_path / "m_out", input=mixed)
    (mixed / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ConfigError, match="b.png"):
        swap(kit, tmp_path / "m_out", input=mixed)
    # a .dfm with the wrong inputs
    import torch

    class Wrong(torch.nn.Module):
        def forward(self, x):
            return x, x, x

    wrong = tmp_path / "wrong.dfm"
    torch.onnx.export(Wrong(), (torch.rand(1, 3, 32, 32),), str(wrong), input_names=["x"], dynamo=False)
    with pytest.raises(ConfigError, match=r"wrong.dfm: expected one face input of shape \[N, R, R, 3\]"):
        swap(kit, tmp_path / "w.mp4", model=wrong)
    # a model whose face type differs from the dst faceset's
    run_face_extract(ExtractConfig(input=str(kit["clip"]), output_dir=str(tmp_path / "f_faces"), image_size=32, face_type="f",
                                   max_faces=1), RecordingReporter())
    with pytest.raises(ConfigError, match="holds face type 'f', the model face.safetensors was trained on 'wf'"):
        swap(kit, tmp_path / "t.mp4", dst_faceset=str(tmp_path / "f_faces"))
    assert swap(kit, tmp_path / "t.mp4", dst_faceset=str(tmp_path / "f_faces"), face_type="f", end=2).faces == 2  # when asked
    # the CLI says it as one clear line, no traceback
    assert main(["face", "swap", str(kit["clip"]), str(existing), "--model", str(kit["model"])]) != 0
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and "Traceback" not in err


def test_ui_preview_applies_the_form_options_to_one_frame(kit):
    pytest.importorskip("gradio")
    from loratrain.ui.config import AppContext
    from loratrain.ui.pages.face import Page
    from loratrain.ui.workspace import Workspace

    page = Page(AppContext(workspace=Workspace([kit["root"]]), runner=None))
    form = page.sections["Swap"].form
    values = form.to_values({"input": str(kit["clip"]), "model": str(kit["model"]), "output": str(kit["root"] / "ui.mp4")})
    image, note = page.preview(5, *values)
    assert note == "frame 5: 1 face(s) swapped" and image.shape == (256, 512, 3)
    assert np.abs(image[:, :256].astype(int) - image[:, 256:]).mean() > 2  # original | swapped
    raw = form.to_values({"input": str(kit["clip"]), "model": str(kit["model"]), "mode": "raw-rgb"})
    image2, _ = page.preview(5, *raw)
    assert np.abs(image2[:, 256:].astype(int) - image[:, 256:]).mean() > 1  # the options change the preview
    raw = form.to_values({"input": str(kit["clip"]), "model": str(kit["model"]), "mode": "raw-predict"})
    image4, note4 = page.preview(5, *raw)  # the 32-px prediction, enlarged 8x beside the frame
    assert note4 == "frame 5: 1 face(s) swapped" and image4.shape == (256, 512, 3)
    np.testing.assert_array_equal(image4[:, 256:][::8, ::8].repeat(8, 0).repeat(8, 1), image4[:, 256:])
    outside = form.to_values({"input": "/etc/passwd", "model": str(kit["model"])})
    image3, note3 = page.preview(0, *outside)
    assert image3 is None and "outside" in note3.lower()


def _signing_pair(folder: Path) -> tuple[Path, Path]:
    """A throwaway CA and an end-entity signing certificate (C2PA refuses self-signed signers)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, public, ca: bool) -> x509.CertificateBuilder:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("test CA")).public_key(public)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=30)).add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False))
        if ca:
            return b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), True)
        return (b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False))

    root = cert("test CA", ca_key.public_key(), True).sign(ca_key, hashes.SHA256())
    leaf = cert("loratrain test signer", key.public_key(), False).sign(ca_key, hashes.SHA256())
    chain, pem = folder / "chain.pem", folder / "key.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return chain, pem


def test_c2pa_content_credentials_signed_with_the_users_key(kit, tmp_path):
    c2pa = pytest.importorskip("c2pa")
    import json

    chain, key = _signing_pair(tmp_path)
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), cv2.cvtColor(decode(kit["clip"])[2], cv2.COLOR_RGB2BGR))
    for out, kw in ((tmp_path / "signed.png", {"input": still}), (tmp_path / "signed.mp4", {"end": 3})):
        swap(kit, out, c2pa_cert=str(chain), c2pa_key=str(key), **kw)
        store = json.loads(c2pa.Reader(str(out)).json())
        manifest = store["manifests"][store["active_manifest"]]
        actions = [a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
        action = actions[0]["data"]["actions"][0]
        assert action["digitalSourceType"].endswith("compositeWithTrainedAlgorithmicMedia"), out
        assert manifest["signature_info"]["common_name"] == "loratrain test signer"
        assert not [s for s in store.get("validation_status", []) if s["code"] != "signingCredential.untrusted"]
    assert read_image_label(tmp_path / "signed.png")["AI-generated"] == "true"  # our own label stays
    assert "comment         : AI-generated" in probe(tmp_path / "signed.mp4")
    # a key that does not go with anything is named before any work
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="bad.pem: cannot sign"):
        swap(kit, tmp_path / "never.mp4", c2pa_cert=str(chain), c2pa_key=str(bad))
    assert not (tmp_path / "never.mp4").exists()
