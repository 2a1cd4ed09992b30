"""A1111 prompt weights in sampling, generate and the grid: one parser, A1111's emphasis formula, BREAK and chunks."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from loratrain.core.models.loading import load_model
from loratrain.core.prompt_encoding import pipeline_embeds
from loratrain.core.prompt_weights import UP, parse_weights, prompt_chunks
from loratrain.core.sampling import SamplePrompt, build_pipeline, generate
from loratrain.core.tokenizer import clip_tokenizer


@pytest.fixture(scope="module")
def models(tiny_files):
    out = {fam: load_model(tiny_files[f"{fam}_file"]) for fam in ("sd1", "sdxl")}
    # The tiny SD1 encoder's output is a layer norm with zero bias: every token's mean is 0, and A1111's mean rescale
    # would divide noise by noise. Trained CLIP's final norm has a learned bias; give the tiny one a bias too.
    te = out["sd1"].text_encoders[0]
    with torch.no_grad():
        getattr(te, "text_model", te).final_layer_norm.bias.add_(0.25)
    return out


# -- the parser ------------------------------------------------------------------------------------------------------
def test_the_parser_reads_spaces_in_weights_breaks_and_escapes():
    assert parse_weights("(red: 0.7 ) dog") == [("red", 0.7), (" dog", 1.0)]
    assert parse_weights("a dog BREAK a cat", breaks=True) == [("a dog", 1.0), None, ("a cat", 1.0)]
    assert parse_weights("a dog BREAK a cat") == [("a dog BREAK a cat", 1.0)]  # captions: BREAK is text
    assert parse_weights("BREAKfast, NOBREAK", breaks=True) == [("BREAKfast, NOBREAK", 1.0)]  # only the whole word
    got = parse_weights("(a BREAK b)", breaks=True)  # the weight spans the break, as in A1111
    assert got == [("a", pytest.approx(UP)), None, ("b", pytest.approx(UP))]
    assert parse_weights(r"\(not weighted:1.5\) \[x\]") == [("(not weighted:1.5) [x]", 1.0)]
    assert parse_weights("(word:x) [") == [("word:x", pytest.approx(UP)), (" ", 1.0)]  # not a number: text


@pytest.mark.parametrize(("prompt", "said"), [("(x:" + "9" * 400 + ")", "the weight of 'x' comes to"),
                                             ("(x:1" + "0" * 40 + ")", "the weight of 'x' comes to"),
                                             ("(" * 2000 + "x", "brackets nested more than 100 deep")])
def test_a_weight_the_encoder_cannot_take_is_refused_before_any_image(prompt, said, tiny_files, tmp_path, capsys):
    """inf (a 400-digit weight) or 1.1^2000 turned every embedding into nan: a black image, written as if all was well.
    Now the parser refuses it, and generate says so before the model loads; a negative weight stays A1111's."""
    from loratrain.cli import main

    with pytest.raises(ValueError, match=said):
        parse_weights(prompt)
    assert parse_weights("(x:-5)") == [("x", -5.0)]
    out = tmp_path / "g.png"
    assert main(["generate", "--model", str(tiny_files["sd1_file"]), "--prompt", "a dog", "--negative_prompt", prompt,
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: prompt: {said}") and not out.exists() and "model:" not in err
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a dog --n {prompt}\n", encoding="utf-8")
    from loratrain.training.config_checks import prompt_problems

    (problem,) = prompt_problems(type("Cfg", (), {"sample_prompts": str(prompts)})())
    assert problem[0] == "sample_prompts" and said in problem[1]


def test_break_and_long_prompts_make_chunks_as_a1111():
    tok = clip_tokenizer()
    ids = lambda text: tok(text).input_ids[1:-1]  # noqa: E731
    chunks = prompt_chunks(tok, "a red dog BREAK a blue cat")
    assert [c[0] for c in chunks] == [ids("a red dog"), ids("a blue cat")]
    assert prompt_chunks(tok, "a dog BREAK") == [(ids("a dog"), [1.0] * len(ids("a dog")))]  # no empty chunk at the end
    assert prompt_chunks(tok, "") == [([], [])]
    words = " ".join(["cat"] * 80)  # 80 tokens, no comma: 75 + 5
    assert [len(c[0]) for c in prompt_chunks(tok, words)] == [75, 5]
    # a comma within the last 20 tokens of a full chunk: the words after it move on to the next chunk
    phrase = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = prompt_chunks(tok, phrase)
    assert len(first[0]) == 71 and first[0][-1] == tok.convert_tokens_to_ids(",</w>") and len(second[0]) == 10


# -- A1111's formula on the tiny text encoders ------------------------------------------------------------------------
def _expected(plain: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis of one 77-token chunk (1, 77, D): z * w, then back to the unweighted mean."""
    weighted = plain * weights[None, :, None]
    return weighted * (plain.mean() / weighted.mean())


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
@pytest.mark.parametrize("text,weight", [("(red:0.7)", 0.7), ("(red)", 1.1), ("[red]", 1 / 1.1), ("((red:1.5))", 1.5 * 1.1), ("(((red)))", 1.1 ** 3),
                                         ("[(red)]", 1.0)])
def test_a_weighted_word_follows_the_a1111_formula(models, fam, text, weight):
    model = models[fam]
    plain = pipeline_embeds(model, "a red dog, sunny", weighted=False)
    got = pipeline_embeds(model, f"a {text} dog, sunny")
    red = model.tokenizers[0]("a red dog, sunny").input_ids.index(model.tokenizers[0]("red").input_ids[1])
    weights = torch.ones(77)
    weights[red] = weight
    hidden = plain["prompt_embeds"]
    split = model.text_encoders[0].config.hidden_size  # SDXL: each encoder's half has its own mean
    parts = [hidden] if not model.family.is_sdxl else [hidden[..., :split], hidden[..., split:]]
    expected = torch.cat([_expected(p, weights) for p in parts], dim=-1)
    assert torch.allclose(got["prompt_embeds"], expected, atol=1e-6, rtol=1e-5)
    if weight != 1.0:
        assert not torch.allclose(got["prompt_embeds"], hidden)
    assert torch.equal(got["negative_prompt_embeds"], plain["negative_prompt_embeds"])
    if fam == "sdxl":  # the pooled output is the unweighted one
        assert torch.equal(got["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])


def test_escaped_brackets_are_literal_text(models):
    model = models["sd1"]
    got = pipeline_embeds(model, r"a \(red\) dog \[x\]")
    plain = pipeline_embeds(model, "a (red) dog [x]", weighted=False)
    assert torch.equal(got["prompt_embeds"], plain["prompt_embeds"])


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_break_gives_two_chunks_the_second_starting_at_the_break(models, fam):
    model = models[fam]
    got = pipeline_embeds(model, "a red dog BREAK (a blue cat:1.2)", "ugly")
    first = pipeline_embeds(model, "a red dog", "ugly")
    second = pipeline_embeds(model, "(a blue cat:1.2)")
    empty = pipeline_embeds(model, "", "")
    assert got["prompt_embeds"].shape[1] == 2 * 77
    assert torch.allclose(got["prompt_embeds"][:, :77], first["prompt_embeds"], atol=1e-6)
    assert torch.allclose(got["prompt_embeds"][:, 77:], second["prompt_embeds"], atol=1e-6)
    # the one-chunk negative prompt is padded with an empty chunk to the prompt's length
    assert got["negative_prompt_embeds"].shape == got["prompt_embeds"].shape
    assert torch.allclose(got["negative_prompt_embeds"][:, :77], first["negative_prompt_embeds"], atol=1e-6)
    assert torch.allclose(got["negative_prompt_embeds"][:, 77:], empty["prompt_embeds"], atol=1e-6)
    if fam == "sdxl":  # pooled from the first chunk
        assert torch.allclose(got["pooled_prompt_embeds"], first["pooled_prompt_embeds"], atol=1e-6)


# -- plain prompts: exactly what the diffusers pipeline made of them before ------------------------------------------
@pytest.mark.parametrize("fam,clip_skip,negative", [("sd1", 1, ""), ("sd1", 2, "blurry, ugly"), ("sdxl", 1, ""),
                                                     ("sdxl", 2, "blurry")])
def test_plain_prompts_give_the_pipelines_own_embeddings(models, fam, clip_skip, negative, monkeypatch):
    from types import SimpleNamespace

    model = models[fam]
    te = model.text_encoders[0]
    if not hasattr(te, "text_model"):  # transformers 5's CLIPTextModel has none: diffusers' SD clip skip needs one
        monkeypatch.setattr(te, "text_model", SimpleNamespace(final_layer_norm=te.final_layer_norm), raising=False)
    pipe = build_pipeline(model, "ddim")
    prompt = "a photo of a red dog on a hill, sunny day"
    kw = {"clip_skip": clip_skip - 1 if clip_skip > 1 else None}
    with torch.no_grad():
        if fam == "sdxl":
            ref = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative or None, **kw)
            names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        else:
            ref = pipe.encode_prompt(prompt, "cpu", 1, True, negative or None, **kw)
            names = ["prompt_embeds", "negative_prompt_embeds"]
    got = pipeline_embeds(model, prompt, negative, clip_skip, zero_empty_negative=pipe.config.get("force_zeros_for_empty_prompt", False))
    assert sorted(got) == sorted(names)
    for name, tensor in zip(names, ref):
        assert torch.equal(got[name], tensor), name


# -- end to end --------------------------------------------------------------------------------------------------------
def test_generate_with_a_weighted_prompt_differs_and_a_plain_one_is_unchanged(models, tmp_path):
    model = models["sd1"]
    base = dict(negative_prompt="blurry", width=64, height=64, steps=2, cfg_scale=5.0, seed=7)
    plain = generate(model, SamplePrompt("a red dog", **base), tmp_path / "plain.png")
    weighted = generate(model, SamplePrompt("a (red:1.6) dog", **base), tmp_path / "weighted.png")
    assert "a (red:1.6) dog" in weighted.parameters
    a, b = (torch.tensor(list(Image.open(p.path).convert("RGB").getdata())) for p in (plain, weighted))
    assert not torch.equal(a, b)
    # the plain prompt's image is the one diffusers made from the prompt text, as before
    pipe = build_pipeline(model, "ddim")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe("a red dog", negative_prompt="blurry", width=64, height=64, num_inference_steps=2, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(7), output_type="pil").images[0]
    assert torch.equal(a, torch.tensor(list(ref.convert("RGB").getdata())))
    # clip skip on SD1/SD2: diffusers' own encode_prompt needs `text_model`, which transformers 5's CLIPTextModel lacks
    assert generate(model, SamplePrompt("a (red:1.6) dog", **base), tmp_path / "skip.png", clip_skip=2).path.is_file()


def test_generate_job_and_grid_take_weighted_prompts(tiny_files, tmp_path):
    from loratrain.grid.config import GenerateConfig
    from loratrain.grid.generate import run_generate

    res = run_generate(GenerateConfig(model=str(tiny_files["sdxl_file"]), prompt="a (red:1.3) dog BREAK [sunny]",
                                      negative_prompt="(blurry:1.2)", width=64, height=64, steps=1, seed=3,
                                      output=str(tmp_path / "g.png")))
    assert res.image.is_file() and "a (red:1.3) dog BREAK [sunny]" in res.parameters


def test_a_sample_prompt_file_with_weights_samples_in_training(tiny_files, dataset, tmp_path, monkeypatch):
    from loratrain.core import sampling
    from loratrain.core.progress import RecordingReporter
    from loratrain.training.trainer import run_train

    from .conftest import quick_config

    seen = []
    real = sampling.pipeline_embeds

    def spy(model, prompt, negative, *args, **kw):
        out = real(model, prompt, negative, *args, **kw)
        seen.append((prompt, negative, out["prompt_embeds"].shape[1]))
        return out

    monkeypatch.setattr(sampling, "pipeline_embeds", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a (circle:1.4) BREAK [square] --n (blurry:1.2) --s 1 --w 64 --h 64 --d 5\n")
    run_train(quick_config(tiny_files["sd1_file"], dataset, tmp_path / "o", sample_prompts=str(prompts), max_train_steps=1,
                           sample_every_n_steps=1),
              RecordingReporter())
    assert ("a (circle:1.4) BREAK [square]", "(blurry:1.2)", 154) in seen  # two chunks: BREAK was read
    assert list((tmp_path / "o" / "sample").glob("*.png"))


def test_prompts_that_are_no_prompt_are_refused_quickly():
    """Nesting past 100 brackets or more than 64 chunks is refused before the work they would cost (a parse that grows
    with depth x length, one text-encoder pass per chunk)."""
    from loratrain.core.prompt_weights import MAX_CHUNKS, parse_weights, prompt_chunks

    tok = clip_tokenizer()
    with pytest.raises(ValueError, match="nested more than 100 deep"):
        parse_weights("(a" * 16000)
    with pytest.raises(ValueError, match=f"at most {MAX_CHUNKS}"):
        prompt_chunks(tok, "cat BREAK " * 10000)
    assert len(prompt_chunks(tok, "cat BREAK " * (MAX_CHUNKS - 1) + "dog")) == MAX_CHUNKS
    assert parse_weights("(" * 99 + "a" + ")" * 99)[0][1] == pytest.approx(1.1 ** 99)
