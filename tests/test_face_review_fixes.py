"""What a hostile review of the XSeg and face-recipe change found: planted headers and links are refused by name."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from loratrain.cli import main
from loratrain.core import paths
from loratrain.core.errors import ConfigError
from loratrain.facetrain.snapshots import restore_snapshot
from loratrain.facetrain.xseg.model import META_KEY, load_xseg


@pytest.mark.parametrize("spec", [{"resolution": 0, "base": 1024, "depth": 2}, {"resolution": 64, "base": 4, "depth": 3000},
                                  {"resolution": 64, "base": 8, "depth": 4, "face_type": "zz"}, [1, 2]])
def test_xseg_header_is_bounded_before_anything_is_built(tmp_path, spec):
    path = tmp_path / "x.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), {META_KEY: json.dumps({"spec": spec})})
    with pytest.raises(ConfigError):
        load_xseg(path)


def test_xseg_apply_with_a_planted_model_writes_no_journal(tmp_path, capsys):
    faceset = tmp_path / "faces"
    faceset.mkdir()
    path = tmp_path / "x.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), {META_KEY: json.dumps({"spec": {"resolution": 0, "base": 1024, "depth": 2}})})
    import numpy as np

    from loratrain.facetrain.demo_data import astronaut_bgr
    from loratrain.facetrain.faceset import make_meta, save_face

    img = np.ascontiguousarray(astronaut_bgr()[:64, :64])
    lm = np.random.default_rng(0).uniform(10, 50, (68, 2))
    save_face(faceset / "a.jpg", img, make_meta("wf", lm, "a.png", (0, 0, 9, 9), lm, np.eye(2, 3)))
    assert main(["face", "xseg", "apply", str(faceset), str(path)]) == 2
    assert "outside" in capsys.readouterr().err
    assert not (faceset / ".loratrain").exists()


def test_snapshot_restore_refuses_a_link_out_and_a_foreign_file(tmp_path):
    ws = tmp_path / "ws"
    snap = ws / "m" / "snapshots" / "evil"
    snap.mkdir(parents=True)
    (tmp_path / "secret").write_text("SECRET")
    os.symlink(tmp_path / "secret", snap / "face.safetensors")
    with paths.confined([ws]):
        with pytest.raises(ConfigError, match="outside"):
            restore_snapshot(ws / "m", "evil")
    with pytest.raises(ConfigError, match="link"):
        restore_snapshot(ws / "m", "evil")
    assert not (ws / "m" / "face.safetensors").exists()
    (snap / "face.safetensors").unlink()
    save_file({"x": torch.zeros(1)}, str(snap / "face.safetensors"))  # a safetensors file, not a face model
    with pytest.raises(ConfigError, match="not a loratrain face model"):
        restore_snapshot(ws / "m", "evil")
    assert not (ws / "m" / "face.safetensors").exists()
