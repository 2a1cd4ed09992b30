"""The T5 tokenizer shipped in configs/tokenizers/t5 (issue 25: "the T5 tokenizer files ship in configs/"): it is T5
v1.1's vocabulary (the ids transformers' own T5 tokenizer tests expect), it is what a FLUX.1 / SD3 run uses when no
`--t5_tokenizer` is given and the model is not a diffusers folder, it ships with its licence, and the generator script
reproduces it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loratrain import configs
from loratrain.core.models.flux_loading import find_t5_tokenizer, load_t5_tokenizer

SHIPPED = configs.path("tokenizers", "t5")


def test_the_shipped_tokenizer_is_t5_v1_1s():
    tok = load_t5_tokenizer(SHIPPED)
    assert len(tok) == 32100
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<unk>", "<extra_id_0>", "<extra_id_99>"]) == [0, 1, 2, 32099, 32000]
    # transformers' tests/models/t5/test_tokenization_t5.py (t5-base, the same SentencePiece vocabulary)
    assert tok("A long paragraph for summarization.")["input_ids"] == [71, 307, 8986, 21, 4505, 1635, 1707, 5, 1]
    assert tok("This is a test")["input_ids"] == [100, 19, 3, 9, 794, 1]
    # the way FLUX / SD3 encode: padded to a fixed length with <pad> (0), </s> kept
    batch = tok(["a photo of sks dog"], padding="max_length", max_length=12, truncation=True)["input_ids"][0]
    assert batch[:7] == [3, 9, 1202, 13, 3, 7, 157] and batch.count(0) == 12 - batch.index(1) - 1
    licence = (SHIPPED / "LICENSE.txt").read_text()
    assert "google/t5-v1_1-xxl" in licence and "Apache License" in licence and "Version 2.0" in licence


def test_without_t5_tokenizer_a_single_file_run_uses_the_shipped_one(tmp_path):
    from loratrain.core.paths import confined

    assert find_t5_tokenizer(tmp_path / "flux1-dev.safetensors", "", "tokenizer_2") == SHIPPED
    with confined([tmp_path]):  # the app's roots: the shipped vocabulary is the package's own, still readable
        assert find_t5_tokenizer(tmp_path / "flux1-dev.safetensors", "", "tokenizer_2") == SHIPPED
        assert len(load_t5_tokenizer(SHIPPED)) == 32100
    folder = tmp_path / "diffusers_flux"
    (folder / "tokenizer_2").mkdir(parents=True)
    (folder / "tokenizer_2" / "tokenizer.json").write_bytes((SHIPPED / "tokenizer.json").read_bytes())
    assert find_t5_tokenizer(folder, "", "tokenizer_2") == folder / "tokenizer_2"  # a diffusers folder's own first


@pytest.mark.parametrize("source", ["tokenizer.json"])
def test_the_generator_rewrites_the_same_vocabulary(tmp_path, source):
    script = Path(configs.__file__).parent / "make_t5_tokenizer.py"
    src = tmp_path / source
    src.write_bytes((SHIPPED / "tokenizer.json").read_bytes())
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(script), str(src), "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "tokenizer.json").read_bytes() == (SHIPPED / "tokenizer.json").read_bytes()  # deterministic
    bad = tmp_path / "not_t5.json"
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")).save(str(bad))
    res = subprocess.run([sys.executable, str(script), str(bad), "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and "not T5 v1.1" in res.stdout + res.stderr
    assert not (tmp_path / "bad").exists()  # nothing written for a wrong input
