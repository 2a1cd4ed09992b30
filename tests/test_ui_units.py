"""The app's pieces as plain functions: workspace checks, forms, events -> snapshot -> view, the job runner,
the page handlers. No server and no browser here (see test_ui_server.py and test_ui_browser.py)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest

from loratrain.cli import build_parser  # noqa: E402
from loratrain.core.config import ConfigError  # noqa: E402
from loratrain.core.jobs import JobResult  # noqa: E402
from loratrain.training.config import TrainConfig  # noqa: E402
from loratrain.training.demo import demo_train_config, make_concept_images  # noqa: E402
from loratrain.ui.config import AppContext, UiConfig  # noqa: E402
from loratrain.ui.events import EventFollower, JsonlReporter, Snapshot, append_event  # noqa: E402
from loratrain.ui.forms import Form  # noqa: E402
from loratrain.ui.panel import view  # noqa: E402
from loratrain.ui.runner import JobRecord, JobRunner, JobStore  # noqa: E402
from loratrain.ui.workspace import Workspace  # noqa: E402


def wait_for(predicate, timeout=60.0, every=0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


# ---- workspace -----------------------------------------------------------------------------------
def test_workspace_refuses_every_escape(tmp_path):
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path, root / "link_out")
    os.symlink(root / "data", root / "link_in")
    ws = Workspace([root])
    assert ws.resolve("data") == root / "data"
    assert ws.resolve(str(root / "data" / "new.safetensors")) == root / "data" / "new.safetensors"  # may not exist yet
    assert ws.resolve("link_in") == root / "data"  # a link that stays inside is fine
    for bad in ("../secret.txt", "../../etc/passwd", "/etc/passwd", str(tmp_path / "secret.txt"), "link_out/secret.txt",
                "file:///etc/passwd", "file:/etc/passwd", "http://example.com/x", "~/x"):
        with pytest.raises(ConfigError) as e:
            ws.resolve(bad, "model")
        assert "model" in str(e.value) and ("outside the workspace" in str(e.value) or "URL" in str(e.value)), bad
    with pytest.raises(ConfigError, match="not a folder"):
        Workspace([tmp_path / "missing"])
    # a model name (a tagger's repo id) is no path; anything that exists in the workspace is one
    from loratrain.dataset_tools.tagger.config import TagConfig

    out, problems = ws.check_config(TagConfig, {"model": "SmilingWolf/wd-vit-tagger-v3", "dataset_dir": "data"})
    assert problems == [] and out["model"] == "SmilingWolf/wd-vit-tagger-v3" and out["dataset_dir"] == str(root / "data")
    for value in ("link_out", "link_out/secret.txt", "../x", "/etc"):
        assert ws.check_config(TagConfig, {"model": value})[1], value


def test_check_config_resolves_paths_and_keeps_spec_suffixes(tmp_path):
    from loratrain.grid.config import GenerateConfig

    ws = Workspace([tmp_path])
    (tmp_path / "a.safetensors").write_bytes(b"x")
    out, problems = ws.check_config(GenerateConfig, {"model": "a.safetensors", "network_weights": ["a.safetensors:0.7:MIDD"],
                                                     "output": "out/x.png"})
    assert problems == []
    assert out["model"] == str(tmp_path / "a.safetensors")
    assert out["network_weights"] == [f"{tmp_path / 'a.safetensors'}:0.7:MIDD"]
    assert out["output"] == str(tmp_path / "out" / "x.png")
    _, problems = ws.check_config(GenerateConfig, {"model": "/etc/hostname", "network_weights": ["../x.safetensors:1"]})
    assert {f for f, _ in problems} == {"model", "network_weights"}
    _, problems = ws.check_config(TrainConfig, {"resume": "latest"})
    assert problems == []  # "latest" is a keyword, not a path


def test_ui_options_safe_by_default(tmp_path):
    assert UiConfig().listen == "127.0.0.1"
    with pytest.raises(ConfigError, match="auth"):
        UiConfig(listen="0.0.0.0").check()
    UiConfig(listen="0.0.0.0", auth="me:pw").check()
    users = tmp_path / "users"
    users.write_text("a:1\nb:2\n")
    assert UiConfig(auth=str(users)).credentials() == [("a", "1"), ("b", "2")]
    with pytest.raises(ConfigError, match="user:password"):
        UiConfig(auth="nopassword").credentials()
    args = build_parser().parse_args(["ui", "--listen", "0.0.0.0"])
    with pytest.raises(ConfigError):
        UiConfig.from_args(args).check()


# ---- forms ---------------------------------------------------------------------------------------
def test_form_round_trips_every_train_option(tmp_path):
    cfg = demo_train_config(tmp_path / "demo", 20)
    form = Form(TrainConfig, "t")
    values = form.to_values(cfg.model_dump())
    assert len(values) == len(TrainConfig.model_fields)
    built, problems = form.build(values, check_ready=True)
    assert problems == [] and built == cfg
    # the saved TOML is what --config_file reads, and fills the same form again
    path = tmp_path / "t.toml"
    path.write_text(built.to_toml())
    assert form.to_values(TrainConfig.from_toml(path).model_dump()) == values
    # a cleared optional number is unset; a cleared required one keeps its default
    i, j = form.names.index("unet_lr"), form.names.index("learning_rate")
    values[i], values[j] = None, None
    assert form.to_dict(values)["unet_lr"] is None and "learning_rate" not in form.to_dict(values)


def test_the_network_choice_offers_every_kind_and_builds_it(tmp_path):
    from loratrain.ui.forms import _choices

    cfg = demo_train_config(tmp_path / "demo", 20)
    form = Form(TrainConfig, "t")
    choices = _choices(TrainConfig, "network_module")
    assert {"lora", "locon", "loha", "lokr", "dora", "dylora"} <= set(choices)
    for kind in ("loha", "lokr", "dora", "dylora"):
        built, problems = form.build(form.to_values({**cfg.model_dump(), "network_module": kind}), check_ready=True)
        assert problems == [] and built.network_module == kind
    built, problems = form.build(form.to_values({**cfg.model_dump(), "network_module": "dylora", "dylora_unit": 3}))
    assert any(f == "network_dim" and "multiple of the DyLoRA unit 3" in m for f, m in problems), problems


def test_form_reports_problems_against_their_fields():
    form = Form(TrainConfig, "t")
    values = form.to_values({"resolution": "65", "network_dim": 0})
    cfg, problems = form.build(values)
    assert cfg is None
    fields = {f for f, _ in problems}
    assert {"resolution", "network_dim"} <= fields
    updates = form.field_updates(problems)
    shown = {n: u["info"] for n, u in zip(form.names, updates)}
    assert shown["resolution"].startswith("⚠") and shown["network_dim"].startswith("⚠")
    assert not shown["learning_rate"].startswith("⚠")


def test_train_page_command_line_is_the_same_run(tmp_path):
    from loratrain.ui.pages.train import command_line, step_plan

    cfg = demo_train_config(tmp_path / "demo", 20).model_copy(update={"training_comment": "it's a 'test'"})
    line = command_line(cfg)
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert TrainConfig.from_args(args) == cfg
    plan = step_plan(cfg)
    assert "24 images" in plan and "20 optimizer steps" in plan


def test_simple_mode_fills_the_full_form_with_the_guides_values(tmp_path):
    from loratrain.training.simple import PRESETS
    from loratrain.ui.pages.train import simple_settings

    images = tmp_path / "pics"
    make_concept_images(images, "circle", 3, 64, 0)
    model = tmp_path / "m.safetensors"
    for kind, least in (("character", 1000), ("style", 2500), ("concept", 3000)):
        values, reasons = simple_settings(kind, str(model), str(images), "sks", "mine", tmp_path)
        cfg = TrainConfig.build(values, check=False)
        assert cfg.max_train_steps >= least and cfg.unet_lr == 1e-4 and cfg.trigger_word == "sks" and cfg.keep_tokens == 1
        assert cfg.lr_scheduler == "cosine_with_restarts" and 0.05 <= cfg.lr_warmup_steps <= 0.10
        assert cfg.network_dim == PRESETS[kind]["network_dim"] // 2  # 3 images: a small set
        assert len(reasons) == 5 and cfg.train_batch_size == 1  # no GPU here
        toml = Path(cfg.dataset_config).read_text()
        assert 'class_tokens = "sks"' in toml and str(images) in toml and "num_repeats = 10" in toml
    assert 32 <= PRESETS["character"]["network_dim"] <= 64 < PRESETS["style"]["network_dim"]
    with pytest.raises(ConfigError):
        simple_settings("portrait", str(model), str(images), "sks", "x", tmp_path)


# ---- events, snapshot, view ----------------------------------------------------------------------
class _Result(JobResult):
    def summary(self):
        return ["done: 3 steps"]


def test_events_fold_into_the_snapshot_the_page_shows(tmp_path):
    import dataclasses

    Result = dataclasses.dataclass(_Result)
    rep = JsonlReporter(tmp_path / "events.jsonl")
    follower = EventFollower(tmp_path / "events.jsonl")
    rep.start(3, "training", unit="step")
    rep.advance(1, loss=0.5, avg=0.5, lr_unet=1e-3)
    rep.sample(["a.png"], ["step 1: a cat"])
    snap = follower.poll()
    assert (snap.phase, snap.step, snap.total) == ("training", 1, 3)
    rep.advance(1, loss=0.4, avg=0.45, lr_unet=9e-4)
    for _ in range(100):  # progress without metrics is batched, never lost
        rep.advance()
    rep.log("saved")
    rep.result(Result())
    rep.close()
    with open(tmp_path / "events.jsonl", "a") as fh:
        fh.write('{"type": "advance", "n"')  # a torn last line (a killed process) is ignored
    snap = follower.poll()
    assert snap.step == 102 and snap.logs == ["saved"] and snap.summary == ["done: 3 steps"] and snap.exit_code == 0
    assert [m["loss"] for m in snap.metrics] == [0.5, 0.4]
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) < 20

    record = JobRecord(id="j1", job="train", title="train x", created=0, state="done", started=10, ended=75)
    v = view(record, snap)
    assert "done" in v.status and "done: 3 steps" in v.status and "1:05" in v.status
    assert set(v.loss["series"]) == {"loss", "avg"} and set(v.lr["series"]) == {"lr_unet"}
    assert v.images == [("a.png", "step 1: a cat")] and "saved" in v.log and not v.running


def test_view_of_running_queued_and_hanging_jobs():
    snap = Snapshot()
    for event in ({"type": "start", "total": 100, "desc": "training", "unit": "step", "t": 0.0},
                  {"type": "advance", "n": 10, "t": 5.0}):
        snap.apply(event)
    running = JobRecord(id="j", job="train", title="train", created=0, state="running", started=0)
    v = view(running, snap)
    assert "training: 10/100 step" in v.status and "2.00 step/s" in v.status and "ETA 0:45" in v.status and v.running
    assert "may hang" in view(running, snap, quiet_for=3600).status
    queued = JobRecord(id="q", job="train", title="train", created=0)
    assert "position 2" in view(queued, Snapshot(), position=2).status
    assert view(None, None).status == "no job yet"


# ---- the runner: real processes ------------------------------------------------------------------
@pytest.fixture
def captions(tmp_path):
    folder = tmp_path / "ws" / "data"
    make_concept_images(folder, "circle", 3, 32, 0)
    return folder


def _runner(root: Path, **kw) -> JobRunner:
    return JobRunner(JobStore(root / ".jobs"), poll=0.1, **kw)


def test_a_job_runs_in_its_own_process_and_stays_listed(captions):
    from loratrain.dataset_tools.editor.config import TagsConfig

    root = captions.parent
    runner = _runner(root)
    record = runner.submit("tags add", TagsConfig(op="add", dataset_dir=str(captions), tags=["new tag"]), title="add")
    assert record.state == "running" and record.pid != os.getpid()
    wait_for(lambda: runner.tick() or runner.store.get(record.id).finished)
    done = runner.store.get(record.id)
    assert done.state == "done" and "caption(s) written" in done.message
    assert all("new tag" in p.read_text() for p in captions.glob("*.txt"))
    snap = runner.snapshot(record.id)
    assert snap.exit_code == 0 and snap.data["written"] == 3
    # after an app restart the finished job is still listed with its result
    again = _runner(root)
    assert [r.id for r in again.store.all()] == [record.id] and again.store.get(record.id).state == "done"


def test_job_errors_are_the_library_message_not_a_traceback(captions):
    from loratrain.dataset_tools.editor.config import TagsConfig

    runner = _runner(captions.parent)
    with pytest.raises(ConfigError, match="tags"):
        runner.submit("tags add", TagsConfig(op="add", dataset_dir=str(captions)))  # checked before it is queued
    (captions / "broken.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    make_concept_images(captions, "square", 1, 32, 5)  # an image whose caption we now break
    img = sorted(captions.glob("*.png"))[-1]
    img.with_suffix(".txt").write_bytes(b"\xff\xfe\xfa")
    record = runner.submit("tags add", TagsConfig(op="add", dataset_dir=str(captions), tags=["x"]))
    wait_for(lambda: runner.tick() or runner.store.get(record.id).finished)
    done = runner.store.get(record.id)
    assert done.state == "failed" and "cannot be edited safely" in done.message and "Traceback" not in done.message


def test_gpu_jobs_queue_and_a_killed_job_never_takes_the_app_down(tmp_path):
    ws = tmp_path / "ws"
    cfg = demo_train_config(ws / "demo", 200)
    runner = _runner(ws, gpu_slots=1)
    first = runner.submit("train", cfg, title="first")
    with pytest.raises(ConfigError, match=f"job {first.id}"):  # never two jobs writing the same files
        runner.submit("train", cfg, title="same outputs")
    second = runner.submit("train", cfg.model_copy(update={"output_name": "second"}), title="second")
    assert runner.store.get(first.id).state == "running"
    assert runner.store.get(second.id).state == "queued" and runner.queue_position(second.id) == 1
    assert "position 1" in view(runner.store.get(second.id), Snapshot(), runner.queue_position(second.id)).status
    assert runner.stop(second.id).state == "cancelled"
    # the worker dies the hard way (as the kernel's OOM killer does it)
    wait_for(lambda: runner.snapshot(first.id).phase)
    os.killpg(runner.store.get(first.id).pid, signal.SIGKILL)
    wait_for(lambda: runner.tick() or runner.store.get(first.id).finished)
    crashed = runner.store.get(first.id)
    assert crashed.state == "crashed" and "lack of memory" in crashed.message
    assert runner.snapshot(first.id).error == crashed.message
    # the app goes on: the queue is free again
    third = runner.submit("train", cfg.model_copy(update={"max_train_steps": 1, "sample_every_n_steps": 0}), title="third")
    wait_for(lambda: runner.tick() or runner.store.get(third.id).finished, timeout=120)
    assert runner.store.get(third.id).state == "done"


def test_restart_marks_jobs_whose_process_is_gone(tmp_path):
    store = JobStore(tmp_path / "jobs")
    record = store.create("train", {}, "lost")
    record.state, record.pid, record.started = "running", 2 ** 22 + 12345, time.time()  # no such process
    store.save(record)
    append_event(store.folder(record.id), {"type": "start", "total": 5, "desc": "training"})
    JobRunner(store)
    after = store.get(record.id)
    assert after.state == "crashed" and "without a result" in after.message


# ---- page handlers -------------------------------------------------------------------------------
def _context(root: Path) -> AppContext:
    return AppContext(workspace=Workspace([root]), runner=_runner(root))


def test_dataset_page_edit_and_undo_restore_bytes(captions):
    from loratrain.ui.pages.dataset import Page

    page = Page(_context(captions.parent))
    before = {p: p.read_bytes() for p in captions.glob("*.txt")}
    shown = page.open("data", ".txt", True, "", "", "")
    gallery, freq, images, status, history = shown
    assert len(gallery) == 3 and "3 of 3 image(s)" in status and "circle" in set(freq["tag"])
    first = images["choices"][0]
    out = page.save_caption("data", ".txt", True, "", "", "", first, "edited, tags")
    assert "1 caption(s) written" in out[0]
    assert (captions / first).with_suffix(".txt").read_text().startswith("edited, tags")
    out = page.edit("data", ".txt", True, "circle", "", "", "add", "extra", True, "", "", False, "tag", "alphabetical", 0, 75)
    assert "caption(s) written" in out[0]
    assert len(out[5]) == 2  # history: two edits to undo
    page.undo("data", ".txt", True, "", "", "")
    page.undo("data", ".txt", True, "", "", "")
    assert {p: p.read_bytes() for p in captions.glob("*.txt")} == before
    assert "outside the workspace" in page.open("../..", ".txt", True, "", "", "")[3]


def test_merge_page_presets_move_sliders_and_build_the_cli_config(tmp_path):
    from loratrain.merge.presets import merge_preset
    from loratrain.ui.pages.merge import BLOCKS, Page, merge_data

    page = Page(_context(tmp_path))
    values = page.apply_preset("GRAD_V")
    assert values[:25] == merge_preset("GRAD_V") and values[25].startswith("1,0.916667")
    sliders = [0.5] * 25
    data = merge_data("a.safetensors", "b.safetensors", "", "weighted_sum", "block weights", 0.3, 0.2, sliders, "o.safetensors",
                      "auto", "", False, False)
    assert data["weights"] == ",".join(["0.5"] * 25) and data["base_alpha"] == 0.2 and "alpha" not in data
    assert len(BLOCKS) == 25 and BLOCKS[12] == "M00"
    message, job = page.start("../a.safetensors", "b.safetensors", "", "weighted_sum", "plain", 0.5, 0.0, *sliders,
                              "o.safetensors", "auto", "", False, False)
    assert "outside the workspace" in message


def test_quality_check_images_come_from_the_result(tmp_path):
    from loratrain.ui.pages.dataset import findings_images

    img = tmp_path / "a.png"
    make_concept_images(tmp_path, "circle", 1, 32, 0)
    img = next(tmp_path.glob("*.png"))
    snap = Snapshot(data={"findings": [{"check": "small", "path": str(img), "severity": "warning", "message": "32 px"},
                                       {"check": "caption", "path": str(tmp_path / "x.txt"), "severity": "error",
                                        "message": "empty"}]})
    assert findings_images(snap) == [(str(img), "warning · small: 32 px")]
    assert json.dumps(findings_images(snap))


def test_grid_page_checks_file_axes_against_the_workspace(tmp_path):
    from loratrain.ui.pages.grid import Page

    page = Page(_context(tmp_path))
    section = page.section
    (tmp_path / "m.safetensors").write_bytes(b"x")
    form = section.form
    base = form.to_values({"model": "m.safetensors", "prompt": "a cat"})
    cfg, problems = section.validate(["checkpoint", "m.safetensors, /etc/hostname", "seed", "1, 2", "", "", *base], ready=False)
    assert cfg is None and problems[0][0] == "x_values" and "outside the workspace" in problems[0][1]
    cfg, problems = section.validate(["checkpoint", "m.safetensors", "seed", "1, 2", "", "", *base], ready=False)
    assert cfg is not None and cfg.x_values == str(tmp_path / "m.safetensors") and cfg.model == str(tmp_path / "m.safetensors")
    out = section.check("cfg_scale", "4, x", "seed", "1", "", "", *base)
    assert "cfg_scale" in out[-1] and "'x'" in out[-1]  # a bad axis value, before any image


def test_job_sections_name_missing_extras_and_required_fields(tmp_path, monkeypatch):
    import loratrain.ui.sections as sections
    from loratrain.ui.pages.face import Page

    page = Page(_context(tmp_path))
    export = page.sections["Export"]
    values = export.form.to_values({})
    out = export.check(*values)
    assert "model" in out[-1] and "output" in out[-1] and "required" in out[-1]
    monkeypatch.setattr(sections, "missing_extras", lambda spec: "face export needs onnx: pip install 'loratrain[face]'")
    assert "pip install" in export.check(*values)[-1]
    extract = page.sections["Extract"]
    shown = extract.start(*extract.form.to_values({"input": "../elsewhere"}))
    assert "outside the workspace" in shown[-2] and shown[-1].__class__.__name__ != "str"  # nothing started


def test_faceset_move_to_other_never_deletes_or_replaces(tmp_path):
    pytest.importorskip("cv2")
    from loratrain.facetrain.faceset import FacesetError, move_to_other

    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (faces / name).write_bytes(name.encode())
    (faces / "_other").mkdir()
    (faces / "_other" / "a.jpg").write_bytes(b"older")
    moved = move_to_other(faces, ["a.jpg"])
    assert moved == [faces / "_other" / "a_1.jpg"] and moved[0].read_bytes() == b"a.jpg"
    assert (faces / "_other" / "a.jpg").read_bytes() == b"older" and (faces / "b.jpg").exists()
    with pytest.raises(FacesetError, match="no face named"):
        move_to_other(faces, ["../b.jpg"])
