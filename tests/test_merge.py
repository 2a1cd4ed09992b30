"""Checkpoint merge: block mapping on the real layouts, formulas per key, metadata, and bad inputs."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loratrain.core.errors import UnsafeFileError
from loratrain.core.lora.blocks import block_of
from loratrain.core.models.families import FAMILIES, ModelTypeError
from loratrain.core.models.ldm_keys import map_module, unet_module_table
from loratrain.core.models.tiny import checkpoint_layout, make_tiny_model, tiny_configs, write_single_file
from loratrain.core.safe_io import save_safetensors
from loratrain.merge.checkpoint import run_merge
from loratrain.merge.config import MergeConfig
from loratrain.merge.presets import merge_preset


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATRAIN_CACHE", str(tmp_path / "cache"))


def expected_block(key: str, family: str, cfg: dict) -> str:
    """The block from the diffusers structure (independent of the LDM regexes under test)."""
    if not key.startswith("model.diffusion_model."):
        return "BASE"
    n_levels = 9 if family == "sdxl" else 12
    lpb = cfg["layers_per_block"]
    diff = map_module(key[len("model.diffusion_model."):].rsplit(".", 1)[0], unet_module_table(cfg))
    assert diff is not None, key
    if diff.startswith(("time_embedding", "add_embedding", "conv_in")):
        return "IN00"
    if diff.startswith(("conv_norm_out", "conv_out")):
        return f"OUT{n_levels - 1:02d}"
    if diff.startswith("mid_block"):
        return "M00"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)", diff)
    if m:
        i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
        return f"IN{(i + 1) * (lpb + 1) if kind == 'downsamplers' else 1 + i * (lpb + 1) + j:02d}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)", diff)
    assert m, diff
    i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
    return f"OUT{i * (lpb + 1) + (lpb if kind == 'upsamplers' else j):02d}"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_key_of_the_real_layout_lands_in_its_block(family):
    fam = FAMILIES[family]
    layout = checkpoint_layout(family)  # real key names and shapes, on the meta device
    cfg = fam.shipped_configs()["unet"]
    seen: dict[str, int] = {}
    for key in layout:
        got = block_of(key, fam)
        assert got == expected_block(key, family, cfg), key
        seen[got] = seen.get(got, 0) + 1
    assert len(seen) == (20 if family == "sdxl" else 26)  # every block + BASE
    assert layout["model.diffusion_model.input_blocks.0.0.weight"][0] == (320, 4, 3, 3)  # every family's conv_in
    context = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]  # the cross-attention width tells the families apart
    assert layout["model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"][0][1] == context
    assert block_of("model.diffusion_model.time_embed.0.weight", fam) == "IN00"
    assert block_of("model.diffusion_model.out.2.weight", fam) == ("OUT08" if family == "sdxl" else "OUT11")
    if family == "sdxl":
        assert block_of("model.diffusion_model.label_emb.0.0.weight", fam) == "IN00"
        assert block_of("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", fam) == "BASE"
    assert block_of("first_stage_model.decoder.conv_in.weight", fam) == "BASE"


def _write(path, sd, meta=None):
    save_safetensors(sd, path, meta)
    return path


@pytest.fixture(scope="module")
def sd1_trio(tmp_path_factory):
    """Three tiny SD1 files with the extras real files have: int position_ids, B-only and non-model keys."""
    root = tmp_path_factory.mktemp("trio")
    paths = []
    for i, name in enumerate("abc"):
        p = write_single_file(make_tiny_model("sd1", seed=i), root / f"{name}_raw.safetensors")
        with safe_open(str(p), "pt") as f:
            sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None] + (5 if name == "b" else 0)
        sd["alphas_cumprod"] = torch.full((10,), float(i))
        if name == "b":
            sd["model_ema.only_in_b"] = torch.ones(3)
        paths.append(_write(root / f"{name}.safetensors", sd, meta))
    return paths


def test_weighted_sum_block_merge_matches_formula_per_key(sd1_trio, tmp_path):
    a, b, _ = sd1_trio
    weights = [round(0.04 * i, 2) for i in range(25)]
    out = tmp_path / "m.safetensors"
    res = run_merge(MergeConfig(model_a=str(a), model_b=str(b), output=str(out),
                                        weights=",".join(map(str, weights)), base_alpha=0.3, save_precision="fp32"))
    assert res.family == "sd1"
    A, B, O = load_file(a), load_file(b), load_file(out)
    names = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    by_name = dict(zip(names, weights), BASE=0.3)
    cfg = tiny_configs("sd1")["unet"]
    for key, va in A.items():
        if key.endswith("position_ids") or key == "alphas_cumprod":
            assert torch.equal(O[key], va), key  # ints never interpolated; non-model keys stay A's
            continue
        w = by_name[expected_block(key, "sd1", cfg)]
        ref = va.double() * (1 - w) + B[key].double() * w
        assert torch.allclose(O[key].double(), ref, atol=1e-6), key
    assert torch.equal(O["model_ema.only_in_b"], B["model_ema.only_in_b"])
    assert O["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["primary_model_hash"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert recipe["secondary_model_hash"] == hashlib.sha256(b.read_bytes()).hexdigest()
    assert recipe["block_weights"]["OUT11"] == weights[-1] and recipe["base_alpha"] == 0.3
    models = json.loads(meta["sd_merge_models"])
    assert {m["name"] for m in models.values()} == {"a", "b"}
    assert "loratrain.configs" in meta


def test_add_difference_fp16_prune_and_reset(sd1_trio, tmp_path):
    a, b, c = sd1_trio
    out = tmp_path / "ad.safetensors"
    run_merge(MergeConfig(model_a=str(a), model_b=str(b), model_c=str(c), method="add_difference", alpha=0.7,
                                  output=str(out), save_precision="fp16", prune=True, position_ids="reset", hash_models=False))
    A, B, C, O = load_file(a), load_file(b), load_file(c), load_file(out)
    assert "model_ema.only_in_b" not in O
    assert torch.equal(O["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])
    for key, va in A.items():
        if va.is_floating_point() and "model" in key:
            assert O[key].dtype == torch.float16
            ref = (va.double() + (B[key].double() - C[key].double()) * 0.7)
            assert torch.allclose(O[key].double(), ref, atol=2e-3, rtol=1e-3), key


def test_sdxl_block_merge_takes_a_converted_sd1_preset(tmp_path):
    a = write_single_file(make_tiny_model("sdxl", seed=0), tmp_path / "a.safetensors")
    b = write_single_file(make_tiny_model("sdxl", seed=1), tmp_path / "b.safetensors")
    out = tmp_path / "x.safetensors"
    res = run_merge(MergeConfig(model_a=str(a), model_b=str(b), output=str(out), preset="GRAD_V", hash_models=False))
    grad_v = merge_preset("GRAD_V")
    assert res.weights["IN08"] == grad_v[8] and res.weights["M00"] == grad_v[12] and res.weights["OUT08"] == grad_v[21]
    A, B, O = load_file(a), load_file(b), load_file(out)
    key = "model.diffusion_model.label_emb.0.0.weight"
    assert torch.allclose(O[key], torch.lerp(A[key], B[key], 1.0))
    key = "conditioner.embedders.1.model.ln_final.weight"
    assert torch.equal(O[key], A[key])  # BASE defaults to 0: text encoders stay A's


def test_bad_inputs_give_clear_errors_and_write_nothing(sd1_trio, tmp_path, tiny_files):
    a, b, _ = sd1_trio
    out = tmp_path / "never.safetensors"

    def attempt(exc, match, **kw):
        cfg = dict(model_a=str(a), model_b=str(b), output=str(out), alpha=0.5, hash_models=False)
        cfg.update(kw)
        with pytest.raises(exc, match=match):
            run_merge(MergeConfig(**cfg))
        assert not out.exists() and not list(tmp_path.glob(".never*"))

    attempt(ModelTypeError, "different families", model_b=str(tiny_files["sdxl_file"]))
    attempt(FileNotFoundError, "not found", model_b=str(tmp_path / "missing.safetensors"))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    attempt(UnsafeFileError, "pickled", model_b=str(ckpt))
    attempt(ValueError, "needs 25 values", alpha=None, weights="0.5," * 23 + "0.5")
    sd = load_file(b)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    sd[key] = torch.zeros(3, 3)
    bad = _write(tmp_path / "bad_shape.safetensors", sd)
    attempt(ValueError, "input_blocks.1.0.in_layers.2.weight", model_b=str(bad))

    proc = subprocess.run([sys.executable, "-m", "loratrain", "merge", str(a), str(tiny_files["sdxl_file"]),
                           "--alpha", "0.5", "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "different families" in proc.stderr and not out.exists()


@pytest.mark.slow
def test_cli_merge_then_convert_both_ways_loads(sd1_trio, tmp_path):
    from loratrain.core.models.loading import load_model

    a, b, _ = sd1_trio
    merged, folder, back = tmp_path / "m.safetensors", tmp_path / "m_diffusers", tmp_path / "back.safetensors"
    run = lambda *args: subprocess.run([sys.executable, "-m", "loratrain", *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, check=True)
    run("merge", a, b, "--preset", "FLAT_25", "--base_alpha", "0.25", "--output", merged, "--no-hash_models",
        "--save_precision", "fp32")
    run("convert", merged, folder, "--save_precision", "fp32")
    run("convert", folder, back, "--save_precision", "fp32")
    M, R = load_file(merged), load_file(back)
    floats = [k for k, v in M.items() if v.is_floating_point() and k.startswith(("model.", "first_stage", "cond_stage_model.transformer.text_model.encoder"))]
    assert floats and all(torch.equal(M[k], R[k]) for k in floats)
    model = load_model(folder)
    assert model.family.name == "sd1"


def test_vae_bake_in_and_discard_regex(sd1_trio, tmp_path):
    a, b, _ = sd1_trio
    A = load_file(a)
    vae = {k[len("first_stage_model."):]: torch.randn_like(v) for k, v in A.items() if k.startswith("first_stage_model.")}
    vae_path = _write(tmp_path / "vae.safetensors", vae)
    out = tmp_path / "v.safetensors"
    run_merge(MergeConfig(model_a=str(a), model_b=str(b), output=str(out), alpha=0.5, vae=str(vae_path),
                                  discard_weights=r"^alphas_cumprod$", hash_models=False))
    O = load_file(out)
    assert "alphas_cumprod" not in O
    assert all(torch.equal(O["first_stage_model." + k], v) for k, v in vae.items())
    with pytest.raises(ValueError, match="VAE"):
        bad = _write(tmp_path / "notvae.safetensors", {"something.else": torch.zeros(2)})
        run_merge(MergeConfig(model_a=str(a), model_b=str(b), output=str(tmp_path / "n.safetensors"), alpha=0.5,
                                      vae=str(bad), hash_models=False))
    assert not (tmp_path / "n.safetensors").exists()


@pytest.mark.parametrize("sizes", [[5, 3], [3 << 20, 7, 1 << 21]])
def test_direct_and_page_cache_writers_write_the_same_file(tmp_path, sizes):
    """Direct I/O (whole aligned blocks, unaligned tail through the page cache) and plain writes agree byte for byte,
    including a header patched at the end; a stopped write leaves nothing."""
    from loratrain.core.tensor_io import OutputTensor, StreamingWriter, chunks

    g = torch.Generator().manual_seed(0)
    data = {f"t{i}": torch.randn(n, generator=g).half() for i, n in enumerate(sizes)}
    plan = [OutputTensor(k, torch.float16, tuple(v.shape)) for k, v in data.items()]
    outs = []
    for direct in (True, False):
        path = tmp_path / f"{direct}.safetensors"
        with StreamingWriter(path, plan, {"sha": "0" * 64}, direct=direct) as w:
            for v in data.values():
                for start, n in chunks(v.numel(), 1 << 20):
                    buf = w.buffer(n, torch.float16)
                    buf.copy_(v[start:start + n])
                    w.write(buf)
            w.rewrite_metadata({"sha": "f" * 64})
        outs.append(path.read_bytes())
        loaded = load_file(path)
        assert all(torch.equal(loaded[k], v) for k, v in data.items())
    assert outs[0] == outs[1]
    with safe_open(str(tmp_path / "True.safetensors"), "pt") as f:
        assert f.metadata()["sha"] == "f" * 64
    with pytest.raises(RuntimeError, match="stop"), StreamingWriter(tmp_path / "never.safetensors", plan) as w:
        w.write(data["t0"])
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["False.safetensors", "True.safetensors"]
