"""`loratrain dataset prepare` (repeat folders + TOML the trainer reads) and `dataset frames` (video)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from loratrain.cli import main
from loratrain.dataset_tools.prepare import balance_repeats
from loratrain.dataset_tools.synthetic import scene_image
from loratrain.training.data.subsets import specs_from_toml


def folder(root: Path, n: int, caption: str | None = "x, y") -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(root / f"{i}.png")
        if caption is not None:
            (root / f"{i}.txt").write_text(f"{caption}, {i}", encoding="utf-8")
    return root


def test_balance_rule():
    assert balance_repeats([3, 12, 5]) == [4, 1, 2]  # round(12/5) = 2
    assert balance_repeats([10, 40], steps_per_concept=200) == [20, 5]
    assert balance_repeats([1, 1000], max_repeats=50) == [50, 1]


def test_prepare_builds_folders_and_a_toml_the_trainer_reads(tmp_path, capsys):
    rex = folder(tmp_path / "src" / "rex", 3)
    cat = folder(tmp_path / "src" / "cat", 12, caption=None)
    reg = folder(tmp_path / "src" / "dogs", 5, caption=None)
    out = tmp_path / "out"
    assert main(["dataset", "prepare", str(out), "--concepts", f"{rex}=sks dog", str(cat), "--reg_dir", str(reg),
                 "--reg_class", "dog", "--resolution", "64", "--keep_tokens", "1"]) == 0
    text = capsys.readouterr().out
    assert "12 image(s) have no caption" in text
    assert sorted(p.name for p in (out / "img").iterdir()) == ["1_cat", "4_sks dog"]
    assert sorted(os.listdir(out / "img" / "4_sks dog")) == sorted([f"{i}.png" for i in range(3)] + [f"{i}.txt" for i in range(3)])
    assert os.path.samefile(out / "img" / "4_sks dog" / "0.png", rex / "0.png")  # hard link by default
    assert not os.path.samefile(out / "img" / "4_sks dog" / "0.txt", rex / "0.txt")  # captions are copies

    toml = (out / "dataset.toml").read_text()
    assert toml.count('caption_extension = ".txt"') == 4  # general and every subset: never left to a default
    spec, = specs_from_toml(out / "dataset.toml", {})
    got = {(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg, len(s.images())) for s in spec.subsets}
    assert got == {("4_sks dog", 4, "sks dog", False, 3), ("1_cat", 1, "cat", False, 12), ("1_dog", 1, "dog", True, 5)}
    assert spec.resolution == (64, 64) and all(s.keep_tokens == 1 for s in spec.subsets)

    # a second run would mix into the same folders: refused before anything is written
    assert main(["dataset", "prepare", str(out), "--concepts", str(rex)]) == 2
    assert main(["dataset", "prepare", str(out), "--concepts", f"{rex}=sks dog", "--steps_per_concept", "12", "--overwrite"]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert main(["dataset", "prepare", str(rex / "sub"), "--concepts", str(rex)]) == 2  # output inside a source


def test_prepare_copy_and_symlink(tmp_path):
    src = folder(tmp_path / "a", 2)
    for mode in ("copy", "symlink"):
        out = tmp_path / mode
        assert main(["dataset", "prepare", str(out), "--concepts", f"{src}=tok", "--link", mode]) == 0
        img = out / "img" / "1_tok" / "0.png"
        assert img.is_symlink() == (mode == "symlink") and Image.open(img).size == (16, 16)


def make_video(path: Path) -> None:
    import imageio_ffmpeg

    sharp_a, sharp_b = scene_image(1, (320, 240)), scene_image(2, (320, 240))
    blurred = scene_image(3, (320, 240)).filter(ImageFilter.GaussianBlur(6))
    writer = imageio_ffmpeg.write_frames(str(path), (320, 240), fps=10, ffmpeg_log_level="error")
    writer.send(None)
    for img in [sharp_a] * 10 + [blurred] * 10 + [sharp_b] * 10:  # three 1-second shots
        writer.send(np.asarray(img).tobytes())
    writer.close()


def test_frames_keep_one_frame_per_static_sharp_shot(tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    make_video(video)
    assert main(["dataset", "frames", str(video), "--fps", "5", "--quiet"]) == 0
    out = tmp_path / "clip_frames"
    kept = sorted(p.name for p in out.glob("*.png"))
    assert kept == ["clip_00000000ms.png", "clip_00002000ms.png"]
    assert "15 frame(s) extracted, 2 kept" in capsys.readouterr().out
    manifest = json.loads((out / "clip_frames.json").read_text())
    assert [f["time"] for f in manifest["frames"]] == [0.0, 2.0]
    assert Image.open(out / kept[0]).size == (320, 240)
    # without the filters every extracted frame is kept
    assert main(["dataset", "frames", str(video), "--fps", "5", "--blur_threshold", "0", "--near_duplicate_distance", "-1",
                 "--output_dir", str(tmp_path / "all"), "--quiet"]) == 0
    assert len(list((tmp_path / "all").glob("*.png"))) == 15
    assert main(["dataset", "frames", str(video), "--fps", "5"]) == 2  # would mix with the first run


def test_frames_bad_input(tmp_path, capsys):
    assert main(["dataset", "frames", str(tmp_path / "missing.mp4")]) == 2
    (tmp_path / "notes.mp4").write_text("not a video")
    assert main(["dataset", "frames", str(tmp_path / "notes.mp4")]) == 2
    err = capsys.readouterr().err
    assert "missing.mp4" in err and "notes.mp4" in err
    assert not (tmp_path / "notes_frames").exists()


@pytest.mark.parametrize("spec", ["a=", "a=x/y"])
def test_bad_concept_specs(tmp_path, spec):
    assert main(["dataset", "prepare", str(tmp_path / "o"), "--concepts", spec]) == 2
