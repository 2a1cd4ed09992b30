"""`loratrain dataset check` people, shot_balance and extension_mismatch, through the CLI, on scikit-image's real face.

The astronaut's head (dlib HOG finds it at any scale used here) is pasted once or twice, and at
planted scales into larger canvases, so the face count and the shot class are known in advance.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loratrain.cli import main

pytest.importorskip("dlib")
pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

CHECKS = ["--checks", "people", "shot_balance", "extension_mismatch"]


def head() -> Image.Image:
    """Head and neck, 260 px square; dlib's face box is about 90 px of it (a face height of about 0.35)."""
    return Image.fromarray(skimage_data.astronaut()[0:260, 100:360])


def canvas(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth, slightly noisy background with nothing face-like in it."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(90, 200, h)[:, None, None] * np.array([0.9, 1.0, 1.1]) + np.zeros((1, w, 1))
    return Image.fromarray(np.clip(ramp + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8))


def framed(face_ratio: float, height: int, seed: int) -> Image.Image:
    """The head scaled so its face box is about `face_ratio` of the image height, near the top as a person's is."""
    side = round(face_ratio * height * 260 / 90)
    img = canvas((height * 3 // 4, height), seed)
    img.paste(head().resize((side, side), Image.Resampling.LANCZOS), ((img.width - side) // 2, height // 20))
    return img


def two_faces() -> Image.Image:
    img = canvas((640, 320), 9)
    img.paste(head().resize((300, 300)), (10, 10))
    img.paste(head().transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 300)), (330, 10))
    return img


def check(root: Path, tmp_path: Path, *args: str, checks: list[str] = CHECKS) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    rc = main(["dataset", "check", str(root), *checks, "--json_output", str(out), "--quiet", *args])
    return rc, json.loads(out.read_text(encoding="utf-8"))


def names(report: dict, check: str, severity: str | None = None) -> set[str]:
    return {Path(f["path"]).name for f in report["findings"] if f["check"] == check and severity in (None, f["severity"])}


@pytest.fixture(scope="module")
def people_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("people") / "img"
    alice, other = root / "10_alice", root / "5_group"
    alice.mkdir(parents=True)
    other.mkdir()
    head().resize((512, 512), Image.Resampling.LANCZOS).save(alice / "close_a.png")
    framed(0.40, 640, 1).save(alice / "close_b.png")
    framed(0.16, 768, 2).save(alice / "half.png")
    framed(0.06, 1024, 3).save(alice / "full.png")
    two_faces().save(alice / "pair.png")
    two_faces().save(other / "pair.png")
    framed(0.16, 768, 4).save(other / "one.png")
    return root


def test_two_faces_are_flagged_and_one_face_is_not(people_set, tmp_path):
    rc, report = check(people_set, tmp_path)
    assert rc == 0  # nobody said which concepts are people: more than one face is a warning
    assert names(report, "people", "warning") == {"pair.png"} and len(names(report, "people")) == 1
    flagged = {f["path"] for f in report["findings"] if f["check"] == "people"}
    assert flagged == {str(people_set / "10_alice" / "pair.png"), str(people_set / "5_group" / "pair.png")}
    faces = report["sections"]["people"]["images"]
    assert {Path(p).name: v["faces"] for p, v in faces.items() if "10_alice" in p} == {
        "close_a.png": 1, "close_b.png": 1, "half.png": 1, "full.png": 1, "pair.png": 2}
    x0, y0, x1, y1, score = faces[str(people_set / "10_alice" / "close_a.png")]["boxes"][0]
    assert 140 < x0 < 220 and 120 < x1 - x0 < 240 and score > 0.5  # the box, in the image's own pixels

    rc, report = check(people_set, tmp_path, "--person_concepts", "alice")  # class tokens name the concept
    assert rc == 1
    errors = [f for f in report["findings"] if f["check"] == "people" and f["severity"] == "error"]
    assert [Path(f["path"]).parent.name for f in errors] == ["10_alice"] and "2 faces" in errors[0]["message"]
    assert report["sections"]["people"]["person_concepts"] == ["10_alice"]

    rc, report = check(people_set, tmp_path, "--person_concepts", "bob")
    assert rc == 1 and any("'bob' names no concept folder" in f["message"] for f in report["findings"])


def test_planted_framing_gets_its_shot_class_and_the_mix_is_judged(people_set, tmp_path, capsys):
    rc, report = check(people_set, tmp_path, "--people")
    section = report["sections"]["shot_balance"]
    shots = {Path(p).relative_to(people_set).as_posix(): v for p, v in section["images"].items()}
    assert {k: v["shot"] for k, v in shots.items() if k.startswith("10_alice")} == {
        "10_alice/close_a.png": "close-up", "10_alice/close_b.png": "close-up", "10_alice/half.png": "half-body",
        "10_alice/full.png": "full-body", "10_alice/pair.png": "close-up"}
    assert 0.3 < shots["10_alice/close_a.png"]["face_height"] < 0.45 and shots["10_alice/full.png"]["face_height"] < 0.09
    assert all(v["view"] == "frontal" and abs(v["yaw"]) < 10 for v in shots.values())  # pair.png's faces are off-centre
    alice = section["concepts"]["10_alice"]
    assert alice["shots"] == {"close-up": 3, "half-body": 1, "full-body": 1, "no face": 0}
    assert alice["views"]["frontal"] == 5 and alice["person"] == "declared"
    assert alice["advice"] == ["add three-quarter and side views"]  # every shot class is there, every face frontal
    assert section["concepts"]["5_group"]["advice"] == []  # 2 images: too few to judge
    assert "close-up" in section["recommendation"] and "full-body" in section["recommendation"]
    balance = [f for f in report["findings"] if f["check"] == "shot_balance"]
    assert [Path(f["path"]).name for f in balance] == ["10_alice"] and balance[0]["severity"] == "warning"
    assert "shot mix 10_alice (5 image(s)): close-up 3, half-body 1, full-body 1" in capsys.readouterr().out


def test_yaw_from_landmarks_gives_the_view():
    """A generic head turned by a known angle, projected through a pinhole camera, is classed by that angle; a head
    at the side of the picture that looks into the lens is frontal."""
    from loratrain.dataset_tools.quality.people import HEAD_MODEL, HEAD_POINTS, head_yaw, view_class

    w = h = 512
    side = np.degrees(np.arctan2(-800, 2000))  # the turn that faces the camera from 800 units to the right
    for turn, x, want, view in ((0, 0, 0, "frontal"), (15, 0, 15, "frontal"), (-40, 0, -40, "three-quarter"),
                                (45, 0, 45, "three-quarter"), (70, 0, 70, "profile"), (side, 800, 0, "frontal")):
        a = np.radians(turn)
        # the model's x runs to the subject's left and z towards the viewer; the camera's y runs down, z away
        rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        cam = (HEAD_MODEL @ rot.T) * np.array([1, -1, -1]) + np.array([x, 0, 2000])
        lm = np.zeros((68, 2))
        lm[HEAD_POINTS] = cam[:, :2] / cam[:, 2:] * w + np.array([w / 2, h / 2])
        yaw = head_yaw(lm, (h, w))
        assert yaw is not None and abs(yaw - want) < 3 and view_class(yaw) == view, (turn, x, yaw)


def test_content_that_disagrees_with_the_extension_is_found(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    canvas((96, 96), 1).save(root / "real.png")
    canvas((96, 96), 2).save(root / "png_named.jpg", format="PNG")
    canvas((96, 96), 3).save(root / "jpeg_named.png", format="JPEG")
    canvas((96, 96), 4).save(root / "webp_named.jpg", format="WEBP")
    buf = io.BytesIO()
    canvas((96, 96), 5).save(buf, format="JPEG")
    (root / "fine.jpeg").write_bytes(buf.getvalue())
    rc, report = check(root, tmp_path, "--checks", "extension_mismatch")
    assert rc == 0  # Pillow reads by content: the trainer and the tagger still work, so it is a warning
    found = {Path(f["path"]).name: f["message"] for f in report["findings"]}
    assert set(found) == {"png_named.jpg", "jpeg_named.png", "webp_named.jpg"}
    assert "content is PNG but the name says .jpg" in found["png_named.jpg"] and "rename it to png_named.png" in found["png_named.jpg"]
    assert "content is JPEG but the name says .png" in found["jpeg_named.png"]
    assert "content is WEBP" in found["webp_named.jpg"]


def test_without_the_face_extra_the_face_checks_say_they_were_skipped(people_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dlib", None)  # as on an install without `loratrain[face]`
    rc, report = check(people_set, tmp_path, checks=[])  # every check, none of them asked for by name
    assert rc == 0 and not names(report, "people") and not names(report, "shot_balance")
    for name in ("people", "shot_balance"):
        assert "needs dlib" in report["sections"][name]["skipped"] and "loratrain[face]" in report["sections"][name]["skipped"]
    assert "people: skipped, needs dlib: pip install 'loratrain[face]'" in capsys.readouterr().out
    rc, report = check(people_set, tmp_path, "--people")  # asked for (here also by --checks): a warning finding as well
    skipped = [f for f in report["findings"] if f["check"] in ("people", "shot_balance")]
    assert rc == 0 and len(skipped) == 2 and all(f["severity"] == "warning" and "skipped" in f["message"] for f in skipped)


def test_dataset_page_shows_the_people_findings_and_shot_classes(people_set, tmp_path):
    from loratrain.ui.events import Snapshot
    from loratrain.ui.pages.dataset import findings_images, shot_images

    _, report = check(people_set, tmp_path, "--person_concepts", "10_alice")  # the folder name works too
    snap = Snapshot(data=report)
    flagged = dict(findings_images(snap))
    assert flagged[str(people_set / "10_alice" / "pair.png")].startswith("error · people: 2 faces")
    shots = dict(shot_images(snap))
    assert shots[str(people_set / "10_alice" / "full.png")].startswith("full-body · frontal · face 6%")
    assert len(shots) == 7 and json.dumps(shots)
