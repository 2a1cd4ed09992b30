"""Bad input and faults through the real CLI: one clear line naming the path or option, exit 2, no traceback,
nothing half-written, and every option checked before any model loads."""
from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from loratrain.core.errors import ConfigError
from loratrain.training.config import TrainConfig

pytestmark = pytest.mark.slow


def cli(*args: object, cwd: Path | None = None, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def preexec() -> None:
        if limit_bytes:  # a full disk, as the kernel reports it to a process over its file-size limit
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "loratrain", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, preexec_fn=preexec)


def clean_failure(res: subprocess.CompletedProcess, *expected: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout[-1500:], res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:") or "error:" in ln]
    assert errors, res.stderr[-1500:]
    for text in expected:
        assert text in res.stderr, (text, res.stderr[-1500:])


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if "loratrain-tmp" in p.name or p.name.endswith(".tmp")]


@pytest.fixture
def train_args(tiny_files, dataset, tmp_path):
    return ["train", "--pretrained_model_name_or_path", tiny_files["sd1_file"], "--train_data_dir", dataset, "--resolution", "64",
            "--output_dir", tmp_path / "out", "--output_name", "t", "--max_train_steps", "2"]


def test_registry_names_are_checked_before_the_model_loads(train_args, tmp_path, dataset):
    res = cli(*train_args, "--optimizer_type", "adamq")
    clean_failure(res, "optimizer_type", "unknown optimizer 'adamq'", "AdamW", "Lion")
    res = cli(*train_args, "--network_module", "glora")
    clean_failure(res, "network_module", "unknown network kind 'glora'", "locon", "loha")
    res = cli(*train_args, "--lr_scheduler", "cosine_fast")
    clean_failure(res, "unknown lr scheduler", "cosine_with_restarts")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --ss euler_b\n", encoding="utf-8")
    res = cli(*train_args, "--sample_prompts", prompts)  # an unknown sampler no longer dies at the first sample
    clean_failure(res, "sample_prompts", "euler_b", "euler_a")
    for r in (res,):
        assert "caching latents" not in r.stdout
    assert not (tmp_path / "out").exists() and not list(dataset.rglob(".loratrain_cache"))


def test_every_problem_at_once_and_no_abbreviated_flags(train_args, tmp_path):
    res = cli(*train_args, "--network_dim", "0", "--clip_skip", "0", "--resolution", "36")
    clean_failure(res, "network_dim", "clip_skip", "resolution", "multiple of 8", "nearest: 32 or 40")
    res = cli(*train_args, "--cache_latents_to")  # a prefix must not silently become --cache_latents_to_disk
    assert res.returncode == 2 and "unrecognized arguments: --cache_latents_to" in res.stderr
    with pytest.raises(ConfigError, match="resolution"):
        TrainConfig(resolution="33").check(ready=False)


def test_toml_and_flags_are_merged_before_validation(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "a.txt").write_text("x, y", encoding="utf-8")
    toml = tmp_path / "t.toml"
    toml.write_text("top = 5\ncaption_extension = 'txt'\n", encoding="utf-8")  # no dataset_dir: it comes from the command line
    res = cli("tags", "list", data, "--config_file", toml)
    assert res.returncode == 0, res.stderr
    assert "1 of 1 image(s) selected" in res.stdout


def test_disk_full_during_a_save_or_a_merge_is_one_line_and_leaves_no_temp_file(train_args, tiny_files, tmp_path):
    res = cli(*train_args, limit_bytes=60_000)
    clean_failure(res, "cannot write", "File too large", str(tmp_path / "out"))
    assert leftovers(tmp_path / "out") == []
    out = tmp_path / "m"
    out.mkdir()
    res = cli("merge", tiny_files["sd1_file"], tiny_files["sd1_file"], "--alpha", "0.5", "--output", out / "x.safetensors",
              limit_bytes=60_000)
    clean_failure(res, "cannot write", str(out / "x.safetensors"))
    assert list(out.iterdir()) == []


