"""Issue 24's swapper tried as a hostile or careless user would: malformed and malicious ONNX files, odd option
values, outputs that are inputs, a kill between the state and the model, and a mismatched model / state pair.

Every mistake must end as one ConfigError (the CLI's one error line, exit 2) naming the file or the option, before
any training, with nothing written and no user file replaced. Models are tiny graphs built here (our generator at
32 px, the stand-in recogniser, hand-made graphs); faces are the session's extracted demo facesets.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from loratrain.core import paths  # noqa: E402
from loratrain.core.errors import ConfigError  # noqa: E402
from loratrain.core.progress import NullReporter, RecordingReporter  # noqa: E402
from loratrain.facetrain.swap.config import SwapConfig  # noqa: E402
from loratrain.facetrain.swapper import train as train_mod  # noqa: E402
from loratrain.facetrain.swapper.arch import GeneratorSpec, build_generator, build_recognizer, save_onnx  # noqa: E402
from loratrain.facetrain.swapper.config import SwapperInfoConfig, SwapperTrainConfig  # noqa: E402
from loratrain.facetrain.swapper.info import run_swapper_info  # noqa: E402
from loratrain.facetrain.swapper.onnx_file import ort_source  # noqa: E402
from loratrain.facetrain.swapper.recognizer import Recognizer  # noqa: E402
from loratrain.facetrain.swapper.train import SwapperTrainer, run_swapper_train  # noqa: E402

SPEC = GeneratorSpec(32, 8, 1)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def kit(tmp_path_factory, facesets6):
    root = tmp_path_factory.mktemp("hostile_swapper")
    save_onnx(build_generator(SPEC, 1), root / "base.onnx")
    save_onnx(build_recognizer(0), root / "rec.onnx")
    return {"root": root, "base": root / "base.onnx", "rec": root / "rec.onnx", "src": facesets6[0], "dst": facesets6[1]}


def train_cfg(kit, model: Path, **kw) -> SwapperTrainConfig:  # noqa: ANN001
    base = dict(faceset=str(kit["src"]), model=str(model), base=str(kit["base"]), recognizer=str(kit["rec"]),
                iterations=1, batch_size=2, grad_accum=1, device="cpu", save_every=1, validate_every=1, preview_every=1)
    return SwapperTrainConfig(**{**base, **kw}).check()


def swapper(edit=None):  # noqa: ANN001, ANN201
    """Our generator's graph, edited by `edit(model)`."""
    model = build_generator(SPEC, 1)
    if edit:
        edit(model)
    return model


def _tail(model, op, ins, extra_inits=(), **attrs):  # noqa: ANN001, ANN202
    """Route the graph's output through one more node `op(output, *ins)`."""
    model.graph.node[-1].output[0] = "pre"
    for t in extra_inits:
        model.graph.initializer.insert(0, t)
    model.graph.node.append(helper.make_node(op, ["pre", *ins], ["output"], **attrs))


def _ints(name, values):  # noqa: ANN001, ANN202
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _set_init(model, name, fn):  # noqa: ANN001, ANN202
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))


def _dims(model, index, *values):  # noqa: ANN001, ANN202
    for io in (model.graph.input[index], *(model.graph.output if index == 0 else [])):
        dims = io.type.tensor_type.shape.dim
        for k, v in values:
            dims[k].dim_value = v


def _external(name, location, length=4):  # noqa: ANN001, ANN202
    t = onnx.TensorProto()
    t.name, t.data_type, t.data_location = name, TensorProto.FLOAT, TensorProto.EXTERNAL
    t.dims.extend([1])
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


