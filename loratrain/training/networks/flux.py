"""`networks.lora_flux`: sd-scripts' FLUX.1 LoRA (core/lora/flux_network.py) behind the trainer's Network interface.

Why a wrapper: the training loop, resume states and saving talk to a `Network` (parts, parameter groups, state dict,
kohya file); FLUX's LoRA is a hook-based module on our BFL-layout transformer, not PEFT on a UNet, so this class
answers those calls for it. Built by the FLUX trainer (training/flux_trainer.py); registered so `--network_module
networks.lora_flux` is a known name and the file's `ss_network_module` is sd-scripts' own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loratrain.core.errors import ConfigError
from loratrain.core.lora.flux_network import FluxLoraNetwork, kohya_flux_state_dict, load_kohya_flux_state_dict
from loratrain.core.lora.keys import te_lora_name

from .base import TE_CONTAINERS, Network, NetworkKind, NetworkSpec, Target, _children, register
from .lora import ADAPTER, PeftLoRANetwork, inject_adapter_in_model
from .lycoris import PeftDoraNetwork, PeftLohaNetwork, PeftLokrNetwork

#: sd-scripts' lora_flux / lora_sd3 TEXT_ENCODER_TARGET_REPLACE_MODULE: the CLIP classes and T5's attention and gated MLP
FLOW_TE_CONTAINERS = TE_CONTAINERS | {"T5Attention", "T5DenseGatedActDense"}


class _FlowTextEncoders:
    """The text-encoder half of a FLUX.1 / SD3 network: the SD trainer's PEFT network of the run's kind (lora.py,
    lycoris.py) on transformers' CLIP / T5, with sd-scripts' lora_flux / lora_sd3 names (`lora_te1_text_model_...`
    CLIP-L, `lora_te2_...` CLIP-G, `lora_te3_encoder_block_...` T5; LyCORIS' kohya wrapper names them the same). Why a
    mixin: the SD network finds its encoders through an SDModel's family; here the trainer hands over the encoders
    (component, kohya prefix, module) that train, and the rest (PEFT injection, resume state, kohya save / load,
    multiplier) is the SD network's own code for that kind."""

    def __init__(self, encoders: list[tuple[str, str, nn.Module]], spec: NetworkSpec) -> None:
        targets = []
        for component, prefix, module in encoders:
            for path in _children(module, FLOW_TE_CONTAINERS, False):
                # CLIP: the SD trainer's naming (text_model.* as in transformers 4 and the files, whichever
                # transformers built the model); T5: its path as it is
                clip = type(module).__name__.startswith("CLIP")
                name = te_lora_name(prefix, path) if clip else f"{prefix}_{path.replace('.', '_')}"
                targets.append(Target(component, path, name, spec.network_dim, spec.network_alpha))
        Network.__init__(self, None, spec, targets)  # type: ignore[arg-type]
        self._modules_by_part = {component: module for component, _, module in encoders}
        for part, module in self.parts().items():
            inject_adapter_in_model(self.peft_config([t for t in targets if t.part == part]), module, adapter_name=ADAPTER)
            for name, p in module.named_parameters():
                p.requires_grad_(ADAPTER in name and any(k in name for k in self.trained))
        self._by_path = {(t.part, t.module_path): t for t in targets}

    def parts(self) -> dict[str, nn.Module]:
        return {p: m for p, m in self._modules_by_part.items() if any(t.part == p for t in self.targets)}

    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        return Network.param_groups(self, lrs)  # one group per encoder at its text_encoder_lr (no block lrs / LoRA+)


class FlowTextEncoderLoRA(_FlowTextEncoders, PeftLoRANetwork):
    pass


class FlowTextEncoderLoHa(_FlowTextEncoders, PeftLohaNetwork):
    pass


class FlowTextEncoderLoKr(_FlowTextEncoders, PeftLokrNetwork):
    pass


class FlowTextEncoderDoRA(_FlowTextEncoders, PeftDoraNetwork):
    pass


#: the text-encoder network of each kind a FLUX.1 / SD3 run trains (the transformer's is core/lora/hooked_kinds.py)
FLOW_TEXT_ENCODERS = {"lora": FlowTextEncoderLoRA, "loha": FlowTextEncoderLoHa, "lokr": FlowTextEncoderLoKr,
                      "dora": FlowTextEncoderDoRA}


class FluxNetwork(Network):
    kind = "lora_flux"

    def __init__(self, net: FluxLoraNetwork, spec: NetworkSpec, network_args: dict[str, str],
                 te: FlowTextEncoderLoRA | None = None) -> None:
        self.model, self.spec, self.net, self._args, self.te = None, spec, net, network_args, te
        if net.kind != "lora":  # LyCORIS on the same modules: ss_network_module lycoris.kohya, algo= in the args
            self.kind = net.kind
        self.diffusers_copy = False  # --save_diffusers_layout (set by the FLUX trainer)
        self.targets = [Target("unet", path, name, m.rank, m.alpha) for (name, path), m in zip(net.paths.items(), net.lora.values())]
        self.targets += te.targets if te is not None else []

    def parts(self) -> dict[str, nn.Module]:
        return {"unet": self.net, **(self.te.parts() if self.te is not None else {})}

    def param_groups(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        """The transformer's group, then one per trained text encoder at its text_encoder_lr (sd-scripts' order)."""
        groups = [{"params": list(self.net.parameters()), "lr": lrs["unet"], "name": "unet"}]
        return groups + (self.te.param_groups(lrs) if self.te is not None else [])

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"unet.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}
        return {**out, **({k: v.contiguous() for k, v in self.te.state_dict().items()} if self.te is not None else {})}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        te_keys = {k for k in sd if not k.startswith("unet.")}
        if bool(te_keys) != (self.te is not None):
            raise ConfigError("the training state does not match this LoRA: it was saved "
                              f"{'with' if te_keys else 'without'} text-encoder modules (network_train_unet_only, "
                              "train_t5xxl)")
        try:
            self.net.load_state_dict({k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}, strict=True)
            if self.te is not None:
                self.te.load_state_dict({k: sd[k] for k in te_keys})
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"the training state does not match this LoRA (other network_args?): {e}") from None

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {**self._unet_kohya(dtype), **(self.te.kohya_state_dict(dtype) if self.te is not None else {})}

    def _unet_kohya(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return kohya_flux_state_dict(self.net, dtype)

    def _load_te(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """The file's lora_te* modules into the text-encoder LoRA (0 when it has none). A file with text-encoder
        modules this run does not train (network_train_unet_only, no train_t5xxl, Chroma) is refused by name."""
        te = {k: v for k, v in sd.items() if k.startswith("lora_te")}
        if not te:
            return 0
        if self.te is None:
            raise ConfigError(f"network_weights: {source} holds text-encoder modules ({min(te)}), but this run trains "
                              "the transformer only (drop network_train_unet_only; train_t5xxl for lora_te3)")
        try:
            return self.te.load_kohya(te, source)
        except ValueError as e:
            raise ConfigError(f"network_weights: {e}") from None

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """`--network_weights`: our kohya layout, or the diffusers / PEFT, SimpleTuner, ai-toolkit and ComfyUI layouts
        (converted with the same ΔW by core/lora/flux_layouts.py; SimpleTuner keeps its alphas in the header)."""
        from loratrain.core.lora.flux_layouts import flux_lora_to_kohya
        from loratrain.core.weights import read_safetensors_metadata

        meta = read_safetensors_metadata(source) if source.endswith(".safetensors") else {}
        kohya = flux_lora_to_kohya(sd, meta, source)
        load_kohya_flux_state_dict(self.net, {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}, source)
        return len(self.net.lora) + self._load_te(kohya, source)

    def save(self, path: Any, precision: str, metadata: dict[str, str], peft_copy: bool = False) -> Any:
        """The kohya file, and with `diffusers_copy` its diffusers-layout twin (`<name>.diffusers.safetensors`)."""
        out = super().save(path, precision, metadata, False)
        if self.diffusers_copy:
            from loratrain.core.precision import dtype_of

            self._write_diffusers(self._unet_kohya(dtype_of(precision)), out.with_name(out.stem + ".diffusers.safetensors"),
                                  metadata)
        return out

    def _write_diffusers(self, sd: dict[str, torch.Tensor], path: Any, metadata: dict[str, str]) -> None:
        from loratrain.core.lora.flux_layouts import save_diffusers_layout

        save_diffusers_layout(sd, path, metadata)

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise ConfigError("scale_weight_norms is not implemented for FLUX.1 yet")

    def set_multiplier(self, value: float) -> None:
        self.net.set_multiplier(value)
        if self.te is not None:
            self.te.set_multiplier(value)

    def args(self) -> dict[str, Any]:
        return dict(self._args)


def _not_for_sd(model: Any, spec: NetworkSpec) -> Network:
    raise ConfigError("network_module networks.lora_flux trains FLUX.1 models; this base model is SD1/SD2/SDXL (use lora)")


register(NetworkKind("lora_flux", _not_for_sd, metadata_module="networks.lora_flux",
                      file_markers=(".lora_down.weight", ".lora_A.weight")),  # kohya, or diffusers' PEFT layout
         "networks.lora_flux")
