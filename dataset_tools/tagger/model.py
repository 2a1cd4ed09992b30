"""Finding a WD tagger on disk and running it with the execution provider that really loaded.

onnxruntime falls back to CPU without raising when the CUDA libraries fail to load, and having both
the `onnxruntime` and `onnxruntime-gpu` distributions installed leaves one overwriting the other; the
two most reported tagger problems. So the provider is read back from the session and printed, and the
double install is detected from the package metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from loratrain.core.errors import ConfigError
from loratrain.core.hf_cache import hub_cache_dir, resolve_hf_cache
from loratrain.core.paths import confine

from .labels import TagLabels, read_labels

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"

#: Short names -> repo ids, and the P=R thresholds published on the model cards.
MODELS: dict[str, tuple[str, float]] = {
    "wd-vit-v2": ("SmilingWolf/wd-v1-4-vit-tagger-v2", 0.3537),
    "wd-convnext-v2": ("SmilingWolf/wd-v1-4-convnext-tagger-v2", 0.3685),
    "wd-convnextv2-v2": ("SmilingWolf/wd-v1-4-convnextv2-tagger-v2", 0.3710),
    "wd-swinv2-v2": ("SmilingWolf/wd-v1-4-swinv2-tagger-v2", 0.3771),
    "wd-moat-v2": ("SmilingWolf/wd-v1-4-moat-tagger-v2", 0.3771),
    "wd-vit-v3": ("SmilingWolf/wd-vit-tagger-v3", 0.2614),
    "wd-convnext-v3": ("SmilingWolf/wd-convnext-tagger-v3", 0.2682),
    "wd-swinv2-v3": ("SmilingWolf/wd-swinv2-tagger-v3", 0.2653),
    "wd-vit-large-v3": ("SmilingWolf/wd-vit-large-tagger-v3", 0.2606),
    "wd-eva02-large-v3": ("SmilingWolf/wd-eva02-large-tagger-v3", 0.5296),
}


def known_threshold(model_dir: Path, spec: str) -> float | None:
    """The P=R threshold of a known model, recognised by short name, repo id or cache folder name."""
    hay = f"{spec} {model_dir}".lower()
    for short, (repo, thr) in sorted(MODELS.items(), key=lambda kv: -len(kv[1][0])):
        if short in hay or repo.lower() in hay or repo.lower().replace("/", "--") in hay:
            return thr
    return None


def _is_model_dir(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / TAGS_FILE).is_file()


def _snapshot_of_cache_folder(folder: Path) -> Path | None:
    """The snapshot of a `models--org--name` folder, if it holds the tagger files."""
    if not (folder / "snapshots").is_dir():
        return None
    try:
        snap = resolve_hf_cache(folder)
    except FileNotFoundError:
        return None
    return snap if _is_model_dir(snap) else None


def _confined(folder: Path) -> Path:
    for name in (MODEL_FILE, TAGS_FILE):
        confine(folder / name, f"tagger {name}")
    return folder


def resolve_model_dir(spec: str, download: bool = False) -> Path:
    """A folder holding model.onnx and selected_tags.csv, found without touching the network unless asked."""
    path = Path(spec).expanduser()
    if path.is_dir():  # a folder given as a path: its files are the job's to open like any other (a link out is refused)
        if _is_model_dir(path):
            return _confined(path)
        snap = _snapshot_of_cache_folder(path)
        if snap is not None:
            return _confined(snap)
        raise ConfigError(f"{path}: no {MODEL_FILE} + {TAGS_FILE} here (nor a Hugging Face cache snapshot with them)")
    if path.exists() or spec.count("/") != 1 and spec.lower() not in MODELS:
        raise ConfigError(f"tagger model not found: {spec} (give a folder with {MODEL_FILE} and {TAGS_FILE}, "
                          f"a Hugging Face cache folder, a repo id, or one of: {', '.join(MODELS)})")
    repo = MODELS[spec.lower()][0] if spec.lower() in MODELS else spec
    snap = _snapshot_of_cache_folder(hub_cache_dir() / f"models--{repo.replace('/', '--')}")
    if snap is not None:
        return snap
    if not download:
        raise ConfigError(f"tagger {repo} is not in the local Hugging Face cache ({hub_cache_dir()}); pass --download "
                          f"to fetch it, or give a folder holding {MODEL_FILE} and {TAGS_FILE}")
    return _download(repo)


def _download(repo: str) -> Path:
    """The one network use of the project, only with --download. HF_HUB_OFFLINE in the user's environment wins."""
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--download {repo}: HF_HUB_OFFLINE is set in this environment; unset it to allow the download")
    try:
        paths = [hf_hub_download(repo, name) for name in (MODEL_FILE, TAGS_FILE)]
    except Exception as e:
        raise ConfigError(f"could not download {repo} ({e})") from None
    return Path(paths[0]).parent


