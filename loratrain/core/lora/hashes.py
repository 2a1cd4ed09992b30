"""The hashes A1111 and its additional-networks extension show for models and LoRAs.

sd-scripts writes them into every LoRA it saves (`sshs_model_hash`, `sshs_legacy_hash`) and names
the base model by hash (`ss_sd_model_hash`, `ss_new_sd_model_hash`); the webui uses them to match
a LoRA to the model it was trained on and to show which file a picture used. They are computed
the same way here so that a LoRA we write shows the same identity as one sd-scripts wrote.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000  # 64 KiB at 1 MiB: the webui's old short model hash
BLOCK = 1 << 20


def legacy_hash(fh: io.BufferedIOBase) -> str:
    """The webui's pre-2023 "model hash": SHA-256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    fh.seek(LEGACY_OFFSET)
    return hashlib.sha256(fh.read(LEGACY_SIZE)).hexdigest()[:8]


def safetensors_data_hash(fh: io.BufferedIOBase) -> str:
    """SHA-256 of a safetensors file's tensor bytes (everything after the JSON header)."""
    fh.seek(0)
    header_len = int.from_bytes(fh.read(8), "little")
    fh.seek(8 + header_len)
    digest = hashlib.sha256()
    while block := fh.read(BLOCK):
        digest.update(block)
    return digest.hexdigest()


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` of a LoRA about to be saved.

    Both are taken over the file as it would be with only its `ss_*` metadata, so that editing the
    other keys later (a title, a thumbnail) does not change the LoRA's identity.
    """
    data = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    buf = io.BytesIO(data)
    return {"sshs_model_hash": safetensors_data_hash(buf), "sshs_legacy_hash": legacy_hash(buf)}


def model_file_hashes(path: str | Path) -> dict[str, str]:
    """`ss_sd_model_hash` (the legacy short hash) and `ss_new_sd_model_hash` (SHA-256 of the whole file).

    Only for a single-file checkpoint, as sd-scripts: a diffusers folder has no one file to hash.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        short = legacy_hash(fh)
        fh.seek(0)
        while block := fh.read(BLOCK * 8):
            digest.update(block)
    return {"ss_sd_model_hash": short, "ss_new_sd_model_hash": digest.hexdigest()}
