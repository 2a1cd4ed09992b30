"""The face page's Masks tab (XSeg labelling): click → face pixel mapping, drawing, the editor's handlers on a real
faceset, and the whole editor in a headless Chromium (marked slow, like the other browser tests).

The faces are extracted from the synthetic demo photos (offline); what is checked is what the face files hold
afterwards: DeepFaceLab's `seg_ie_polys` structure with the clicked points.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.demo_data import make_photos
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.faceset import load_face, read_meta, write_meta
from loratrain.facetrain.xseg.polys import EXCLUDE, INCLUDE, Poly, polygon_area
from loratrain.ui.config import AppContext
from loratrain.ui.pages.face_masks import (
    DISPLAY,
    DRAWING_RGB,
    EXCLUDE_RGB,
    INCLUDE_RGB,
    MasksTab,
    display_scale,
    draw_face,
    face_mask,
    one_name,
    to_display,
    to_face,
)
from loratrain.ui.workspace import Workspace

from .conftest import running_app
from .test_ui_browser import CHROMIUM_ARGS, chromium_path, fill

FACE = 96


def make_faceset(root: Path, n: int = 3) -> Path:
    make_photos(root / "mask_photos", n, 0, "src")
    run_face_extract(ExtractConfig(input=str(root / "mask_photos"), output_dir=str(root / "faces"), image_size=FACE,
                                   max_faces=1), RecordingReporter())
    return root / "faces"


# ---------------------------------------------------------------- pure helpers


def test_clicks_map_to_face_pixel_centres_at_any_scale():
    assert display_scale(96) == pytest.approx(DISPLAY / 96) and display_scale(DISPLAY) == 1 and display_scale(1024) == 1
    assert to_face([37, 81], 1.0, 96, 96) == [37, 81]  # shown 1:1: a click is the pixel itself
    s = display_scale(FACE)
    for face_px in (0, 1, 17, 48, 95):
        centre = to_display([[face_px, face_px]], s)[0]  # where that face pixel's centre is shown
        assert to_face(list(centre), s, FACE, FACE) == pytest.approx([face_px, face_px], abs=0.5 / s + 1e-6)
    # every shown pixel maps inside the face, and back to (almost) itself; the outer half face pixel (beyond the
    # edge pixels' centres) maps onto the edge
    xs = np.arange(0, DISPLAY)
    faced = np.array([to_face([x, x], s, FACE, FACE)[0] for x in xs])
    assert faced.min() == 0 and faced.max() == FACE - 1 and (np.diff(faced) >= 0).all()
    back = to_display(np.stack([faced, faced], 1), s)[:, 0]
    inner = (xs >= s / 2) & (xs <= DISPLAY - s / 2)
    assert np.abs(back - xs)[inner].max() <= 1 and np.abs(back - xs).max() <= s / 2
    assert to_face([0, 0], s, FACE, FACE) == [0, 0] and to_face([DISPLAY - 1, DISPLAY - 1], s, FACE, FACE) == [95, 95]
    for bad in (None, [1], [1, 2, 3], ["x", 1], [math.nan, 2], [1, math.inf], "12"):
        assert to_face(bad, s, FACE, FACE) is None


def test_drawing_shows_polygons_points_and_the_mask():
    face = np.full((FACE, FACE, 3), 200, np.uint8)  # BGR grey
    s = display_scale(FACE)
    inc = Poly(INCLUDE, [[10, 10], [80, 10], [80, 80], [10, 80]])
    exc = Poly(EXCLUDE, [[40, 40], [60, 40], [60, 60]])
    mask = face_mask(SimpleNamespace(xseg_mask=lambda size: None), [inc, exc], FACE)
    assert mask[20, 20] == 1 and mask[5, 5] == 0 and mask[45, 55] == 0  # DFL's rule: excludes cut the includes
    shown = draw_face(face, [inc, exc], [[20, 60], [30, 70]], mask, s)
    assert shown.shape == (DISPLAY, DISPLAY, 3) and shown.dtype == np.uint8
    x, y = to_display([[10, 45]], s)[0]  # on the include polygon's left edge
    assert tuple(shown[y, x]) == INCLUDE_RGB
    x, y = to_display([[50, 40]], s)[0]  # on the exclude polygon's top edge
    assert tuple(shown[y, x]) == EXCLUDE_RGB
    x, y = to_display([[20, 60]], s)[0]  # a point being drawn
    assert tuple(shown[y, x]) == DRAWING_RGB
    inside, outside = to_display([[30, 20], [3, 3]], s)
    assert shown[inside[1], inside[0]].mean() == pytest.approx(200, abs=2)
    assert shown[outside[1], outside[0]].mean() < 100  # shaded
    plain = draw_face(face, [], [], None, s)
    assert (plain == 200).all()  # no mask, no polygons: the face as it is
    assert (draw_face(face, [inc], [], mask, s, shade=False)[outside[1], outside[0]] == 200).all()


def test_face_names_from_the_session_are_one_component():
    assert one_name("src_000_0.jpg") == "src_000_0.jpg"
    for bad in ("", "..", ".", "../faces/x.jpg", "/etc/passwd", "a/b.jpg", "a\\b.jpg", "x\0.jpg", None):
        with pytest.raises(Exception, match="not one file name"):
            one_name(bad)


# ---------------------------------------------------------------- the editor's handlers on a faceset


def click(tab: MasksTab, state: dict, face_xy: tuple[float, float]) -> list:
    """A browser click on the shown image where face pixel `face_xy` is shown."""
    s = display_scale(FACE)
    return tab.click(state, True, SimpleNamespace(index=[int(v) for v in to_display([face_xy], s)[0]]))


def test_label_faces_through_the_handlers(tmp_path):
    faces = make_faceset(tmp_path)
    names = sorted(p.name for p in faces.iterdir())
    tab = MasksTab(AppContext(workspace=Workspace([tmp_path]), runner=None))
    image, status, note, picker, state = tab.open("faces")
    assert image.shape == (DISPLAY, DISPLAY, 3) and "face **1** of 3" in status and "labelled: 0 of 3" in status
    assert state["folder"] == str(faces.resolve()) and state["name"] == names[0]

    for xy in ((20, 20), (75, 22)):
        *_, state = click(tab, state, xy)
    out = tab.close_include(state)
    assert "at least 3 points (2 drawn)" in out[2] and "seg_ie_polys" not in read_meta(faces / names[0]).extra
    *_, state = click(tab, state, (5, 5))
    *_, state = tab.undo_point(state)
    *_, state = click(tab, state, (50, 85))
    pixels = load_face(faces / names[0])[0]
    image, status, note, picker, state = tab.close_include(state)
    assert note == "saved include polygon 1" and "1 include, 0 exclude" in status and "labelled: 1 of 3" in status
    assert state["points"] == [] and picker["choices"] == [("1: include, 3 points", 0)]
    for xy in ((40, 40), (60, 40), (50, 60)):
        *_, state = click(tab, state, xy)
    *_, note, _, state = tab.close_exclude(state)
    assert note == "saved exclude polygon 2"

    stored = read_meta(faces / names[0]).extra["seg_ie_polys"]
    assert set(stored) == {"polys"} and [p["type"] for p in stored["polys"]] == [1, 0]
    assert all(isinstance(p["type"], int) and all(isinstance(v, float) for pt in p["pts"] for v in pt) for p in stored["polys"])
    np.testing.assert_allclose(stored["polys"][0]["pts"], [[20, 20], [75, 22], [50, 85]], atol=0.6)
    np.testing.assert_allclose(stored["polys"][1]["pts"], [[40, 40], [60, 40], [50, 60]], atol=0.6)
    assert polygon_area(stored["polys"][0]["pts"]) > 1000
    assert (load_face(faces / names[0])[0] == pixels).all()  # the pixels are untouched

    *_, state = click(tab, state, (30, 30))
    _, status, note, _, state = tab.next(state)
    assert "face **2** of 3" in status and "1 unclosed point(s) dropped" in note and state["points"] == []
    assert tab.next(tab.next(state)[-1])[2] == "this is the last face"
    _, status, _, _, state = tab.prev(state)
    assert "face **1** of 3" in status and "1 include, 1 exclude" in status
    _, status, note, picker, state = tab.delete(state, True, 1)
    assert note == "deleted polygon 2" and [p["type"] for p in read_meta(faces / names[0]).extra["seg_ie_polys"]["polys"]] == [1]
    assert "pick the polygon" in tab.delete(state, True, None)[2] and "no polygon 7" in tab.delete(state, True, 6)[2]
    _, status, _, _, state = tab.next_unlabelled(state)
    assert "face **2** of 3" in status
    # a face sorted away meanwhile: the editor follows the name, or stays at the position, never opens a path it is sent
    _, status, _, _, state = tab.prev(state)
    _, status, note, *_ = tab.clear(state)
    assert note == "removed 1 polygon(s)" and "labelled: 0 of 3" in status and "seg_ie_polys" not in read_meta(faces / names[0]).extra
    for bad in ({**state, "name": "../../etc/passwd"}, {**state, "folder": "/etc"}, {}, None):
        out = tab.close_include(bad)
        assert out[2].startswith("**") and out[0].__class__.__name__ != "ndarray", out[2]
    assert "outside the workspace" in tab.close_include({**state, "folder": "/etc"})[2]
    assert "not one file name" in tab.next({**state, "name": "../x.jpg"})[2]


def test_opening_outside_the_workspace_or_a_broken_face_gives_a_message(tmp_path):
    faces = make_faceset(tmp_path, 2)
    tab = MasksTab(AppContext(workspace=Workspace([tmp_path / "faces"]), runner=None))
    for folder in ("..", "../faces/..", str(tmp_path), "/etc", "missing"):
        out = tab.open(folder)
        assert out[2].startswith("**") and ("outside the workspace" in out[2] or "not found" in out[2]), (folder, out[2])
    # polygons planted with the wrong structure: the face names itself, nothing crashes
    path = sorted(faces.iterdir())[0]
    meta = read_meta(path)
    meta.extra["seg_ie_polys"] = {"polys": [{"type": 7, "pts": [[1, 2]]}]}
    write_meta(path, meta)
    out = tab.open(str(faces))
    assert path.name in out[2] and "type 7" in out[2]
    state = {"folder": str(faces), "name": sorted(faces.iterdir())[1].name, "index": 1, "points": [], "labelled": 0}
    assert "face **2** of 2" in tab.next(state)[1]  # the other faces stay usable


# ---------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def masks_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks_browser")
    with running_app(root) as (ctx, url):
        make_faceset(root)
        yield {"url": url, "root": root}


@pytest.mark.slow
def test_label_a_face_in_the_browser(masks_app):
    root, faces = masks_app["root"], masks_app["root"] / "faces"
    names = sorted(p.name for p in faces.iterdir())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1300}).new_page()
            page.goto(masks_app["url"])
            page.get_by_role("tab", name="Face", exact=True).click()
            page.get_by_role("tab", name="Masks", exact=True).click()
            label_in_the_browser(page, root, faces, names)
        finally:
            browser.close()


def face_outline(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a user would click on a face: round the jaw and up over the forehead (include), and a small patch on the
    forehead (exclude, as over a strand of hair), in face pixels, from the face's landmarks."""
    jaw = landmarks[0:17:2]
    brows = landmarks[[26, 24, 19, 17]] - [0, 0.12 * FACE]
    outline = np.clip(np.round(np.concatenate([jaw, brows]), 1), 1, FACE - 2)
    top = landmarks[17:27].mean(0) - [0, 0.05 * FACE]
    patch = np.round(top + [[-8, -4], [8, -4], [0, 6]], 1)
    return outline, patch


