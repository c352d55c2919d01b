"""QLoRA (llmkit.peft.qlora): the NF4 and dynamic code books equal bitsandbytes', NF4 codes and
scales equal bitsandbytes' quantize_4bit (double quantisation: within one code step on a few
scales, ours the nearer), the rounding error bound, NF4Linear's forward and backward, the method
quantises every block linear, counts, ~4x fewer weight bytes, merge, adapter round trip, and a
tiny training loop that learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import UserError
from llmkit.nn.linear import Linear
from llmkit.peft import count_parameters, files, get_method
from llmkit.peft.lora import LoRALinear
from llmkit.peft.qlora import (NF4Linear, dequantize_blockwise, dequantize_nf4, dynamic_code, max_half_gap, nf4_code,
                               pack_nibbles, quantize_nf4, unpack_nibbles, weight_bytes)
from llmkit.peft.targets import candidates

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared machine


@pytest.fixture(scope="module")
def bnb():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as BF
    return BF


def qlora(**opts):
    return get_method("qlora")(opts)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


def weights(shape, seed=0, scale=0.05):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- the code books and the quantiser -----------------------------------------------------------

def test_nf4_and_dynamic_code_books_equal_bitsandbytes(bnb):
    code = nf4_code()
    assert torch.equal(code, bnb.get_4bit_type("nf4", device="cpu"))
    assert code.numel() == 16 and code[7] == 0 and code[0] == -1 and code[-1] == 1
    assert torch.equal(dynamic_code(), bnb.create_dynamic_map())


def test_nibbles_round_trip_first_value_in_the_high_nibble():
    idx = torch.randint(0, 16, (11,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(idx)
    assert packed.numel() == 6 and packed[0] == (idx[0] << 4 | idx[1])
    assert torch.equal(unpack_nibbles(packed, 11), idx)


@pytest.mark.parametrize("shape,block", [((128, 64), 64), ((96, 128), 64), ((64, 256), 128), ((257, 64), 64)])
def test_nf4_codes_and_scales_equal_bitsandbytes(bnb, shape, block):
    """Without double quantisation: the packed bytes and the block absmax equal bitsandbytes'
    exactly, and so do the dequantised weights (dequantize_4bit; its CPU kernel is only used on
    shapes whose rows hold whole blocks, where it agrees with bitsandbytes' reference path)."""
    w = weights(shape)
    q_ref, state = bnb.quantize_4bit(w, blocksize=block, compress_statistics=False, quant_type="nf4")
    ours = quantize_nf4(w, block, double_quant=False)
    assert torch.equal(ours.codes, q_ref.reshape(-1))
    assert torch.equal(ours.scales, state.absmax)
    assert torch.equal(dequantize_nf4(ours), bnb.dequantize_4bit(q_ref, state))


def test_nf4_blocks_may_cross_rows(bnb):
    """Blocks run over the flattened weight (rows of 96, blocks of 64): codes and scales still equal
    bitsandbytes', and the dequantised weight is code[index] * absmax from bitsandbytes' own state.
    (bitsandbytes' native CPU dequantize_4bit kernel does not handle this layout: it disagrees with
    bitsandbytes' reference path by up to ~0.1 here, so it is not the reference.)"""
    w = weights((128, 96), seed=3)
    q_ref, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(ours.codes, q_ref.reshape(-1)) and torch.equal(ours.scales, state.absmax)
    reference = dequantize_blockwise(unpack_nibbles(q_ref.reshape(-1), w.numel()), state.absmax, nf4_code(), 64)
    assert torch.equal(dequantize_nf4(ours).reshape(-1), reference)


def test_double_quant_matches_bitsandbytes_within_one_scale_step(bnb):
    """Double quantisation: the 4-bit codes, the scales' offset and their absmax equal bitsandbytes';
    of the 8-bit scale indices a few (measured 4 of 480 here, 0.15% over 50 random [512, 256]
    weights) differ by one code step, where bitsandbytes' CPU kernel rounds to the farther code and
    ours to the nearer. So the dequantised weights differ at most by the difference of the two
    dequantised scales of their block (measured 2.2e-4 here)."""
    w = weights((480, 64), seed=1)
    q_ref, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(ours.codes, q_ref.reshape(-1))
    assert torch.allclose(ours.scale_offset, state.offset, rtol=1e-6, atol=0)
    assert torch.equal(ours.scale_absmax, state.state2.absmax)
    steps = ours.scales.int() - state.absmax.int()
    assert steps.abs().max() <= 1 and (steps != 0).float().mean() < 0.01
    a_ours = ours.absmax()
    a_ref = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    exact = w.reshape(-1, 64).abs().amax(1)
    assert ((a_ours - exact).abs() <= (a_ref - exact).abs() + 1e-9).all()  # ours never the farther
    diff = (dequantize_nf4(ours) - bnb.dequantize_4bit(q_ref, state)).abs().reshape(-1, 64)
    assert (diff <= (a_ours - a_ref).abs()[:, None] + 1e-7).all()
    assert diff.max() < 2e-3


@pytest.mark.parametrize("double_quant", [False, True])
def test_rounding_error_is_within_half_the_widest_code_gap(double_quant):
    """|w - dq(q(w))| <= absmax_block * 0.152 (half NF4's widest gap, between -1 and -0.696), plus
    the scale's own error under double quantisation; on a heavy-tailed weight with an all-zero block
    and an odd block size."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((60, 70)) * 0.02
    w[0, :50] = 0.0
    q = quantize_nf4(w, 50, double_quant)
    flat = w.reshape(-1, 50)
    absmax = flat.abs().amax(1)
    err = (dequantize_nf4(q).reshape(-1, 50) - flat).abs()
    bound = absmax * max_half_gap(nf4_code()) + (q.absmax() - absmax).abs() + 1e-7
    assert abs(max_half_gap(nf4_code()) - 0.15190) < 1e-4
    assert (err <= bound[:, None]).all()
    assert err[0].max() == 0  # the zero block dequantises to zeros
    if not double_quant:
        assert torch.equal(q.absmax(), absmax)


def test_nf4_linear_forward_and_backward_equal_the_dequantised_dense_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = NF4Linear.from_linear(lin)
    dense = layer.to_linear()
    assert layer.quantized_numel == 64 * 48 and layer.in_features == 64 and layer.out_features == 48
    assert list(n for n, p in layer.named_parameters()) == ["bias"] and not layer.bias.requires_grad
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = layer(x), dense(x2)
    assert (y - y2).abs().max() < 1e-6
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert (x.grad - x2.grad).abs().max() < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the compute dtype is the autocast one
        out = layer(x)
    assert out.dtype == torch.bfloat16 and (out.float() - y2).abs().max() < 0.05
    out.float().sum().backward()
    assert layer(x.detach().bfloat16()).dtype == torch.bfloat16


# --- the method ----------------------------------------------------------------------------------

def test_qlora_quantises_every_block_linear_and_counts(llama_pair, ids):
    """Every linear layer of the blocks becomes NF4 (q, v also carry LoRA); trainable counts equal
    LoRA's on the same targets; totals count each quantised weight once."""
    _, total_before = count_parameters(llama_pair.ours)
    model = qlora(rank=4, alpha=8.0).apply(llama_pair.ours)
    left = [t.path for t in candidates(model)]
    assert left == [], left  # no nn.Linear left inside the blocks
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 2 * 5  # qkv, proj, gate, up, down in each of 2 layers
    assert all(isinstance(model.blocks[i].attn.qkv, LoRALinear) for i in range(2))
    trainable, total = count_parameters(model)
    assert trainable == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)  # q (64 rows) and v (32 rows), rank 4
    assert total == total_before + trainable
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_qlora_at_init_equals_the_dequantised_base(llama_pair, ids):
    """B = 0: the QLoRA model computes the base model with every block linear dequantised."""
    from peft_helpers import load_pair

    reference = load_pair(llama_pair.dir).ours
    for t in candidates(reference):
        if t.rows is None:
            w = reference.get_submodule(t.path).weight
            with torch.no_grad():
                w.copy_(dequantize_nf4(quantize_nf4(w, 64, True)))
    model = qlora().apply(llama_pair.ours)
    assert (logits(model, ids) - logits(reference, ids)).abs().max() < TOL


