"""`lora resize`: reduce a LoRA's rank by SVD (sd-scripts' resize_lora.py), to a fixed rank or per module by a
dynamic rule, keeping each module's alpha/rank scale so the file reads like the original."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratrain.core.jobs import JobResult, job
from loratrain.core.lora.files import LoraModule, read_lora
from loratrain.core.precision import dtype_of
from loratrain.core.progress import Reporter, StopFlag
from loratrain.core.safe_io import new_output, save_safetensors

from .config import LoraResizeConfig


def keep_rank(s: torch.Tensor, limit: int, method: str, param: float | None) -> int:
    """How many singular values (sorted, largest first) a module keeps under `method`, at most `limit`."""
    if method == "sv_ratio":
        n = int((s >= s[0] / param).sum())
    elif method == "sv_fro":
        share = torch.sqrt(torch.cumsum(s ** 2, 0) / (s ** 2).sum().clamp(min=1e-30))
        n = int((share < param - 1e-7).sum()) + 1
    elif method == "sv_cumulative":
        share = torch.cumsum(s, 0) / s.sum().clamp(min=1e-30)
        n = int((share < param - 1e-7).sum()) + 1
    else:
        n = limit
    return max(1, min(n, limit, s.numel()))


@dataclass
class LoraResizeResult(JobResult):
    output: Path | None
    ranks: dict[str, int] = field(default_factory=dict)
    fro_kept: float = 1.0  # mean share of each module's Frobenius norm the new ranks keep

    def summary(self) -> list[str]:
        if self.stopped:
            return ["stopped; nothing was written"]
        ranks = sorted(set(self.ranks.values()))
        return [f"wrote {self.output}: {len(self.ranks)} modules, rank {ranks[0]}-{ranks[-1]}, "
                f"mean Frobenius share kept {self.fro_kept:.4f}"]


@job
def run_lora_resize(cfg: LoraResizeConfig, reporter: Reporter, stop: StopFlag) -> LoraResizeResult:
    """Each module's delta (alpha/rank * up @ down) re-factorised by SVD to the new rank; the kept Frobenius share
    is reported per file (and per module in the metadata). stop is checked per module; a stopped resize writes
    nothing. Only LoRA / LoCon files: a LyCORIS kind has no up/down to cut."""
    out = new_output(cfg.output, cfg.overwrite)
    modules, meta = read_lora(cfg.model)
    odd = [m for m in modules.values() if not isinstance(m, LoraModule)]
    if odd:
        raise ValueError(f"{cfg.model}: module {odd[0].name} is {odd[0].kind}; `lora resize` works on LoRA / LoCon files")
    dtype = dtype_of(cfg.save_precision)
    if cfg.dylora_rank:
        return _dylora_cut(cfg, modules, meta, out, dtype, reporter)
    result: dict[str, torch.Tensor] = {}
    ranks, shares = {}, []
    reporter.start(len(modules), "resize", unit="module")
    for name, m in modules.items():
        if stop.is_set():
            return LoraResizeResult(output=None, stopped=True)
        up = m.up.float().reshape(m.up.shape[0], -1)
        down = m.down.float().reshape(m.rank, -1)
        # SVD of up @ down through two thin QRs: only an r x r matrix is decomposed, exactly, whatever the layer size
        qu, ru = torch.linalg.qr(up)
        qd, rd = torch.linalg.qr(down.T)
        us, s, vhs = torch.linalg.svd(ru @ rd.T)
        u, vh = qu @ us, vhs @ qd.T
        is_3x3 = m.down.dim() == 4 and tuple(m.down.shape[2:]) != (1, 1)
        limit = min((cfg.new_conv_rank or cfg.new_rank) if is_3x3 else cfg.new_rank, m.rank)
        r = keep_rank(s, limit, cfg.dynamic_method, cfg.dynamic_param)
        shares.append(float(torch.sqrt((s[:r] ** 2).sum() / (s ** 2).sum().clamp(min=1e-30))))
        new_up, new_down = u[:, :r] * s[:r], vh[:r]
        if m.down.dim() == 4:
            new_up, new_down = new_up.reshape(-1, r, 1, 1), new_down.reshape(r, *m.down.shape[1:])
        result[f"{name}.lora_down.weight"] = new_down.contiguous().to(dtype)
        result[f"{name}.lora_up.weight"] = new_up.contiguous().to(dtype)
        result[f"{name}.alpha"] = torch.tensor(m.scale * r, dtype=dtype)  # the same alpha/rank scale as before
        ranks[name] = r
        reporter.advance(1)
    out_meta = dict(meta)
    out_meta.update({"ss_network_dim": str(max(ranks.values())), "ss_network_alpha": str(max(float(result[f"{n}.alpha"]) for n in ranks)),
                     "loratrain.resize": json.dumps({"from": Path(cfg.model).name, "new_rank": cfg.new_rank,
                                                     "dynamic_method": cfg.dynamic_method or None, "dynamic_param": cfg.dynamic_param,
                                                     "mean_fro_kept": round(sum(shares) / len(shares), 6)})})
    if cfg.dynamic_method:
        out_meta["ss_network_args"] = json.dumps({"dynamic_method": cfg.dynamic_method, "dynamic_param": str(cfg.dynamic_param)})
    save_safetensors(result, out, out_meta)
    reporter.done("")
    return LoraResizeResult(output=out, ranks=ranks, fro_kept=sum(shares) / len(shares))


def _dylora_cut(cfg: LoraResizeConfig, modules: dict[str, LoraModule], meta: dict[str, str], out: Path, dtype: torch.dtype,
                reporter: Reporter) -> LoraResizeResult:
    """The first R components of every module, alpha kept (sd-scripts' extract_lora_from_dylora.py): a DyLoRA
    trained each rank R at scale alpha/R, so the cut is the LoRA it learned at that rank."""
    r = cfg.dylora_rank
    unit = int(json.loads(meta.get("ss_network_args") or "{}").get("unit", 1))
    if r % unit:
        raise ValueError(f"{cfg.model}: a DyLoRA with unit {unit} is cut at multiples of {unit}, not {r}")
    small = [m.name for m in modules.values() if m.rank < r]
    if small:
        raise ValueError(f"{cfg.model}: module {small[0]} has rank {modules[small[0]].rank}, below --dylora_rank {r}")
    result: dict[str, torch.Tensor] = {}
    reporter.start(len(modules), "cut", unit="module")
    for name, m in modules.items():
        result[f"{name}.lora_down.weight"] = m.down[:r].contiguous().to(dtype)
        result[f"{name}.lora_up.weight"] = m.up[:, :r].contiguous().to(dtype)
        result[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
        reporter.advance(1)
    out_meta = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(r),
                "loratrain.resize": json.dumps({"from": Path(cfg.model).name, "dylora_rank": r})}
    out_meta.pop("ss_network_args", None)
    save_safetensors(result, out, out_meta)
    reporter.done("")
    return LoraResizeResult(output=out, ranks={n: r for n in modules}, fro_kept=float("nan"))
