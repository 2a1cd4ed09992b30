"""Named preset tables (`name<TAB>comma-separated values`) and the LoRA block-weight presets users know.

The LoRA block-weight presets are hako-mikan's extension's 17-value rows (BASE, IN01..OUT11 as it
orders them); users can add their own rows in the same TSV format.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).parent / "presets"


def read_tsv(path: Path, length: int | None = None) -> dict[str, list[float]]:
    """`name<TAB>v1,v2,...` per line; `#` comments and a `preset_name` header line are skipped."""
    out: dict[str, list[float]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#") or line.startswith("preset_name"):
            continue
        name, _, values = line.partition("\t")
        try:
            vec = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"{path}:{n}: preset {name!r} has a value that is not a number") from None
        if length is not None and len(vec) != length:
            raise ValueError(f"{path}:{n}: preset {name!r} has {len(vec)} values, expected {length}")
        out[name.strip()] = vec
    return out


@cache
def lora_block_presets() -> dict[str, list[float]]:
    return read_tsv(HERE / "lora_block_weight.tsv", 17)
