"""The sd-scripts caption processing order (BaseDataset.process_caption): prefix/suffix, dropout, wildcards
(or the first line), keep_tokens, token warm-up, shuffle, tag dropout, secondary separator."""
from __future__ import annotations

import math
import random
import re

from .subsets import Subset

_WILDCARD = re.compile(r"\{([^}]+)\}")


def changes_per_step(subset: Subset) -> bool:
    """Whether the subset's captions can differ between steps (then they cannot be encoded once and cached)."""
    return bool(subset.shuffle_caption or subset.caption_dropout_rate or subset.caption_tag_dropout_rate
                or subset.caption_dropout_every_n_epochs or subset.enable_wildcard or subset.token_warmup_step)


def with_trigger(caption: str, trigger: str, sep: str = ",") -> str:
    """`caption` with `trigger` as its first tag, on every line (a multi-line caption is a choice of lines): moved to
    the front where a line has it, added where it has not, so a LoRA's trigger word reaches every step and keep_tokens
    1 keeps it in front when the other tags shuffle."""
    out = []
    for line in caption.split("\n"):
        tags = [t.strip() for t in line.split(sep) if t.strip() and t.strip() != trigger]
        out.append((sep + " ").join([trigger, *tags]))
    return "\n".join(out)


def _wildcards(caption: str, rng: random.Random) -> str:
    """enable_wildcard: one random line of a multi-line caption, each {a|b|c} replaced by one choice; {{ and }}
    stand for literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "\0<", ">\0"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def warmup_length(subset: Subset, n_tags: int, step: int, max_steps: int) -> int | None:
    """token_warmup_min/step: how many of the free tags a step sees (None: all). token_warmup_step < 1 is a
    share of max_train_steps; from token_warmup_min at step 0 the count grows linearly to all of them."""
    until = subset.token_warmup_step
    if until and until < 1:
        until = math.floor(until * max_steps)
    if not until or step >= until:
        return None
    return math.floor(step * (n_tags - subset.token_warmup_min) / until) + subset.token_warmup_min


def process_caption(caption: str, subset: Subset, rng: random.Random, epoch: int = 0, step: int = 0, max_steps: int = 0) -> str:
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
        if subset.trigger_word:  # the trigger stays first (keep_tokens keeps it), ahead of a prefix too
            caption = with_trigger(caption, subset.trigger_word, subset.caption_separator)
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return ""
    if subset.caption_dropout_every_n_epochs > 0 and epoch > 0 and epoch % subset.caption_dropout_every_n_epochs == 0:
        return ""
    caption = _wildcards(caption, rng) if subset.enable_wildcard else caption.split("\n")[0]
    sep = subset.caption_separator
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or subset.keep_tokens_separator or subset.token_warmup_step:
        suffix: list[str] = []
        if subset.keep_tokens_separator and subset.keep_tokens_separator in caption:
            fixed_text, rest_text = caption.split(subset.keep_tokens_separator, 1)
            if subset.keep_tokens_separator in rest_text:  # a second separator: the tags after it stay at the end
                rest_text, suffix_text = rest_text.split(subset.keep_tokens_separator, 1)
                suffix = [t.strip() for t in suffix_text.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_text.split(sep) if t.strip()]
            rest = [t.strip() for t in rest_text.split(sep) if t.strip()]
        else:
            tags = [t.strip() for t in caption.split(sep) if t.strip()]
            fixed, rest = tags[: subset.keep_tokens], tags[subset.keep_tokens:]
        keep = warmup_length(subset, len(rest), step, max_steps)
        if keep is not None:
            rest = rest[:keep]
        if subset.shuffle_caption:
            rng.shuffle(rest)
        if subset.caption_tag_dropout_rate > 0:
            rest = [t for t in rest if rng.random() >= subset.caption_tag_dropout_rate]
        caption = (sep + " ").join(fixed + rest + suffix)
    if subset.secondary_separator:  # tags joined by it moved and dropped as one; now they become ordinary tags
        caption = caption.replace(subset.secondary_separator, sep)
    return caption
