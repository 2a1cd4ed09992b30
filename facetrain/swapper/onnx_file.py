"""Reading a user's ONNX file safely, without importing torch (the swap path runs swappers in onnxruntime only).

A file's weights may live in side files it names (ONNX external data): a name read from a file is untrusted,
so only plain files directly beside the model are read, never a path that climbs out or a link.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from loratrain.core.errors import ConfigError


def ort_source(path: str | Path, what: str = "model") -> str | bytes:
    """What to hand onnxruntime for a user's file: its path, or, when its weights live in side files, the model as
    our loader checked and completed it (so onnxruntime never follows a side-file name itself)."""
    return read_onnx(path, what)[1]


def read_onnx(path: str | Path, what: str = "model") -> tuple[Any, str | bytes]:
    """`load_onnx` and `ort_source` from one parse of the file (an inswapper is 550 MB): (ModelProto, what to hand
    onnxruntime)."""
    model, external = _load(path, what)
    return model, (model.SerializeToString() if external else str(path))


def load_onnx(path: str | Path, what: str = "model") -> Any:
    """The ModelProto of a user's file (side files of weights confined and read in), or a ConfigError naming it."""
    return _load(path, what)[0]


def _load(path: str | Path, what: str) -> tuple[Any, bool]:
    """The ModelProto of a user's file, or a ConfigError naming it (never a protobuf traceback)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and OSError alike
        raise ConfigError(f"{what} {path}: not a readable ONNX file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if not len(model.graph.node):
        raise ConfigError(f"{what} {path}: the ONNX graph is empty")
    # every tensor of the file, not only the graph's initializers: a Constant node's value, a sparse initializer or
    # a subgraph's weight may name a side file too (onnxruntime and onnx.load would follow those as well)
    external = [t for t in _tensors(model.graph) if uses_external_data(t)]
    if external:
        # weights in side files: each must be a plain file beside the model (a name inside a file is untrusted)
        from loratrain.core.paths import confine

        folder = Path(path).resolve().parent
        for t in external:
            loc = ExternalDataInfo(t).location
            if not loc or Path(loc).name != loc or loc in (".", ".."):
                raise ConfigError(f"{what} {path}: weight {t.name} names the side file {loc!r}; only a file beside the "
                                  "model is read")
            side = confine(folder / loc, f"{what} weights file")
            if side.is_symlink() or not side.is_file() or side.resolve().parent != folder:
                raise ConfigError(f"{what} {path}: side file {loc!r} of weight {t.name} is missing or not a plain file "
                                  "beside the model")
        try:
            onnx.load_external_data_for_model(model, str(folder))
        except Exception as e:  # an offset or length past the side file's end, ...: onnx's own exception types
            raise ConfigError(f"{what} {path}: its side files of weights cannot be read ({_first_line(e)})") from None
        if any(uses_external_data(t) for t in _tensors(model.graph)):  # onnx reads in dense tensors only
            raise ConfigError(f"{what} {path}: a sparse tensor's data lives in a side file; save the model with its "
                              "weights inside")
    return model, bool(external)


def providers() -> list[str]:
    """CUDA when this onnxruntime has it (onnxruntime-gpu), else the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in have else ["CPUExecutionProvider"]


def ort_session(path: str | Path, what: str = "model", source: str | bytes | None = None) -> Any:
    """An onnxruntime session of a user's file, or a ConfigError naming it. `source`: `read_onnx`'s for the file when
    it was read already (else it is read here, side files confined)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("running .onnx face models needs onnxruntime: pip install 'loratrain[tagger]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: inswapper-style files keep `emap` as an unused initializer on purpose
    # no busy-waiting between ops: the swap's finder and writer threads need those cores while the model runs (on two
    # busy CPU cores, bench/face_swap.py --swapper ran both the swapper alone and the whole swap faster without it)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = ort_source(path, what) if source is None else source  # a file that is no ONNX at all: a ConfigError
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers())
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise ConfigError(f"{what} {path}: onnxruntime cannot load it ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _tensors(graph: Any) -> list[Any]:
    """Every TensorProto a graph holds: initializers, sparse initializers' values and indices, and the tensors of
    node attributes (Constant values), in subgraphs (If / Loop bodies) too."""
    out = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        out += [sparse.values, sparse.indices]
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                out.append(a.t)
            out.extend(a.tensors)
            for sparse in [a.sparse_tensor] if a.HasField("sparse_tensor") else []:
                out += [sparse.values, sparse.indices]
            for sparse in a.sparse_tensors:
                out += [sparse.values, sparse.indices]
            for sub in [a.g] if a.HasField("g") else []:
                out += _tensors(sub)
            for sub in a.graphs:
                out += _tensors(sub)
    return out
