"""The Face page's Swapper tab: its Inspect handler and the job panel's plot rebuild for series that start late
(likeness, val_loss) without a browser; in a headless Chromium a 4-iteration swapper fine-tune started from the tab,
whose source | target | result preview and four curves show, then the Swap tab's one-frame preview with the
swapper just trained (`face swap --swapper`).

Stand-ins only: a tiny generator and recogniser built as ONNX graphs by swapper/arch.py, the session's extracted demo
facesets copied into the app's workspace, synthetic demo photos (all offline).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from loratrain.facetrain.demo_data import make_photos  # noqa: E402
from loratrain.facetrain.swap.config import SwapConfig  # noqa: E402
from loratrain.facetrain.swapper.arch import GeneratorSpec, build_generator_onnx, build_recognizer_onnx  # noqa: E402
from loratrain.ui.config import AppContext  # noqa: E402
from loratrain.ui.events import Snapshot  # noqa: E402
from loratrain.ui.pages.face import Page  # noqa: E402
from loratrain.ui.runner import JobRecord  # noqa: E402
from loratrain.ui.widgets import JobPanel  # noqa: E402
from loratrain.ui.workspace import Workspace  # noqa: E402

from .conftest import running_app  # noqa: E402
from .test_ui_browser import CHROMIUM_ARGS, chromium_path, fill, open_accordion  # noqa: E402

SIZE = 32


def fill_all(page, prefix: str, values: dict[str, str]) -> None:  # noqa: ANN001
    """Fill the fields, then check each still holds its value (once in three runs a field filled right after its
    accordion opened came back to its default, and the job ran 2000 iterations): refilled once, then asserted."""
    for name, value in values.items():
        fill(page, f"{prefix}-{name}", value)
    for name, value in values.items():
        box = page.locator(f"#{prefix}-{name} input, #{prefix}-{name} textarea").first
        if box.input_value() != value:
            fill(page, f"{prefix}-{name}", value)
        expect(box).to_have_value(value)


def stand_ins(root: Path) -> tuple[Path, Path]:
    """A 32 px inswapper-shaped generator and an ArcFace-shaped recogniser, under `root/models`."""
    return (build_generator_onnx(root / "models" / "base.onnx", GeneratorSpec(SIZE, 8, 2), seed=3),
            build_recognizer_onnx(root / "models" / "arcface.onnx", seed=0))


def test_inspect_lists_the_blocks_and_refuses_paths_outside_the_workspace(tmp_path):
    stand_ins(tmp_path)
    page = Page(AppContext(workspace=Workspace([tmp_path]), runner=None))
    text = page.inspect_swapper("models/base.onnx", "")
    assert "base.onnx: inputs target" in text and "styles.0" in text and "(--freeze_until)" in text
    # without a base, the model being trained is inspected (a resumed run's own graph)
    assert page.inspect_swapper(" ", "models/base.onnx") == text
    assert page.inspect_swapper("", "").startswith("set base")
    assert "outside the workspace" in page.inspect_swapper("/etc/passwd", "")
    assert page.inspect_swapper("", "models/none.onnx") == "model: models/none.onnx: no such file"
    (tmp_path / "models" / "broken.onnx").write_bytes(b"not a graph")
    broken = page.inspect_swapper("models/broken.onnx", "")
    assert "broken.onnx" in broken and "Traceback" not in broken


def test_the_loss_plot_is_rebuilt_when_a_validation_series_starts():
    """likeness / val_loss appear first on a validation iteration, but Gradio's plot keeps the series of the chart it
    built: the panel sends a new legend (which rebuilds the chart) on the tick after the data with the new series
    (a rebuild sent with that data would use the data the browser held before), and only then."""
    import gradio as gr

    snap = Snapshot()
    record = JobRecord(id="j1", job="face swapper train", title="swapper me.onnx", created=0, state="running", started=0)
    runner = SimpleNamespace(store=SimpleNamespace(get=lambda _id: record), snapshot=lambda _id: snap,
                             quiet_for=lambda _id: 0.0, queue_position=lambda _id: None)
    panel = JobPanel(AppContext(workspace=None, runner=runner), "p", kinds=("face swapper train",))
    with gr.Blocks():
        panel.render()

    def tick(seen, **metrics):  # noqa: ANN001, ANN202
        if metrics:
            snap.apply({"type": "advance", "n": 1, "metrics": metrics})
        out = panel.refresh("j1", seen)
        return out[1], out[-1]

    def is_update(plot) -> bool:  # noqa: ANN001
        return isinstance(plot, dict) and plot.get("__type__") == "update"

    plot, seen = tick(None)
    assert plot is None  # no metrics yet: an empty plot
    plot, seen = tick(seen, loss=0.5, identity=0.3)
    assert not is_update(plot) and set(plot["series"]) == {"loss", "identity"}  # its first data builds the chart
    plot, seen = tick(seen, loss=0.4, identity=0.2)
    assert not is_update(plot)
    plot, seen = tick(seen, loss=0.4, identity=0.2, likeness=0.8, val_loss=0.3)
    assert not is_update(plot) and set(plot["series"]) == {"loss", "identity", "likeness", "val_loss"}  # data first
    plot, seen = tick(seen)  # then the rebuild, with nothing new from the job
    assert is_update(plot) and plot["colors_in_legend"] == ["loss", "identity", "likeness", "val_loss"]
    plot, seen = tick(seen)
    assert plot == gr.skip()  # nothing changed: nothing sent
    plot, seen = tick(seen, loss=0.3, identity=0.2)
    assert not is_update(plot) and set(plot["series"]) == {"loss", "identity", "likeness", "val_loss"}
    plot, _ = tick(None)  # a reloaded page builds its chart from the whole data
    assert not is_update(plot) and len(set(plot["series"])) == 4


# ---------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def swapper_app(tmp_path_factory, facesets6):
    root = tmp_path_factory.mktemp("swapper_browser")
    with running_app(root) as (ctx, url):
        src, dst = facesets6
        shutil.copytree(src, root / "faces_src")
        shutil.copytree(dst, root / "faces_dst")
        stand_ins(root)
        make_photos(root / "person", 2, 0, "src")  # the person the Swap tab puts in
        frame = make_photos(root / "frames", 1, 1, "dst")[0]
        yield {"url": url, "root": root, "frame": frame.relative_to(root)}


@pytest.mark.slow
def test_swapper_trains_from_the_face_page_and_the_swap_tab_previews_it(swapper_app):
    root = swapper_app["root"]
    shots = Path(os.environ.get("LORATRAIN_SCREENSHOTS") or root)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1300}).new_page()
            page.goto(swapper_app["url"])
            page.get_by_role("tab", name="Face", exact=True).click()
            page.locator("#face-tab-swapper-button").click()
            expect(page.locator("#face-tab-swapper")).to_contain_text("yours to bring", timeout=30_000)
            fill_all(page, "face-swapper", {"faceset": "faces_src", "model": "swapper/me.onnx", "base": "models/base.onnx",
                                            "recognizer": "models/arcface.onnx", "dst_faceset": "faces_dst",
                                            "dedupe_threshold": "1"})
            page.locator("#face-swapper-inspect").click()
            expect(page.locator("#face-swapper-info textarea")).to_have_value(
                re.compile(r"base\.onnx: inputs target.*styles\.0", re.S), timeout=60_000)
            open_accordion(page, "face-swapper-group-optimizer")
            open_accordion(page, "face-swapper-group-saving")
            fill_all(page, "face-swapper", {"iterations": "4", "batch_size": "2", "grad_accum": "1", "lr": "0.001",
                                            "validate_every": "2", "preview_every": "2", "save_every": "4"})
            page.locator("#face-swapper-start").click()
            expect(page.locator("#face-swapper-message")).to_contain_text("started job", timeout=30_000)
            expect(page.locator("#face-swapper-status")).to_contain_text("done", timeout=180_000)
            # loss, identity and the validation series (which start later: the plot is rebuilt for them) drawn as
            # lines of their own colours; the latest preview with its caption
            lines = page.locator('#face-swapper-loss path[aria-roledescription="line mark"][stroke]')
            expect(lines).to_have_count(4, timeout=60_000)
            expect(page.locator("#face-swapper-loss")).to_contain_text(re.compile("loss.*identity.*likeness.*val_loss"))
            assert len(set(lines.evaluate_all("es => es.map(e => e.getAttribute('stroke'))"))) == 4
            expect(page.locator("#face-swapper-images img").first).to_be_visible(timeout=60_000)
            expect(page.locator("#face-swapper-images")).to_contain_text("iteration 4: source | target | result",
                                                                       timeout=30_000)
            page.locator("#face-tab-swapper").screenshot(path=str(shots / "ui-face-swapper.png"))
            assert (root / "swapper" / "me.onnx").is_file() and (root / "swapper" / "me_preview.png").is_file()

            if "swapper" not in SwapConfig.model_fields:
                pytest.skip("face swap has no --swapper yet: the Swap tab part is not run")
            page.locator("#face-tab-swap-button").click()
            open_accordion(page, "face-swap-group-input-and-output")
            open_accordion(page, "face-swap-group-faces")
            fill_all(page, "face-swap", {"input": str(swapper_app["frame"]), "swapper": "swapper/me.onnx", "source": "person",
                                         "output": "swapped.png", "recognizer": "models/arcface.onnx"})
            page.locator("#face-swap-preview").click()
            expect(page.locator("#face-swap-preview-note")).to_contain_text("frame 0: 1 face(s) swapped", timeout=120_000)
            expect(page.locator("#face-swap-preview-image img").first).to_be_visible(timeout=30_000)
        finally:
            browser.close()
