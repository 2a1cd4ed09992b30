"""The app and the CLI tried as a hostile user would: every hole of issue 21 through the real server API (and the real
CLI), asserting on the disk (a sentinel folder outside the workspace is hashed before and after) and on processes
(a victim process the app never started stays alive), never on message text alone."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from loratrain.jobs import JOBS
from loratrain.training.demo import make_concept_images

from .conftest import running_app

pytestmark = pytest.mark.slow


def tree_digest(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed) with its content hash or link target: any change shows."""
    out = {}
    for dirpath, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "ws", base / "outside"
    root.mkdir()
    (outside / "fake").mkdir(parents=True)
    (outside / "secret.txt").write_text("the user's own file")
    make_concept_images(outside / "imgs", "circle", 3, 64, 5)
    victim = subprocess.Popen(["sleep", "900"], start_new_session=True)  # a process the app never started
    (outside / "fake" / "state.json").write_text(json.dumps({
        "id": "fake", "job": "train", "title": "bait", "created": 0, "state": "running", "pid": victim.pid}))
    os.symlink(outside, root / "link_out")
    with running_app(root) as (ctx, url):
        shutil.copy(root / "demo" / "tiny_model.safetensors", outside / "model.safetensors")
        client = Client(url, verbose=False)
        e = {"root": root, "outside": outside, "victim": victim, "client": client, "ctx": ctx, "url": url,
             "model": str(root / "demo" / "tiny_model.safetensors"), "data": str(root / "demo" / "dataset")}
        e["before"] = tree_digest(outside)
        yield e
        client.close()
    victim.kill()
    victim.wait()


@pytest.fixture(autouse=True)
def outside_unchanged(env):
    """After every test: nothing outside the workspace was written, changed or removed, and the victim lives."""
    yield
    assert tree_digest(env["outside"]) == env["before"]
    assert env["victim"].poll() is None, "a process the app never started was signalled"


def start(env, job: str, config: dict) -> str:
    return env["client"].predict(job, config, api_name="/start_job")


