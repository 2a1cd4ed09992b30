"""Tiny models and datasets built on disk by the tests themselves; nothing is downloaded."""
from __future__ import annotations

import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Bit-exact comparisons (a resumed run equals an unbroken one): MKL's threaded kernels may split work differently from
# run to run on some processors (two identical 2-thread runs differed by 1e-6 here); its conditional numerical
# reproducibility mode keeps results the same, and must be set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# The app's signing key (ui/signing.py) lives in a private state folder: the tests' own, never the user's.
os.environ.setdefault("LORATRAIN_STATE_DIR", tempfile.mkdtemp(prefix="loratrain-test-state-"))
# Model hashes remembered by merges (merge/provenance.py): the tests' own cache, never the user's ~/.cache/loratrain.
os.environ.setdefault("LORATRAIN_CACHE", tempfile.mkdtemp(prefix="loratrain-test-cache-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from loratrain.core.models.tiny import make_tiny_model, write_diffusers_folder, write_single_file  # noqa: E402
from loratrain.training.config import TrainConfig  # noqa: E402
from loratrain.training.demo import make_concept_images  # noqa: E402


def _user_files() -> dict[str, int]:
    """What the tests could wrongly write into the user's home: loratrain's cache and state folders."""
    home = Path.home()
    roots = [home / ".cache" / "loratrain", home / ".local" / "state" / "loratrain"]
    return {str(p): p.stat().st_mtime_ns for root in roots if root.is_dir() for p in root.rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_to_the_users_home():
    """Tests write only into their temporary folders: the user's loratrain cache and state are the same after them."""
    before = _user_files()
    yield
    assert _user_files() == before, "a test wrote into the user's ~/.cache/loratrain or ~/.local/state/loratrain"


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for fam in ("sd1", "sdxl"):
        model = make_tiny_model(fam, seed=0)
        out[f"{fam}_file"] = write_single_file(model, root / f"{fam}.safetensors")
        out[f"{fam}_dir"] = write_diffusers_folder(model, root / f"{fam}_diffusers")
    return out


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    make_concept_images(root / "3_circle", "circle", 4, 64, 0)
    make_concept_images(root / "2_square", "square", 3, 64, 1)
    return root


def quick_config(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(model), train_data_dir=str(data), resolution="64", output_dir=str(out),
                output_name="t", network_dim=4, network_alpha=2.0, learning_rate=1e-3, train_batch_size=2, max_train_steps=4,
                save_precision="float", seed=3)
    base.update(kw)
    return TrainConfig(**base)


@contextmanager
def running_app(root: Path):
    """The real app served on a free local port with the demo files under `root`: (context, url); closed after."""
    from loratrain.ui.app import serve
    from loratrain.ui.config import UiConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, ctx, url = serve(UiConfig(root=[str(root)], port=port, demo=True), block=False)
    try:
        yield ctx, url
    finally:
        from loratrain.core import paths

        ctx.runner.close()
        app.close()
        paths.unconfine()


def extract_facesets(root: Path, n: int) -> tuple[Path, Path]:
    """src and dst facesets of `n` demo photos each, extracted for real (dlib) at 96 px: the face tests' data."""
    from loratrain.core.progress import RecordingReporter
    from loratrain.facetrain.demo_data import make_photos
    from loratrain.facetrain.extract.config import ExtractConfig
    from loratrain.facetrain.extract.extract import run_face_extract

    for look, seed in (("src", 0), ("dst", 1)):
        make_photos(root / f"{look}_photos", n, seed, look)
        run_face_extract(ExtractConfig(input=str(root / f"{look}_photos"), output_dir=str(root / look), image_size=96,
                                       max_faces=1), RecordingReporter())
    return root / "src", root / "dst"


@pytest.fixture(scope="session")
def facesets6(tmp_path_factory) -> tuple[Path, Path]:
    """Six faces a side, extracted once per session for the tests that only read them (never write into these)."""
    return extract_facesets(tmp_path_factory.mktemp("facesets6"), 6)
