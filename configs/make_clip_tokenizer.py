"""Regenerate the offline CLIP tokenizer files in configs/tokenizers/.

Why: loading a single-file checkpoint offline needs the CLIP BPE vocabulary, which no
checkpoint carries. The BPE merge list ships inside the `open-clip-torch` wheel on PyPI;
the Hugging Face `vocab.json`/`merges.txt` pair is a deterministic function of it
(byte alphabet, the same with an end-of-word marker, one token per merge, two specials).

Run: pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc && python configs/make_clip_tokenizer.py /tmp/oc/*.whl
"""
from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).parent / "tokenizers"
N_MERGES = 49152 - 256 - 2


def byte_alphabet() -> list[str]:
    """The printable stand-ins GPT-2/CLIP BPE uses for the 256 byte values, in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    alphabet = byte_alphabet()
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    base = HERE / "clip"
    base.mkdir(parents=True, exist_ok=True)
    (base / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (base / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {base}")


if __name__ == "__main__":
    main(sys.argv[1])
