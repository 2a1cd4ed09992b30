"""Shipped model configs and tokenizer data for loading single-file checkpoints offline."""
from pathlib import Path

ROOT = Path(__file__).parent


def path(*parts: str) -> Path:
    return ROOT.joinpath(*parts)
