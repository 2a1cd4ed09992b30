"""Per-face diagnosis and hard samples: the moving average per face equals its formula on a tiny run and survives a
resume, the hard-sample sampler draws faces in proportion to their losses, `face report` ranks and flags, the
per-face table is read back checked, and the Face page's worst-faces view moves faces aside.

Facesets are extracted from the synthetic demo photos (offline); models are tiny and train on the CPU.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.facetrain.face_report import (
    FaceEntry,
    FaceReportConfig,
    FaceStatsFile,
    SideStats,
    dump_stats,
    parse_stats,
    rank_faces,
    read_stats,
    run_face_report,
    stats_path,
)
from loratrain.facetrain.train.config import FaceTrainConfig
from loratrain.facetrain.train.diagnosis import FaceTable, HardFaceSampler
from loratrain.facetrain.train.trainer import _train
from loratrain.facetrain.train.watchers import Watcher

from .conftest import extract_facesets


@pytest.fixture(scope="module")
def facesets(tmp_path_factory):
    return extract_facesets(tmp_path_factory.mktemp("diag_facesets"), 6)


def cfg_for(facesets, model_dir, **kw) -> FaceTrainConfig:
    base = dict(model_dir=str(model_dir), src_faceset=str(facesets[0]), dst_faceset=str(facesets[1]), archi="df", resolution=32,
                ae_dims=32, e_dims=8, d_dims=8, batch_size=4, max_iters=6, preview_every=3, save_every=3, workers=0, seed=0)
    base.update(kw)
    return FaceTrainConfig(**base)


class Spy(Watcher):
    """Records what each step booked: the faces and their per-sample losses."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def after_step(self, trainer, logs):  # noqa: ANN001, ANN201
        self.steps.append({side: (trainer.last_faces[side].numpy().copy(), trainer.last_per_sample[side].numpy().copy(),
                                  trainer.last_per_sample[f"{side}_mask_diff"].numpy().copy()) for side in ("src", "dst")})


def expected_ema(steps: list[dict], side: str, decay: float, k: int = 1) -> dict[int, tuple[float, float, int]]:
    """The formula, one draw at a time: the first draw sets the average, each later one mixes in (1 - decay)."""
    out: dict[int, tuple[float, float, int]] = {}
    for step in steps:
        index, loss, mask = step[side]
        for i, l, m in zip(index.tolist(), loss.tolist(), mask.tolist()):
            if i in out:
                a, b, n = out[i]
                out[i] = (decay * a + (1 - decay) * l, decay * b + (1 - decay) * m, n + 1)
            else:
                out[i] = (l, m, 1)
    return out


# ---------------------------------------------------------------- bookkeeping on a tiny run


