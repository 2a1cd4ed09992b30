"""Memory readings shared by the benchmarks (run as `python bench/<name>.py`, which puts bench/ on sys.path)."""
from __future__ import annotations

import resource
import threading
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """Highest resident set size of this process so far.

    Linux: VmHWM of this process's own memory. getrusage's ru_maxrss is not used there: it keeps the
    high-water mark of the process that forked us (a parent holding torch makes every child look big).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mib(device: object = None) -> float:
    """Peak CUDA allocation when `device` is a CUDA device (or None and CUDA is up), else peak RSS."""
    import torch

    kind = getattr(device, "type", device)
    if (kind == "cuda" or (kind is None and torch.cuda.is_available())) and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return peak_rss_mib()


class PeakRss:
    """Highest resident set size while a block runs (sampled every 5 ms), for phases within one process."""

    def __enter__(self) -> "PeakRss":
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as fh:
                self.peak = max(self.peak, int(fh.read().split()[1]) * 4096)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build_checkpoint(family: str, path: Path, seed: int, tiny: bool = False) -> None:
    """A single-file checkpoint with the real key names and shapes of `family`, random fp16 values.

    tiny: the test models' widths and depths (same key structure), for a smoke run of a bench in seconds.
    """
    import torch

    from loratrain.core.models.tiny import checkpoint_layout, tiny_configs
    from loratrain.core.tensor_io import OutputTensor, StreamingWriter

    layout = checkpoint_layout(family, tiny_configs(family) if tiny else None)
    plan = [OutputTensor(k, torch.float16 if d.is_floating_point else d, s) for k, (s, d) in layout.items()]
    gen = torch.Generator().manual_seed(seed)
    with StreamingWriter(path, plan, {"format": "pt"}) as w:
        for t in plan:
            n = t.nbytes // t.dtype.itemsize
            if t.dtype.is_floating_point:
                for start in range(0, n, 1 << 22):
                    w.write((torch.randn(min(1 << 22, n - start), generator=gen) * 0.02).half())
            else:
                w.write(torch.arange(n, dtype=t.dtype))