BAD = {  # name: (edit, a phrase the error must hold)
    "unsupported op": (lambda m: setattr(m.graph.node[0], "op_type", "Tile"), "Tile"),
    "reads a missing name": (lambda m: m.graph.node[3].input.__setitem__(0, "ghost"), "'ghost'"),
    "cycle": (lambda m: m.graph.node[0].input.__setitem__(0, m.graph.node[-1].output[0]), "cycle"),
    "output made by no node": (lambda m: setattr(m.graph.output[0], "name", "nobody"), "'nobody'"),
    "node without output": (lambda m: m.graph.node.insert(0, helper.make_node("Relu", ["target"], [])), "no output"),
    "Constant without value": (lambda m: m.graph.node.insert(0, helper.make_node("Constant", [], ["c0"])), "Constant"),
    "huge Expand": (lambda m: _tail(m, "Expand", ["big"], [_ints("big", [100000, 100000, 3, 32, 32])]), "too large"),
    "huge ConstantOfShape": (lambda m: (m.graph.initializer.insert(0, _ints("s", [1, 3, 1 << 20, 1 << 20])),
                                        m.graph.node.insert(0, helper.make_node("ConstantOfShape", ["s"], ["z"])),
                                        _tail(m, "Add", ["z"])), "too large"),
    "huge Resize": (lambda m: _tail(m, "Resize", ["", "sc"], [numpy_helper.from_array(
        np.array([1, 1, 40000, 40000], np.float32), "sc")], mode="nearest"), "too large"),
    "huge Pad": (lambda m: _tail(m, "Pad", ["pp"], [_ints("pp", [0, 0, 30000, 30000, 0, 0, 30000, 30000])]), "too large"),
    "huge Reshape": (lambda m: _tail(m, "Reshape", ["rs"], [_ints("rs", [10 ** 12, 3])]), "cannot run"),
    "huge crop": (lambda m: _dims(m, 0, (2, 200000), (3, 200000)), "200000 px"),
    "huge embedding": (lambda m: _dims(m, 1, (1, 1 << 40)), "embedding"),
    "zero crop": (lambda m: _dims(m, 0, (2, 0), (3, 0)), "0 px"),
    "huge fixed batch": (lambda m: _dims(m, 0, (0, 10 ** 6)), "batch"),
    "integer source": (lambda m: setattr(m.graph.input[1].type.tensor_type, "elem_type", TensorProto.INT64), "float"),
    "NaN weights": (lambda m: _set_init(m, "first.weight", lambda a: a * np.nan), "NaN"),
    "string initializer": (lambda m: m.graph.initializer.insert(0, helper.make_tensor("s", TensorProto.STRING, [1], [b"x"])),
                           "'s'"),
    "float8 initializer": (lambda m: m.graph.initializer.insert(0, helper.make_tensor("f8", TensorProto.FLOAT8E4M3FN, [2],
                                                                                       [1.0, 2.0])), "'f8'"),
    "truncated weights": (lambda m: [setattr(t, "raw_data", t.raw_data[:-3]) for t in m.graph.initializer
                                     if t.name == "first.weight"], "first.weight"),
    "Constant from ../": (lambda m: m.graph.node.insert(0, helper.make_node("Constant", [], ["cv"],
                                                                             value=_external("cv", "../secret.bin"))),
                          "only a file beside the model"),
    "Constant from an absolute path": (lambda m: m.graph.node.insert(0, helper.make_node(
        "Constant", [], ["cv"], value=_external("cv", "/etc/hostname"))), "only a file beside the model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_malformed_or_malicious_swapper_is_one_error_naming_the_file(kit, tmp_path, case) -> None:
    """`face swapper info` (and the Inspect button) runs the graph once: each of these is a ConfigError naming the
    file, never a traceback, an out-of-memory kill or a file read from outside the model's folder."""
    edit, phrase = BAD[case]
    (tmp_path / "secret.bin").write_bytes(np.float32(42).tobytes())
    (tmp_path / "models").mkdir()
    path = save_onnx(swapper(edit), tmp_path / "models" / "odd.onnx")
    with pytest.raises(ConfigError, match="odd.onnx") as err:
        run_swapper_info(SwapperInfoConfig(model=str(path)))
    assert phrase in str(err.value)


def test_out_of_order_nodes_run_as_onnxruntime_runs_them(tmp_path) -> None:
    """The standard asks for sorted nodes but onnxruntime sorts them itself; so does the importer (same result)."""
    import onnxruntime as ort

    from loratrain.facetrain.swapper.onnx_module import OnnxModule

    model = swapper()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = save_onnx(model, tmp_path / "reversed.onnx")
    assert run_swapper_info(SwapperInfoConfig(model=str(path))).blocks
    x = np.random.default_rng(0).random((1, 3, 32, 32), np.float32)
    e = np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32)
    with torch.no_grad():
        mine = OnnxModule(model)(torch.from_numpy(x), torch.from_numpy(e)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(mine, session.run(None, {"target": x, "source": e})[0], atol=1e-5)


def test_side_files_of_any_tensor_are_confined_on_the_onnxruntime_path_too(tmp_path) -> None:
    """`face swap` hands onnxruntime the file itself unless it names side files: a Constant's value naming one
    outside the folder is refused there as well; a length past the side file's end is named, not a traceback."""
    (tmp_path / "secret.bin").write_bytes(np.float32(42).tobytes())
    (tmp_path / "m").mkdir()
    model = swapper(lambda m: m.graph.node.insert(0, helper.make_node("Constant", [], ["cv"],
                                                                       value=_external("cv", "../secret.bin"))))
    with pytest.raises(ConfigError, match="only a file beside the model"):
        ort_source(save_onnx(model, tmp_path / "m" / "up.onnx"), "swapper")
    (tmp_path / "m" / "side.bin").write_bytes(np.float32(1).tobytes())
    model = swapper(lambda m: m.graph.node.insert(0, helper.make_node("Constant", [], ["cv"],
                                                                       value=_external("cv", "side.bin", 1 << 40))))
    with pytest.raises(ConfigError, match="long.onnx: its side files of weights cannot be read"):
        ort_source(save_onnx(model, tmp_path / "m" / "long.onnx"), "swapper")
    model = swapper(lambda m: m.graph.node.insert(0, helper.make_node("Constant", [], ["cv"],
                                                                       value=_external("cv", "side.bin"))))
    assert isinstance(ort_source(save_onnx(model, tmp_path / "m" / "ok.onnx"), "swapper"), bytes)  # read in by us


def _recognizer(edit):  # noqa: ANN001, ANN202
    model = build_recognizer(0)
    edit(model)
    return model


def _batch_mean(model) -> None:  # noqa: ANN001
    """The recogniser's embedding averaged over the batch: one row, whatever the number of faces."""
    model.graph.node[-1].output[0] = "pre"
    model.graph.node.append(helper.make_node("ReduceMean", ["pre"], ["embedding"], axes=[0], keepdims=1))


BAD_RECOGNISERS = {
    "one embedding per batch": (_batch_mean, "one embedding per face"),
    "NaN weights": (lambda m: _set_init(m, "fc.weight", lambda a: a * np.nan), "NaN"),
}


@pytest.mark.parametrize("case", list(BAD_RECOGNISERS))
def test_a_recogniser_that_lies_is_refused_by_training_and_by_onnxruntime(kit, tmp_path, case) -> None:
    """A recogniser giving one embedding for a whole batch, or NaN, would train (and sort, and swap) on nonsense
    silently; both loaders run two different faces through it first."""
    edit, phrase = BAD_RECOGNISERS[case]
    path = save_onnx(_recognizer(edit), tmp_path / "odd_rec.onnx")
    with pytest.raises(ConfigError, match=phrase):
        Recognizer(path)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"odd_rec.onnx.*{phrase}"):
        SwapperTrainer(train_cfg(kit, out / "me.onnx", recognizer=str(path)), NullReporter())
    assert not out.exists()


def _lpips(tmp_path: Path, name: str, nodes, out_shape) -> Path:  # noqa: ANN001
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 32, 32]) for n in ("a", "b")]
    graph = helper.make_graph(nodes, "lpips", ins, [helper.make_tensor_value_info("d", TensorProto.FLOAT, out_shape)])
    return save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / name)