def test_weight_bytes_fall_about_4x(llama_pair):
    """The block linears' bytes: NF4 with double quantisation stores 4.127 bits a weight, 3.9x less
    than bf16 and 7.8x less than fp32 (measured on the tiny Llama); the whole model, whose
    embeddings and head stay, falls 3.1x from fp32 here."""
    model = llama_pair.ours
    block_numel = sum(model.get_submodule(t.path).weight.numel() for t in candidates(model) if t.rows is None)
    before = weight_bytes(model)
    qlora().apply(model)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    stored = sum(m.nf4().nbytes() for m in nf4)
    assert sum(m.quantized_numel for m in nf4) == block_numel
    bits = 8 * stored / block_numel
    assert 4.1 < bits < 4.2, bits
    assert block_numel * 2 / stored > 3.8 and block_numel * 4 / stored > 7.6
    after = weight_bytes(model)
    assert before / after > 2.5, before / after


def test_qlora_merge_dequantises_and_unmerge_restores(llama_pair, ids):
    method = qlora(rank=4, alpha=8.0, target_modules="q,v,down")
    model = method.apply(llama_pair.ours)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    unmerged = logits(model, ids)
    codes = model.blocks[0].mlp.down.base.codes.clone()
    merged = method.merge(model)
    assert not any(isinstance(m, (NF4Linear, LoRALinear)) for m in merged.modules())
    assert type(merged.blocks[0].attn.proj) is Linear and type(merged.blocks[0].attn.qkv) is Linear  # fast paths apply
    assert (logits(merged, ids) - unmerged).abs().max() < TOL
    model = method.unmerge(merged)
    assert isinstance(model.blocks[0].mlp.down.base, NF4Linear)
    assert torch.equal(model.blocks[0].mlp.down.base.codes, codes)
    assert isinstance(model.blocks[0].attn.proj, NF4Linear)
    assert (logits(model, ids) - unmerged).abs().max() < TOL


