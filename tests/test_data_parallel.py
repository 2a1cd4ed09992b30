"""Two processes (torchrun, gloo on CPU) train exactly what one process with twice the batch trains."""
from __future__ import annotations

import os
import subprocess
import sys

from safetensors.torch import load_file

from loratrain.training.config import TrainConfig
from loratrain.training.data_parallel import local_share


def _toml(tiny_files, dataset, tmp_path, name, batch):
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_files["sd1_file"]), train_data_dir=str(dataset), resolution="64",
                      output_dir=str(tmp_path / name), output_name="t", network_dim=4, network_alpha=2.0, learning_rate=1e-3,
                      train_batch_size=batch, max_train_steps=4, save_precision="float", seed=3, shuffle_caption=True,
                      save_every_n_steps=2)
    path = tmp_path / f"{name}.toml"
    path.write_text(cfg.to_toml())
    return path


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_local_shares_cover_a_global_batch_once():
    batch = list(range(5))
    shares = [local_share(batch, r, 2) for r in range(2)]
    assert shares == [([0, 1, 2], 0), ([3, 4], 3)]
    assert local_share([7], 1, 2) == ([], 1)  # a short last batch: the second process sits this one out


def test_two_processes_equal_one_with_twice_the_batch(tiny_files, dataset, tmp_path):
    one = _toml(tiny_files, dataset, tmp_path, "one", 2)
    two = _toml(tiny_files, dataset, tmp_path, "two", 1)
    single_b1 = _toml(tiny_files, dataset, tmp_path, "b1", 1)
    for cfg in (one, single_b1):
        res = subprocess.run([sys.executable, "-m", "loratrain", "train", "--config_file", str(cfg)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "loratrain", "train", "--config_file", str(two)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "batch 1 per process x 2 processes" in res.stdout
    assert res.stdout.count("done: 4 steps") == 1  # only the first process talks

    a, b, c = (load_file(tmp_path / n / "t.safetensors") for n in ("one", "two", "b1"))
    assert _max_diff(a, c) > 1e-3  # batch 1 alone learns something else: the comparison below can fail
    assert _max_diff(a, b) < 1e-4  # 2 x 1 == 1 x 2, up to float summation order
    # only the first process wrote files: one set of saves, one state
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == ["logs", "t-state", "t-step00000002.safetensors", "t.safetensors"], files
