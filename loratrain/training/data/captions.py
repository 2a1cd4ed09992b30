"""The sd-scripts caption processing order (prefix/suffix, dropout, keep_tokens, shuffle, tag dropout)."""
from __future__ import annotations

import random

from .subsets import Subset


def process_caption(caption: str, subset: Subset, rng: random.Random, epoch: int = 0) -> str:
    """prefix/suffix -> caption dropout -> keep_tokens + shuffle -> tag dropout."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return ""
    if subset.caption_dropout_every_n_epochs > 0 and epoch > 0 and epoch % subset.caption_dropout_every_n_epochs == 0:
        return ""
    sep = subset.caption_separator
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or subset.keep_tokens_separator):
        return caption
    if subset.keep_tokens_separator and subset.keep_tokens_separator in caption:
        fixed_text, rest_text = caption.split(subset.keep_tokens_separator, 1)
        fixed = [t.strip() for t in fixed_text.split(sep) if t.strip()]
        rest = [t.strip() for t in rest_text.split(sep) if t.strip()]
    else:
        tags = [t.strip() for t in caption.split(sep) if t.strip()]
        fixed, rest = tags[: subset.keep_tokens], tags[subset.keep_tokens:]
    if subset.shuffle_caption:
        rng.shuffle(rest)
    if subset.caption_tag_dropout_rate > 0:
        rest = [t for t in rest if rng.random() >= subset.caption_tag_dropout_rate]
    return (sep + " ").join(fixed + rest)
