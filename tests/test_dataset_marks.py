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


def test_line_grouping_does_not_depend_on_how_the_pairs_are_chunked(monkeypatch):
    """Letter components are paired in bounded chunks (a grass photo has thousands); the lines must not change."""
    from loratrain.dataset_tools.quality import marks

    rng = np.random.default_rng(3)
    n = 600
    comps = np.zeros((n, 7), np.int64)
    comps[:, 0], comps[:, 1] = rng.integers(0, 900, n), rng.integers(0, 700, n)
    comps[:, 2], comps[:, 3] = rng.integers(3, 20, n), rng.integers(8, 24, n)
    comps[:, 5], comps[:, 6] = np.arange(1, n + 1), 1
    whole = marks._lines(comps)
    monkeypatch.setattr(marks, "_PAIRS", 7)
    chunked = marks._lines(comps)
    assert 1 < len(whole) < n and [g[:, 5].tolist() for g in whole] == [g[:, 5].tolist() for g in chunked]


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


def db_standin(path: Path, map_2d: bool = True) -> None:
    """A DB-style text detector as small as it gets: input 1x3xHxW (OpenCV's mean-subtracted /255 blob), output the
    HxW probability map OpenCV's DB post-processing reads, high where the pixel is dark (sigmoid of -20 x (grey + 0.2)).
    OpenCV 5.1 refuses a 1x1xHxW map from the same graph ("dims <= 2"): the DB models it reads end in HxW."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.full((1, 3, 1, 1), 1 / 3, np.float32), "grey"),
               numpy_helper.from_array(np.array([0.2], np.float32), "shift"),
               numpy_helper.from_array(np.array(-20.0, np.float32), "gain"),
               numpy_helper.from_array(np.array([0, 1], np.int64), "axes")]
    nodes = [helper.make_node("Conv", ["x", "grey", "shift"], ["g"]), helper.make_node("Mul", ["g", "gain"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["p" if map_2d else "y"])]
    if map_2d:
        nodes.append(helper.make_node("Squeeze", ["p", "axes"], ["y"]))
    shape = ["h", "w"] if map_2d else [1, 1, "h", "w"]
    graph = helper.make_graph(nodes, "db_standin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_text_model_boxes_come_from_the_onnx_detector_where_overlays_go(tmp_path):
    """--text_model runs the user's DB detector through OpenCV: a dark bar in the bottom band is reported with its box,
    a dark block mid-image (scene text for the positional prior) is not; a light image gives no finding."""
    model = tmp_path / "db_standin.onnx"
    db_standin(model)
    root = tmp_path / "data"
    root.mkdir()
    img = np.full((480, 640, 3), 225, np.uint8)
    img[420:450, 200:440] = 15  # a caption bar: [200, 420, 240, 30]
    img[200:260, 280:360] = 15  # mid-image
    Image.fromarray(img).save(root / "bar.png")
    Image.fromarray(np.full((480, 640, 3), 225, np.uint8)).save(root / "plain.png")
    report = tmp_path / "r.json"
    rc = main(["dataset", "check", str(root), "--checks", "text_marks", "--text_model", str(model),
               "--json_output", str(report), "--quiet"])
    assert rc == 0
    found = json.loads(report.read_text(encoding="utf-8"))["findings"]
    assert [Path(f["path"]).name for f in found] == ["bar.png"], found
    f = found[0]
    assert f["check"] == "text_marks" and f["kind"] == "band" and "text band" in f["message"] and f["score"] > 0.5
    assert len(f["boxes"]) == 1 and overlap(f["boxes"][0], [200, 420, 240, 30])[0] >= 0.95, f["boxes"]
    x, y, w, h = f["boxes"][0]
    assert x >= 150 and x + w <= 490 and y >= 380 and y + h <= 480  # the bar grown by DB's unclip, not the block


def test_a_text_model_whose_map_opencv_refuses_is_one_clear_error(tmp_path, capsys):
    model = tmp_path / "db_4d.onnx"
    db_standin(model, map_2d=False)
    root = tmp_path / "data"
    root.mkdir()
    img = np.full((480, 640, 3), 225, np.uint8)
    img[420:450, 200:440] = 15
    Image.fromarray(img).save(root / "bar.png")
    rc = main(["dataset", "check", str(root), "--checks", "text_marks", "--text_model", str(model), "--quiet"])
    err = capsys.readouterr().err
    if rc != 0:  # OpenCV 5.1: "dims <= 2"; an OpenCV that reads 1x1xHxW maps would simply find the bar
        assert f"text_model: {model} failed on an image" in err and "HxW probability map" in err and "Traceback" not in err


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


def test_a_report_naming_the_journals_own_backups_changes_nothing_and_undo_still_works(tmp_path, capsys):
    """A hostile report may name `.loratrain/backup/<image>` (inside the dataset, so not refused as outside): fix-marks
    then inpainted the journal's own backups and wrote a journal entry that `tags undo` refuses as "outside the
    dataset", so undo was stuck. The journal refuses to change its own folder, and the first fix still undoes."""
    root = tmp_path / "data"
    _fixable_set(root)
    before = {p.name: sha(p) for p in root.iterdir()}
    check(root, tmp_path / "report.json", "text_marks")
    assert main(["dataset", "fix-marks", str(root), "--mode", "inpaint", "--report", str(tmp_path / "report.json"), "--quiet"]) == 0
    backups = {p.name: sha(p) for p in (root / ".loratrain" / "backup").iterdir()}
    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps({"findings": [{"check": "text_marks", "kind": "band", "path": f".loratrain/backup/{name}",
                                              "boxes": [[0, 0, 40, 40]]} for name in backups]}), encoding="utf-8")
    capsys.readouterr()
    assert main(["dataset", "fix-marks", str(root), "--mode", "inpaint", "--report", str(evil), "--quiet"]) == 2
    assert "inside the dataset's own state" in capsys.readouterr().err
    assert {p.name: sha(p) for p in (root / ".loratrain" / "backup").iterdir()} == backups
    assert len(list((root / ".loratrain" / "journal").glob("*.jsonl"))) == 1
    assert main(["tags", "undo", str(root)]) == 0
    assert {p.name: sha(p) for p in root.iterdir() if p.is_file()} == before


def test_an_image_too_large_for_pillow_is_skipped_and_named_not_a_traceback(tmp_path, capsys, monkeypatch):
    """Pillow's DecompressionBombError (over ~179 megapixels) is no OSError: it reached the user as a traceback. Now
    such an image is skipped with the reason, and the others go on."""
    root = tmp_path / "data"
    _fixable_set(root)
    report = tmp_path / "report.json"
    check(root, report, "text_marks")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # these images stand in for a 200-megapixel one
    before = {p.name: sha(p) for p in root.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["dataset", "fix-marks", str(root), "--report", str(report), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and out.count("not fixed: Image size") == 3  # each image skipped, named
    assert {p.name: sha(p) for p in root.iterdir() if p.is_file()} == before
