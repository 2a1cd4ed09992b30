"""The CLIP tokenizer, built offline from the vocabulary shipped in `loratrain.configs` (one builder for all)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """SD1's CLIP-L tokenizer pads with `<|endoftext|>`, OpenCLIP (SD2, SDXL's second encoder) with `!`."""
    from transformers import CLIPTokenizer

    from loratrain import configs

    root = configs.path("tokenizers", "clip")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), pad_token=pad_token, model_max_length=77)


@lru_cache(maxsize=65536)
def token_count(text: str) -> int:
    """CLIP tokens of `text` without the start/end tokens: what counts against the 75-token chunk."""
    return len(clip_tokenizer()(text, add_special_tokens=False)["input_ids"])
