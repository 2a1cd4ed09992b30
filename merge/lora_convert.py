"""(IA)^3 -> LoRA: ComfyUI has no (IA)^3 adapter and diffusers none either, while every reader loads a kohya LoRA.

(IA)^3 scales the base weight per channel, dW = W * w, so its change depends on the model: the conversion reads the
base checkpoint and re-factorises each dW by truncated SVD. That is `lora merge --mode svd` with this one file, so this
job is that merge, behind a command that says what it is for and refuses a file of another kind.
"""
from __future__ import annotations

from loratrain.core.jobs import job
from loratrain.core.progress import Reporter, StopFlag

from .config import LoraConvertIa3Config, LoraMergeConfig
from .lora_merge import LoraMergeResult, run_lora_merge


@job
def run_lora_convert_ia3(cfg: LoraConvertIa3Config, reporter: Reporter, stop: StopFlag) -> LoraMergeResult:
    """A kohya LoRA of rank `cfg.rank` whose dense change is the (IA)^3 file's W * w on `cfg.model` (exact at full rank).

    The checks (an (IA)^3 file, a base model, a new output) ran first; stop is checked per module and a stopped
    conversion writes nothing (the output is written atomically).
    """
    merge = LoraMergeConfig(loras=[cfg.lora], model=cfg.model, output=cfg.output, mode="svd", new_rank=cfg.rank,
                            new_conv_rank=cfg.conv_rank, clamp_quantile=cfg.clamp_quantile,
                            save_precision=cfg.save_precision, overwrite=cfg.overwrite)
    # the merge's own body: its checks are ours, already done, and the result is reported once, by this job
    return run_lora_merge.__wrapped__(merge, reporter, stop)
