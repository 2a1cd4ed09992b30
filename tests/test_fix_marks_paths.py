"""`dataset fix-marks` reads a check report written from another folder, and refuses what it must not touch."""
from __future__ import annotations

import json
import os

from loratrain.cli import main

from .marks_planted import photo, subtitle


def _dataset(root):
    root.mkdir(parents=True)
    img = photo("chelsea", (640, 480))
    subtitle(img, "Where are you going tonight?")
    img.save(root / "img0.png")
    (root / "notes.txt").write_text("not an image", encoding="utf-8")


def test_the_documented_workflow_works_from_a_relative_dataset_path(tmp_path, monkeypatch, capsys):
    _dataset(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    assert main(["dataset", "check", "ds", "--checks", "text_marks", "--json_output", "rep.json", "--quiet"]) in (0, 1)
    report = json.loads((tmp_path / "rep.json").read_text())
    assert [f["path"] for f in report["findings"] if f["check"] == "text_marks"] == [os.path.join("ds", "img0.png")]
    before = (tmp_path / "ds" / "img0.png").read_bytes()
    assert main(["dataset", "fix-marks", "ds", "--mode", "inpaint", "--report", "rep.json", "--quiet"]) == 0
    assert "1 image(s) changed" in capsys.readouterr().out
    assert (tmp_path / "ds" / "img0.png").read_bytes() != before
    assert main(["tags", "undo", "ds"]) == 0 and (tmp_path / "ds" / "img0.png").read_bytes() == before


def test_a_report_naming_state_or_non_images_is_refused_before_any_change(tmp_path, capsys):
    root = tmp_path / "ds"
    _dataset(root)
    (root / ".loratrain" / "backup").mkdir(parents=True)
    (root / ".loratrain" / "backup" / "img0.png").write_bytes((root / "img0.png").read_bytes())
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for name, said in ((".loratrain/backup/img0.png", "dataset's own state"), ("notes.txt", "is not an image")):
        report = tmp_path / "r.json"
        report.write_text(json.dumps({"root": str(root), "findings": [
            {"check": "text_marks", "kind": "band", "path": str(root / "img0.png"), "boxes": [[0, 400, 640, 60]]},
            {"check": "text_marks", "kind": "band", "path": str(root / name), "boxes": [[0, 0, 10, 10]]}]}))
        assert main(["dataset", "fix-marks", str(root), "--mode", "inpaint", "--report", str(report), "--quiet"]) == 2
        assert said in capsys.readouterr().err
        assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # nothing was changed


def test_a_text_model_that_is_not_a_model_file_is_named(tmp_path, capsys):
    root = tmp_path / "ds"
    _dataset(root)
    (tmp_path / "models").mkdir()
    (tmp_path / "notes.onnx").write_text("not a network", encoding="utf-8")
    for model, said in ((tmp_path / "models", "is a folder"), (tmp_path / "notes.onnx", "cannot be loaded as an ONNX")):
        assert main(["dataset", "check", str(root), "--checks", "text_marks", "--text_model", str(model), "--quiet"]) == 2
        assert said in capsys.readouterr().err
