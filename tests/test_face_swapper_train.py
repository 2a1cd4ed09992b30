"""The identity-injection swapper: ONNX import, fine-tuning, export, resume (issue 24).

Stand-ins are built here: an inswapper-shaped swapper ONNX (inputs `target` 1 x 3 x S x S and `source` 1 x 512,
output `output`, the 512 x 512 `emap` as last initializer) and an ArcFace-shaped recogniser ONNX (N x 3 x 112 x 112
-> N x 512). Faces are the session's extracted demo facesets.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from loratrain.core.errors import ConfigError  # noqa: E402
from loratrain.core.progress import NullReporter, RecordingReporter, StopFlag  # noqa: E402
from loratrain.facetrain.swapper.arch import GeneratorSpec, build_generator_onnx, build_recognizer_onnx  # noqa: E402
from loratrain.facetrain.swapper.config import SwapperTrainConfig  # noqa: E402
from loratrain.facetrain.swapper.contract import read_contract  # noqa: E402
from loratrain.facetrain.swapper.data import load_faces  # noqa: E402
from loratrain.facetrain.swapper.model import TorchRecognizer, TorchSwapper  # noqa: E402
from loratrain.facetrain.swapper.onnx_module import OnnxModule  # noqa: E402
from loratrain.facetrain.swapper.train import run_swapper_train  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("swapper_models")
    return (build_generator_onnx(root / "inswapper_like.onnx", GeneratorSpec(SIZE, 8, 2, batch=1), seed=3),
            build_recognizer_onnx(root / "arcface_like.onnx", seed=0))


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def session(path: Path):  # noqa: ANN201
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_imported_graphs_compute_what_onnxruntime_computes(models) -> None:
    swapper, recognizer = models
    rng = np.random.default_rng(0)
    target = rng.random((1, 3, SIZE, SIZE), np.float32)
    source = rng.standard_normal((1, 512)).astype(np.float32)
    mod = OnnxModule(onnx.load(str(swapper)))
    with torch.no_grad():
        mine = mod(torch.from_numpy(target), torch.from_numpy(source)).numpy()
    np.testing.assert_allclose(mine, session(swapper).run(None, {"target": target, "source": source})[0], atol=1e-5)
    faces = rng.standard_normal((2, 3, 112, 112)).astype(np.float32)
    rec = OnnxModule(onnx.load(str(recognizer)))
    with torch.no_grad():
        emb = rec(torch.from_numpy(faces)).numpy()
    assert emb.shape == (2, 512)
    np.testing.assert_allclose(emb, session(recognizer).run(None, {"input.1": faces})[0], rtol=1e-4, atol=1e-4)
    contract = read_contract(onnx.load(str(swapper)))
    assert (contract.target, contract.source, contract.output, contract.size, contract.batch) == ("target", "source", "output", SIZE, 1)
    assert contract.emap is not None and contract.emap.shape == (512, 512)


def test_unsupported_graph_is_named_not_a_traceback(tmp_path) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("NonMaxSuppression", ["x", "x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3])])
    with pytest.raises(ConfigError, match="NonMaxSuppression"):
        OnnxModule(helper.make_model(graph), "model odd.onnx")


def identity_loss(swapper_path: Path, recognizer: TorchRecognizer, targets: torch.Tensor, emb: torch.Tensor) -> float:
    sw = TorchSwapper.load(swapper_path)
    with torch.no_grad():
        out = sw(targets, sw.latent(emb.expand(len(targets), -1)))
        return float((1 - torch.nn.functional.cosine_similarity(recognizer(out), emb)).mean())


def test_fine_tune_freezes_blocks_lowers_identity_loss_and_exports_the_same_contract(models, facesets6, tmp_path) -> None:
    swapper, recognizer = models
    src, dst = facesets6
    out = tmp_path / "tuned" / "me.onnx"
    rep = RecordingReporter()
    res = run_swapper_train(SwapperTrainConfig(faceset=str(src), model=str(out), base=str(swapper), recognizer=str(recognizer),
                                               dst_faceset=str(dst), iterations=12, lr=1e-3, freeze_until="styles.1",
                                               dedupe_threshold=1, validate_every=4, preview_every=6), rep)
    assert res.iteration == 12 and out.is_file() and Path(res.preview_path).is_file()
    # the identity loss falls, measured on the dst faces swapped with the identity's mean embedding
    rec = TorchRecognizer.load(recognizer, "arcface_128", SIZE)
    identity = load_faces(str(src), "arcface_128", SIZE, "faceset")
    with torch.no_grad():
        emb = rec(identity.tensor(list(range(len(identity.names))))).mean(0, keepdim=True)
    targets = load_faces(str(dst), "arcface_128", SIZE, "dst").tensor(list(range(6)))
    before, after = identity_loss(swapper, rec, targets, emb), identity_loss(out, rec, targets, emb)
    assert after < before * 0.8, (before, after)
    # frozen blocks did not move; the trained ones did; the embedding map is untouched and still last
    a, b = weights(swapper), weights(out)
    assert list(a) == list(b) and list(b)[-1] == "emap"
    frozen = [n for n in a if n.split(".")[0] in ("first", "down1", "down2") or n.startswith("styles.0.")]
    trained = [n for n in a if n.startswith(("styles.1.", "up1", "last")) and a[n].size > 1]
    assert frozen and trained and set(res.frozen) >= {n for n in frozen if a[n].size > 1}
    assert all(np.array_equal(a[n], b[n]) for n in frozen)
    assert all(not np.array_equal(a[n], b[n]) for n in trained)
    np.testing.assert_array_equal(a["emap"], b["emap"])
    # same inputs, outputs and shapes as the file it came from; onnxruntime computes what torch does
    base_proto, tuned_proto = onnx.load(str(swapper)), onnx.load(str(out))
    io = lambda m: [(v.name, str(v.type)) for v in (*m.graph.input, *m.graph.output)]  # noqa: E731
    assert io(base_proto) == io(tuned_proto)
    sw = TorchSwapper.load(out)
    x = targets[:1]
    latent = sw.latent(emb)
    with torch.no_grad():
        mine = sw(x, latent).numpy()
    theirs = session(out).run(None, {"target": x.numpy(), "source": latent.numpy()})[0]
    np.testing.assert_allclose(theirs, mine, atol=1e-4)
    # no paths of this machine in the shared file
    meta = {p.key: p.value for p in tuned_proto.metadata_props}
    assert meta["loratrain.iteration"] == "12" and meta["loratrain.template"] == "arcface_128"
    assert not any("/" in v or "\\" in v for v in meta.values()), meta
    assert any("likeness" in m for m in rep.metrics) and rep.samples  # the app's curves and previews


class StopAfter(NullReporter):
    def __init__(self, stop: StopFlag, n: int) -> None:
        super().__init__()
        self.stop, self.n, self.k = stop, n, 0

    def advance(self, n: int = 1, **metrics: float) -> None:
        self.k += n
        if self.k >= self.n:
            self.stop.set()


def test_stopped_and_resumed_run_equals_the_unbroken_one(models, facesets6, tmp_path) -> None:
    swapper, recognizer = models
    src, dst = facesets6
    kw = dict(faceset=str(src), base=str(swapper), recognizer=str(recognizer), dst_faceset=str(dst), iterations=6,
              lr=1e-3, dedupe_threshold=1, validate_every=2, early_stopping=50, gan_weight=0.1, grad_accum=2,
              batch_size=2, save_every=100)
    whole = run_swapper_train(SwapperTrainConfig(model=str(tmp_path / "a" / "m.onnx"), **kw))
    stop = StopFlag()
    first = run_swapper_train(SwapperTrainConfig(model=str(tmp_path / "b" / "m.onnx"), **kw), StopAfter(stop, 3), stop)
    assert first.stopped and first.iteration == 3
    rest = run_swapper_train(SwapperTrainConfig(model=str(tmp_path / "b" / "m.onnx"), **kw))
    assert rest.iteration == whole.iteration == 6
    a, b = weights(tmp_path / "a" / "m.onnx"), weights(tmp_path / "b" / "m.onnx")
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert [h["loss"] for h in whole.history[3:]] == [h["loss"] for h in rest.history]
    assert (tmp_path / "b" / "backups").is_dir()


def test_our_generator_from_scratch_with_lpips_bf16_and_dedupe(facesets6, models, tmp_path) -> None:
    from onnx import TensorProto, helper

    _, recognizer = models
    src, _ = facesets6
    # an LPIPS-shaped network: two images in -1..1 -> a distance per image (a conv feature difference)
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["a", "w"], ["fa"], pads=[1, 1, 1, 1]), helper.make_node("Conv", ["b", "w"], ["fb"], pads=[1, 1, 1, 1]),
             helper.make_node("Sub", ["fa", "fb"], ["d"]), helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("ReduceMean", ["d2"], ["dist"], axes=[1, 2, 3], keepdims=1)]
    img = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, "H", "W"])  # noqa: E731
    graph = helper.make_graph(nodes, "lpips", [img("a"), img("b")],
                              [helper.make_tensor_value_info("dist", TensorProto.FLOAT, ["N", 1, 1, 1])], [w])
    lp = tmp_path / "lpips.onnx"
    lp.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    rep = RecordingReporter()
    res = run_swapper_train(SwapperTrainConfig(faceset=str(src), model=str(tmp_path / "ours.onnx"), recognizer=str(recognizer),
                                               lpips_model=str(lp), resolution=32, base_channels=4, style_blocks=1,
                                               iterations=2, lr=1e-4, mixed_precision="bf16", dedupe_threshold=0.9,
                                               validation_split=0), rep)
    logs = "\n".join(rep.lines)
    assert "from scratch" in logs and "no --lpips_model" not in logs
    assert res.dropped_duplicate > 0 and res.faces + res.dropped_duplicate + res.dropped_blurry == 6
    c = read_contract(onnx.load(str(tmp_path / "ours.onnx")))
    assert (c.size, c.embed, c.target, c.source) == (32, 512, "target", "source")
    assert session(tmp_path / "ours.onnx").run(None, {"target": np.zeros((1, 3, 32, 32), np.float32),
                                                       "source": np.ones((1, 512), np.float32) / 512 ** 0.5})[0].shape == (1, 3, 32, 32)


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratrain", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_info_and_clear_errors(models, facesets6, tmp_path) -> None:
    from onnx import TensorProto, helper

    swapper, recognizer = models
    src, _ = facesets6
    res = cli("face", "swapper", "info", swapper)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "styles.1" in res.stdout and "emap" in res.stdout and "arcface_128" in res.stdout
    # a DFL-style .dfm-shaped model is not an identity-injection swapper
    dfm = tmp_path / "face.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["in_face:0"], ["out_celeb_face"])], "dfm",
                              [helper.make_tensor_value_info("in_face:0", TensorProto.FLOAT, ["N", 64, 64, 3])],
                              [helper.make_tensor_value_info("out_celeb_face", TensorProto.FLOAT, ["N", 64, 64, 3])])
    dfm.write_bytes(helper.make_model(graph).SerializeToString())
    out = tmp_path / "o" / "m.onnx"
    cases = [
        (("--base", swapper), "recognizer"),
        (("--base", dfm, "--recognizer", recognizer), "identity-injection swapper"),
        (("--base", swapper, "--recognizer", recognizer, "--freeze_until", "nosuch"), "styles.0"),
        (("--base", tmp_path / ".." / "missing.onnx", "--recognizer", recognizer), "base"),
        (("--base", swapper, "--recognizer", recognizer, "--mixed_precision", "fp16", "--device", "cpu"), "bf16"),
    ]
    for extra, text in cases:
        res = cli("face", "swapper", "train", src, out, *extra, "--iterations", "1")
        assert res.returncode == 2 and "Traceback" not in res.stderr, (extra, res.returncode, res.stderr[-2000:])
        assert text in res.stderr, (extra, res.stderr[-1000:])
    assert not out.exists()
    # the output is never an input (the base would be overwritten), and someone's own .onnx is never "resumed"
    foreign = tmp_path / "mine.onnx"
    foreign.write_bytes(swapper.read_bytes())
    for model, text in ((swapper, "destroy the input"), (foreign, "not written by `face swapper train`")):
        res = cli("face", "swapper", "train", src, model, "--base", swapper, "--recognizer", recognizer, "--iterations", "1")
        assert res.returncode == 2 and text in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]
    assert foreign.read_bytes() == swapper.read_bytes()


def test_face_training_likeness_reads_the_recognizer(models, facesets6, tmp_path) -> None:
    """Identity everywhere: the autoencoder's likeness score comes from the user's recogniser when given one."""
    from loratrain.facetrain.train.config import FaceTrainConfig
    from loratrain.facetrain.train.trainer import run_face_train

    _, recognizer = models
    src, dst = facesets6
    rep = RecordingReporter()
    run_face_train(FaceTrainConfig(model_dir=str(tmp_path / "m"), src_faceset=str(src), dst_faceset=str(dst), archi="df",
                                   resolution=32, ae_dims=16, e_dims=4, d_dims=4, batch_size=2, workers=0, max_iters=2,
                                   preview_every=1, likeness_recognizer=str(recognizer)), rep)
    scores = [m["likeness"] for m in rep.metrics if "likeness" in m]
    assert scores and all(0 <= s <= 2 for s in scores)  # a cosine distance, not dlib's Euclidean scale
    assert not any("no likeness score" in line for line in rep.lines)
    res = cli("face", "train", tmp_path / "m2", "--src_faceset", src, "--dst_faceset", dst, "--likeness_recognizer",
              tmp_path / "nope.onnx")
    assert res.returncode == 2 and "likeness_recognizer" in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


def test_side_files_of_weights_are_confined_to_the_models_folder(models, tmp_path) -> None:
    """ONNX external data: a name inside a file is untrusted; only plain files beside the model are read."""
    from loratrain.facetrain.swapper.onnx_file import load_onnx, ort_source

    swapper, _ = models
    good = tmp_path / "good" / "split.onnx"
    good.parent.mkdir()
    onnx.save(onnx.load(str(swapper)), str(good), save_as_external_data=True, all_tensors_to_one_file=True,
              location="split.weights", size_threshold=0)
    target = np.zeros((1, 3, SIZE, SIZE), np.float32)
    source = np.ones((1, 512), np.float32) / 512 ** 0.5
    want = session(swapper).run(None, {"target": target, "source": source})[0]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    got = ort.InferenceSession(ort_source(good), opts, providers=["CPUExecutionProvider"]).run(None, {"target": target, "source": source})[0]
    np.testing.assert_array_equal(got, want)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    for location in ("../secret.bin", str(secret)):
        evil = onnx.load(str(good), load_external_data=False)
        for t in evil.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        (tmp_path / "good" / "evil.onnx").write_bytes(evil.SerializeToString())
        with pytest.raises(ConfigError, match="only a file beside the model"):
            load_onnx(tmp_path / "good" / "evil.onnx", "base")
    (tmp_path / "good" / "link.weights").symlink_to(secret)
    evil = onnx.load(str(good), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "link.weights"
    (tmp_path / "good" / "linked.onnx").write_bytes(evil.SerializeToString())
    with pytest.raises(ConfigError):
        load_onnx(tmp_path / "good" / "linked.onnx", "base")
