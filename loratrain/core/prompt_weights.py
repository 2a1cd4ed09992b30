"""The A1111 attention syntax, one parser for training captions and for sample / generate / grid prompts.

`(word)` x1.1, `((word))` x1.1^2, `[word]` /1.1, `(word:1.3)` x1.3 (`(word: 1.3 )` too), nested brackets
multiply, unclosed ones still count, `\\(` `\\)` `\\[` `\\]` are literal brackets. `BREAK` (a whole word, in
capitals) ends the current 75-token chunk; only prompt encoding for sampling reads it
(`prompt_chunks`), captions keep it as text (sd-scripts' --weighted_captions never knew it).

The encoders live elsewhere: `training/conditioning.py` scales the weighted tokens' outputs as
sd-scripts does, `core/prompt_encoding.py` as A1111 does (with its mean rescale).
"""
from __future__ import annotations

import re
from typing import Any

import torch

UP, DOWN = 1.1, 1 / 1.1
#: the largest weight a run may end with: text encoder outputs times more than this overflow float32 (inf, then NaN:
#: a black image), so a huge `(x:1e40)` or brackets nested a thousand deep are refused with the text they weight
MAX_WEIGHT = 1e30
WINDOW = 75  # CLIP's 77 positions less BOS and the closing token
#: brackets open at once: deeper nesting is no prompt (each level rescales everything inside it, so parsing cost grows
#: with depth x length), and (1.1)^100 is already far beyond any useful weight
MAX_DEPTH = 100
#: 75-token chunks a prompt may have (4,800 tokens): each is one text-encoder pass and 77 positions of attention
MAX_CHUNKS = 64
COMMA_BACKTRACK = 20  # A1111's default: a chunk that fills up moves the words after its last comma (within 20) on
_EXPLICIT = re.compile(r":\s*([+-]?[\d.]+)\s*\)")
_BREAK = re.compile(r"BREAK\b")
_ESCAPABLE = "()[]\\"

Run = tuple[str, float]


def parse_weights(text: str, breaks: bool = False) -> list[Run | None]:
    """Runs of text and their weight, adjacent equal weights merged; with `breaks`, a None where a BREAK stood.

    Unclosed brackets still count, as in A1111 and sd-scripts; a `:` that is not a weight is text.
    """
    runs: list[list[Any] | None] = []  # [text, weight], or None for a BREAK
    round_open: list[int] = []
    square_open: list[int] = []
    plain_from = 0  # where the current stretch of plain text began: BREAK strips the spaces before it, back to here

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run is not None:
                run[1] *= factor

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            runs.append([text[i + 1], 1.0])
            plain_from = len(runs)
            i += 2
            continue
        explicit = _EXPLICIT.match(text, i) if c == ":" and round_open else None
        factor = _number(explicit.group(1)) if explicit else None
        if factor is not None:
            scale(round_open.pop(), factor)
            i = explicit.end()  # type: ignore[union-attr]
        elif breaks and c == "B" and _BREAK.match(text, i) and (i == 0 or not _is_word(text[i - 1])):
            while len(runs) > plain_from and runs[-1] is not None and runs[-1][0].isspace():
                runs.pop()
            runs.append(None)
            i += len("BREAK")
            while i < len(text) and text[i].isspace():
                i += 1
        elif c in "([":
            if len(round_open) + len(square_open) >= MAX_DEPTH:
                raise ValueError(f"brackets nested more than {MAX_DEPTH} deep (at character {i}); that is no prompt weight")
            (round_open if c == "(" else square_open).append(len(runs))
            i += 1
        elif c == ")" and round_open:
            scale(round_open.pop(), UP)
            i += 1
        elif c == "]" and square_open:
            scale(square_open.pop(), DOWN)
            i += 1
        else:
            runs.append([c, 1.0])
            i += 1
            continue
        plain_from = len(runs)
    for start in round_open:
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)
    merged: list[Run | None] = []
    for run in runs:
        last = merged[-1] if merged else None
        if run is not None and last is not None and last[1] == run[1]:
            merged[-1] = (last[0] + run[0], last[1])
        else:
            merged.append(None if run is None else (run[0], run[1]))
    for run in merged:
        if run is not None and not abs(run[1]) <= MAX_WEIGHT:  # also nan
            raise ValueError(f"the weight of {run[0].strip()[:40]!r} comes to {run[1]:g}, beyond ±{MAX_WEIGHT:g} (a "
                             "huge (text:weight) or brackets nested too deep); the text encoder's output would overflow")
    return merged or [("", 1.0)]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's tokens without BOS/EOS (tokenize + ids: no "longer than 77 tokens" warning for long prompts)."""
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) if text else []


def weighted_ids(tokenizer: Any, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), both (B, length): BOS, the runs' tokens (truncated), EOS, padding; weight 1 outside the text.

    For training captions (sd-scripts' --weighted_captions): BREAK is text here, as it always was in captions.
    """
    ids_rows, weight_rows = [], []
    for prompt in prompts:
        tokens: list[int] = []
        weights: list[float] = []
        for run in parse_weights(prompt):
            assert run is not None  # no breaks asked for
            piece_ids = _token_ids(tokenizer, run[0])
            tokens += piece_ids
            weights += [run[1]] * len(piece_ids)
        tokens, weights = tokens[:length - 2], weights[:length - 2]
        pad = length - 2 - len(tokens)
        ids_rows.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        weight_rows.append([1.0, *weights, 1.0] + [1.0] * pad)
    return torch.tensor(ids_rows), torch.tensor(weight_rows)


def prompt_chunks(tokenizer: Any, prompt: str, weighted: bool = True) -> list[tuple[list[int], list[float]]]:
    """A prompt as A1111 cuts it: chunks of at most 75 (token, weight)s, each encoded on its own.

    A chunk ends when it is full (moving the words after a comma in its last 20 tokens on to the next,
    so a phrase is not cut in two), or at BREAK. A trailing BREAK opens no empty chunk; an empty prompt
    is one empty chunk. `weighted=False` reads the prompt as plain text (every weight 1, no BREAK).
    """
    runs = parse_weights(prompt, breaks=True) if weighted else [(prompt, 1.0)]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for run in runs:
        if run is None:
            chunks.append((tokens, weights))
            tokens, weights, last_comma = [], [], -1
            continue
        for token in _token_ids(tokenizer, run[0]):
            if len(tokens) == WINDOW:
                if token != comma and last_comma >= 0 and WINDOW - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    chunks.append((tokens[:cut], weights[:cut]))
                    tokens, weights = tokens[cut:], weights[cut:]
                else:
                    chunks.append((tokens, weights))
                    tokens, weights = [], []
                last_comma = -1
            if token == comma:
                last_comma = len(tokens)
            tokens.append(token)
            weights.append(run[1])
    if tokens or not chunks:
        chunks.append((tokens, weights))
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"the prompt makes {len(chunks)} chunks of {WINDOW} tokens (BREAK starts one); at most {MAX_CHUNKS}")
    return chunks
