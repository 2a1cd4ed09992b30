"""`loratrain face swapper info`: what a swapper file promises (I/O, crop, embedding map) and its blocks.

Before fine-tuning, a user needs the block names `--freeze_until` takes and to know whether the file is one
our importer runs at all; this answers both without training anything (the graph is run once, on a blank face).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loratrain.core.jobs import JobResult, job
from loratrain.core.paths import confine
from loratrain.core.progress import Reporter, StopFlag

from .config import SwapperInfoConfig
from .contract import read_contract
from .model import TorchSwapper
from .onnx_module import OnnxModule, load_onnx


@dataclass(kw_only=True)
class SwapperInfoResult(JobResult):
    model: str = ""
    inputs: dict[str, list] = field(default_factory=dict)
    outputs: dict[str, list] = field(default_factory=dict)
    template: str = ""
    normalisation: str = ""
    emap: bool = False
    blocks: list[str] = field(default_factory=list)
    weights: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        io = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
        return [f"{self.model}: inputs {io(self.inputs)}; outputs {io(self.outputs)}",
                f"crop: {self.template}, pixels {self.normalisation}; source = embedding "
                + ("x emap / |embedding| (FaceFusion's inswapper convention)" if self.emap else "/ |embedding|"),
                f"{self.weights:,} learnt weights in {len(self.blocks)} blocks, input side first (--freeze_until):",
                "  " + " ".join(self.blocks),
                *([f"metadata: {', '.join(f'{k}={v}' for k, v in self.metadata.items())}"] if self.metadata else [])]


@job
def run_swapper_info(cfg: SwapperInfoConfig, reporter: Reporter, stop: StopFlag) -> SwapperInfoResult:
    """Read `cfg.model` (nothing is trained or written). Result: its contract, blocks and our metadata."""
    path = confine(cfg.model, "model")
    proto = load_onnx(path, "model")
    label = f"model {path.name}"
    contract = read_contract(proto, label)
    module = OnnxModule(proto, label)
    TorchSwapper(module, contract).probe()  # a graph the importer cannot run (or that yields NaN) is named here
    return SwapperInfoResult(model=path.name, inputs=module.input_shapes, outputs=module.output_shapes,
                             template=contract.template, normalisation=contract.normalisation,
                             emap=contract.emap is not None, blocks=module.blocks(),
                             weights=sum(module.param(n).numel() for n in module.learnable),
                             metadata={p.key: p.value for p in proto.metadata_props if p.key.startswith("loratrain.")})
