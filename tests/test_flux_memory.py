"""FLUX.1 memory features (issue 25): --fp8_base (and scaled-fp8 files) and --blocks_to_swap, on CPU.

On the CPU the device is the host, so block swapping saves nothing here; what these tests pin down is its logic: every
swapped weight is NaN while "on the host" (poison), so the same loss and LoRA gradients as an unswapped run prove
each block was loaded before it ran and kept until its backward was done; the event log shows the order and that no
more than two swapped blocks are resident. Speed and peak memory are measured by bench/flux_train.py on a GPU."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from loratrain.core.errors import ConfigError
from loratrain.core.lora.flux_network import create_flux_lora
from loratrain.core.models.block_swap import enable_block_swap, swap_counts
from loratrain.core.models.flux import FLUX_TINY, FluxTransformer
from loratrain.core.models.fp8_linear import FP8, Fp8Linear, parameter_bytes, store_in_fp8
from loratrain.training import flow_matching as fm

from .test_flux_train import _args, _cli, _save, _tensors, flux_files  # noqa: F401 - the module's tiny FLUX files

CFG = dataclasses.replace(FLUX_TINY, in_channels=16, guidance_embed=True, depth=3, depth_single_blocks=6)


def _model(dtype=torch.float32) -> FluxTransformer:
    torch.manual_seed(0)
    return FluxTransformer(CFG).to(dtype).requires_grad_(False)


def _step(model: FluxTransformer, *, swap: int = 0, fp8: bool = False, dtype=torch.float32, offload: bool = False):
    """One checkpointed forward + backward with a rank-4 LoRA (non-zero ups): loss, LoRA grads, output, BlockSwap."""
    model = copy.deepcopy(model)
    if fp8:
        store_in_fp8(model, dtype)
    sw = enable_block_swap(model, swap, "cpu", poison=True) if swap else None
    torch.manual_seed(1)
    net = create_flux_lora(CFG, 4, 2.0)
    for m in net.lora.values():
        for u in m.up:
            torch.nn.init.normal_(u, std=0.1)
    net.apply_to(model)
    model.enable_gradient_checkpointing(cpu_offload=offload)
    model.train()
    g = torch.Generator().manual_seed(3)
    img, txt, y = torch.randn(2, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    out = model(img, fm.image_ids(4, 4, 2), txt, fm.text_ids(2, 5), torch.rand(2, generator=g), y, torch.full((2,), 3.5))
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}, out.detach().float(), sw


def test_block_swap_gives_the_same_loss_and_lora_gradients_and_streams_in_order():
    base = _model()
    loss, grads, _, _ = _step(base)
    loss_s, grads_s, _, sw = _step(base, swap=4)  # sd-scripts' meaning: 4 // 2 = 2 double, (4 - 2) * 2 = 4 single blocks
    assert sw.swapped == {1, 2, 5, 6, 7, 8}
    assert torch.equal(loss, loss_s) and grads.keys() == grads_s.keys()
    assert all(torch.equal(grads[k], grads_s[k]) for k in grads)
    uses = [i for kind, i in sw.events if kind == "use"]
    assert uses == [1, 2, 5, 6, 7, 8] + [8, 7, 6, 5, 2, 1]  # forward in order, backward's recomputation in reverse
    resident, most = set(), 0
    for kind, i in sw.events:  # prefetching the next block while one runs: never more than two on the "device"
        resident = resident | {i} if kind == "load" else resident - {i} if kind == "free" else resident
        most = max(most, len(resident))
    assert most == 2 and not resident and not sw.loaded  # and nothing left behind after backward
    for t in sw.model.single_blocks[-1].parameters():  # the frozen weights are "on the host" again (poisoned here)
        assert torch.isnan(t).all()
    assert all(p.device.type == "cpu" for p in sw.model.parameters())
    sw.remove()
    assert torch.equal(sw.model.single_blocks[-1].linear1.weight, base.single_blocks[-1].linear1.weight)


def test_cpu_offload_checkpointing_moves_every_block_output_to_the_host_and_changes_nothing_else(monkeypatch):
    """On the CPU the host is the device, so what is pinned down is the path: every checkpointed block (forward and
    backward's recompute) takes its inputs to the compute device and hands its output to the host, and the loss and
    LoRA gradients are bit-identical to plain checkpointing. The GPU memory saved is bench/flux_train.py's row."""
    from loratrain.core.models import dit_parts

    calls: list[str] = []
    moved = dit_parts._moved
    monkeypatch.setattr(dit_parts, "_moved", lambda x, device: calls.append(device.type) or moved(x, device))
    base = _model()
    loss, grads, out, _ = _step(base)
    assert not calls
    loss_o, grads_o, out_o, _ = _step(base, offload=True)
    blocks = CFG.depth + CFG.depth_single_blocks
    # forward: inputs to the device, output to the host; backward's recompute: inputs again (torch stops a recompute
    # once it has every saved tensor back, so its output move may not run)
    assert 3 * blocks <= len(calls) <= 4 * blocks and set(calls) == {"cpu"}  # (the compute device is the CPU here)
    assert torch.equal(loss, loss_o) and torch.equal(out, out_o)
    assert grads.keys() == grads_o.keys() and all(torch.equal(grads[k], grads_o[k]) for k in grads)


def test_cpu_offload_checkpointing_on_sd3_and_chroma_changes_nothing_but_where_activations_wait():
    from loratrain.core.models.chroma import CHROMA_TINY, ChromaTransformer
    from loratrain.core.models.sd3 import SD35_TINY, SD3Transformer

    def grads(model, run, offload):
        model = copy.deepcopy(model)
        model.enable_gradient_checkpointing(cpu_offload=offload)
        model.train()
        out = run(model)
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch.manual_seed(0)
    sd3 = SD3Transformer(SD35_TINY)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300.0]), torch.randn(1, 5, 32, generator=g),
         torch.randn(1, 64, generator=g))
    chroma = ChromaTransformer(CHROMA_TINY)
    c = CHROMA_TINY
    cx = (torch.randn(1, 16, c.in_channels, generator=g), fm.image_ids(4, 4, 1), torch.randn(1, 5, c.context_in_dim, generator=g),
          fm.text_ids(1, 5), torch.rand(1, generator=g))
    for model, run in ((sd3, lambda m: m(*x)), (chroma, lambda m: m(*cx))):
        (a, ga), (b, gb) = grads(model, run, False), grads(model, run, True)
        assert torch.equal(a, b) and len(ga) == len(gb) > 0 and all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_block_swap_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="blocks_to_swap: 8 swaps 4 double"):
        swap_counts(3, 6, 8)
    assert swap_counts(19, 38, 35) == (17, 36)  # FLUX.1's sd-scripts maximum
    model = _model()
    enable_block_swap(model, 2, "cpu", poison=True)
    model.train()
    x = torch.randn(1, 4, 16)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):  # without it backward would keep host weights
        with torch.enable_grad():
            model(x.requires_grad_(), fm.image_ids(2, 2, 1), torch.randn(1, 3, 32), fm.text_ids(1, 3), torch.rand(1),
                  torch.randn(1, 32), torch.full((1,), 3.5))
    model.eval()
    with torch.no_grad():  # inference (validation, samples) swaps without checkpointing
        out = model(x.detach(), fm.image_ids(2, 2, 1), torch.randn(1, 3, 32), fm.text_ids(1, 3), torch.rand(1),
                    torch.randn(1, 32), torch.full((1,), 3.5))
    assert torch.isfinite(out).all()


