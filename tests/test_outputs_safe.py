"""Issue 21, "never replace a finished run": a second run, a re-save, a merge or a convert never replaces what it was
not told to, never destroys its own inputs, writes files with the umask's modes, and a full disk leaves nothing behind.

Most checks are refusals, which stop before any model loads; the disk is compared (hashes, modes) before and after.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.safe_io import atomic_dir, output_conflicts, replaceable, save_safetensors


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `path` (or of `path` itself)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], *expected: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: refusals must come first."""
    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a model was loaded before the refusal")

    import loratrain.core.models.loading as loading
    import loratrain.training.trainer as trainer

    monkeypatch.setattr(trainer, "load_model", boom)
    monkeypatch.setattr(loading, "load_model", boom)


def _train_args(tiny_files, dataset, out, command="train", *extra):
    return [command, "--pretrained_model_name_or_path", tiny_files["sd1_file"], "--train_data_dir", dataset, "--resolution", "64",
            "--output_dir", out, "--output_name", "t", "--max_train_steps", "2", "--train_batch_size", "2", "--save_precision", "float",
            "--seed", "3", *extra]


def _earlier_run(out: Path, name: str = "t", state: bool = True) -> None:
    """What a finished run leaves: its LoRA, an epoch save, and a complete resumable state."""
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({"w": torch.ones(3)}, out / f"{name}.safetensors")
    save_safetensors({"w": torch.zeros(3)}, out / f"{name}-000001.safetensors")
    if state:
        st = out / f"{name}-state"
        st.mkdir()
        save_safetensors({"w": torch.ones(2)}, st / "network.safetensors")
        torch.save({"optimizer": {}, "scheduler": {}}, st / "optimizer.pt")
        sizes = {n: (st / n).stat().st_size for n in ("network.safetensors", "optimizer.pt")}
        (st / "train_state.json").write_text(json.dumps({"global_step": 2, "files": sizes}))


# ---- training: a second run with the same output_name ------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "finetune", "dreambooth"])
def test_a_second_run_with_the_same_output_name_is_refused_before_the_model_loads(tiny_files, dataset, tmp_path, capsys,
                                                                                    no_model_load, command):
    out = tmp_path / "out"
    _earlier_run(out)
    before = tree(out)
    refused(capsys, _train_args(tiny_files, dataset, out, command), f"{out / 't.safetensors'} exists", "earlier run named 't'",
            "pass --overwrite to replace it or --resume latest to continue")
    assert tree(out) == before


@pytest.mark.parametrize("leftover", ["t-000003.safetensors", "t-step00000004.safetensors", "t.peft.safetensors", "t-state"])
def test_each_file_of_an_earlier_run_is_enough_to_refuse(tiny_files, dataset, tmp_path, capsys, no_model_load, leftover):
    out = tmp_path / "out"
    out.mkdir()
    if leftover.endswith("-state"):
        (out / leftover).mkdir()
        (out / leftover / "notes.txt").write_text("mine")
    else:
        save_safetensors({"w": torch.ones(1)}, out / leftover)
    before = tree(out)
    # no complete state: nothing to resume, so the message does not suggest it
    refused(capsys, _train_args(tiny_files, dataset, out), f"{out / leftover} exists", "pass --overwrite to replace it, or choose "
            "another output_name")
    assert tree(out) == before
    # files of other names are no earlier run of this one
    other = tmp_path / "other"
    other.mkdir()
    for name in ("t-other.safetensors", "tt.safetensors", "t-01.safetensors", "t.txt", "t-state-old"):
        (other / name).write_bytes(b"x")
    from loratrain.training.config import TrainConfig

    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_files["sd1_file"]), train_data_dir=str(dataset), output_dir=str(other),
                      output_name="t")
    assert not [p for p in cfg.requirements() if p[0] == "output_name"]


