"""The Face page's plan view: the Markdown it builds from a plan and a model's plan state (no browser), and a tiny
plan started from the Face page's Train form in a headless Chromium, whose view follows the phase change."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.demo_data import make_photos
from loratrain.facetrain.extract.config import ExtractConfig
from loratrain.facetrain.extract.extract import run_face_extract
from loratrain.facetrain.train.plan import load_plan
from loratrain.ui.config import AppContext
from loratrain.ui.pages.face_plan import PlanView, plan_markdown
from loratrain.ui.workspace import Workspace

from .conftest import running_app
from .test_ui_browser import CHROMIUM_ARGS, chromium_path, fill, open_accordion

PLAN = '''name = "tiny"
description = "a loss rule, then warp off"
[[phase]]
name = "warp on"
until = "src_loss < 100"
window = 2
[[phase]]
name = "warp off"
random_warp = false
iterations = 2
'''


def test_the_view_shows_phases_the_current_one_and_its_rule(tmp_path):
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(PLAN)
    text = plan_markdown(plan_file, None, "face")
    assert "### Plan: tiny" in text and "| 1 | warp on | (no changes) | when src_loss \\< 100 (moving average over 2) |" in text
    assert "| 2 | warp off | random_warp = False | after 2 iterations |" in text
    model = tmp_path / "m"
    model.mkdir()
    assert "not started on this model" in plan_markdown(plan_file, model, "face")
    digest = load_plan(plan_file).digest
    state = {"digest": digest, "phase": 1, "phase_name": "warp off", "start": 7, "done": False,
             "transitions": [{"phase": 0, "name": "warp on", "iteration": 7, "reason": "phase 1/2 'warp on' ended: src_loss < 100 met",
                              "snapshot": "phase-2-warp-off"}]}
    (model / "face.plan_state.json").write_text(json.dumps(state))
    text = plan_markdown(plan_file, model, "face")
    assert "**current: phase 2/2 — warp off** · since iteration 7" in text and "ends after 2 iterations" in text
    assert "| done at iteration 7 · snapshot `phase-2-warp-off` |" in text and "▶ **running**" in text
    assert "last switch: phase 1/2 'warp on' ended: src_loss \\< 100 met" in text
    (model / "face.plan_state.json").write_text(json.dumps({**state, "done": True, "phase": 2}))
    assert "**plan complete**" in plan_markdown(plan_file, model, "face")
    # what the browser sends is resolved in the workspace; errors are one line, never a traceback
    view = PlanView(AppContext(workspace=Workspace([tmp_path]), runner=None))
    assert "plan complete" in view.show("plan.toml", "m", "face")
    assert "outside the workspace" in view.show("/etc/passwd", "m", "face")
    assert "must be a file name" in view.show("plan.toml", "m", "../x")
    (model / "face.plan_state.json").write_text("{broken")
    assert view.show("plan.toml", "m", "face").startswith("**") and "plan_restart" in view.show("plan.toml", "m", "face")
    assert view.show("", "", "face").startswith("no plan")


def test_the_view_refuses_a_malformed_state_and_escapes_what_it_shows(tmp_path):
    """A state with a list where a number belongs is one line naming the file (the 2 s timer used to raise forever);
    text from the files cannot add links or HTML; an oversized state file is refused, not read whole."""
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(PLAN)
    model = tmp_path / "m"
    model.mkdir()
    view = PlanView(AppContext(workspace=Workspace([tmp_path]), runner=None))
    state = {"digest": load_plan(plan_file).digest, "phase": 1, "phase_name": "warp off", "start": 7, "done": False,
             "transitions": [{"phase": [0]}]}
    (model / "face.plan_state.json").write_text(json.dumps(state))
    shown = view.show("plan.toml", "m", "face")
    assert shown.startswith("**") and "face.plan_state.json" in shown and "plan\\_restart" not in shown
    assert "plan_restart" in shown and "\n" not in shown
    state["transitions"] = [{"phase": 0, "iteration": 7, "reason": "[click](http://evil) <img src=x>",
                             "snapshot": "x` [a](http://evil)"}]
    (model / "face.plan_state.json").write_text(json.dumps(state))
    text = plan_markdown(plan_file, model, "face")
    assert not re.search(r"(?<!\\)(<|\]\()", text)  # no unescaped tag or link
    assert "snapshot x\\` \\[a\\](http://evil)" in text and "last switch: \\[click\\](http://evil) \\<img src=x\\>" in text
    (model / "face.plan_state.json").write_text(json.dumps({**state, "pad": "x" * 300_000}))
    assert "at most 256 KiB" in view.show("plan.toml", "m", "face")


# ---------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def plan_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_browser")
    with running_app(root) as (ctx, url):
        for look, seed in (("src", 0), ("dst", 1)):
            make_photos(root / f"{look}_photos", 4, seed, look)
            run_face_extract(ExtractConfig(input=str(root / f"{look}_photos"), output_dir=str(root / f"faces_{look}"),
                                           image_size=96, max_faces=1), RecordingReporter())
        (root / "plan.toml").write_text(PLAN)
        yield {"url": url, "root": root}


@pytest.mark.slow
def test_a_plan_runs_from_the_face_page_and_its_view_follows_the_phases(plan_app):
    root = plan_app["root"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1300}).new_page()
            page.goto(plan_app["url"])
            page.get_by_role("tab", name="Face", exact=True).click()
            page.locator("#face-tab-train-button").click()
            view = page.locator("#face-plan-view")
            expect(view).to_contain_text("no plan", timeout=30_000)
            for name, value in (("model_dir", "model"), ("src_faceset", "faces_src"), ("dst_faceset", "faces_dst"),
                                ("archi", "df"), ("resolution", "32"), ("ae_dims", "32"), ("e_dims", "8"), ("d_dims", "8"),
                                ("batch_size", "2"), ("workers", "0"), ("max_iters", "100"), ("preview_every", "100"),
                                ("save_every", "100")):
                fill(page, f"face-train-{name}", value)
            open_accordion(page, "face-train-group-plan")
            fill(page, "face-train-plan", "plan.toml")
            expect(view).to_contain_text("Plan: tiny", timeout=30_000)
            expect(view).to_contain_text("not started on this model", timeout=30_000)
            expect(view).to_contain_text("when src_loss < 100 (moving average over 2)")
            page.locator("#face-train-start").click()
            expect(page.locator("#face-train-message")).to_contain_text("started job", timeout=30_000)
            expect(view).to_contain_text("current: phase 1/2 — warp on", timeout=120_000)
            expect(view).to_contain_text("plan complete", timeout=300_000)
            expect(view).to_contain_text("done at iteration 2 · snapshot phase-2-warp-off", timeout=30_000)
            expect(view).to_contain_text("last switch: phase 2/2 'warp off' ended: 2 iterations done")
            shots = Path(os.environ.get("LORATRAIN_SCREENSHOTS") or root)
            page.locator("#face-plan").screenshot(path=str(shots / "ui-face-plan.png"))
            expect(page.locator("#face-train-log textarea")).to_have_value(re.compile("snapshot phase-2-warp-off pinned"),
                                                                          timeout=60_000)
        finally:
            browser.close()
    state = json.loads((root / "model" / "face.plan_state.json").read_text())
    assert state["done"] and [t["iteration"] for t in state["transitions"]] == [2, 4]
    assert (root / "model" / "snapshots" / "phase-2-warp-off" / "face.safetensors").is_file()