def test_per_face_average_equals_its_formula_and_survives_a_resume(facesets, tmp_path):
    spy = Spy()
    cfg = cfg_for(facesets, tmp_path / "m", face_stats_decay=0.7)
    rec = RecordingReporter()
    _train(cfg, rec, StopFlag(), [spy])
    stats = read_stats(stats_path(tmp_path / "m"))
    assert stats.iteration == 6 and stats.decay == pytest.approx(0.7)
    for side, folder in zip(("src", "dst"), facesets):
        names = sorted(p.name for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
        want = expected_ema(spy.steps, side, 0.7)
        got = stats.sides[side]
        assert Path(got.faceset) == folder
        assert set(got.faces) == {names[i] for i in want}  # every drawn face, and only those
        for i, (loss, mask, n) in want.items():
            e = got.faces[names[i]]
            assert e.loss == pytest.approx(loss, rel=1e-5) and e.mask_diff == pytest.approx(mask, rel=1e-5) and e.draws == n
        assert sum(e.draws for e in got.faces.values()) == 6 * 4  # six steps of four faces
    assert any("worst" in line for line in rec.lines)

    spy2 = Spy()  # resume: the saved averages go on from where they were
    rec2 = RecordingReporter()
    _train(cfg.model_copy(update={"max_iters": 9}), rec2, StopFlag(), [spy2])
    assert any("per-face table resumed" in line for line in rec2.lines)
    again = read_stats(stats_path(tmp_path / "m"))
    names = sorted(p.name for p in facesets[0].iterdir() if p.suffix in (".jpg", ".png"))
    want = expected_ema(spy.steps + spy2.steps, "src", 0.7)
    for i, (loss, _, n) in want.items():
        assert again.sides["src"].faces[names[i]].loss == pytest.approx(loss, rel=1e-5)
        assert again.sides["src"].faces[names[i]].draws == n


def test_table_books_repeats_in_order_and_counts_unseen_as_hardest():
    t = FaceTable(["a.jpg", "b.jpg", "c.jpg"])
    t.update(np.array([0, 0, 1]), np.array([1.0, 3.0, 2.0]), np.array([0.1, 0.3, 0.2]), 0.5, 1)
    assert t.loss[0] == pytest.approx(0.5 * 1.0 + 0.5 * 3.0) and t.draws.tolist() == [2, 1, 0]
    assert t.last[0] == 3.0 and np.isnan(t.loss[2])
    assert t.hardness().tolist() == [2.0, 2.0, 2.0]  # c never drawn: as hard as the hardest seen
    assert FaceTable(["x"]).hardness().tolist() == [1.0]


# ---------------------------------------------------------------- the sampler


def draw(sampler: HardFaceSampler, n: int) -> np.ndarray:
    it = iter(sampler)
    return np.bincount([next(it)[0] for _ in range(n)], minlength=len(sampler.table))


def test_hard_sampler_draws_follow_the_losses():
    t = FaceTable([f"{i}.jpg" for i in range(4)])
    t.update(np.arange(4), np.array([0.1, 0.1, 0.2, 0.4]), None, 0.8, 1)
    n = 40000
    counts = draw(HardFaceSampler(t, 1.0, seed=3), n)
    assert counts[3] / counts[0] == pytest.approx(4.0, rel=0.08)  # 4x the loss, drawn 4x as often at power 1
    np.testing.assert_allclose(counts / n, [0.125, 0.125, 0.25, 0.5], atol=0.01)
    squared = draw(HardFaceSampler(t, 2.0, seed=3), n)  # power 2: 16x
    np.testing.assert_allclose(squared / n, np.array([1, 1, 4, 16]) / 22, atol=0.01)
    uniform = draw(HardFaceSampler(t, 0.0, seed=3), n)  # power 0: the plain sampler's odds
    np.testing.assert_allclose(uniform / n, 0.25, atol=0.01)
    base = np.array([0.5, 0.5, 0.0, 0.0])  # a yaw balance that rules faces out keeps them out
    assert draw(HardFaceSampler(t, 1.0, seed=3, base=base), 2000)[2:].sum() == 0


def test_hard_sampler_follows_updates_made_while_it_runs():
    t = FaceTable(["a", "b"])
    t.update(np.array([0, 1]), np.array([1.0, 1.0]), None, 0.0, 1)
    it = iter(HardFaceSampler(t, 1.0, seed=0))
    first = np.bincount([next(it)[0] for _ in range(4000)], minlength=2)
    t.update(np.array([1]), np.array([9.0]), None, 0.0, 2)  # decay 0: b's average is now 9
    second = np.bincount([next(it)[0] for _ in range(4000)], minlength=2)
    assert abs(first[1] / 4000 - 0.5) < 0.03 and abs(second[1] / 4000 - 0.9) < 0.03


def test_hard_samples_in_training_draw_the_hard_face_more(facesets, tmp_path):
    """On a real run the sampler reads the watcher's table: a face whose loss we raise is drawn more."""
    from loratrain.facetrain.train import diagnosis

    class Inflate(Watcher):  # make face 0 of src look 4x as hard as it is, before its average is booked
        def after_step(self, trainer, logs):  # noqa: ANN001, ANN201
            idx = trainer.last_faces["src"]
            trainer.last_per_sample["src"] = trainer.last_per_sample["src"] * (1 + 3 * (idx == 0).float())

    cfg = cfg_for(facesets, tmp_path / "h", hard_sample_power=2.0, max_iters=12, save_every=12, preview_every=12)
    original = diagnosis.diagnosis_watchers
    diagnosis.diagnosis_watchers = lambda trainer, reporter: [Inflate(), *original(trainer, reporter)]
    try:
        _train(cfg, RecordingReporter(), StopFlag())
    finally:
        diagnosis.diagnosis_watchers = original
    faces = read_stats(stats_path(tmp_path / "h")).sides["src"].faces
    names = sorted(faces)
    hard = faces[names[0]].draws
    others = [faces[n].draws for n in names[1:]]
    assert hard > 2 * max(others), (hard, others)  # 16x as likely at power 2, once its loss is known


def test_options_are_checked():
    with pytest.raises(ConfigError, match="hard_sample_power"):
        FaceTrainConfig(model_dir="m", src_faceset="s", hard_sample_power=1.0, face_stats=False).check()
    with pytest.raises(ConfigError, match="hard_sample_power"):
        FaceTrainConfig.build({"model_dir": "m", "hard_sample_power": -1})


# ---------------------------------------------------------------- the table file and the report


def table_file(tmp_path: Path) -> Path:
    stats = FaceStatsFile(iteration=120, decay=0.8, sides={
        "src": SideStats("faces_src", {"a.jpg": FaceEntry(0.2, 0.25, 0.05, 10, 118), "b.jpg": FaceEntry(0.9, 0.7, 0.30, 14, 120),
                                       "c.jpg": FaceEntry(0.55, 0.6, 0.02, 12, 119)}),
        "dst": SideStats("faces_dst", {"d.jpg": FaceEntry(0.3, 0.3, 0.01, 36, 120)})})
    model = tmp_path / "model"
    model.mkdir()
    stats_path(model).write_text(dump_stats(stats))
    return model


def test_report_ranks_flags_and_writes_csv_and_json(tmp_path):
    model = table_file(tmp_path)
    res = run_face_report(FaceReportConfig(model_dir=str(model), csv_output=str(tmp_path / "r.csv"),
                                           json_output=str(tmp_path / "r.json")))
    assert [r.face for r in res.rows] == ["b.jpg", "c.jpg", "a.jpg"] and [r.rank for r in res.rows] == [1, 2, 3]
    assert [r.face for r in res.flagged] == ["b.jpg", "c.jpg"]  # loss > 0.5
    text = "\n".join(res.summary())
    assert "2 above loss 0.5" in text and "max/mean" in text
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["face"] for r in rows] == ["b.jpg", "c.jpg", "a.jpg"] and rows[0]["flagged"] == "1" and rows[2]["flagged"] == "0"
    data = json.loads((tmp_path / "r.json").read_text())
    assert [f["face"] for f in data["faces"]] == ["b.jpg", "c.jpg", "a.jpg"] and data["iteration"] == 120
    by_mask = run_face_report(FaceReportConfig(model_dir=str(model), sort_by="mask_diff", threshold=0.8))
    assert [r.face for r in by_mask.rows] == ["b.jpg", "a.jpg", "c.jpg"] and [r.face for r in by_mask.flagged] == ["b.jpg"]
    both = rank_faces(read_stats(stats_path(model)), "both")
    assert [(r.side, r.face) for r in both] == [("src", "b.jpg"), ("src", "c.jpg"), ("dst", "d.jpg"), ("src", "a.jpg")]


