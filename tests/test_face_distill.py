"""Teacher -> student distillation: a slimmer student moves toward a trained teacher's outputs, mismatched teachers are
refused before any work, and the student is a plain model (it exports like any other)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from loratrain.core.devices import torch_threads
from loratrain.core.errors import ConfigError
from loratrain.core.progress import RecordingReporter
from loratrain.facetrain.export import export_onnx, load_face_model
from loratrain.facetrain.train.config import FaceTrainConfig
from loratrain.facetrain.train.data import AugmentOptions, FaceSamples
from loratrain.facetrain.train.distill import teacher_distance
from loratrain.facetrain.train.trainer import run_face_train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than several fighting over shared cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def facesets(facesets6):
    return facesets6


def cfg_for(facesets, model_dir, **kw) -> FaceTrainConfig:
    base = dict(model_dir=str(model_dir), src_faceset=str(facesets[0]), dst_faceset=str(facesets[1]), archi="df", resolution=32,
                ae_dims=32, e_dims=8, d_dims=8, batch_size=4, max_iters=20, preview_every=1000, save_every=1000, workers=0,
                seed=0, lr=5e-4)
    base.update(kw)
    return FaceTrainConfig(**base)


@pytest.fixture(scope="module")
def teacher(facesets, tmp_path_factory):
    """A LIAE teacher, trained briefly (what matters is that its outputs differ from an untrained student's)."""
    res = run_face_train(cfg_for(facesets, tmp_path_factory.mktemp("teacher"), archi="liae", max_iters=30), RecordingReporter())
    return res.model_path


def _faces(facesets):
    """Fixed, unaugmented src and dst faces to measure the student against the teacher."""
    rng = np.random.default_rng(0)
    out = []
    for folder in facesets:
        samples = FaceSamples(folder, 32, "wf", AugmentOptions(random_warp=False))
        out.append(torch.from_numpy(np.stack([samples.sample(i, rng, augment=False)["target"] for i in range(len(samples))])
                                    .transpose(0, 3, 1, 2).copy()))
    return out


def test_student_moves_toward_the_teacher_and_exports(facesets, teacher, tmp_path):
    slim = dict(ae_dims=16, e_dims=4, d_dims=4, max_iters=30)  # a slimmer DF model learns from a LIAE teacher
    student = run_face_train(cfg_for(facesets, tmp_path / "student", teacher=str(teacher), distill_weight=4.0, **slim),
                             RecordingReporter())
    alone = run_face_train(cfg_for(facesets, tmp_path / "alone", **slim), RecordingReporter())

    # the loss the run logs: the student's error to the teacher falls, on src, dst and the swap
    for key in ("distill_src", "distill_dst", "distill_swap"):
        errs = [h[key] for h in student.history]
        assert np.mean(errs[-8:]) < 0.8 * np.mean(errs[:8]), (key, errs[:8], errs[-8:])
    assert "distill_src" not in alone.history[-1]

    # measured afterwards on fixed faces: closer to the teacher than the same model trained without it
    t_model, _ = load_face_model(teacher)
    s_model, s_info = load_face_model(student.model_path)
    a_model, _ = load_face_model(alone.model_path)
    src, dst = _faces(facesets)
    with_teacher, without = teacher_distance(s_model, t_model, src, dst), teacher_distance(a_model, t_model, src, dst)
    for key in ("src", "dst", "swap"):
        assert with_teacher[key] < without[key], (key, with_teacher, without)

    # the student is a plain model of its own size: nothing of the teacher inside, and it exports like any model
    assert s_info["model"]["ae_dims"] == 16 and s_info["model"]["archi"] == "df"
    assert not any(k.startswith("teacher") for k in s_model.state_dict())
    sess = ort.InferenceSession(str(export_onnx(student.model_path, tmp_path / "student.dfm")), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)
    want = s_model.swap(torch.from_numpy(x).permute(0, 3, 1, 2))[0].permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(sess.run(None, {"in_face:0": x})[0], want, atol=1e-4)


def test_distill_ratio_and_loss_kind_weigh_the_sides(facesets, teacher, tmp_path):
    """ratio 3 puts three times dst's weight on src (and the swap); mse is another distance than saehd's."""
    from loratrain.facetrain.train.distill import DistillTerm, load_teacher

    cfg = cfg_for(facesets, tmp_path / "m", teacher=str(teacher))
    t = load_teacher(teacher, 32, "wf", torch.device("cpu"))
    torch.manual_seed(0)
    s = {"input": torch.rand(2, 3, 32, 32), "mask_blur": torch.ones(2, 1, 32, 32)}
    d = {"input": torch.rand(2, 3, 32, 32), "mask_blur": torch.ones(2, 1, 32, 32)}
    out = {k: torch.rand(2, 1 if k.endswith("mask") else 3, 32, 32) for k in ("src", "src_mask", "dst", "dst_mask", "swap", "swap_mask")}

    def total(**kw):
        return float(DistillTerm(t, cfg.replace(**kw), 32)(s, d, out)[0])

    _, logs = DistillTerm(t, cfg, 32)(s, d, out)
    src_sum, dst_sum, swap_sum = (2 * logs[f"distill_{k}"] for k in ("src", "dst", "swap"))  # batch of 2: sums
    assert total() == pytest.approx(src_sum + dst_sum + swap_sum, rel=1e-5)
    assert total(distill_ratio=3.0) == pytest.approx(1.5 * (src_sum + swap_sum) + 0.5 * dst_sum, rel=1e-5)
    assert total(distill_swap=False, distill_weight=2.0) == pytest.approx(2 * (src_sum + dst_sum), rel=1e-5)
    assert total(distill_loss="mse") < 0.5 * total()  # plain MSE, without SAEHD's x10 DSSIM + MSE


def test_mismatched_teachers_are_refused_before_any_work(facesets, teacher, tmp_path):
    with pytest.raises(ConfigError, match="64 px") as e:
        cfg_for(facesets, tmp_path / "a", resolution=64, teacher=str(teacher)).check()
    assert "teacher" in str(e.value)
    with pytest.raises(ConfigError, match="face type 'wf'"):
        cfg_for(facesets, tmp_path / "b", face_type="f", teacher=str(teacher)).check()
    with pytest.raises(ConfigError, match="not found"):
        cfg_for(facesets, tmp_path / "c", teacher=str(tmp_path / "missing.safetensors")).check()
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="junk.safetensors"):
        cfg_for(facesets, tmp_path / "d", teacher=str(tmp_path / "junk.safetensors")).check()
    with pytest.raises(ConfigError, match="overwrites"):  # the teacher is the very file this run would train
        cfg_for(facesets, teacher.parent, teacher=str(teacher)).check()
    # a student resumed at another resolution than its options say: refused when the teacher is loaded, before a step
    run_face_train(cfg_for(facesets, tmp_path / "e", resolution=64, max_iters=1), RecordingReporter())
    with pytest.raises(ConfigError, match="32 px model and the student 64 px"):
        run_face_train(cfg_for(facesets, tmp_path / "e", resolution=32, max_iters=3, teacher=str(teacher)), RecordingReporter())


