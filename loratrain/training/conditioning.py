"""Prompt -> UNet conditioning for SD1/SD2 (clip_skip) and SDXL (two encoders, pooled, time ids)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loratrain.core.models.loading import SDModel


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


def encode_prompts(model: SDModel, prompts: list[str], clip_skip: int = 1) -> Conditioning:
    device = next(model.text_encoders[0].parameters()).device
    if not model.family.is_sdxl:
        te, tok = model.text_encoders[0], model.tokenizers[0]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True)
        if clip_skip > 1:
            return Conditioning(_final_norm(te)(out.hidden_states[-clip_skip]))
        return Conditioning(out.last_hidden_state)
    hidden, pooled = [], None
    for te, tok in zip(model.text_encoders, model.tokenizers):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return Conditioning(torch.cat(hidden, dim=-1), pooled)


def sdxl_time_ids(original: list[tuple[int, int]], crops: list[tuple[int, int]], targets: list[tuple[int, int]],
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(orig h, orig w, crop top, crop left, target h, target w) per sample; sizes given as (w, h)."""
    rows = [[o[1], o[0], c[0], c[1], t[1], t[0]] for o, c, t in zip(original, crops, targets)]
    return torch.tensor(rows, device=device, dtype=dtype)


class ConditioningCache:
    """Text encoder outputs per caption, when the encoders are frozen and captions never change."""

    def __init__(self, model: SDModel, clip_skip: int) -> None:
        self.model, self.clip_skip = model, clip_skip
        self._cache: dict[str, Conditioning] = {}
        self.frozen = False  # every caption is cached and the encoders are gone: a miss is a bug, not a slow step

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Conditioning:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo and self.frozen:
            raise RuntimeError(f"caption {todo[0]!r} was not in the text encoder output cache")
        if todo:
            cond = encode_prompts(self.model, todo, self.clip_skip)
            for i, p in enumerate(todo):
                self._cache[p] = Conditioning(cond.hidden[i:i + 1], None if cond.pooled is None else cond.pooled[i:i + 1])
        parts = [self._cache[p] for p in prompts]
        pooled = None if parts[0].pooled is None else torch.cat([c.pooled for c in parts])
        return Conditioning(torch.cat([c.hidden for c in parts]), pooled)
