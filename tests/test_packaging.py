"""One import root: installed, the project is `loratrain` and nothing else; the CLI starts light."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("merge", "dataset_tools", "facetrain", "ui", "configs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A real (non-editable) install of the project into its own folder, shared by the tests below."""
    base = tmp_path_factory.mktemp("install")
    target, source = base / "site", base / "src"
    # built from a copy (the build writes build/ and *.egg-info beside its source, never into the repository) and
    # without build isolation (setuptools is already here; isolation would fetch it from the network)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", "venv", ".git", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".ruff_cache", "demo_output", "demo_face"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    return target


@pytest.mark.slow
def test_install_leaves_one_top_level_package_with_its_data(installed, tmp_path):
    target = installed
    top = sorted(p.name for p in target.iterdir() if p.name != "bin")
    assert len(top) == 2 and top[0] == "loratrain" and re.fullmatch(r"loratrain-[\d.]+\.dist-info", top[1]), top
    pkg = target / "loratrain"
    for data in ("configs/models/sd1/unet.json", "configs/models/sdxl/text_encoder_2.json", "configs/tokenizers/clip/vocab.json",
                 "merge/presets/cubic_hermite.tsv", "core/lora/presets/lora_block_weight.tsv"):
        assert (pkg / data).is_file(), data
    # the installed copy works from anywhere, with no repository on the path
    code = ("import loratrain.merge.presets as p, loratrain.core.models.families as f\n"
            "assert 'GRAD_V' in p.merge_presets() and f.FAMILIES['sdxl'].shipped_configs()['unet']\n"
            "import loratrain.core.lora.presets as lp; assert lp.lora_block_presets()\n"
            "import loratrain.cli; print(loratrain.cli.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(str(pkg))


def test_every_package_on_disk_is_listed_for_installation():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    on_disk = set()
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench", ".venv", ".lint", "build") or rel.parts[0].startswith("."):
            continue
        head = rel.parts[0]
        prefix = next((k for k, v in mapping.items() if v == head), head)
        on_disk.add(".".join([prefix, *rel.parts[1:]]))
    assert on_disk == listed


def test_no_code_imports_the_folders_as_top_level_names():
    pattern = re.compile(r"^\s*(from|import)\s+(" + "|".join(MAPPED) + r")\b", re.M)
    offenders = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") or part in ("build",) for part in path.relative_to(ROOT).parts):
            continue
        if pattern.search(path.read_text(encoding="utf-8")):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_building_the_cli_imports_no_heavy_or_optional_library():
    """Flags come from light config modules: `loratrain tags list` must not wait for torch, and a base
    install (no OpenCV, dlib, onnxruntime) still parses every command."""
    code = ("import sys\n"
            "for m in ('cv2', 'dlib', 'onnxruntime', 'onnx', 'skimage'): sys.modules[m] = None\n"
            "from loratrain.cli import build_parser\n"
            "build_parser()\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules)\n"
            "print(heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_import_layers_hold_on_a_real_install(installed, tmp_path):
    """app -> features -> core, checked by import-linter on a non-editable install (where every mapped folder
    sits under loratrain/), as a user's site-packages would hold it."""
    site = installed
    lint = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert res.returncode == 0 and "1 kept, 0 broken" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("**Tests**", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert command.startswith("python3 -m venv .venv") and "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