def test_an_lpips_network_is_run_before_training_not_at_its_first_step(kit, tmp_path) -> None:
    """It used to be read without a probe: a graph that fails, or gives one number for the batch, crashed the first
    step with a KeyError / IndexError traceback after the logs folder was made."""
    missing = _lpips(tmp_path, "missing.onnx", [helper.make_node("Sub", ["a", "ghost"], ["d"])], ["N", 3, 32, 32])
    scalar = _lpips(tmp_path, "scalar.onnx", [helper.make_node("Sub", ["a", "b"], ["x"]),
                                              helper.make_node("ReduceMean", ["x"], ["d"], keepdims=0)], [])
    out = tmp_path / "out"
    for path, phrase in ((missing, "'ghost'"), (scalar, "one finite distance per pair|distances of shape")):
        with pytest.raises(ConfigError, match=f"lpips_model {path.name}.*({phrase})"):
            run_swapper_train(train_cfg(kit, out / "me.onnx", lpips_model=str(path)))
    assert not out.exists()


def test_options_that_poison_training_or_name_nothing_are_refused_before_work(kit, tmp_path) -> None:
    """ge=0 lets inf through; a missing faceset or dst faceset used to be found only after every model was read
    (and named no option)."""
    with pytest.raises(ConfigError) as err:
        train_cfg(kit, tmp_path / "me.onnx", identity_weight=float("inf"), l1_weight=1e300)
    assert "identity_weight: must be a finite number" in str(err.value) and "l1_weight: too large" in str(err.value)
    with pytest.raises(ConfigError) as err:
        train_cfg(kit, tmp_path / "me.onnx", faceset=str(tmp_path / "none"), dst_faceset=str(tmp_path / "nope"),
                  lpips_model=str(tmp_path))
    text = str(err.value)
    assert "faceset: faceset folder not found" in text and "dst_faceset: faceset folder not found" in text
    assert "lpips_model: file not found" in text
    assert not (tmp_path / "me.onnx").exists()


