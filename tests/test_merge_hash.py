"""The inputs' SHA-256 a merge writes is hashed in the merge's own pass: it must equal hashlib's over the whole file
whatever the merge reads, skips or reads out of order, and a stopped or failed merge still writes nothing."""
from __future__ import annotations

import hashlib
import json
import random
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loratrain.core import tensor_io
from loratrain.core.models.tiny import make_tiny_model, write_single_file
from loratrain.core.progress import RecordingReporter, StopFlag
from loratrain.core.read_along_hash import ReadAlongHash
from loratrain.core.tensor_io import LazySafetensors, OutputTensor, StreamingWriter
from loratrain.merge import checkpoint
from loratrain.merge.checkpoint import run_merge
from loratrain.merge.config import MergeConfig


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True, params=["reads ahead from the page cache", "only follows the reader"])
def _small_windows(request, tmp_path, monkeypatch):
    """Tiny files span one map window at the real sizes: shrink windows and hash steps so every path is taken
    (many windows, gaps, the reader held back, own reads), and keep the hash cache in the test's folder.
    The files a test just wrote are in the page cache, where the hash would read ahead of the reader; without
    RWF_NOWAIT (other systems) it only follows the reader: both must give the same digest."""
    if request.param == "only follows the reader":
        monkeypatch.setattr(ReadAlongHash, "NOWAIT", 0)
    monkeypatch.setenv("LORATRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tensor_io, "WINDOW", 64 << 10)
    monkeypatch.setattr(ReadAlongHash, "BLOCK", 3000)  # not a divisor of anything: reads end mid-tensor
    monkeypatch.setattr(ReadAlongHash, "STEP", 50_000)
    monkeypatch.setattr(ReadAlongHash, "LAG", 100_000)


def write_in_order(path, tensors: dict[str, torch.Tensor], order: list[str], metadata=None):
    """A .safetensors file whose data lies in `order` (safetensors itself always sorts by dtype and name)."""
    plan = [OutputTensor(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order]
    with StreamingWriter(path, plan, metadata, direct=False) as w:
        for k in order:
            w.write(tensors[k])
    return path


def hash_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sha256")]


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """A, B, C tiny SD1 files; B's data lies in reverse key order (a merge reads it out of order) and C has EMA keys."""
    root = tmp_path_factory.mktemp("hash_trio")
    paths = []
    for i, name in enumerate("abc"):
        raw = write_single_file(make_tiny_model("sd1", seed=i), root / f"{name}_raw.safetensors")
        with safe_open(str(raw), "pt") as f:
            sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        if name == "c":
            sd.update({f"model_ema.k{j}": torch.randn(5000) for j in range(4)})
        order = sorted(sd, reverse=name == "b")
        paths.append(write_in_order(root / f"{name}.safetensors", sd, order, meta))
    return paths


@pytest.mark.parametrize("pattern", ["file order", "reverse", "random", "every third key", "no reads", "not followed"])
def test_read_along_hash_equals_hashlib_whatever_the_reads(trio, pattern):
    path = trio[1]
    with LazySafetensors(path) as f:
        keys = f.keys()
        order = {"file order": keys, "reverse": keys[::-1], "random": random.Random(0).sample(keys, len(keys)),
                 "every third key": keys[::3], "no reads": [], "not followed": keys}[pattern]
        h = ReadAlongHash(f, follow=pattern != "not followed")
        ref = load_file(path)
        for k in order:
            assert torch.equal(f.read(k), ref[k]), k  # reads are unchanged by the hash following them
        assert h.result() == sha256(path)
    assert not hash_threads()


def test_a_file_the_reader_leaves_alone_is_hashed_meanwhile(trio, monkeypatch):
    """Not left for the end: after IDLE seconds without a read the thread goes on by itself, then follows again."""
    monkeypatch.setattr(ReadAlongHash, "IDLE", 0.01)
    path = trio[0]
    with LazySafetensors(path) as f:
        h = ReadAlongHash(f)
        deadline = time.monotonic() + 60
        while h._hashed < f.size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h._hashed == f.size
        for k in f.keys()[::2]:
            f.read(k)
        assert h.result() == sha256(path)


def test_first_merge_writes_each_inputs_whole_file_sha256(trio, tmp_path):
    """add_difference with a pruned C (gaps), B read out of order: the recipe and sd_merge_models carry hashlib's
    SHA-256 of each file; the hash cache keeps them, and a second merge takes them from there."""
    a, b, c = trio
    expected = {"primary": sha256(a), "secondary": sha256(b), "tertiary": sha256(c)}
    outs = []
    for run in range(2):
        out = tmp_path / f"m{run}.safetensors"
        run_merge(MergeConfig(model_a=str(a), model_b=str(b), model_c=str(c), method="add_difference", alpha=0.4,
                              output=str(out), prune=True, save_precision="fp32"))
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        recipe = json.loads(meta["sd_merge_recipe"])
        assert {role: recipe[f"{role}_model_hash"] for role in expected} == expected
        assert set(json.loads(meta["sd_merge_models"])) == set(expected.values())
        outs.append(load_file(out))
        cache = json.loads((tmp_path / "cache" / "sha256.json").read_text())
        assert {v["sha256"] for v in cache.values()} == set(expected.values())
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    A, B, C = load_file(a), load_file(b), load_file(c)
    key = "model.diffusion_model.out.2.weight"
    assert torch.allclose(outs[0][key], A[key] + (B[key] - C[key]) * 0.4, atol=1e-6)
    assert not hash_threads()


def test_an_input_the_merge_never_reads_is_hashed_all_the_same(trio, tmp_path):
    a, b, _ = trio  # weight 0: every key is A's, B is opened (its header checked) but none of its bytes are needed
    out = tmp_path / "zero.safetensors"
    run_merge(MergeConfig(model_a=str(a), model_b=str(b), output=str(out), alpha=0.0))
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert (recipe["primary_model_hash"], recipe["secondary_model_hash"]) == (sha256(a), sha256(b))
    assert out.read_bytes()[-4096:] == a.read_bytes()[-4096:]  # A's data, copied through


def test_a_stopped_or_failed_first_merge_writes_nothing_and_caches_no_hash(trio, tmp_path, monkeypatch):
    a, b, _ = trio
    out = tmp_path / "never.safetensors"
    cfg = MergeConfig(model_a=str(a), model_b=str(b), output=str(out), alpha=0.5)

    def nothing_left():
        assert not out.exists() and not list(tmp_path.glob(".never*")) and not (tmp_path / "cache").exists()
        assert not hash_threads()

    stop = StopFlag()

    class StopAfterFive(RecordingReporter):
        def advance(self, n=1, **m):
            super().advance(n, **m)
            if self.step >= 5:
                stop.set()

    assert run_merge(cfg, StopAfterFive(), stop).stopped
    nothing_left()

    calls = {"n": 0}
    real = checkpoint.CheckpointMerge._write_one

    def fails_later(self, item, writer):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("disk on fire")
        real(self, item, writer)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.CheckpointMerge, "_write_one", fails_later)
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_merge(cfg)
    nothing_left()

    def unreadable(self, sha, buf, pos, stop):
        raise OSError(5, "reading it to hash it failed: Input/output error", str(self.path))

    monkeypatch.setattr(ReadAlongHash, "_read", unreadable)
    monkeypatch.setattr(ReadAlongHash, "_read_cached", unreadable)
    with pytest.raises(OSError, match="hash it failed") as err:
        run_merge(cfg)
    assert err.value.filename.endswith(("a.safetensors", "b.safetensors"))  # the error names the file
    nothing_left()
