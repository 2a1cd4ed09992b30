"""LoHa, LoKr and DoRA through PEFT, written in LyCORIS' key layout (what A1111 and ComfyUI load natively).

Why PEFT and not the `lycoris-lora` package: our trainer already injects adapters with PEFT (one code path
for targets, dropout, resume and the diffusers copy), PEFT's LoHa tensors have LyCORIS' exact shapes
(`hada_w?_a` [out, r], `hada_w?_b` [r, in*kh*kw]) and its LoKr the same Kronecker factors, so the file is a
rename, not a conversion; and PEFT is maintained with diffusers. Where the semantics differ we fold the
difference into the tensors: LyCORIS ignores alpha for a LoKr whose factors are both whole matrices, PEFT
still scales by alpha/r, so such a file gets the scale multiplied into `lokr_w2`.
"""
from __future__ import annotations

from typing import Any

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig

from loratrain.core.models.loading import SDModel

from .base import Network, NetworkKind, NetworkSpec, Target, reader_markers, register
from .lora import ADAPTER, PeftLoRANetwork, PeftNetwork, rank_alpha_patterns


class PeftLycorisNetwork(PeftNetwork):
    """A PEFT LyCORIS tuner on sd-scripts' targets; `trained` names its tensors, which are LyCORIS' key suffixes."""

    def _layers(self):
        for part, module in self.parts().items():
            for path, layer in module.named_modules():
                if (part, path) in self._by_path and self._tensors(layer):
                    yield self._by_path[(part, path)], layer

    def _tensors(self, layer: Any) -> dict[str, torch.Tensor]:
        out = {}
        for key in self.trained:
            store = getattr(layer, key, None)
            if isinstance(store, torch.nn.ParameterDict) and ADAPTER in store:
                out[key] = store[ADAPTER]
        return out

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for target, layer in self._layers():
            tensors = {k: v.detach().float().cpu() for k, v in self._tensors(layer).items()}
            alpha = float(target.alpha)
            if self.kind == "lokr" and not any(k.endswith(("_a", "_b")) for k in tensors):
                tensors["lokr_w2"] = tensors["lokr_w2"] * (target.alpha / target.rank)  # readers ignore alpha here
                alpha = float(target.rank)
            for key, value in tensors.items():
                out[f"{target.kohya_name}.{key}"] = value.to(dtype)
            out[f"{target.kohya_name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        return out

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """Start from a LyCORIS file of this kind made for these targets (shapes must match)."""
        loaded = 0
        for target, layer in self._layers():
            tensors = self._tensors(layer)
            found = {k: sd[f"{target.kohya_name}.{k}"] for k in tensors if f"{target.kohya_name}.{k}" in sd}
            if not found:
                continue
            if set(found) != set(tensors):
                raise ValueError(f"{source}: {target.kohya_name} has {sorted(found)}, this {self.kind} network {sorted(tensors)}")
            with torch.no_grad():
                for k, v in found.items():
                    if v.shape != tensors[k].shape:
                        raise ValueError(f"{source}: {target.kohya_name}.{k} is {list(v.shape)}, this run {list(tensors[k].shape)} "
                                         "(set network_dim / conv_dim to the file's)")
                    tensors[k].copy_(v.to(tensors[k].dtype))
                alpha = sd.get(f"{target.kohya_name}.alpha")
                file_scale = float(alpha) / target.rank if alpha is not None else 1.0
                lead = "hada_w1_a" if self.kind == "loha" else "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_a"
                tensors[lead].mul_(file_scale / (target.alpha / target.rank))
            loaded += 1
        if not loaded:
            raise ValueError(f"{source}: no {self.kind} module of this network is in the file")
        return loaded

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise ValueError(f"scale_weight_norms is implemented for LoRA / LoCon / DoRA, not {self.kind}")

    def peft_state_dict(self, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        raise ValueError(f"diffusers (PEFT) files hold LoRA only; a {self.kind} network is saved in LyCORIS' layout")

    def set_multiplier(self, value: float) -> None:
        for target, layer in self._layers():
            layer.scaling[ADAPTER] = value * target.alpha / target.rank

    def args(self) -> dict[str, Any]:
        return {**super().args(), "algo": self.kind}


class PeftLohaNetwork(PeftLycorisNetwork):
    kind = "loha"
    trained = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def peft_config(self, targets: list[Target]) -> LoHaConfig:
        spec = self.spec
        return LoHaConfig(r=spec.network_dim, alpha=spec.network_alpha, target_modules=[t.module_path for t in targets],
                          module_dropout=spec.network_dropout, init_weights=True, **rank_alpha_patterns(targets, spec))


class PeftLokrNetwork(PeftLycorisNetwork):
    kind = "lokr"
    trained = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def peft_config(self, targets: list[Target]) -> LoKrConfig:
        spec = self.spec
        return LoKrConfig(r=spec.network_dim, alpha=spec.network_alpha, target_modules=[t.module_path for t in targets],
                          module_dropout=spec.network_dropout, init_weights=True, **rank_alpha_patterns(targets, spec))


class PeftDoraNetwork(PeftLoRANetwork):
    """LoRA with DoRA's magnitude vector (PEFT `use_dora`), saved with LyCORIS' `dora_scale` [out, 1(, 1, 1)]:
    the per-output-channel norm LyCORIS uses with wd_on_out, which is what PEFT learns."""

    use_dora = True

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = super().kohya_state_dict(dtype)
        for target, layer in self._pairs():
            m = layer.lora_magnitude_vector[ADAPTER].weight.detach().float().cpu()
            base = layer.get_base_layer().weight
            out[f"{target.kohya_name}.dora_scale"] = m.reshape(-1, *([1] * (base.dim() - 1))).to(dtype)
        return out

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """LoRA's pairs, then each module's magnitude from `dora_scale` (a plain LoRA file keeps PEFT's start, ||W||)."""
        loaded = super().load_kohya(sd, source)
        with torch.no_grad():
            for target, layer in self._pairs():
                scale = sd.get(f"{target.kohya_name}.dora_scale")
                if scale is not None:
                    m = layer.lora_magnitude_vector[ADAPTER].weight
                    if scale.numel() != m.numel():
                        raise ValueError(f"{source}: {target.kohya_name}.dora_scale has {scale.numel()} values, this module "
                                         f"{m.numel()} (only per-output-channel DoRA, LyCORIS' wd_on_out, is supported)")
                    m.copy_(scale.reshape(m.shape).to(m.dtype))
        return loaded

    def peft_state_dict(self, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        raise ValueError("the diffusers (PEFT) copy is written for plain LoRA only; DoRA is saved in LyCORIS' layout")

    def args(self) -> dict[str, Any]:
        return {**super().args(), "dora_wd": "True"}


class PeftIa3Network(PeftLycorisNetwork):
    """(IA)^3: one learned scale per input channel of each target, W' = W * (1 + w) on the input side.

    PEFT's IA3 on the input side ("feedforward" modules) scales x before the layer, which leaves the bias alone,
    exactly LyCORIS' `train_on_input`; on the output side PEFT would scale the bias too, so every module is
    trained on the input side and saved with `on_input = 1` and LyCORIS' `weight` = PEFT's scale - 1."""

    kind = "ia3"
    trained = ("ia3_l",)

    def peft_config(self, targets: list[Target]) -> IA3Config:
        paths = [t.module_path for t in targets]
        return IA3Config(target_modules=paths, feedforward_modules=paths, init_ia3_weights=True)

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for target, layer in self._layers():
            scale = layer.ia3_l[ADAPTER].detach().float().cpu().flatten()
            out[f"{target.kohya_name}.weight"] = (scale - 1).to(dtype)
            out[f"{target.kohya_name}.on_input"] = torch.tensor(1, dtype=torch.int64)
        return out

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        loaded = 0
        with torch.no_grad():
            for target, layer in self._layers():
                w = sd.get(f"{target.kohya_name}.weight")
                if w is None:
                    continue
                if not bool(sd.get(f"{target.kohya_name}.on_input", torch.tensor(0)).item()):
                    raise ValueError(f"{source}: {target.kohya_name} scales the output side; this network trains the input side")
                param = layer.ia3_l[ADAPTER]
                param.copy_((w.float() + 1).reshape(param.shape).to(param.dtype))
                loaded += 1
        if not loaded:
            raise ValueError(f"{source}: no (IA)^3 module of this network is in the file")
        return loaded

    def set_multiplier(self, value: float) -> None:
        pass  # (IA)^3 has no scale: its weight is the change itself

    def args(self) -> dict[str, Any]:
        return {"algo": "ia3", "train_on_input": "True"}


def _dora(model: SDModel, spec: NetworkSpec) -> Network:
    """DoRA: LoRA plus a learned magnitude per output channel (weight-decomposed), LyCORIS' `dora_wd=True`."""
    net = PeftDoraNetwork(model, spec)
    net.kind = "dora"
    return net


#: the base weights themselves take part in these kinds' change, so they cannot be stored in fp8
_FP8 = "it needs the base weights themselves in full precision"
# (IA)^3: learned per-channel scales of the weights (LyCORIS' algo=ia3, train_on_input)
register(NetworkKind("ia3", PeftIa3Network, lycoris_algo="ia3", file_markers=reader_markers("ia3"),
                     refuses={"fp8_base": _FP8, "fp8_base_unet": _FP8}), "lycoris.ia3")
# LoHa: the Hadamard product of two low-rank pairs (LyCORIS); conv_dim adds the 3x3 convolutions
register(NetworkKind("loha", PeftLohaNetwork, lycoris_algo="loha", file_markers=reader_markers("loha")), "lycoris.loha")
# LoKr: a Kronecker product of two factors (LyCORIS), the larger one low-rank when network_dim is small
register(NetworkKind("lokr", PeftLokrNetwork, lycoris_algo="lokr", file_markers=reader_markers("lokr")), "lycoris.lokr")
# DoRA: selected by LyCORIS' dora_wd=True on a LoRA, not by an algo= of its own
register(NetworkKind("dora", _dora, lora_args=True, refuses={"fp8_base": _FP8, "fp8_base_unet": _FP8}))