def test_outputs_below_a_plain_file_are_refused_up_front(train_args, tiny_files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    res = cli(*train_args[:-6], "--output_dir", blocker / "out", "--output_name", "t", "--max_train_steps", "2")
    clean_failure(res, "output_dir", "is a file, not a folder")
    res = cli("merge", tiny_files["sd1_file"], tiny_files["sd1_file"], "--alpha", "0.5", "--output", blocker / "x.safetensors")
    clean_failure(res, "output", "is a file, not a folder")


def test_a_caption_that_is_a_folder_is_named(train_args, dataset, tmp_path):
    (dataset / "3_circle" / "circle_000.txt").unlink()
    (dataset / "3_circle" / "circle_000.txt").mkdir()
    res = cli("tags", "list", dataset / "3_circle")
    clean_failure(res, "circle_000.txt is a folder")
    res = cli(*train_args)  # the trainer no longer takes it for a missing caption
    clean_failure(res, "circle_000.txt is a folder")


@pytest.fixture
def keep_sigint():
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_sweep_of_bad_inputs_never_shows_a_traceback(tiny_files, dataset, tmp_path, capsys, keep_sigint):
    """In-process through `main`: an exception escaping it would fail the test just as a traceback would show."""
    from loratrain.cli import main

    bad_image = tmp_path / "img.png"
    bad_image.write_bytes(b"not a png")
    not_lora = tmp_path / "junk.safetensors"
    not_lora.write_bytes(b"\x00" * 64)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    cases = [
        ["train", "--pretrained_model_name_or_path", tmp_path / "missing.safetensors", "--train_data_dir", dataset],
        ["train", "--pretrained_model_name_or_path", not_lora, "--train_data_dir", dataset, "--output_dir", tmp_path / "o"],
        ["train", "--pretrained_model_name_or_path", tiny_files["sd1_file"], "--train_data_dir", tmp_path / "nodata"],
        ["train", "--config_file", tmp_path / "missing.toml"],
        ["train", "--pretrained_model_name_or_path", tiny_files["sd1_file"], "--train_data_dir", dataset, "--resume", "latest",
         "--output_dir", tmp_path / "none"],
        ["generate", "--model", tiny_files["sd1_file"], "--prompt", "x", "--network_weights", tmp_path / "no_lora.safetensors"],
        ["generate", "--model", tiny_files["sd1_file"], "--prompt", "x", "--sampler", "nope"],
        ["merge", tiny_files["sd1_file"], ckpt, "--alpha", "0.5", "--output", tmp_path / "o.safetensors"],
        ["merge", tiny_files["sd1_file"], tiny_files["sd1_file"], "--output", tmp_path / "o.safetensors"],
        ["merge", tiny_files["sd1_file"], tiny_files["sd1_file"], "--alpha", "0.5", "--method", "smooth_add", "--output",
         tmp_path / "o.safetensors"],
        ["lora", "bake", tiny_files["sd1_file"], "--loras", not_lora, "--output", tmp_path / "b.safetensors"],
        ["lora", "merge", "--loras", tmp_path / "none.safetensors", "--output", tmp_path / "m.safetensors"],
        ["convert", tiny_files["sd1_file"], tiny_files["sd1_file"]],
        ["tags", "undo", dataset],
        ["tags", "replace", dataset, "--find", "(", "--regex"],
        ["dataset", "check", tmp_path / "nowhere"],
        ["dataset", "frames", bad_image],
        ["dataset", "prepare", tmp_path / "p", "--concepts", tmp_path / "nowhere"],
        ["tag", dataset, "--model", tmp_path / "no_tagger"],
        ["face", "extract", tmp_path / "nowhere"],
        ["face", "train", tmp_path / "fm", "--src_faceset", tmp_path / "a", "--dst_faceset", tmp_path / "b", "--archi", "dff"],
        ["face", "export", tmp_path / "none.safetensors", tmp_path / "x.onnx"],
        ["grid", "--model", tiny_files["sd1_file"], "--prompt", "x", "--x_type", "steps", "--x_values", "1-3 (+0.5)", "--y_type", "seed",
         "--y_values", "1"],
    ]
    for args in cases:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2, (args, err[-2000:])
        assert err.strip().splitlines()[-1].startswith("error:"), (args, err[-1000:])


def test_face_extract_finding_no_face_is_an_error(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 96), (200, 180, 160)).save(photos / f"{i}.jpg")
    res = cli("face", "extract", photos, "--output_dir", tmp_path / "faces")
    clean_failure(res, "no face found in any of the 2 frame(s)", "--min_score")
    assert not (tmp_path / "faces").exists()


def test_the_cli_and_the_apps_worker_share_one_rule_for_user_errors():
    from PIL import Image

    from loratrain.core.jobs import is_user_error

    assert is_user_error(Image.DecompressionBombError("200 megapixels")) and is_user_error(FileNotFoundError("x"))
    assert not is_user_error(KeyError("a bug")) and not is_user_error(KeyboardInterrupt())
    import inspect

    from loratrain.ui import worker

    assert "is_user_error(e)" in inspect.getsource(worker.main)  # the worker decides as the CLI does
