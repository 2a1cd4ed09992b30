"""`loratrain dataset check`: planted bad files each trip their check, clean files pass, quarantine moves only."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance, ImageFilter

from loratrain.cli import main
from loratrain.core.progress import RecordingReporter
from loratrain.dataset_tools.quality.config import CheckConfig
from loratrain.dataset_tools.quality.report import run_check
from loratrain.dataset_tools.synthetic import scene_image

POSES = ["sitting", "running", "lying", "jumping", "walking", "kneeling"]


def clean_set(root: Path, n: int = 6) -> list[Path]:
    """Distinct, sharp, large-enough images with varied UTF-8 captions and the trigger first."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"clean{i}.png"
        scene_image(100 + i).save(p)
        (root / f"clean{i}.txt").write_text(f"sks, {POSES[i % len(POSES)]}, tag{i}", encoding="utf-8")
        paths.append(p)
    return paths


def run(root: Path, **kw):
    return run_check(CheckConfig(dataset_dir=str(root), **kw), RecordingReporter())


def by_check(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(f.check, set()).add(Path(f.path).name)
    return out


def test_clean_dataset_has_no_findings(tmp_path):
    root = tmp_path / "img" / "10_sks"
    clean_set(root)
    report = run(tmp_path / "img")
    assert report.images == 6 and report.findings == []


def test_every_planted_problem_is_found(tmp_path):
    root = tmp_path / "10_sks"
    clean_set(root)
    def save(img, name, caption="sks, misc", **kw):
        img.save(root / name, **kw)
        if caption is not None:
            (root / (Path(name).stem + ".txt")).write_text(caption, encoding="utf-8")

    buf = io.BytesIO()
    scene_image(1).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "truncated.txt").write_text("sks, x", encoding="utf-8")
    save(scene_image(2, (300, 300)), "small.png")
    save(scene_image(3, (1600, 560)), "panorama.png")
    save(scene_image(4), "twin.png")
    save(scene_image(5), "twin.jpg", quality=95, caption=None)
    shutil.copy(root / "clean0.png", root / "copy_of_0.png")
    (root / "copy_of_0.txt").write_text("sks, copy", encoding="utf-8")
    save(ImageEnhance.Brightness(Image.open(root / "clean1.png")).enhance(1.04).convert("RGB"), "near_1.jpg", quality=88)
    save(scene_image(6).filter(ImageFilter.GaussianBlur(5)), "blurred.png")
    save(scene_image(7), "no_caption.png", caption=None)
    save(scene_image(8), "empty.png", caption=" , \n")
    save(scene_image(9), "latin1.png", caption=None)
    (root / "latin1.txt").write_bytes("sks, caf\xe9".encode("latin-1"))
    save(scene_image(10), "wrong_ext.png", caption=None)
    (root / "wrong_ext.caption").write_text("sks, y", encoding="utf-8")
    scene_image(11).save(root / "anim.gif")
    for i in range(6):  # one outfit on almost every captioned image
        p = root / f"clean{i}.txt"
        p.write_text(p.read_text(encoding="utf-8") + ", school uniform", encoding="utf-8")

    report = run(tmp_path, json_output=str(tmp_path / "report.json"))
    found = by_check(report)
    assert found["corrupt"] == {"truncated.jpg"}
    assert found["too_small"] == {"small.png"}
    assert found["extreme_aspect"] == {"panorama.png"}
    assert found["duplicate_stem"] == {"twin.png", "twin.jpg"}
    assert found["exact_duplicate"] == {"copy_of_0.png"}
    assert found["near_duplicate"] == {"near_1.jpg"}
    assert found["blurry"] == {"blurred.png"}
    assert found["unsupported"] == {"anim.gif"}
    assert found["captions"] == {"no_caption.png", "empty.txt", "latin1.txt", "wrong_ext.txt"}  # twin.jpg reads twin.txt
    msgs = {Path(f.path).name: f.message for f in report.findings if f.check == "captions"}
    assert "wrong_ext.caption exists" in msgs["wrong_ext.txt"] and "UTF-8" in msgs["latin1.txt"]
    imbalance = [f.message for f in report.findings if f.check == "tag_imbalance"]
    assert len(imbalance) == 0  # 6 of 14 captioned images: below the 75% default
    assert any("school uniform" in f.message for f in run(tmp_path, tag_share=0.4).findings)
    assert not any("'sks'" in f.message for f in run(tmp_path, tag_share=0.4).findings)  # the folder's own tokens
    blur = next(f for f in report.findings if f.check == "blurry")
    assert blur.score is not None and blur.score < 100
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["counts"]["corrupt"] == 1 and len(saved["findings"]) == len(report.findings)
    # clean images never appear, except clean0/clean1 as the copies kept in a duplicate group
    flagged = {Path(f.path).name for f in report.findings if f.check != "tag_imbalance"}
    assert not any(n.startswith("clean") for n in flagged)


def test_quarantine_moves_flagged_files_and_deletes_nothing(tmp_path, capsys):
    root = tmp_path / "data"
    clean_set(root)
    scene_image(20).filter(ImageFilter.GaussianBlur(5)).save(root / "blurred.png")
    (root / "blurred.txt").write_text("sks, blur", encoding="utf-8")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    shutil.copy(root / "clean2.png", root / "dupe.png")
    (root / "dupe.txt").write_text("sks, dupe", encoding="utf-8")
    before = sorted(p.name for p in root.iterdir())
    q = tmp_path / "quarantine"
    assert main(["dataset", "check", str(root), "--quarantine", str(q), "--quiet"]) == 0  # errors all moved
    moved = sorted(p.name for p in q.rglob("*") if p.is_file() and p.name != "quarantine.json")
    assert moved == ["blurred.png", "blurred.txt", "broken.png", "dupe.png", "dupe.txt"]
    assert sorted(moved + [p.name for p in root.iterdir()]) == before
    manifest = json.loads((q / "quarantine.json").read_text())
    assert {Path(m["from"]).name for m in manifest[0]["moved"]} == set(moved)
    assert "moved 5 file(s)" in capsys.readouterr().out
    assert run(root).findings == []


def test_check_cli_exit_code_and_bad_check_name(tmp_path, capsys):
    root = tmp_path / "d"
    clean_set(root, 2)
    assert main(["dataset", "check", str(root), "--quiet"]) == 0
    (root / "clean0.txt").write_text("", encoding="utf-8")
    assert main(["dataset", "check", str(root), "--quiet"]) == 1
    assert "caption file is empty" in capsys.readouterr().out
    assert main(["dataset", "check", str(root), "--checks", "nope"]) == 2
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "missing")
