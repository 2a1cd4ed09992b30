"""`--blocks_to_swap N` for FLUX.1 and SD3: the last transformer blocks live in host memory and visit the GPU only to run.

Why: FLUX.1's 57 blocks are 23.8 GB in bf16. Training a LoRA needs the frozen base weights only for the matmuls
that run right now, so the blocks that do not fit stay in (pinned) host memory and each is copied to the device just
before it runs, on a side CUDA stream while the block before it computes; the copy is dropped when the block is done.
Nothing but frozen base weights moves: the LoRA's parameters live in the network module (forward hooks), so their
gradients and optimizer state stay on the device.

N means what it means in sd-scripts (flux_models.Flux.enable_block_swap): N // 2 double blocks and (N - N // 2) * 2
single blocks (a double block weighs about two single ones), the last ones of each list. sd-scripts allows up to 35
for FLUX.1 (2 of each kind stay resident); here every block may swap. For SD3 it is the last N joint blocks (sd-scripts
allows num_blocks - 2; here all may swap).

Order: forward runs the blocks 0..56, and in backward gradient checkpointing recomputes them 56..0, so "the next
block" is the following one in forward and the preceding one in backward (told apart by autograd's graph task). A
block's weights must stay on the device until its backward is done: in backward a block is released only when the
next one (backward order) starts, and in forward right after it runs, which is safe only because a checkpointed
forward keeps no activations (or weights) for backward. Hence gradient checkpointing is required to train with swap.

The host copy is kept for good (the weights are frozen), so "moving a block back" is dropping its device copy: no
device-to-host traffic. On the CPU host and device are the same and the copies are real but pointless; `poison=True`
(tests) puts NaN in the place of every swapped weight while it is "on the host", so any use of a block that is not
loaded shows up as a NaN loss.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


def swap_counts(depth: int, depth_single: int, blocks_to_swap: int) -> tuple[int, int]:
    """(double, single) blocks swapped for sd-scripts' `blocks_to_swap`; ConfigError when the model has fewer."""
    doubles = blocks_to_swap // 2
    singles = (blocks_to_swap - doubles) * 2
    if blocks_to_swap < 0 or doubles > depth or singles > depth_single:
        most = max(n for n in range(2 * depth + 2) if n // 2 <= depth and (n - n // 2) * 2 <= depth_single)
        raise ConfigError(f"blocks_to_swap: {blocks_to_swap} swaps {doubles} double and {singles} single blocks; this "
                          f"model has {depth} and {depth_single} (at most {most})")
    return doubles, singles


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def swap_layout(model: nn.Module, blocks_to_swap: int) -> tuple[list[nn.Module], set[int]]:
    """(blocks in execution order, indices of the swapped ones) in sd-scripts' meaning for the model's family: FLUX.1
    swaps N // 2 double and (N - N // 2) * 2 single blocks; SD3's MMDiT (sd3_models.MMDiT.enable_block_swap) the last
    N joint blocks."""
    if hasattr(model, "joint_blocks"):
        blocks = list(model.joint_blocks)
        if not 0 <= blocks_to_swap <= len(blocks):
            raise ConfigError(f"blocks_to_swap: {blocks_to_swap} joint blocks; this model has {len(blocks)}")
        return blocks, set(range(len(blocks) - blocks_to_swap, len(blocks)))
    doubles, singles = swap_counts(len(model.double_blocks), len(model.single_blocks), blocks_to_swap)
    blocks = [*model.double_blocks, *model.single_blocks]
    depth = len(model.double_blocks)
    return blocks, set(range(depth - doubles, depth)) | set(range(len(blocks) - singles, len(blocks)))


class BlockSwap:
    """Keeps the last blocks of a FluxTransformer on the host and streams them in; `remove()` undoes the hooks."""

    def __init__(self, model: nn.Module, blocks_to_swap: int, device: torch.device | str, *, poison: bool = False) -> None:
        self.model, self.device = model, torch.device(device)
        self.blocks, self.swapped = swap_layout(model, blocks_to_swap)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.events: list[tuple[str, int]] = []  # ("load" | "use" | "free", block): what the tests check
        self.loaded: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self.in_use: set[int] = set()
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}  # (tensor, host copy, placeholder)
        moving = set()
        for i in sorted(self.swapped):
            entries = []
            for t in self._frozen(self.blocks[i]):
                host = t.data.to("cpu")
                if self.cuda:
                    host = host.pin_memory()  # non_blocking copies need page-locked memory
                placeholder = (torch.full(host.shape, float("nan")).to(host.dtype) if poison and host.is_floating_point()
                               else host)
                t.data = placeholder
                entries.append((t, host, placeholder))
                moving.add(id(t))
            self.host[i] = entries
        for t in [*model.parameters(), *model.buffers()]:  # everything else lives on the device for good
            if id(t) not in moving:
                t.data = t.data.to(self.device)
        self.bytes_on_host = sum(h.numel() * h.element_size() for e in self.host.values() for _, h, _ in e)
        self._hooks = []
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self._before(i)))
            self._hooks.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self._after(i)))

    @staticmethod
    def _frozen(block: nn.Module) -> list[torch.Tensor]:
        """What moves: frozen parameters and buffers (a trainable one would take its gradient off the device)."""
        return [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())

    # -- moving ------------------------------------------------------------------------------------------------------
    def _load(self, i: int) -> None:
        """Start copying block i to the device (on the side stream on CUDA); no wait here."""
        if i in self.loaded or i not in self.swapped:
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # its host copy may be mid-use: order it
            with torch.cuda.stream(self.stream):
                copies = [h.to(self.device, non_blocking=True) for _, h, _ in self.host[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            copies, event = [h.to(self.device, copy=True) for _, h, _ in self.host[i]], None
        self.loaded[i] = (copies, event)
        self.events.append(("load", i))

    def _use(self, i: int) -> None:
        self._load(i)  # a miss (the first block of backward) loads synchronously below
        copies, event = self.loaded[i]
        if i not in self.in_use:
            if event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                for c in copies:
                    c.record_stream(stream)  # the allocator must not reuse it before this stream is done with it
            for (t, _, _), c in zip(self.host[i], copies):
                t.data = c
            self.in_use.add(i)
            self.events.append(("use", i))

    def _free(self, i: int) -> None:
        if i in self.in_use:
            for t, _, placeholder in self.host[i]:
                t.data = placeholder
            self.in_use.discard(i)
        if self.loaded.pop(i, None) is not None:
            self.events.append(("free", i))

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _before(self, i: int) -> None:
        backward = _in_backward()
        if (torch.is_grad_enabled() and not backward and self.model.training
                and not getattr(self.model, "gradient_checkpointing", False)):
            raise ConfigError("blocks_to_swap: training with swapped blocks needs --gradient_checkpointing")
        step = -1 if backward else 1
        keep = {i, i + step}
        for j in list(self.loaded):  # blocks already passed in this direction (in backward: their gradients are done)
            if j not in keep:
                self._free(j)
        if i in self.swapped:
            self._use(i)
        self._load(i + step)  # prefetch the next one while this one runs

    def _after(self, i: int) -> None:
        if i in self.swapped and not _in_backward():
            self._free(i)  # forward: done with it (checkpointing keeps nothing of it for backward)

    def release_all(self) -> None:
        """Drop every device copy (after a step, before saving or validation, to hand the memory back)."""
        for j in list(self.loaded):
            self._free(j)

    def remove(self) -> None:
        """Back to an ordinary model on the device (every block copied in); the hooks go."""
        for h in self._hooks:
            h.remove()
        self.release_all()
        for entries in self.host.values():
            for t, host, _ in entries:
                t.data = host.to(self.device)
        self.host = {}


def enable_block_swap(model: nn.Module, blocks_to_swap: int, device: torch.device | str, log: Any = None,
                      poison: bool = False) -> BlockSwap:
    """Place `model` on `device` except its swapped blocks' frozen weights, which stream in as they run."""
    swap = BlockSwap(model, blocks_to_swap, device, poison=poison)
    if log is not None:
        if hasattr(model, "joint_blocks"):
            what = f"the last {len(swap.swapped)} joint blocks"
        else:
            doubles = sum(i < len(model.double_blocks) for i in swap.swapped)
            what = f"{doubles} double and {len(swap.swapped) - doubles} single blocks"
        log(f"blocks_to_swap {blocks_to_swap}: {what} ({swap.bytes_on_host / 2**30:.2f} GiB) stay in host memory and are "
            "copied in as they run")
    return swap
