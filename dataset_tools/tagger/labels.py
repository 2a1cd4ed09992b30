"""`selected_tags.csv`: row i names output i; category 9 rating, 0 general, 4 character."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loratrain.core.errors import ConfigError

RATING, GENERAL, CHARACTER = 9, 0, 4


@dataclass
class TagLabels:
    names: list[str]
    categories: np.ndarray

    def indices(self, category: int) -> np.ndarray:
        return np.flatnonzero(self.categories == category)

    def __len__(self) -> int:
        return len(self.names)


def read_labels(path: str | Path) -> TagLabels:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise ConfigError(f"tag list not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise ConfigError(f"{path}: header must start with tag_id,name,category (got {rows[0][:3] if rows else 'nothing'})")
    names, cats = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            names.append(row[1])
            cats.append(int(row[2]))
        except (IndexError, ValueError):
            raise ConfigError(f"{path}:{line}: expected tag_id,name,category,... got {row!r}") from None
    if not names:
        raise ConfigError(f"{path}: no tags")
    return TagLabels(names=names, categories=np.asarray(cats, dtype=np.int64))