def wait(env, job_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = env["client"].predict(job_id, api_name="/job_status")
        if s["state"] not in ("queued", "running"):
            return s
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not end")


def refused_or_failed(env, job: str, config: dict, *needles: str) -> str:
    """The request is refused before it is queued, or its job fails in its worker; either way with one of `needles`."""
    try:
        job_id = start(env, job, config)
    except AppError as e:
        text = str(e)
    else:
        s = wait(env, job_id)
        assert s["state"] == "failed", s
        text = s["error"] or s["message"]
    assert any(n in text for n in needles), text
    return text


TRAIN = dict(resolution="64", network_dim=4, network_alpha=2.0, max_train_steps=2, train_batch_size=1, seed=1)


# ---- names joined to folders -------------------------------------------------------------------------------------
@pytest.mark.parametrize("job,field", [("train", "output_name"), ("face train", "model_name"), ("dataset prepare", "toml_name")])
@pytest.mark.parametrize("value", ["../../../outside/x", "/abs/x", "a/b", "..", "~", "x\\..\\y"])
def test_a_name_is_one_path_component(env, job, field, value):
    with pytest.raises(AppError, match=field):
        start(env, job, {field: value})


def test_cli_refuses_a_name_that_leaves_its_folder(env, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "loratrain", "train", "--pretrained_model_name_or_path", env["model"],
                          "--train_data_dir", env["data"], "--output_dir", str(out), "--output_name", "../../escaped",
                          "--resolution", "64", "--max_train_steps", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "output_name" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and not (tmp_path.parent / "escaped.safetensors").exists()
    res = subprocess.run([sys.executable, "-m", "loratrain", "dataset", "prepare", str(out), "--concepts", f"{env['data']}/4_circle=sks",
                          "--toml_name", "../escaped.toml"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "toml_name" in res.stderr and not (tmp_path / "escaped.toml").exists()


# ---- paths that arrive inside other files ------------------------------------------------------------------------
def test_a_dataset_toml_pointing_out_is_refused(env):
    toml = env["root"] / "evil_dataset.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{env["outside"] / "imgs"}"\nnum_repeats = 1\n')
    rel = env["root"] / "evil_rel.toml"
    rel.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "link_out/imgs"\nnum_repeats = 1\n')
    for path in (toml, rel):
        refused_or_failed(env, "train", {**TRAIN, "pretrained_model_name_or_path": env["model"], "dataset_config": str(path),
                                         "output_dir": "out_toml", "cache_latents_to_disk": True}, "outside the workspace")
    assert not (env["root"] / "out_toml" / "last.safetensors").exists()


def test_a_concept_folder_linking_out_is_refused(env):
    data = env["root"] / "evil_data"
    data.mkdir()
    os.symlink(env["outside"] / "imgs", data / "5_evil")
    refused_or_failed(env, "train", {**TRAIN, "pretrained_model_name_or_path": env["model"], "train_data_dir": str(data),
                                     "output_dir": "out_link", "cache_latents_to_disk": True}, "outside the workspace")
    one = env["root"] / "evil_data2" / "5_ok"
    one.mkdir(parents=True)
    make_concept_images(one, "square", 2, 64, 2)
    os.symlink(env["outside"] / "imgs" / sorted(os.listdir(env["outside"] / "imgs"))[0], one / "zz_linked.png")
    refused_or_failed(env, "train", {**TRAIN, "pretrained_model_name_or_path": env["model"],
                                     "train_data_dir": str(one.parent), "output_dir": "out_link2", "cache_latents_to_disk": True},
                      "outside the workspace")


def test_a_grid_axis_value_outside_is_never_loaded(env):
    refused_or_failed(env, "grid", {"model": env["model"], "x_type": "checkpoint", "x_values": str(env["outside"] / "model.safetensors"),
                                    "y_type": "seed", "y_values": "1", "prompt": "a circle", "steps": 1, "width": 64, "height": 64, "output_dir": "grid_out"}, "outside the workspace")
    refused_or_failed(env, "grid", {"model": env["model"], "x_type": "checkpoint", "x_values": "link_out/model.safetensors",
                                    "y_type": "seed", "y_values": "1", "prompt": "a circle", "steps": 1, "width": 64, "height": 64, "output_dir": "grid_out"}, "outside the workspace")


def test_a_model_folder_whose_weights_link_out_is_refused(env):
    from loratrain.core.models.tiny import make_tiny_model, write_diffusers_folder

    folder = write_diffusers_folder(make_tiny_model("sd1", seed=0), env["root"] / "linked_model")
    weights = next((folder / "unet").glob("*.safetensors"))
    moved = env["outside"] / "unet_weights.safetensors"
    os.replace(weights, moved)
    os.symlink(moved, weights)
    env["before"] = tree_digest(env["outside"])  # the planted file is part of what must not change from here on
    refused_or_failed(env, "train", {**TRAIN, "pretrained_model_name_or_path": str(folder), "train_data_dir": env["data"],
                                     "output_dir": "out_linked_model"}, "outside the workspace")
    assert not (env["root"] / "out_linked_model" / "last.safetensors").exists()


def test_base_weights_and_config_file_outside_are_refused(env):
    with pytest.raises(AppError, match="base_weights"):
        start(env, "train", {**TRAIN, "pretrained_model_name_or_path": env["model"], "train_data_dir": env["data"],
                             "base_weights": [str(env["outside"] / "model.safetensors")]})
    with pytest.raises(AppError, match="config_file"):
        start(env, "train", {"config_file": str(env["outside"] / "secret.txt")})
    inner = env["root"] / "inner.toml"
    inner.write_text(f'output_dir = "{env["outside"]}"\n')
    with pytest.raises(AppError, match="output_dir"):  # a path read from the config file is checked like a typed one
        start(env, "train", {**TRAIN, "config_file": str(inner), "pretrained_model_name_or_path": env["model"],
                             "train_data_dir": env["data"]})


# ---- job ids and processes ---------------------------------------------------------------------------------------
def test_job_ids_never_leave_the_jobs_folder(env):
    client = env["client"]
    for job_id in ("../../../outside/fake", str(env["outside"] / "fake"), "..", "20261206-000000-abcdef/../../x"):
        with pytest.raises(AppError, match="no job"):
            client.predict(job_id, api_name="/job_status")
        for api in ("/jobs_kill", "/train_kill", "/merge_kill", "/jobs_stop", "/train_stop"):
            with pytest.raises(AppError, match="no job"):
                client.predict(job_id, api_name=api)
    assert not (env["outside"] / "fake" / "events.jsonl").exists()


def _victim_start(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[19])


def test_a_planted_job_record_is_no_job(env):
    """Records in the jobs folder that the app did not write (a downloaded archive unpacked at the root, say) are never
    listed, launched or signalled, even when they name the victim's real pid and start time or ask for no roots."""
    store = env["ctx"].runner.store
    victim = env["victim"]
    kill_me = store.root / "20200101-000000-abcdef"
    kill_me.mkdir()
    (kill_me / "state.json").write_text(json.dumps({
        "id": kill_me.name, "job": "train", "title": "forged", "created": 0, "state": "running", "pid": victim.pid,
        "pid_start": _victim_start(victim.pid), "sig": "0" * 64}))
    run_me = store.root / "20200101-000001-abcdef"
    run_me.mkdir()
    (run_me / "state.json").write_text(json.dumps({"id": run_me.name, "job": "dataset frames", "title": "forged", "created": 0,
                                                   "state": "queued"}))
    (run_me / "job.json").write_text(json.dumps({"job": "dataset frames", "roots": [], "config": {
        "video": str(env["root"] / "nothing.mp4"), "output_dir": str(env["outside"] / "pwned")}}))
    for api in ("/jobs_kill", "/train_kill", "/jobs_stop"):
        with pytest.raises(AppError, match="no job"):
            env["client"].predict(kill_me.name, api_name=api)
    env["ctx"].runner.tick()
    time.sleep(1.5)
    assert victim.poll() is None
    listed = [r.id for r in store.all()]
    assert kill_me.name not in listed and run_me.name not in listed
    assert not (run_me / "events.jsonl").exists() and not (env["outside"] / "pwned").exists()
    # a worker handed a job.json the app did not sign refuses it
    res = subprocess.run([sys.executable, "-m", "loratrain.ui.worker", str(run_me)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "not written by this app" in (run_me / "events.jsonl").read_text()


# ---- an untrusted journal ----------------------------------------------------------------------------------------
def test_a_planted_journal_cannot_write_outside(env):
    ds = env["root"] / "downloaded"
    make_concept_images(ds, "circle", 2, 64, 3)
    from loratrain.cli import main as cli

    assert cli(["tags", "add", str(ds), "--tags", "extra"]) == 0
    journal = sorted((ds / ".loratrain" / "journal").glob("*.jsonl"))[-1]
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    for target in ("../../outside/secret.txt", str(env["outside"] / "secret.txt"), "link_out/secret.txt"):
        forged = [lines[0]] + [{**r, "path": target} if "path" in r else r for r in lines[1:]]
        journal.write_text("".join(json.dumps(r) + "\n" for r in forged))
        if target.startswith("link_out"):
            (ds / "link_out").unlink(missing_ok=True)
            os.symlink(env["outside"], ds / "link_out")
        inside = tree_digest(ds)
        refused_or_failed(env, "tags undo", {"dataset_dir": str(ds)}, "outside the dataset", "journal entry")
        assert tree_digest(ds) == inside


# ---- finished work is never replaced -----------------------------------------------------------------------------
def test_a_second_job_may_not_take_a_stopped_runs_outputs(env):
    cfg = {**TRAIN, "pretrained_model_name_or_path": env["model"], "train_data_dir": env["data"], "output_dir": "twice",
           "output_name": "mine", "max_train_steps": 400, "save_every_n_steps": 2}
    first = start(env, "train", cfg)
    deadline = time.time() + 240
    while (s := env["client"].predict(first, api_name="/job_status"))["step"] < 2 and time.time() < deadline:
        assert s["state"] in ("queued", "running"), s
        time.sleep(0.3)
    with pytest.raises(AppError, match=f"job {first}"):  # running
        start(env, "train", cfg)
    with pytest.raises(AppError, match=f"job {first}"):  # another kind of job writing one of that run's files
        start(env, "lora resize", {"model": str(env["root"] / "twice" / "mine.safetensors"), "new_rank": 2,
                                   "output": str(env["root"] / "twice" / "mine-step00000002.safetensors")})
    env["client"].predict(first, api_name="/train_stop")
    s = wait(env, first)
    assert s["state"] == "stopped", s
    state = env["root"] / "twice" / "mine-state"
    before = tree_digest(state)
    with pytest.raises(AppError, match=f"job {first}"):  # stopped, waiting for Resume
        start(env, "train", cfg)
    with pytest.raises(AppError, match="output_name"):  # another job name, same files
        start(env, "train", {**cfg, "output_dir": str(env["root"] / "twice" / "." )})
    assert tree_digest(state) == before


# ---- what the app's own pages open -------------------------------------------------------------------------------
def call(env, endpoint, **values):
    """A page event by its api_name, with the form's defaults and the given fields (by label)."""
    api = env.setdefault("api", env["client"].view_api(return_format="dict", print_info=False))
    params = api["named_endpoints"][endpoint]["parameters"]
    args = [values.get(p["label"], p["parameter_default"] if p["parameter_has_default"] else None) for p in params]
    return env["client"].predict(*args, api_name=endpoint)


def test_page_handlers_never_follow_a_link_out(env):
    faces = env["root"] / "faces1"
    faces.mkdir()
    make_concept_images(faces, "circle", 1, 64, 7)
    face = sorted(faces.glob("*.png"))[0]
    os.symlink(env["outside"], faces / "_other")
    labels = [p["label"] for p in env["client"].view_api(return_format="dict", print_info=False)["named_endpoints"]
              ["/faceset_move"]["parameters"]]
    out = env["client"].predict(str(faces), face.name, api_name="/faceset_move")
    assert face.is_file() and "outside the workspace" in str(out), (labels, out)

    ds = env["root"] / "ds_link"
    make_concept_images(ds, "square", 1, 64, 8)
    image = sorted(ds.glob("*.png"))[0]
    image.with_suffix(".txt").unlink(missing_ok=True)
    os.symlink(env["outside"] / "secret.txt", image.with_suffix(".txt"))
    out = call(env, "/dataset_open", **{"dataset folder": str(ds)})
    assert "the user's own file" not in json.dumps(out, default=str) and "outside the workspace" in json.dumps(out, default=str)


def test_a_text_file_named_like_a_video_is_never_handed_to_ffmpeg(env):
    (env["root"] / "vid").mkdir()
    os.symlink(env["outside"] / "secret.txt", env["root"] / "vid" / "lnk.mp4")
    (env["root"] / "vid" / "evil.mp4").write_text("ffconcat version 1.0\nfile lnk.mp4\n")
    refused_or_failed(env, "dataset frames", {"video": "vid/evil.mp4", "output_dir": "frames_out"}, "text file")
    assert not any((env["root"] / "frames_out").glob("*")) if (env["root"] / "frames_out").exists() else True


def test_a_playlist_with_a_nul_byte_is_no_video(env):
    (env["root"] / "vid2").mkdir()
    shutil.copy(env["outside"] / "secret.txt", env["root"] / "vid2" / "dummy.txt")
    (env["root"] / "vid2" / "nul.m3u8").write_bytes(
        b"#EXTM3U\n#\x00junk\n#EXTINF:1,\n" + str(env["outside"] / "secret.txt").encode() + b"\n#EXT-X-ENDLIST\n")
    (env["root"] / "vid2" / "cc.mp4").write_bytes(b"ffconcat version 1.0\n#\x00\nfile ../link_out/secret.txt\n")
    for video in ("vid2/nul.m3u8", "vid2/cc.mp4"):
        refused_or_failed(env, "dataset frames", {"video": video, "output_dir": "frames_nul"}, "cannot read it as a video",
                          "text file")
    assert not any((env["root"] / "frames_nul").glob("*.png")) if (env["root"] / "frames_nul").exists() else True


def test_a_swap_resume_state_names_only_its_own_segments(env, tmp_path):
    from loratrain.core.errors import ConfigError
    from loratrain.facetrain.swap.media import ResumeState

    parts = env["root"] / ".sw.mp4.swap-parts"
    parts.mkdir()
    for segments in ([str(env["outside"] / "secret.txt")], ["../../outside/secret.txt"], ["seg_00000.mp4' \nfile 'x"]):
        (parts / "state.json").write_text(json.dumps({"key": "k", "next_frame": 100, "segments": segments}))
        with pytest.raises(ConfigError, match="not a swap's resume state"):
            ResumeState(parts, "k").load(False, "output")


def test_the_simple_mode_name_is_a_name(env):
    jobs = env["ctx"].runner.store.real
    before = tree_digest(jobs)
    for name in ("../.loratrain/ui/jobs/x/stop/x", "../demo/overwritten", "../../outside/x"):
        out = call(env, "/train_simple", **{"base model": "demo/tiny_model.safetensors", "image folder": "demo/dataset/4_circle",
                                            "trigger word": "sks", "what is trained": "style", "output name": name})
        assert "output name" in json.dumps(out, default=str)
    assert not (env["root"] / "demo" / "overwritten_dataset.toml").exists()
    after = tree_digest(jobs)
    assert {k: v for k, v in after.items() if k in before} == before and not any(k.endswith("_dataset.toml") for k in after)


def test_a_forged_training_state_is_no_oracle(env):
    state = env["root"] / "st" / "x-state"
    state.mkdir(parents=True)
    (state / "train_state.json").write_text(json.dumps({"files": {str(env["outside"] / "secret.txt"): 1, "/etc/passwd": 1}}))
    with pytest.raises(AppError) as e:
        start(env, "train", {**TRAIN, "pretrained_model_name_or_path": env["model"], "train_data_dir": env["data"],
                             "output_dir": "st", "output_name": "x", "resume": str(state)})
    assert "no part of a training state" in str(e.value) and "bytes" not in str(e.value)


def test_the_jobs_folder_is_never_served(env):
    import urllib.error
    import urllib.request

    record = env["ctx"].runner.store.all()[0]
    for name in ("job.json", "state.json", "events.jsonl"):
        try:
            with urllib.request.urlopen(f"{env['url']}gradio_api/file={env['ctx'].runner.store.real / record.id / name}",
                                        timeout=10) as r:
                code = r.status
        except urllib.error.HTTPError as err:
            code = err.code
        assert code in (403, 404), name


# ---- the console ---------------------------------------------------------------------------------------------------
def test_a_refused_request_is_one_console_line(env, capfd):
    capfd.readouterr()
    with pytest.raises(AppError):
        start(env, "train", {"output_name": "../x"})
    time.sleep(0.3)
    err = capfd.readouterr().err
    assert "refused /start_job: output_name" in err and "Traceback" not in err, err


# ---- generated hostile strings through every path-like and name-like option of every job ---------------------------
def hostile_strings(outside: Path, rng: random.Random) -> list[str]:
    """Strings that must never open anything outside the workspace: escapes, absolute paths, home, URLs, NUL, very long
    strings, links out, and unicode look-alikes of dots and slashes (those may be accepted, but only inside)."""
    fixed = ["../../outside/secret.txt", str(outside / "secret.txt"), "~/x", "~root/.bashrc", "file:///etc/passwd",
             "http://127.0.0.1:1/x.safetensors", "x\x00y", "a" * 5000, "link_out/secret.txt", "demo/../../outside",
             "////etc/passwd", "./../x", "．．／outside/secret.txt", "\u2024\u2024/outside", "demo/\u2215..\u2215x"]
    parts = ["..", ".", "~", "outside", "link_out", "demo", "%2e%2e", "\u2025", "\x00", "a" * 300, "secret.txt"]
    made = ["/".join(rng.choice(parts) for _ in range(rng.randint(1, 5))) for _ in range(6)]
    return fixed + [("/" if rng.random() < 0.3 else "") + m for m in made]


def path_fields():
    out = []
    for name in JOBS.names():
        spec = JOBS.get(name)
        if name.startswith("demo"):
            continue
        cls = spec.config_class()
        for field in cls.model_fields:
            kind = cls.extra(field).get("path")
            if kind and field not in spec.fixed:
                out.append((name, field, kind))
    return out


def escapes(value: str, kind: str, root: Path) -> bool:
    """Whether opening `value` (from the workspace) would reach outside it, or the string is no usable path at all."""
    from loratrain.core.paths import name_problem

    if kind == "name":
        return name_problem(value) is not None
    if "\x00" in value or "://" in value or value.startswith("file:") or len(value) > 4096:
        return True
    real = Path(os.path.realpath(root / os.path.expanduser(value)))
    return not (real == root or root in real.parents)


def test_generated_hostile_strings_never_reach_outside(env):
    rng = random.Random(21)
    strings = hostile_strings(env["outside"], rng)
    fields = path_fields()
    assert len(fields) > 60  # every job's path and name options, not a sample
    root = env["root"].resolve()
    accepted, tried, refused = [], 0, 0
    for job, field, kind in fields:
        cls = JOBS.get(job).config_class()
        is_list = "list" in str(cls.model_fields[field].annotation)
        for value in rng.sample(strings, 6):
            tried += 1
            bad = escapes(value, kind, root)
            try:
                job_id = start(env, job, {field: [value] if is_list else value})
            except AppError as e:
                refused += bad
                if bad:  # refused for what it is, by name, not by luck (a missing required option)
                    assert field in str(e), (job, field, value, str(e))
                continue
            assert not bad, (job, field, value)
            accepted.append((job, field, value, job_id))
    for job, field, value, job_id in accepted:  # only look-alikes that stay inside may get this far
        record = env["ctx"].runner.store.get(job_id)
        given = record.config[field]
        for item in given if isinstance(given, list) else [given]:
            real = Path(os.path.realpath(env["root"] / str(item)))
            assert real == root or root in real.parents, (job, field, value, item)
        wait(env, job_id)
    print(f"hostile strings: {tried} tried on {len(fields)} options, {refused} escaping ones refused naming the option, "
          f"{len(accepted)} look-alikes accepted (all inside the workspace)")
    assert tried > 300 and refused > 200, (tried, refused)


def test_a_caption_extension_is_no_path(env, tmp_path):
    ds = tmp_path / "ds"
    make_concept_images(ds, "dot", 1, 64, 9)
    for ext in (".txt/../../x", "/x", "..", "txt\\..\\x"):
        res = subprocess.run([sys.executable, "-m", "loratrain", "tags", "add", str(ds), "--tags", "t", "--caption_extension", ext],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "caption_extension" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_ffmpeg_writes_into_the_folder_that_was_checked_not_a_link_swapped_in(env):
    """ffmpeg is another program (out of the audit hook's sight): it gets the checked folder by fd, so swapping the
    folder for a link out while it runs sends nothing outside."""
    import numpy as np

    from loratrain.facetrain.swap.media import VideoSink

    tmp_path = env["root"] / "race"
    tmp_path.mkdir()
    parts, final = tmp_path / ".out.mp4.swap-parts", tmp_path / "out.mp4"
    sink = VideoSink(final, parts, fps=5.0, size=(64, 64), crf=20)
    sink.open("seg_00000.mp4")
    os.rename(parts, tmp_path / "moved")
    os.symlink(env["outside"], parts)  # the swap the attacker makes after the check
    for _ in range(3):
        sink.write(np.zeros((64, 64, 3), np.uint8))
    assert sink.close() == "seg_00000.mp4"
    assert (tmp_path / "moved" / "seg_00000.mp4").stat().st_size > 0
    sink.abort()