def _plant(path, source, edit):
    """A copy of `source` (a real face model) whose face-model header `edit` changes; the tensors stay tiny."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from loratrain.facetrain.train.state import CONFIG_KEY

    with safe_open(str(source), framework="pt") as f:
        info = json.loads(f.metadata()[CONFIG_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(info)
    save_file(tensors, str(path), {CONFIG_KEY: json.dumps(info)})
    return path


def test_a_planted_header_is_refused_before_anything_is_built(facesets, teacher, tmp_path):
    """The header sizes the model: a tiny file claiming ae_dims 8192 (gigabytes) or a malformed entry must be a
    ConfigError naming the file, for a teacher, --init_from, export/swap and a resumed model alike."""
    from loratrain.facetrain.parts import load_source
    from loratrain.facetrain.train.distill import load_teacher

    huge = _plant(tmp_path / "huge.safetensors", teacher, lambda i: i["model"].update(ae_dims=8192))
    bad_opts = _plant(tmp_path / "opts.safetensors", teacher, lambda i: i.update(options=[1]))
    bad_type = _plant(tmp_path / "type.safetensors", teacher, lambda i: i["model"].update(e_dims="8"))
    too_big = _plant(tmp_path / "big.safetensors", teacher, lambda i: i["model"].update(d_dims=10 ** 9))
    for path, why in ((huge, "do not match"), (bad_opts, "'options'"), (bad_type, "e_dims"), (too_big, "d_dims")):
        with pytest.raises(ConfigError, match=why) as e:
            cfg_for(facesets, tmp_path / "s", teacher=str(path)).check()
        assert path.name in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ConfigError, match=path.name):
            load_teacher(path, 32, "wf", torch.device("cpu"))
        with pytest.raises(ConfigError, match=path.name):
            load_face_model(path)
        with pytest.raises(ConfigError, match=f"init_from: .*{path.name}"):
            load_source(path)
    # a planted model file in the model folder: resume refuses it, naming the file, before building the model
    model_dir = tmp_path / "resume"
    model_dir.mkdir()
    _plant(model_dir / "face.safetensors", teacher, lambda i: i["model"].update(ae_dims=8192))
    with pytest.raises(ConfigError, match="face.safetensors"):
        run_face_train(cfg_for(facesets, model_dir, archi="liae", max_iters=1), RecordingReporter())
    assert load_face_model(teacher)[0].cfg.archi == "liae"  # the genuine file still loads
