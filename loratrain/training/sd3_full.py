"""SD3 / SD3.5 full fine-tuning (`--network_module full` with an SD3 model), optionally sharded with `--fsdp`.

Why both parents: the FLUX.1 full fine-tune (flux_full.py) holds what a full fine-tune is (the transformer's own
weights train, saves gather a sharded model, the state is keyed by parameter name, samples and validation run on
every process of a sharded run); the SD3 LoRA trainer (sd3_trainer.py) holds what SD3 is (its parts, conditioning,
step and sampler). The MRO takes the first's training and the second's model.

The save is what sd-scripts' sd3_train.py writes (sd3_train_utils.save_models): one single file with the MMDiT as
`model.diffusion_model.*` and the VAE as `first_stage_model.*` (the text encoders stay in their own files), with
modelspec `stable-diffusion-3-<type>` and Stability AI's implementation: a file our loader, sd-scripts and ComfyUI
read as an SD3 checkpoint.
"""
from __future__ import annotations

import torch

from .flux_full import FluxFullTrainer
from .networks.base import NetworkSpec
from .networks.flux_full import FluxFullNetwork
from .sd3_trainer import SD3LoRATrainer

#: sd-scripts' sai_model_spec IMPL_STABILITY_AI: what it writes for an SD3 checkpoint (is_stable_diffusion_ckpt)
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"


class SD3FullTrainer(FluxFullTrainer, SD3LoRATrainer):
    LABEL = "SD3"
    PEER = "sd3_train.py"

    def _full_network(self, transformer: torch.nn.Module) -> FluxFullNetwork:
        from loratrain.core.models.sd3_loading import vae_ldm_state

        vae = self.flux.sources.vae

        def vae_tensors() -> dict[str, torch.Tensor]:  # read at each save: the VAE may be freed after caching
            return {"first_stage_model." + k: v for k, v in vae_ldm_state(vae).items()}

        return FluxFullNetwork(transformer, NetworkSpec(train_text_encoder=False), "model.diffusion_model.", vae_tensors,
                               "SD3")

    def _model_spec(self) -> tuple[str, str, str]:
        version, arch, _ = super()._model_spec()
        return version, arch, IMPL_STABILITY_AI
