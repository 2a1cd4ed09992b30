"""Streaming checkpoint merge: plan every output tensor first, then compute and write them in order.

Planning reads only headers, so every mistake (family mismatch, shape mismatch, wrong weight count,
missing file) is reported before a byte is written. Execution reads each tensor in chunks of a fixed
number of elements, so memory stays at a few chunks whatever the model size, and the output is
written front to back into a temp file that replaces the target only when complete.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratrain.core.devices import torch_threads
from loratrain.core.errors import ConfigError
from loratrain.core.jobs import JobResult, Stopped, job
from loratrain.core.lora.blocks import BASE, block_of, block_weights, parse_values
from loratrain.core.models.families import VAE_PREFIX, Family, ModelTypeError, detect_family
from loratrain.core.models.single_file import CONFIG_METADATA_KEY
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.read_along_hash import ReadAlongHash
from loratrain.core.safe_io import new_output
from loratrain.core.tensor_io import LazySafetensors, OutputTensor, StreamingWriter, chunks, out_dtype

from .config import MergeConfig
from .methods import MERGE_METHODS, MergeMethod
from .presets import merge_preset, merge_presets
from .provenance import cached_sha256, merge_metadata, remember_sha256

CHUNK_ELEMENTS = 4 * 1024 * 1024
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass
class KeyPlan:
    out: OutputTensor
    action: str  # merge | copy | reset
    source: str = "A"  # for copy: A, B or VAE
    weight: float = 0.0
    channels: int | None = None  # inpainting / pix2pix conv_in: merge only the first `channels` inputs


@dataclass
class MergeResult(JobResult):
    output: Path | None
    family: str = ""
    merged: int = 0
    copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)
    presets: dict[str, list[float]] = field(default_factory=dict)  # filled by --list_presets

    def summary(self) -> list[str]:
        if self.presets:
            return [f"{name:28s} {','.join(f'{v:.3g}' for v in values)}" for name, values in sorted(self.presets.items())]
        if self.stopped:
            return ["stopped; nothing was written"]
        return [f"wrote {self.output} ({self.bytes_written / 2**20:.0f} MiB, {self.merged} tensors merged, "
                f"{self.copied} copied) in {self.seconds:.1f} s"]


def copy_tensor(src: LazySafetensors, name: str, dtype: torch.dtype, writer: StreamingWriter) -> None:
    """Pass a tensor through in chunks, cast to the output dtype on the way (one copy, input map to output map)."""
    for start, n in chunks(src.tensors[name].numel, CHUNK_ELEMENTS):
        out = writer.buffer(n, dtype)
        out.copy_(src.read(name, start, n))
        writer.write(out)


def open_model(path: str, role: str) -> tuple[LazySafetensors, Family]:
    f = LazySafetensors(path, what=role)
    try:
        return f, detect_family(set(f.tensors), str(f.path))
    except ModelTypeError:
        f.close()
        raise


class CheckpointMerge:
    def __init__(self, cfg: MergeConfig) -> None:
        self.cfg = cfg
        self.method: MergeMethod = MERGE_METHODS.get(cfg.method)
        self.output = Path(cfg.output)
        self.files: dict[str, LazySafetensors] = {}
        try:
            self._open_inputs()
            self.weights = self._weights()
            self.plan = self._plan()
        except Exception:
            self.close()
            raise

    # ---- planning ---------------------------------------------------------------------------
    def _open_inputs(self) -> None:
        cfg = self.cfg
        roles = {"A": cfg.model_a, "B": cfg.model_b, **({"C": cfg.model_c} if cfg.model_c else {})}
        families: dict[str, Family] = {}
        for role, path in roles.items():
            self.files[role], families[role] = open_model(path, f"model {role}")
        names = {r: f.name for r, f in families.items()}
        if len(set(names.values())) > 1:
            desc = ", ".join(f"{r} is {n}" for r, n in names.items())
            raise ModelTypeError(f"models of different families cannot be merged: {desc}")
        self.family = families["A"]
        resolved = {f.path.resolve() for f in self.files.values()}
        if self.output.resolve() in resolved:
            raise ConfigError(f"--output {self.output} is one of the inputs; choose another file")
        new_output(self.output, cfg.overwrite)
        if cfg.vae:
            self.files["VAE"] = LazySafetensors(cfg.vae, what="VAE")

    def _weights(self) -> dict[str, float]:
        cfg = self.cfg
        if not cfg.block_mode:
            return {BASE: float(cfg.alpha)}  # type: ignore[arg-type]
        if cfg.preset:
            values = merge_preset(cfg.preset, cfg.preset_file or None)
        else:
            values = parse_values(cfg.weights, "--weights")
        return block_weights(values, self.family, cfg.base_alpha if cfg.base_alpha is not None else 0.0)

    def weight_of(self, key: str) -> float:
        if not self.cfg.block_mode:
            return self.weights[BASE]
        return self.weights[block_of(key, self.family)]

    def _plan(self) -> list[KeyPlan]:
        cfg = self.cfg
        a, b = self.files["A"], self.files["B"]
        c = self.files.get("C")
        vae = self.files.get("VAE")
        discard = re.compile(cfg.discard_weights) if cfg.discard_weights else None
        problems: list[str] = []
        plan: list[KeyPlan] = []

        def dropped(key: str) -> bool:
            return bool((discard and discard.search(key)) or (cfg.prune and key.startswith("model_ema.")))

        vae_hits = 0
        for key in a.keys():
            if dropped(key):
                continue
            ia = a.tensors[key]
            vkey = key[len(VAE_PREFIX):] if key.startswith(VAE_PREFIX) else None
            if vae is not None and vkey is not None and vkey in vae:
                iv = vae.tensors[vkey]
                if iv.shape != ia.shape:
                    problems.append(f"VAE {vkey}: {list(iv.shape)} vs model {list(ia.shape)}")
                vae_hits += 1
                plan.append(KeyPlan(OutputTensor(key, out_dtype(iv.dtype, cfg.save_precision), ia.shape), "copy", "VAE"))
                continue
            copy_a = KeyPlan(OutputTensor(key, out_dtype(ia.dtype, cfg.save_precision), ia.shape), "copy", "A")
            if "model" not in key or key not in b:
                plan.append(copy_a)
                continue
            ib = b.tensors[key]
            if key.endswith("position_ids"):
                plan.append(KeyPlan(copy_a.out, "reset") if cfg.position_ids == "reset" else copy_a)
                continue
            if not (ia.is_float and ib.is_float):
                plan.append(copy_a)  # integer tensors are never interpolated
                continue
            channels = None
            if ia.shape != ib.shape:
                channels = self._channel_subset(key, ia.shape, ib.shape)
                if channels is None:
                    problems.append(f"{key}: A {list(ia.shape)} vs B {list(ib.shape)}")
                    continue
            if c is not None:
                if key not in c:
                    plan.append(copy_a)  # A1111: a key C lacks contributes no difference
                    continue
                if c.tensors[key].shape != ib.shape:
                    problems.append(f"{key}: B {list(ib.shape)} vs C {list(c.tensors[key].shape)}")
                    continue
            w = self.weight_of(key)
            identity = self.method.identity(w)
            if identity == "A" or (identity == "B" and channels is None):
                plan.append(copy_a if identity == "A" else
                            KeyPlan(OutputTensor(key, out_dtype(ib.dtype, cfg.save_precision), ia.shape), "copy", "B"))
                continue
            plan.append(KeyPlan(copy_a.out, "merge", weight=w, channels=channels))
        for key in b.keys():
            if key not in a.tensors and "model" in key and not dropped(key) and not key.endswith("position_ids"):
                ib = b.tensors[key]
                plan.append(KeyPlan(OutputTensor(key, out_dtype(ib.dtype, cfg.save_precision), ib.shape), "copy", "B"))
        if vae is not None and vae_hits == 0:
            problems.insert(0, f"{vae.path}: none of its keys match the checkpoint's VAE (first_stage_model.*); "
                               "expected an LDM-layout VAE file")
        if problems:
            more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
            raise ValueError("the models do not fit together; nothing was written:\n  " + "\n  ".join(problems[:8]) + more)
        return plan

    @staticmethod
    def _channel_subset(key: str, sa: tuple[int, ...], sb: tuple[int, ...]) -> int | None:
        """Inpainting (9 ch) / instruct-pix2pix (8 ch) A with a 4-ch B: merge the shared input channels."""
        if key != CONV_IN or len(sa) != 4 or sa[0] != sb[0] or sa[2:] != sb[2:]:
            return None
        if sb[1] == 4 and sa[1] in (8, 9):
            return 4
        if sa[1] == 4 and sb[1] in (8, 9):
            raise ValueError(f"{key}: B is an inpainting/instruct-pix2pix model; it must be model A")
        return None

    # ---- execution --------------------------------------------------------------------------
    def run(self, reporter: Reporter, stop: StopFlag) -> MergeResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        hashed = [self.files[r] for r in ("A", "B", "C") if r in self.files]
        known = {f.path: cached_sha256(f.path) for f in hashed} if cfg.hash_models else {}
        hashers = self._start_hashes(known)
        # same-length stand-ins, so the header can be rewritten in place once the hashes are known
        placeholder = {f.path: (f"{i:064x}" if cfg.hash_models else None) for i, f in enumerate(hashed)}
        reporter.start(len(self.plan), "merge", unit="tensor")
        try:
            with StreamingWriter(self.output, [p.out for p in self.plan], self._metadata(placeholder)) as writer:
                for item in self.plan:
                    if stop.is_set():
                        raise Stopped
                    self._write_one(item, writer)
                    reporter.advance(1)
                if hashers:
                    writer.flush_async()  # the data goes to disk while the hashes finish
                    known.update({path: remember_sha256(path, h.result()) for path, h in hashers.items()})
                if cfg.hash_models:
                    writer.rewrite_metadata(self._metadata(known))
        except Stopped:
            for h in hashers.values():
                h.cancel()
            reporter.done("")
            return MergeResult(output=None, family=self.family.name, stopped=True)
        except BaseException:
            for h in hashers.values():
                h.cancel()
            raise
        reporter.done("")
        merged = sum(p.action == "merge" for p in self.plan)
        return MergeResult(output=self.output, family=self.family.name, merged=merged, copied=len(self.plan) - merged,
                           bytes_written=writer.total_bytes, seconds=time.perf_counter() - t0, weights=self.weights)

    def _start_hashes(self, known: dict[Path, str | None]) -> dict[Path, ReadAlongHash]:
        """Whole-file hashes of the inputs not in the hash cache, computed from the merge's own reads.

        A file the plan never reads (a weight of 0 or 1 everywhere) is hashed by its own reads from the start.
        """
        read = {p.source for p in self.plan if p.action == "copy"}
        if any(p.action == "merge" for p in self.plan):
            read |= {"A", "B", "C"}
        hashers: dict[Path, ReadAlongHash] = {}
        try:
            for role in ("A", "B", "C"):
                f = self.files.get(role)
                if f is not None and f.path in known and known[f.path] is None and f.path not in hashers:
                    hashers[f.path] = ReadAlongHash(f, follow=role in read)
        except BaseException:
            for h in hashers.values():
                h.cancel()
            raise
        return hashers

    def _write_one(self, item: KeyPlan, writer: StreamingWriter) -> None:
        key, dtype = item.out.name, item.out.dtype
        if item.action == "reset":
            writer.write(torch.arange(item.out.nbytes // dtype.itemsize).to(dtype))
            return
        if item.action == "copy":
            name = key[len(VAE_PREFIX):] if item.source == "VAE" else key
            copy_tensor(self.files[item.source], name, dtype, writer)
            return
        a, b, c = self.files["A"], self.files["B"], self.files.get("C")
        dtypes = {f.tensors[key].dtype for f in (a, b, c) if f is not None}
        native = self.method.exact_in_low_precision and dtypes == {dtype}
        compute = dtype if native else torch.float32
        if item.channels is not None:  # small conv_in tensor: do it whole
            ta, tb = a.read(key).to(torch.float32, copy=True), b.read(key).to(torch.float32, copy=True)
            tc = c.read(key).float() if c is not None else None
            k = item.channels
            ta[:, :k] = self.method.fn(ta[:, :k].clone(), tb, tc, item.weight)
            writer.write(ta.to(dtype))
            return
        for start, n in chunks(a.tensors[key].numel, CHUNK_ELEMENTS):
            ta = a.read(key, start, n).to(compute)
            tb = b.read(key, start, n).to(compute)
            tc = c.read(key, start, n).to(compute) if c is not None else None
            out = writer.buffer(n, dtype)  # a reused buffer: fresh 16 MB blocks would page-fault every chunk
            self.method.fn(ta, tb, tc, item.weight, out=out)
            writer.write(out)

    def _metadata(self, hashes: dict[Path, str | None]) -> dict[str, str]:
        cfg = self.cfg
        roles = {"primary": "A", "secondary": "B", "tertiary": "C"}
        inputs = {name: (self.files[r].path, self.files[r].metadata) for name, r in roles.items() if r in self.files}
        recipe = {
            "type": "loratrain", "interp_method": self.method.a1111_name, "method": self.method.name,
            "multiplier": cfg.alpha, "block_weights": self.weights if cfg.block_mode else None,
            "preset": cfg.preset or None, "base_alpha": self.weights.get(BASE) if cfg.block_mode else None,
            "save_as_half": cfg.save_precision == "fp16", "save_precision": cfg.save_precision,
            "custom_name": self.output.stem, "config_source": 0,
            "bake_in_vae": Path(cfg.vae).name if cfg.vae else "None", "discard_weights": cfg.discard_weights,
            "is_inpainting": any(p.channels and self.files["A"].tensors[CONV_IN].shape[1] == 9 for p in self.plan),
            "is_instruct_pix2pix": any(p.channels and self.files["A"].tensors[CONV_IN].shape[1] == 8 for p in self.plan),
            "position_ids": cfg.position_ids, "prune_ema": cfg.prune,
        }
        meta = merge_metadata(inputs, hashes, recipe)
        a_meta = self.files["A"].metadata
        if CONFIG_METADATA_KEY in a_meta:  # non-standard (e.g. tiny) models need their configs to load offline
            meta[CONFIG_METADATA_KEY] = a_meta[CONFIG_METADATA_KEY]
        return meta

    def close(self) -> None:
        for f in self.files.values():
            f.close()


@job
def run_merge(cfg: MergeConfig, reporter: Reporter, stop: StopFlag) -> MergeResult:
    """Plan the merge from the inputs' headers (every mismatch reported before a byte is written), then stream it.

    reporter: one "merge" phase, a unit per output tensor. stop: checked per tensor; a stopped merge
    writes nothing. Result: the output, tensors merged/copied, bytes, seconds and the block weights used
    (with --list_presets: only the preset table).
    """
    if cfg.list_presets:
        presets = dict(merge_presets())
        if cfg.preset_file:
            from loratrain.core.lora.presets import read_tsv

            presets.update(read_tsv(Path(cfg.preset_file), 25))
        return MergeResult(output=None, presets=presets)
    merge = CheckpointMerge(cfg)
    try:
        with torch_threads(1):  # the arithmetic is trivial; the other cores hash and write
            return merge.run(reporter, stop)
    finally:
        merge.close()