def test_fp8_base_halves_the_stored_weights_and_stays_within_fp8_error():
    base = _model(torch.bfloat16)
    blocks = lambda m: parameter_bytes(m.double_blocks) + parameter_bytes(m.single_blocks)  # noqa: E731
    fp8 = copy.deepcopy(base)
    assert store_in_fp8(fp8, torch.bfloat16) == 3 * 10 + 6 * 3  # every Linear of every block
    lin = fp8.double_blocks[0].img_attn.qkv
    assert isinstance(lin, Fp8Linear) and lin.weight.dtype == FP8 and lin.scale_weight.dtype == torch.float32
    assert fp8.img_in.weight.dtype == torch.bfloat16  # embedders and final layer stay in the training dtype
    ratio = blocks(fp8) / blocks(base)
    assert 0.5 <= ratio < 0.56, ratio  # weights 2 -> 1 byte; biases stay bf16, one float32 scale per Linear
    # one Linear: fp8 e4m3 keeps 3 mantissa bits, a relative rounding error of at most 2^-4 per weight
    ref = base.double_blocks[0].img_attn.qkv
    assert (lin.dequantized().float() - ref.weight.float()).abs().max() <= ref.weight.float().abs().max() * 2 ** -4
    x = torch.randn(8, CFG.hidden_size, dtype=torch.bfloat16)
    err = (lin(x).float() - ref(x).float()).norm() / ref(x).float().norm()
    assert err < 0.05, err
    # the whole model with a LoRA on top: same loss within fp8's error, the adapters (fp32) still get gradients
    loss, grads, out, _ = _step(base, dtype=torch.bfloat16)
    loss8, grads8, out8, _ = _step(base, fp8=True, dtype=torch.bfloat16)
    assert (out8 - out).norm() / out.norm() < 0.1
    assert abs(loss8 - loss) / loss < 0.1
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads8.values())
    # fp8 and swap together: still exactly the fp8 run
    loss8s, grads8s, _, _ = _step(base, fp8=True, swap=4, dtype=torch.bfloat16)
    assert torch.equal(loss8, loss8s) and all(torch.equal(grads8[k], grads8s[k]) for k in grads8)


