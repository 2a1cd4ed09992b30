"""LoRA and LoCon through PEFT: y = Wx + (alpha/rank) * up(down(x)), conv down keeps the kernel."""
from __future__ import annotations

import re
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from loratrain.core.models.loading import SDModel

from .base import Network, NetworkKind, NetworkSpec, Target, find_targets, register
from .blocks import block_index, lr_weights

ADAPTER = "loratrain"


def rank_alpha_patterns(targets: list[Target], spec: NetworkSpec) -> dict[str, dict[str, float]]:
    """PEFT's per-module rank and alpha overrides for the targets whose rank/alpha differ from the spec's (conv_dim)."""
    return {"rank_pattern": {re.escape(t.module_path): t.rank for t in targets if t.rank != spec.network_dim},
            "alpha_pattern": {re.escape(t.module_path): t.alpha for t in targets if t.alpha != spec.network_alpha}}


class PeftNetwork(Network):
    """Adapters PEFT injects on sd-scripts' targets, one config per model part; resume state is PEFT's state dict.

    Subclasses say which config (`peft_config`) and which parameter names train (`trained`)."""

    trained: tuple[str, ...] = ()

    def __init__(self, model: SDModel, spec: NetworkSpec) -> None:
        super().__init__(model, spec, find_targets(model, spec))
        if not self.targets:
            raise ValueError("no modules to train: enable the UNet and/or the text encoder")
        for part, module in self.parts().items():
            inject_adapter_in_model(self.peft_config([t for t in self.targets if t.part == part]), module, adapter_name=ADAPTER)
            for name, p in module.named_parameters():
                p.requires_grad_(ADAPTER in name and any(k in name for k in self.trained))
        self._by_path = {(t.part, t.module_path): t for t in self.targets}

    def peft_config(self, targets: list[Target]) -> Any:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for part, module in self.parts().items():
            for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items():
                out[f"{part}.{k}"] = v.detach().clone()
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for part, module in self.parts().items():
            mine = {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
            result = set_peft_model_state_dict(module, mine, adapter_name=ADAPTER)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"saved network does not fit this model ({part}: unexpected {unexpected[:2]})")