def test_report_cli(tmp_path, capsys):
    model = table_file(tmp_path)
    assert main(["face", "report", str(model), "--threshold", "0.6", "--csv", str(tmp_path / "o.csv")]) == 0
    out = capsys.readouterr().out
    assert out.index("b.jpg") < out.index("c.jpg") < out.index("a.jpg") and "1 above loss 0.6" in out
    assert (tmp_path / "o.csv").is_file()
    assert main(["face", "report", str(tmp_path / "nowhere")]) != 0
    assert "not found" in capsys.readouterr().err


def test_table_file_is_read_back_checked(tmp_path):
    good = {"loss": 0.4, "last_loss": 0.4, "mask_diff": 0.1, "draws": 3, "seen_at": 5}
    text = json.dumps({"version": 1, "iteration": 5, "decay": 0.8, "sides": {"src": {"faceset": "f", "faces": {
        "ok.jpg": good, "../escape.jpg": good, "sub/dir.jpg": good, "..": good, "nan.jpg": {**good, "loss": float("nan")},
        "neg.jpg": {**good, "draws": -1}, "str.jpg": {**good, "loss": "0.4"}, "list.jpg": [1, 2]}}}})
    got = parse_stats(text, "t")
    assert list(got.sides["src"].faces) == ["ok.jpg"] and got.skipped == 7
    for bad in ("not json", "[]", json.dumps({"version": 99, "sides": {}})):
        with pytest.raises(ConfigError, match="per-face table"):
            parse_stats(bad, "t")
    with pytest.raises(ConfigError):
        stats_path(tmp_path, "../x")


