"""Prompt -> UNet conditioning for SD1/SD2 (clip_skip) and SDXL (two encoders, pooled, time ids)."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loratrain.core.models.loading import SDModel
from loratrain.core.paths import confine


@dataclass
class Conditioning:
    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def unet_kwargs(self, time_ids: torch.Tensor | None) -> dict:
        if self.pooled is None:
            return {"encoder_hidden_states": self.hidden}
        return {"encoder_hidden_states": self.hidden,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": time_ids}}


def _final_norm(te: nn.Module) -> nn.Module:
    inner = getattr(te, "text_model", te)
    return inner.final_layer_norm


WINDOW = 75  # CLIP's 77 positions less BOS and the closing token


def _windows(ids: torch.Tensor, n: int, eos: int, pad: int) -> torch.Tensor:
    """(B, 75n+2) token ids -> (B*n, 77): each 75-token window between its own BOS and closing token.

    sd-scripts' --max_token_length 150/225. Where padding is not EOS (SD2, SDXL's second encoder), a
    window cut mid-caption is closed with EOS, and a window of padding only starts BOS EOS, so each
    window reads as a whole prompt to the encoder.
    """
    b = ids.shape[0]
    chunks = []
    for k in range(n):
        chunk = torch.cat([ids[:, :1], ids[:, 1 + WINDOW * k: 1 + WINDOW * (k + 1)], ids[:, -1:]], dim=1).clone()
        if pad != eos:
            cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[cut, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1).reshape(b * n, WINDOW + 2)


def _joined(hidden: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """(B*n, 77, D) -> (B, 75n+2, D): the first BOS, every window's 75 tokens, the last window's closing token."""
    h = hidden.reshape(b, n * (WINDOW + 2), hidden.shape[-1])
    parts = [h[:, :1]] + [h[:, (WINDOW + 2) * k + 1: (WINDOW + 2) * k + 1 + WINDOW] for k in range(n)] + [h[:, -1:]]
    return torch.cat(parts, dim=1)


def encode_prompts(model: SDModel, prompts: list[str], clip_skip: int = 1, max_token_length: int | None = None,
                   weighted: bool = False) -> Conditioning:
    """UNet conditioning for a batch of captions; max_token_length 150/225 encodes 2/3 windows of 75 tokens;
    `weighted` reads the (word:1.2) attention syntax (core.prompt_weights) and scales each token's output."""
    from loratrain.core.prompt_weights import weighted_ids

    device = next(model.text_encoders[0].parameters()).device
    n = (max_token_length or WINDOW) // WINDOW
    b = len(prompts)

    def run(te: nn.Module, tok) -> tuple[object, torch.Tensor | None]:
        length = WINDOW * n + 2 if n > 1 else tok.model_max_length
        weights = None
        if weighted:
            ids, weights = weighted_ids(tok, prompts, length)
        else:
            ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        if n > 1:
            ids = _windows(ids, n, tok.eos_token_id, tok.pad_token_id)
        return te(ids.to(device), output_hidden_states=True), weights

    def scaled(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        return hidden if weights is None else hidden * weights.to(hidden.device, hidden.dtype)[..., None]

    if not model.family.is_sdxl:
        te, tok = model.text_encoders[0], model.tokenizers[0]
        out, weights = run(te, tok)
        hidden = _final_norm(te)(out.hidden_states[-clip_skip]) if clip_skip > 1 else out.last_hidden_state
        return Conditioning(scaled(_joined(hidden, b, n) if n > 1 else hidden, weights))
    hidden, pooled = [], None
    for te, tok in zip(model.text_encoders, model.tokenizers):
        out, weights = run(te, tok)
        h = out.hidden_states[-2]
        hidden.append(scaled(_joined(h, b, n) if n > 1 else h, weights))
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds[::n]  # the first window's, as sd-scripts (weights leave it as it is)
    return Conditioning(torch.cat(hidden, dim=-1), pooled)


def sdxl_time_ids(original: list[tuple[int, int]], crops: list[tuple[int, int]], targets: list[tuple[int, int]],
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(orig h, orig w, crop top, crop left, target h, target w) per sample; sizes given as (w, h)."""
    rows = [[o[1], o[0], c[0], c[1], t[1], t[0]] for o, c, t in zip(original, crops, targets)]
    return torch.tensor(rows, device=device, dtype=dtype)


class ConditioningCache:
    """Text encoder outputs per caption, when the encoders are frozen and captions never change."""

    def __init__(self, model: SDModel, clip_skip: int, max_token_length: int | None = None, weighted: bool = False) -> None:
        self.model, self.clip_skip, self.max_token_length, self.weighted = model, clip_skip, max_token_length, weighted
        self._cache: dict[str, Conditioning] = {}
        self._files: dict[str, Path] = {}  # cache_text_encoder_outputs_to_disk: caption -> its file, read per batch
        self.frozen = False  # every caption is cached and the encoders are gone: a miss is a bug, not a slow step

    def _encoder_id(self) -> str:
        """What a disk cache was made with: the encoders (their token embeddings), clip_skip and token length."""
        h = hashlib.sha256(f"{self.model.family.name}|{self.clip_skip}|{self.max_token_length}|{self.weighted}".encode())
        for te in self.model.text_encoders:
            h.update(te.get_input_embeddings().weight.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:24]

    @torch.no_grad()
    def fill(self, files: dict[str, Path], reporter: Any, autocast: Callable[[], Any], to_disk: bool = False) -> None:
        """Encode every caption once (`files`: caption -> an image it belongs to). With `to_disk` each one is a
        file beside its image (`.loratrain_cache/<image>.te.safetensors`, checked against the caption and the
        encoders), kept out of memory and read back per batch; a later run encodes only what changed."""
        from safetensors import safe_open

        from loratrain.core.safe_io import save_safetensors

        from .data.dataset import CACHE_DIR

        encoder = self._encoder_id() if to_disk else ""
        todo = []
        for caption, image in files.items():
            if to_disk:
                path = confine(image.parent / CACHE_DIR / f"{image.name}.te.safetensors", "text encoder cache")
                self._files[caption] = path
                if path.is_file():
                    with safe_open(str(path), framework="pt") as f:
                        meta = f.metadata() or {}
                    if meta.get("encoder") == encoder and meta.get("caption_sha256") == _sha(caption):
                        continue
            todo.append(caption)
        reporter.start(len(todo), "caching text encoder outputs", unit="caption")
        for i in range(0, len(todo), 16):
            batch = todo[i:i + 16]
            with autocast():
                cond = encode_prompts(self.model, batch, self.clip_skip, self.max_token_length, self.weighted)
            for caption, one in zip(batch, _split(cond)):
                if to_disk:
                    tensors = {"hidden": one.hidden[0].cpu().contiguous()}
                    if one.pooled is not None:
                        tensors["pooled"] = one.pooled[0].cpu().contiguous()
                    save_safetensors(tensors, self._files[caption], {"encoder": encoder, "caption_sha256": _sha(caption)})
                else:
                    self._cache[caption] = one
            reporter.advance(len(batch))
        reporter.done("")

    def _from_disk(self, caption: str) -> Conditioning:
        from safetensors.torch import load_file

        device = next(self.model.unet.parameters()).device
        sd = load_file(str(confine(self._files[caption], "text encoder cache")), device=str(device))
        return Conditioning(sd["hidden"][None], sd["pooled"][None] if "pooled" in sd else None)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Conditioning:
        if self._files and all(p in self._files for p in prompts):
            return _join([self._from_disk(p) for p in prompts])
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo and self.frozen:
            raise RuntimeError(f"caption {todo[0]!r} was not in the text encoder output cache")
        if todo:
            self._cache.update(zip(todo, _split(encode_prompts(self.model, todo, self.clip_skip, self.max_token_length,
                                                               self.weighted))))
        return _join([self._cache[p] for p in prompts])


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _split(cond: Conditioning) -> list[Conditioning]:
    """A batch's conditioning as one per caption (batch size 1 each)."""
    return [Conditioning(cond.hidden[i:i + 1], None if cond.pooled is None else cond.pooled[i:i + 1])
            for i in range(cond.hidden.shape[0])]


def _join(parts: list[Conditioning]) -> Conditioning:
    pooled = None if parts[0].pooled is None else torch.cat([c.pooled for c in parts])
    return Conditioning(torch.cat([c.hidden for c in parts]), pooled)
