"""The app through a real local server and `gradio_client`: path escapes refused, files outside the workspace
never served, and a real tiny training started, watched, stopped and resumed to exactly what the CLI makes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from .conftest import running_app  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui")
    root = base / "workspace"
    root.mkdir()
    (base / "secret.txt").write_text("outside the workspace")
    os.symlink(base, root / "link_out")
    with running_app(root) as (ctx, url):
        client = Client(url, verbose=False)
        yield {"url": url, "root": root, "base": base, "client": client, "ctx": ctx,
               "api": client.view_api(return_format="dict", print_info=False)}
        client.close()


def call(server, endpoint, **values):
    """Call a page event by its api_name with the form's defaults, overriding fields by label."""
    params = server["api"]["named_endpoints"][endpoint]["parameters"]
    args = [values.get(p["label"], p["parameter_default"] if p["parameter_has_default"] else None) for p in params]
    return server["client"].predict(*args, api_name=endpoint)


def status(server, job_id):
    return server["client"].predict(job_id, api_name="/job_status")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


ESCAPES = ["../../etc/passwd", "/etc/passwd", "link_out/secret.txt", "file:///etc/passwd", "../secret.txt"]


@pytest.mark.parametrize("escape", ESCAPES)
def test_every_path_escape_is_refused_through_the_server(server, escape):
    out = call(server, "/train_check", pretrained_model_name_or_path=escape)
    plan = out[-2]
    assert "pretrained_model_name_or_path" in plan and ("outside the workspace" in plan or "URL" in plan)
    assert "Step plan" not in plan
    out = call(server, "/dataset_open", **{"dataset folder": escape})
    assert "outside the workspace" in out[3] or "URL" in out[3]
    with pytest.raises(AppError, match="outside the workspace|URL"):
        server["client"].predict("tags list", {"dataset_dir": escape}, api_name="/start_job")


def test_files_outside_the_workspace_are_never_served(server):
    url, root, base = server["url"], server["root"], server["base"]
    inside = root / "demo" / "prompts.txt"
    assert http_status(f"{url}gradio_api/file={inside}") == 200  # the route works for the workspace
    for path in ("/etc/passwd", base / "secret.txt", f"{root}/../secret.txt", root / "link_out" / "secret.txt",
                 Path.cwd() / "pyproject.toml", Path(__file__)):
        assert http_status(f"{url}gradio_api/file={path}") in (403, 404), path


def test_train_watch_stop_resume_equals_an_unbroken_cli_run(server, tmp_path):
    root = server["root"]
    run = dict(max_train_steps=12, sample_every_n_steps=4, save_every_n_steps=4, output_dir="demo/ui_run")
    out = call(server, "/train_start", **run)
    job = out[-1]
    assert out[-3].startswith("started job"), out[-3]
    seen = []
    deadline = time.time() + 240
    while time.time() < deadline:
        s = status(server, job)
        seen.append((s["step"], s["n_metrics"], len(s["samples"])))
        if s["phase"] == "training" and s["step"] >= 5 and s["samples"]:
            break
        assert s["state"] in ("queued", "running"), s
        time.sleep(0.3)
    server["client"].predict(job, api_name="/train_stop")
    while (s := status(server, job))["state"] == "running":
        time.sleep(0.3)
    assert s["state"] == "stopped" and "resume with" in s["message"], s
    stopped_at = s["step"]
    assert 5 <= stopped_at < 12
    assert any(n > 0 for _, n, _ in seen) and s["samples"][0].endswith(".png") and Path(s["samples"][0]).is_file()
    assert s["metrics"][-1]["loss"] > 0 and "lr_unet" in s["metrics"][-1]

    out = call(server, "/train_resume", **run)
    job2 = out[-1]
    while (s := status(server, job2))["state"] in ("queued", "running"):
        time.sleep(0.5)
    assert s["state"] == "done" and s["step"] == 12, s
    # it continued, it did not start again (job_status carries only the last 5 metrics, n_metrics counts all)
    assert s["n_metrics"] == 12 - stopped_at and s["metrics"][-1]["step"] == 12, s

    # the same options from the CLI, unbroken
    cfg = server["ctx"].runner.store.get(job).config
    cli_out = tmp_path / "cli"
    toml = tmp_path / "run.toml"
    from loratrain.training.config import TrainConfig

    toml.write_text(TrainConfig.build({**cfg, "output_dir": str(cli_out), "resume": ""}).to_toml())
    res = subprocess.run([sys.executable, "-m", "loratrain", "train", "--config_file", str(toml)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ui, cli = load_file(root / "demo/ui_run/demo_lora.safetensors"), load_file(cli_out / "demo_lora.safetensors")
    assert ui.keys() == cli.keys()
    for k in ui:
        assert (ui[k] == cli[k]).all(), k


def test_bad_values_come_back_as_messages_not_errors(server):
    out = call(server, "/train_check", resolution="65", network_dim=0)
    plan = out[-2]
    assert "resolution" in plan and "network_dim" in plan
    info = {p["label"]: u for p, u in zip(server["api"]["named_endpoints"]["/train_check"]["parameters"], out)}
    assert info["resolution"]["info"].startswith("⚠") and info["network_dim"]["info"].startswith("⚠")
    with pytest.raises(AppError, match="no job"):
        server["client"].predict("nonexistent", api_name="/job_status")


def test_simple_mode_fills_the_full_form(server):
    out = call(server, "/train_simple", **{"base model": "demo/tiny_model.safetensors", "image folder": "demo/dataset/4_circle",
                                           "trigger word": "sks", "what is trained": "style", "output name": "my_style"})
    labels = [p["label"] for p in server["api"]["named_endpoints"]["/train_check"]["parameters"]]
    values = dict(zip(labels, out))
    # a style is rank 96, halved for a set this small; the trigger goes first in every caption
    assert values["max_train_steps"] == 2500 and values["network_dim"] == 48 and values["lr_scheduler"] == "cosine_with_restarts"
    assert values["output_name"] == "my_style" and values["dataset_config"].endswith("my_style_dataset.toml")
    assert values["trigger_word"] == "sks" and values["keep_tokens"] == 1
    assert "Filled in for a style" in out[len(labels)] and "halved under 30 images" in out[len(labels)]
    # what the full form now holds is a config the Check button accepts, with its step plan
    checked = server["client"].predict(*out[:len(labels)], api_name="/train_check")
    assert "Step plan" in checked[-2] and "2500 optimizer steps" in checked[-2]


def test_grid_cells_arrive_then_the_grid(server):
    out = call(server, "/grid_start", **{"X axis": "cfg_scale", "X values": "3, 7", "Y axis": "seed", "Y values": "1, 2",
                                         "steps": 2, "output_dir": "demo/grid_run"})
    assert out[-2].startswith("started job"), out[-2]
    job = out[-1]
    while (s := status(server, job))["state"] in ("queued", "running"):
        time.sleep(0.5)
    assert s["state"] == "done", s
    assert len(s["samples"]) == 4 and all(Path(p).is_file() for p in s["samples"])
    assert any(p.endswith(".png") for p in s["outputs"]) and all(Path(p).is_file() for p in s["outputs"])
    bad = call(server, "/grid_check", **{"X axis": "steps", "X values": "1.5, 2", "Y axis": "seed", "Y values": "1"})
    assert "axis steps: '1.5' is not a valid int" in bad[-1]
