"""Full fine-tuning (DreamBooth and plain fine-tune) as a "network" of the trainer: every UNet weight, and the
text encoder(s) unless `network_train_unet_only`, train directly; saves are single-file LDM checkpoints.

Being one more registry entry means the whole training loop (data, buckets, noise and loss options, schedules,
optimizers, resume, samples, TensorBoard, data parallel) is the LoRA trainer's, unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loratrain.core.models.loading import SDModel

from .base import Network, NetworkKind, NetworkSpec, Target, register


class FullNetwork(Network):
    kind = "full"

    def __init__(self, model: SDModel, spec: NetworkSpec) -> None:
        targets = [Target("unet", "", "unet", 0, 0.0)] if spec.train_unet else []
        if spec.train_text_encoder:
            targets += [Target(te.component, "", te.component, 0, 0.0) for te in model.family.text_encoders]
        super().__init__(model, spec, targets)
        if not targets:
            raise ValueError("nothing to train: enable the UNet and/or the text encoder")
        self.stop_text_encoder_after = spec.stop_text_encoder_after  # steps; 0 = train them to the end
        self.steps = 0
        self.diffusers_written: set[Path] = set()  # save_diffusers folders this run wrote (each may be saved again)
        for module in self.parts().values():
            module.requires_grad_(True)
        self.ema = None
        if spec.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema_params = [p for m in self.parts().values() for p in m.parameters()]
            self.ema = EMAModel(self.ema_params, decay=spec.ema_decay)
            self.ema_on_cpu = spec.ema_on_cpu
            if spec.ema_on_cpu:
                self.ema.to("cpu")

    def end_step(self) -> None:
        """EMA of every trained weight (diffusers' EMAModel and its decay warm-up); with ema_on_cpu the shadow
        weights live in CPU memory and each step's weights are copied there."""
        if self.ema is None:
            return
        params = self.ema_params
        if self.ema_on_cpu and params and params[0].device.type != "cpu":
            params = [p.detach().to("cpu").requires_grad_(p.requires_grad) for p in params]
        self.ema.step(params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"{part}.{k}": v.detach().clone() for part, m in self.parts().items() for k, v in m.state_dict().items()}
        out["loratrain.steps"] = torch.tensor(self.steps)
        if self.ema is not None:
            out.update({f"loratrain.ema.{i}": t.detach().clone() for i, t in enumerate(self.ema.shadow_params)})
            out["loratrain.ema_step"] = torch.tensor(self.ema.optimization_step)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.steps = int(sd.get("loratrain.steps", torch.tensor(0)))
        if self.ema is not None and "loratrain.ema_step" in sd:
            with torch.no_grad():
                for i, t in enumerate(self.ema.shadow_params):
                    t.copy_(sd[f"loratrain.ema.{i}"].to(t.device, t.dtype))
            self.ema.optimization_step = int(sd["loratrain.ema_step"])
        for part, module in self.parts().items():
            mine = {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
            missing, unexpected = module.load_state_dict(mine, strict=False)
            if unexpected or missing:
                raise ValueError(f"saved weights do not fit this model ({part}: {(unexpected or missing)[:2]})")
        self._freeze_text_encoders_if_due()

    def begin_step(self, seed: int) -> None:
        self.steps += 1
        self._freeze_text_encoders_if_due()

    def _freeze_text_encoders_if_due(self) -> None:
        """--stop_text_encoder_training N: after N steps the text encoders keep their weights (grads stay None, so
        the optimizer skips them)."""
        if self.stop_text_encoder_after and self.steps > self.stop_text_encoder_after:
            for part, module in self.parts().items():
                if part != "unet":
                    module.requires_grad_(False)
                    for p in module.parameters():
                        p.grad = None

    def save(self, path: Path, precision: str, metadata: dict[str, str], peft_copy: bool = False) -> Path:
        """The whole model as one LDM / A1111 single-file checkpoint (what A1111, ComfyUI and diffusers'
        from_single_file read), written atomically; with save_diffusers also as a diffusers folder beside it
        (`<name>/`, what from_pretrained reads)."""
        from loratrain.core.models.single_file import configs_metadata, join_checkpoint
        from loratrain.core.models.tiny import components_state
        from loratrain.core.precision import dtype_of
        from loratrain.core.safe_io import save_safetensors

        dtype = dtype_of(precision)
        if self.ema is not None:  # the averaged weights are what is saved; training goes on with the raw ones
            self.ema.store(self.ema_params)
            self.ema.copy_to(self.ema_params)
        try:  # copies, taken while the EMA weights are in place (state_dict tensors are the parameters themselves)
            flat = join_checkpoint(components_state(self.model), self.model.family, self.model.configs)
            flat = {k: (v.detach().to("cpu", dtype, copy=True) if v.is_floating_point() else v.detach().to("cpu", copy=True))
                    .contiguous() for k, v in flat.items()}
            if self.spec.save_diffusers:  # sd-scripts' save_model_as diffusers: the same weights as a pipeline folder
                from loratrain.core.models.diffusers_folder import save_diffusers_folder

                folder = path.with_suffix("")  # replaced when this run wrote it, or an earlier run's with --overwrite/--resume
                save_diffusers_folder(self.model, folder, dtype, replace=folder in self.diffusers_written or self.spec.replace_diffusers)
                self.diffusers_written.add(folder)
        finally:
            if self.ema is not None:
                self.ema.restore(self.ema_params)
        keep = {k: v for k, v in metadata.items() if k.startswith(("modelspec.", "ss_training_comment", "ss_output_name"))}
        extra = {"loratrain.ema_decay": str(self.ema.decay)} if self.ema is not None else {}
        save_safetensors(flat, path, {**keep, **configs_metadata(self.model.configs), "loratrain.full_finetune": "1", **extra})
        return path

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise ValueError("a full fine-tune saves a checkpoint; `lora extract` against the base gives a LoRA of it")

    def load_kohya(self, sd: dict[str, torch.Tensor], source: str) -> int:
        raise ValueError(f"{source}: network_weights (a LoRA) cannot start a full fine-tune; start from a checkpoint instead")

    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        raise ValueError("scale_weight_norms applies to LoRA networks, not a full fine-tune")

    def peft_state_dict(self, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        raise ValueError("a full fine-tune has no PEFT adapter to save")

    def set_multiplier(self, value: float) -> None:
        pass

    def args(self) -> dict[str, Any]:
        return {}


_FP8 = "it needs the base weights themselves in full precision"
# no file_markers: a full fine-tune starts from a checkpoint (or its own training state), never from a network file
register(NetworkKind("full", FullNetwork, file_markers=(), refuses={"fp8_base": _FP8, "fp8_base_unet": _FP8}), "finetune")
