"""FLUX.1 full fine-tuning (`--network_module full` with a FLUX.1 model), optionally sharded with `--fsdp`.

Why a subclass of the FLUX LoRA trainer: the data, conditioning, flow-matching loss, loop, schedules and resume are
the same; what differs is what trains (the transformer's own weights, in fp32 unless full_bf16, as sd-scripts'
flux_train.py; the text encoders stay frozen, their outputs cached), what a save writes (the whole transformer,
networks/flux_full.py) and, with `--fsdp` and several processes, that the transformer is sharded (training/fsdp.py):
a save then gathers the weights and optimizer state, which every process must take part in, so saving is done here
rather than by the first process alone.

The training state holds the full weights and the optimizer state keyed by parameter name (torch.distributed.checkpoint's
full state dicts), the same with and without sharding: a run resumes bit-identically from it, sharded or not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loratrain.core.errors import ConfigError

from .flux_memory import adapter_dtype
from .flux_trainer import FluxLoRATrainer
from .networks.base import NetworkSpec
from .networks.flux_full import FluxFullNetwork
from .saving import save_state


class _Held:
    """An already gathered state for save_state, which asks its arguments for `state_dict()`."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd


class FluxFullTrainer(FluxLoRATrainer):
    LABEL = "FLUX.1"  #: the family in messages
    PEER = "flux_train.py"  #: sd-scripts' script for this family's full fine-tune

    def _trained_encoders(self) -> list[tuple[str, str, str, int]]:
        """None: as sd-scripts' flux_train.py (and sd3_train.py by default), a full fine-tune trains the transformer."""
        self.reporter.log(f"note: a {self.LABEL} full fine-tune trains the transformer only (as sd-scripts' {self.PEER}); "
                          "the text encoders stay frozen and their outputs are cached")
        return []

    def _full_network(self, transformer: torch.nn.Module) -> FluxFullNetwork:
        """The saved layout: bare BFL keys, as flux_train.py writes them (SD3's trainer overrides this)."""
        return FluxFullNetwork(transformer, NetworkSpec(train_text_encoder=False))

    @property
    def _shard(self) -> bool:
        return bool(self.cfg.fsdp) and self.accelerator.num_processes > 1

    def _every_process_forwards(self) -> bool:
        """Sharded, every process holds part of each block: samples and validation run on all of them (the first
        writes the images and logs the loss)."""
        return self._shard

    def _place(self, transformer: torch.nn.Module, weight_dtype: torch.dtype) -> None:
        """The weights that train in their training dtype (fp32; bf16 with full_bf16), on the device; with --fsdp left
        on the host, where fully_shard moves each process's shard to the device (the whole model never has to fit)."""
        torch.nn.Module.to(transformer, dtype=adapter_dtype(self.cfg))
        if not self._shard:
            torch.nn.Module.to(transformer, self.device)
        return None

    def _build_network(self) -> FluxFullNetwork:
        cfg, log = self.cfg, self.reporter.log
        transformer = self.flux.transformer
        network = self._full_network(transformer)
        n = sum(p.numel() for p in transformer.parameters())
        log(f"network: full fine-tune of the {self.LABEL} transformer, {n:,} parameters in "
            f"{str(adapter_dtype(cfg)).replace('torch.', '')}")
        self.sharded = False
        if self._shard:
            from .fsdp import shard_transformer

            shard_transformer(transformer, log)
            self.sharded = True
        elif cfg.fsdp:
            log("note: --fsdp with one process: nothing to shard, the transformer trains whole")
        return network

    def _metadata(self) -> dict[str, str]:
        """The FLUX trainer's metadata with a model's architecture (flux-1-dev, not flux-1-dev/lora), as sd-scripts'
        flux_train.py writes it (get_sai_model_spec with is_stable_diffusion_ckpt)."""
        meta = super()._metadata()
        meta["modelspec.architecture"] = self._model_spec()[1]
        return meta

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _save(self, path: Path) -> None:
        """Every process gathers (a sharded model needs them all); the first one writes the model file and the state."""
        from .fsdp import full_model_state, full_optimizer_state

        transformer = self.flux.transformer
        self._optimizer_mode("eval")
        try:
            if self.sharded:
                self.network.gathered = full_model_state(transformer)
            optimizer_state = full_optimizer_state(transformer, self._inner_optimizer())
            if self.accelerator.is_main_process:
                self.last_save = self.network.save(path, self.cfg.save_precision, self._metadata())
                save_state(self.state_dir, self.network, _Held(optimizer_state), self.scheduler, self._state_info())
                self.reporter.log(f"saved {path.name} and training state (step {self.global_step})")
        finally:
            self.network.gathered = None
            self._optimizer_mode("train")

    def _check_state(self, path: Path, info: dict) -> None:
        if info.get("network_module") != "full":
            raise ConfigError(f"resume: {path} is the state of a {info.get('network_module')} run, not a full fine-tune")

    def _load_optimizer(self, path: Path, state: dict) -> None:
        """The optimizer state is saved by parameter name (whole tensors), so it loads sharded or not."""
        from .fsdp import load_full_optimizer_state

        try:
            load_full_optimizer_state(self.flux.transformer, self._inner_optimizer(), state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ConfigError(f"resume: the optimizer state in {path} does not fit this run ({e})") from None

def flux_trainer_class(cfg: Any) -> type[FluxLoRATrainer]:
    """The flow trainer for this config: FLUX.1's or SD3's, the full fine-tune's or the LoRA trainer."""
    full = cfg.network_kind == "full"
    if cfg.is_sd3():
        from .sd3_trainer import SD3LoRATrainer

        if full:
            from .sd3_full import SD3FullTrainer

            return SD3FullTrainer
        return SD3LoRATrainer
    return FluxFullTrainer if full else FluxLoRATrainer
