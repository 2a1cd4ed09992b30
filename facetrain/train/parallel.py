"""Data-parallel face training under torchrun / `accelerate launch` (docs/face-model.md#data-parallel-training).

Plain torch.distributed (gloo on CPUs, NCCL on GPUs), no DDP wrapper: the face model trains through
`train_forward`, not `forward`, and two discriminators step on their own after it, so the gradients are reduced
here, explicitly, once per optimizer step, as the LoRA trainer does (loratrain/training/data_parallel.py).

Which faces: every process runs the same sampler (same seed) and takes its own slice of each global batch of
world x batch_size draws; the (face, augmentation seed) pairs it skips cost nothing. Together the processes
train on exactly the faces and augmentations one process with world x batch_size would, and no two processes
load the same draw. (Seeding each process's sampler by its rank would draw as freely, but then no run of one
process could ever be compared with the run of N.)

Sum, not mean: SAEHD's loss is a per-sample loss *summed* over the batch (DFL's), so one process with 2b faces
steps on the sum of 2b per-sample gradients. Summing the processes' gradients gives exactly that; averaging them
would halve every step's gradient (and a clip threshold would bite at another point). The discriminators' losses
are batch means, so theirs are averaged. Logged losses (per-sample means) are averaged too.

Only the first process saves, previews, writes TensorBoard and history. Decisions to end a run (a plan's rule,
early stopping, Ctrl-C) are agreed every iteration, so every process stops after the same step.
"""
from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def is_main_process() -> bool:
    """Whether this process is the one that writes files when several train one model (RANK unset or 0): for code
    around the training loop (a plan's state file, its pinned snapshots) that must write once, not once per process."""
    return _env_int("RANK", 0) == 0


class ShardSampler(Sampler):
    """Items [rank*b, (rank+1)*b) of every run of world*b items of `inner` (an endless sampler)."""

    def __init__(self, inner: Iterable, rank: int, world: int, batch: int) -> None:
        self.inner, self.rank, self.world, self.batch = inner, rank, world, batch

    def __iter__(self) -> Iterator:
        it = iter(self.inner)
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        while True:
            group = [next(it) for _ in range(self.world * self.batch)]
            yield from group[lo:hi]


class EveryNth(Sampler):
    """Batch `rank` of every `world` batches of a batch sampler (a sampler that makes whole batches itself)."""

    def __init__(self, inner: Iterable, rank: int, world: int) -> None:
        self.inner, self.rank, self.world = inner, rank, world

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.inner):
            if i % self.world == self.rank:
                yield batch


class NullWriter:
    """TensorBoard's SummaryWriter for the processes that do not write logs."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class AgreedStop:
    """The run's stop flag as all processes last agreed on it: a Ctrl-C that reaches one process between two
    agreements must not make it leave the loop one step before the others (they would wait for it forever)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.agreed = inner, False

    def set(self) -> None:
        self.inner.set()

    def is_set(self) -> bool:
        return self.agreed


class Processes:
    """This process's place among the data-parallel processes; with one process every method is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None) -> None:
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.is_main = rank == 0

    @classmethod
    def from_env(cls, device: torch.device, notes: list[str] | None = None, batch_size: int = 0) -> "Processes":
        """From torchrun's / accelerate's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); joins the
        process group (gloo on CPU, NCCL on CUDA) unless someone already did."""
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            atexit.register(_leave)
        procs = cls(dist.get_rank(), dist.get_world_size(), device)
        if notes is not None:
            notes.append(f"data-parallel: batch {batch_size} per process x {procs.world} processes "
                         f"(= one process with batch {batch_size * procs.world}); this is process {procs.rank}")
        return procs

    # ------------------------------------------------------------ data
    def shard(self, loader: DataLoader) -> DataLoader:
        """The same loader, drawing only this process's share of each global batch."""
        if self.world == 1:
            return loader
        common: dict[str, Any] = {"num_workers": loader.num_workers, "collate_fn": loader.collate_fn,
                                  "pin_memory": loader.pin_memory, "worker_init_fn": loader.worker_init_fn,
                                  "persistent_workers": loader.persistent_workers}
        if loader.num_workers > 0:
            common["prefetch_factor"] = loader.prefetch_factor
        if loader.batch_size is None:  # a custom batch sampler: whole batches, dealt out in turn
            return DataLoader(loader.dataset, batch_sampler=EveryNth(loader.batch_sampler, self.rank, self.world), **common)
        sampler = ShardSampler(loader.sampler, self.rank, self.world, loader.batch_size)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last, **common)

    # ------------------------------------------------------------ collectives
    def broadcast(self, *modules: torch.nn.Module | None) -> None:
        """Every process starts from the first one's weights (they are built from one seed anyway; this makes sure)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for m in modules:
            if m is not None:
                for t in list(m.parameters()) + list(m.buffers()):
                    dist.broadcast(t.data, src=0)

    def sum_gradients(self, params: list[torch.nn.Parameter], logs: dict[str, float]) -> dict[str, float]:
        """Sum the gradients (the batch-summed loss's; see the module's docstring) and average the logged losses,
        in one collective call. Returns the averaged logs."""
        if self.world == 1:
            return logs
        import torch.distributed as dist

        with_grad = [p for p in params if p.grad is not None]  # the same on every process: the same graph
        keys = sorted(logs)
        flat = torch.cat([p.grad.reshape(-1).float() for p in with_grad]
                         + [torch.tensor([float(logs[k]) for k in keys], dtype=torch.float32, device=self.device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in with_grad:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
        return {**logs, **{k: v / self.world for k, v in zip(keys, flat[offset:].tolist())}}

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """A discriminator's gradients: its loss is a batch mean, so the mean over processes is the global batch's."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        flat = torch.cat([p.grad.reshape(-1).float() for p in with_grad])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in with_grad:
            n = p.numel()
            p.grad.copy_((flat[offset:offset + n] / self.world).view_as(p.grad))
            offset += n

    def stop_flag(self, stop: Any) -> Any:
        """The flag the loop should read: with several processes, the agreed one (see `agree`)."""
        return stop if self.world == 1 else AgreedStop(stop)

    def agree(self, reasons: list[str], stop: Any) -> list[str]:
        """Every process's reasons to end the run (any process's reason ends it everywhere), and the stop flag
        agreed: set everywhere when any process was asked to stop."""
        if self.world == 1:
            return reasons
        import torch.distributed as dist

        flags = torch.tensor([float(bool(reasons)), float(stop.inner.is_set())], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        stop.agreed = bool(flags[1] > 0)
        if flags[0] == 0:
            return reasons
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, list(reasons))
        out: list[str] = []
        for got in gathered:
            out += [r for r in got if r not in out]
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