class PeftLoRANetwork(PeftNetwork):
    kind = "lora"
    use_dora = False
    trained = ("lora_",)  # lora_A, lora_B (and DoRA's lora_magnitude_vector)

    def peft_config(self, targets: list[Target]) -> LoraConfig:
        spec = self.spec
        return LoraConfig(r=spec.network_dim, lora_alpha=spec.network_alpha, lora_dropout=spec.network_dropout,
                          init_lora_weights=True, use_dora=self.use_dora, target_modules=[t.module_path for t in targets],
                          **rank_alpha_patterns(targets, spec))

    def __init__(self, model: SDModel, spec: NetworkSpec) -> None:
        super().__init__(model, spec)
        if spec.rank_dropout or spec.module_dropout:
            self._install_dropouts(spec.rank_dropout, spec.module_dropout)

    def _install_dropouts(self, p_rank: float, p_module: float) -> None:
        """sd-scripts' rank_dropout (each rank of the down output, per sample, kept ones scaled 1/(1-p)) and
        module_dropout (the whole adapter skipped for a forward), in training mode only. They draw from torch's
        global generator, which the trainer seeds per micro-batch, so a resumed run drops the same."""
        def rank_hook(mod: torch.nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            if not mod.training:
                return out
            rank = out.shape[1] if out.dim() == 4 else out.shape[-1]
            keep = (torch.rand((out.shape[0], rank), device=out.device) > p_rank).to(out.dtype) / (1.0 - p_rank)
            shape = (out.shape[0], rank, 1, 1) if out.dim() == 4 else (out.shape[0],) + (1,) * (out.dim() - 2) + (rank,)
            return out * keep.view(shape)

        def module_hook(mod: torch.nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            return out * 0 if mod.training and float(torch.rand(())) < p_module else out

        for _, layer in self._pairs():
            if p_rank:
                layer.lora_A[ADAPTER].register_forward_hook(rank_hook)
            if p_module:
                layer.lora_B[ADAPTER].register_forward_hook(module_hook)

    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        """sd-scripts' groups: with down/mid/up_lr_weight one UNet group per block at lr x its weight
        ("unet_block7"), with LoRA+ the up (B) matrices apart at lr x ratio ("..._plus")."""
        spec, sdxl = self.spec, self.model.family.is_sdxl
        weights = lr_weights(spec.blocks, sdxl)
        if weights is None and not (spec.loraplus_unet or spec.loraplus_text_encoder):
            return super().param_groups(lrs)
        groups: dict[str, dict[str, Any]] = {}
        for target, layer in self._pairs():
            name, lr = target.part, lrs[target.part]
            if target.part == "unet" and weights is not None:
                index = block_index(target.kohya_name, sdxl)
                name, lr = f"unet_block{index}", lr * weights[index]
            ratio = spec.loraplus_unet if target.part == "unet" else spec.loraplus_text_encoder
            for pname, p in layer.named_parameters():
                if not p.requires_grad:
                    continue
                plus = bool(ratio) and ".lora_B." in f".{pname}"
                key = name + ("_plus" if plus else "")
                groups.setdefault(key, {"params": [], "lr": lr * (ratio if plus else 1.0), "name": key})["params"].append(p)
        return list(groups.values())

    def _pairs(self):
        for part, module in self.parts().items():
            for path, layer in module.named_modules():
                if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
                    yield self._by_path[(part, path)], layer

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for target, layer in self._pairs():
            out[f"{target.kohya_name}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype)
            out[f"{target.kohya_name}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype)
            out[f"{target.kohya_name}.alpha"] = torch.tensor(float(target.alpha), dtype=dtype)
        return out

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """Start from a kohya-layout LoRA file (ours, sd-scripts', any trainer's): returns the modules loaded.

        Ranks must match (the message says which dim to set). A file alpha that differs from this
        run's is folded into `up`, so the loaded LoRA changes the model exactly as the file does.
        """
        names = {t.kohya_name for t, _ in self._pairs()}
        modules = {k.rsplit(".", 2)[0] for k in sd if k.endswith((".lora_down.weight", ".lora_up.weight"))}
        extra = sorted(modules - names)
        if extra:
            raise ValueError(f"{source}: {len(extra)} module(s) of the file are not in this network (e.g. {extra[0]}); "
                             "match network_module / conv_dim / network_train_*_only to the file")
        loaded = 0
        for target, layer in self._pairs():
            down, up = sd.get(f"{target.kohya_name}.lora_down.weight"), sd.get(f"{target.kohya_name}.lora_up.weight")
            if down is None or up is None:
                continue
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if down.shape != a.shape or up.shape != b.shape:
                raise ValueError(f"{source}: {target.kohya_name} has rank {down.shape[0]}, this run {a.shape[0]} "
                                 f"(set network_dim{' / conv_dim' if down.dim() == 4 and down.shape[-1] > 1 else ''} "
                                 f"to {down.shape[0]})")
            alpha = sd.get(f"{target.kohya_name}.alpha")
            file_scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
            with torch.no_grad():
                a.copy_(down.to(a.dtype))
                b.copy_((up.float() * (file_scale / (target.alpha / target.rank))).to(b.dtype))
            loaded += 1
        return loaded

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """sd-scripts' --scale_weight_norms: shrink each module whose delta (alpha/rank * up @ down) has a
        Frobenius norm above `max_norm` back to it, splitting the factor evenly between up and down.

        Returns (modules scaled, mean and max delta norm after scaling), which sd-scripts logs.
        """
        scaled, norms = 0, []
        for target, layer in self._pairs():
            down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            delta = (up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)) * (target.alpha / target.rank)
            norm = delta.norm().clamp(min=max_norm / 2)
            ratio = float(norm.clamp(max=max_norm) / norm)
            if ratio != 1.0:
                scaled += 1
                up.mul_(ratio ** 0.5)
                down.mul_(ratio ** 0.5)
            norms.append(float(delta.norm()) * ratio)
        return scaled, sum(norms) / max(1, len(norms)), max(norms, default=0.0)

    def peft_state_dict(self, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for target, layer in self._pairs():
            part = out.setdefault(target.part, {})
            part[f"{target.module_path}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype)
            part[f"{target.module_path}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype)
        return out

    def set_multiplier(self, value: float) -> None:
        for target, layer in self._pairs():
            layer.scaling[ADAPTER] = value * target.alpha / target.rank


register(NetworkKind("lora", PeftLoRANetwork, metadata_module="networks.lora", lycoris_algo="lora", lora_args=True,
                     reads_dims=True), "networks.lora", "lycoris.kohya")


def _locon(model: SDModel, spec: NetworkSpec) -> Network:
    """LoRA on the convolutions too; conv_dim defaults to network_dim as LyCORIS' LoCon does."""
    if not spec.conv_dim:
        spec = NetworkSpec(**{**spec.__dict__, "conv_dim": spec.network_dim,
                              "conv_alpha": spec.conv_alpha if spec.conv_alpha is not None else spec.network_alpha})
    net = PeftLoRANetwork(model, spec)
    net.kind = "locon"
    return net


register(NetworkKind("locon", _locon, metadata_module="networks.lora", lycoris_algo="locon", lora_args=True, reads_dims=True),
         "lycoris.locon")


class DyLoRANetwork(PeftLoRANetwork):
    """DyLoRA (sd-scripts' networks.dylora, unit=N): one LoRA whose first R components, for every R = unit,
    2*unit, ... dim, work as a LoRA of rank R. Each step, each module trains at a random rank b (from the step's
    seed, so a resumed run draws the same): the forward uses only its first b components, scaled alpha/b, and
    only the newest block b-unit..b learns (the earlier ones are held, as in the DyLoRA paper). Evaluation and
    saving use the full rank. `lora resize --dylora_rank R` cuts the file."""

    def __init__(self, model: SDModel, spec: NetworkSpec) -> None:
        super().__init__(model, spec)
        self.kind, self.unit = "dylora", spec.unit
        self.step_ranks: list[int] = []  # this step's rank of each module (drawn in begin_step)
        self.forced_rank: int | None = None  # evaluate every module at this rank (tests, previews of a cut)
        self.module_ranks = []
        for index, (target, layer) in enumerate(self._pairs()):
            self.module_ranks.append(target.rank)
            self._patch(layer, target.rank, index)

    def _rank(self, rank: int, index: int) -> int | None:
        if self.forced_rank is not None:
            return min(self.forced_rank, rank)
        return self.step_ranks[index] if self.step_ranks else None

    def _patch(self, layer, rank: int, index: int) -> None:  # noqa: ANN001
        import torch.nn.functional as F

        a_mod, b_mod = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        chosen: dict[str, int] = {}
        net = self

        def rows(w: torch.Tensor, b: int, dim: int) -> torch.Tensor:
            keep = w.narrow(dim, 0, b)
            if net.forced_rank is not None or b <= net.unit:
                return keep
            return torch.cat([keep.narrow(dim, 0, b - net.unit).detach(), keep.narrow(dim, b - net.unit, net.unit)], dim)

        def forward_a(x: torch.Tensor) -> torch.Tensor:
            b = net._rank(rank, index) if a_mod.training or net.forced_rank is not None else None
            chosen["b"] = b or 0  # 0: the full, plain forward (evaluation, saving, sampling)
            if not b:
                return type(a_mod).forward(a_mod, x)
            w = rows(a_mod.weight, b, 0)
            if isinstance(a_mod, torch.nn.Conv2d):
                return F.conv2d(x, w, None, a_mod.stride, a_mod.padding, a_mod.dilation, a_mod.groups)
            return F.linear(x, w)

        def forward_b(h: torch.Tensor) -> torch.Tensor:
            b = chosen.get("b", 0)
            if not b:
                return type(b_mod).forward(b_mod, h)
            w = rows(b_mod.weight, b, 1)
            out = F.conv2d(h, w, None, b_mod.stride, b_mod.padding) if isinstance(b_mod, torch.nn.Conv2d) else F.linear(h, w)
            return out * (rank / b)  # alpha/b instead of PEFT's alpha/rank

        a_mod.forward, b_mod.forward = forward_a, forward_b

    def begin_step(self, seed: int) -> None:
        """Each module's rank for this step, from the step's seed (a resumed run draws the same)."""
        g = torch.Generator().manual_seed(seed % (2 ** 63))
        self.step_ranks = [int(torch.randint(1, r // self.unit + 1, (1,), generator=g)) * self.unit for r in self.module_ranks]

    def args(self) -> dict:
        return {**super().args(), "unit": str(self.unit)}


def _dylora_checks(cfg: Any) -> list[tuple[str, str]]:
    """Each rank DyLoRA trains is a multiple of its unit, so the full ranks must be multiples too."""
    return [(name, f"{value} must be a multiple of the DyLoRA unit {cfg.dylora_unit}")
            for name in ("network_dim", "conv_dim") if (value := getattr(cfg, name)) and value % cfg.dylora_unit]


register(NetworkKind("dylora", DyLoRANetwork, metadata_module="networks.dylora", lycoris_algo="dylora", lora_args=True,
                     own_options=("dylora_unit",), checks=_dylora_checks), "networks.dylora", "lycoris.dylora")
