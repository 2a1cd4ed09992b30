"""The job contract: run_<job>(cfg, reporter=None, stop=None) -> Result, checked before work, silent by default,
stoppable within one unit with nothing half-written, and no process-wide state left behind."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from loratrain.core.config import JobConfig
from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.jobs import JOBS
from loratrain.training.trainer import run_train

from .conftest import quick_config

ROOT = Path(__file__).resolve().parents[1]


class StopAfter(RecordingReporter):
    """Sets the stop flag once `n` units of work are done (the first unit runs, the next check sees the flag)."""

    def __init__(self, stop: StopFlag, n: int = 1) -> None:
        super().__init__()
        self.stop_flag, self.n = stop, n

    def advance(self, n: int = 1, **metrics: float) -> None:
        super().advance(n, **metrics)
        if self.step >= self.n:
            self.stop_flag.set()


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_every_job_follows_the_contract_and_checks_before_any_work():
    for name in JOBS:
        spec = JOBS.get(name)
        cfg_cls, run = spec.config_class(), spec.run_function()
        assert issubclass(cfg_cls, JobConfig), name
        params = list(inspect.signature(run).parameters.values())
        assert [p.name for p in params[:3]] == ["cfg", "reporter", "stop"], name
        assert params[1].default is None and params[2].default is None, name
        assert run.__doc__, f"{name}: a public job documents its arguments and result"
        if spec.path[0] == "demo":
            continue  # the demos need no input at all
        with pytest.raises(ConfigError) as err:  # an empty form: every requirement named, nothing run
            run(cfg_cls.build(dict(spec.fixed)), RecordingReporter())
        assert err.value.problems and all(field for field, _ in err.value.problems if "is required" in _), name


def test_two_trainings_in_one_process_with_different_precisions_leave_no_global_state(tiny_files, dataset, tmp_path):
    before = torch.get_rng_state()
    first = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "a", max_train_steps=2, mixed_precision="no"))
    assert torch.equal(torch.get_rng_state(), before)  # adapter init and dropout ran on a forked generator
    rec = RecordingReporter()
    second = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "b", max_train_steps=2, mixed_precision="bf16",
                                    network_dropout=0.1), rec)
    assert first.lora_path.is_file() and second.lora_path.is_file() and second.global_step == 2
    assert torch.equal(torch.get_rng_state(), before)
    assert [p for p, _ in rec.phases] == ["caching latents", "training"]  # phases keep their description
    assert rec.final is second and all(m["loss"] > 0 for m in rec.metrics)
    again = run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "c", max_train_steps=2, mixed_precision="no"))
    assert again.losses == first.losses  # the same seed gives the same run, whatever ran before it


def test_jobs_are_silent_without_a_reporter(tiny_files, dataset, tmp_path, capfd):
    from loratrain.merge.checkpoint import run_merge
    from loratrain.merge.config import MergeConfig

    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "t", max_train_steps=1, sample_prompts="",
                           save_every_n_steps=1))
    run_merge(MergeConfig(model_a=str(tiny_files["sd1_file"]), model_b=str(tiny_files["sd1_file"]), alpha=0.5,
                          output=str(tmp_path / "m.safetensors")))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_stopped_merge_and_bake_write_nothing(tiny_files, tmp_path):
    from loratrain.merge.checkpoint import run_merge
    from loratrain.merge.config import MergeConfig

    stop = StopFlag()
    out = tmp_path / "out"
    out.mkdir()
    res = run_merge(MergeConfig(model_a=str(tiny_files["sd1_file"]), model_b=str(tiny_files["sd1_file"]), alpha=0.5,
                                output=str(out / "m.safetensors")), StopAfter(stop, 3), stop)
    assert res.stopped and res.output is None and res.exit_code == 130
    assert files(out) == set()  # no output, no temp file


def test_stopped_prepare_removes_what_it_placed(tmp_path):
    from loratrain.dataset_tools.prepare import PrepareConfig, run_prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text("a, b", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")
    stop = StopFlag()
    res = run_prepare(PrepareConfig(output_dir=str(out), concepts=[f"{src}=sks"]), StopAfter(stop, 2), stop)
    assert res.stopped and files(out) == {"mine.txt"}


def test_check_and_tags_stop_and_report(tmp_path):
    from loratrain.dataset_tools.editor.config import TagsConfig
    from loratrain.dataset_tools.editor.run import run_tags
    from loratrain.dataset_tools.quality.config import CheckConfig
    from loratrain.dataset_tools.quality.report import run_check

    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a, b{i}\nkept line\n", encoding="utf-8")
    stop = StopFlag()
    rec = StopAfter(stop, 1)
    report = run_check(CheckConfig(dataset_dir=str(tmp_path), workers=1), rec, stop)
    assert report.stopped and report.images == 1 and rec.final is report
    res = run_tags(TagsConfig(op="list", dataset_dir=str(tmp_path)))
    assert dict(res.frequency) == {"a": 4, "b0": 1, "b1": 1, "b2": 1, "b3": 1}  # first lines only, as the trainer reads
    assert isinstance(res, JobResult) and res.summary()[0] == "4 of 4 image(s) selected"


def test_no_module_writes_hub_constants_or_prints():
    """The library never reconfigures huggingface_hub, never prints, never installs a signal handler."""
    app = {ROOT / "loratrain" / "cli.py", ROOT / "loratrain" / "console.py"}
    for folder in ("loratrain", "merge", "dataset_tools", "facetrain"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"\bconstants\.\w+\s*=(?!=)", text), path
            if path not in app and "make_clip_tokenizer" not in path.name:
                assert not re.search(r"^\s*print\(", text, re.M), path
                assert "signal.signal(" not in text, path
