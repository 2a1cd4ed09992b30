"""Review of core / merge / grid: one check of a LoRA spec's weight and block weights for every command, and
`lora convert-ia3` naming a missing or wrong --lora itself."""
from __future__ import annotations

import pytest
import torch

from loratrain.cli import main
from loratrain.core.errors import ConfigError
from loratrain.core.lora.spec import lora_spec_problems
from loratrain.core.safe_io import save_safetensors
from loratrain.core.session import lora_use

NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture
def lora(tmp_path):
    path = tmp_path / "a.safetensors"
    save_safetensors({f"{NAME}.lora_down.weight": torch.ones(2, 4), f"{NAME}.lora_up.weight": torch.ones(4, 2),
                      f"{NAME}.alpha": torch.tensor(2.0)}, path)
    return path


@pytest.mark.parametrize("tail", [":nan", ":inf", ":1:1,1,1", ":1:NO_SUCH_PRESET", ":1:1,2,x"])
def test_merge_and_sampling_refuse_a_bad_spec_with_the_same_words(lora, tail):
    text = f"{lora}{tail}"
    problems = lora_spec_problems([text], "loras")
    assert len(problems) == 1 and problems[0][1].startswith(f"{text}: ")
    with pytest.raises(ConfigError) as e:
        lora_use(text)
    assert str(e.value) == problems[0][1]


def test_convert_ia3_names_a_missing_or_folder_lora_itself(tmp_path, lora, capsys):
    out = tmp_path / "out" / "o.safetensors"
    for bad, words in ((tmp_path / "nope.safetensors", "(IA)^3 file not found"), (tmp_path, "is a folder")):
        code = main(["lora", "convert-ia3", "--lora", str(bad), "--model", str(tmp_path / "no_model.safetensors"),
                     "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "error: lora: " in err and words in err and "model file" not in err
    code = main(["lora", "convert-ia3", "--lora", str(lora), "--model", str(lora), "--output", str(out), "--rank", "0"])
    assert code == 2 and "rank" in capsys.readouterr().err
    assert not out.parent.exists()


def test_gpu_suite_lora_rows_share_one_helper_and_keep_their_words(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    sys.modules.pop("gpu_suite", None)
    import gpu_suite

    calls = []

    class Stub:
        tiny, rows = False, []

        def bench(self, script, args, timeout):
            calls.append((script, args, timeout))
            ok = "--batch" in args and args[args.index("--size") + 1] == "sdxl"
            return (0, "  lora : 2.50 steps/s  peak 1234 MB", timeout) if ok else (1, "boom", timeout)

        def mfu(self, rate, flops):
            return "m"

    s = Stub()
    gpu_suite.sdxl(s)
    row = s.rows[-1]
    assert (row.name, row.result, row.memory, row.mfu) == ("SDXL LoRA 1024px bf16 batch 1", "2.50 it/s", "1,234 MiB", "m")
    assert row.note and calls[-1][2] == 240 and calls[-1][1][calls[-1][1].index("--steps") + 1] == "4"
    gpu_suite.sd15(s)
    assert all(r.name.startswith("SD1.5 LoRA 512px bf16") and not r.memory and not r.note for r in s.rows[1:])
    assert calls[-1][2] == 150 and calls[-1][1][calls[-1][1].index("--warmup") + 1] == "3"
