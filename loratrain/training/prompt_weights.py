"""sd-scripts' --weighted_captions: the A1111 attention syntax in captions, `(word)` x1.1, `[word]` /1.1,
`(word:1.3)` x1.3, nested brackets multiply, `\\(` a literal bracket. The text encoder sees the caption
without the brackets; its output at each token is multiplied by that token's weight (sd-scripts'
encode_tokens_with_weights: no renormalisation of the mean).
"""
from __future__ import annotations

import re

import torch

UP, DOWN = 1.1, 1 / 1.1
_EXPLICIT = re.compile(r":([+-]?[\d.]+)\)")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Runs of text and their weight; unclosed brackets still count, as in A1111 and sd-scripts."""
    runs: list[list] = []  # [text, weight]
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    i = 0
    while i < len(text):
        c = text[i]
        explicit = _EXPLICIT.match(text, i) if c == ":" and round_open else None
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            runs.append([text[i + 1], 1.0])
            i += 2
            continue
        if explicit:
            try:
                factor = float(explicit.group(1))
            except ValueError:
                factor = None
            if factor is not None:
                scale(round_open.pop(), factor)
                i = explicit.end()
                continue
        if c == "(":
            round_open.append(len(runs))
        elif c == "[":
            square_open.append(len(runs))
        elif c == ")" and round_open:
            scale(round_open.pop(), UP)
        elif c == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:
            runs.append([c, 1.0])
        i += 1
    for start in round_open:
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)
    merged: list[tuple[str, float]] = []
    for piece, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def weighted_ids(tokenizer, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(ids, weights), both (B, length): BOS, the runs' tokens (truncated), EOS, padding; weight 1 outside the text."""
    ids_rows, weight_rows = [], []
    for prompt in prompts:
        tokens: list[int] = []
        weights: list[float] = []
        for piece, weight in parse_weights(prompt):
            piece_ids = tokenizer(piece).input_ids[1:-1]
            tokens += piece_ids
            weights += [weight] * len(piece_ids)
        tokens, weights = tokens[:length - 2], weights[:length - 2]
        pad = length - 2 - len(tokens)
        ids_rows.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        weight_rows.append([1.0, *weights, 1.0] + [1.0] * pad)
    return torch.tensor(ids_rows), torch.tensor(weight_rows)