def test_qlora_adapter_round_trip_and_reads_as_lora(llama_pair, hf_llama_dir, ids, tmp_path):
    """The adapter folder is a LoRA one (peft_type LORA; the quantisation recorded apart); loaded onto
    a fresh copy of the base it gives the same outputs (the quantisation is deterministic)."""
    from peft_helpers import load_pair
    from llmkit.peft import method_for_peft_config

    method = qlora(rank=4, alpha=8.0, quant_block_size=128, double_quant=False)
    model = method.apply(llama_pair.ours)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    files.save_adapter(model, method, tmp_path)
    config, tensors = files.read_adapter(tmp_path)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["llmkit_method"] == "qlora"
    assert config["llmkit_quant_block_size"] == 128 and config["llmkit_double_quant"] is False
    assert method_for_peft_config({k: v for k, v in config.items() if k != "llmkit_method"}).name == "lora"
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    loaded, again = files.load_adapter(load_pair(hf_llama_dir).ours, tmp_path)
    assert again.name == "qlora" and again.opts["quant_block_size"] == 128 and not again.opts["double_quant"]
    assert isinstance(loaded.blocks[0].attn.proj, NF4Linear) and loaded.blocks[0].attn.proj.block_size == 128
    assert (logits(loaded, ids) - logits(model, ids)).abs().max() < TOL


def test_pissa_init_quantises_the_residual(llama_pair, ids):
    """lora_init pissa: the principal part stays full precision in A, B, the residual is quantised
    (QPiSSA): at init the outputs are nearer the unquantised model's than plain QLoRA's."""
    from peft_helpers import load_pair

    full = logits(llama_pair.ours, ids)
    plain = logits(qlora(rank=8, target_modules="all-linear").apply(load_pair(llama_pair.dir).ours), ids)
    pissa = logits(qlora(rank=8, target_modules="all-linear", lora_init="pissa").apply(llama_pair.ours), ids)
    assert (pissa - full).abs().mean() < 0.9 * (plain - full).abs().mean()  # measured 0.82 (random weights)


def test_bad_options_are_refused(llama_pair):
    with pytest.raises(UserError, match="quant_block_size"):
        qlora(quant_block_size=8)
    model = qlora().apply(llama_pair.ours)
    with pytest.raises(UserError, match="already"):
        qlora().apply(model)


def test_a_tiny_training_loop_learns_a_fixed_text(llama_pair):
    """Only the adapters train on the 4-bit base (its buffers unchanged); the cross-entropy on fixed
    text falls from 5.15 to below 1.5 (measured 0.43)."""
    torch.manual_seed(0)
    model = qlora(rank=8, alpha=16.0, target_modules="q,v,up,down").apply(llama_pair.ours).train()
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0 and losses[-1] < 1.5, (losses[0], losses[-1])
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers())


def test_nf4_base_keeps_a_real_models_loss():
    """stories260K (llama2.c, 5 layers): with every block linear in NF4 (double quantised) the
    cross-entropy on a TinyStories-like text stays within 0.1 of the float model's (measured 0.667
    float, 0.656 NF4), while the block linears' bytes fall 7.8x from fp32 (the model's 3.4x: its
    embeddings stay)."""
    from pathlib import Path

    from llmkit.model_io import load_pretrained, pretrained_tokenizer

    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "models" / "stories260K" / "stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    text = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
            "she saw a big dog. The dog was very friendly and wanted to play with her. Lily was happy and they "
            "played together all day.")
    ids = torch.tensor([pretrained_tokenizer(path).encode(text)])

    def loss(model):
        out = logits(model, ids[:, :-1])
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).item()

    model = load_pretrained(path).eval()
    before, bytes_before = loss(model), weight_bytes(model)
    quantised = qlora().apply(model)
    assert abs(loss(quantised) - before) < 0.1 and before < 1.0, (before, loss(quantised))
    assert bytes_before / weight_bytes(quantised) > 3.0