def test_out_of_range_figures_are_skipped_not_crashed_on(tmp_path, capsys):
    """Numbers too big for a float or an int64 counter (a 401-digit loss, 10**23 draws) are bad entries, skipped and
    counted; a table of zero draws reports no spread instead of dividing by zero; a resume restores the rest."""
    from loratrain.facetrain.face_report import draw_spread

    good = {"loss": 0.4, "last_loss": 0.4, "mask_diff": 0.1, "draws": 3, "seen_at": 5}
    faces = {"ok.jpg": good, "big.jpg": {**good, "loss": 10 ** 400}, "draws.jpg": {**good, "draws": 10 ** 23},
             "seen.jpg": {**good, "seen_at": 2 ** 63}, "frac.jpg": {**good, "draws": 2.5}, "huge.jpg": {**good, "mask_diff": 1e300}}
    text = json.dumps({"version": 1, "iteration": 10 ** 400, "decay": 0.8, "sides": {"src": {"faceset": "f", "faces": faces}}})
    got = parse_stats(text, "t")
    assert list(got.sides["src"].faces) == ["ok.jpg"] and got.skipped == 5 and got.iteration == 0
    table = FaceTable(["ok.jpg", "draws.jpg"])
    assert table.restore(got.sides["src"]) == 1 and table.draws.tolist() == [3, 0]
    zero = parse_stats(json.dumps({"version": 1, "sides": {"src": {"faces": {"a.jpg": {**good, "draws": 0}}}}}), "t")
    assert draw_spread(zero, "src") == "src: no faces drawn yet"
    model = tmp_path / "model"
    model.mkdir()
    stats_path(model).write_text(text)
    assert main(["face", "report", str(model)]) == 0
    out = capsys.readouterr().out
    assert "ok.jpg" in out and "5 entr(y/ies) of the table were unreadable and skipped" in out
    stats_path(model).write_text('{"version": 1, "sides": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["face", "report", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert "face.faces.json" in err and "per-face table" in err and len(err.splitlines()) == 1


def test_worst_faces_view_takes_any_count_and_bad_tables_as_a_message(tmp_path):
    from loratrain.ui.config import AppContext
    from loratrain.ui.pages.face_report import WorstFacesTab
    from loratrain.ui.workspace import Workspace

    (tmp_path / "faces").mkdir()
    model = tmp_path / "model"
    model.mkdir()
    stats = FaceStatsFile(iteration=5, sides={"src": SideStats(str(tmp_path / "faces"), {"a.jpg": FaceEntry(0.4, 0.4, 0.1, 2, 5)})})
    stats_path(model).write_text(dump_stats(stats))
    tab = WorstFacesTab(AppContext(workspace=Workspace([tmp_path]), runner=None))
    for count in ("abc", "1e300", float("nan"), None, -5, [1]):
        gallery, text, _ = tab.show(str(model), "face", "src", float("inf"), "loss", count)
        assert gallery == [] and "ranked at iteration 5" in text
    stats_path(model).write_text('{"version": 1, "sides": ' + "[" * 100_000 + "}")
    gallery, text, _ = tab.show(str(model), "face", "src", 0.5, "loss", 4)
    assert gallery == [] and text.startswith("**") and "per-face table" in text
    assert tab.flagged(str(model), "face", "src", 0.5, "loss", 4) is not None


# ---------------------------------------------------------------- the Face page's worst-faces view


def test_worst_faces_view_shows_ranked_thumbnails_and_moves_faces_aside(facesets, tmp_path):
    import shutil

    from loratrain.ui.config import AppContext
    from loratrain.ui.pages.face_report import WorstFacesTab
    from loratrain.ui.workspace import Workspace

    faces = tmp_path / "work" / "faces"
    shutil.copytree(facesets[0], faces)
    names = sorted(p.name for p in faces.iterdir() if p.suffix in (".jpg", ".png"))
    losses = [0.1, 0.8, 0.3, 0.6, 0.2, 0.05][:len(names)]
    stats = FaceStatsFile(iteration=50, sides={"src": SideStats(str(faces), {
        n: FaceEntry(loss, loss, 0.01, 5, 50) for n, loss in zip(names, losses)})})
    model = tmp_path / "work" / "model"
    model.mkdir()
    stats_path(model).write_text(dump_stats(stats))
    tab = WorstFacesTab(AppContext(workspace=Workspace([tmp_path / "work"]), runner=None))

    gallery, text, _ = tab.show(str(model), "face", "src", 0.5, "loss", 4)
    order = sorted(range(len(names)), key=lambda i: -losses[i])
    assert [Path(p).name for p, _ in gallery] == [names[i] for i in order[:4]]  # worst first, 4 shown
    assert gallery[0][1].startswith(names[order[0]]) and "loss 0.800" in gallery[0][1] and gallery[0][1].endswith("!!")
    assert "2 above the threshold" in text
    flagged = tab.flagged(str(model), "face", "src", 0.5, "loss", 4).splitlines()
    assert flagged == [names[order[0]], names[order[1]]]

    gallery, text, selected = tab.move(str(model), "face", "src", 0.5, "loss", 48, "\n".join(flagged))
    assert sorted(p.name for p in (faces / "_other").iterdir()) == sorted(flagged)  # set aside, nothing deleted
    assert "moved 2 face(s)" in text and selected == "" and len(gallery) == len(names) - 2
    assert "2 no longer in it" in text

    _, text, _ = tab.move(str(model), "face", "src", 0.5, "loss", 48, "../../model/face.faces.json")
    assert "no face named" in text and stats_path(model).is_file()  # a name that is not one of the faceset's faces
    outside = tmp_path / "outside"
    shutil.copytree(facesets[1], outside)  # a table naming a faceset outside the workspace is refused
    stats.sides["src"].faceset = str(outside)
    stats_path(model).write_text(dump_stats(stats))
    gallery, text, _ = tab.show(str(model), "face", "src", 0.5, "loss", 4)
    assert gallery == [] and "outside the workspace" in text
    _, text, _ = tab.move(str(model), "face", "src", 0.5, "loss", 4, names[0])
    assert "outside the workspace" in text and not (outside / "_other").exists()
    gallery, text, _ = tab.show(str(tmp_path / "outside"), "face", "src", 0.5, "loss", 4)
    assert gallery == [] and "outside the workspace" in text
