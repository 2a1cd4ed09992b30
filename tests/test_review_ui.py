"""The path and name options this change added, tried through the running app's job API and forms with `..`,
an absolute path outside the workspace and a symlink pointing out: each is refused before a job is queued, or the
job fails with a named error; nothing outside the workspace is read or written."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from .conftest import running_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("review_ui")
    root = base / "workspace"
    root.mkdir()
    (base / "secret.txt").write_text("outside the workspace")
    (base / "secret.json").write_text('{"findings": []}')
    os.symlink(base, root / "link_out")
    with running_app(root) as (ctx, url):
        client = Client(url, verbose=False)
        yield {"root": root, "base": base, "client": client, "ctx": ctx,
               "api": client.view_api(return_format="dict", print_info=False)}
        client.close()


def outside(server) -> dict[str, float]:
    """Every file beside the workspace with its mtime: what a test compares before and after."""
    base = server["base"]
    return {str(p): p.stat().st_mtime for p in base.iterdir() if p.name != "workspace"}


def escapes(server, name: str) -> list[str]:
    return [f"../{name}", str(server["base"] / name), f"link_out/{name}"]


def start_job(server, job: str, config: dict):
    return server["client"].predict(job, config, api_name="/start_job")


def call(server, endpoint, **values):
    params = server["api"]["named_endpoints"][endpoint]["parameters"]
    args = [values.get(p["label"], p["parameter_default"] if p["parameter_has_default"] else None) for p in params]
    return server["client"].predict(*args, api_name=endpoint)


def finished(server, job_id: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = server["client"].predict(job_id, api_name="/job_status")
        if s["state"] not in ("queued", "running"):
            return s
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still running")


REFUSED = "outside the workspace|URL"


@pytest.mark.parametrize("field", ["lora", "model", "output"])
def test_convert_ia3_paths_are_refused(server, field):
    before = outside(server)
    good = {"lora": "demo/tiny_model.safetensors", "model": "demo/tiny_model.safetensors", "output": "out/ia3.safetensors"}
    for escape in escapes(server, "secret.txt" if field != "output" else "evil.safetensors"):
        with pytest.raises(AppError, match=REFUSED):
            start_job(server, "lora convert-ia3", {**good, field: escape})
    assert outside(server) == before


@pytest.mark.parametrize("field", ["text_model", "json_output", "quarantine"])
def test_dataset_check_paths_are_refused(server, field):
    before = outside(server)
    for escape in escapes(server, "secret.txt" if field == "text_model" else "evil_out"):
        with pytest.raises(AppError, match=REFUSED):
            start_job(server, "dataset check", {"dataset_dir": "demo/dataset", field: escape})
    assert outside(server) == before


def test_fix_marks_report_is_refused(server):
    before = outside(server)
    for escape in escapes(server, "secret.json"):
        with pytest.raises(AppError, match=REFUSED):
            start_job(server, "dataset fix-marks", {"dataset_dir": "demo/dataset", "report": escape})
    assert outside(server) == before


def test_grid_output_dir_is_refused(server):
    before = outside(server)
    for escape in escapes(server, "grid_out"):
        with pytest.raises(AppError, match=REFUSED):
            start_job(server, "grid", {"model": "demo/tiny_model.safetensors", "prompt": "a circle",
                                       "color_drift": "on", "output_dir": escape})
    assert outside(server) == before


def test_train_dataset_config_is_refused(server):
    before = outside(server)
    for escape in escapes(server, "secret.txt"):
        with pytest.raises(AppError, match=REFUSED):
            start_job(server, "train", {"dataset_config": escape})
    assert outside(server) == before


def test_oft_layout_takes_only_its_choices(server):
    for value in ("../x", "/etc/passwd", "link_out/x"):
        with pytest.raises(AppError, match="oft_layout"):
            start_job(server, "train", {"pretrained_model_name_or_path": "demo/tiny_model.safetensors",
                                        "train_data_dir": "demo/dataset", "network_module": "oft", "oft_layout": value})


def test_a_dataset_toml_naming_folders_outside_is_refused(server):
    """The TOML is inside the workspace; the folders it names are not: Check says so, and a job started with it
    through the API fails with a named error instead of reading them."""
    root, base = server["root"], server["base"]
    (base / "outside_images").mkdir(exist_ok=True)
    for escape in ("../../outside_images", str(base / "outside_images"), str(root / "link_out" / "outside_images")):
        toml = root / "review_ds.toml"
        toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{escape}"\ntrigger_word = "sks"\n')
        plan = call(server, "/train_check", dataset_config=str(toml), train_data_dir="")[-2]
        assert "dataset_config" in plan and "outside the workspace" in plan, plan
        assert "Step plan" not in plan
    job = start_job(server, "train", {"pretrained_model_name_or_path": "demo/tiny_model.safetensors",
                                      "dataset_config": str(toml), "output_dir": "review_out", "max_train_steps": 1})
    s = finished(server, job)
    assert s["state"] == "failed" and "outside" in (s["error"] or s["message"]), s
    assert not (root / "review_out").exists() or not any((root / "review_out").glob("*.safetensors"))


@pytest.mark.parametrize("trigger", ["../x", "/etc/passwd", "link_out/secret.txt"])
def test_trigger_word_is_caption_text_never_a_path(server, trigger):
    """A trigger word looking like a path is only text: it is checked as a caption token, nothing is opened."""
    before = outside(server)
    n = len(server["api"]["named_endpoints"]["/train_check"]["parameters"])
    out = call(server, "/train_simple", **{"base model": "demo/tiny_model.safetensors", "image folder": "demo/dataset/4_circle",
                                           "trigger word": trigger, "what is trained": "style", "output name": "review"})
    assert f"trigger word '{trigger}' first in every caption" in out[n], out[n]
    assert outside(server) == before
    for escape in escapes(server, "evil"):
        out = call(server, "/train_simple", **{"base model": "demo/tiny_model.safetensors", "image folder": "demo/dataset/4_circle",
                                               "trigger word": "sks", "what is trained": "style", "output name": escape})
        assert "output name" in out[n] and "must be a file name" in out[n], out[n]
    assert outside(server) == before


def test_fix_marks_images_and_person_concepts_stay_inside(server):
    """`images` names files inside the dataset folder and `person_concepts` names concept folders: neither may reach
    outside. A job is refused or fails naming the option; nothing outside changes."""
    before = outside(server)
    for escape in escapes(server, "secret.txt"):
        try:
            job = start_job(server, "dataset fix-marks", {"dataset_dir": "demo/dataset", "images": [escape], "dry_run": True})
        except AppError as e:
            assert "images" in str(e)
        else:
            s = finished(server, job)
            assert s["state"] == "failed" and "images" in (s["error"] or s["message"]), s
    for escape in escapes(server, "secret.txt"):
        try:
            job = start_job(server, "dataset check", {"dataset_dir": "demo/dataset", "person_concepts": [escape],
                                                      "checks": ["people"]})
        except AppError as e:
            assert "person_concepts" in str(e)
        else:
            s = finished(server, job)
            assert s["state"] in ("done", "failed"), s
            text = str(s["summary"]) + str(s["error"]) + str(s["message"])
            assert "secret" not in text or "names no concept" in text, s
    assert outside(server) == before
    assert (server["base"] / "secret.txt").read_text() == "outside the workspace"


def test_saving_the_config_never_writes_outside(server):
    before = outside(server)
    for escape in escapes(server, "evil.toml"):
        out = call(server, "/train_save", **{"config TOML": escape})
        assert "outside the workspace" in out, out
    assert outside(server) == before
    assert Path(server["base"] / "secret.txt").read_text() == "outside the workspace"


def test_simple_mode_never_reads_a_dataset_toml_linked_out(server):
    """The simple mode looks into an existing NAME_dataset.toml before replacing it: a link there pointing out of
    the workspace is refused, not read."""
    root, base = server["root"], server["base"]
    n = len(server["api"]["named_endpoints"]["/train_check"]["parameters"])
    (base / "planted.toml").write_text("not yours")
    (root / "output").mkdir(exist_ok=True)
    os.symlink(base / "planted.toml", root / "output" / "planted_dataset.toml")
    before = outside(server)
    out = call(server, "/train_simple", **{"base model": "demo/tiny_model.safetensors", "image folder": "demo/dataset/4_circle",
                                           "trigger word": "sks", "what is trained": "style", "output name": "planted"})
    assert "outside the workspace" in out[n], out[n]
    assert outside(server) == before and (base / "planted.toml").read_text().endswith("not yours")
