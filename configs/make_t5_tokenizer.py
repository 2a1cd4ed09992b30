"""Regenerate the offline T5 tokenizer in configs/tokenizers/t5/ (FLUX.1's and SD3's T5-XXL text encoder).

Why: a single-file FLUX.1 / SD3.5 checkpoint and sd-scripts' separate t5xxl file carry no vocabulary, and loratrain
works offline; the CLIP vocabulary ships the same way (make_clip_tokenizer.py). The vocabulary is Google's T5 v1.1
SentencePiece model (32000 pieces + 100 `<extra_id_N>`; Apache-2.0, as google/t5-v1_1-xxl declares it), the one
FLUX.1's `tokenizer_2/` and SD3.5's `tokenizer_3/` hold. This script writes it as a Hugging Face `tokenizers` file:
a Unigram model with T5's normalizer (SentencePiece's precompiled NFKC map, trailing spaces stripped, runs of spaces
collapsed), Metaspace pre-tokenizer and an appended `</s>`.

Input, either of:
- a `spiece.model` (e.g. google/t5-v1_1-xxl's, or FLUX.1's tokenizer_2/spiece.model): converted with transformers'
  SentencePiece converter (needs the `sentencepiece` and `protobuf` packages);
- an existing T5 `tokenizer.json` (FLUX.1's tokenizer_2/, SD3.5's tokenizer_3/): read and written back, checked to be
  T5 v1.1's (vocabulary size, special tokens, piece order).

Run: python configs/make_t5_tokenizer.py PATH/TO/spiece.model|tokenizer.json [--out DIR]
The shipped file was written from the T5 v1.1 tokenizer.json as ComfyUI distributes it (comfy/text_encoders/
t5_tokenizer, commit 3cd7b32); tests/test_t5_tokenizer.py pins its size, specials and a few known ids.
"""
from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).parent / "tokenizers" / "t5"
VOCAB = 32100  # 32000 SentencePiece pieces + <extra_id_0..99>
SPECIALS = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<extra_id_0>": 32099, "<extra_id_99>": 32000}


def from_spiece(path: Path):  # noqa: ANN201 - a tokenizers.Tokenizer
    from transformers import T5Tokenizer
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    return convert_slow_tokenizer(T5Tokenizer(str(path), legacy=True))


def check(tok) -> None:  # noqa: ANN001 - a tokenizers.Tokenizer
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) != VOCAB:
        raise SystemExit(f"{len(vocab)} tokens: not T5 v1.1's {VOCAB}")
    for token, i in SPECIALS.items():
        if vocab.get(token) != i:
            raise SystemExit(f"{token} has id {vocab.get(token)}, T5's is {i}")
    ids = tok.encode("The cat.").ids
    if ids[-1] != 1:
        raise SystemExit(f"'The cat.' -> {ids}: no </s> appended")


def main(source: str, out: Path = OUT) -> None:
    from tokenizers import Tokenizer

    path = Path(source)
    tok = from_spiece(path) if path.suffix == ".model" else Tokenizer.from_file(str(path))
    check(tok)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp), pretty=False)
    tmp.replace(out / "tokenizer.json")
    print(f"wrote {out / 'tokenizer.json'} ({(out / 'tokenizer.json').stat().st_size} bytes)")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], Path(args[args.index("--out") + 1]) if "--out" in args else OUT)