def test_no_user_file_is_ever_the_output(kit, tmp_path) -> None:
    """An existing ONNX of someone's, a text file or a folder named .onnx, an input reached through a link:
    refused, unchanged."""
    foreign = shutil.copy(kit["base"], tmp_path / "theirs.onnx")
    (tmp_path / "notes.onnx").write_text("my notes")
    (tmp_path / "dir.onnx").mkdir()
    os.symlink(kit["rec"], tmp_path / "link.onnx")
    before = digest(tmp_path)
    for name, phrase in (("theirs.onnx", "not written by `face swapper train`"), ("notes.onnx", "not a readable ONNX"),
                         ("dir.onnx", "not a readable ONNX")):
        with pytest.raises(ConfigError, match=phrase):
            run_swapper_train(train_cfg(kit, tmp_path / name, base=""))
    with pytest.raises(ConfigError, match="is the input"):
        train_cfg(kit, tmp_path / "link.onnx")
    with pytest.raises(ConfigError, match="lies inside the input"):
        train_cfg(kit, kit["src"] / "me.onnx")
    assert digest(tmp_path) == before and Path(foreign).read_bytes() == kit["base"].read_bytes()


def test_the_app_confines_every_file_the_job_opens(kit, tmp_path) -> None:
    """Confined to a workspace (the app's worker): a base linked out of it, a recogniser outside it, a model path
    climbing out with `..` are refused before anything is read or written."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    shutil.copytree(kit["src"], ws / "faces")
    shutil.copy(kit["rec"], ws / "rec.onnx")
    shutil.copy(kit["base"], outside / "base.onnx")
    os.symlink(outside / "base.onnx", ws / "base.onnx")
    before = digest(outside)
    paths.confine_to([ws])
    try:
        for kw in ({"base": str(ws / "base.onnx")}, {"recognizer": str(kit["rec"]), "base": ""},
                   {"model": str(ws / ".." / "outside" / "me.onnx"), "base": ""}):
            cfg = {"faceset": str(ws / "faces"), "model": str(ws / "me.onnx"), "recognizer": str(ws / "rec.onnx"),
                   "iterations": 1, "device": "cpu", **kw}
            with pytest.raises(ConfigError, match="outside|not allowed|workspace"):
                run_swapper_train(SwapperTrainConfig(**cfg))
    finally:
        paths.unconfine()
    assert digest(outside) == before and not (ws / "me.onnx").exists()


@pytest.mark.parametrize("name", ["me.state.safetensors", "me_logs", "me_preview.png"])
def test_a_file_beside_the_model_linked_out_of_the_workspace_is_refused_before_work(kit, tmp_path, name) -> None:
    """The state file, the logs folder and the preview live beside the model: one of them a link out of the workspace
    is refused when the trainer starts, before the state is read or anything is written through the link."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    run_swapper_train(train_cfg(kit, ws / "me.onnx"))
    shutil.move(str(ws / name), str(outside / name))
    os.symlink(outside / name, ws / name)
    before, model = digest(outside), (ws / "me.onnx").read_bytes()
    paths.confine_to([ws, kit["root"], kit["src"]])
    try:
        with pytest.raises(ConfigError, match="outside the workspace"):
            SwapperTrainer(train_cfg(kit, ws / "me.onnx", iterations=2), NullReporter())
    finally:
        paths.unconfine()
    assert digest(outside) == before and (ws / "me.onnx").read_bytes() == model