def onnxruntime_install_problem() -> str | None:
    """Explain the double install that silently leaves only the CPU provider."""
    names = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("onnxruntime"):
            names.add(name)
    if "onnxruntime" in names and len(names) > 1:
        others = ", ".join(sorted(names - {"onnxruntime"}))
        return (f"both onnxruntime and {others} are installed; they share one Python package and the CPU one may "
                f"win. Fix: pip uninstall -y onnxruntime {others} && pip install {others}")
    return None


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the tagger needs onnxruntime: pip install 'loratrain[tagger]' (CPU) or "
                          "'loratrain[tagger-gpu]' (CUDA) - not both") from None
    return onnxruntime


@dataclass
class TaggerModel:
    """An open session plus what the file says about its input."""

    session: object
    labels: TagLabels
    model_dir: Path
    input_name: str
    size: int
    fixed_batch: int | None
    provider: str
    warnings: list[str]

    @classmethod
    def open(cls, model_dir: Path, device: str = "auto") -> "TaggerModel":
        ort = _import_onnxruntime()
        warnings = []
        problem = onnxruntime_install_problem()
        if problem:
            warnings.append(problem)
        available = ort.get_available_providers()
        cuda = "CUDAExecutionProvider"
        if device == "cuda" and cuda not in available:
            raise RuntimeError(f"--device cuda: this onnxruntime has no CUDA provider (available: {', '.join(available)}); "
                               "install onnxruntime-gpu instead of onnxruntime")
        providers = [cuda, "CPUExecutionProvider"] if device != "cpu" and cuda in available else ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle ORT threads must not busy-wait while our decoders run
        try:
            session = ort.InferenceSession(str(model_dir / MODEL_FILE), sess_options=opts, providers=providers)
        except Exception as e:
            raise ConfigError(f"{model_dir / MODEL_FILE}: onnxruntime cannot load it ({e})") from None
        active = session.get_providers()[0]
        if providers[0] == cuda and active != cuda:
            msg = "CUDA provider was requested but did not load (CUDA/cuDNN libraries missing or mismatched)"
            if device == "cuda":
                raise RuntimeError(msg)
            warnings.append(msg + "; running on CPU")
        labels = read_labels(model_dir / TAGS_FILE)
        inp = session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise ConfigError(f"{model_dir / MODEL_FILE}: input {inp.name} has shape {shape}; a WD tagger takes "
                              "[batch, size, size, 3] (NHWC)")
        out_shape = session.get_outputs()[0].shape
        if isinstance(out_shape[-1], int) and out_shape[-1] != len(labels):
            raise ConfigError(f"{model_dir}: the model has {out_shape[-1]} outputs but {TAGS_FILE} lists "
                              f"{len(labels)} tags; they belong to different models")
        fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        return cls(session=session, labels=labels, model_dir=model_dir, input_name=inp.name, size=int(shape[1]),
                   fixed_batch=fixed, provider=active, warnings=warnings)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities [batch, tags]; a fixed-batch model is fed one image at a time."""
        if self.fixed_batch and batch.shape[0] != self.fixed_batch:
            return np.concatenate([self(batch[i:i + 1]) for i in range(batch.shape[0])])
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)
