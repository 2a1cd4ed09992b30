"""The flow families' (FLUX.1, Chroma, SD3) text-encoder output cache: every caption encoded once, kept in memory, or
with `--cache_text_encoder_outputs_to_disk` in a file beside one of its images and read back per batch.

Why a cache of its own beside the SD one (conditioning.py): these families' outputs are a tuple of tensors (FLUX:
CLIP-L pooled, T5 states, T5 mask; SD3: context, pooled), not SD's (hidden, pooled), and T5's states are large
(512 x 4096 floats a caption for FLUX.1 dev), so on disk they stay out of memory until their batch. A file is reused
by a later run only when its caption and the encoders it was made with are the same: the encoder id hashes the
family, the encoding settings and each encoder's token embeddings, as the SD cache does.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from loratrain.core.paths import confine

SUFFIX = ".flow_te.safetensors"


def encoder_id(family: str, settings: object, encoders: Sequence[torch.nn.Module | None]) -> str:
    """What a disk cache was made with: the family and text settings (T5 length, masks) and the encoders' weights (their
    token embeddings)."""
    h = hashlib.sha256(f"{family}|{settings!r}".encode())
    for te in encoders:
        if te is not None:
            h.update(te.get_input_embeddings().weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class FlowTextCache:
    """caption -> the encoder outputs (batch dimension dropped), from memory or its file."""

    def __init__(self) -> None:
        self._memory: dict[str, tuple[torch.Tensor, ...]] = {}
        self._files: dict[str, Path] = {}

    def __contains__(self, caption: object) -> bool:
        return caption in self._memory or caption in self._files

    def __getitem__(self, caption: str) -> tuple[torch.Tensor, ...]:
        if caption in self._memory:
            return self._memory[caption]
        from safetensors.torch import load_file

        sd = load_file(str(confine(self._files[caption], "text encoder cache")))
        return tuple(sd[f"t{i}"] for i in range(len(sd)))

    @torch.no_grad()
    def fill(self, files: dict[str, Path], encode: Callable[[str], tuple[torch.Tensor, ...]], reporter: Any,
             encoder: str = "", to_disk: bool = False) -> int:
        """Encode every caption (`files`: caption -> an image it belongs to) that is not already on disk from the same
        encoders; returns how many were encoded now."""
        from safetensors import safe_open

        from loratrain.core.safe_io import save_safetensors

        from .data.dataset import CACHE_DIR

        todo = []
        for caption, image in files.items():
            if to_disk:
                path = confine(image.parent / CACHE_DIR / f"{image.name}{SUFFIX}", "text encoder cache", write=True)
                self._files[caption] = path
                if path.is_file():
                    try:
                        with safe_open(str(path), framework="pt") as f:
                            meta = f.metadata() or {}
                    except Exception:  # noqa: BLE001 - a damaged cache file is encoded again
                        meta = {}
                    if meta.get("encoder") == encoder and meta.get("caption_sha256") == _sha(caption):
                        continue
            todo.append(caption)
        reporter.start(len(todo), "caching text encoder outputs", unit="caption")
        for caption in todo:
            out = tuple(t[0].detach().cpu().contiguous() for t in encode(caption))
            if to_disk:
                save_safetensors({f"t{i}": t for i, t in enumerate(out)}, self._files[caption],
                                 {"encoder": encoder, "caption_sha256": _sha(caption)})
            else:
                self._memory[caption] = out
            reporter.advance(1)
        reporter.done("")
        return len(todo)