def test_a_loss_or_weights_gone_nan_stop_without_saving(kit, tmp_path, monkeypatch) -> None:
    """A finite loss can still step the weights to NaN (lr 1, huge weights): the run stops with FloatingPointError
    (the CLI's one error line) and the last good save stays as it was."""
    model = tmp_path / "me.onnx"
    run_swapper_train(train_cfg(kit, model))
    good = model.read_bytes()
    preview = (tmp_path / "me_preview.png").read_bytes()
    real_step = torch.optim.AdamW.step

    def poisoned(self, *a, **kw):  # noqa: ANN001, ANN202  (an update that overflows)
        out = real_step(self, *a, **kw)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(FloatingPointError, match="became NaN or inf at iteration 2.*intact"):
        run_swapper_train(train_cfg(kit, model, iterations=2))
    assert model.read_bytes() == good and (tmp_path / "me_preview.png").read_bytes() == preview
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    real_losses = SwapperTrainer.losses
    monkeypatch.setattr(SwapperTrainer, "losses", lambda self, *a: {**(t := real_losses(self, *a)),
                                                                    "total": t["total"] * float("inf")})
    with pytest.raises(FloatingPointError, match="loss became"):
        run_swapper_train(train_cfg(kit, model, iterations=2))
    assert model.read_bytes() == good


