"""`dataset check` text_marks / video_marks and `dataset fix-marks`: planted overlays are found, skimage's clean
photos are not flagged, and crop / inpaint change the images in a way `tags undo` reverts byte for byte."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loratrain.cli import main

from .marks_planted import CLEAN, corner, overlap, photo, planted_set, subtitle, timestamp, video_frames


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(root: Path, out: Path, *checks: str) -> dict:
    assert main(["dataset", "check", str(root), "--checks", *checks, "--json_output", str(out), "--quiet"]) in (0, 1)
    return json.loads(out.read_text(encoding="utf-8"))


def hits(report: dict, name: str) -> list[dict]:
    return [f for f in report["findings"] if Path(f["path"]).name == name]


def test_planted_overlays_are_found_and_clean_photos_pass(tmp_path):
    planted, clean = tmp_path / "planted", tmp_path / "clean"
    planted.mkdir()
    clean.mkdir()
    truth = {}
    for name, img, kind, box in planted_set():
        img.save(planted / f"{name}.png")
        truth[f"{name}.png"] = (kind, box)
    assert len(truth) >= 20
    report = check(planted, tmp_path / "planted.json", "text_marks")
    found = 0
    for name, (kind, box) in truth.items():
        for f in hits(report, name):
            assert f["check"] == "text_marks" and f["boxes"] and f["kind"]
            if kind == "tiled":
                found += f["kind"] == "tiled"
                break
            if any(min(overlap(b, box)) >= 0.3 and overlap(b, box)[0] >= 0.5 for b in f["boxes"]):
                found += 1
                break
    assert found / len(truth) >= 0.9, f"recall {found}/{len(truth)}"

    for name in CLEAN:  # skimage's photos as shipped, and once more as a JPEG
        photo(name).save(clean / f"{name}.png")
        photo(name).save(clean / f"{name}_q80.jpg", quality=80)
    report = check(clean, tmp_path / "clean.json", "text_marks")
    flagged = {f["path"] for f in report["findings"]}
    assert len(flagged) <= 1, flagged


def test_a_logo_that_stays_put_in_a_moving_clip_is_found(tmp_path):
    box = video_frames(tmp_path / "clip", 8)
    report = check(tmp_path / "clip", tmp_path / "r.json", "video_marks")
    per_frame = {Path(f["path"]).name: f for f in report["findings"]}
    assert len(per_frame) == 8
    for f in per_frame.values():
        assert f["kind"] == "static" and len(f["group"]) == 8
        assert any(overlap(b, box)[0] >= 0.7 and overlap(b, box)[1] >= 0.3 for b in f["boxes"]), f["boxes"]
    # the same pan without the logo, and frames of unrelated photos: nothing stays put, nothing is reported
    still = tmp_path / "nologo"
    still.mkdir()
    scene = photo("coffee", (1200, 800))
    for i in range(6):
        scene.crop((40 + i * 70, 60 + i * 10, 680 + i * 70, 540 + i * 10)).save(still / f"shot-{i:04d}.png")
    assert check(still, tmp_path / "n.json", "video_marks")["findings"] == []


def _fixable_set(root: Path) -> dict[str, list[int]]:
    root.mkdir()
    boxes = {}
    img = photo("chelsea", (640, 480))
    boxes["sub.png"] = subtitle(img, "Where are you going tonight?")
    img.save(root / "sub.png")
    img = photo("astronaut", (600, 600))
    boxes["sign.jpg"] = corner(img, "@pixel.witch", "tl", (255, 255, 255), scale=1 / 20)
    img.save(root / "sign.jpg", quality=92)
    img = photo("coffee", (800, 600))
    boxes["stamp.png"] = timestamp(img, "br", (255, 200, 40))
    img.save(root / "stamp.png")
    (root / "sub.txt").write_text("cat, subtitle", encoding="utf-8")
    return boxes


@pytest.mark.parametrize("mode", ["crop", "inpaint"])
def test_fix_marks_changes_the_marks_and_undo_restores_bytes(tmp_path, mode, capsys):
    root = tmp_path / "data"
    truth = _fixable_set(root)
    before = {p.name: sha(p) for p in root.iterdir()}
    report_path = tmp_path / "report.json"
    report = check(root, report_path, "text_marks")
    assert {Path(f["path"]).name for f in report["findings"]} == set(truth)

    assert main(["dataset", "fix-marks", str(root), "--mode", mode, "--report", str(report_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 image(s) changed" in out and "tags undo" in out
    for name, box in truth.items():
        assert sha(root / name) != before[name]
        arr = np.asarray(Image.open(root / name).convert("RGB"))
        if mode == "inpaint":  # same size; the marked pixels changed
            old = np.asarray(Image.open(root / ".loratrain" / "backup" / name).convert("RGB"))
            assert arr.shape == old.shape
            x, y, w, h = box
            assert np.abs(arr[y:y + h, x:x + w].astype(int) - old[y:y + h, x:x + w]).mean() > 10
        else:
            assert arr.shape[0] < 600 or arr.shape[1] < 800  # something was cut off
    assert sha(root / "sub.txt") == before["sub.txt"]
    again = check(root, tmp_path / "again.json", "text_marks")
    for f in again["findings"]:  # whatever is still found is not the planted mark
        for b in f["boxes"]:
            if mode == "inpaint":
                assert overlap(b, truth[Path(f["path"]).name])[0] < 0.3, f
    if mode == "crop":
        assert again["findings"] == []

    assert main(["tags", "undo", str(root)]) == 0
    assert {p.name: sha(p) for p in root.iterdir() if p.is_file()} == before


def test_fix_marks_redetects_without_a_report_and_dry_run_writes_nothing(tmp_path, capsys):
    root = tmp_path / "data"
    _fixable_set(root)
    before = {p.name: sha(p) for p in root.iterdir()}
    assert main(["dataset", "fix-marks", str(root), "--mode", "inpaint", "--dry_run", "--quiet"]) == 0
    assert "3 image(s) would be changed" in capsys.readouterr().out
    assert {p.name: sha(p) for p in root.iterdir() if p.is_file()} == before
    assert main(["dataset", "fix-marks", str(root), "--mode", "crop", "--images", "sub.png", "--quiet"]) == 0
    assert sha(root / "sub.png") != before["sub.png"] and sha(root / "stamp.png") == before["stamp.png"]
    assert main(["tags", "undo", str(root)]) == 0
    assert sha(root / "sub.png") == before["sub.png"]


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/hostname", "sub.png/../../outside.png"])
def test_report_paths_outside_the_dataset_are_refused(tmp_path, bad, capsys):
    root = tmp_path / "data"
    _fixable_set(root)
    outside = tmp_path / "outside.png"
    photo("camera", (300, 300)).save(outside)
    before = sha(outside)
    report = tmp_path / "evil.json"
    report.write_text(json.dumps({"findings": [{"check": "text_marks", "kind": "band", "path": bad,
                                                "boxes": [[0, 0, 50, 50]]}]}), encoding="utf-8")
    assert main(["dataset", "fix-marks", str(root), "--report", str(report), "--quiet"]) != 0
    assert "outside the dataset folder" in capsys.readouterr().err
    assert sha(outside) == before and not (root / ".loratrain" / "journal").exists()


def test_malformed_report_and_bad_text_model_are_named(tmp_path, capsys):
    root = tmp_path / "data"
    _fixable_set(root)
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"findings": [{"check": "text_marks", "kind": "band", "path": "sub.png",
                                                "boxes": [[0, 0, "x", 5]]}]}), encoding="utf-8")
    assert main(["dataset", "fix-marks", str(root), "--report", str(report), "--quiet"]) != 0
    assert "malformed 'boxes'" in capsys.readouterr().err
    model = tmp_path / "db.onnx"
    model.write_bytes(b"not a model")
    assert main(["dataset", "check", str(root), "--checks", "text_marks", "--text_model", str(model), "--quiet"]) != 0
    assert "cannot be loaded as an ONNX text detector" in capsys.readouterr().err


def test_dataset_page_marks_panel_shows_boxes_and_fixes_through_the_journal(tmp_path):
    from loratrain.ui.config import AppContext
    from loratrain.ui.pages.dataset import Page
    from loratrain.ui.workspace import Workspace

    root = tmp_path / "data"
    _fixable_set(root)
    before = {p.name: sha(p) for p in root.iterdir()}
    check(root, tmp_path / "report.json", "text_marks")
    page = Page(AppContext(workspace=Workspace([tmp_path]), runner=None))
    gallery, table, choices, status = page.marks.show("data", "report.json")
    assert len(gallery) == 3 and set(table["image"]) == {"sub.png", "sign.jpg", "stamp.png"} and "3 finding(s)" in status
    thumb = gallery[0][0]
    assert thumb.ndim == 3 and ((thumb[..., 0] == 255) & (thumb[..., 1] == 0)).any()  # a red box is drawn
    assert sha(root / "sub.png") == before["sub.png"]  # showing changes nothing

    message, *_ = page.marks.fix("data", "report.json", ["sub.png"], "inpaint")
    assert "1 image(s) changed by inpaint" in message
    assert sha(root / "sub.png") != before["sub.png"] and sha(root / "stamp.png") == before["stamp.png"]
    page.undo("data", ".txt", True, "", "", "")  # the page's Undo shares the journal
    assert {p.name: sha(p) for p in root.iterdir() if p.is_file()} == before

    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps({"findings": [{"check": "text_marks", "kind": "band", "path": "../x.png",
                                              "boxes": [[0, 0, 5, 5]]}]}), encoding="utf-8")
    assert "outside the dataset folder" in page.marks.show("data", "evil.json")[3]
    assert "outside the dataset folder" in page.marks.fix("data", "evil.json", [], "crop")[0]
