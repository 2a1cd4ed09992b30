"""Staged plans, snapshots and backup rotation (issue 22): the rule grammar and the plan file's checks, a plan run on
the tiny models (a phase ends on its loss rule and the next phase's options are in force; a stop mid-phase resumes
in that phase), pinned snapshots (a restored snapshot equals the saved weights), rotation by save order."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.snapshots import list_snapshots, restore_snapshot, save_snapshot
from loratrain.facetrain.train.plan import PhaseWatcher, load_plan, parse_rule
from loratrain.facetrain.train.state import read_checkpoint
from loratrain.facetrain.train.trainer import run_face_train

from .test_face_train import cfg_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def facesets(tmp_path_factory):
    """Small src and dst facesets from the synthetic demo photos (offline), as test_face_train builds them."""
    from loratrain.facetrain.demo_data import make_photos
    from loratrain.facetrain.extract.config import ExtractConfig
    from loratrain.facetrain.extract.extract import run_face_extract

    root = tmp_path_factory.mktemp("plan_facesets")
    for look, seed in (("src", 0), ("dst", 1)):
        make_photos(root / f"{look}_photos", 6, seed, look)
        run_face_extract(ExtractConfig(input=str(root / f"{look}_photos"), output_dir=str(root / look), image_size=96,
                                       max_faces=1), RecordingReporter())
    return root / "src", root / "dst"


def write_plan(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the rule and the file


def test_loss_rules_parse_and_hold():
    rule = parse_rule("src_loss < 0.03 and dst_loss<0.03")
    assert rule.metrics == ["dst_loss", "src_loss"]
    assert rule.holds({"src_loss": 0.02, "dst_loss": 0.01}) and not rule.holds({"src_loss": 0.02, "dst_loss": 0.05})
    either = parse_rule("src_loss <= 0.1 or dst_loss < 1e-1 and src_loss > 0.5")  # and binds tighter
    assert either.holds({"src_loss": 0.1, "dst_loss": 9}) and either.holds({"src_loss": 0.6, "dst_loss": 0.05})
    assert not either.holds({"src_loss": 0.3, "dst_loss": 0.05})
    for bad, says in (("src_loss", "expected METRIC"), ("loss < 0.2", "unknown figure 'loss'"),
                      ("src_loss < 0.2 and", "expected METRIC"), ("src_loss < 0.2 xor dst_loss < 1", "'and' or 'or'"),
                      ("__import__('os') < 1", "cannot read"), ("src_loss == 0.2", "cannot read"),
                      ("src_loss < 0.2; rm", "cannot read"), (" or ".join(["src_loss < 1"] * 5), "at most 4"),
                      ("src_loss < " + "9" * 400, "longer than 200"), (0.2, "must be a string")):
        with pytest.raises(ValueError, match=says):
            parse_rule(bad)


def test_plan_files_are_checked_naming_file_and_phase(tmp_path):
    good = write_plan(tmp_path / "p.toml", '[[phase]]\nname = "a"\nwarp = true\niterations = 5\n'
                                           '[[phase]]\nname = "b"\nrandom_warp = false\nlr = 1e-4\nuntil = "src_loss < 0.2"\nhold = 3\n')
    plan = load_plan(good)
    assert [p.name for p in plan.phases] == ["a", "b"] and plan.phases[0].options == {"random_warp": True}
    assert plan.phases[1].window == 100 and plan.phases[1].hold == 3 and "src_loss < 0.2" in plan.phases[1].rule_text()
    cases = {
        '[[phase]]\nname = "x"\narchi = "df"\niterations = 1\n': "phase 1 ('x'): archi is the model's shape",
        '[[phase]]\nname = "x"\nae_dims = 64\niterations = 1\n': "ae_dims is the model's shape",
        '[[phase]]\nname = "x"\nbogus = 1\niterations = 1\n': "phase 1 ('x'): unknown option 'bogus'",
        '[[phase]]\nname = "x"\nsrc_faceset = "/etc"\niterations = 1\n': "give it on the command line",
        '[[phase]]\nname = "x"\nmax_iters = 9\niterations = 1\n': "unknown option 'max_iters'",
        '[[phase]]\nname = "x"\nlr = "fast"\niterations = 1\n': "phase 1 ('x'): lr",
        '[[phase]]\nname = "x"\nct_mode = "nope"\niterations = 1\n': "'nope' is not one of",
        '[[phase]]\nname = "x"\nrandom_warp = true\n': "give an end rule",
        '[[phase]]\nname = "x"\niterations = 0\n': "iterations must be a whole number from 1",
        '[[phase]]\nname = "x"\nuntil = "src_loss < 0.2"\nwindow = 0\n': "window must be",
        '[[phase]]\nname = "x"\nuntil = "dst < 1"\n': "phase 1 ('x'): until 'dst < 1'",
        '[[phase]]\nname = "../x"\niterations = 1\n': "name must be",
        '[[phase]]\nname = "x"\niterations = 1\n[[phase]]\nname = "x"\niterations = 1\n': "two phases are named 'x'",
        '[[phase]]\nname = "x"\nwarp = true\nrandom_warp = false\niterations = 1\n': "given twice",
        'steps = 3\n': "unknown key 'steps'",
        'name = "empty"\n': "no phases",
        '[[phase]\n': "invalid TOML",
        "".join(f'[[phase]]\nname = "p{i}"\niterations = 1\n' for i in range(40)): "at most 32 phases",
        "# " + "x" * 70_000: "at most 64 KiB",
        "a = " + "[" * 3000 + "]" * 3000 + "\n": "nested too deeply",
    }
    for text, says in cases.items():
        path = write_plan(tmp_path / "bad.toml", text)
        with pytest.raises(ConfigError, match="bad.toml") as e:
            load_plan(path)
        assert says in str(e.value), (text[:60], str(e.value))
    with pytest.raises(ConfigError, match="plan not found"):
        load_plan(tmp_path / "missing.toml")


def test_a_damaged_plan_state_is_refused_naming_it(facesets, tmp_path):
    """The plan state is untrusted: wrong types, numbers out of range, an oversized file, and a phase start after
    the model's saved iteration (which made a 2-iteration phase run ~forever) are errors naming the file."""
    from loratrain.facetrain.train.plan import read_state

    ok = {"plan": "p.toml", "digest": "d", "phase": 0, "phase_name": "a", "start": None, "transitions": [], "done": False}
    path = tmp_path / "face.plan_state.json"
    bad = [{"phase": True}, {"phase": 10 ** 6}, {"start": -1}, {"start": 10 ** 30}, {"start": 1.5}, {"digest": [1]},
           {"transitions": [{"phase": [0]}]}, {"transitions": [{"phase": 0, "iteration": "4"}]},
           {"transitions": [{"phase": 0, "snapshot": {"x": 1}}]}, {"transitions": [{"phase": 0, "time": 1e400}]},
           {"transitions": [1] * 300}, {"done": "yes"}]
    for change in bad:
        path.write_text(json.dumps({**ok, **change}).replace("Infinity", "1e400"))
        with pytest.raises(ConfigError, match="face.plan_state.json.*--plan_restart"):
            read_state(path)
    path.write_text(json.dumps({**ok, "plan_name": "x" * 300_000}))
    with pytest.raises(ConfigError, match="at most 256 KiB"):
        read_state(path)
    path.write_text("[" * 100_000)
    with pytest.raises(ConfigError, match="unreadable plan state"):
        read_state(path)
    path.write_text(json.dumps({**ok, "transitions": [{"phase": 0, "name": "a", "iteration": 4, "reason": "r",
                                                       "snapshot": "s", "time": 1.0}]}))
    assert read_state(path)["transitions"][0]["iteration"] == 4
    # a start beyond the model's saved iteration (here: no model yet, iteration 0): refused before any training
    plan = write_plan(tmp_path / "plan.toml", '[[phase]]\nname = "a"\niterations = 2\n')
    (tmp_path / "m").mkdir()
    state = {**ok, "plan": str(plan), "digest": load_plan(plan).digest, "start": 1_000_000}
    (tmp_path / "m" / "face.plan_state.json").write_text(json.dumps(state))
    cfg = cfg_for(facesets, tmp_path / "m", plan=str(plan), max_iters=1000, save_every=100, preview_every=100)
    with pytest.raises(ConfigError, match="face.plan_state.json: phase 1 'a' began at iteration 1000000, after the "
                                          "model's saved iteration 0; pass --plan_restart"):
        run_face_train(cfg, RecordingReporter())
    assert not (tmp_path / "m" / "face.safetensors").exists()
    state["phase"] = 5
    (tmp_path / "m" / "face.plan_state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="phase 6 of a 1-phase plan"):
        run_face_train(cfg, RecordingReporter())


def test_every_shipped_plan_validates(tmp_path):
    from loratrain.facetrain.train.config import FaceTrainConfig
    from loratrain.facetrain.train.plan import phase_config

    plans = sorted((ROOT / "configs" / "face_plans").glob("*.toml"))
    assert {p.name for p in plans} >= {"df_pretrain_train.toml", "liae_pretrain_train.toml", "rw_lrd_gan.toml",
                                       "src_to_src_lighting.toml"}
    for d in ("src", "dst", "generic"):
        (tmp_path / d).mkdir()
    for path in plans:
        plan = load_plan(path)
        assert plan.phases and plan.description, path
        text = path.read_text(encoding="utf-8")
        assert "docs/face-model.md#the-recipes-sources" in text, path  # each number cites its source
        base = FaceTrainConfig(model_dir=str(tmp_path / "m"), src_faceset=str(tmp_path / "src"), dst_faceset=str(tmp_path / "dst"),
                               pretrain_faceset=str(tmp_path / "generic"), archi=f"{plan.archi_kind or 'df'}-ud")
        for phase in plan.phases:  # every phase's options, over a command line's, pass the trainer's own checks
            cfg = phase_config(base, plan, phase)
            assert all(getattr(cfg, k) == v for k, v in phase.options.items()), (path, phase.name)
            assert cfg.src_faceset == str(tmp_path / ("generic" if cfg.pretrain else "src"))


def test_loss_rule_watcher_needs_a_full_window_held():
    path = Path(__file__)  # any file: the plan object only names it
    plan = load_plan.__globals__["Plan"](path, "t", "", "", [])
    phase = load_plan.__globals__["Phase"](0, "a", {}, until=parse_rule("src_loss < 0.5"), window=3, hold=2)
    plan.phases.append(phase)
    w = PhaseWatcher(plan, phase)
    ends = [w.after_step(None, {"src_loss": v, "dst_loss": 9}) for v in (0.1, 0.1, 2.0, 0.1, 0.1, 0.1, 0.1, 0.1)]
    # windows: [.1 .1 2] avg .73 no; [.1 2 .1] no; [2 .1 .1] no; [.1 .1 .1] yes (held 1); next yes (held 2) -> ends
    assert ends[:6] == [None] * 6 and ends[6] and "src_loss 0.1000" in ends[6] and "held 2 iterations" in ends[6]
    again = PhaseWatcher(plan, phase)
    again.restore(json.loads(json.dumps({**w.state(), "held": 1})))
    assert again.after_step(None, {"src_loss": 0.1})  # the counts survive a resume
    other = PhaseWatcher(plan, phase)
    other.restore({**w.state(), "phase": 5})  # another phase's counts are not taken
    assert other.held == 0 and not other.values["src_loss"]
    like = load_plan.__globals__["Phase"](0, "l", {}, likeness_patience=2)
    lw = PhaseWatcher(plan, like)
    assert [lw.after_preview(None, s, {}) for s in (0.5, 0.4, 0.45, None)] == [None] * 4
    assert "has not improved on its best 0.4000 for 2 checks" in lw.after_preview(None, 0.41, {})


# ---------------------------------------------------------------- a plan on the tiny models


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def test_a_phase_ends_on_its_loss_rule_and_the_next_phases_options_are_in_force(facesets, tmp_path):
    # phase 1: a loss rule every finite loss meets (< 100), averaged over 3 iterations and held 2: it ends at
    # iteration 4 exactly; phase 2 freezes the encoder, turns warp off and lowers lr, for 6 iterations
    plan = write_plan(tmp_path / "plan.toml", '''name = "two"
[[phase]]
name = "warp on"
until = "src_loss < 100 and dst_loss < 100"
window = 3
hold = 2
[[phase]]
name = "Warp off, frozen"
random_warp = false
freeze_encoder = true
lr = 2e-5
iterations = 6
''')
    rep = RecordingReporter()
    cfg = cfg_for(facesets, tmp_path / "m", plan=str(plan), max_iters=1000, save_every=100, preview_every=100)
    res = run_face_train(cfg, rep)
    log = "\n".join(rep.lines)
    assert "phase 1/2 'warp on' ended: src_loss < 100 and dst_loss < 100 met (dst_loss " in log
    assert "moving average over 3 iterations, held 2 iterations) at iteration 4" in log
    assert "snapshot phase-2-warp-off-frozen pinned" in log and "plan 'two': complete" in log
    assert res.iteration == 10 and [h["iteration"] for h in res.history] == list(range(1, 11))
    snap = tmp_path / "m" / "snapshots" / "phase-2-warp-off-frozen"
    at_switch, final = _weights(snap / "face.safetensors"), _weights(tmp_path / "m" / "face.safetensors")
    assert read_checkpoint(snap / "face.safetensors")[1]["iteration"] == 4
    enc = [k for k in final if k.startswith("encoder.")]
    assert enc and all(torch.equal(at_switch[k], final[k]) for k in enc)  # phase 2's freeze held the encoder
    assert any(not torch.equal(at_switch[k], final[k]) for k in final if k.startswith("decoder_src."))
    opts = read_checkpoint(tmp_path / "m" / "face.safetensors")[1]["options"]
    assert opts["random_warp"] is False and opts["lr"] == 2e-5 and opts["freeze_encoder"] is True
    assert read_checkpoint(snap / "face.safetensors")[1]["options"]["random_warp"] is True  # phase 1 had the CLI's
    state = json.loads((tmp_path / "m" / "face.plan_state.json").read_text())
    assert state["done"] and [t["iteration"] for t in state["transitions"]] == [4, 10]
    assert state["transitions"][0]["snapshot"] == "phase-2-warp-off-frozen"
    again = RecordingReporter()
    run_face_train(cfg, again)  # a finished plan trains nothing more
    assert any("complete already" in line for line in again.lines)
    assert read_checkpoint(tmp_path / "m" / "face.safetensors")[1]["iteration"] == 10


class StopAt(RecordingReporter):
    """Sets the stop flag when the run reaches an iteration (a Ctrl-C at a known point)."""

    def __init__(self, stop, at: int) -> None:
        super().__init__()
        self.stop_flag, self.at, self.seen = stop, at, 0

    def advance(self, n: int = 1, **metrics: float) -> None:
        super().advance(n, **metrics)
        self.seen += n
        if self.seen == self.at:
            self.stop_flag.set()


def test_a_stop_mid_phase_resumes_in_that_phase_at_that_iteration(facesets, tmp_path):
    from loratrain.core.progress import StopFlag

    plan = write_plan(tmp_path / "plan.toml", '[[phase]]\nname = "one"\niterations = 3\n'
                                              '[[phase]]\nname = "two"\nrandom_warp = false\niterations = 5\n')
    cfg = cfg_for(facesets, tmp_path / "m", plan=str(plan), max_iters=1000, save_every=100, preview_every=100)
    stop = StopFlag()
    first = run_face_train(cfg, StopAt(stop, 5), stop)  # 3 in phase one, 2 in phase two, then stopped
    assert first.stopped and first.iteration == 5
    state = json.loads((tmp_path / "m" / "face.plan_state.json").read_text())
    assert state["phase"] == 1 and state["phase_name"] == "two" and state["start"] == 3 and not state["done"]
    rep = RecordingReporter()
    res = run_face_train(cfg, rep)
    assert any("phase 2/2 'two' from iteration 5 (began at 3)" in line for line in rep.lines)
    assert res.iteration == 8 and res.history[0]["iteration"] == 6  # the same phase, the same iteration
    assert json.loads((tmp_path / "m" / "face.plan_state.json").read_text())["done"]


def test_pretrain_plan_keeps_inter_and_warp_when_asked(facesets, tmp_path):
    plan = write_plan(tmp_path / "plan.toml", '[[phase]]\nname = "pre"\npretrain = true\niterations = 4\n'
                                              '[[phase]]\nname = "train"\npretrain = false\niterations = 2\n')
    cfg = cfg_for(facesets, tmp_path / "m", plan=str(plan), max_iters=1000, keep_inter=True, pretrain_random_warp=True,
                  pretrain_faceset=str(facesets[1]), save_every=100, preview_every=100)
    rep = RecordingReporter()
    res = run_face_train(cfg, rep)
    assert not any("pretrain sets random_warp" in n for n in res.notes)  # warp stayed on while pretraining
    assert any("inter layer(s) kept (--keep_inter)" in n for n in res.notes) and res.iteration == 2
    pre = _weights(tmp_path / "m" / "snapshots" / "phase-2-train" / "face.safetensors")
    pre_opts = read_checkpoint(tmp_path / "m" / "snapshots" / "phase-2-train" / "face.safetensors")[1]["options"]
    assert pre_opts["random_warp"] is True and pre_opts["src_faceset"] == str(facesets[1])  # the pretrain set
    final = _weights(tmp_path / "m" / "face.safetensors")
    inter = [k for k in final if k.startswith("inter.")]
    # kept, the inter moves by two small steps only (re-initialised it would move by ~1e-1)
    assert max((pre[k] - final[k]).abs().max().item() for k in inter) < 1e-2


# ---------------------------------------------------------------- snapshots and backups


def test_a_restored_snapshot_equals_the_saved_weights_and_restore_is_undoable(facesets, tmp_path, capsys):
    cfg = cfg_for(facesets, tmp_path / "m", max_iters=3)
    run_face_train(cfg, RecordingReporter())
    saved = _weights(tmp_path / "m" / "face.safetensors")
    assert main(["face", "snapshot", "save", str(tmp_path / "m"), "good", "--note", "before the change"]) == 0
    run_face_train(cfg.replace(max_iters=6), RecordingReporter())
    later = _weights(tmp_path / "m" / "face.safetensors")
    assert any(not torch.equal(saved[k], later[k]) for k in saved)
    assert main(["face", "snapshot", "restore", str(tmp_path / "m"), "good"]) == 0
    back = _weights(tmp_path / "m" / "face.safetensors")
    assert set(back) == set(saved) and all(torch.equal(saved[k], back[k]) for k in saved)
    names = [s["name"] for s in list_snapshots(tmp_path / "m")]
    assert names[0] == "good" and names[1].startswith("before-restore-")
    assert list_snapshots(tmp_path / "m")[0]["iteration"] == 3 and list_snapshots(tmp_path / "m")[0]["note"] == "before the change"
    restore_snapshot(tmp_path / "m", names[1])  # the undo: the later weights are back
    assert all(torch.equal(later[k], v) for k, v in _weights(tmp_path / "m" / "face.safetensors").items())
    resumed = run_face_train(cfg.replace(max_iters=8), RecordingReporter())  # and training resumes from them
    assert resumed.history[0]["iteration"] == 7
    with pytest.raises(ConfigError, match="never replaced"):
        save_snapshot(tmp_path / "m", "good")
    for bad in ("../x", "a/b", "..", ".hidden", "", "-x"):
        with pytest.raises(ConfigError):
            save_snapshot(tmp_path / "m", bad)
    with pytest.raises(ConfigError, match="no snapshot 'nope'.*good"):
        restore_snapshot(tmp_path / "m", "nope")
    assert main(["face", "snapshot", "save", str(tmp_path / "m"), "../evil"]) == 2
    capsys.readouterr()
    assert main(["face", "snapshot", "list", str(tmp_path / "nosuchdir")]) == 2  # a typo is not "no snapshots"
    assert "folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["face", "snapshot", "list", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.count("no snapshots") == 1
    assert not (tmp_path / "evil").exists()


def test_backups_rotate_by_save_order_across_pretraining(facesets, tmp_path):
    # the bug: backups named by iteration and pruned by name; after pretraining (iterations back at 0) each new
    # backup sorted lowest and was deleted at once, leaving only the pretraining ones
    run_face_train(cfg_for(facesets, tmp_path / "m", pretrain=True, dst_faceset="", max_iters=4, save_every=2,
                           keep_backups=2, preview_every=100), RecordingReporter())
    run_face_train(cfg_for(facesets, tmp_path / "m", max_iters=6, save_every=2, keep_backups=2, preview_every=100),
                   RecordingReporter())
    folder = tmp_path / "m" / "backups"
    kept = sorted(folder.glob("face_[0-9]*.safetensors"))
    iterations = sorted((read_checkpoint(p)[1]["iteration"], read_checkpoint(p)[1]["pretrain"]) for p in kept)
    # the train run saved at 2, 4, 6 and at its end (6 again), each save backing up the one before it: the
    # newest two backups are those of 4 and 6, none of pretraining
    assert iterations == [(4, False), (6, False)], iterations
    assert json.loads((folder / "order.json").read_text()) and len(kept) == 2
    assert len(list(folder.glob("face.state_[0-9]*.safetensors"))) == 2
