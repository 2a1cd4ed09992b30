"""From probabilities to a caption: thresholds, MCut, rating, and the tag clean-ups users rely on."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from loratrain.core.errors import ConfigError

from ..captions import dedupe
from .config import TagConfig
from .labels import CHARACTER, GENERAL, RATING, TagLabels

#: Kaomoji whose underscore is part of the face (toriato / picobyte lists).
KAOMOJI = {
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
}
_ESCAPE = re.compile(r"([\\()])")


def mcut_threshold(probs: np.ndarray) -> float:
    """Midpoint of the largest gap between sorted probabilities (Largeron et al. 2012)."""
    if probs.size < 2:
        return 0.0
    s = np.sort(probs)[::-1]
    gaps = s[:-1] - s[1:]
    t = int(np.argmax(gaps))
    return float((s[t] + s[t + 1]) / 2)


def parse_replacements(spec: str) -> list[tuple[str, str]]:
    """sd-scripts' `src,dst;src2,dst2`, where `\\,` and `\\;` are literal."""
    out = []
    if not spec.strip():
        return out
    pairs = re.split(r"(?<!\\);", spec)
    for pair in pairs:
        if not pair.strip():
            continue
        parts = re.split(r"(?<!\\),", pair)
        if len(parts) != 2:
            raise ConfigError(f"tag_replacement: {pair!r} is not 'source,replacement'")
        src, dst = (p.replace("\\,", ",").replace("\\;", ";").strip() for p in parts)
        out.append((src, dst))
    return out


def _plain(tag: str) -> str:
    """Spelling-insensitive key: `long_hair` and `long hair` are the same tag."""
    return tag.replace("_", " ").strip().lower()


@dataclass
class Prediction:
    """One image's tags, ready to write, plus what the model said."""

    tags: list[str]
    rating: str
    scores: dict[str, float]


class TagPostprocessor:
    """Built once per run from the config, so regexes and lists are compiled once."""

    def __init__(self, cfg: TagConfig, labels: TagLabels, model_threshold: float | None = None) -> None:
        self.cfg = cfg
        self.labels = labels
        self.rating_idx = labels.indices(RATING)
        self.general_idx = labels.indices(GENERAL)
        self.character_idx = labels.indices(CHARACTER)
        self.general_threshold = cfg.general_threshold
        self.character_threshold = cfg.character_threshold
        if cfg.thresholds == "model":
            if model_threshold is None:
                raise ConfigError(f"thresholds=model: no published P=R threshold known for tagger {cfg.model!r}; "
                                  "set general_threshold / character_threshold instead")
            self.general_threshold = self.character_threshold = model_threshold
        self.undesired = {_plain(t) for t in cfg.undesired_tags}
        try:
            self.undesired_re = [re.compile(p) for p in cfg.undesired_regex]
        except re.error as e:
            raise ConfigError(f"undesired_regex: {e}") from None
        self.replacements = {_plain(s): d for s, d in parse_replacements(cfg.tag_replacement)}

    def _pick(self, probs: np.ndarray, idx: np.ndarray, threshold: float, mcut: bool, floor: float = 0.0) -> list[int]:
        p = probs[idx]
        if mcut:
            threshold = max(floor, mcut_threshold(p))
        keep = idx[p >= threshold]
        return sorted(keep.tolist(), key=lambda i: -probs[i])

    def _spell(self, name: str) -> list[str]:
        """One model tag as written: expand, underscores, exclusions, replacement."""
        parts = [name]
        if self.cfg.character_tag_expand and name.endswith(")") and "_(" in name:
            head, _, series = name[:-1].rpartition("_(")
            parts = [head, series]
        out = []
        for tag in parts:
            if self.cfg.remove_underscore and tag not in KAOMOJI:
                tag = tag.replace("_", " ")
            if _plain(tag) in self.undesired or any(r.fullmatch(tag) for r in self.undesired_re):
                continue
            tag = self.replacements.get(_plain(tag), tag)
            if tag:
                out.append(tag)
        return out

    def __call__(self, probs: np.ndarray) -> Prediction:
        cfg = self.cfg
        general = self._pick(probs, self.general_idx, self.general_threshold, cfg.general_mcut)
        character = self._pick(probs, self.character_idx, self.character_threshold, cfg.character_mcut, floor=0.15)
        order = character + general if cfg.character_tags_first else general + character
        tags = [t for i in order for t in self._spell(self.labels.names[i])]
        rating = self.labels.names[self.rating_idx[int(np.argmax(probs[self.rating_idx]))]] if self.rating_idx.size else ""
        first = []
        for want in cfg.always_first_tags:
            first.extend(t for t in tags if _plain(t) == _plain(want))
        tags = first + [t for t in tags if t not in first]
        if rating and cfg.rating == "first":
            tags.insert(0, rating)
        elif rating and cfg.rating == "last":
            tags.append(rating)
        if cfg.escape_brackets:
            tags = [_ESCAPE.sub(r"\\\1", t) for t in tags]
        tags = dedupe(list(cfg.trigger_words) + tags)
        scores = {self.labels.names[i]: round(float(probs[i]), 4) for i in order}
        return Prediction(tags=tags, rating=rating, scores=scores)