def test_overwrite_or_resume_let_the_run_go_on(tiny_files, dataset, tmp_path):
    from loratrain.training.config import TrainConfig

    out = tmp_path / "out"
    _earlier_run(out)
    base = dict(pretrained_model_name_or_path=str(tiny_files["sd1_file"]), train_data_dir=str(dataset), output_dir=str(out),
                output_name="t")
    assert [p for p in TrainConfig(**base).requirements() if p[0] == "output_name"]
    for extra in ({"overwrite": True}, {"resume": "latest"}, {"resume": str(out / "t-state")}):
        assert not [p for p in TrainConfig(**base, **extra).requirements() if p[0] in ("output_name", "resume")], extra


@pytest.mark.slow  # three short real trainings (~40 s on two shared cores)
def test_a_finished_run_survives_a_rerun_then_resumes_and_is_replaced_only_with_overwrite(tiny_files, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(a) for a in _train_args(tiny_files, dataset, out)]) == 0
    first = tree(out / "t.safetensors") | {f"state/{k}": v for k, v in tree(out / "t-state").items()}
    refused(capsys, _train_args(tiny_files, dataset, out), f"{out / 't.safetensors'} exists", "--resume latest")
    assert tree(out / "t.safetensors") | {f"state/{k}": v for k, v in tree(out / "t-state").items()} == first
    # --resume latest continues that run (to 3 steps) and replaces its files
    assert main([str(a) for a in _train_args(tiny_files, dataset, out, "train", "--resume", "latest", "--max_train_steps", "3")]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((out / "t-state" / "train_state.json").read_text())["global_step"] == 3
    # --overwrite starts again
    assert main([str(a) for a in _train_args(tiny_files, dataset, out, "train", "--overwrite")]) == 0
    assert json.loads((out / "t-state" / "train_state.json").read_text())["global_step"] == 2
    assert not [p for p in out.iterdir() if ".tmp" in p.name or "loratrain-tmp" in p.name]


def test_pruning_after_overwrite_keeps_this_runs_saves(tmp_path):
    """save_last_n_epochs counts only saves up to the one just made: an earlier, longer run's higher-numbered files
    (kept after --overwrite) must not push out the save this run just wrote."""
    from loratrain.training.saving import prune_saves

    for n in (1, 2, 9, 10):
        (tmp_path / f"t-{n:06d}.safetensors").write_bytes(b"x")
    prune_saves(tmp_path, "t", "epoch", keep=1, upto=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-000002.safetensors", "t-000009.safetensors", "t-000010.safetensors"]
    prune_saves(tmp_path, "t", "epoch", keep=1)  # as before when upto is not given
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-000010.safetensors"]


# ---- save_diffusers: a user's folder is never deleted ----------------------------------------------------------
def test_save_diffusers_refuses_a_users_folder_and_file_even_with_overwrite(tiny_files, dataset, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    (out / "t").mkdir(parents=True)
    (out / "t" / "notes.txt").write_text("my notes")
    before = tree(out)
    args = _train_args(tiny_files, dataset, out, "dreambooth", "--save_diffusers")
    for extra in ([], ["--overwrite"], ["--resume", str(out)]):
        refused(capsys, args + extra, f"{out / 't'} is a folder but not a diffusers folder (no model_index.json)", "never replaced")
        assert tree(out) == before
    shutil.rmtree(out / "t")
    save_safetensors({"w": torch.ones(1)}, out / "t.safetensors")  # someone's checkpoint of that name
    before = tree(out)
    refused(capsys, args, f"{out / 't.safetensors'} exists", "--overwrite")
    assert tree(out) == before


def test_diffusers_folders_are_replaced_only_when_ours_or_allowed(tmp_path):
    from loratrain.core.models.diffusers_folder import save_diffusers_folder
    from loratrain.core.models.tiny import make_tiny_model
    from loratrain.training.networks.base import NetworkSpec
    from loratrain.training.networks.full import FullNetwork

    model = make_tiny_model("sd1")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    for replace in (False, True):
        with pytest.raises(ConfigError, match="model_index.json" if replace else "exists; pass --overwrite"):
            save_diffusers_folder(model, user, replace=replace)
        assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "my notes"
    # a training run re-saves the folders it wrote; an earlier run's only with --overwrite / --resume (replace_diffusers)
    net = FullNetwork(model, NetworkSpec(save_diffusers=True, train_text_encoder=False))
    net.save(tmp_path / "ft.safetensors", "fp16", {})
    stamp = tree(tmp_path / "ft")
    net.save(tmp_path / "ft.safetensors", "fp32", {})  # the same run, saved again: fine
    assert (tmp_path / "ft" / "model_index.json").is_file() and tree(tmp_path / "ft") != stamp
    later = FullNetwork(model, NetworkSpec(save_diffusers=True, train_text_encoder=False))
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        later.save(tmp_path / "ft.safetensors", "fp16", {})
    allowed = FullNetwork(model, NetworkSpec(save_diffusers=True, train_text_encoder=False, replace_diffusers=True))
    allowed.save(tmp_path / "ft.safetensors", "fp16", {})
    assert tree(tmp_path / "ft") == stamp
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- merge / convert / lora tools / face export: inputs are never outputs -------------------------------------------
@pytest.fixture
def models(tiny_files, tmp_path) -> dict[str, Path]:
    root = tmp_path / "in"
    root.mkdir()
    a, b = root / "a.safetensors", root / "b.safetensors"
    shutil.copy(tiny_files["sd1_file"], a)
    shutil.copy(tiny_files["sd1_file"], b)
    lora = root / "l.safetensors"
    save_safetensors({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
                      "lora_unet_x.alpha": torch.tensor(2.0)}, lora)
    (root / "link.safetensors").symlink_to(b)
    return {"a": a, "b": b, "lora": lora, "link": root / "link.safetensors", "dir": tiny_files["sd1_dir"]}


def test_every_tool_refuses_an_output_that_is_one_of_its_inputs(models, capsys, no_model_load):
    a, b, lora = models["a"], models["b"], models["lora"]
    cases = [
        (["lora", "extract", a, b, "--output", b, "--overwrite"], b, b),
        (["lora", "extract", a, b, "--output", models["link"], "--overwrite"], models["link"], b),  # a symlink to an input
        (["merge", a, b, "--alpha", "0.5", "--output", a, "--overwrite"], a, a),
        (["convert", a, a, "--overwrite"], a, a),
        (["lora", "bake", a, "--loras", f"{lora}:0.5", "--output", lora, "--overwrite"], lora, lora),
        (["lora", "merge", "--loras", lora, "--output", lora, "--overwrite"], lora, lora),
        (["lora", "resize", lora, "--output", lora, "--overwrite"], lora, lora),
    ]
    before = {p: tree(p) for p in (a, b, lora)}
    for argv, output, inp in cases:
        err = refused(capsys, argv, f"{output} is the input {inp}", "choose another output")
        if output != inp:
            assert f"both are {inp.resolve()}" in err
        assert {p: tree(p) for p in (a, b, lora)} == before, argv


def test_convert_never_writes_inside_or_around_its_source(models, tmp_path, capsys, no_model_load):
    src = models["dir"]
    before = tree(src)
    refused(capsys, ["convert", src, src / "unet", "--overwrite"], f"{src / 'unet'} lies inside the input {src}")
    link = tmp_path / "link_to_model"
    link.symlink_to(src)
    refused(capsys, ["convert", src, link / "new"], f"{link / 'new'} lies inside the input {src}")  # symlinks followed
    refused(capsys, ["convert", models["a"], models["a"].parent, "--overwrite"], f"{models['a'].parent} contains the input")
    assert tree(src) == before
    # --overwrite replaces only an output of the same kind
    notes = tmp_path / "not_a_model"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    refused(capsys, ["convert", models["a"], notes, "--overwrite"], f"{notes} exists and is a folder without model_index.json",
            "--overwrite replaces only a diffusers folder")
    text = tmp_path / "text.safetensors"
    text.write_text("not tensors")
    refused(capsys, ["convert", models["dir"], text, "--overwrite"], f"{text} exists and is a file that is not safetensors")
    refused(capsys, ["lora", "resize", models["lora"], "--output", notes, "--overwrite"],
            f"{notes} exists and is a folder; --overwrite replaces only a .safetensors file")
    assert (notes / "notes.txt").read_text() == "my notes" and text.read_text() == "not tensors"


def test_face_export_refuses_its_model_as_output(tmp_path):
    from loratrain.facetrain.config import ExportConfig

    model = tmp_path / "face.safetensors"
    save_safetensors({"w": torch.ones(1)}, model)
    with pytest.raises(ConfigError, match="is the input"):
        ExportConfig(model=str(model), output=str(model), overwrite=True).check()
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="is a folder; --overwrite replaces only an .onnx / .dfm file"):
        ExportConfig(model=str(model), output=str(tmp_path / "folder"), overwrite=True).check()


def test_the_shared_rule(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")
    assert output_conflicts(tmp_path / "o.safetensors", [tmp_path / "m", ""]) == []
    assert "lies inside" in output_conflicts(tmp_path / "m" / "unet", [tmp_path / "m"])[0]
    assert "contains" in output_conflicts(tmp_path, [tmp_path / "m"])[0]
    os.link(tmp_path / "m" / "model_index.json", tmp_path / "hard.json")
    assert "hard links" in output_conflicts(tmp_path / "hard.json", [tmp_path / "m" / "model_index.json"])[0]
    assert replaceable(tmp_path / "m", "diffusers") is None and replaceable(tmp_path / "nothing", "safetensors") is None
    assert "a file that is not safetensors" in replaceable(tmp_path / "hard.json", "safetensors")


# ---- modes: new files follow the umask ---------------------------------------------------------------------------
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def modes(folder: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")]}


def test_convert_writes_a_diffusers_folder_with_the_umasks_modes(models, tmp_path, capsys, umask_027):
    out = tmp_path / "conv"
    assert main(["convert", str(models["a"]), str(out)]) == 0
    assert modes(out) == {("d", 0o750), ("f", 0o640)}
    # --overwrite replaces a diffusers folder (the same kind), and what it writes follows the umask too
    os.umask(0o022)
    assert main(["convert", str(models["a"]), str(out), "--overwrite", "--save_precision", "fp32"]) == 0
    assert modes(out) == {("d", 0o755), ("f", 0o644)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_dir_gives_new_files_the_umasks_modes(tmp_path, umask_027):
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        fd = os.open(tmp / "sub" / "f", os.O_WRONLY | os.O_CREAT, 0o600)  # as a library's private temp file
        os.close(fd)
    assert modes(tmp_path / "d") == {("d", 0o750), ("f", 0o640)}


# ---- a full disk during a save ------------------------------------------------------------------------------------
class _Net:
    def state_dict(self) -> dict:
        return {"w": torch.ones(4)}


class _Opt:
    def state_dict(self) -> dict:
        return {"x": 1}


@pytest.mark.parametrize("failing", ["network.safetensors", "optimizer.pt", "train_state.json"])
def test_a_full_disk_during_a_state_save_leaves_no_temp_folder_and_names_the_file(tmp_path, monkeypatch, failing):
    import loratrain.training.saving as saving

    state = tmp_path / "t-state"
    saving.save_state(state, _Net(), _Opt(), _Opt(), {"global_step": 1})
    before = tree(state)

    def full(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"network.safetensors": (saving, "save_safetensors"), "optimizer.pt": (torch, "save"),
              "train_state.json": (saving, "atomic_write_json")}[failing]
    monkeypatch.setattr(*target, full)
    with pytest.raises(OSError) as e:
        saving.save_state(state, _Net(), _Opt(), _Opt(), {"global_step": 2})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(state / failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-state"]  # no t-state.tmp, no t-state.old
    assert tree(state) == before  # the previous state is untouched
    monkeypatch.undo()
    assert saving.find_state(state) == state


def test_a_full_disk_during_training_is_one_line_naming_the_file(tiny_files, dataset, tmp_path, capsys, monkeypatch):
    def full(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)  # only the state writer uses it
    out = tmp_path / "out"
    refused(capsys, _train_args(tiny_files, dataset, out), f"cannot write {out / 't-state' / 'optimizer.pt'}: No space left on device",
            "nothing half-written")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith((".tmp", ".old"))]
    assert not (out / "t-state").exists()