def label_in_the_browser(page, root: Path, faces: Path, names: list[str]) -> None:
    status, note = page.locator("#face-masks-status"), page.locator("#face-masks-note")
    fill(page, "face-masks-folder", "../")
    page.locator("#face-masks-open").click()
    expect(note).to_contain_text("outside the workspace", timeout=30_000)
    fill(page, "face-masks-folder", "/etc")
    page.locator("#face-masks-open").click()
    expect(note).to_contain_text("'/etc' is outside the workspace", timeout=30_000)
    fill(page, "face-masks-folder", "faces")
    page.locator("#face-masks-open").click()
    expect(status).to_contain_text("face 1 of 3", timeout=30_000)
    img = page.locator("#face-masks-image img").first
    expect(img).to_be_visible(timeout=30_000)

    def shown(text: str) -> None:
        """The note says `text` and the redrawn face has loaded; checked every 50 ms (expect backs off to a second,
        which would add most of a second to every click)."""
        page.wait_for_function("([text]) => (document.querySelector('#face-masks-note')?.textContent || '').includes(text)"
                               " && [...document.querySelectorAll('#face-masks-image img')].every(i => i.complete && i.naturalWidth)",
                               arg=[text], polling=50, timeout=30_000)

    shown("opened faces")

    def click_at(fx: float, fy: float, k: int) -> None:
        """Click where the face pixel (fx, fy) is shown: the image is drawn 'contained' in its element's box."""
        box = img.evaluate("e => { const r = e.getBoundingClientRect(); return [r.width, r.height, e.naturalWidth, e.naturalHeight]; }")
        w, h, nw, nh = box
        r = min(w / nw, h / nh, 1)
        ox, oy = (w - nw * r) / 2, (h - nh * r) / 2
        img.click(position={"x": ox + (fx + 0.5) / FACE * nw * r, "y": oy + (fy + 0.5) / FACE * nh * r})
        shown(f"point {k} at")

    outline, patch = face_outline(read_meta(faces / names[0]).landmarks_array())
    for k, xy in enumerate(outline, 1):
        click_at(*xy, k)
    page.locator("#face-masks-include").click()
    expect(note).to_contain_text("saved include polygon 1", timeout=30_000)
    for k, xy in enumerate(patch, 1):
        click_at(*xy, k)
    page.locator("#face-masks-exclude").click()
    expect(note).to_contain_text("saved exclude polygon 2", timeout=30_000)
    expect(status).to_contain_text("1 include, 1 exclude", timeout=30_000)
    expect(status).to_contain_text("labelled: 1 of 3", timeout=30_000)
    stored = read_meta(faces / names[0]).extra["seg_ie_polys"]
    assert [p["type"] for p in stored["polys"]] == [1, 0]
    np.testing.assert_allclose(stored["polys"][0]["pts"], outline, atol=1.5)  # where the clicks landed, in face pixels
    np.testing.assert_allclose(stored["polys"][1]["pts"], patch, atol=1.5)

    click_at(*(outline[0] + [4, -16]), 1)  # a polygon being drawn, for the picture
    click_at(*(outline[0] + [-2, -24]), 2)
    shots = Path(os.environ.get("LORATRAIN_SCREENSHOTS") or root)
    page.locator("#face-tab-masks").screenshot(path=str(shots / "ui-face-masks.png"))

    page.locator("#face-masks-next").click()
    expect(status).to_contain_text("face 2 of 3", timeout=30_000)
    expect(note).to_contain_text("2 unclosed point(s) dropped", timeout=30_000)
    page.locator("#face-masks-prev").click()
    expect(status).to_contain_text("face 1 of 3", timeout=30_000)
    page.locator("#face-masks-poly input").first.click()
    page.get_by_role("option", name="2: exclude").click()
    page.locator("#face-masks-delete").click()
    expect(note).to_contain_text("deleted polygon 2", timeout=30_000)
    assert [p["type"] for p in read_meta(faces / names[0]).extra["seg_ie_polys"]["polys"]] == [1]
    page.locator("#face-masks-next-unlabelled").click()
    expect(status).to_contain_text("face 2 of 3", timeout=30_000)
    # the XSeg jobs share the folder box: Check on the apply tab names the missing model, not the faceset
    page.get_by_role("tab", name="XSeg apply", exact=True).click()
    page.locator("#face-xseg-apply-check").click()
    expect(page.locator("#face-xseg-apply-message")).to_contain_text("model", timeout=30_000)
    expect(page.locator("#face-xseg-apply-message")).not_to_contain_text("faceset", timeout=5_000)