def test_a_scaled_fp8_file_loads_and_fp8_base_keeps_its_exact_values(tmp_path):
    """ComfyUI / sd-scripts scaled fp8: `<layer>.weight` fp8 = W / scale, `<layer>.scale_weight` float32, a
    `scaled_fp8` marker and optional `scale_input`; loading multiplies back, --fp8_base reuses the file's scale."""
    from loratrain.core.models.flux_loading import Part, load_transformer

    sd = _model().state_dict()
    out, fp8_of = {}, {}
    for k, v in sd.items():
        path = k[: -len(".weight")]
        if k.endswith(".weight") and k.startswith(("double_blocks.", "single_blocks.")) and v.ndim == 2:
            scale = v.abs().max() / 448
            fp8_of[path] = (v / scale).to(FP8)
            out[k], out[path + ".scale_weight"] = fp8_of[path], scale.reshape(())
            out[path + ".scale_input"] = torch.ones(())
        else:
            out[k] = v
    out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    file = tmp_path / "flux_scaled.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in out.items()}, str(file))
    model = load_transformer(Part(file, "model.diffusion_model."), CFG, torch.bfloat16)
    w = model.double_blocks[1].txt_mlp[0].weight
    want = (fp8_of["double_blocks.1.txt_mlp.0"].float() * out["double_blocks.1.txt_mlp.0.scale_weight"]).to(torch.bfloat16)
    assert w.dtype == torch.bfloat16 and torch.equal(w, want)
    assert store_in_fp8(model, torch.bfloat16, model.fp8_scales) == len(fp8_of)
    for path, q in fp8_of.items():
        lin = model.get_submodule(path)
        assert torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8)), path
        assert lin.scale_weight == out[path + ".scale_weight"]


@pytest.fixture(scope="module")
def deeper_flux(flux_files, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The tiny FLUX files with a transformer of 2 double and 2 single blocks (so blocks can swap)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, depth=2, depth_single_blocks=2)
    path = tmp_path_factory.mktemp("flux_deep") / "flux_deep.safetensors"
    _save({"model.diffusion_model." + k: v for k, v in FluxTransformer(cfg).state_dict().items()}, path)
    return {**flux_files, "model": path}


def test_cli_trains_with_fp8_base_and_blocks_to_swap(deeper_flux, tmp_path):
    plain = _cli(_args(deeper_flux, tmp_path / "a", "--max_train_steps", "2"))
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    swapped = _cli(_args(deeper_flux, tmp_path / "b", "--max_train_steps", "2", "--blocks_to_swap", "2"))
    assert swapped.returncode == 0, swapped.stdout[-3000:] + swapped.stderr[-3000:]
    assert "blocks_to_swap 2: 1 double and 2 single blocks" in swapped.stdout + swapped.stderr
    a, _ = _tensors(tmp_path / "a" / "f.safetensors")
    b, _ = _tensors(tmp_path / "b" / "f.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # swapping changes nothing but memory
    both = _cli(_args(deeper_flux, tmp_path / "c", "--max_train_steps", "2", "--blocks_to_swap", "2", "--fp8_base",
                      "--mixed_precision", "bf16", "--full_bf16"))
    assert both.returncode == 0, both.stdout[-3000:] + both.stderr[-3000:]
    assert "stored in float8_e4m3fn" in both.stdout + both.stderr
    c, meta = _tensors(tmp_path / "c" / "f.safetensors")
    assert meta["ss_fp8_base"] == "True" and c.keys() == a.keys()
    assert any(c[k].abs().max() > 0 for k in c if k.endswith("lora_up.weight"))  # it trained


def test_cli_cpu_offload_checkpointing_trains_what_checkpointing_trains(deeper_flux, tmp_path):
    plain = _cli(_args(deeper_flux, tmp_path / "a", "--max_train_steps", "2"))
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    args = [a for a in _args(deeper_flux, tmp_path / "b", "--max_train_steps", "2", "--cpu_offload_checkpointing")
            if a != "--gradient_checkpointing"]
    offload = _cli(args)
    assert offload.returncode == 0, offload.stdout[-3000:] + offload.stderr[-3000:]
    assert "cpu_offload_checkpointing turns gradient checkpointing on" in offload.stdout + offload.stderr
    a, _ = _tensors(tmp_path / "a" / "f.safetensors")
    b, _ = _tensors(tmp_path / "b" / "f.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = _cli(_args(deeper_flux, tmp_path / "c", "--cpu_offload_checkpointing", "--blocks_to_swap", "2"))
    assert res.returncode == 2 and "cpu_offload_checkpointing" in res.stderr and "blocks_to_swap" in res.stderr, res.stderr[-2000:]


def test_cli_blocks_to_swap_errors_name_the_option(deeper_flux, tmp_path):
    args = [a for a in _args(deeper_flux, tmp_path / "o", "--blocks_to_swap", "2") if a != "--gradient_checkpointing"]
    res = _cli(args)
    assert res.returncode == 2 and "blocks_to_swap" in res.stderr and "gradient_checkpointing" in res.stderr, res.stderr[-2000:]
    res = _cli(_args(deeper_flux, tmp_path / "o", "--blocks_to_swap", "5"))
    assert res.returncode == 2 and "blocks_to_swap" in res.stderr and "at most" in res.stderr, res.stderr[-2000:]
    assert "caching latents" not in res.stdout + res.stderr
