"""A kill at any moment: no broken file at a final path, our temp files cleaned by the next run, and
`--resume latest` finding the newest complete training state even when a save was cut between its renames."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter
from loratrain.core.safe_io import atomic_write_bytes
from loratrain.training import saving
from loratrain.training.trainer import run_train

from .conftest import quick_config

WRITER = """
import sys, time
from loratrain.core.safe_io import atomic_path
ctx = atomic_path(sys.argv[1])
tmp = ctx.__enter__()
tmp.write_bytes(b"half of a file" * 1000)
print(tmp, flush=True)
time.sleep(120)
"""


def writer_in_progress(target: Path) -> tuple[subprocess.Popen, Path]:
    """A real process of ours with a temp file open beside `target`, as a merge or a caption edit has mid-write."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file() and tmp.parent == target.parent
    return proc, tmp


def killed_writer(target: Path) -> Path:
    before = target.read_bytes() if target.exists() else None
    proc, tmp = writer_in_progress(target)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert tmp.is_file()  # what a kill -9 leaves: a hidden temp beside the output, never a broken final file
    assert (target.read_bytes() if target.exists() else None) == before
    return tmp


def test_a_killed_merge_leaves_a_temp_that_the_next_merge_removes(tiny_files, tmp_path):
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    stale = killed_writer(out)
    assert main(["merge", str(tiny_files["sd1_file"]), str(tiny_files["sd1_file"]), "--alpha", "0.5", "--output", str(out),
                 "--no-hash_models"]) == 0
    assert not stale.exists() and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.safetensors"]


def test_a_killed_caption_edit_is_cleaned_but_a_running_one_is_left_alone(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in "ab":
        Image.new("RGB", (8, 8)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text("x, y\n", encoding="utf-8")
    stale = killed_writer(data / "a.txt")
    live_proc, live = writer_in_progress(data / "b.txt")
    try:
        assert main(["tags", "add", str(data), "--tags", "z"]) == 0
        assert not stale.exists()  # its writer is dead: removed
        assert live.exists()  # its writer still runs: not ours to remove
        assert (data / "a.txt").read_text() == "x, y, z\n"
    finally:
        live_proc.kill()
        live_proc.wait(timeout=30)


def test_resume_latest_takes_the_newest_complete_state_after_a_save_cut_between_renames(tiny_files, dataset, tmp_path,
                                                                                         monkeypatch):
    kw = dict(max_train_steps=6, save_every_n_steps=2, train_batch_size=1, shuffle_caption=True)
    straight = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "a", **kw), RecordingReporter())

    real_replace = os.replace
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def replace(src, dst):
        real_replace(src, dst)
        calls["n"] += 1
        if str(src).endswith("t-state") and str(dst).endswith("t-state.old") and calls["n"] > 2:
            raise Killed  # the process dies right after moving the old state aside (the second save, at step 4)

    monkeypatch.setattr(saving.os, "replace", replace)
    with pytest.raises(Killed):
        run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "b", **kw), RecordingReporter())
    monkeypatch.setattr(saving.os, "replace", real_replace)
    out = tmp_path / "b"
    assert not (out / "t-state").exists()
    assert saving.state_info(out / "t-state.old")["global_step"] == 2
    assert saving.state_info(out / "t-state.tmp")["global_step"] == 4

    rec = RecordingReporter()
    resumed = run_train(quick_config(tiny_files["sd1_file"], dataset, out, resume="latest", **kw), rec)
    assert any("resuming from" in line and "t-state.tmp" in line for line in rec.lines)
    assert resumed.global_step == 6
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "t-state").is_dir() and not (out / "t-state.tmp").exists() and not (out / "t-state.old").exists()


def test_resume_latest_without_any_state_says_so(tiny_files, dataset, tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume.*run without --resume"):
        run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "none", resume="latest"), RecordingReporter())


def test_an_incomplete_state_is_never_taken(tmp_path):
    state = tmp_path / "t-state"
    state.mkdir()
    (state / "network.safetensors").write_bytes(b"x" * 10)
    (state / "optimizer.pt").write_bytes(b"y" * 10)
    atomic_write_bytes(state / "train_state.json", b'{"global_step": 9, "files": {"network.safetensors": 10, "optimizer.pt": 99}}')
    assert saving.state_info(state) is None and saving.find_state(state) is None
    with pytest.raises(ConfigError, match="incomplete training state"):
        saving.load_state(state)
    time.sleep(0)  # (keeps the file's timestamps apart on coarse file systems)