def test_a_kill_between_state_and_model_and_a_swapped_model_resume_from_the_model(kit, tmp_path, monkeypatch) -> None:
    """The state is written first, then the model (each atomically): killed in between, the pair disagrees and the
    model wins (its weights, a fresh optimizer). A model of another run at the same iteration copied over this one
    is caught by the save id both files carry: its own weights are kept, not this state's."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    run_swapper_train(train_cfg(kit, a))
    run_swapper_train(train_cfg(kit, b, seed=7))
    saved = a.read_bytes()
    shutil.copy(b, a)  # b's model, a's state: the same iteration
    rep = RecordingReporter()
    trainer = SwapperTrainer(train_cfg(kit, a, iterations=2), rep)
    assert any("saved with another model file" in m for m in rep.lines)
    theirs = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b)).graph.initializer}
    for name, p in trainer.named:
        np.testing.assert_array_equal(p.detach().numpy(), theirs[name])
    a.write_bytes(saved)  # its own model again: the pair restores
    rep = RecordingReporter()
    SwapperTrainer(train_cfg(kit, a, iterations=2), rep)
    assert not any("not restored" in m for m in rep.lines)

    def killed(model, path):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_onnx", killed)
    with pytest.raises(KeyboardInterrupt):
        run_swapper_train(train_cfg(kit, a, iterations=2))
    monkeypatch.undo()
    assert a.read_bytes() == saved  # the model is untouched; the state is one iteration ahead of it
    rep = RecordingReporter()
    assert run_swapper_train(train_cfg(kit, a), rep).iteration == 1
    assert any("not restored (it is from iteration 2, the model from 1)" in m for m in rep.lines)
    assert any("nothing to train" in m for m in rep.lines)


def test_swap_never_writes_over_what_it_reads(kit, tmp_path) -> None:
    """--overwrite replaces an earlier output, never the --source photo or --reference face it reads, and an output
    inside the --source folder would become a source of the next run."""
    photo = str(shutil.copy(next(kit["src"].iterdir()), tmp_path / "me.jpg"))
    base = dict(input=str(tmp_path / "in.png"), swapper=str(kit["base"]), recognizer=str(kit["rec"]), overwrite=True)
    cases = [(dict(output=photo, source=[photo]), "is the input"),
             (dict(output=str(tmp_path / "x.png"), source=[str(kit["src"])], reference=[str(tmp_path / "x.png")]),
              "is the input"),
             (dict(output=str(kit["src"] / "x.png"), source=[str(kit["src"])]), "lies inside the input"),
             (dict(output=str(kit["base"]), source=[photo]), "is the input")]
    for kw, phrase in cases:
        with pytest.raises(ConfigError, match=phrase):
            SwapConfig(**{**base, **kw}).check(ready=False)
    # a frames folder that merely holds the photo is not refused for it
    assert not [p for p in SwapConfig(**base, output=str(tmp_path), source=[photo]).problems() if "input" in p[1]]


def test_swap_refuses_a_swapper_that_gives_nan(kit, tmp_path) -> None:
    """A swapper with NaN weights pasted a black square onto every face, silently."""
    from loratrain.facetrain.swap.swapper_predict import load_swapper

    path = save_onnx(swapper(BAD["NaN weights"][0]), tmp_path / "nan.onnx")
    cfg = SwapConfig(input=str(tmp_path), output=str(tmp_path / "o.png"), swapper=str(path), recognizer=str(kit["rec"]),
                     source=[str(next(kit["src"].iterdir()))], device="cpu")
    with pytest.raises(ConfigError, match="nan.onnx: its output for a blank face holds NaN"):
        load_swapper(cfg)


def test_inspect_in_the_app_answers_a_hostile_file_in_plain_text(tmp_path) -> None:
    from loratrain.ui.config import AppContext
    from loratrain.ui.pages.face import Page
    from loratrain.ui.workspace import Workspace

    save_onnx(swapper(BAD["string initializer"][0]), tmp_path / "odd.onnx")
    save_onnx(swapper(BAD["cycle"][0]), tmp_path / "loop.onnx")
    page = Page(AppContext(workspace=Workspace([tmp_path]), runner=None))
    assert "odd.onnx: tensor 's'" in page.inspect_swapper("odd.onnx", "")
    assert "loop.onnx: its nodes form a cycle" in page.inspect_swapper("", "loop.onnx")


def test_rotating_backups_of_one_model_never_delete_another_models(tmp_path) -> None:
    """a.onnx's backups were globbed as a_*.onnx, which also matched a_1.onnx's: saving a deleted them."""
    from loratrain.facetrain.swapper.train import rotate_backup

    a, b = tmp_path / "a.onnx", tmp_path / "a_1.onnx"
    for i in range(3):
        b.write_text(f"b{i}")
        rotate_backup(b, 2)
    for i in range(3):
        a.write_text(f"a{i}")
        rotate_backup(a, 2)
    kept = {p.name: p.read_text() for p in (tmp_path / "backups").iterdir()}
    assert kept == {"a_000002.onnx": "a1", "a_000003.onnx": "a2", "a_1_000002.onnx": "b1", "a_1_000003.onnx": "b2"}
