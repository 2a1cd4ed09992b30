"""Prompt -> the diffusers pipeline's embeddings, A1111's way: attention weights, BREAK and 75-token chunks.

Each chunk (BOS, up to 75 tokens, EOS, padding: 77 positions) goes through the text encoder on its own
and the chunks are joined along the sequence, so a prompt is never cut at 77 tokens. A weighted chunk's
output is z * w per token, then rescaled so its mean equals the unweighted chunk's mean (A1111's
"emphasis: Original"): weights change the balance between words, not the overall scale. SDXL: both
encoders alike (each its own mean), the pooled output from the second encoder's first chunk, unweighted.
Prompt and negative prompt are padded to the same number of chunks with empty ones, as A1111 does.

A plain prompt of up to 75 tokens gives exactly the tensors diffusers' own `encode_prompt` gave before
(tests/test_prompt_weights.py checks it), including diffusers' choices: the negative prompt is encoded
without clip skip, and SDXL's empty negative prompt is zeros (`force_zeros_for_empty_prompt`).
"""
from __future__ import annotations

from typing import Any

import torch

from .models.loading import SDModel
from .prompt_weights import WINDOW, prompt_chunks

Chunk = tuple[list[int], list[float]]


def _rows(tokenizer: Any, chunks: list[Chunk], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), (n, 77) each: every chunk between BOS and EOS, padded as the tokenizer pads; empty
    chunks after the prompt's own up to n."""
    ids, weights = [], []
    for tokens, w in chunks + [([], [])] * (n - len(chunks)):
        pad = WINDOW - len(tokens)
        ids.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        weights.append([1.0, *w, 1.0] + [1.0] * pad)
    return torch.tensor(ids), torch.tensor(weights)


def emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis per chunk: z * w per token, then scaled back to the unweighted mean.

    z: (chunks, 77, D), weights: (chunks, 77). Chunks whose weights are all 1 come back untouched (bit for bit).
    """
    out = z.clone()
    for k in range(z.shape[0]):
        if bool((weights[k] == 1).all()):
            continue
        plain = z[k].float()
        weighted = plain * weights[k].to(plain.device, plain.dtype)[:, None]
        new_mean = weighted.mean()
        out[k] = (weighted * (plain.mean() / new_mean) if new_mean != 0 else weighted).to(z.dtype)
    return out


def _encode(te: Any, ids: torch.Tensor, layer: int, final_norm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states of `layer` (-1 the last), the pooled projection if the encoder has one) for (n, 77) ids."""
    device = next(te.parameters()).device
    out = te(ids.to(device), output_hidden_states=True)
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    if final_norm and layer != -1:
        hidden = getattr(te, "text_model", te).final_layer_norm(hidden)
    return hidden, getattr(out, "text_embeds", None)


def _side(model: SDModel, per_encoder: list[list[Chunk]], n: int, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prompt's embeddings (1, 77n, D) and pooled output: its chunks (padded to n) through every encoder."""
    hidden, pooled = [], None
    for te, tok, chunks in zip(model.text_encoders, model.tokenizers, per_encoder):
        ids, weights = _rows(tok, chunks, n)
        if model.family.is_sdxl:  # SDXL reads the penultimate layer; clip skip goes further back
            z, proj = _encode(te, ids, -(clip_skip + 1), final_norm=False)
        else:
            z, proj = _encode(te, ids, -clip_skip if clip_skip > 1 else -1, final_norm=True)
        hidden.append(emphasis(z, weights).reshape(1, n * (WINDOW + 2), -1))
        if proj is not None:
            pooled = proj[:1]
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def pipeline_embeds(model: SDModel, prompt: str, negative_prompt: str = "", clip_skip: int = 1, weighted: bool = True,
                    zero_empty_negative: bool = False) -> dict[str, torch.Tensor]:
    """The pipeline keyword arguments (`prompt_embeds`, `negative_prompt_embeds` and, for SDXL, the pooled ones)
    for one prompt and its negative. `weighted=False` reads both as plain text (chunked, no weights, no BREAK).
    `zero_empty_negative`: an empty negative prompt is zeros (SDXL pipelines' default) rather than encoded."""
    pos = [prompt_chunks(tok, prompt, weighted) for tok in model.tokenizers]
    neg = [prompt_chunks(tok, negative_prompt, weighted) for tok in model.tokenizers]
    n = max(len(c) for c in pos + neg)
    hidden, pooled = _side(model, pos, n, clip_skip)
    if zero_empty_negative and not negative_prompt:
        neg_hidden, neg_pooled = torch.zeros_like(hidden), (None if pooled is None else torch.zeros_like(pooled))
    else:  # no clip skip for the negative prompt, as diffusers' pipelines (A1111 skips for both)
        neg_hidden, neg_pooled = _side(model, neg, n, 1)
    out = {"prompt_embeds": hidden, "negative_prompt_embeds": neg_hidden}
    if pooled is not None:
        out |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled}
    return out
