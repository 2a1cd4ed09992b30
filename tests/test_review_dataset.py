"""Review of the dataset check / fix-marks change: wrong options are refused before any heavy work, and the
check modules are not imported with the options."""
from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from loratrain.cli import main


def _dataset(root):
    root.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(root / f"img{i}.png")


def test_a_missing_text_model_is_refused_before_any_image_is_measured(tmp_path, monkeypatch, capsys):
    from loratrain.dataset_tools.quality import report

    _dataset(tmp_path / "ds")
    monkeypatch.setattr(report, "measure", lambda p: (_ for _ in ()).throw(AssertionError("measured")))
    for model, said in ((tmp_path / "none.onnx", "not found"), (tmp_path / "ds", "is a folder")):
        assert main(["dataset", "check", str(tmp_path / "ds"), "--text_model", str(model), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"text_model: {model} {said}" in err and "Traceback" not in err


def test_a_wrong_images_option_is_refused_before_the_marks_are_detected_again(tmp_path, monkeypatch, capsys):
    from loratrain.dataset_tools.quality import fix_marks

    _dataset(tmp_path / "ds")
    (tmp_path / "out.png").write_bytes((tmp_path / "ds" / "img0.png").read_bytes())
    (tmp_path / "ds" / "link.png").symlink_to(tmp_path / "out.png")
    monkeypatch.setattr(fix_marks, "detect_boxes", lambda *a: (_ for _ in ()).throw(AssertionError("detected")))
    for image in ("../out.png", str(tmp_path / "out.png"), "link.png"):
        assert main(["dataset", "fix-marks", str(tmp_path / "ds"), "--images", image, "--quiet"]) == 2
        assert f"images: {image!r} is outside the dataset folder" in capsys.readouterr().err
    assert main(["dataset", "fix-marks", str(tmp_path / "ds"), "--images", ".loratrain/x.png", "--quiet"]) == 2
    assert "inside the dataset's own state" in capsys.readouterr().err


def test_the_check_options_do_not_import_the_checks():
    code = ("import sys, loratrain.dataset_tools.quality.config; "
            "print(any(m.endswith(('.marks_check', '.quality.checks', '.people')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_marks_panel_reads_a_relative_report_path_as_fix_marks_does(tmp_path, monkeypatch):
    from loratrain.ui.pages.dataset_marks import marks_view

    _dataset(tmp_path / "ds")
    monkeypatch.chdir(tmp_path / "ds")  # the app's working folder is not where `dataset check ds` ran
    report = {"root": "ds", "findings": [{"check": "text_marks", "kind": "band", "path": "ds/img0.png",
                                          "boxes": [[0, 50, 64, 10]], "score": 1.0},
                                         {"check": "text_marks", "kind": "band", "path": "../elsewhere.png",
                                          "boxes": [[0, 0, 5, 5]], "score": 1.0}]}
    gallery, table, names = marks_view(tmp_path / "ds", json.loads(json.dumps(report)))
    assert names == ["img0.png"] and len(gallery) == 1 and list(table["image"]) == ["img0.png"]
